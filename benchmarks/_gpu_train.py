"""The training rows of benchmarks/gpu_check.py: short LoRA runs of `csplade train` compared with a
reference run (one process, float32), single-GPU and multi-GPU.

Every run trains on the same small batch of groups built from the check's BEIR slice (a query, a
judged doc, 3 docs not judged for it), the whole data set being one batch, so each step sees the
same texts and the loss must go down. AdamW, a fixed seed, no dropout. Weights are compared as in
the CPU tests (tests/launching.py): per LoRA tensor, |run - reference| over how far the reference
moved it from its start (the run at learning rate 0), so rounding differences between two correct
runs are small next to 1, and a gradient off by 2x is not.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from _measure import ROOT, data_dir

# steps, groups per process and step, query and doc max lengths: on a GPU, and in a dry run
SIZES = {"gpu": (8, 4, 32, 128), "dry": (3, 2, 8, 16)}
GROUP = 4  # docs per query: one positive, 3 negatives
LR = 1e-3
# Float32 runs of the same steps: cuBLAS may pick other kernels (and the fused head's backward adds
# with atomics), so the adapters differ by float32 rounding amplified by AdamW's normalisation; 5%
# of a tensor's update is far above that and far below the 50% a wrong reduction gives.
FP32_UPDATE_RTOL = 0.05
# bf16 autocast against float32: matmuls in bfloat16 (8 bits); tests/launching.py measured up to
# 0.20 of the update for bf16 runs against their references on the tiny models (median 0.05).
BF16_UPDATE_RTOL = 0.3
CONFIGS = Path(ROOT) / "accelerate_configs"


def write_groups(args, folder: Path, n: int) -> Path:
    """`n` training groups from the check's data set (judged positives, unjudged negatives)."""
    from csplade.data.beir import load_beir

    data = load_beir(Path(data_dir()) / args.dataset, split="test")
    texts = dict(zip(data.doc_ids, data.doc_texts, strict=True))
    rng = random.Random(0)
    path = folder / f"groups-{n}.jsonl"
    with path.open("w") as fh:
        for qid in list(data.queries)[:n]:
            judged = [d for d, s in data.qrels[qid].items() if s > 0 and d in texts]
            others = [d for d in rng.sample(data.doc_ids, 20) if d not in data.qrels[qid]]
            group = {"query": data.queries[qid], "positives": [texts[judged[0]]],
                     "negatives": [texts[d] for d in others[: GROUP - 1]]}  # fmt: skip
            fh.write(json.dumps(group) + "\n")
    return path


def sizes(args) -> tuple[int, int, int, int]:
    """Steps, queries per process, query and doc max lengths (toy ones in a dry run)."""
    return SIZES["dry" if args.dry_run else "gpu"]


def train_args(args, model_dir, groups: Path, out: Path, batch: int, lr: float = LR) -> list[str]:
    steps, _, query_length, doc_length = sizes(args)
    return [
        "--model_name_or_path", str(model_dir), "--train_data", str(groups),
        "--output_dir", str(out), "--use_lora", "true", "--lora_r", "8", "--lora_dropout", "0",
        "--max_steps", str(steps), "--per_device_train_batch_size", str(batch),
        "--group_size", str(GROUP), "--query_max_length", str(query_length),
        "--doc_max_length", str(doc_length),
        "--learning_rate", str(lr), "--lr_scheduler_type", "constant", "--warmup_steps", "0",
        "--train_sampling_strategy", "sequential", "--save_strategy", "no", "--logging_steps", "1",
        "--seed", "3", "--cross_device_negatives", "true", "--report_to", "none",
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run(cmd: list[str], out: Path, timeout: int) -> dict:
    """Run a training command; its run_info.json, with the wall time. RuntimeError with the tail of
    its output when it fails."""
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout)
    if done.returncode != 0:
        tail = (done.stdout[-1500:] + done.stderr[-3500:]).strip()
        raise RuntimeError(f"exit {done.returncode}: {' '.join(cmd[:8])} ...\n{tail}")
    info = json.loads((out / "run_info.json").read_text())
    info["wall_seconds"] = time.perf_counter() - start
    return info


def one_process(args, model_dir, groups, out, batch, *extra, lr=LR) -> dict:
    cmd = [sys.executable, "-m", "csplade", "train",
           *train_args(args, model_dir, groups, out, batch, lr)]  # fmt: skip
    if args.device == "cpu":
        cmd += ["--use_cpu", "true"]
    return run([*cmd, *extra], out, args.timeout)


def launched(args, config: str, world: int, model_dir, groups, out, batch) -> dict:
    """`accelerate launch` of the shipped config with `world` processes, float32."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(CONFIGS / config), "--num_processes", str(world), "--num_machines", "1",
           "--mixed_precision", "no", "--main_process_port", "0", "--dynamo_backend", "no",
           "-m", "csplade", "train", *train_args(args, model_dir, groups, out, batch)]  # fmt: skip
    return run(cmd, out, args.timeout)


def adapter(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def update_mismatch(got: dict, want: dict, start: dict) -> dict[str, float]:
    """Per tensor: |got - want| / |want - start| (norms)."""
    import torch

    assert got.keys() == want.keys() == start.keys(), sorted(got.keys() ^ want.keys())[:4]
    out = {}
    for name in want:
        moved = torch.linalg.vector_norm(want[name].float() - start[name].float())
        err = torch.linalg.vector_norm(got[name].float() - want[name].float())
        out[name] = float(err / moved) if moved > 0 else (0.0 if err == 0 else float("inf"))
    return out


def _tokens_per_step(args, model_dir, groups: Path, batch: int) -> int:
    """Real (unpadded) tokens of one step's queries and docs at the run's max lengths."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    _, _, query_length, doc_length = sizes(args)
    total = 0
    for line in groups.read_text().splitlines()[:batch]:
        group = json.loads(line)
        total += len(tokenizer(group["query"], truncation=True, max_length=query_length).input_ids)
        for doc in group["positives"] + group["negatives"]:
            total += len(tokenizer(doc, truncation=True, max_length=doc_length).input_ids)
    return total


def _judge(info: dict, got: dict, start: dict, want: dict | None, rtol: float, steps: int):
    """(ok, figures) of one run: loss down, every LoRA B moved, and (with `want`) the match."""
    losses = [h["loss"] for h in info["log_history"] if "loss" in h]
    moved = all(float(got[k].abs().sum()) > 0 for k in got if "lora_B" in k)
    ok = len(losses) == steps and losses[-1] < losses[0] and moved
    figures = f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, LoRA B moved: {moved}"
    if want is not None:
        mismatch = update_mismatch(got, want, start)
        worst = max(mismatch.values())
        ok = ok and worst <= rtol
        figures += f", worst tensor off by {worst:.3f} of its update (tol {rtol})"
    return ok, figures, losses


def check_training(args, model_dir, work: Path, add_row) -> None:
    """One process float32 (the reference), ZeRO-3 one process, one process bf16 autocast."""
    steps, queries, _, _ = sizes(args)
    groups = write_groups(args, work, queries * 2)
    batch = queries * 2  # the whole data set: every step the same batch
    tokens = _tokens_per_step(args, model_dir, groups, batch) * steps
    setting = f"LoRA r8, {steps} AdamW steps of {batch} queries x {GROUP} docs, seed 3"
    one_process(args, model_dir, groups, work / "lr0", batch, lr=0.0)
    start = adapter(work / "lr0")  # the adapter as initialised (seed 3)
    runs = {
        "one process fp32": lambda out: one_process(args, model_dir, groups, out, batch),
        "ZeRO-3 (1 process) fp32": lambda out: launched(
            args, "zero3.yaml", 1, model_dir, groups, out, batch
        ),
        "one process bf16 autocast": lambda out: one_process(
            args, model_dir, groups, out, batch, "--bf16", "true"
        ),
    }
    reference = None
    for i, (name, launch) in enumerate(runs.items()):
        out = work / f"train-{i}"
        info = launch(out)
        got = adapter(out)
        rtol = BF16_UPDATE_RTOL if "bf16" in name else FP32_UPDATE_RTOL
        ok, figures, _ = _judge(info, got, start, reference, rtol, steps)
        speed = tokens / info["train_seconds"]
        kind = info["distributed_type"].rsplit(".", 1)[-1]
        add_row(f"train: {name}", setting, "ok" if ok else "FAILED",
                f"{figures}; {speed:,.0f} tokens/s ({kind}, world {info['world_size']})",
                tokens_per_s=speed, reference="" if reference is None else "one process fp32")  # fmt: skip
        if reference is None:
            reference = got


def check_multi_gpu(args, model_dir, work: Path, add_row) -> None:
    """DDP, ZeRO-3 and FSDP2 with every visible GPU (2 CPU processes in a dry run) against one
    process on the whole batch (float32, cross-device negatives)."""
    import torch

    world = 2 if args.dry_run else torch.cuda.device_count()
    if world < 2:
        add_row("multi-gpu", "DDP / ZeRO-3 / FSDP2", "n/a", "one GPU visible")
        return
    steps, queries, _, _ = sizes(args)
    groups = write_groups(args, work, queries * world)
    setting = f"{world} processes x {queries} queries vs one process x {queries * world}, fp32"
    one_process(args, model_dir, groups, work / "m-lr0", queries * world, lr=0.0)
    start = adapter(work / "m-lr0")
    one = work / "m-one"
    one_process(args, model_dir, groups, one, queries * world)
    want = adapter(one)
    for config in ("ddp.yaml", "zero3.yaml", "fsdp2.yaml"):
        if args.dry_run and config == "fsdp2.yaml":
            add_row(f"multi-gpu {config}", setting, "skipped",
                    "accelerate builds FSDP only on GPUs (tests/test_fsdp.py runs FSDP2 on CPU "
                    "through a probe)")  # fmt: skip
            continue
        out = work / f"m-{config}"
        info = launched(args, config, world, model_dir, groups, out, queries)
        ok, figures, _ = _judge(info, adapter(out), start, want, FP32_UPDATE_RTOL, steps)
        kind = info["distributed_type"].rsplit(".", 1)[-1]
        ok = ok and info["world_size"] == world
        add_row(f"multi-gpu {config}", setting, "ok" if ok else "FAILED",
                f"{kind}, world {info['world_size']}: {figures}")  # fmt: skip
