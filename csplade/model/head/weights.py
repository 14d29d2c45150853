"""Where the LM head's weight comes from: the (V, H) matrix the fused head reads.

The fused head (:mod:`csplade.model.head.pooling`) reads the weight directly instead of calling the
LM-head module. It is found in the backbone's output embeddings: a plain ``nn.Linear``, or a peft LoRA
layer whose delta is folded in (base weight + its delta), so the fused head trains the adapter.
Anything else (a quantized head, a custom module) has no plain weight, and the head calls the module
itself (:func:`csplade.model.head.splade.module_head`).

Sharded weights are never read as they are: a DeepSpeed ZeRO-3 partition that is not gathered, or an
FSDP2 ``DTensor`` still sharded, is refused with an error (:func:`head_params`); how the encoder gets
them gathered: :mod:`csplade.model.head.sharded`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def is_partitioned(param: Any) -> bool:
    """A DeepSpeed ZeRO-3 parameter (its data may be a local shard or empty until gathered)."""
    return hasattr(param, "ds_id")


def _is_dtensor(tensor: Any) -> bool:
    """A torch DTensor (an FSDP2 parameter in its sharded state)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(tensor, DTensor)


def is_plain_weight(weight: Any) -> bool:
    """A floating-point (V, H) tensor, not a quantized subclass (a ZeRO-3 shard counts, by its full shape)."""
    if not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point:
        return False
    if type(weight.data) is not torch.Tensor and not _is_dtensor(weight):
        return False
    shape = tuple(getattr(weight, "ds_shape", weight.shape))
    return len(shape) == 2 and shape[0] > 0 and shape[1] > 0


def _lora_layer(module: nn.Module) -> bool:
    return getattr(module, "base_layer", None) is not None and hasattr(module, "get_delta_weight")


def _active_lora(module: nn.Module) -> list[str]:
    """Names of the LoRA adapters whose delta the head must fold in (none when merged or disabled)."""
    if getattr(module, "merged", False) or getattr(module, "disable_adapters", False):
        return []
    return [name for name in module.active_adapters if name in getattr(module, "lora_A", {})]


def head_parameters(module: nn.Module) -> list[nn.Parameter] | None:
    """Every parameter the fused head reads from the output embeddings, or None if not a plain linear map.

    The base weight, its bias, and the LoRA factors of the active adapters of a LoRA-wrapped head.
    Looks at shapes only (never at data), so it works on ZeRO-3 partitioned parameters.
    """
    if _lora_layer(module):
        base = module.base_layer
        if not isinstance(base, nn.Linear) or not is_plain_weight(base.weight):
            return None
        params = [base.weight] + ([base.bias] if base.bias is not None else [])
        for name in _active_lora(module):
            params += list(module.lora_A[name].parameters()) + list(
                module.lora_B[name].parameters()
            )
        return params
    if isinstance(module, nn.Linear) and is_plain_weight(module.weight):
        return [module.weight] + ([module.bias] if module.bias is not None else [])
    return None


def _check_gathered(params: list[nn.Parameter]) -> None:
    for param in params:
        if is_partitioned(param) and param.numel() == 0:
            raise RuntimeError(
                f"the LM-head parameter {tuple(param.ds_shape)} is partitioned by DeepSpeed ZeRO-3 and "
                "not gathered here: call the encoder's forward (it runs the head in a module whose "
                "hooks gather it) or wrap the call in deepspeed.zero.GatheredParameters"
            )
        if _is_dtensor(param):
            raise RuntimeError(
                f"the LM-head parameter {tuple(param.shape)} is a sharded FSDP2 DTensor here: call "
                "the encoder through its FSDP root module, whose forward unshards it"
            )


def head_params(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight (V, H), bias (V,) | None) of the output embeddings, or None if not a plain linear map.

    A peft LoRA layer on the LM head is folded in (base weight + its delta), so the fused head trains
    it. Raises RuntimeError for a weight that is sharded and not gathered (ZeRO-3, FSDP2): its data
    is not the weight, and reading it would silently give a wrong head.
    """
    params = head_parameters(module)
    if params is None:
        return None
    _check_gathered(params)
    if _lora_layer(module):
        base = module.base_layer
        weight = base.weight
        for name in _active_lora(module):
            weight = weight + module.get_delta_weight(name).to(weight.dtype)
        return weight, base.bias
    return module.weight, module.bias


def naive_reason(module: nn.Module) -> str:
    """Why the output embeddings have no weight the fused head can read (for the fallback warning)."""
    base = module.base_layer if _lora_layer(module) else module
    weight = getattr(base, "weight", None)
    if weight is None:
        return f"the LM head ({type(base).__name__}) has no weight"
    if not isinstance(base, nn.Linear):
        return f"the LM head is a {type(base).__name__}, not a plain nn.Linear"
    return f"the LM-head weight is a {type(weight).__name__} of dtype {weight.dtype}"


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
        if weight is not None:
            shape = tuple(getattr(weight, "ds_shape", weight.shape))
            if len(shape) == 2 and shape[0] > 0:
                return int(shape[0])
    cfg = model.config
    return int(getattr(cfg.get_text_config(), "vocab_size", None) or cfg.vocab_size)
