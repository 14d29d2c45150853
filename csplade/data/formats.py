"""Where rows come from: local files in several formats, `datasets` folders and the Hugging Face hub.

A data argument (``train_data``, ``adapt_data``) names one of (:func:`resolve`):

- a file: JSON Lines (``.jsonl``), Parquet (``.parquet``) or Arrow IPC (``.arrow``, stream or file
  format), each optionally gzipped (``.gz``; a gzipped Parquet or Arrow file is decompressed once into
  a temporary file, since both formats need random access);
- a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (``split`` picks the
  split of a DatasetDict);
- a folder of data files, e.g. a clone of a hub dataset repository (read by ``datasets.load_dataset``
  with ``config`` and ``split``);
- a BEIR folder (corpus.jsonl, queries.jsonl, qrels/), or the name of one under ``$CSPLADE_DATA``;
- a hub dataset id ``owner/name``, loaded with ``datasets.load_dataset(id, config, split=split)``
  where a network is available. Offline (``HF_HUB_OFFLINE=1``) only a copy already in the ``datasets``
  cache loads; otherwise the error says how to bring the data over as a ``save_to_disk`` folder.

A :class:`Source` yields ``(row number, record)`` pairs (1-based; the line number for JSON Lines),
knows its columns and a fingerprint for caching, and reads lazily: with ``streaming`` nothing is copied
and a hub dataset is streamed (``load_dataset(..., streaming=True)``).
"""

from __future__ import annotations

import atexit
import functools
import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from csplade.data.beir import DATA_ENV, find_dataset
from csplade.data.rows import BadRow, fingerprint, read_lines

logger = logging.getLogger(__name__)

FILE_KINDS = {".jsonl": "jsonl", ".parquet": "parquet", ".arrow": "arrow"}
TEXT_SUFFIXES = (".txt",)  # read as plain text by `csplade.data.texts`, not as records
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_BATCH = 512  # rows per Arrow batch read

ACCEPTED = (
    "a .jsonl, .parquet or .arrow file (each optionally .gz), a BEIR folder (corpus.jsonl, "
    "queries.jsonl, qrels/<split>.tsv) or its name under $" + DATA_ENV + ", a folder written by "
    "`datasets` save_to_disk, a folder of data files, or a Hugging Face hub dataset id (owner/name)"
)


def file_kind(path: str | os.PathLike) -> str | None:
    """'jsonl', 'parquet' or 'arrow' from a file name (a trailing .gz is looked through), else None."""
    name = Path(path)
    if name.suffix == ".gz":
        name = Path(name.stem)
    return FILE_KINDS.get(name.suffix)


@dataclass(frozen=True)
class Source:
    """One place rows come from (see the module docstring); `kind` says how it is read.

    kind: jsonl | parquet | arrow (a file), disk (save_to_disk folder), folder (data files), hub.
    """

    kind: str
    location: str
    split: str = "train"
    config: str | None = None
    streaming: bool = False

    @property
    def name(self) -> str:
        """How messages name this source: the path, or the hub id with its config and split."""
        one_split = (
            self.kind == "disk" and not (Path(self.location) / "dataset_dict.json").is_file()
        )
        if self.kind in ("hub", "folder", "disk") and not one_split:
            details = ", ".join(p for p in (self.config, f"split {self.split}") if p)
            return f"{self.location} ({details})"
        return self.location

    @property
    def unit(self) -> str:
        return "line" if self.kind == "jsonl" else "row"

    def where(self, number: int) -> str:
        """`name:line` for JSON Lines, `name: row N` otherwise (N 1-based)."""
        return f"{self.name}:{number}" if self.unit == "line" else f"{self.name}: row {number}"

    def columns(self) -> list[str]:
        """Column names (for JSON Lines: the keys of the first JSON object)."""
        if self.kind == "jsonl":
            return _first_jsonl_keys(Path(self.location))
        if self.kind == "parquet":
            return list(pq.read_schema(_readable(self.location)).names)
        if self.kind == "arrow":
            return list(_arrow_schema(_readable(self.location)).names)
        dataset = _hf_dataset(self)
        names = dataset.column_names
        if names is None:  # some streamed datasets only know their columns once read
            first = next(iter(dataset), None)
            names = list(first) if first is not None else []
        return list(names)

    def records(self) -> Iterator[tuple[int, dict[str, Any] | BadRow]]:
        """(row number, record) in source order; a record that cannot be decoded is a `BadRow`."""
        if self.kind == "jsonl":
            return _jsonl_records(Path(self.location))
        if self.kind == "parquet":
            return _numbered(_parquet_batches(_readable(self.location)))
        if self.kind == "arrow":
            return _numbered(_arrow_batches(_readable(self.location)))
        return _dataset_records(_hf_dataset(self))

    def fingerprint(self, *options: Any) -> str:
        """Cache key of this source's content and the reader's `options`."""
        if self.kind in FILE_KINDS.values():
            return fingerprint(Path(self.location), self.kind, *options)
        if self.kind == "disk":
            digest = hashlib.blake2b(repr((self.split, options)).encode(), digest_size=16)
            for file in sorted(Path(self.location).rglob("*")):
                if file.is_file():
                    stat = file.stat()
                    digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
                    if file.suffix == ".json":
                        digest.update(file.read_bytes())
            return digest.hexdigest()
        dataset = _hf_dataset(self)
        base = getattr(dataset, "_fingerprint", None) or repr((self.location, self.config))
        return hashlib.blake2b(
            repr((base, self.split, options)).encode(), digest_size=16
        ).hexdigest()


def count_rows(source: Source) -> int | None:
    """Rows of a source without reading them where the format says (Parquet metadata, Arrow
    batches, a `datasets` folder); JSON Lines are counted line by line; a hub source: None."""
    if source.kind == "parquet":
        return pq.ParquetFile(_readable(source.location)).metadata.num_rows
    if source.kind == "arrow":
        return sum(batch.num_rows for batch in _arrow_batches(_readable(source.location)))
    if source.kind == "jsonl":
        return sum(1 for _, line in read_lines(Path(source.location)) if str(line).strip())
    if source.kind == "disk" and not source.streaming:
        return len(_hf_dataset(source))
    return None


def resolve(
    value: str | os.PathLike,
    what: str = "train_data",
    split: str = "train",
    config: str | None = None,
    streaming: bool = False,
) -> Source | Path:
    """The :class:`Source` a data argument names, or the Path of a BEIR folder.

    Text files (``.txt``, ``.txt.gz``) come back as their Path too (read as plain text by
    :mod:`csplade.data.texts`). Raises FileNotFoundError when nothing matches, naming what is accepted.
    """
    path = Path(value).expanduser()
    if path.is_file():
        kind = file_kind(path)
        if kind is None:
            if path.name.removesuffix(".gz").endswith(TEXT_SUFFIXES):
                return path
            raise ValueError(f"{what} {path}: unknown file type; expected {ACCEPTED}")
        return Source(kind, str(path), split, config, streaming)
    if path.is_dir():
        return _folder_source(path, what, split, config, streaming)
    text = str(value)
    if file_kind(text) is not None or text.endswith(TEXT_SUFFIXES):
        raise FileNotFoundError(f"{what} not found: {path}")
    if "/" not in text:
        return find_dataset(text, files=True)  # a BEIR name under $CSPLADE_DATA, or how to get it
    if _HUB_ID.fullmatch(text) and not text.startswith((".", "~")):
        return Source("hub", text, split, config, streaming)
    raise FileNotFoundError(f"{what} not found: {value} (expected {ACCEPTED})")


def is_saved_dataset(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _folder_source(path: Path, what: str, split: str, config, streaming) -> Source | Path:
    if (path / "corpus.jsonl").is_file() and (path / "queries.jsonl").is_file():
        return path
    if is_saved_dataset(path):
        return Source("disk", str(path), split, config, streaming)
    # data files at the top or one level down (a hub repository: data/, or one folder per config)
    data_files = [p for p in (*path.glob("*"), *path.glob("*/*")) if file_kind(p) is not None]
    if data_files:
        return Source("folder", str(path), split, config, streaming)
    raise ValueError(
        f"{what} {path} is a folder but not a BEIR folder (needs corpus.jsonl, queries.jsonl and "
        "qrels/<split>.tsv), not a `datasets` save_to_disk folder (dataset_info.json, state.json) "
        "and holds no .jsonl/.parquet/.arrow data files"
    )


# ---------------------------------------------------------------------------------- file readers
def _jsonl_records(path: Path) -> Iterator[tuple[int, dict[str, Any] | BadRow]]:
    for line_no, line in read_lines(path):
        if isinstance(line, BadRow):
            yield line_no, line
            continue
        if not line.strip():
            continue  # a blank line between JSON records is not a row
        try:
            yield line_no, json.loads(line)
        except json.JSONDecodeError as exc:
            yield line_no, BadRow(f"malformed JSON ({exc.msg} at column {exc.colno})")


def _first_jsonl_keys(path: Path) -> list[str]:
    for _, record in _jsonl_records(path):
        if isinstance(record, dict):
            return list(record)
    raise ValueError(f"{path}: no line holds a JSON object")


def _numbered(batches: Iterator[pa.RecordBatch]) -> Iterator[tuple[int, dict[str, Any]]]:
    number = 0
    for batch in batches:
        for record in batch.to_pylist():
            number += 1
            yield number, record


def _parquet_batches(path: Path) -> Iterator[pa.RecordBatch]:
    try:
        yield from pq.ParquetFile(path).iter_batches(batch_size=_BATCH)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"{path}: not a readable Parquet file ({exc})") from None


def _arrow_reader(path: Path):
    source = pa.memory_map(str(path))
    try:
        return pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        try:
            return pa.ipc.open_file(source)
        except pa.ArrowInvalid as exc:
            raise ValueError(f"{path}: not an Arrow IPC stream or file ({exc})") from None


def _arrow_schema(path: Path) -> pa.Schema:
    return _arrow_reader(path).schema


def _arrow_batches(path: Path) -> Iterator[pa.RecordBatch]:
    reader = _arrow_reader(path)
    if isinstance(reader, pa.ipc.RecordBatchFileReader):
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)
    else:
        yield from reader


@functools.lru_cache(maxsize=8)
def _decompressed(path: str, size: int, mtime_ns: int) -> Path:
    """A gzipped Parquet/Arrow file decompressed once into a temporary folder (kept until exit)."""
    folder = tempfile.TemporaryDirectory(prefix="csplade-gunzip-")
    atexit.register(folder.cleanup)  # removed when the interpreter exits
    out = Path(folder.name) / Path(path).stem
    logger.info("%s: decompressing into %s (Parquet/Arrow need random access)", path, out)
    try:
        with gzip.open(path, "rb") as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path}: cannot decompress ({exc})") from None
    return out


def _readable(location: str) -> Path:
    path = Path(location)
    if path.suffix != ".gz":
        return path
    stat = path.stat()
    return _decompressed(str(path), stat.st_size, stat.st_mtime_ns)


# ------------------------------------------------------------------------------- `datasets` side
def _dataset_records(dataset) -> Iterator[tuple[int, dict[str, Any]]]:
    if isinstance(dataset, datasets.Dataset):
        for number, table in enumerate(dataset.with_format("arrow").iter(batch_size=_BATCH)):
            for offset, record in enumerate(table.to_pylist()):
                yield number * _BATCH + offset + 1, record
        return
    for number, record in enumerate(dataset, start=1):
        yield number, record


@functools.lru_cache(maxsize=4)
def _hf_dataset(source: Source):
    """The `datasets` Dataset (or, streaming, IterableDataset) behind a disk/folder/hub source."""
    if source.kind == "disk":
        loaded = datasets.load_from_disk(source.location)
        if isinstance(loaded, datasets.DatasetDict):
            if source.split not in loaded:
                raise ValueError(
                    f"{source.location}: no split {source.split!r} (splits: {', '.join(loaded)})"
                )
            loaded = loaded[source.split]
        return loaded.to_iterable_dataset() if source.streaming else loaded
    try:
        return datasets.load_dataset(
            source.location, source.config, split=source.split, streaming=source.streaming
        )
    except (ConnectionError, FileNotFoundError, OSError) as exc:
        raise FileNotFoundError(_unreachable(source, exc)) from None
    except ValueError as exc:  # unknown split or config
        raise ValueError(f"{source.name}: {exc}") from None


def _unreachable(source: Source, exc: Exception) -> str:
    if source.kind == "folder":
        return f"{source.name}: cannot read its data files ({type(exc).__name__}: {exc})"
    offline = datasets.config.HF_HUB_OFFLINE
    why = "HF_HUB_OFFLINE is set (offline mode)" if offline else f"{type(exc).__name__}: {exc}"
    config = f", {source.config!r}" if source.config else ""
    return (
        f"{source.location!r} is not a local file or folder, and loading it as a Hugging Face hub "
        f'dataset failed: {why}. Where a network is available, save it once: python -c "import '
        f"datasets; datasets.load_dataset({source.location!r}{config}, split={source.split!r})"
        ".save_to_disk('DIR')\" and point at DIR (or copy the repository's data files)."
    )
