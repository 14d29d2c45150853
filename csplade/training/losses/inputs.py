"""What one training step's loss reads: the encoder's vectors for a batch of query groups.

Shapes: ``q_reps`` ``(B, V)``, one sparse vocabulary-sized vector per query; ``d_reps`` ``(B * n, V)``,
the documents grouped per query (row ``i * n`` is query i's positive, rows ``i * n + 1 .. i * n + n - 1``
its hard negatives; ``n`` = 1 + #negatives); ``scores`` ``(B, n)``, column 0 the positive.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from csplade.training.losses.checks import check_groups


def group_scores(q_reps: Tensor, d_reps: Tensor, group_size: int) -> Tensor:
    """Dot product of each query with the documents of its own group -> ``(B, n)`` (float32).

    Column 0 is the positive: the student side of the distillation losses.
    """
    check_groups(q_reps, d_reps, group_size)
    with torch.autocast(device_type=q_reps.device.type, enabled=False):
        groups = d_reps.float().reshape(q_reps.shape[0], group_size, -1)  # (B, n, V)
        return torch.bmm(groups, q_reps.float().unsqueeze(2)).squeeze(2)  # (B, n)


@dataclass
class LossInputs:
    """The vectors of B queries and of their groups of n documents (module docstring).

    The regularizers read ``q_learned`` / ``d_learned``: the learned terms, which differ
    from the vectors when the model adds a fixed lexical residual (default: the vectors themselves).
    """

    q_reps: Tensor  # (B, V)
    d_reps: Tensor  # (B * n, V)
    teacher_scores: Tensor | None = None  # (B, n), positive first
    q_learned: Tensor | None = None  # (B, V)
    d_learned: Tensor | None = None  # (B * n, V)

    def __post_init__(self) -> None:
        if self.d_reps.shape[0] % self.q_reps.shape[0]:
            raise ValueError(
                f"{self.d_reps.shape[0]} documents for {self.q_reps.shape[0]} queries: not whole "
                "groups"
            )
        if self.q_learned is None:
            self.q_learned = self.q_reps
        if self.d_learned is None:
            self.d_learned = self.d_reps

    @property
    def group_size(self) -> int:
        """Documents per query: 1 positive + the negatives."""
        return self.d_reps.shape[0] // self.q_reps.shape[0]

    @cached_property
    def group_scores(self) -> Tensor:
        """:func:`group_scores` of this batch ``(B, n)``, computed once for every loss that reads it."""
        return group_scores(self.q_reps, self.d_reps, self.group_size)
