"""Launching csplade under `accelerate launch` with 2 CPU processes (gloo), and one-process references.

`accelerate launch --cpu --num_processes 2` silently runs ONE process (accelerate's multi-CPU path wants
mpirun), so the launches here use `--multi_gpu` or a DeepSpeed / FSDP config, which on a machine without
GPUs run 2 processes over gloo; the tests assert the world size the run reports.

ZeRO-3 configs: DeepSpeed keeps every parameter below `stage3_param_persistence_threshold` (1e5
elements by default) whole on every process, which is every parameter of a tiny model; the configs
written here set it to 0, so every parameter is partitioned, as an 8B model's are. Each test asserts
it through the `--sharding-report` probe of tests/probed_cli.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file
from tiny import tiny_words

REPO = Path(__file__).resolve().parents[1]
PROBED_CLI = REPO / "tests" / "probed_cli.py"


def zero_config(folder: Path, shipped: str = "zero3.yaml", **zero: object) -> Path:
    """An accelerate config for 2 CPU processes with the ZeRO settings of `accelerate_configs/<shipped>`.

    The DeepSpeed part goes to a JSON file (accelerate's inline keys cannot set the persistence
    threshold), with `stage3_param_persistence_threshold: 0` under stage 3 and `zero` overrides.
    """
    shipped_cfg = yaml.safe_load((REPO / "accelerate_configs" / shipped).read_text())
    inline = shipped_cfg["deepspeed_config"]
    stage = int(inline["zero_stage"])
    zero_opt: dict[str, object] = {"stage": stage}
    if stage == 3:
        zero_opt["stage3_param_persistence_threshold"] = 0
        zero_opt["stage3_gather_16bit_weights_on_model_save"] = bool(
            inline.get("zero3_save_16bit_model", False)
        )
    zero_opt.update(zero)
    ds = {
        "zero_optimization": zero_opt,
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": "auto"},
    }
    folder.mkdir(parents=True, exist_ok=True)
    ds_file = folder / f"ds-{shipped.removesuffix('.yaml')}.json"
    ds_file.write_text(json.dumps(ds, indent=1))
    config = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "DEEPSPEED",
        "deepspeed_config": {
            "deepspeed_config_file": str(ds_file),
            "zero3_init_flag": bool(inline.get("zero3_init_flag", False)),
        },
        "num_machines": 1,
        "num_processes": 2,
        "machine_rank": 0,
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": False,
    }
    out = folder / f"accelerate-{shipped}"
    out.write_text(yaml.safe_dump(config))
    return out


def launcher(config: Path | None, verb: str, *args: str, probes: tuple[str, ...] = ()) -> list[str]:
    """The `accelerate launch` command line running `csplade VERB ARGS` in 2 processes."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    cmd += ["--config_file", str(config)] if config else ["--multi_gpu"]
    if config is None or "DEEPSPEED" not in config.read_text():
        cmd += ["--mixed_precision", "no"]
    cmd += [
        "--num_processes", "2", "--num_machines", "1", "--dynamo_backend", "no",
        "--main_process_port", "0", str(PROBED_CLI), *probes, "--", verb, *args,
    ]  # fmt: skip
    return cmd


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def launch(config: Path | None, verb: str, *args: str, probes: tuple[str, ...] = ()):
    """Run the launch to the end; fail with its output tails on a non-zero exit."""
    result = subprocess.run(
        launcher(config, verb, *args, probes=probes),
        env=env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]
    return result


def run_one_process(verb: str, *args: str) -> None:
    """`python -m csplade VERB ARGS --use_cpu true` in one process (the reference of a launch)."""
    result = subprocess.run(
        [sys.executable, "-m", "csplade", verb, *args, "--use_cpu", "true"],
        env=env(),
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]


def launch_and_kill(config: Path | None, verb: str, *args: str, marker: Path, probes=()) -> None:
    """Start the launch, and SIGKILL its whole process group once `marker` exists."""
    proc = subprocess.Popen(
        launcher(config, verb, *args, probes=probes),
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the kill reaches the workers too
    )
    deadline = time.time() + 600
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    alive = proc.poll() is None
    if alive:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.exists(), f"the run never wrote {marker}"
    assert alive, "the run finished before it could be killed"


def planned_head(folder: Path, args: list[str]) -> str:
    """The head `csplade plan` models for these `csplade train` arguments (ties plan to code)."""
    from csplade.plan.memory import head_path
    from csplade.plan.workload import read_workload

    recipe = folder / "plan-recipe.yaml"
    recipe.write_text("{}\n")  # every setting comes from `args`
    return head_path(read_workload(recipe, list(args)))


def sharding_reports(out: Path) -> list[dict]:
    """The `--sharding-report` of each process, by rank."""
    return [json.loads((out / "probes" / f"sharding-rank{r}.json").read_text()) for r in range(2)]


# Two processes sum gradients in another order than one (gloo all-reduce / reduce-scatter), and
# float32 rounding grows with a weight's size through the SGD steps: in one full-suite run a ZeRO-3
# LoRA A weight of 0.57 ended 1.1e-5 from the one-process value (atol alone allowed 1e-5). A
# relative term of 2e-5 (~170 float32 ulps) covers that; a wrong reduction moves weights by far more.
RTOL_REDUCTION_ORDER = 2e-5


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files of an encoder folder (model, adapter, head bias)."""
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        if file.name != "query_weights.safetensors":
            out.update(load_file(file))
    return out


def assert_same_weights(
    got: dict, want: dict, atol: float = 1e-5, rtol: float = RTOL_REDUCTION_ORDER
) -> None:
    assert got.keys() == want.keys(), (sorted(got.keys() ^ want.keys())[:5], len(got), len(want))
    for name in want:
        assert got[name].numel() > 0, f"{name} is empty"
        torch.testing.assert_close(
            got[name].float(),
            want[name].float(),
            rtol=rtol,
            atol=atol,
            msg=lambda m, name=name: f"{name}: {m}",
        )


STEPS = 3  # SGD steps of the equality tests; DeepSpeed's module trace is complete from step 2 on
QUERIES = 4  # queries per process and step
GROUP = 3  # docs per query
LR = 0.1  # larger steps amplify float rounding (argmax flips) past 1e-5 by step 3, DDP included


def train_args(base: Path, groups: Path, out: Path, *extra: str) -> list[str]:
    """`csplade train` arguments of STEPS plain SGD steps (no momentum, decay, clipping, warm-up)."""
    return [
        "--model_name_or_path", str(base), "--train_data", str(groups), "--output_dir", str(out),
        "--group_size", str(GROUP), "--per_device_train_batch_size", str(QUERIES),
        "--max_steps", str(STEPS), "--optim", "sgd", "--learning_rate", str(LR),
        "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--weight_decay", "0",
        "--max_grad_norm", "0", "--train_sampling_strategy", "sequential", "--save_steps", "1000",
        "--logging_steps", "1", "--seed", "3", "--lambda_q", "0.05", "--lambda_d", "0.02",
        "--reg_warmup_steps", "0", "--cross_device_negatives", "true", "--lora_dropout", "0",
        *extra,
    ]  # fmt: skip


def reference_train_step(base: Path, groups: Path, out: Path, *extra: str) -> dict:
    """The weights one process must reach with the 2-process run of :func:`train_args`.

    Per step, the same loss on the whole batch of 2 x 4 queries (process r of step s reads groups
    [(2s + r) * 4, (2s + r + 1) * 4): accelerate deals the sequential batches out in turn): InfoNCE
    over all queries against all docs (cross-device negatives), FLOPS on the global batch; an SGD
    step of LR. Saved like the run.
    """
    from transformers import set_seed

    from csplade.data.groups import load_training_groups
    from csplade.data.sampling import GroupCollator
    from csplade.training import losses
    from csplade.training.loading import load_encoder_for_training
    from csplade.training.recipe import parse_recipe
    from csplade.training.setup import calibrate_on_training_docs

    argv = train_args(base, groups, out, "--use_cpu", "true", *extra)
    model_args, _, data_args, _ = parse_recipe(None, argv)
    set_seed(3)
    encoder = load_encoder_for_training(model_args)
    dataset = load_training_groups(data_args, seed=3)
    if model_args.head_bias_df is not None:
        calibrate_on_training_docs(encoder, dataset, model_args.head_bias_df)
    collate = GroupCollator(encoder.tokenize)
    for step in range(STEPS):
        halves = [
            collate(
                [dataset[i] for i in range((2 * step + r) * QUERIES, (2 * step + r + 1) * QUERIES)]
            )
            for r in range(2)
        ]
        reps = [encoder(query=h["query"], doc=h["doc"]) for h in halves]
        q_all = torch.cat([q for q, _ in reps])
        d_all = torch.cat([d for _, d in reps])
        loss = losses.contrastive_loss(q_all, d_all, GROUP)
        loss = loss + 0.05 * losses.flops(q_all) + 0.02 * losses.flops(d_all)
        encoder.zero_grad()
        loss.backward()
        with torch.no_grad():
            for param in encoder.parameters():
                if param.grad is not None:
                    param -= LR * param.grad
    encoder.save_pretrained(out)
    return weights(out)


def assert_moved(got: dict, base: dict, merged: bool = False) -> None:
    """Every trained tensor moved: LoRA B factors (which start at zero), the base weights, or (a
    merged LoRA) every adapted projection."""
    lora_b = [k for k in got if "lora_B" in k]
    if lora_b:
        assert all(got[k].abs().sum() > 0 for k in lora_b)
        return
    trained = [k for k in base if k in got and (not merged or "_proj." in k)]
    still = [k for k in trained if bool((got[k] == base[k]).all())]
    assert trained and not still, f"weights that did not move: {still}"


def equal_length_texts(path: Path, n: int) -> Path:
    """`n` texts of 5 words each (one token per word): the same token count in every text."""
    words = tiny_words()
    path.write_text("".join(" ".join(words[(7 * i + j) % 200] for j in range(5)) + "\n"
                            for i in range(n)))  # fmt: skip
    return path


# `csplade adapt` arguments of the equality tests: 3 plain SGD steps, LoRA merged at the end.
ADAPT = [
    "--max_steps", "3", "--optim", "sgd", "--learning_rate", "0.1", "--lr_scheduler_type",
    "constant", "--warmup_steps", "0", "--weight_decay", "0", "--max_grad_norm", "0",
    "--train_sampling_strategy", "sequential", "--save_steps", "1000", "--logging_steps", "1",
    "--seed", "3", "--use_lora", "true", "--lora_r", "4", "--lora_dropout", "0",
    "--merge_adapter", "true",
]  # fmt: skip
