"""The SPLADE pooling: vocabulary projection + log(1 + ReLU) + pooling over tokens, memory-bounded.

    reps[b, v] = pool_l over pooled positions of log1p(relu(softcap(hidden[b, l] @ W[v] + bias[v])))

W (V, H) is the backbone's LM head (SPLADE, Formal et al. 2021; on causal LLMs, CSPLADE, arXiv
2504.10816). Two implementations of each pooling, with the same signature:

- `naive_max_pool` / `naive_sum_pool`: the plain PyTorch formulation, (B, L, V) tensors and autograd;
  the reference the fused versions are tested against.
- `fused_max_pool` / `fused_sum_pool`: chunked over the vocabulary with custom autograd Functions; peak
  extra memory is a few (B, L, C) / (B, C, H) chunks plus (B, V) results. (B, L, V) is never built.

Why the max head is cheap (the gradient flows to one position per (b, v)), what the sum head
recomputes, the precision rules and the known limits (ties, CUDA atomics, the weight gradient):
docs/head.md. Masks: `mask` (B, L) is bool or 0/1; 1 = the position is pooled (for `echo`, only the
second copy); a row with no pooled position gives a zero vector and zero gradients.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

POOLINGS = ("max", "sum")

# Default chunk: the largest C such that one (B, L, C) or (B, C, H) float32 temporary stays within
# this many bytes. 32 MiB gives C = 1820 at B=8, L=512, H=576 (71 chunks for V=128,256): big enough
# that each chunk is an efficient matmul, small next to the GBs of the (B, L, V) logits.
DEFAULT_CHUNK_BYTES = 32 * 1024**2


def splade_activation(logits: Tensor) -> Tensor:
    """log(1 + ReLU(x)): SPLADE's saturating, non-negative term weight."""
    return torch.log1p(torch.relu(logits))


def default_chunk_size(batch: int, length: int, hidden: int, vocab: int) -> int:
    """Vocab chunk size keeping one (B, L, C) or (B, C, H) fp32 temporary <= DEFAULT_CHUNK_BYTES."""
    per_column = 4 * max(batch, 1) * max(length, hidden, 1)
    return int(min(max(DEFAULT_CHUNK_BYTES // per_column, 1), max(vocab, 1)))


def _softcap(logits: Tensor, softcap: float | None) -> Tensor:
    if softcap is None:
        return logits
    return softcap * torch.tanh(logits / softcap)


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The matmul dtype: autocast's when it is on for this device, else the promoted input dtype."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for the activation / pooling / gradient sums; float64 kept for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def _check_inputs(
    hidden: Tensor,
    weight: Tensor,
    mask: Tensor,
    bias: Tensor | None,
    softcap: float | None,
    chunk_size: int | None = None,
) -> Tensor:
    """Validate shapes and options; return the mask as a bool tensor on hidden's device."""
    if hidden.dim() != 3:
        raise ValueError(
            f"hidden must be (B, L, H), got shape {tuple(hidden.shape)} ({hidden.dim()}-D)"
        )
    batch, length, width = hidden.shape
    if weight.dim() != 2 or weight.shape[1] != width:
        raise ValueError(
            f"weight must be (V, H) with H={width} to match hidden {tuple(hidden.shape)}, "
            f"got weight shape {tuple(weight.shape)}"
        )
    if tuple(mask.shape) != (batch, length):
        raise ValueError(
            f"mask must be (B, L)=({batch}, {length}) to match hidden {tuple(hidden.shape)}, "
            f"got mask shape {tuple(mask.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"bias must be (V,)=({weight.shape[0]},) to match weight {tuple(weight.shape)}, "
            f"got bias shape {tuple(bias.shape)}"
        )
    if not hidden.is_floating_point() or not weight.is_floating_point():
        raise ValueError(
            f"hidden and weight must be floating point, got {hidden.dtype} and {weight.dtype}"
        )
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be a positive float or None, got {softcap!r}")
    _check_chunk_size(chunk_size)
    if mask.dtype != torch.bool:
        bad = (mask != 0) & (mask != 1)
        if bool(bad.any()):
            index = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"mask must be bool or 0/1, got value {mask[index].item()!r} at index {index}"
            )
        mask = mask != 0
    return mask.to(hidden.device)


# ----------------------------------------------------------------------------------------------------
# Naive twins: the plain formulation, (B, L, V) tensors, autograd does the rest.
# ----------------------------------------------------------------------------------------------------


def _naive_activated(hidden, weight, mask, bias, softcap) -> Tensor:
    """(B, L, V) activations, zero at padding."""
    mask = _check_inputs(hidden, weight, mask, bias, softcap)
    dtype = _compute_dtype(hidden, weight)
    bias = None if bias is None else bias.to(dtype)
    logits = F.linear(hidden.to(dtype), weight.to(dtype), bias)
    logits = logits.to(_accumulate_dtype(dtype))  # (B, L, V)
    activated = splade_activation(_softcap(logits, softcap))  # (B, L, V), >= 0
    # Padding -> 0: never above a real position's activation (>= 0); an all-padding row gives zeros.
    # A float multiply, as SPLADE code usually writes it (assumes finite hidden states at padding).
    return activated * mask.unsqueeze(-1).to(activated.dtype)


def naive_max_pool(
    hidden: Tensor,
    weight: Tensor,
    mask: Tensor,
    bias: Tensor | None = None,
    *,
    softcap: float | None = None,
) -> Tensor:
    """Reference max-pooled SPLADE head: builds the (B, L, V) activations. Returns (B, V) float32."""
    activated = _naive_activated(hidden, weight, mask, bias, softcap)
    return activated.amax(dim=1)  # (B, V)


def naive_sum_pool(
    hidden: Tensor,
    weight: Tensor,
    mask: Tensor,
    bias: Tensor | None = None,
    *,
    softcap: float | None = None,
) -> Tensor:
    """Reference sum-pooled SPLADE head: builds the (B, L, V) activations. Returns (B, V) float32."""
    activated = _naive_activated(hidden, weight, mask, bias, softcap)
    return activated.sum(dim=1)  # (B, V)


# ----------------------------------------------------------------------------------------------------
# Fused heads: chunked over the vocabulary, custom autograd.
# ----------------------------------------------------------------------------------------------------


def _chunk_logits(hidden_c: Tensor, weight: Tensor, bias: Tensor | None, start: int, stop: int):
    """(B, L, C) logits of vocab rows [start, stop) in hidden_c's dtype (the compute dtype)."""
    weight_c = weight[start:stop].to(hidden_c.dtype)  # (C, H)
    bias_c = None if bias is None else bias[start:stop].to(hidden_c.dtype)  # (C,)
    return F.linear(hidden_c, weight_c, bias_c)  # (B, L, C)


def _check_weight_kept(ctx, weight: Tensor) -> None:
    """The weight saved for backward still has its forward shape (never a silent zero gradient).

    A sharding engine that released the weight between forward and backward (ZeRO-3 partitioning
    outside the module whose hooks gather it) leaves an empty tensor: the chunk loops would run
    over zero rows and return zero gradients without a word.
    """
    if weight.shape != ctx.weight_shape:
        raise RuntimeError(
            f"the SPLADE head's weight was {tuple(ctx.weight_shape)} in forward and is "
            f"{tuple(weight.shape)} in backward: it was released (e.g. re-partitioned by ZeRO-3) "
            "before the backward; run the head inside a module whose hooks gather the weight for "
            "backward (SparseEncoder does: csplade.model.head.sharded.HeadCall)"
        )


def _zero_padding(hidden: Tensor, mask: Tensor, dtype: torch.dtype) -> Tensor:
    """hidden in the compute dtype with padded rows set to 0 (B, L, H).

    Padded hidden states may be non-finite (e.g. NaN from a fully masked attention row); zeroing
    them keeps every padded logit finite, so the -inf / 0 masking below cannot turn into NaN.
    """
    return torch.where(mask.unsqueeze(-1), hidden.to(dtype), 0.0)


class _MaskedMaxLogits(torch.autograd.Function):
    """max_l over pooled positions of hidden @ W.T + bias, chunked over V; gradient to the argmax.

    Returns the (B, V) float32 maxima of the raw logits (0 for rows with no pooled position); the
    activation is applied outside, on (B, V), by ordinary autograd.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, mask, chunk_size: int, dtype: torch.dtype):
        batch, length, _ = hidden.shape
        vocab = weight.shape[0]
        hidden_t = _zero_padding(hidden, mask, dtype).transpose(1, 2)  # (B, H, L)
        # 0 at pooled positions, -inf at padding: added to the logits, padding can never win.
        padding = torch.zeros(batch, 1, length, dtype=dtype, device=hidden.device)
        padding.masked_fill_(~mask.unsqueeze(1), float("-inf"))  # (B, 1, L)
        acc = _accumulate_dtype(dtype)
        maxima = torch.empty(batch, vocab, dtype=acc, device=hidden.device)  # (B, V)
        argmax = torch.empty(batch, vocab, dtype=torch.long, device=hidden.device)  # (B, V)
        for start in range(0, vocab, chunk_size):
            stop = min(start + chunk_size, vocab)
            weight_c = weight[start:stop].to(dtype)  # (C, H)
            # (B, C, L) layout: the reduction over L runs along contiguous memory (faster on CPU).
            logits = torch.matmul(weight_c, hidden_t).add_(padding)  # (B, C, L)
            # torch.max returns the first index among equal maxima: ties go to the earliest position.
            values, indices = logits.max(dim=2)  # (B, C), exact in bf16/fp16
            maxima[:, start:stop] = values
            argmax[:, start:stop] = indices
            del logits, values, indices  # free this chunk before the next one is computed
        if bias is not None:
            # The bias does not depend on the position, so it moves out of the max (exact in fp32).
            maxima += bias.to(acc)
        empty = ~mask.any(dim=1)  # (B,) rows with no pooled position
        maxima.masked_fill_(empty.unsqueeze(-1), 0.0)
        ctx.save_for_backward(hidden, weight, bias, mask, argmax, empty)
        ctx.chunk_size, ctx.dtype, ctx.weight_shape = chunk_size, dtype, weight.shape
        return maxima

    @staticmethod
    def backward(ctx, grad_maxima):
        hidden, weight, bias, mask, argmax, empty = ctx.saved_tensors
        _check_weight_kept(ctx, weight)
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        batch, length, width = hidden.shape
        vocab = weight.shape[0]
        acc = grad_maxima.dtype
        grad = grad_maxima.masked_fill(empty.unsqueeze(-1), 0.0)  # (B, V)
        # Row of hidden.view(B*L, H) that won the max for each (b, v).
        rows = argmax + torch.arange(batch, device=argmax.device).unsqueeze(-1) * length  # (B, V)
        grad_hidden = grad_weight = grad_bias = None
        if need_weight:
            hidden_rows = _zero_padding(hidden, mask, ctx.dtype).view(batch * length, width)
        if need_hidden:
            grad_hidden = torch.zeros(batch * length, width, dtype=acc, device=hidden.device)
        if need_weight:
            grad_weight = torch.empty_like(weight)  # (V, H), each chunk written once
        if need_hidden or need_weight:
            for start in range(0, vocab, ctx.chunk_size):
                stop = min(start + ctx.chunk_size, vocab)
                grad_c = grad[:, start:stop]  # (B, C)
                rows_c = rows[:, start:stop].reshape(-1)  # (B*C,)
                if need_hidden:
                    weight_c = weight[start:stop].to(acc)  # (C, H)
                    contrib = grad_c.unsqueeze(-1) * weight_c  # (B, C, H)
                    grad_hidden.index_add_(0, rows_c, contrib.reshape(-1, width))
                    del contrib
                if need_weight:
                    winners = hidden_rows.index_select(0, rows_c).to(acc)  # (B*C, H)
                    winners = winners.view(batch, stop - start, width)  # (B, C, H)
                    # sum_b grad[b, c] * winners[b, c, :] as a batched (1, B) @ (B, H) per column c.
                    grad_w_c = torch.bmm(grad_c.t().unsqueeze(1), winners.transpose(0, 1))
                    grad_weight[start:stop] = grad_w_c.squeeze(1)  # (C, H)
                    del winners, grad_w_c
        if need_hidden:
            grad_hidden = grad_hidden.view(batch, length, width).to(hidden.dtype)
        if need_bias:
            grad_bias = grad.sum(dim=0).to(bias.dtype)  # (V,)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def _activate_(logits: Tensor, softcap: float | None) -> Tensor:
    """log1p(relu(softcap(x))) computed in place on a fresh logits chunk (no extra (B, L, C))."""
    if softcap is not None:
        logits.div_(softcap).tanh_().mul_(softcap)
    return logits.relu_().log1p_()


def _logit_grad_(logits: Tensor, softcap: float | None, grad: Tensor, pooled: Tensor) -> Tensor:
    """grad * d log1p(relu(softcap(x))) / dx, zero at padding; overwrites the fresh logits chunk.

    logits (B, L, C), grad (B, 1, C), pooled (B, L, 1) 0/1 float. Without softcap the derivative is
    1 / (1 + x) where x > 0, else 0; with softcap c and t = tanh(x / c) it is (1 - t^2) / (1 + c t)
    where t > 0, else 0. The "where" is a multiplication by sign(relu(.)) * pooled: on CPU, boolean
    masks (masked_fill, where) are several times slower than float arithmetic on these chunks.
    """
    if softcap is None:
        positive = logits.clamp_(min=0)
        active = torch.sign(positive).mul_(pooled)  # (B, L, C) 1 where x > 0 and pooled, else 0
        out = torch.div(grad, positive.add_(1), out=positive)
    else:
        tanh = logits.div_(softcap).tanh_()
        active = torch.clamp(tanh, min=0).sign_().mul_(pooled)  # (B, L, C)
        slope = torch.addcmul(grad, grad * tanh, tanh, value=-1)  # grad * (1 - t^2)
        out = torch.div(slope, tanh.mul_(softcap).add_(1), out=tanh)
    return out.mul_(active)


class _MaskedSumActivated(torch.autograd.Function):
    """sum_l over pooled positions of log1p(relu(softcap(hidden @ W.T + bias))), chunked over V.

    Backward recomputes each chunk's logits (nothing of size (B, L, V) is kept between passes).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, mask, chunk_size: int, dtype, softcap):
        batch, _, _ = hidden.shape
        vocab = weight.shape[0]
        hidden_c = _zero_padding(hidden, mask, dtype)  # (B, L, H)
        acc = _accumulate_dtype(dtype)
        pooled = mask.unsqueeze(-1).to(acc)  # (B, L, 1)
        out = torch.empty(batch, vocab, dtype=acc, device=hidden.device)  # (B, V)
        for start in range(0, vocab, chunk_size):
            stop = min(start + chunk_size, vocab)
            logits = _chunk_logits(hidden_c, weight, bias, start, stop).to(acc)  # (B, L, C)
            activated = _activate_(logits, softcap)  # (B, L, C), same storage as logits
            # multiply by the 0/1 mask (faster than masked_fill on CPU): padded logits are finite
            out[:, start:stop] = activated.mul_(pooled).sum(dim=1)
            del logits, activated
        ctx.save_for_backward(hidden, weight, bias, mask)
        ctx.chunk_size, ctx.dtype, ctx.softcap = chunk_size, dtype, softcap
        ctx.weight_shape = weight.shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, mask = ctx.saved_tensors
        _check_weight_kept(ctx, weight)
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        batch, length, width = hidden.shape
        vocab = weight.shape[0]
        dtype = ctx.dtype
        hidden_c = _zero_padding(hidden, mask, dtype)  # (B, L, H)
        hidden_rows = hidden_c.view(batch * length, width)  # (B*L, H)
        acc = grad_out.dtype
        pooled = mask.unsqueeze(-1).to(acc)  # (B, L, 1)

        grad_hidden = grad_weight = grad_bias = None
        if need_hidden:
            grad_hidden = torch.zeros(batch, length, width, dtype=acc, device=hidden.device)
        if need_weight:
            grad_weight = torch.empty_like(weight)  # (V, H)
        if need_bias:
            grad_bias = torch.empty(vocab, dtype=acc, device=hidden.device)
        if not (need_hidden or need_weight or need_bias):
            return None, None, None, None, None, None, None
        for start in range(0, vocab, ctx.chunk_size):
            stop = min(start + ctx.chunk_size, vocab)
            logits = _chunk_logits(hidden_c, weight, bias, start, stop).to(acc)  # (B, L, C)
            grad_c = grad_out[:, start:stop].unsqueeze(1)  # (B, 1, C)
            dlogits = _logit_grad_(logits, ctx.softcap, grad_c, pooled)  # (B, L, C), in place
            if need_bias:
                grad_bias[start:stop] = dlogits.sum(dim=(0, 1))
            dlogits_c = dlogits.to(dtype)
            if need_hidden:
                weight_c = weight[start:stop].to(dtype)  # (C, H)
                grad_hidden += torch.matmul(dlogits_c, weight_c)  # (B, L, H)
            if need_weight:
                dlogits_rows = dlogits_c.reshape(batch * length, stop - start)  # (B*L, C)
                grad_weight[start:stop] = dlogits_rows.t() @ hidden_rows  # (C, H)
            del logits, dlogits, dlogits_c
        if need_hidden:
            grad_hidden = grad_hidden.to(hidden.dtype)
        if need_bias:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def _resolve_chunk(hidden: Tensor, weight: Tensor, chunk_size: int | None) -> int:
    batch, length, width = hidden.shape
    vocab = weight.shape[0]
    chunk = default_chunk_size(batch, length, width, vocab) if chunk_size is None else chunk_size
    chunk = min(chunk, max(vocab, 1))
    logger.debug("SPLADE head: V=%d in %d chunk(s) of %d", vocab, -(-vocab // chunk), chunk)
    return chunk


def _no_autocast(hidden: Tensor) -> torch.autocast:
    # The Functions pick the compute dtype themselves; autocast inside them would also touch backward.
    return torch.autocast(hidden.device.type, enabled=False)


def fused_max_pool(
    hidden: Tensor,
    weight: Tensor,
    mask: Tensor,
    bias: Tensor | None = None,
    *,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Max-pooled SPLADE head without (B, L, V) tensors. Returns (B, V) float32.

    chunk_size: vocab rows per chunk; None -> `default_chunk_size` (one fp32 temporary <= 32 MiB).
    """
    # Monotone activation on the (B, V) maxima == max of the activated (B, L, V) values.
    maxima = max_pooled_logits(
        hidden, weight, mask, bias, softcap=softcap, chunk_size=chunk_size
    )  # (B, V)
    return splade_activation(maxima)


def max_pooled_logits(
    hidden: Tensor,
    weight: Tensor,
    mask: Tensor,
    bias: Tensor | None = None,
    *,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """The max over pooled positions of the (soft-capped) logits, (B, V) float32, with gradient.

    What the max head activates: ``fused_max_pool(...) == splade_activation(max_pooled_logits(...))``.
    For objectives that must reach terms whose activation is zero (a logit below zero has no gradient
    through log(1 + ReLU)): the lexical adaptation pulls a text's own terms up from there.
    """
    mask = _check_inputs(hidden, weight, mask, bias, softcap, chunk_size)
    dtype = _compute_dtype(hidden, weight)
    chunk = _resolve_chunk(hidden, weight, chunk_size)
    with _no_autocast(hidden):
        maxima = _MaskedMaxLogits.apply(hidden, weight, bias, mask, chunk, dtype)  # (B, V)
    return _softcap(maxima, softcap)


def fused_sum_pool(
    hidden: Tensor,
    weight: Tensor,
    mask: Tensor,
    bias: Tensor | None = None,
    *,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Sum-pooled SPLADE head without (B, L, V) tensors (recomputes chunks in backward)."""
    mask = _check_inputs(hidden, weight, mask, bias, softcap, chunk_size)
    dtype = _compute_dtype(hidden, weight)
    chunk = _resolve_chunk(hidden, weight, chunk_size)
    with _no_autocast(hidden):
        return _MaskedSumActivated.apply(hidden, weight, bias, mask, chunk, dtype, softcap)


_POOLERS: dict[tuple[str, bool], Callable[..., Tensor]] = {
    ("max", True): fused_max_pool,
    ("max", False): naive_max_pool,
    ("sum", True): fused_sum_pool,
    ("sum", False): naive_sum_pool,
}


def sparse_pool(
    hidden: Tensor,
    weight: Tensor,
    mask: Tensor,
    bias: Tensor | None = None,
    *,
    pooling: str = "max",
    fused: bool = True,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """SPLADE vectors (B, V) float32 from hidden states (B, L, H) and an LM head (V, H) [+ bias (V,)].

    pooling: "max" (SPLADE's default) or "sum". fused=False selects the naive (B, L, V) twin
    (chunk_size is then only validated). softcap: optional Gemma-2-style c * tanh(logits / c) before the
    activation. mask (B, L): 1 / True = pooled position.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; allowed values: {', '.join(POOLINGS)}")
    _check_chunk_size(chunk_size)
    pool = _POOLERS[(pooling, bool(fused))]
    if fused:
        return pool(hidden, weight, mask, bias, softcap=softcap, chunk_size=chunk_size)
    return pool(hidden, weight, mask, bias, softcap=softcap)
