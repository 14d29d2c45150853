"""Loading an encoder for training from a recipe's ModelArguments: dtype, QLoRA quantization, LoRA.

LoRA comes from peft. Targets default to every attention and MLP projection of Llama-style blocks
(q, k, v, o, gate, up, down); names absent from the backbone are dropped with a log line, and a recipe
whose targets match nothing is an error. `lora_lm_head` adds the LM head (the fused head folds the LoRA
delta into its weight, see :func:`csplade.model.head.weights.head_params`).

QLoRA: the backbone is loaded in 4-bit (nf4/fp4) or 8-bit with bitsandbytes (which also runs on CPU) and
prepared with peft's `prepare_model_for_kbit_training`; the LM head stays in full precision (bitsandbytes
skips it by default), so the fused head still applies.

`lora_last_layers: N` puts the adapter on the last N blocks only. Nothing below them needs a gradient, so
autograd records no graph there and the backward pass stops at block L-N: a step costs about one forward
plus the backward of N blocks, instead of a forward and a full backward (about 3 forwards). It is the knob
that makes LLM training steps affordable on a CPU (`csplade demo`), at the price of adapter capacity.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from csplade.model.encoder import SparseEncoder
from csplade.model.frozen_docs import DocVectors
from csplade.model.prefix_cache import PrefixCache
from csplade.quantization.modes import quantization_config
from csplade.training.arguments import ModelArguments

logger = logging.getLogger(__name__)


def load_encoder_for_training(model_args: ModelArguments) -> SparseEncoder:
    """The encoder a recipe describes, with LoRA applied when asked (trainable parameters set)."""
    dtype = getattr(torch, model_args.model_dtype)
    backbone_kwargs: dict[str, Any] = {}
    qconfig = quantization_config(model_args.quantization, dtype)
    if qconfig is not None:
        backbone_kwargs["quantization_config"] = qconfig
    encoder = SparseEncoder.from_pretrained(
        model_args.model_name_or_path,
        dtype=dtype,
        attn_implementation=model_args.attn_implementation,
        trust_remote_code=model_args.trust_remote_code,
        backbone_kwargs=backbone_kwargs,
        **model_args.encoder_settings(),
    )
    if encoder.is_adapter and encoder.config.frozen_docs:
        raise ValueError(
            f"{model_args.model_name_or_path} encodes documents with its adapter off (frozen_docs): "
            "merging the adapter to train on would change its documents; train from its base"
        )
    if encoder.is_adapter:
        # A checkpoint saved as an adapter (e.g. a LoRA adaptation phase): fold it into the base
        # before training goes on (full fine-tuning saves whole weights).
        if model_args.use_lora:
            # a new adapter would apply to merged weights that exist in no folder: it could not be
            # reloaded
            raise ValueError(
                f"{model_args.model_name_or_path} holds a LoRA adapter; a second LoRA run needs a "
                "base with whole weights (run the adaptation with merge_adapter: true, which "
                "saves merged weights), or train without use_lora"
            )
        encoder.backbone = encoder.backbone.merge_and_unload()
        logger.info("merged the adapter of %s into its base", model_args.model_name_or_path)
    if qconfig is not None:
        from peft import prepare_model_for_kbit_training

        encoder.backbone = prepare_model_for_kbit_training(
            encoder.backbone, use_gradient_checkpointing=False
        )
    if model_args.use_lora:
        apply_lora(encoder, model_args)
        if model_args.cache_frozen_layers:
            attach_prefix_cache(encoder, model_args.lora_last_layers)
        # The adapter applies to the weights loaded here, not to the base they came from: a folder
        # saved by `csplade adapt` records its own base (the raw backbone) as `base_model`.
        encoder.config = replace(encoder.config, base_model=_as_base(model_args.model_name_or_path))
    if model_args.frozen_docs:
        if not model_args.use_lora:
            raise ValueError(
                "frozen_docs encodes documents with the adapter off: it needs use_lora"
            )
        encoder.doc_vectors = DocVectors.for_encoder(encoder, model_args.frozen_docs_file)
        if encoder.head_bias is not None:  # it shapes the documents' vectors too
            encoder.head_bias.requires_grad_(False)
    encoder.train()
    return encoder


def attach_prefix_cache(encoder: SparseEncoder, trained_layers: int) -> PrefixCache:
    """Cache the outputs of the blocks below the last `trained_layers` (they must be frozen)."""
    decoder = encoder.base_model.base_model
    n_frozen = len(decoder.layers) - trained_layers
    PrefixCache.check_frozen(decoder, n_frozen)
    encoder.prefix_cache = PrefixCache(n_frozen)
    logger.info("prefix cache: the outputs of the first %d blocks are kept per text", n_frozen)
    return encoder.prefix_cache


def _as_base(name_or_path: str) -> str:
    """A local folder as an absolute path (the adapter is reloaded from anywhere), a name as given."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.is_dir() else name_or_path


def apply_lora(encoder: SparseEncoder, model_args: ModelArguments) -> SparseEncoder:
    """Wrap the encoder's backbone with a peft LoRA adapter; only the adapter stays trainable."""
    from peft import LoraConfig, get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in encoder.backbone.named_modules()}
    targets = [t for t in model_args.lora_target_modules if t in names]
    dropped = sorted(set(model_args.lora_target_modules) - set(targets))
    if dropped:
        logger.info("LoRA targets not in this backbone, skipped: %s", ", ".join(dropped))
    if not targets:
        raise ValueError(
            f"lora_target_modules {model_args.lora_target_modules} match no module of "
            f"{type(encoder.base_model).__name__}"
        )
    if model_args.lora_lm_head:
        head = encoder.base_model.get_output_embeddings()
        head_name = next(n for n, m in encoder.backbone.named_modules() if m is head)
        targets.append(head_name.rsplit(".", 1)[-1])
    layers = None
    if model_args.lora_last_layers is not None:
        n_layers = encoder.base_model.config.get_text_config().num_hidden_layers
        first = max(0, n_layers - model_args.lora_last_layers)
        layers = list(range(first, n_layers))
        if model_args.lora_lm_head:
            raise ValueError("lora_last_layers and lora_lm_head cannot be combined")
    config = LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=targets,
        layers_to_transform=layers,
        bias="none",
    )
    encoder.backbone = get_peft_model(encoder.backbone, config)
    trainable = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    total = sum(p.numel() for p in encoder.parameters())
    logger.info(
        "LoRA r=%d on %s: %d of %d parameters trainable", config.r, targets, trainable, total
    )
    return encoder
