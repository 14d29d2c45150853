"""Batches of the lexical adaptation: a text as a document, a sentence of it as a query, and the
vectors each should be.

The lexical adaptation (:mod:`csplade.training.adaptation`, ``lexical_weight``; the loss: :mod:`csplade.training.losses.lexical`) teaches the LLM's own
pooled vector to carry its text's words at BM25's weights before any labelled pair. Each unlabeled
text gives two examples: the text encoded as a document (cut at the encoder's ``doc_max_length``) and
one sentence of it encoded as a query (the adaptation's stand-in for a query, drawn once per text:
:func:`csplade.data.texts.query_length_spans`), each with its target vector
(:func:`csplade.model.lexical.target_terms`): the words the model reads, analysed as BM25 analyses
them (``lexical_analyzer``: lower-cased words without stopwords, stemmed for ``stems``), each word
as the model tokenizes it with its leading space, at sqrt(IDF) for a query and sqrt(IDF) times BM25's
saturated term frequency for a document. A target holds only what the model sees: a document's words
are those of its first ``doc_max_length`` tokens (decoded back to text before the analysis).

IDF and the mean document length are those of the adaptation texts at the same cut
(:func:`fit_statistics`); they are saved with the adaptation record only, not as model weights: the
adapted model carries them in its own vectors.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor
from tqdm.auto import tqdm

from csplade.model import lexical
from csplade.model.inputs import max_length

logger = logging.getLogger(__name__)


def visible_texts(encoder: Any, texts: Sequence[str], kind: str) -> list[str]:
    """Each text cut at the encoder's max length for `kind` (in model tokens), as text again."""
    limit = max_length(encoder.config, kind)
    ids = encoder.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    cut = [row[:limit] for row in ids]
    return encoder.tokenizer.batch_decode(cut, skip_special_tokens=True)


def fit_statistics(
    encoder: Any, texts: Sequence[str], analyzer: str, batch_size: int = 512
) -> lexical.LexicalWeights:
    """IDF and document lengths of `texts` as the lexical targets read them (cut, then analysed)."""
    rows: list[list[int]] = []
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc="lexical targets: statistics", unit="batch", leave=False):
        visible = visible_texts(encoder, texts[start : start + batch_size], "doc")
        rows += lexical.analyzed_rows(encoder.tokenizer, visible, analyzer)
    return lexical.statistics(rows, encoder.vocab_size)


@dataclass
class LexicalTargets:
    """Texts -> the encoder's document and query batches with their target vectors (B, V)."""

    encoder: Any
    weights: lexical.LexicalWeights
    analyzer: str = "stems"
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.scale <= 0:
            raise ValueError(f"lexical target scale must be > 0, got {self.scale}")
        if self.weights.idf.numel() != self.encoder.vocab_size:
            raise ValueError(
                f"lexical statistics have {self.weights.idf.numel()} ids, the vocabulary "
                f"{self.encoder.vocab_size}"
            )

    def describe(self, doc_max_length: int) -> dict[str, Any]:
        """What the targets were fitted on (for the adapted model's provenance)."""
        return {
            "texts": self.weights.n_docs,
            "avgdl": round(self.weights.avgdl(doc_max_length), 2),
        }

    def terms(self, texts: Sequence[str], kind: str) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each text's target as `kind`: (distinct ids, weights) of what the model sees of it."""
        visible = visible_texts(self.encoder, texts, kind)
        rows = lexical.analyzed_rows(self.encoder.tokenizer, visible, self.analyzer)
        limit = max_length(self.encoder.config, kind)
        return [lexical.target_terms(r, self.weights, kind, limit, self.scale) for r in rows]

    def batch(self, texts: Sequence[str], kind: str) -> tuple[dict[str, Tensor], Tensor]:
        """The encoder's tokenized batch of `texts` as `kind` and its targets (B, V) float32."""
        encoded = self.encoder.tokenize(list(texts), kind=kind)
        encoded.pop("n_truncated", None)
        terms = self.terms(texts, kind)
        return encoded, lexical.target_matrix(terms, self.encoder.vocab_size)

    def __call__(self, docs: Sequence[str], queries: Sequence[str]) -> dict[str, Any]:
        doc_batch, doc_target = self.batch(docs, "doc")
        query_batch, query_target = self.batch(queries, "query")
        return {
            "lexical_doc": doc_batch,
            "lexical_doc_target": doc_target,
            "lexical_query": query_batch,
            "lexical_query_target": query_target,
        }
