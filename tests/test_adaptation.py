"""The adaptation phase: loss pieces by hand, MNTP masking, and tiny models that actually adapt.

The "sleeping head" model. A tiny random model puts half of its logits above zero, which would make
the activation loss trivially satisfied. `sleeping_backbone` gives it the shape of a pretrained LM's
logits instead: the LM head is scaled by 10 (logit spread ~1.1) and every token embedding gets
+0.45·u while every LM-head row gets −0.45·u for one unit vector u, so the residual stream carries u
and all logits shift down (mean ≈ −2.5). About 1% of its logits are positive and its SPLADE vectors
have ~7 of 256 terms (checked as a precondition in `test_sleeping_backbone_precondition`).
"""

from __future__ import annotations

import json
import math
import types

import pytest
import torch
from datasets import Dataset
from tiny import tiny_model, tiny_tokenizer, tiny_words
from transformers import TrainerCallback

from csplade.data.sampling import (
    IGNORE_INDEX,
    AdaptationCollator,
    mntp_inputs,
    pick_mask_token_id,
)
from csplade.model import SparseEncoder, SparseEncoderConfig
from csplade.training.adaptation import (
    AdaptationTrainer,
    clm_loss,
    lm_loss,
    mntp_loss,
    next_token_targets,
    pooled_nnz,
    positive_fraction,
    relu_loss,
    resolve_objective,
    run_adaptation,
    token_logits,
)
from csplade.training.arguments import AdaptationArguments, CspladeTrainingArguments, ModelArguments

# --- helpers --------------------------------------------------------------------------------------

WORDS = tiny_words()


def run_texts(n: int, seed: int, min_words: int = 6, max_words: int = 13) -> list[str]:
    """Runs of consecutive tiny words ("ka kb kc …"): each token predicts the next one."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = int(torch.randint(0, len(WORDS), (1,), generator=g))
        length = int(torch.randint(min_words, max_words + 1, (1,), generator=g))
        out.append(" ".join(WORDS[(start + i) % len(WORDS)] for i in range(length)))
    return out


def sleeping_backbone(seed: int = 0):
    model = tiny_model("llama", seed=seed, tie_word_embeddings=False)
    with torch.no_grad():
        u = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))
        u /= u.norm()
        model.model.embed_tokens.weight += 0.45 * u
        model.lm_head.weight.mul_(10.0)
        model.lm_head.weight -= 0.45 * u
    return model


def make_encoder(variant: str = "uni", backbone=None) -> SparseEncoder:
    backbone = backbone if backbone is not None else sleeping_backbone()
    config = SparseEncoderConfig(base_model="tiny-llama", variant=variant)
    return SparseEncoder(backbone, tiny_tokenizer(), config)


def training_args(tmp_path, **overrides) -> CspladeTrainingArguments:
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        report_to="none",
        per_device_train_batch_size=8,
        max_steps=20,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        logging_steps=5,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return CspladeTrainingArguments(**kwargs)


HELD_OUT = run_texts(16, seed=99)


def measure(encoder: SparseEncoder, objective: str) -> dict[str, float]:
    """LM loss, L_ReLU, positive-logit fraction and SPLADE nnz on fixed held-out texts."""
    batch = AdaptationCollator(encoder.tokenizer, objective, max_length=32, seed=5)(HELD_OUT)
    targets = next_token_targets(batch["labels"])
    positions = targets != IGNORE_INDEX
    was_training = encoder.training
    encoder.eval()
    with torch.no_grad():
        logits = token_logits(encoder, batch["input_ids"], batch["attention_mask"], positions)
        tokenized = encoder.tokenize(HELD_OUT)
        tokenized.pop("n_truncated")
        reps = encoder(**tokenized)  # (B, V) SPLADE vectors of the unmasked texts
    encoder.train(was_training)
    return {
        "lm": float(lm_loss(logits, targets[positions])),
        "relu": float(relu_loss(logits, targets[positions])),
        "pos_frac": float(positive_fraction(logits)),
        "nnz": float((reps > 0).sum(dim=1).float().mean()),
    }


def texts_dataset(n: int = 200, seed: int = 1) -> Dataset:
    return Dataset.from_dict({"text": run_texts(n, seed)})


# --- pure functions -------------------------------------------------------------------------------


def test_relu_loss_is_the_lm_loss_on_splade_activations():
    logits = torch.tensor([[2.0, 0.0, -1.0], [-3.0, 1.0, 4.0]], requires_grad=True)
    targets = torch.tensor([0, 1])
    # activations: [log 3, 0, 0] and [0, log 2, log 5]
    want = -(math.log(3 / 5) + math.log(2 / (1 + 2 + 5))) / 2
    loss = relu_loss(logits, targets)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    loss.backward()
    # ReLU passes no gradient to non-positive logits
    assert logits.grad[0, 1] == 0 and logits.grad[0, 2] == 0 and logits.grad[1, 0] == 0
    assert logits.grad[0, 0] < 0 and logits.grad[1, 2] > 0  # the target up, a rival down
    # the encoder's logit scale applies before the activation: [log 5, 0, 0] for row 0
    scaled = relu_loss(logits[:1].detach(), targets[:1], logit_scale=2.0)
    assert scaled.item() == pytest.approx(-math.log(5 / 7), rel=1e-6)
    # ignored targets are left out, as in the LM loss
    ignored = relu_loss(logits.detach(), torch.tensor([0, IGNORE_INDEX]))
    assert ignored.item() == pytest.approx(-math.log(3 / 5), rel=1e-6)


def test_positive_fraction_and_pooled_nnz_hand_values():
    logits = torch.tensor(
        [
            [1.0, -1.0, -1.0, 0.0],  # text 0, position a: term 0
            [-1.0, 2.0, -1.0, -1.0],  # text 0, position b: term 1
            [-1.0, -1.0, -1.0, -3.0],  # text 1: nothing
        ]
    )
    assert positive_fraction(logits).item() == pytest.approx(2 / 12)  # 0.0 is not positive
    # text 0: terms {0, 1} -> 2; text 1: 0 -> mean 1; a text with no row is left out
    assert pooled_nnz(logits, [2, 1]).item() == pytest.approx(1.0)
    assert pooled_nnz(logits, [2, 0, 1]).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="counts"):
        pooled_nnz(logits, [2, 2])


def test_next_token_targets_and_clm_loss_alignment():
    labels = torch.tensor([[5, 6, 7, IGNORE_INDEX]])
    assert next_token_targets(labels).tolist() == [[6, 7, IGNORE_INDEX, IGNORE_INDEX]]
    vocab = 10
    # logits at position i are a confident guess of labels[i + 1]: loss ~ 0
    logits = torch.full((1, 4, vocab), -20.0)
    for i, token in enumerate([6, 7, 0, 0]):
        logits[0, i, token] = 20.0
    assert clm_loss(logits, labels).item() < 1e-6
    # the same guesses read as predicting position i itself: large loss
    assert lm_loss(logits, labels).item() > 10
    # no target at all: zero, not NaN
    assert lm_loss(logits, torch.full((1, 4), IGNORE_INDEX)).item() == 0.0


def test_mntp_masks_about_the_ratio_and_never_specials_pads_or_position_0():
    torch.manual_seed(0)
    batch, length, mask_id, special = 64, 200, 4, (2, 3)
    ids = torch.randint(10, 100, (batch, length))
    ids[:, 0] = 2  # BOS
    ids[:, 50] = 3  # an EOS inside
    attention = torch.ones(batch, length, dtype=torch.long)
    attention[:8, 150:] = 0  # padded rows
    gen = torch.Generator().manual_seed(1)
    masked_ids, labels = mntp_inputs(ids, attention, 0.2, mask_id, special, generator=gen)
    masked = labels != IGNORE_INDEX
    maskable = attention.bool().clone()
    maskable[:, 0] = False
    maskable[:, 50] = False
    ratio = masked.sum().item() / maskable.sum().item()
    assert ratio == pytest.approx(0.2, abs=0.01)
    assert not masked[~maskable].any()
    assert (labels[masked] == ids[masked]).all()  # labels hold the original tokens
    assert (masked_ids[masked] == mask_id).all()
    assert (masked_ids[~masked] == ids[~masked]).all()
    # deterministic given the generator; another seed gives other masks
    again = mntp_inputs(ids, attention, 0.2, mask_id, special, torch.Generator().manual_seed(1))
    other = mntp_inputs(ids, attention, 0.2, mask_id, special, torch.Generator().manual_seed(2))
    assert torch.equal(again[1], labels) and not torch.equal(other[1], labels)


def test_mntp_masks_at_least_one_token_per_text_with_maskable_tokens():
    ids = torch.tensor([[2, 11, 0, 0], [2, 0, 0, 0], [2, 12, 13, 14]])
    attention = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    for seed in range(20):
        _, labels = mntp_inputs(ids, attention, 0.01, 4, (2,), torch.Generator().manual_seed(seed))
        assert labels[0].tolist() == [IGNORE_INDEX, 11, IGNORE_INDEX, IGNORE_INDEX]
        assert (labels[1] == IGNORE_INDEX).all()  # BOS only: nothing to mask
        assert (labels[2] != IGNORE_INDEX).sum() >= 1


def test_mntp_predicts_masked_token_from_the_previous_position():
    ids = torch.tensor([[2, 20, 21, 22, 23, 24]])
    attention = torch.ones_like(ids)
    masked_ids, labels = mntp_inputs(ids, attention, 0.5, 4, (2,), torch.Generator().manual_seed(3))
    positions = (labels != IGNORE_INDEX).nonzero(as_tuple=True)[1].tolist()
    assert positions, "the draw must mask something"
    logits = torch.full((1, 6, 30), -20.0)
    for i in positions:
        logits[0, i - 1, ids[0, i]] = 20.0  # position i - 1 guesses masked token i
    assert mntp_loss(logits, labels).item() < 1e-6
    shifted = torch.full((1, 6, 30), -20.0)
    for i in positions:
        shifted[0, i, ids[0, i]] = 20.0  # the same guess at position i itself is wrong
    assert mntp_loss(shifted, labels).item() > 10
    # the targets of the logits are exactly the masked tokens, one position earlier
    targets = next_token_targets(labels)
    assert sorted((targets != IGNORE_INDEX).nonzero(as_tuple=True)[1].tolist()) == [
        i - 1 for i in positions
    ]


def test_selected_position_logits_match_the_full_logits():
    """The trainer's memory-saving path (head at scored positions only) equals the plain losses."""
    encoder = make_encoder("bi")
    for objective, reference in (("mntp", mntp_loss), ("clm", clm_loss)):
        batch = AdaptationCollator(encoder.tokenizer, objective, 32, seed=0)(HELD_OUT[:5])
        targets = next_token_targets(batch["labels"])
        positions = targets != IGNORE_INDEX
        with torch.no_grad():
            full = token_logits(encoder, batch["input_ids"], batch["attention_mask"])  # (B, L, V)
            sel = token_logits(encoder, batch["input_ids"], batch["attention_mask"], positions)
        assert sel.shape == (int(positions.sum()), full.shape[-1])
        torch.testing.assert_close(sel, full[positions])
        torch.testing.assert_close(
            lm_loss(sel, targets[positions]), reference(full, batch["labels"])
        )


def test_collator_pads_right_truncates_and_labels():
    tok = tiny_tokenizer()
    collator = AdaptationCollator(tok, "clm", max_length=4)
    out = collator([{"text": "aa ab"}, {"text": "ba bb bc bd be bf"}, {"text": ""}])
    ids, attention, labels = out["input_ids"], out["attention_mask"], out["labels"]
    assert ids.shape == (3, 4)
    assert attention.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]
    assert (labels[attention == 0] == IGNORE_INDEX).all()
    assert torch.equal(labels[attention == 1], ids[attention == 1])
    assert ids[1].tolist() == tok("ba bb bc bd", add_special_tokens=True)["input_ids"]
    assert (collator.n_texts, collator.n_full) == (3, 1)
    with pytest.raises(TypeError, match="example 1"):
        collator([{"text": "aa"}, {"text": None}])
    # MNTP: the tokenizer's mask token, same seed -> same masks
    a = AdaptationCollator(tok, "mntp", 32, seed=7)(HELD_OUT)
    b = AdaptationCollator(tok, "mntp", 32, seed=7)(HELD_OUT)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert (a["input_ids"][a["labels"] != IGNORE_INDEX] == tok.mask_token_id).all()


def test_mask_token_fallbacks():
    tok = tiny_tokenizer()
    assert pick_mask_token_id(tok) == tok.mask_token_id
    no_mask = types.SimpleNamespace(
        mask_token_id=None, unk_token_id=1, pad_token_id=0, convert_tokens_to_ids=lambda t: 1
    )
    assert pick_mask_token_id(no_mask) == 0  # "_" unknown -> pad
    blank = types.SimpleNamespace(
        mask_token_id=None, unk_token_id=1, pad_token_id=0, convert_tokens_to_ids=lambda t: 77
    )
    assert pick_mask_token_id(blank) == 77  # LLM2Vec's "_"


def test_objective_resolution():
    assert resolve_objective("auto", "bi") == "mntp"
    assert resolve_objective("auto", "uni") == "clm"
    assert resolve_objective("auto", "echo") == "clm"
    with pytest.raises(ValueError, match="copy task"):
        resolve_objective("clm", "bi")


# --- training on tiny models ----------------------------------------------------------------------


def test_sleeping_backbone_precondition():
    before = measure(make_encoder(), "clm")
    assert before["pos_frac"] < 0.03 and before["nnz"] < 15


def test_clm_relu_phase_lowers_its_loss_and_wakes_the_head(tmp_path):
    weight = 1.0
    encoder = make_encoder()
    before = measure(encoder, "clm")
    adapt = AdaptationArguments(relu_weight=weight)
    trainer = AdaptationTrainer(
        encoder, args=training_args(tmp_path), adapt_args=adapt, train_dataset=texts_dataset()
    )
    trainer.train()
    after = measure(encoder, "clm")
    assert after["lm"] + weight * after["relu"] < before["lm"] + weight * before["relu"] - 0.5
    assert after["lm"] < before["lm"] - 0.3
    assert after["pos_frac"] > 0.1 > 4 * before["pos_frac"]
    assert after["nnz"] > 5 * before["nnz"]
    # each loss part is logged, averaged over the steps since the last log
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 4
    for entry in logged:
        assert {"clm", "relu", "pos_frac", "nnz"} <= set(entry) and "mntp" not in entry
    assert logged[-1]["pos_frac"] > 4 * logged[0]["pos_frac"]
    assert logged[-1]["nnz"] > 4 * logged[0]["nnz"]
    assert logged[-1]["relu"] < logged[0]["relu"]

    # Control: the same run without L_ReLU leaves the head sleepier.
    control = make_encoder()
    trainer = AdaptationTrainer(
        control,
        args=training_args(tmp_path),
        adapt_args=AdaptationArguments(relu_weight=0.0),
        train_dataset=texts_dataset(),
    )
    trainer.train()
    sleepy = measure(control, "clm")
    assert sleepy["pos_frac"] < after["pos_frac"] / 1.5 and sleepy["nnz"] < after["nnz"]
    assert sleepy["relu"] > after["relu"]


def test_mntp_under_bi_lowers_its_loss(tmp_path):
    encoder = make_encoder("bi")
    before = measure(encoder, "mntp")
    adapt = AdaptationArguments(adapt_objective="auto", relu_weight=1.0)
    trainer = AdaptationTrainer(
        encoder,
        args=training_args(tmp_path, max_steps=60, learning_rate=5e-3),
        adapt_args=adapt,
        train_dataset=texts_dataset(),
    )
    assert trainer.objective == "mntp"
    trainer.train()
    after = measure(encoder, "mntp")
    assert after["lm"] < before["lm"] - 1.0
    assert after["pos_frac"] > 0.1
    assert all("mntp" in h and "clm" not in h for h in trainer.state.log_history if "loss" in h)


def test_lora_adaptation_moves_the_adapter_only(tmp_path):
    from csplade.training.loading import apply_lora

    encoder = make_encoder()
    apply_lora(encoder, ModelArguments(use_lora=True, lora_r=4, lora_dropout=0.0))
    base_before = {
        n: p.detach().clone() for n, p in encoder.named_parameters() if not p.requires_grad
    }
    lora_before = {n: p.detach().clone() for n, p in encoder.named_parameters() if p.requires_grad}
    assert lora_before and all("lora_" in n for n in lora_before)
    trainer = AdaptationTrainer(
        encoder,
        args=training_args(tmp_path, max_steps=5, learning_rate=1e-2),
        adapt_args=AdaptationArguments(),
        train_dataset=texts_dataset(40),
    )
    trainer.train()
    params = dict(encoder.named_parameters())
    for name, value in base_before.items():
        assert torch.equal(params[name], value), f"frozen base weight {name} changed"
    for name, value in lora_before.items():
        assert not torch.equal(params[name], value), f"adapter weight {name} did not move"


class _PoisonAfter(TrainerCallback):
    def __init__(self, step: int, encoder: SparseEncoder) -> None:
        self.step, self.encoder = step, encoder

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                self.encoder.base_model.model.norm.weight.fill_(float("nan"))


def test_non_finite_loss_stops_with_the_step(tmp_path):
    from csplade.training.base import NonFiniteLossError

    encoder = make_encoder()
    trainer = AdaptationTrainer(
        encoder,
        args=training_args(tmp_path, max_steps=6),
        adapt_args=AdaptationArguments(),
        train_dataset=texts_dataset(60),
        callbacks=[_PoisonAfter(2, encoder)],
    )
    with pytest.raises(NonFiniteLossError, match=r"optimizer step 3\b"):
        trainer.train()
    assert trainer.state.global_step == 2


def test_masked_lm_backbone_is_refused(tmp_path):
    encoder = SparseEncoder(
        tiny_model("bert"), tiny_tokenizer(bert_style=True), SparseEncoderConfig(base_model="b")
    )
    with pytest.raises(ValueError, match="causal"):
        AdaptationTrainer(encoder, args=training_args(tmp_path), train_dataset=texts_dataset(8))


# --- run_adaptation end to end --------------------------------------------------------------------


@pytest.fixture
def corpus_and_backbone(tmp_path, monkeypatch):
    """A BEIR-style corpus.jsonl and a saved sleeping tiny backbone (with its tokenizer).

    read_texts caches through `datasets`; the cache goes to tmp_path, not the user's cache.
    """
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    corpus = tmp_path / "corpus.jsonl"
    with corpus.open("w") as f:
        for i, text in enumerate(run_texts(48, seed=4)):
            f.write(json.dumps({"_id": str(i), "title": "", "text": text}) + "\n")
    backbone = tmp_path / "backbone"
    sleeping_backbone().save_pretrained(backbone)
    tiny_tokenizer().save_pretrained(backbone)
    return corpus, backbone


def _state(folder) -> dict[str, torch.Tensor]:
    encoder = SparseEncoder.from_pretrained(folder)
    return {k: v.clone() for k, v in encoder.base_model.state_dict().items()}


@pytest.mark.parametrize("merge", [True, False])
def test_run_adaptation_lora_saves_a_loadable_encoder(corpus_and_backbone, tmp_path, merge):
    from csplade.training.loading import load_encoder_for_training

    corpus, backbone = corpus_and_backbone
    out = tmp_path / "adapted"
    model_args = ModelArguments(
        model_name_or_path=str(backbone), use_lora=True, lora_r=4, lora_dropout=0.0
    )
    adapt_args = AdaptationArguments(
        adapt_data=str(corpus), merge_adapter=merge, max_adapt_texts=40
    )
    args = training_args(
        tmp_path, output_dir=str(out), max_steps=6, learning_rate=1e-2, save_strategy="steps"
    )
    args.save_steps = 3
    path = run_adaptation(model_args, adapt_args, args)
    assert path == out
    # the Trainer's checkpoints survive the final save, which sits at the top of the folder
    assert (out / "checkpoint-3").is_dir() and (out / "checkpoint-6").is_dir()
    reloaded = SparseEncoder.from_pretrained(out)
    assert reloaded.is_adapter is (not merge)
    assert reloaded.config.extra["adaptation"]["steps"] == 6
    assert reloaded.config.extra["adaptation"]["objective"] == "clm"
    original = _state(backbone)
    adapted = {k: v for k, v in reloaded.base_model.state_dict().items()}
    if merge:
        assert not (out / "adapter_config.json").exists()
        q = "model.layers.0.self_attn.q_proj.weight"
        assert not torch.equal(adapted[q], original[q]), "the merged adapter changed nothing"
        for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            assert torch.equal(adapted[name], original[name]), f"{name} is not a LoRA target"
    else:
        lora_b = [v for k, v in adapted.items() if "lora_B" in k]
        assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # LoRA B starts at zero
        base = {k.replace(".base_layer", ""): v for k, v in adapted.items() if "lora_" not in k}
        for name, value in original.items():
            assert torch.equal(base[name], value), f"base weight {name} changed"
    vectors = reloaded.encode_docs(["aa ab ac", "ba bb"], show_progress=False)
    assert vectors.shape == (2, reloaded.vocab_size)
    # the contrastive phase can start from it
    restarted = load_encoder_for_training(ModelArguments(model_name_or_path=str(out)))
    assert not restarted.is_adapter


def test_run_adaptation_bi_full_finetune(corpus_and_backbone, tmp_path, monkeypatch):
    corpus, backbone = corpus_and_backbone
    # adapt_data by name: a BEIR folder under $CSPLADE_DATA
    (tmp_path / "data" / "mini").mkdir(parents=True)
    corpus.rename(tmp_path / "data" / "mini" / "corpus.jsonl")
    monkeypatch.setenv("CSPLADE_DATA", str(tmp_path / "data"))
    out = tmp_path / "adapted-bi"
    path = run_adaptation(
        ModelArguments(model_name_or_path=str(backbone), variant="bi"),
        AdaptationArguments(adapt_data="mini"),
        training_args(tmp_path, output_dir=str(out), max_steps=4),
    )
    reloaded = SparseEncoder.from_pretrained(path)
    assert reloaded.config.variant == "bi" and not reloaded.is_adapter
    assert reloaded.config.extra["adaptation"]["objective"] == "mntp"
    assert reloaded.config.extra["adaptation"]["data"] == "mini"  # as given (a name here)
    original, adapted = _state(backbone), reloaded.base_model.state_dict()
    changed = [k for k in original if not torch.equal(original[k], adapted[k])]
    assert len(changed) > len(original) // 2  # a full fine-tune moves most tensors


@pytest.mark.parametrize("queries", [True, False])
def test_adaptation_calibrates_on_its_texts_and_their_query_length_spans(
    corpus_and_backbone, tmp_path, queries
):
    from csplade.data.texts import query_length_spans

    corpus, backbone = corpus_and_backbone
    out = tmp_path / "adapted"
    model_args = ModelArguments(
        model_name_or_path=str(backbone), head_bias_df=0.1, head_bias_queries=queries,
        query_max_length=4,
    )  # fmt: skip
    run_adaptation(
        model_args,
        AdaptationArguments(adapt_data=str(corpus), max_adapt_texts=40),
        training_args(tmp_path, output_dir=str(out), max_steps=2),
    )
    reloaded = SparseEncoder.from_pretrained(out)
    saved = reloaded.head_bias.detach().clone()
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()][:40]
    reloaded.head_bias = None
    k = math.ceil(0.9 * len(texts))
    want = reloaded.raw_max_logits(texts).kthvalue(k, 0).values
    if queries:
        spans = reloaded.raw_max_logits(query_length_spans(texts), kind="query")
        want = torch.maximum(want, spans.kthvalue(k, 0).values)
    torch.testing.assert_close(saved, -want)


def test_run_adaptation_refuses_bad_settings(tmp_path):
    model_args = ModelArguments(model_name_or_path="unused")
    with pytest.raises(ValueError, match="adapt_data"):
        run_adaptation(model_args, AdaptationArguments(), training_args(tmp_path))
    with pytest.raises(ValueError, match="copy task"):
        run_adaptation(
            ModelArguments(model_name_or_path="unused", variant="bi"),
            AdaptationArguments(adapt_data="x", adapt_objective="clm"),
            training_args(tmp_path),
        )
    qlora = ModelArguments(model_name_or_path="unused", use_lora=True, quantization="nf4")
    with pytest.raises(ValueError, match="merge_adapter"):
        run_adaptation(qlora, AdaptationArguments(adapt_data="x"), training_args(tmp_path))


def test_run_adaptation_resumes_exactly(corpus_and_backbone, tmp_path):
    """Resuming from a checkpoint gives the weights of the uninterrupted run.

    The resumed run starts from a *different* backbone: only the checkpoint's weights, optimizer
    state and data position can bring it to the same result.
    """
    corpus, backbone = corpus_and_backbone
    other = tmp_path / "other-backbone"
    sleeping_backbone(seed=1).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    adapt_args = AdaptationArguments(adapt_data=str(corpus))

    def run(start, out, **overrides):
        args = training_args(
            tmp_path, output_dir=str(out), max_steps=4, per_device_train_batch_size=4, **overrides
        )
        args.save_steps = 2
        return run_adaptation(ModelArguments(model_name_or_path=str(start)), adapt_args, args)

    full = run(backbone, tmp_path / "full", save_strategy="steps")
    resumed = run(other, tmp_path / "resumed", resume_from_checkpoint=str(full / "checkpoint-2"))
    a, b = _state(full), _state(resumed)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    assert not torch.equal(_state(other)["lm_head.weight"], _state(backbone)["lm_head.weight"])


def test_mntp_scores_l_relu_at_every_position_and_the_lm_loss_at_masked_ones(tmp_path):
    encoder = make_encoder("bi")
    trainer = AdaptationTrainer(
        encoder,
        args=training_args(tmp_path, max_steps=1),
        adapt_args=AdaptationArguments(relu_weight=1.0),
        train_dataset=texts_dataset(8),
    )
    batch = trainer.data_collator(run_texts(8, seed=3))
    seen = {}
    forward = trainer.model.forward

    def spy(**kwargs):
        seen["positions"] = kwargs["positions"].clone()
        return forward(**kwargs)

    trainer.model.forward = spy
    loss = trainer.compute_loss(trainer.model, batch)
    every = batch["attention_mask"].sum(dim=1) - 1  # each text's tokens that have a next token
    assert seen["positions"].sum(dim=1).tolist() == every.tolist()
    masked = (batch["labels"] != IGNORE_INDEX).sum()
    assert 0 < masked < every.sum()  # MNTP's own targets are a subset
    # the loss is the MNTP loss on masked targets plus L_ReLU on every next token
    with torch.no_grad():
        logits = token_logits(
            encoder, batch["input_ids"], batch["attention_mask"], seen["positions"]
        )
    mntp = lm_loss(logits, next_token_targets(batch["labels"])[seen["positions"]])
    relu = relu_loss(logits, next_token_targets(batch["tokens"])[seen["positions"]])
    assert loss.item() == pytest.approx((mntp + relu).item(), rel=1e-5)
