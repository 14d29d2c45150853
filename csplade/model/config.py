"""The encoder's settings: the one place the variant, pooling and dtype names are defined.

:class:`EncoderSettings` holds what a user chooses about an encoder (variant, pooling, lengths,
prefixes, head); :class:`SparseEncoderConfig` adds what the library records about it (base model,
backbone kind, adapter, free-form provenance) and is saved as ``csplade_config.json`` beside the
weights. A training recipe's ``ModelArguments`` inherits :class:`EncoderSettings`, so the recipe keys
and the saved settings are the same fields, declared once.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

VARIANTS = ("uni", "echo", "bi")
POOLINGS = ("max", "sum")
BACKBONE_KINDS = ("causal", "mlm")
DTYPES = ("float32", "bfloat16", "float16")  # torch dtype names: getattr(torch, name)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Settings added after csplade 0.1, with the value that computes what 0.1 computed: a folder saved
# without one gets that value, and `SparseEncoder.describe` leaves a setting out while it has it, so
# indexes encoded before the setting existed still match their encoder.
ADDED_SETTINGS = {
    "logit_scale": 1.0,
    "pool_next_token": False,
    "lexical_residual": False,
    "lexical_scale": 1.0,
    "lexical_docs": False,
    "learned_top_k": None,
    "lexical_analyzer": "tokens",
    "frozen_docs": False,
    "doc_windows": 1,
}

CONFIG_NAME = "csplade_config.json"
QUERY_WEIGHTS_NAME = "query_weights.safetensors"
HEAD_BIAS_NAME = "head_bias.safetensors"
LEXICAL_NAME = "lexical_weights.safetensors"
LEXICAL_ANALYZERS = ("tokens", "words", "stems")
# where a lexical residual's IDF and document lengths come from when a collection is indexed
LEXICAL_STATS = ("model", "collection")


def check_choice(name: str, value: Any, allowed: tuple[str, ...] | dict[str, Any]) -> None:
    """ValueError naming the setting and the allowed values when `value` is not one of them."""
    if value not in allowed:
        raise ValueError(f"{name}: unknown value {value!r}; allowed: {', '.join(allowed)}")


@dataclass
class EncoderSettings:
    """How an encoder turns text into vectors (shared by recipes and saved encoders)."""

    variant: str = field(default="uni", metadata={"help": "uni | echo | bi"})
    pooling: str = field(default="max", metadata={"help": "max | sum"})
    query_max_length: int = 64
    doc_max_length: int = 256
    doc_windows: int = field(
        default=1,
        metadata={
            "help": "encoding: a document longer than doc_max_length tokens is read in up to this "
            "many consecutive windows of doc_max_length tokens, each encoded as a document of its "
            "own, their vectors pooled as tokens are (max: SPLADE's max over tokens, across "
            "windows). Whole long documents at the cost of their tokens, each window no longer "
            "than the texts the model trained on; 1: cut at doc_max_length. Training reads a "
            "document's first window"
        },
    )
    query_prefix: str = ""
    doc_prefix: str = ""
    doc_only: bool = field(
        default=False, metadata={"help": "inference-free: queries are IDF-weighted token ids"}
    )
    pool_special_tokens: bool | None = field(
        default=None, metadata={"help": "None: True for MLM backbones, False for causal ones"}
    )
    fused_head: bool = field(
        default=True, metadata={"help": "the chunked head of csplade.model.head (False: naive)"}
    )
    head_chunk_size: int | None = field(
        default=None, metadata={"help": "vocab chunk of the fused head (None: its default)"}
    )
    pool_next_token: bool | None = field(
        default=None,
        metadata={
            "help": "pool the positions whose NEXT token is the text's (a causal LM's logits at a "
            "position predict the next token) instead of the text's own positions; None: on for "
            "bi, whose last position predicts a token after the text and was never trained"
        },
    )
    logit_scale: float = field(
        default=1.0,
        metadata={
            "help": "multiply the LM-head logits by this before log(1 + ReLU): a smaller scale "
            "gives smaller term weights and scores (e.g. hidden_size ** -0.25); 1: none"
        },
    )

    lexical_residual: bool = field(
        default=False,
        metadata={
            "help": "add BM25 over the text's own tokens to every vector (csplade.model.lexical): "
            "queries get lexical_scale * IDF on their tokens, documents lexical_scale * BM25's "
            "saturated tf; IDF and the mean length are the training documents' (saved with the "
            "model). The learned terms are trained on top of exact matching instead of replacing it"
        },
    )
    lexical_scale: float = field(
        default=1.0,
        metadata={
            "help": "weight of the lexical residual on each side (its score: scale ** 2 * BM25)"
        },
    )
    learned_top_k: int | None = field(
        default=None,
        metadata={
            "help": "keep each text's k largest learned terms, in training and encoding, before "
            "any lexical residual is added: a cap that holds out of domain, where a head bias "
            "calibrated on the training texts lets long or unfamiliar queries fire thousands of "
            "terms; None: no cap"
        },
    )
    lexical_docs: bool = field(
        default=False,
        metadata={
            "help": "with lexical_residual, a document's vector is its residual alone (BM25's "
            "saturated tf on its tokens, no forward pass): the learned terms are the queries'. "
            "Indexing needs no accelerator, and doc_max_length can cover whole documents"
        },
    )

    frozen_docs: bool = field(
        default=False,
        metadata={
            "help": "documents keep the vectors of the model a LoRA run starts from: they are "
            "encoded with the adapter off (and the head bias frozen), so only queries learn; a "
            "training step encodes each document once, without gradient, and reuses its vector"
        },
    )
    lexical_analyzer: str = field(
        default="tokens",
        metadata={
            "help": "which tokens the lexical residual reads: 'tokens' (the model's own, cased), "
            "'words' (bm25s's lower-cased words without English stopwords, each tokenized with its "
            "leading space) or 'stems' (those words stemmed, Snowball English)"
        },
    )

    def __post_init__(self) -> None:
        check_choice("variant", self.variant, VARIANTS)
        check_choice("lexical_analyzer", self.lexical_analyzer, LEXICAL_ANALYZERS)
        check_choice("pooling", self.pooling, POOLINGS)
        if not (isinstance(self.logit_scale, (int, float)) and self.logit_scale > 0):
            raise ValueError(f"logit_scale must be a number > 0, got {self.logit_scale!r}")
        if not (isinstance(self.lexical_scale, (int, float)) and self.lexical_scale > 0):
            raise ValueError(f"lexical_scale must be a number > 0, got {self.lexical_scale!r}")
        if self.lexical_residual and self.doc_only:
            raise ValueError(
                "lexical_residual and doc_only exclude each other: inference-free queries are "
                "already their tokens at IDF"
            )
        if self.learned_top_k is not None and not (
            isinstance(self.learned_top_k, int) and self.learned_top_k > 0
        ):
            raise ValueError(
                f"learned_top_k must be a positive integer, got {self.learned_top_k!r}"
            )
        if self.lexical_docs and not self.lexical_residual:
            raise ValueError(
                "lexical_docs needs lexical_residual: a document's vector is its lexical residual"
            )
        if self.frozen_docs and (self.lexical_docs or self.doc_only):
            raise ValueError(
                "frozen_docs is for documents the model encodes (not lexical_docs, doc_only)"
            )
        if self.lexical_analyzer != "tokens" and not self.lexical_residual:
            raise ValueError(
                f"lexical_analyzer {self.lexical_analyzer!r} needs lexical_residual: it says which "
                "tokens the residual reads"
            )
        for name in ("query_max_length", "doc_max_length", "doc_windows"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.doc_windows > 1 and self.lexical_residual:
            raise ValueError(
                "doc_windows > 1 and lexical_residual exclude each other: the residual's tf and "
                "length are the whole text's"
            )

    def encoder_settings(self) -> dict[str, Any]:
        """The :class:`EncoderSettings` fields of this object, by name."""
        return {f.name: getattr(self, f.name) for f in fields(EncoderSettings)}


@dataclass
class SparseEncoderConfig(EncoderSettings):
    """Everything needed to rebuild an encoder; saved as ``csplade_config.json`` beside the weights."""

    base_model: str = ""  # the backbone's name or path; for an adapter, the base it applies to
    backbone_kind: str | None = None  # causal | mlm (None: detected from the backbone's config)
    adapter: bool = False  # the folder holds a peft adapter over `base_model` (set when saving)
    extra: dict[str, Any] = field(default_factory=dict)  # provenance (adaptation, quantization …)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backbone_kind is not None:
            check_choice("backbone_kind", self.backbone_kind, BACKBONE_KINDS)

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

    def to_dict(self) -> dict[str, Any]:
        """The settings by name (what transformers' report_to callbacks read from ``model.config``)."""
        return asdict(self)

    def to_json_string(self) -> str:
        """As :meth:`to_dict`, in JSON (TensorBoard's callback logs it as the run's model config)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str)

    def with_overrides(self, **overrides: Any) -> SparseEncoderConfig:
        unknown = sorted(set(overrides) - set(self.field_names()))
        if unknown:
            raise ValueError(
                f"unknown encoder setting(s) {unknown}; known: {', '.join(self.field_names())}"
            )
        return replace(self, **overrides)
