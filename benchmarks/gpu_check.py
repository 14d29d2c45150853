"""GPU checks for csplade, for whenever an accelerator is at hand (about 5 to 10 minutes on one GPU).

Usage:
    python benchmarks/gpu_check.py                   # every check on cuda:0, SmolLM2-135M
    python benchmarks/gpu_check.py --only head zero3 --model path/or/name
    python benchmarks/gpu_check.py --dry-run         # the same checks, toy sizes, on the CPU

Prints one table, one row per check. CI never runs it: it is what the CPU test suite cannot show.

- head: the SPLADE head, forward + backward, bfloat16, B=32, L=512, V=128,256, H=4,096 (a frozen
  weight, as under LoRA): fused vs naive, best time of 3 and peak CUDA memory above the inputs. The
  naive head at this size needs tens of GB; an out-of-memory is a row, not a failure.
- flash-attn: the ``bi`` variant with ``flash_attention_2`` against ``sdpa`` (bfloat16, 64 texts):
  largest difference between the vectors and the mean overlap of their 20 top terms. Skipped, with
  the reason, when flash-attn is not installed.
- bitsandbytes: int8 and nf4 encoding on the GPU against bfloat16 (64 texts): docs/s and the mean
  cosine to the bfloat16 vectors.
- zero3: 2 LoRA training steps of the model under DeepSpeed ZeRO-3 on the GPU (accelerate launch, one
  process, ``stage3_param_persistence_threshold: 0``, bf16): it finishes, the loss is finite, and
  run_info.json says the fused head ran (``head_calls``).

``--dry-run`` runs the same code at toy sizes on the CPU with a tiny random Llama (SmolLM2's
tokenizer and vocabulary): the script's own smoke test, whose figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from _measure import MIB, ROOT, build_tiny_model

ROWS: list[tuple[str, str, str, str]] = []  # check, setting, status, figures
SIZES = {
    "gpu": {"batch": 32, "length": 512, "vocab": 128256, "hidden": 4096, "texts": 64},
    "dry": {"batch": 2, "length": 32, "vocab": 4096, "hidden": 64, "texts": 8},
}


def _texts(n: int, words: int = 60, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    vocab = "retrieval sparse vector term query document model head weight bias protein cell gene " \
            "vitamin deficiency disease patients clinical trial risk study effect dose".split()  # fmt: skip
    return [" ".join(rng.choice(vocab) for _ in range(words)) for _ in range(n)]


def check_head(args, size) -> None:
    import torch

    from csplade.evaluation.memory import PeakMemory
    from csplade.model.head import sparse_pool

    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    b, length, v, h = size["batch"], size["length"], size["vocab"], size["hidden"]
    hidden = torch.randn(b, length, h, generator=gen).to(device, torch.bfloat16).requires_grad_()
    weight = (torch.randn(v, h, generator=gen) / h**0.5).to(device, torch.bfloat16)
    mask = torch.ones(b, length, dtype=torch.bool, device=device)
    grad = torch.rand(b, v, generator=gen).to(device)
    setting = f"B={b} L={length} V={v:,} H={h} bf16"
    figures = {}
    for fused in (True, False):
        name = "fused" if fused else "naive"

        def step(fused=fused):
            sparse_pool(hidden, weight, mask, fused=fused).backward(grad)
            hidden.grad = None
            if device.type == "cuda":
                torch.cuda.synchronize()

        try:
            step()  # warm-up
            with PeakMemory(device.type) as peak:
                step()
            times = []
            for _ in range(3):
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
            figures[name] = (peak.peak_bytes() / MIB, min(times))
        except torch.cuda.OutOfMemoryError:
            figures[name] = None
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    text = "  ".join(
        f"{k}: {m:,.0f} MiB {t * 1e3:.0f} ms" if f else f"{k}: out of memory"
        for k, f in figures.items()
        for m, t in [f or (0, 0)]
    )
    if figures["fused"] and figures["naive"] and figures["fused"][0] >= 1:
        text += f"  (naive/fused: memory {figures['naive'][0] / figures['fused'][0]:.1f}x, "
        text += f"time {figures['naive'][1] / figures['fused'][1]:.2f}x)"
    ROWS.append(("head", setting, "ok" if figures["fused"] else "FAILED", text))


def _encode(args, model: str, texts, **kwargs):
    import torch

    from csplade import SparseEncoder

    encoder = SparseEncoder.from_pretrained(model, device=args.device, **kwargs)
    start = time.perf_counter()
    vectors = encoder.encode_docs(texts, batch_size=16, show_progress=False)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return vectors.toarray(), time.perf_counter() - start


def check_flash_attention(args, size, model: str) -> None:
    from transformers.utils import is_flash_attn_2_available

    if not args.device.startswith("cuda") or not is_flash_attn_2_available():
        why = "no CUDA device" if not args.device.startswith("cuda") else "flash-attn not installed"
        ROWS.append(("flash-attn", "bi, fa2 vs sdpa", "skipped", f"{why} (pip install flash-attn)"))
        return
    texts = _texts(size["texts"])
    common = {"variant": "bi", "dtype": "bfloat16"}
    sdpa, _ = _encode(args, model, texts, attn_implementation="sdpa", **common)
    fa2, _ = _encode(args, model, texts, attn_implementation="flash_attention_2", **common)
    overlap = _top_overlap(sdpa, fa2, 20)
    diff = abs(sdpa - fa2).max()
    status = "ok" if overlap >= 0.9 else "DIFFERS"
    text = (
        f"max |fa2 - sdpa| {diff:.3g} (max weight {sdpa.max():.3g}), top-20 overlap {overlap:.3f}"
    )
    ROWS.append(("flash-attn", f"bi, fa2 vs sdpa, {len(texts)} texts bf16", status, text))


def _top_overlap(a, b, k: int) -> float:
    import numpy as np

    top_a, top_b = np.argsort(-a, axis=1)[:, :k], np.argsort(-b, axis=1)[:, :k]
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(top_a, top_b, strict=True)]))


def _cosine(a, b) -> float:
    import numpy as np

    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12
    return float(np.mean(num / den))


def check_bitsandbytes(args, size, model: str) -> None:
    texts = _texts(size["texts"])
    reference, seconds = _encode(args, model, texts, dtype="bfloat16")
    parts = [f"bf16 {len(texts) / seconds:.0f} docs/s"]
    status = "ok"
    for mode in ("int8", "nf4"):
        try:
            vectors, seconds = _encode(args, model, texts, quantization=mode)
            cosine = _cosine(vectors, reference)
            parts.append(f"{mode} {len(texts) / seconds:.0f} docs/s cos {cosine:.3f}")
            status = status if cosine > 0.8 else "DIFFERS"
        except Exception as exc:  # a missing or broken bitsandbytes build is a row
            parts.append(f"{mode} failed: {type(exc).__name__}: {str(exc)[:80]}")
            status = "FAILED"
    ROWS.append(
        ("bitsandbytes", f"encode {len(texts)} texts on {args.device}", status, "; ".join(parts))
    )


def check_zero3(args, model: str, folder: Path) -> None:
    groups = folder / "groups.jsonl"
    texts = _texts(64, words=40, seed=1)
    with groups.open("w") as fh:
        for i in range(16):
            group = {"query": " ".join(texts[i].split()[:6]), "positives": [texts[i]],
                     "negatives": [texts[(i + j) % 64] for j in (16, 32, 48)]}  # fmt: skip
            fh.write(json.dumps(group) + "\n")
    ds = {
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                              "stage3_gather_16bit_weights_on_model_save": True},
        "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
    }  # fmt: skip
    (folder / "ds.json").write_text(json.dumps(ds))
    config = folder / "zero3.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\n"
        f"deepspeed_config:\n  deepspeed_config_file: {folder / 'ds.json'}\n  zero3_init_flag: true\n"
        "num_machines: 1\nnum_processes: 1\nmachine_rank: 0\nuse_cpu: false\n"
    )
    out = folder / "zero3-out"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
        "--num_processes", "1", "--main_process_port", "0", "-m", "csplade", "train",
        "--model_name_or_path", model, "--train_data", str(groups), "--output_dir", str(out),
        "--use_lora", "true", "--max_steps", "2", "--per_device_train_batch_size", "4",
        "--group_size", "4", "--doc_max_length", "128", "--save_strategy", "no",
        "--logging_steps", "1", *([] if args.dry_run else ["--bf16", "true"]),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    seconds = time.perf_counter() - start
    setting = f"LoRA, 2 steps, 4 queries x 4 docs, {args.device}"
    if done.returncode != 0:
        ROWS.append(("zero3", setting, "FAILED", done.stderr.strip().splitlines()[-1][:160]))
        return
    info = json.loads((out / "run_info.json").read_text())
    losses = [h["loss"] for h in info["log_history"] if "loss" in h]
    fused = set(info.get("head_calls", {})) == {"fused"}
    finite = losses and all(math.isfinite(x) for x in losses)
    status = "ok" if fused and finite and "DEEPSPEED" in info["distributed_type"] else "FAILED"
    text = (
        f"{info['distributed_type']}, head_calls {info.get('head_calls')}, losses "
        f"{[round(x, 3) for x in losses]}, {seconds:.0f} s with loading"
    )
    ROWS.append(("zero3", setting, status, text))


CHECKS = ("head", "flash-attn", "bitsandbytes", "zero3")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="model of the encode/train checks")
    parser.add_argument("--device", default=None, help="default: cuda, or cpu with --dry-run")
    parser.add_argument("--only", nargs="+", choices=CHECKS, default=list(CHECKS))
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU")
    parser.add_argument("--timeout", type=int, default=300, help="seconds for the ZeRO-3 run")
    args = parser.parse_args()
    import torch

    args.device = args.device or ("cpu" if args.dry_run else "cuda")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --dry-run")
    size = SIZES["dry" if args.dry_run else "gpu"]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        model = build_tiny_model(str(Path(tmp) / "tiny")) if args.dry_run else args.model
        runs = {
            "head": lambda: check_head(args, size),
            "flash-attn": lambda: check_flash_attention(args, size, model),
            "bitsandbytes": lambda: check_bitsandbytes(args, size, model),
            "zero3": lambda: check_zero3(args, model, Path(tmp)),
        }
        for name in args.only:
            try:
                runs[name]()
            except Exception as exc:  # one broken check is a row; the others still run
                traceback.print_exc()
                ROWS.append((name, "", "FAILED", f"{type(exc).__name__}: {str(exc)[:160]}"))
    where = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU (dry run)"
    print(f"\ncsplade GPU check on {where}, torch {torch.__version__}, model {args.model}"
          f"{' (dry run: tiny model, toy sizes)' if args.dry_run else ''}, "
          f"{time.perf_counter() - started:.0f} s")  # fmt: skip
    print("| check | setting | status | figures |\n|---|---|---|---|")
    for row in ROWS:
        print("| " + " | ".join(row) + " |")
    return 0 if all(r[2] in ("ok", "skipped") for r in ROWS) else 1


if __name__ == "__main__":
    sys.exit(main())
