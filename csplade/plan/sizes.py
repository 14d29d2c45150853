"""The sizes both estimates start from: bytes per element, parameter counts, backbone calls.

:func:`precision` gives the bytes of each kind of tensor (activations, frozen, trainable and LoRA
weights, optimizer states) under the recipe's dtype, mixed precision and distribution;
:func:`parameter_counts` the total, LoRA and trainable parameters; :func:`backbone_calls` the
(sequences, tokens) of each backbone call of one micro-step. The memory model (csplade.plan.memory)
and the time model (csplade.plan.time) both read them; docs/plan.md gives the reasons for each
figure.

Known limits: sequence lengths are the recipe's maxima plus an estimated prefix of 4 characters per
token (batches padded to their longest text are shorter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from csplade.model.config import DTYPE_BYTES
from csplade.plan.architecture import Architecture
from csplade.plan.cluster import Cluster
from csplade.plan.workload import Workload
from csplade.training.arguments import ModelArguments


@dataclass(frozen=True)
class Precision:
    act: int  # activation bytes (a)
    frozen: int  # bytes of a stored frozen weight (non-quantized)
    trainable: int  # bytes of a stored trainable weight (full fine-tuning)
    adapter: int  # bytes of a LoRA weight (and of its activations)
    optim_per_param: float  # optimizer bytes per trainable parameter
    autocast_copies: bool  # autocast over float32 weights
    compute: int  # bytes of a weight as the matmuls read it (gathered / cast copies)


def precision(workload: Workload, cluster: Cluster) -> Precision:
    """Bytes per element of each kind of tensor (docs/plan.md, "weights" to "optimizer")."""
    model_bytes = DTYPE_BYTES[workload.model.model_dtype]
    mixed = workload.mixed_precision != "no"
    act = 2 if (mixed or model_bytes == 2) else 4
    if cluster.deepspeed and mixed:
        frozen = trainable = adapter = 2  # the engine casts the module to 16 bits
    else:
        frozen = model_bytes
        trainable = 4 if (cluster.fsdp and mixed) else model_bytes
        adapter = 4  # peft keeps 16-bit adapters in float32 (autocast_adapter_dtype)
    if workload.model.quantization != "none" and not (cluster.deepspeed and mixed):
        frozen = 4  # prepare_model_for_kbit_training casts what it does not quantize to float32
    train_bytes = adapter if workload.model.use_lora else trainable
    if cluster.deepspeed:
        optim = 12.0
    elif "8bit" in workload.optimizer:
        optim = 2.0
    else:
        optim = 2.0 * train_bytes
    autocast = mixed and model_bytes == 4 and not cluster.deepspeed and not cluster.fsdp
    compute = 2 if mixed else frozen
    return Precision(act, frozen, trainable, adapter, optim, autocast, compute)


@dataclass(frozen=True)
class Counts:
    total: int
    lora: int
    trainable: int
    # trainable matmul weights of the decoder (their weight gradients cost FLOPs)
    trainable_matmul: int
    head_trainable: bool
    dropped_targets: tuple[str, ...] = ()


def lora_targets(arch: Architecture, model: ModelArguments) -> dict[str, list[tuple[int, int]]]:
    """The recipe's LoRA targets that exist in this architecture, with their (in, out) features."""
    linears = arch.linears()
    targets = {t: linears[t] for t in model.lora_target_modules if t in linears}
    if not targets:
        raise ValueError(
            f"lora_target_modules {model.lora_target_modules} match no linear layer of a "
            f"{arch.family}-style block ({', '.join(linears)})"
        )
    return targets


def parameter_counts(arch: Architecture, model: ModelArguments) -> Counts:
    """Total, LoRA and trainable parameters; LoRA targets absent from the block are skipped (and
    named), as csplade.training.loading does."""
    total = arch.total_params()
    if not model.use_lora:
        matmul = arch.layers * arch.layer_matmul_params()
        return Counts(total, 0, total, matmul, head_trainable=True)
    targets = lora_targets(arch, model)
    lora = arch.layers * sum(
        model.lora_r * (fan_in + fan_out) for dims in targets.values() for fan_in, fan_out in dims
    )
    if model.lora_lm_head:
        lora += model.lora_r * (arch.hidden + arch.vocab)
    dropped = tuple(sorted(set(model.lora_target_modules) - set(targets)))
    return Counts(total, lora, lora, lora, head_trainable=False, dropped_targets=dropped)


def seq_lengths(arch: Architecture, workload: Workload) -> tuple[int, int]:
    """Tokens of one query and one document sequence as the backbone sees them (0: no forward)."""
    model = workload.model
    copies = 2 if model.variant == "echo" else 1

    def length(max_len: int, prefix: str) -> int:
        return arch.specials + copies * (max_len + math.ceil(len(prefix) / 4))

    query = 0 if model.doc_only else length(model.query_max_length, model.query_prefix)
    lexical_docs = getattr(model, "lexical_docs", False)  # documents run no forward pass
    return query, 0 if lexical_docs else length(model.doc_max_length, model.doc_prefix)


def backbone_calls(arch: Architecture, workload: Workload) -> list[tuple[int, int]]:
    """(sequences, tokens per sequence) of each backbone call of one micro-step."""
    if workload.phase == "adapt":
        return [(workload.batch_size, workload.adapt_length)]
    len_q, len_d = seq_lengths(arch, workload)
    calls = [(workload.batch_size, len_q), (workload.batch_size * workload.group_size, len_d)]
    return [(n, length) for n, length in calls if n and length]


def scored_positions(workload: Workload) -> int:
    """Adaptation: positions the LM head is applied to in one micro-batch (L_ReLU: every position
    with a next token, under MNTP as under CLM)."""
    return workload.batch_size * (workload.adapt_length - 1)
