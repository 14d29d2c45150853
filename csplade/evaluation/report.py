"""Result files of an evaluation: metrics.json, efficiency.json, a markdown table and a bar chart.

The table has one row per data set plus an "average" row (marked † where a system did not run on
every data set); the chart is a grouped bar chart of one metric (values on the bars, the legend beside the plot, a slice
note wrapped under the title). Every file is written atomically.
"""

from __future__ import annotations

import logging
import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from csplade._io import atomic_write, write_json_atomic, write_text_atomic
from csplade.evaluation.metrics import DEFAULT_METRICS

logger = logging.getLogger(__name__)

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


def ratio_table(
    table: Mapping[str, Mapping[str, Mapping[str, float]]],
    metric: str = "ndcg_cut_10",
    reference: str = "bm25",
) -> list[str]:
    """Markdown lines: one row per system of ``table[system][dataset][metric]``, each cell the value
    and its ratio to the `reference` system's on the same data set."""
    datasets = list(table[reference])
    lines = ["| system | " + " | ".join(datasets) + " |", "|---" * (len(datasets) + 1) + "|"]
    for system, rows in table.items():
        cells = []
        for d in datasets:
            value = rows[d][metric]
            cells.append(f"{value:.3f} ({value / table[reference][d][metric]:.2f}x)")
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    return lines


def agg_figure(figsize: tuple[float, float]) -> Any:
    """A matplotlib Figure on an Agg canvas, leaving pyplot's global backend alone."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("charts need matplotlib: pip install 'csplade[eval]'") from exc
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Any, path: Path) -> None:
    """Write `fig` as a PNG (120 dpi), atomically."""
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=120)


def bar_chart(
    metrics: Mapping[str, Mapping[str, Mapping[str, float]]],
    metric: str = "ndcg_cut_10",
    slice_note: str | None = None,
):
    """A matplotlib Figure (Agg canvas): one bar group per dataset plus "average", a bar per system.

    The average bar of a system is over the datasets it reports `metric` for.
    """
    systems = [s for s in metrics if any(metric in v for v in metrics[s].values())]
    datasets = _ordered_union(list(metrics[s] for s in systems))
    groups = datasets + ["average"]
    width = 0.8 / max(len(systems), 1)
    plot_width = max(5.0, 1.2 * len(groups) * max(1, len(systems)) ** 0.5)
    legend_width = 0.9 + 0.07 * max((len(s) for s in systems), default=0)
    fig = agg_figure((plot_width + legend_width, 4.2))
    fig.set_layout_engine("constrained")  # keeps the wrapped title and the outside legend in
    ax = fig.add_subplot()
    x = np.arange(len(groups))
    for i, system in enumerate(systems):
        values = [metrics[system].get(d, {}).get(metric, np.nan) for d in datasets]
        present = [v for v in values if not np.isnan(v)]
        values.append(sum(present) / len(present) if present else np.nan)
        bars = ax.bar(x + (i - (len(systems) - 1) / 2) * width, values, width, label=system)
        ax.bar_label(bars, fmt="%.3f", fontsize="x-small", padding=1)
    ax.set_xticks(x, groups)
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.set_ylim(0, 1.05)
    title = METRIC_LABELS.get(metric, metric)
    if slice_note:  # wrapped to the figure's width (at most ~10 characters per inch)
        title += "\n" + textwrap.fill(slice_note, width=int(10 * (plot_width + legend_width)))
    fig.suptitle(title, fontsize="medium")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
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

    written["metrics"] = out / "metrics.json"
    write_json_atomic(written["metrics"], metrics)
    if efficiency:
        written["efficiency"] = out / "efficiency.json"
        write_json_atomic(written["efficiency"], efficiency)
    written["table"] = out / "table.md"
    write_text_atomic(written["table"], _markdown_table(metrics, efficiency, slice_note))
    if any(chart_metric in v for datasets in metrics.values() for v in datasets.values()):
        written["chart"] = out / f"{chart_metric}.png"
        save_png(bar_chart(metrics, chart_metric, slice_note), written["chart"])
    else:
        logger.warning("no system reports %r; no chart written", chart_metric)
    logger.info("results written to %s", out)
    return written
