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
    from csplade.data.lexical_targets import LexicalTargets, fit_statistics
    from csplade.evaluation.beir_eval import baseline_rows, ranking_metrics
    from csplade.evaluation.report import ratio_table
    from csplade.index import InvertedIndex
    from csplade.model import SparseEncoder
    from csplade.model.frozen_docs import DocVectors
    from csplade.model.lexical import target_csr

    encoder = SparseEncoder.from_pretrained(
        args.model, dtype=args.dtype, doc_max_length=args.doc_max_length
    )
    encoder.config = replace(encoder.config, frozen_docs=True)  # documents with any adapter off
    if args.doc_vectors:
        encoder.doc_vectors = DocVectors.for_encoder(encoder, args.doc_vectors)
    mixed = "target queries x model documents"
    names = ["bm25", "bm25-stem", "targets", mixed]
    table: dict[str, dict] = {name: {} for name in names}
    for dataset in args.datasets:
        data = load_beir(find_dataset(dataset), split="test")
        for name, row in baseline_rows(data, metrics=("ndcg_cut_10",)).items():
            table[name][data.name] = row
        weights = fit_statistics(encoder, data.doc_texts, args.analyzer)
        targets = LexicalTargets(encoder, weights, analyzer=args.analyzer)
        queries = target_csr(
            targets.terms(list(data.queries.values()), "query"), encoder.vocab_size
        )
        target_docs = target_csr(targets.terms(data.doc_texts, "doc"), encoder.vocab_size)
        model_docs = encoder.encode_docs(data.doc_texts)
        for name, docs in [("targets", target_docs), (mixed, model_docs)]:
            index = InvertedIndex.build(docs, data.doc_ids)
            table[name][data.name] = ranking_metrics(data, index, queries, metrics=("ndcg_cut_10",))
        if args.doc_vectors:
            encoder.doc_vectors.save(args.doc_vectors)
    print("\n".join(ratio_table(table)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
