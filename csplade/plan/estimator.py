"""One plan: the memory breakdown, the time estimate and the verdict of a workload on a cluster.

:func:`estimate` puts csplade.plan.memory and csplade.plan.time together into a :class:`Plan`, which
says whether the total fits the GPU (and whether it is tight: over :data:`TIGHT_FRACTION` of it) and
serialises to the JSON of ``csplade plan --json``. Knobs that would make a plan fit are added by
csplade.plan.knobs.

Known limits: those of the memory and time models (docs/plan.md, "Known limits").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from csplade.plan.architecture import Architecture
from csplade.plan.cluster import Cluster
from csplade.plan.memory import Part, memory_parts
from csplade.plan.sizes import backbone_calls, parameter_counts, precision, seq_lengths
from csplade.plan.time import TimeEstimate, time_estimate
from csplade.plan.workload import Workload

# A run whose estimate exceeds this fraction of the GPU is called tight.
TIGHT_FRACTION = 0.9
DEVICES = ("cuda", "cpu")


@dataclass
class Suggestion:
    knob: str
    total_bytes: float
    fits: bool
    caveat: str = ""


@dataclass
class Plan:
    """A per-GPU memory breakdown, a time estimate and a verdict."""

    model: str
    architecture: Architecture
    phase: str
    cluster: Cluster
    device: str
    shapes: dict[str, Any]
    parameters: dict[str, int]
    parts: list[Part]
    cpu_offload_bytes: float
    gpu_memory: float | None
    time: TimeEstimate
    notes: list[str] = field(default_factory=list)
    suggestions: list[Suggestion] = field(default_factory=list)

    @property
    def total_bytes(self) -> float:
        return sum(p.bytes for p in self.parts)

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_memory is None else self.total_bytes <= self.gpu_memory

    @property
    def tight(self) -> bool:
        return bool(self.fits) and self.total_bytes > TIGHT_FRACTION * self.gpu_memory

    def part(self, name: str) -> float:
        for p in self.parts:
            if p.name == name:
                return p.bytes
        raise KeyError(f"no memory part {name!r}; parts: {[p.name for p in self.parts]}")

    def verdict(self) -> str:
        if self.fits is None:
            return "no GPU memory given"
        if not self.fits:
            return "does not fit"
        return "fits (tight)" if self.tight else "fits"

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "architecture": dataclasses.asdict(self.architecture),
            "phase": self.phase,
            "cluster": {**dataclasses.asdict(self.cluster), "world": self.cluster.world},
            "device": self.device,
            "shapes": self.shapes,
            "parameters": self.parameters,
            "memory_bytes": {p.name: p.bytes for p in self.parts},
            "memory_detail": {p.name: p.detail for p in self.parts},
            "total_bytes": self.total_bytes,
            "gpu_memory_bytes": self.gpu_memory,
            "cpu_offload_bytes": self.cpu_offload_bytes,
            "fits": self.fits,
            "verdict": self.verdict(),
            "time": dataclasses.asdict(self.time),
            "notes": list(self.notes),
            "suggestions": [dataclasses.asdict(s) for s in self.suggestions],
        }


def estimate(
    arch: Architecture,
    workload: Workload,
    cluster: Cluster,
    *,
    device: str = "cuda",
    gpu_memory: float | None = None,
    tflops: float = 400.0,
    mfu: float = 0.4,
    model_name: str = "",
) -> Plan:
    """Memory per GPU and time of `workload` on `cluster` (docs/plan.md derives every term)."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if tflops <= 0 or not 0 < mfu <= 1:
        raise ValueError(f"tflops must be > 0 and mfu in (0, 1], got {tflops}, {mfu}")
    notes = _precision_notes(workload, cluster)
    prec = precision(workload, cluster)
    counts = parameter_counts(arch, workload.model)
    if counts.dropped_targets:
        notes.append(
            f"LoRA targets not in this architecture, skipped: {', '.join(counts.dropped_targets)}"
        )
    checkpointing = workload.gradient_checkpointing or cluster.activation_checkpointing
    calls = backbone_calls(arch, workload)
    parts, cpu_bytes = memory_parts(
        arch, workload, cluster, prec, counts, calls, checkpointing, device, notes
    )
    time = time_estimate(arch, workload, cluster, calls, counts, checkpointing, tflops, mfu)
    if workload.examples is None and workload.max_steps <= 0:
        notes.append("no data set size: pass --num-queries for the time per epoch")
    return Plan(
        model=model_name or workload.model.model_name_or_path,
        architecture=arch,
        phase=workload.phase,
        cluster=cluster,
        device=device,
        shapes=_shapes(arch, workload, cluster, time, checkpointing),
        parameters={"total": counts.total, "trainable": counts.trainable, "lora": counts.lora},
        parts=parts,
        cpu_offload_bytes=cpu_bytes,
        gpu_memory=gpu_memory,
        time=time,
        notes=notes,
    )


def _precision_notes(workload: Workload, cluster: Cluster) -> list[str]:
    """Where the accelerate config and the recipe disagree on mixed precision (the recipe wins)."""
    recipe, config = workload.mixed_precision, cluster.mixed_precision
    if config not in ("no", recipe) and recipe != "no":
        return [
            f"accelerate config says mixed_precision {config}, the recipe {recipe}: the recipe's "
            "is planned (the Trainer's setting wins)"
        ]
    if config != "no" and recipe == "no":
        return [
            f"accelerate config asks for {config} but the recipe sets neither bf16 nor fp16: "
            "planned without mixed precision (the Trainer's setting wins)"
        ]
    return []


def _shapes(
    arch: Architecture,
    workload: Workload,
    cluster: Cluster,
    time: TimeEstimate,
    checkpointing: bool,
) -> dict[str, Any]:
    """The batch as `csplade plan` prints it: sequences, tokens, precision, global batch."""
    len_q, len_d = seq_lengths(arch, workload) if workload.phase == "train" else (None, None)
    return {
        "micro_batch": workload.batch_size,
        "group_size": workload.group_size if workload.phase == "train" else None,
        "query_tokens": len_q,
        "doc_tokens": len_d,
        "seq_tokens": workload.adapt_length if workload.phase == "adapt" else None,
        "tokens_per_step": time.tokens_per_step,
        "gradient_checkpointing": checkpointing,
        "mixed_precision": workload.mixed_precision,
        "global_batch": workload.batch_size * workload.grad_accum * cluster.world,
    }
