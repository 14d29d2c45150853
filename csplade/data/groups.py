"""Training groups — (query, positives, negatives, teacher scores) — read from disk.

Why: contrastive training of a sparse encoder (SPLADE v2, arXiv 2109.10086; CSPLADE, arXiv 2504.10816)
consumes, per query, one relevant document and ``group_size - 1`` negatives, optionally with teacher
scores for distillation. This module reads and validates those groups (sampling and batching:
:mod:`csplade.data.sampling`).

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

Rows are cached Arrow tables (:mod:`csplade.data.rows`).

Known limits: plain (not gzipped) files only; a BEIR run file is read whole into memory
(`csplade.index.runs.read_trec_run`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Features, List, Value

from csplade.data.beir import doc_text, iter_corpus, load_qrels, load_queries, qrels_path
from csplade.data.rows import (
    SKIP_COLUMNS,
    SKIP_FEATURES,
    BadRow,
    Skip,
    attach_skips,
    describe,
    fingerprint,
    from_generator,
    read_lines,
    report_skips,
    require_rows,
)
from csplade.data.sampling import GroupDataset
from csplade.index.runs import read_trec_run

logger = logging.getLogger(__name__)

GROUP_KEYS = ("query", "query_id", "positives", "negatives", "scores", "teacher_scores")
# `teacher_scores` (per-teacher raw scores written by `csplade teacher-scores`) is kept for the record
# and not read by training, which uses the combined `scores`.
SCORE_KEYS = ("positives", "negatives")

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
        **SKIP_FEATURES,
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


# ---------------------------------------------------------------------------- JSONL training groups
def _item_text(item: Any, where: str) -> str:
    """The text of one positive/negative: a string, or an object read with `doc_text`."""
    if isinstance(item, str):
        text = item.strip()
    elif isinstance(item, dict):
        if not isinstance(item.get("text"), str):
            raise BadRow(f"{where} needs a string 'text', got {describe(item.get('text'))}")
        title = item.get("title")
        if title is not None and not isinstance(title, str):
            raise BadRow(f"{where} has a non-string 'title': {describe(title)}")
        doc_id = item.get("_id")
        if doc_id is not None and (isinstance(doc_id, bool) or not isinstance(doc_id, (str, int))):
            raise BadRow(f"{where} has an '_id' that is not a string: {describe(doc_id)}")
        text = doc_text(item)
    else:
        raise BadRow(f"{where} must be a string or an object with 'text', got {describe(item)}")
    if not text:
        raise BadRow(f"{where} is empty")
    return text


def _items(record: dict, key: str, required: bool) -> list[str]:
    value = record.get(key)
    if value is None:
        if required:
            raise BadRow(f"missing '{key}'")
        return []
    if not isinstance(value, list):
        raise BadRow(f"'{key}' must be a list, got {describe(value)}")
    if required and not value:
        raise BadRow(f"'{key}' is empty")
    return [_item_text(item, f"{key}[{i}]") for i, item in enumerate(value)]


def _score_list(scores: dict, key: str, n_items: int) -> list[float]:
    value = scores.get(key)
    if value is None:
        if n_items == 0:
            return []
        raise BadRow(f"'scores' has no '{key}' but there are {n_items} {key}")
    if not isinstance(value, list):
        raise BadRow(f"'scores.{key}' must be a list, got {describe(value)}")
    if len(value) != n_items:
        raise BadRow(f"'scores.{key}' has {len(value)} values but '{key}' has {n_items} items")
    for i, x in enumerate(value):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            raise BadRow(f"'scores.{key}[{i}]' must be a finite number, got {describe(x)}")
    return [float(x) for x in value]


def _parse_group(line: str) -> dict[str, Any]:
    """One JSONL line -> a row of `_JSONL_GROUP_FEATURES` (less line and skips); `BadRow` if bad."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise BadRow(f"malformed JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise BadRow(f"expected a JSON object, got {type(record).__name__}")
    if "query" not in record:
        raise BadRow("missing 'query'")
    query = record["query"]
    if not isinstance(query, str):
        raise BadRow(f"'query' must be a string, got {describe(query)}")
    if not query.strip():
        raise BadRow("'query' is empty")
    query_id = record.get("query_id")
    if query_id is not None:
        if isinstance(query_id, bool) or not isinstance(query_id, (str, int)):
            raise BadRow(f"'query_id' must be a string, got {describe(query_id)}")
        query_id = str(query_id)
    positives = _items(record, "positives", required=True)
    negatives = _items(record, "negatives", required=False)
    positive_scores = negative_scores = None
    scores = record.get("scores")
    if scores is not None:
        if not isinstance(scores, dict):
            raise BadRow(f"'scores' must be an object, got {describe(scores)}")
        unknown = sorted(set(scores) - set(SCORE_KEYS))
        if unknown:
            raise BadRow(f"'scores' has unknown key(s) {unknown}; allowed: {list(SCORE_KEYS)}")
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


def _group_rows(path: str, skip_bad_rows: bool) -> Iterator[dict[str, Any] | Skip]:
    first_line: int | None = None  # the first good row decides whether rows carry scores
    first_has_scores = False
    for line_no, line in read_lines(Path(path)):
        try:
            if isinstance(line, BadRow):
                raise line
            if not line.strip():
                continue  # a blank line between JSON records is not a row
            row = _parse_group(line)
            has_scores = row["positive_scores"] is not None
            if first_line is None:
                first_line, first_has_scores = line_no, has_scores
            elif has_scores != first_has_scores:
                raise BadRow(
                    f"{'has' if has_scores else 'has no'} teacher 'scores' but the first row "
                    f"(line {first_line}) {'has' if first_has_scores else 'has none'}; "
                    "either every row has scores or none does"
                )
        except BadRow as exc:
            if not skip_bad_rows:
                raise ValueError(
                    f"{path}:{line_no}: {exc} (skip_bad_rows=True skips such rows)"
                ) from None
            yield Skip(line_no, str(exc))
            continue
        yield {**row, "line": line_no}


def _generate_groups(path: str, skip_bad_rows: bool) -> Iterator[dict[str, Any]]:
    yield from attach_skips(_group_rows(path, skip_bad_rows), path)


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
    require_rows(path)
    table = from_generator(
        _generate_groups,
        {"path": str(path), "skip_bad_rows": skip_bad_rows},
        _JSONL_GROUP_FEATURES,
        fingerprint(path, "groups", skip_bad_rows),
        cache_dir,
    )
    skipped_lines, _ = report_skips(table, path, "row")
    n_dropped = int(pc.sum(table.data.column("n_negatives_dropped")).as_py())
    if n_dropped:
        logger.warning(
            "%s: removed %d negatives identical to a positive of the same row", path, n_dropped
        )
    _warn_unknown_keys(table, path)
    groups = table.remove_columns(["n_negatives_dropped", "unknown_keys", *SKIP_COLUMNS])
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
    require_rows(path)
    corpus = from_generator(
        _generate_corpus,
        {"path": str(path)},
        _CORPUS_FEATURES,
        fingerprint(path, "corpus"),
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


def _candidates(
    queries: dict[str, str], qrels: dict, run: dict | None, negatives_depth: int
) -> tuple[list[tuple[str, str, list[str], list[str], bool]], dict[str, int]]:
    """Per training query: (id, text, judged positive ids, run negative ids, ranked by the run)."""
    selected = []
    counts = {"queries_no_judged_positive": 0, "run_positives_excluded": 0}
    for query_id, text in queries.items():
        judged = qrels.get(query_id)
        if judged is None:
            continue  # not a training query of this split
        positive_ids = [d for d, score in judged.items() if score > 0]
        if not positive_ids:
            counts["queries_no_judged_positive"] += 1
            continue
        negative_ids: list[str] = []
        ranked = run.get(query_id) if run is not None else None
        if ranked is not None:
            top = sorted(ranked.items(), key=lambda pair: -pair[1])[:negatives_depth]
            positive_set = set(positive_ids)
            negative_ids = [d for d, _ in top if d not in positive_set]
            counts["run_positives_excluded"] += len(top) - len(negative_ids)
        selected.append((query_id, text, positive_ids, negative_ids, ranked is not None))
    return selected, counts


def _corpus_groups(
    selected: list[tuple[str, str, list[str], list[str], bool]],
    corpus_ids: pa.Array,
    has_run: bool,
) -> tuple[dict[str, list], dict[str, int]]:
    """The groups with doc ids turned into corpus rows (one hash lookup); ids absent are counted."""
    found = _rows_of([d for _, _, pos, neg, _ in selected for d in (*pos, *neg)], corpus_ids)
    rows: dict[str, list] = {k: [] for k in ("query", "query_id", "positives", "negatives")}
    counts = dict.fromkeys(
        ("positives_not_in_corpus", "queries_positives_not_in_corpus", "run_docs_not_in_corpus",
         "queries_not_in_run"), 0)  # fmt: skip
    start = 0
    for query_id, text, positive_ids, negative_ids, in_run in selected:
        positives = found[start : start + len(positive_ids)]
        start += len(positive_ids)
        negatives = found[start : start + len(negative_ids)]
        start += len(negative_ids)
        positives, negatives = positives[positives >= 0], negatives[negatives >= 0]
        counts["positives_not_in_corpus"] += len(positive_ids) - len(positives)
        if len(positives) == 0:
            counts["queries_positives_not_in_corpus"] += 1
            continue
        counts["run_docs_not_in_corpus"] += len(negative_ids) - len(negatives)
        counts["queries_not_in_run"] += has_run and not in_run
        rows["query"].append(text)
        rows["query_id"].append(query_id)
        rows["positives"].append(positives.tolist())
        rows["negatives"].append(negatives.tolist())
    return rows, counts


def _report_beir(stats: dict[str, Any], qrels_file: Path, n_other_run_queries: int) -> None:
    """Log every drop counted while reading BEIR training groups."""
    if stats["queries_no_positive"]:
        logger.warning(
            "%s: dropped %d queries without a positive (%d have no judgment > 0, %d have their "
            "positives missing from the corpus)",
            qrels_file,
            stats["queries_no_positive"],
            stats["queries_no_judged_positive"],
            stats["queries_positives_not_in_corpus"],
        )
    if stats["positives_not_in_corpus"]:
        logger.warning(
            "%s: %d positive judgments point at docs absent from the corpus (ignored)",
            qrels_file,
            stats["positives_not_in_corpus"],
        )
    if "negatives_run" not in stats:
        return
    run = stats["negatives_run"]
    logger.info(
        "%s: negatives = top %d, %d judged positives excluded; %d run queries are not in "
        "split %r (ignored)",
        run,
        stats["negatives_depth"],
        stats["run_positives_excluded"],
        n_other_run_queries,
        stats["split"],
    )
    if stats["run_docs_not_in_corpus"]:
        logger.warning(
            "%s: %d retrieved docs are absent from the corpus (ignored)",
            run,
            stats["run_docs_not_in_corpus"],
        )
    if stats["queries_not_in_run"]:
        logger.warning(
            "%s: %d training queries have no results; their negatives are random corpus docs",
            run,
            stats["queries_not_in_run"],
        )


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
    queries = load_queries(folder / "queries.jsonl")
    qrels = load_qrels(qrels_file)
    unknown_queries = [q for q in qrels if q not in queries]
    if unknown_queries:
        logger.warning(
            "%s: %d judged queries are missing from queries.jsonl and are dropped (e.g. %r)",
            qrels_file,
            len(unknown_queries),
            unknown_queries[:3],
        )
    run = read_trec_run(negatives_run) if negatives_run is not None else None
    selected, picked = _candidates(queries, qrels, run, negatives_depth)
    corpus_ids = corpus.data.column("_id").combine_chunks()
    rows, kept = _corpus_groups(selected, corpus_ids, run is not None)
    n_dropped = picked["queries_no_judged_positive"] + kept["queries_positives_not_in_corpus"]
    stats: dict[str, Any] = {
        "source": str(folder),
        "split": split,
        "judged_queries_missing_text": len(unknown_queries),
        "queries_no_positive": n_dropped,
        "queries_no_judged_positive": picked["queries_no_judged_positive"],
        "queries_positives_not_in_corpus": kept["queries_positives_not_in_corpus"],
        "positives_not_in_corpus": kept["positives_not_in_corpus"],
        "groups": len(rows["query"]),
    }
    if run is not None:
        stats.update(
            negatives_run=str(negatives_run),
            negatives_depth=negatives_depth,
            run_positives_excluded=picked["run_positives_excluded"],
            run_docs_not_in_corpus=kept["run_docs_not_in_corpus"],
            queries_not_in_run=kept["queries_not_in_run"],
        )
    _report_beir(stats, qrels_file, sum(q not in qrels for q in run) if run is not None else 0)
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
