"""What training needs to know about the processes it runs in and the engine that shards the model.

`accelerate launch` (DDP, DeepSpeed, FSDP; one node or many) starts the processes and the HF Trainer
joins them; the loss maths that depends on the split lives in :mod:`csplade.training.losses`. Here:

- whether an accelerator is visible (several processes on a machine without one must train on CPU
  over gloo), and the guards that refuse a run whose processes did not join one group (each would
  train alone) or whose engine is not the one the launch asked for (:func:`check_engine`);
- sharded parameters (DeepSpeed ZeRO-3 partitions, FSDP2 DTensor shards) outside the engine's own
  forward: :func:`gathered` holds a model whole for a pass before the engine exists, and
  :func:`unsharded_loading` builds a model whole although a ZeRO-3 launch would partition it.

Known limit (accelerate 1.15): FSDP is built only on GPUs (and XPU, NPU, HPU, MLU, …); on a machine
without one accelerate keeps plain data parallel over gloo and reports MULTI_CPU. csplade refuses
that launch instead of training unsharded under an FSDP config (:func:`check_engine`). torch itself
runs FSDP2 on CPU; the tests set accelerate's state as on a GPU machine to run it (tests/probed_cli.py).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import nn


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


def requested_engine() -> str | None:
    """'FSDP' or 'DEEPSPEED' when `accelerate launch` was given such a config (its environment)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "FSDP"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "DEEPSPEED"
    return None


def check_engine(accelerator) -> None:
    """RuntimeError when the launch asked for FSDP or DeepSpeed and the trainer runs something else.

    accelerate 1.15 builds FSDP only on accelerators: on a machine without one, an FSDP config
    silently gives plain data parallel over gloo (MULTI_CPU), every process holding the whole model.
    """
    asked = requested_engine()
    running = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    if asked is None or asked == running:
        return
    import accelerate

    where = "" if has_accelerator() else " on a machine without GPUs"
    raise RuntimeError(
        f"the launch config asks for {asked}, but accelerate {accelerate.__version__} runs "
        f"{running}{where}: the model would not be sharded. accelerate builds FSDP only on GPUs "
        "(and XPU/NPU/HPU); on CPU use accelerate_configs/ddp.yaml or a DeepSpeed config "
        "(zero2.yaml, zero3.yaml), and FSDP on GPU machines"
    )


def _zero3_params(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if hasattr(p, "ds_id")]


@contextlib.contextmanager
def gathered(module: nn.Module) -> Iterator[None]:
    """Hold every ZeRO-3 partitioned parameter of `module` whole inside the block (read-only).

    For a pass over a model that ZeRO-3 partitioned at load time (``zero.Init``) before the engine,
    and its hooks, exist (e.g. the head-bias calibration before training): every process holds the
    whole model for the block. Nothing happens for unpartitioned models.
    """
    params = _zero3_params(module)
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


@contextlib.contextmanager
def unsharded_loading() -> Iterator[None]:
    """Load models whole inside the block, even in a ZeRO-3 launch.

    transformers partitions a model at load time (``deepspeed.zero.Init``) while a ZeRO-3 config is
    registered (``is_deepspeed_zero3_enabled``); the registration is lifted for the block and put
    back after it.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    config = ref() if ref is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if config is not None:
            hf_deepspeed.set_hf_deepspeed_config(config)
