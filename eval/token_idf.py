"""A reference with no training: a model's tokenizer, each document its own tokens, queries IDF-weighted.

    python eval/token_idf.py --datasets adi cranfield scifact            # SmolLM2's tokenizer
    python eval/token_idf.py --model splade-tiny --doc-max-length 512
    python eval/token_idf.py --datasets adi --vectors-of runs/my-model    # + its documents' own-token share
    python eval/token_idf.py --residual-of runs/my-model   # a lexical-residual model's residual alone
    python eval/token_idf.py --residual-of runs/demo/train-bi --datasets scifact --max-queries 80 \
        --max-docs 400                                      # on the demo's slice
    python eval/token_idf.py --residual-of runs/my-model --residual-loss runs/groups.jsonl \
        --temperature 5                        # the training loss of its residual alone
    python eval/token_idf.py --bm25-on stems --doc-max-length 2048 --datasets nfcorpus
                                               # the residual's BM25 under an analyzer, own IDF

A document's vector holds ``1 + log(tf)`` for each token of its first ``--doc-max-length`` tokens; a
query's holds the collection's IDF (BM25's form, over the same truncated documents) for each of its
tokens. Scores are dot products, searched exactly. It is what a learned sparse model sees before it
learns anything but its tokenizer: the lexical matching BM25 does, without length normalisation and
on sub-word tokens. A trained csplade model below this row has lost lexical matching that it could
have kept; the study's rows (`eval/study.py`) read against it. ``--vectors-of MODEL`` also encodes the
documents with a csplade model and reports how much of their vectors' weight sits on their own tokens
(:func:`own_token_share`), the quantity this reference is made of. ``--residual-of MODEL`` scores, for
a model trained with ``lexical_residual`` (:mod:`csplade.model.lexical`), its residual alone (BM25 on
its tokens with its training documents' IDF and lengths, through the model's own tokenization), the
row that says what its learned terms add; with ``--residual-loss GROUPS`` it reports instead the
training loss (InfoNCE with in-batch negatives, csplade's own) of that residual alone on training
groups read and sampled as training reads them, the level a run's logged loss must go below for its learned
terms to have learned anything. ``--bm25-on ANALYZER`` scores, with no model, BM25 as the residual
computes it (k1 1.2, b 0.75) over each collection's own tokens read by a ``lexical_analyzer``
(``tokens``, ``words``, ``stems``) with that collection's IDF and mean length: what a lexical-documents
model's documents are, and the row that chose the analyzer.

Written here rather than with a library: BM25 libraries (bm25s, Lucene) tokenize words, and this row
is about the model's own vocabulary; the scoring is csplade's exact inverted index and pytrec_eval.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from csplade._io import write_json_atomic
from csplade._progress import progress
from csplade.data.beir import find_dataset, load_beir
from csplade.evaluation.beir_eval import slice_data
from csplade.evaluation.metrics import evaluate_run
from csplade.index.inverted import InvertedIndex
from csplade.model import lexical

REPO = Path(__file__).resolve().parents[1]


def token_matrix(rows: list[list[int]], vocab: int, weight) -> sp.csr_matrix:
    """(n, vocab) CSR: row i holds weight(ids, counts) on the distinct ids of rows[i]."""
    indptr, cols, vals = [0], [], []
    for ids in rows:
        uniq, counts = np.unique(np.asarray(ids, dtype=np.int64), return_counts=True)
        cols.append(uniq)
        vals.append(weight(uniq, counts).astype(np.float32))
        indptr.append(indptr[-1] + len(uniq))
    cols_a = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    vals_a = np.concatenate(vals) if vals else np.zeros(0, np.float32)
    return sp.csr_matrix((vals_a, cols_a, np.asarray(indptr)), shape=(len(rows), vocab))


def token_idf_run(
    tokenizer, data, doc_max_length: int, k: int = 1000, lowercase: bool = False
) -> dict:
    """{query id: {doc id: score}} of the token-IDF reference on one loaded BEIR split.

    `lowercase` lowercases documents and queries before tokenizing (the model's tokens are cased).
    """
    vocab = len(tokenizer)
    fold = str.lower if lowercase else str
    docs = []
    for start in progress(
        range(0, len(data.doc_texts), 1024), desc=f"{data.name} tokens", unit="batch"
    ):
        batch = [fold(text) for text in data.doc_texts[start : start + 1024]]
        docs += [
            ids[:doc_max_length] for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]
        ]
    d = token_matrix(docs, vocab, lambda ids, tf: 1.0 + np.log(tf))
    df = np.bincount(d.indices, minlength=vocab)
    idf = lexical.bm25_idf(df, len(docs))
    query_ids = list(data.queries)
    q_ids = tokenizer([fold(data.queries[q]) for q in query_ids], add_special_tokens=False)[
        "input_ids"
    ]
    q = token_matrix(q_ids, vocab, lambda ids, tf: idf[ids])
    return search(d, q, data.doc_ids, query_ids, k)


def bm25_tokens_run(tokenizer, data, analyzer: str, doc_max_length: int, k: int = 1000) -> dict:
    """{query id: {doc id: score}}: BM25 as the lexical residual scores it (query IDF . document
    saturated tf, k1 1.2, b 0.75; ``(k1 + 1)`` times Lucene's BM25) over the collection's own token
    ids read by `analyzer`, documents cut at `doc_max_length`, IDF and mean length of the collection."""
    vocab = len(tokenizer)
    docs = []
    for start in progress(
        range(0, len(data.doc_texts), 1024), desc=f"{data.name} {analyzer}", unit="batch"
    ):
        rows = lexical.analyzed_rows(tokenizer, data.doc_texts[start : start + 1024], analyzer)
        docs += [row[:doc_max_length] for row in rows]
    weights = lexical.statistics(docs, vocab)
    avgdl = weights.avgdl(doc_max_length)
    k1, b = lexical.K1, lexical.B
    indptr, cols, vals = [0], [], []
    for row in docs:
        ids, tf = np.unique(np.asarray(row, dtype=np.int64), return_counts=True)
        norm = k1 * (1.0 - b + b * len(row) / avgdl)
        cols.append(ids)
        vals.append((tf * (k1 + 1.0) / (tf + norm)).astype(np.float32))
        indptr.append(indptr[-1] + len(ids))
    d = sp.csr_matrix(
        (np.concatenate(vals), np.concatenate(cols), np.asarray(indptr)), shape=(len(docs), vocab)
    )
    idf = weights.idf.numpy()
    query_ids = list(data.queries)
    q_rows = lexical.analyzed_rows(tokenizer, [data.queries[q] for q in query_ids], analyzer)
    q = token_matrix(q_rows, vocab, lambda ids, tf: idf[ids])
    return search(d, q, data.doc_ids, query_ids, k)


def search(d: sp.csr_matrix, q: sp.csr_matrix, doc_ids, query_ids, k: int) -> dict:
    """{query id: {doc id: score}}: exact dot-product search of `q` over `d` (csplade's index)."""
    index = InvertedIndex.build(d, doc_ids)
    hits = index.search_ids(q, query_ids, k=min(k, len(doc_ids)))
    return {qid: dict(pairs) for qid, pairs in hits.items()}


def residual_run(encoder, data, batch_size: int = 256, k: int = 1000) -> dict:
    """{query id: {doc id: score}} of a lexical-residual model's residual alone (no network runs)."""
    if encoder.lexical is None or not encoder.config.lexical_residual:
        raise ValueError("--residual-of needs a model trained with lexical_residual")

    def vectors(texts: list[str], kind: str) -> sp.csr_matrix:
        rows = []
        for start in progress(
            range(0, len(texts), batch_size), desc=f"{data.name} {kind} residual"
        ):
            batch = encoder.tokenize(texts[start : start + batch_size], kind)
            dense = lexical.batch_residual(batch, encoder.vocab_size)
            rows.append(sp.csr_matrix(dense.numpy()))
        return sp.vstack(rows, format="csr")

    query_ids = list(data.queries)
    d = vectors(data.doc_texts, "doc")
    q = vectors([data.queries[qid] for qid in query_ids], "query")
    return search(d, q, data.doc_ids, query_ids, k)


def residual_loss(
    encoder,
    groups: str,
    temperature: float,
    group_size: int = 2,
    batch_size: int = 16,
    seed: int = 42,
) -> float:
    """Mean InfoNCE (in-batch negatives) of a lexical-residual model's residual alone on `groups`.

    The groups are read and sampled as ``csplade train`` reads them (one positive and
    ``group_size - 1`` of the group's negatives, seeded), in consecutive batches of `batch_size`
    (a last, shorter batch dropped); no network runs.
    """
    from csplade.data.groups import load_training_groups
    from csplade.data.sampling import GroupCollator
    from csplade.training.arguments import DataArguments
    from csplade.training.losses import contrastive_loss

    if encoder.lexical is None or not encoder.config.lexical_residual:
        raise ValueError("--residual-loss needs a model trained with lexical_residual")
    dataset = load_training_groups(
        DataArguments(train_data=groups, group_size=group_size), seed=seed
    )
    collate = GroupCollator(encoder.tokenize)
    values = []
    starts = range(0, len(dataset) - batch_size + 1, batch_size)
    for start in progress(starts, desc="residual loss", unit="batch"):
        batch = collate([dataset[i] for i in range(start, start + batch_size)])
        q, d = (
            lexical.batch_residual(batch[kind], encoder.vocab_size) for kind in ("query", "doc")
        )
        loss = contrastive_loss(q, d, group_size, temperature=temperature, in_batch_negatives=True)
        values.append(float(loss))
    if not values:
        raise ValueError(f"{groups}: fewer than {batch_size} groups, no whole batch")
    return float(np.mean(values))


def own_token_share(encoder, texts: list[str], doc_max_length: int, batch_size: int = 16) -> dict:
    """How a model's document vectors relate to the documents' own tokens (first `doc_max_length`).

    Returns the mean active terms per document, the mean own tokens among them, the mean distinct
    own tokens, and the share of all vector weight on own tokens.
    """
    encoder.config.doc_max_length = doc_max_length
    vectors = encoder.encode(texts, "doc", batch_size=batch_size).tocsr()
    ids = encoder.tokenizer(texts, add_special_tokens=False)["input_ids"]
    own = token_matrix(
        [row[:doc_max_length] for row in ids], vectors.shape[1], lambda i, tf: np.ones(len(i))
    )
    on_own = vectors.multiply(own).tocsr()
    total = float(vectors.sum())
    return {
        "active_terms": vectors.nnz / len(texts),
        "active_own_tokens": on_own.nnz / len(texts),
        "distinct_own_tokens": own.nnz / len(texts),
        "own_weight_share": float(on_own.sum()) / total if total else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="smollm2-135m", help="whose tokenizer (a csplade model name)"
    )
    parser.add_argument("--datasets", nargs="+", default=["adi", "cranfield", "scifact"])
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-queries", type=int, default=None, help="a slice, as csplade eval's")
    parser.add_argument("--max-docs", type=int, default=None, help="a slice, as csplade eval's")
    parser.add_argument("--doc-max-length", type=int, default=256)
    parser.add_argument(
        "--vectors-of",
        default=None,
        help="a csplade model: report its documents' own-token share too",
    )
    parser.add_argument(
        "--residual-of",
        default=None,
        help="a csplade model with a lexical residual: score its residual alone instead",
    )
    parser.add_argument(
        "--residual-loss",
        default=None,
        help="with --residual-of: training groups; report its residual's training loss on them",
    )
    parser.add_argument("--temperature", type=float, default=1.0, help="for --residual-loss")
    parser.add_argument("--group-size", type=int, default=2, help="for --residual-loss")
    parser.add_argument("--batch-size", type=int, default=16, help="for --residual-loss")
    parser.add_argument(
        "--lowercase", action="store_true", help="lowercase the texts first (the reference only)"
    )
    parser.add_argument(
        "--bm25-on",
        default=None,
        choices=lexical.LEXICAL_ANALYZERS,
        help="score the residual's BM25 over each collection's tokens read by this analyzer instead",
    )
    parser.add_argument("--dtype", default="bfloat16", help="for --vectors-of")
    parser.add_argument("--out", default=None, help="also write the metrics here as JSON")
    args = parser.parse_args(argv)
    if args.doc_max_length < 1:
        parser.error("--doc-max-length must be >= 1")
    if args.residual_loss and not args.residual_of:
        parser.error("--residual-loss needs --residual-of MODEL")
    os.environ.setdefault("CSPLADE_DATA", str(REPO.parent / "shared" / "data"))

    from transformers import AutoTokenizer

    from csplade.model.backbones import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model))
    encoder = residual = None
    if args.residual_of:
        from csplade.model import SparseEncoder

        # the training loss at the model's own (training) lengths; retrieval at --doc-max-length
        lengths = {} if args.residual_loss else {"doc_max_length": args.doc_max_length}
        residual = SparseEncoder.from_pretrained(args.residual_of, dtype=args.dtype, **lengths)
    if args.vectors_of:
        from csplade.model import SparseEncoder

        encoder = SparseEncoder.from_pretrained(args.vectors_of, dtype=args.dtype)
    if args.residual_loss:
        value = residual_loss(
            residual, args.residual_loss, args.temperature, args.group_size, args.batch_size
        )
        print(
            f"{args.residual_of}: its residual alone, InfoNCE at temperature {args.temperature} "
            f"on {args.residual_loss}: {value:.4f}",
            flush=True,
        )
        if args.out:
            write_json_atomic(args.out, {"residual_loss": value}, indent=2)
        return 0
    results = {}
    for name in args.datasets:
        data, _ = slice_data(
            load_beir(find_dataset(name), args.split), args.max_docs, args.max_queries
        )
        if residual is not None:
            run = residual_run(residual, data)
        elif args.bm25_on:
            run = bm25_tokens_run(tokenizer, data, args.bm25_on, args.doc_max_length)
        else:
            run = token_idf_run(tokenizer, data, args.doc_max_length, lowercase=args.lowercase)
        means = evaluate_run(data.qrels, run).mean
        results[name] = means
        print(
            f"{name}: nDCG@10 {means['ndcg_cut_10']:.4f}  R@100 {means['recall_100']:.4f}",
            flush=True,
        )
        if encoder is not None:
            share = own_token_share(encoder, data.doc_texts, args.doc_max_length)
            results[name] = {**means, **{f"vectors_{k}": v for k, v in share.items()}}
            print(
                f"{name}, {args.vectors_of}: {share['active_terms']:.1f} active terms per document, "
                f"{share['active_own_tokens']:.1f} of them its own tokens (of "
                f"{share['distinct_own_tokens']:.1f}); own tokens carry "
                f"{100 * share['own_weight_share']:.2f}% of the weight",
                flush=True,
            )
    if args.out:
        write_json_atomic(args.out, results, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
