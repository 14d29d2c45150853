"""SmolLM2-135M `uni`/`echo`/`bi` x {InfoNCE, InfoNCE + ensemble distillation} on SciFact, against BM25
and splade-tiny, in domain (SciFact test) and zero-shot (Cranfield): the table of the distillation note.

Pipeline (every stage cached under --out, so an interrupted run resumes):

1. groups: BM25 hard negatives for SciFact's train split (`csplade.data.mining.mine`, judged positives
   excluded), scored by an ensemble of a dense and a sparse teacher (all-MiniLM-L6-v2 + splade-tiny,
   per-query z-scores summed; `csplade.data.teachers.score_groups`);
2. per variant: the adaptation phase (`recipes/smollm2-135m/adapt-VARIANT.yaml`), then two LoRA
   trainings from it on the same groups, `train-VARIANT.yaml` (InfoNCE + FLOPS) and
   `distill-VARIANT.yaml` (the same + KL to the ensemble), at the demo's CPU size
   (`csplade.demo.DEMO`, with group size 2: one BM25 negative per query) and wall time recorded;
3. `csplade.evaluation.beir_eval.evaluate` on a stated slice of each collection (an LLM forward pass on 2 CPU cores
   encodes a few documents a second): LLM systems in bfloat16, the references (BM25 on the same slice,
   splade-tiny in float32) in a second folder; one combined table is printed and written.

    python eval/distill_study.py --out runs/distill-study            # ~45 min on 2 CPU cores
    python eval/distill_study.py --variants uni --max-steps 10      # a quicker look
    python eval/distill_study.py --variants bi --adapt-steps 30 --learning-rate 3e-4 --out runs/bi
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from csplade.model.config import VARIANTS

REPO = Path(__file__).resolve().parents[1]


def _train(recipe: str, model: Path, data: Path, out: Path, settings) -> float:
    """One training arm (`csplade.demo.train_stage`); its wall time, kept beside the model."""
    from csplade.demo import train_stage

    record = out / "wall_time.json"
    seconds = train_stage(recipe, model, data, out, settings)
    if seconds is not None:
        record.write_text(json.dumps({"seconds": seconds}))
    return json.loads(record.read_text())["seconds"] if record.exists() else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/distill-study")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--max-steps", type=int, default=None, help="training steps (demo's)")
    parser.add_argument("--adapt-steps", type=int, default=None, help="adaptation steps (demo's)")
    parser.add_argument("--learning-rate", type=float, default=None, help="training lr (demo's)")
    parser.add_argument("--max-docs", type=int, default=400, help="docs per collection slice")
    parser.add_argument("--max-queries", type=int, default=80, help="queries per collection slice")
    parser.add_argument("--datasets", nargs="+", default=["scifact", "cranfield"])
    args = parser.parse_args(argv)

    import dataclasses

    from csplade.data.beir import find_dataset
    from csplade.data.mining import mine
    from csplade.data.teachers import score_groups
    from csplade.demo import DEMO, adapt_stage
    from csplade.evaluation.beir_eval import SystemSpec, evaluate
    from csplade.model.backbones import prepare

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_settings = {**DEMO.train, "group_size": 2, "per_device_train_batch_size": 8}
    if args.max_steps:
        train_settings["max_steps"] = args.max_steps
    if args.learning_rate:
        train_settings["learning_rate"] = args.learning_rate
    adapt_settings = dict(DEMO.adapt)
    if args.adapt_steps:
        adapt_settings["max_steps"] = args.adapt_steps
    settings = dataclasses.replace(DEMO, train=train_settings, adapt=adapt_settings)
    scifact = find_dataset("scifact")
    backbone = prepare("smollm2-135m")

    groups, scored = out / "groups-bm25.jsonl", out / "groups-bm25-scored.jsonl"
    if not groups.exists():
        mine(scifact, groups, model="bm25", split="train", n_negatives=8)
    if not scored.exists():
        score_groups(groups, ["minilm-dense", "splade-tiny"], scored, normalization="zscore")

    systems, wall = [], {}
    for variant in args.variants:
        per_variant = dataclasses.replace(settings, variant=variant)
        adapted = out / f"adapt-{variant}"
        adapt_stage(scifact, backbone, adapted, per_variant)
        for arm, recipe in (("infonce", "train"), ("distill", "distill")):
            name = f"smollm2-{variant}-{arm}"
            wall[name] = _train(recipe, adapted, scored, out / name, per_variant)
            systems.append(SystemSpec(name, str(out / name)))

    sliced = {"max_docs": args.max_docs, "max_queries": args.max_queries, "batch_size": 16}
    overrides = {"doc_max_length": settings.eval_doc_max_length}
    llm = evaluate(
        systems,
        args.datasets,
        out / "eval-llm",
        encoder_overrides=overrides,
        dtype=settings.model_dtype,
        latency_queries=10,
        **sliced,
    )
    refs = evaluate(
        [SystemSpec("bm25", None), SystemSpec("splade-tiny", "splade-tiny")],
        args.datasets,
        out / "eval-ref",
        encoder_overrides=overrides,
        latency_queries=10,
        **sliced,
    )
    metrics = {
        **json.loads((refs["table"].parent / "metrics.json").read_text()),
        **json.loads((llm["table"].parent / "metrics.json").read_text()),
    }
    head = "| system | train wall s | " + " | ".join(f"{d} nDCG@10" for d in args.datasets) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(args.datasets)]
    for system, per_dataset in metrics.items():
        seconds = f"{wall[system]:.0f}" if system in wall else "-"
        cells = " | ".join(f"{per_dataset[d]['ndcg_cut_10']:.3f}" for d in args.datasets)
        lines.append(f"| {system} | {seconds} | {cells} |")
    note = (
        f"Slices: at most {args.max_docs} docs (every judged doc of the kept queries + the first "
        f"docs) and {args.max_queries} queries per collection; documents cut at "
        f"{settings.eval_doc_max_length} tokens for the neural systems, full text for BM25. "
        f"Adaptation: {settings.adapt['max_steps']} steps. "
        f"Training: {settings.train['max_steps']} steps (lr {settings.train['learning_rate']}), batch {settings.train['per_device_train_batch_size']}"
        f" x (1 positive + 1 BM25 negative), LoRA on the last {settings.train['lora_last_layers']} "
        f"blocks, {settings.model_dtype}, {os.cpu_count()} CPU cores."
    )
    table = "\n".join(lines) + "\n\n" + note + "\n"
    (out / "table.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
