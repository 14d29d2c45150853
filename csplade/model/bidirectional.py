"""Bidirectional attention for causal LMs: the `bi` variant of CSPLADE.

What: `make_bidirectional(model)` turns a decoder-only transformer (Llama, Mistral, Qwen2, Qwen3,
Gemma3-text) into one whose tokens attend to the whole text, left and right, so the representation of
an early token can draw on what follows it. `is_bidirectional(model)` reports the state.

Why: a causal backbone used as a SPLADE encoder gives early tokens no view of the rest of the text.
CSPLADE (arXiv 2504.10816) has a `bi` variant that lifts the causal mask, as LLM2Vec does, and adapts
the model to it with a short masked-next-token phase (that phase lives in `adaptation.py`).

How: no attention or model class is copied or patched. transformers has one switch for this since
huggingface/transformers#43705 (tested on 5.23), the config attribute `is_causal`:
  * `create_causal_mask` and `create_sliding_window_causal_mask` (masking_utils) fall back to
    `create_bidirectional_mask` / `create_bidirectional_sliding_window_mask` when it is False, for every
    mask backend of `AttentionMaskInterface` (eager, sdpa, flex_attention, flash_attention_*); the
    2D `attention_mask` is still applied, so padded keys stay masked;
  * the base model's `forward` (decorated with `merge_with_config_defaults`) passes `is_causal=False`
    down to the attention functions, which take it over the attention modules' own `is_causal`
    attribute: that is what sdpa uses when no mask is materialised (no padding) and what flash
    attention always uses.
So the whole swap is `config.is_causal = False`. It lives in the model's own config, hence it is scoped
to this model (nothing global is registered or patched), survives `copy.deepcopy`, survives a change of
`config._attn_implementation` (e.g. `model.set_attn_implementation("sdpa")`), is shared with a peft
wrapper (same config object), and is written by `save_pretrained`: reloading the checkpoint with plain
transformers gives the bidirectional model again. A single call can still run causally with
`model(..., is_causal=True)`. Before switching, `make_bidirectional` probes the installed transformers
and raises if its mask factory ignores the switch (an older release would otherwise stay silently
causal). `make_causal` switches back: csplade loads a checkpoint saved by `bi` as any other variant
through it, so the variant asked for, not the saved config, decides the attention.

Sliding-window layers (Mistral with `sliding_window` set, Gemma3's local layers): we keep them local and
make the window symmetric, as transformers defines it for bidirectional sliding layers: with window W a
token sees the keys at distance |i - j| <= W (W before, itself, W after), where causally it saw W keys
(W - 1 before and itself). Full attention was rejected: it would turn layers pretrained as local into
global ones (different behaviour and quadratic cost on the layers meant to be cheap), while the symmetric
window keeps every key the causal model saw and adds the mirrored context.

Known limits:
  * flash_attention_2/3/4 implement the window through the kernel's `window_size=(W - 1, W - 1)`, i.e.
    |i - j| <= W - 1: on sliding layers they see one key fewer on each side than eager/sdpa/flex.
    The difference comes from transformers (5.23) itself; full-attention layers agree everywhere.
  * Padding-free packing (several texts in one row, told apart only by `position_ids`) is not isolated
    under `bi` with eager/sdpa/flex: the bidirectional masks ignore `position_ids`. Pad instead.
  * Gemma3 checkpoints that are already bidirectional through their own config flag
    (`use_bidirectional_attention`, e.g. EmbeddingGemma, whose window is exclusive and halved) are
    reported as bidirectional and left untouched.
  * The multimodal `gemma3` (Gemma3ForConditionalGeneration) is not on the allow-list: for inputs with
    images it builds its sliding masks from a causal window overlay, which under the fallback bounds
    the window behind a token but not ahead of it. Use the text model (`gemma3_text`).
  * A bidirectional model is an encoder: `generate` with a KV cache is meaningless for it.
"""

from __future__ import annotations

import inspect
import logging

import torch
import transformers
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel, masking_utils

logger = logging.getLogger(__name__)

# config.model_type values whose masks are all built by transformers' masking_utils from the model's
# own config (so `config.is_causal = False` reaches every layer); each one has a test per attention
# implementation in tests/test_bidirectional.py. Add an architecture only together with its test.
SUPPORTED_ARCHITECTURES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")

_MAX_WRAPPER_DEPTH = 8  # PeftModel -> LoraModel -> *ForCausalLM is 2; more means something odd


def _unwrap(model: nn.Module) -> PreTrainedModel:
    """The transformers model inside `model` (itself, or under peft's PeftModel / LoraModel)."""
    current = model
    for _ in range(_MAX_WRAPPER_DEPTH):
        if isinstance(current, PreTrainedModel):
            return current
        get_base_model = getattr(current, "get_base_model", None)  # peft.PeftModel
        inner = get_base_model() if callable(get_base_model) else getattr(current, "model", None)
        if not isinstance(inner, nn.Module) or inner is current:  # peft's LoraModel keeps `.model`
            break
        current = inner
    raise TypeError(
        f"expected a transformers PreTrainedModel or a peft wrapper around one, got "
        f"{type(model).__name__} (no PreTrainedModel found inside it)"
    )


def _checked_config(model: nn.Module):
    """The unwrapped model's config, after checking its architecture is on the allow-list."""
    config = _unwrap(model).config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"bidirectional attention is not supported for model_type {model_type!r}; "
            f"supported model types: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return config


def _natively_bidirectional(config) -> bool:
    """Gemma3 checkpoints trained bidirectional carry their own flag (and their own window rule)."""
    return bool(getattr(config, "use_bidirectional_attention", False))


def _cache_keyword() -> str:
    """`create_causal_mask`'s name for the KV cache: `cache` (transformers 5.24 on; the old name
    `past_key_values` warns there and goes in 5.40), `past_key_values` before."""
    parameters = inspect.signature(masking_utils.create_causal_mask).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _check_transformers_honours_is_causal() -> None:
    """Fail loudly where `config.is_causal = False` would be silently ignored (transformers before
    the switch existed, huggingface/transformers#43705): ask the mask factory for a 3-token mask
    whose last key is padding and check that token 0 may attend to token 1."""
    probe = PreTrainedConfig()
    probe._attn_implementation = "eager"
    probe.is_causal = False
    no_cache = {_cache_keyword(): None}
    mask = masking_utils.create_causal_mask(
        probe, torch.zeros(1, 3, 1), torch.tensor([[1, 1, 0]]), **no_cache
    )  # (1, 1, 3, 3) additive
    if mask is None or mask[0, 0, 0, 1] != 0:
        raise RuntimeError(
            f"transformers {transformers.__version__} ignores config.is_causal=False when building "
            "attention masks; csplade's bidirectional variant needs a transformers release that "
            "honours it (5.23 is tested)"
        )


def is_bidirectional(model: nn.Module) -> bool:
    """Whether `model` (a supported causal LM, its base model, or a peft wrapper) attends both ways.

    Raises ValueError for an architecture not in SUPPORTED_ARCHITECTURES: we do not guess for models
    whose masks we have not tested.
    """
    config = _checked_config(model)
    return _natively_bidirectional(config) or not getattr(config, "is_causal", True)


def make_bidirectional(model: nn.Module) -> nn.Module:
    """Switch `model` to bidirectional attention in place and return it (idempotent).

    Works on a *ForCausalLM, its base model (e.g. LlamaModel) or a peft wrapper, before or after
    `get_peft_model` (the wrapper shares the config). Raises ValueError for an architecture not in
    SUPPORTED_ARCHITECTURES, TypeError when no transformers model is found inside `model`.
    """
    config = _checked_config(model)
    if _natively_bidirectional(config):
        logger.info("%s is already bidirectional (use_bidirectional_attention)", config.model_type)
        return model
    if getattr(config, "is_causal", True):
        _check_transformers_honours_is_causal()
        config.is_causal = False
        logger.info("%s switched to bidirectional attention", config.model_type)
    return model


def make_causal(model: nn.Module) -> nn.Module:
    """Undo :func:`make_bidirectional` in place (``config.is_causal = True``) and return `model`.

    A checkpoint saved by the ``bi`` variant keeps ``is_causal: false`` in its ``config.json``;
    loaded as another variant it must attend causally again (:func:`csplade.model.io.load` calls
    this). Only the allow-listed architectures that csplade switches are touched; a Gemma3 checkpoint
    bidirectional by its own flag cannot be made causal and stays as it is (with a warning); any
    other model is returned unchanged.
    """
    config = _unwrap(model).config
    if getattr(config, "model_type", None) not in SUPPORTED_ARCHITECTURES:
        return model
    if _natively_bidirectional(config):
        logger.warning(
            "%s is bidirectional by its own config (use_bidirectional_attention) and stays so",
            config.model_type,
        )
        return model
    if getattr(config, "is_causal", True) is False:
        config.is_causal = True
        logger.info(
            "%s was saved bidirectional: switched back to causal attention", config.model_type
        )
    return model
