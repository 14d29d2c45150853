"""What both trainers share: csplade-format checkpoints, exact resume, metric logging, run info.

Both phases (:mod:`csplade.training.adaptation`, :mod:`csplade.training.contrastive`) are
`transformers.Trainer` subclasses of :class:`CheckpointingTrainer`, which adds:

- checkpoints in csplade's own folder format (:meth:`SparseEncoder.save_pretrained`: the LoRA adapter
  only, under LoRA) plus the Trainer's optimizer/scheduler/RNG state, so `resume_from_checkpoint` is
  exact; a checkpoint gets a completion marker once every file is written, and resuming picks the
  newest complete one (a checkpoint cut by a crash is never resumed from);
- metrics recorded per micro-batch (:meth:`CheckpointingTrainer.record`), averaged over the
  micro-batches since the last log and over the processes, and logged with the loss;
- a non-finite loss stops training with :class:`NonFiniteLossError`, which names the optimizer step;
- evaluation during training (:meth:`CheckpointingTrainer.evaluate`, as sentence-transformers' trainer
  runs its evaluator): an `evaluator` called on the encoder every ``eval_steps`` returns named metrics,
  logged with the training metrics (TensorBoard too), one line per evaluation in the log and kept in
  ``OUT/eval/history.json``; ``metric_for_best_model`` / ``load_best_model_at_end`` keep and restore
  the best csplade checkpoint. The evaluator itself (dev slices, exact search, pytrec_eval) is
  :mod:`csplade.evaluation.during_training`, built by the caller: this layer sees only a callable.

Under DeepSpeed and FSDP the engines' own formats carry the exact resume (DeepSpeed's
``global_step*`` partitions, FSDP's ``pytorch_model_fsdp*`` files, with their optimizer states); the
csplade folder beside them holds the gathered weights (ZeRO-3 needs
``stage3_gather_16bit_weights_on_model_save``, refused early without it). After training,
:meth:`CheckpointingTrainer.unsharded_encoder` gives the saving process the trained encoder whole
(merge, calibrate, save), however the engine sharded it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast_object_list
from safetensors.torch import load_file
from transformers import Trainer

from csplade._io import write_json_atomic
from csplade._logging import muted
from csplade.model.encoder import SparseEncoder
from csplade.model.io import load_head_bias
from csplade.training.distributed import check_engine, unsharded_loading

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "csplade_checkpoint_complete"
RUN_INFO = "run_info.json"
# the evaluations of a run; in a sub-folder, since a final save replaces the top-level files
EVAL_HISTORY = Path("eval") / "history.json"

# encoder -> {metric name: value}; optionally with .metric_names(encoder) and .summary(metrics)
Evaluator = Callable[[SparseEncoder], dict[str, float]]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class CheckpointingTrainer(Trainer):
    """`transformers.Trainer` that saves and resumes csplade encoder folders and logs named metrics.

    Subclasses say where the encoder is (:meth:`encoder`) and the prefix of its keys in the state dict
    of the wrapped model (`state_prefix`).
    """

    state_prefix = ""

    def __init__(
        self,
        *args: Any,
        evaluator: Evaluator | None = None,
        eval_head_bias: Callable[[SparseEncoder], None] | None = None,
        **kwargs: Any,
    ) -> None:
        """`evaluator`: run on the encoder every ``eval_steps`` (:meth:`evaluate`).
        `eval_head_bias`: sets the encoder's head bias before each evaluation (the adaptation phase
        calibrates its bias only when it saves: its curves evaluate the model as it would be saved);
        the encoder's own bias is put back after."""
        placeholder = evaluator is not None and kwargs.get("eval_dataset") is None
        if placeholder:  # transformers refuses an eval_strategy without an eval_dataset
            kwargs["eval_dataset"] = "csplade-evaluator"
        super().__init__(*args, **kwargs)
        if placeholder:
            self.eval_dataset = None
        self._metrics: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.evaluator = evaluator
        self.eval_head_bias = eval_head_bias
        self._clock: list[float] | None = None  # [train() start, seconds spent evaluating]
        check_engine(self.accelerator)
        if self.is_zero3() and not self._zero3_gathers_on_save():
            raise ValueError(
                "csplade saves encoder folders with their weights: under DeepSpeed ZeRO-3 set "
                "stage3_gather_16bit_weights_on_model_save: true in the DeepSpeed config "
                "(zero3_save_16bit_model: true in an accelerate config)"
            )
        if evaluator is not None:
            self._check_evaluation()

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, with the head bias in a group of its own at
        ``head_bias_learning_rate`` when one is set (the scheduler then scales both groups)."""
        optimizer = super().create_optimizer(model)
        lr = getattr(self.args, "head_bias_learning_rate", None)
        bias = self.encoder().head_bias
        if lr is None or bias is None or not bias.requires_grad:
            return optimizer
        if self.is_deepspeed_enabled:
            raise ValueError("head_bias_learning_rate is not supported under DeepSpeed (one lr)")
        groups = optimizer.param_groups
        for group in groups:
            group["params"] = [p for p in group["params"] if p is not bias]
        groups[:] = [group for group in groups if group["params"]]
        optimizer.add_param_group({"params": [bias], "lr": lr, "weight_decay": 0.0})
        return optimizer

    def encoder(self) -> SparseEncoder:
        return self.accelerator.unwrap_model(self.model)

    # ------------------------------------------------------------------ engines
    def is_zero3(self) -> bool:
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        return self.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3

    def is_sharded(self) -> bool:
        """Parameters are shards after training (ZeRO-3, FSDP): read them through the engine."""
        return self.is_zero3() or self.is_fsdp_enabled

    def _zero3_gathers_on_save(self) -> bool:
        zero = self.accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"]
        return str(zero.get("stage3_gather_16bit_weights_on_model_save", False)).lower() == "true"

    def unsharded_encoder(self, rebuild: Callable[[], SparseEncoder]) -> SparseEncoder | None:
        """The trained encoder with whole weights on the saving process; None on the others.

        Without sharding, the encoder itself. Under ZeRO-3 or FSDP every process must call this: the
        engine gathers the full state dict (ZeRO-3: 16-bit consolidation; FSDP2: full state dict on
        CPU), and the saving process loads it into a fresh encoder from `rebuild` (the model as
        loaded before training, built whole: :func:`unsharded_loading`).
        """
        if not self.is_sharded():
            return self.encoder() if self.args.should_save else None
        wrapped = self.model_wrapped if self.is_deepspeed_enabled else self.model
        state = self.accelerator.get_state_dict(wrapped)
        if not self.args.should_save:
            return None
        prefix = self.state_prefix
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        with unsharded_loading():
            encoder = rebuild()
        load_encoder_state(encoder, state)
        return encoder.to(self.args.device)

    # ------------------------------------------------------------------ evaluation
    def _check_evaluation(self) -> None:
        """Before training: the best-checkpoint metric is one the evaluator logs."""
        if self.eval_head_bias is not None and self.is_sharded():
            raise ValueError(
                "evaluation with a head bias calibrated per evaluation (adaptation with "
                "head_bias_df) is not supported under DeepSpeed ZeRO-3 or FSDP"
            )
        wanted = self.args.metric_for_best_model
        names = getattr(self.evaluator, "metric_names", None)
        if wanted is None or names is None:
            return
        known = names(self.encoder())
        if wanted.removeprefix("eval_") not in known:
            raise ValueError(
                f"metric_for_best_model {wanted!r} is not a metric of the evaluation; one of: "
                f"{', '.join(known)}"
            )

    def train(self, *args: Any, **kwargs: Any):
        self._clock = [time.perf_counter(), 0.0]
        return super().train(*args, **kwargs)

    def evaluate(
        self,
        eval_dataset: Any = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """Run the evaluator on the encoder as it is now; log its metrics as `<prefix>_<name>`.

        Also logged: ``<prefix>_runtime`` (seconds of this evaluation) and, during training,
        ``<prefix>_train_seconds`` (wall seconds of training since train() began in this process,
        evaluations excluded). Without an evaluator, the Trainer's own evaluation.
        """
        if self.evaluator is None:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        started = time.perf_counter()
        values = self._run_evaluator()
        seconds = time.perf_counter() - started
        metrics = {f"{metric_key_prefix}_{k}": float(v) for k, v in values.items()}
        metrics[f"{metric_key_prefix}_runtime"] = round(seconds, 2)
        if self._clock is not None:
            trained = started - self._clock[0] - self._clock[1]  # less the earlier evaluations
            metrics[f"{metric_key_prefix}_train_seconds"] = round(trained, 3)
            self._clock[1] += seconds
        if self.is_world_process_zero():
            summary = getattr(self.evaluator, "summary", None)
            text = (
                summary(values) if summary else ", ".join(f"{k} {v:.4g}" for k, v in values.items())
            )
            minutes = metrics.get(f"{metric_key_prefix}_train_seconds", 0.0) / 60
            logger.info("evaluation at step %d (%.1f min of training; took %.0f s): %s",
                        self.state.global_step, minutes, seconds, text)  # fmt: skip
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(
            self.args, self.state, self.control, metrics
        )
        if self.args.should_save:
            history = [h for h in self.state.log_history if any(k.startswith("eval_") for k in h)]
            write_json_atomic(Path(self.args.output_dir) / EVAL_HISTORY, history)
        return metrics

    def _run_evaluator(self) -> dict[str, float]:
        """The evaluator's metrics, the same on every process.

        Sharded weights (ZeRO-3, FSDP): every process evaluates (each forward gathers the shards on
        all of them). Otherwise the main process evaluates while the others wait for its numbers
        (the wait counts against the process group's ``ddp_timeout``).
        """
        if self.is_sharded() or self.accelerator.num_processes == 1:
            return self._evaluate_encoder()
        values = self._evaluate_encoder() if self.accelerator.is_main_process else None
        return broadcast_object_list([values])[0]

    def _evaluate_encoder(self) -> dict[str, float]:
        encoder = self.encoder()
        with _evaluation_head_bias(encoder, self.eval_head_bias):
            return dict(self.evaluator(encoder))

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
            state_dict = drop_tied_copies(self.encoder(), state_dict)
        elif self.is_sharded():  # the parameters here are shards: never write them as weights
            raise RuntimeError(f"no gathered state dict to save {output_dir} from")
        else:
            state_dict = None
        self.encoder().save_pretrained(output_dir, state_dict=state_dict, atomic=False)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """As the Trainer's; under FSDP with a sharded state-dict type the final model is gathered.

        (The Trainer writes nothing then; checkpoints keep FSDP's own sharded files, which resume
        reads, and no csplade folder.)
        """
        fsdp = self.accelerator.state.fsdp_plugin if self.is_fsdp_enabled else None
        if fsdp is not None and "FULL_STATE_DICT" not in str(fsdp.state_dict_type):
            if not _internal_call:
                self._save(output_dir, state_dict=self.accelerator.get_state_dict(self.model))
            return
        super().save_model(output_dir, _internal_call)

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        self.accelerator.wait_for_everyone()
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        if self.args.should_save and folder.is_dir():
            (folder / COMPLETE_MARKER).write_text(str(self.state.global_step))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:  # the engines' own formats
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        load_checkpoint_weights(self.encoder(), Path(resume_from_checkpoint))

    def _load_best_model(self) -> None:
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            super()._load_best_model()
            return
        best = self.state.best_model_checkpoint
        if best:
            load_checkpoint_weights(self.encoder(), Path(best))
            logger.info("restored the best checkpoint, %s (%s %.4f)", best,
                        self.args.metric_for_best_model, self.state.best_metric)  # fmt: skip

    def write_run_info(self, info: dict[str, Any]) -> None:
        """`run_info.json` in the output folder (main process only), with the run's log history."""
        if self.args.should_save:
            info = {
                "world_size": self.accelerator.num_processes,
                "distributed_type": str(self.accelerator.distributed_type),
                "global_step": self.state.global_step,
                # which SPLADE head ran (fused | naive | module): the (B, L, V) paths show here
                "head_calls": dict(getattr(self.encoder(), "head_calls", {})),
                **info,
                "log_history": self.state.log_history,
            }
            write_json_atomic(Path(self.args.output_dir) / RUN_INFO, info, default=str)


@contextlib.contextmanager
def _evaluation_head_bias(
    encoder: SparseEncoder, set_bias: Callable[[SparseEncoder], None] | None
) -> Iterator[None]:
    """Inside the block the encoder has the head bias `set_bias` gives it; its own after.

    The encoder's own bias (the parameter the optimizer holds, or None) is put back as it was.
    """
    if set_bias is None:
        yield
        return
    own, fingerprint = encoder.head_bias, encoder._fingerprint
    try:
        with muted("csplade.model.calibration"):  # its line per calibration: one per evaluation
            set_bias(encoder)
        yield
    finally:
        encoder.head_bias = own
        encoder._fingerprint = fingerprint


def check_evaluator(args: Any, evaluator: Evaluator | None) -> None:
    """Before anything loads: a recipe's ``eval_data`` needs the evaluator built from it, and an
    ``eval_strategy`` needs something to evaluate."""
    if getattr(args, "eval_data", None) and evaluator is None:
        raise ValueError(
            "eval_data is set but no evaluator was given: build it with "
            "csplade.evaluation.during_training.RetrievalEvaluator.from_args(training_args) "
            "(csplade train and csplade adapt do)"
        )
    strategy = str(getattr(args.eval_strategy, "value", args.eval_strategy))
    if evaluator is None and strategy != "no":
        raise ValueError(
            f"eval_strategy is {strategy!r} but there is nothing to evaluate: set eval_data (a "
            "BEIR folder or a name under $CSPLADE_DATA)"
        )


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


def drop_tied_copies(encoder: SparseEncoder, state: dict[str, torch.Tensor]) -> dict:
    """`state` without the second name of a tied parameter (FSDP's full state dict has both)."""
    own = encoder.state_dict(keep_vars=True)
    seen: set[int] = set()
    kept = {}
    for name, value in state.items():
        param = own.get(name)
        if param is not None and id(param) in seen:
            continue
        if param is not None:
            seen.add(id(param))
        kept[name] = value
    return kept


def load_encoder_state(encoder: SparseEncoder, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict of the encoder (its own key names) in place; tied copies may be absent.

    A head bias in `state` that the encoder lacks (calibrated or trained after it was built) is
    added. Any other missing or unexpected key is an error.
    """
    if "head_bias" in state and encoder.head_bias is None:
        encoder.head_bias = torch.nn.Parameter(state["head_bias"].detach().float().clone())
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    own = encoder.state_dict(keep_vars=True)
    present = {id(own[k]) for k in own if k in state}
    missing = [k for k in missing if id(own[k]) not in present]  # a tied weight loaded once
    if missing or unexpected:
        raise RuntimeError(
            f"the gathered state does not match the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    encoder._fingerprint = None


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
