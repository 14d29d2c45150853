"""`csplade quant-sweep`: quality, memory and speed of one model under several quantization modes.

    csplade quant-sweep --model smollm2-135m --datasets cranfield \
        --modes none,int8,nf4,fp4,torchao-int8-dyn --quantize-head --out runs/quant

Writes OUT/sweep.json (one row per mode and data set), OUT/sweep.md and two Pareto plots; a rerun
skips the rows already in sweep.json. See :mod:`csplade.quantization.modes` for the modes and
:func:`csplade.evaluation.quant_sweep.measure_row` for what each measurement means.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from csplade.cli.common import add_batch_size, positive


def _modes(text: str) -> list[str]:
    from csplade.quantization.modes import check_mode

    modes = [m.strip() for m in text.split(",") if m.strip()]
    try:
        return [check_mode(m) for m in modes]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "quant-sweep",
        help="evaluate one model under several quantization modes (quality, memory, speed)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--model", required=True, help="packaged model name or model folder")
    parser.add_argument(
        "--datasets", nargs="+", required=True, help="BEIR folders or names under $CSPLADE_DATA"
    )
    parser.add_argument(
        "--modes",
        type=_modes,
        default=["none", "int8", "nf4", "fp4", "torchao-int8-dyn"],
        help="comma-separated modes (default: none,int8,nf4,fp4,torchao-int8-dyn); also "
        "bf16, fp16, torchao-int8-wo, gptq",
    )
    parser.add_argument("--out", required=True, help="output folder (sweep.json, sweep.md, PNGs)")
    parser.add_argument(
        "--quantize-head",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also quantize the LM head (and tied input embeddings) in the integer modes",
    )
    parser.add_argument(
        "--max-docs",
        type=positive,
        default=None,
        help="slice: this many docs (more if the judged docs of the kept queries need it)",
    )
    parser.add_argument(
        "--max-queries", type=positive, default=None, help="slice: the first N judged queries"
    )
    add_batch_size(parser, default=16, what="docs")
    parser.add_argument(
        "--threads",
        type=positive,
        default=None,
        help="torch and search threads (default: torch's); on a busy machine, 1 gives steadier "
        "timings (oversubscribed threads wait for each other at every op)",
    )
    parser.add_argument("--split", default="test", help="qrels split (default: test)")
    parser.add_argument("--doc-max-length", type=positive, default=None, help="doc token cap")
    parser.add_argument("--query-max-length", type=positive, default=None, help="query token cap")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="measure every row in this process (faster start; peak RSS then mixes the modes)",
    )
    parser.set_defaults(func=_sweep)


def _sweep(args: argparse.Namespace) -> int:
    from csplade.evaluation.quant_sweep import SWEEP_TABLE, SweepSettings, run_sweep
    from csplade.quantization.modes import quiet_int8_cast_notice

    quiet_int8_cast_notice()
    overrides = {}
    if args.doc_max_length is not None:
        overrides["doc_max_length"] = args.doc_max_length
    if args.query_max_length is not None:
        overrides["query_max_length"] = args.query_max_length
    settings = SweepSettings(
        model=args.model,
        datasets=list(args.datasets),
        out=args.out,
        modes=args.modes,
        quantize_head=args.quantize_head,
        max_docs=args.max_docs,
        max_queries=args.max_queries,
        batch_size=args.batch_size,
        threads=args.threads,
        split=args.split,
        isolate=not args.in_process,
        encoder_overrides=overrides,
    )
    rows = run_sweep(settings)
    print((Path(args.out) / SWEEP_TABLE).read_text() if rows else "no rows")
    return 0
