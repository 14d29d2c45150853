"""Contrastive training of a SparseEncoder: a `transformers.Trainer` subclass.

The Trainer owns the loop, gradient accumulation, mixed precision, activation checkpointing,
checkpoints, resume, logging (`report_to` tensorboard / wandb) and the launchers (`accelerate launch` with
DDP, DeepSpeed ZeRO or FSDP). This module adds only what is specific to learned sparse retrieval:

- `compute_loss`: encode the queries and the grouped documents in one forward (one DDP forward per
  step), then InfoNCE (:func:`csplade.training.losses.contrastive_loss`, optionally with cross-device negatives),
  optional distillation from teacher scores (MarginMSE or KL), and sparsity regularizers on queries and
  documents (FLOPS / L1 / IDF-aware FLOPS) computed on the *global* batch so the density of the model does
  not depend on the number of GPUs. λ_q and λ_d follow a quadratic warm-up stepped per OPTIMIZER step
  (`state.global_step`), never per micro-batch.
- logging of every loss part, λ_q, λ_d, and the mean non-zeros of query and document vectors, averaged
  over the micro-batches since the last log (this process's view).
- checkpoints in csplade's own folder format (:meth:`SparseEncoder.save_pretrained`: the LoRA adapter only,
  under LoRA) plus the Trainer's optimizer/scheduler/RNG state, so `resume_from_checkpoint` is exact; a
  checkpoint gets a completion marker once every file is written, and resuming picks the newest complete
  one (a checkpoint cut by a crash is never resumed from).
- a non-finite loss stops training with an error that names the optimizer step.

Limits: DeepSpeed ZeRO-3 partitions the LM-head weight that the fused head reads directly; under ZeRO-3 the
head weight is gathered for the forward when it is frozen (LoRA), and a trainable head falls back to calling
the module (the naive head). Multi-node launch is accelerate's; nothing here depends on the world size
except the loss math, which is exact for any split (see csplade.training.losses).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from collections import defaultdict
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from csplade.model.encoder import SparseEncoder
from csplade.training import losses
from csplade.training.arguments import (
    CspladeTrainingArguments,
    DataArguments,
    ModelArguments,
    SparsityArguments,
)

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "csplade_checkpoint_complete"
RUN_INFO = "run_info.json"


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class _EpochCallback(TrainerCallback):
    """Tells the dataset which epoch runs, so its per-item sampling is a function of (seed, epoch, i)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(int(math.floor(state.epoch or 0)))


class SparseTrainer(Trainer):
    """`transformers.Trainer` with SPLADE losses. `model` is a :class:`SparseEncoder`."""

    def __init__(
        self,
        model: SparseEncoder,
        args: CspladeTrainingArguments,
        sparsity_args: SparsityArguments | None = None,
        idf: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model=model, args=args, **kwargs)
        self.sparsity_args = sparsity_args or SparsityArguments()
        sa = self.sparsity_args
        self.reg_scheduler = losses.RegWeightScheduler(
            sa.lambda_q, sa.lambda_d, sa.reg_warmup_steps
        )
        if sa.doc_regularizer == "idf_flops" and idf is None:
            raise ValueError("doc_regularizer 'idf_flops' needs IDF weights (idf=…)")
        self.idf = idf
        self._metrics: dict[str, list[float]] = defaultdict(list)
        if self.train_dataset is not None and hasattr(self.train_dataset, "set_epoch"):
            self.add_callback(_EpochCallback(self.train_dataset))

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        sa = self.sparsity_args
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
        if sa.query_regularizer != "none" and not encoder.config.doc_only:
            parts["reg_q"] = losses.regularize(q_reps, sa.query_regularizer)
            weights["reg_q"] = lambda_q
        if sa.doc_regularizer != "none":
            idf = self.idf.to(d_reps.device) if sa.doc_regularizer == "idf_flops" else None
            parts["reg_d"] = losses.regularize(d_reps, sa.doc_regularizer, idf=idf)
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
                self._metrics[name].append(float(value))
            self._metrics["lambda_q"].append(lambda_q)
            self._metrics["lambda_d"].append(lambda_d)
            with torch.no_grad():
                self._metrics["q_nnz"].append(float((q_reps > 0).sum(dim=1).float().mean()))
                self._metrics["d_nnz"].append(float((d_reps > 0).sum(dim=1).float().mean()))
        if return_outputs:
            return total, {"q_reps": q_reps, "d_reps": d_reps}
        return total

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._metrics:
            for name, values in self._metrics.items():
                logs[name] = sum(values) / len(values)
            self._metrics.clear()
        super().log(logs, start_time)

    # ------------------------------------------------------------------ checkpoints
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        encoder: SparseEncoder = self.accelerator.unwrap_model(self.model)
        if state_dict is not None and not state_dict:
            state_dict = None  # DeepSpeed's placeholder when it saves its own checkpoint files
        encoder.save_pretrained(output_dir, state_dict=state_dict, atomic=False)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        self.accelerator.wait_for_everyone()
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        if self.args.should_save and folder.is_dir():
            (folder / COMPLETE_MARKER).write_text(str(self.state.global_step))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        encoder: SparseEncoder = self.accelerator.unwrap_model(model or self.model)
        load_checkpoint_weights(encoder, Path(resume_from_checkpoint))

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best:
            load_checkpoint_weights(self.accelerator.unwrap_model(self.model), Path(best))


def load_checkpoint_weights(encoder: SparseEncoder, folder: Path) -> None:
    """Load the weights of a csplade checkpoint folder into `encoder` in place (adapter or full)."""
    from safetensors.torch import load_file

    from csplade.model.encoder import load_head_bias

    head_bias = load_head_bias(folder)
    if head_bias is not None:
        if encoder.head_bias is None:
            raise RuntimeError(f"checkpoint {folder} has a head bias the model lacks")
        with torch.no_grad():
            encoder.head_bias.copy_(head_bias.to(encoder.head_bias.device))
    adapter_file = folder / "adapter_model.safetensors"
    if encoder.is_adapter:
        if not adapter_file.exists():
            raise FileNotFoundError(f"{adapter_file} not found: checkpoint has no LoRA adapter")
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(encoder.backbone, load_file(adapter_file))
        bad = [k for k in result.unexpected_keys]
        if bad:
            raise RuntimeError(f"{adapter_file}: unexpected adapter keys {bad[:5]}")
        return
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no model*.safetensors in checkpoint {folder}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(file))
    missing, unexpected = encoder.backbone.load_state_dict(state, strict=False)
    tied = (
        {"lm_head.weight"}
        if encoder.base_model.config.get_text_config().tie_word_embeddings
        else set()
    )
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(
            f"checkpoint {folder} does not match the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )


def latest_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest `checkpoint-N` under `output_dir` whose completion marker exists (None if none)."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found: list[tuple[int, Path]] = []
    for child in root.iterdir():
        match = re.fullmatch(r"checkpoint-(\d+)", child.name)
        if not match or not child.is_dir():
            continue
        if (child / COMPLETE_MARKER).exists():
            found.append((int(match.group(1)), child))
        else:
            logger.warning("ignoring incomplete checkpoint %s (no completion marker)", child)
    return max(found)[1] if found else None


def resolve_resume(value: str | None, output_dir: str) -> str | None:
    if value in (None, "", "false", "False", "no"):
        return None
    if value in ("true", "True", "latest", "yes"):
        found = latest_complete_checkpoint(output_dir)
        if found is None:
            logger.info("no complete checkpoint in %s: starting from scratch", output_dir)
            return None
        logger.info("resuming from %s", found)
        return str(found)
    path = Path(value)
    if not (path / COMPLETE_MARKER).exists():
        raise FileNotFoundError(
            f"{path} is not a complete csplade checkpoint (no {COMPLETE_MARKER})"
        )
    return str(path)


def resolve_data_path(value: str) -> str:
    """A path as is; otherwise a BEIR data set name looked up under $CSPLADE_DATA (csplade.data.beir)."""
    if Path(value).exists():
        return value
    from csplade.data.beir import find_dataset

    return str(find_dataset(value))


def run_training(
    model_args: ModelArguments,
    sparsity_args: SparsityArguments,
    data_args: DataArguments,
    training_args: CspladeTrainingArguments,
) -> Path:
    """Train the encoder a recipe describes; save it to `training_args.output_dir` and return that path."""
    from transformers import set_seed

    from csplade.data.groups import GroupCollator, load_training_groups
    from csplade.training.loading import load_encoder_for_training

    if not training_args.output_dir:
        raise ValueError("output_dir is required (in the recipe or as --output_dir)")
    if not data_args.train_data:
        raise ValueError("train_data is required (a JSONL of groups or a BEIR folder)")
    data_args = replace(data_args, train_data=resolve_data_path(data_args.train_data))
    set_seed(training_args.seed)
    encoder = load_encoder_for_training(model_args)
    seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed
    dataset = load_training_groups(data_args, seed=seed)
    if model_args.head_bias_df is not None and encoder.head_bias is None:
        calibrate_on_training_docs(encoder, dataset, model_args.head_bias_df)
    idf = None
    if sparsity_args.doc_regularizer == "idf_flops" or model_args.doc_only:
        from csplade.data.groups import corpus_idf

        idf = corpus_idf(encoder, dataset)
        if model_args.doc_only:
            encoder.query_weights = idf.clone()
    trainer = SparseTrainer(
        model=encoder,
        args=training_args,
        sparsity_args=sparsity_args,
        idf=idf,
        train_dataset=dataset,
        data_collator=GroupCollator(encoder.tokenize),
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != trainer.accelerator.num_processes:
        raise RuntimeError(
            f"{launched} processes were launched but the trainer joined {trainer.accelerator.num_processes}; "
            "each process would train alone (on CPU, launch with --multi_gpu or set use_cpu: true)"
        )
    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)
    if trainer.args.should_save:
        for folder in remove_incomplete_checkpoints(training_args.output_dir):
            logger.warning("removed incomplete checkpoint %s", folder)
    started = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    elapsed = time.time() - started
    trainer.save_model(training_args.output_dir)
    if trainer.args.should_save:
        out = Path(training_args.output_dir)
        info = {
            "world_size": trainer.accelerator.num_processes,
            "distributed_type": str(trainer.accelerator.distributed_type),
            "global_step": trainer.state.global_step,
            "train_seconds": round(elapsed, 2),
            "train_loss": result.training_loss,
            "resumed_from": resume,
            "log_history": trainer.state.log_history,
            "model_args": asdict(model_args),
            "sparsity_args": asdict(sparsity_args),
            "data_args": asdict(data_args),
        }
        tmp = out / f".{RUN_INFO}.tmp"
        tmp.write_text(json.dumps(info, indent=2, default=str))
        os.replace(tmp, out / RUN_INFO)
    return Path(training_args.output_dir)


def calibrate_on_training_docs(encoder: SparseEncoder, dataset, doc_fraction: float, n: int = 512):
    """Calibrate the encoder's head bias on up to `n` training documents (every process the same)."""
    import itertools

    from csplade.data.groups import document_texts

    texts = list(itertools.islice(document_texts(dataset), n))
    encoder.calibrate_head_bias(texts, doc_fraction=doc_fraction)


def merge_adapter(adapter_dir: str | Path, out: str | Path) -> Path:
    """Merge a saved LoRA encoder into its base and save a plain encoder folder."""
    encoder = SparseEncoder.from_pretrained(adapter_dir)
    if not encoder.is_adapter:
        raise ValueError(f"{adapter_dir} holds no LoRA adapter (nothing to merge)")
    encoder.backbone = encoder.backbone.merge_and_unload()
    encoder.save_pretrained(out)
    return Path(out)


def remove_incomplete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Delete `checkpoint-N` folders without a completion marker (left by a crash); returns them."""
    removed = []
    root = Path(output_dir)
    if root.is_dir():
        for child in root.glob("checkpoint-*"):
            if child.is_dir() and not (child / COMPLETE_MARKER).exists():
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
    return removed
