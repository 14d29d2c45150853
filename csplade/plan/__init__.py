"""`csplade plan`: will a training recipe fit on the GPUs, and how long will it take?

Reads a recipe (training or adaptation), an accelerate config (DDP, DeepSpeed ZeRO, FSDP) and the
GPU size, and returns a per-GPU memory breakdown, a time estimate and a verdict with the knobs that
would make a run fit. Nothing is loaded onto a device and nothing is downloaded. The memory and time
models are derived term by term, with their sources and limits, in docs/plan.md.

One module per part of the model, imports pointing one way: architecture, cluster and workload (the
inputs) <- sizes <- memory, time <- estimator <- knobs <- this module (:func:`plan_recipe`,
:func:`parse_memory`).
"""

from __future__ import annotations

import os
import re

from csplade.plan.architecture import (
    KNOWN_ARCHITECTURES,
    Architecture,
    architecture_from_config,
    resolve_architecture,
)
from csplade.plan.cluster import Cluster, load_cluster
from csplade.plan.estimator import DEVICES, TIGHT_FRACTION, Plan, Suggestion, estimate
from csplade.plan.knobs import suggest
from csplade.plan.memory import (
    CPU_OVERHEAD_BYTES,
    CUDA_OVERHEAD_BYTES,
    DEEPSPEED_ALLGATHER_BUCKET,
    GIB,
    Part,
)
from csplade.plan.time import TimeEstimate
from csplade.plan.workload import Workload, count_examples, read_workload, recipe_phase

__all__ = [
    "CPU_OVERHEAD_BYTES",
    "CUDA_OVERHEAD_BYTES",
    "DEEPSPEED_ALLGATHER_BUCKET",
    "DEVICES",
    "GIB",
    "KNOWN_ARCHITECTURES",
    "TIGHT_FRACTION",
    "Architecture",
    "Cluster",
    "Part",
    "Plan",
    "Suggestion",
    "TimeEstimate",
    "Workload",
    "architecture_from_config",
    "count_examples",
    "estimate",
    "load_cluster",
    "parse_memory",
    "plan_recipe",
    "read_workload",
    "recipe_phase",
    "resolve_architecture",
    "suggest",
]

_UNITS = {
    "": 1e9,
    "b": 1,
    "kb": 1e3,
    "mb": 1e6,
    "gb": 1e9,
    "tb": 1e12,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def parse_memory(value: str | float) -> float:
    """'80GB' -> 80e9 bytes. GB/MB/TB are decimal, GiB/MiB/TiB binary; a bare number means GB.

    An "80 GB" H100 reports ~79 GiB (85 x 10^9 bytes) to torch, so 80GB is a slightly conservative
    budget; use e.g. 79GiB for the exact figure.
    """
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ValueError(f"memory must be > 0, got {value}")
        return float(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"cannot read memory size {value!r}; write e.g. 80GB, 79GiB or 24000MB")
    size = float(match.group(1)) * _UNITS[unit]
    if size <= 0:
        raise ValueError(f"memory must be > 0, got {value!r}")
    return size


def plan_recipe(
    recipe: str | os.PathLike,
    accelerate_config: str | os.PathLike,
    *,
    nodes: int | None = None,
    gpus_per_node: int | None = None,
    gpu_memory: float | str | None = "80GB",
    tflops: float = 400.0,
    mfu: float = 0.4,
    num_queries: int | None = None,
    architecture: str | None = None,
    overrides: list[str] | None = None,
    device: str = "cuda",
) -> Plan:
    """Plan a recipe on a cluster: memory per GPU, time, verdict and (if it does not fit) knobs."""
    workload = read_workload(recipe, overrides, num_queries)
    cluster = load_cluster(accelerate_config, nodes, gpus_per_node)
    arch = resolve_architecture(workload.model.model_name_or_path, architecture)
    memory = parse_memory(gpu_memory) if gpu_memory is not None else None
    plan = estimate(
        arch,
        workload,
        cluster,
        device=device,
        gpu_memory=memory,
        tflops=tflops,
        mfu=mfu,
        model_name=workload.model.model_name_or_path,
    )
    plan.notes.insert(0, f"architecture of {workload.model.model_name_or_path}: {arch.source}")
    if workload.examples is not None:
        plan.notes.append(f"{workload.examples} examples per epoch ({workload.examples_source})")
    if memory is not None and (not plan.fits or plan.tight):
        plan.suggestions = suggest(arch, workload, cluster, gpu_memory=memory, device=device)
    return plan
