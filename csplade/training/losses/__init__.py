"""Training losses for learned sparse retrieval: small loss objects, composed by SpladeLoss."""

from csplade.training.losses.distillation import (
    DISTILL_LOSSES,
    KLDistill,
    MarginMSE,
    kl_distill_loss,
    margin_mse_loss,
)
from csplade.training.losses.gather import all_gather_with_grad
from csplade.training.losses.inputs import LossInputs, group_scores
from csplade.training.losses.lexical import LexicalTargetLoss, own_share
from csplade.training.losses.ranking import InfoNCE, contrastive_loss
from csplade.training.losses.regularization import (
    FLOPS,
    IDFFLOPS,
    L1,
    REGULARIZERS,
    RegWeightScheduler,
    flops,
    idf_flops,
    l1,
    quadratic_warmup,
    regularize,
)
from csplade.training.losses.splade import LossOutput, SpladeLoss, combine

__all__ = [
    "DISTILL_LOSSES", "FLOPS", "IDFFLOPS", "InfoNCE", "KLDistill", "L1", "LexicalTargetLoss",
    "LossInputs", "LossOutput", "own_share",
    "MarginMSE", "REGULARIZERS", "RegWeightScheduler", "SpladeLoss", "all_gather_with_grad",
    "combine", "contrastive_loss", "flops", "group_scores", "idf_flops", "kl_distill_loss", "l1",
    "margin_mse_loss", "quadratic_warmup", "regularize",
]  # fmt: skip
