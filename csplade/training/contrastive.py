"""Contrastive training of a SparseEncoder: a `transformers.Trainer` subclass.

The Trainer owns the loop, gradient accumulation, mixed precision, activation checkpointing,
checkpoints, resume, logging (`report_to` tensorboard / wandb) and the launchers (`accelerate launch` with
DDP, DeepSpeed ZeRO or FSDP). This module adds only what is specific to learned sparse retrieval:

- `compute_loss`: encode the queries and the grouped documents in one forward (one DDP forward per
  step), then InfoNCE (:func:`csplade.training.losses.contrastive_loss`, optionally with cross-device negatives),
  optional distillation from teacher scores (MarginMSE or KL), and sparsity regularizers on queries and
  documents (FLOPS / L1 / IDF-aware FLOPS; on the learned terms only when the model has a lexical
  residual, :func:`csplade.model.lexical.learned_part`) computed on the *global* batch so the density of the model does
  not depend on the number of GPUs. λ_q and λ_d follow a quadratic warm-up stepped per OPTIMIZER step
  (`state.global_step`), never per micro-batch.
- logging of every loss part, λ_q, λ_d, the mean non-zeros of query and document vectors (and of their
  learned terms, with a lexical residual), and the
  score scale (mean positive and largest query-document score of the batch) (checkpoints, resume and metric averaging: :mod:`csplade.training.base`).

Sharded weights: under DeepSpeed ZeRO-3 and FSDP2 the fused head reads the LM-head weight inside a module
whose hooks gather it for forward and backward (csplade.model.output_head), frozen or trained, tied or not,
with or without LoRA on it. Multi-node launch is accelerate's; nothing here depends on the world size
except the loss math, which is exact for any split (see csplade.training.losses).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, set_seed

from csplade.data.groups import load_training_groups
from csplade.data.sampling import GroupCollator
from csplade.data.texts import (
    calibration_documents,
    corpus_idf,
    document_token_rows,
    query_texts,
)
from csplade.model import lexical
from csplade.model.card import write_card
from csplade.model.encoder import SparseEncoder
from csplade.training import losses
from csplade.training.arguments import (
    CspladeTrainingArguments,
    DataArguments,
    LossArguments,
    ModelArguments,
)
from csplade.training.base import (
    CheckpointingTrainer,
    Evaluator,
    NonFiniteLossError,
    check_evaluator,
    remove_incomplete_checkpoints,
    resolve_resume,
)
from csplade.training.distributed import check_joined, gathered
from csplade.training.loading import load_encoder_for_training

logger = logging.getLogger(__name__)


class _EpochCallback(TrainerCallback):
    """Tells the dataset which epoch runs, so its per-item sampling is a function of (seed, epoch, i)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(int(math.floor(state.epoch or 0)))


class SparseTrainer(CheckpointingTrainer):
    """`transformers.Trainer` with SPLADE losses. `model` is a :class:`SparseEncoder`."""

    def __init__(
        self,
        model: SparseEncoder,
        args: CspladeTrainingArguments,
        loss_args: LossArguments | None = None,
        idf: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model=model, args=args, **kwargs)
        self.loss_args = loss_args or LossArguments()
        sa = self.loss_args
        self.reg_scheduler = losses.RegWeightScheduler(
            sa.lambda_q, sa.lambda_d, sa.reg_warmup_steps
        )
        if sa.doc_regularizer == "idf_flops" and idf is None:
            raise ValueError("doc_regularizer 'idf_flops' needs IDF weights (idf=…)")
        self.idf = idf
        if self.train_dataset is not None and hasattr(self.train_dataset, "set_epoch"):
            self.add_callback(_EpochCallback(self.train_dataset))

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        sa = self.loss_args
        q_reps, d_reps = model(query=inputs["query"], doc=inputs["doc"])  # (B, V), (B*n, V)
        if d_reps.shape[0] % q_reps.shape[0]:
            raise ValueError(
                f"{d_reps.shape[0]} documents for {q_reps.shape[0]} queries: not whole groups"
            )
        group_size = d_reps.shape[0] // q_reps.shape[0]
        world = self.accelerator.num_processes
        encoder: SparseEncoder = self.accelerator.unwrap_model(model)
        parts: dict[str, torch.Tensor] = {}
        weights: dict[str, float] = {}
        if sa.contrastive_weight > 0:
            parts["contrastive"] = losses.contrastive_loss(
                q_reps,
                d_reps,
                group_size,
                temperature=sa.temperature,
                in_batch_negatives=sa.in_batch_negatives,
                cross_device=sa.cross_device_negatives and sa.in_batch_negatives and world > 1,
            )
            weights["contrastive"] = sa.contrastive_weight
        if sa.distill_loss != "none":
            teacher = inputs.get("teacher_scores")
            if teacher is None:
                raise ValueError(
                    f"distill_loss={sa.distill_loss!r} needs teacher scores in the training data "
                    "(a 'scores' field in every group; see `csplade teacher-scores`)"
                )
            student = losses.group_scores(q_reps, d_reps, group_size)  # (B, n)
            if sa.distill_loss == "margin_mse":
                parts["distill"] = losses.margin_mse_loss(student, teacher)
            else:
                parts["distill"] = losses.kl_distill_loss(
                    student, teacher, temperature=sa.distill_temperature
                )
            weights["distill"] = sa.distill_weight
        lambda_q, lambda_d = self.reg_scheduler.weights(self.state.global_step)
        q_learned, d_learned = q_reps, d_reps
        if encoder.config.lexical_residual:  # the regularizers see the learned terms only
            q_learned = lexical.learned_part(q_reps, inputs["query"])
            if not encoder.config.lexical_docs:  # lexical documents are their residual alone
                d_learned = lexical.learned_part(d_reps, inputs["doc"])
        if sa.query_regularizer != "none" and not encoder.config.doc_only:
            parts["reg_q"] = losses.regularize(q_learned, sa.query_regularizer)
            weights["reg_q"] = lambda_q
        if sa.doc_regularizer != "none" and not encoder.config.lexical_docs:
            idf = self.idf.to(d_reps.device) if sa.doc_regularizer == "idf_flops" else None
            parts["reg_d"] = losses.regularize(d_learned, sa.doc_regularizer, idf=idf)
            weights["reg_d"] = lambda_d
        if not parts:
            raise ValueError("no loss to train: contrastive_weight is 0 and distill_loss is 'none'")
        total, logged = losses.combine(parts, weights)
        if not torch.isfinite(total.detach()):
            values = {k: float(v) for k, v in logged.items()}
            raise NonFiniteLossError(
                f"non-finite loss at optimizer step {self.state.global_step + 1}: {values}; "
                "lower the learning rate, check the data, or use float32"
            )
        if model.training:
            for name, value in logged.items():
                self.record(name, value)
            self.record("lambda_q", lambda_q)
            self.record("lambda_d", lambda_d)
            with torch.no_grad():
                self.record("q_nnz", (q_reps > 0).sum(dim=1).float().mean())
                self.record("d_nnz", (d_reps > 0).sum(dim=1).float().mean())
                if encoder.config.lexical_residual:  # the learned terms among them
                    self.record("q_learned_nnz", (q_learned > 0).sum(dim=1).float().mean())
                    if not encoder.config.lexical_docs:  # theirs are none
                        self.record("d_learned_nnz", (d_learned > 0).sum(dim=1).float().mean())
                # score scale: what InfoNCE's softmax sees (in hundreds, it saturates)
                scores = q_reps.float() @ d_reps.float().T  # (B, B*n)
                positives = scores[
                    torch.arange(len(q_reps)), torch.arange(len(q_reps)) * group_size
                ]
                self.record("score_pos", positives.mean())
                self.record("score_max", scores.max())
        if return_outputs:
            return total, {"q_reps": q_reps, "d_reps": d_reps}
        return total


def run_training(
    model_args: ModelArguments,
    loss_args: LossArguments,
    data_args: DataArguments,
    training_args: CspladeTrainingArguments,
    evaluator: Evaluator | None = None,
) -> Path:
    """Train the encoder a recipe describes; save it to `training_args.output_dir` and return that path.

    `evaluator` (the recipe's ``eval_data``: :mod:`csplade.evaluation.during_training`) runs every
    ``eval_steps``; with ``load_best_model_at_end`` the saved model is the best checkpoint's.
    """
    if not training_args.output_dir:
        raise ValueError("output_dir is required (in the recipe or as --output_dir)")
    if not data_args.train_data:
        raise ValueError("train_data is required (a JSONL of groups or a BEIR folder)")
    check_evaluator(training_args, evaluator)
    seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed
    dataset = load_training_groups(data_args, seed=seed)  # bad data fails before a model loads
    set_seed(training_args.seed)
    encoder = load_encoder_for_training(model_args)
    if model_args.lexical_residual and encoder.lexical is None:
        encoder.lexical = lexical.statistics(
            document_token_rows(encoder, dataset, lexical=True), encoder.vocab_size
        )
        logger.info(
            "lexical residual (%s): IDF over %d training documents, mean length %.1f tokens at %d",
            model_args.lexical_analyzer,
            encoder.lexical.n_docs,
            encoder.lexical.avgdl(model_args.doc_max_length),
            model_args.doc_max_length,
        )
    if model_args.head_bias_df is not None and (
        encoder.head_bias is None or model_args.head_bias_recalibrate
    ):
        calibrate_on_training_docs(
            encoder, dataset, model_args.head_bias_df, queries=model_args.head_bias_queries
        )
    idf = None
    if loss_args.doc_regularizer == "idf_flops" or model_args.doc_only:
        idf = corpus_idf(encoder, dataset)
        if model_args.doc_only:
            encoder.query_weights = idf.clone()
    trainer = SparseTrainer(
        model=encoder,
        args=training_args,
        loss_args=loss_args,
        idf=idf,
        train_dataset=dataset,
        data_collator=GroupCollator(encoder.tokenize),
        evaluator=evaluator,
    )
    check_joined(trainer.accelerator)
    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)
    if trainer.args.should_save:
        for folder in remove_incomplete_checkpoints(training_args.output_dir):
            logger.warning("removed incomplete checkpoint %s", folder)
    started = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    elapsed = time.time() - started
    trainer.save_model(training_args.output_dir)
    trainer.write_run_info(
        {
            "train_seconds": round(elapsed, 2),
            "train_loss": result.training_loss,
            "resumed_from": resume,
            "best_checkpoint": trainer.state.best_model_checkpoint,
            "model_args": asdict(model_args),
            "loss_args": asdict(loss_args),
            "data_args": asdict(data_args),
        }
    )
    if trainer.args.should_save:
        write_card(training_args.output_dir)
    return Path(training_args.output_dir)


def calibrate_on_training_docs(
    encoder: SparseEncoder, dataset, doc_fraction: float, n: int = 512, queries: bool = True
):
    """Calibrate the encoder's head bias on up to `n` training documents, and with `queries` on up to
    `n` training queries too, both spread over the training data (every process the same).

    A model ZeRO-3 partitioned at load time is held whole for the pass (before the engine exists).
    """
    lexical_docs = encoder.config.lexical_docs  # its documents use no head: queries alone
    texts = [] if lexical_docs else calibration_documents(dataset, n)
    query_list = query_texts(dataset, n) if queries or lexical_docs else None
    with gathered(encoder):
        encoder.calibrate_head_bias(texts, doc_fraction=doc_fraction, queries=query_list)


def merge_adapter(adapter_dir: str | Path, out: str | Path) -> Path:
    """Merge a saved LoRA encoder into its base and save a plain encoder folder."""
    encoder = SparseEncoder.from_pretrained(adapter_dir)
    if not encoder.is_adapter:
        raise ValueError(f"{adapter_dir} holds no LoRA adapter (nothing to merge)")
    encoder.backbone = encoder.backbone.merge_and_unload()
    encoder.save_pretrained(out)
    return Path(out)
