"""Validate `csplade plan`: predicted vs measured peak memory of real CPU training runs.

Usage:
    python benchmarks/plan_validation.py                      # every case (SmolLM2 ones take minutes)
    python benchmarks/plan_validation.py --cases tiny-full,tiny-lora
    python benchmarks/plan_validation.py --json               # one JSON object per case

Each case trains a sparse encoder for a few steps with `csplade.training.contrastive.run_training` (the
real Trainer, data collator and losses) on a small JSONL of training groups written to a temporary
folder, in a fresh subprocess, and compares the peak memory it used with
`csplade.plan.estimate(..., device="cpu")` for the same settings.

How memory is measured (CPU, Linux): the process's resident set size (RSS, /proc/self/status) is read
just before `run_training` builds the model (the baseline: Python, torch and transformers imported, data
written). Right after the encoder is built, the peak-RSS counter (VmHWM) is reset by writing "5" to
/proc/self/clear_refs, so the transient of loading a checkpoint (file pages plus the model) does not
count; the model itself is resident and does. When `Trainer.train` returns (before the final save), VmHWM
is read again. Measured = VmHWM - baseline: weights, gradients, optimizer states, activations, head and
loss temporaries of the worst step, plus whatever the Trainer, the tokenizer and the allocator keep
(glibc does not always return freed memory; CPU runs have no CUDA context, so the planner's overhead term
is 0 in "cpu" mode). Without /proc/self/clear_refs the case fails rather than report a number that
includes the loading spike.

Cases: a tiny Llama (hidden 256, 4 layers, 8 heads / 4 kv, vocab 8,192, random weights) and SmolLM2-135M
(`csplade.model.backbones.prepare("smollm2-135m")`), full fine-tuning and LoRA, float32. Sequences are
padded to the recipe's max lengths (every text is longer), as the planner assumes. The pass mark is
|ratio - 1| <= 0.25 (ratio = predicted / measured).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024**2
TOLERANCE = 0.25

TINY = {
    "hidden": 256,
    "layers": 4,
    "heads": 8,
    "kv_heads": 4,
    "intermediate": 688,
    "vocab": 8192,
}
# Settings shared by every case, then per case. Lengths are text tokens per copy (ModelArguments).
BASE = {
    "batch": 8,
    "group_size": 4,
    "query_max_length": 16,
    "doc_max_length": 48,
    "variant": "uni",
    "use_lora": False,
    "lora_r": 16,
    "lora_dropout": 0.0,
    "fused_head": True,
    "gradient_checkpointing": False,
    "steps": 3,
}
CASES: dict[str, dict] = {
    "tiny-full": {"backbone": "tiny"},
    "tiny-lora": {"backbone": "tiny", "use_lora": True},
    "tiny-naive-head": {"backbone": "tiny", "use_lora": True, "fused_head": False},
    "tiny-checkpointing": {"backbone": "tiny", "gradient_checkpointing": True, "batch": 16},
    "smollm2-full": {"backbone": "smollm2-135m", "batch": 4, "doc_max_length": 64},
    "smollm2-lora": {
        "backbone": "smollm2-135m",
        "use_lora": True,
        "batch": 4,
        "doc_max_length": 64,
    },
    "smollm2-lora-echo": {
        "backbone": "smollm2-135m",
        "use_lora": True,
        "variant": "echo",
        "batch": 4,
        "doc_max_length": 32,
    },
}
TEST_CASES = ("tiny-full", "tiny-lora")


def case_settings(name: str) -> dict:
    if name not in CASES:
        raise SystemExit(f"unknown case {name!r}; known: {', '.join(CASES)}")
    return {**BASE, **CASES[name], "name": name}


# -------------------------------------------------------------------------------- preparation
def build_tiny_backbone(folder: Path) -> Path:
    """A random tiny Llama (TINY) with the tests' word-level tokenizer, saved as a HF folder."""
    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    from tiny import tiny_tokenizer, tiny_words
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=TINY["vocab"],
        hidden_size=TINY["hidden"],
        intermediate_size=TINY["intermediate"],
        num_hidden_layers=TINY["layers"],
        num_attention_heads=TINY["heads"],
        num_key_value_heads=TINY["kv_heads"],
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=True,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tiny_tokenizer(n_words=len(tiny_words(10_000))).save_pretrained(folder)
    return folder


def backbone_folder(name: str, workdir: Path) -> Path:
    if name == "tiny":
        folder = workdir / "tiny-llama"
        if not (folder / "config.json").exists():
            build_tiny_backbone(folder)
        return folder
    from csplade.model.backbones import prepare

    return prepare(name)


def write_groups(path: Path, settings: dict, folder: Path, n_queries: int, seed: int = 0) -> Path:
    """Training groups whose batches are padded to exactly the max lengths, as the planner assumes.

    Every negative is longer than doc_max_length tokens (cut to it); every positive is one token
    shorter, so each document batch has padding (a padding mask, as real batches do) and its longest
    row at the max. Queries: one token short of query_max_length or longer, at random.
    """
    import random

    from transformers import AutoTokenizer

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import tiny_words

    tokenizer = AutoTokenizer.from_pretrained(folder)
    rng = random.Random(seed)
    vocab = tiny_words(10_000)

    def text(n_tokens: int) -> str:
        words = " ".join(rng.choice(vocab) for _ in range(2 * n_tokens + 8))
        ids = tokenizer(words, add_special_tokens=False)["input_ids"][:n_tokens]
        out = tokenizer.decode(ids).strip()
        while len(tokenizer(out, add_special_tokens=False)["input_ids"]) > n_tokens:
            out = out.rsplit(" ", 1)[0]
        return out

    q_max, d_max = settings["query_max_length"], settings["doc_max_length"]
    with path.open("w", encoding="utf-8") as f:
        for _ in range(n_queries):
            group = {
                "query": text(rng.choice([q_max - 1, 2 * q_max])),
                "positives": [text(d_max - 1)],
                "negatives": [text(2 * d_max) for _ in range(settings["group_size"] - 1)],
            }
            f.write(json.dumps(group) + "\n")
    return path


# -------------------------------------------------------------------------------- the run (child)
def _model_args(settings: dict, folder: Path):
    from csplade.training.arguments import ModelArguments

    return ModelArguments(
        model_name_or_path=str(folder),
        variant=settings["variant"],
        query_max_length=settings["query_max_length"],
        doc_max_length=settings["doc_max_length"],
        fused_head=settings["fused_head"],
        model_dtype="float32",
        use_lora=settings["use_lora"],
        lora_r=settings["lora_r"],
        lora_dropout=settings["lora_dropout"],
    )


def measure(settings: dict, folder: Path, data: Path, out: Path) -> dict:
    """Train `settings` for a few steps in this process; return the RSS figures (bytes)."""
    import gc

    import torch

    torch.set_num_threads(1)
    from csplade.training import contrastive, loading
    from csplade.training.arguments import CspladeTrainingArguments, DataArguments, LossArguments

    model_args = _model_args(settings, folder)
    data_args = DataArguments(train_data=str(data), group_size=settings["group_size"])
    training_args = CspladeTrainingArguments(
        output_dir=str(out),
        max_steps=settings["steps"],
        per_device_train_batch_size=settings["batch"],
        gradient_checkpointing=settings["gradient_checkpointing"],
        save_strategy="no",
        report_to="none",
        logging_steps=1000,
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    from csplade.evaluation.memory import PeakMemory, rss_bytes

    marks: dict[str, int] = {}
    memory = PeakMemory("cpu")
    load = loading.load_encoder_for_training
    train = contrastive.SparseTrainer.train

    def load_and_reset(args):
        encoder = load(args)
        gc.collect()
        memory.start()  # resets VmHWM to the current RSS
        if memory.method != "vmhwm":
            raise RuntimeError(f"peak RSS needs /proc/self/clear_refs (got {memory.method!r})")
        marks["after_load"] = memory.base
        return encoder

    def train_and_read(self, *args, **kwargs):
        result = train(self, *args, **kwargs)
        marks["peak"] = memory.peak_total()
        marks["steps"] = self.state.global_step
        return result

    # run_training calls the loader through csplade.training.loading, or through its own module
    for module in (loading, contrastive):
        if getattr(module, "load_encoder_for_training", None) is load:
            module.load_encoder_for_training = load_and_reset
    contrastive.SparseTrainer.train = train_and_read
    gc.collect()
    baseline = rss_bytes()
    contrastive.run_training(model_args, LossArguments(), data_args, training_args)
    if marks.get("steps") != settings["steps"]:
        raise RuntimeError(f"ran {marks.get('steps')} steps, expected {settings['steps']}")
    return {
        "baseline": baseline,
        "after_load": marks["after_load"],
        "peak": marks["peak"],
        "measured": marks["peak"] - baseline,
    }


# -------------------------------------------------------------------------------- the prediction
def predict(settings: dict, folder: Path):
    """The planner's estimate (a csplade.plan.Plan) for `settings` on one CPU process."""
    from csplade.plan import Cluster, Workload, estimate, resolve_architecture

    arch = resolve_architecture(str(folder))
    workload = Workload(
        phase="train",
        model=_model_args(settings, folder),
        batch_size=settings["batch"],
        group_size=settings["group_size"],
        gradient_checkpointing=settings["gradient_checkpointing"],
        optimizer="adamw_torch_fused",
    )
    return estimate(arch, workload, Cluster(), device="cpu")


# -------------------------------------------------------------------------------- driver
def run_case(
    name: str, workdir: Path, python: str = sys.executable, default_malloc: bool = False
) -> dict:
    """Prepare, measure in a fresh subprocess, predict here; returns the row of the table."""
    settings = case_settings(name)
    folder = backbone_folder(settings["backbone"], workdir)
    n_queries = settings["batch"] * settings["steps"] + settings["batch"]
    data = write_groups(workdir / f"{name}.jsonl", settings, folder, n_queries)
    env = dict(os.environ)
    if not default_malloc:
        # Allocations above 128 KiB get their own mmap, returned to the OS on free: RSS then follows
        # live memory instead of glibc's heap high-water mark (which depends on allocation order).
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [
        python,
        str(Path(__file__).resolve()),
        "--child",
        json.dumps({"settings": settings, "folder": str(folder), "data": str(data)}),
        "--out",
        str(workdir / f"{name}-run"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"case {name} failed:\n{done.stderr[-4000:]}")
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    plan = predict(settings, folder)
    predicted = plan.total_bytes
    return {
        "case": name,
        "predicted": predicted,
        "measured": measured["measured"],
        "ratio": predicted / measured["measured"],
        "model_resident": measured["after_load"] - measured["baseline"],
        "parts": {p.name: p.bytes for p in plan.parts},
        "settings": settings,
    }


def _table(rows: list[dict]) -> str:
    names = ("weights", "gradients", "optimizer", "activations", "head", "transient", "overhead")
    short = ("weights", "grads", "optim", "activ", "head", "trans", "overh")
    lines = [
        f"{'case':20s} {'predicted':>10s} {'measured':>9s} {'ratio':>6s}   "
        + " ".join(f"{s:>6s}" for s in short)
        + "   (MiB; predicted parts, weights incl. LoRA)"
    ]
    for r in rows:
        p = dict(r["parts"])
        p["weights"] += p["lora"]
        lines.append(
            f"{r['case']:20s} {r['predicted'] / MIB:10.1f} {r['measured'] / MIB:9.1f} "
            f"{r['ratio']:6.3f}   " + " ".join(f"{p[n] / MIB:6.1f}" for n in names)
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--cases", default=",".join(CASES), help=f"comma-separated: {', '.join(CASES)}"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON row per case")
    parser.add_argument(
        "--workdir", default=None, help="where models and data go (default: a temp dir)"
    )
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc's malloc thresholds alone (RSS then keeps freed heap memory)",
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        result = measure(spec["settings"], Path(spec["folder"]), Path(spec["data"]), Path(args.out))
        print(json.dumps(result))
        return 0
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    for name in names:
        case_settings(name)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        rows = []
        for name in names:
            row = run_case(name, Path(tmp), default_malloc=args.default_malloc)
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
    if not args.json:
        print(_table(rows))
        bad = [r["case"] for r in rows if abs(r["ratio"] - 1) > TOLERANCE]
        print(
            f"\nwithin {TOLERANCE:.0%}: {len(rows) - len(bad)}/{len(rows)}"
            + (f" (off: {bad})" if bad else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
