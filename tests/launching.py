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

import copy
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
            **{k: v for k, v in inline.items() if k == "deepspeed_multinode_launcher"},
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


def launcher(
    config: Path | None,
    verb: str,
    *args: str,
    probes: tuple[str, ...] = (),
    mixed_precision: str = "no",
    machines: tuple[str, ...] = ("--num_machines", "1", "--main_process_port", "0"),
) -> list[str]:
    """The `accelerate launch` command line running `csplade VERB ARGS` in 2 processes.

    `mixed_precision` is the launch's (a DeepSpeed config takes it from its JSON's "auto", which the
    Trainer's `--bf16` fills); `machines` the launch's machine arguments (one machine by default).
    """
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    cmd += ["--config_file", str(config)] if config else ["--multi_gpu"]
    if config is None or "DEEPSPEED" not in config.read_text():
        cmd += ["--mixed_precision", mixed_precision]
    cmd += [
        "--num_processes", "2", *machines, "--dynamo_backend", "no",
        str(PROBED_CLI), *probes, "--", verb, *args,
    ]  # fmt: skip
    return cmd


def env() -> dict[str, str]:
    """The launches' environment: one thread per process, no GPU, and DeepSpeed's JIT-built CPU
    ops (its shared-memory collectives) built once per environment (not in the user-wide torch
    extensions folder, which another checkout's build rewrites and locks while every launch waits)."""
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR") or str(
        Path(sys.prefix) / "torch_extensions"
    )
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
            "TORCH_EXTENSIONS_DIR": extensions}  # fmt: skip


def launch(
    config: Path | None,
    verb: str,
    *args: str,
    probes: tuple[str, ...] = (),
    mixed_precision: str = "no",
):
    """Run the launch to the end; fail with its output tails on a non-zero exit."""
    result = subprocess.run(
        launcher(config, verb, *args, probes=probes, mixed_precision=mixed_precision),
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


def train_args(base: Path, groups: Path, out: Path, *extra: str, lr: float = LR) -> list[str]:
    """`csplade train` arguments of STEPS plain SGD steps (no momentum, decay, clipping, warm-up)."""
    return [
        "--model_name_or_path", str(base), "--train_data", str(groups), "--output_dir", str(out),
        "--group_size", str(GROUP), "--per_device_train_batch_size", str(QUERIES),
        "--max_steps", str(STEPS), "--optim", "sgd", "--learning_rate", str(lr),
        "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--weight_decay", "0",
        "--max_grad_norm", "0", "--train_sampling_strategy", "sequential", "--save_steps", "1000",
        "--logging_steps", "1", "--seed", "3", "--lambda_q", "0.05", "--lambda_d", "0.02",
        "--reg_warmup_steps", "0", "--cross_device_negatives", "true", "--lora_dropout", "0",
        *extra,
    ]  # fmt: skip


def reference_train_step(
    base: Path,
    groups: Path,
    out: Path,
    *extra: str,
    lr: float = LR,
    bf16: bool = False,
    fp32_names: tuple[str, ...] = (),
    rounded_names: tuple[str, ...] = (),
) -> dict:
    """The weights one process must reach with the 2-process run of :func:`train_args`.

    Per step, the same loss on the whole batch of 2 x 4 queries (process r of step s reads groups
    [(2s + r) * 4, (2s + r + 1) * 4): accelerate deals the sequential batches out in turn): InfoNCE
    over all queries against all docs (cross-device negatives), FLOPS on the global batch; an SGD
    step of `lr`. Saved like the run.

    `bf16`: as ZeRO-3's and FSDP2's bf16 mixed precision compute: float32 master weights, and each
    step's forward and backward on a bfloat16 copy of them (parameters and buffers), whose
    gradients update the masters; parameters whose names contain one of `fp32_names` stay float32
    in the copy (ZeRO-3 casts the model it loads under zero.Init, not the LoRA factors peft adds
    after it); parameters whose names contain one of `rounded_names` start from their bfloat16
    rounding (float32 masters of values the engine rounded once). The tests also call it with
    `lr / 2`: a reference the run must NOT match (what a gradient off by 2x in a wrong reduction
    would give).
    """
    from transformers import set_seed

    from csplade.data.groups import load_training_groups
    from csplade.data.sampling import GroupCollator
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
    with torch.no_grad():
        for name, param in encoder.named_parameters():
            if any(part in name for part in rounded_names):
                param.copy_(param.bfloat16().float())
    collate = GroupCollator(encoder.tokenize)
    for step in range(STEPS):
        halves = [
            collate(
                [dataset[i] for i in range((2 * step + r) * QUERIES, (2 * step + r + 1) * QUERIES)]
            )
            for r in range(2)
        ]
        work = _bf16_copy(encoder, fp32_names) if bf16 else encoder
        _global_batch_loss(work, halves).backward()
        with torch.no_grad():
            for master, param in zip(encoder.parameters(), work.parameters(), strict=True):
                if param.grad is not None:
                    master -= lr * param.grad.float()
                    param.grad = None
    encoder.save_pretrained(out)
    return weights(out)


def _bf16_copy(encoder, fp32_names: tuple[str, ...]):
    work = copy.deepcopy(encoder).to(torch.bfloat16)
    masters = dict(encoder.named_parameters())
    for name, param in work.named_parameters():
        if any(part in name for part in fp32_names):
            param.data = masters[name].detach().clone()
    return work


def _global_batch_loss(encoder, halves: list[dict]) -> torch.Tensor:
    """InfoNCE of all queries against all docs of both halves, FLOPS on both (train_args' λs)."""
    from csplade.training import losses

    reps = [encoder(query=h["query"], doc=h["doc"]) for h in halves]
    q_all = torch.cat([q for q, _ in reps])
    d_all = torch.cat([d for _, d in reps])
    loss = losses.contrastive_loss(q_all, d_all, GROUP)
    return loss + 0.05 * losses.flops(q_all) + 0.02 * losses.flops(d_all)


# bf16 runs against the bf16 reference (reference_train_step(bf16=True)). Both compute in bfloat16
# (8 significant bits: one rounding is up to 2**-9 = 0.2% relative), but the processes sum their
# halves' gradients in another order and dtype (bf16 reduce-scatter / all-reduce vs autograd's
# accumulation in one process), and a gradient that is a sum of cancelling terms (the attention
# projections' LoRA factors) loses far more than 2**-9 of itself. So the measure is per tensor, of
# how far training moved it: |run - reference| <= BF16_UPDATE_RTOL * |reference - start| (norms).
# The bf16 tests train LoRA (its factors, and so the saved weights, are float32 masters under both
# engines: no rounding of the saved weights to allow for) at lr 0.01 (3 steps), where the
# steps stay close to linear (at lr 0.1 the runs diverge chaotically in bf16: 0.4 on one LoRA
# factor, and fp32 vs bf16 one process differ as much). Measured: ZeRO-3 (LoRA factors in float32)
# worst tensor 0.04, median 0.02; FSDP2 (LoRA factors computed in bf16, gradients reduce-scattered
# in bf16) worst 0.20 (an attention projection's LoRA A, which moves least), median 0.05. A
# gradient off by 2x moves every tensor by 0.5 to 1 of its update: against a reference at half
# the learning rate the FSDP2 run's tensors are off by 1.1 (least) to 14, median 2.7.
BF16_UPDATE_RTOL = 0.3
BF16_LR = 0.01


def update_mismatch(got: dict, want: dict, start: dict) -> dict[str, float]:
    """Per tensor: |got - want| over |want - start| (norms); a tensor the reference left as it was
    must be left exactly (else inf). `start`: the weights before training, adapter included (the
    reference at learning rate 0)."""
    out = {}
    for name in want:
        wanted, have = want[name].float(), got[name].float()
        moved = torch.linalg.vector_norm(wanted - start[name].float())
        err = torch.linalg.vector_norm(have - wanted)
        out[name] = float(err / moved) if moved > 0 else (0.0 if err == 0 else float("inf"))
    return out


def assert_same_update(
    got: dict, want: dict, start: dict, rtol: float = BF16_UPDATE_RTOL
) -> dict[str, float]:
    """Every tensor the reference trained was trained alike by the run (see BF16_UPDATE_RTOL)."""
    assert got.keys() == want.keys() == start.keys(), sorted(got.keys() ^ want.keys())[:5]
    mismatch = update_mismatch(got, want, start)
    assert any(torch.any(want[k] != start[k]) for k in want), "the reference trained nothing"
    worst = max(mismatch, key=mismatch.get)
    assert mismatch[worst] <= rtol, (
        f"{worst}: off by {mismatch[worst]:.3f} of its update (allowed {rtol}); "
        f"{sum(v > rtol for v in mismatch.values())} of {len(mismatch)} tensors over"
    )
    return mismatch


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
