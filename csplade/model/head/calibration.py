"""The per-term head bias, calibrated to a document frequency.

A causal LM's head is trained for a softmax, which ignores where zero lies. Some backbones put most
logits below zero (Llama-3: the "dying ReLU" of CSPLADE, arXiv 2504.10816), others above (SmolLM2-135M:
82% of its logits are positive, so every SPLADE vector is the whole vocabulary and FLOPS starts from an
absurd point). The bias b_v = -q_v, with q_v the (1 - doc_fraction) quantile over the texts of term
v's max-pooled logit, makes every term fire in that fraction of texts: an IDF-like prior (frequent,
generic terms are shifted down most). It is a trainable parameter of the encoder, like the MLM decoder
bias of classic SPLADE, and is saved with it.

The functions take the encoder as their first argument (`SparseEncoder` exposes them as methods).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from csplade._progress import progress
from csplade.model.head.weights import head_params
from csplade.model.inputs import check_texts

logger = logging.getLogger(__name__)

_VOCAB_STEP = 8192  # vocabulary rows per logits chunk


@torch.no_grad()
def raw_max_logits(
    encoder: Any,
    texts: Sequence[str],
    kind: str = "doc",
    batch_size: int = 16,
    show_progress: bool = True,
) -> torch.Tensor:
    """Max over each text's pooled positions of the LM-head logits, before any bias (n, V) float32.

    Chunked over the vocabulary like the fused head.
    """
    texts = check_texts(texts)
    params = head_params(encoder.base_model.get_output_embeddings())
    if params is None:
        raise ValueError("head-bias calibration needs a plain (unquantized) LM head")
    weight, bias = params
    vocab = weight.shape[0]
    rows = []
    was_training = encoder.training
    encoder.eval()
    try:
        # 512 documents and 512 queries of SmolLM2-135M take about 2 minutes on 2 CPU cores
        steps = range(0, len(texts), batch_size)
        bar = progress(steps, desc=f"head-bias calibration ({kind})", unit="batch",
                       disable=not show_progress)  # fmt: skip
        for start in bar:
            batch = encoder.tokenize(texts[start : start + batch_size], kind=kind)
            batch.pop("n_truncated")
            batch = {k: v.to(encoder.device) for k, v in batch.items()}
            hidden, _ = encoder._hidden_states(batch["input_ids"], batch["attention_mask"])
            mask = batch["pool_mask"] & batch["attention_mask"].bool()  # (B, L)
            mask = mask.unsqueeze(-1)  # (B, L, 1)
            row = torch.empty(hidden.shape[0], vocab)
            for v0 in range(0, vocab, _VOCAB_STEP):
                logits = (hidden @ weight[v0 : v0 + _VOCAB_STEP].T).float()  # (B, L, C)
                if bias is not None:
                    logits = logits + bias[v0 : v0 + _VOCAB_STEP].float()
                logits = logits.masked_fill(~mask, float("-inf"))
                row[:, v0 : v0 + _VOCAB_STEP] = logits.amax(dim=1).cpu()
            rows.append(row)
    finally:
        encoder.train(was_training)
    return torch.cat(rows) if rows else torch.empty(0, vocab)


def _quantile(
    encoder: Any,
    texts: Sequence[str],
    kind: str,
    fraction: float,
    batch_size: int,
    show_progress: bool = True,
) -> tuple[torch.Tensor, int]:
    """Per term, the (1 - fraction) quantile of its max-pooled logit over `texts`; texts used."""
    raw = raw_max_logits(encoder, texts, kind, batch_size, show_progress)  # (n, V)
    raw = raw[torch.isfinite(raw).all(dim=1)]
    if raw.shape[0] < 2:
        raise ValueError(f"head-bias calibration needs at least 2 non-empty {kind} texts")
    k = max(1, min(raw.shape[0], math.ceil((1 - fraction) * raw.shape[0])))
    return raw.kthvalue(k, dim=0).values, raw.shape[0]  # (V,)


def calibrate_head_bias(
    encoder: Any,
    texts: Sequence[str],
    doc_fraction: float = 0.01,
    batch_size: int = 16,
    queries: Sequence[str] | None = None,
    show_progress: bool = True,
) -> torch.Tensor:
    """Set a per-term bias so that each term is active in about `doc_fraction` of `texts`.

    With `queries` (short texts, encoded as queries), each term's threshold is the higher of its
    document and its query quantile: it fires in at most ~`doc_fraction` of either. Short texts
    sit much closer to a threshold set on documents, which is where the first contrastive steps
    blow query vectors up (measurements: docs/experiments.md, "The head bias at training lengths").
    A ``lexical_docs`` encoder's documents use no head: it is calibrated on `queries` alone.
    Texts with no pooled token are ignored. Returns the bias.
    """
    if not 0 < doc_fraction < 1:
        raise ValueError(f"doc_fraction must be in (0, 1), got {doc_fraction}")
    if getattr(encoder.config, "lexical_docs", False):  # documents use no head: queries alone
        if queries is None:
            raise ValueError(
                "a lexical_docs encoder's documents use no head: calibrate on queries (queries=...)"
            )
        quantile, n_queries = _quantile(
            encoder, queries, "query", doc_fraction, batch_size, show_progress
        )
        what = f"{n_queries} queries (its documents use no head)"
    else:
        quantile, n_docs = _quantile(encoder, texts, "doc", doc_fraction, batch_size, show_progress)
        what = f"{n_docs} texts"
        if queries is not None:
            query_quantile, n_queries = _quantile(
                encoder, queries, "query", doc_fraction, batch_size, show_progress
            )
            quantile = torch.maximum(quantile, query_quantile)
            what = f"{n_docs} texts and {n_queries} queries"
    if encoder.head_bias is not None:
        logger.info("replacing the existing head bias")
    encoder.head_bias = nn.Parameter((-quantile).float().to(encoder.device))
    encoder._fingerprint = None
    logger.info(
        "calibrated the head bias on %s: each term active in ~%.2f%% of them at most",
        what,
        100 * doc_fraction,
    )
    return encoder.head_bias.detach()
