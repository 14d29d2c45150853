"""The prefix cache: a frozen lower block's outputs kept per text give the forward, the gradients and
a training run of the uncached model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny import random_texts, tiny_model, tiny_tokenizer

from csplade.model import SparseEncoder, SparseEncoderConfig
from csplade.model.prefix_cache import PrefixCache
from csplade.training.arguments import ModelArguments
from csplade.training.loading import apply_lora, attach_prefix_cache

TEXTS = random_texts(12, min_words=5, max_words=14, seed=3)
# Gemma 3 with its layer types out of step with their index from the first trained block: a forward
# that enumerated the trained blocks from 0 would give block 2 a sliding window
GEMMA_LAYERS = {
    "num_hidden_layers": 4,
    "layer_types": [
        "sliding_attention",
        "sliding_attention",
        "full_attention",
        "sliding_attention",
    ],
}


def _encoder(arch: str, variant: str, trained: int = 1) -> SparseEncoder:
    overrides = GEMMA_LAYERS if arch == "gemma3" else {"num_hidden_layers": 3}
    backbone = tiny_model(arch, seed=1, **overrides).float()
    config = SparseEncoderConfig(base_model=f"tiny-{arch}", variant=variant, query_prefix="aa")
    encoder = SparseEncoder(backbone, tiny_tokenizer(), config)
    args = ModelArguments(use_lora=True, lora_r=4, lora_dropout=0.0, lora_last_layers=trained)
    apply_lora(encoder, args)
    with torch.no_grad():  # LoRA B starts at zero: give the adapter an effect
        for name, param in encoder.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return encoder


def _batch(encoder, texts, kind="doc"):
    batch = encoder.tokenize(texts, kind=kind)
    batch.pop("n_truncated")
    return batch


@pytest.mark.parametrize(
    ("arch", "variant"), [("llama", "bi"), ("llama", "uni"), ("qwen3", "bi"), ("gemma3", "bi")]
)
def test_cached_forward_equals_the_uncached_one(arch, variant):
    encoder = _encoder(arch, variant, trained=2 if arch == "gemma3" else 1)
    cached = copy.deepcopy(encoder)
    cache = attach_prefix_cache(cached, 2 if arch == "gemma3" else 1)
    batch = _batch(encoder, TEXTS[:6])
    with torch.no_grad():
        reference = encoder(**batch)
        first = cached(**batch)  # every text missing: lower blocks run, then the upper ones
        again = cached(**batch)  # every text cached: the upper blocks alone
    assert (cache.misses, cache.hits, len(cache)) == (6, 6, 6)
    torch.testing.assert_close(first, reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(again, first, rtol=0, atol=0)  # same batch shape: bitwise
    # another batch mixing cached and new texts, of another padded width
    mixed = _batch(encoder, [TEXTS[0], TEXTS[7], TEXTS[3], TEXTS[8]])
    with torch.no_grad():
        torch.testing.assert_close(cached(**mixed), encoder(**mixed), rtol=1e-5, atol=1e-6)
    assert cache.hits == 8 and cache.misses == 8


def test_the_cache_is_no_shortcut_when_the_lower_blocks_would_matter():
    """A cached state from another model's lower blocks changes the output: the upper blocks really
    read the cache (the test above cannot pass by running the lower blocks anyway)."""
    encoder = _encoder("llama", "bi")
    cache = attach_prefix_cache(encoder, 1)
    batch = _batch(encoder, TEXTS[:3])
    with torch.no_grad():
        before = encoder(**batch)
        for key in list(cache._states):
            cache._states[key] = cache._states[key] + 1.0
        assert not torch.allclose(encoder(**batch), before, atol=1e-3)


def test_gradients_through_the_cache_equal_the_uncached_ones():
    encoder = _encoder("llama", "bi")
    cached = copy.deepcopy(encoder)
    attach_prefix_cache(cached, 1)
    batch = _batch(encoder, TEXTS[:5])
    with torch.no_grad():
        cached(**batch)  # fill
    grads = []
    for model in (encoder, cached):
        model.zero_grad()
        model(**batch).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1]) and any("lora_A" in n for n in grads[0])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_states_cached_during_an_evaluation_serve_training():
    encoder = _encoder("llama", "bi")
    attach_prefix_cache(encoder, 1)
    encoder.encode(TEXTS[:4], show_progress=False)  # inference mode
    batch = _batch(encoder, TEXTS[:4])
    encoder(**batch).sum().backward()  # inference tensors would refuse to be saved for backward
    assert encoder.prefix_cache.hits == 4


def test_a_trained_lower_block_is_refused():
    encoder = _encoder("llama", "bi", trained=2)
    with pytest.raises(ValueError, match="frozen lower blocks.*block 1"):
        attach_prefix_cache(encoder, 1)  # blocks 1 and 2 train: block 1 cannot be cached
    with pytest.raises(ValueError, match="nothing would train"):
        PrefixCache.check_frozen(encoder.base_model.base_model, 3)


def test_left_padding_runs_uncached_and_a_full_cache_stops_adding():
    encoder = _encoder("llama", "bi")
    cache = attach_prefix_cache(encoder, 1)
    batch = _batch(encoder, TEXTS[:3])
    flipped = {k: v.flip(1) for k, v in batch.items()}
    with torch.no_grad():
        encoder(**flipped)
    assert len(cache) == 0 and cache.hits == cache.misses == 0
    cache.max_bytes = 1
    with torch.no_grad():
        out = encoder(**batch)
    assert cache.full and len(cache) == 0
    encoder.prefix_cache = None
    with torch.no_grad():
        torch.testing.assert_close(out, encoder(**batch))


def test_recipe_key_needs_lora_last_layers():
    with pytest.raises(ValueError, match="lora_last_layers"):
        ModelArguments(use_lora=True, cache_frozen_layers=True)
    ModelArguments(use_lora=True, lora_last_layers=2, cache_frozen_layers=True)


def test_a_training_run_with_the_cache_equals_one_without(tmp_path):
    """Three epochs of 5 steps over the same groups: steps 6-15 read every text from the cache."""
    from synthetic import save_base, write_groups

    from csplade.training.contrastive import run_training
    from csplade.training.recipe import parse_recipe

    base = save_base(tmp_path / "base")
    groups = write_groups(tmp_path / "groups.jsonl", n=40)
    outs = {}
    for cached in (False, True):
        argv = [
            "--model_name_or_path", str(base), "--train_data", str(groups),
            "--output_dir", str(tmp_path / f"out-{cached}"), "--per_device_train_batch_size", "8",
            "--group_size", "2", "--learning_rate", "3e-3", "--max_steps", "15", "--save_steps",
            "1000", "--use_cpu", "true", "--seed", "7", "--use_lora", "--lora_r", "4",
            "--lora_dropout", "0", "--lora_last_layers", "1", "--variant", "bi",
            "--cache_frozen_layers", str(cached).lower(),
        ]  # fmt: skip
        outs[cached] = run_training(*parse_recipe(None, argv))
    plain = SparseEncoder.from_pretrained(outs[False]).backbone.state_dict()
    with_cache = SparseEncoder.from_pretrained(outs[True]).backbone.state_dict()
    info = json.loads((outs[True] / "run_info.json").read_text())["prefix_cache"]
    # 40 groups x 2 documents + 40 queries, seen by 8 x 3 texts a step: later epochs hit
    assert info["hits"] > info["misses"] > 0 and info["bytes"] > 0
    assert "prefix_cache" not in json.loads((outs[False] / "run_info.json").read_text())
    lora = [k for k in plain if "lora_" in k]
    assert lora and all(".layers.1." in k for k in lora)
    for key in lora:
        torch.testing.assert_close(with_cache[key], plain[key], rtol=1e-4, atol=1e-6, msg=key)
