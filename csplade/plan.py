"""`csplade plan`: will a training recipe fit on the GPUs, and how long will it take?

Reads a recipe (training or adaptation), an accelerate config (DDP, DeepSpeed ZeRO, FSDP) and the GPU
size, and returns a per-GPU memory breakdown, a time estimate and a verdict with the knobs that would make
a run fit. Nothing is loaded onto a device and nothing is downloaded: the architecture numbers come from a
local ``config.json`` or from a small built-in table.

Why. An 8B-parameter sparse encoder on 128 GPUs costs an hour of queueing to find out it runs out of
memory at step 1. The terms that decide it for SPLADE on LLMs (CSPLADE, arXiv 2504.10816) are not those
of a language model: each step encodes ``B`` queries and ``B * group_size`` documents (echo doubles both),
the vocabulary head is max-pooled over every token (``(B, L, V)`` logits with the naive head, V = 128,256
for Llama-3), and cross-device negatives gather every GPU's document vectors, dense, onto every GPU.

Architecture (where the numbers come from)
    1. ``--architecture`` when given (a table key or a folder);
    2. a local folder (``model_name_or_path`` itself; for a csplade adapter folder, its ``base_model``):
       its ``config.json``;
    3. a packaged model (csplade.backbones) already prepared in the cache: its ``config.json``
       (never prepared here: that builds weights);
    4. a hub id whose ``config.json`` is already in the local Hugging Face cache (never fetched);
    5. :data:`KNOWN_ARCHITECTURES`, a table of the backbones csplade's recipes name, copied from each
       model's published ``config.json`` on the Hugging Face hub (hidden_size, num_hidden_layers,
       num_attention_heads, num_key_value_heads, intermediate_size, vocab_size, tie_word_embeddings);
    6. a table entry whose short name appears in the path (``runs/llama-3.1-8b/adapt-mntp`` →
       Llama-3.1-8B), reported as a guess.

Memory model (bytes per GPU; every part below is one entry of the breakdown, and the total is their sum)
    Notation: P parameters, W GPUs (processes), a = activation bytes (2 under bf16/fp16, else 4),
    T = tokens of one micro-batch on one GPU, H hidden, I intermediate, V vocabulary, r LoRA rank.

    weights
        Base weights at their storage dtype: the recipe's ``model_dtype``; under DeepSpeed with mixed
        precision the engine casts the module to 16 bits (2 bytes); QLoRA: the decoder's linear layers
        in 4 bits plus quantization constants (nf4/fp4 with double quantization: 0.5 + 1/64 + 4/16384
        bytes per parameter; int8: 1 byte + one float32 scale per output row), the rest (embeddings,
        norms, LM head) cast to float32 by peft's ``prepare_model_for_kbit_training``. Under full
        fine-tuning with FSDP and mixed precision accelerate upcasts trainable weights to float32.
        Divided by W under ZeRO-3 and FSDP (FULL_SHARD / SHARD_GRAD_OP; HYBRID_SHARD: by the GPUs of a
        node); 4-bit weights stay whole (bitsandbytes' packed weights are not sharded without a float
        ``bnb_4bit_quant_storage``, which csplade does not set).
    lora
        Adapter parameters, counted per targeted linear layer as ``r * (in + out)`` (targets absent from
        the architecture are skipped, as csplade.lora does). float32 (peft casts 16-bit adapters up),
        2 bytes under DeepSpeed mixed precision; sharded like the weights.
    gradients
        Trainable parameters only, in the trainable weights' dtype. Divided by W under ZeRO-2/3 and FSDP.
    optimizer
        AdamW: m and v. Under DeepSpeed, ZeRO's 12 bytes per trainable parameter (float32 master copy +
        m + v; the step briefly adds a float32 gradient partition, not counted); otherwise two states in
        the trainable weights' dtype (8 bytes for float32, 4 for pure-bf16 weights, which then have no
        master copy); 8-bit optimizers (``optim`` containing ``8bit``): 2 bytes. Divided by W under
        ZeRO-1/2/3 and FSDP. Offloaded (``offload_optimizer_device``, ``fsdp_offload_params``): 0 on the
        GPU, reported as CPU memory.
    working_copies
        Weights materialised on top of the stored ones: under ZeRO-3, the gathered LM head (the fused
        head gathers it whole) plus one gathered decoder layer in flight; under FSDP the root unit
        (embeddings, final norm, head: gathered for the whole step) plus two decoder layers (current and
        prefetched), in the compute dtype; SHARD_GRAD_OP keeps every layer gathered after the forward.
        Without DeepSpeed/FSDP, autocast over float32 weights keeps 16-bit copies of the decoder's
        linear weights (cached for trainable ones, saved for backward for frozen ones).
    activations
        What autograd saves in the backbone, per decoder layer and token (Llama-style block: RMSNorm,
        attention, gated MLP), derived by listing the tensors autograd saves in transformers'
        LlamaDecoderLayer (torch.autograd.graph.saved_tensors_hooks; exact for the configurations in
        tests/test_plan.py):
            2 norms x (4H + 4 [float32 input, rsqrt] + aH if the norm weight trains)
            + a(qd + kd + vd + qd) [q, k, v after RoPE, attention output]; k, v repeated to all heads
              (kd = vd = qd) whenever a padding mask is passed to sdpa or eager (GQA stays native only
              with flash_attention_2), + aL for the (B, 1, L, L) mask, + 4 heads [logsumexp];
              eager adds the float32 softmax (4 heads L, plus a 16-bit copy under bf16)
            + a * 3I [gate, SiLU(gate), up]
            + the input of each group of linear layers (norm output H before q/k/v and before gate/up,
              the MLP product I before down) when something keeps it: a trainable weight, or a LoRA
              adapter reading it as is
            + per LoRA target: its A output (r), and, when the adapter's dtype differs from the
              activations or ``lora_dropout`` > 0, its own copy of the input (cast or dropped out), plus
              the dropout mask (1 byte on CUDA, the adapter's dtype on CPU, where torch keeps a noise
              tensor).
        Plus per token outside the layers: the final norm (4H + 4 [+ aH]), its output (the head's input,
        aH) and the token ids (8 bytes when the embedding trains). With gradient checkpointing each layer
        keeps only its input (aH per token). Queries (B sequences) and documents (B x group_size
        sequences) are encoded in two calls whose activations are all alive at the loss; sequence lengths
        are the recipe's maxima plus the special tokens the tokenizer adds (probed from a local
        tokenizer; else 1 for causal backbones, 2 for BERT-likes) and an estimated prefix (4 characters
        per token); echo doubles the text and prefix.
    head
        What the sparse head (csplade.head) keeps for backward, per call of n sequences of length L:
        fused max: the (n, V) argmax (int64) + two float32 (n, V) vectors; fused sum: the (n, V) output;
        naive (``fused_head: false``, or the module head ZeRO-3 falls back to for a trainable head): the
        ReLU output and the masked activations, (n, L, V) float32 each. Adaptation phase: the LM head at
        the N scored positions (CLM: all but the last token; MNTP: ``mask_ratio`` of them): (N, V) logits
        in the compute dtype + float32 copy + float32 log-softmax, + the top-k of the activation loss.
        ``lora_lm_head`` folds the adapter into the head weight: two (V, H) adapter-dtype tensors.
    loss
        Cross-device negatives (W > 1): every GPU gathers all W x B x group_size document vectors,
        dense float32 (V wide), kept for the scores' backward; the FLOPS regularizer's all-gather of
        per-column sums, (W, V) float32 for queries and documents.
    transient
        Short-lived buffers of the backward come one set at a time, so only the largest is added:
        one layer's gradients, (3I + 2H)a per token of the longest call; with checkpointing, one
        recomputed layer's full activations plus those gradients; the head's temporaries (fused max:
        the larger of the forward's (n, L, H) copy + (n, C, L) logits chunk and the backward's four
        (n, V) buffers + float32 (n, L, H) gradient + one (n, C, H) chunk; fused sum: (n, L, H) copy
        + float32 gradient + (n, L, C) chunk; naive: two (n, L, V) float32 gradients; adaptation:
        float32 and compute-dtype (N, V) gradients); the gathered documents' gradient (all-reduced copy).
    comm_buffers
        Rough: DDP's gradient buckets (a copy of the trainable gradients); ZeRO-1/2: two reduce buckets
        of min(H^2, trainable) gradients + one all-gather bucket of min(5e8, trainable) parameters;
        ZeRO-3: two reduce buckets; FSDP: one decoder layer's unsharded gradients, twice.
    overhead
        CUDA context, cuBLAS/NCCL workspaces and caching-allocator slack: a constant
        (:data:`CUDA_OVERHEAD_BYTES`, 2 GiB, rough). ``device="cpu"`` plans a CPU run instead: no CUDA
        context, but a measured constant (:data:`CPU_OVERHEAD_BYTES`) for the buffers kernel libraries
        allocate on the first forward and for the Trainer and its data loader.

    Parts are added as if they peaked together: gradients and optimizer states are counted next to
    the activations, which errs high (gradients fill up while activations drain in backward, and the
    optimizer step runs when activations are gone), by at most the smaller of the two.

Validation. The activation formula matches the bytes autograd saves in transformers' Llama decoder
layer exactly (fp32/bf16, sdpa/eager, full fine-tuning and LoRA with and without dropout;
tests/test_plan.py). Whole-run predictions (``device="cpu"``) are compared with the measured peak RSS of
real CPU training runs (tiny Llama and SmolLM2-135M, full fine-tuning and LoRA) by
benchmarks/plan_validation.py; the GPU-only terms (ZeRO/FSDP buffers, CUDA overhead, bool dropout
masks, flash kernels) are not measured here.

Time model
    FLOPs of one micro-step on one GPU, per token through the decoder: forward 2 x (matmul parameters)
    + attention (4 L qd per layer: QK^T and AV, full length, no causal skipping); backward through every
    layer for the input gradients, frozen or not, 2 x matmul parameters + 2 x attention; weight gradients
    2 x (trainable matmul parameters) only. Full fine-tuning is therefore 6 P per token; LoRA is ~4 P
    (forward + input gradients) + 6 x (adapter parameters). Gradient checkpointing adds one more forward.
    Head: 2 H V per token forward; backward 2 H V per token for the naive and sum heads (+2 H V when the
    head trains; the sum head also recomputes its logits), 2 H V per *sequence* (+2 H V when it trains)
    for the fused max head (one position per term). Adaptation: 2 H V forward and 2 H V backward per
    scored position. Time = FLOPs / (TFLOPS x MFU). Tokens per epoch = examples x (L_q + group_size x L_d)
    (x L for adaptation), examples from ``--num-queries`` or counted from a local data set.

Known limits: BERT-family activations use a coarser per-layer count (LayerNorm, GELU MLP, dropout masks)
than the Llama-style one, assuming CUDA's attention kernels (on CPU, attention dropout falls back to a
kernel that also keeps (B, heads, L, L) probabilities, not counted); Gemma/Qwen3 extra norms are not counted; autocast over float32 weights saves
some float32 tensors this model counts at 16 bits; offloading's transfer time is not in the time estimate;
sequence lengths are the recipe's maxima (batches padded to their longest text are shorter), and every
batch is assumed padded (so sdpa gets a mask and GQA's k, v are repeated); DeepSpeed's activation
checkpointing settings are not read (only the recipe's and FSDP's).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from csplade.configs import (
    AdaptationArguments,
    CspladeTrainingArguments,
    DataArguments,
    ModelArguments,
    SparsityArguments,
    parse_recipe,
)

logger = logging.getLogger(__name__)

GIB = 1024**3
# CUDA context (~0.6 GiB on H100), cuBLAS/NCCL workspaces and communicators (~0.7 GiB), allocator slack.
CUDA_OVERHEAD_BYTES = 2 * GIB
# CPU runs: kernel libraries' buffers allocated once on the first forward (~35 MiB, the same for 8 to
# 64 sequences of 48 to 96 tokens in benchmarks/plan_validation.py's tiny Llama) plus the Trainer, its
# data loader and the tokenized batch (~30 MiB).
CPU_OVERHEAD_BYTES = 64 * 1024**2
# A run whose estimate exceeds this fraction of the GPU is called tight.
TIGHT_FRACTION = 0.9
DEEPSPEED_ALLGATHER_BUCKET = 5e8  # elements; DeepSpeed's default allgather_bucket_size (ZeRO-1/2)
DEVICES = ("cuda", "cpu")
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_BERT_FAMILY = ("bert", "distilbert", "roberta", "xlm-roberta", "electra", "camembert")


# ------------------------------------------------------------------------------------------------
# Architecture
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Architecture:
    """The numbers of a backbone that memory and FLOPs depend on."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    head_dim: int | None = None
    # llama: RMSNorm, gated MLP, no biases | bert: LayerNorm, GELU MLP, biases
    family: str = "llama"
    attention_bias: str = ""  # "" | "qkv" (Qwen2) | "qkvo" (Llama's attention_bias)
    mlp_bias: bool = False
    max_positions: int = 512  # BERT's learned position embeddings
    special_tokens: int | None = None  # added around a text by the tokenizer (None: by family)
    name: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        for key in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"architecture {self.name!r}: {key} must be a positive int, got {value!r}"
                )
        if self.family not in ("llama", "bert"):
            raise ValueError(f"architecture {self.name!r}: unknown family {self.family!r}")
        if self.attention_bias not in ("", "qkv", "qkvo"):
            raise ValueError(
                f"architecture {self.name!r}: attention_bias must be '', 'qkv' or 'qkvo', "
                f"got {self.attention_bias!r}"
            )
        if self.heads % self.kv_heads:
            raise ValueError(
                f"architecture {self.name!r}: {self.heads} heads is not a multiple of "
                f"{self.kv_heads} key/value heads"
            )

    @property
    def specials(self) -> int:
        """Special tokens around one text: probed from a local tokenizer, else BOS / [CLS] [SEP]."""
        if self.special_tokens is not None:
            return self.special_tokens
        return 2 if self.family == "bert" else 1

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        return self.heads * self.dim_per_head

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.dim_per_head

    def linears(self) -> dict[str, list[tuple[int, int]]]:
        """Linear layers of one decoder block by module name: [(in_features, out_features), …]."""
        h, i = self.hidden, self.intermediate
        if self.family == "bert":
            return {
                "query": [(h, h)],
                "key": [(h, h)],
                "value": [(h, h)],
                # attention.output.dense, intermediate.dense, output.dense
                "dense": [(h, h), (h, i), (i, h)],
            }
        return {
            "q_proj": [(h, self.q_dim)],
            "k_proj": [(h, self.kv_dim)],
            "v_proj": [(h, self.kv_dim)],
            "o_proj": [(self.q_dim, h)],
            "gate_proj": [(h, i)],
            "up_proj": [(h, i)],
            "down_proj": [(i, h)],
        }

    def layer_matmul_params(self) -> int:
        return sum(a * b for dims in self.linears().values() for a, b in dims)

    def layer_other_params(self) -> int:
        """Norms and biases of one block."""
        h, i = self.hidden, self.intermediate
        if self.family == "bert":
            return 9 * h + i  # biases of q, k, v, o, intermediate, output; two LayerNorms
        bias = {
            "": 0,
            "qkv": self.q_dim + 2 * self.kv_dim,
            "qkvo": self.q_dim + 2 * self.kv_dim + h,
        }
        mlp = 2 * i + h if self.mlp_bias else 0
        return 2 * h + bias[self.attention_bias] + mlp

    def layer_params(self) -> int:
        return self.layer_matmul_params() + self.layer_other_params()

    def embedding_params(self) -> int:
        extra = (
            (self.max_positions + 2) * self.hidden + 2 * self.hidden if self.family == "bert" else 0
        )
        return self.vocab * self.hidden + extra

    def head_params(self) -> int:
        """Parameters of the LM head not shared with the embeddings (incl. BERT's MLM transform)."""
        head = 0 if self.tied else self.vocab * self.hidden
        if self.family == "bert":
            head += self.hidden * self.hidden + 3 * self.hidden + self.vocab  # transform, LN, bias
        return head

    def total_params(self) -> int:
        final_norm = self.hidden if self.family == "llama" else 0
        return (
            self.embedding_params()
            + self.layers * self.layer_params()
            + final_norm
            + self.head_params()
        )


# From each model's published config.json on the Hugging Face hub (see the module docstring):
# name, hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, intermediate_size,
# vocab_size, tie_word_embeddings, then what differs from a plain Llama block.
_BERT = {"family": "bert"}
_TABLE: tuple[tuple[Any, ...], ...] = (
    ("meta-llama/Llama-3.1-8B", 4096, 32, 32, 8, 14336, 128256, False, {}),
    ("meta-llama/Llama-3.1-8B-Instruct", 4096, 32, 32, 8, 14336, 128256, False, {}),
    ("meta-llama/Meta-Llama-3-8B", 4096, 32, 32, 8, 14336, 128256, False, {}),
    ("meta-llama/Llama-3.2-1B", 2048, 16, 32, 8, 8192, 128256, True, {}),
    ("meta-llama/Llama-3.2-3B", 3072, 28, 24, 8, 8192, 128256, True, {}),
    ("mistralai/Mistral-7B-v0.1", 4096, 32, 32, 8, 14336, 32000, False, {}),
    ("mistralai/Mistral-7B-v0.3", 4096, 32, 32, 8, 14336, 32768, False, {}),
    ("Qwen/Qwen2.5-7B", 3584, 28, 28, 4, 18944, 152064, False, {"attention_bias": "qkv"}),
    ("HuggingFaceTB/SmolLM2-135M", 576, 30, 9, 3, 1536, 49152, True, {"special_tokens": 0}),
    ("HuggingFaceTB/SmolLM2-360M", 960, 32, 15, 5, 2560, 49152, True, {"special_tokens": 0}),
    ("bert-base-uncased", 768, 12, 12, 12, 3072, 30522, True, _BERT),
    ("naver/splade-cocondenser-ensembledistil", 768, 12, 12, 12, 3072, 30522, True, _BERT),
)
KNOWN_ARCHITECTURES: dict[str, Architecture] = {
    row[0].lower(): Architecture(*row[1:8], name=row[0], **row[8]) for row in _TABLE
}
# Packaged csplade names (csplade.backbones) and short names found in run folders -> table entries.
_ALIASES = {
    "smollm2-135m": "huggingfacetb/smollm2-135m",
    "smollm2-360m": "huggingfacetb/smollm2-360m",
    "llama-3.1-8b": "meta-llama/llama-3.1-8b",
    "llama-3-8b": "meta-llama/meta-llama-3-8b",
    "llama-3.2-1b": "meta-llama/llama-3.2-1b",
    "llama-3.2-3b": "meta-llama/llama-3.2-3b",
    "mistral-7b-v0.1": "mistralai/mistral-7b-v0.1",
    "mistral-7b": "mistralai/mistral-7b-v0.3",
    "qwen2.5-7b": "qwen/qwen2.5-7b",
    "splade-cocondenser": "naver/splade-cocondenser-ensembledistil",
    "bert-base": "bert-base-uncased",
}


def architecture_from_config(
    config: dict[str, Any], name: str = "", source: str = ""
) -> Architecture:
    """An :class:`Architecture` from a Hugging Face ``config.json`` dict (text config if nested)."""
    cfg = config.get("text_config") or config
    model_type = str(cfg.get("model_type") or config.get("model_type") or "")
    family = "bert" if model_type in _BERT_FAMILY else "llama"
    where = source or name or "config"
    try:
        hidden = int(cfg.get("hidden_size") or cfg["dim"])
        heads = int(cfg.get("num_attention_heads") or cfg["n_heads"])
        layers = int(cfg.get("num_hidden_layers") or cfg["n_layers"])
        vocab = int(cfg["vocab_size"])
        inter = int(cfg.get("intermediate_size") or cfg.get("hidden_dim") or 4 * hidden)
    except KeyError as exc:
        raise ValueError(
            f"{where}: config has no {exc.args[0]!r}; cannot plan this backbone"
        ) from None
    kv = int(cfg.get("num_key_value_heads") or heads)
    tied = cfg.get("tie_word_embeddings", config.get("tie_word_embeddings"))
    if tied is None:
        tied = family == "bert"
    if family == "llama" and model_type not in ("llama", "mistral", "qwen2", ""):
        logger.info("%s: model type %r planned as a Llama-style block", where, model_type)
    return Architecture(
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv,
        intermediate=inter,
        vocab=vocab,
        tied=bool(tied),
        head_dim=int(cfg["head_dim"]) if cfg.get("head_dim") else None,
        family=family,
        attention_bias="qkv"
        if model_type == "qwen2"
        else ("qkvo" if cfg.get("attention_bias") else ""),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        max_positions=int(cfg.get("max_position_embeddings") or 512),
        name=name,
        source=source,
    )


def _probe_specials(folder: Path) -> int | None:
    """How many special tokens the folder's tokenizer adds around a text (None without one)."""
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        full = tokenizer("a b", add_special_tokens=True)["input_ids"]
        plain = tokenizer("a b", add_special_tokens=False)["input_ids"]
    except Exception as exc:  # noqa: BLE001 - an unreadable tokenizer only loses this refinement
        logger.debug("%s: tokenizer not probed (%s)", folder, exc)
        return None
    return max(len(full) - len(plain), 0)


def _read_config_json(path: Path, name: str) -> Architecture:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    arch = architecture_from_config(data, name=name, source=str(path))
    return dataclasses.replace(arch, special_tokens=_probe_specials(path.parent))


def _from_folder(folder: Path, name: str, seen: set[Path]) -> Architecture | None:
    """config.json of a local model folder, following a csplade adapter folder to its base model."""
    from csplade.modeling import CONFIG_NAME

    if folder.resolve() in seen:
        raise ValueError(f"{folder}: adapter base_model chain loops back to itself")
    seen.add(folder.resolve())
    encoder_config = folder / CONFIG_NAME
    if encoder_config.is_file():
        try:
            settings = json.loads(encoder_config.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{encoder_config}: invalid JSON ({exc})") from exc
        if settings.get("adapter") and settings.get("base_model"):
            return _resolve(str(settings["base_model"]), seen)
    if (folder / "config.json").is_file():
        return _read_config_json(folder / "config.json", name)
    return None


def _resolve(name_or_path: str, seen: set[Path]) -> Architecture | None:
    from csplade.backbones import PACKAGED_MODELS, cache_dir

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        found = _from_folder(path, name_or_path, seen)
        if found is not None:
            return found
    if name_or_path in PACKAGED_MODELS:
        prepared = cache_dir() / "backbones" / name_or_path / "config.json"
        if prepared.is_file():
            return _read_config_json(prepared, name_or_path)
    key = name_or_path.lower()
    key = _ALIASES.get(key, key)
    if key in KNOWN_ARCHITECTURES:
        arch = KNOWN_ARCHITECTURES[key]
        return dataclasses.replace(
            arch, source="built-in table (the model's published config.json)"
        )
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name_or_path):
        try:  # the local hub cache only: never a download
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name_or_path, "config.json")
        except Exception:  # noqa: BLE001 - an unusable cache is the same as no cache here
            cached = None
        if isinstance(cached, str) and Path(cached).is_file():
            return _read_config_json(Path(cached), name_or_path)
    return None


def resolve_architecture(model_name_or_path: str, override: str | None = None) -> Architecture:
    """The architecture of a recipe's backbone, from local files or the built-in table (module docs)."""
    if override:
        arch = _resolve(override, set())
        if arch is None:
            raise ValueError(
                f"--architecture {override!r}: not a local folder with config.json nor a known "
                f"architecture ({', '.join(a.name for a in KNOWN_ARCHITECTURES.values())})"
            )
        return arch
    arch = _resolve(str(model_name_or_path), set())
    if arch is not None:
        return arch
    lowered = str(model_name_or_path).lower()
    hits = [alias for alias in _ALIASES if alias in lowered]
    hits += [k for k in KNOWN_ARCHITECTURES if k.split("/")[-1] in lowered]
    if hits:
        best = max(hits, key=len)
        arch = KNOWN_ARCHITECTURES[_ALIASES.get(best, best)]
        return dataclasses.replace(
            arch,
            source=f"built-in table, guessed from the name {model_name_or_path!r} "
            "(pass --architecture to choose)",
        )
    raise ValueError(
        f"cannot tell the architecture of model_name_or_path {model_name_or_path!r}: not a local folder "
        "with config.json, not a prepared packaged model, not in the local hub cache, and not in the "
        f"built-in table ({', '.join(a.name for a in KNOWN_ARCHITECTURES.values())}); pass "
        "--architecture NAME_OR_FOLDER"
    )


# ------------------------------------------------------------------------------------------------
# Cluster (accelerate config)
# ------------------------------------------------------------------------------------------------
_FSDP_STRATEGIES = {
    "1": "FULL_SHARD",
    "2": "SHARD_GRAD_OP",
    "3": "NO_SHARD",
    "4": "HYBRID_SHARD",
    "5": "HYBRID_SHARD_ZERO2",
}


@dataclass(frozen=True)
class Cluster:
    """How the work is spread, from an accelerate config (plus --nodes / --gpus-per-node)."""

    distributed_type: str = "NO"  # NO | MULTI_GPU | DEEPSPEED | FSDP
    nodes: int = 1
    gpus_per_node: int = 1
    zero_stage: int = 0  # DeepSpeed only
    offload_optimizer: bool = False
    offload_params: bool = False
    fsdp_sharding: str = (
        ""  # FULL_SHARD | SHARD_GRAD_OP | NO_SHARD | HYBRID_SHARD | HYBRID_SHARD_ZERO2
    )
    activation_checkpointing: bool = False  # fsdp_activation_checkpointing
    mixed_precision: str = "no"
    source: str = ""

    def __post_init__(self) -> None:
        if self.distributed_type not in ("NO", "MULTI_GPU", "DEEPSPEED", "FSDP"):
            raise ValueError(f"unsupported distributed_type {self.distributed_type!r}")
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError(
                f"nodes and gpus_per_node must be >= 1, got {self.nodes}, {self.gpus_per_node}"
            )
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0..3, got {self.zero_stage}")
        if self.offload_params and not (
            (self.distributed_type == "DEEPSPEED" and self.zero_stage == 3)
            or self.distributed_type == "FSDP"
        ):
            raise ValueError("offloading parameters needs ZeRO-3 or FSDP")

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def deepspeed(self) -> bool:
        return self.distributed_type == "DEEPSPEED"

    @property
    def fsdp(self) -> bool:
        return self.distributed_type == "FSDP"

    def shards(self, what: str) -> int:
        """Over how many GPUs `what` ('params', 'grads', 'optim') is divided."""
        world = self.world
        if self.deepspeed:
            need = {"optim": 1, "grads": 2, "params": 3}[what]
            return world if self.zero_stage >= need else 1
        if self.fsdp:
            if self.fsdp_sharding == "NO_SHARD":
                return 1
            if self.fsdp_sharding.startswith("HYBRID"):
                return self.gpus_per_node
            return world
        return 1

    def describe(self) -> str:
        if self.deepspeed:
            how = f"DeepSpeed ZeRO-{self.zero_stage}"
            off = [
                n
                for n, on in (
                    ("optimizer", self.offload_optimizer),
                    ("params", self.offload_params),
                )
                if on
            ]
            if off:
                how += f" (offload {' + '.join(off)} to CPU)"
        elif self.fsdp:
            how = f"FSDP {self.fsdp_sharding}" + (
                " (offload to CPU)" if self.offload_params else ""
            )
        elif self.distributed_type == "MULTI_GPU":
            how = "DDP"
        else:
            how = "single process"
        return f"{self.nodes} x {self.gpus_per_node} GPUs, {how}"


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


def _offload(value: Any, key: str, where: str) -> bool:
    value = "none" if value is None else str(value).lower()
    if value not in ("none", "cpu", "nvme"):
        raise ValueError(f"{where}: {key}: expected none, cpu or nvme, got {value!r}")
    return value != "none"


def load_cluster(
    path: str | os.PathLike,
    nodes: int | None = None,
    gpus_per_node: int | None = None,
) -> Cluster:
    """Read an accelerate config YAML; --nodes / --gpus-per-node override its machine counts."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"accelerate config {path} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: invalid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: an accelerate config is a mapping of keys to values")
    where = str(path)
    dtype = str(data.get("distributed_type", "NO")).upper()
    if dtype == "MULTI_CPU":
        dtype = "MULTI_GPU"
    if dtype not in ("NO", "MULTI_GPU", "DEEPSPEED", "FSDP"):
        raise ValueError(
            f"{where}: distributed_type {dtype!r} is not planned (NO, MULTI_GPU, DEEPSPEED, FSDP)"
        )
    machines = int(data.get("num_machines", 1) or 1)
    processes = int(data.get("num_processes", 1) or 1)
    if processes % machines:
        raise ValueError(
            f"{where}: num_processes ({processes}) is the total over all machines and must be a "
            f"multiple of num_machines ({machines})"
        )
    n_nodes = nodes if nodes is not None else machines
    per_node = gpus_per_node if gpus_per_node is not None else processes // machines
    kwargs: dict[str, Any] = {}
    if dtype == "DEEPSPEED":
        ds = data.get("deepspeed_config") or {}
        if not isinstance(ds, dict):
            raise ValueError(f"{where}: deepspeed_config must be a mapping")
        if ds.get("deepspeed_config_file"):
            kwargs.update(
                _read_deepspeed_json(path.parent, str(ds["deepspeed_config_file"]), where)
            )
        else:
            kwargs["zero_stage"] = int(ds.get("zero_stage", 0))
            kwargs["offload_optimizer"] = _offload(
                ds.get("offload_optimizer_device"), "offload_optimizer_device", where
            )
            kwargs["offload_params"] = _offload(
                ds.get("offload_param_device"), "offload_param_device", where
            )
    elif dtype == "FSDP":
        fsdp = data.get("fsdp_config") or {}
        if not isinstance(fsdp, dict):
            raise ValueError(f"{where}: fsdp_config must be a mapping")
        if int(fsdp.get("fsdp_version", 1)) == 2:
            reshard = fsdp.get("fsdp_reshard_after_forward", True)
            if isinstance(reshard, str) and reshard.strip().lower() not in ("true", "false"):
                strategy = _FSDP_STRATEGIES.get(reshard.strip(), reshard.strip().upper())
            else:
                strategy = "FULL_SHARD" if _flag(reshard) else "SHARD_GRAD_OP"
        else:
            raw = str(fsdp.get("fsdp_sharding_strategy", "FULL_SHARD")).strip()
            strategy = _FSDP_STRATEGIES.get(raw, raw.upper())
        if strategy not in _FSDP_STRATEGIES.values():
            raise ValueError(
                f"{where}: fsdp sharding strategy {strategy!r}; expected one of "
                f"{', '.join(_FSDP_STRATEGIES.values())}"
            )
        kwargs["fsdp_sharding"] = strategy
        kwargs["offload_params"] = _flag(fsdp.get("fsdp_offload_params", False))
        kwargs["offload_optimizer"] = kwargs["offload_params"]
        kwargs["activation_checkpointing"] = _flag(fsdp.get("fsdp_activation_checkpointing", False))
    mixed = str(data.get("mixed_precision", "no") or "no").lower()
    try:
        return Cluster(
            distributed_type=dtype,
            nodes=n_nodes,
            gpus_per_node=per_node,
            mixed_precision=mixed,
            source=where,
            **kwargs,
        )
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc


def _read_deepspeed_json(base: Path, name: str, where: str) -> dict[str, Any]:
    path = Path(name) if Path(name).is_absolute() else base / name
    if not path.is_file():
        path = Path(name)
    if not path.is_file():
        raise FileNotFoundError(f"{where}: deepspeed_config_file {name} not found")
    try:
        ds = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON ({exc})") from exc
    zero = ds.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    if stage == "auto":
        raise ValueError(f"{path}: zero_optimization.stage 'auto' cannot be planned; set 0..3")
    device = lambda key: (zero.get(key) or {}).get("device") or "none"  # noqa: E731
    return {
        "zero_stage": int(stage),
        "offload_optimizer": _offload(
            device("offload_optimizer"), "offload_optimizer.device", str(path)
        ),
        "offload_params": _offload(device("offload_param"), "offload_param.device", str(path)),
    }


# ------------------------------------------------------------------------------------------------
# Workload (recipe)
# ------------------------------------------------------------------------------------------------
@dataclass
class PlanTrainingArguments(CspladeTrainingArguments):
    """The recipe's training fields, read without TrainingArguments' device checks.

    `transformers.TrainingArguments` refuses ``bf16: true`` on a machine without a GPU; the planner runs
    on a laptop or a login node, away from the GPUs the recipe is for, so it skips those checks.
    """

    def __post_init__(self) -> None:  # no validation against the local machine
        pass


@dataclass(frozen=True)
class Workload:
    """What one micro-step on one GPU computes, read from a recipe."""

    phase: str  # train | adapt
    model: ModelArguments
    batch_size: int
    grad_accum: int = 1
    group_size: int = 1
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"  # no | bf16 | fp16 (the recipe's bf16 / fp16)
    optimizer: str = "adamw_torch"
    cross_device_negatives: bool = False
    in_batch_negatives: bool = True
    adapt_objective: str = "clm"
    adapt_length: int = 256
    mask_ratio: float = 0.2
    relu_target: float = 0.01
    epochs: float = 1.0
    max_steps: int = -1
    examples: int | None = None  # queries (train) or texts (adapt) per epoch
    examples_source: str = ""

    def __post_init__(self) -> None:
        if self.phase not in ("train", "adapt"):
            raise ValueError(f"phase must be 'train' or 'adapt', got {self.phase!r}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError(
                "per_device_train_batch_size and gradient_accumulation_steps must be >= 1"
            )

    def with_model(self, **changes: Any) -> Workload:
        return dataclasses.replace(self, model=dataclasses.replace(self.model, **changes))


def recipe_phase(recipe: str | os.PathLike) -> str:
    """'adapt' when the recipe sets any AdaptationArguments key, else 'train'."""
    path = Path(recipe)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: invalid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a recipe is a mapping of keys to values")
    adapt_keys = {f.name for f in dataclasses.fields(AdaptationArguments)}
    return "adapt" if adapt_keys & set(data) else "train"


def _mixed_precision(training_args: Any) -> str:
    if getattr(training_args, "bf16", False):
        return "bf16"
    if getattr(training_args, "fp16", False):
        return "fp16"
    return "no"


def _count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def _count_qrels_queries(path: Path) -> int:
    queries = set()
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f):
            parts = line.rstrip("\n").split("\t")
            if n == 0 and parts and parts[0] == "query-id":
                continue
            if len(parts) >= 3:
                try:
                    if float(parts[2]) <= 0:
                        continue
                except ValueError:
                    continue
            if parts and parts[0]:
                queries.add(parts[0])
    return len(queries)


def _local_data(value: str | None) -> Path | None:
    if not value:
        return None
    path = Path(value).expanduser()
    if path.exists():
        return path
    root = os.environ.get("CSPLADE_DATA")
    if root and (Path(root) / value).is_dir():
        return Path(root) / value
    return None


def count_examples(workload_phase: str, data: str | None, split: str = "train") -> int | None:
    """Queries (train: JSONL groups or BEIR qrels) or texts (adapt) of a local data set; None if absent."""
    path = _local_data(data)
    if path is None:
        return None
    if workload_phase == "train":
        if path.is_dir():
            qrels = path / "qrels" / f"{split}.tsv"
            return _count_qrels_queries(qrels) if qrels.is_file() else None
        return _count_lines(path)
    if path.is_dir():
        corpus = path / "corpus.jsonl"
        return _count_lines(corpus) if corpus.is_file() else None
    return _count_lines(path)


def read_workload(
    recipe: str | os.PathLike,
    overrides: list[str] | None = None,
    num_examples: int | None = None,
) -> Workload:
    """The :class:`Workload` of a training or adaptation recipe (plus `--key value` overrides)."""
    phase = recipe_phase(recipe)
    if phase == "adapt":
        model_args, adapt_args, targs = parse_recipe(
            recipe, overrides, types=(ModelArguments, AdaptationArguments, PlanTrainingArguments)
        )
        extra: dict[str, Any] = {
            "adapt_objective": _adapt_objective(adapt_args.adapt_objective, model_args.variant),
            "adapt_length": adapt_args.adapt_max_length,
            "mask_ratio": adapt_args.mask_ratio,
            "relu_target": adapt_args.relu_target,
        }
        data, split, cap = adapt_args.adapt_data, "train", adapt_args.max_adapt_texts
    else:
        model_args, sparsity_args, data_args, targs = parse_recipe(
            recipe,
            overrides,
            types=(ModelArguments, SparsityArguments, DataArguments, PlanTrainingArguments),
        )
        extra = {
            "group_size": data_args.group_size,
            "cross_device_negatives": sparsity_args.cross_device_negatives
            and sparsity_args.in_batch_negatives,
            "in_batch_negatives": sparsity_args.in_batch_negatives,
        }
        data, split, cap = data_args.train_data, data_args.train_split, data_args.max_train_queries
    if num_examples is not None:
        examples, source = num_examples, "--num-queries"
    else:
        examples = count_examples(phase, data, split)
        source = f"counted in {data}" if examples is not None else ""
    if examples is not None and cap is not None and cap < examples:
        examples, source = cap, f"{source}, capped by the recipe at {cap}"
    optim = getattr(targs.optim, "value", targs.optim)
    return Workload(
        phase=phase,
        model=model_args,
        batch_size=int(targs.per_device_train_batch_size),
        grad_accum=int(targs.gradient_accumulation_steps),
        gradient_checkpointing=_checkpointing(targs),
        mixed_precision=_mixed_precision(targs),
        optimizer=str(optim),
        epochs=float(targs.num_train_epochs),
        max_steps=int(targs.max_steps),
        examples=examples,
        examples_source=source,
        **extra,
    )


def _checkpointing(training_args: Any) -> bool:
    """TrainingArguments' rule: `activation_checkpointing` when set, else its deprecated alias."""
    value = getattr(training_args, "activation_checkpointing", None)
    if value is None:
        value = getattr(training_args, "gradient_checkpointing", None)
    return bool(value)


def _adapt_objective(objective: str, variant: str) -> str:
    if objective != "auto":
        return objective
    return "mntp" if variant == "bi" else "clm"


# ------------------------------------------------------------------------------------------------
# The estimate
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Part:
    name: str
    bytes: float
    detail: str


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


@dataclass(frozen=True)
class _Precision:
    act: int  # activation bytes (a)
    frozen: int  # bytes of a stored frozen weight (non-quantized)
    trainable: int  # bytes of a stored trainable weight (full fine-tuning)
    adapter: int  # bytes of a LoRA weight (and of its activations)
    optim_per_param: float  # optimizer bytes per trainable parameter
    autocast_copies: bool  # autocast over float32 weights
    compute: int  # bytes of a weight as the matmuls read it (gathered / cast copies)


def _precision(workload: Workload, cluster: Cluster) -> _Precision:
    model_bytes = _DTYPE_BYTES[workload.model.model_dtype]
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
    return _Precision(act, frozen, trainable, adapter, optim, autocast, compute)


@dataclass(frozen=True)
class _Counts:
    total: int
    lora: int
    trainable: int
    trainable_matmul: (
        int  # trainable matmul weights of the decoder (their weight gradients cost FLOPs)
    )
    head_trainable: bool
    dropped_targets: tuple[str, ...] = ()


def _lora_targets(arch: Architecture, model: ModelArguments) -> dict[str, list[tuple[int, int]]]:
    linears = arch.linears()
    targets = {t: linears[t] for t in model.lora_target_modules if t in linears}
    if not targets:
        raise ValueError(
            f"lora_target_modules {model.lora_target_modules} match no linear layer of a "
            f"{arch.family}-style block ({', '.join(linears)})"
        )
    return targets


def _counts(arch: Architecture, model: ModelArguments) -> _Counts:
    total = arch.total_params()
    if not model.use_lora:
        matmul = arch.layers * arch.layer_matmul_params()
        return _Counts(total, 0, total, matmul, head_trainable=True)
    targets = _lora_targets(arch, model)
    lora = arch.layers * sum(
        model.lora_r * (fan_in + fan_out) for dims in targets.values() for fan_in, fan_out in dims
    )
    if model.lora_lm_head:
        lora += model.lora_r * (arch.hidden + arch.vocab)
    dropped = tuple(sorted(set(model.lora_target_modules) - set(targets)))
    return _Counts(total, lora, lora, lora, head_trainable=False, dropped_targets=dropped)


def _seq_lengths(arch: Architecture, workload: Workload) -> tuple[int, int]:
    """Tokens of one query and one document sequence as the backbone sees them."""
    model = workload.model
    copies = 2 if model.variant == "echo" else 1

    def length(max_len: int, prefix: str) -> int:
        return arch.specials + copies * (max_len + math.ceil(len(prefix) / 4))

    query = 0 if model.doc_only else length(model.query_max_length, model.query_prefix)
    return query, length(model.doc_max_length, model.doc_prefix)


def _calls(arch: Architecture, workload: Workload) -> list[tuple[int, int]]:
    """(sequences, tokens per sequence) of each backbone call of one micro-step."""
    if workload.phase == "adapt":
        return [(workload.batch_size, workload.adapt_length)]
    len_q, len_d = _seq_lengths(arch, workload)
    calls = [(workload.batch_size, len_q), (workload.batch_size * workload.group_size, len_d)]
    return [(n, length) for n, length in calls if n and length]


def _scored_positions(workload: Workload) -> int:
    """Adaptation: positions the LM head is applied to in one micro-batch."""
    scored = workload.batch_size * (workload.adapt_length - 1)
    if workload.adapt_objective == "mntp":
        scored = math.ceil(scored * workload.mask_ratio)
    return scored


# ------------------------------------------------------------------------------------------------
# Memory parts
# ------------------------------------------------------------------------------------------------
def _qbytes(mode: str, hidden: int) -> float:
    """Bytes per quantized weight, quantization constants included (module docstring)."""
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
            f"{model.quantization} weights are not sharded (bitsandbytes' packed weights; see the "
            "module docstring)"
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


def _layer_activation_bytes(
    arch: Architecture,
    workload: Workload,
    prec: _Precision,
    seq_len: int,
    device: str,
) -> float:
    """Bytes autograd saves per token in one decoder layer (module docstring)."""
    model = workload.model
    a, h, inter = prec.act, arch.hidden, arch.intermediate
    full = not model.use_lora
    targets = _lora_targets(arch, model) if model.use_lora else {}
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
    targets, model: ModelArguments, prec: _Precision, a: int, mask_bytes: int
) -> float:
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
        length: _layer_activation_bytes(arch, workload, prec, length, device) for _, length in calls
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
    prec: _Precision,
    rows: int,
    length: int,
    trainable: bool,
) -> tuple[float, float]:
    """(saved, transient) bytes of one sparse-head call on `rows` sequences of `length` tokens."""
    from csplade.head import default_chunk_size

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


def _head(arch, workload, cluster, prec, calls, counts, notes) -> tuple[Part, float]:
    """The sparse head (or the adaptation's LM head): saved bytes, and its largest transient."""
    model, a = workload.model, prec.act
    if workload.phase == "adapt":
        scored = _scored_positions(workload)
        cells = scored * arch.vocab
        k = math.ceil(workload.relu_target * arch.vocab)
        # logits (compute dtype) + float32 copy + float32 log-softmax; top-k values and indices
        saved = cells * (a + (4 if a != 4 else 0) + 4) + scored * k * 12
        transient = cells * (4 + a) + scored * k * 12  # float32 and compute-dtype gradients
        detail = f"LM head at {scored} scored positions ({workload.adapt_objective})"
    else:
        module_head = cluster.deepspeed and cluster.zero_stage == 3 and counts.head_trainable
        if module_head and model.fused_head:
            notes.append(
                "ZeRO-3 with a trainable LM head: csplade falls back to the module head, which "
                "builds (B, L, V) like the naive one"
            )
            model = dataclasses.replace(model, fused_head=False)
        saved = transient = 0.0
        for rows, length in calls:
            s, t = _head_bytes(arch, model, prec, rows, length, counts.head_trainable)
            saved += s
            transient = max(transient, t)
        detail = f"{'fused' if model.fused_head else 'naive'} {model.pooling} head"
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
    saved, transients, detail = flops_gather, {"FLOPS all-gather gradient": flops_gather}, ""
    detail = "FLOPS all-gather"
    if workload.cross_device_negatives:
        docs = world * workload.batch_size * workload.group_size
        saved += docs * arch.vocab * 4.0
        transients["gathered doc vectors' gradient"] = docs * arch.vocab * 4.0
        detail = f"{docs} gathered doc vectors (cross-device negatives) + FLOPS all-gather"
    return Part("loss", saved, detail), transients


def _comm(arch, workload, cluster, prec, counts) -> Part:
    if cluster.world == 1:
        return Part("comm_buffers", 0.0, "none")
    train_bytes = prec.adapter if workload.model.use_lora else prec.trainable
    trainable = counts.trainable
    if cluster.deepspeed and cluster.zero_stage in (1, 2):
        size = (2 * min(arch.hidden**2, trainable) + min(DEEPSPEED_ALLGATHER_BUCKET, trainable)) * (
            train_bytes
        )
        return Part("comm_buffers", size, "reduce + all-gather buckets")
    if cluster.deepspeed and cluster.zero_stage == 3:
        return Part(
            "comm_buffers", 2 * min(arch.hidden**2, trainable) * train_bytes, "reduce buckets"
        )
    if cluster.fsdp:
        per_layer = trainable / arch.layers if workload.model.use_lora else arch.layer_params()
        return Part("comm_buffers", 2 * per_layer * 4.0, "one layer's unsharded gradients x2")
    what = "gradient all-reduce buffer" if cluster.deepspeed else "DDP gradient buckets"
    return Part("comm_buffers", trainable * train_bytes, what)


# ------------------------------------------------------------------------------------------------
# Time
# ------------------------------------------------------------------------------------------------
def _flops(arch, workload, calls, counts, checkpointing) -> dict[str, float]:
    """FLOPs of one micro-step on one GPU, by part (module docstring)."""
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
        out["head"] = _scored_positions(workload) * hv * (2 + (1 if counts.head_trainable else 0))
    return out


def _time(arch, workload, cluster, calls, counts, checkpointing, tflops, mfu) -> TimeEstimate:
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


# ------------------------------------------------------------------------------------------------
# The estimate
# ------------------------------------------------------------------------------------------------
def _precision_notes(workload: Workload, cluster: Cluster) -> list[str]:
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
    """Memory per GPU and time of `workload` on `cluster` (see the module docstring for every term)."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if tflops <= 0 or not 0 < mfu <= 1:
        raise ValueError(f"tflops must be > 0 and mfu in (0, 1], got {tflops}, {mfu}")
    notes = _precision_notes(workload, cluster)
    prec = _precision(workload, cluster)
    counts = _counts(arch, workload.model)
    if counts.dropped_targets:
        notes.append(
            f"LoRA targets not in this architecture, skipped: {', '.join(counts.dropped_targets)}"
        )
    checkpointing = workload.gradient_checkpointing or cluster.activation_checkpointing
    calls = _calls(arch, workload)

    parts, cpu_bytes = _state_parts(arch, workload, cluster, prec, counts, notes)
    parts.append(_working_copies(arch, workload, cluster, prec, counts, checkpointing))
    activations, transients = _activations(arch, workload, prec, calls, checkpointing, device)
    head, head_transient = _head(arch, workload, cluster, prec, calls, counts, notes)
    loss, loss_transients = _loss(arch, workload, cluster)
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

    time = _time(arch, workload, cluster, calls, counts, checkpointing, tflops, mfu)
    if workload.examples is None and workload.max_steps <= 0:
        notes.append("no data set size: pass --num-queries for the time per epoch")
    len_q, len_d = _seq_lengths(arch, workload) if workload.phase == "train" else (None, None)
    shapes = {
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
    return Plan(
        model=model_name or workload.model.model_name_or_path,
        architecture=arch,
        phase=workload.phase,
        cluster=cluster,
        device=device,
        shapes=shapes,
        parameters={"total": counts.total, "trainable": counts.trainable, "lora": counts.lora},
        parts=parts,
        cpu_offload_bytes=cpu_bytes,
        gpu_memory=gpu_memory,
        time=time,
        notes=notes,
    )


# ------------------------------------------------------------------------------------------------
# Knobs
# ------------------------------------------------------------------------------------------------
def _knobs(
    arch: Architecture, workload: Workload, cluster: Cluster
) -> list[tuple[str, Workload, Cluster, str]]:
    """Single changes that lower memory: (label, workload, cluster, caveat), most benign first."""
    model = workload.model
    out: list[tuple[str, Workload, Cluster, str]] = []
    checkpointing = workload.gradient_checkpointing or cluster.activation_checkpointing
    if not checkpointing:
        out.append(
            (
                "gradient_checkpointing: true",
                dataclasses.replace(workload, gradient_checkpointing=True),
                cluster,
                "recomputes the forward in backward (~+30% compute)",
            )
        )
    if workload.phase == "train" and not model.fused_head:
        out.append(("fused_head: true", workload.with_model(fused_head=True), cluster, ""))
    if cluster.world > 1:
        if not cluster.deepspeed and not cluster.fsdp:
            for stage in (2, 3):
                zero = dataclasses.replace(cluster, distributed_type="DEEPSPEED", zero_stage=stage)
                out.append(
                    (
                        f"DeepSpeed ZeRO-{stage} (accelerate_configs/zero{stage}.yaml)",
                        workload,
                        zero,
                        "",
                    )
                )
        elif cluster.deepspeed and cluster.zero_stage < 3:
            for stage in range(max(cluster.zero_stage + 1, 2), 4):
                zero = dataclasses.replace(cluster, zero_stage=stage)
                out.append(
                    (
                        f"ZeRO stage {stage} (deepspeed_config.zero_stage: {stage})",
                        workload,
                        zero,
                        "",
                    )
                )
        elif cluster.fsdp and cluster.fsdp_sharding != "FULL_SHARD":
            full = dataclasses.replace(cluster, fsdp_sharding="FULL_SHARD")
            out.append(("FSDP FULL_SHARD (fsdp_reshard_after_forward: true)", workload, full, ""))
    slow = "slower: states cross PCIe every step"
    if cluster.deepspeed and cluster.zero_stage >= 1 and not cluster.offload_optimizer:
        out.append(
            (
                "offload_optimizer_device: cpu",
                workload,
                dataclasses.replace(cluster, offload_optimizer=True),
                slow,
            )
        )
    if cluster.deepspeed and cluster.zero_stage == 3 and not cluster.offload_params:
        out.append(
            (
                "offload_param_device: cpu + offload_optimizer_device: cpu "
                "(accelerate_configs/zero3_offload.yaml)",
                workload,
                dataclasses.replace(cluster, offload_params=True, offload_optimizer=True),
                slow,
            )
        )
    if cluster.fsdp and not cluster.offload_params:
        out.append(
            (
                "fsdp_offload_params: true",
                workload,
                dataclasses.replace(cluster, offload_params=True, offload_optimizer=True),
                slow,
            )
        )
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
    if workload.phase == "train" and model.doc_max_length > 32:
        shorter = model.doc_max_length // 2
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


# ------------------------------------------------------------------------------------------------
# Entry points
# ------------------------------------------------------------------------------------------------
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
