"""Recipe dataclasses and the recipe parser.

A recipe is a YAML file whose keys are exactly the field names of these dataclasses (plus those of
`transformers.TrainingArguments`), grouped by comments (`# Model`, `# LoRA`, `# Loss`, `# Data`,
`# Training`), in the alignment-handbook style. `csplade train RECIPE.yaml --key value …` overrides keys
from the command line. An unknown key is an error that names the closest valid one.

- :class:`ModelArguments`: the backbone, the encoder's settings (variant, pooling, lengths, prefixes …),
  precision/quantization and LoRA.
- :class:`SparsityArguments`: the losses (InfoNCE, distillation) and the sparsity regularizers with their
  λ and warm-up.
- :class:`DataArguments`: where training groups come from and how they are sampled.
- :class:`AdaptationArguments`: the pre-contrastive adaptation phase.
- :class:`CspladeTrainingArguments`: `transformers.TrainingArguments` with csplade's defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser, TrainingArguments

logger = logging.getLogger(__name__)

DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUANTIZATION_MODES = ("none", "int8", "nf4", "fp4")
DTYPES = ("float32", "bfloat16", "float16")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: unknown value {value!r}; allowed: {', '.join(allowed)}")


@dataclass
class ModelArguments:
    # Backbone
    model_name_or_path: str = field(
        default="smollm2-135m",
        metadata={"help": "packaged model name, HF folder, or a csplade checkpoint to start from"},
    )
    variant: str = field(default="uni", metadata={"help": "uni | echo | bi"})
    pooling: str = field(default="max", metadata={"help": "max | sum"})
    query_max_length: int = 64
    doc_max_length: int = 256
    query_prefix: str = ""
    doc_prefix: str = ""
    doc_only: bool = field(
        default=False, metadata={"help": "inference-free: queries are IDF-weighted token ids"}
    )
    pool_special_tokens: bool | None = None
    head_bias_df: float | None = field(
        default=None,
        metadata={
            "help": "calibrate a per-term head bias so each term fires in this fraction of the "
            "training documents before training, when the model has none (e.g. 0.01)"
        },
    )
    fused_head: bool = True
    head_chunk_size: int | None = None
    model_dtype: str = field(
        default="float32", metadata={"help": "weights dtype: float32 | bfloat16 | float16"}
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "eager | sdpa | flex_attention | flash_attention_2"}
    )
    trust_remote_code: bool = False
    quantization: str = field(
        default="none",
        metadata={"help": "backbone quantization for QLoRA: none | int8 | nf4 | fp4"},
    )
    # LoRA
    use_lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    lora_lm_head: bool = field(default=False, metadata={"help": "also put LoRA on the LM head"})
    lora_last_layers: int | None = field(
        default=None,
        metadata={
            "help": "LoRA only on the last N transformer blocks: the backward pass stops there "
            "(cheaper steps, less capacity); None: every block"
        },
    )

    def __post_init__(self) -> None:
        _choice("variant", self.variant, ("uni", "echo", "bi"))
        _choice("pooling", self.pooling, ("max", "sum"))
        _choice("model_dtype", self.model_dtype, DTYPES)
        _choice("quantization", self.quantization, QUANTIZATION_MODES)
        if self.quantization != "none" and not self.use_lora:
            raise ValueError(
                f"quantization={self.quantization!r} trains a quantized backbone, which only works "
                "with LoRA (QLoRA): set use_lora: true"
            )
        if self.lora_r < 1:
            raise ValueError(f"lora_r must be >= 1, got {self.lora_r}")
        if self.head_bias_df is not None and not 0 < self.head_bias_df < 1:
            raise ValueError(f"head_bias_df must be in (0, 1), got {self.head_bias_df}")
        if self.lora_last_layers is not None and self.lora_last_layers < 1:
            raise ValueError(f"lora_last_layers must be >= 1, got {self.lora_last_layers}")

    def encoder_settings(self) -> dict[str, Any]:
        """The SparseEncoderConfig fields this recipe sets."""
        return {
            "variant": self.variant,
            "pooling": self.pooling,
            "query_max_length": self.query_max_length,
            "doc_max_length": self.doc_max_length,
            "query_prefix": self.query_prefix,
            "doc_prefix": self.doc_prefix,
            "doc_only": self.doc_only,
            "pool_special_tokens": self.pool_special_tokens,
            "fused_head": self.fused_head,
            "head_chunk_size": self.head_chunk_size,
        }


@dataclass
class SparsityArguments:
    # Contrastive loss
    contrastive_weight: float = 1.0
    temperature: float = 1.0
    in_batch_negatives: bool = True
    cross_device_negatives: bool = field(
        default=True, metadata={"help": "gather docs from all processes as extra negatives"}
    )
    # Distillation
    distill_loss: str = field(default="none", metadata={"help": "none | margin_mse | kl"})
    distill_weight: float = 1.0
    distill_temperature: float = 1.0
    # Sparsity regularization
    query_regularizer: str = field(default="flops", metadata={"help": "flops | l1 | none"})
    doc_regularizer: str = field(
        default="flops", metadata={"help": "flops | l1 | idf_flops | none"}
    )
    lambda_q: float = 3e-4
    lambda_d: float = 1e-4
    reg_warmup_steps: int = field(
        default=0, metadata={"help": "optimizer steps of the quadratic λ warm-up (0: none)"}
    )

    def __post_init__(self) -> None:
        _choice("distill_loss", self.distill_loss, ("none", "margin_mse", "kl"))
        _choice("query_regularizer", self.query_regularizer, ("flops", "l1", "none"))
        _choice("doc_regularizer", self.doc_regularizer, ("flops", "l1", "idf_flops", "none"))
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.lambda_q < 0 or self.lambda_d < 0:
            raise ValueError("lambda_q and lambda_d must be >= 0")
        if self.reg_warmup_steps < 0:
            raise ValueError("reg_warmup_steps must be >= 0")


@dataclass
class DataArguments:
    train_data: str | None = field(
        default=None,
        metadata={"help": "JSONL of training groups, or a BEIR folder with qrels/<split>.tsv"},
    )
    train_split: str = "train"
    negatives_run: str | None = field(
        default=None,
        metadata={"help": "TREC run whose top docs are the hard negatives (BEIR input)"},
    )
    negatives_depth: int = 100
    group_size: int = field(default=8, metadata={"help": "docs per query: 1 positive + negatives"})
    max_train_queries: int | None = None
    skip_bad_rows: bool = False

    def __post_init__(self) -> None:
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")


@dataclass
class AdaptationArguments:
    adapt_data: str | None = field(
        default=None, metadata={"help": "corpus.jsonl, a BEIR folder or a plain-text file"}
    )
    adapt_objective: str = field(default="auto", metadata={"help": "auto | clm | mntp"})
    adapt_max_length: int = 256
    mask_ratio: float = 0.2
    relu_weight: float = field(default=0.1, metadata={"help": "λ_relu of the activation loss"})
    relu_target: float = field(
        default=0.01, metadata={"help": "target fraction of positive logits per token"}
    )
    max_adapt_texts: int | None = None
    merge_adapter: bool = field(
        default=True, metadata={"help": "save a merged model (not just the LoRA adapter)"}
    )

    def __post_init__(self) -> None:
        _choice("adapt_objective", self.adapt_objective, ("auto", "clm", "mntp"))
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")


@dataclass
class CspladeTrainingArguments(TrainingArguments):
    """`transformers.TrainingArguments` with csplade's defaults (every HF field stays available)."""

    output_dir: str | None = field(default=None, metadata={"help": "where checkpoints go"})
    remove_unused_columns: bool = False
    logging_steps: float = 10
    save_strategy: str = "steps"
    save_steps: float = 500
    save_total_limit: int | None = 2
    lr_scheduler_type: str = "linear"
    warmup_steps: float = 0
    dataloader_num_workers: int = 0

    def __post_init__(self) -> None:
        # Several processes launched on a machine without GPUs (`accelerate launch --multi_gpu` / a DDP or
        # DeepSpeed config on CPU): the Trainer joins them over gloo only with use_cpu; without it every
        # process would silently train alone.
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and not self.use_cpu and not _has_accelerator():
            logger.info(
                "%d processes and no GPU: training on CPU over gloo (use_cpu=True)", launched
            )
            self.use_cpu = True
        super().__post_init__()


def _has_accelerator() -> bool:
    import torch

    return (
        torch.cuda.is_available()
        or (hasattr(torch, "xpu") and torch.xpu.is_available())
        or (hasattr(torch.backends, "mps") and torch.backends.mps.is_available())
    )


def _all_fields(types: tuple[type, ...]) -> dict[str, type]:
    out: dict[str, type] = {}
    for cls in types:
        for f in dataclasses.fields(cls):
            if f.init:
                out[f.name] = cls
    return out


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _check_keys(keys: list[str], valid: dict[str, type], where: str) -> None:
    for key in keys:
        if key not in valid:
            raise ValueError(f"{where}: unknown key {key!r}{_suggest(key, sorted(valid))}")


def _coerce(parser: HfArgumentParser, key: str, value: Any) -> Any:
    """Convert a YAML scalar with the type argparse would use (YAML 1.1 reads 2e-5 as a string)."""
    action = next((a for a in parser._actions if a.dest == key), None)
    if action is None or action.type is None or not isinstance(value, str):
        return value
    try:
        return action.type(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"key {key!r}: cannot read {value!r} ({exc})") from exc


def parse_overrides(parser: HfArgumentParser, argv: list[str]) -> dict[str, Any]:
    """`--key value …` (or `--key=value`) into a dict with argparse's types; only the given keys."""
    valid = {a.dest for a in parser._actions if a.dest != "help"}
    quiet = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for action in parser._actions:
        if action.dest == "help":
            continue
        kwargs: dict[str, Any] = {"dest": action.dest, "default": argparse.SUPPRESS}
        if action.nargs is not None and action.nargs != 0:
            kwargs["nargs"] = action.nargs
            if action.nargs == "?":
                kwargs["const"] = action.const
        elif action.nargs == 0:  # store_true style
            kwargs["action"] = "store_const"
            kwargs["const"] = action.const
        if action.type is not None and action.nargs != 0:
            kwargs["type"] = action.type
        if action.choices is not None:
            kwargs["choices"] = action.choices
        quiet.add_argument(*action.option_strings, **kwargs)
    for token in argv:
        if token.startswith("--"):
            key = token[2:].split("=", 1)[0].replace("-", "_")
            if key not in valid:
                raise ValueError(f"command line: unknown key {key!r}{_suggest(key, sorted(valid))}")
    try:
        namespace, rest = quiet.parse_known_args(argv)
    except SystemExit as exc:
        raise ValueError(f"command line: cannot parse overrides {argv}") from exc
    if rest:
        raise ValueError(f"command line: unexpected arguments {rest}")
    return vars(namespace)


def parse_recipe(
    recipe: str | Path | None,
    overrides: list[str] | None = None,
    types: tuple[type, ...] = (
        ModelArguments,
        SparsityArguments,
        DataArguments,
        CspladeTrainingArguments,
    ),
) -> tuple[Any, ...]:
    """Read a recipe YAML (or none) plus command-line overrides into instances of `types`."""
    data: dict[str, Any] = {}
    where = "recipe"
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise FileNotFoundError(f"recipe {path} not found")
        where = str(path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: invalid YAML ({exc})") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a recipe is a mapping of keys to values")
        data = loaded
    valid = _all_fields(types)
    _check_keys(list(data), valid, where)
    parser = HfArgumentParser(types)
    data = {k: _coerce(parser, k, v) for k, v in data.items()}
    data.update(parse_overrides(parser, overrides or []))
    try:
        return parser.parse_dict(data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from exc
