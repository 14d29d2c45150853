"""Quantization sweep: one model under several quantization modes; quality, memory and speed.

``csplade quant-sweep`` loads the model once per (mode, data set), by default in a fresh subprocess
(so peak RSS is that mode's alone), and measures one row through
:func:`~csplade.evaluation.beir_eval.evaluate_system`: weight bytes, peak RSS and throughput of the
doc encoding, per-query latency (encode one query + exact top-100 search), sparsity, index size and
nDCG@10 / recall@100 (:func:`measure_row` defines each). Rows go to ``OUT/sweep.json``; ``sweep.md``
and two Pareto plots (quality vs weight bytes, vs docs/s) are written from them. A rerun skips the
rows already there.

Known limits: the sweep runs on CPU (bitsandbytes and torchao both run there, slower than float for
most modes); a slice keeps every judged doc, so its scores only compare with the same slice.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from csplade._io import write_json_atomic, write_text_atomic
from csplade._progress import progress
from csplade.data.beir import find_dataset, load_beir
from csplade.evaluation.beir_eval import SystemOptions, evaluate_system, slice_data
from csplade.evaluation.memory import max_rss_bytes
from csplade.evaluation.report import agg_figure, save_png
from csplade.model.encoder import SparseEncoder
from csplade.quantization.modes import (
    check_mode,
    is_quantized,
    parameter_bytes,
    quiet_int8_cast_notice,
    require_backend,
)

logger = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
SWEEP_TABLE = "sweep.md"
PARETO_MEMORY = "pareto_memory.png"
PARETO_THROUGHPUT = "pareto_throughput.png"
SEARCH_K = 100  # depth of the scored run and of each timed query's search
# Keys of every sweep row (sweep.json), in table order.
ROW_KEYS = (
    "model",
    "mode",
    "quantize_head",
    "dataset",
    "split",
    "n_docs",
    "n_queries",
    "slice",
    "ndcg_cut_10",
    "recall_100",
    "param_bytes",
    "docs_per_s",
    "peak_rss_bytes",
    "max_rss_bytes",
    "query_p50_ms",
    "query_p95_ms",
    "q_nnz",
    "d_nnz",
    "index_bytes",
    "load_s",
    "encode_s",
    "threads",
    "batch_size",
)


@dataclass
class SweepSettings:
    """What `run_sweep` measures; one row per (mode, dataset)."""

    model: str
    datasets: list[str]
    out: str | os.PathLike
    modes: list[str] = field(
        default_factory=lambda: ["none", "int8", "nf4", "fp4", "torchao-int8-dyn"]
    )
    quantize_head: bool = False  # applied to the integer modes only
    max_docs: int | None = None  # slice: all judged docs of the kept queries, filled up to this
    max_queries: int | None = None  # slice: the first judged queries in file order
    batch_size: int = 16
    threads: int | None = None  # torch intra-op threads and search threads (None: leave as is)
    split: str = "test"
    isolate: bool = True  # one fresh subprocess per row (clean peak-RSS numbers)
    encoder_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. doc_max_length
    show_progress: bool = True

    def __post_init__(self) -> None:
        if not self.datasets:
            raise ValueError("no datasets given")
        if not self.modes:
            raise ValueError("no quantization modes given")
        for mode in self.modes:
            check_mode(mode)
        for what, values in (("mode", self.modes), ("dataset", self.datasets)):
            dupes = sorted({v for v in values if values.count(v) > 1})
            if dupes:
                raise ValueError(f"{what}s listed twice: {dupes}")
        for name in ("max_docs", "max_queries", "threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")

    @property
    def is_slice(self) -> bool:
        return self.max_docs is not None or self.max_queries is not None

    def system_options(self, n_queries: int) -> SystemOptions:
        """How a row runs: every query encoded alone and timed, searched to the top 100."""
        return SystemOptions(
            k=SEARCH_K,
            batch_size=self.batch_size,
            query_batch_size=1,
            latency_queries=n_queries,
            latency_k=SEARCH_K,
            threads=self.threads,
            profile_encoding=True,
            show_progress=self.show_progress,
        )

    def identity(self) -> dict[str, Any]:
        return {
            "model": str(self.model),
            "split": self.split,
            "max_docs": self.max_docs,
            "max_queries": self.max_queries,
            "quantize_head_requested": self.quantize_head,
        }


def _load_timed(settings: SweepSettings, mode: str, head: bool) -> tuple[SparseEncoder, float]:
    """The encoder of the sweep in `mode`, and the seconds its loading took."""
    start = time.perf_counter()
    encoder = SparseEncoder.from_pretrained(
        settings.model, quantization=mode, quantize_head=head, **settings.encoder_overrides
    )
    return encoder, time.perf_counter() - start


def measure_row(settings: SweepSettings, mode: str, dataset: str) -> dict[str, Any]:
    """Load `settings.model` in `mode`, encode `dataset`, search it and score it: one sweep row.

    - ``param_bytes``: :func:`~csplade.quantization.modes.parameter_bytes` of the backbone right
      after loading;
    - ``peak_rss_bytes``: peak RSS while encoding the docs (weights included;
      :mod:`csplade.evaluation.memory`); ``max_rss_bytes``: the process's lifetime peak, loading
      included (meaningful per mode only when each row runs in its own process, the default);
    - ``docs_per_s``: docs / seconds spent in ``encode`` (batched, longest first), after one warm-up
      doc;
    - ``query_p50_ms`` / ``query_p95_ms``: per query, encode it alone and search the exact inverted
      index for the top 100; the scored run is searched to the same depth, each query encoded alone;
    - ``q_nnz`` / ``d_nnz``: mean non-zeros per vector; ``index_bytes``: bytes of the docs' CSR
      matrix (float32 values, int32 column ids, int64 row pointers).

    The shards and the run are written to a scratch folder inside ``settings.out``, removed after.
    """
    if settings.threads:
        torch.set_num_threads(settings.threads)
    full = load_beir(find_dataset(dataset), split=settings.split)
    data, note = slice_data(full, settings.max_docs, settings.max_queries)
    head = settings.quantize_head and is_quantized(mode)
    encoder, load_s = _load_timed(settings, mode, head)
    param_bytes = parameter_bytes(encoder.backbone)
    lifetime_peak = max_rss_bytes()  # the encoding's measurement resets the process's peak
    # The scratch index is never reused, so the encoder's identity needs no weight fingerprint.
    describe = {"model": str(settings.model), "mode": mode, "quantize_head": head}
    options = settings.system_options(len(data.queries))
    Path(settings.out).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=settings.out, prefix=".scratch-") as scratch:
        metrics, eff, _run = evaluate_system(
            encoder, data, Path(scratch), mode, options, slice_note=note,
            describe={**describe, **settings.encoder_overrides},
        )  # fmt: skip
    return {
        "model": str(settings.model),
        "mode": mode,
        "quantize_head": bool(head),
        "dataset": dataset,
        "split": settings.split,
        "n_docs": len(data.doc_ids),
        "n_queries": len(data.queries),
        "slice": settings.is_slice,
        "ndcg_cut_10": metrics["ndcg_cut_10"],
        "recall_100": metrics["recall_100"],
        "param_bytes": int(param_bytes),
        "docs_per_s": eff["docs_per_s"],
        "peak_rss_bytes": int(eff["encode_peak_bytes"]),
        "max_rss_bytes": max(lifetime_peak, max_rss_bytes()),
        "query_p50_ms": eff["query_p50_ms"],
        "query_p95_ms": eff["query_p95_ms"],
        "q_nnz": eff["query_nnz"],
        "d_nnz": eff["doc_nnz"],
        "index_bytes": int(eff["index_bytes"]),
        "load_s": load_s,
        "encode_s": eff["encode_s"],
        "threads": settings.threads or torch.get_num_threads(),
        "batch_size": settings.batch_size,
        **settings.identity(),
    }


def _row_worker(settings: SweepSettings, mode: str, dataset: str, result_path: str) -> None:
    """Entry point of a sweep subprocess: measure one row, write it as JSON to `result_path`."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
        )
    quiet_int8_cast_notice()
    if settings.threads:
        os.environ["OMP_NUM_THREADS"] = str(settings.threads)
    row = measure_row(settings, mode, dataset)
    Path(result_path).write_text(json.dumps(row))


def _run_isolated(settings: SweepSettings, mode: str, dataset: str) -> dict[str, Any]:
    out = Path(settings.out)
    fd, result_path = tempfile.mkstemp(dir=out, prefix=".row-", suffix=".json")
    os.close(fd)
    try:
        process = multiprocessing.get_context("spawn").Process(
            target=_row_worker, args=(settings, mode, dataset, result_path)
        )
        process.start()
        process.join()
        text = Path(result_path).read_text()
        if process.exitcode != 0 or not text:
            raise RuntimeError(
                f"sweep row (mode={mode!r}, dataset={dataset!r}) failed in its subprocess "
                f"(exit code {process.exitcode}); see the log above"
            )
        return json.loads(text)
    finally:
        Path(result_path).unlink(missing_ok=True)


def load_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a sweep.json (an empty list if the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a list of rows, got {type(rows).__name__}")
    for i, row in enumerate(rows):
        missing = [k for k in ROW_KEYS if not isinstance(row, dict) or k not in row]
        if missing:
            raise ValueError(f"{path}: row {i} lacks {missing}")
    return rows


def run_sweep(settings: SweepSettings) -> list[dict[str, Any]]:
    """Measure every (mode, dataset) of `settings` not yet in ``out/sweep.json``; write the results.

    After each row, ``sweep.json`` (all rows) and ``sweep.md`` are rewritten atomically, so an
    interrupted sweep resumes where it stopped; the Pareto plots are drawn at the end. Rows already
    in sweep.json must come from the same sweep (model, split, slice, head setting), else
    ValueError.
    """
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = load_rows(out / SWEEP_FILE)
    identity = settings.identity()
    for i, row in enumerate(rows):
        differs = {k: (row.get(k), v) for k, v in identity.items() if row.get(k) != v}
        if differs:
            raise ValueError(
                f"{out / SWEEP_FILE}: row {i} comes from another sweep ({differs}, as "
                "(saved, now)); use another --out folder"
            )
    done = {(row["mode"], row["dataset"]) for row in rows}
    todo = [(m, d) for d in settings.datasets for m in settings.modes if (m, d) not in done]
    skipped = len(settings.datasets) * len(settings.modes) - len(todo)
    if skipped:
        logger.info("%d (mode, dataset) rows already in %s: skipped", skipped, out / SWEEP_FILE)
    for mode in {m for m, _ in todo}:
        require_backend(mode)
    bar = progress(todo, unit="row", desc="quant sweep", disable=not settings.show_progress)
    for mode, dataset in bar:
        bar.set_postfix_str(f"{mode} / {dataset}")
        if settings.isolate:
            row = _run_isolated(settings, mode, dataset)
        else:
            row = measure_row(settings, mode, dataset)
        rows.append(row)
        write_json_atomic(out / SWEEP_FILE, rows)
        write_table(rows, out / SWEEP_TABLE)
        logger.info(
            "%s / %s: nDCG@10 %.3f, %.1f MiB of weights, %.2f docs/s",
            mode,
            dataset,
            row["ndcg_cut_10"],
            row["param_bytes"] / 2**20,
            row["docs_per_s"],
        )
    bar.close()
    if rows:
        write_table(rows, out / SWEEP_TABLE)
        write_plots(rows, out)
    return rows


# ------------------------------------------------------------------------------- sweep reports


def pareto_front(xs: list[float], ys: list[float], x_lower_is_better: bool) -> list[int]:
    """Indices of the points that no other point beats on both axes (y: higher is better), by x."""
    sign = 1.0 if x_lower_is_better else -1.0
    front = []
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        dominated = any(
            sign * xo <= sign * x and yo >= y and (sign * xo < sign * x or yo > y)
            for j, (xo, yo) in enumerate(zip(xs, ys, strict=True))
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: xs[i])


def _baseline(rows: list[dict[str, Any]], dataset: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["dataset"] == dataset and r["mode"] == "none"), None)


def _ratio(row: dict[str, Any], base: dict[str, Any] | None, key: str) -> str:
    return f"{row[key] / base[key]:.2f}" if base and base[key] else "–"


def write_table(rows: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """sweep.md: one table per data set, one row per mode, ratios against the ``none`` row."""
    path = Path(path)
    first = rows[0]
    lines = [
        f"# Quantization sweep: {first['model']}",
        "",
        f"Head quantization requested: {first['quantize_head_requested']} (integer modes only). "
        f"Threads: {first['threads']}, batch size {first['batch_size']}, split {first['split']}.",
        "",
    ]
    if any(r["slice"] for r in rows):
        lines += [
            f"> **Slice** (max_docs={first['max_docs']}, max_queries={first['max_queries']}): the "
            "judged docs of the kept queries are always in, so scores are higher than on the full "
            "collection; compare slices only with slices.",
            "",
        ]
    lines += [
        "Definitions: *weights* = bytes of parameters and buffers as stored (packed 4-bit bytes "
        "and all scales counted); *peak RSS* = resident memory of the (fresh) process while "
        "encoding the docs; *docs/s* = doc encoding throughput; *query ms* = encode one query + "
        "exact top-100 search; *index* = bytes of the docs' CSR matrix. Ratios (×) are against "
        "mode `none`.",
        "",
    ]
    header = (
        "| mode | head q | nDCG@10 | Δ nDCG | R@100 | weights MiB | × | docs/s | × | peak RSS MiB "
        "| q p50 ms | q p95 ms | q nnz | d nnz | index MiB |"
    )
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        part = [r for r in rows if r["dataset"] == dataset]
        base = _baseline(rows, dataset)
        n_docs, n_queries = part[0]["n_docs"], part[0]["n_queries"]
        lines += [f"## {dataset} ({n_docs} docs, {n_queries} queries)", "", header]
        lines.append("|---|---|" + "---:|" * 13)
        for r in part:
            delta = f"{100 * (r['ndcg_cut_10'] - base['ndcg_cut_10']):+.1f}" if base else "–"
            lines.append(
                f"| {r['mode']} | {'yes' if r['quantize_head'] else 'no'} "
                f"| {r['ndcg_cut_10']:.3f} | {delta} | {r['recall_100']:.3f} "
                f"| {r['param_bytes'] / 2**20:.1f} | {_ratio(r, base, 'param_bytes')} "
                f"| {r['docs_per_s']:.2f} | {_ratio(r, base, 'docs_per_s')} "
                f"| {r['peak_rss_bytes'] / 2**20:.0f} | {r['query_p50_ms']:.1f} "
                f"| {r['query_p95_ms']:.1f} | {r['q_nnz']:.0f} | {r['d_nnz']:.0f} "
                f"| {r['index_bytes'] / 2**20:.1f} |"
            )
        lines.append("")
    lines.append("Δ nDCG is in points (×100) against mode `none`.")
    write_text_atomic(path, "\n".join(lines) + "\n")


# (file, row key, x label, title, lower x is better) of each Pareto plot
_PLOTS = (
    (PARETO_MEMORY, "param_bytes", "weights (MiB, log scale)", "weight memory", True),
    (
        PARETO_THROUGHPUT,
        "docs_per_s",
        "docs encoded per second (log scale)",
        "encoding throughput",
        False,
    ),
)


def _pareto_plot(rows: list[dict[str, Any]], key: str, label: str, title: str, lower_better: bool):
    """nDCG@10 against `key` (log x axis): one series per data set, its Pareto front dashed."""
    fig = agg_figure((6.4, 4.4))
    from matplotlib.ticker import LogLocator, ScalarFormatter  # installed: agg_figure checked

    ax = fig.add_subplot()
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        part = [r for r in rows if r["dataset"] == dataset]
        scale = 2**20 if key == "param_bytes" else 1.0
        xs = [r[key] / scale for r in part]
        ys = [r["ndcg_cut_10"] for r in part]
        points = ax.scatter(xs, ys, label=dataset)
        front = pareto_front(xs, ys, x_lower_is_better=lower_better)
        ax.plot(
            [xs[i] for i in front],
            [ys[i] for i in front],
            linestyle="--",
            color=points.get_facecolor()[0],
            linewidth=1,
        )
        for x, y, r in zip(xs, ys, part, strict=True):
            ax.annotate(r["mode"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(ScalarFormatter())
    ax.tick_params(axis="x", which="minor", labelsize=0)
    ax.set_xlabel(label)
    ax.set_ylabel("nDCG@10")
    sliced = " (slice)" if any(r["slice"] for r in rows) else ""
    ax.set_title(f"{rows[0]['model']}: quality vs {title}{sliced}", fontsize=9)
    ax.legend(fontsize="small", title="dashed: Pareto front", title_fontsize="x-small")
    fig.tight_layout()
    return fig


def write_plots(rows: list[dict[str, Any]], out: str | os.PathLike) -> dict[str, Path]:
    """Pareto plots (nDCG@10 vs weight bytes, vs docs/s) as PNG; one series per data set."""
    written = {}
    for name, key, label, title, lower_better in _PLOTS:
        written[name] = Path(out) / name
        save_png(_pareto_plot(rows, key, label, title, lower_better), written[name])
    return written
