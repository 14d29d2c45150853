"""A differentiable all-gather whose backward sums every rank's gradient for each slice.

Cross-device negatives and the global-batch regularizers read every rank's rows through
:func:`all_gather_with_grad`. With DDP's (DeepSpeed's, FSDP's) gradient *average*, that sum makes the
update the gradient of the mean of the per-rank losses, exactly: ``docs/losses.md`` has the derivation,
and ``tests/test_losses_distributed.py`` checks it against one process.

Known limits: every rank must call it the same number of times in the same order (a collective); the
backward all-reduces the whole gathered gradient (tested on gloo; a ``reduce_scatter`` would move half
the bytes on NCCL); the math assumes gradient averaging, so not ``torch.nn.DataParallel`` (which sums).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import Tensor

logger = logging.getLogger(__name__)


def is_distributed(group=None) -> bool:
    """True when torch.distributed is initialised with more than one rank in ``group``."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _gathered_shapes(tensor: Tensor, group=None) -> list[tuple[int, ...]]:
    """The shape of ``tensor`` on every rank, in rank order (one tiny all_gather)."""
    shape = torch.tensor(list(tensor.shape), dtype=torch.long, device=tensor.device)
    shapes = [torch.empty_like(shape) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shapes, shape, group=group)
    return [tuple(int(x) for x in s.tolist()) for s in shapes]


class _AllGatherSumGrad(torch.autograd.Function):
    """Concatenate one tensor per rank along dim 0; backward sums every rank's gradient per slice.

    Ranks may hold different numbers of rows (padded for the collective, trimmed after).
    """

    @staticmethod
    def forward(ctx, tensor: Tensor, group, rows: tuple[int, ...]) -> Tensor:
        rank = dist.get_rank(group)
        tensor = tensor.contiguous()
        longest = max(rows)
        padded = tensor
        if tensor.shape[0] < longest:
            pad = tensor.new_zeros((longest - tensor.shape[0], *tensor.shape[1:]))
            padded = torch.cat([tensor, pad])
        buffers = [torch.empty_like(padded) for _ in rows]
        dist.all_gather(buffers, padded, group=group)
        ctx.group = group
        ctx.start = sum(rows[:rank])
        ctx.stop = ctx.start + rows[rank]
        return torch.cat([buf[:n] for buf, n in zip(buffers, rows, strict=True)])

    @staticmethod
    def backward(ctx, grad: Tensor):
        # Every rank holds a gradient for the whole gathered tensor; the owner of each slice needs
        # the sum over ranks. all_reduce then slice (reduce_scatter would be cheaper on NCCL but is
        # not available on every backend, and would need equal slices).
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.start : ctx.stop], None, None


def gather_rows(tensor: Tensor, group=None) -> tuple[Tensor, int]:
    """Differentiable all-gather along dim 0; also returns where this rank's rows start."""
    if tensor.dim() == 0:
        raise ValueError(
            "all_gather_with_grad needs a tensor with at least one dimension, got a scalar"
        )
    if not is_distributed(group):
        return tensor, 0
    shapes = _gathered_shapes(tensor, group)
    trailing = {s[1:] for s in shapes}
    if len(trailing) != 1:
        raise ValueError(
            f"all_gather_with_grad: ranks hold tensors whose shapes differ beyond dim 0: {shapes}"
        )
    rows = tuple(s[0] for s in shapes)
    if len(set(rows)) > 1:
        logger.debug("all_gather_with_grad: uneven row counts across ranks %s", rows)
    rank = dist.get_rank(group)
    return _AllGatherSumGrad.apply(tensor, group, rows), sum(rows[:rank])


def all_gather_with_grad(tensor: Tensor, group=None) -> Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, in rank order, keeping the graph.

    The backward sums the gradients that all ranks computed for each slice and returns the sum to the
    slice's owner. Ranks may hold different numbers of rows; other dimensions must agree.
    ``torch.distributed.nn.functional.all_gather`` has the same sum-gradient backward, but it is
    deprecated (it warns), returns a list and needs equal shapes on every rank; this version uses
    only ``all_gather`` and ``all_reduce``, returns one tensor and accepts uneven row counts.

    Returns ``tensor`` itself when torch.distributed is not initialised or has a single rank.
    """
    gathered, _ = gather_rows(tensor, group)
    return gathered
