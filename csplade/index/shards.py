"""Resumable corpus encoding into fixed-size sparse shards, and loading them back.

What: `encode_corpus(encode_fn, doc_ids, texts, out_dir, describe=...)` cuts the corpus into shards
of `shard_size` consecutive docs (shard i = docs [i * shard_size, (i + 1) * shard_size) in corpus
order; the encoder sorts by length inside its own batching), calls `encode_fn(texts) -> csr (n, V)`
once per shard, and writes

    out_dir/shard-00000.npz   indptr, indices, data (+ doc ids as a UTF-8 blob with offsets, scale)
    out_dir/manifest.json     settings, counts, V, and per shard: file, n_docs, nnz, sha256, scale

Every file is written atomically (temp file in the same directory, fsync, `os.replace`), and the
manifest is rewritten after each shard, so an interrupted run loses at most the shard in progress.

Why: encoding a corpus with an LLM takes hours; a crash, a pre-empted job or a full disk must not
throw that away. A rerun with the same settings verifies the recorded shards (sha256 of the file)
and encodes only the missing or corrupt ones. The settings are `describe` (whatever identifies the
model and encoding options: checkpoint, max length, pooling, ...) plus the shard size, quantization,
given scale, number of docs and a fingerprint of the doc ids; a rerun with different settings raises
ValueError listing the differences, unless `overwrite=True`, which discards the old shards.

Ranks: with `world_size > 1`, shard i belongs to rank `i % world_size`; each rank encodes only its
shards and records them in `manifest.rank{r}.json`, then calls the `barrier` you pass (e.g.
`accelerator.wait_for_everyone` or `torch.distributed.barrier`), so every rank must call
`encode_corpus` with the same arguments. After the barrier, rank 0 checks that every shard is
recorded, writes the final `manifest.json` (`"complete": true`) and removes the rank files. Ranks
other than 0 return None. A rerun may use a different `world_size`: records from the earlier run are
honoured whichever rank wrote them.

Quantization (storage only; `load_index` always returns float32):
- None: float32.
- "fp16": half precision; weights above 65504 raise ValueError, and weights too small for fp16
  become zero and are dropped (counted as `n_zeroed` in the manifest).
- "uint8": integer impacts round(w * scale) clipped to 255, as Anserini does with its x100 integer
  weights. With `scale` given, one scale serves the whole index and weights above 255 / scale are
  clipped (counted as `n_clipped`, with a warning). Without it, each shard uses 255 / (its largest
  weight), recorded per shard, so nothing is clipped. Weights that round to 0 are dropped
  (`n_zeroed`). The round-trip error is at most 0.5 / scale per weight. uint8 needs weights >= 0.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from csplade._io import atomic_write
from csplade._progress import progress as progress_bar
from csplade.index.storage import (
    fingerprint_ids,
    jsonable,
    pack_strings,
    require_unique_ids,
    save_npz_atomic,
    settings_diff,
    sha256_file,
    unpack_strings,
)

logger = logging.getLogger(__name__)

FORMAT = "csplade-sparse-shards"
VERSION = 1
MANIFEST = "manifest.json"
QUANTIZE = (None, "fp16", "uint8")
_FP16_MAX = 65504.0


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.npz"


def _rank_manifest(rank: int) -> str:
    return f"manifest.rank{rank}.json"


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a csplade shard manifest (format != {FORMAT!r})")
    if data.get("version") != VERSION:
        raise ValueError(f"{path}: manifest version {data.get('version')}, expected {VERSION}")
    return data


def _write_json(path: Path, data: dict) -> None:
    with atomic_write(path, "w") as handle:
        json.dump(data, handle, indent=1, sort_keys=False, allow_nan=False)
        handle.write("\n")


# ------------------------------------------------------------------------------ quantization


def _quantize(
    data: np.ndarray, quantize: str | None, scale: float | None
) -> tuple[np.ndarray, float | None, int]:
    """float32 weights -> (stored values, scale used or None, number clipped)."""
    if quantize is None:
        return data.astype(np.float32), None, 0
    if quantize == "fp16":
        if data.size and np.abs(data).max() > _FP16_MAX:
            raise ValueError(f"a weight of {np.abs(data).max():g} does not fit in fp16 (max 65504)")
        return data.astype(np.float16), None, 0
    if data.size and data.min() < 0:
        raise ValueError(f"uint8 quantization needs weights >= 0, found {data.min():g}")
    if scale is None:
        top = float(data.max()) if data.size else 0.0
        scale = 255.0 / top if top > 0 else 1.0
    scaled = np.rint(data.astype(np.float64) * scale)
    n_clipped = int((scaled > 255).sum())
    return np.minimum(scaled, 255).astype(np.uint8), float(scale), n_clipped


def _dequantize(data: np.ndarray, scale: float | None) -> np.ndarray:
    if data.dtype == np.uint8:
        return (data.astype(np.float64) / scale).astype(np.float32)
    return data.astype(np.float32)


# ----------------------------------------------------------------------------------- encoding


def _check_encoded(matrix, n_rows: int, vocab_size: int | None, ids: Sequence[str], shard: int):
    """Validate encode_fn's output for one shard; return a canonical float32 CSR."""
    if not sp.issparse(matrix):
        raise TypeError(
            f"encode_fn must return a scipy.sparse CSR matrix, got {type(matrix).__name__} "
            f"(shard {shard})"
        )
    if matrix.shape[0] != n_rows:
        raise ValueError(
            f"encode_fn returned {matrix.shape[0]} rows for {n_rows} texts (shard {shard})"
        )
    if vocab_size is not None and matrix.shape[1] != vocab_size:
        raise ValueError(
            f"encode_fn returned {matrix.shape[1]} columns for shard {shard}, earlier shards had "
            f"{vocab_size}"
        )
    csr = sp.csr_matrix(matrix, dtype=np.float32, copy=True)
    csr.sum_duplicates()
    bad = ~np.isfinite(csr.data)
    if bad.any():
        row = int(np.searchsorted(csr.indptr, int(np.flatnonzero(bad)[0]), side="right") - 1)
        raise ValueError(
            f"encode_fn returned a non-finite weight for doc {ids[row]!r} (shard {shard})"
        )
    csr.eliminate_zeros()
    return csr


def _write_shard(path: Path, csr: sp.csr_matrix, ids: list[str], quantize, scale) -> dict:
    stored, used_scale, n_clipped = _quantize(csr.data, quantize, scale)
    keep = stored != 0  # weights that quantize to zero are not stored
    n_zeroed = int((~keep).sum())
    indptr = csr.indptr.astype(np.int64)
    indices = csr.indices.astype(np.int32)
    if n_zeroed:
        rows = np.repeat(np.arange(csr.shape[0]), np.diff(indptr))
        indices, stored = indices[keep], stored[keep]
        indptr = np.zeros_like(indptr)
        np.cumsum(np.bincount(rows[keep], minlength=csr.shape[0]), out=indptr[1:])
    blob, offsets = pack_strings(ids)
    save_npz_atomic(
        path,
        {
            "indptr": indptr,
            "indices": indices,
            "data": stored,
            "shape": np.array(csr.shape, dtype=np.int64),
            "scale": np.array(np.nan if used_scale is None else used_scale),
            "doc_ids_blob": blob,
            "doc_ids_offsets": offsets,
        },
    )
    if n_clipped:
        logger.warning(
            "%s: %d weights above 255 / scale = %g were clipped", path.name, n_clipped, 255 / scale
        )
    return {
        "file": path.name,
        "n_docs": csr.shape[0],
        "nnz": int(stored.size),
        "sha256": sha256_file(path),
        "scale": used_scale,
        "n_clipped": n_clipped,
        "n_zeroed": n_zeroed,
    }


def _valid_record(out_dir: Path, index: int, record: dict | None, expected_docs: int) -> bool:
    if not record:
        return False
    path = out_dir / shard_name(index)
    if record.get("file") != path.name or record.get("n_docs") != expected_docs:
        return False
    if not path.exists():
        logger.warning("%s is recorded but missing; it will be encoded again", path.name)
        return False
    if sha256_file(path) != record.get("sha256"):
        logger.warning("%s does not match its recorded sha256; it will be encoded again", path.name)
        return False
    return True


@dataclass
class _ShardJob:
    """What one rank has to do: the settings every shard shares, and the shards it owns."""

    out_dir: Path
    settings: dict
    n_shards: int
    mine: list[int]  # shard ids of this rank
    own_record: Path  # manifest.json (one process) or manifest.rank{r}.json
    rank: int
    world_size: int

    @property
    def shard_size(self) -> int:
        return self.settings["shard_size"]

    def shard_docs(self, i: int) -> int:
        return min(self.shard_size, self.settings["n_docs"] - i * self.shard_size)

    def write_record(
        self, entries: list[dict | None], vocab_size: int | None, complete: bool
    ) -> None:
        _write_json(
            self.own_record,
            {
                "format": FORMAT,
                "version": VERSION,
                "settings": self.settings,
                "vocab_size": vocab_size,
                "n_shards": self.n_shards,
                "complete": complete,
                "nnz": sum(e["nnz"] for e in entries if e),
                "shards": entries,
            },
        )


def _check_arguments(
    doc_ids: list[str], texts: Sequence[str], describe: dict, shard_size: int,
    quantize: str | None, scale: float | None, rank: int, world_size: int, barrier,
) -> None:  # fmt: skip
    if len(texts) != len(doc_ids):
        raise ValueError(f"{len(doc_ids)} doc ids but {len(texts)} texts")
    require_unique_ids(doc_ids, "doc id")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {QUANTIZE}, got {quantize!r}")
    if scale is not None and (quantize != "uint8" or not (scale > 0 and math.isfinite(scale))):
        raise ValueError(f"scale={scale!r} needs quantize='uint8' and a finite value > 0")
    if not (world_size >= 1 and 0 <= rank < world_size):
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if world_size > 1 and barrier is None:
        raise ValueError(
            "world_size > 1 needs a barrier callable (e.g. accelerator.wait_for_everyone)"
        )
    if not isinstance(describe, dict):
        raise TypeError(f"describe must be a dict, got {type(describe).__name__}")


def _plan_job(
    out_dir: Path, doc_ids: list[str], describe: dict, shard_size: int,
    quantize: str | None, scale: float | None, rank: int, world_size: int,
) -> _ShardJob:  # fmt: skip
    n_docs = len(doc_ids)
    n_shards = -(-n_docs // shard_size)
    settings = {
        "describe": jsonable(describe, "describe"),
        "n_docs": n_docs,
        "shard_size": shard_size,
        "quantize": quantize,
        "scale": scale,
        "doc_ids_sha256": fingerprint_ids(doc_ids),
    }
    own_record = out_dir / (MANIFEST if world_size == 1 else _rank_manifest(rank))
    mine = list(range(rank, n_shards, world_size))
    return _ShardJob(out_dir, settings, n_shards, mine, own_record, rank, world_size)


def _discard(job: _ShardJob) -> None:
    """`overwrite`: remove this rank's shards and records (rank 0: those no current rank owns)."""
    out_dir = job.out_dir
    for i in job.mine:
        (out_dir / shard_name(i)).unlink(missing_ok=True)
    job.own_record.unlink(missing_ok=True)
    if job.rank == 0:
        (out_dir / MANIFEST).unlink(missing_ok=True)
        for path in out_dir.glob("manifest.rank*.json"):
            if int(path.name[len("manifest.rank") : -len(".json")]) >= job.world_size:
                path.unlink()
        for path in out_dir.glob("shard-*.npz"):
            if int(path.stem[len("shard-") :]) >= job.n_shards:
                path.unlink()


def _resume(job: _ShardJob, overwrite: bool) -> tuple[list[dict | None], list[int], int | None]:
    """(entries of the shards already done, shards still to encode, vocabulary size if known)."""
    out_dir = job.out_dir
    # Debris of a run killed in the middle of an atomic write (only this rank's own files: another
    # rank may be writing its temp files right now).
    for name in [shard_name(i) for i in job.mine] + [job.own_record.name]:
        for path in out_dir.glob(f".{name}.*.tmp"):
            path.unlink(missing_ok=True)
    # Records from earlier runs: the final manifest and any rank manifests, whoever wrote them.
    records: dict[int, dict] = {}
    vocab_size = None
    if overwrite:
        _discard(job)
    else:
        for path in sorted(out_dir.glob("manifest*.json")):
            old = _read_json(path)
            diffs = settings_diff(old["settings"], job.settings, ("on disk", "now"))
            if diffs:
                raise ValueError(
                    f"{path} was written with different settings:\n  " + "\n  ".join(diffs) + "\n"
                    "Use another out_dir, or pass overwrite=True to discard the existing shards."
                )
            vocab_size = vocab_size or old.get("vocab_size")
            for i, rec in enumerate(old["shards"]):
                if rec:
                    records.setdefault(i, rec)
    entries: list[dict | None] = [None] * job.n_shards
    todo = []
    for i in job.mine:
        if _valid_record(out_dir, i, records.get(i), job.shard_docs(i)):
            entries[i] = records[i]
        else:
            todo.append(i)
    if len(job.mine) > len(todo):
        logger.info(
            "resuming: %d of rank %d's %d shards already done",
            len(job.mine) - len(todo),
            job.rank,
            len(job.mine),
        )
    return entries, todo, vocab_size


def _encode_shards(
    job: _ShardJob,
    encode_fn: Callable[[list[str]], sp.csr_matrix],
    doc_ids: list[str],
    texts: Sequence[str],
    entries: list[dict | None],
    todo: list[int],
    vocab_size: int | None,
    progress: bool,
) -> int | None:
    """Encode and write the shards in `todo`, recording each as it lands; returns V."""
    settings = job.settings
    bar = progress_bar(
        total=sum(job.shard_docs(i) for i in job.mine),
        initial=sum(job.shard_docs(i) for i in set(job.mine) - set(todo)),
        unit="doc",
        desc=f"encode (rank {job.rank})" if job.world_size > 1 else "encode",
        disable=not progress,
        dynamic_ncols=True,
    )
    with bar:
        for i in todo:
            lo, hi = i * job.shard_size, i * job.shard_size + job.shard_docs(i)
            start = time.perf_counter()
            encoded = _check_encoded(
                encode_fn(list(texts[lo:hi])), hi - lo, vocab_size, doc_ids[lo:hi], i
            )
            vocab_size = vocab_size or encoded.shape[1]
            entries[i] = _write_shard(
                job.out_dir / shard_name(i),
                encoded,
                doc_ids[lo:hi],
                settings["quantize"],
                settings["scale"],
            )
            entries[i]["seconds"] = round(time.perf_counter() - start, 3)
            job.write_record(entries, vocab_size, complete=False)
            bar.update(hi - lo)
    return vocab_size


def encode_corpus(
    encode_fn: Callable[[list[str]], sp.csr_matrix],
    doc_ids: Sequence[str],
    texts: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    describe: dict,
    shard_size: int = 10_000,
    quantize: str | None = None,
    scale: float | None = None,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict | None:
    """Encode `texts` shard by shard into `out_dir`, resuming a previous run (see module docstring).

    `describe` identifies the model and encoding settings (must be JSON-serialisable). Returns the
    final manifest on rank 0 and None on other ranks.
    """
    out_dir = Path(out_dir)
    doc_ids = list(doc_ids)
    _check_arguments(
        doc_ids, texts, describe, shard_size, quantize, scale, rank, world_size, barrier
    )
    job = _plan_job(out_dir, doc_ids, describe, shard_size, quantize, scale, rank, world_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries, todo, vocab_size = _resume(job, overwrite)
    vocab_size = _encode_shards(job, encode_fn, doc_ids, texts, entries, todo, vocab_size, progress)
    if world_size == 1:
        job.write_record(entries, vocab_size, complete=True)
        for path in out_dir.glob("manifest.rank*.json"):  # superseded records of a multi-rank run
            path.unlink()
        return _read_json(out_dir / MANIFEST)
    job.write_record(entries, vocab_size, complete=False)
    barrier()
    if rank != 0:
        return None
    return _finalise(out_dir, job.settings, job.n_shards, world_size)


def _finalise(out_dir: Path, settings: dict, n_shards: int, world_size: int) -> dict:
    """Rank 0, after the barrier: merge the rank manifests into manifest.json."""
    entries: list[dict | None] = [None] * n_shards
    vocab_size = None
    for r in range(world_size):
        path = out_dir / _rank_manifest(r)
        if not path.exists():
            raise RuntimeError(f"{path} is missing after the barrier: did rank {r} run?")
        part = _read_json(path)
        if part["settings"] != settings:
            raise RuntimeError(f"{path} has other settings than rank 0 (inconsistent ranks)")
        vocab_size = vocab_size or part["vocab_size"]
        if part["vocab_size"] not in (None, vocab_size):
            raise RuntimeError(f"{path}: V={part['vocab_size']}, another rank has V={vocab_size}")
        for i in range(r, n_shards, world_size):
            entries[i] = part["shards"][i]
    missing = [i for i, e in enumerate(entries) if not e]
    if missing:
        raise RuntimeError(f"shards {missing[:10]} were not recorded by their ranks")
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "settings": settings,
        "vocab_size": vocab_size,
        "n_shards": n_shards,
        "complete": True,
        "nnz": sum(e["nnz"] for e in entries),
        "shards": entries,
    }
    _write_json(out_dir / MANIFEST, manifest)
    for path in out_dir.glob("manifest.rank*.json"):
        path.unlink()
    return manifest


# ------------------------------------------------------------------------------------ loading


def read_manifest(index_dir: str | os.PathLike) -> dict:
    """The manifest of a finished index; ValueError if it is missing or incomplete."""
    path = Path(index_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: not an encoded index directory")
    manifest = _read_json(path)
    if not manifest.get("complete"):
        missing = [i for i, e in enumerate(manifest["shards"]) if not e]
        more = "..." if len(missing) > 10 else ""
        raise ValueError(
            f"{path}: encoding is incomplete (shards {missing[:10]}{more} missing); run "
            "encode_corpus again with the same settings to resume"
        )
    return manifest


def iter_shards(
    index_dir: str | os.PathLike, verify: bool = True
) -> Iterator[tuple[sp.csr_matrix, list[str]]]:
    """Yield (float32 CSR (n, V), doc ids) per shard in corpus order, sha256 checked."""
    index_dir = Path(index_dir)
    manifest = read_manifest(index_dir)
    vocab_size = manifest["vocab_size"]
    for i, record in enumerate(manifest["shards"]):
        path = index_dir / record["file"]
        if verify and sha256_file(path) != record["sha256"]:
            raise ValueError(f"{path}: sha256 mismatch with {MANIFEST} (corrupt or replaced shard)")
        with np.load(path, allow_pickle=False) as npz:
            shape = tuple(int(x) for x in npz["shape"])
            scale = float(npz["scale"])
            data = _dequantize(npz["data"], None if math.isnan(scale) else scale)
            csr = sp.csr_matrix((data, npz["indices"], npz["indptr"]), shape=shape)
            ids = unpack_strings(npz["doc_ids_blob"], npz["doc_ids_offsets"])
        if (
            shape != (record["n_docs"], vocab_size)
            or csr.nnz != record["nnz"]
            or len(ids) != shape[0]
        ):
            raise ValueError(
                f"{path}: holds {shape} with {csr.nnz} weights and {len(ids)} ids; the manifest "
                f"says ({record['n_docs']}, {vocab_size}) with {record['nnz']} (shard {i})"
            )
        yield csr, ids


def load_index(
    index_dir: str | os.PathLike, verify: bool = True
) -> tuple[sp.csr_matrix, list[str], dict]:
    """Load an encoded corpus: (float32 CSR (n_docs, V), doc ids, manifest), checksums verified."""
    manifest = read_manifest(index_dir)
    matrices, doc_ids = [], []
    for csr, ids in iter_shards(index_dir, verify=verify):
        matrices.append(csr)
        doc_ids.extend(ids)
    settings = manifest["settings"]
    if len(doc_ids) != settings["n_docs"] or (
        verify and fingerprint_ids(doc_ids) != settings["doc_ids_sha256"]
    ):
        raise ValueError(f"{index_dir}: the shards' doc ids do not match the manifest's corpus")
    docs = (
        sp.vstack(matrices, format="csr", dtype=np.float32)
        if matrices
        else sp.csr_matrix((0, manifest["vocab_size"] or 0), dtype=np.float32)
    )
    return docs, doc_ids, manifest
