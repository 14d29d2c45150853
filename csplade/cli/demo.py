"""`csplade demo [--out DIR] [--full]`: the main job end to end on the embedded default (see csplade.demo)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from csplade.model.config import VARIANTS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="adapt + train SmolLM2-135M on SciFact, evaluate it against BM25 on the same documents",
    )
    p.add_argument("--out", default="runs/demo", help="working folder (each stage is cached there)")
    p.add_argument(
        "--full", action="store_true", help="evaluate on the full test split (slow on CPU)"
    )
    p.add_argument(
        "--variant",
        choices=VARIANTS,
        default=None,
        help="CSPLADE variant (default: the embedded default's, bi)",
    )
    p.add_argument(
        "--compare-untrained",
        action="store_true",
        help="also evaluate the backbone before adaptation and training (a few more minutes)",
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from csplade.demo import DEMO, for_variant, resolve_dtype, run_demo

    settings = for_variant(args.variant) if args.variant else DEMO
    if args.compare_untrained:
        settings = dataclasses.replace(settings, compare_untrained=True)
    settings = dataclasses.replace(settings, model_dtype=resolve_dtype(settings.model_dtype))
    written = run_demo(args.out, full=args.full, settings=settings)
    print()
    print(summary_table(written["table"].parent))
    print(f"full table: {written['table']}")
    print(f"chart: {written['chart']}")
    timings = Path(args.out) / "timings.json"
    if timings.exists():
        print("stage times (s):", json.loads(timings.read_text()))
    print(
        f"settings: SmolLM2-135M, variant {settings.variant}, {settings.model_dtype}; "
        f"adaptation {settings.adapt['max_steps']} steps, training {settings.train['max_steps']} steps"
    )
    return 0


def summary_table(eval_dir) -> str:
    """One row per system (nDCG@10, R@100, MRR@10, sizes, latency) from an evaluation folder."""
    eval_dir = Path(eval_dir)
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    efficiency_file = eval_dir / "efficiency.json"
    efficiency = json.loads(efficiency_file.read_text()) if efficiency_file.exists() else {}
    lines = [
        "| system | dataset | nDCG@10 | R@100 | MRR@10 | q nnz | d nnz | query p50 ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for system, per_dataset in metrics.items():
        for dataset, values in per_dataset.items():
            eff = efficiency.get(system, {}).get(dataset, {})
            lines.append(
                f"| {system} | {dataset} | {values['ndcg_cut_10']:.3f} | {values['recall_100']:.3f}"
                f" | {values['recip_rank_10']:.3f} | {_number(eff.get('query_nnz'), ',.0f')}"
                f" | {_number(eff.get('doc_nnz'), ',.0f')} | {_number(eff.get('query_p50_ms'), '.0f')} |"
            )
    return "\n".join(lines)


def _number(value, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) else "-"
