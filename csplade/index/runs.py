"""TREC run files: write, read, and convert top-k arrays into run dicts.

A run line is `qid Q0 docid rank score tag` (whitespace separated). `write_trec_run` sorts each
query's results by score, descending, with a stable sort: tied docs keep the order they were given
in (for runs from `InvertedIndex.search_ids`, that is smaller doc index first). Note that trec_eval
and pytrec_eval ignore the rank column and break score ties by docid themselves, so exact ties can
still be ordered differently by the evaluator; the rank column is for humans and other tools.

Scores are written with `repr(float(score))`, which round-trips exactly: reading a run back yields
the same floats. Queries appear in the order of the run dict.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from csplade._io import atomic_write

Run = dict[str, list[tuple[str, float]]]


def _check_token(value: str, what: str, where: str) -> None:
    if not isinstance(value, str) or not value or any(ch.isspace() for ch in value):
        raise ValueError(f"{where}: {what} {value!r} must be a non-empty string without whitespace")


def write_trec_run(
    path: str | os.PathLike,
    run: Mapping[str, Sequence[tuple[str, float]]],
    tag: str = "csplade",
) -> None:
    """Write `run` ({qid: [(docid, score), ...]}) as a TREC run file, atomically.

    Raises ValueError for ids or tags containing whitespace, non-finite scores, or a docid listed
    twice for the same query.
    """
    _check_token(tag, "tag", "write_trec_run")
    with atomic_write(path, "w") as handle:
        for qid, results in run.items():
            _check_token(qid, "query id", "write_trec_run")
            seen: set[str] = set()
            for docid, score in results:
                _check_token(docid, "doc id", f"write_trec_run(query {qid!r})")
                if docid in seen:
                    raise ValueError(
                        f"write_trec_run: doc {docid!r} listed twice for query {qid!r}"
                    )
                seen.add(docid)
                if not math.isfinite(score):
                    raise ValueError(f"write_trec_run: score {score} for ({qid!r}, {docid!r})")
            ranked = sorted(results, key=lambda pair: -float(pair[1]))  # stable
            for rank, (docid, score) in enumerate(ranked, start=1):
                handle.write(f"{qid} Q0 {docid} {rank} {float(score)!r} {tag}\n")


def read_trec_run(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    """Read a TREC run into {qid: {docid: score}} (the shape pytrec_eval takes).

    Blank lines are skipped. A line without exactly six fields, a non-integer rank, a non-numeric or
    non-finite score, or a repeated (qid, docid) pair raises ValueError naming `file:line`.
    """
    path = Path(path)
    run: dict[str, dict[str, float]] = {}
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            where = f"{path}:{line_no}"
            if len(fields) != 6:
                raise ValueError(
                    f"{where}: expected 6 fields 'qid Q0 docid rank score tag', got {len(fields)}: "
                    f"{line.rstrip()!r}"
                )
            qid, _, docid, rank, score, _ = fields
            try:
                int(rank)
            except ValueError:
                raise ValueError(f"{where}: rank {rank!r} is not an integer") from None
            try:
                value = float(score)
            except ValueError:
                raise ValueError(f"{where}: score {score!r} is not a number") from None
            if not math.isfinite(value):
                raise ValueError(f"{where}: score {score!r} is not finite")
            per_query = run.setdefault(qid, {})
            if docid in per_query:
                raise ValueError(f"{where}: doc {docid!r} appears twice for query {qid!r}")
            per_query[docid] = value
    return run


def topk_to_run(
    scores: np.ndarray,  # (n_q, k) float32, best first, -inf padding
    docs: np.ndarray,  # (n_q, k) int64, -1 padding
    query_ids: Sequence[str],
    doc_ids: Sequence[str],
) -> Run:
    """Turn `search()` arrays into {qid: [(docid, score), ...]}, dropping padding slots (doc -1)."""
    if scores.shape != docs.shape or scores.shape[0] != len(query_ids):
        raise ValueError(
            f"scores {scores.shape}, docs {docs.shape} and {len(query_ids)} query ids disagree"
        )
    run: Run = {}
    for row, qid in enumerate(query_ids):
        if qid in run:
            raise ValueError(f"duplicate query id {qid!r} at position {row}")
        valid = docs[row] >= 0
        run[qid] = [
            (doc_ids[d], float(s))
            for d, s in zip(docs[row][valid].tolist(), scores[row][valid].tolist(), strict=True)
        ]
    return run
