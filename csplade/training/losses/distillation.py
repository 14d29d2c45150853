"""Distillation from a teacher's scores of each query's group (``scores`` in the training data).

- :class:`MarginMSE`: Margin-MSE (Hofstätter et al. 2020, arXiv 2010.02666), as used by SPLADE++
  (Formal et al. 2022, arXiv 2205.04733).
- :class:`KLDistill`: KL(teacher || student) over each query's group.

The student's scores are ``q . d`` over the query's own group (:func:`group_scores`); the teacher's
are a fixed target (detached).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from csplade.training.losses.checks import check_scores, check_temperature
from csplade.training.losses.inputs import LossInputs


def margin_mse_loss(student_scores: Tensor, teacher_scores: Tensor) -> Tensor:
    """Margin-MSE: mean over (query, negative) pairs of ``((s_pos - s_neg) - (t_pos - t_neg))^2``.

    Scores are ``(B, n)`` with the positive in column 0 and n >= 2.
    """
    check_scores(student_scores, teacher_scores, min_group=2)
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
    into the loss weight if wanted).
    """
    check_scores(student_scores, teacher_scores, min_group=1)
    check_temperature(temperature)
    student_logp = F.log_softmax(student_scores.float() / temperature, dim=1)  # (B, n)
    teacher_logp = F.log_softmax(teacher_scores.detach().float() / temperature, dim=1)  # (B, n)
    return F.kl_div(student_logp, teacher_logp, reduction="batchmean", log_target=True)


def teacher_scores(inputs: LossInputs, loss: str) -> Tensor:
    """The batch's teacher scores, or an error that says where they come from."""
    if inputs.teacher_scores is None:
        raise ValueError(
            f"distill_loss={loss!r} needs teacher scores in the training data "
            "(a 'scores' field in every group; see `csplade teacher-scores`)"
        )
    return inputs.teacher_scores


@dataclass(frozen=True)
class MarginMSE:
    """:func:`margin_mse_loss` of the step's group scores against the teacher's (``margin_mse``)."""

    @classmethod
    def from_arguments(cls, args) -> MarginMSE:
        return cls()

    def __call__(self, inputs: LossInputs) -> Tensor:
        teacher = teacher_scores(inputs, "margin_mse")
        return margin_mse_loss(inputs.group_scores, teacher)


@dataclass(frozen=True)
class KLDistill:
    """:func:`kl_distill_loss` of the step's group scores against the teacher's (``kl``)."""

    temperature: float = 1.0

    def __post_init__(self) -> None:
        check_temperature(self.temperature)

    @classmethod
    def from_arguments(cls, args) -> KLDistill:
        return cls(temperature=args.distill_temperature)

    def __call__(self, inputs: LossInputs) -> Tensor:
        teacher = teacher_scores(inputs, "kl")
        return kl_distill_loss(inputs.group_scores, teacher, temperature=self.temperature)


# The values of the recipe key `distill_loss`; each class reads its own keys from the recipe's
# LossArguments (`from_arguments`).
DISTILL_LOSSES = {"margin_mse": MarginMSE, "kl": KLDistill}
