"""Training groups — (query, positives, negatives, teacher scores) — read from any source.

Why: contrastive training of a sparse encoder (SPLADE v2, arXiv 2109.10086; CSPLADE, arXiv 2504.10816)
consumes, per query, one relevant document and ``group_size - 1`` negatives, optionally with teacher
scores for distillation. This module reads and validates those groups (sampling and batching:
:mod:`csplade.data.sampling`).

`load_training_groups` takes a recipe's ``train_data`` (:func:`csplade.data.formats.resolve`):

- a BEIR folder (:mod:`csplade.data.beir_groups`);
- anything else holding rows — JSONL / Parquet / Arrow files (optionally gzipped), a `datasets`
  ``save_to_disk`` folder, a folder of data files, a hub dataset id — in one of the layouts of
  :mod:`csplade.data.schemas` (csplade's own groups, Tevatron, sentence-transformers), recognised by
  their columns.

Rows are validated one by one: a bad row is an error naming its file and line (JSONL) or row
(tables), or, with ``skip_bad_rows``, is skipped with a warning naming it. Either every row has
teacher scores or none does. Without ``streaming`` the rows are copied once into a cached Arrow table
(:mod:`csplade.data.rows`; keyed by the file's bytes or the dataset's fingerprint) and sampled by
:class:`GroupDataset`; with ``streaming`` they are read as they are trained on
(:class:`StreamingGroupDataset`; no copy, no cache).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import pyarrow.compute as pc
from datasets import Features, List, Value

from csplade.data.beir_groups import read_groups_beir
from csplade.data.formats import Source, resolve
from csplade.data.rows import (
    SKIP_COLUMNS,
    SKIP_FEATURES,
    BadRow,
    Skip,
    attach_skips,
    from_generator,
    report_skips,
    require_rows,
)
from csplade.data.sampling import GroupDataset
from csplade.data.schemas import CSPLADE, GROUP_KEYS, detect_schema, ignored_columns, parse_record
from csplade.data.streaming import StreamingGroupDataset

logger = logging.getLogger(__name__)

READER = "groups-2"  # part of the cache key: bump when the rows written change


def _features(unit: str) -> Features:
    """The cached table of groups; `unit` ("line" or "row") names the source position column."""
    return Features(
        {
            "query": Value("string"),
            "query_id": Value("string"),
            "positives": List(Value("string")),
            "negatives": List(Value("string")),
            "positive_scores": List(Value("float64")),  # null when the data has no teacher scores
            "negative_scores": List(Value("float64")),
            unit: Value("int64"),
            "n_negatives_dropped": Value("int64"),  # negatives equal to a positive of the row
            "unknown_keys": List(Value("string")),
            **SKIP_FEATURES,
        }
    )


# ------------------------------------------------------------------------------- the layout
def source_schema(source: Source) -> str:
    """The layout of `source` (:mod:`csplade.data.schemas`); logs the columns it ignores."""
    if source.kind == "jsonl":
        schema, columns = _jsonl_schema(source)
    else:
        columns = source.columns()
        schema = detect_schema(columns, source.name)
    ignored = ignored_columns(schema, columns)
    if ignored:
        logger.warning("%s: columns %s are not read (layout: %s)", source.name, ignored, schema)
    return schema


def _jsonl_schema(source: Source, look: int = 1000) -> tuple[str, list[str]]:
    """JSON Lines: the layout of the first object that has one (csplade's when none has).

    csplade's own rows are checked row by row (file:line errors), so a file of them, even one whose
    first rows are bad, reads as before; keys that fit no layout at all are an error.
    """
    first: list[str] | None = None
    for seen, (_, record) in enumerate(source.records()):
        if seen >= look:
            break
        if not isinstance(record, dict):
            continue
        first = first if first is not None else list(record)
        try:
            return detect_schema(list(record), source.name), list(record)
        except ValueError:
            continue
    if first is None or {"query", "positives"} & set(first):
        return CSPLADE, first or []
    return detect_schema(first, source.name), first  # raises: lists the keys and the layouts


# ------------------------------------------------------------------------------- rows of groups
def iter_groups(
    source: Source, schema: str, skip_bad_rows: bool, report: bool = True
) -> Iterator[dict[str, Any] | Skip]:
    """Validated group rows of `source` (each with its line/row number), or `Skip`s.

    A bad row raises ValueError "where: reason" unless `skip_bad_rows`; then it is a `Skip`, logged
    here when `report` (streamed sources: the cached tables log theirs when loaded).
    """
    first: int | None = None  # the first good row decides whether rows carry teacher scores
    first_has_scores = False
    unit = source.unit
    for number, record in source.records():
        try:
            if isinstance(record, BadRow):
                raise record
            row = parse_record(record, schema)
            has_scores = row["positive_scores"] is not None
            if first is None:
                first, first_has_scores = number, has_scores
            elif has_scores != first_has_scores:
                raise BadRow(
                    f"{'has' if has_scores else 'has no'} teacher 'scores' but the first row "
                    f"({unit} {first}) {'has' if first_has_scores else 'has none'}; "
                    "either every row has scores or none does"
                )
        except BadRow as exc:
            if not skip_bad_rows:
                raise ValueError(
                    f"{source.where(number)}: {exc} (skip_bad_rows=True skips such rows)"
                ) from None
            if report:
                logger.warning("%s: skipped bad row (%s)", source.where(number), exc)
            yield Skip(number, str(exc))
            continue
        yield {**row, unit: number}


def _generate_groups(source: Source, schema: str, skip_bad_rows: bool) -> Iterator[dict[str, Any]]:
    rows = iter_groups(source, schema, skip_bad_rows, report=False)
    yield from attach_skips(rows, source.name, source.unit)


def read_groups(
    source: Source | str | os.PathLike,
    skip_bad_rows: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[datasets.Dataset, dict[str, Any]]:
    """Read and validate training groups from `source` (a :class:`Source`, or a file path).

    Returns the groups (an Arrow-backed Dataset: query, query_id, positives, negatives,
    positive_scores, negative_scores, and ``line`` for JSONL or ``row`` for tables) and counters:
    ``rows`` read, ``skipped`` (with ``skipped_lines``), ``negatives_dropped`` (equal to a
    positive), ``groups`` kept, ``schema``. `cache_dir` is the HF datasets cache (None: default).
    """
    if not isinstance(source, Source):
        source = _file_source(Path(source))
    if source.kind == "jsonl":
        require_rows(Path(source.location))
    schema = source_schema(source)
    table = from_generator(
        _generate_groups,
        {"source": source, "schema": schema, "skip_bad_rows": skip_bad_rows},
        _features(source.unit),
        source.fingerprint(READER, schema, skip_bad_rows),
        cache_dir,
    )
    skipped, _ = report_skips(table, source.name, "row", where=source.where)
    n_dropped = int(pc.sum(table.data.column("n_negatives_dropped")).as_py())
    if n_dropped:
        logger.warning(
            "%s: removed %d negatives identical to a positive of the same row",
            source.name,
            n_dropped,
        )
    _warn_unknown_keys(table, source)
    groups = table.remove_columns(["n_negatives_dropped", "unknown_keys", *SKIP_COLUMNS])
    stats = {
        "source": source.name,
        "schema": schema,
        "rows": len(table) + len(skipped),
        "skipped": len(skipped),
        "skipped_lines": skipped,
        "negatives_dropped": n_dropped,
        "groups": len(groups),
    }
    logger.info(
        "%s: %d training groups (%s layout, %d bad rows skipped)",
        source.name,
        len(groups),
        schema,
        len(skipped),
    )
    return groups, stats


def read_groups_jsonl(
    path: str | os.PathLike,
    skip_bad_rows: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[datasets.Dataset, dict[str, Any]]:
    """`read_groups` of a JSON Lines file (``.jsonl`` or ``.jsonl.gz``): errors name path:line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training groups file not found: {path}")
    return read_groups(Source("jsonl", str(path)), skip_bad_rows, cache_dir)


def _file_source(path: Path) -> Source:
    found = resolve(path, what="groups")
    if not isinstance(found, Source):
        raise ValueError(f"{path}: a BEIR folder or text file, not a table of training groups")
    return found


def _warn_unknown_keys(table: datasets.Dataset, source: Source) -> None:
    """One warning per unknown top-level key: how many rows have it and the first line."""
    keys = table.data.column("unknown_keys")
    if pc.sum(pc.list_value_length(keys)).as_py() in (None, 0):
        return
    parents = pc.list_parent_indices(keys).to_numpy()
    flat = pc.list_flatten(keys).to_pylist()
    numbers = table.data.column(source.unit).to_numpy()
    first: dict[str, int] = {}
    counts: dict[str, int] = {}
    for key, parent in zip(flat, parents, strict=True):
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, int(numbers[parent]))
    for key, count in counts.items():
        logger.warning(
            "%s: ignored unknown key %r on %d row(s), first on %s %d (known keys: %s)",
            source.name,
            key,
            count,
            source.unit,
            first[key],
            ", ".join(GROUP_KEYS),
        )


# ------------------------------------------------------------------------------- entry point
def load_training_groups(
    data_args: Any, seed: int, cache_dir: str | os.PathLike | None = None
) -> GroupDataset | StreamingGroupDataset:
    """The dataset of a recipe's `DataArguments` (``train_data`` and its options).

    A `GroupDataset` (random access; the Trainer shuffles), or with ``streaming`` a
    `StreamingGroupDataset` (read in order through a seeded shuffle buffer; needs ``max_steps``).
    """
    if data_args.train_data is None:
        raise ValueError(
            "train_data is not set: give training groups (.jsonl/.parquet/.arrow, a `datasets` "
            "folder or hub id) or a BEIR folder with qrels/<split>.tsv"
        )
    streaming = bool(getattr(data_args, "streaming", False))
    found = resolve(
        data_args.train_data,
        split=data_args.train_split,
        config=getattr(data_args, "train_config", None),
        streaming=streaming,
    )
    if isinstance(found, Path) and not found.is_dir():
        raise ValueError(
            f"train_data {found}: a text file, not training groups (expected .jsonl, .parquet, "
            ".arrow, a BEIR folder, a `datasets` folder or a hub id)"
        )
    if isinstance(found, Path):
        return _beir_dataset(found, data_args, seed, streaming, cache_dir)
    if data_args.negatives_run is not None:
        raise ValueError(
            f"negatives_run applies to a BEIR folder; {found.name} holds training groups that "
            "carry their own negatives"
        )
    if streaming:
        return _streaming_dataset(found, data_args, seed)
    groups, stats = read_groups(found, data_args.skip_bad_rows, cache_dir=cache_dir)
    return GroupDataset(
        groups,
        data_args.group_size,
        seed=seed,
        max_queries=data_args.max_train_queries,
        stats=stats,
    )


def _beir_dataset(folder: Path, data_args: Any, seed: int, streaming: bool, cache_dir):
    if data_args.skip_bad_rows:
        logger.info("skip_bad_rows does not apply to BEIR folders: their bad rows are errors")
    if streaming:
        logger.info("streaming does not apply to BEIR folders (their corpus is a cached table)")
    groups, corpus, stats = read_groups_beir(
        folder,
        split=data_args.train_split,
        negatives_run=data_args.negatives_run,
        negatives_depth=data_args.negatives_depth,
        cache_dir=cache_dir,
    )
    return GroupDataset(
        groups,
        data_args.group_size,
        seed=seed,
        corpus=corpus,
        max_queries=data_args.max_train_queries,
        stats=stats,
    )


class _GroupStream:
    """Opens the validated group rows of a source (a picklable callable, for dataloader workers)."""

    def __init__(self, source: Source, schema: str, skip_bad_rows: bool) -> None:
        self.source, self.schema, self.skip_bad_rows = source, schema, skip_bad_rows

    def __call__(self, report: bool) -> Iterator[dict[str, Any]]:
        for row in iter_groups(self.source, self.schema, self.skip_bad_rows, report=report):
            if not isinstance(row, Skip):
                yield row


def _streaming_dataset(source: Source, data_args: Any, seed: int) -> StreamingGroupDataset:
    schema = source_schema(source)
    logger.info("%s: training groups streamed (%s layout)", source.name, schema)
    return StreamingGroupDataset(
        _GroupStream(source, schema, bool(data_args.skip_bad_rows)),
        data_args.group_size,
        seed=seed,
        shuffle_buffer=getattr(data_args, "shuffle_buffer", 10_000),
        max_queries=data_args.max_train_queries,
        where=source.where,
        unit=source.unit,
        stats={"source": source.name, "schema": schema, "streaming": True},
    )
