"""Contrastive training of a SparseEncoder: a `transformers.Trainer` subclass.

The Trainer owns the loop, gradient accumulation, mixed precision, activation checkpointing,
checkpoints, resume, logging (`report_to` tensorboard / wandb) and the launchers (`accelerate launch` with
DDP, DeepSpeed ZeRO or FSDP). This module adds only what is specific to learned sparse retrieval:

- `compute_loss`: encode the queries and the grouped documents in one forward (one DDP forward per
  step) and call the objective, a :class:`csplade.training.losses.SpladeLoss` built from the recipe's
  loss keys (InfoNCE, distillation, query and document regularizers on the global batch with λ_q and
  λ_d stepped per OPTIMIZER step); with a lexical residual the regularizers see the learned terms only.
- logging of every loss part, λ_q, λ_d, the mean non-zeros of query and document vectors (and of their
  learned terms, with a lexical residual), and the score scale (mean positive and largest
  query-document score of the batch); checkpoints, resume and metric averaging:
  :mod:`csplade.training.base`.

Sharded weights: under DeepSpeed ZeRO-3 and FSDP2 the fused head reads the LM-head weight inside a module
whose hooks gather it for forward and backward (csplade.model.head.sharded), frozen or trained, tied or not,
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
from csplade.training.distributed import check_joined
from csplade.training.loading import load_encoder_for_training
from csplade.training.setup import fit_to_training_data

logger = logging.getLogger(__name__)


class _EpochCallback(TrainerCallback):
    """Tells the dataset which epoch runs, so its per-item sampling is a function of (seed, epoch, i)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(int(math.floor(state.epoch or 0)))


class SparseTrainer(CheckpointingTrainer):
    """`transformers.Trainer` with SPLADE losses. `model` is a :class:`SparseEncoder`.

    The objective is `loss` (a :class:`~csplade.training.losses.SpladeLoss`), or the one `loss_args`
    (a recipe's loss keys) describe for this model, with `idf` for ``idf_flops``.
    """

    def __init__(
        self,
        model: SparseEncoder,
        args: CspladeTrainingArguments,
        loss_args: LossArguments | None = None,
        idf: torch.Tensor | None = None,
        loss: losses.SpladeLoss | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model=model, args=args, **kwargs)
        self.loss_args = loss_args or LossArguments()
        if loss is None:
            loss = losses.SpladeLoss.from_arguments(
                self.loss_args,
                world_size=self.accelerator.num_processes,
                learned_queries=not model.config.doc_only,
                learned_documents=not (model.config.lexical_docs or model.config.frozen_docs),
                idf=idf,
            )
        self.loss = loss
        logger.info("objective: %s", loss)
        if self.train_dataset is not None and hasattr(self.train_dataset, "set_epoch"):
            self.add_callback(_EpochCallback(self.train_dataset))

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        q_reps, d_reps = model(query=inputs["query"], doc=inputs["doc"])  # (B, V), (B*n, V)
        encoder: SparseEncoder = self.accelerator.unwrap_model(model)
        batch = loss_inputs(encoder, q_reps, d_reps, inputs)
        out = self.loss(batch, self.state.global_step)
        if not torch.isfinite(out.total.detach()):
            values = {k: float(v) for k, v in out.parts.items()}
            raise NonFiniteLossError(
                f"non-finite loss at optimizer step {self.state.global_step + 1}: {values}; "
                "lower the learning rate, check the data, or use float32"
            )
        if model.training:
            for name, value in {**out.parts, **out.weights}.items():
                self.record(name, value)
            self._record_vectors(encoder, batch)
        if return_outputs:
            return out.total, {"q_reps": q_reps, "d_reps": d_reps}
        return out.total

    @torch.no_grad()
    def _record_vectors(self, encoder: SparseEncoder, batch: losses.LossInputs) -> None:
        """Mean non-zeros of the query and document vectors (and of their learned terms, with a
        lexical residual) and the score scale: what InfoNCE's softmax sees (in hundreds, it saturates)."""
        q_reps, d_reps = batch.q_reps, batch.d_reps
        self.record("q_nnz", (q_reps > 0).sum(dim=1).float().mean())
        self.record("d_nnz", (d_reps > 0).sum(dim=1).float().mean())
        if encoder.config.lexical_residual:  # the learned terms among them
            self.record("q_learned_nnz", (batch.q_learned > 0).sum(dim=1).float().mean())
            if not encoder.config.lexical_docs:  # theirs are none
                self.record("d_learned_nnz", (batch.d_learned > 0).sum(dim=1).float().mean())
        scores = q_reps.float() @ d_reps.float().T  # (B, B*n)
        rows = torch.arange(len(q_reps))
        self.record("score_pos", scores[rows, rows * batch.group_size].mean())
        self.record("score_max", scores.max())


def loss_inputs(
    encoder: SparseEncoder, q_reps: torch.Tensor, d_reps: torch.Tensor, inputs: dict
) -> losses.LossInputs:
    """The step's vectors for the loss; with a lexical residual the regularizers see the learned
    terms only (:func:`csplade.model.lexical.learned_part`; lexical documents have none)."""
    q_learned, d_learned = q_reps, d_reps
    if encoder.config.lexical_residual:
        q_learned = lexical.learned_part(q_reps, inputs["query"])
        if not encoder.config.lexical_docs:  # lexical documents are their residual alone
            d_learned = lexical.learned_part(d_reps, inputs["doc"])
    return losses.LossInputs(
        q_reps, d_reps, inputs.get("teacher_scores"), q_learned=q_learned, d_learned=d_learned
    )


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
    idf = fit_to_training_data(encoder, dataset, model_args, loss_args)
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
            **_cache_info(encoder),
        }
    )
    if trainer.args.should_save:
        write_card(training_args.output_dir)
        if model_args.frozen_docs_file:
            encoder.doc_vectors.save(model_args.frozen_docs_file)
    return Path(training_args.output_dir)


def _cache_info(encoder: SparseEncoder) -> dict:
    """The prefix cache's and the frozen documents' counts, for run_info.json (none: empty)."""
    out = {}
    cache = encoder.prefix_cache
    if cache is not None:
        info = {"texts": len(cache), "hits": cache.hits, "misses": cache.misses}
        logger.info("prefix cache: %s, %.1f MiB in memory", info, cache.bytes / 2**20)
        out["prefix_cache"] = {**info, "bytes": cache.bytes}
    vectors = encoder.doc_vectors
    if vectors is not None:
        out["doc_vectors"] = {"docs": len(vectors), "hits": vectors.hits, "misses": vectors.misses}
        logger.info("frozen documents: %s", out["doc_vectors"])
    return out


def merge_adapter(adapter_dir: str | Path, out: str | Path) -> Path:
    """Merge a saved LoRA encoder into its base and save a plain encoder folder."""
    encoder = SparseEncoder.from_pretrained(adapter_dir)
    if not encoder.is_adapter:
        raise ValueError(f"{adapter_dir} holds no LoRA adapter (nothing to merge)")
    if encoder.config.frozen_docs:
        raise ValueError(
            f"{adapter_dir} encodes documents with its adapter off (frozen_docs): a merged model "
            "would encode them with the query weights; use the folder as it is"
        )
    encoder.backbone = encoder.backbone.merge_and_unload()
    encoder.save_pretrained(out)
    return Path(out)
