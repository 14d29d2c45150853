"""The ranking loss: InfoNCE over ``q . d / temperature``.

Candidates are the query's own group, and optionally every other document of the batch (in-batch
negatives) and of every other device (cross-device negatives, gathered with gradient:
:func:`csplade.training.losses.gather.all_gather_with_grad`). Scores are computed in float32
(autocast off): sparse dot products reach values where bfloat16 rounding is coarse.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from csplade.training.losses.checks import check_groups, check_temperature
from csplade.training.losses.gather import gather_rows
from csplade.training.losses.inputs import LossInputs, group_scores


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
      documents of every rank are candidates; the label of local query i is offset by the number of
      document rows on lower ranks. Without an initialised process group (or W == 1) this is the
      same as ``cross_device=False``.

    Returns the mean over this rank's queries (a float32 scalar). Under DDP the averaged gradients
    are those of the global-batch mean (``docs/losses.md``).
    """
    check_groups(q_reps, d_reps, group_size)
    check_temperature(temperature)
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
            docs, start = gather_rows(d_reps, group)  # (sum_r B_r * n, V)
        with torch.autocast(device_type=q_reps.device.type, enabled=False):
            scores = q_reps.float() @ docs.float().T  # (B, D)
        labels = start + torch.arange(n_queries, device=q_reps.device) * group_size
    return F.cross_entropy(scores / temperature, labels)


@dataclass(frozen=True)
class InfoNCE:
    """:func:`contrastive_loss` of a step's vectors (recipe keys ``temperature``,
    ``in_batch_negatives``, ``cross_device_negatives``)."""

    temperature: float = 1.0
    in_batch_negatives: bool = True
    cross_device: bool = False

    def __post_init__(self) -> None:
        check_temperature(self.temperature)
        if self.cross_device and not self.in_batch_negatives:
            raise ValueError("InfoNCE: cross_device needs in_batch_negatives")

    def __call__(self, inputs: LossInputs) -> Tensor:
        return contrastive_loss(
            inputs.q_reps,
            inputs.d_reps,
            inputs.group_size,
            temperature=self.temperature,
            in_batch_negatives=self.in_batch_negatives,
            cross_device=self.cross_device,
        )
