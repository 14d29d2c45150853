"""Sparsity regularizers and their weight schedule, as in naver/splade's ``regularization.py``.

- :class:`FLOPS` (Paria et al. 2020, arXiv 2004.05665, used by SPLADE, Formal et al. 2021,
  arXiv 2107.05720), :class:`L1`, and :class:`IDFFLOPS` (Geng et al. 2024, arXiv 2411.04403; see
  :func:`idf_flops` for the exact definition used). Each is computed on the *global* batch under
  ``torch.distributed`` (:func:`regularize`), so a model's density does not depend on the number of
  GPUs: only the sufficient statistics travel, and the gradient equals one process's
  (``docs/losses.md``).
- :func:`quadratic_warmup` and :class:`RegWeightScheduler`: SPLADE's quadratic ramp of λ, stepped per
  OPTIMIZER step.

Known limit: under W > 1 every rank must call :func:`regularize` the same number of times in the same
order (it is a collective).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist
from torch import Tensor

from csplade.training.losses.checks import check_idf, check_matrix
from csplade.training.losses.gather import all_gather_with_grad, is_distributed


def flops(reps: Tensor) -> Tensor:
    """FLOPS (Paria et al. 2020): ``sum_j (mean_i |w_ij|)^2`` over the rows i of ``reps`` ``(N, V)``.

    A smooth proxy for the expected number of multiplications of a sparse dot product; it penalises
    vocabulary entries that are active across many rows (long posting lists) more than rare ones.
    """
    check_matrix("reps", reps)
    col_mean = reps.abs().sum(dim=0, dtype=torch.float32) / reps.shape[0]  # (V,)
    return col_mean.pow(2).sum()


def l1(reps: Tensor) -> Tensor:
    """L1: ``mean_i sum_j |w_ij|`` over the rows of ``reps`` ``(N, V)``."""
    check_matrix("reps", reps)
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
    check_matrix("reps", reps)
    check_idf(idf, reps)
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
    one-process gradient whatever the split (``docs/losses.md``). Only the sufficient statistics
    travel: per-column sums of ``|w|`` (V numbers per rank) for FLOPS, one number for L1.
    Otherwise (single process, or ``distributed=False``) it is the plain function on ``reps``.

    ``idf`` is required for "idf_flops" and rejected for the others.
    """
    if kind not in REGULARIZERS:
        raise ValueError(f"unknown regularizer kind {kind!r}; choose one of {tuple(REGULARIZERS)}")
    if kind == "idf_flops" and idf is None:
        raise ValueError("regularize(kind='idf_flops') needs idf, a (V,) tensor of IDF values > 0")
    if kind != "idf_flops" and idf is not None:
        raise ValueError(f"idf is only used by kind='idf_flops', got kind={kind!r}")
    check_matrix("reps", reps)
    if not (distributed and is_distributed(group)):
        if kind == "flops":
            return flops(reps)
        if kind == "l1":
            return l1(reps)
        return idf_flops(reps, idf)

    if idf is not None:
        check_idf(idf, reps)
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


class FLOPS:
    """FLOPS of the global batch (:func:`flops`, :func:`regularize`): recipe value ``flops``."""

    kind: ClassVar[str] = "flops"
    for_queries: ClassVar[bool] = True  # a valid query_regularizer

    @classmethod
    def from_arguments(cls, args, idf: Tensor | None = None) -> FLOPS:
        return cls()

    def __call__(self, reps: Tensor) -> Tensor:
        return regularize(reps, self.kind)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class L1(FLOPS):
    """L1 of the global batch (:func:`l1`, :func:`regularize`): recipe value ``l1``."""

    kind: ClassVar[str] = "l1"


@dataclass(frozen=True, repr=False, eq=False)
class IDFFLOPS(FLOPS):
    """IDF-aware FLOPS of the global batch (:func:`idf_flops`): recipe value ``idf_flops``; ``idf``
    (V,) > 0 is the training documents' (``SparseEncoder.document_idf``)."""

    kind: ClassVar[str] = "idf_flops"
    for_queries: ClassVar[bool] = False  # the IDF is the documents'
    idf: Tensor | None = None

    def __post_init__(self) -> None:
        if self.idf is None:
            raise ValueError("doc_regularizer 'idf_flops' needs IDF weights (idf=…)")

    @classmethod
    def from_arguments(cls, args, idf: Tensor | None = None) -> IDFFLOPS:
        return cls(idf)

    def __call__(self, reps: Tensor) -> Tensor:
        return regularize(reps, self.kind, idf=self.idf.to(reps.device))


# The values of the recipe keys `query_regularizer` and `doc_regularizer`.
REGULARIZERS: dict[str, type[FLOPS]] = {"flops": FLOPS, "l1": L1, "idf_flops": IDFFLOPS}


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
