"""Memory per GPU of one training step, as a list of named parts whose sum is the estimate.

:func:`memory_parts` returns weights, lora, gradients, optimizer, working_copies, activations, head,
loss, transient, comm_buffers and overhead (docs/plan.md, "Memory model", derives each one). The
activation count per decoder layer is the list of tensors autograd saves in transformers'
LlamaDecoderLayer (exact for the configurations in tests/test_plan.py); the head terms follow
csplade.model.head; cross-device negatives follow CSPLADE (arXiv 2504.10816): every GPU gathers
every GPU's document vectors, dense.

Known limits: parts are added as if they peaked together (errs high by at most the smaller of the
states and the activations); BERT-family activations use a coarser count; autocast over float32
weights saves some float32 tensors counted here at 16 bits; communication buffers and the CUDA
overhead are rough constants.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from csplade.model.head import default_chunk_size
from csplade.plan.architecture import Architecture
from csplade.plan.cluster import Cluster
from csplade.plan.sizes import Counts, Precision, lora_targets, scored_positions
from csplade.plan.workload import Workload
from csplade.training.arguments import ModelArguments

GIB = 1024**3
# CUDA context (~0.6 GiB on H100), cuBLAS/NCCL workspaces and communicators (~0.7 GiB), allocator slack.
CUDA_OVERHEAD_BYTES = 2 * GIB
# CPU runs: kernel libraries' buffers allocated once on the first forward (~35 MiB, the same for 8 to
# 64 sequences of 48 to 96 tokens in benchmarks/plan_validation.py's tiny Llama) plus the Trainer, its
# data loader and the tokenized batch (~30 MiB).
CPU_OVERHEAD_BYTES = 64 * 1024**2
DEEPSPEED_ALLGATHER_BUCKET = 5e8  # elements; DeepSpeed's default allgather_bucket_size (ZeRO-1/2)


@dataclass(frozen=True)
class Part:
    name: str
    bytes: float
    detail: str


def memory_parts(
    arch: Architecture,
    workload: Workload,
    cluster: Cluster,
    prec: Precision,
    counts: Counts,
    calls: list[tuple[int, int]],
    checkpointing: bool,
    device: str,
    notes: list[str],
) -> tuple[list[Part], float]:
    """Every part of the memory per GPU, and the bytes offloaded to CPU RAM; appends its notes."""
    parts, cpu_bytes = _state_parts(arch, workload, cluster, prec, counts, notes)
    parts.append(_working_copies(arch, workload, cluster, prec, counts, checkpointing))
    activations, transients = _activations(arch, workload, prec, calls, checkpointing, device)
    head, head_transient = _head(arch, workload, cluster, prec, calls, counts, notes)
    loss, loss_transients = _loss(arch, workload, cluster)
    # backward transients come one set at a time: only the largest is added
    transients = {**transients, "head temporaries": head_transient, **loss_transients}
    largest = max(transients, key=transients.get)
    parts += [
        activations,
        head,
        loss,
        Part("transient", transients[largest], f"largest backward transient: {largest}"),
        _comm(arch, workload, cluster, prec, counts),
    ]
    if device == "cuda":
        parts.append(Part("overhead", CUDA_OVERHEAD_BYTES, "CUDA context, workspaces, allocator"))
    else:
        parts.append(Part("overhead", CPU_OVERHEAD_BYTES, "first-forward buffers, Trainer, loader"))
    return parts, cpu_bytes


def _qbytes(mode: str, hidden: int) -> float:
    """Bytes per quantized weight, quantization constants included (docs/plan.md, "weights")."""
    if mode in ("nf4", "fp4"):
        return 0.5 + 1 / 64 + 4 / 16384  # 4 bits + 8-bit absmax per 64 + fp32 per 256 blocks
    return 1.0 + 4.0 / hidden  # int8 + one float32 scale per output row


def _state_parts(arch, workload, cluster, prec, counts, notes) -> tuple[list[Part], float]:
    """weights, lora, gradients, optimizer on the GPU; and the bytes offloaded to CPU."""
    model = workload.model
    cpu = 0.0
    param_shards = cluster.shards("params")
    if model.quantization != "none":
        quantized = arch.layers * arch.layer_matmul_params()
        weights = quantized * _qbytes(model.quantization, arch.hidden)
        weights += (counts.total - quantized) * prec.frozen
        detail = f"{quantized / 1e9:.2f} B params in {model.quantization}, the rest {prec.frozen} B"
        notes.append(
            f"{model.quantization} weights are not sharded (bitsandbytes' packed weights; see "
            "docs/plan.md)"
        )
    else:
        per = prec.frozen if model.use_lora else prec.trainable
        weights = counts.total * per / param_shards
        detail = f"{counts.total / 1e9:.3f} B params x {per} B"
        if param_shards > 1:
            detail += f" / {param_shards} GPUs"
    lora = counts.lora * prec.adapter / param_shards
    if cluster.offload_params:
        cpu += weights + lora
        weights = lora = 0.0
        detail += ", offloaded to CPU"
    train_bytes = prec.adapter if model.use_lora else prec.trainable
    grad_shards = cluster.shards("grads")
    grads = counts.trainable * train_bytes / grad_shards
    grad_detail = f"{counts.trainable / 1e6:.1f} M trainable x {train_bytes} B"
    if grad_shards > 1:
        grad_detail += f" / {grad_shards}"
    optim_shards = cluster.shards("optim")
    optim = counts.trainable * prec.optim_per_param / optim_shards
    optim_detail = f"{counts.trainable / 1e6:.1f} M trainable x {prec.optim_per_param:g} B"
    if optim_shards > 1:
        optim_detail += f" / {optim_shards}"
    if cluster.offload_optimizer:
        cpu += optim
        optim = 0.0
        optim_detail += ", offloaded to CPU"
        if cluster.fsdp:  # FSDP's CPU offload keeps the gradients there too
            cpu += grads
            grads = 0.0
            grad_detail += ", offloaded to CPU"
    lora_detail = f"{counts.lora / 1e6:.2f} M params, r={model.lora_r}" if model.use_lora else ""
    return [
        Part("weights", weights, detail),
        Part("lora", lora, lora_detail or "no LoRA"),
        Part("gradients", grads, grad_detail),
        Part("optimizer", optim, optim_detail),
    ], cpu


def _working_copies(arch, workload, cluster, prec, counts, checkpointing) -> Part:
    """Weights materialised on top of the stored ones: gathered shards or autocast's copies."""
    quantized = workload.model.quantization != "none"
    layer = arch.layer_params() * prec.compute
    if cluster.deepspeed and cluster.zero_stage == 3 and not quantized:
        size = arch.vocab * arch.hidden * prec.compute + layer
        return Part("working_copies", size, "gathered LM head + one decoder layer (ZeRO-3)")
    if cluster.fsdp and cluster.fsdp_sharding != "NO_SHARD" and not quantized:
        root = (arch.embedding_params() + arch.head_params()) * prec.compute
        if cluster.fsdp_sharding in ("SHARD_GRAD_OP", "HYBRID_SHARD_ZERO2"):
            size = root + arch.layers * layer
            return Part("working_copies", size, "every unit stays gathered after the forward")
        return Part("working_copies", root + 2 * layer, "FSDP root unit + two decoder layers")
    if prec.autocast_copies:
        layer_matmul = arch.layer_matmul_params()
        if checkpointing:  # cached copies of trainable weights + one recomputed layer's frozen ones
            size = 2.0 * (min(counts.trainable_matmul, arch.layers * layer_matmul) + layer_matmul)
            if workload.model.use_lora:
                size = 2.0 * layer_matmul
        else:
            size = 2.0 * arch.layers * layer_matmul
        return Part("working_copies", size, "autocast's 16-bit copies of float32 linear weights")
    return Part("working_copies", 0.0, "none")


def layer_activation_bytes(
    arch: Architecture,
    workload: Workload,
    prec: Precision,
    seq_len: int,
    device: str,
) -> float:
    """Bytes autograd saves per token in one decoder layer (docs/plan.md, "activations")."""
    model = workload.model
    a, h, inter = prec.act, arch.hidden, arch.intermediate
    full = not model.use_lora
    targets = lora_targets(arch, model) if model.use_lora else {}
    mask_bytes = 1 if device == "cuda" else prec.adapter
    if arch.family == "bert":
        # q/k/v input, q, k, v, attention output, two LayerNorm inputs (+ their statistics), the MLP
        # input, GELU input and output; two hidden dropout masks; logsumexp and the padding mask.
        per = a * (8 * h + 2 * inter) + mask_bytes * 2 * h + 16 + 4 * arch.heads + a * seq_len
        if model.use_lora:
            per += _lora_activation_bytes(targets, model, prec, a, mask_bytes)
        return per
    per = 2 * (4 * h + 4 + (a * h if full else 0))  # two RMSNorms: float32 input, rsqrt, x_hat
    flash = (model.attn_implementation or "sdpa").startswith("flash")
    kv = arch.kv_dim if flash else arch.q_dim  # repeat_kv under a padding mask
    per += a * (2 * arch.q_dim + 2 * kv)  # q, k, v after RoPE; attention output
    if model.attn_implementation == "eager":
        per += 4 * arch.heads * seq_len + (a * arch.heads * seq_len if a != 4 else 0)
    else:
        per += 4 * arch.heads  # logsumexp
    if not flash:
        per += a * seq_len  # the (B, 1, L, L) mask
    per += a * 3 * inter  # gate, SiLU(gate), up
    groups = {
        "qkv": (("q_proj", "k_proj", "v_proj"), h),
        "gate_up": (("gate_proj", "up_proj"), h),
        "down": (("down_proj",), inter),
    }
    shares_input = prec.adapter == a and model.lora_dropout == 0
    for names, width in groups.values():
        if full or (shares_input and any(n in targets for n in names)):
            per += a * width
    if model.use_lora:
        per += _lora_activation_bytes(targets, model, prec, a, mask_bytes)
    return per


def _lora_activation_bytes(
    targets, model: ModelArguments, prec: Precision, a: int, mask_bytes: int
) -> float:
    """Per token: each adapter's A output, and its own copy of the input if cast or dropped out."""
    per = 0.0
    for dims in targets.values():
        for fan_in, _ in dims:
            per += model.lora_r * prec.adapter  # A's output
            if model.lora_dropout > 0:
                per += fan_in * (prec.adapter + mask_bytes)
            elif prec.adapter != a:
                per += fan_in * prec.adapter  # the input cast to the adapter's dtype
    return per


def _activations(
    arch, workload, prec, calls, checkpointing, device
) -> tuple[Part, dict[str, float]]:
    """Saved backbone activations, and the backward transients they bring."""
    model, a = workload.model, prec.act
    tokens = sum(n * length for n, length in calls)
    longest = max(calls, key=lambda c: c[0] * c[1])
    # final norm (+ its trainable weight's x_hat), its output (the head's input), token ids
    outside = 4 * arch.hidden + 4 + a * arch.hidden
    if not model.use_lora:
        outside += a * arch.hidden + 8
    per_layer = {
        length: layer_activation_bytes(arch, workload, prec, length, device) for _, length in calls
    }
    layer_grads = longest[0] * longest[1] * (3 * arch.intermediate + 2 * arch.hidden) * a
    transients = {"one layer's gradients": layer_grads}
    if checkpointing:
        saved = tokens * (arch.layers * a * arch.hidden + outside)
        recomputed = longest[0] * longest[1] * per_layer[longest[1]]
        transients["one recomputed layer + its gradients"] = recomputed + layer_grads
        detail = "checkpointed: each layer's input"
    else:
        saved = sum(n * length * (arch.layers * per_layer[length] + outside) for n, length in calls)
        detail = f"{per_layer[longest[1]] / 1024:.1f} KiB per token per layer"
    return Part("activations", saved, detail), transients


def _head_bytes(
    arch: Architecture,
    model: ModelArguments,
    prec: Precision,
    rows: int,
    length: int,
    trainable: bool,
) -> tuple[float, float]:
    """(saved, transient) bytes of one sparse-head call on `rows` sequences of `length` tokens."""
    a, h, v = prec.act, arch.hidden, arch.vocab
    if not model.fused_head:
        cells = rows * length * v  # (B, L, V)
        saved = (8.0 if model.pooling == "max" else 4.0) * cells + 4.0 * rows * v
        return saved, 8.0 * cells
    chunk = min(model.head_chunk_size or default_chunk_size(rows, length, h, v), v)
    if model.pooling == "max":
        saved = 16.0 * rows * v  # argmax int64 + ReLU output + the (B, V) result
        forward = a * rows * length * h + a * rows * chunk * length + 12.0 * rows * chunk
        backward = (
            20.0 * rows * v  # grad, masked grad, grad of the maxima, row indices (int64)
            + 4.0 * rows * length * h  # grad_hidden (float32)
            + 4.0 * rows * chunk * h  # one (B, C, H) chunk: grad contribution, then winners
            + (a * rows * length * h if trainable else 0.0)  # hidden rows for the weight grad
        )
        return saved, max(forward, backward)
    saved = 4.0 * rows * v
    transient = a * rows * length * h + 4.0 * rows * length * h + (4.0 + a) * rows * length * chunk
    return saved, transient


def head_path(workload: Workload) -> str:
    """The sparse head `csplade train` runs, by the names ``SparseEncoder.head_calls`` counts.

    "fused" unless the recipe sets ``fused_head: false`` ("naive"). The engine does not change it:
    under ZeRO-3 and FSDP2 the engines gather the LM-head weight for the fused head themselves
    (csplade.model.head.sharded.HeadCall), tied or not, frozen or trained. The module head
    ("module", (B, L, V) like the naive one) needs an LM head without a plain weight, which training
    never has: QLoRA leaves the LM head unquantized (bitsandbytes skips it).
    """
    return "fused" if workload.model.fused_head else "naive"


def _head(arch, workload, cluster, prec, calls, counts, notes) -> tuple[Part, float]:
    """The sparse head (or the adaptation's LM head): saved bytes, and its largest transient."""
    model, a = workload.model, prec.act
    if workload.phase == "adapt":
        scored = scored_positions(workload)
        cells = scored * arch.vocab
        # logits (compute dtype) + float32 copy + float32 log-softmax, and for L_ReLU the float32
        # activations and their log-softmax
        saved = cells * (a + (4 if a != 4 else 0) + 4) + cells * 8
        transient = cells * (4 + a) + cells * 4  # float32 and compute-dtype gradients
        detail = f"LM head at {scored} scored positions ({workload.adapt_objective})"
    else:
        path = head_path(workload)
        model = dataclasses.replace(model, fused_head=path == "fused")
        saved = transient = 0.0
        for rows, length in calls:
            s, t = _head_bytes(arch, model, prec, rows, length, counts.head_trainable)
            saved += s
            transient = max(transient, t)
        if counts.head_trainable and cluster.shards("grads") > 1:
            # the head weight's whole (V, H) gradient, before the engine reduce-scatters it
            transient += arch.vocab * arch.hidden * prec.compute
        detail = f"{path} {model.pooling} head"
    if workload.model.use_lora and workload.model.lora_lm_head:
        saved += 2.0 * arch.vocab * arch.hidden * prec.adapter
        detail += " + folded LoRA head weight"
    return Part("head", saved, detail), transient


def _loss(arch, workload, cluster) -> tuple[Part, dict[str, float]]:
    """Cross-device negatives and the FLOPS regularizer's gathers (W > 1)."""
    world = cluster.world
    if workload.phase != "train" or world == 1:
        return Part("loss", 0.0, "none"), {}
    flops_gather = 2 * world * arch.vocab * 4.0  # q and d column sums, (W, V) float32 each
    saved, transients = flops_gather, {"FLOPS all-gather gradient": flops_gather}
    detail = "FLOPS all-gather"
    if workload.cross_device_negatives:
        docs = world * workload.batch_size * workload.group_size
        saved += docs * arch.vocab * 4.0
        transients["gathered doc vectors' gradient"] = docs * arch.vocab * 4.0
        detail = f"{docs} gathered doc vectors (cross-device negatives) + FLOPS all-gather"
    return Part("loss", saved, detail), transients


def _comm(arch, workload, cluster, prec, counts) -> Part:
    """Communication buckets (rough; docs/plan.md, "comm_buffers")."""
    if cluster.world == 1:
        return Part("comm_buffers", 0.0, "none")
    train_bytes = prec.adapter if workload.model.use_lora else prec.trainable
    trainable = counts.trainable
    if cluster.deepspeed and cluster.zero_stage in (1, 2):
        buckets = 2 * min(arch.hidden**2, trainable) + min(DEEPSPEED_ALLGATHER_BUCKET, trainable)
        return Part("comm_buffers", buckets * train_bytes, "reduce + all-gather buckets")
    if cluster.deepspeed and cluster.zero_stage == 3:
        return Part(
            "comm_buffers", 2 * min(arch.hidden**2, trainable) * train_bytes, "reduce buckets"
        )
    if cluster.fsdp:
        per_layer = trainable / arch.layers if workload.model.use_lora else arch.layer_params()
        return Part("comm_buffers", 2 * per_layer * 4.0, "one layer's unsharded gradients x2")
    what = "gradient all-reduce buffer" if cluster.deepspeed else "DDP gradient buckets"
    return Part("comm_buffers", trainable * train_bytes, what)
