"""Retrieval metrics, the BM25 baseline, sparsity/efficiency statistics and result tables.

What and why: every system csplade compares (SPLADE-style encoders on causal LLMs, CSPLADE's `bi` /
`echo` variants, BM25) is scored by the same code, so numbers in one table are comparable.

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

BM25 (`bm25_search`) uses bm25s (Lù, 2024) with Lucene's BM25 variant and Anserini's BEIR
settings k1=0.9, b=0.4. Known limit: no stemming unless a stemmer is passed (PyStemmer is not a
dependency); Anserini's published SciFact nDCG@10 (0.665 multifield / 0.679 flat) uses Porter
stemming, the default here reaches about 0.657.

FLOPS (`sparsity_stats`) is the expected number of multiplications in a query-document dot
product, sum_j p_j(q) * p_j(d), with p_j the fraction of queries (docs) whose vector is non-zero
at term j: Paria et al., "Minimizing FLOPs to Learn Efficient Sparse Representations" (ICLR
2020), as reported in SPLADE v2 (Formal et al., arXiv 2109.10086).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

logger = logging.getLogger(__name__)

Run = dict[str, dict[str, float]]
Qrels = dict[str, dict[str, int]]

DEFAULT_METRICS = ("ndcg_cut_10", "recall_100", "recall_1000", "recip_rank_10", "map")

# Short labels for tables; any other metric is shown under its own name.
METRIC_LABELS = {
    "ndcg_cut_10": "nDCG@10",
    "recall_100": "R@100",
    "recall_1000": "R@1k",
    "recip_rank_10": "MRR@10",
    "recip_rank": "MRR",
    "map": "MAP",
}
EFFICIENCY_LABELS = {
    "query_nnz": "q nnz",
    "doc_nnz": "d nnz",
    "flops": "FLOPS",
    "p50_ms": "p50 ms",
    "p95_ms": "p95 ms",
    "mean_ms": "mean ms",
}

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


def _parse_metric(name: str) -> tuple[str, int | None]:
    """Metric output name -> (pytrec_eval request string, run cutoff or None).

    `recip_rank_K` is special: trec_eval has no cutoff for it, so it is computed as `recip_rank`
    on the run cut to K documents per query.
    """
    import pytrec_eval

    if name in pytrec_eval.supported_measures:
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
    import pytrec_eval

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

    per_query: dict[str, dict[str, float]] = {q: {} for q in judged_run}
    # One evaluator per cutoff of the run (None = full run).
    by_cutoff: dict[int | None, dict[str, str]] = {}
    for name, (request, cutoff) in parsed.items():
        by_cutoff.setdefault(cutoff, {})[name] = request
    for cutoff, names in by_cutoff.items():
        scored_run = judged_run if cutoff is None else truncate_run(judged_run, cutoff)
        evaluator = pytrec_eval.RelevanceEvaluator(qrels, set(names.values()))
        results = evaluator.evaluate(scored_run)
        for q in judged_run:
            values = results.get(q, {})
            for name, request in names.items():
                key = request.replace(".", "_")
                # pytrec_eval omits a query whose run is empty on some versions: that is a 0.
                per_query[q][name] = float(values.get(key, 0.0))

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


def bm25_search(
    corpus_ids: Sequence[str],
    texts: Sequence[str],
    queries: Mapping[str, str],
    k: int = 1000,
    k1: float = 0.9,
    b: float = 0.4,
    method: str = "lucene",
    stemmer: Callable[[str], str] | str | None = None,
    stopwords: str | list[str] | None = "en",
) -> Run:
    """BM25 over `texts` for each query in `queries` {id: text}; returns a run {query: {doc: score}}.

    Tokenizer: bm25s's default (lower-case, words of 2+ word characters), English stopwords
    removed unless `stopwords=None`. `stemmer` is a callable word -> stem, or a PyStemmer
    algorithm name such as "english" (needs `pip install PyStemmer`). Documents scoring 0 (no
    query term) are left out of the run rather than padded in arbitrary order; `k` is capped at
    the corpus size.
    """
    import bm25s

    if len(corpus_ids) != len(texts):
        raise ValueError(f"{len(corpus_ids)} corpus ids but {len(texts)} texts")
    if not corpus_ids:
        raise ValueError("the corpus is empty")
    if len(set(corpus_ids)) != len(corpus_ids):
        raise ValueError("corpus_ids contains duplicates")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if isinstance(stemmer, str):
        try:
            import Stemmer
        except ImportError:
            raise ImportError(
                f"stemmer={stemmer!r} needs PyStemmer: `pip install PyStemmer` "
                "(or pass a callable word -> stem)"
            ) from None
        stemmer = Stemmer.Stemmer(stemmer).stemWord

    tokenizer = bm25s.tokenization.Tokenizer(stopwords=stopwords or [], stemmer=stemmer)
    doc_tokens = tokenizer.tokenize(list(texts), return_as="string", show_progress=False)
    retriever = bm25s.BM25(k1=k1, b=b, method=method)
    retriever.index(doc_tokens, show_progress=False)

    query_ids = list(queries)
    if not query_ids:
        return {}
    # update_vocab=True only grows the tokenizer's word list; the index's vocabulary is fixed and
    # words it does not know are skipped at retrieval.
    query_tokens = tokenizer.tokenize(
        [queries[q] for q in query_ids], return_as="string", update_vocab=True, show_progress=False
    )
    # bm25s turns a text with no kept token into [""], and the index holds "" for empty docs too:
    # drop it so an all-stopword query matches nothing instead of the empty documents.
    query_tokens = [[t for t in tokens if t] for tokens in query_tokens]
    top_docs, top_scores = retriever.retrieve(
        query_tokens, k=min(k, len(corpus_ids)), show_progress=False
    )  # (Q, k), (Q, k)
    run: Run = {}
    n_empty = 0
    for row, query_id in enumerate(query_ids):
        hits = {
            corpus_ids[int(j)]: float(s)
            for j, s in zip(top_docs[row], top_scores[row], strict=True)
            if s > 0
        }
        n_empty += not hits
        run[query_id] = hits
    if n_empty:
        logger.warning("BM25: %d queries match no document", n_empty)
    return run


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


# ---------------------------------------------------------------- result tables


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, then rename over `path`."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _check_nested(table: Mapping, what: str) -> dict[str, dict[str, dict[str, float]]]:
    """Validate {system: {dataset: {name: number}}}; returns plain floats."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for system, datasets in table.items():
        if not isinstance(datasets, Mapping):
            raise ValueError(f"{what}[{system!r}] must map dataset -> {{metric: value}}")
        out[str(system)] = {}
        for dataset, values in datasets.items():
            if not isinstance(values, Mapping):
                raise ValueError(f"{what}[{system!r}][{dataset!r}] must map metric -> value")
            row = {}
            for name, value in values.items():
                try:
                    number = float(value)
                except (TypeError, ValueError):
                    raise ValueError(
                        f"{what}[{system!r}][{dataset!r}][{name!r}] is not a number: {value!r}"
                    ) from None
                if not math.isfinite(number):
                    raise ValueError(
                        f"{what}[{system!r}][{dataset!r}][{name!r}] is not finite: {value!r}"
                    )
                row[str(name)] = number
            out[str(system)][str(dataset)] = row
    return out


def _ordered_union(groups: Sequence[Mapping[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for group in groups:
        seen.update(dict.fromkeys(group))
    return list(seen)


def _metric_order(names: Sequence[str], preferred: Sequence[str]) -> list[str]:
    first = [m for m in preferred if m in names]
    return first + [m for m in names if m not in first]


def _fmt_metric(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _fmt_efficiency(value: float | None) -> str:
    if value is None:
        return "–"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _markdown_table(
    metrics: dict[str, dict[str, dict[str, float]]],
    efficiency: dict[str, dict[str, dict[str, float]]],
    slice_note: str | None,
) -> str:
    systems = _ordered_union([metrics, efficiency])
    datasets = _ordered_union(
        [datasets for table in (metrics, efficiency) for datasets in table.values()]
    )
    # columns: (kind, system, name); metrics of every system first, then efficiency.
    columns: list[tuple[str, str, str]] = []
    for kind, table, preferred in (
        ("metric", metrics, DEFAULT_METRICS),
        ("efficiency", efficiency, tuple(EFFICIENCY_LABELS)),
    ):
        for system in systems:
            names = _ordered_union(list(table.get(system, {}).values()))
            columns += [(kind, system, n) for n in _metric_order(names, preferred)]

    def cell_value(kind: str, system: str, dataset: str, name: str) -> float | None:
        table = metrics if kind == "metric" else efficiency
        return table.get(system, {}).get(dataset, {}).get(name)

    def label(kind: str, system: str, name: str) -> str:
        labels = METRIC_LABELS if kind == "metric" else EFFICIENCY_LABELS
        return f"{system} {labels.get(name, name)}"

    header = ["dataset"] + [label(*c) for c in columns]
    lines = []
    if slice_note:
        lines += [f"> **{slice_note}** (not comparable with full-collection numbers)", ""]
    lines += [
        "| " + " | ".join(header) + " |",
        "|" + "---|" + "---:|" * len(columns),
    ]
    for dataset in datasets:
        cells = [dataset]
        for kind, system, name in columns:
            value = cell_value(kind, system, dataset, name)
            cells.append(_fmt_metric(value) if kind == "metric" else _fmt_efficiency(value))
        lines.append("| " + " | ".join(cells) + " |")
    # average row: mean over the datasets where the cell exists; marked † when some are missing.
    cells = ["average"]
    partial = False
    for kind, system, name in columns:
        values = [cell_value(kind, system, d, name) for d in datasets]
        present = [v for v in values if v is not None]
        text = _fmt_metric if kind == "metric" else _fmt_efficiency
        cell = text(sum(present) / len(present)) if present else "–"
        if present and len(present) < len(datasets):
            cell += "†"
            partial = True
        cells.append(cell)
    lines.append("| " + " | ".join(cells) + " |")
    if partial:
        lines += ["", "† averaged over the datasets this system was run on, not all of them."]
    return "\n".join(lines) + "\n"


def bar_chart(
    metrics: Mapping[str, Mapping[str, Mapping[str, float]]],
    metric: str = "ndcg_cut_10",
    slice_note: str | None = None,
):
    """A matplotlib Figure (Agg canvas): one bar group per dataset plus "average", a bar per system.

    The average bar of a system is over the datasets it reports `metric` for.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    systems = [s for s in metrics if any(metric in v for v in metrics[s].values())]
    datasets = _ordered_union(list(metrics[s] for s in systems))
    groups = datasets + ["average"]
    width = 0.8 / max(len(systems), 1)
    fig = Figure(figsize=(max(6.0, 1.2 * len(groups) * max(1, len(systems)) ** 0.5), 4.0))
    FigureCanvasAgg(fig)  # Agg canvas without touching pyplot's global backend
    ax = fig.add_subplot()
    x = np.arange(len(groups))
    for i, system in enumerate(systems):
        values = [metrics[system].get(d, {}).get(metric, np.nan) for d in datasets]
        present = [v for v in values if not np.isnan(v)]
        values.append(sum(present) / len(present) if present else np.nan)
        ax.bar(x + (i - (len(systems) - 1) / 2) * width, values, width, label=system)
    ax.set_xticks(x, groups)
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.set_ylim(0, 1)
    title = METRIC_LABELS.get(metric, metric)
    ax.set_title(f"{title} ({slice_note})" if slice_note else title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def write_results(
    out_dir: str | os.PathLike,
    metrics: Mapping[str, Mapping[str, Mapping[str, float]]],
    efficiency: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None,
    slice_note: str | None = None,
    chart_metric: str = "ndcg_cut_10",
) -> dict[str, Path]:
    """Write metrics.json, table.md, a bar chart PNG (and efficiency.json when given).

    `metrics` / `efficiency`: {system: {dataset: {name: value}}}. metrics.json holds exactly that
    structure; table.md has one row per dataset plus an "average" row, the metric columns of each
    system, then its efficiency columns; `<chart_metric>.png` is a grouped bar chart (one bar
    per system, one group per dataset plus the average). `slice_note` (e.g. "slice: first 500
    docs, 50 queries") is printed at the top of table.md and in the chart title. Each file is
    written atomically. Returns {"metrics", "table", "chart", ("efficiency")} -> path; the chart is
    skipped with a warning when no system reports `chart_metric`.
    """
    metrics = _check_nested(metrics, "metrics")
    efficiency = _check_nested(efficiency or {}, "efficiency")
    if not metrics:
        raise ValueError("metrics is empty: nothing to write")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}

    def write_json(obj: Any) -> Callable[[Path], None]:
        return lambda p: p.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")

    written["metrics"] = out / "metrics.json"
    _atomic_write(written["metrics"], write_json(metrics))
    if efficiency:
        written["efficiency"] = out / "efficiency.json"
        _atomic_write(written["efficiency"], write_json(efficiency))
    table = _markdown_table(metrics, efficiency, slice_note)
    written["table"] = out / "table.md"
    _atomic_write(written["table"], lambda p: p.write_text(table, encoding="utf-8"))
    if any(chart_metric in v for datasets in metrics.values() for v in datasets.values()):
        written["chart"] = out / f"{chart_metric}.png"
        _atomic_write(
            written["chart"],
            lambda p: bar_chart(metrics, chart_metric, slice_note).savefig(
                p, format="png", dpi=120
            ),
        )
    else:
        logger.warning("no system reports %r; no chart written", chart_metric)
    logger.info("results written to %s", out)
    return written
