"""SparseEncoder: a language model turned into a SPLADE encoder.

    text ─tokenize→ (B, L) ─backbone→ hidden (B, L, H) ─LM head→ logits (B, L, V)
         ─log(1+ReLU)→ ─pool over L (max | sum, under a pooling mask)→ one (B, V) sparse vector per text

SPLADE v2 (arXiv 2109.10086) defines the activation and max pooling; CSPLADE (arXiv 2504.10816) applies it to
causal LLMs, whose token at position i sees only tokens ≤ i, and adds two remedies:

- ``bi``: the causal mask is swapped for a bidirectional one (:mod:`csplade.model.bidirectional`);
- ``echo``: the text is fed twice and only the second copy is pooled, so every pooled token has seen the whole
  text through the first copy (Springer et al., "Repetition improves language model embeddings").

The head is computed by :func:`csplade.model.head.sparse_pool`, chunked over the vocabulary so the (B, L, V) logits
are never materialised (the memory wall at LLM scale: Llama-3's 128,256-term vocabulary).

Tokenization is done here, not by the tokenizer's own truncation, so that the pooling mask is exact:

    [template head] [prefix] [text …] ([prefix] [text …] under echo) [template tail] [padding]

`max_length` caps the text tokens of one copy (under ``echo`` the model sees about twice as many). The
template's special tokens (BOS for Llama-3, [CLS]/[SEP] for BERT) and the prefix are pooled only when
``pool_special_tokens`` is on. It is on by default for MLM backbones (classic SPLADE pools [CLS] and [SEP])
and off for causal ones, where the vector of a BOS or prefix token does not depend on the text and would add
the same terms to every vector. Padding never takes part in pooling; an empty text gives a zero vector
(also for MLM backbones, where classic SPLADE would pool [CLS] and [SEP] alone).

Inference-free models (``doc_only=True``, arXiv 2411.04403): the query side does no forward pass; a query's
vector holds, for each distinct token of the query, a stored per-token weight (IDF by default; 1 if none).

Known limits: the prefix is tokenized separately from the text (a BPE merge across the boundary is lost); the
fused head needs a plain floating-point LM-head weight (a quantized head falls back to calling the module,
chunked over positions when no gradient is needed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from csplade.model.backbones import resolve_model
from csplade.model.head import sparse_pool

logger = logging.getLogger(__name__)

VARIANTS = ("uni", "echo", "bi")
POOLINGS = ("max", "sum")
BACKBONE_KINDS = ("causal", "mlm")
CONFIG_NAME = "csplade_config.json"
QUERY_WEIGHTS_NAME = "query_weights.safetensors"
HEAD_BIAS_NAME = "head_bias.safetensors"


@dataclass
class SparseEncoderConfig:
    """Everything needed to rebuild an encoder; saved as ``csplade_config.json`` beside the weights."""

    base_model: str = ""  # the backbone's name or path; for an adapter, the base it applies to
    variant: str = "uni"  # uni | echo | bi
    pooling: str = "max"  # max | sum
    query_max_length: int = 64
    doc_max_length: int = 256
    query_prefix: str = ""
    doc_prefix: str = ""
    doc_only: bool = False  # inference-free: queries are weighted token ids, no forward pass
    pool_special_tokens: bool | None = None  # None: True for MLM backbones, False for causal ones
    fused_head: bool = (
        True  # the chunked head of csplade.model.head (False: the naive (B, L, V) head)
    )
    head_chunk_size: int | None = None  # vocab chunk of the fused head (None: its default)
    backbone_kind: str | None = None  # causal | mlm (None: detected from the backbone's config)
    adapter: bool = (
        False  # the folder holds a peft adapter over `base_model` (set by save_pretrained)
    )
    extra: dict[str, Any] = field(
        default_factory=dict
    )  # free-form notes (e.g. training provenance)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; allowed: {', '.join(VARIANTS)}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}; allowed: {', '.join(POOLINGS)}")
        if self.backbone_kind is not None and self.backbone_kind not in BACKBONE_KINDS:
            raise ValueError(
                f"unknown backbone_kind {self.backbone_kind!r}; allowed: {', '.join(BACKBONE_KINDS)}"
            )
        for name in ("query_max_length", "doc_max_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> SparseEncoderConfig:
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            raise ValueError(
                f"{source}: unknown encoder setting(s) {unknown}; known: {', '.join(cls.field_names())}"
            )
        return cls(**data)

    def with_overrides(self, **overrides: Any) -> SparseEncoderConfig:
        unknown = sorted(set(overrides) - set(self.field_names()))
        if unknown:
            raise ValueError(
                f"unknown encoder setting(s) {unknown}; known: {', '.join(self.field_names())}"
            )
        return replace(self, **overrides)


@dataclass
class _Template:
    """Special tokens the tokenizer adds around a text, found by probing it once."""

    head: list[int]
    tail: list[int]


def _probe_template(tokenizer) -> _Template:
    plain = tokenizer("a b", add_special_tokens=False)["input_ids"]
    full = tokenizer("a b", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return _Template(head=list(full[:start]), tail=list(full[start + len(plain) :]))
    logger.warning("could not locate the text inside the tokenizer's template; adding no specials")
    return _Template(head=[], tail=[])


def _check_texts(texts: Any) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("expected a list of strings, got a single str (wrap it in a list)")
    if not isinstance(texts, Sequence):
        texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is {type(text).__name__}, expected str")
    return list(texts)


def _detect_kind(config) -> str:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForMaskedLM") for a in archs):
        return "mlm"
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        return "causal"
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not getattr(
        config, "is_encoder_decoder", False
    ):
        if config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
            return "causal"
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "mlm"
    raise ValueError(
        f"model type {config.model_type!r} has neither a causal-LM nor a masked-LM head in transformers"
    )


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def _is_plain_weight(weight: Any) -> bool:
    return (
        isinstance(weight, torch.Tensor)
        and type(weight.data) is torch.Tensor
        and weight.dtype.is_floating_point
        and weight.dim() == 2
        and weight.numel() > 0
    )


def _head_params(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight (V, H), bias (V,) | None) of the output embeddings, or None if not a plain linear map.

    A peft LoRA layer on the LM head is folded in (base weight + its delta), so the fused head trains it.
    """
    base_layer = getattr(module, "base_layer", None)
    if base_layer is not None and hasattr(module, "get_delta_weight"):
        if not _is_plain_weight(getattr(base_layer, "weight", None)):
            return None
        weight = base_layer.weight
        if not getattr(module, "merged", False) and not getattr(module, "disable_adapters", False):
            for name in module.active_adapters:
                if name in getattr(module, "lora_A", {}):
                    weight = weight + module.get_delta_weight(name).to(weight.dtype)
        return weight, getattr(base_layer, "bias", None)
    if isinstance(module, nn.Linear) and _is_plain_weight(module.weight):
        return module.weight, module.bias
    return None


class _HeadReached(Exception):
    """Raised by a pre-hook to stop a generic MLM forward at its output embeddings."""


class SparseEncoder(nn.Module):
    """A SPLADE encoder over a Hugging Face causal-LM or masked-LM backbone."""

    # The loss is computed by the trainer (csplade.training.contrastive), never inside forward: tells the HF Trainer to
    # scale it for gradient accumulation itself.
    accepts_loss_kwargs = False

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer,
        config: SparseEncoderConfig,
        query_weights=None,
        head_bias=None,
    ):
        super().__init__()
        base = _unwrap(backbone)
        kind = config.backbone_kind or _detect_kind(base.config)
        if config.pool_special_tokens is None:
            config = replace(config, pool_special_tokens=kind == "mlm")
        config = replace(config, backbone_kind=kind)
        if kind == "mlm" and config.variant == "bi":
            raise ValueError(
                "variant 'bi' is for causal backbones; a masked-LM backbone is already bidirectional "
                "(use variant 'uni')"
            )
        self.config = config
        self.backbone = backbone
        self.tokenizer = tokenizer
        self._template = _probe_template(tokenizer)
        self._pad_id = self._pick_pad_id(tokenizer)
        self._prefix_ids = {
            "query": self._tokenize_plain(config.query_prefix) if config.query_prefix else [],
            "doc": self._tokenize_plain(config.doc_prefix) if config.doc_prefix else [],
        }
        vocab = self.vocab_size
        if query_weights is not None:
            query_weights = torch.as_tensor(query_weights, dtype=torch.float32).flatten()
            if query_weights.numel() != vocab:
                raise ValueError(
                    f"query_weights has {query_weights.numel()} entries, the vocabulary {vocab}"
                )
        self.register_buffer("query_weights", query_weights, persistent=False)
        self.head_bias: nn.Parameter | None
        if head_bias is not None:
            head_bias = torch.as_tensor(head_bias, dtype=torch.float32).flatten()
            if head_bias.numel() != vocab:
                raise ValueError(
                    f"head_bias has {head_bias.numel()} entries, the vocabulary {vocab}"
                )
            self.head_bias = nn.Parameter(head_bias.clone())
        else:
            self.register_parameter("head_bias", None)
        if config.variant == "bi":
            from csplade.model.bidirectional import make_bidirectional

            make_bidirectional(backbone)
        self._fingerprint: str | None = None

    # ------------------------------------------------------------------ properties
    @property
    def base_model(self) -> nn.Module:
        """The transformers model (inside any peft wrapper)."""
        return _unwrap(self.backbone)

    @property
    def vocab_size(self) -> int:
        out = self.base_model.get_output_embeddings()
        if out is not None:
            features = getattr(out, "out_features", None)  # robust to packed (quantized) weights
            if isinstance(features, int) and features > 0:
                return features
            weight = getattr(out, "weight", None)
            if weight is None and hasattr(out, "base_layer"):
                weight = out.base_layer.weight
            if weight is not None and weight.dim() == 2 and weight.shape[0] > 0:
                return int(weight.shape[0])
        cfg = self.base_model.config
        return int(getattr(cfg.get_text_config(), "vocab_size", None) or cfg.vocab_size)

    @property
    def _no_split_modules(self) -> list[str]:
        """The backbone's block classes (what FSDP's transformer-based auto-wrap shards by)."""
        return list(getattr(self.base_model, "_no_split_modules", None) or [])

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def is_adapter(self) -> bool:
        return hasattr(self.backbone, "peft_config")

    # ------------------------------------------------------------------ tokenization
    @staticmethod
    def _pick_pad_id(tokenizer) -> int:
        for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
            value = getattr(tokenizer, attr, None)
            if value is not None:
                return int(value)
        return 0

    def _tokenize_plain(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def tokenize(self, texts: Sequence[str], kind: str = "doc") -> dict[str, torch.Tensor]:
        """Token ids, attention mask and pooling mask (all (B, L)) for `texts` as queries or docs.

        Also returns ``n_truncated`` (an int tensor): how many texts were cut at the max length.
        """
        if kind not in ("query", "doc"):
            raise ValueError(f"kind must be 'query' or 'doc', got {kind!r}")
        texts = _check_texts(texts)
        max_len = self.config.query_max_length if kind == "query" else self.config.doc_max_length
        prefix = self._prefix_ids[kind]
        head, tail = self._template.head, self._template.tail
        pool_specials = bool(self.config.pool_special_tokens)
        echo = self.config.variant == "echo"
        content = (
            self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
            if texts
            else []
        )
        n_truncated = 0
        rows: list[tuple[list[int], list[int]]] = []
        for ids in content:
            if len(ids) > max_len:
                n_truncated += 1
                ids = ids[:max_len]
            ids = list(ids)
            seq, pool = list(head), [pool_specials] * len(head)
            copies = 2 if echo else 1
            for copy in range(copies):
                pooled_copy = copy == copies - 1
                seq += prefix
                pool += [pool_specials and pooled_copy] * len(prefix)
                seq += ids
                pool += [pooled_copy] * len(ids)
            seq += tail
            pool += [pool_specials] * len(tail)
            if not ids:  # an empty text is a zero vector, even where specials are pooled
                pool = [False] * len(pool)
            elif kind == "query" and self.config.doc_only:  # inference-free: the text's own tokens
                pool = [False] * (len(seq) - len(tail) - len(ids)) + [True] * len(ids)
                pool += [False] * len(tail)
            rows.append((seq, pool))
        width = max([len(s) for s, _ in rows] + [1])
        batch = len(rows)
        input_ids = torch.full((batch, width), self._pad_id, dtype=torch.long)
        attention = torch.zeros((batch, width), dtype=torch.long)
        pool_mask = torch.zeros((batch, width), dtype=torch.bool)
        for i, (seq, pool) in enumerate(rows):
            if not seq:  # nothing at all to feed: one dummy token, never pooled
                attention[i, 0] = 1
                continue
            input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            attention[i, : len(seq)] = 1
            pool_mask[i, : len(seq)] = torch.tensor(pool, dtype=torch.bool)
        return {
            "input_ids": input_ids,
            "attention_mask": attention,
            "pool_mask": pool_mask,
            "n_truncated": torch.tensor(n_truncated),
        }

    # ------------------------------------------------------------------ forward
    def _hidden_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, nn.Module]:
        """Hidden states fed to the output embeddings (B, L, H), and that output module."""
        base = self.base_model
        out_emb = base.get_output_embeddings()
        if out_emb is None:
            raise ValueError(f"{type(base).__name__} has no output embeddings (LM head)")
        if self.config.backbone_kind == "causal":
            decoder = (
                base.base_model
            )  # e.g. LlamaModel: its last_hidden_state is after the final norm
            out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            return out.last_hidden_state, out_emb
        predictions = getattr(getattr(base, "cls", None), "predictions", None)
        if predictions is not None and hasattr(predictions, "transform"):  # the BERT family
            out = base.base_model(input_ids=input_ids, attention_mask=attention_mask)
            return predictions.transform(out.last_hidden_state), out_emb
        # Any other masked LM: run it and catch the input of its output embeddings.
        captured: dict[str, torch.Tensor] = {}

        def grab(_module, args):
            captured["hidden"] = args[0]
            raise _HeadReached

        handle = out_emb.register_forward_pre_hook(grab)
        try:
            self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        except _HeadReached:
            pass
        finally:
            handle.remove()
        return captured["hidden"], out_emb

    def _softcap(self) -> float | None:
        cfg = self.base_model.config.get_text_config()
        value = getattr(cfg, "final_logit_softcapping", None)
        return float(value) if value else None

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pool_mask: torch.Tensor | None = None,
        *,
        query: dict[str, torch.Tensor] | None = None,
        doc: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor | None, torch.Tensor | None]:
        """Activated, pooled vocabulary vectors (B, V), float32.

        Called with `query=` and/or `doc=` (batches from :meth:`tokenize`), it encodes both in one call and
        returns ``(q_reps, d_reps)``: one forward per step, as DDP expects. Doc-only models build query
        vectors from the stored token weights without running the backbone.
        """
        if query is not None or doc is not None:
            q_reps = d_reps = None
            if query is not None:
                if self.config.doc_only:
                    q_reps = self.query_token_weights(query["input_ids"], query["pool_mask"])
                else:
                    q_reps = self._encode_batch(**query)
            if doc is not None:
                d_reps = self._encode_batch(**doc)
            return q_reps, d_reps
        if input_ids is None or attention_mask is None:
            raise ValueError("forward needs input_ids and attention_mask (or query=/doc= batches)")
        return self._encode_batch(input_ids, attention_mask, pool_mask)

    def _encode_batch(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pool_mask: torch.Tensor | None = None,
        **_: Any,
    ) -> torch.Tensor:
        if pool_mask is None:
            pool_mask = attention_mask.bool()
        hidden, out_emb = self._hidden_states(input_ids, attention_mask)  # (B, L, H)
        pool_mask = pool_mask.to(hidden.device) & attention_mask.bool().to(hidden.device)
        params = _head_params(out_emb)
        softcap = self._softcap()
        if params is not None and hasattr(params[0], "ds_id"):  # DeepSpeed ZeRO-3 partitioned head
            if params[0].requires_grad:
                logger.debug("ZeRO-3 with a trainable LM head: using the module head")
                return self._module_head(hidden, out_emb, pool_mask, softcap)
            import deepspeed

            with deepspeed.zero.GatheredParameters([p for p in params if p is not None]):
                return self._pool(hidden, params, pool_mask, softcap)
        if params is not None:
            return self._pool(hidden, params, pool_mask, softcap)
        return self._module_head(hidden, out_emb, pool_mask, softcap)

    def _pool(self, hidden, params, pool_mask, softcap) -> torch.Tensor:
        weight, bias = params
        if self.head_bias is not None:
            head_bias = self.head_bias.to(
                weight.dtype if weight.is_floating_point() else torch.float32
            )
            bias = head_bias if bias is None else bias + head_bias
        return sparse_pool(
            hidden,
            weight,
            pool_mask,
            bias,
            pooling=self.config.pooling,
            fused=self.config.fused_head,
            softcap=softcap,
            chunk_size=self.config.head_chunk_size,
        )

    def _module_head(self, hidden, out_emb, pool_mask, softcap) -> torch.Tensor:
        """Head for output embeddings that are not a plain linear map (e.g. a quantized LM head)."""
        from csplade.model.head import splade_activation

        def logits_of(h):
            logits = out_emb(h).float()
            if self.head_bias is not None:
                logits = logits + self.head_bias
            if softcap:
                logits = softcap * torch.tanh(logits / softcap)
            return logits

        mask = pool_mask.unsqueeze(-1)  # (B, L, 1)
        if torch.is_grad_enabled():
            act = splade_activation(logits_of(hidden)) * mask  # (B, L, V)
            return act.amax(dim=1) if self.config.pooling == "max" else act.sum(dim=1)
        result = None
        # positions per chunk so that one float32 (B, step, V) logits chunk stays near 64 MiB
        step = max(1, (64 * 2**20) // (4 * hidden.shape[0] * max(1, self.vocab_size)))
        for start in range(0, hidden.shape[1], step):
            act = (
                splade_activation(logits_of(hidden[:, start : start + step]))
                * mask[:, start : start + step]
            )
            part = act.amax(dim=1) if self.config.pooling == "max" else act.sum(dim=1)
            if result is None:
                result = part
            elif self.config.pooling == "max":
                result = torch.maximum(result, part)
            else:
                result = result + part
        return result

    @torch.no_grad()
    def raw_max_logits(
        self, texts: Sequence[str], kind: str = "doc", batch_size: int = 16
    ) -> torch.Tensor:
        """Max over each text's pooled positions of the LM-head logits, before any bias (n, V) float32.

        Chunked over the vocabulary like the fused head; used to calibrate :attr:`head_bias`.
        """
        texts = _check_texts(texts)
        out_emb = self.base_model.get_output_embeddings()
        params = _head_params(out_emb)
        if params is None:
            raise ValueError("head-bias calibration needs a plain (unquantized) LM head")
        weight, bias = params
        vocab = weight.shape[0]
        step = 8192
        rows = []
        was_training = self.training
        self.eval()
        try:
            for start in range(0, len(texts), batch_size):
                batch = self.tokenize(texts[start : start + batch_size], kind=kind)
                batch.pop("n_truncated")
                batch = {k: v.to(self.device) for k, v in batch.items()}
                hidden, _ = self._hidden_states(batch["input_ids"], batch["attention_mask"])
                mask = (batch["pool_mask"] & batch["attention_mask"].bool()).unsqueeze(
                    -1
                )  # (B, L, 1)
                row = torch.empty(hidden.shape[0], vocab)
                for v0 in range(0, vocab, step):
                    logits = (hidden @ weight[v0 : v0 + step].T).float()  # (B, L, C)
                    if bias is not None:
                        logits = logits + bias[v0 : v0 + step].float()
                    logits = logits.masked_fill(~mask, float("-inf"))
                    row[:, v0 : v0 + step] = logits.amax(dim=1).cpu()
                rows.append(row)
        finally:
            self.train(was_training)
        return torch.cat(rows) if rows else torch.empty(0, vocab)

    def calibrate_head_bias(
        self, texts: Sequence[str], doc_fraction: float = 0.01, batch_size: int = 16
    ) -> torch.Tensor:
        """Set a per-term bias so that each term is active in about `doc_fraction` of `texts`.

        Why: a causal LM's head is trained for a softmax, which ignores where zero lies. Some backbones
        put most logits below zero (Llama-3: the "dying ReLU" of CSPLADE), others above (SmolLM2-135M:
        82% of its logits are positive, so every SPLADE vector is the whole vocabulary and FLOPS starts
        from an absurd point). The bias b_v = -q_v, with q_v the (1 - doc_fraction) quantile over the
        texts of term v's max-pooled logit, makes every term fire in that fraction of texts: an
        IDF-like prior (frequent, generic terms are shifted down most). It is a trainable parameter of
        the encoder, like the MLM decoder bias of classic SPLADE, and is saved with it. Texts with no
        pooled token are ignored. Returns the bias.
        """
        if not 0 < doc_fraction < 1:
            raise ValueError(f"doc_fraction must be in (0, 1), got {doc_fraction}")
        raw = self.raw_max_logits(texts, kind="doc", batch_size=batch_size)  # (n, V)
        raw = raw[torch.isfinite(raw).all(dim=1)]
        if raw.shape[0] < 2:
            raise ValueError("head-bias calibration needs at least 2 non-empty texts")
        k = max(1, min(raw.shape[0], math.ceil((1 - doc_fraction) * raw.shape[0])))
        quantile = raw.kthvalue(k, dim=0).values  # (V,)
        if self.head_bias is not None:
            logger.info("replacing the existing head bias")
        self.head_bias = nn.Parameter((-quantile).float().to(self.device))
        self._fingerprint = None
        logger.info(
            "calibrated the head bias on %d texts: each term active in ~%.2f%% of them",
            raw.shape[0],
            100 * doc_fraction,
        )
        return self.head_bias.detach()

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict | None = None, **kwargs: Any
    ) -> None:
        """Recompute the backbone's layer activations in backward (HF Trainer's hook)."""
        gc_kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        self.base_model.activation_checkpointing_enable(
            activation_checkpointing_kwargs=gc_kwargs, **kwargs
        )

    # ------------------------------------------------------------------ encoding
    def encode(
        self,
        texts: Sequence[str],
        kind: str = "doc",
        batch_size: int = 32,
        show_progress: bool = True,
        top_k: int | None = None,
        threshold: float | None = None,
    ) -> sp.csr_matrix:
        """Encode texts into a float32 CSR matrix (n, V), rows in input order.

        Texts are batched longest first (less padding; an out-of-memory shows up in the first batch).
        `top_k` keeps the k largest weights per row; `threshold` zeroes weights below it.
        """
        texts = _check_texts(texts)
        vocab = self.vocab_size
        if not texts:
            return sp.csr_matrix((0, vocab), dtype=np.float32)
        if kind == "query" and self.config.doc_only:
            return self._encode_doc_only_queries(texts, top_k, threshold)
        from tqdm.auto import tqdm

        lengths = [len(t) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])
        was_training = self.training
        self.eval()
        blocks: list[sp.csr_matrix] = []
        n_truncated = 0
        device = self.device
        bar = tqdm(total=len(texts), unit=kind, desc=f"encode {kind}s", disable=not show_progress)
        try:
            with torch.inference_mode():
                for start in range(0, len(order), batch_size):
                    idx = order[start : start + batch_size]
                    batch = self.tokenize([texts[i] for i in idx], kind=kind)
                    n_truncated += int(batch.pop("n_truncated"))
                    batch = {k: v.to(device) for k, v in batch.items()}
                    reps = self(**batch)  # (b, V) float32
                    blocks.append(_to_csr(_prune(reps, top_k, threshold)))
                    bar.update(len(idx))
        finally:
            bar.close()
            self.train(was_training)
        if n_truncated:
            max_len = (
                self.config.query_max_length if kind == "query" else self.config.doc_max_length
            )
            logger.info(
                "%d of %d %ss were longer than %d tokens and truncated",
                n_truncated,
                len(texts),
                kind,
                max_len,
            )
        stacked = sp.vstack(blocks, format="csr")
        inverse = np.empty(len(order), dtype=np.int64)
        inverse[np.asarray(order)] = np.arange(len(order))
        out = stacked[inverse]
        out.sort_indices()
        return out.astype(np.float32)

    def encode_queries(self, texts: Sequence[str], **kwargs: Any) -> sp.csr_matrix:
        return self.encode(texts, kind="query", **kwargs)

    def encode_docs(self, texts: Sequence[str], **kwargs: Any) -> sp.csr_matrix:
        return self.encode(texts, kind="doc", **kwargs)

    def query_token_weights(
        self, input_ids: torch.Tensor, token_mask: torch.Tensor
    ) -> torch.Tensor:
        """Doc-only query vectors (B, V): the stored weight of each distinct query token.

        `token_mask` (B, L) marks the query's own tokens (the `pool_mask` of :meth:`tokenize`).
        """
        vocab = self.vocab_size
        weights = self.query_weights
        if weights is None:
            weights = torch.ones(vocab)
        weights = weights.to(input_ids.device)
        present = torch.zeros((input_ids.shape[0], vocab), device=input_ids.device)  # (B, V)
        present.scatter_reduce_(1, input_ids, token_mask.to(present.dtype), reduce="amax")
        return present * weights  # (B, V)

    def _encode_doc_only_queries(self, texts, top_k, threshold) -> sp.csr_matrix:
        vocab = self.vocab_size
        weights = self.query_weights
        weights = np.ones(vocab, np.float32) if weights is None else weights.cpu().numpy()
        max_len = self.config.query_max_length
        rows, cols, vals = [], [], []
        n_truncated = 0
        content = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        for r, ids in enumerate(content):
            if len(ids) > max_len:
                n_truncated += 1
                ids = ids[:max_len]
            uniq = np.unique(np.asarray(ids, dtype=np.int64))
            uniq = uniq[weights[uniq] != 0] if uniq.size else uniq
            rows.extend([r] * len(uniq))
            cols.extend(uniq.tolist())
            vals.extend(weights[uniq].tolist())
        if n_truncated:
            logger.info("%d of %d queries truncated to %d tokens", n_truncated, len(texts), max_len)
        out = sp.csr_matrix(
            (np.asarray(vals, np.float32), (np.asarray(rows), np.asarray(cols))),
            shape=(len(texts), vocab),
            dtype=np.float32,
        )
        if top_k is not None or threshold is not None:
            dense = torch.from_numpy(out.toarray())
            out = _to_csr(_prune(dense, top_k, threshold))
        out.sort_indices()
        return out

    # ------------------------------------------------------------------ inspection
    def vocabulary(self) -> list[str]:
        """Token strings indexed by vocabulary id (ids beyond the tokenizer map to '[id]')."""
        vocab = self.vocab_size
        tokens = self.tokenizer.convert_ids_to_tokens(list(range(min(vocab, len(self.tokenizer)))))
        tokens = [t if t is not None else f"[{i}]" for i, t in enumerate(tokens)]
        return tokens + [f"[{i}]" for i in range(len(tokens), vocab)]

    def to_tokens(self, row: Any, top: int | None = None) -> dict[str, float]:
        """``{token: weight}`` of one vector (a CSR row, a 1-D array or tensor), largest first."""
        if sp.issparse(row):
            row = row.tocsr()
            if row.shape[0] != 1:
                raise ValueError(f"to_tokens takes one row, got shape {row.shape}")
            ids, vals = row.indices, row.data
        else:
            dense = row.detach().cpu().numpy() if torch.is_tensor(row) else np.asarray(row)
            dense = dense.reshape(-1)
            ids = np.flatnonzero(dense)
            vals = dense[ids]
        order = np.argsort(-vals, kind="stable")
        if top is not None:
            order = order[:top]
        tokens = self.tokenizer.convert_ids_to_tokens([int(ids[i]) for i in order])
        return {str(tok): float(vals[i]) for tok, i in zip(tokens, order, strict=True)}

    def describe(self) -> dict[str, Any]:
        """Identity of this encoder for index manifests: settings plus a fingerprint of its weights."""
        info = asdict(self.config)
        info.pop("extra", None)
        info["vocab_size"] = self.vocab_size
        info["fingerprint"] = self.fingerprint()
        return info

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for name, tensor in sorted(self.backbone.state_dict().items()):
                if not torch.is_tensor(tensor) or tensor.numel() == 0:
                    continue
                digest.update(name.encode())
                flat = tensor.detach().reshape(-1)
                sample = flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy()
                digest.update(sample.tobytes())
            if self.query_weights is not None:
                digest.update(self.query_weights.cpu().numpy().tobytes())
            if self.head_bias is not None:
                digest.update(self.head_bias.detach().float().cpu().numpy().tobytes())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    # ------------------------------------------------------------------ persistence
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        state_dict: dict[str, torch.Tensor] | None = None,
        atomic: bool = True,
    ) -> None:
        """Write backbone (or adapter), tokenizer, settings and query weights into one folder.

        `state_dict` is this module's state dict when it must come from elsewhere (a DeepSpeed ZeRO-3 or
        FSDP gather). With `atomic` the folder is written beside the target and renamed into place; the
        trainer's checkpoints pass `atomic=False` because the Trainer owns that folder.
        """
        target = Path(save_directory)
        if not atomic:
            target.mkdir(parents=True, exist_ok=True)
            self._write_folder(target, state_dict)
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            self._write_folder(tmp, state_dict)
            tmp.chmod(0o755)
            if target.exists():
                old = target.with_name(f".{target.name}.old-{os.getpid()}")
                os.replace(target, old)
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _write_folder(self, folder: Path, state_dict: dict[str, torch.Tensor] | None) -> None:
        config = replace(self.config, adapter=self.is_adapter)
        if config.adapter and not config.base_model:
            raise ValueError("cannot save an adapter without config.base_model (the base it needs)")
        kwargs: dict[str, Any] = {}
        if state_dict is not None:
            kwargs["state_dict"] = {
                k[len("backbone.") :]: v for k, v in state_dict.items() if k.startswith("backbone.")
            }
        self.backbone.save_pretrained(folder, **kwargs)
        self.tokenizer.save_pretrained(folder)
        (folder / CONFIG_NAME).write_text(json.dumps(asdict(config), indent=2, sort_keys=True))
        from safetensors.torch import save_file

        if self.query_weights is not None:
            save_file(
                {"query_weights": self.query_weights.detach().cpu().contiguous()},
                folder / QUERY_WEIGHTS_NAME,
            )
        head_bias = self.head_bias
        if state_dict is not None and "head_bias" in state_dict:
            head_bias = state_dict["head_bias"]
        if head_bias is not None:
            save_file(
                {"head_bias": head_bias.detach().float().cpu().contiguous()},
                folder / HEAD_BIAS_NAME,
            )

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        dtype: str | torch.dtype | None = None,
        attn_implementation: str | None = None,
        device: str | torch.device | None = None,
        trust_remote_code: bool = False,
        backbone_kwargs: dict[str, Any] | None = None,
        quantization: str = "none",
        quantize_head: bool = False,
        **overrides: Any,
    ) -> SparseEncoder:
        """Load a saved csplade encoder, or build a fresh one over a backbone (name or folder).

        `overrides` are :class:`SparseEncoderConfig` fields (variant, pooling, max lengths, prefixes, …).
        `quantization` (none | bf16 | fp16 | int8 | nf4 | fp4 | torchao-int8-wo | torchao-int8-dyn | gptq)
        and `quantize_head`: see :mod:`csplade.quantization.modes`.
        """
        path = resolve_model(name_or_path)
        config_file = path / CONFIG_NAME
        query_weights = head_bias = None
        load_kwargs = dict(backbone_kwargs or {})
        if dtype is not None:
            load_kwargs["dtype"] = dtype
        if attn_implementation is not None:
            load_kwargs["attn_implementation"] = attn_implementation
        load_kwargs["trust_remote_code"] = trust_remote_code
        from csplade.quantization import modes as quantize

        quantization, quantize_head = quantize.resolve_request(path, quantization, quantize_head)
        load_kwargs = quantize.backbone_load_kwargs(
            quantization, load_kwargs, path=path, device=device
        )
        if config_file.exists():
            try:
                saved = json.loads(config_file.read_text())
            except json.JSONDecodeError as exc:
                raise ValueError(f"{config_file}: invalid JSON ({exc})") from exc
            config = SparseEncoderConfig.from_dict(saved, source=str(config_file))
            config = config.with_overrides(**overrides)
            if config.adapter:
                from peft import PeftModel

                base_path = resolve_model(config.base_model)
                base = _load_backbone(base_path, config.backbone_kind, load_kwargs)
                backbone = PeftModel.from_pretrained(base, path, is_trainable=False)
            else:
                backbone = _load_backbone(path, config.backbone_kind, load_kwargs)
            weights_file = path / QUERY_WEIGHTS_NAME
            if weights_file.exists():
                from safetensors.torch import load_file

                query_weights = load_file(weights_file)["query_weights"]
            head_bias = load_head_bias(path)
        else:
            overrides.setdefault("base_model", str(name_or_path))
            config = SparseEncoderConfig().with_overrides(**overrides)
            backbone = _load_backbone(path, config.backbone_kind, load_kwargs)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        encoder = cls(backbone, tokenizer, config, query_weights=query_weights, head_bias=head_bias)
        encoder = quantize.finish_loading(encoder, quantization, quantize_head)
        if device is not None:
            encoder.to(device)
        return encoder.eval()


def load_head_bias(folder: Path) -> torch.Tensor | None:
    """The calibrated per-term head bias saved in an encoder folder (None if it has none)."""
    file = Path(folder) / HEAD_BIAS_NAME
    if not file.exists():
        return None
    from safetensors.torch import load_file

    return load_file(file)["head_bias"]


def _load_backbone(path: Path, kind: str | None, load_kwargs: dict[str, Any]) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"{path / 'config.json'} not found: not a Hugging Face model folder"
        )
    hf_config = AutoConfig.from_pretrained(
        path, trust_remote_code=load_kwargs.get("trust_remote_code", False)
    )
    kind = kind or _detect_kind(hf_config)
    auto = AutoModelForCausalLM if kind == "causal" else AutoModelForMaskedLM
    return auto.from_pretrained(path, **load_kwargs)


def _prune(reps: torch.Tensor, top_k: int | None, threshold: float | None) -> torch.Tensor:
    if threshold is not None:
        reps = torch.where(reps >= threshold, reps, torch.zeros_like(reps))
    if top_k is not None and top_k < reps.shape[-1]:
        values, indices = reps.topk(top_k, dim=-1)
        reps = torch.zeros_like(reps).scatter_(-1, indices, values)
    return reps


def _to_csr(reps: torch.Tensor) -> sp.csr_matrix:
    dense = reps.detach().float().cpu().numpy()
    return sp.csr_matrix(dense, dtype=np.float32)


def iter_batches(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
