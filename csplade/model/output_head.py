"""Where the LM head's weight comes from: a plain linear map, a LoRA-wrapped one, or a module to call.

The fused head (:mod:`csplade.model.head`) reads the (V, H) weight directly. This module finds it in
the backbone's output embeddings: a plain ``nn.Linear``, or a peft LoRA layer whose delta is folded in
(base weight + its delta), so the fused head trains the adapter. Anything else (a quantized head, a
custom module) has no plain weight, and the encoder calls the module itself.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def is_plain_weight(weight: Any) -> bool:
    """A floating-point (V, H) tensor (not a quantized subclass)."""
    return (
        isinstance(weight, torch.Tensor)
        and type(weight.data) is torch.Tensor
        and weight.dtype.is_floating_point
        and weight.dim() == 2
        and weight.numel() > 0
    )


def head_params(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight (V, H), bias (V,) | None) of the output embeddings, or None if not a plain linear map.

    A peft LoRA layer on the LM head is folded in (base weight + its delta), so the fused head trains it.
    """
    base_layer = getattr(module, "base_layer", None)
    if base_layer is not None and hasattr(module, "get_delta_weight"):
        if not is_plain_weight(getattr(base_layer, "weight", None)):
            return None
        weight = base_layer.weight
        if not getattr(module, "merged", False) and not getattr(module, "disable_adapters", False):
            for name in module.active_adapters:
                if name in getattr(module, "lora_A", {}):
                    weight = weight + module.get_delta_weight(name).to(weight.dtype)
        return weight, getattr(base_layer, "bias", None)
    if isinstance(module, nn.Linear) and is_plain_weight(module.weight):
        return module.weight, module.bias
    return None


def softcap_of(model: nn.Module) -> float | None:
    """Gemma's final logit soft-capping value, or None when the model has none."""
    value = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    return float(value) if value else None


def vocab_size(model: nn.Module) -> int:
    """Rows of the output embeddings (robust to packed quantized weights), else the config's."""
    out = model.get_output_embeddings()
    if out is not None:
        features = getattr(out, "out_features", None)  # packed (quantized) weights keep this
        if isinstance(features, int) and features > 0:
            return features
        weight = getattr(out, "weight", None)
        if weight is None and hasattr(out, "base_layer"):
            weight = out.base_layer.weight
        if weight is not None and weight.dim() == 2 and weight.shape[0] > 0:
            return int(weight.shape[0])
    cfg = model.config
    return int(getattr(cfg.get_text_config(), "vocab_size", None) or cfg.vocab_size)
