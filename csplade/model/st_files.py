"""sentence-transformers files beside a masked-LM encoder, so the folder also loads in
``sentence_transformers.SparseEncoder`` and gives the same vectors.

A SPLADE encoder over a masked LM is exactly sentence-transformers' (MLMTransformer → SpladePooling):
the BERT-style MLM logits at every token, log(1 + ReLU), max (or sum) over the attended tokens,
[CLS]/[SEP] included. The files are the 5.x layout, which 5.x and later read: ``modules.json``,
``sentence_bert_config.json`` (max length), ``config_sentence_transformers.json`` (dot product; the
prefixes as the ``query`` / ``document`` prompts) and ``1_SpladePooling/config.json``; the weights and
tokenizer are the folder's own. Nothing here imports sentence-transformers.

sentence-transformers has one max length, counted with the special tokens and the prompt; csplade caps
the text alone, per side. The files use the document side (``doc_max_length`` + specials + prefix), so
documents match exactly and a query longer than ``query_max_length`` tokens is cut later there.

Not written (the reason is logged and returned) where sentence-transformers cannot give the same
vectors: causal backbones (no MLM head over all tokens; the ``echo``/``bi`` variants have no
counterpart), LoRA adapters (merge first), a calibrated head bias or logit scale (no module applies
them), inference-free (``doc_only``) encoders, a lexical residual, pooling without the special tokens, quantized folders.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from csplade.model.inputs import plain_ids, probe_template

logger = logging.getLogger(__name__)

MODULES_NAME = "modules.json"
FILES = (
    MODULES_NAME,
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_SpladePooling/config.json",
)
_MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.sparse_encoder.models.MLMTransformer"},
    {"idx": 1, "name": "1", "path": "1_SpladePooling", "type": "sentence_transformers.sparse_encoder.models.SpladePooling"},
]  # fmt: skip


def unsupported(encoder: Any) -> str | None:
    """Why sentence-transformers cannot reproduce this encoder's vectors (None: it can)."""
    settings = {**asdict(encoder.config), "adapter": encoder.is_adapter}
    return unsupported_settings(settings, has_head_bias=encoder.head_bias is not None)


def unsupported_settings(config: dict[str, Any], has_head_bias: bool) -> str | None:
    """`unsupported` from saved settings (a ``csplade_config.json``) and whether a head bias exists."""
    variant = config.get("variant", "uni")
    checks = (
        (
            config.get("backbone_kind") != "mlm",
            "a causal LM backbone (SpladePooling reads MLM logits)",
        ),
        (config.get("adapter", False), "a LoRA adapter (merge it first: csplade merge)"),
        (has_head_bias, "a calibrated head bias"),
        (config.get("logit_scale", 1.0) != 1.0, "a logit scale"),
        (config.get("doc_only", False), "an inference-free (doc_only) encoder"),
        (config.get("lexical_residual", False), "a lexical residual (no module adds it)"),
        (config.get("pool_special_tokens") is False, "pooling without the special tokens"),
        (variant != "uni", f"the {variant!r} variant"),
        (bool((config.get("extra") or {}).get("quantization")), "a quantized encoder"),
    )
    return next((why for failed, why in checks if failed), None)


def write_st_files(encoder: Any, folder: Path) -> str | None:
    """Write the sentence-transformers files into `folder`; returns why not when it cannot."""
    why = unsupported(encoder)
    if why is not None:
        logger.debug("no sentence-transformers files: %s", why)
        return why
    config = encoder.config
    template = probe_template(encoder.tokenizer)
    prefix = plain_ids(encoder.tokenizer, config.doc_prefix) if config.doc_prefix else []
    max_length = config.doc_max_length + len(template.head) + len(template.tail) + len(prefix)
    files: dict[str, Any] = {
        MODULES_NAME: _MODULES,
        "sentence_bert_config.json": {"max_seq_length": max_length, "do_lower_case": False},
        "config_sentence_transformers.json": {
            "model_type": "SparseEncoder",
            "prompts": {"query": config.query_prefix, "document": config.doc_prefix},
            "default_prompt_name": None,
            "similarity_fn_name": "dot",
            "__version__": {"sentence_transformers": "5.0.0"},  # the layout's version
        },
        "1_SpladePooling/config.json": {
            "pooling_strategy": config.pooling,
            "activation_function": "relu",
        },
    }
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    return None
