"""The recipe dataclasses: every key a training recipe may hold.

A recipe is a YAML file whose keys are exactly the field names of these dataclasses (plus those of
`transformers.TrainingArguments`), grouped by comments (`# Model`, `# LoRA`, `# Loss`, `# Data`,
`# Training`), in the alignment-handbook style; :mod:`csplade.training.recipe` reads it.

- :class:`ModelArguments`: the backbone, the encoder's settings (the fields of
  :class:`csplade.model.config.EncoderSettings`: variant, pooling, lengths, prefixes …),
  precision/quantization and LoRA.
- :class:`LossArguments`: the losses (InfoNCE, distillation) and the sparsity regularizers with their
  λ and warm-up.
- :class:`DataArguments`: where training groups come from and how they are sampled.
- :class:`AdaptationArguments`: the pre-contrastive adaptation phase.
- :class:`EvaluationArguments`: the dev slices evaluated during training (both phases), read by
  :mod:`csplade.evaluation.during_training`; a base of :class:`CspladeTrainingArguments`, next to
  transformers' own ``eval_strategy`` / ``eval_steps`` / ``metric_for_best_model`` keys.
- :class:`CspladeTrainingArguments`: `transformers.TrainingArguments` with csplade's defaults.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainingArguments

from csplade.model.config import DTYPES, LEXICAL_ANALYZERS, EncoderSettings
from csplade.model.config import check_choice as _choice
from csplade.quantization.modes import TRAINING_MODES
from csplade.training.distributed import cpu_only_launch, launched_processes
from csplade.training.losses import DISTILL_LOSSES, REGULARIZERS

logger = logging.getLogger(__name__)

DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ModelArguments(EncoderSettings):
    """The backbone, the encoder's settings (inherited from EncoderSettings), precision and LoRA."""

    # Backbone
    model_name_or_path: str = field(
        default="smollm2-135m",
        metadata={"help": "packaged model name, HF folder, or a csplade checkpoint to start from"},
    )
    head_bias_df: float | None = field(
        default=None,
        metadata={
            "help": "calibrate a per-term head bias so each term fires in this fraction of the "
            "training documents before training, when the model has none (e.g. 0.01)"
        },
    )
    head_bias_queries: bool = field(
        default=True,
        metadata={
            "help": "calibrate the head bias on query-length texts too (the training queries; in "
            "the adaptation phase a sentence of each text): each term then fires in at most "
            "head_bias_df of the documents and of the queries (csplade.model.head.calibration)"
        },
    )
    head_bias_texts: int = field(
        default=512,
        metadata={
            "help": "texts (and as many queries) the head-bias calibration reads: 512 documents and "
            "512 queries of SmolLM2-135M take about 3 minutes on 2 CPU cores"
        },
    )
    head_bias_recalibrate: bool = field(
        default=False,
        metadata={
            "help": "with head_bias_df, calibrate before contrastive training even when the model "
            "has a bias: an adapted model's was set on adaptation texts at the adaptation length, "
            "not on the training queries and documents at their lengths (keep false to go on "
            "training a trained model)"
        },
    )
    model_dtype: str = field(
        default="float32", metadata={"help": "weights dtype: float32 | bfloat16 | float16"}
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "eager | sdpa | flex_attention | flash_attention_2"}
    )
    trust_remote_code: bool = False
    quantization: str = field(
        default="none",
        metadata={"help": "backbone quantization for QLoRA: none | int8 | nf4 | fp4"},
    )
    # LoRA
    use_lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    lora_lm_head: bool = field(default=False, metadata={"help": "also put LoRA on the LM head"})
    lora_last_layers: int | None = field(
        default=None,
        metadata={
            "help": "LoRA only on the last N transformer blocks: the backward pass stops there "
            "(cheaper steps, less capacity); None: every block"
        },
    )

    cache_frozen_layers: bool = field(
        default=False,
        metadata={
            "help": "with lora_last_layers: keep each text's hidden states after the frozen lower "
            "blocks and run only the trained ones when it comes back (csplade.model.prefix_cache)"
        },
    )
    frozen_docs_file: str | None = field(
        default=None,
        metadata={
            "help": "with frozen_docs: a file of document vectors shared by runs from the same model "
            "(read when it exists, written at the end; eval/frozen_docs.py --doc-vectors writes one "
            "for whole collections); a file made by another model is refused"
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _choice("model_dtype", self.model_dtype, DTYPES)
        if self.frozen_docs_file and not self.frozen_docs:
            raise ValueError("frozen_docs_file holds frozen documents' vectors: set frozen_docs")
        if self.cache_frozen_layers and not (self.use_lora and self.lora_last_layers):
            raise ValueError(
                "cache_frozen_layers needs frozen lower blocks: use_lora with lora_last_layers"
            )
        _choice("quantization", self.quantization, TRAINING_MODES)
        if self.quantization != "none" and not self.use_lora:
            raise ValueError(
                f"quantization={self.quantization!r} trains a quantized backbone, which only works "
                "with LoRA (QLoRA): set use_lora: true"
            )
        if self.lora_r < 1:
            raise ValueError(f"lora_r must be >= 1, got {self.lora_r}")
        if self.head_bias_texts < 2:
            raise ValueError(f"head_bias_texts must be >= 2, got {self.head_bias_texts}")
        if self.head_bias_df is not None and not 0 < self.head_bias_df < 1:
            raise ValueError(f"head_bias_df must be in (0, 1), got {self.head_bias_df}")
        if self.lora_last_layers is not None and self.lora_last_layers < 1:
            raise ValueError(f"lora_last_layers must be >= 1, got {self.lora_last_layers}")


@dataclass
class LossArguments:
    """The training losses: InfoNCE, distillation, and the sparsity regularizers."""

    # Contrastive loss
    contrastive_weight: float = 1.0
    temperature: float = 1.0
    in_batch_negatives: bool = True
    cross_device_negatives: bool = field(
        default=True, metadata={"help": "gather docs from all processes as extra negatives"}
    )
    # Distillation
    distill_loss: str = field(default="none", metadata={"help": "none | margin_mse | kl"})
    distill_weight: float = 1.0
    distill_temperature: float = 1.0
    # Sparsity regularization
    query_regularizer: str = field(default="flops", metadata={"help": "flops | l1 | none"})
    doc_regularizer: str = field(
        default="flops", metadata={"help": "flops | l1 | idf_flops | none"}
    )
    lambda_q: float = 3e-4
    lambda_d: float = 1e-4
    reg_warmup_steps: int = field(
        default=0, metadata={"help": "optimizer steps of the quadratic λ warm-up (0: none)"}
    )

    def __post_init__(self) -> None:
        # the values name the loss classes (csplade.training.losses)
        _choice("distill_loss", self.distill_loss, ("none", *DISTILL_LOSSES))
        query_kinds = tuple(k for k, kind in REGULARIZERS.items() if kind.for_queries)
        _choice("query_regularizer", self.query_regularizer, (*query_kinds, "none"))
        _choice("doc_regularizer", self.doc_regularizer, (*REGULARIZERS, "none"))
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.lambda_q < 0 or self.lambda_d < 0:
            raise ValueError("lambda_q and lambda_d must be >= 0")
        if self.reg_warmup_steps < 0:
            raise ValueError("reg_warmup_steps must be >= 0")


@dataclass
class DataArguments:
    train_data: str | None = field(
        default=None,
        metadata={
            "help": "training groups: a .jsonl/.parquet/.arrow file (optionally .gz), a `datasets` "
            "folder, a hub dataset id (csplade, Tevatron or sentence-transformers layout), or a "
            "BEIR folder with qrels/<split>.tsv"
        },
    )
    train_split: str = field(
        default="train", metadata={"help": "split of a BEIR folder, `datasets` folder or hub id"}
    )
    train_config: str | None = field(
        default=None, metadata={"help": "configuration (subset) of a hub dataset, e.g. triplet"}
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "read train_data as it is trained on (no copy into the cache); needs max_steps"
        },
    )
    shuffle_buffer: int = field(
        default=10_000, metadata={"help": "streaming: groups in the shuffle buffer (0: in order)"}
    )
    negatives_run: str | None = field(
        default=None,
        metadata={"help": "TREC run whose top docs are the hard negatives (BEIR input)"},
    )
    negatives_depth: int = 100
    group_size: int = field(default=8, metadata={"help": "docs per query: 1 positive + negatives"})
    max_train_queries: int | None = None
    skip_bad_rows: bool = False

    def __post_init__(self) -> None:
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if self.shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {self.shuffle_buffer}")


@dataclass
class AdaptationArguments:
    adapt_data: str | None = field(
        default=None,
        metadata={
            "help": "a corpus ('text', optional 'title': .jsonl/.parquet/.arrow, optionally .gz, a "
            "BEIR folder, a `datasets` folder or hub id) or a plain-text file"
        },
    )
    adapt_split: str = field(default="train", metadata={"help": "split of a `datasets` source"})
    adapt_config: str | None = field(default=None, metadata={"help": "hub dataset configuration"})
    adapt_objective: str = field(default="auto", metadata={"help": "auto | clm | mntp"})
    adapt_max_length: int = 256
    mask_ratio: float = 0.2
    relu_weight: float = field(
        default=1.0,
        metadata={"help": "λ of L_ReLU, the LM loss on log(1 + ReLU(logits)) (CSPLADE: 1)"},
    )
    max_adapt_texts: int | None = None
    # The lexical adaptation (csplade.training.losses.lexical): the model's own pooled vector of each
    # text (as a document) and of a sentence of it (as a query) regressed onto its words at BM25's
    # weights, so that retrieval starts from lexical matching the LLM itself does.
    lm_weight: float = field(
        default=1.0,
        metadata={
            "help": "weight of the LM objective (clm | mntp); with relu_weight 0 too, no LM pass"
        },
    )
    lexical_weight: float = field(
        default=0.0, metadata={"help": "weight of the lexical objective (0: off)"}
    )
    lexical_target_analyzer: str = field(
        default="stems", metadata={"help": "words the targets hold: tokens | words | stems"}
    )
    lexical_target_scale: float = field(
        default=1.0,
        metadata={"help": "the targets' scale (sqrt(IDF) x this, BM25 tf on documents)"},
    )
    lexical_query_weight: float = field(
        default=1.0, metadata={"help": "weight of the query examples against the documents'"}
    )
    lexical_pull_weight: float = field(
        default=1.0, metadata={"help": "weight of the pull on own terms whose logit is below zero"}
    )
    lexical_off_weight: float = field(
        default=1.0, metadata={"help": "weight of the squared weights of the other terms"}
    )
    merge_adapter: bool = field(
        default=True, metadata={"help": "save a merged model (not just the LoRA adapter)"}
    )

    def __post_init__(self) -> None:
        _choice("adapt_objective", self.adapt_objective, ("auto", "clm", "mntp"))
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.relu_weight < 0:
            raise ValueError(f"relu_weight must be >= 0, got {self.relu_weight}")
        _choice("lexical_target_analyzer", self.lexical_target_analyzer, LEXICAL_ANALYZERS)
        for name in ("lm_weight", "lexical_weight", "lexical_query_weight", "lexical_pull_weight",
                     "lexical_off_weight"):  # fmt: skip
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lexical_target_scale <= 0:
            raise ValueError(f"lexical_target_scale must be > 0, got {self.lexical_target_scale}")
        if self.lm_weight == 0 and self.relu_weight == 0 and self.lexical_weight == 0:
            raise ValueError(
                "lm_weight, relu_weight and lexical_weight are all 0: nothing to train"
            )


# --------------------------------------------------------------------------------------------------
# Evaluation during training
# --------------------------------------------------------------------------------------------------

_SPLIT = re.compile(r"[\w.-]+")


@dataclass(frozen=True)
class EvalSet:
    """One dev set to evaluate during training: a BEIR folder (or name), its split, its log name."""

    data: str
    split: str
    name: str  # metrics are logged as eval_<name>_<metric>, e.g. eval_scifact-test_ndcg@10


@dataclass
class EvaluationArguments:
    """The dev slices the trainer evaluates every ``eval_steps`` (curves, best checkpoint).

    When to evaluate and which checkpoint to keep are transformers' own keys: ``eval_strategy``,
    ``eval_steps``, ``eval_on_start``, ``metric_for_best_model``, ``greater_is_better``,
    ``load_best_model_at_end``, ``save_total_limit``; the encoding batch is
    ``per_device_eval_batch_size``. docs/evaluation-during-training.md describes them.
    """

    eval_data: list[str] | None = field(
        default=None,
        metadata={
            "help": "dev sets evaluated during training: BEIR folders or names under $CSPLADE_DATA, "
            "each optionally with its own split as NAME:SPLIT (e.g. nfcorpus scifact:test); needs "
            "eval_strategy steps or epoch"
        },
    )
    eval_split: str = field(
        default="dev", metadata={"help": "qrels split of the eval_data sets without a :SPLIT"}
    )
    eval_max_queries: int | None = field(
        default=None, metadata={"help": "the first N judged queries of each dev set (None: all)"}
    )
    eval_max_docs: int | None = field(
        default=None,
        metadata={
            "help": "documents per dev set: every judged document of the kept queries plus others "
            "drawn at random (seed 0), as `csplade eval --max-docs` draws them (None: all)"
        },
    )
    eval_own_vectors: bool = field(
        default=False,
        metadata={
            "help": "with a lexical residual, also evaluate the model's own vectors (the residual "
            "off on both sides, documents through the model), logged as eval_<set>_own_<metric>"
        },
    )
    eval_doc_max_length: int | None = field(
        default=None,
        metadata={
            "help": "document length of the documents the model encodes during evaluation (None: "
            "the model's doc_max_length); lexical_docs documents keep the model's"
        },
    )

    def eval_sets(self) -> list[EvalSet]:
        """The dev sets of ``eval_data`` with their splits and (unique) log names."""
        values = [self.eval_data] if isinstance(self.eval_data, str) else self.eval_data or []
        sets = []
        for value in values:
            data, split = str(value), self.eval_split
            head, sep, tail = data.rpartition(":")
            if sep and head and _SPLIT.fullmatch(tail):
                data, split = head, tail
            sets.append(EvalSet(data, split, f"{Path(data.rstrip('/')).name or data}-{split}"))
        names = [s.name for s in sets]
        if len(set(names)) != len(names):
            raise ValueError(f"eval_data: two dev sets share a name ({names}); rename a folder")
        return sets

    def check_evaluation(self, eval_strategy: str) -> None:
        """Refuse settings that would evaluate nothing, or a slice of no size."""
        for name in ("eval_max_queries", "eval_max_docs", "eval_doc_max_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not _SPLIT.fullmatch(self.eval_split):
            raise ValueError(
                f"eval_split: expected a split name like dev or test, got {self.eval_split!r}"
            )
        sets = self.eval_sets()
        if sets and eval_strategy == "no":
            raise ValueError(
                "eval_data is set but eval_strategy is 'no': set eval_strategy: steps and "
                "eval_steps: N (or eval_strategy: epoch)"
            )
        if self.eval_own_vectors and not sets:
            raise ValueError("eval_own_vectors needs eval_data")


def _value(strategy) -> str:
    """An interval/save strategy as its plain name ("no", "steps", "best" …), enum or string."""
    return str(getattr(strategy, "value", strategy))


@dataclass
class CspladeTrainingArguments(TrainingArguments, EvaluationArguments):
    """`transformers.TrainingArguments` with csplade's defaults (every HF field stays available),
    plus the dev sets evaluated during training (:class:`EvaluationArguments`)."""

    output_dir: str | None = field(default=None, metadata={"help": "where checkpoints go"})
    remove_unused_columns: bool = False
    logging_steps: float = 10
    save_strategy: str = "steps"
    save_steps: float = 500
    save_total_limit: int | None = 2
    lr_scheduler_type: str = "linear"
    warmup_steps: float = 0
    dataloader_num_workers: int = 0
    head_bias_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "learning rate of the per-term head bias (None: the learning_rate): one value "
            "per term, each moved only by the texts that hold it, so far less often than LoRA's"
        },
    )

    def __post_init__(self) -> None:
        # Several processes launched on a machine without GPUs (`accelerate launch --multi_gpu` / a DDP or
        # DeepSpeed config on CPU): the Trainer joins them over gloo only with use_cpu; without it every
        # process would silently train alone.
        if cpu_only_launch() and not self.use_cpu:
            logger.info(
                "%d processes and no GPU: training on CPU over gloo (use_cpu=True)",
                launched_processes(),
            )
            self.use_cpu = True
        sets = self.eval_sets()
        best = self.load_best_model_at_end or _value(self.save_strategy) == "best"
        if sets and best and self.metric_for_best_model is None:  # transformers would pick "loss"
            self.metric_for_best_model = f"{sets[0].name}_ndcg@10"
        super().__post_init__()
        self.check_evaluation(_value(self.eval_strategy))
