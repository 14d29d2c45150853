"""`python tests/probed_cli.py [PROBES] -- VERB ARGS`: csplade's command line with test probes.

What `accelerate launch` runs in the distributed tests instead of `-m csplade`, so that each process
can be checked from inside:

- ``--no-vocab-tensors V``: during training, every op (forward and backward) that returns a tensor
  of 3 or more dimensions with a dimension of size V fails the run: the (B, L, V) logits of the naive
  head. The fused head's chunks are (B, C, L) with C < V (set ``head_chunk_size`` below V). (The
  head-bias calibration before training chunks its own logits and is not probed.)
- ``--sharding-report``: after training, each process writes ``sharding-rank{R}.json`` in the
  output folder's probes/: how many parameters it holds only a shard of (ZeRO-3 partitions, FSDP2 DTensor
  shards) and which, which ZeRO-3 keeps whole (persistent), the parameters' dtypes, the world size and
  mixed precision, the machine and local ranks the launcher gave, and the head paths the encoder took (``head_calls``).
- ``--fsdp-on-cpu``: accelerate 1.15 turns an FSDP config into FSDP only on GPUs (and XPU, NPU, …);
  on CPU it keeps plain DDP (csplade refuses that: see
  :func:`csplade.training.distributed.check_engine`). This probe sets the state accelerate sets on a
  GPU machine (distributed type FSDP, the plugin) so the FSDP2 paths run for real over gloo:
  ``fully_shard``, DTensor parameters, the Trainer's FSDP saving and loading are all the real ones.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class NoVocabTensors(TorchDispatchMode):
    """Fails on any op output with 3+ dimensions and one of size `vocab` (the naive head's logits)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor) and item.dim() >= 3 and self.vocab in item.shape:
                raise AssertionError(f"{func} built a {tuple(item.shape)} tensor (V={self.vocab})")
        return out


def _sharding(model: torch.nn.Module) -> dict:
    """Parameters of `model` this process holds only a shard of (ZeRO-3 or FSDP2), in all, their
    names, the names of those ZeRO-3 keeps whole (below `stage3_param_persistence_threshold`:
    DeepSpeed marks them `ds_persist`), and the FSDP2 units (modules `fully_shard` was applied to)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    sharded, persistent, dtypes = [], [], {}
    named = list(model.named_parameters())
    for name, param in named:
        dtype = str(param.ds_tensor.dtype if hasattr(param, "ds_tensor") else param.dtype)
        dtypes[dtype] = dtypes.get(dtype, 0) + 1
        if getattr(param, "ds_persist", False):
            persistent.append(name)
        elif hasattr(param, "ds_tensor") and param.ds_tensor.numel() < param.ds_numel:
            sharded.append(name)
        elif isinstance(param, DTensor) and param.to_local().numel() < param.numel():
            sharded.append(name)
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    compute = sorted({str(m._get_fsdp_state()._mp_policy.param_dtype) for m in units})
    return {
        "parameters": len(named),
        "sharded": len(sharded),
        "sharded_names": sharded,
        "persistent_names": persistent,
        "dtypes": dtypes,
        "fsdp_units": len(units),
        "fsdp_param_dtypes": compute,  # FSDP2's compute dtype (MixedPrecisionPolicy.param_dtype)
    }


def _probe_training(report: bool, no_vocab_tensors: int | None) -> None:
    """Wrap the trainers' `train`: the (B, L, V) probe around it, the sharding report after it."""
    from csplade.training.base import CheckpointingTrainer

    train = CheckpointingTrainer.train

    def probed_train(self, *args, **kwargs):
        if no_vocab_tensors is None:
            result = train(self, *args, **kwargs)
        else:
            with NoVocabTensors(no_vocab_tensors):
                result = train(self, *args, **kwargs)
        if report:
            _write_report(self)
        return result

    CheckpointingTrainer.train = probed_train


def _write_report(trainer) -> None:
    """`probes/sharding-rank{R}.json` in the output folder, for this process."""
    report = {
        **_sharding(trainer.model_wrapped),
        "distributed_type": str(trainer.accelerator.distributed_type),
        "world_size": trainer.accelerator.num_processes,
        # what the launcher (torchrun) set: the machine's rank and the process's rank on it
        "machine_rank": os.environ.get("GROUP_RANK"),
        "local_rank": os.environ.get("LOCAL_RANK"),
        "mixed_precision": str(trainer.accelerator.mixed_precision),
        "head_calls": dict(getattr(trainer.encoder(), "head_calls", {})),
    }
    rank = trainer.accelerator.process_index
    out = Path(trainer.args.output_dir) / "probes" / f"sharding-rank{rank}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report))


def _fsdp_on_cpu() -> None:
    import accelerate.state as state
    from accelerate.utils import DistributedType

    original = state.AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # what accelerate sets on a GPU machine, in both shared states (every later
            # AcceleratorState() copies PartialState's distributed type)
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":  # FSDP2's MixedPrecisionPolicy (param/reduce dtype)
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    state.AcceleratorState.__init__ = init


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-vocab-tensors", type=int, default=None, metavar="V")
    parser.add_argument("--sharding-report", action="store_true")
    parser.add_argument("--fsdp-on-cpu", action="store_true")
    parser.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    _probe_training(args.sharding_report, args.no_vocab_tensors)
    if args.fsdp_on_cpu:
        _fsdp_on_cpu()
    from csplade.cli import main as csplade_main

    return csplade_main(argv)


if __name__ == "__main__":
    sys.exit(main())
