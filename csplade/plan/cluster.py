"""How a run is spread over GPUs, read from an accelerate config (accelerate's own YAML format).

`load_cluster` reads ``distributed_type`` (NO, MULTI_GPU, DEEPSPEED, FSDP), the machine and process
counts, DeepSpeed's ZeRO stage and offload devices (inline, or from the JSON file named by
``deepspeed_config_file``), FSDP's sharding strategy (version 1 or 2), CPU offload and activation
checkpointing, and ``mixed_precision``. :meth:`Cluster.shards` says over how many GPUs parameters,
gradients and optimizer states are divided.

Known limits: DeepSpeed's own activation checkpointing settings are not read, nor its bucket sizes
(DeepSpeed's defaults are assumed); a ZeRO stage of "auto" is refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

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
    # FULL_SHARD | SHARD_GRAD_OP | NO_SHARD | HYBRID_SHARD | HYBRID_SHARD_ZERO2
    fsdp_sharding: str = ""
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
        kwargs = _deepspeed_settings(data, path, where)
    elif dtype == "FSDP":
        kwargs = _fsdp_settings(data, where)
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


def _deepspeed_settings(data: dict[str, Any], path: Path, where: str) -> dict[str, Any]:
    """ZeRO stage and offloading, from ``deepspeed_config`` or the JSON file it names."""
    ds = data.get("deepspeed_config") or {}
    if not isinstance(ds, dict):
        raise ValueError(f"{where}: deepspeed_config must be a mapping")
    if ds.get("deepspeed_config_file"):
        return _read_deepspeed_json(path.parent, str(ds["deepspeed_config_file"]), where)
    return {
        "zero_stage": int(ds.get("zero_stage", 0)),
        "offload_optimizer": _offload(
            ds.get("offload_optimizer_device"), "offload_optimizer_device", where
        ),
        "offload_params": _offload(ds.get("offload_param_device"), "offload_param_device", where),
    }


def _fsdp_settings(data: dict[str, Any], where: str) -> dict[str, Any]:
    """Sharding strategy, CPU offload and activation checkpointing of ``fsdp_config`` (v1 or v2)."""
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
    offload = _flag(fsdp.get("fsdp_offload_params", False))
    return {
        "fsdp_sharding": strategy,
        "offload_params": offload,
        "offload_optimizer": offload,
        "activation_checkpointing": _flag(fsdp.get("fsdp_activation_checkpointing", False)),
    }


def _read_deepspeed_json(base: Path, name: str, where: str) -> dict[str, Any]:
    """ZeRO stage and offloading of a DeepSpeed JSON config, looked up next to the accelerate config
    first, then as given."""
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

    def device(key: str) -> str:
        return (zero.get(key) or {}).get("device") or "none"

    return {
        "zero_stage": int(stage),
        "offload_optimizer": _offload(
            device("offload_optimizer"), "offload_optimizer.device", str(path)
        ),
        "offload_params": _offload(device("offload_param"), "offload_param.device", str(path)),
    }
