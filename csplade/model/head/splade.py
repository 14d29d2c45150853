"""The SPLADE head of an encoder: hidden states (B, L, H) -> one activated, pooled (B, V) vector per text.

    logits = (W h + b + head_bias) * logit_scale -> softcap -> log(1 + ReLU) -> max | sum over pooled l

Two paths, chosen at each call from the backbone's output embeddings:

- on the weight: the LM head is a plain linear map (or LoRA on one, folded in;
  :mod:`csplade.model.head.weights`), pooled by the fused chunked head or its naive twin
  (:mod:`csplade.model.head.pooling`), inside the encoder's :class:`~csplade.model.head.sharded.HeadCall`
  so that a ZeRO-3 engine gathers the weight;
- the module call: anything else (a quantized head, :mod:`csplade.model.head.quantized`) is called as a
  module: the (B, L, V) float32 logits, chunked over positions when no gradient is needed. Under
  autograd it warns once per reason.

``head_bias`` is the encoder's calibrated per-term bias (:mod:`csplade.model.head.calibration`);
``calls`` counts the path taken (fused | naive | module), which training reports as ``head_calls``.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from typing import Any

import torch
from torch import nn

from csplade.model.head.pooling import max_pooled_logits, sparse_pool, splade_activation
from csplade.model.head.sharded import HeadCall
from csplade.model.head.weights import (
    head_parameters,
    head_params,
    is_partitioned,
    naive_reason,
    softcap_of,
    vocab_size,
)

logger = logging.getLogger(__name__)

_WARNED: set[str | None] = set()  # reasons the module fallback was already logged for


def splade_head(
    hidden: torch.Tensor,
    pool_mask: torch.Tensor,
    out_emb: nn.Module,
    base_model: nn.Module,
    *,
    head_bias: torch.Tensor | None,
    config: Any,
    head_call: HeadCall,
    calls: Counter[str],
    raw: bool = False,
) -> torch.Tensor:
    """(B, V) float32 SPLADE vectors of `hidden` (B, L, H) pooled over `pool_mask` (B, L); with
    `raw`, the max-pooled logits before log(1 + ReLU) (:func:`~csplade.model.head.pooling.max_pooled_logits`:
    max pooling and the weight path only).

    `out_emb` is `base_model`'s output embeddings (the transformers model, inside any peft wrapper);
    `config` gives ``logit_scale``, ``pooling``, ``fused_head`` and ``head_chunk_size`` (an
    encoder's :class:`~csplade.model.config.SparseEncoderConfig`).
    """
    softcap = softcap_of(base_model)
    params = head_parameters(out_emb)
    if params is None:
        if raw:
            raise ValueError("pooled logits need a plain LM-head weight (not a quantized head)")
        vocab = vocab_size(base_model)
        _count(calls, "module", naive_reason(out_emb), vocab)
        return module_head(
            out_emb,
            hidden,
            pool_mask,
            head_bias=head_bias,
            logit_scale=config.logit_scale,
            softcap=softcap,
            pooling=config.pooling,
            vocab=vocab,
        )
    if any(is_partitioned(p) for p in params):  # ZeRO-3: head_call's hooks gather them
        head_call.register(params)
    _count(calls, "fused" if config.fused_head or raw else "naive")
    # the bias and settings ride in the function, not as module inputs (the engine's hooks see the
    # tensors the head reads from the backbone, as before)
    run = functools.partial(_on_weight, head_bias=head_bias, config=config, raw=raw)
    return head_call(run, hidden, pool_mask, out_emb, softcap)


def _count(calls: Counter[str], path: str, reason: str | None = None, vocab: int = 0) -> None:
    """Count which head ran; the (B, L, V) module fallback under autograd warns once per reason."""
    calls[path] += 1
    if path == "module" and torch.is_grad_enabled():
        warn_module_head(reason, vocab)


def _on_weight(
    hidden, pool_mask, out_emb, softcap, *, head_bias, config, raw=False
) -> torch.Tensor:
    """The head on the output embeddings' weight (inside the head call, where it is gathered)."""
    weight, bias = head_params(out_emb)
    if head_bias is not None:
        head_bias = head_bias.to(weight.dtype if weight.is_floating_point() else torch.float32)
        bias = head_bias if bias is None else bias + head_bias
    scale = config.logit_scale
    if scale != 1.0:  # scale * (W h + b) == W (scale * h) + scale * b
        hidden = hidden * scale
        bias = None if bias is None else bias * scale
    if raw:
        chunk = config.head_chunk_size
        return max_pooled_logits(hidden, weight, pool_mask, bias, softcap=softcap, chunk_size=chunk)
    return sparse_pool(
        hidden,
        weight,
        pool_mask,
        bias,
        pooling=config.pooling,
        fused=config.fused_head,
        softcap=softcap,
        chunk_size=config.head_chunk_size,
    )


def bias_copy(head_bias: torch.Tensor | None, head_call: HeadCall) -> torch.Tensor | None:
    """A float32 copy (V,) of the head bias made in a module call (gradient flows to it), or None.

    For code that uses the bias outside the encoder's forward (the adaptation loss): under ZeRO-3 the
    parameter itself is a partition there; `head_call` gathers it for the copy.
    """
    if head_bias is None:
        return None
    if is_partitioned(head_bias):
        head_call.register([head_bias])
    return head_call(lambda: head_bias.float().clone())


def warn_module_head(reason: str | None, vocab: int) -> None:
    """Warn, once per reason, that training calls the LM-head module: the (B, L, V) naive head."""
    if reason in _WARNED:
        return
    _WARNED.add(reason)
    logger.warning(
        "SPLADE head: %s, so the fused head cannot read it; calling the module instead, which "
        "builds the (B, L, V) float32 logits of every text in memory (V=%d)",
        reason,
        vocab,
    )


def module_head(
    out_emb: nn.Module,
    hidden: torch.Tensor,
    pool_mask: torch.Tensor,
    *,
    head_bias: torch.Tensor | None,
    logit_scale: float,
    softcap: float | None,
    pooling: str,
    vocab: int,
) -> torch.Tensor:
    """The SPLADE head through a call of the output embeddings (B, V) (e.g. a quantized LM head).

    Under autograd this is the naive head: the (B, L, V) float32 logits of the whole batch. Without
    a gradient the positions go in chunks whose float32 logits stay near 64 MiB.
    """

    def logits_of(h):
        logits = out_emb(h).float()
        if head_bias is not None:
            logits = logits + head_bias
        logits = logits * logit_scale
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        return logits

    mask = pool_mask.unsqueeze(-1)  # (B, L, 1)
    if torch.is_grad_enabled():
        act = splade_activation(logits_of(hidden)) * mask  # (B, L, V)
        return act.amax(dim=1) if pooling == "max" else act.sum(dim=1)
    result = None
    # positions per chunk so that one float32 (B, step, V) logits chunk stays near 64 MiB
    step = max(1, (64 * 2**20) // (4 * hidden.shape[0] * max(1, vocab)))
    for start in range(0, hidden.shape[1], step):
        act = (
            splade_activation(logits_of(hidden[:, start : start + step]))
            * mask[:, start : start + step]
        )
        part = act.amax(dim=1) if pooling == "max" else act.sum(dim=1)
        if result is None:
            result = part
        elif pooling == "max":
            result = torch.maximum(result, part)
        else:
            result = result + part
    return result
