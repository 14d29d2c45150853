"""What both trainers share: csplade-format checkpoints, exact resume, metric logging, run info.

Both phases (:mod:`csplade.training.adaptation`, :mod:`csplade.training.contrastive`) are
`transformers.Trainer` subclasses of :class:`CheckpointingTrainer`, which adds:

- checkpoints in csplade's own folder format (:meth:`SparseEncoder.save_pretrained`: the LoRA adapter
  only, under LoRA) plus the Trainer's optimizer/scheduler/RNG state, so `resume_from_checkpoint` is
  exact; a checkpoint gets a completion marker once every file is written, and resuming picks the
  newest complete one (a checkpoint cut by a crash is never resumed from);
- metrics recorded per micro-batch (:meth:`CheckpointingTrainer.record`), averaged over the
  micro-batches since the last log and over the processes, and logged with the loss;
- a non-finite loss stops training with :class:`NonFiniteLossError`, which names the optimizer step.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import Trainer

from csplade._io import write_json_atomic
from csplade.model.encoder import SparseEncoder
from csplade.model.io import load_head_bias

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "csplade_checkpoint_complete"
RUN_INFO = "run_info.json"


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class CheckpointingTrainer(Trainer):
    """`transformers.Trainer` that saves and resumes csplade encoder folders and logs named metrics.

    Subclasses say where the encoder is (:meth:`encoder`) and the prefix of its keys in the state dict
    of the wrapped model (`state_prefix`).
    """

    state_prefix = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._metrics: dict[str, list[torch.Tensor]] = defaultdict(list)

    def encoder(self) -> SparseEncoder:
        return self.accelerator.unwrap_model(self.model)

    # ------------------------------------------------------------------ metrics
    def record(self, name: str, value: torch.Tensor | float) -> None:
        """Keep one micro-batch's value of a metric until the next log."""
        if not torch.is_tensor(value):
            value = torch.tensor(float(value))
        self._metrics[name].append(value.detach().float().reshape(()))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._metrics:
            names = sorted(self._metrics)
            means = torch.stack([torch.stack(self._metrics[n]).cpu().mean() for n in names])
            if self.accelerator.num_processes > 1:
                means = self.accelerator.reduce(means.to(self.args.device), reduction="mean")
            logs.update(zip(names, means.tolist(), strict=True))
            self._metrics.clear()
        super().log(logs, start_time)

    # ------------------------------------------------------------------ checkpoints
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        if state_dict:  # a DeepSpeed / FSDP gather of the wrapped model
            prefix = self.state_prefix
            state_dict = {
                k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)
            }
        else:
            state_dict = None  # DeepSpeed's placeholder when it saves its own checkpoint files
        self.encoder().save_pretrained(output_dir, state_dict=state_dict, atomic=False)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        self.accelerator.wait_for_everyone()
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        if self.args.should_save and folder.is_dir():
            (folder / COMPLETE_MARKER).write_text(str(self.state.global_step))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_checkpoint_weights(self.encoder(), Path(resume_from_checkpoint))

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best:
            load_checkpoint_weights(self.encoder(), Path(best))

    def write_run_info(self, info: dict[str, Any]) -> None:
        """`run_info.json` in the output folder (main process only), with the run's log history."""
        if self.args.should_save:
            info = {
                "world_size": self.accelerator.num_processes,
                "distributed_type": str(self.accelerator.distributed_type),
                "global_step": self.state.global_step,
                **info,
                "log_history": self.state.log_history,
            }
            write_json_atomic(Path(self.args.output_dir) / RUN_INFO, info, default=str)


def load_checkpoint_weights(encoder: SparseEncoder, folder: Path) -> None:
    """Load the weights of a csplade checkpoint folder into `encoder` in place (adapter or full)."""
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
        if result.unexpected_keys:
            raise RuntimeError(
                f"{adapter_file}: unexpected adapter keys {result.unexpected_keys[:5]}"
            )
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
    """`resume_from_checkpoint` as a checkpoint folder: false/None, true/latest, or a path."""
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
