"""Loading an encoder quantized: what ``SparseEncoder.from_pretrained`` asks of this package.

1. :func:`resolve_request`: the (mode, quantize_head) to load with, from what the caller asked and
   what the folder's ``csplade_config.json`` recorded under ``extra["quantization"]`` (:data:`EXTRA_KEY`);
2. :func:`backbone_load_kwargs`: the keyword arguments of the backbone's ``from_pretrained``
   (dtype, transformers' ``quantization_config``, bitsandbytes' device map);
3. after loading, :func:`csplade.model.io.load` quantizes the LM head if asked
   (:mod:`csplade.model.head.quantized`), keeps bnb 4-bit weights in their standard layout
   (:func:`keep_standard_4bit_layout`) and records the mode, so a saved folder reloads the same way.

The backbone saves and reloads through transformers' own serialization. Quantized encoders are for
inference; QLoRA training loads its backbone through :mod:`csplade.training.loading`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from csplade.quantization.modes import (
    BNB_MODES,
    DTYPE_MODES,
    MODES,
    check_mode,
    quantization_config,
    require_backend,
)

logger = logging.getLogger(__name__)

EXTRA_KEY = "quantization"  # key of SparseEncoderConfig.extra that records the mode


def _check_saved(saved: Any, where: str) -> None:
    entry = f"{where}: extra[{EXTRA_KEY!r}]"
    if not isinstance(saved, dict) or set(saved) != {"mode", "quantize_head"}:
        raise ValueError(f"{entry} must be {{'mode': str, 'quantize_head': bool}}, got {saved!r}")
    if saved["mode"] not in MODES:
        raise ValueError(f"{entry}['mode'] is {saved['mode']!r}; known: {', '.join(MODES)}")
    if not isinstance(saved["quantize_head"], bool):
        raise ValueError(
            f"{entry}['quantize_head'] must be true or false, got {saved['quantize_head']!r}"
        )


def resolve_request(
    saved: dict[str, Any] | None, mode: str, quantize_head: bool, where: str
) -> tuple[str, bool]:
    """The (mode, quantize_head) to load with, from what the caller asked and what was saved.

    `saved` is the ``extra["quantization"]`` entry of the folder's csplade_config.json (None when
    the folder has no such file or entry); `where` names that file in error messages. A folder saved
    quantized reloads as saved when `mode` is "none" (the default); asking for another mode is an
    error (its weights are already quantized). ``quantize_head`` with "none" is an error.
    """
    check_mode(mode)
    if saved is not None:
        _check_saved(saved, where)
    if saved is not None and saved["mode"] != "none":
        if mode not in ("none", saved["mode"]):
            raise ValueError(
                f"{where} records an encoder saved with quantization={saved['mode']!r}; load it "
                f"with quantization={saved['mode']!r} (or leave the default), not {mode!r}"
            )
        if mode == "none":
            logger.info("%s: saved with quantization=%r: loading it so", where, saved["mode"])
        mode, quantize_head = saved["mode"], saved["quantize_head"] or quantize_head
    if quantize_head and mode == "none":
        raise ValueError("quantize_head=True needs a quantization mode (quantization='none' given)")
    if quantize_head and mode == "gptq":
        raise ValueError("quantize_head=True is not supported with quantization='gptq'")
    return mode, quantize_head


def _as_dtype(value: str | torch.dtype) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, str(value), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {value!r}")
    return dtype


def _pre_quantized(path: Path) -> bool:
    config_file = path / "config.json"
    if not config_file.is_file():
        return False
    try:
        return "quantization_config" in json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_file}: invalid JSON ({exc})") from exc


def backbone_load_kwargs(
    mode: str,
    load_kwargs: dict[str, Any],
    *,
    path: str | os.PathLike,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Keyword arguments of the backbone's ``from_pretrained`` for `mode` (a new dict).

    Adds ``dtype`` (bf16 / fp16; for the integer modes, float32 for the parts left unquantized
    unless given), the ``quantization_config`` (unless the checkpoint is already quantized: its
    ``config.json`` has one) and, for bitsandbytes, a ``device_map`` that puts every module on
    `device` (default CPU).
    """
    kwargs = dict(load_kwargs)
    check_mode(mode)
    if mode == "none":
        return kwargs
    require_backend(mode)
    if mode in DTYPE_MODES:
        want = DTYPE_MODES[mode]
        given = kwargs.get("dtype")
        if given is not None and _as_dtype(given) != want:
            raise ValueError(
                f"quantization={mode!r} loads in {want}, but dtype={given!r} was given too"
            )
        kwargs["dtype"] = want
        return kwargs
    if "quantization_config" in kwargs:
        raise ValueError(
            "give either quantization=... or backbone_kwargs['quantization_config'], not both"
        )
    kwargs["dtype"] = _as_dtype(kwargs.get("dtype") or torch.float32)
    path = Path(path)
    if not _pre_quantized(path):
        tokenizer = None
        if mode == "gptq":
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path)
        kwargs["quantization_config"] = quantization_config(
            mode, kwargs["dtype"], tokenizer=tokenizer
        )
    if mode in BNB_MODES and "device_map" not in kwargs:
        kwargs["device_map"] = {"": str(torch.device(device) if device is not None else "cpu")}
    return kwargs


def keep_standard_4bit_layout(model: nn.Module) -> None:
    """Stop bnb from re-packing 4-bit weights for its AVX512-BF16 CPU kernel at their first forward.

    In bitsandbytes 0.50 that re-packing rounds the block scales to bfloat16 (coarser than the
    8-bit double quantization it replaces), fails for layers narrower than one block (64 inputs),
    and is undone at save by re-quantizing the scales, so a saved model would not reload to the
    same vectors. The generic 4-bit CPU path keeps the scales as quantized at load; on SmolLM2-135M
    (2 shared CPU cores) it is no slower.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
