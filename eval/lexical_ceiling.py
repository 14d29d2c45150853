"""What the lexical adaptation aims at, and how much of it the LLM's documents hold, on whole collections.

    python eval/lexical_ceiling.py --model runs/smollm2-135m/adapt-lexical-bi \\
        --doc-vectors runs/docvec/adapt-lexical-bi-256.safetensors --datasets scifact nfcorpus cranfield adi

The lexical adaptation (:mod:`csplade.training.losses.lexical`) regresses a text's own vector onto
its lexical target (:func:`csplade.model.lexical.target_terms`): a query's words at sqrt(IDF), a
document's at sqrt(IDF) times BM25's saturated tf, both cut at the model's lengths. Two rows per
collection, with BM25 beside them (IDF and lengths from the collection itself):

- ``targets``: target queries against target documents, what a perfect adaptation would rank;
- ``target queries x model documents``: the same queries against the model's own documents, so the
  gap to ``targets`` is what the documents lose.

``--model`` is the adapted model (or a frozen_docs run: its documents are its start's). With
``--doc-vectors FILE`` (the file of ``frozen_docs_file`` / ``eval/frozen_docs.py``) the documents
come from FILE and only those it lacks are encoded. Prints a table; nothing is written.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _targets(encoder, texts, kind, weights, analyzer):
    import scipy.sparse as sp

    from csplade.data.lexical_targets import visible_texts
    from csplade.model import lexical

    rows = lexical.analyzed_rows(encoder.tokenizer, visible_texts(encoder, texts, kind), analyzer)
    terms = [lexical.target_terms(r, weights, kind, 10**9) for r in rows]
    return sp.csr_matrix(lexical.target_matrix(terms, encoder.vocab_size).numpy())


def _ndcg(data, queries, docs, k: int = 1000) -> float:
    from csplade.evaluation.metrics import evaluate_run
    from csplade.index import InvertedIndex

    query_ids = list(data.queries)
    index = InvertedIndex.build(docs, data.doc_ids)
    ranked = index.search_ids(queries, query_ids, k=min(k, len(data.doc_ids)))
    run = {q: dict(pairs) for q, pairs in ranked.items()}
    return evaluate_run(data.qrels, run, ["ndcg_cut_10"]).mean["ndcg_cut_10"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument(
        "--datasets", nargs="+", default=["scifact", "nfcorpus", "cranfield", "adi"]
    )
    parser.add_argument("--doc-max-length", type=int, default=256)
    parser.add_argument("--analyzer", default="words", help="the targets' lexical_analyzer")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--doc-vectors", help="a file of the documents' vectors (DocVectors)")
    args = parser.parse_args(argv)
    os.environ.setdefault("CSPLADE_DATA", str(REPO.parent / "shared" / "data"))
    from csplade.data.beir import find_dataset, load_beir
    from csplade.data.lexical_targets import fit_statistics
    from csplade.evaluation.beir_eval import BASELINES
    from csplade.evaluation.metrics import evaluate_run
    from csplade.index.bm25 import bm25_search
    from csplade.model import SparseEncoder
    from csplade.model.frozen_docs import DocVectors

    encoder = SparseEncoder.from_pretrained(
        args.model, dtype=args.dtype, doc_max_length=args.doc_max_length
    )
    encoder.config = replace(encoder.config, frozen_docs=True)  # documents with any adapter off
    if args.doc_vectors:
        encoder.doc_vectors = DocVectors.for_encoder(encoder, args.doc_vectors)
    names = ["bm25", "bm25-stem", "targets", "target queries x model documents"]
    table = {name: {} for name in names}
    for dataset in args.datasets:
        data = load_beir(find_dataset(dataset), split="test")
        for name, stemmer in BASELINES.items():
            run = bm25_search(data.doc_ids, data.doc_texts, data.queries, k=1000, stemmer=stemmer)
            table[name][data.name] = evaluate_run(data.qrels, run, ["ndcg_cut_10"]).mean[
                "ndcg_cut_10"
            ]
        weights = fit_statistics(encoder, data.doc_texts, args.analyzer)
        texts = [data.queries[q] for q in data.queries]
        queries = _targets(encoder, texts, "query", weights, args.analyzer)
        target_docs = _targets(encoder, data.doc_texts, "doc", weights, args.analyzer)
        model_docs = encoder.encode_docs(data.doc_texts)
        table["targets"][data.name] = _ndcg(data, queries, target_docs)
        table["target queries x model documents"][data.name] = _ndcg(data, queries, model_docs)
        if args.doc_vectors:
            encoder.doc_vectors.save(args.doc_vectors)
    datasets = list(table["bm25"])
    lines = ["| system | " + " | ".join(datasets) + " |", "|---" * (len(datasets) + 1) + "|"]
    for name in names:
        cells = [
            f"{table[name][d]:.3f} ({table[name][d] / table['bm25'][d]:.2f}x)" for d in datasets
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
