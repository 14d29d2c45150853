"""Time of a run: FLOPs of one micro-step on one GPU, divided by the GPU's throughput.

Per token through the decoder: forward 2 x matmul parameters + attention; backward through every
layer for the input gradients, frozen or not; weight gradients for the trainable matmul weights only
(full fine-tuning ~6 P per token, LoRA ~4 P); gradient checkpointing adds one forward; the sparse
head and the adaptation's LM head are counted apart (docs/plan.md, "Time model"). Seconds = FLOPs /
(TFLOPS x MFU), with the MFU given by the user.

Known limits: attention is counted at full length (no causal skipping); communication and offloading
transfer times are not counted; examples per epoch come from ``--num-queries`` or a local data set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from csplade.plan.architecture import Architecture
from csplade.plan.cluster import Cluster
from csplade.plan.sizes import Counts, scored_positions
from csplade.plan.workload import Workload


@dataclass
class TimeEstimate:
    tokens_per_step: int  # one micro-step, one GPU
    flops_per_step: dict[str, float]  # one micro-step, one GPU, by part
    seconds_per_step: float
    examples_per_epoch: int | None
    steps_per_epoch: int | None  # micro-steps per GPU
    optimizer_steps_per_epoch: int | None
    seconds_per_epoch: float | None
    optimizer_steps: int | None  # of the whole run
    seconds_total: float | None
    tflops: float
    mfu: float


def _flops(
    arch: Architecture,
    workload: Workload,
    calls: list[tuple[int, int]],
    counts: Counts,
    checkpointing: bool,
) -> dict[str, float]:
    """FLOPs of one micro-step on one GPU, by part (docs/plan.md, "Time model")."""
    model = workload.model
    layer_matmul = arch.layers * arch.layer_matmul_params()
    adapters = 2.0 * counts.lora  # per token, forward (and again for the input gradients)
    hv = 2.0 * arch.hidden * arch.vocab
    out = dict.fromkeys(("forward", "backward_input", "backward_weight", "recompute", "head"), 0.0)
    for rows, length in calls:
        tokens = rows * length
        attention = arch.layers * 4.0 * length * arch.q_dim
        forward = tokens * (2.0 * layer_matmul + attention + adapters)
        out["forward"] += forward
        out["backward_input"] += tokens * (2.0 * layer_matmul + 2 * attention + adapters)
        out["backward_weight"] += tokens * 2.0 * counts.trainable_matmul
        if checkpointing:
            out["recompute"] += forward
        if workload.phase == "train":
            out["head"] += tokens * hv
            if model.fused_head and model.pooling == "max":
                out["head"] += rows * hv * (2 if counts.head_trainable else 1)
            else:
                extra = 2 if model.fused_head else 1  # the fused sum head recomputes its logits
                out["head"] += tokens * hv * (extra + (1 if counts.head_trainable else 0))
    if workload.phase == "adapt":
        out["head"] = scored_positions(workload) * hv * (2 + (1 if counts.head_trainable else 0))
    return out


def time_estimate(
    arch: Architecture,
    workload: Workload,
    cluster: Cluster,
    calls: list[tuple[int, int]],
    counts: Counts,
    checkpointing: bool,
    tflops: float,
    mfu: float,
) -> TimeEstimate:
    """Seconds per micro-step, per epoch (when the examples are known) and for the whole run."""
    flops = _flops(arch, workload, calls, counts, checkpointing)
    seconds = sum(flops.values()) / (tflops * 1e12 * mfu)
    examples = workload.examples
    steps_epoch = opt_epoch = seconds_epoch = opt_total = seconds_total = None
    if examples is not None:
        steps_epoch = math.ceil(examples / (workload.batch_size * cluster.world))
        opt_epoch = math.ceil(steps_epoch / workload.grad_accum)
        seconds_epoch = steps_epoch * seconds
    if workload.max_steps > 0:
        opt_total = workload.max_steps
    elif opt_epoch is not None:
        opt_total = math.ceil(workload.epochs * opt_epoch)
    if opt_total is not None:
        seconds_total = opt_total * workload.grad_accum * seconds
    return TimeEstimate(
        tokens_per_step=int(sum(n * length for n, length in calls)),
        flops_per_step=flops,
        seconds_per_step=seconds,
        examples_per_epoch=examples,
        steps_per_epoch=steps_epoch,
        optimizer_steps_per_epoch=opt_epoch,
        seconds_per_epoch=seconds_epoch,
        optimizer_steps=opt_total,
        seconds_total=seconds_total,
        tflops=tflops,
        mfu=mfu,
    )
