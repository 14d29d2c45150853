"""Zero-shot evaluation on the standard local BEIR folders: a thin wrapper over `csplade eval`.

    python eval/beir.py --model runs/my-model                 # + BM25, on scifact, cranfield, adi
    python eval/beir.py --model a=runs/a --model b=runs/b --datasets scifact --max-docs 2000

The data sets are looked up under $CSPLADE_DATA (default: `<repo>/../shared/data`), results go to
`runs/beir/` (metrics.json, table.md, nDCG@10 chart, runs, cached indexes; see csplade.evaluation.beir_eval).
Every option this script does not know (--k, --max-docs, --max-queries, --device, --backend, …) is
passed on to `csplade eval` unchanged. The BM25 rows (bm25s without and with stemming) are added unless --no-bm25.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STANDARD = ("scifact", "cranfield", "adi")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Other options are passed to `csplade eval` (see `csplade eval --help`).",
    )
    parser.add_argument(
        "--model", action="append", default=[], help="NAME=MODEL or MODEL; repeatable"
    )
    parser.add_argument("--datasets", nargs="+", default=list(STANDARD))
    parser.add_argument("--out", default=str(REPO / "runs" / "beir"))
    parser.add_argument("--no-bm25", action="store_true", help="leave out the BM25 baselines")
    args, passthrough = parser.parse_known_args(argv)
    os.environ.setdefault("CSPLADE_DATA", str(REPO.parent / "shared" / "data"))
    command = ["eval", "--datasets", *args.datasets, "--out", args.out]
    for model in args.model:
        command += ["--model", model]
    if not args.no_bm25:
        command += ["--baseline", "bm25", "--baseline", "bm25-stem"]
    from csplade.cli import main as csplade_main

    return csplade_main(command + passthrough)


if __name__ == "__main__":
    sys.exit(main())
