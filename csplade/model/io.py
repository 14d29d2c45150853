"""Saving and loading encoder folders, and the fingerprint of an encoder's weights.

A folder holds the backbone (or, for a LoRA adapter, the adapter over ``config.base_model``) as
transformers/peft save it, the tokenizer, ``csplade_config.json`` (:class:`SparseEncoderConfig`), and,
where the encoder has them, ``query_weights.safetensors`` (inference-free queries) and
``head_bias.safetensors`` (the calibrated per-term bias) and ``lexical_weights.safetensors`` (the
lexical residual's IDF and mean length, :mod:`csplade.model.lexical`). Weights are safetensors only. Beside them: a
model card, ``README.md`` (:mod:`csplade.model.card`), and for masked-LM encoders the files that let
``sentence_transformers.SparseEncoder`` load the folder (:mod:`csplade.model.st_files`). A folder is
written beside its target and renamed into place (:func:`csplade._io.atomic_folder`);
:func:`push_to_hub` uploads one.

Loading also applies a quantization mode (:mod:`csplade.quantization.modes`; the quantized LM head:
:mod:`csplade.model.head.quantized`): a folder saved quantized reloads as saved.

The functions take the encoder (or its class) as their first argument; `SparseEncoder` exposes them
as ``save_pretrained`` / ``from_pretrained`` / ``fingerprint``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from csplade._io import atomic_folder
from csplade.model import lexical
from csplade.model.backbones import load_backbone, resolve_model
from csplade.model.bidirectional import make_causal
from csplade.model.card import CARD_NAME, card_text, write_card
from csplade.model.config import (
    ADDED_SETTINGS,
    CONFIG_NAME,
    HEAD_BIAS_NAME,
    QUERY_WEIGHTS_NAME,
    SparseEncoderConfig,
)
from csplade.model.head.quantized import (
    module_counts,
    quantize_vocab_matrices,
    refuse_inexact_save,
)
from csplade.model.st_files import write_st_files
from csplade.quantization import loading as quantization
from csplade.quantization.modes import check_mode, is_quantized, parameter_bytes

logger = logging.getLogger(__name__)


def save(
    encoder: Any,
    save_directory: str | os.PathLike,
    state_dict: dict[str, torch.Tensor] | None = None,
    atomic: bool = True,
) -> None:
    """Write backbone (or adapter), tokenizer, settings and query weights into one folder.

    `state_dict` is the encoder's state dict when it must come from elsewhere (a DeepSpeed ZeRO-3 or
    FSDP gather). With `atomic` the folder is written beside the target and renamed into place; the
    trainers' checkpoints pass `atomic=False` because the Trainer owns that folder.
    """
    target = Path(save_directory)
    if not atomic:
        target.mkdir(parents=True, exist_ok=True)
        _write_folder(encoder, target, state_dict, target.resolve().name)
        return
    with atomic_folder(target) as tmp:
        _write_folder(encoder, tmp, state_dict, target.resolve().name)


def _write_folder(
    encoder: Any, folder: Path, state_dict: dict[str, torch.Tensor] | None, name: str
) -> None:
    config = replace(encoder.config, adapter=encoder.is_adapter)
    if config.adapter and not config.base_model:
        raise ValueError("cannot save an adapter without config.base_model (the base it needs)")
    kwargs: dict[str, Any] = {}
    if state_dict is not None:
        prefix = "backbone."
        kwargs["state_dict"] = {
            k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)
        }
    encoder.backbone.save_pretrained(folder, **kwargs)
    encoder.tokenizer.save_pretrained(folder)
    (folder / CONFIG_NAME).write_text(json.dumps(asdict(config), indent=2, sort_keys=True))
    if encoder.query_weights is not None:
        save_file(
            {"query_weights": encoder.query_weights.detach().cpu().contiguous()},
            folder / QUERY_WEIGHTS_NAME,
        )
    head_bias = encoder.head_bias
    if state_dict is not None and "head_bias" in state_dict:
        head_bias = state_dict["head_bias"]
    if head_bias is not None:
        save_file(
            {"head_bias": head_bias.detach().float().cpu().contiguous()},
            folder / HEAD_BIAS_NAME,
        )
    if encoder.lexical is not None:
        lexical.save(encoder.lexical, folder)
    write_st_files(encoder, folder)
    write_card(folder, name)


# What a push leaves out: training checkpoints and logs kept in the output folder, the local card.
PUSH_IGNORE = ["checkpoint-*", "checkpoint-*/**", "runs/**", ".*", CARD_NAME, "training_args.bin"]


def push_to_hub(
    encoder_or_folder: Any,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "csplade encoder",
) -> str:
    """Upload an encoder (saved first into a temporary folder) or a saved folder to the hub.

    Creates the model repository `repo_id` if needed; returns the commit URL. Refuses at once, with
    what to do, when the hub is unreachable by configuration (``HF_HUB_OFFLINE``).
    """
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise RuntimeError(
            f"push_to_hub({repo_id!r}) needs the Hugging Face hub, but HF_HUB_OFFLINE is set; "
            "upload the saved folder later, where online (`csplade push FOLDER --repo-id ID`)"
        )
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory(prefix="csplade-push-") as tmp:
        folder = Path(tmp) / "encoder"
        if isinstance(encoder_or_folder, (str, os.PathLike)):
            folder = Path(encoder_or_folder)
            if not (folder / CONFIG_NAME).is_file():
                raise FileNotFoundError(
                    f"{folder}: not a csplade encoder folder (no {CONFIG_NAME})"
                )
        else:
            save(encoder_or_folder, folder)
        logger.info("uploading %s to %s", folder, repo_id)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message,
            ignore_patterns=PUSH_IGNORE,
        )
        # the card as the hub shows it: it names the model by its repository
        commit = api.upload_file(
            path_or_fileobj=card_text(folder, name=repo_id).encode("utf-8"),
            path_in_repo=CARD_NAME,
            repo_id=repo_id,
            commit_message=commit_message,
        )
    return str(getattr(commit, "commit_url", commit))


def read_config(folder: Path) -> SparseEncoderConfig | None:
    """The saved :class:`SparseEncoderConfig` of an encoder folder (None for a plain HF folder)."""
    config_file = Path(folder) / CONFIG_NAME
    if not config_file.exists():
        return None
    try:
        saved = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_file}: invalid JSON ({exc})") from exc
    if not isinstance(saved, dict):
        raise ValueError(f"{config_file}: expected a JSON object of encoder settings")
    saved = {**ADDED_SETTINGS, **saved}  # a folder saved before a setting existed
    return SparseEncoderConfig.from_dict(saved, source=str(config_file))


def load_head_bias(folder: str | os.PathLike) -> torch.Tensor | None:
    """The calibrated per-term head bias saved in an encoder folder (None if it has none)."""
    file = Path(folder) / HEAD_BIAS_NAME
    return load_file(file)["head_bias"] if file.exists() else None


def load_query_weights(folder: str | os.PathLike) -> torch.Tensor | None:
    file = Path(folder) / QUERY_WEIGHTS_NAME
    return load_file(file)["query_weights"] if file.exists() else None


def _load_parts(
    path: Path, saved: SparseEncoderConfig | None, load_kwargs: dict, name_or_path, overrides: dict
) -> tuple[SparseEncoderConfig, Any, dict[str, Any]]:
    """(config, backbone, the encoder's saved tensors) of a csplade folder, or of a fresh encoder
    over a plain backbone (no saved tensors)."""
    if saved is None:
        overrides.setdefault("base_model", str(name_or_path))
        config = SparseEncoderConfig().with_overrides(**overrides)
        return config, load_backbone(path, config.backbone_kind, load_kwargs), {}
    if "variant" in overrides and "pool_next_token" not in overrides:
        overrides["pool_next_token"] = None  # resolved again for the variant asked for
    config = saved.with_overrides(**overrides)
    if config.adapter:
        from peft import PeftModel

        base = load_backbone(resolve_model(config.base_model), config.backbone_kind, load_kwargs)
        backbone = PeftModel.from_pretrained(base, path, is_trainable=False)
    else:
        backbone = load_backbone(path, config.backbone_kind, load_kwargs)
    tensors = {
        "query_weights": load_query_weights(path),
        "head_bias": load_head_bias(path),
        "lexical": lexical.load(path),
    }
    return config, backbone, tensors


def load(
    cls: type,
    name_or_path: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    backbone_kwargs: dict[str, Any] | None = None,
    quantization_mode: str = "none",
    quantize_head: bool = False,
    **overrides: Any,
) -> Any:
    """Load a saved encoder folder, or build a fresh encoder of `cls` over a backbone (name or folder).

    `overrides` are :class:`SparseEncoderConfig` fields (variant, pooling, max lengths, prefixes, …).
    """
    path = resolve_model(name_or_path)
    saved = read_config(path)
    load_kwargs = dict(backbone_kwargs or {})
    if dtype is not None:
        load_kwargs["dtype"] = dtype
    if attn_implementation is not None:
        load_kwargs["attn_implementation"] = attn_implementation
    load_kwargs["trust_remote_code"] = trust_remote_code
    recorded = saved.extra.get(quantization.EXTRA_KEY) if saved is not None else None
    mode, quantize_head = quantization.resolve_request(
        recorded, quantization_mode, quantize_head, where=str(path / CONFIG_NAME)
    )
    load_kwargs = quantization.backbone_load_kwargs(mode, load_kwargs, path=path, device=device)
    config, backbone, saved_tensors = _load_parts(path, saved, load_kwargs, name_or_path, overrides)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if config.variant != "bi":  # a `bi` checkpoint keeps is_causal: false in its config.json
        make_causal(backbone)
    encoder = cls(backbone, tokenizer, config, **saved_tensors)
    encoder = finish_quantized(encoder, mode, quantize_head)
    if device is not None:
        encoder.to(device)
    return encoder.eval()


def finish_quantized(encoder: Any, mode: str, quantize_head: bool) -> Any:
    """Quantize the head if asked and record the mode in ``encoder.config.extra``.

    The last step of loading in a quantization mode (:mod:`csplade.quantization.loading`). Also keeps
    bnb 4-bit weights in their standard layout, and makes saving refuse (with advice) a quantized head
    that would not reload exactly (:class:`~csplade.model.head.quantized.QuantizedLMHead`, "Saving").
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
        refuse_inexact_save(base, mode)
    if mode in ("nf4", "fp4"):
        quantization.keep_standard_4bit_layout(base)
    # bf16 / fp16 cast the head with everything else: no separate head quantization to record.
    record = {"mode": mode, "quantize_head": bool(quantize_head and is_quantized(mode))}
    encoder.config = replace(
        encoder.config, extra={**encoder.config.extra, quantization.EXTRA_KEY: record}
    )
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


def fingerprint(encoder: Any) -> str:
    """A short hash of a sample of every weight, the query weights and the head bias."""
    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.backbone.state_dict().items()):
        if not torch.is_tensor(tensor) or tensor.numel() == 0:
            continue
        digest.update(name.encode())
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy()
        digest.update(sample.tobytes())
    if encoder.query_weights is not None:
        digest.update(encoder.query_weights.cpu().numpy().tobytes())
    if encoder.head_bias is not None:
        digest.update(encoder.head_bias.detach().float().cpu().numpy().tobytes())
    if encoder.lexical is not None:
        digest.update(encoder.lexical.idf.cpu().numpy().tobytes())
        digest.update(encoder.lexical.lengths.cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
