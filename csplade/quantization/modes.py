"""Quantized inference for :class:`~csplade.model.encoder.SparseEncoder`, and the quantization sweep.

What: ``SparseEncoder.from_pretrained(..., quantization=MODE, quantize_head=False)`` loads the
backbone in one of these modes (``from_pretrained`` calls :func:`resolve_request`,
:func:`backbone_load_kwargs` and :func:`finish_loading`, all here). Bytes per weight as stored:

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

bitsandbytes >= 0.45 runs int8/nf4/fp4 on CPU as well as CUDA; torchao's int8 modes run on CPU. The
bnb and torchao modes are applied by transformers while loading (``quantization_config``), so a
quantized backbone saves and reloads through transformers' own serialization.

The LM head (``quantize_head``). By default only the transformer blocks are quantized: transformers
keeps the output embeddings (and the input embeddings tied to them) in float, so csplade's fused
head (:mod:`csplade.model.head`) still projects and pools without materialising (B, L, V) logits, in
training and inference. The price is memory: the head is a (V, H) matrix; at float32

- SmolLM2-135M, V=49,152, H=576: 113 MB, 21% of the model (int8: 28 MB, 4-bit: 15 MB);
- Llama-3-8B, V=128,256, H=4,096 (untied): 2.1 GB (int8: 0.53 GB, 4-bit: 0.27 GB);
- Gemma-3-270m, V=262,144, H=640: 671 MB, 62% of the model (int8: 168 MB, 4-bit: 87 MB).

With ``quantize_head=True`` csplade quantizes the head itself, in the backbone's mode, into a
:class:`QuantizedLMHead`. That is not a plain float weight, so the encoder falls back to calling the
module (``SparseEncoder._module_head``): logits are built chunk by chunk of positions under
``no_grad`` (a (rows, V) float chunk is materialised: slower, and more peak memory), and training
through a quantized head is not supported (the fused head's backward needs the float weight). A
4-bit head keeps bnb's standard layout (see :func:`_keep_standard_4bit_layout`).

Tying. Most small LMs (SmolLM2, Gemma-3, BERT) tie the head to the input embeddings: one (V, H)
matrix serves both. When a tied head is quantized, the input embeddings become a
:class:`TiedQuantizedEmbedding` that dequantizes only the looked-up rows from the quantized head:
one quantized copy serves both and the float matrix is freed. An untied model (Llama-3-8B) keeps its
input embeddings in float: a lookup costs no matmul, but its V x H x 4 bytes stay.

Saving. A quantized encoder records ``{"mode", "quantize_head"}`` under ``extra["quantization"]`` of
its ``csplade_config.json``; loading a saved folder with the default ``quantization="none"`` uses
the saved mode (naming another mode is an error). The backbone is written by transformers.
transformers cannot store csplade's quantized head, so :class:`QuantizedLMHead` writes its weight
dequantized to float and loading quantizes it again. That round trip is exact only for bnb ``int8``
(per-row absmax / 127); torchao scales by absmax / 127.5 and bnb 4-bit re-quantizes its 8-bit block
scales, so their vectors would drift by ~1e-3: saving such an encoder raises NotImplementedError,
which says to save it with ``quantize_head=False`` and pass ``quantize_head=True`` when loading
(same float head, same vectors).

The sweep (:func:`run_sweep`, ``csplade quant-sweep``) loads the model once per (mode, dataset) in a
fresh subprocess and measures weight bytes (:func:`parameter_bytes`), peak RSS while encoding,
encoding throughput, per-query latency (encode one query + exact search), sparsity, index size and
retrieval quality (:func:`measure_row` defines each).

Known limits: on CPU the integer modes trade speed for memory: bnb int8 casts activations to fp16
and decomposes outliers, bnb 4-bit and torchao weight-only dequantize weights at every matmul
(measured in the sweep); ``gptq`` is untested here (its packages are not installed) and quantizing
needs calibration text (default: transformers' "c4" loader, i.e. network access); quantized encoders
are for inference (QLoRA training goes through :mod:`csplade.training.loading`).
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.util
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

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
EXTRA_KEY = "quantization"  # key of SparseEncoderConfig.extra that records the mode
# Head modes whose float -> quantize -> dequantize -> quantize round trip is exact (per-row
# absmax int8, scale absmax/127); torchao's int8 uses absmax/127.5 and bnb 4-bit re-quantizes its
# block scales.
EXACT_HEAD_RELOAD = ("int8",)
INT8_THRESHOLD = 6.0  # LLM.int8 outlier threshold (transformers' default)
_CSPLADE_CONFIG = (
    "csplade_config.json"  # = csplade.model.encoder.CONFIG_NAME (not imported: no cycle)
)


# ---------------------------------------------------------------------------------------- modes


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

        return TorchAoConfig(quant_type=_torchao_config(mode), modules_to_not_convert=skip_modules)
    from transformers import GPTQConfig

    return GPTQConfig(bits=4, tokenizer=tokenizer, dataset=calibration or "c4")


def _torchao_config(mode: str) -> Any:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    return (
        Int8WeightOnlyConfig()
        if mode == "torchao-int8-wo"
        else Int8DynamicActivationInt8WeightConfig()
    )


# ----------------------------------------------------------------------- loading (from_pretrained)


def saved_quantization(path: str | os.PathLike) -> dict[str, Any] | None:
    """``{"mode", "quantize_head"}`` recorded in a saved encoder folder, or None."""
    config_file = Path(path) / _CSPLADE_CONFIG
    if not config_file.is_file():
        return None
    try:
        extra = json.loads(config_file.read_text()).get("extra") or {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_file}: invalid JSON ({exc})") from exc
    saved = extra.get(EXTRA_KEY)
    if saved is None:
        return None
    where = f"{config_file}: extra[{EXTRA_KEY!r}]"
    if not isinstance(saved, dict) or set(saved) != {"mode", "quantize_head"}:
        raise ValueError(f"{where} must be {{'mode': str, 'quantize_head': bool}}, got {saved!r}")
    if saved["mode"] not in MODES:
        raise ValueError(f"{where}['mode'] is {saved['mode']!r}; known: {', '.join(MODES)}")
    if not isinstance(saved["quantize_head"], bool):
        raise ValueError(
            f"{where}['quantize_head'] must be true or false, got {saved['quantize_head']!r}"
        )
    return saved


def resolve_request(path: str | os.PathLike, mode: str, quantize_head: bool) -> tuple[str, bool]:
    """The (mode, quantize_head) to load `path` with, from what the caller asked and what was saved.

    A folder saved quantized reloads as saved when `mode` is "none" (the default); asking for
    another mode is an error (its weights are already quantized). ``quantize_head`` with "none" is
    an error.
    """
    check_mode(mode)
    saved = saved_quantization(path)
    if saved is not None and saved["mode"] != "none":
        if mode not in ("none", saved["mode"]):
            raise ValueError(
                f"{path} holds an encoder saved with quantization={saved['mode']!r}; load it with "
                f"quantization={saved['mode']!r} (or leave the default), not {mode!r}"
            )
        if mode == "none":
            logger.info("%s was saved with quantization=%r: loading it so", path, saved["mode"])
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


def finish_loading(encoder: Any, mode: str, quantize_head: bool) -> Any:
    """Quantize the head if asked and record the mode in ``encoder.config.extra``.

    Also keeps bnb 4-bit weights in their standard layout, and makes saving refuse (with advice) a
    quantized head that would not reload exactly (see the module docstring, "Saving").
    """
    check_mode(mode)
    if mode == "none":
        return encoder
    base = encoder.base_model
    if quantize_head and is_quantized(mode):
        dtype = next(
            (p.dtype for p in base.parameters() if p.dtype.is_floating_point), torch.float32
        )
        quantize_vocab_matrices(base, mode, compute_dtype=dtype)
        if mode not in EXACT_HEAD_RELOAD:
            base.save_pretrained = functools.partial(_refuse_save, mode)
    if mode in ("nf4", "fp4"):
        _keep_standard_4bit_layout(base)
    # bf16 / fp16 cast the head with everything else: no separate head quantization to record.
    record = {"mode": mode, "quantize_head": bool(quantize_head and is_quantized(mode))}
    encoder.config = replace(encoder.config, extra={**encoder.config.extra, EXTRA_KEY: record})
    counts = module_counts(base)
    logger.info(
        "quantization=%s: %d of %d linear layers quantized, head %s, %.1f MiB of weights",
        mode,
        counts["quantized_linear"],
        counts["quantized_linear"] + counts["float_linear"],
        "quantized" if counts["quantized_head"] else "in float",
        parameter_bytes(base) / 2**20,
    )
    return encoder


def _keep_standard_4bit_layout(model: nn.Module) -> None:
    """Stop bnb from re-packing 4-bit weights for its AVX512-BF16 CPU kernel at their first forward.

    In bitsandbytes 0.50 that re-packing rounds the block scales to bfloat16 (coarser than the
    8-bit double quantization it replaces), fails for layers narrower than one block (64 inputs),
    and is undone at save by re-quantizing the scales, so a saved model would not reload to the
    same vectors. The generic 4-bit CPU path keeps the scales as quantized at load; in a quick
    check on SmolLM2-135M (2 shared CPU cores) it was no slower.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _refuse_save(mode: str, *args: Any, **kwargs: Any) -> None:
    raise NotImplementedError(
        f"cannot save an encoder whose LM head is quantized in {mode!r}: the head is written in "
        "float and re-quantized at load, which reproduces it exactly only for "
        f"{', '.join(EXACT_HEAD_RELOAD)}. Load with quantize_head=False, save that, and pass "
        "quantize_head=True when loading the saved folder (the head is then quantized from the "
        "same float weights, giving the same vectors)."
    )


# ------------------------------------------------------------------------------- quantized head


def _bnb_int8_scales(layer: nn.Module) -> torch.Tensor:
    """Row absmax (V,) of a bnb Linear8bitLt: ``weight.SCB``, or ``state.SCB`` after a forward."""
    scb = getattr(layer.weight, "SCB", None)
    if scb is None:
        scb = getattr(layer.state, "SCB", None)
    if scb is None:
        raise RuntimeError("bitsandbytes int8 layer has no row scales (weight not quantized?)")
    return scb


class QuantizedLMHead(nn.Module):
    """An output projection (H -> V) whose (V, H) weight is stored quantized.

    `inner` is the backend's own layer (bnb Linear8bitLt / Linear4bit, or an nn.Linear whose weight
    is a torchao Int8Tensor) without bias; the float bias, if any, stays here (a BERT MLM head's
    bias is shared with ``cls.predictions.bias``). :meth:`rows` serves a tied input embedding. In a
    state dict the head appears as a plain float ``weight`` (see the module docstring, "Saving").
    """

    def __init__(
        self,
        inner: nn.Module,
        mode: str,
        in_features: int,
        out_features: int,
        bias: nn.Parameter | None,
        float_dtype: torch.dtype,
    ):
        super().__init__()
        self.inner = inner
        self.mode = mode
        self.in_features = in_features
        self.out_features = out_features
        self.bias = bias
        self.float_dtype = float_dtype
        self.register_state_dict_post_hook(_head_state_dict_hook)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, mode: str, compute_dtype: torch.dtype | None = None
    ) -> QuantizedLMHead:
        """Quantize a float nn.Linear (V, H) in `mode` (int8 / nf4 / fp4 / torchao-int8-*)."""
        if not is_quantized(mode) or mode == "gptq":
            raise ValueError(f"cannot quantize a head in mode {mode!r}")
        require_backend(mode)
        weight = linear.weight.detach()  # (V, H)
        device, float_dtype = weight.device, weight.dtype
        compute_dtype = compute_dtype or float_dtype
        out_features, in_features = weight.shape
        if mode in BNB_MODES:
            import bitsandbytes as bnb

            host = weight.to(
                "cpu", copy=True
            )  # bnb quantizes while moving a CPU weight to `device`
            if mode == "int8":
                inner = bnb.nn.Linear8bitLt(
                    in_features, out_features, bias=False, has_fp16_weights=False,
                    threshold=INT8_THRESHOLD,
                )  # fmt: skip
                inner.weight = bnb.nn.Int8Params(
                    host, requires_grad=False, has_fp16_weights=False
                ).to(device)
            else:
                inner = bnb.nn.Linear4bit(
                    in_features, out_features, bias=False, compute_dtype=compute_dtype,
                    compress_statistics=True, quant_type=mode,
                )  # fmt: skip
                inner.weight = bnb.nn.Params4bit(
                    host, requires_grad=False, compress_statistics=True, quant_type=mode,
                    module=inner,
                ).to(device)  # fmt: skip
                # On CPUs with AVX512-BF16, bnb re-packs a 4-bit weight into a private layout at its
                # first forward; `rows` reads the standard layout, so the head keeps it (and uses
                # bnb's generic 4-bit CPU matmul).
                inner.support_avx512bf16_for_cpu = False
        else:
            from torchao.quantization import quantize_

            inner = nn.Linear(
                in_features, out_features, bias=False, device=device, dtype=float_dtype
            )
            inner.weight = nn.Parameter(weight.clone(), requires_grad=False)
            quantize_(inner, _torchao_config(mode))
        bias = linear.bias
        if bias is not None:
            bias.requires_grad_(False)
        return cls(inner, mode, in_features, out_features, bias, float_dtype)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (..., H) -> (..., V)
        out = self.inner(hidden)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out

    @torch.no_grad()
    def dequantize(self) -> torch.Tensor:
        """The full (V, H) weight in float (its float dtype)."""
        w = self.inner.weight
        if self.mode == "int8":
            scales = _bnb_int8_scales(self.inner).float()  # (V,)
            out = w.data.float() * (scales / 127.0).unsqueeze(1)
        elif self.mode in ("nf4", "fp4"):
            import bitsandbytes.functional as bnbf

            _check_standard_4bit(w)
            out = bnbf.dequantize_4bit(w.data, w.quant_state)
        else:
            out = w.dequantize()
        return out.reshape(self.out_features, self.in_features).to(self.float_dtype)

    @torch.no_grad()
    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized rows ``weight[ids]``: ids (...) -> (..., H), not dequantizing all V rows."""
        flat = ids.reshape(-1)
        width = self.in_features
        w = self.inner.weight
        if self.mode == "int8":
            scales = _bnb_int8_scales(self.inner)[flat].float()  # (n,)
            out = w.data[flat].float() * (scales / 127.0).unsqueeze(1)
        elif self.mode in ("nf4", "fp4"):
            out = self._rows_4bit(flat)
        else:
            qdata, scale = getattr(w, "qdata", None), getattr(w, "scale", None)
            zero = getattr(w, "zero_point", None)
            if (
                qdata is not None
                and scale is not None
                and zero is None
                and scale.numel() == len(qdata)
            ):
                out = qdata[flat].float() * scale.reshape(-1)[flat].float().unsqueeze(1)
            else:  # another torchao layout: dequantize everything, then pick
                out = w.dequantize()[flat].float()
        return out.reshape(*ids.shape, width).to(self.float_dtype)

    def _rows_4bit(self, flat: torch.Tensor) -> torch.Tensor:
        import bitsandbytes.functional as bnbf

        w = self.inner.weight
        _check_standard_4bit(w)
        state = w.quant_state
        width = self.in_features
        if width % state.blocksize or width % 2:  # rows straddle quantization blocks
            return bnbf.dequantize_4bit(w.data, state).reshape(-1, width)[flat].float()
        absmax = state.absmax
        if state.nested:  # the block scales are 8-bit quantized themselves
            absmax = bnbf.dequantize_blockwise(absmax, state.state2) + state.offset
        absmax = absmax.float().reshape(self.out_features, width // state.blocksize)[flat]
        packed = w.data.reshape(self.out_features, width // 2)[flat]  # two 4-bit codes per byte
        row_state = bnbf.QuantState(
            absmax=absmax.reshape(-1).contiguous(),
            shape=torch.Size([flat.numel(), width]),
            code=state.code,
            blocksize=state.blocksize,
            quant_type=state.quant_type,
            dtype=torch.float32,
        )
        return bnbf.dequantize_4bit(packed.reshape(-1, 1).contiguous(), row_state).float()


def _check_standard_4bit(weight: Any) -> None:
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        raise RuntimeError(
            "the 4-bit head weight was re-packed for bnb's CPU kernel; cannot read rows"
        )


def _head_state_dict_hook(module: QuantizedLMHead, state_dict, prefix: str, local_metadata) -> None:
    """Write the head as a float ``weight`` (transformers can't reload csplade's quantized head)."""
    for key in [k for k in state_dict if k.startswith(prefix + "inner.")]:
        del state_dict[key]
    state_dict[prefix + "weight"] = module.dequantize()


class TiedQuantizedEmbedding(nn.Module):
    """Input embeddings reading their rows from a tied :class:`QuantizedLMHead` (no own copy).

    Keeps a scaled embedding's factor (Gemma's ``embed_scale``). The head is held outside the module
    tree (it is registered once, as the output embeddings), so it is not counted or saved twice.
    """

    def __init__(self, head: QuantizedLMHead, original: nn.Embedding):
        super().__init__()
        self._head = (head,)
        self.num_embeddings = head.out_features
        self.embedding_dim = head.in_features
        self.padding_idx = getattr(original, "padding_idx", None)
        self.dtype = original.weight.dtype
        scale = getattr(original, "embed_scale", None)
        if scale is not None:
            self.register_buffer(
                "embed_scale", torch.as_tensor(scale).detach().clone(), persistent=False
            )
        else:
            self.embed_scale = None
        self.register_state_dict_post_hook(_embedding_state_dict_hook)

    @property
    def head(self) -> QuantizedLMHead:
        return self._head[0]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, L, H)
        out = self.head.rows(input_ids).to(self.dtype)
        if self.embed_scale is not None:
            out = out * self.embed_scale.to(out.dtype)
        return out


def _embedding_state_dict_hook(module: TiedQuantizedEmbedding, state_dict, prefix, local_metadata):
    state_dict[prefix + "weight"] = module.head.dequantize().to(module.dtype)


def quantize_vocab_matrices(
    model: nn.Module, mode: str, compute_dtype: torch.dtype | None = None
) -> QuantizedLMHead:
    """Quantize a transformers model's output embeddings in `mode`; re-point tied input embeddings.

    Returns the new head (an already quantized head is returned as is).
    """
    head = model.get_output_embeddings()
    if isinstance(head, QuantizedLMHead):
        return head
    if not isinstance(head, nn.Linear) or type(head.weight.data) is not torch.Tensor:
        raise ValueError(
            f"{type(model).__name__}: the output embeddings are {type(head).__name__}, not a float "
            "nn.Linear; quantize_head needs a float head to quantize"
        )
    embed = model.get_input_embeddings()
    embed_weight = getattr(embed, "weight", None)
    tied = embed_weight is not None and embed_weight.data_ptr() == head.weight.data_ptr()
    new_head = QuantizedLMHead.from_linear(head, mode, compute_dtype)
    model.set_output_embeddings(new_head)
    if tied:
        model.set_input_embeddings(TiedQuantizedEmbedding(new_head, embed))
    logger.info(
        "quantized the LM head (%d x %d) in %s%s",
        new_head.out_features,
        new_head.in_features,
        mode,
        "; the tied input embeddings read from it"
        if tied
        else "; the untied input embeddings stay float",
    )
    return new_head


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


def module_counts(model: nn.Module) -> dict[str, int]:
    """Linear layers (head aside) stored quantized / in float, and whether the head is quantized."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_head = {id(m) for m in head.modules()} if head is not None else set()
    quantized = floating = 0
    for module in model.modules():
        if id(module) in in_head or not isinstance(module, nn.Linear):  # bnb layers are nn.Linear
            continue
        weight = module.weight
        if type(weight.data) is torch.Tensor and weight.dtype.is_floating_point:
            floating += 1
        else:
            quantized += 1
    return {
        "quantized_linear": quantized,
        "float_linear": floating,
        "quantized_head": int(isinstance(head, QuantizedLMHead)),
    }


# ----------------------------------------------------------------------------------------- sweep

SWEEP_FILE = "sweep.json"
SWEEP_TABLE = "sweep.md"
PARETO_MEMORY = "pareto_memory.png"
PARETO_THROUGHPUT = "pareto_throughput.png"
# Keys of every sweep row (sweep.json), in table order.
ROW_KEYS = (
    "model",
    "mode",
    "quantize_head",
    "dataset",
    "split",
    "n_docs",
    "n_queries",
    "slice",
    "ndcg_cut_10",
    "recall_100",
    "param_bytes",
    "docs_per_s",
    "peak_rss_bytes",
    "max_rss_bytes",
    "query_p50_ms",
    "query_p95_ms",
    "q_nnz",
    "d_nnz",
    "index_bytes",
    "load_s",
    "encode_s",
    "threads",
    "batch_size",
)
# Settings a row must share with the current sweep for the rerun to skip it.
_IDENTITY_KEYS = ("model", "split", "max_docs", "max_queries", "quantize_head_requested")


@dataclass
class SweepSettings:
    """What `run_sweep` measures; one row per (mode, dataset)."""

    model: str
    datasets: list[str]
    out: str | os.PathLike
    modes: list[str] = field(
        default_factory=lambda: ["none", "int8", "nf4", "fp4", "torchao-int8-dyn"]
    )
    quantize_head: bool = False  # applied to the integer modes only
    max_docs: int | None = None  # slice: judged docs of the kept queries first, then corpus order
    max_queries: int | None = None  # slice: the first judged queries in file order
    batch_size: int = 16
    threads: int | None = None  # torch intra-op threads and search threads (None: leave as is)
    split: str = "test"
    isolate: bool = True  # one fresh subprocess per row (clean peak-RSS numbers)
    encoder_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. doc_max_length
    show_progress: bool = True

    def __post_init__(self) -> None:
        if not self.datasets:
            raise ValueError("no datasets given")
        if not self.modes:
            raise ValueError("no quantization modes given")
        for mode in self.modes:
            check_mode(mode)
        for what, values in (("mode", self.modes), ("dataset", self.datasets)):
            dupes = sorted({v for v in values if values.count(v) > 1})
            if dupes:
                raise ValueError(f"{what}s listed twice: {dupes}")
        for name in ("max_docs", "max_queries", "threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")

    @property
    def is_slice(self) -> bool:
        return self.max_docs is not None or self.max_queries is not None

    def identity(self) -> dict[str, Any]:
        return {
            "model": str(self.model),
            "split": self.split,
            "max_docs": self.max_docs,
            "max_queries": self.max_queries,
            "quantize_head_requested": self.quantize_head,
        }


class _RssSampler:
    """Peak resident set size of this process while the block runs (a thread reads /proc every 5ms).

    Where /proc/self/statm does not exist (not Linux) it reports the process's lifetime peak
    (``getrusage``), which also covers what happened before the block.
    """

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._statm = Path("/proc/self/statm")

    def _current(self) -> int:
        try:
            return int(self._statm.read_text().split()[1]) * self._page
        except (OSError, IndexError, ValueError):
            return max_rss_bytes()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._current())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> _RssSampler:
        self.peak = self._current()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._current())


def max_rss_bytes() -> int:
    """Lifetime peak RSS of this process (``getrusage``; Linux reports KiB, macOS bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def slice_dataset(data: Any, max_docs: int | None, max_queries: int | None) -> dict[str, Any]:
    """Docs, queries and qrels of a BEIR data set cut to a slice (or all of it).

    Queries: the first `max_queries` judged queries in file order. Docs: every doc judged for a kept
    query (in corpus order), then the other docs in corpus order, up to `max_docs`; if the judged
    docs alone exceed `max_docs`, the first `max_docs` of them are kept and the rest cap recall (a
    warning says how many). A slice keeps the judged docs, so its scores are higher than on the full
    collection: compare slices only with slices.
    """
    query_ids = list(data.queries)[:max_queries] if max_queries else list(data.queries)
    queries = {q: data.queries[q] for q in query_ids}
    qrels = {q: data.qrels[q] for q in query_ids}
    doc_ids, doc_texts = list(data.doc_ids), list(data.doc_texts)
    if max_docs is not None and max_docs < len(doc_ids):
        judged = {d for judged_docs in qrels.values() for d in judged_docs}
        first = [i for i, d in enumerate(doc_ids) if d in judged]
        if len(first) > max_docs:
            logger.warning(
                "%s: %d judged docs but max_docs=%d: %d judged docs left out (they cap recall)",
                data.name,
                len(first),
                max_docs,
                len(first) - max_docs,
            )
            keep = first[:max_docs]
        else:
            taken = set(first)
            rest = [i for i in range(len(doc_ids)) if i not in taken]
            keep = sorted(first + rest[: max_docs - len(first)])
        doc_ids = [doc_ids[i] for i in keep]
        doc_texts = [doc_texts[i] for i in keep]
    return {"doc_ids": doc_ids, "doc_texts": doc_texts, "queries": queries, "qrels": qrels}


def measure_row(settings: SweepSettings, mode: str, dataset: str) -> dict[str, Any]:
    """Load `settings.model` in `mode`, encode `dataset`, search it and score it: one sweep row.

    - ``param_bytes``: :func:`parameter_bytes` of the backbone right after loading;
    - ``peak_rss_bytes``: peak RSS while encoding the docs (sampled; includes the weights);
      ``max_rss_bytes``: the process's lifetime peak, loading included (meaningful per mode only
      when each row runs in its own process, the default);
    - ``docs_per_s``: docs / wall time of ``encode`` (batched, longest first), after a warm-up doc;
    - ``query_p50_ms`` / ``query_p95_ms``: per query, encode it alone and search the exact inverted
      index for the top 100 (the run that is scored), after one warm-up query;
    - ``q_nnz`` / ``d_nnz``: mean non-zeros per vector; ``index_bytes``: bytes of the docs' CSR
      matrix (float32 values, int32 column ids, int64 row pointers).
    """
    import scipy.sparse as sp
    from tqdm.auto import tqdm

    from csplade.data.beir import find_dataset, load_beir
    from csplade.evaluation.metrics import evaluate_run, latency_percentiles, sparsity_stats
    from csplade.index.inverted import InvertedIndex
    from csplade.model.encoder import SparseEncoder

    if settings.threads:
        torch.set_num_threads(settings.threads)
    data = load_beir(find_dataset(dataset), split=settings.split)
    part = slice_dataset(data, settings.max_docs, settings.max_queries)
    head = settings.quantize_head and is_quantized(mode)
    start = time.perf_counter()
    encoder = SparseEncoder.from_pretrained(
        settings.model, quantization=mode, quantize_head=head, **settings.encoder_overrides
    )
    load_s = time.perf_counter() - start
    param_bytes = parameter_bytes(encoder.backbone)
    encoder.encode(part["doc_texts"][:1], kind="doc", show_progress=False)  # warm-up
    with _RssSampler() as rss:
        start = time.perf_counter()
        d_reps = encoder.encode(
            part["doc_texts"],
            kind="doc",
            batch_size=settings.batch_size,
            show_progress=settings.show_progress,
        )  # (n_docs, V)
        encode_s = time.perf_counter() - start
    index = InvertedIndex.build(d_reps, part["doc_ids"])
    warm = encoder.encode(list(part["queries"].values())[:1], kind="query", show_progress=False)
    index.search(warm, k=100, threads=settings.threads)  # warm-up (numba compiles the search)
    latencies, q_rows, run = [], [], {}
    bar = tqdm(
        part["queries"].items(),
        unit="query",
        desc=f"{mode} queries",
        disable=not settings.show_progress,
    )
    for query_id, text in bar:
        start = time.perf_counter()
        q = encoder.encode([text], kind="query", batch_size=1, show_progress=False)  # (1, V)
        scores, docs = index.search(q, k=100, threads=settings.threads)  # (1, 100) each
        latencies.append(time.perf_counter() - start)
        q_rows.append(q)
        run[query_id] = {
            part["doc_ids"][d]: float(s) for s, d in zip(scores[0], docs[0], strict=True) if d >= 0
        }
    bar.close()
    result = evaluate_run(part["qrels"], run, metrics=("ndcg_cut_10", "recall_100"))
    stats = sparsity_stats(sp.vstack(q_rows, format="csr"), d_reps)
    latency = latency_percentiles(latencies)
    index_bytes = d_reps.data.size * 4 + d_reps.indices.size * 4 + d_reps.indptr.size * 8
    row = {
        "model": str(settings.model),
        "mode": mode,
        "quantize_head": bool(head),
        "dataset": dataset,
        "split": settings.split,
        "n_docs": len(part["doc_ids"]),
        "n_queries": len(part["queries"]),
        "slice": settings.is_slice,
        "ndcg_cut_10": result.mean["ndcg_cut_10"],
        "recall_100": result.mean["recall_100"],
        "param_bytes": int(param_bytes),
        "docs_per_s": len(part["doc_ids"]) / encode_s,
        "peak_rss_bytes": int(rss.peak),
        "max_rss_bytes": max_rss_bytes(),
        "query_p50_ms": latency["p50_ms"],
        "query_p95_ms": latency["p95_ms"],
        "q_nnz": stats["query_nnz"],
        "d_nnz": stats["doc_nnz"],
        "index_bytes": int(index_bytes),
        "load_s": load_s,
        "encode_s": encode_s,
        "threads": settings.threads or torch.get_num_threads(),
        "batch_size": settings.batch_size,
        **settings.identity(),
    }
    return row


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_int8_cast_notice() -> None:
    """Drop the line bitsandbytes logs at every int8 matmul ("inputs will be cast ... to float16")."""
    target = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropPrefix) for f in target.filters):
        target.addFilter(_DropPrefix("MatMul8bitLt: inputs will be cast"))


def _row_worker(settings: SweepSettings, mode: str, dataset: str, result_path: str) -> None:
    """Entry point of a sweep subprocess: measure one row, write it as JSON to `result_path`."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
        )
    quiet_int8_cast_notice()
    if settings.threads:
        os.environ["OMP_NUM_THREADS"] = str(settings.threads)
    row = measure_row(settings, mode, dataset)
    Path(result_path).write_text(json.dumps(row))


def _run_isolated(settings: SweepSettings, mode: str, dataset: str) -> dict[str, Any]:
    import multiprocessing
    import tempfile

    out = Path(settings.out)
    fd, result_path = tempfile.mkstemp(dir=out, prefix=".row-", suffix=".json")
    os.close(fd)
    try:
        process = multiprocessing.get_context("spawn").Process(
            target=_row_worker, args=(settings, mode, dataset, result_path)
        )
        process.start()
        process.join()
        text = Path(result_path).read_text()
        if process.exitcode != 0 or not text:
            raise RuntimeError(
                f"sweep row (mode={mode!r}, dataset={dataset!r}) failed in its subprocess "
                f"(exit code {process.exitcode}); see the log above"
            )
        return json.loads(text)
    finally:
        Path(result_path).unlink(missing_ok=True)


def load_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a sweep.json (an empty list if the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a list of rows, got {type(rows).__name__}")
    for i, row in enumerate(rows):
        missing = [k for k in ROW_KEYS if not isinstance(row, dict) or k not in row]
        if missing:
            raise ValueError(f"{path}: row {i} lacks {missing}")
    return rows


def _write_json_atomic(path: Path, obj: Any) -> None:
    from csplade.index.storage import atomic_write

    with atomic_write(path, mode="w") as handle:
        handle.write(json.dumps(obj, indent=2) + "\n")


def run_sweep(settings: SweepSettings) -> list[dict[str, Any]]:
    """Measure every (mode, dataset) of `settings` not yet in ``out/sweep.json``; write the results.

    After each row, ``sweep.json`` (all rows) and ``sweep.md`` are rewritten atomically, so an
    interrupted sweep resumes where it stopped; the Pareto plots are drawn at the end. Rows already
    in sweep.json must come from the same sweep (model, split, slice, head setting), else
    ValueError.
    """
    from tqdm.auto import tqdm

    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = load_rows(out / SWEEP_FILE)
    identity = settings.identity()
    for i, row in enumerate(rows):
        differs = {k: (row.get(k), v) for k, v in identity.items() if row.get(k) != v}
        if differs:
            raise ValueError(
                f"{out / SWEEP_FILE}: row {i} comes from another sweep ({differs}, as "
                "(saved, now)); use another --out folder"
            )
    done = {(row["mode"], row["dataset"]) for row in rows}
    todo = [(m, d) for d in settings.datasets for m in settings.modes if (m, d) not in done]
    skipped = len(settings.datasets) * len(settings.modes) - len(todo)
    if skipped:
        logger.info("%d (mode, dataset) rows already in %s: skipped", skipped, out / SWEEP_FILE)
    for mode in {m for m, _ in todo}:
        require_backend(mode)
    bar = tqdm(todo, unit="row", desc="quant sweep", disable=not settings.show_progress)
    for mode, dataset in bar:
        bar.set_postfix_str(f"{mode} / {dataset}")
        if settings.isolate:
            row = _run_isolated(settings, mode, dataset)
        else:
            row = measure_row(settings, mode, dataset)
        rows.append(row)
        _write_json_atomic(out / SWEEP_FILE, rows)
        write_table(rows, out / SWEEP_TABLE)
        logger.info(
            "%s / %s: nDCG@10 %.3f, %.1f MiB of weights, %.2f docs/s",
            mode,
            dataset,
            row["ndcg_cut_10"],
            row["param_bytes"] / 2**20,
            row["docs_per_s"],
        )
    bar.close()
    if rows:
        write_table(rows, out / SWEEP_TABLE)
        write_plots(rows, out)
    return rows


# ------------------------------------------------------------------------------- sweep reports


def pareto_front(xs: list[float], ys: list[float], x_lower_is_better: bool) -> list[int]:
    """Indices of the points that no other point beats on both axes (y: higher is better), by x."""
    sign = 1.0 if x_lower_is_better else -1.0
    front = []
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        dominated = any(
            sign * xo <= sign * x and yo >= y and (sign * xo < sign * x or yo > y)
            for j, (xo, yo) in enumerate(zip(xs, ys, strict=True))
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: xs[i])


def _baseline(rows: list[dict[str, Any]], dataset: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["dataset"] == dataset and r["mode"] == "none"), None)


def _ratio(row: dict[str, Any], base: dict[str, Any] | None, key: str) -> str:
    return f"{row[key] / base[key]:.2f}" if base and base[key] else "–"


def write_table(rows: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """sweep.md: one table per data set, one row per mode, ratios against the ``none`` row."""
    path = Path(path)
    first = rows[0]
    lines = [
        f"# Quantization sweep: {first['model']}",
        "",
        f"Head quantization requested: {first['quantize_head_requested']} (integer modes only). "
        f"Threads: {first['threads']}, batch size {first['batch_size']}, split {first['split']}.",
        "",
    ]
    if any(r["slice"] for r in rows):
        lines += [
            f"> **Slice** (max_docs={first['max_docs']}, max_queries={first['max_queries']}): the "
            "judged docs of the kept queries are always in, so scores are higher than on the full "
            "collection; compare slices only with slices.",
            "",
        ]
    lines += [
        "Definitions: *weights* = bytes of parameters and buffers as stored (packed 4-bit bytes "
        "and all scales counted); *peak RSS* = resident memory of the (fresh) process while "
        "encoding the docs; *docs/s* = doc encoding throughput; *query ms* = encode one query + "
        "exact top-100 search; *index* = bytes of the docs' CSR matrix. Ratios (×) are against "
        "mode `none`.",
        "",
    ]
    header = (
        "| mode | head q | nDCG@10 | Δ nDCG | R@100 | weights MiB | × | docs/s | × | peak RSS MiB "
        "| q p50 ms | q p95 ms | q nnz | d nnz | index MiB |"
    )
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        part = [r for r in rows if r["dataset"] == dataset]
        base = _baseline(rows, dataset)
        n_docs, n_queries = part[0]["n_docs"], part[0]["n_queries"]
        lines += [f"## {dataset} ({n_docs} docs, {n_queries} queries)", "", header]
        lines.append("|---|---|" + "---:|" * 13)
        for r in part:
            delta = f"{100 * (r['ndcg_cut_10'] - base['ndcg_cut_10']):+.1f}" if base else "–"
            lines.append(
                f"| {r['mode']} | {'yes' if r['quantize_head'] else 'no'} "
                f"| {r['ndcg_cut_10']:.3f} | {delta} | {r['recall_100']:.3f} "
                f"| {r['param_bytes'] / 2**20:.1f} | {_ratio(r, base, 'param_bytes')} "
                f"| {r['docs_per_s']:.2f} | {_ratio(r, base, 'docs_per_s')} "
                f"| {r['peak_rss_bytes'] / 2**20:.0f} | {r['query_p50_ms']:.1f} "
                f"| {r['query_p95_ms']:.1f} | {r['q_nnz']:.0f} | {r['d_nnz']:.0f} "
                f"| {r['index_bytes'] / 2**20:.1f} |"
            )
        lines.append("")
    lines.append("Δ nDCG is in points (×100) against mode `none`.")
    text = "\n".join(lines) + "\n"
    from csplade.index.storage import atomic_write

    with atomic_write(path, mode="w") as handle:
        handle.write(text)


def write_plots(rows: list[dict[str, Any]], out: str | os.PathLike) -> dict[str, Path]:
    """Pareto plots (nDCG@10 vs weight bytes, vs docs/s) as PNG; one series per data set."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogLocator, ScalarFormatter

    out = Path(out)
    written = {}
    for name, key, label, title, lower_better in (
        (PARETO_MEMORY, "param_bytes", "weights (MiB, log scale)", "weight memory", True),
        (
            PARETO_THROUGHPUT,
            "docs_per_s",
            "docs encoded per second (log scale)",
            "encoding throughput",
            False,
        ),
    ):
        fig = Figure(figsize=(6.4, 4.4))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for dataset in dict.fromkeys(r["dataset"] for r in rows):
            part = [r for r in rows if r["dataset"] == dataset]
            scale = 2**20 if key == "param_bytes" else 1.0
            xs = [r[key] / scale for r in part]
            ys = [r["ndcg_cut_10"] for r in part]
            points = ax.scatter(xs, ys, label=dataset)
            front = pareto_front(xs, ys, x_lower_is_better=lower_better)
            ax.plot(
                [xs[i] for i in front],
                [ys[i] for i in front],
                linestyle="--",
                color=points.get_facecolor()[0],
                linewidth=1,
            )
            for x, y, r in zip(xs, ys, part, strict=True):
                ax.annotate(
                    r["mode"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7
                )
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(ScalarFormatter())
        ax.tick_params(axis="x", which="minor", labelsize=0)
        ax.set_xlabel(label)
        ax.set_ylabel("nDCG@10")
        sliced = " (slice)" if any(r["slice"] for r in rows) else ""
        ax.set_title(f"{rows[0]['model']}: quality vs {title}{sliced}", fontsize=9)
        ax.legend(fontsize="small", title="dashed: Pareto front", title_fontsize="x-small")
        fig.tight_layout()
        path = out / name
        tmp = path.with_name(f".{name}.tmp")
        fig.savefig(tmp, format="png", dpi=120)
        os.replace(tmp, path)
        written[name] = path
    return written
