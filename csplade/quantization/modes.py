"""Quantization modes: their names, the package each needs, transformers' config, bytes as stored.

Bytes per weight as stored:

- ``none``: float32 (or the ``dtype`` passed): 4.
- ``bf16`` / ``fp16``: the whole model cast to bfloat16 / float16: 2.
- ``int8``: bitsandbytes LLM.int8 (Dettmers et al., arXiv 2208.07339): per-row absmax int8 weights;
  activation columns above the outlier threshold (6.0) are multiplied in fp16: 1 (+4 per row).
- ``nf4`` / ``fp4``: bitsandbytes 4-bit (QLoRA, Dettmers et al., arXiv 2305.14314): blocks of 64
  weights share one absmax, itself quantized to 8 bits ("double quantization"): ~0.52.
- ``torchao-int8-wo``: torchao int8 weight-only, per-row scales; the matmul dequantizes: 1 (+4 per
  row).
- ``torchao-int8-dyn``: torchao int8 weights, and activations quantized to int8 per token at run
  time (an int8 x int8 matmul): 1 (+4 per row).
- ``gptq``: GPTQ 4-bit (Frantar et al., arXiv 2210.17323) through transformers' GPTQConfig; needs
  gptqmodel (or auto-gptq) and optimum, and calibration text: ~0.5.

bitsandbytes >= 0.45 runs int8/nf4/fp4 on CPU as well as CUDA; torchao's int8 modes run on CPU.
transformers applies the bnb and torchao modes while loading (``quantization_config``).

Known limits: on CPU the integer modes trade speed for memory (bnb int8 casts activations to fp16
and decomposes outliers; bnb 4-bit and torchao weight-only dequantize weights at every matmul);
``gptq`` is untested here and its default calibration text (transformers' "c4") needs the network.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import logging
from typing import Any

import torch
from torch import nn

MODES = (
    "none",
    "bf16",
    "fp16",
    "int8",
    "nf4",
    "fp4",
    "torchao-int8-wo",
    "torchao-int8-dyn",
    "gptq",
)
DTYPE_MODES = {"bf16": torch.bfloat16, "fp16": torch.float16}
BNB_MODES = ("int8", "nf4", "fp4")
TORCHAO_MODES = ("torchao-int8-wo", "torchao-int8-dyn")
# Backbone modes a QLoRA recipe may train on (training/arguments.py): float, or bitsandbytes.
TRAINING_MODES = ("none", *BNB_MODES)
INT8_THRESHOLD = 6.0  # LLM.int8 outlier threshold (transformers' default)


def check_mode(mode: str) -> str:
    """`mode` if it is one of :data:`MODES`, else a ValueError with the closest name."""
    if mode not in MODES:
        close = difflib.get_close_matches(str(mode), MODES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown quantization mode {mode!r}{hint}; allowed: {', '.join(MODES)}")
    return mode


def is_quantized(mode: str) -> bool:
    """True for the modes that store integer weights (not none / bf16 / fp16)."""
    return check_mode(mode) not in ("none", *DTYPE_MODES)


def _import_or_explain(module: str, mode: str, install: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"quantization={mode!r} needs {module}: {install}") from exc


def require_backend(mode: str) -> None:
    """Import the package `mode` needs, or raise an ImportError that says what to install."""
    check_mode(mode)
    if mode in BNB_MODES:
        _import_or_explain("bitsandbytes", mode, "pip install 'csplade[quant]' (bitsandbytes)")
    elif mode in TORCHAO_MODES:
        _import_or_explain("torchao", mode, "pip install 'csplade[quant]' (torchao)")
    elif mode == "gptq":
        if not any(importlib.util.find_spec(m) for m in ("gptqmodel", "auto_gptq")):
            raise ImportError(
                "quantization='gptq' needs a GPTQ backend and none is installed: "
                "pip install gptqmodel optimum (auto-gptq also works but is no longer maintained)"
            )
        if importlib.util.find_spec("optimum") is None:
            raise ImportError("quantization='gptq' needs optimum as well: pip install optimum")


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_int8_cast_notice() -> None:
    """Drop the line bitsandbytes logs at every int8 matmul ("inputs will be cast … to float16")."""
    target = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropPrefix) for f in target.filters):
        target.addFilter(_DropPrefix("MatMul8bitLt: inputs will be cast"))


def quantization_config(
    mode: str,
    compute_dtype: torch.dtype = torch.float32,
    *,
    skip_modules: list[str] | None = None,
    tokenizer: Any = None,
    calibration: list[str] | str | None = None,
) -> Any:
    """The transformers ``quantization_config`` of `mode` (None for none / bf16 / fp16).

    `skip_modules`: module names left in float (None: transformers' default, i.e. the output
    embeddings and what they are tied to). `tokenizer` and `calibration` (texts, or the name of a
    dataset transformers knows; default "c4") are for ``gptq`` only, which quantizes while loading.
    """
    check_mode(mode)
    if mode == "none" or mode in DTYPE_MODES:
        return None
    require_backend(mode)
    if mode in BNB_MODES:
        from transformers import BitsAndBytesConfig

        if mode == "int8":
            return BitsAndBytesConfig(
                load_in_8bit=True,
                llm_int8_threshold=INT8_THRESHOLD,
                llm_int8_skip_modules=skip_modules,
            )
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=mode,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=True,
            llm_int8_skip_modules=skip_modules,
        )
    if mode in TORCHAO_MODES:
        from transformers import TorchAoConfig

        return TorchAoConfig(quant_type=torchao_config(mode), modules_to_not_convert=skip_modules)
    from transformers import GPTQConfig

    return GPTQConfig(bits=4, tokenizer=tokenizer, dataset=calibration or "c4")


def torchao_config(mode: str) -> Any:
    """torchao's quantization config object for a ``torchao-*`` mode."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    return (
        Int8WeightOnlyConfig()
        if mode == "torchao-int8-wo"
        else Int8DynamicActivationInt8WeightConfig()
    )


# ------------------------------------------------------------------------------------ accounting


def _tensor_pieces(tensor: Any) -> list[torch.Tensor]:
    """The plain tensors that hold `tensor`'s data (the inner tensors of a torchao subclass)."""
    if tensor is None:
        return []
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        out: list[torch.Tensor] = []
        for name in names:
            out.extend(_tensor_pieces(getattr(tensor, name)))
        return out
    return [tensor]


def _bnb_state_pieces(tensor: Any, module: nn.Module) -> list[torch.Tensor]:
    """Side tensors bitsandbytes keeps outside parameters: int8 row scales, 4-bit block scales."""
    pieces = []
    for holder in (tensor, getattr(module, "state", None)):
        scb = getattr(holder, "SCB", None)
        if isinstance(scb, torch.Tensor):
            pieces.append(scb)
    state = getattr(tensor, "quant_state", None)
    while state is not None:
        pieces += [
            t for t in (state.absmax, state.code, state.offset) if isinstance(t, torch.Tensor)
        ]
        state = state.state2 if getattr(state, "nested", False) else None
    return pieces


def parameter_bytes(model: nn.Module) -> int:
    """Bytes held by `model`'s parameters and buffers, each storage counted once.

    Counts what is really stored: packed 4-bit bytes (two weights per byte) plus their block scales
    (and the scales of those scales), int8 weights plus their row scales, the inner tensors of
    torchao tensor subclasses. Shared tensors (tied weights) count once.
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    for module in model.modules():
        tensors = list(module._parameters.values()) + list(module._buffers.values())
        for tensor in tensors:
            if tensor is None:
                continue
            for piece in _tensor_pieces(tensor) + _bnb_state_pieces(tensor, module):
                if piece.device.type == "meta":
                    continue
                key = (piece.data_ptr(), piece.numel() * piece.element_size())
                if key in seen:
                    continue
                seen.add(key)
                total += key[1]
    return total
