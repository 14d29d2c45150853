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
4. evaluation with `csplade eval`'s library (exact search, pytrec_eval) of BM25 (bm25s, without and
   with stemming), splade-tiny and every
   checkpoint (step 0: the adapted model) on whole collections (test split, no slice), documents cut
   at ``--doc-max-length`` tokens for the models (``lexdocs``: their recipe's length, whole documents,
   since they run no forward pass) and whole for BM25; intermediate steps on
   ``--curve-datasets`` only, the last step on every data set;
5. ``OUT/table.md`` (nDCG@10 per data set, ratio to BM25, wall time) and ``OUT/learning_curves.png``.

Wall times are those of this machine, measured per stage; a checkpoint's training time is the run's
time per step times its step.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from csplade import _logging

# Before torch, transformers and peft are imported: the CLI's filters for their import-time noise.
_logging.quiet_imports()

from csplade._io import write_json_atomic, write_text_atomic  # noqa: E402
from csplade.data.mining import mine  # noqa: E402
from csplade.data.teachers import score_groups  # noqa: E402
from csplade.evaluation.beir_eval import SystemSpec, evaluate  # noqa: E402
from csplade.evaluation.report import save_png  # noqa: E402
from csplade.model.backbones import prepare  # noqa: E402
from csplade.model.config import CONFIG_NAME, VARIANTS  # noqa: E402
from csplade.training.adaptation import run_adaptation  # noqa: E402
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


def adapt(args, variant: str, out: Path) -> Path:
    folder = out / f"adapt-{variant}"
    overrides = ["--model_name_or_path", str(prepare("smollm2-135m")),
                 "--adapt_data", args.train_data[0], "--output_dir", str(folder),
                 "--model_dtype", args.dtype, "--max_steps", str(args.adapt_steps),
                 "--save_steps", "100000", "--report_to", "none"]  # fmt: skip
    if not (folder / CONFIG_NAME).exists():
        args_ = parse_recipe(RECIPES / f"adapt-{variant}.yaml", overrides, types=ADAPT_TYPES)
        _timed(out / f"adapt-{variant}.time.json", lambda: run_adaptation(*args_))
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
                 "--max_steps", str(steps[-1]), "--save_steps", str(min(steps)),
                 "--save_total_limit", "1000", "--report_to", "none",
                 *args.train_overrides]  # fmt: skip
    if not (folder / CONFIG_NAME).exists():
        _timed(out / f"train-{variant}-{loss}.time.json",
               lambda: run_training(*parse_recipe(recipe, overrides)))  # fmt: skip
    return folder


def checkpoint(folder: Path, step: int, last: int) -> Path:
    """The model at `step`: the run's folder at its last step, else its checkpoint of that step."""
    if step == last and (folder / CONFIG_NAME).exists():
        return folder
    return folder / f"checkpoint-{step}"


def systems(args, out: Path) -> list[tuple[str, str, int, Path]]:
    """(system name, variant-loss arm, step, model folder) of every model to evaluate."""
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
            for step in sorted(s for s in args.steps if s > 0):
                name = f"{variant}-{loss}-step{step}"
                rows.append((name, f"{variant}-{loss}", step, checkpoint(folder, step, last)))
    return rows


def evaluate_all(args, out: Path, rows) -> dict:
    eval_dir = out / "eval"
    last = max(args.steps)
    overrides = {"doc_max_length": args.doc_max_length}
    baselines = [SystemSpec("bm25", None), SystemSpec("bm25-stem", None),
                 SystemSpec("splade-tiny", "splade-tiny")]  # fmt: skip
    evaluate(baselines, args.datasets, eval_dir, batch_size=args.eval_batch_size, latency_queries=0)
    for name, arm, step, folder in rows:
        datasets = args.datasets if step == last else args.curve_datasets
        # lexical documents run no forward pass: they keep the recipe's (whole-document) length
        arm_overrides = {} if arm.endswith("-lexdocs") else overrides
        evaluate([SystemSpec(name, str(folder))], datasets, eval_dir, dtype=args.dtype,
                 batch_size=args.eval_batch_size, latency_queries=0,
                 encoder_overrides=arm_overrides)  # fmt: skip
    return json.loads((eval_dir / "metrics.json").read_text())


def _seconds(out: Path, arm: str, step: int, last: int) -> float | None:
    variant, _, loss = arm.partition("-")
    adapt_file = out / f"adapt-{variant}.time.json"
    seconds = json.loads(adapt_file.read_text())["seconds"] if adapt_file.exists() else 0.0
    train_file = out / f"train-{variant}-{loss}.time.json"
    if step and train_file.exists():
        seconds += json.loads(train_file.read_text())["seconds"] * step / last
    return seconds


def report(args, out: Path, rows, metrics: dict) -> Path:
    """table.md (nDCG@10 and its ratio to BM25 per data set) and learning_curves.png."""
    last = max(args.steps)
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
        minutes = _seconds(out, arm, step, last) / 60
        cells = " | ".join(cell(name, d) for d in args.datasets)
        lines.append(f"| {arm} | {step} | {minutes:.0f} | {cells} |")
    table = out / "table.md"
    caption = f"nDCG@10 (ratio to BM25 in the same run). Trained on {_training_data(args, out)}."
    write_text_atomic(table, "\n".join(lines) + f"\n\n{caption}\n")
    _plot(args, out, rows, metrics)
    return table


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


def _plot(args, out: Path, rows, metrics: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.datasets), figsize=(4 * len(args.datasets), 3.4))
    for ax, dataset in zip(list(getattr(axes, "flat", [axes])), args.datasets, strict=True):
        for arm in dict.fromkeys(a for _, a, _, _ in rows if not a.endswith("adapted")):
            variant = arm.split("-")[0]
            points = [(s, metrics.get(n, {}).get(dataset, {}).get("ndcg_cut_10"))
                      for n, a, s, _ in rows if a in (arm, f"{variant}-adapted")]  # fmt: skip
            points = [(s, v) for s, v in points if v is not None]
            if points:
                ax.plot(*zip(*sorted(points), strict=True), marker="o", label=arm)
        ax.axhline(metrics["bm25"][dataset]["ndcg_cut_10"], color="k", ls="--", label="BM25")
        if dataset in metrics.get("bm25-stem", {}):
            ax.axhline(metrics["bm25-stem"][dataset]["ndcg_cut_10"], color="k", ls=":",
                       label="BM25, stemmed")  # fmt: skip
        ax.set_title(dataset)
        ax.set_xlabel("training steps")
    axes_list = list(getattr(axes, "flat", [axes]))
    axes_list[0].set_ylabel("nDCG@10")
    handles, labels = axes_list[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    save_png(fig, out / "learning_curves.png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/study")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES))
    p.add_argument("--steps", nargs="+", type=int, default=[0, 100, 300])
    p.add_argument("--datasets", nargs="+", default=["scifact", "nfcorpus", "cranfield", "adi"])
    p.add_argument("--curve-datasets", nargs="+", default=None, help="for steps before the last")
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
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = systems(args, out)
    metrics = evaluate_all(args, out, rows)
    print(report(args, out, rows, metrics).read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
