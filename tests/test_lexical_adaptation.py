"""The lexical adaptation: targets that multiply to BM25, the loss by hand, and a tiny model whose own
vectors come to carry their texts' words."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from datasets import Dataset
from test_adaptation import make_encoder, run_texts, sleeping_backbone, training_args
from tiny import tiny_model, tiny_tokenizer

from csplade.data.lexical_targets import LexicalTargets, fit_statistics, visible_texts
from csplade.model import SparseEncoder, lexical
from csplade.model.head import splade_activation
from csplade.training.adaptation import AdaptationTrainer, run_adaptation
from csplade.training.arguments import AdaptationArguments, ModelArguments
from csplade.training.losses import LexicalTargetLoss, own_share

HELD_OUT = run_texts(24, seed=77)


def _weights(rows, vocab=256):
    return lexical.statistics(rows, vocab)


def test_query_and_document_targets_multiply_to_the_residuals_bm25():
    rows = [[7, 8, 9, 9, 10], [8, 11, 12], [7, 7, 7, 13, 14, 15, 16], [9, 20]]
    weights = _weights(rows)
    query, doc = [7, 9, 12], rows[2]
    q_ids, q_vals = lexical.target_terms(query, weights, "query", 32, scale=0.5)
    d_ids, d_vals = lexical.target_terms(doc, weights, "doc", 32, scale=0.5)
    q = lexical.target_matrix([(q_ids, q_vals)], 256)[0]
    d = lexical.target_matrix([(d_ids, d_vals)], 256)[0]
    # the residual of csplade.model.lexical: IDF on the query side, saturated tf on the document's
    ids = torch.tensor([query]), torch.tensor([doc])
    res_q = lexical.residual(
        ids[0],
        lexical.position_weights(
            ids[0], torch.ones(1, 3, dtype=torch.bool), "query", weights, 1.0, 32
        ),
        256,
    )[0]
    res_d = lexical.residual(
        ids[1],
        lexical.position_weights(
            ids[1], torch.ones(1, 7, dtype=torch.bool), "doc", weights, 1.0, 32
        ),
        256,
    )[0]
    assert float(q @ d) == pytest.approx(0.25 * float(res_q @ res_d), rel=1e-5)
    assert float(q @ d) > 0
    # IDF on both sides: a query term's weight is sqrt(IDF), a document's sqrt(IDF) x saturated tf
    np.testing.assert_allclose(q_vals, 0.5 * np.sqrt(weights.idf.numpy()[q_ids]), rtol=1e-6)
    assert set(d_ids.tolist()) == set(doc) and d_vals[d_ids.tolist().index(7)] > d_vals[1]


def test_targets_hold_only_what_the_model_sees():
    encoder = make_encoder("bi")
    encoder.config.doc_max_length = 4
    text = "aa ab ac ad ae af ag"
    assert visible_texts(encoder, [text], "doc") == ["aa ab ac ad"]
    weights = fit_statistics(encoder, HELD_OUT, "tokens")
    targets = LexicalTargets(encoder, weights, analyzer="tokens")
    _, target = targets.batch([text], "doc")
    seen = encoder.tokenizer("aa ab ac ad", add_special_tokens=False)["input_ids"]
    assert set(target[0].nonzero().flatten().tolist()) == set(seen)


def test_whole_collection_targets_equal_the_training_batches_targets():
    """LexicalTargets.terms as a CSR (eval/lexical_ceiling.py) holds what batch() trains on."""
    encoder = make_encoder("bi")
    encoder.config.doc_max_length = 6
    weights = fit_statistics(encoder, HELD_OUT, "tokens")
    targets = LexicalTargets(encoder, weights, analyzer="tokens", scale=0.5)
    texts = ["aa ab ac ad ae af ag ah", "ab ab ac", ""]
    for kind in ("doc", "query"):
        _, dense = targets.batch(texts, kind)
        csr = lexical.target_csr(targets.terms(texts, kind), encoder.vocab_size)
        assert csr.shape == tuple(dense.shape) and csr.dtype == np.float32
        np.testing.assert_array_equal(csr.toarray(), dense.numpy())
    assert lexical.target_csr([], 7).shape == (0, 7)


def test_loss_by_hand_and_the_pull_reaches_terms_that_are_off():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0]], requires_grad=True)
    target = torch.tensor([[1.0, 0.8, 0.0, 0.0]])
    parts = LexicalTargetLoss(pull_weight=2.0, off_weight=0.5)(logits, target)
    a = splade_activation(logits.detach())
    on = (a[0, 0] - 1.0) ** 2 + (0.0 - 0.8) ** 2
    assert float(parts["on"].detach()) == pytest.approx(float(on))
    # ReLU(-(-1)) on the own term that is off
    assert float(parts["pull"].detach()) == pytest.approx(1.0)
    assert float(parts["off"].detach()) == pytest.approx(float(a[0, 2] ** 2))
    assert float(parts["loss"].detach()) == pytest.approx(
        float(on + 2.0 * 1.0 + 0.5 * a[0, 2] ** 2)
    )
    parts["loss"].backward()
    assert logits.grad[0, 1] < 0  # gradient descent raises the own term that is off
    assert logits.grad[0, 3] == 0  # an off term below zero is left alone
    # without the pull the own term that is off gets no gradient at all (log(1 + ReLU) is flat)
    logits.grad = None
    LexicalTargetLoss(pull_weight=0.0)(logits, target)["loss"].backward()
    assert logits.grad[0, 1] == 0


def test_pooled_logits_activate_to_the_encoders_vectors():
    encoder = make_encoder("bi")
    batch = encoder.tokenize(HELD_OUT[:4], kind="doc")
    batch.pop("n_truncated")
    with torch.no_grad():
        reps = encoder(**batch)
        logits = encoder.pooled_logits(**batch)
    torch.testing.assert_close(splade_activation(logits), reps)
    assert (logits < 0).float().mean() > 0.5  # the sleeping head: most terms are off


def _held_out_share(encoder, weights) -> dict[str, float]:
    targets = LexicalTargets(encoder, weights, analyzer="tokens")
    batch, target = targets.batch(HELD_OUT, "doc")
    was_training = encoder.training
    encoder.eval()
    with torch.no_grad():
        reps = encoder(**batch)
    encoder.train(was_training)
    own = target > 0
    return {
        "share": float(own_share(reps, target)),
        "own_on": float(((reps > 0) & own).sum(dim=1).float().mean()),
        "off_mass": float((reps * ~own).sum(dim=1).mean()),
    }


def _adapt(
    adapt: AdaptationArguments, tmp_path, steps: int = 80, awake: bool = False
) -> tuple[dict, dict, list]:
    """Adapt a tiny `bi` model; its held-out own-word share and off-text mass before and after.

    `awake`: a plain random tiny model (half its logits positive: dense vectors) instead of the
    sleeping one (about 1% positive, as a pretrained LM's logits are)."""
    encoder = make_encoder("bi", backbone=tiny_model("llama", seed=0) if awake else None)
    encoder.config.query_max_length = 8
    encoder.config.doc_max_length = 16
    texts = run_texts(160, seed=3)
    weights = fit_statistics(encoder, texts, "tokens")
    before = _held_out_share(encoder, weights)
    dataset = Dataset.from_dict(
        {"text": texts, "query": [t.split()[0] + " " + t.split()[2] for t in texts]}
    )
    trainer = AdaptationTrainer(
        encoder,
        args=training_args(tmp_path, max_steps=steps, learning_rate=3e-3),
        adapt_args=adapt,
        lexical_targets=LexicalTargets(encoder, weights, analyzer="tokens", scale=0.5),
        train_dataset=dataset,
    )
    trainer.train()
    return before, _held_out_share(encoder, weights), trainer.state.log_history


def test_lexical_objective_puts_a_texts_weight_on_its_own_words(tmp_path):
    adapt = AdaptationArguments(lm_weight=0.0, relu_weight=0.0, lexical_weight=1.0)
    before, after, history = _adapt(adapt, tmp_path)
    assert before["share"] < 0.2  # the sleeping head: little of a vector on the text's own words
    assert after["share"] > 0.6 and after["share"] > before["share"] + 0.4
    assert after["own_on"] > 2 * before["own_on"]
    logged = [h for h in history if "loss" in h]
    assert {"lexical", "lex_d_on", "lex_d_pull", "lex_q_off", "lex_d_own", "lex_q_nnz"} <= set(
        logged[-1]
    )
    assert "mntp" not in logged[-1] and "nnz" not in logged[-1]  # no LM pass at lm_weight 0
    assert logged[-1]["lex_d_on"] < logged[0]["lex_d_on"]
    # Control: the paper's MNTP + L_ReLU alone, same steps, does not put the weight there
    _, control, _ = _adapt(AdaptationArguments(lexical_weight=0.0), tmp_path / "control")
    assert control["share"] < after["share"] - 0.3


def test_lexical_objective_switches_off_the_words_a_text_does_not_hold(tmp_path):
    adapt = AdaptationArguments(lm_weight=0.0, relu_weight=0.0, lexical_weight=1.0)
    before, after, _ = _adapt(adapt, tmp_path, awake=True)
    assert before["off_mass"] > 20 and before["share"] < 0.2  # a dense random head
    assert after["off_mass"] < before["off_mass"] / 4
    assert after["share"] > before["share"] + 0.4


def test_lexical_objective_combines_with_mntp(tmp_path):
    adapt = AdaptationArguments(lm_weight=1.0, relu_weight=1.0, lexical_weight=1.0)
    _, after, history = _adapt(adapt, tmp_path, steps=20)
    logged = [h for h in history if "loss" in h][-1]
    assert {"mntp", "relu", "lexical", "lex_d_on"} <= set(logged)
    assert logged["loss"] == pytest.approx(
        logged["mntp"] + logged["relu"] + logged["lexical"], rel=1e-4
    )


def test_run_adaptation_with_the_lexical_objective(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    corpus = tmp_path / "corpus.jsonl"
    with corpus.open("w") as f:
        for i, text in enumerate(run_texts(48, seed=4)):
            f.write(json.dumps({"_id": str(i), "title": "", "text": text + ". " + text}) + "\n")
    backbone = tmp_path / "backbone"
    sleeping_backbone().save_pretrained(backbone)
    tiny_tokenizer().save_pretrained(backbone)
    model_args = ModelArguments(
        model_name_or_path=str(backbone), variant="bi", head_bias_df=0.05, doc_max_length=16
    )
    adapt_args = AdaptationArguments(
        adapt_data=str(corpus),
        lm_weight=0.0,
        relu_weight=0.0,
        lexical_weight=1.0,
        lexical_target_analyzer="tokens",
    )
    calls = []
    original = SparseEncoder.calibrate_head_bias

    def counted(self, *args, **kwargs):
        calls.append(self.head_bias)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SparseEncoder, "calibrate_head_bias", counted)
    out = run_adaptation(model_args, adapt_args, training_args(tmp_path, max_steps=4))
    assert len(calls) == 1 and calls[0] is None  # before training only: the objective trains it
    reloaded = SparseEncoder.from_pretrained(out)
    record = reloaded.config.extra["adaptation"]
    assert record["lexical_targets"]["texts"] == 48
    assert record["adapt_args"]["lexical_weight"] == 1.0
    assert reloaded.head_bias is not None


def test_head_bias_learning_rate_gives_the_bias_its_own_group(tmp_path):
    moved = {}
    for lr in (None, 0.05):
        encoder = make_encoder("bi")
        encoder.head_bias = torch.nn.Parameter(torch.zeros(encoder.vocab_size))
        weights = fit_statistics(encoder, HELD_OUT, "tokens")
        texts = run_texts(40, seed=3)
        trainer = AdaptationTrainer(
            encoder,
            args=training_args(tmp_path / str(lr), max_steps=5, head_bias_learning_rate=lr),
            adapt_args=AdaptationArguments(lm_weight=0.0, relu_weight=0.0, lexical_weight=1.0),
            lexical_targets=LexicalTargets(encoder, weights, analyzer="tokens"),
            train_dataset=Dataset.from_dict({"text": texts, "query": texts}),
        )
        trainer.train()
        groups = trainer.optimizer.param_groups
        with_bias = [g for g in groups if any(p is encoder.head_bias for p in g["params"])]
        assert len(with_bias) == 1
        if lr is not None:
            assert with_bias[0]["params"] == [encoder.head_bias]
            assert with_bias[0]["initial_lr"] == lr and with_bias[0]["weight_decay"] == 0.0
            assert all(g["initial_lr"] == 1e-3 for g in groups if g is not with_bias[0])
        moved[lr] = float(encoder.head_bias.detach().abs().max())
    assert moved[0.05] > 10 * moved[None] > 0


def test_the_default_adaptation_is_the_papers():
    """lexical_weight defaults to 0: L_LM + L_ReLU as before, in the dataclass and in the shipped
    MNTP recipe; the lexical recipe turns it on alone."""
    from pathlib import Path

    from csplade.training.recipe import ADAPT_TYPES, parse_recipe

    default = AdaptationArguments()
    assert (default.lm_weight, default.relu_weight, default.lexical_weight) == (1.0, 1.0, 0.0)
    recipes = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-135m"
    shipped = parse_recipe(recipes / "adapt-bi.yaml", ["--use_cpu", "true"], types=ADAPT_TYPES)[1]
    assert shipped.lexical_weight == 0.0 and shipped.lm_weight == 1.0
    lexical = parse_recipe(recipes / "adapt-lexical-bi.yaml", ["--use_cpu", "true"],
                           types=ADAPT_TYPES)[1]  # fmt: skip
    assert (lexical.lm_weight, lexical.relu_weight, lexical.lexical_weight) == (0.0, 0.0, 1.0)
