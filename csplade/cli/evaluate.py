"""`csplade eval --model M … --datasets D … --out OUT [--baseline bm25]`: zero-shot BEIR eval."""

from __future__ import annotations

import argparse

from csplade.cli.common import add_batch_size, add_device, add_dtype, non_negative, positive
from csplade.model.config import LEXICAL_STATS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="zero-shot BEIR evaluation: encode, index, search, pytrec_eval metrics, table and chart",
    )
    p.add_argument(
        "--model",
        action="append",
        default=[],
        help="a csplade model (folder or packaged name); NAME=MODEL names it; repeatable",
    )
    p.add_argument(
        "--datasets",
        nargs="+",
        required=True,
        help="BEIR folders, or names looked up under $CSPLADE_DATA",
    )
    p.add_argument(
        "--out", required=True, help="output folder (runs, metrics.json, table.md, chart)"
    )
    p.add_argument(
        "--baseline",
        choices=["bm25", "bm25-stem"],
        action="append",
        default=[],
        help="add BM25 (bm25s, no stemmer) or bm25-stem (Snowball English stems); repeatable",
    )
    p.add_argument("--split", default="test", help="qrels split (default: test)")
    p.add_argument(
        "--max-docs", type=positive, default=None, help="evaluate on a corpus slice (smoke runs)"
    )
    p.add_argument(
        "--max-queries", type=positive, default=None, help="evaluate the first N queries only"
    )
    p.add_argument("--k", type=positive, default=1000, help="depth of the runs (default 1000)")
    add_batch_size(p)
    p.add_argument(
        "--latency-queries",
        type=non_negative,
        default=100,
        help="queries timed one by one, encode + search (default 100; 0: no latency measurement)",
    )
    add_device(p, "the model's")
    p.add_argument(
        "--backend", choices=["numba", "scipy"], default=None, help="exact search kernel"
    )
    add_dtype(p)
    _add_model_options(p)
    p.set_defaults(func=_run)


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """How the models are read: their lexical statistics, document length, own-vectors rows."""
    p.add_argument(
        "--lexical-stats",
        choices=LEXICAL_STATS,
        default="model",
        help="models with a lexical residual: IDF and document lengths saved with the model "
        "(its training documents', default) or re-estimated on each corpus, as BM25 does",
    )
    p.add_argument(
        "--doc-max-length",
        type=positive,
        default=None,
        help="documents cut at this many tokens (default: each model's own doc_max_length)",
    )
    p.add_argument(
        "--doc-windows",
        type=positive,
        default=None,
        help="read a document longer than the cut in up to this many windows of it, max-pooled "
        "(doc_windows; default: each model's own, 1 unless set)",
    )
    p.add_argument(
        "--own-vectors",
        action="store_true",
        help="beside each model with a lexical residual, the same model with it off on both sides "
        "(NAME-own: the LLM's own vectors, documents through the model)",
    )


def _overrides(args: argparse.Namespace) -> dict | None:
    """The encoder settings the command line sets for every model (none: each model's own)."""
    names = ("doc_max_length", "doc_windows")
    out = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    return out or None


def _run(args: argparse.Namespace) -> int:
    from csplade.evaluation.beir_eval import EvalOptions, SystemSpec, evaluate, with_own_vectors

    systems = [SystemSpec.parse(m) for m in args.model]
    if args.own_vectors:
        systems = with_own_vectors(systems)
    systems += [SystemSpec.parse(b) for b in args.baseline]
    options = EvalOptions(
        split=args.split,
        max_docs=args.max_docs,
        max_queries=args.max_queries,
        k=args.k,
        batch_size=args.batch_size,
        latency_queries=args.latency_queries,
        device=args.device,
        backend=args.backend,
        dtype=args.dtype,
        lexical_stats=args.lexical_stats,
        encoder_overrides=_overrides(args),
    )
    written = evaluate(systems, args.datasets, args.out, options)
    print(written["table"].read_text())
    for kind, path in written.items():
        print(f"{kind}: {path}")
    return 0
