"""Tests for csplade.model.bidirectional: the `bi` switch on tiny random backbones of every allowed architecture.

What is checked, per architecture and attention implementation: later tokens reach earlier positions under
`bi` and never under the untouched model; padded keys (right or left) never reach real tokens; the
implementations agree; the switch survives peft (both orders), deepcopy, a change of attention
implementation and a save/reload, and stays scoped to the model it was applied to; sliding-window layers
use the documented symmetric window; unsupported architectures are refused with the allow-list.

flex_attention on CPU: compiling its kernels took 12-70 s per new shape on the 2-core dev machine, so these
tests run torch's uncompiled reference flex path (same BlockMask, same mask functions; dynamo disabled by
an autouse fixture). Checked once by hand with the compiled path: same hidden states as eager on real
positions (max abs diff ~1e-6). flash_attention_2 runs only where flash_attn and a CUDA device exist.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny import CAUSAL_ARCHS, tiny_model
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, masking_utils
from transformers.utils import is_flash_attn_2_available, is_torch_flex_attn_available

from csplade.model.bidirectional import (
    SUPPORTED_ARCHITECTURES,
    is_bidirectional,
    make_bidirectional,
)

try:
    import torch.nn.attention.flex_attention as flex_module
except ImportError:  # torch without flex attention
    flex_module = None

FLEX_OK = (
    is_torch_flex_attn_available()
    and flex_module is not None
    and hasattr(flex_module, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG")
)
FLASH_OK = is_flash_attn_2_available()  # needs the flash_attn package and a CUDA device

IMPLS = [
    "eager",
    "sdpa",
    pytest.param(
        "flex_attention",
        marks=pytest.mark.skipif(
            not FLEX_OK, reason="torch flex_attention (with its uncompiled path) unavailable"
        ),
    ),
    pytest.param(
        "flash_attention_2",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not FLASH_OK, reason="flash_attn not installed or no CUDA device"),
        ],
    ),
]

FIRST_WORD_ID = 7  # ids 0..6 are the tiny tokenizer's specials; 0 is <pad>
VOCAB = 256
CHANGED = 1e-4  # a difference above this means "the token reached this position"


def _tol(impl: str) -> float:
    """Allowed numerical difference between two computations that should agree."""
    return 2e-2 if impl.startswith("flash") else 1e-5  # flash runs in bfloat16


@pytest.fixture(autouse=True)
def _uncompiled_flex(monkeypatch):
    if FLEX_OK:
        monkeypatch.setattr(flex_module, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", True)
    with torch._dynamo.config.patch(disable=True):
        yield


def _build(arch: str, impl: str, bi: bool = True, **overrides):
    model = tiny_model(arch, impl, **overrides)
    if impl.startswith("flash"):
        model = model.to("cuda", torch.bfloat16)
    return make_bidirectional(model) if bi else model


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_WORD_ID, VOCAB, (batch, length), generator=g)  # (B, L)


def _other_word(ids: torch.Tensor) -> torch.Tensor:
    """A different word id at every position."""
    n_words = VOCAB - FIRST_WORD_ID
    return (ids - FIRST_WORD_ID + 1) % n_words + FIRST_WORD_ID


@torch.no_grad()
def _hidden(model, input_ids, attention_mask=None, use_cache=False) -> torch.Tensor:
    """Last hidden state of the transformer inside a *ForCausalLM, as float32 on CPU."""
    device = model.device
    out = model.model(
        input_ids=input_ids.to(device),
        attention_mask=None if attention_mask is None else attention_mask.to(device),
        use_cache=use_cache,
    )
    return out.last_hidden_state.float().cpu()  # (B, L, H)


@torch.no_grad()
def _logits(model, input_ids) -> torch.Tensor:
    return model(input_ids=input_ids, use_cache=False).logits.float()  # (B, L, V)


def _first_position_shift(model, ids: torch.Tensor) -> float:
    """How much position 0 moves when the last token of each text changes."""
    changed = ids.clone()
    changed[:, -1] = _other_word(changed[:, -1])
    return (_hidden(model, ids)[:, 0] - _hidden(model, changed)[:, 0]).abs().max().item()


def _reach(model, length: int) -> torch.Tensor:
    """(L, L) bool: reach[i, j] is True when changing token j changes the output at position i."""
    base = _ids(1, length, seed=1)
    batch = base.repeat(length + 1, 1)  # row 0: the base text; row j + 1: token j replaced
    idx = torch.arange(length)
    batch[idx + 1, idx] = _other_word(base[0])
    h = _hidden(model, batch)  # (L + 1, L, H)
    return ((h[1:] - h[:1]).abs().amax(-1) > CHANGED).T  # (L, L) indexed [query i, token j]


def _padded_batch(side: str, long: int = 10, short: int = 6):
    """Two texts; the second is `short` tokens, padded on `side`. Returns ids, mask, pad, real slices."""
    ids = _ids(2, long)
    mask = torch.ones_like(ids)
    if side == "right":
        pad, real = slice(short, None), slice(0, short)
    else:
        pad, real = slice(0, long - short), slice(long - short, None)
    mask[1, pad] = 0
    return ids, mask, pad, real


# --- causality ---------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", CAUSAL_ARCHS)
def test_later_token_reaches_first_position_only_under_bi(arch, impl):
    ids = _ids(2, 10)
    uni = _build(arch, impl, bi=False)
    bi = _build(arch, impl, bi=True)
    assert _first_position_shift(uni, ids) <= _tol(impl) / 10
    assert _first_position_shift(bi, ids) > CHANGED


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_a_single_call_can_still_run_causally(impl):
    ids = _ids(2, 9)
    changed = ids.clone()
    changed[:, -1] = _other_word(changed[:, -1])
    model = _build("qwen2", impl)
    with torch.no_grad():
        first = model(input_ids=ids, use_cache=False, is_causal=True).logits[:, 0]
        first_changed = model(input_ids=changed, use_cache=False, is_causal=True).logits[:, 0]
    assert torch.equal(first, first_changed)
    assert is_bidirectional(model)  # the per-call override does not stick
    assert _first_position_shift(model, ids) > CHANGED


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", CAUSAL_ARCHS)
def test_gradient_flows_from_first_position_to_later_tokens_only_under_bi(arch, impl):
    ids = _ids(2, 8)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # a padded row, so sdpa gets a materialised mask too
    for bi in (False, True):
        model = _build(arch, impl, bi=bi)
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)  # (B, L, H)
        hidden = model.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
        hidden.last_hidden_state[:, 0].sum().backward()
        grad_later = embeds.grad[0, 1:].abs().max().item()  # from position 0 to tokens 1..L-1
        grad_pad = embeds.grad[1, 6:].abs().max().item()  # padded tokens: never
        assert grad_pad == 0.0
        if bi:
            assert grad_later > 0.0
        else:
            assert grad_later == 0.0


# --- padding -----------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", CAUSAL_ARCHS)
def test_padded_keys_never_reach_real_tokens(arch, impl, side):
    model = _build(arch, impl)
    ids, mask, pad, real = _padded_batch(side)
    with_pad_token = ids.clone()
    with_pad_token[1, pad] = 0  # <pad>; `ids` keeps random words in the padded slots
    h_pad = _hidden(model, with_pad_token, mask)
    h_words = _hidden(model, ids, mask)
    tol = _tol(impl)
    assert torch.allclose(h_pad[1, real], h_words[1, real], atol=tol, rtol=0)
    assert torch.allclose(h_pad[0], h_words[0], atol=tol, rtol=0)  # the unpadded text too
    # and the padded text reads the same as when it is run alone (RoPE is relative: left padding
    # shifts absolute positions without changing attention scores)
    alone = _hidden(model, ids[1:2, real])
    assert torch.allclose(h_pad[1, real], alone[0], atol=10 * tol, rtol=0)


# --- implementations, cache, attention switch -------------------------------------------------------


@pytest.mark.parametrize("arch", CAUSAL_ARCHS)
def test_attention_implementations_agree_under_bi(arch):
    ids, mask, _, _ = _padded_batch("right")
    real = mask.bool()
    reference = _build(arch, "eager")
    others = ["sdpa"] + (["flex_attention"] if FLEX_OK else [])
    for impl in others:
        model = _build(arch, impl)
        for m in (mask, None):  # with padding (materialised masks) and without (mask-free paths)
            want = _hidden(reference, ids, m)
            got = _hidden(model, ids, m)
            keep = real if m is not None else torch.ones_like(real)
            assert torch.allclose(got[keep], want[keep], atol=1e-5, rtol=0), (impl, m is None)


@pytest.mark.parametrize("arch", CAUSAL_ARCHS)
def test_switching_attention_implementation_keeps_bi(arch):
    ids, mask, _, _ = _padded_batch("right")
    model = _build(arch, "eager")
    before = _hidden(model, ids, mask)
    model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "sdpa"
    assert is_bidirectional(model)
    after = _hidden(model, ids, mask)
    real = mask.bool()
    assert torch.allclose(after[real], before[real], atol=1e-5, rtol=0)
    assert _first_position_shift(model, ids) > CHANGED  # sdpa without padding: no mask at all


@pytest.mark.parametrize("arch", CAUSAL_ARCHS)
def test_a_kv_cache_does_not_change_a_single_forward(arch):
    ids, mask, _, _ = _padded_batch("left")
    model = _build(arch, "sdpa")
    real = mask.bool()
    with_cache = _hidden(model, ids, mask, use_cache=True)
    without = _hidden(model, ids, mask, use_cache=False)
    assert torch.allclose(with_cache[real], without[real], atol=1e-6, rtol=0)


# --- sliding windows ---------------------------------------------------------------------------

WINDOW = 4


def _one_sliding_layer(arch: str) -> dict:
    overrides = {"num_hidden_layers": 1, "sliding_window": WINDOW}
    if arch == "gemma3":
        overrides["layer_types"] = ["sliding_attention"]
    return overrides


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ["gemma3", "mistral"])
def test_sliding_layers_get_a_symmetric_window(arch, impl):
    """Causal window W: keys W-1 back and itself. Bidirectional: keys with |i - j| <= W
    (flash attention's kernel window gives |i - j| <= W - 1, see the module docstring)."""
    length = 3 * WINDOW
    offset = torch.arange(length)[:, None] - torch.arange(length)[None, :]  # (L, L): i - j
    radius = WINDOW - 1 if impl.startswith("flash") else WINDOW
    uni = _reach(_build(arch, impl, bi=False, **_one_sliding_layer(arch)), length)
    bi = _reach(_build(arch, impl, bi=True, **_one_sliding_layer(arch)), length)
    assert torch.equal(uni, (offset >= 0) & (offset < WINDOW))
    assert torch.equal(bi, offset.abs() <= radius)


def test_gemma3_two_layer_model_mixes_sliding_and_full_layers():
    # tiny gemma3: a sliding layer (W = 4) then a full layer; under bi every token reaches every
    # position through the full layer, under uni only earlier ones do
    length = 10
    offset = torch.arange(length)[:, None] - torch.arange(length)[None, :]
    assert torch.equal(_reach(_build("gemma3", "eager", bi=False), length), offset >= 0)
    assert _reach(_build("gemma3", "eager"), length).all()


def test_gemma3_with_its_own_bidirectional_flag_is_left_alone():
    # EmbeddingGemma-style config: bidirectional with an exclusive, halved window (4 // 2 + 1 = 3)
    model = tiny_model(
        "gemma3", "eager", use_bidirectional_attention=True, **_one_sliding_layer("gemma3")
    )
    native_window = model.config.sliding_window
    length = 3 * WINDOW
    offset = torch.arange(length)[:, None] - torch.arange(length)[None, :]
    assert is_bidirectional(model)
    before = _reach(model, length)
    assert torch.equal(before, offset.abs() < native_window)
    assert make_bidirectional(model) is model
    assert torch.equal(_reach(model, length), before)


# --- the switch itself: idempotence, wrappers, copies, persistence, scope --------------------------


@pytest.mark.parametrize("arch", CAUSAL_ARCHS)
def test_make_bidirectional_is_idempotent(arch):
    ids = _ids(2, 9)
    once = _build(arch, "sdpa")
    twice = _build(arch, "sdpa")
    assert make_bidirectional(twice) is twice
    assert is_bidirectional(once) and is_bidirectional(twice)
    assert torch.equal(_hidden(once, ids), _hidden(twice, ids))


def test_base_model_is_accepted_and_shares_the_switch():
    causal = tiny_model("llama", "sdpa")
    assert make_bidirectional(causal.model) is causal.model
    assert is_bidirectional(causal)
    assert _first_position_shift(causal, _ids(2, 9)) > CHANGED


@pytest.mark.parametrize("order", ["before_peft", "after_peft"])
@pytest.mark.parametrize("arch", CAUSAL_ARCHS)
def test_works_through_peft_in_both_orders(arch, order):
    ids = _ids(2, 9)
    changed = ids.clone()
    changed[:, -1] = _other_word(changed[:, -1])
    reference = _build(arch, "eager")  # LoRA starts as a no-op (B = 0): same outputs expected
    model = tiny_model(arch, "eager")
    if order == "before_peft":
        make_bidirectional(model)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    if order == "after_peft":
        assert make_bidirectional(peft_model) is peft_model
    assert is_bidirectional(peft_model) and is_bidirectional(peft_model.base_model)
    peft_model.eval()
    got = _logits(peft_model, ids)
    assert torch.allclose(got, _logits(reference, ids), atol=1e-5, rtol=0)
    assert (got[:, 0] - _logits(peft_model, changed)[:, 0]).abs().max() > CHANGED


def test_lora_model_without_peft_model_is_accepted():
    peft_model = get_peft_model(tiny_model("qwen3"), LoraConfig(r=4, target_modules=["q_proj"]))
    lora_model = peft_model.base_model  # peft's LoraModel
    assert make_bidirectional(lora_model) is lora_model
    assert is_bidirectional(peft_model)


def test_deepcopy_keeps_bi_and_the_switch_stays_with_its_model():
    ids = _ids(2, 9)
    uni = _build("llama", "sdpa", bi=False)
    bi = make_bidirectional(copy.deepcopy(uni))
    assert not is_bidirectional(uni)
    assert _first_position_shift(uni, ids) == 0.0  # the original, same process, still causal
    clone = copy.deepcopy(bi)
    assert is_bidirectional(clone)
    assert _first_position_shift(clone, ids) > CHANGED
    assert torch.equal(_hidden(clone, ids), _hidden(bi, ids))


def test_saved_checkpoint_reloads_bidirectional(tmp_path):
    ids, mask, _, _ = _padded_batch("right")
    model = _build("qwen3", "sdpa")
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert is_bidirectional(reloaded)
    assert torch.allclose(
        _hidden(reloaded, ids, mask), _hidden(model, ids, mask), atol=1e-6, rtol=0
    )
    assert _first_position_shift(reloaded, ids) > CHANGED


# --- allow-list --------------------------------------------------------------------------------


def test_allow_list_is_exactly_the_tested_architectures():
    tested = {tiny_model(arch).config.model_type for arch in CAUSAL_ARCHS}
    assert tested == set(SUPPORTED_ARCHITECTURES)


def _tiny_gpt2():
    config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=1, n_head=4)
    return GPT2LMHeadModel(config)


@pytest.mark.parametrize(
    "build, model_type", [(lambda: tiny_model("bert"), "bert"), (_tiny_gpt2, "gpt2")]
)
def test_unsupported_architecture_is_refused_with_the_allowed_list(build, model_type):
    model = build()
    for fn in (make_bidirectional, is_bidirectional):
        with pytest.raises(ValueError) as err:
            fn(model)
        message = str(err.value)
        assert repr(model_type) in message
        assert all(arch in message for arch in SUPPORTED_ARCHITECTURES)
    assert getattr(model.config, "is_causal", None) is None  # nothing was changed on the way out


def test_a_module_that_is_no_transformers_model_is_refused():
    with pytest.raises(TypeError, match="Linear"):
        make_bidirectional(nn.Linear(2, 2))


def test_a_transformers_that_ignores_the_switch_is_refused(monkeypatch):
    def causal_only(config, inputs_embeds, attention_mask, past_key_values=None, **kwargs):
        n = inputs_embeds.shape[1]
        return torch.full((1, 1, n, n), float("-inf")).triu(1)  # (1, 1, L, L), ignores config

    monkeypatch.setattr(masking_utils, "create_causal_mask", causal_only)
    model = tiny_model("llama")
    with pytest.raises(RuntimeError, match="is_causal"):
        make_bidirectional(model)
    assert not is_bidirectional(model)


def test_the_probe_passes_no_deprecated_keyword():
    """transformers 5.24 renamed create_causal_mask's `past_key_values` to `cache` (the old name
    warns and goes in 5.40): the probe of make_bidirectional uses the installed name."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model = make_bidirectional(tiny_model("llama"))
    assert is_bidirectional(model)


@pytest.mark.parametrize("variant", ["uni", "echo"])
def test_a_bi_checkpoint_loaded_as_another_variant_attends_causally(tmp_path, variant):
    """A `bi` folder keeps is_causal: false in its config.json (plain transformers reloads it
    bidirectional); csplade loads it as the variant asked for, causal for uni and echo."""
    from tiny import tiny_tokenizer

    from csplade.model import SparseEncoder, SparseEncoderConfig

    bi = SparseEncoder(tiny_model("llama"), tiny_tokenizer(), SparseEncoderConfig(variant="bi"))
    bi.save_pretrained(tmp_path / "bi")
    assert json.loads((tmp_path / "bi" / "config.json").read_text())["is_causal"] is False
    assert is_bidirectional(AutoModelForCausalLM.from_pretrained(tmp_path / "bi"))
    loaded = SparseEncoder.from_pretrained(tmp_path / "bi", variant=variant)
    assert loaded.config.variant == variant and not is_bidirectional(loaded.backbone)
    fresh = SparseEncoder(
        tiny_model("llama"), tiny_tokenizer(), SparseEncoderConfig(variant=variant)
    )  # the same weights, never switched
    texts = ["aa ab ac ad", "ba bb bc"]
    got = torch.from_numpy(loaded.encode_docs(texts, show_progress=False).toarray())
    want = torch.from_numpy(fresh.encode_docs(texts, show_progress=False).toarray())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    as_bi = SparseEncoder.from_pretrained(tmp_path / "bi", variant="bi")
    assert is_bidirectional(as_bi.backbone)
    bi_vectors = torch.from_numpy(as_bi.encode_docs(texts, show_progress=False).toarray())
    assert (bi_vectors - want).abs().max() > 1e-2  # the attention really differs
