"""The effectiveness study: SmolLM2-135M csplade retrievers vs BM25 and splade-tiny, whole collections.

    python eval/study.py --out runs/study                       # the defaults below
    python eval/study.py --variants bi --losses distill --steps 0 200 400 --datasets scifact nfcorpus

Stages, each cached in ``--out`` (a rerun resumes where the last one stopped):

1. training data: BM25 hard negatives for the judged train queries (`csplade mine`), optionally
   pseudo-queries of the corpus (``--pseudo title``), teacher scores from an ensemble (all-MiniLM-L6-v2
   + splade-tiny, per-query z-scores summed; `csplade teacher-scores`) for the ``distill`` arms;
2. per variant: the adaptation phase (`recipes/smollm2-135m/adapt-VARIANT.yaml`: CLM or MNTP + L_ReLU);
3. per variant x loss: LoRA contrastive training (`train-VARIANT.yaml`, ``distill`` adds KL to the
   teacher ensemble, ``lexdocs`` is `lexdocs-VARIANT.yaml`: learned queries over lexical documents),
   a checkpoint at every step of ``--steps``;
4. learning curves during stages 2 and 3, from the trainers' evaluator
   (:mod:`csplade.evaluation.during_training`) on slices of ``--curve-datasets`` (``--curve-split``,
   the first ``--curve-queries`` judged queries, their judged documents plus others drawn at random
   up to ``--curve-docs``, as `csplade eval` slices): every ``--adapt-eval-steps`` of the adaptation
   (its model evaluated with the head bias its save calibrates) and every ``--eval-steps`` of the
   training (default: the greatest common divisor of ``--steps``), with the model's own vectors
   beside when it has a lexical residual; each run keeps them in ``<run>/eval/history.json``;
5. whole-collection evaluation with `csplade eval`'s library (exact search, pytrec_eval) of BM25
   (bm25s, without and with stemming), splade-tiny, the adapted model (step 0) and the trained model
   (the last of ``--steps``) on every data set (test split, no slice), documents cut at
   ``--doc-max-length`` tokens for the models (``lexdocs``: their recipe's length, whole documents,
   since they run no forward pass) and whole for BM25;
6. ``OUT/table.md`` (nDCG@10 per data set, ratio to BM25, wall time), ``OUT/curves.md`` (the curves:
   phase, step, minutes of training, nDCG@10 per slice, own vectors) and ``OUT/learning_curves.png``
   (with BM25 on the same slices).

The curves' slices are of test splits by default (SciFact has no dev split): they are watched, no
checkpoint is chosen on them. Wall times are those of this machine, measured per stage and without
the evaluations' time; a curve point's minutes are the trainer's (``eval_train_seconds``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

from csplade import _logging

# Before torch, transformers and peft are imported: the CLI's filters for their import-time noise.
_logging.quiet_imports()

from csplade._io import write_json_atomic, write_text_atomic  # noqa: E402
from csplade.data.beir import find_dataset, load_beir  # noqa: E402
from csplade.data.mining import mine  # noqa: E402
from csplade.data.teachers import score_groups  # noqa: E402
from csplade.evaluation.beir_eval import SystemSpec, evaluate, slice_data  # noqa: E402
from csplade.evaluation.during_training import RetrievalEvaluator  # noqa: E402
from csplade.evaluation.metrics import evaluate_run  # noqa: E402
from csplade.evaluation.report import save_png  # noqa: E402
from csplade.index.bm25 import bm25_search  # noqa: E402
from csplade.model.backbones import prepare  # noqa: E402
from csplade.model.config import CONFIG_NAME, VARIANTS  # noqa: E402
from csplade.training.adaptation import run_adaptation  # noqa: E402
from csplade.training.base import EVAL_HISTORY  # noqa: E402
from csplade.training.contrastive import run_training  # noqa: E402
from csplade.training.recipe import ADAPT_TYPES, parse_recipe  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes" / "smollm2-135m"
LOSSES = ("infonce", "distill", "lexdocs")
RECIPE_OF = {"infonce": "train", "distill": "distill", "lexdocs": "lexdocs"}
TEACHERS = ["minilm-dense", "splade-tiny"]
logger = logging.getLogger("csplade.study")


def _timed(record: Path, run) -> float:
    """Run `run()` once; its wall time is kept in `record` (read back on later calls)."""
    if not record.exists():
        started = time.time()
        run()
        write_json_atomic(record, {"seconds": time.time() - started})
    return json.loads(record.read_text())["seconds"]


def training_groups(args, out: Path) -> tuple[Path, Path]:
    """(groups with BM25 negatives, the same with teacher scores) of every train data set.

    Judged train queries of each data set, plus its pseudo-queries with ``--pseudo``.
    """
    plain, scored = out / "groups-bm25.jsonl", out / "groups-bm25-scored.jsonl"
    if not plain.exists():
        parts = []
        for name in args.train_data:
            part = out / f"groups-{Path(name).name}-bm25.jsonl"
            mine(name, part, model="bm25", split="train", n_negatives=8)
            parts.append(part)
            if args.pseudo:
                part = out / f"groups-{Path(name).name}-pseudo-{args.pseudo}.jsonl"
                mine(name, part, model="bm25", n_negatives=8, pseudo=args.pseudo,
                     max_queries=args.pseudo_queries)  # fmt: skip
                parts.append(part)
        write_text_atomic(plain, "".join(_with_negatives(p) for p in parts))
    if "distill" in args.losses and not scored.exists():
        score_groups(plain, TEACHERS, scored, normalization="zscore")
    return plain, scored


def _with_negatives(groups: Path) -> str:
    """The lines of `groups` that have a BM25 negative; how many had none is logged.

    A query whose every BM25 hit is judged relevant (NFCorpus: 243 of 2,590 train queries, whose
    terms occur in a handful of documents only) has nothing to contrast with in a group of 2.
    """
    lines = groups.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if _has_negative(line)]
    if len(kept) < len(lines):
        logger.info("%s: %d of %d groups have no BM25 negative (every hit judged relevant): "
                    "left out", groups.name, len(lines) - len(kept), len(lines))  # fmt: skip
    return "".join(kept)


def _has_negative(line: str) -> bool:
    return bool(json.loads(line)["negatives"])


def curve_overrides(args, every: int) -> list[str]:
    """The recipe keys of the learning curves: the evaluator every `every` steps, from step 0."""
    return ["--eval_data", *(f"{name}:{args.curve_split}" for name in args.curve_datasets),
            "--eval_strategy", "steps", "--eval_steps", str(every), "--eval_on_start", "true",
            "--eval_max_queries", str(args.curve_queries), "--eval_max_docs", str(args.curve_docs),
            "--eval_doc_max_length", str(args.doc_max_length), "--eval_own_vectors", "true",
            "--per_device_eval_batch_size", str(args.eval_batch_size)]  # fmt: skip


def adapt(args, variant: str, out: Path) -> Path:
    folder = out / f"adapt-{variant}"
    overrides = ["--model_name_or_path", str(prepare("smollm2-135m")),
                 "--adapt_data", args.train_data[0], "--output_dir", str(folder),
                 "--model_dtype", args.dtype, "--max_steps", str(args.adapt_steps),
                 "--save_steps", "100000", "--report_to", "none",
                 *curve_overrides(args, args.adapt_eval_steps)]  # fmt: skip
    if not (folder / CONFIG_NAME).exists():
        args_ = parse_recipe(RECIPES / f"adapt-{variant}.yaml", overrides, types=ADAPT_TYPES)
        evaluator = RetrievalEvaluator.from_args(args_[-1])
        _timed(out / f"adapt-{variant}.time.json",
               lambda: run_adaptation(*args_, evaluator=evaluator))  # fmt: skip
    return folder


def train(args, variant: str, loss: str, model: Path, groups: Path, out: Path) -> Path:
    folder = out / f"train-{variant}-{loss}"
    steps = sorted(s for s in args.steps if s > 0)
    if not steps:
        return folder
    recipe = RECIPES / f"{RECIPE_OF[loss]}-{variant}.yaml"
    if not recipe.exists():
        raise FileNotFoundError(f"{recipe}: no {loss!r} recipe for the {variant!r} variant")
    overrides = ["--model_name_or_path", str(model), "--train_data", str(groups),
                 "--output_dir", str(folder), "--model_dtype", args.dtype,
                 "--max_steps", str(steps[-1]), "--save_steps", str(steps[-1]),
                 "--report_to", "none", *curve_overrides(args, args.eval_steps),
                 *args.train_overrides]  # fmt: skip
    if not (folder / CONFIG_NAME).exists():
        parsed = parse_recipe(recipe, overrides)
        evaluator = RetrievalEvaluator.from_args(parsed[-1])
        _timed(out / f"train-{variant}-{loss}.time.json",
               lambda: run_training(*parsed, evaluator=evaluator))  # fmt: skip
    return folder


def systems(args, out: Path) -> list[tuple[str, str, int, Path]]:
    """(system name, variant-loss arm, step, model folder) of every model of the table: the adapted
    model (step 0, when 0 is one of ``--steps``) and each arm's trained model (the last step)."""
    plain, scored = training_groups(args, out)
    rows = []
    last = max(args.steps)
    for variant in args.variants:
        adapted = adapt(args, variant, out)
        if 0 in args.steps:
            rows.append((f"{variant}-step0", f"{variant}-adapted", 0, adapted))
        for loss in args.losses:
            groups = scored if loss == "distill" else plain
            folder = train(args, variant, loss, adapted, groups, out)
            if last > 0:
                rows.append((f"{variant}-{loss}-step{last}", f"{variant}-{loss}", last, folder))
    return rows


def evaluate_all(args, out: Path, rows) -> dict:
    eval_dir = out / "eval"
    overrides = {"doc_max_length": args.doc_max_length}
    baselines = [SystemSpec("bm25", None), SystemSpec("bm25-stem", None),
                 SystemSpec("splade-tiny", "splade-tiny")]  # fmt: skip
    evaluate(baselines, args.datasets, eval_dir, batch_size=args.eval_batch_size, latency_queries=0)
    for name, arm, _step, folder in rows:
        datasets = args.datasets
        # lexical documents run no forward pass: they keep the recipe's (whole-document) length
        arm_overrides = {} if arm.endswith("-lexdocs") else overrides
        evaluate([SystemSpec(name, str(folder))], datasets, eval_dir, dtype=args.dtype,
                 batch_size=args.eval_batch_size, latency_queries=0,
                 encoder_overrides=arm_overrides)  # fmt: skip
    return json.loads((eval_dir / "metrics.json").read_text())


def _history(folder: Path) -> list[dict]:
    """A run's evaluations (the trainer's eval/history.json), [] if it has none."""
    file = folder / EVAL_HISTORY
    return json.loads(file.read_text()) if file.exists() else []


def _run_seconds(out: Path, run: str) -> float:
    """Wall seconds of a run (`adapt-bi`, `train-bi-infonce`) without its evaluations."""
    file = out / f"{run}.time.json"
    if not file.exists():
        return 0.0
    spent = sum(h.get("eval_runtime", 0.0) for h in _history(out / run))
    return json.loads(file.read_text())["seconds"] - spent


def _seconds(out: Path, arm: str, step: int) -> float:
    """Wall seconds of the model at `step` of `arm`: its adaptation, then its training if step > 0."""
    variant, _, loss = arm.partition("-")
    seconds = _run_seconds(out, f"adapt-{variant}")
    return seconds + (_run_seconds(out, f"train-{variant}-{loss}") if step else 0.0)


def curves(args, out: Path) -> list[dict]:
    """Every evaluation of the study's runs: arm, phase, step (adaptation steps count up to 0, where
    training starts), minutes since the adaptation began (evaluations excluded) and the metrics."""
    points = []
    for variant in args.variants:
        adapt_seconds = _run_seconds(out, f"adapt-{variant}")
        for h in _history(out / f"adapt-{variant}"):
            step, minutes = h["step"] - args.adapt_steps, h["eval_train_seconds"] / 60
            points.append({**h, "arm": f"{variant}-adapted", "phase": "adapt", "step": step,
                           "minutes": minutes})  # fmt: skip
        for loss in args.losses:
            for h in _history(out / f"train-{variant}-{loss}"):
                minutes = (adapt_seconds + h["eval_train_seconds"]) / 60
                points.append({**h, "arm": f"{variant}-{loss}", "phase": "train",
                               "minutes": minutes})  # fmt: skip
    return points


def slice_bm25(args) -> dict[str, float]:
    """BM25's nDCG@10 on each curve slice (the slices the evaluator draws), by dev-set name."""
    scores = {}
    for name in args.curve_datasets:
        data = load_beir(find_dataset(name), split=args.curve_split)
        data, _ = slice_data(data, args.curve_docs, args.curve_queries)
        run = bm25_search(data.doc_ids, data.doc_texts, data.queries, k=100)
        scores[f"{Path(name).name}-{args.curve_split}"] = evaluate_run(data.qrels, run).mean[
            "ndcg_cut_10"
        ]
    return scores


def report(args, out: Path, rows, metrics: dict) -> Path:
    """table.md (nDCG@10 and its ratio to BM25 per data set), curves.md and learning_curves.png."""
    bm25 = metrics["bm25"]
    header = "| system | step | wall min | " + " | ".join(args.datasets) + " |"
    lines = [header, "|" + "---|" * (3 + len(args.datasets))]

    def cell(name: str, dataset: str) -> str:
        value = metrics.get(name, {}).get(dataset, {}).get("ndcg_cut_10")
        if value is None:
            return "–"
        return f"{value:.3f} ({value / bm25[dataset]['ndcg_cut_10']:.2f}x)"

    for name in ("bm25", "bm25-stem", "splade-tiny"):
        if name not in metrics:  # a study evaluated before bm25-stem was a row
            continue
        lines.append(
            f"| {name} | – | – | " + " | ".join(cell(name, d) for d in args.datasets) + " |"
        )
    for name, arm, step, _folder in rows:
        minutes = _seconds(out, arm, step) / 60
        cells = " | ".join(cell(name, d) for d in args.datasets)
        lines.append(f"| {arm} | {step} | {minutes:.0f} | {cells} |")
    table = out / "table.md"
    caption = f"nDCG@10 (ratio to BM25 in the same run). Trained on {_training_data(args, out)}."
    write_text_atomic(table, "\n".join(lines) + f"\n\n{caption}\n")
    points, bm25_slices = curves(args, out), slice_bm25(args)
    _curves_table(out, points, bm25_slices)
    _plot(args, out, points, bm25_slices)
    return table


def _curves_table(out: Path, points: list[dict], bm25_slices: dict[str, float]) -> None:
    """curves.md: one row per evaluation, nDCG@10 per slice and of the own vectors."""
    sets = list(bm25_slices)
    columns = [(f"eval_{s}_ndcg@10", s) for s in sets]
    columns += [(f"eval_{s}_own_ndcg@10", f"{s} own") for s in sets
                if any(f"eval_{s}_own_ndcg@10" in p for p in points)]  # fmt: skip
    lines = ["| arm | phase | step | min | " + " | ".join(c for _, c in columns) + " |",
             "|" + "---|" * (4 + len(columns)),
             "| BM25 | – | – | – | " + " | ".join(f"{bm25_slices[s]:.3f}" for s in sets)
             + " |" * (len(columns) - len(sets) + 1)]  # fmt: skip
    for p in points:
        cells = " | ".join(f"{p[k]:.3f}" if k in p else "–" for k, _ in columns)
        lines.append(f"| {p['arm']} | {p['phase']} | {p['step']} | {p['minutes']:.1f} | {cells} |")
    caption = ("nDCG@10 on slices during adaptation (steps up to 0) and training, evaluated by the "
               "trainers; minutes of adaptation + training, evaluations excluded.")  # fmt: skip
    write_text_atomic(out / "curves.md", "\n".join(lines) + f"\n\n{caption}\n")


def _training_data(args, out: Path) -> str:
    """ "scifact 809 + nfcorpus 2347 groups (BM25 negatives)": what the contrastive runs read."""
    parts = []
    for name in args.train_data:
        part = out / f"groups-{Path(name).name}-bm25.jsonl"
        if part.exists():
            parts.append(f"{Path(name).name} {_n_groups(part)}")
    plain = out / "groups-bm25.jsonl"
    total = _n_groups(plain) if plain.exists() else 0
    if not parts:
        return f"{total} groups (BM25 negatives)"
    return f"{' + '.join(parts)} groups (BM25 negatives), {total} in all"


def _n_groups(groups: Path) -> int:
    with groups.open(encoding="utf-8") as f:
        return sum(map(_has_negative, f))


def _plot(args, out: Path, points: list[dict], bm25_slices: dict[str, float]) -> None:
    """learning_curves.png: per slice, nDCG@10 over steps for each arm (own vectors dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(bm25_slices)
    fig, axes = plt.subplots(1, len(sets), figsize=(4 * len(sets), 3.4), squeeze=False)
    for ax, name in zip(axes.flat, sets, strict=True):
        for arm in dict.fromkeys(p["arm"] for p in points):
            for key, style, label in ((f"eval_{name}_ndcg@10", "-", arm),
                                      (f"eval_{name}_own_ndcg@10", "--", f"{arm} own")):  # fmt: skip
                line = [(p["step"], p[key]) for p in points if p["arm"] == arm and key in p]
                if line:
                    ax.plot(*zip(*sorted(line), strict=True), style, marker="o", label=label)
        ax.axhline(bm25_slices[name], color="k", ls=":", label="BM25")
        ax.axvline(0, color="grey", lw=0.5)
        ax.set_title(f"{name} (slice)")
        ax.set_xlabel("steps (adaptation < 0 < training)")
    axes.flat[0].set_ylabel("nDCG@10")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), frameon=False)
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    save_png(fig, out / "learning_curves.png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/study")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES))
    p.add_argument(
        "--steps",
        nargs="+",
        type=int,
        default=[0, 100, 300],
        help="the table's steps (0: the adapted model; the largest: training length)",
    )
    p.add_argument(
        "--eval-steps",
        type=int,
        default=None,
        help="training steps between curve points (default: the gcd of --steps)",
    )
    p.add_argument("--adapt-eval-steps", type=int, default=25)
    p.add_argument("--datasets", nargs="+", default=["scifact", "nfcorpus", "cranfield", "adi"])
    p.add_argument("--curve-datasets", nargs="+", default=None, help="slices of the curves")
    p.add_argument("--curve-split", default="test")
    p.add_argument("--curve-queries", type=int, default=100)
    p.add_argument("--curve-docs", type=int, default=1000)
    p.add_argument("--train-data", nargs="+", default=["scifact", "nfcorpus"])
    p.add_argument("--pseudo", choices=("title", "sentence"), default=None)
    p.add_argument("--pseudo-queries", type=int, default=None)
    p.add_argument("--adapt-steps", type=int, default=100)
    p.add_argument("--doc-max-length", type=int, default=256)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--train-overrides", nargs=argparse.REMAINDER, default=[])
    args = p.parse_args(argv)
    _logging.configure()
    args.curve_datasets = args.curve_datasets or args.datasets
    args.eval_steps = args.eval_steps or math.gcd(*(s for s in args.steps if s > 0)) or 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = systems(args, out)
    metrics = evaluate_all(args, out, rows)
    print(report(args, out, rows, metrics).read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
