"""What training needs to know about the processes it runs in.

`accelerate launch` (DDP, DeepSpeed, FSDP; one node or many) starts the processes and the HF Trainer
joins them; the loss maths that depends on the split lives in :mod:`csplade.training.losses`. Here: whether
an accelerator is visible (several processes on a machine without one must train on CPU over gloo), and
the guard that refuses a run whose processes did not join one group (each would train alone).
"""

from __future__ import annotations

import os

import torch


def has_accelerator() -> bool:
    """A CUDA, XPU or MPS device is visible."""
    return (
        torch.cuda.is_available()
        or (hasattr(torch, "xpu") and torch.xpu.is_available())
        or (hasattr(torch.backends, "mps") and torch.backends.mps.is_available())
    )


def launched_processes() -> int:
    """How many processes the launcher started (WORLD_SIZE; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def cpu_only_launch() -> bool:
    """Several processes launched on a machine without an accelerator (they must join over gloo)."""
    return launched_processes() > 1 and not has_accelerator()


def check_joined(accelerator) -> None:
    """RuntimeError when the launcher started more processes than the trainer joined."""
    launched = launched_processes()
    if launched != accelerator.num_processes:
        raise RuntimeError(
            f"{launched} processes were launched but the trainer joined {accelerator.num_processes}; "
            "each process would train alone (on CPU, launch with --multi_gpu or set use_cpu: true)"
        )
