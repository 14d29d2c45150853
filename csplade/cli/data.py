"""`csplade teacher-scores --teachers T1,T2 --groups groups.jsonl --out scored.jsonl`."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "teacher-scores",
        help="score training groups with teachers (dense, sparse, cross-encoder) for distillation",
    )
    p.add_argument(
        "--teachers",
        required=True,
        help="comma-separated teachers: packaged names (minilm-dense, splade-tiny), folders, hub ids",
    )
    p.add_argument("--groups", required=True, help="JSONL of training groups")
    p.add_argument("--out", required=True, help="JSONL of scored groups")
    p.add_argument(
        "--weights", default=None, help="comma-separated ensemble weights (default: all 1)"
    )
    p.add_argument(
        "--normalization",
        default="minmax",
        choices=["minmax", "zscore", "none"],
        help="per-query normalisation of each teacher before the weighted sum",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from csplade.data.teachers import score_groups

    teachers = [t.strip() for t in args.teachers.split(",") if t.strip()]
    weights = None
    if args.weights:
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError as exc:
            raise ValueError(f"--weights: expected numbers, got {args.weights!r}") from exc
    info = score_groups(
        args.groups,
        teachers,
        args.out,
        weights=weights,
        normalization=args.normalization,
        batch_size=args.batch_size,
        device=args.device,
    )
    print(f"scored {info['groups']} groups with {', '.join(info['teachers'])} -> {args.out}")
    return 0
