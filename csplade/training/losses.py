"""Training losses for learned sparse retrieval, as pure functions of tensors.

Nothing here knows about a model: every function takes the vectors (or scores) the encoder produced and
returns a scalar. The trainer encodes, calls these, and logs each named part (see :func:`combine`).

Shapes used throughout:

- ``q_reps`` ``(B, V)``: one sparse vocabulary-sized vector per query.
- ``d_reps`` ``(B * n, V)``: the documents, grouped per query. Row ``i * n`` is query ``i``'s positive,
  rows ``i * n + 1 .. i * n + n - 1`` are its hard negatives; ``n`` is the group size (1 + #negatives).
- ``scores`` ``(B, n)``: one score per (query, document of its group); column 0 is the positive.

What is here, and where it comes from:

- :func:`contrastive_loss`: InfoNCE over ``q . d / temperature`` against the query's own group and,
  optionally, every other document in the batch (in-batch negatives), and, optionally, every document
  on every other device (cross-device negatives, via :func:`all_gather_with_grad`).
- :func:`margin_mse_loss`: Margin-MSE distillation (Hofstätter et al. 2020, arXiv 2010.02666), as used
  by SPLADE++ (Formal et al. 2022, arXiv 2205.04733).
- :func:`kl_distill_loss`: KL(teacher || student) over each query's group.
- :func:`flops`, :func:`l1`, :func:`idf_flops`: sparsity regularizers. FLOPS is from Paria et al. 2020
  (arXiv 2004.05665), used by SPLADE (Formal et al. 2021, arXiv 2107.05720); IDF-aware FLOPS is from
  Geng et al. 2024 (arXiv 2411.04403), see :func:`idf_flops` for the exact definition used.
- :func:`regularize`: a regularizer computed on the *global* batch under ``torch.distributed``.
- :func:`quadratic_warmup` and :class:`RegWeightScheduler`: SPLADE's quadratic ramp of λ.

Distributed training, the math (read this before changing :func:`regularize` or the gather)
---------------------------------------------------------------------------------------------
:func:`all_gather_with_grad` concatenates one tensor from each of the W ranks; its backward *sums* the
gradients that every rank computed for a slice and hands the sum to the rank that owns the slice.
Let rank r hold rows ``X_r`` and compute a loss ``L_r`` that may read every rank's rows through the
gather. Rank r's parameter gradient is then ``sum_s dL_s/dX_r . dX_r/dtheta``. DDP (and DeepSpeed, FSDP)
*averages* parameter gradients over ranks, so the update uses

    (1/W) sum_r sum_s dL_s/dX_r . dX_r/dtheta  =  d/dtheta [ (1/W) sum_s L_s ],

the gradient of the mean of the per-rank losses, exactly.

- Contrastive with cross-device negatives: ``L_s`` is the mean over rank s's queries, so the mean of
  the ``L_s`` is the mean over the global batch (when every rank holds the same number of queries,
  which accelerate's ``even_batches`` guarantees; otherwise it is the mean of per-rank means, the same
  thing DDP does for any loss).
- A regularizer R of the global batch: every rank computes the same value ``R(X)``, so the mean of
  the ``L_s`` is ``R(X)`` and the update is ``dR(X)/dtheta``, whatever the split. Seen from one rank:
  its gradient is W times its own share of ``dR/dtheta`` and DDP divides by W.
  A regularizer computed on the global batch but gathered *without* gradient for the other ranks'
  rows (or with gradient only through the local slice) gets only its own share and, after DDP's
  average, 1/W of the true gradient: the effective λ shrinks by W. That is consistent with the
  2-/4-GPU models being 2-4x denser reported for peer code; :func:`regularize` avoids it, and
  ``tests/test_losses_distributed.py`` checks the gradients against a one-process run.

Known limits:

- Every rank must call :func:`all_gather_with_grad`, :func:`regularize` (under W > 1) and
  ``contrastive_loss(cross_device=True)`` the same number of times in the same order: they are
  collectives, and a rank that skips one deadlocks the others.
- The gather's backward uses ``all_reduce`` of the whole gathered gradient (tested on gloo; NCCL
  supports it too, untested here); a ``reduce_scatter`` would move half the bytes on NCCL.
- The math above assumes gradient *averaging* across ranks (DDP, DeepSpeed, FSDP); with
  ``torch.nn.DataParallel`` (which sums) do not use these functions as they are.
- Scores are computed in float32 (autocast disabled) because sparse dot products reach values where
  bfloat16 rounding is coarse; that briefly holds a float32 copy of the (gathered) documents.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

REGULARIZERS = ("flops", "l1", "idf_flops")


# --------------------------------------------------------------------------------------------------
# Distributed helpers
# --------------------------------------------------------------------------------------------------


def _is_distributed(group=None) -> bool:
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


def _gather_rows(tensor: Tensor, group=None) -> tuple[Tensor, int]:
    """Differentiable all-gather along dim 0; also returns where this rank's rows start."""
    if tensor.dim() == 0:
        raise ValueError(
            "all_gather_with_grad needs a tensor with at least one dimension, got a scalar"
        )
    if not _is_distributed(group):
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
    slice's owner (see the module docstring for why that, combined with DDP's gradient average, is
    exact). Ranks may hold different numbers of rows; other dimensions must agree.
    ``torch.distributed.nn.functional.all_gather`` has the same sum-gradient backward (checked on gloo
    with torch 2.13, where it routes the backward through ``all_to_all``), but it is deprecated (it
    warns), returns a list and needs equal shapes on every rank; this version uses only
    ``all_gather`` and ``all_reduce``, returns one tensor and accepts uneven row counts.

    Returns ``tensor`` itself when torch.distributed is not initialised or has a single rank.
    """
    gathered, _ = _gather_rows(tensor, group)
    return gathered


# --------------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------------


def _check_matrix(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} has no rows (shape {tuple(t.shape)})")


def _check_groups(q_reps: Tensor, d_reps: Tensor, group_size: int) -> None:
    _check_matrix("q_reps", q_reps)
    _check_matrix("d_reps", d_reps)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(
            f"group_size must be an int >= 1 (1 positive + #negatives), got {group_size!r}"
        )
    shapes = f"(shapes: q_reps {tuple(q_reps.shape)}, d_reps {tuple(d_reps.shape)})"
    if q_reps.shape[1] != d_reps.shape[1]:
        raise ValueError(f"q_reps and d_reps have different vocabulary sizes {shapes}")
    if d_reps.shape[0] % group_size != 0:
        raise ValueError(
            f"d_reps has {d_reps.shape[0]} rows, not a multiple of group_size={group_size} {shapes}"
        )
    n_queries = d_reps.shape[0] // group_size
    if n_queries != q_reps.shape[0]:
        raise ValueError(
            f"d_reps holds {n_queries} groups of {group_size} but q_reps has {q_reps.shape[0]} "
            f"queries {shapes}"
        )


def _check_scores(student_scores: Tensor, teacher_scores: Tensor, min_group: int) -> None:
    _check_matrix("student_scores", student_scores)
    _check_matrix("teacher_scores", teacher_scores)
    if student_scores.shape != teacher_scores.shape:
        raise ValueError(
            f"student_scores {tuple(student_scores.shape)} and teacher_scores "
            f"{tuple(teacher_scores.shape)} must have the same (B, n) shape"
        )
    if student_scores.shape[1] < min_group:
        raise ValueError(
            f"scores need at least {min_group} columns (positive first, then negatives), got shape "
            f"{tuple(student_scores.shape)}"
        )


def _check_temperature(temperature: float) -> None:
    if not (
        isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _check_idf(idf: Tensor, reps: Tensor) -> None:
    if not isinstance(idf, Tensor):
        raise TypeError(f"idf must be a torch.Tensor of shape (V,), got {type(idf).__name__}")
    if idf.shape != (reps.shape[1],):
        raise ValueError(
            f"idf must have shape (V,) = ({reps.shape[1]},) to match reps {tuple(reps.shape)}, "
            f"got {tuple(idf.shape)}"
        )
    bad = torch.nonzero(~(idf > 0) | ~torch.isfinite(idf))
    if bad.numel():
        i = int(bad[0, 0])
        raise ValueError(
            f"idf must be finite and > 0 everywhere ({bad.numel()} bad entries); first at index {i}: "
            f"{float(idf[i])}. Clamp it, e.g. idf.clamp_min(1e-3)"
        )


# --------------------------------------------------------------------------------------------------
# Ranking losses
# --------------------------------------------------------------------------------------------------


def group_scores(q_reps: Tensor, d_reps: Tensor, group_size: int) -> Tensor:
    """Dot product of each query with the documents of its own group -> ``(B, n)`` (float32).

    Column 0 is the positive. This is the student side of :func:`margin_mse_loss` and
    :func:`kl_distill_loss`.
    """
    _check_groups(q_reps, d_reps, group_size)
    with torch.autocast(device_type=q_reps.device.type, enabled=False):
        groups = d_reps.float().reshape(q_reps.shape[0], group_size, -1)  # (B, n, V)
        return torch.bmm(groups, q_reps.float().unsqueeze(2)).squeeze(2)  # (B, n)


def contrastive_loss(
    q_reps: Tensor,
    d_reps: Tensor,
    group_size: int,
    temperature: float = 1.0,
    in_batch_negatives: bool = True,
    cross_device: bool = False,
    group=None,
) -> Tensor:
    """InfoNCE: cross-entropy of each query's positive among ``q . d / temperature`` scores.

    - ``in_batch_negatives=False``: the candidates of query i are its own group only (its positive
      and its hard negatives).
    - ``in_batch_negatives=True``: every document row of the batch is a candidate (the other
      queries' positives and hard negatives too).
    - ``cross_device=True`` (needs in-batch negatives): under torch.distributed with W > 1, the
      documents of every rank are candidates, gathered with :func:`all_gather_with_grad`; the label
      of local query i is offset by the number of document rows on lower ranks. Without an
      initialised process group (or W == 1) this is the same as ``cross_device=False``.

    Returns the mean over this rank's queries (a float32 scalar). Under DDP the averaged gradients
    are those of the global-batch mean (module docstring).
    """
    _check_groups(q_reps, d_reps, group_size)
    _check_temperature(temperature)
    if cross_device and not in_batch_negatives:
        raise ValueError(
            "cross_device=True adds other devices' documents as in-batch negatives; it needs "
            "in_batch_negatives=True"
        )
    n_queries = q_reps.shape[0]
    if not in_batch_negatives:
        scores = group_scores(q_reps, d_reps, group_size)  # (B, n)
        labels = torch.zeros(n_queries, dtype=torch.long, device=q_reps.device)
    else:
        docs, start = (d_reps, 0)
        if cross_device:
            docs, start = _gather_rows(d_reps, group)  # (sum_r B_r * n, V)
        with torch.autocast(device_type=q_reps.device.type, enabled=False):
            scores = q_reps.float() @ docs.float().T  # (B, D)
        labels = start + torch.arange(n_queries, device=q_reps.device) * group_size
    return F.cross_entropy(scores / temperature, labels)


def margin_mse_loss(student_scores: Tensor, teacher_scores: Tensor) -> Tensor:
    """Margin-MSE (Hofstätter et al. 2020): mean over (query, negative) pairs of
    ``((s_pos - s_neg) - (t_pos - t_neg))^2``.

    Scores are ``(B, n)`` with the positive in column 0 and n >= 2. The teacher is a fixed target:
    its scores are detached.
    """
    _check_scores(student_scores, teacher_scores, min_group=2)
    student = student_scores.float()
    teacher = teacher_scores.detach().float()
    student_margin = student[:, :1] - student[:, 1:]  # (B, n-1)
    teacher_margin = teacher[:, :1] - teacher[:, 1:]  # (B, n-1)
    return F.mse_loss(student_margin, teacher_margin)


def kl_distill_loss(
    student_scores: Tensor, teacher_scores: Tensor, temperature: float = 1.0
) -> Tensor:
    """KL(teacher || student) between the softmax distributions over each query's group.

    Both score matrices ``(B, n)`` are divided by ``temperature`` before the softmax; the sum over
    the group is averaged over queries ("batchmean"). No ``temperature**2`` factor is applied (fold it
    into the loss weight if wanted). The teacher is a fixed target: its scores are detached.
    """
    _check_scores(student_scores, teacher_scores, min_group=1)
    _check_temperature(temperature)
    student_logp = F.log_softmax(student_scores.float() / temperature, dim=1)  # (B, n)
    teacher_logp = F.log_softmax(teacher_scores.detach().float() / temperature, dim=1)  # (B, n)
    return F.kl_div(student_logp, teacher_logp, reduction="batchmean", log_target=True)


# --------------------------------------------------------------------------------------------------
# Sparsity regularizers (on the rows they are given; see regularize() for the global batch)
# --------------------------------------------------------------------------------------------------


def flops(reps: Tensor) -> Tensor:
    """FLOPS (Paria et al. 2020): ``sum_j (mean_i |w_ij|)^2`` over the rows i of ``reps`` ``(N, V)``.

    A smooth proxy for the expected number of multiplications of a sparse dot product; it penalises
    vocabulary entries that are active across many rows (long posting lists) more than rare ones.
    """
    _check_matrix("reps", reps)
    col_mean = reps.abs().sum(dim=0, dtype=torch.float32) / reps.shape[0]  # (V,)
    return col_mean.pow(2).sum()


def l1(reps: Tensor) -> Tensor:
    """L1: ``mean_i sum_j |w_ij|`` over the rows of ``reps`` ``(N, V)``."""
    _check_matrix("reps", reps)
    return reps.abs().sum(dtype=torch.float32) / reps.shape[0]


def idf_flops(reps: Tensor, idf: Tensor) -> Tensor:
    """IDF-aware FLOPS: ``sum_j (mean_i |w_ij| / idf_j)^2``, ``reps`` ``(N, V)``, ``idf`` ``(V,)`` > 0.

    Source: Geng, Ru, Yang, "Towards Competitive Search Relevance for Inference-Free Learned Sparse
    Retrievers", arXiv 2411.04403 (v1: "IDF-aware FLOPS loss"; v2 renames it "an IDF-aware penalty
    for the matching function that suppresses the contribution of low-IDF tokens"). In the paper's
    inference-free setting the query side is ``idf_j`` on each query token, so a document scores
    ``sum_{j in q} idf_j * w_dj`` and plain FLOPS is applied to the raw document weights ``w_d``: the
    ranking loss pushes each weight with a factor ``idf_j`` and FLOPS does not, so frequent (low-IDF)
    tokens are pruned harder than informative ones. Written in the weights that enter the score,
    ``r_j = idf_j * w_j``, that FLOPS reads ``sum_j (mean_i |r_ij| / idf_j)^2`` -- this function.
    Use it for a model whose scores are plain ``q . d`` (csplade's siamese encoders); in an
    inference-free setup whose query vectors already carry ``idf``, use plain :func:`flops` on the
    raw document weights (the authors' own training code does that), which is the same objective.

    Caveat: the paper's full text could not be read through the tools available when this was
    written; the formula above is reconstructed from the abstracts of v1/v2, from the authors'
    public training code (query = IDF lookup, plain FLOPS on documents) and from a published
    third-party implementation that divides document weights by IDF inside FLOPS, which all agree.
    """
    _check_matrix("reps", reps)
    _check_idf(idf, reps)
    col_mean = reps.abs().sum(dim=0, dtype=torch.float32) / reps.shape[0]  # (V,)
    return (col_mean / idf.float()).pow(2).sum()


def regularize(
    reps: Tensor,
    kind: str,
    idf: Tensor | None = None,
    distributed: bool = True,
    group=None,
) -> Tensor:
    """The regularizer ``kind`` ("flops", "l1" or "idf_flops") of the *global* batch.

    Under torch.distributed with W > 1 (and ``distributed=True``) each rank contributes its rows
    through :func:`all_gather_with_grad`; every rank returns the same value, that of the
    concatenation of all ranks' rows, and after DDP's gradient average the update equals the
    one-process gradient whatever the split (module docstring). Only the sufficient statistics
    travel: per-column sums of ``|w|`` (V numbers per rank) for FLOPS, one number for L1.
    Otherwise (single process, or ``distributed=False``) it is the plain function on ``reps``.

    ``idf`` is required for "idf_flops" and rejected for the others.
    """
    if kind not in REGULARIZERS:
        raise ValueError(f"unknown regularizer kind {kind!r}; choose one of {REGULARIZERS}")
    if kind == "idf_flops" and idf is None:
        raise ValueError("regularize(kind='idf_flops') needs idf, a (V,) tensor of IDF values > 0")
    if kind != "idf_flops" and idf is not None:
        raise ValueError(f"idf is only used by kind='idf_flops', got kind={kind!r}")
    _check_matrix("reps", reps)
    if not (distributed and _is_distributed(group)):
        if kind == "flops":
            return flops(reps)
        if kind == "l1":
            return l1(reps)
        return idf_flops(reps, idf)

    if idf is not None:
        _check_idf(idf, reps)
    n_total = torch.tensor([reps.shape[0]], dtype=torch.long, device=reps.device)
    dist.all_reduce(n_total, op=dist.ReduceOp.SUM, group=group)
    n_total = int(n_total.item())
    if kind == "l1":
        local_sum = reps.abs().sum(dtype=torch.float32).reshape(1)  # (1,)
        return all_gather_with_grad(local_sum, group).sum() / n_total
    col_sum = reps.abs().sum(dim=0, keepdim=True, dtype=torch.float32)  # (1, V)
    col_mean = all_gather_with_grad(col_sum, group).sum(dim=0) / n_total  # (V,)
    if kind == "idf_flops":
        col_mean = col_mean / idf.float()
    return col_mean.pow(2).sum()


# --------------------------------------------------------------------------------------------------
# Loss weights
# --------------------------------------------------------------------------------------------------


def quadratic_warmup(step: int, warmup_steps: int, max_weight: float) -> float:
    """SPLADE's regularization ramp: ``max_weight * min(1, (step / warmup_steps)^2)``.

    ``warmup_steps == 0`` means no ramp (``max_weight`` from step 0). ``step`` is the optimizer step
    (see :class:`RegWeightScheduler`).
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if warmup_steps == 0:
        return float(max_weight)
    return float(max_weight) * min(1.0, (step / warmup_steps) ** 2)


@dataclass(frozen=True)
class RegWeightScheduler:
    """Separate regularization weights λ_q (queries) and λ_d (documents), ramped quadratically.

    ``weights(step)`` must be given the OPTIMIZER step (the trainer passes ``state.global_step``),
    never a micro-batch counter: with gradient accumulation a micro-batch counter would run the ramp
    ``gradient_accumulation_steps`` times too fast, and the weights must be the same for every
    micro-batch of one update. Both weights share one ``warmup_steps``, as in SPLADE.
    """

    lambda_q: float
    lambda_d: float
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        for name in ("lambda_q", "lambda_d"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(
                    f"RegWeightScheduler.{name} must be a finite number >= 0, got {value!r}"
                )
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int):
            raise ValueError(
                f"RegWeightScheduler.warmup_steps must be an int, got {self.warmup_steps!r}"
            )
        if self.warmup_steps < 0:
            raise ValueError(
                f"RegWeightScheduler.warmup_steps must be >= 0, got {self.warmup_steps}"
            )

    def weights(self, step: int) -> tuple[float, float]:
        """``(lambda_q, lambda_d)`` at optimizer step ``step``."""
        return (
            quadratic_warmup(step, self.warmup_steps, self.lambda_q),
            quadratic_warmup(step, self.warmup_steps, self.lambda_d),
        )


def combine(
    parts: Mapping[str, Tensor], weights: Mapping[str, float]
) -> tuple[Tensor, dict[str, Tensor]]:
    """Weighted sum of named scalar losses, and the unweighted parts detached for logging.

    Every part needs a weight and every weight a part (a typo must not silently drop a loss); a
    weight of 0 keeps the part in the log. Returns ``(total, {name: part.detach()})``.
    """
    if not parts:
        raise ValueError("combine() got no loss parts")
    missing = sorted(set(parts) - set(weights))
    unused = sorted(set(weights) - set(parts))
    if missing or unused:
        raise ValueError(
            f"loss parts and weights must name the same losses: parts without a weight {missing}, "
            f"weights without a part {unused} (parts: {sorted(parts)})"
        )
    total = None
    logged: dict[str, Tensor] = {}
    for name, part in parts.items():
        if not isinstance(part, Tensor) or part.dim() != 0:
            shape = tuple(part.shape) if isinstance(part, Tensor) else type(part).__name__
            raise ValueError(f"loss part {name!r} must be a scalar tensor, got {shape}")
        weight = weights[name]
        if not (isinstance(weight, (int, float)) and math.isfinite(weight)):
            raise ValueError(
                f"weight for loss part {name!r} must be a finite number, got {weight!r}"
            )
        term = part * weight
        total = term if total is None else total + term
        logged[name] = part.detach()
    return total, logged
