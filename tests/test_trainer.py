"""Contrastive training end to end on tiny models: it learns, it freezes what LoRA freezes, it resumes
exactly after a kill -9, it stops on a non-finite loss, and λ follows optimizer steps."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from synthetic import pairs, save_base, write_groups

from csplade.model.encoder import SparseEncoder
from csplade.training.base import COMPLETE_MARKER, NonFiniteLossError
from csplade.training.contrastive import SparseTrainer, run_training
from csplade.training.losses import quadratic_warmup
from csplade.training.recipe import parse_recipe

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("task")
    return {
        "base": save_base(root / "base"),
        "groups": write_groups(root / "groups.jsonl"),
        "held": pairs(100, seed=2),
    }


def _args(task, out, *extra):
    return [
        "--model_name_or_path", str(task["base"]),
        "--train_data", str(task["groups"]),
        "--output_dir", str(out),
        "--per_device_train_batch_size", "8",
        "--group_size", "4",
        "--learning_rate", "3e-3",
        "--logging_steps", "5",
        "--save_steps", "1000",
        "--use_cpu", "true",
        "--seed", "7",
        *extra,
    ]  # fmt: skip


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        if file.name != "query_weights.safetensors":
            out.update(load_file(file))
    return out


def test_training_lifts_mrr_and_moves_every_parameter(task, tmp_path):
    from synthetic import mrr_at_10

    untrained = SparseEncoder.from_pretrained(task["base"])
    before = {k: v.clone() for k, v in untrained.backbone.state_dict().items()}
    base_mrr = mrr_at_10(untrained, task["held"])
    out = run_training(*parse_recipe(None, _args(task, tmp_path / "full", "--max_steps", "50")))
    trained = SparseEncoder.from_pretrained(out)
    trained_mrr = mrr_at_10(trained, task["held"])
    assert trained_mrr > base_mrr + 0.1, (base_mrr, trained_mrr)
    after = trained.backbone.state_dict()
    unchanged = [k for k, v in before.items() if torch.equal(v, after[k])]
    assert not unchanged, f"parameters that did not move: {unchanged}"
    info = json.loads((out / "run_info.json").read_text())
    assert info["world_size"] == 1 and info["global_step"] == 50
    logged = [h for h in info["log_history"] if "contrastive" in h]
    assert logged and {"reg_q", "reg_d", "lambda_q", "lambda_d", "q_nnz", "d_nnz"} <= set(logged[0])


def test_lora_trains_the_adapter_and_freezes_the_base(task, tmp_path):
    out = run_training(
        *parse_recipe(
            None,
            _args(task, tmp_path / "lora", "--max_steps", "10", "--use_lora", "--lora_r", "4",
                  "--lora_target_modules", "q_proj", "v_proj", "gate_proj", "--lora_dropout", "0"),
        )
    )  # fmt: skip
    assert (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()
    trained = SparseEncoder.from_pretrained(out)
    base = SparseEncoder.from_pretrained(task["base"])
    base_state = base.backbone.state_dict()
    trained_base = trained.backbone.get_base_model().state_dict()
    for name, value in base_state.items():
        key = name if name in trained_base else name.replace(".weight", ".base_layer.weight")
        assert torch.equal(value, trained_base[key]), f"base weight {name} changed under LoRA"
    adapter = load_file(out / "adapter_model.safetensors")
    lora_b = [k for k in adapter if "lora_B" in k]
    assert lora_b and all(adapter[k].abs().sum() > 0 for k in lora_b)  # B starts at zero: it moved
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in adapter} == {
        "q_proj",
        "v_proj",
        "gate_proj",
    }


def test_lambda_is_stepped_per_optimizer_step(task, tmp_path):
    out = run_training(
        *parse_recipe(
            None,
            _args(task, tmp_path / "ga", "--max_steps", "6", "--gradient_accumulation_steps", "3",
                  "--per_device_train_batch_size", "2", "--reg_warmup_steps", "4",
                  "--lambda_q", "0.5", "--lambda_d", "0.25", "--logging_steps", "1"),
        )
    )  # fmt: skip
    history = json.loads((out / "run_info.json").read_text())["log_history"]
    logged = [(h["step"], h["lambda_q"], h["lambda_d"]) for h in history if "lambda_q" in h]
    assert [s for s, _, _ in logged] == [1, 2, 3, 4, 5, 6]
    for step, lam_q, lam_d in logged:
        # the loss of optimizer step s (1-based) is computed at global_step s-1, for all 3 micro-batches
        assert lam_q == pytest.approx(quadratic_warmup(step - 1, 4, 0.5))
        assert lam_d == pytest.approx(quadratic_warmup(step - 1, 4, 0.25))


def test_non_finite_loss_stops_and_names_the_step(task, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = SparseTrainer.compute_loss

    def poisoned(self, model, inputs, *args, **kwargs):
        calls["n"] += 1
        if self.state.global_step == 2:
            inputs["doc"]["input_ids"] = inputs["doc"]["input_ids"].clone()
            model.base_model.get_output_embeddings().weight.data[:] = float("nan")
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(SparseTrainer, "compute_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match="optimizer step 3"):
        run_training(*parse_recipe(None, _args(task, tmp_path / "nan", "--max_steps", "5")))


def _train_cmd(task, out, max_steps, *extra):
    return [
        sys.executable, "-m", "csplade", "train",
        *_args(task, out, "--max_steps", str(max_steps), "--save_steps", "3",
               "--logging_steps", "1", "--save_total_limit", "5", *extra),
    ]  # fmt: skip


def test_resume_after_kill_gives_identical_weights(task, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    steps = 12
    reference = tmp_path / "reference"
    subprocess.run(_train_cmd(task, reference, steps), check=True, env=env, capture_output=True)

    interrupted = tmp_path / "interrupted"
    proc = subprocess.Popen(
        _train_cmd(task, interrupted, steps),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    marker = interrupted / "checkpoint-6" / COMPLETE_MARKER
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the run never completed checkpoint-6"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (interrupted / "run_info.json").exists()  # it really died before the end

    result = subprocess.run(
        _train_cmd(task, interrupted, steps, "--resume_from_checkpoint", "latest"),
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((interrupted / "run_info.json").read_text())
    assert info["resumed_from"] is not None and info["global_step"] == steps
    want, got = _weights(reference), _weights(interrupted)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)


def test_train_cli_reports_recipe_errors(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("varient: bi\n")
    result = subprocess.run(
        [sys.executable, "-m", "csplade", "train", str(recipe)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "unknown key 'varient'; did you mean 'variant'?" in result.stderr


def test_lora_on_the_last_layers_only(task, tmp_path):
    out = run_training(
        *parse_recipe(
            None,
            _args(task, tmp_path / "last", "--max_steps", "3", "--use_lora", "--lora_r", "4",
                  "--lora_last_layers", "1", "--lora_dropout", "0"),
        )
    )  # fmt: skip
    adapter = load_file(out / "adapter_model.safetensors")
    layers = {int(k.split(".layers.")[1].split(".")[0]) for k in adapter}
    assert layers == {1}  # the tiny model has 2 blocks: only the last one is adapted
    assert all(adapter[k].abs().sum() > 0 for k in adapter if "lora_B" in k)


def test_head_bias_is_calibrated_then_trained_and_resumed(task, tmp_path):
    """The bias is calibrated before training, trains with the adapter, and a run resumed from the
    step-2 checkpoint (bias, adapter, optimizer, RNG) ends where the uninterrupted run ends."""
    steps = ("--max_steps", "4", "--use_lora", "--lora_r", "4", "--head_bias_df", "0.05",
             "--save_steps", "2", "--logging_steps", "1")  # fmt: skip
    out = run_training(*parse_recipe(None, _args(task, tmp_path / "bias", *steps)))
    trained = SparseEncoder.from_pretrained(out)
    assert trained.head_bias is not None
    checkpoint = SparseEncoder.from_pretrained(out / "checkpoint-2")
    assert not torch.equal(trained.head_bias, checkpoint.head_bias)  # the bias trains
    assert (out / "head_bias.safetensors").exists()

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    again = run_training(
        *parse_recipe(None, _args(task, resumed, *steps, "--resume_from_checkpoint", "latest"))
    )
    info = json.loads((again / "run_info.json").read_text())
    assert info["resumed_from"] == str(resumed / "checkpoint-2") and info["global_step"] == 4
    logged = [h["step"] for h in info["log_history"] if "contrastive" in h]
    assert logged == [1, 2, 3, 4]  # 1-2 restored with the checkpoint's state, 3-4 run once
    want, got = _weights(out), _weights(again)
    assert want.keys() == got.keys() and "head_bias" in got
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("recalibrate", [False, True])
def test_recalibrate_replaces_a_bias_with_one_set_on_the_training_data(task, tmp_path, recalibrate):
    """An adapted model's bias was set on other texts at other lengths: with head_bias_recalibrate
    the run starts from a bias calibrated on its training documents and queries (lr 0 keeps it)."""
    from csplade.data.groups import load_training_groups
    from csplade.training.setup import calibrate_on_training_docs

    start = tmp_path / "adapted"
    encoder = SparseEncoder.from_pretrained(task["base"])
    encoder.calibrate_head_bias([d for _, d in task["held"]], doc_fraction=0.3)
    encoder.save_pretrained(start)
    extra = ["--model_name_or_path", str(start), "--head_bias_df", "0.05", "--max_steps", "1",
             "--learning_rate", "0", "--head_bias_recalibrate", str(recalibrate).lower()]  # fmt: skip
    parsed = parse_recipe(None, _args(task, tmp_path / "run", *extra))
    model_args, _, data_args, _ = parsed
    out = run_training(*parsed)
    got = _weights(out)["head_bias"]
    if not recalibrate:
        torch.testing.assert_close(got, encoder.head_bias.detach())
        return
    reference = SparseEncoder.from_pretrained(start, query_max_length=model_args.query_max_length,
                                              doc_max_length=model_args.doc_max_length)  # fmt: skip
    calibrate_on_training_docs(reference, load_training_groups(data_args, seed=7), 0.05)
    torch.testing.assert_close(got, reference.head_bias.detach())
    assert not torch.allclose(got, encoder.head_bias.detach())


def test_lora_from_an_adapted_folder_reloads_on_that_folder(task, tmp_path):
    # A folder written by `csplade adapt` records the raw backbone it came from as base_model; an
    # adapter trained on it must reload on the adapted weights, not on that raw backbone.
    adapted = SparseEncoder.from_pretrained(task["base"])
    with torch.no_grad():
        for p in adapted.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    adapted.save_pretrained(tmp_path / "adapted")
    assert json.loads((tmp_path / "adapted" / "csplade_config.json").read_text())["base_model"]
    out = run_training(
        *parse_recipe(
            None,
            [*_args(task, tmp_path / "lora", "--max_steps", "2", "--use_lora", "--lora_r", "4"),
             "--model_name_or_path", str(tmp_path / "adapted")],
        )
    )  # fmt: skip
    config = json.loads((out / "csplade_config.json").read_text())
    assert config["adapter"] and Path(config["base_model"]) == (tmp_path / "adapted").resolve()
    trained = SparseEncoder.from_pretrained(out)
    under = trained.backbone.get_base_model().state_dict()
    for name, value in adapted.backbone.state_dict().items():
        key = name if name in under else name.replace(".weight", ".base_layer.weight")
        assert torch.equal(value, under[key]), f"{name}: the adapter reloaded on another base"
    # A second LoRA run on top of an adapter folder is refused (its base exists in no folder).
    with pytest.raises(ValueError, match="holds a LoRA adapter"):
        run_training(
            *parse_recipe(
                None,
                [*_args(task, tmp_path / "again", "--max_steps", "1", "--use_lora"),
                 "--model_name_or_path", str(out)],
            )
        )  # fmt: skip
