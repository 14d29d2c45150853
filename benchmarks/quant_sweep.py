"""Quantization sweep as a benchmark: every mode against the float32 baseline of the same run.

    python benchmarks/quant_sweep.py --model splade-tiny --datasets cranfield \
        --modes none,int8,nf4,fp4,torchao-int8-wo,torchao-int8-dyn --quantize-head --out runs/quant

Takes the arguments of `csplade quant-sweep` (it runs it; rows already in OUT/sweep.json are reused),
then prints, per data set, the baseline (mode ``none``) and each mode with its ratios to it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from csplade.cli import build_parser, main


def report(rows: list[dict]) -> str:
    lines = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        part = [r for r in rows if r["dataset"] == dataset]
        base = next((r for r in part if r["mode"] == "none"), None)
        if base is None:
            lines.append(f"{dataset}: no 'none' row, no baseline to compare with")
            continue
        lines.append(
            f"{dataset}: baseline none: nDCG@10 {base['ndcg_cut_10']:.3f}, "
            f"{base['param_bytes'] / 2**20:.1f} MiB, {base['docs_per_s']:.2f} docs/s, "
            f"query p50 {base['query_p50_ms']:.1f} ms"
        )
        for r in part:
            if r is base:
                continue
            lines.append(
                f"  {r['mode']:18s} nDCG@10 {r['ndcg_cut_10']:.3f} "
                f"({100 * (r['ndcg_cut_10'] - base['ndcg_cut_10']):+.1f} pts)  "
                f"weights x{r['param_bytes'] / base['param_bytes']:.2f}  "
                f"docs/s x{r['docs_per_s'] / base['docs_per_s']:.2f}  "
                f"query p50 x{r['query_p50_ms'] / base['query_p50_ms']:.2f}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    argv = ["quant-sweep", *sys.argv[1:]]
    args = build_parser().parse_args(argv)
    status = main(argv)
    if status == 0:
        print(report(json.loads((Path(args.out) / "sweep.json").read_text())))
    sys.exit(status)
