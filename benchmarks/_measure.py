"""Shared helpers for csplade's benchmarks: subprocesses, load average, machine line, tiny model.

Why: every benchmark here compares a baseline and a candidate, each in a fresh subprocess, and
reports peak memory the same way: `PeakMemory` (CUDA allocator stats, or peak RSS via VmHWM) comes
from :mod:`csplade.evaluation.memory`, which documents how it measures and its fallbacks.

RSS counts what the C allocator keeps mapped, not what tensors hold. glibc raises its mmap threshold
to 32 MiB after the first large free, so later tensors below that size come from the heap, whose
freed pieces stay resident. Measured on a SmolLM2-135M LoRA step (2 queries x 4 docs of 256
tokens, activation checkpointing): peak RSS 4.8 GB with glibc's defaults, 0.9 GB with the threshold
fixed, for the same live tensors. `spawn` therefore fixes it (MALLOC_MMAP_THRESHOLD_=1 MiB, unless
the variable is already set): every tensor of 1 MiB or more is mapped on allocation and unmapped
on free, and the peak RSS follows the live tensors.

Known limits: the CPU figures need Linux's /proc; with a fixed threshold, large allocations pay a
page fault per page each time (baseline and candidate alike).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from csplade.evaluation.memory import MIB, PeakMemory, rss_bytes

__all__ = [
    "MIB",
    "MMAP_THRESHOLD",
    "PeakMemory",
    "build_tiny_model",
    "cuda_available",
    "data_dir",
    "load_average",
    "machine_line",
    "rss_bytes",
    "spawn",
]

MMAP_THRESHOLD = 1024**2  # bytes; glibc's MALLOC_MMAP_THRESHOLD_ for case subprocesses
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_average() -> float:
    """1-minute load average of the machine (other workers' load shows up here)."""
    return os.getloadavg()[0]


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def spawn(script: str, argv: list[str], label: str) -> dict:
    """Run `script argv` in a fresh Python process; return the JSON on its last stdout line."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))  # see the module docstring
    cmd = [sys.executable, os.path.abspath(script), *argv]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"case {label} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    lines = done.stdout.strip().splitlines()
    if not lines:
        raise SystemExit(f"case {label} printed nothing:\n{done.stderr[-4000:]}")
    return json.loads(lines[-1])


def machine_line(device: str, threads: int) -> str:
    """One line on where the figures come from: device, threads, CPUs, load average."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    threshold = os.environ.get("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))
    return (
        f"device={device} torch threads/case={threads} cpus={os.cpu_count()} "
        f"MALLOC_MMAP_THRESHOLD_={threshold} load average (1, 5, 15 min)={load}"
    )


def data_dir() -> str:
    """Where BEIR folders live: $CSPLADE_DATA, default <repo root>/../shared/data."""
    return os.environ.get("CSPLADE_DATA") or os.path.join(ROOT, os.pardir, "shared", "data")


def build_tiny_model(out: str) -> str:
    """A 2-layer random Llama with SmolLM2's tokenizer and vocabulary (49,152), saved to `out`.

    For --quick smoke runs: real texts tokenize as they would for SmolLM2 and the head has the real
    vocabulary size, while the backbone costs next to nothing.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
    from transformers.utils import logging as hf_logging

    from csplade.model.backbones import resolve_model

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
