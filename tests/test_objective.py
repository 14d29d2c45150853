"""SpladeLoss, the objective built from a recipe's loss keys: for every shipped training recipe, a
step's loss parts, total, λs and gradients equal those of the trainer's loss before it was composed
of objects (`_reference`, that code kept here as the reference)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from csplade.model import lexical
from csplade.training import losses
from csplade.training.contrastive import loss_inputs
from csplade.training.recipe import parse_recipe

REPO = Path(__file__).resolve().parents[1]
TRAIN_RECIPES = [
    p for p in sorted((REPO / "recipes").glob("*/*.yaml")) if "adapt_data" not in p.read_text()
]
V = 40  # vocabulary
B = 3  # queries


def _reference(sa, config, q_reps, d_reps, inputs, step, idf, world=1):
    """The loss of `SparseTrainer.compute_loss` before SpladeLoss: (total, parts, λ_q, λ_d)."""
    group_size = d_reps.shape[0] // q_reps.shape[0]
    parts, weights = {}, {}
    if sa.contrastive_weight > 0:
        parts["contrastive"] = losses.contrastive_loss(
            q_reps,
            d_reps,
            group_size,
            temperature=sa.temperature,
            in_batch_negatives=sa.in_batch_negatives,
            cross_device=sa.cross_device_negatives and sa.in_batch_negatives and world > 1,
        )
        weights["contrastive"] = sa.contrastive_weight
    if sa.distill_loss != "none":
        teacher = inputs["teacher_scores"]
        student = losses.group_scores(q_reps, d_reps, group_size)
        if sa.distill_loss == "margin_mse":
            parts["distill"] = losses.margin_mse_loss(student, teacher)
        else:
            parts["distill"] = losses.kl_distill_loss(
                student, teacher, temperature=sa.distill_temperature
            )
        weights["distill"] = sa.distill_weight
    scheduler = losses.RegWeightScheduler(sa.lambda_q, sa.lambda_d, sa.reg_warmup_steps)
    lambda_q, lambda_d = scheduler.weights(step)
    q_learned, d_learned = q_reps, d_reps
    if config.lexical_residual:
        q_learned = lexical.learned_part(q_reps, inputs["query"])
        if not config.lexical_docs:
            d_learned = lexical.learned_part(d_reps, inputs["doc"])
    if sa.query_regularizer != "none" and not config.doc_only:
        parts["reg_q"] = losses.regularize(q_learned, sa.query_regularizer)
        weights["reg_q"] = lambda_q
    if sa.doc_regularizer != "none" and not config.lexical_docs:
        idf_d = idf if sa.doc_regularizer == "idf_flops" else None
        parts["reg_d"] = losses.regularize(d_learned, sa.doc_regularizer, idf=idf_d)
        weights["reg_d"] = lambda_d
    total, logged = losses.combine(parts, weights)
    return total, logged, lambda_q, lambda_d


def _tokenized(n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A batch as tokenize() gives it with a lexical residual: ids and per-position weights."""
    ids = torch.randint(0, V, (n, 6), generator=generator)
    return {"input_ids": ids, "lexical": torch.rand(n, 6, generator=generator)}


def _step(group_size: int, config, seed: int):
    """Vectors of B queries and B groups (sparse, >= 0, with a residual where the model has one)."""
    g = torch.Generator().manual_seed(seed)
    inputs = {"query": _tokenized(B, g), "doc": _tokenized(B * group_size, g)}
    inputs["teacher_scores"] = torch.randn(B, group_size, generator=g) * 3

    def vectors(n, batch, learned=True):
        reps = torch.rand(n, V, generator=g) * (torch.rand(n, V, generator=g) < 0.3)
        reps = reps if learned else torch.zeros(n, V)
        if config.lexical_residual:
            reps = reps + lexical.batch_residual(batch, V)
        return reps.requires_grad_()

    q_reps = vectors(B, inputs["query"], learned=not config.doc_only)
    d_reps = vectors(B * group_size, inputs["doc"], learned=not config.lexical_docs)
    return q_reps, d_reps, inputs


@pytest.mark.parametrize("recipe", TRAIN_RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
@pytest.mark.parametrize("step", [0, 7, 100_000])
def test_a_steps_loss_parts_equal_todays_for_each_shipped_recipe(recipe, step):
    model_args, sa, data_args, _ = parse_recipe(recipe, ["--use_cpu", "true", "--bf16", "false"])
    config = model_args  # the encoder settings the loss reads: doc_only, lexical_*
    q_reps, d_reps, inputs = _step(data_args.group_size, config, seed=step)
    idf = torch.rand(V, generator=torch.Generator().manual_seed(1)) + 0.5
    want_total, want_parts, lambda_q, lambda_d = _reference(
        sa, config, q_reps, d_reps, inputs, step, idf
    )
    want_grads = torch.autograd.grad(want_total, (q_reps, d_reps))

    objective = losses.SpladeLoss.from_arguments(
        sa,
        learned_queries=not config.doc_only,
        learned_documents=not config.lexical_docs,
        idf=idf if sa.doc_regularizer == "idf_flops" else None,
    )
    encoder = SimpleNamespace(config=config)
    out = objective(loss_inputs(encoder, q_reps, d_reps, inputs), step)
    assert list(out.parts) == list(want_parts)
    for name, value in want_parts.items():
        assert torch.equal(out.parts[name], value), name
    assert torch.equal(out.total, want_total)
    assert out.weights == {"lambda_q": lambda_q, "lambda_d": lambda_d}
    for got, want in zip(torch.autograd.grad(out.total, (q_reps, d_reps)), want_grads, strict=True):
        assert torch.equal(got, want)


def test_every_shipped_training_recipe_is_covered():
    names = {f"{p.parent.name}/{p.stem}" for p in TRAIN_RECIPES}
    assert {"bert/inference-free", "bert/splade-pp", "smollm2-135m/lexdocs-bi"} <= names
    assert len(names) >= 13


def test_parts_are_named_logged_unweighted_and_weighted_in_the_total():
    g = torch.Generator().manual_seed(0)
    q, d = torch.rand(2, 5, generator=g), torch.rand(6, 5, generator=g)
    teacher = torch.randn(2, 3, generator=g)
    objective = losses.SpladeLoss(
        {"contrastive": (losses.InfoNCE(), 1.0), "distill": (losses.MarginMSE(), 0.5)},
        query_regularizer=losses.L1(),
        document_regularizer=losses.FLOPS(),
        lambdas=losses.RegWeightScheduler(0.1, 0.2, warmup_steps=2),
    )
    out = objective(losses.LossInputs(q, d, teacher), step=1)
    parts = out.parts
    assert parts["contrastive"] == losses.contrastive_loss(q, d, 3)
    assert parts["distill"] == losses.margin_mse_loss(losses.group_scores(q, d, 3), teacher)
    assert parts["reg_q"] == losses.l1(q) and parts["reg_d"] == losses.flops(d)
    assert out.weights == {"lambda_q": pytest.approx(0.025), "lambda_d": pytest.approx(0.05)}
    expected = (
        parts["contrastive"]
        + 0.5 * parts["distill"]
        + 0.025 * parts["reg_q"]
        + 0.05 * parts["reg_d"]
    )
    torch.testing.assert_close(out.total, expected)
    assert "InfoNCE" in repr(objective) and "reg_d=FLOPS()" in repr(objective)


def test_bad_objectives_fail_when_built():
    from csplade.training.arguments import LossArguments

    with pytest.raises(ValueError, match="idf_flops' needs IDF weights"):
        losses.SpladeLoss.from_arguments(LossArguments(doc_regularizer="idf_flops"))
    with pytest.raises(ValueError, match="no loss to train"):
        losses.SpladeLoss.from_arguments(
            LossArguments(contrastive_weight=0.0, query_regularizer="none", doc_regularizer="none")
        )
    with pytest.raises(ValueError, match="query_regularizer: unknown value 'idf_flops'"):
        LossArguments(query_regularizer="idf_flops")
    distill = losses.SpladeLoss.from_arguments(LossArguments(distill_loss="kl"))
    q, d = torch.rand(2, 5), torch.rand(4, 5)
    with pytest.raises(ValueError, match="distill_loss='kl' needs teacher scores"):
        distill(losses.LossInputs(q, d), step=0)
    with pytest.raises(ValueError, match="5 documents for 2 queries: not whole groups"):
        losses.LossInputs(q, torch.rand(5, 5))
