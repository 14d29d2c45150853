"""A quantized LM head, and input embeddings that read their rows from it when the two are tied.

Why: the head is a (V, H) matrix, a large share of a small model (float32: SmolLM2-135M 113 MB, 21%
of the model; Gemma-3-270m 671 MB, 62%; Llama-3-8B, untied, 2.1 GB). Transformers keeps it in float
when it quantizes a backbone; ``quantize_head=True`` stores it in the backbone's integer mode
(int8: a quarter of the bytes, 4-bit: about an eighth).

Tying (SmolLM2, Gemma-3, BERT): one (V, H) matrix serves as head and input embeddings; a quantized
tied head replaces the embeddings by :class:`TiedQuantizedEmbedding`, which dequantizes only the
rows it looks up, so one quantized copy serves both. An untied model keeps float input embeddings.

Known limits: the fused head (:mod:`csplade.model.head`) needs a float weight, so the encoder calls
the module instead, chunk by chunk of positions under ``no_grad`` (slower, a (rows, V) float chunk
in memory) and cannot train through it; saving reproduces the head exactly only for ``int8``
(see :class:`QuantizedLMHead`).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch import nn

from csplade.quantization.modes import (
    BNB_MODES,
    INT8_THRESHOLD,
    is_quantized,
    require_backend,
    torchao_config,
)

logger = logging.getLogger(__name__)

# Head modes whose float -> quantize -> dequantize -> quantize round trip is exact (per-row
# absmax int8, scale absmax/127); torchao's int8 uses absmax/127.5 and bnb 4-bit re-quantizes its
# block scales.
EXACT_HEAD_RELOAD = ("int8",)


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
    bias is shared with ``cls.predictions.bias``). :meth:`rows` serves a tied input embedding.

    Saving: transformers cannot store this module, so in a state dict the head appears as a plain
    float ``weight`` (dequantized) and loading quantizes it again. That round trip is exact only for
    bnb ``int8`` (per-row absmax / 127); torchao scales by absmax / 127.5 and bnb 4-bit re-quantizes
    its 8-bit block scales, so vectors would drift by ~1e-3: :func:`refuse_inexact_save` makes
    saving such a model raise, with the advice to save it with a float head and quantize the head
    again when loading (same float head, same vectors).
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
            quantize_(inner, torchao_config(mode))
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


def refuse_inexact_save(model: nn.Module, mode: str) -> None:
    """Make ``model.save_pretrained`` raise if a `mode` head would not reload to the same values."""
    if mode not in EXACT_HEAD_RELOAD:
        model.save_pretrained = functools.partial(_refuse_save, mode)


def _refuse_save(mode: str, *args: Any, **kwargs: Any) -> None:
    raise NotImplementedError(
        f"cannot save an encoder whose LM head is quantized in {mode!r}: the head is written in "
        "float and re-quantized at load, which reproduces it exactly only for "
        f"{', '.join(EXACT_HEAD_RELOAD)}. Load with quantize_head=False, save that, and pass "
        "quantize_head=True when loading the saved folder (the head is then quantized from the "
        "same float weights, giving the same vectors)."
    )
