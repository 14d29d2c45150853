"""Training groups from a BEIR folder: judged positives, and negatives from a run or the corpus.

Positives are the judged documents with score > 0 (`qrels/<split>.tsv`); negatives are the top
``negatives_depth`` documents of a TREC run with the query's judged positives removed (judged
non-relevant documents stay: they are good negatives), or, without a run, random corpus documents
drawn at training time (:class:`csplade.data.sampling.GroupDataset`). Queries left without a positive
are dropped and counted. Groups hold corpus row numbers, not texts; the corpus is a cached Arrow table
(:mod:`csplade.data.rows`).

Known limit: the run file is read whole into memory (`csplade.index.runs.read_trec_run`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Features, List, Value

from csplade.data.beir import (
    doc_text,
    drop_unknown_queries,
    iter_corpus,
    load_qrels,
    load_queries,
    qrels_path,
)
from csplade.data.rows import fingerprint, from_generator, require_rows
from csplade.index.runs import read_trec_run

logger = logging.getLogger(__name__)

_BEIR_GROUP_FEATURES = Features(
    {
        "query": Value("string"),
        "query_id": Value("string"),
        "positives": List(Value("int64")),  # rows of the corpus table
        "negatives": List(Value("int64")),
    }
)
_CORPUS_FEATURES = Features({"_id": Value("string"), "text": Value("string")})


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
    n_unknown = drop_unknown_queries(qrels, queries, qrels_file, folder / "queries.jsonl")
    run = read_trec_run(negatives_run) if negatives_run is not None else None
    selected, picked = _candidates(queries, qrels, run, negatives_depth)
    corpus_ids = corpus.data.column("_id").combine_chunks()
    rows, kept = _corpus_groups(selected, corpus_ids, run is not None)
    n_dropped = picked["queries_no_judged_positive"] + kept["queries_positives_not_in_corpus"]
    stats: dict[str, Any] = {
        "source": str(folder),
        "split": split,
        "judged_queries_missing_text": n_unknown,
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
