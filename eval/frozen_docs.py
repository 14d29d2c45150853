"""A frozen-documents model and the model it started from, on whole collections, documents encoded once.

A model trained with ``frozen_docs`` (csplade.model.frozen_docs) encodes its documents with its adapter
off: they are the documents of the model the adapter was put on (its ``base_model``, e.g. a lexical
adaptation). Both models share one index, so this script encodes each corpus once and ranks it with
the queries of both: the trained model's (adapter on) and its start's (adapter off, the step-0 row),
beside BM25 and stemmed BM25 from the same run. `csplade eval` would encode every corpus twice.

    python eval/frozen_docs.py --model runs/smollm2-135m/train-frozen-bi \\
        --datasets scifact nfcorpus cranfield adi --doc-max-length 256 --out runs/frozen-eval

With ``--doc-vectors FILE`` the documents' vectors are kept in FILE: a later run of a model trained from
the same start (or a training run with ``frozen_docs_file: FILE``) encodes only what FILE lacks.
``--doc-windows N`` reads each document whole, up to N windows of ``--doc-max-length`` tokens; FILE
keeps a vector per window, so the first windows of a file written without windows are reused.
``--model`` may also be that start itself (a folder that is not an adapter, e.g. the lexical
adaptation): its own vectors are the step-0 row, and FILE is filled before any training run.

Writes ``metrics.json`` and ``table.md`` (nDCG@10 with the ratio to BM25, R@100, mean query and
document nnz) under --out, updated after each data set.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rows(
    encoder, data, k: int, batch_size: int, doc_threshold: float | None = None
) -> dict[str, dict[str, float]]:
    from csplade.evaluation.beir_eval import baseline_rows, ranking_metrics
    from csplade.evaluation.metrics import sparsity_stats
    from csplade.index import InvertedIndex
    from csplade.model.frozen_docs import adapter_off

    out = baseline_rows(data, k)
    # adapter off: frozen_docs; the threshold prunes each vector as `csplade index` would
    docs = encoder.encode_docs(data.doc_texts, batch_size=batch_size, threshold=doc_threshold)
    index = InvertedIndex.build(docs, data.doc_ids)
    texts = [data.queries[q] for q in data.queries]
    with adapter_off(encoder.backbone):
        start = encoder.encode_queries(texts, batch_size=batch_size, show_progress=False)
    systems = [("start (adapter off)", start)]
    if encoder.is_adapter:
        trained = encoder.encode_queries(texts, batch_size=batch_size, show_progress=False)
        systems.append(("trained", trained))
    for name, q_reps in systems:
        out[name] = {**ranking_metrics(data, index, q_reps, k), **sparsity_stats(q_reps, docs)}
    return out


def _table(metrics: dict) -> str:
    from csplade.evaluation.report import ratio_table

    datasets = list(metrics["bm25"])
    lines = ratio_table(metrics)
    lines += ["", "R@100, query nnz / doc nnz:", ""]
    for system in metrics:
        parts = []
        for d in datasets:
            row = metrics[system][d]
            nnz = f", {row['query_nnz']:.0f}/{row['doc_nnz']:.0f}" if "query_nnz" in row else ""
            parts.append(f"{d} {row['recall_100']:.3f}{nnz}")
        lines.append(f"- {system}: " + "; ".join(parts))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        required=True,
        help="a folder trained with frozen_docs, or the model such a run starts from",
    )
    parser.add_argument(
        "--datasets", nargs="+", default=["scifact", "nfcorpus", "cranfield", "adi"]
    )
    parser.add_argument("--doc-max-length", type=int, default=256)
    parser.add_argument(
        "--doc-windows",
        type=int,
        default=1,
        help="read a longer document in up to this many windows of --doc-max-length tokens, "
        "max-pooled (doc_windows); 1: cut it",
    )
    parser.add_argument(
        "--doc-threshold",
        type=float,
        default=None,
        help="drop document weights below this (pruning; the file keeps them unpruned)",
    )
    parser.add_argument("--split", default="test", help="the split whose queries are ranked")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--out", default=str(REPO / "runs" / "frozen-eval"))
    parser.add_argument(
        "--doc-vectors",
        help="a file of the documents' vectors (read when it exists, written after each data set): "
        "the next model trained from the same start, or a training run's frozen_docs_file, reuses them",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("CSPLADE_DATA", str(REPO.parent / "shared" / "data"))
    from csplade._io import write_json_atomic, write_text_atomic
    from csplade.data.beir import find_dataset, load_beir
    from csplade.model import SparseEncoder

    encoder = SparseEncoder.from_pretrained(
        args.model,
        dtype=args.dtype,
        doc_max_length=args.doc_max_length,
        doc_windows=args.doc_windows,
    )
    if encoder.is_adapter and not encoder.config.frozen_docs:
        parser.error(f"{args.model} is an adapter without frozen_docs: use csplade eval")
    if not encoder.is_adapter:  # the start of a frozen_docs run: its documents, through the file
        encoder.config = replace(encoder.config, frozen_docs=True)
    from csplade.model.frozen_docs import DocVectors

    if args.doc_vectors:
        encoder.doc_vectors = DocVectors.for_encoder(encoder, args.doc_vectors)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, dict] = {}
    for name in args.datasets:
        started = time.time()
        data = load_beir(find_dataset(name), split=args.split)
        rows = _rows(encoder, data, args.k, args.batch_size, args.doc_threshold)
        for system, row in rows.items():
            metrics.setdefault(system, {})[data.name] = row
        if args.doc_vectors:
            encoder.doc_vectors.save(args.doc_vectors)
        print(f"{name}: {time.time() - started:.0f} s", file=sys.stderr)
        write_json_atomic(out / "metrics.json", metrics)
        write_text_atomic(out / "table.md", _table(metrics))
    print(_table(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
