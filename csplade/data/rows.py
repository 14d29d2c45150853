"""Reading files row by row into cached Arrow tables, with file:line errors.

Files are read through HF ``datasets`` (`Dataset.from_generator`), so the rows live in a memory-mapped
Arrow file, not in Python lists. ``from_generator`` caches by a fingerprint; ours is a hash of the
file's bytes (plus the reader's version and options), so an edited file is always re-read and an
unchanged one is loaded from the cache. The line and reason of each skipped row are stored in the
cached table (on the next kept row), so the same warnings are logged whether the table was just
built or came from the cache.

Files ending in ``.gz`` are read through gzip (`open_binary`); their fingerprint hashes the compressed
bytes.

Known limit: the whole file is hashed on each load (seconds per GB).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, NamedTuple

import datasets
import pyarrow.compute as pc
from datasets import Features, List, Value

logger = logging.getLogger(__name__)

# Bump when the rows a reader writes change, so that old cached tables are not reused.
READER_VERSION = "1"

# Rows that are not in the table (bad rows, blank lines) are recorded on the next kept row (on the
# last one for those at the end of the file), so their count and lines survive the cache.
SKIP_FEATURES = {
    "skipped_lines": List(Value("int64")),  # bad rows skipped (skip_bad_rows=True) ...
    "skipped_reasons": List(Value("string")),  # ... and why
    "n_empty": Value("int64"),  # blank lines / empty documents: not rows, not errors
}
SKIP_COLUMNS = list(SKIP_FEATURES)


class BadRow(ValueError):
    """A row that cannot be used; the message is the reason (the caller adds file:line)."""


class Skip(NamedTuple):
    """A line that gives no row: a bad row (`reason` set) or a blank line/empty document (None)."""

    line: int
    reason: str | None = None


def fingerprint(path: Path, *options: Any) -> str:
    """Hash of the reader version, the options and every byte of `path` (the cache key)."""
    digest = hashlib.blake2b(digest_size=16)
    for part in (READER_VERSION, *options):
        digest.update(repr(part).encode("utf-8") + b"\0")
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def from_generator(
    generator: Callable[..., Iterator[dict]],
    gen_kwargs: dict[str, Any],
    features: Features,
    fingerprint: str,
    cache_dir: str | os.PathLike | None,
) -> datasets.Dataset:
    """`Dataset.from_generator` keyed by `fingerprint`, re-raising our own errors unwrapped."""
    try:
        return datasets.Dataset.from_generator(
            generator,
            features=features,
            gen_kwargs=gen_kwargs,
            cache_dir=None if cache_dir is None else str(cache_dir),
            fingerprint=fingerprint,
        )
    except datasets.exceptions.DatasetGenerationError as exc:
        cause = exc.__cause__
        if isinstance(cause, (ValueError, OSError)):
            raise cause from None
        raise


def attach_skips(
    items: Iterator[dict[str, Any] | Skip], path: str, unit: str = "line"
) -> Iterator[dict[str, Any]]:
    """Yield the good rows, each carrying the skips (bad rows, blank lines) met before it.

    Skips after the last good row go on the last row. A file without any good row raises ValueError
    (`unit` names where the first bad one was: "line" or "row").
    """
    pending: dict[str, Any] | None = None
    lines: list[int] = []
    reasons: list[str] = []
    n_empty = 0
    for item in items:
        if isinstance(item, Skip):
            if item.reason is None:
                n_empty += 1
            else:
                lines.append(item.line)
                reasons.append(item.reason)
            continue
        if pending is not None:
            yield pending
        pending = {**item, "skipped_lines": lines, "skipped_reasons": reasons, "n_empty": n_empty}
        lines, reasons, n_empty = [], [], 0
    if pending is None:
        first = f", first on {unit} {lines[0]}: {reasons[0]}" if lines else ""
        raise ValueError(
            f"{path}: no usable rows ({len(lines)} bad rows skipped{first}; {n_empty} blank "
            "lines or empty documents)"
        )
    pending["skipped_lines"] += lines
    pending["skipped_reasons"] += reasons
    pending["n_empty"] += n_empty
    yield pending


def report_skips(
    table: datasets.Dataset,
    path: Path | str,
    what: str,
    where: Callable[[int], str] | None = None,
) -> tuple[list[int], int]:
    """Log each skipped bad row (line and reason) and their count; return (lines, n_empty).

    `where(n)` names line or row n in the messages (default ``path:n``).
    """
    data = table.data
    lines = pc.list_flatten(data.column("skipped_lines")).to_pylist()
    reasons = pc.list_flatten(data.column("skipped_reasons")).to_pylist()
    for line, reason in zip(lines, reasons, strict=True):
        place = where(line) if where is not None else f"{path}:{line}"
        logger.warning("%s: skipped bad %s (%s)", place, what, reason)
    if lines:
        logger.warning(
            "%s: skipped %d bad %s(s) of %d (skip_bad_rows=True)",
            path,
            len(lines),
            what,
            len(lines) + len(table),
        )
    n_empty = int(pc.sum(data.column("n_empty")).as_py() or 0)
    return lines, n_empty


_GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)


def open_binary(path: Path) -> IO[bytes]:
    """`path` opened for reading bytes, through gzip when its name ends in ``.gz``."""
    return gzip.open(path, "rb") if Path(path).suffix == ".gz" else open(path, "rb")


def read_lines(path: Path) -> Iterator[tuple[int, str | BadRow]]:
    """(line number, decoded line) for every line; a line that is not UTF-8 gives a `BadRow`.

    A gzipped file (``.gz``) is decompressed on the fly; a corrupt archive raises ValueError.
    """
    with open_binary(path) as handle:
        lines = enumerate(handle, start=1)
        while True:
            try:
                line_no, raw = next(lines)
            except StopIteration:
                return
            except _GZIP_ERRORS as exc:
                raise ValueError(f"{path}: cannot decompress ({exc})") from None
            try:
                yield line_no, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield line_no, BadRow(f"not valid UTF-8 ({exc.reason} at byte {exc.start})")


def require_rows(path: Path) -> None:
    """Raise when `path` has no non-blank line (HF datasets cannot build an empty table)."""
    try:
        with open_binary(path) as handle:
            if not any(raw.strip() for raw in handle):
                raise ValueError(f"{path}: empty file (no non-blank line)")
    except _GZIP_ERRORS as exc:
        raise ValueError(f"{path}: cannot decompress ({exc})") from None


def describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"
