"""Shared helpers for csplade's benchmarks: peak memory, load average, subprocesses, tiny model.

Why: every benchmark here compares a baseline and a candidate, each in a fresh subprocess, and
reports peak memory the same way; one file owns how that is done.

Peak memory above a starting point:
- CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus the memory
  allocated at the start.
- CPU: the process's peak resident set size (VmHWM) minus the resident size at the start. The peak
  is reset by writing "5" to /proc/self/clear_refs (Linux >= 4.0), so import-time spikes do not
  count; without that file it falls back to getrusage ru_maxrss, a lower bound when an earlier
  spike was higher (reported as `floored`).

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
import resource
import subprocess
import sys
from dataclasses import dataclass

MIB = 1024**2
MMAP_THRESHOLD = 1024**2  # bytes; glibc's MALLOC_MMAP_THRESHOLD_ for case subprocesses
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes(reset_ok: bool) -> int:
    if reset_ok:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


@dataclass
class PeakMemory:
    """Peak memory above the level at `start()`: CUDA allocator stats, or VmHWM on CPU."""

    device: str = "cpu"
    base: int = 0
    reset_ok: bool = True
    floored: bool = False

    def start(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.reset_ok = _reset_peak_rss()
        self.base = rss_bytes()
        # Without a reset, an earlier spike above the current level hides this run's peak.
        self.floored = not self.reset_ok and _peak_rss_bytes(False) > self.base + 16 * MIB
        return self

    def peak_bytes(self) -> int:
        """The peak since `start()` minus the level at `start()`."""
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return _peak_rss_bytes(self.reset_ok) - self.base


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
