"""BM25 retrieval over raw texts: the lexical baseline of evaluations and a hard-negative miner.

Uses bm25s (Lù, 2024) with Lucene's BM25 variant and Anserini's BEIR settings k1=0.9, b=0.4. No
stemming unless a stemmer is passed (``stemmer="english"``: PyStemmer's Snowball, the ``bm25-stem``
baseline of ``csplade eval``); Anserini's published SciFact nDCG@10 (0.665 multifield / 0.679 flat)
uses Porter stemming, the default here reaches 0.657 and ``english`` 0.676.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

logger = logging.getLogger(__name__)

Run = dict[str, dict[str, float]]  # {query id: {doc id: score}}


def _check_corpus(corpus_ids: Sequence[str], texts: Sequence[str], k: int) -> None:
    if len(corpus_ids) != len(texts):
        raise ValueError(f"{len(corpus_ids)} corpus ids but {len(texts)} texts")
    if not corpus_ids:
        raise ValueError("the corpus is empty")
    if len(set(corpus_ids)) != len(corpus_ids):
        raise ValueError("corpus_ids contains duplicates")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


def _stem_function(stemmer: Callable[[str], str] | str | None) -> Callable[[str], str] | None:
    """A callable word -> stem: `stemmer` itself, or PyStemmer's algorithm of that name."""
    if not isinstance(stemmer, str):
        return stemmer
    try:
        import Stemmer
    except ImportError:
        raise ImportError(
            f"stemmer={stemmer!r} needs PyStemmer: `pip install PyStemmer` "
            "(or pass a callable word -> stem)"
        ) from None
    return Stemmer.Stemmer(stemmer).stemWord


def bm25_search(
    corpus_ids: Sequence[str],
    texts: Sequence[str],
    queries: Mapping[str, str],
    k: int = 1000,
    k1: float = 0.9,
    b: float = 0.4,
    method: str = "lucene",
    stemmer: Callable[[str], str] | str | None = None,
    stopwords: str | list[str] | None = "en",
) -> Run:
    """BM25 over `texts` for each query in `queries` {id: text}; returns a run {query: {doc: score}}.

    Tokenizer: bm25s's default (lower-case, words of 2+ word characters), English stopwords
    removed unless `stopwords=None`. `stemmer` is a callable word -> stem, or a PyStemmer
    algorithm name such as "english" (needs `pip install PyStemmer`). Documents scoring 0 (no
    query term) are left out of the run rather than padded in arbitrary order; `k` is capped at
    the corpus size.
    """
    try:
        import bm25s
    except ImportError as exc:
        raise ImportError("BM25 needs bm25s: pip install 'csplade[eval]'") from exc

    _check_corpus(corpus_ids, texts, k)
    tokenizer = bm25s.tokenization.Tokenizer(
        stopwords=stopwords or [], stemmer=_stem_function(stemmer)
    )
    doc_tokens = tokenizer.tokenize(list(texts), return_as="string", show_progress=False)
    retriever = bm25s.BM25(k1=k1, b=b, method=method)
    retriever.index(doc_tokens, show_progress=False)

    query_ids = list(queries)
    if not query_ids:
        return {}
    # update_vocab=True only grows the tokenizer's word list; the index's vocabulary is fixed and
    # words it does not know are skipped at retrieval.
    query_tokens = tokenizer.tokenize(
        [queries[q] for q in query_ids], return_as="string", update_vocab=True, show_progress=False
    )
    # bm25s turns a text with no kept token into [""], and the index holds "" for empty docs too:
    # drop it so an all-stopword query matches nothing instead of the empty documents.
    query_tokens = [[t for t in tokens if t] for tokens in query_tokens]
    top_docs, top_scores = retriever.retrieve(
        query_tokens, k=min(k, len(corpus_ids)), show_progress=False
    )  # (Q, k), (Q, k)
    run: Run = {}
    n_empty = 0
    for row, query_id in enumerate(query_ids):
        hits = {
            corpus_ids[int(j)]: float(s)
            for j, s in zip(top_docs[row], top_scores[row], strict=True)
            if s > 0
        }
        n_empty += not hits
        run[query_id] = hits
    if n_empty:
        logger.warning("BM25: %d queries match no document", n_empty)
    return run
