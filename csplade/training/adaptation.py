"""The pre-contrastive adaptation phase: a short LM run that wakes the SPLADE head up.

Why. A SPLADE vector is ``max_l log(1 + ReLU(logits[l]))``. A pretrained causal LM's head is trained
for a softmax, which ignores where zero lies: some put almost all logits below zero (no gradient
through log(1 + ReLU): the "dying ReLU" CSPLADE reports), others above (SmolLM2: dense vectors).
CSPLADE (Xu et al., arXiv 2504.10816, §3.2) adapts the model on unlabeled text before contrastive
training with

    L_adapt = L_LM + λ · L_ReLU        (λ = 1 in the paper: recipe key ``relu_weight``)

where L_LM is next-token cross-entropy on the logits z and L_ReLU is the same cross-entropy computed on
the SPLADE activations a = log(1 + ReLU(s · z)) in place of the logits (``s``: the encoder's
``logit_scale``; no pooling), both from one forward pass: the target token must win the softmax over
the activated vocabulary, which lifts its logit above zero and pushes the others to zero. For the
``bi`` variant (bidirectional attention) next-token prediction is a copy task (position i sees token
i + 1), so there the LM part is masked next-token prediction (MNTP) as in LLM2Vec (BehnamGhader et
al., arXiv 2404.05961), which also gets the model used to its new mask; L_ReLU then uses the MNTP
targets. The ``echo`` variant adapts on the plain text (no repetition), like ``uni``.

MNTP details (LLM2Vec; ours where noted): a fraction ``mask_ratio`` (20%) of the real, non-special
tokens is replaced by a mask token, and masked token i is predicted from the logits at position
i−1 (a causal LM's logits at i−1 are its next-token guess, so the head keeps its meaning); the loss
is only on masked tokens. Causal LMs have no mask token: we use the tokenizer's own mask token if it
has one, else "_" when it is a single token of the vocabulary (LLM2Vec's choice for Llama and
Mistral), else the pad token, else unk. Ours: every masked token is replaced by the mask token
(LLM2Vec's "all_mask" collator; its default keeps BERT's 80/10/10 split); position 0 is never masked
(it has no i−1); a text with maskable tokens but no draw gets one masked token, so every text
contributes (this lifts the ratio above 20% for very short texts).

L_ReLU is computed at every position that has a next token: under CLM the LM loss's own positions;
under MNTP also the positions in front of unmasked tokens (ours). MNTP trains only the positions in
front of masked tokens, and a SPLADE vector max-pools every position: measured on SmolLM2-135M after
100 MNTP steps with L_ReLU on the masked positions only, the untrained positions of a short query
fired up to 46,000 of the 49,152 terms (the median query 31), and contrastive training started from
such scores (up to 2 x 10^4) with gradient norms of 10^5. L_ReLU at every position makes each
position's activations sparse and peaked on its next token, the text's own.

Logged (averaged over the micro-batches since the last log and over the processes): ``clm`` or
``mntp``, ``relu`` (unweighted L_ReLU), ``pos_frac`` (fraction of positive logits at the scored
positions) and ``nnz`` (mean number of vocabulary terms positive at one or more scored positions of
a text: the non-zeros of its SPLADE max-pooled vector, over the scored positions only; under MNTP
over the masked input).

Memory. The head is applied only at the scored positions: logits (N, V) in the model dtype, N =
the tokens of the micro-batch that have a next token; no (B, L, V) tensor with padding is built. The cross entropy then makes a float32 copy and keeps the
float32 log-softmax for backward (both alive for a moment), and backward builds an (N, V) gradient;
L_ReLU adds the same again for the activations. Example, Llama-3 (V = 128,256), CLM over 8 × 256
tokens in bf16: 0.5 GB of logits, up to 4 GB of float32 in the forward, 2 GB kept for backward.
Known limit: no fused linear + cross-entropy kernel (chunking over
positions would bound this further).

Other limits: the loss is a mean per micro-batch (token-weighted within it, not across
gradient-accumulation steps); the non-finite check and the metrics sync the device a few times per
micro-batch; merging a LoRA adapter into a quantized (QLoRA) base is refused (save the adapter: it
applies to the full-precision base on reload); DeepSpeed ZeRO-3 / FSDP checkpoints are saved from
the gathered state dict the Trainer passes.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import set_seed

from csplade._io import replace_folder_files
from csplade.data.lexical_targets import LexicalTargets
from csplade.data.sampling import ADAPT_OBJECTIVES as OBJECTIVES
from csplade.data.sampling import IGNORE_INDEX, AdaptationCollator
from csplade.model.card import write_card
from csplade.model.encoder import SparseEncoder
from csplade.model.head import splade_activation
from csplade.training.arguments import AdaptationArguments, ModelArguments
from csplade.training.base import (
    CheckpointingTrainer,
    Evaluator,
    NonFiniteLossError,
    check_evaluator,
    resolve_resume,
)
from csplade.training.distributed import check_joined
from csplade.training.loading import load_encoder_for_training
from csplade.training.losses import LexicalTargetLoss, own_share
from csplade.training.setup import adaptation_texts, calibrate_on_texts, lexical_setup

logger = logging.getLogger(__name__)


def resolve_objective(adapt_objective: str, variant: str) -> str:
    """'auto' -> 'mntp' for the bidirectional variant, 'clm' otherwise; refuses CLM under `bi`."""
    if adapt_objective == "auto":
        return "mntp" if variant == "bi" else "clm"
    if adapt_objective not in OBJECTIVES:
        raise ValueError(
            f"adapt_objective: unknown value {adapt_objective!r}; "
            f"allowed: auto, {', '.join(OBJECTIVES)}"
        )
    if adapt_objective == "clm" and variant == "bi":
        raise ValueError(
            "adapt_objective 'clm' with variant 'bi': under bidirectional attention position i "
            "sees token i + 1, so next-token prediction is a copy task; use 'mntp' (or 'auto')"
        )
    if adapt_objective == "mntp" and variant != "bi":
        logger.warning(
            "adapt_objective 'mntp' with variant %r: under causal attention the masked token's "
            "neighbours on the right are invisible; MNTP is meant for variant 'bi'",
            variant,
        )
    return adapt_objective


# --------------------------------------------------------------------------------------------------
# Pure functions of tensors
# --------------------------------------------------------------------------------------------------


def next_token_targets(labels: Tensor) -> Tensor:
    """Targets for the logits at each position: ``labels[:, i + 1]`` at i, IGNORE_INDEX at the end.

    `labels` (B, L) are aligned with the input (the Hugging Face convention): labels[:, i] is the
    token the model should produce for input position i (CLM: the token itself; MNTP: the original
    token where it was masked, IGNORE_INDEX elsewhere). The logits at position i predict position i
    + 1.
    """
    targets = torch.full_like(labels, IGNORE_INDEX)  # (B, L)
    targets[:, :-1] = labels[:, 1:]
    return targets


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross entropy over targets != IGNORE_INDEX, in float32; zero (with a graph) if none.

    `logits` (..., V) and `targets` (...) already aligned (see :func:`next_token_targets`).
    """
    flat_logits = logits.reshape(-1, logits.shape[-1])  # (N, V)
    flat_targets = targets.reshape(-1)  # (N,)
    if flat_targets.numel() != flat_logits.shape[0]:
        raise ValueError(
            f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} do not match"
        )
    if not bool((flat_targets != IGNORE_INDEX).any()):
        return flat_logits.sum() * 0.0
    return F.cross_entropy(flat_logits.float(), flat_targets, ignore_index=IGNORE_INDEX)


def clm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Causal LM loss: logits (B, L, V) at every position, labels (B, L) aligned with the input."""
    return lm_loss(logits[:, :-1], labels[:, 1:])


def mntp_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Masked next-token prediction loss (LLM2Vec): masked token i is scored by the logits at i−1.

    `labels` (B, L) hold the original token at masked positions and IGNORE_INDEX elsewhere (see
    :func:`mntp_inputs`); the arithmetic is that of :func:`clm_loss` on those sparse labels.
    """
    return lm_loss(logits[:, :-1], labels[:, 1:])


def _select(logits: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return logits.reshape(-1, logits.shape[-1])
    if mask.shape != logits.shape[:-1]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match logits {tuple(logits.shape)}")
    return logits[mask.to(device=logits.device, dtype=torch.bool)]


def relu_loss(
    logits: Tensor, targets: Tensor, logit_scale: float = 1.0, bias: Tensor | None = None
) -> Tensor:
    """CSPLADE's L_ReLU: the LM cross entropy on log(1 + ReLU(scale · (logits + bias))).

    `logits` (..., V) and `targets` (...) aligned as for :func:`lm_loss`; `bias` (V,) is the
    encoder's per-term head bias when it has one (the SPLADE head's own logits).
    """
    logits = logits.float()
    if bias is not None:
        logits = logits + bias.float()
    return lm_loss(splade_activation(logits * logit_scale), targets)


@torch.no_grad()
def positive_fraction(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Fraction of positive logits over the selected positions (a float32 scalar; 0 if none)."""
    rows = _select(logits, mask)  # (N, V)
    if rows.numel() == 0:
        return torch.zeros((), device=logits.device)
    return (rows > 0).sum().float() / rows.numel()  # no (N, V) float temporary


@torch.no_grad()
def pooled_nnz(logits: Tensor, counts: Sequence[int]) -> Tensor:
    """Mean over texts of the terms positive at one or more of the text's positions.

    `logits` (N, V) are the selected positions of B texts, grouped by text in order (as boolean
    indexing of a (B, L) mask returns them); `counts` (B,) how many rows belong to each text. Texts
    with no row are left out of the mean. This is the nnz of the max-pooled log(1 + ReLU) vector
    over those positions.
    """
    if sum(counts) != logits.shape[0]:
        raise ValueError(f"counts sum to {sum(counts)}, logits have {logits.shape[0]} rows")
    per_text = [
        (part > 0).any(dim=0).sum() for part in torch.split(logits, list(counts)) if part.shape[0]
    ]
    if not per_text:
        return torch.zeros((), device=logits.device)
    return torch.stack(per_text).float().mean()


# --------------------------------------------------------------------------------------------------
# Model side
# --------------------------------------------------------------------------------------------------


def token_logits(
    encoder: SparseEncoder,
    input_ids: Tensor,
    attention_mask: Tensor,
    positions: Tensor | None = None,
) -> Tensor:
    """LM-head logits of the encoder's backbone: (N, V) at `positions` (B, L) bool, else (B, L, V).

    The same logits the SPLADE head activates (after Gemma's final soft-capping where the model has
    one), through the head module itself, so a LoRA layer on the LM head takes part.
    """
    if encoder.config.backbone_kind != "causal":
        raise ValueError(
            "adaptation trains causal LM backbones; this encoder's backbone is "
            f"{encoder.config.backbone_kind!r}"
        )
    base = encoder.base_model
    decoder = base.base_model  # e.g. LlamaModel: last_hidden_state is after the final norm
    hidden = decoder(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False
    ).last_hidden_state  # (B, L, H)
    if positions is not None:
        hidden = hidden[positions.to(device=hidden.device, dtype=torch.bool)]  # (N, H)
    logits = base.get_output_embeddings()(hidden)  # (N, V) or (B, L, V)
    softcap = getattr(base.config.get_text_config(), "final_logit_softcapping", None)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


class AdaptationModel(nn.Module):
    """What the Trainer (and DDP / DeepSpeed) wraps: one module call per micro-batch, as distributed
    wrappers expect (the loss stays in the trainer).

    Returns a dict: ``logits`` (N, V), the LM-head logits at `positions`, and ``head_bias`` (V,) or
    None, when token ids are given; ``doc_logits`` / ``query_logits`` (B, V), the max-pooled logits
    of the lexical objective's batches (:meth:`SparseEncoder.pooled_logits`), when given.
    """

    def __init__(self, encoder: SparseEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    @property
    def _no_split_modules(self) -> list[str]:
        """The backbone's block classes: FSDP's transformer auto-wrap shards each block alone."""
        return self.encoder._no_split_modules

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        positions: Tensor | None = None,
        lexical_doc: dict[str, Tensor] | None = None,
        lexical_query: dict[str, Tensor] | None = None,
    ) -> dict[str, Tensor | None]:
        """Take the head bias from here, not from the encoder's parameter: under ZeRO-3 the
        parameter is a partition outside this forward, and this copy is made where the engine
        gathers it."""
        out: dict[str, Tensor | None] = {}
        if input_ids is not None:
            out["logits"] = token_logits(self.encoder, input_ids, attention_mask, positions)
            out["head_bias"] = self.encoder.head_bias_tensor()
        if lexical_doc is not None:
            out["doc_logits"] = self.encoder.pooled_logits(**lexical_doc)  # (B, V)
        if lexical_query is not None:
            out["query_logits"] = self.encoder.pooled_logits(**lexical_query)  # (B, V)
        return out

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kwargs):
        self.encoder.base_model.activation_checkpointing_enable(
            activation_checkpointing_kwargs=activation_checkpointing_kwargs, **kwargs
        )


class AdaptationTrainer(CheckpointingTrainer):
    """`transformers.Trainer` for the adaptation phase: LM objective + relu_weight · L_relu.

    `encoder` is the SparseEncoder to adapt (LoRA already applied if wanted); the objective comes
    from `adapt_args.adapt_objective` and the encoder's variant (:func:`resolve_objective`). Without
    a `data_collator`, an :class:`AdaptationCollator` is built from `adapt_args`. `train_dataset`
    items are ``{"text": str}`` (or plain strings). Checkpoints are csplade encoder folders plus the
    Trainer's state, with the contrastive trainer's completion marker, so ``resume_from_checkpoint``
    works as it does for ``train``.
    """

    def __init__(
        self,
        encoder: SparseEncoder,
        args,
        adapt_args: AdaptationArguments | None = None,
        lexical_targets: LexicalTargets | None = None,
        **kwargs: Any,
    ) -> None:
        self.adapt_args = adapt_args or AdaptationArguments()
        self.objective = resolve_objective(self.adapt_args.adapt_objective, encoder.config.variant)
        if encoder.config.backbone_kind != "causal":
            raise ValueError("the adaptation phase is for causal LM backbones (not masked LMs)")
        if self.adapt_args.relu_weight < 0:
            raise ValueError(f"relu_weight must be >= 0, got {self.adapt_args.relu_weight}")
        aa = self.adapt_args
        self.language_model = aa.lm_weight > 0 or aa.relu_weight > 0
        self.lexical_loss = None
        if aa.lexical_weight > 0:
            if lexical_targets is None:
                raise ValueError("lexical_weight > 0 needs lexical_targets (LexicalTargets)")
            self.lexical_loss = LexicalTargetLoss(aa.lexical_pull_weight, aa.lexical_off_weight)
        if kwargs.get("data_collator") is None:
            kwargs["data_collator"] = AdaptationCollator(
                encoder.tokenizer,
                objective=self.objective,
                max_length=aa.adapt_max_length,
                mask_ratio=aa.mask_ratio,
                lexical=lexical_targets if self.lexical_loss is not None else None,
                language_model=self.language_model,
            )
        self._encoder = encoder
        super().__init__(model=AdaptationModel(encoder), args=args, **kwargs)
        # The loss is a mean per micro-batch: let the Trainer divide by the accumulation steps.
        self.model_accepts_loss_kwargs = False

    state_prefix = "encoder."  # the wrapped model is an AdaptationModel

    def encoder(self) -> SparseEncoder:
        return self._encoder

    # The dataset's "text" column is read by the collator, not by the model's forward.
    def _remove_unused_columns(self, dataset, description=None):
        return dataset

    def _get_collator_with_removed_columns(self, data_collator, description=None):
        return data_collator

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        call: dict[str, Any] = {}
        if self.language_model:
            lm_targets = next_token_targets(inputs["labels"])  # (B, L)
            # L_ReLU scores every position that has a next token (under MNTP, the unmasked ones too)
            relu_targets = next_token_targets(inputs.get("tokens", inputs["labels"]))  # (B, L)
            positions = relu_targets != IGNORE_INDEX  # (B, L)
            call = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
            call["positions"] = positions
        if self.lexical_loss is not None:
            call["lexical_doc"] = inputs["lexical_doc"]
            call["lexical_query"] = inputs["lexical_query"]
        out = model(**call)
        parts: dict[str, Tensor] = {}
        aa = self.adapt_args
        loss = torch.zeros((), device=self.args.device)
        if self.language_model:
            logits = out["logits"]  # (N, V)
            where = positions.to(relu_targets.device)
            lm = lm_loss(logits, lm_targets[where])  # the LM objective's own targets (MNTP: masked)
            with torch.set_grad_enabled(torch.is_grad_enabled() and aa.relu_weight > 0):
                relu = relu_loss(
                    logits, relu_targets[where], self._encoder.config.logit_scale, out["head_bias"]
                )
            loss = loss + aa.lm_weight * lm + aa.relu_weight * relu
            parts[self.objective], parts["relu"] = lm, relu
        if self.lexical_loss is not None:
            doc = self.lexical_loss(out["doc_logits"], inputs["lexical_doc_target"])
            query = self.lexical_loss(out["query_logits"], inputs["lexical_query_target"])
            lexical = doc["loss"] + aa.lexical_query_weight * query["loss"]
            loss = loss + aa.lexical_weight * lexical
            parts["lexical"] = lexical
            for side, values in (("d", doc), ("q", query)):
                for name in ("on", "pull", "off"):
                    parts[f"lex_{side}_{name}"] = values[name]
        if not bool(torch.isfinite(loss.detach())):
            values = ", ".join(f"{k}={float(v):.4g}" for k, v in parts.items())
            raise NonFiniteLossError(
                f"non-finite adaptation loss at optimizer step {self.state.global_step + 1} "
                f"(epoch {self.state.epoch or 0:.3f}): loss={float(loss):.4g}, {values}; lower "
                "the learning rate, check the data, or train in float32/bfloat16 rather than float16"
            )
        if model.training:
            for name, value in parts.items():
                self.record(name, value)
            if self.language_model:
                counts = positions.sum(dim=1).tolist()
                self.record("pos_frac", positive_fraction(logits.detach()))
                self.record("nnz", pooled_nnz(logits.detach(), counts))
            if self.lexical_loss is not None:
                self._record_lexical(out, inputs)
        return (loss, out) if return_outputs else loss

    @torch.no_grad()
    def _record_lexical(self, out, inputs) -> None:
        """Non-zeros of the pooled document / query vectors and the share of their weight on the
        text's own terms."""
        for side, key in (("d", "doc"), ("q", "query")):
            reps = splade_activation(out[f"{key}_logits"].detach().float())
            target = inputs[f"lexical_{key}_target"].to(reps.device)
            self.record(f"lex_{side}_nnz", (reps > 0).sum(dim=1).float().mean())
            self.record(f"lex_{side}_own", own_share(reps, target))


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def _save_final(encoder: SparseEncoder, output_dir: Path) -> None:
    """Write the encoder into `output_dir`, keeping its sub-folders (checkpoint-N, runs).

    Top-level files of an earlier save are removed first (a stale adapter_config.json next to a
    merged model would make transformers load an adapter), then the new files are moved in.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(
        prefix=f".{output_dir.name}-final-", dir=output_dir.parent
    ) as tmp:
        encoder.save_pretrained(tmp, atomic=False)
        write_card(tmp, output_dir.resolve().name)  # named after the folder it lands in
        stale = replace_folder_files(Path(tmp), output_dir)
    if stale:
        logger.info("replaced the files of an earlier save in %s: %s", output_dir, stale)


def _eval_head_bias(model_args: ModelArguments, texts):
    """What sets the bias before each evaluation: the calibration the save would run (none without
    ``head_bias_df``; the lexical objective trains the bias itself, its model is evaluated as is)."""
    if model_args.head_bias_df is None:
        return None
    return partial(calibrate_on_texts, texts=texts, doc_fraction=model_args.head_bias_df,
                   queries=model_args.head_bias_queries, n=model_args.head_bias_texts,
                   show_progress=False)  # fmt: skip


def _check_recipe(model_args, adapt_args, training_args, evaluator) -> tuple[str, bool]:
    """The adaptation's objective and whether it merges, once the recipe is known to be runnable."""
    if not training_args.output_dir:
        raise ValueError("output_dir is required (in the recipe or as --output_dir)")
    if not adapt_args.adapt_data:
        raise ValueError(
            "adapt_data is required (corpus.jsonl, a BEIR folder or a plain-text file)"
        )
    check_evaluator(training_args, evaluator)
    objective = resolve_objective(adapt_args.adapt_objective, model_args.variant)
    merge = adapt_args.merge_adapter and model_args.use_lora
    if merge and model_args.quantization != "none":
        raise ValueError(
            f"merge_adapter with quantization={model_args.quantization!r} would merge the adapter "
            "into quantized weights; set merge_adapter: false (the saved adapter applies to the "
            "full-precision base when reloaded)"
        )
    return objective, merge


def run_adaptation(
    model_args: ModelArguments,
    adapt_args: AdaptationArguments,
    training_args,
    evaluator: Evaluator | None = None,
) -> Path:
    """Adapt the backbone a recipe describes on `adapt_data`; save and return its encoder folder.

    `adapt_data`: a corpus.jsonl, a BEIR folder (or its name under $CSPLADE_DATA), a text file.
    The folder (``training_args.output_dir``) loads with :meth:`SparseEncoder.from_pretrained` and
    is a valid ``model_name_or_path`` for the contrastive ``train``: a merged model when
    ``merge_adapter`` (or without LoRA), else the LoRA adapter over ``model_name_or_path``.
    `evaluator` (:mod:`csplade.evaluation.during_training`) runs every ``eval_steps`` on the model
    as adaptation would save it then: with ``head_bias_df``, a bias calibrated as below.
    """
    objective, merge = _check_recipe(model_args, adapt_args, training_args, evaluator)
    set_seed(training_args.seed)
    encoder = load_encoder_for_training(model_args)
    data_path = adapt_args.adapt_data  # a file, a folder, a BEIR name or a hub id
    texts = adaptation_texts(adapt_args)
    logger.info(
        "adaptation: %g * %s + %g * relu + %g * lexical on %d texts from %s",
        adapt_args.lm_weight,
        objective,
        adapt_args.relu_weight,
        adapt_args.lexical_weight,
        len(texts),
        data_path,
    )
    targets = None
    if adapt_args.lexical_weight > 0:
        texts, targets = lexical_setup(encoder, texts, model_args, adapt_args, training_args.seed)
    eval_head_bias = None
    if evaluator is not None and targets is None:
        eval_head_bias = _eval_head_bias(model_args, texts)
    trainer = AdaptationTrainer(
        encoder, args=training_args, adapt_args=adapt_args, lexical_targets=targets,
        train_dataset=texts, evaluator=evaluator, eval_head_bias=eval_head_bias,
    )  # fmt: skip
    check_joined(trainer.accelerator)
    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)
    started = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.accelerator.wait_for_everyone()
    _log_truncation(trainer.data_collator, adapt_args.adapt_max_length)
    provenance = {
        "objective": objective,
        "data": str(data_path),
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "seconds": round(time.time() - started, 2),
        "merged": bool(merge),
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "adapt_args": asdict(adapt_args),
    }
    if targets is not None:
        provenance["lexical_targets"] = targets.describe(encoder.config.doc_max_length)
    out = Path(training_args.output_dir)
    _merge_calibrate_save(trainer, model_args, merge, texts, provenance, out)
    return out


def _log_truncation(collator: AdaptationCollator, max_length: int) -> None:
    if collator.language_model and collator.n_full:
        logger.info(
            "%d of %d texts filled adapt_max_length=%d tokens (longer texts were cut there)",
            collator.n_full,
            collator.n_texts,
            max_length,
        )


def _merge_calibrate_save(trainer, model_args, merge: bool, texts, provenance, out: Path) -> None:
    """Merge the adapter, calibrate the head bias and save, on the whole trained encoder.

    Every process calls this: under ZeRO-3 / FSDP the engine gathers the trained weights and the
    saving process rebuilds the encoder whole from them (:meth:`CheckpointingTrainer.unsharded_encoder`).
    """
    final = trainer.unsharded_encoder(lambda: load_encoder_for_training(model_args))
    if final is not None:
        if merge:
            final.backbone = final.backbone.merge_and_unload()
        lexical = trainer.lexical_loss is not None  # it trained the bias calibrated before
        if model_args.head_bias_df is not None and not lexical:
            # after the LM phase, which moved the logits: calibrate on the adaptation texts
            calibrate_on_texts(final, texts, model_args.head_bias_df, model_args.head_bias_queries,
                               model_args.head_bias_texts)  # fmt: skip
        final.config = replace(final.config, extra={**final.config.extra, "adaptation": provenance})
        _save_final(final, out)
        logger.info("adapted encoder saved to %s (%s)", out, "merged" if merge else "as saved")
    trainer.accelerator.wait_for_everyone()
