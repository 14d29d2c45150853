"""On-disk helpers shared by the index modules: reproducible .npz files, checksums, packed ids.

Every file the index package writes goes through :func:`csplade._io.atomic_write` (a crash leaves
the old file or the new one, never half of one).

`.npz` files are written with fixed zip timestamps, so identical arrays give identical bytes: a
re-encoded shard has the same sha256 as the original.

Identifier lists (doc ids, query ids) are stored as one UTF-8 byte blob plus int64 offsets rather
than as a fixed-width numpy unicode array: a single long id would otherwise inflate every entry, and
object arrays would need pickle, which the package never uses.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Iterable
from typing import Any

import numpy as np

from csplade._io import atomic_write

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def save_npz_atomic(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """Write an uncompressed .npz atomically; loadable with `np.load(..., allow_pickle=False)`.

    Unlike `np.savez`, the zip entries carry a fixed timestamp, so the same arrays always give the
    same bytes (and the same sha256).
    """
    with atomic_write(path, "wb") as handle:
        with zipfile.ZipFile(
            handle, "w", compression=zipfile.ZIP_STORED, allowZip64=True
        ) as archive:
            for key, value in arrays.items():
                value = np.asarray(value)
                if value.dtype == object:
                    raise TypeError(
                        f"array {key!r} has dtype object; refusing to write it (pickle)"
                    )
                info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_EPOCH)
                with archive.open(info, "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, value, allow_pickle=False)


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint_ids(ids: Iterable[str]) -> str:
    """Order-sensitive sha256 of a list of ids (length-prefixed, so no separator can collide)."""
    digest = hashlib.sha256()
    for ident in ids:
        raw = ident.encode("utf-8")
        digest.update(len(raw).to_bytes(8, "little"))
        digest.update(raw)
    return digest.hexdigest()


def pack_strings(strings: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Strings -> (UTF-8 blob uint8 (total_bytes,), offsets int64 (n + 1,))."""
    encoded = [s.encode("utf-8") for s in strings]
    lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    return blob, offsets


def unpack_strings(blob: np.ndarray, offsets: np.ndarray) -> list[str]:
    """Inverse of `pack_strings`."""
    raw = blob.tobytes()
    bounds = offsets.tolist()
    return [raw[bounds[i] : bounds[i + 1]].decode("utf-8") for i in range(len(bounds) - 1)]


def require_unique_ids(ids: list[str], what: str = "doc id") -> None:
    """Raise ValueError naming the first repeated id and both of its positions."""
    seen: dict[str, int] = {}
    for position, ident in enumerate(ids):
        if not isinstance(ident, str):
            raise TypeError(f"{what} at position {position} is {type(ident).__name__}, not str")
        first = seen.setdefault(ident, position)
        if first != position:
            raise ValueError(f"duplicate {what} {ident!r} at positions {first} and {position}")


def jsonable(value: Any, what: str) -> Any:
    """Normalise through a JSON round trip (tuples -> lists); reject what JSON cannot hold."""
    try:
        return json.loads(json.dumps(value, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"{what} must be JSON-serialisable (str, numbers, lists, dicts): {exc}"
        ) from None


def settings_diff(old: Any, new: Any, sides: tuple[str, str], prefix: str = "") -> list[str]:
    """One line per setting that differs between two (nested) dicts, named by its dotted key and
    the values on each side (`sides` names them, e.g. ("on disk", "now"))."""
    if isinstance(old, dict) and isinstance(new, dict):
        diffs = []
        for key in sorted(set(old) | set(new)):
            a, b = old.get(key, "<missing>"), new.get(key, "<missing>")
            diffs += settings_diff(a, b, sides, f"{prefix}{key}.")
        return diffs
    if old == new:
        return []
    return [f"{prefix.rstrip('.')}: {old!r} ({sides[0]}) != {new!r} ({sides[1]})"]
