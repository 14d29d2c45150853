"""Retrieval metrics (pytrec_eval), run truncation, sparsity/FLOPS and latency statistics.

Every system csplade compares (SPLADE-style encoders on causal LLMs, CSPLADE's `bi` / `echo`
variants, BM25) is scored by the same code, so numbers in one table are comparable.

Metrics (`evaluate_run`) come from pytrec_eval (Van Gysel & de Rijke, SIGIR 2018), the trec_eval
port BEIR uses. Names follow pytrec_eval's output names:
- ``ndcg_cut_10``: nDCG@10 with trec_eval's linear gain (gain = graded score, as in BEIR);
- ``recall_100``, ``recall_1000``: recall at 100 / 1000;
- ``recip_rank_10``: MRR@10. trec_eval's ``recip_rank`` takes no cutoff (``recip_rank.10`` is
  accepted but the 10 is ignored), so the run is first cut to its 10 best documents per query,
  in trec_eval's own order (score descending, ties broken by doc id descending), then
  ``recip_rank`` is computed on the cut run;
- ``map``: mean average precision over the whole run.
A document is relevant when its score is >= 1 (trec_eval's default relevance level).

Averaging (make this explicit when comparing with other papers): the mean is taken over the
queries in the qrels. A judged query the run has no entry for scores 0 on every metric
(``missing="zero"``, like ``trec_eval -c``). pytrec_eval itself only returns judged queries that
are in the run, and BEIR averages over those; pass ``missing="skip"`` to reproduce that. The two
agree whenever the run answers every judged query. Run queries without judgments are ignored.

FLOPS (`sparsity_stats`) is the expected number of multiplications in a query-document dot
product, sum_j p_j(q) * p_j(d), with p_j the fraction of queries (docs) whose vector is non-zero
at term j: Paria et al., "Minimizing FLOPs to Learn Efficient Sparse Representations" (ICLR
2020), as reported in SPLADE v2 (Formal et al., arXiv 2109.10086).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

logger = logging.getLogger(__name__)

Run = dict[str, dict[str, float]]
Qrels = dict[str, dict[str, int]]

DEFAULT_METRICS = ("ndcg_cut_10", "recall_100", "recall_1000", "recip_rank_10", "map")

# trec_eval measures that take a cutoff, written `<measure>_<k>` in pytrec_eval's output.
_CUTOFF_MEASURES = ("ndcg_cut", "recall", "P", "map_cut", "success")
_CUTOFF_RE = re.compile(r"^(?P<measure>[A-Za-z_]+?)_(?P<k>\d+)$")


@dataclass
class EvalResult:
    """Per-query and mean metric values; `missing_queries` are judged queries absent from the run."""

    per_query: dict[str, dict[str, float]]
    mean: dict[str, float]
    n_queries: int  # queries the mean is taken over
    missing_queries: list[str] = field(default_factory=list)
    n_unjudged_run_queries: int = 0  # run queries without judgments (ignored)


def _pytrec_eval() -> Any:
    try:
        import pytrec_eval
    except ImportError as exc:
        raise ImportError(
            "retrieval metrics need pytrec_eval: pip install 'csplade[eval]' (pytrec-eval-terrier)"
        ) from exc
    return pytrec_eval


def _parse_metric(name: str) -> tuple[str, int | None]:
    """Metric output name -> (pytrec_eval request string, run cutoff or None).

    `recip_rank_K` is special: trec_eval has no cutoff for it, so it is computed as `recip_rank`
    on the run cut to K documents per query.
    """
    if name in _pytrec_eval().supported_measures:
        return name, None
    match = _CUTOFF_RE.match(name)
    if match:
        measure, k = match["measure"], match["k"]
        if measure == "recip_rank" and int(k) > 0:
            return "recip_rank", int(k)
        if measure in _CUTOFF_MEASURES:
            return f"{measure}.{k}", None
    raise ValueError(
        f"unknown metric {name!r}: use a pytrec_eval measure name ({', '.join(DEFAULT_METRICS)}, "
        f"P_5, ndcg, …) or 'recip_rank_<k>'"
    )


def _trec_order(docs: Mapping[str, float]) -> list[tuple[str, float]]:
    """Documents in the order trec_eval ranks them: score descending, then doc id descending."""
    return sorted(docs.items(), key=lambda item: (item[1], item[0]), reverse=True)


def truncate_run(run: Mapping[str, Mapping[str, float]], k: int) -> Run:
    """Keep each query's k best documents, ranked as trec_eval ranks them (ties: doc id desc)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return {q: dict(_trec_order(docs)[:k]) for q, docs in run.items()}


def _check_inputs(qrels: Mapping, run: Mapping) -> tuple[Qrels, Run]:
    clean_qrels: Qrels = {}
    for q, judged in qrels.items():
        if not isinstance(judged, Mapping):
            raise ValueError(f"qrels[{q!r}] must map doc id -> score, got {type(judged).__name__}")
        clean = {}
        for d, s in judged.items():
            if isinstance(s, bool) or not isinstance(s, (int, np.integer)):
                raise ValueError(f"qrels[{q!r}][{d!r}] must be an integer score, got {s!r}")
            clean[str(d)] = int(s)
        clean_qrels[str(q)] = clean
    clean_run: Run = {}
    for q, docs in run.items():
        if not isinstance(docs, Mapping):
            raise ValueError(f"run[{q!r}] must map doc id -> score, got {type(docs).__name__}")
        clean = {}
        for d, s in docs.items():
            value = float(s)
            if not math.isfinite(value):
                raise ValueError(f"run[{q!r}][{d!r}] has a non-finite score {s!r}")
            clean[str(d)] = value
        clean_run[str(q)] = clean
    return clean_qrels, clean_run


def _score(qrels: Qrels, run: Run, parsed: dict[str, tuple[str, int | None]]) -> Run:
    """{query: {metric name: value}} for the judged queries of `run`, one evaluator per cutoff."""
    per_query: dict[str, dict[str, float]] = {q: {} for q in run}
    by_cutoff: dict[int | None, dict[str, str]] = {}  # None: the full run
    for name, (request, cutoff) in parsed.items():
        by_cutoff.setdefault(cutoff, {})[name] = request
    for cutoff, names in by_cutoff.items():
        scored_run = run if cutoff is None else truncate_run(run, cutoff)
        evaluator = _pytrec_eval().RelevanceEvaluator(qrels, set(names.values()))
        results = evaluator.evaluate(scored_run)
        for q in run:
            values = results.get(q, {})
            for name, request in names.items():
                key = request.replace(".", "_")
                # pytrec_eval omits a query whose run is empty on some versions: that is a 0.
                per_query[q][name] = float(values.get(key, 0.0))
    return per_query


def evaluate_run(
    qrels: Mapping[str, Mapping[str, int]],
    run: Mapping[str, Mapping[str, float]],
    metrics: Sequence[str] = DEFAULT_METRICS,
    missing: Literal["zero", "skip"] = "zero",
) -> EvalResult:
    """Score a run {query id: {doc id: score}} against qrels {query id: {doc id: int}}.

    Returns per-query values and means under the names in `metrics` (see the module docstring
    for MRR@K and for how judged queries missing from the run are averaged).
    """
    if missing not in ("zero", "skip"):
        raise ValueError(f"missing must be 'zero' or 'skip', got {missing!r}")
    if not metrics:
        raise ValueError("metrics is empty")
    if not qrels:
        raise ValueError("qrels is empty: nothing to evaluate")
    qrels, run = _check_inputs(qrels, run)
    parsed = {name: _parse_metric(name) for name in metrics}

    judged_run = {q: docs for q, docs in run.items() if q in qrels}
    n_unjudged = len(run) - len(judged_run)
    if n_unjudged:
        logger.info("%d run queries have no judgments and are ignored", n_unjudged)
    missing_queries = [q for q in qrels if q not in judged_run]
    if missing_queries:
        logger.warning(
            "%d of %d judged queries are missing from the run (%s), e.g. %r",
            len(missing_queries),
            len(qrels),
            "scored 0" if missing == "zero" else "skipped",
            missing_queries[:3],
        )

    per_query = _score(qrels, judged_run, parsed)
    if missing == "zero":
        for q in missing_queries:
            per_query[q] = dict.fromkeys(metrics, 0.0)
        ordered = list(qrels)
    else:
        ordered = [q for q in qrels if q in judged_run]
    per_query = {q: per_query[q] for q in ordered}
    n = len(ordered)
    mean = {name: (sum(per_query[q][name] for q in ordered) / n if n else 0.0) for name in metrics}
    return EvalResult(
        per_query=per_query,
        mean=mean,
        n_queries=n,
        missing_queries=missing_queries,
        n_unjudged_run_queries=n_unjudged,
    )


def _to_csr(matrix: Any, what: str):
    import scipy.sparse as sp

    if hasattr(matrix, "detach"):  # a torch tensor, dense or sparse (any layout, any float dtype)
        matrix = matrix.detach().cpu()
        if str(matrix.layout) != "torch.strided":
            matrix = matrix.to_dense()
        matrix = matrix.float().numpy()
    csr = sp.csr_matrix(matrix)
    if csr.ndim != 2:
        raise ValueError(f"{what} must be 2-D (rows x vocab), got shape {csr.shape}")
    if csr.shape[0] == 0:
        raise ValueError(f"{what} has no rows")
    if csr.nnz and not np.all(csr.data != 0):
        csr = csr.copy()
        csr.eliminate_zeros()  # explicitly stored zeros are not active terms
    return csr


def sparsity_stats(q_reps: Any, d_reps: Any) -> dict[str, float]:
    """Mean non-zeros per query and per doc, and FLOPS = sum_j p_j(q) * p_j(d).

    `q_reps` (Q, V) and `d_reps` (D, V): scipy sparse matrices, numpy arrays or torch tensors.
    Returns {"query_nnz", "doc_nnz", "flops"}.
    """
    q_csr = _to_csr(q_reps, "q_reps")  # (Q, V)
    d_csr = _to_csr(d_reps, "d_reps")  # (D, V)
    if q_csr.shape[1] != d_csr.shape[1]:
        raise ValueError(
            f"q_reps has {q_csr.shape[1]} columns but d_reps has {d_csr.shape[1]}: "
            "both must use the same vocabulary"
        )
    vocab = q_csr.shape[1]
    # csr_matrix stores each (row, column) once, so column counts = rows active at that term.
    q_active = np.bincount(q_csr.indices, minlength=vocab) / q_csr.shape[0]  # (V,)
    d_active = np.bincount(d_csr.indices, minlength=vocab) / d_csr.shape[0]  # (V,)
    return {
        "query_nnz": float(q_csr.nnz / q_csr.shape[0]),
        "doc_nnz": float(d_csr.nnz / d_csr.shape[0]),
        "flops": float(np.dot(q_active, d_active)),
    }


def latency_percentiles(seconds: Sequence[float]) -> dict[str, float]:
    """Per-query latencies in seconds -> {"p50_ms", "p95_ms", "mean_ms"} (linear interpolation)."""
    values = np.asarray(list(seconds), dtype=float)
    if values.size == 0:
        raise ValueError("no latencies given")
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError("latencies must be finite and >= 0 seconds")
    ms = values * 1000.0
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "mean_ms": float(ms.mean()),
    }
