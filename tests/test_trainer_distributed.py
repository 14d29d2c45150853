"""Training under `accelerate launch` with 2 processes on CPU (gloo): DDP and DeepSpeed ZeRO (more
ZeRO-3 cases: tests/test_zero3.py; FSDP2: tests/test_fsdp.py).

`accelerate launch --cpu --num_processes 2` silently runs ONE process (accelerate's multi-CPU path wants
mpirun), so these tests launch with `--multi_gpu`, which on a machine without GPUs runs 2 processes over
gloo, and every test asserts the world size the run reports.

The gradient test: one SGD step (lr 1, no momentum, no clipping) with 2 processes x batch b must move the
weights exactly as the same loss on the whole batch of 2b in one process: with cross-device negatives the
reference is InfoNCE over all 2b queries against all docs; without, InfoNCE within each process's half; FLOPS
is always on the global batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import deepspeed  # noqa: F401  (required: a missing install fails the suite, never skips it)
import pytest
import torch
from launching import (
    QUERIES,
    STEPS,
    assert_same_weights,
    launch,
    reference_train_step,
    sharding_reports,
    train_args,
    weights,
    zero_config,
)
from safetensors.torch import load_file
from synthetic import save_base, write_groups

from csplade.data.groups import load_training_groups
from csplade.data.sampling import GroupCollator
from csplade.model.encoder import SparseEncoder
from csplade.training import losses
from csplade.training.arguments import DataArguments

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[1]
B = 4  # queries per process
N = 3  # docs per query


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    return {
        "base": save_base(root / "base"),
        "groups": write_groups(root / "groups.jsonl", n=2 * B),
        "groups3": write_groups(root / "groups3.jsonl", n=2 * QUERIES * STEPS),
    }


def _launch(setup, out: Path, *extra: str, config: str | None = None, world: int = 2):
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    if config:
        launcher += ["--config_file", str(REPO / "accelerate_configs" / config)]
    else:
        launcher += ["--multi_gpu"]
    launcher += [
        "--num_processes", str(world), "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", "0", "-m", "csplade", "train",
        "--model_name_or_path", str(setup["base"]), "--train_data", str(setup["groups"]),
        "--output_dir", str(out), "--group_size", str(N), "--save_steps", "1000",
        "--logging_steps", "1", "--seed", "3", *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(launcher, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    info = json.loads((out / "run_info.json").read_text())
    return info


def _sgd_step_args(cross_device: bool) -> list[str]:
    return [
        "--per_device_train_batch_size", str(B), "--max_steps", "1", "--optim", "sgd",
        "--learning_rate", "1.0", "--lr_scheduler_type", "constant", "--warmup_steps", "0",
        "--weight_decay", "0", "--max_grad_norm", "0", "--train_sampling_strategy", "sequential",
        "--lambda_q", "0.05", "--lambda_d", "0.02", "--reg_warmup_steps", "0",
        "--cross_device_negatives", str(cross_device).lower(),
    ]  # fmt: skip


def _reference_update(setup, cross_device: bool) -> dict[str, torch.Tensor]:
    """Weights after one SGD step (lr 1) on the loss the 2-process run must be computing."""
    encoder = SparseEncoder.from_pretrained(setup["base"]).train()
    dataset = load_training_groups(
        DataArguments(train_data=str(setup["groups"]), group_size=N), seed=3
    )
    collate = GroupCollator(encoder.tokenize)
    halves = [collate([dataset[i] for i in range(r * B, (r + 1) * B)]) for r in range(2)]
    reps = [encoder(query=h["query"], doc=h["doc"]) for h in halves]
    q_all = torch.cat([q for q, _ in reps])
    d_all = torch.cat([d for _, d in reps])
    if cross_device:
        contrastive = losses.contrastive_loss(q_all, d_all, N)
    else:
        contrastive = sum(losses.contrastive_loss(q, d, N) for q, d in reps) / 2
    loss = contrastive + 0.05 * losses.flops(q_all) + 0.02 * losses.flops(d_all)
    loss.backward()
    with torch.no_grad():
        return {
            k: p - p.grad if p.grad is not None else p.clone()
            for k, p in encoder.backbone.named_parameters()
        }


@pytest.mark.parametrize("cross_device", [True, False])
def test_two_processes_equal_one_process_on_the_whole_batch(setup, tmp_path, cross_device):
    out = tmp_path / "ddp"
    info = _launch(setup, out, *_sgd_step_args(cross_device))
    assert info["world_size"] == 2 and info["global_step"] == 1
    got = load_file(out / "model.safetensors")
    want = _reference_update(setup, cross_device)
    base = load_file(setup["base"] / "model.safetensors")
    moved = 0
    for name, value in want.items():
        if name not in got:  # the tied LM head is saved once, as the embeddings
            continue
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-5, msg=name)
        moved += int(not torch.equal(got[name], base[name]))
    assert moved > 10  # the step really changed the weights


def test_ddp_runs_a_few_steps_with_lora(setup, tmp_path):
    info = _launch(
        setup, tmp_path / "lora", "--per_device_train_batch_size", "2", "--max_steps", "3",
        "--use_lora", "--lora_r", "4",
    )  # fmt: skip
    assert info["world_size"] == 2 and info["global_step"] == 3
    assert "MULTI_CPU" in info["distributed_type"]  # DDP over gloo: no GPU here


@pytest.mark.parametrize("shipped", ["zero2.yaml", "zero3.yaml"])
def test_deepspeed_zero_steps_on_cpu(setup, tmp_path, shipped):
    """3 SGD steps of a full fine-tune under the ZeRO settings of the shipped config equal one
    process's steps on the whole batch (1e-5); under ZeRO-3 every parameter is partitioned (the
    persistence threshold is 0: tests/launching.py) and the fused head runs."""
    out = tmp_path / "zero"
    args = train_args(setup["base"], setup["groups3"], out, "--head_chunk_size", "64")
    probes = ("--sharding-report", "--no-vocab-tensors", "256")
    launch(zero_config(tmp_path, shipped), "train", *args, probes=probes)
    info = json.loads((out / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["global_step"] == STEPS
    assert "DEEPSPEED" in info["distributed_type"]
    for report in sharding_reports(out):
        partitioned = report["parameters"] if shipped == "zero3.yaml" else 0
        assert report["sharded"] == partitioned, report
        assert report["head_calls"] == {"fused": 2 * STEPS}, report
    want = reference_train_step(setup["base"], setup["groups3"], tmp_path / "reference")
    assert_same_weights(weights(out), want)
    reloaded = SparseEncoder.from_pretrained(out)
    vec = reloaded.encode_docs(["aa ab ac"], show_progress=False)
    assert vec.nnz > 0
