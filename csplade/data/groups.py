"""Training data: groups of (query, one positive, n-1 negatives), their collator, and unlabeled text.

Why: contrastive training of a sparse encoder (SPLADE v2, arXiv 2109.10086; CSPLADE, arXiv 2504.10816)
consumes, per query, one relevant document and ``group_size - 1`` negatives, optionally with teacher
scores for distillation. This module owns reading those groups from disk, validating them, sampling
one group per query at training time, and batching them into token tensors. It also reads the
unlabeled text of the pre-contrastive adaptation phase (`read_texts`).

Sources (`load_training_groups` picks by the path):

- a JSONL file, one training group per line::

      {"query": str, "query_id": str?, "positives": [item, ...], "negatives": [item, ...]?,
       "scores": {"positives": [float, ...], "negatives": [float, ...]}?}

  An item is a string or an object ``{"_id"?, "title"?, "text"}`` (indexed as `beir.doc_text`).
  ``scores`` are teacher scores parallel to the lists; either every row has them or none does.
  A negative identical to a positive of the same row is removed (counted and logged).
- a BEIR folder with ``qrels/<split>.tsv``: positives are the judged documents with score > 0;
  negatives are the top ``negatives_depth`` documents of a TREC run with the query's judged positives
  removed (judged non-relevant documents stay: they are good negatives), or, without a run, random
  corpus documents drawn at training time. Queries left without a positive are dropped and counted.

Files are read through HF ``datasets`` (`Dataset.from_generator`), so the rows live in a memory-mapped
Arrow file, not in Python lists. ``from_generator`` caches by a fingerprint; ours is a hash of the
file's bytes (plus the reader's version and options), so an edited file is always re-read and an
unchanged one is loaded from the cache. The line and reason of each skipped row are stored in the
cached table (on the next kept row), so the same warnings are logged whether the table was just
built or came from the cache.

Sampling is a pure function of (seed, epoch, index): `GroupDataset` seeds a local numpy Generator from
the three, never a global RNG. The HF Trainer skips the batches of a resumed epoch without calling the
dataset, and it calls ``set_epoch`` on the dataset through accelerate, so a resumed run sees exactly
the groups it would have seen.

Known limits: plain (not gzipped) files only; the whole file is hashed on each load (seconds per GB);
a BEIR run file is read whole into memory (`csplade.index.runs.read_trec_run`); with
``dataloader_persistent_workers`` the worker copies of the dataset do not see ``set_epoch``; a random
corpus negative can still be relevant (unjudged), as in every random-negative scheme.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Features, List, Value

from csplade.data.beir import doc_text, iter_corpus, load_qrels, load_queries, qrels_path
from csplade.index.runs import read_trec_run

logger = logging.getLogger(__name__)

# Bump when the rows a reader writes change, so that old cached tables are not reused.
READER_VERSION = "1"
GROUP_KEYS = ("query", "query_id", "positives", "negatives", "scores", "teacher_scores")
# `teacher_scores` (per-teacher raw scores written by `csplade teacher-scores`) is kept for the record
# and not read by training, which uses the combined `scores`.
SCORE_KEYS = ("positives", "negatives")

# Rows that are not in the table (bad rows, blank lines) are recorded on the next kept row (on the
# last one for those at the end of the file), so their count and lines survive the cache.
_SKIP_FEATURES = {
    "skipped_lines": List(Value("int64")),  # bad rows skipped (skip_bad_rows=True) ...
    "skipped_reasons": List(Value("string")),  # ... and why
    "n_empty": Value("int64"),  # blank lines / empty documents: not rows, not errors
}
_JSONL_GROUP_FEATURES = Features(
    {
        "query": Value("string"),
        "query_id": Value("string"),
        "positives": List(Value("string")),
        "negatives": List(Value("string")),
        "positive_scores": List(Value("float64")),  # null when the file has no teacher scores
        "negative_scores": List(Value("float64")),
        "line": Value("int64"),
        "n_negatives_dropped": Value("int64"),  # negatives equal to a positive of the row
        "unknown_keys": List(Value("string")),
        **_SKIP_FEATURES,
    }
)
_BEIR_GROUP_FEATURES = Features(
    {
        "query": Value("string"),
        "query_id": Value("string"),
        "positives": List(Value("int64")),  # rows of the corpus table
        "negatives": List(Value("int64")),
    }
)
_CORPUS_FEATURES = Features({"_id": Value("string"), "text": Value("string")})
_TEXT_FEATURES = Features({"text": Value("string"), "line": Value("int64"), **_SKIP_FEATURES})
_SKIP_COLUMNS = list(_SKIP_FEATURES)


class _BadRow(ValueError):
    """A row that cannot be used; the message is the reason (the caller adds file:line)."""


class _Skip(NamedTuple):
    """A line that gives no row: a bad row (`reason` set) or a blank line/empty document (None)."""

    line: int
    reason: str | None = None


# ---------------------------------------------------------------------------------------- caching
def _fingerprint(path: Path, *options: Any) -> str:
    """Hash of the reader version, the options and every byte of `path` (the cache key)."""
    digest = hashlib.blake2b(digest_size=16)
    for part in (READER_VERSION, *options):
        digest.update(repr(part).encode("utf-8") + b"\0")
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _from_generator(
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


def _attach_skips(items: Iterator[dict[str, Any] | _Skip], path: str) -> Iterator[dict[str, Any]]:
    """Yield the good rows, each carrying the skips (bad rows, blank lines) met before it.

    Skips after the last good row go on the last row. A file without any good row raises ValueError.
    """
    pending: dict[str, Any] | None = None
    lines: list[int] = []
    reasons: list[str] = []
    n_empty = 0
    for item in items:
        if isinstance(item, _Skip):
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
        first = f", first on line {lines[0]}: {reasons[0]}" if lines else ""
        raise ValueError(
            f"{path}: no usable rows ({len(lines)} bad rows skipped{first}; {n_empty} blank "
            "lines or empty documents)"
        )
    pending["skipped_lines"] += lines
    pending["skipped_reasons"] += reasons
    pending["n_empty"] += n_empty
    yield pending


def _report_skips(table: datasets.Dataset, path: Path, what: str) -> tuple[list[int], int]:
    """Log each skipped bad row (line and reason) and their count; return (lines, n_empty)."""
    data = table.data
    lines = pc.list_flatten(data.column("skipped_lines")).to_pylist()
    reasons = pc.list_flatten(data.column("skipped_reasons")).to_pylist()
    for line, reason in zip(lines, reasons, strict=True):
        logger.warning("%s:%d: skipped bad %s (%s)", path, line, what, reason)
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


def _read_lines(path: Path) -> Iterator[tuple[int, str | _BadRow]]:
    """(line number, decoded line) for every line; a line that is not UTF-8 gives a `_BadRow`."""
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                yield line_no, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield line_no, _BadRow(f"not valid UTF-8 ({exc.reason} at byte {exc.start})")


def _require_rows(path: Path) -> None:
    """Raise when `path` has no non-blank line (HF datasets cannot build an empty table)."""
    with open(path, "rb") as handle:
        if not any(raw.strip() for raw in handle):
            raise ValueError(f"{path}: empty file (no non-blank line)")


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


# ---------------------------------------------------------------------------- JSONL training groups
def _item_text(item: Any, where: str) -> str:
    """The text of one positive/negative: a string, or an object read with `doc_text`."""
    if isinstance(item, str):
        text = item.strip()
    elif isinstance(item, dict):
        if not isinstance(item.get("text"), str):
            raise _BadRow(f"{where} needs a string 'text', got {_describe(item.get('text'))}")
        title = item.get("title")
        if title is not None and not isinstance(title, str):
            raise _BadRow(f"{where} has a non-string 'title': {_describe(title)}")
        doc_id = item.get("_id")
        if doc_id is not None and (isinstance(doc_id, bool) or not isinstance(doc_id, (str, int))):
            raise _BadRow(f"{where} has an '_id' that is not a string: {_describe(doc_id)}")
        text = doc_text(item)
    else:
        raise _BadRow(f"{where} must be a string or an object with 'text', got {_describe(item)}")
    if not text:
        raise _BadRow(f"{where} is empty")
    return text


def _items(record: dict, key: str, required: bool) -> list[str]:
    value = record.get(key)
    if value is None:
        if required:
            raise _BadRow(f"missing '{key}'")
        return []
    if not isinstance(value, list):
        raise _BadRow(f"'{key}' must be a list, got {_describe(value)}")
    if required and not value:
        raise _BadRow(f"'{key}' is empty")
    return [_item_text(item, f"{key}[{i}]") for i, item in enumerate(value)]


def _score_list(scores: dict, key: str, n_items: int) -> list[float]:
    value = scores.get(key)
    if value is None:
        if n_items == 0:
            return []
        raise _BadRow(f"'scores' has no '{key}' but there are {n_items} {key}")
    if not isinstance(value, list):
        raise _BadRow(f"'scores.{key}' must be a list, got {_describe(value)}")
    if len(value) != n_items:
        raise _BadRow(f"'scores.{key}' has {len(value)} values but '{key}' has {n_items} items")
    for i, x in enumerate(value):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            raise _BadRow(f"'scores.{key}[{i}]' must be a finite number, got {_describe(x)}")
    return [float(x) for x in value]


def _parse_group(line: str) -> dict[str, Any]:
    """One JSONL line -> a row of `_JSONL_GROUP_FEATURES` (less line and skips); `_BadRow` if bad."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise _BadRow(f"malformed JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise _BadRow(f"expected a JSON object, got {type(record).__name__}")
    if "query" not in record:
        raise _BadRow("missing 'query'")
    query = record["query"]
    if not isinstance(query, str):
        raise _BadRow(f"'query' must be a string, got {_describe(query)}")
    if not query.strip():
        raise _BadRow("'query' is empty")
    query_id = record.get("query_id")
    if query_id is not None:
        if isinstance(query_id, bool) or not isinstance(query_id, (str, int)):
            raise _BadRow(f"'query_id' must be a string, got {_describe(query_id)}")
        query_id = str(query_id)
    positives = _items(record, "positives", required=True)
    negatives = _items(record, "negatives", required=False)
    positive_scores = negative_scores = None
    scores = record.get("scores")
    if scores is not None:
        if not isinstance(scores, dict):
            raise _BadRow(f"'scores' must be an object, got {_describe(scores)}")
        unknown = sorted(set(scores) - set(SCORE_KEYS))
        if unknown:
            raise _BadRow(f"'scores' has unknown key(s) {unknown}; allowed: {list(SCORE_KEYS)}")
        positive_scores = _score_list(scores, "positives", len(positives))
        negative_scores = _score_list(scores, "negatives", len(negatives))
    positive_set = set(positives)
    keep = [i for i, text in enumerate(negatives) if text not in positive_set]
    n_dropped = len(negatives) - len(keep)
    if n_dropped:
        negatives = [negatives[i] for i in keep]
        if negative_scores is not None:
            negative_scores = [negative_scores[i] for i in keep]
    return {
        "query": query,
        "query_id": query_id,
        "positives": positives,
        "negatives": negatives,
        "positive_scores": positive_scores,
        "negative_scores": negative_scores,
        "n_negatives_dropped": n_dropped,
        "unknown_keys": sorted(set(record) - set(GROUP_KEYS)),
    }


def _group_rows(path: str, skip_bad_rows: bool) -> Iterator[dict[str, Any] | _Skip]:
    first_line: int | None = None  # the first good row decides whether rows carry scores
    first_has_scores = False
    for line_no, line in _read_lines(Path(path)):
        try:
            if isinstance(line, _BadRow):
                raise line
            if not line.strip():
                continue  # a blank line between JSON records is not a row
            row = _parse_group(line)
            has_scores = row["positive_scores"] is not None
            if first_line is None:
                first_line, first_has_scores = line_no, has_scores
            elif has_scores != first_has_scores:
                raise _BadRow(
                    f"{'has' if has_scores else 'has no'} teacher 'scores' but the first row "
                    f"(line {first_line}) {'has' if first_has_scores else 'has none'}; "
                    "either every row has scores or none does"
                )
        except _BadRow as exc:
            if not skip_bad_rows:
                raise ValueError(
                    f"{path}:{line_no}: {exc} (skip_bad_rows=True skips such rows)"
                ) from None
            yield _Skip(line_no, str(exc))
            continue
        yield {**row, "line": line_no}


def _generate_groups(path: str, skip_bad_rows: bool) -> Iterator[dict[str, Any]]:
    yield from _attach_skips(_group_rows(path, skip_bad_rows), path)


def read_groups_jsonl(
    path: str | os.PathLike,
    skip_bad_rows: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[datasets.Dataset, dict[str, Any]]:
    """Read and validate a JSONL file of training groups (format in the module docstring).

    Returns the groups (an Arrow-backed Dataset: query, query_id, positives, negatives,
    positive_scores, negative_scores, line) and counters: ``rows`` read, ``skipped``
    (with ``skipped_lines``), ``negatives_dropped`` (equal to a positive), ``groups`` kept.
    A bad row raises ValueError "path:line: reason" unless `skip_bad_rows`, which skips it with a
    warning naming its line. `cache_dir` is the HF datasets cache (None: its default).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training groups file not found: {path}")
    _require_rows(path)
    table = _from_generator(
        _generate_groups,
        {"path": str(path), "skip_bad_rows": skip_bad_rows},
        _JSONL_GROUP_FEATURES,
        _fingerprint(path, "groups", skip_bad_rows),
        cache_dir,
    )
    skipped_lines, _ = _report_skips(table, path, "row")
    n_dropped = int(pc.sum(table.data.column("n_negatives_dropped")).as_py())
    if n_dropped:
        logger.warning(
            "%s: removed %d negatives identical to a positive of the same row", path, n_dropped
        )
    _warn_unknown_keys(table, path)
    groups = table.remove_columns(["n_negatives_dropped", "unknown_keys", *_SKIP_COLUMNS])
    stats = {
        "source": str(path),
        "rows": len(table) + len(skipped_lines),
        "skipped": len(skipped_lines),
        "skipped_lines": skipped_lines,
        "negatives_dropped": n_dropped,
        "groups": len(groups),
    }
    logger.info(
        "%s: %d training groups (%d bad rows skipped)", path, len(groups), len(skipped_lines)
    )
    return groups, stats


def _warn_unknown_keys(table: datasets.Dataset, path: Path) -> None:
    """One warning per unknown top-level key: how many rows have it and the first line."""
    keys = table.data.column("unknown_keys")
    if pc.sum(pc.list_value_length(keys)).as_py() in (None, 0):
        return
    parents = pc.list_parent_indices(keys).to_numpy()
    flat = pc.list_flatten(keys).to_pylist()
    lines = table.data.column("line").to_numpy()
    first: dict[str, int] = {}
    counts: dict[str, int] = {}
    for key, parent in zip(flat, parents, strict=True):
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, int(lines[parent]))
    for key, count in counts.items():
        logger.warning(
            "%s: ignored unknown key %r on %d row(s), first on line %d (known keys: %s)",
            path,
            key,
            count,
            first[key],
            ", ".join(GROUP_KEYS),
        )


# ------------------------------------------------------------------------- BEIR training groups
def _generate_corpus(path: str) -> Iterator[dict[str, str]]:
    for doc_id, doc in iter_corpus(path):
        yield {"_id": doc_id, "text": doc_text(doc)}


def read_corpus(
    path: str | os.PathLike, cache_dir: str | os.PathLike | None = None
) -> datasets.Dataset:
    """A BEIR corpus.jsonl as an Arrow-backed Dataset with columns ``_id`` and ``text`` (doc_text).

    Errors are those of `beir.iter_corpus` (file:line; duplicate ids). Empty documents are kept
    (they are valid negatives that match nothing) and their count is logged.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {path}")
    _require_rows(path)
    corpus = _from_generator(
        _generate_corpus,
        {"path": str(path)},
        _CORPUS_FEATURES,
        _fingerprint(path, "corpus"),
        cache_dir,
    )
    n_empty = int(pc.sum(pc.equal(pc.utf8_length(corpus.data.column("text")), 0)).as_py() or 0)
    if n_empty:
        logger.warning("%s: %d documents have no title and no text (kept)", path, n_empty)
    return corpus


def _rows_of(ids: list[str], corpus_ids: pa.Array) -> np.ndarray:
    """Corpus row of each id (-1 when absent), through one Arrow hash lookup."""
    if not ids:
        return np.zeros(0, dtype=np.int64)
    rows = pc.index_in(pa.array(ids, type=pa.string()), value_set=corpus_ids)
    return rows.fill_null(-1).to_numpy().astype(np.int64)


def read_groups_beir(
    folder: str | os.PathLike,
    split: str = "train",
    negatives_run: str | os.PathLike | None = None,
    negatives_depth: int = 100,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[datasets.Dataset, datasets.Dataset, dict[str, Any]]:
    """Training groups from a BEIR folder: (groups, corpus, counters).

    ``groups`` hold corpus row numbers (not texts) in ``positives``/``negatives``; ``corpus`` is
    `read_corpus` of the folder. Positives: judged score > 0 and present in the corpus. Negatives:
    the run's top `negatives_depth` documents (by score, ties in file order) minus the query's
    judged positives; judged non-relevant documents are kept. Without a run, negatives are empty
    and `GroupDataset` draws random corpus documents. Every drop is counted and logged.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"BEIR folder not found: {folder}")
    if negatives_depth < 1:
        raise ValueError(f"negatives_depth must be >= 1, got {negatives_depth}")
    qrels_file = qrels_path(folder, split)
    corpus = read_corpus(folder / "corpus.jsonl", cache_dir=cache_dir)
    corpus_ids = corpus.data.column("_id").combine_chunks()
    queries = load_queries(folder / "queries.jsonl")
    qrels = load_qrels(qrels_file)
    stats: dict[str, Any] = {"source": str(folder), "split": split}

    unknown_queries = [q for q in qrels if q not in queries]
    stats["judged_queries_missing_text"] = len(unknown_queries)
    if unknown_queries:
        logger.warning(
            "%s: %d judged queries are missing from queries.jsonl and are dropped (e.g. %r)",
            qrels_file,
            len(unknown_queries),
            unknown_queries[:3],
        )
    run = read_trec_run(negatives_run) if negatives_run is not None else None

    # 1) the training queries, their judged positives and their run candidates (doc ids)
    selected: list[tuple[str, str, list[str], list[str], bool]] = []
    n_no_judged_positive = n_positives_in_run = 0
    for query_id, text in queries.items():
        judged = qrels.get(query_id)
        if judged is None:
            continue  # not a training query of this split
        positive_ids = [d for d, score in judged.items() if score > 0]
        if not positive_ids:
            n_no_judged_positive += 1
            continue
        negative_ids: list[str] = []
        ranked = run.get(query_id) if run is not None else None
        if ranked is not None:
            top = sorted(ranked.items(), key=lambda pair: -pair[1])[:negatives_depth]
            positive_set = set(positive_ids)
            negative_ids = [d for d, _ in top if d not in positive_set]
            n_positives_in_run += len(top) - len(negative_ids)
        selected.append((query_id, text, positive_ids, negative_ids, ranked is not None))

    # 2) every id to its corpus row in one hash lookup (-1: absent)
    found = _rows_of([d for _, _, pos, neg, _ in selected for d in (*pos, *neg)], corpus_ids)
    rows: dict[str, list] = {k: [] for k in ("query", "query_id", "positives", "negatives")}
    n_positives_not_in_corpus = n_queries_not_in_corpus = n_negatives_not_in_corpus = 0
    n_not_in_run = 0  # kept queries that the run does not rank
    start = 0
    for query_id, text, positive_ids, negative_ids, in_run in selected:
        positives = found[start : start + len(positive_ids)]
        start += len(positive_ids)
        negatives = found[start : start + len(negative_ids)]
        start += len(negative_ids)
        positives, negatives = positives[positives >= 0], negatives[negatives >= 0]
        n_positives_not_in_corpus += len(positive_ids) - len(positives)
        if len(positives) == 0:
            n_queries_not_in_corpus += 1
            continue
        n_negatives_not_in_corpus += len(negative_ids) - len(negatives)
        n_not_in_run += run is not None and not in_run
        rows["query"].append(text)
        rows["query_id"].append(query_id)
        rows["positives"].append(positives.tolist())
        rows["negatives"].append(negatives.tolist())

    n_dropped = n_no_judged_positive + n_queries_not_in_corpus
    stats.update(
        queries_no_positive=n_dropped,
        queries_no_judged_positive=n_no_judged_positive,
        queries_positives_not_in_corpus=n_queries_not_in_corpus,
        positives_not_in_corpus=n_positives_not_in_corpus,
        groups=len(rows["query"]),
    )
    if n_dropped:
        logger.warning(
            "%s: dropped %d queries without a positive (%d have no judgment > 0, %d have their "
            "positives missing from the corpus)",
            qrels_file,
            n_dropped,
            n_no_judged_positive,
            n_queries_not_in_corpus,
        )
    if n_positives_not_in_corpus:
        logger.warning(
            "%s: %d positive judgments point at docs absent from the corpus (ignored)",
            qrels_file,
            n_positives_not_in_corpus,
        )
    if run is not None:
        n_other = sum(q not in qrels for q in run)
        stats.update(
            negatives_run=str(negatives_run),
            negatives_depth=negatives_depth,
            run_positives_excluded=n_positives_in_run,
            run_docs_not_in_corpus=n_negatives_not_in_corpus,
            queries_not_in_run=n_not_in_run,
        )
        logger.info(
            "%s: negatives = top %d, %d judged positives excluded; %d run queries are not in "
            "split %r (ignored)",
            negatives_run,
            negatives_depth,
            n_positives_in_run,
            n_other,
            split,
        )
        if n_negatives_not_in_corpus:
            logger.warning(
                "%s: %d retrieved docs are absent from the corpus (ignored)",
                negatives_run,
                n_negatives_not_in_corpus,
            )
        if n_not_in_run:
            logger.warning(
                "%s: %d training queries have no results; their negatives are random corpus docs",
                negatives_run,
                n_not_in_run,
            )
    if not rows["query"]:
        raise ValueError(f"{folder}: split {split!r} has no query with a positive document")
    groups = datasets.Dataset.from_dict(rows, features=_BEIR_GROUP_FEATURES)
    logger.info(
        "%s: %d training groups from split %r (%d queries dropped)",
        folder,
        len(groups),
        split,
        n_dropped,
    )
    return groups, corpus, stats


# ------------------------------------------------------------------------------- group sampling
class GroupDataset(torch.utils.data.Dataset):
    """One training group per query: ``{"query", "docs": [positive, negatives...], "scores"}``.

    `groups` comes from `read_groups_jsonl` (items are texts) or `read_groups_beir` (items are
    rows of `corpus`, whose ``text`` column gives the text). Item i draws one positive at random and
    ``group_size - 1`` negatives without replacement from its list, using a numpy Generator seeded
    by (seed, epoch, i) only. A list shorter than that is used whole and then filled:
    with random corpus documents that are not the query's positives nor already chosen (when a
    corpus is known and the group has no teacher scores: a random document has none), otherwise by
    drawing again from the list (with replacement). ``scores`` are the teacher scores of the chosen
    documents, in the same order, or None.
    """

    def __init__(
        self,
        groups: datasets.Dataset,
        group_size: int,
        seed: int = 0,
        corpus: datasets.Dataset | None = None,
        max_queries: int | None = None,
        stats: dict[str, Any] | None = None,
    ) -> None:
        missing = {"query", "positives", "negatives"} - set(groups.column_names)
        if missing:
            raise ValueError(f"groups lack column(s) {sorted(missing)}: {groups.column_names}")
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        item_dtype = getattr(groups.features["positives"].feature, "dtype", None)
        if corpus is not None:
            if "text" not in corpus.column_names:
                raise ValueError(f"corpus needs a 'text' column, has {corpus.column_names}")
            if item_dtype != "int64":
                raise ValueError(
                    f"with a corpus, items must be corpus rows (int64), not {item_dtype}"
                )
            corpus = corpus.select_columns(["text"])
        elif item_dtype != "string":
            raise ValueError(f"without a corpus, items must be texts (string), not {item_dtype}")
        self.stats = dict(stats or {})
        if max_queries is not None:
            if max_queries < 1:
                raise ValueError(f"max_train_queries must be >= 1, got {max_queries}")
            if max_queries < len(groups):
                logger.info(
                    "max_train_queries=%d: training on the first %d of %d queries",
                    max_queries,
                    max_queries,
                    len(groups),
                )
                self.stats["truncated_from"] = len(groups)
                groups = groups.select(range(max_queries))
        self.groups = groups
        self.corpus = corpus
        self.group_size = group_size
        self.seed = seed
        self.epoch = 0
        # readers guarantee that every row has teacher scores or none does
        self.has_scores = (
            "positive_scores" in groups.column_names
            and len(groups) > 0
            and groups[0]["positive_scores"] is not None
        )
        self._check_negatives()
        self.stats["groups"] = len(groups)

    def _check_negatives(self) -> None:
        """Fail on groups that cannot be filled; log once how many groups need filling."""
        need = self.group_size - 1
        if need == 0:
            self.stats["groups_filled"] = 0
            return
        negatives = self.groups.with_format("arrow")["negatives"]  # memory-mapped, not copied
        lengths = pc.list_value_length(negatives).to_numpy(zero_copy_only=False)
        short = np.flatnonzero(lengths < need)
        self.stats["groups_filled"] = len(short)
        if len(short) == 0:
            return
        from_corpus = self.corpus is not None and not self.has_scores
        if not from_corpus:
            empty = np.flatnonzero(lengths == 0)
            if len(empty):
                first = self.groups[int(empty[0])]
                where = f"line {first['line']}" if "line" in first else f"row {int(empty[0])}"
                raise ValueError(
                    f"group_size={self.group_size} needs negatives, but {len(empty)} groups have "
                    f"none (first: {where}, query {first['query']!r}) and "
                    + (
                        "teacher-scored groups are never filled with random corpus documents"
                        if self.corpus is not None
                        else "no corpus is known to draw random negatives from"
                    )
                    + "; add negatives or set group_size: 1"
                )
        logger.info(
            "%d of %d groups have fewer than %d negatives; filled %s",
            len(short),
            len(lengths),
            need,
            "with random corpus documents (not positives)"
            if from_corpus
            else "by drawing their negatives again (with replacement)",
        )

    def set_epoch(self, epoch: int) -> None:
        """Change the sampling of every group (called by the HF Trainer through accelerate)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self.groups):
            raise IndexError(f"group index {index} out of range for {len(self.groups)} groups")
        row = self.groups[index]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        positives, negatives = row["positives"], row["negatives"]
        pos = int(rng.integers(len(positives)))
        chosen, fill = self._pick_negatives(rng, len(negatives))
        docs = [positives[pos]] + [negatives[j] for j in chosen]
        if fill:
            docs += self._random_corpus_docs(rng, fill, exclude={*positives, *docs})
        scores = None
        if self.has_scores and row["positive_scores"] is not None:
            scores = [row["positive_scores"][pos]] + [row["negative_scores"][j] for j in chosen]
        if self.corpus is not None:
            docs = self.corpus[docs]["text"]
        return {"query": row["query"], "docs": docs, "scores": scores}

    def _pick_negatives(self, rng: np.random.Generator, available: int) -> tuple[list[int], int]:
        """Positions in the negative list, and how many random corpus docs must complete them."""
        need = self.group_size - 1
        if available >= need:
            return rng.choice(available, size=need, replace=False).tolist(), 0
        chosen = rng.permutation(available).tolist()
        if self.corpus is not None and not self.has_scores:
            return chosen, need - available
        extra = rng.choice(available, size=need - available, replace=True).tolist()
        return chosen + extra, 0

    def _random_corpus_docs(self, rng: np.random.Generator, k: int, exclude: set[int]) -> list[int]:
        """`k` corpus rows outside `exclude`, distinct when the corpus has enough of them."""
        n = len(self.corpus)
        if n - len(exclude) < 4 * k:  # small corpus: draw from the explicit complement
            pool = np.setdiff1d(np.arange(n), np.fromiter(exclude, dtype=np.int64))
            if len(pool) == 0:
                raise ValueError(f"the corpus ({n} docs) has no document that is not a positive")
            return rng.choice(pool, size=k, replace=len(pool) < k).tolist()
        out: list[int] = []
        while len(out) < k:
            doc = int(rng.integers(n))
            if doc not in exclude:
                exclude.add(doc)
                out.append(doc)
        return out


# ------------------------------------------------------------------------------------ collator
class GroupCollator:
    """Batch `GroupDataset` items into token tensors.

    `tokenize(texts, kind)` is e.g. `SparseEncoder.tokenize`. Returns ``query`` (B, Lq) and ``doc``
    (B*n, Ld) tensor dicts, doc rows ``i*n .. i*n+n-1`` being query i's group (positive first),
    ``teacher_scores`` (B, n) float32 when every item has scores, and the counts
    ``n_truncated_query`` / ``n_truncated_doc`` of texts cut at the max length.
    """

    def __init__(self, tokenize: Callable[[Sequence[str], str], dict[str, torch.Tensor]]) -> None:
        self.tokenize = tokenize

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        n = len(items[0]["docs"])
        for i, item in enumerate(items):
            if len(item["docs"]) != n:
                raise ValueError(f"item {i} has {len(item['docs'])} docs, item 0 has {n}")
            scores = item.get("scores")
            if scores is not None and len(scores) != n:
                raise ValueError(f"item {i} has {len(scores)} scores for {n} docs")
        with_scores = [i for i, item in enumerate(items) if item.get("scores") is not None]
        if with_scores and len(with_scores) != len(items):
            without = sorted(set(range(len(items))) - set(with_scores))
            raise ValueError(
                f"items {with_scores} have teacher scores but items {without} do not; "
                "a batch must be all scored or all unscored"
            )
        query = dict(self.tokenize([item["query"] for item in items], "query"))  # (B, Lq)
        doc = dict(self.tokenize([d for item in items for d in item["docs"]], "doc"))  # (B*n, Ld)
        batch: dict[str, Any] = {
            "query": query,
            "doc": doc,
            "n_truncated_query": int(query.pop("n_truncated", 0)),
            "n_truncated_doc": int(doc.pop("n_truncated", 0)),
        }
        if with_scores:
            batch["teacher_scores"] = torch.tensor(
                [item["scores"] for item in items], dtype=torch.float32
            )  # (B, n)
        return batch


# -------------------------------------------------------------------------------- unlabeled text
def _text_rows(
    path: str, jsonl: bool, skip_bad_rows: bool, max_texts: int | None
) -> Iterator[dict[str, Any] | _Skip]:
    n_texts = 0
    for line_no, line in _read_lines(Path(path)):
        if max_texts is not None and n_texts >= max_texts:
            return
        try:
            if isinstance(line, _BadRow):
                raise line
            if jsonl and not line.strip():
                continue  # a blank line between JSON records is not a record
            text = _corpus_line_text(line) if jsonl else line.strip()
        except _BadRow as exc:
            if not skip_bad_rows:
                raise ValueError(
                    f"{path}:{line_no}: {exc} (skip_bad_rows=True skips such rows)"
                ) from None
            yield _Skip(line_no, str(exc))
            continue
        if not text:
            yield _Skip(line_no)
            continue
        n_texts += 1
        yield {"text": text, "line": line_no}


def _generate_texts(
    path: str, jsonl: bool, skip_bad_rows: bool, max_texts: int | None
) -> Iterator[dict[str, Any]]:
    yield from _attach_skips(_text_rows(path, jsonl, skip_bad_rows, max_texts), path)


def _corpus_line_text(line: str) -> str:
    """The `doc_text` of one corpus.jsonl record ("" for an empty document); `_BadRow` if invalid."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise _BadRow(f"malformed JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise _BadRow(f"expected a JSON object, got {type(record).__name__}")
    if not isinstance(record.get("text"), str):
        raise _BadRow(f"record needs a string 'text', got {_describe(record.get('text'))}")
    title = record.get("title")
    if title is not None and not isinstance(title, str):
        raise _BadRow(f"record has a non-string 'title': {_describe(title)}")
    return doc_text(record)


def read_texts(
    path: str | os.PathLike,
    skip_bad_rows: bool = False,
    max_texts: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> datasets.Dataset:
    """Unlabeled texts (a Dataset with one column, ``text``) for the adaptation phase.

    `path` is a corpus.jsonl (each record read with `doc_text`), a BEIR folder (its corpus.jsonl)
    or any other file read as plain text, one text per line. Blank lines (plain text) and empty
    documents (JSONL) are not texts: they are counted and logged. A bad JSONL record raises
    ValueError "path:line: reason" unless `skip_bad_rows`. `max_texts` keeps the first texts only.
    """
    path = Path(path)
    if path.is_dir():
        folder, path = path, path / "corpus.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{folder} is a folder without corpus.jsonl")
    elif not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    if max_texts is not None and max_texts < 1:
        raise ValueError(f"max_texts must be >= 1, got {max_texts}")
    _require_rows(path)
    jsonl = path.suffix == ".jsonl"
    if not jsonl:
        _warn_if_jsonl(path)
    table = _from_generator(
        _generate_texts,
        {"path": str(path), "jsonl": jsonl, "skip_bad_rows": skip_bad_rows, "max_texts": max_texts},
        _TEXT_FEATURES,
        _fingerprint(path, "texts", jsonl, skip_bad_rows, max_texts),
        cache_dir,
    )
    _, n_empty = _report_skips(table, path, "record")
    if n_empty:
        what = "empty documents" if jsonl else "blank lines"
        logger.warning("%s: %d %s are not texts (not used)", path, n_empty, what)
    texts = table.select_columns(["text"])
    if max_texts is not None and len(texts) == max_texts:
        logger.info("%s: stopped at max_texts=%d texts", path, max_texts)
    logger.info("%s: %d texts", path, len(texts))
    return texts


def _warn_if_jsonl(path: Path) -> None:
    """A plain-text file whose first line is a JSON object was probably meant as JSONL."""
    with open(path, "rb") as handle:
        first = handle.readline().strip()
    if first.startswith(b"{"):
        try:
            record = json.loads(first)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return
        if isinstance(record, dict) and "text" in record:
            logger.warning(
                "%s: read as plain text (one text per line) but its first line is a JSON record; "
                "name it *.jsonl to read it as a corpus",
                path,
            )


# ---------------------------------------------------------------------------------- entry point
def load_training_groups(
    data_args: Any, seed: int, cache_dir: str | os.PathLike | None = None
) -> GroupDataset:
    """The `GroupDataset` of a recipe's `DataArguments`: a JSONL file of groups or a BEIR folder."""
    if data_args.train_data is None:
        raise ValueError(
            "train_data is not set: give a JSONL file of training groups or a BEIR folder "
            "with qrels/<split>.tsv"
        )
    path = Path(data_args.train_data)
    corpus = None
    if path.is_dir():
        if not (path / "corpus.jsonl").is_file() or not (path / "queries.jsonl").is_file():
            raise ValueError(
                f"train_data {path} is a folder but not a BEIR folder (needs corpus.jsonl, "
                "queries.jsonl and qrels/<split>.tsv)"
            )
        if data_args.skip_bad_rows:
            logger.info("skip_bad_rows does not apply to BEIR folders: their bad rows are errors")
        groups, corpus, stats = read_groups_beir(
            path,
            split=data_args.train_split,
            negatives_run=data_args.negatives_run,
            negatives_depth=data_args.negatives_depth,
            cache_dir=cache_dir,
        )
    elif path.is_file() and path.suffix == ".jsonl":
        if data_args.negatives_run is not None:
            raise ValueError(
                f"negatives_run applies to a BEIR folder; {path} is a JSONL file whose rows carry "
                "their own negatives"
            )
        groups, stats = read_groups_jsonl(path, data_args.skip_bad_rows, cache_dir=cache_dir)
    elif not path.exists():
        raise FileNotFoundError(f"train_data not found: {path}")
    else:
        raise ValueError(
            f"train_data {path}: expected a .jsonl file of training groups or a BEIR folder "
            "(corpus.jsonl, queries.jsonl, qrels/<split>.tsv)"
        )
    return GroupDataset(
        groups,
        data_args.group_size,
        seed=seed,
        corpus=corpus,
        max_queries=data_args.max_train_queries,
        stats=stats,
    )


# ------------------------------------------------------------------------------------------- IDF
def document_texts(dataset: GroupDataset) -> Iterator[str]:
    """Every distinct document text of a `GroupDataset`: its corpus, or the texts in its groups."""
    if dataset.corpus is not None:
        for start in range(0, len(dataset.corpus), 10_000):
            yield from dataset.corpus[start : start + 10_000]["text"]
        return
    seen: set[str] = set()
    for start in range(0, len(dataset.groups), 10_000):
        batch = dataset.groups[start : start + 10_000]
        for items in (*batch["positives"], *batch["negatives"]):
            for text in items:
                if text not in seen:
                    seen.add(text)
                    yield text


def corpus_idf(encoder: Any, dataset: GroupDataset, batch_size: int = 1024) -> torch.Tensor:
    """IDF (V,) of every vocabulary id over the training documents, float32, always > 0.

    BM25's form ``log(1 + (N - df + 0.5) / (df + 0.5))`` (Robertson & Zaragoza): positive for every id,
    which IDF-aware FLOPS divides by, and largest for ids no document contains. Used as the query
    weights of inference-free models (arXiv 2411.04403) and by ``doc_regularizer: idf_flops``.
    """
    from tqdm.auto import tqdm

    vocab = encoder.vocab_size
    df = np.zeros(vocab, dtype=np.int64)
    n_docs = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal n_docs
        ids = encoder.tokenizer(batch, add_special_tokens=False)["input_ids"]
        for row in ids:
            if row:
                df[np.unique(np.asarray(row, dtype=np.int64))] += 1
        n_docs += len(batch)
        batch.clear()

    for text in tqdm(document_texts(dataset), desc="document frequencies", unit="doc"):
        batch.append(text)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if n_docs == 0:
        raise ValueError("cannot compute IDF: the training data holds no documents")
    idf = np.log1p((n_docs - df + 0.5) / (df + 0.5))
    logger.info(
        "IDF over %d training documents (%d distinct tokens seen)", n_docs, int((df > 0).sum())
    )
    return torch.from_numpy(idf.astype(np.float32))
