"""Inference-free queries (``doc_only``, arXiv 2411.04403): no forward pass on the query side.

A query's vector holds, for each distinct token of the query, a stored per-token weight: the training
documents' IDF by default (``SparseEncoder.document_idf``), 1 where the encoder has none. Documents are
encoded by the model as usual.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
import torch

logger = logging.getLogger(__name__)


def query_vectors(
    input_ids: torch.Tensor, token_mask: torch.Tensor, weights: torch.Tensor | None, vocab: int
) -> torch.Tensor:
    """Query vectors (B, V) of a tokenized batch: the weight of each distinct query token.

    `token_mask` (B, L) marks the query's own tokens (the ``pool_mask`` of ``SparseEncoder.tokenize``).
    """
    if weights is None:
        weights = torch.ones(vocab)
    weights = weights.to(input_ids.device)
    present = torch.zeros((input_ids.shape[0], vocab), device=input_ids.device)  # (B, V)
    present.scatter_reduce_(1, input_ids, token_mask.to(present.dtype), reduce="amax")
    return present * weights  # (B, V)


def encode_queries(
    tokenizer, texts: Sequence[str], weights: torch.Tensor | None, vocab: int, max_length: int
) -> sp.csr_matrix:
    """Query vectors of `texts` as a float32 CSR matrix (n, V), each cut at `max_length` tokens."""
    weights = np.ones(vocab, np.float32) if weights is None else weights.cpu().numpy()
    rows, cols, vals = [], [], []
    n_truncated = 0
    content = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    for r, ids in enumerate(content):
        if len(ids) > max_length:
            n_truncated += 1
            ids = ids[:max_length]
        uniq = np.unique(np.asarray(ids, dtype=np.int64))
        uniq = uniq[weights[uniq] != 0] if uniq.size else uniq
        rows.extend([r] * len(uniq))
        cols.extend(uniq.tolist())
        vals.extend(weights[uniq].tolist())
    if n_truncated:
        logger.info("%d of %d queries truncated to %d tokens", n_truncated, len(texts), max_length)
    return sp.csr_matrix(
        (np.asarray(vals, np.float32), (np.asarray(rows), np.asarray(cols))),
        shape=(len(texts), vocab),
        dtype=np.float32,
    )
