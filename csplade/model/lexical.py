"""The lexical residual: BM25 over a text's own tokens, added to its learned sparse vector.

With ``lexical_residual`` on, a query's vector gets ``lexical_scale * IDF(t)`` on each of its distinct
tokens and a document's ``lexical_scale * tf (k1 + 1) / (tf + k1 (1 - b + b dl / avgdl))`` on each of
its (Robertson's BM25, Lucene's IDF ``log(1 + (N - df + 0.5) / (df + 0.5))``, k1 = 1.2, b = 0.75, dl
the text's tokens after truncation and avgdl the training documents' mean at the same truncation, so
that a model trained at 128 document tokens and evaluated at 256 normalises lengths right at both). The product of the two residuals is BM25 on the model's tokens,
scaled by ``lexical_scale ** 2``; the learned terms (log(1 + ReLU(logit)), max-pooled) add to it.

Why: a causal LM head predicts the *next* token, so a fresh csplade vector puts under 1% of its weight
on the text's own tokens, and the trained models lost the exact matching that BM25 (and a model's
tokens at IDF, ``eval/token_idf.py``) has; a short contrastive run does not learn it back. With the
residual the model starts where BM25 on its tokens is and learns what to add (expansion, weights of
other terms); like inference-free queries (``doc_only``), the IDF and mean length are those of the
training documents and are saved with the model (``lexical_weights.safetensors``).

Which tokens (``lexical_analyzer``): ``tokens`` reads the model's own tokenization of the text (cased;
the text's first word has no leading space, so ``Breast`` opening a query is not the ``Ġbreast`` of
the documents). ``words`` reads what a BM25 library indexes: bm25s's analyzer (lower-cased words of 2+
word characters, English stopwords dropped), each word then tokenized by the model with its leading
space, so the residual stays on vocabulary ids the learned terms share. ``stems`` also stems the words
(Snowball English, PyStemmer). How much each reading matters per collection: ``eval/README.md``.

Written here rather than with a BM25 library: bm25s and Lucene score a collection over their own word
tokenizers, and this residual is part of one text's vector, on the model's token ids, computed per
batch while tokenizing (so training and encoding see the same); the word analysis is bm25s's own.
``tests/test_lexical.py`` checks its scores against bm25s on the same token ids.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from safetensors.torch import load_file

from csplade._io import atomic_write
from csplade._progress import progress
from csplade.model.config import LEXICAL_ANALYZERS, LEXICAL_NAME

logger = logging.getLogger(__name__)

K1 = 1.2
B = 0.75
MAX_LENGTH = 32_768  # longer documents count as this long (more than any max length in use)


@functools.lru_cache(maxsize=1)
def _stemmer():
    try:
        import Stemmer
    except ImportError as exc:  # a dependency of csplade; only a broken install lacks it
        raise ImportError(
            "lexical_analyzer 'stems' needs PyStemmer: pip install PyStemmer"
        ) from exc
    return Stemmer.Stemmer("english")


def analyzed_rows(tokenizer, texts: Sequence[str], analyzer: str) -> list[list[int]]:
    """The token ids the residual reads for each of `texts` under `analyzer` (module docstring)."""
    if analyzer not in LEXICAL_ANALYZERS:
        raise ValueError(f"lexical_analyzer must be one of {LEXICAL_ANALYZERS}, got {analyzer!r}")
    texts = list(texts)
    if not texts:
        return []
    if analyzer != "tokens":
        import bm25s

        words = bm25s.tokenize(
            texts,
            stopwords="en",
            stemmer=_stemmer() if analyzer == "stems" else None,
            return_ids=False,
            show_progress=False,
        )
        # one leading space per word: the model's id of a word inside a text, not at its start
        texts = ["".join(" " + word for word in row if word) for row in words]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


@dataclass(frozen=True)
class LexicalWeights:
    """What the residual needs from the training documents: IDF per vocabulary id, their lengths."""

    idf: torch.Tensor  # (V,) float32
    lengths: torch.Tensor  # (MAX_LENGTH + 1,) int64: how many documents have each token count

    def __post_init__(self) -> None:
        if self.idf.ndim != 1:
            raise ValueError(
                f"idf must be one value per vocabulary id, got shape {tuple(self.idf.shape)}"
            )
        if self.lengths.ndim != 1 or int(self.lengths[1:].sum()) == 0:
            raise ValueError("lengths must count documents by token count, some with tokens")

    @property
    def n_docs(self) -> int:
        return int(self.lengths.sum())

    def avgdl(self, max_length: int) -> float:
        """The documents' mean token count when each is cut to its first `max_length`."""
        counts = self.lengths.double()
        sizes = torch.arange(len(counts), dtype=torch.float64).clamp(max=max_length)
        return float((counts * sizes).sum() / counts.sum())


def bm25_idf(df: np.ndarray, n_docs: int) -> np.ndarray:
    """Lucene's BM25 IDF ``log(1 + (N - df + 0.5) / (df + 0.5))``: > 0 for every id, largest at df 0."""
    return np.log1p((n_docs - df + 0.5) / (df + 0.5))


def token_rows(
    tokenizer, texts: Iterable[str], analyzer: str, batch_size: int = 1024, desc: str = "tokens"
) -> Iterator[list[int]]:
    """:func:`analyzed_rows` of every text, tokenized a batch at a time, with progress."""
    batch: list[str] = []
    for text in progress(texts, desc=desc, unit="doc"):
        batch.append(text)
        if len(batch) == batch_size:
            yield from analyzed_rows(tokenizer, batch, analyzer)
            batch.clear()
    if batch:
        yield from analyzed_rows(tokenizer, batch, analyzer)


def token_idf(token_rows: Iterable[list[int]], vocab: int) -> torch.Tensor:
    """BM25's IDF (V,) float32 of every vocabulary id over documents given as token ids (> 0)."""
    df = np.zeros(vocab, dtype=np.int64)
    n_docs = 0
    for row in token_rows:
        if row:
            df[np.unique(np.asarray(row, dtype=np.int64))] += 1
        n_docs += 1
    if n_docs == 0:
        raise ValueError("cannot compute IDF: no documents")
    logger.info("IDF over %d documents (%d distinct tokens seen)", n_docs, int((df > 0).sum()))
    return torch.from_numpy(bm25_idf(df, n_docs).astype(np.float32))


def statistics(token_rows: Iterable[list[int]], vocab: int) -> LexicalWeights:
    """IDF (over whole documents) and the length counts of documents given as token ids."""
    df = np.zeros(vocab, dtype=np.int64)
    lengths = np.zeros(MAX_LENGTH + 1, dtype=np.int64)
    for row in token_rows:
        ids = np.asarray(row, dtype=np.int64)
        lengths[min(len(ids), MAX_LENGTH)] += 1
        if len(ids):
            df[np.unique(ids)] += 1
    if lengths[1:].sum() == 0:
        raise ValueError("cannot compute lexical weights: no document has a token")
    idf = bm25_idf(df, int(lengths.sum()))
    return LexicalWeights(torch.from_numpy(idf.astype(np.float32)), torch.from_numpy(lengths))


def position_weights(
    input_ids: torch.Tensor,
    text_mask: torch.Tensor,
    kind: str,
    weights: LexicalWeights,
    scale: float,
    max_length: int,
) -> torch.Tensor:
    """(B, L) float32 weights that, scatter-added over `input_ids`, give each text's residual (B, V).

    Each of a text's `tf` occurrences of a token carries ``1 / tf`` of that token's residual. Documents
    are normalised by the training documents' mean length at `max_length` (their truncation).
    """
    out = torch.zeros(input_ids.shape, dtype=torch.float32)
    avgdl = weights.avgdl(max_length) if kind == "doc" else 1.0
    for i in range(input_ids.shape[0]):
        positions = text_mask[i].nonzero().flatten()
        if positions.numel() == 0:
            continue
        ids = input_ids[i, positions].cpu()
        _, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
        tf = counts[inverse].float()  # (n,) each position's token count in this text
        if kind == "query":
            per_token = weights.idf[ids]
        else:
            norm = K1 * (1.0 - B + B * len(ids) / avgdl)
            per_token = tf * (K1 + 1.0) / (tf + norm)
        out[i, positions] = scale * per_token / tf
    return out


def target_terms(
    row: Sequence[int], weights: LexicalWeights, kind: str, max_length: int, scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """A text's own terms at BM25's weights split between the two sides: (distinct ids, weights).

    A query's term gets ``scale * sqrt(IDF)``; a document's ``scale * sqrt(IDF) * tf (k1 + 1) / (tf +
    k1 (1 - b + b dl / avgdl))`` over its first `max_length` ids. The dot product of a query's and a
    document's is ``scale ** 2`` times BM25 on these ids, like the residual's, but with IDF on both
    sides: one model encodes both, so a term's weight says how much it matters wherever it occurs.
    The targets of the lexical adaptation (:mod:`csplade.training.adaptation`).
    """
    if kind not in ("query", "doc"):
        raise ValueError(f"kind must be 'query' or 'doc', got {kind!r}")
    row = list(row)[:max_length]
    ids, tf = np.unique(np.asarray(row, dtype=np.int64), return_counts=True)
    values = np.sqrt(weights.idf.numpy()[ids].astype(np.float64))
    if kind == "doc" and len(ids):
        norm = K1 * (1.0 - B + B * len(row) / weights.avgdl(max_length))
        values = values * tf * (K1 + 1.0) / (tf + norm)
    return ids, (scale * values).astype(np.float32)


def target_matrix(terms: Sequence[tuple[np.ndarray, np.ndarray]], vocab: int) -> torch.Tensor:
    """(B, V) float32 from each text's (ids, weights) of :func:`target_terms` (zero elsewhere)."""
    out = torch.zeros((len(terms), vocab), dtype=torch.float32)
    for i, (ids, values) in enumerate(terms):
        out[i, torch.from_numpy(ids)] = torch.from_numpy(values)
    return out


def target_csr(terms: Sequence[tuple[np.ndarray, np.ndarray]], vocab: int):
    """:func:`target_matrix` as a scipy CSR (B, V) float32, for whole collections."""
    import scipy.sparse as sp

    lengths = np.array([len(ids) for ids, _ in terms], dtype=np.int64)
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    ids = np.concatenate([ids for ids, _ in terms]) if terms else np.zeros(0, np.int64)
    values = np.concatenate([v for _, v in terms]) if terms else np.zeros(0, np.float32)
    return sp.csr_matrix((values.astype(np.float32), ids, indptr), shape=(len(terms), vocab))


def residual(input_ids: torch.Tensor, position: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, V) float32: the `position` (B, L) weights summed per vocabulary id."""
    out = torch.zeros((input_ids.shape[0], vocab), dtype=torch.float32, device=input_ids.device)
    return out.scatter_add_(1, input_ids, position.to(out.device, torch.float32))


def batch_residual(batch: dict, vocab: int, device: torch.device | None = None) -> torch.Tensor:
    """(B, V) float32: the residual of a batch from :meth:`SparseEncoder.tokenize`, on the ids it was
    computed over (``lexical_ids`` under a word analyzer, else the model's ``input_ids``)."""
    ids = batch.get("lexical_ids", batch["input_ids"])
    if device is not None:
        ids = ids.to(device)
    return residual(ids, batch["lexical"], vocab)


def learned_part(reps: torch.Tensor, batch: dict) -> torch.Tensor:
    """(B, V): `reps` of a tokenized `batch` (with its ``lexical`` weights) less their residual, i.e. the
    learned terms alone (the same as the encoder's output with ``lexical_residual`` off, up to float
    rounding, clamped at zero). Training regularizes these: the residual is fixed BM25 that no
    gradient changes, and counting its mass would press hardest on the learned terms of a text's own
    tokens."""
    own = batch_residual(batch, reps.shape[1], reps.device)
    return (reps - own).clamp_min(0.0)


def save(weights: LexicalWeights, folder: str | os.PathLike) -> None:
    """Write `weights` into `folder` (an encoder's, or an index's) atomically."""
    tensors = {
        "idf": weights.idf.detach().float().cpu().contiguous(),
        "lengths": weights.lengths.to(torch.int64).cpu().contiguous(),
    }
    with atomic_write(Path(folder) / LEXICAL_NAME, "wb") as handle:
        handle.write(safetensors.torch.save(tensors))


def load(folder: str | os.PathLike) -> LexicalWeights | None:
    file = Path(folder) / LEXICAL_NAME
    if not file.exists():
        return None
    data = load_file(file)
    missing = sorted({"idf", "lengths"} - set(data))
    if missing:
        raise ValueError(f"{file}: missing tensor(s) {missing}")
    return LexicalWeights(data["idf"].float(), data["lengths"])
