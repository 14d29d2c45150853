"""The training objective: ranking losses plus query and document sparsity regularizers.

:class:`SpladeLoss` composes small loss objects, as sentence-transformers' ``SpladeLoss`` does: named
ranking terms (:class:`~csplade.training.losses.ranking.InfoNCE`, a distillation loss) with fixed
weights, and a regularizer for each side with its λ on SPLADE's quadratic warm-up. A step's call
returns the weighted total and every part by name, which the trainer logs. A new loss is one class
(a callable of :class:`~csplade.training.losses.inputs.LossInputs`) and its recipe key, read in
:meth:`SpladeLoss.from_arguments`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import Tensor

from csplade.training.losses.distillation import DISTILL_LOSSES
from csplade.training.losses.inputs import LossInputs
from csplade.training.losses.ranking import InfoNCE
from csplade.training.losses.regularization import REGULARIZERS, RegWeightScheduler

RankingLoss = Callable[[LossInputs], Tensor]
Regularizer = Callable[[Tensor], Tensor]


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


@dataclass(frozen=True)
class LossOutput:
    """One step's loss: the total to backpropagate, each part unweighted (detached, logged under
    its name: contrastive, distill, reg_q, reg_d) and the regularizers' weights at that step."""

    total: Tensor
    parts: dict[str, Tensor]
    weights: dict[str, float]  # lambda_q, lambda_d


class SpladeLoss:
    """``ranking`` terms (name -> (loss, weight)) plus the query and document regularizers, whose
    weights follow ``lambdas`` (λ_q, λ_d) per OPTIMIZER step.

    The query regularizer reads ``inputs.q_learned`` and the document one ``inputs.d_learned``; both
    are computed on the global batch, in this order on every rank (collectives).
    """

    def __init__(
        self,
        ranking: Mapping[str, tuple[RankingLoss, float]],
        query_regularizer: Regularizer | None = None,
        document_regularizer: Regularizer | None = None,
        lambdas: RegWeightScheduler | None = None,
    ) -> None:
        self.ranking = dict(ranking)
        self.query_regularizer = query_regularizer
        self.document_regularizer = document_regularizer
        self.lambdas = lambdas or RegWeightScheduler(0.0, 0.0)
        if not self.ranking and query_regularizer is None and document_regularizer is None:
            raise ValueError("no loss to train: contrastive_weight is 0 and distill_loss is 'none'")

    @classmethod
    def from_arguments(
        cls,
        args,
        *,
        world_size: int = 1,
        learned_queries: bool = True,
        learned_documents: bool = True,
        idf: Tensor | None = None,
    ) -> SpladeLoss:
        """The objective a recipe's :class:`~csplade.training.arguments.LossArguments` describe.

        ``learned_queries`` / ``learned_documents``: whether that side has learned terms to
        regularize (not the IDF queries of ``doc_only``, nor the lexical documents of
        ``lexical_docs``). ``idf`` (V,): the training documents' IDF, for ``idf_flops``.
        """
        ranking: dict[str, tuple[RankingLoss, float]] = {}
        if args.contrastive_weight > 0:
            cross_device = args.cross_device_negatives and args.in_batch_negatives
            info_nce = InfoNCE(
                temperature=args.temperature,
                in_batch_negatives=args.in_batch_negatives,
                cross_device=cross_device and world_size > 1,
            )
            ranking["contrastive"] = (info_nce, args.contrastive_weight)
        if args.distill_loss != "none":
            distill = DISTILL_LOSSES[args.distill_loss].from_arguments(args)
            ranking["distill"] = (distill, args.distill_weight)
        query_regularizer = document_regularizer = None
        if args.doc_regularizer != "none":  # built first: idf_flops without IDF fails either way
            document_regularizer = REGULARIZERS[args.doc_regularizer].from_arguments(args, idf)
        if args.query_regularizer != "none" and learned_queries:
            query_regularizer = REGULARIZERS[args.query_regularizer].from_arguments(args)
        lambdas = RegWeightScheduler(args.lambda_q, args.lambda_d, args.reg_warmup_steps)
        return cls(
            ranking,
            query_regularizer=query_regularizer,
            document_regularizer=document_regularizer if learned_documents else None,
            lambdas=lambdas,
        )

    def __call__(self, inputs: LossInputs, step: int) -> LossOutput:
        """The loss of one micro-batch at optimizer step ``step`` (``state.global_step``)."""
        lambda_q, lambda_d = self.lambdas.weights(step)
        parts: dict[str, Tensor] = {}
        weights: dict[str, float] = {}
        for name, (loss, weight) in self.ranking.items():
            parts[name] = loss(inputs)
            weights[name] = weight
        if self.query_regularizer is not None:
            parts["reg_q"] = self.query_regularizer(inputs.q_learned)
            weights["reg_q"] = lambda_q
        if self.document_regularizer is not None:
            parts["reg_d"] = self.document_regularizer(inputs.d_learned)
            weights["reg_d"] = lambda_d
        total, logged = combine(parts, weights)
        return LossOutput(total, logged, {"lambda_q": lambda_q, "lambda_d": lambda_d})

    def __repr__(self) -> str:
        terms = [f"{name}={loss!r} x {weight:g}" for name, (loss, weight) in self.ranking.items()]
        if self.query_regularizer is not None:
            terms.append(f"reg_q={self.query_regularizer!r} x lambda_q")
        if self.document_regularizer is not None:
            terms.append(f"reg_d={self.document_regularizer!r} x lambda_d")
        return f"SpladeLoss({', '.join(terms)}; {self.lambdas})"
