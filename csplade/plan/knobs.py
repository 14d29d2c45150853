"""Knobs that lower the memory of a plan, and which of them make it fit.

Each knob is one change to the recipe or the accelerate config (gradient checkpointing, the fused
head, a higher ZeRO stage or FSDP FULL_SHARD, CPU offload, a smaller micro-batch with more
accumulation, QLoRA, LoRA, shorter texts, fewer negatives), listed most benign first with what it
costs. :func:`suggest` estimates each one alone and, when none fits alone, a greedy combination.

Known limits: knobs are judged by memory only; their cost in time or quality is a caveat in words.
"""

from __future__ import annotations

import dataclasses
import math

from csplade.plan.architecture import Architecture
from csplade.plan.cluster import Cluster
from csplade.plan.estimator import Suggestion, estimate
from csplade.plan.workload import Workload

# (label, changed workload, changed cluster, caveat)
Knob = tuple[str, Workload, Cluster, str]

_SLOW = "slower: states cross PCIe every step"


def _knobs(arch: Architecture, workload: Workload, cluster: Cluster) -> list[Knob]:
    """Single changes that lower memory: (label, workload, cluster, caveat), most benign first."""
    return [
        *_compute_knobs(workload, cluster),
        *_sharding_knobs(workload, cluster),
        *_offload_knobs(workload, cluster),
        *_batch_and_lora_knobs(arch, workload, cluster),
        *_length_knobs(workload, cluster),
    ]


def _compute_knobs(workload: Workload, cluster: Cluster) -> list[Knob]:
    """Same run, more compute: gradient checkpointing; the fused head."""
    out: list[Knob] = []
    if not (workload.gradient_checkpointing or cluster.activation_checkpointing):
        out.append(
            (
                "gradient_checkpointing: true",
                dataclasses.replace(workload, gradient_checkpointing=True),
                cluster,
                "recomputes the forward in backward (~+30% compute)",
            )
        )
    if workload.phase == "train" and not workload.model.fused_head:
        out.append(("fused_head: true", workload.with_model(fused_head=True), cluster, ""))
    return out


def _sharding_knobs(workload: Workload, cluster: Cluster) -> list[Knob]:
    """More sharding on several GPUs: ZeRO-2/3 for DDP, a higher ZeRO stage, FSDP FULL_SHARD."""
    if cluster.world == 1:
        return []
    if not cluster.deepspeed and not cluster.fsdp:
        return [
            (
                f"DeepSpeed ZeRO-{stage} (accelerate_configs/zero{stage}.yaml)",
                workload,
                dataclasses.replace(cluster, distributed_type="DEEPSPEED", zero_stage=stage),
                "",
            )
            for stage in (2, 3)
        ]
    if cluster.deepspeed and cluster.zero_stage < 3:
        return [
            (
                f"ZeRO stage {stage} (deepspeed_config.zero_stage: {stage})",
                workload,
                dataclasses.replace(cluster, zero_stage=stage),
                "",
            )
            for stage in range(max(cluster.zero_stage + 1, 2), 4)
        ]
    if cluster.fsdp and cluster.fsdp_sharding != "FULL_SHARD":
        full = dataclasses.replace(cluster, fsdp_sharding="FULL_SHARD")
        return [("FSDP FULL_SHARD (fsdp_reshard_after_forward: true)", workload, full, "")]
    return []


def _offload_knobs(workload: Workload, cluster: Cluster) -> list[Knob]:
    """Optimizer states (and parameters) to CPU RAM, under ZeRO or FSDP."""
    out: list[Knob] = []
    if cluster.deepspeed and cluster.zero_stage >= 1 and not cluster.offload_optimizer:
        offloaded = dataclasses.replace(cluster, offload_optimizer=True)
        out.append(("offload_optimizer_device: cpu", workload, offloaded, _SLOW))
    if cluster.deepspeed and cluster.zero_stage == 3 and not cluster.offload_params:
        out.append(
            (
                "offload_param_device: cpu + offload_optimizer_device: cpu "
                "(accelerate_configs/zero3_offload.yaml)",
                workload,
                dataclasses.replace(cluster, offload_params=True, offload_optimizer=True),
                _SLOW,
            )
        )
    if cluster.fsdp and not cluster.offload_params:
        offloaded = dataclasses.replace(cluster, offload_params=True, offload_optimizer=True)
        out.append(("fsdp_offload_params: true", workload, offloaded, _SLOW))
    return out


def _batch_and_lora_knobs(arch: Architecture, workload: Workload, cluster: Cluster) -> list[Knob]:
    """A smaller micro-batch with more accumulation; a 4-bit base (QLoRA); LoRA instead of full."""
    model = workload.model
    out: list[Knob] = []
    if workload.batch_size > 1:
        smaller = math.ceil(workload.batch_size / 2)
        accum = math.ceil(workload.batch_size * workload.grad_accum / smaller)
        out.append(
            (
                f"per_device_train_batch_size: {smaller} + gradient_accumulation_steps: {accum}",
                dataclasses.replace(workload, batch_size=smaller, grad_accum=accum),
                cluster,
                "same global batch, but in-batch (and cross-device) negatives come from one "
                "micro-batch: each query sees fewer negatives",
            )
        )
    if model.use_lora and model.quantization == "none":
        out.append(
            (
                "quantization: nf4 (QLoRA 4-bit base)",
                workload.with_model(quantization="nf4"),
                cluster,
                "4-bit base weights; merge_adapter is refused (save the adapter)",
            )
        )
    if not model.use_lora:
        out.append(
            (
                f"use_lora: true (LoRA on {', '.join(arch.linears())})",
                workload.with_model(use_lora=True, lora_target_modules=list(arch.linears())),
                cluster,
                "trains an adapter, not the full model",
            )
        )
    return out


def _length_knobs(workload: Workload, cluster: Cluster) -> list[Knob]:
    """Less text per step: shorter documents, fewer hard negatives, shorter adaptation texts."""
    out: list[Knob] = []
    if workload.phase == "train" and workload.model.doc_max_length > 32:
        shorter = workload.model.doc_max_length // 2
        out.append(
            (
                f"doc_max_length: {shorter}",
                workload.with_model(doc_max_length=shorter),
                cluster,
                "documents are cut shorter",
            )
        )
    if workload.phase == "train" and workload.group_size > 2:
        fewer = workload.group_size // 2
        out.append(
            (
                f"group_size: {fewer}",
                dataclasses.replace(workload, group_size=fewer),
                cluster,
                "fewer hard negatives per query",
            )
        )
    if workload.phase == "adapt" and workload.adapt_length > 64:
        shorter = workload.adapt_length // 2
        out.append(
            (
                f"adapt_max_length: {shorter}",
                dataclasses.replace(workload, adapt_length=shorter),
                cluster,
                "texts are cut shorter",
            )
        )
    return out


def suggest(
    arch: Architecture,
    workload: Workload,
    cluster: Cluster,
    *,
    gpu_memory: float,
    device: str = "cuda",
) -> list[Suggestion]:
    """Each knob alone (smallest total first); if none fits alone, also a greedy combination.

    The combination takes, step by step, the knob that lowers the estimate most (re-derived after each
    change, so e.g. the batch can be halved twice) until the estimate fits or nothing lowers it.
    """

    def total(w: Workload, c: Cluster) -> float:
        return estimate(arch, w, c, device=device).total_bytes

    singles = []
    for label, w, c, caveat in _knobs(arch, workload, cluster):
        size = total(w, c)
        singles.append(Suggestion(label, size, size <= gpu_memory, caveat))
    singles.sort(key=lambda s: s.total_bytes)
    if any(s.fits for s in singles):
        return singles
    applied: list[str] = []
    w, c = workload, cluster
    size = total(w, c)
    for _ in range(32):
        if size <= gpu_memory:
            break
        options = [(total(o[1], o[2]), o) for o in _knobs(arch, w, c)]
        if not options:
            break
        new_size, (label, new_w, new_c, _) = min(options, key=lambda option: option[0])
        if new_size >= size:
            break
        applied.append(label)
        w, c, size = new_w, new_c, new_size
    if applied:
        singles.append(
            Suggestion(
                "combined: " + "; ".join(applied),
                size,
                size <= gpu_memory,
                "each step takes the knob that saves the most",
            )
        )
    return singles
