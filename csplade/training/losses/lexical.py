"""The lexical adaptation loss: a text's own vector regressed onto its words at BM25's weights.

A SPLADE vector is ``a(m) = log(1 + ReLU(m))`` of the max-pooled logits ``m`` (B, V). Given a target
``w`` (B, V) that is non-zero on the text's own terms T (:mod:`csplade.data.lexical_targets`):

    on   = sum_{t in T} (a(m_t) - w_t)^2          the own terms at their weights
    pull = sum_{t in T} ReLU(-m_t)                an own term that is off gets a unit gradient up
    off  = sum_{v not in T} a(m_v)^2              every other term towards zero

each summed over the vocabulary and averaged over texts; the loss is ``on + pull_weight * pull +
off_weight * off``. ``pull`` exists because log(1 + ReLU) has no gradient below zero: a fresh causal
LM puts under 1% of a text's vector on its own tokens, and without it the regression only moves the
few own terms that happen to be on while ``off`` switches the rest of the vector off (measured on
SmolLM2-135M: every vector was empty after 20 steps).

Why a regression rather than a bag-of-words softmax ("Drop your Decoder", arXiv 2401.11248) or
LexMAE's reconstruction: retrieval reads the weights themselves (a dot product), so the objective
says what they should be, and the product of a query's target and a document's is BM25 on the same
terms; a softmax fixes only their ranks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from csplade.model.head import splade_activation


class LexicalTargetLoss:
    """Named parts ``on``, ``pull``, ``off`` and their weighted sum ``loss`` (scalars)."""

    def __init__(self, pull_weight: float = 1.0, off_weight: float = 1.0) -> None:
        if pull_weight < 0 or off_weight < 0:
            raise ValueError("pull_weight and off_weight must be >= 0")
        self.pull_weight = pull_weight
        self.off_weight = off_weight

    def __call__(self, logits: Tensor, target: Tensor) -> dict[str, Tensor]:
        """`logits` (B, V): max-pooled logits (:meth:`SparseEncoder.pooled_logits`); `target` (B, V)."""
        if logits.shape != target.shape:
            raise ValueError(
                f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ"
            )
        logits = logits.float()
        target = target.to(device=logits.device, dtype=torch.float32)
        own = target > 0  # (B, V)
        weights = splade_activation(logits)  # (B, V)
        error = (weights - target).square()
        on = torch.where(own, error, 0.0).sum(dim=1).mean()
        pull = torch.where(own, torch.relu(-logits), 0.0).sum(dim=1).mean()
        off = torch.where(own, 0.0, weights.square()).sum(dim=1).mean()
        loss = on + self.pull_weight * pull + self.off_weight * off
        return {"loss": loss, "on": on, "pull": pull, "off": off}


@torch.no_grad()
def own_share(reps: Tensor, target: Tensor) -> Tensor:
    """Mean over texts of the share of a vector's weight that sits on the text's own terms."""
    own = (reps * (target > 0)).sum(dim=1)
    total = reps.sum(dim=1).clamp_min(1e-12)
    return (own / total).mean()
