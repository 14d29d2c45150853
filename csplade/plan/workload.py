"""What one micro-step on one GPU computes, read from a training or adaptation recipe.

`read_workload` parses a recipe with the same dataclasses and overrides as ``csplade train`` /
``csplade adapt`` (without TrainingArguments' checks against the local machine, since the planner
runs away from the GPUs the recipe is for) and keeps what memory and time depend on: batch, group
size, precision, checkpointing, negatives, the adaptation objective, and the examples per epoch,
counted in a local data set when ``--num-queries`` is not given.

Known limits: examples are counted only in a local data set (a JSONL of training groups, or a BEIR
folder's qrels for training and corpus for adaptation), never downloaded.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from csplade.data.beir import find_dataset
from csplade.training.arguments import (
    AdaptationArguments,
    CspladeTrainingArguments,
    DataArguments,
    LossArguments,
    ModelArguments,
)
from csplade.training.recipe import parse_recipe


@dataclass
class PlanTrainingArguments(CspladeTrainingArguments):
    """The recipe's training fields, read without TrainingArguments' device checks.

    `transformers.TrainingArguments` refuses ``bf16: true`` on a machine without a GPU; the planner runs
    on a laptop or a login node, away from the GPUs the recipe is for, so it skips those checks.
    """

    def __post_init__(self) -> None:  # no validation against the local machine
        pass


@dataclass(frozen=True)
class Workload:
    """What one micro-step on one GPU computes, read from a recipe."""

    phase: str  # train | adapt
    model: ModelArguments
    batch_size: int
    grad_accum: int = 1
    group_size: int = 1
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"  # no | bf16 | fp16 (the recipe's bf16 / fp16)
    optimizer: str = "adamw_torch"
    cross_device_negatives: bool = False
    in_batch_negatives: bool = True
    adapt_objective: str = "clm"
    adapt_length: int = 256
    mask_ratio: float = 0.2
    epochs: float = 1.0
    max_steps: int = -1
    examples: int | None = None  # queries (train) or texts (adapt) per epoch
    examples_source: str = ""

    def __post_init__(self) -> None:
        if self.phase not in ("train", "adapt"):
            raise ValueError(f"phase must be 'train' or 'adapt', got {self.phase!r}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError(
                "per_device_train_batch_size and gradient_accumulation_steps must be >= 1"
            )

    def with_model(self, **changes: Any) -> Workload:
        return dataclasses.replace(self, model=dataclasses.replace(self.model, **changes))


def recipe_phase(recipe: str | os.PathLike) -> str:
    """'adapt' when the recipe sets any AdaptationArguments key, else 'train'."""
    path = Path(recipe)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: invalid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a recipe is a mapping of keys to values")
    adapt_keys = {f.name for f in dataclasses.fields(AdaptationArguments)}
    return "adapt" if adapt_keys & set(data) else "train"


def read_workload(
    recipe: str | os.PathLike,
    overrides: list[str] | None = None,
    num_examples: int | None = None,
) -> Workload:
    """The :class:`Workload` of a training or adaptation recipe (plus `--key value` overrides)."""
    phase = recipe_phase(recipe)
    if phase == "adapt":
        model_args, adapt_args, targs = parse_recipe(
            recipe, overrides, types=(ModelArguments, AdaptationArguments, PlanTrainingArguments)
        )
        extra: dict[str, Any] = {
            "adapt_objective": _adapt_objective(adapt_args.adapt_objective, model_args.variant),
            "adapt_length": adapt_args.adapt_max_length,
            "mask_ratio": adapt_args.mask_ratio,
        }
        data, split, cap = adapt_args.adapt_data, "train", adapt_args.max_adapt_texts
    else:
        model_args, loss_args, data_args, targs = parse_recipe(
            recipe,
            overrides,
            types=(ModelArguments, LossArguments, DataArguments, PlanTrainingArguments),
        )
        extra = {
            "group_size": data_args.group_size,
            "cross_device_negatives": loss_args.cross_device_negatives
            and loss_args.in_batch_negatives,
            "in_batch_negatives": loss_args.in_batch_negatives,
        }
        data, split, cap = data_args.train_data, data_args.train_split, data_args.max_train_queries
    if num_examples is not None:
        examples, source = num_examples, "--num-queries"
    else:
        examples = count_examples(phase, data, split)
        source = f"counted in {data}" if examples is not None else ""
    if examples is not None and cap is not None and cap < examples:
        examples, source = cap, f"{source}, capped by the recipe at {cap}"
    optim = getattr(targs.optim, "value", targs.optim)
    return Workload(
        phase=phase,
        model=model_args,
        batch_size=int(targs.per_device_train_batch_size),
        grad_accum=int(targs.gradient_accumulation_steps),
        gradient_checkpointing=_checkpointing(targs),
        mixed_precision=_mixed_precision(targs),
        optimizer=str(optim),
        epochs=float(targs.num_train_epochs),
        max_steps=int(targs.max_steps),
        examples=examples,
        examples_source=source,
        **extra,
    )


def _mixed_precision(training_args: Any) -> str:
    if getattr(training_args, "bf16", False):
        return "bf16"
    if getattr(training_args, "fp16", False):
        return "fp16"
    return "no"


def _checkpointing(training_args: Any) -> bool:
    """TrainingArguments' rule: `activation_checkpointing` when set, else its deprecated alias."""
    value = getattr(training_args, "activation_checkpointing", None)
    if value is None:
        value = getattr(training_args, "gradient_checkpointing", None)
    return bool(value)


def _adapt_objective(objective: str, variant: str) -> str:
    if objective != "auto":
        return objective
    return "mntp" if variant == "bi" else "clm"


# ------------------------------------------------------------------------------------------------
# Counting examples in a local data set
# ------------------------------------------------------------------------------------------------
def count_examples(workload_phase: str, data: str | None, split: str = "train") -> int | None:
    """Queries (train: JSONL groups or BEIR qrels) or texts (adapt) of a local data set; None if absent."""
    path = _local_data(data)
    if path is None:
        return None
    if workload_phase == "train":
        if path.is_dir():
            qrels = path / "qrels" / f"{split}.tsv"
            return _count_qrels_queries(qrels) if qrels.is_file() else None
        return _count_lines(path)
    if path.is_dir():
        corpus = path / "corpus.jsonl"
        return _count_lines(corpus) if corpus.is_file() else None
    return _count_lines(path)


def _local_data(value: str | None) -> Path | None:
    """A file or folder as given, or a BEIR data set name under $CSPLADE_DATA; None when absent."""
    if not value:
        return None
    try:
        return find_dataset(value, files=True)
    except FileNotFoundError:
        return None


def _count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def _count_qrels_queries(path: Path) -> int:
    """Queries with at least one positive judgement (score > 0) in a BEIR qrels TSV."""
    queries = set()
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f):
            parts = line.rstrip("\n").split("\t")
            if n == 0 and parts and parts[0] == "query-id":
                continue
            if len(parts) >= 3:
                try:
                    if float(parts[2]) <= 0:
                        continue
                except ValueError:
                    continue
            if parts and parts[0]:
                queries.add(parts[0])
    return len(queries)
