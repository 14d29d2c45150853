"""FSDP2 (`fully_shard`) with accelerate_configs/fsdp2.yaml on 2 CPU processes (gloo).

accelerate 1.15 builds FSDP only on GPUs: on this machine an FSDP config gives plain data parallel
(MULTI_CPU), which csplade refuses (the first test). torch itself runs FSDP2 on CPU over gloo, so the
other tests set accelerate's state as it is on a GPU machine (`--fsdp-on-cpu`, tests/probed_cli.py) and
run csplade's FSDP2 paths for real: accelerate's `fully_shard` wrapping (one unit per decoder block),
DTensor parameters, the fused head inside the root unit's forward, the full state dict gathered for
saving, and the Trainer's FSDP checkpoint files for resume. Each compares with one process.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from launching import (
    ADAPT,
    BF16_LR,
    LR,
    QUERIES,
    REPO,
    STEPS,
    assert_moved,
    assert_same_update,
    assert_same_weights,
    env,
    equal_length_texts,
    launch,
    launch_and_kill,
    launcher,
    planned_head,
    reference_train_step,
    run_one_process,
    sharding_reports,
    train_args,
    weights,
)
from synthetic import save_base, write_groups
from tiny import tiny_model, tiny_tokenizer

from csplade.training.base import COMPLETE_MARKER

pytestmark = [pytest.mark.distributed]

CONFIG = REPO / "accelerate_configs" / "fsdp2.yaml"
VOCAB = 256
ON_CPU = ("--fsdp-on-cpu", "--sharding-report")
LAYERS = 2  # decoder blocks of the tiny models


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    untied = root / "untied"
    tiny_model("llama", tie_word_embeddings=False).save_pretrained(untied)
    tiny_tokenizer().save_pretrained(untied)
    return {
        "tied": save_base(root / "tied"),
        "untied": untied,
        "groups": write_groups(root / "groups.jsonl", n=2 * QUERIES * STEPS),
        "texts": equal_length_texts(root / "texts.txt", 2 * 2 * 3),
    }


def _assert_fsdp2(out: Path, head_calls: dict | None = None) -> None:
    for report in sharding_reports(out):
        assert "FSDP" in report["distributed_type"] and report["world_size"] == 2, report
        assert report["sharded"] == report["parameters"] > 0, report  # every parameter a shard
        assert report["fsdp_units"] == 1 + LAYERS, report  # the root and one unit per block
        if head_calls is not None:
            assert report["head_calls"] == head_calls, report


def test_fsdp_config_on_a_machine_without_gpus_is_refused(setup, tmp_path):
    """Without the probe, accelerate would train plain DDP under an FSDP config: refused, named."""
    out = tmp_path / "refused"
    args = train_args(setup["tied"], setup["groups"], out)
    result = subprocess.run(
        launcher(CONFIG, "train", *args), env=env(), capture_output=True, text=True, timeout=600
    )
    assert result.returncode != 0
    assert "asks for FSDP, but accelerate" in result.stderr
    assert "MULTI_CPU on a machine without GPUs" in result.stderr
    assert not (out / "run_info.json").exists()


CASES = {
    "lora-tied": ("tied", ["--use_lora", "true", "--lora_r", "4"]),
    "full-tied": ("tied", []),
    "full-untied": ("untied", []),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fsdp2_steps_equal_one_process(setup, tmp_path, case):
    base, extra = CASES[case]
    extra = [*extra, "--head_chunk_size", "64"]
    out = tmp_path / "fsdp2"
    args = train_args(setup[base], setup["groups"], out, *extra)
    launch(CONFIG, "train", *args, probes=(*ON_CPU, "--no-vocab-tensors", str(VOCAB)))
    planned = planned_head(tmp_path, args)  # what `csplade plan` counts in its head term
    assert planned == "fused"
    _assert_fsdp2(out, head_calls={planned: 2 * STEPS})
    info = json.loads((out / "run_info.json").read_text())
    assert info["world_size"] == 2 and "FSDP" in info["distributed_type"]
    want = reference_train_step(setup[base], setup["groups"], tmp_path / "reference", *extra)
    got = weights(out)
    assert_same_weights(got, want)
    assert_moved(got, weights(setup[base]))
    if case == "full-untied":  # the tolerance bites: half the learning rate fails
        with pytest.raises(AssertionError):
            half = reference_train_step(
                setup[base], setup["groups"], tmp_path / "half", *extra, lr=LR / 2
            )
            assert_same_weights(got, half)


def test_fsdp2_bf16_steps_equal_one_bf16_process(setup, tmp_path):
    """The shipped precision (fsdp2.yaml: mixed_precision bf16): float32 sharded masters, each unit
    all-gathered and cast to bfloat16 for compute (LoRA factors too), gradients reduce-scattered in
    bfloat16, against one process computing the same steps so (tests/launching.py:
    BF16_UPDATE_RTOL), and not against one at half the learning rate."""
    extra = ["--use_lora", "true", "--lora_r", "4", "--head_chunk_size", "64", "--bf16", "true"]
    out = tmp_path / "fsdp2"
    args = train_args(setup["tied"], setup["groups"], out, *extra, lr=BF16_LR)
    launch(CONFIG, "train", *args, probes=(*ON_CPU, "--no-vocab-tensors", str(VOCAB)),
           mixed_precision="bf16")  # fmt: skip
    _assert_fsdp2(out, head_calls={"fused": 2 * STEPS})
    for report in sharding_reports(out):
        assert report["mixed_precision"] == "bf16", report
        assert report["dtypes"] == {"torch.float32": report["parameters"]}, report  # masters
        assert report["fsdp_param_dtypes"] == ["torch.bfloat16"], report  # compute

    def reference(lr=BF16_LR):
        return reference_train_step(setup["tied"], setup["groups"], tmp_path / f"reference-{lr}",
                                    *extra, lr=lr, bf16=True)  # fmt: skip

    got, start = weights(out), reference(lr=0)
    assert_same_update(got, reference(), start)
    assert_moved(got, weights(setup["tied"]))
    with pytest.raises(AssertionError):
        assert_same_update(got, reference(lr=BF16_LR / 2), start)


def test_fsdp2_adapt_wraps_each_block_and_merges_like_one_process(setup, tmp_path):
    """`csplade adapt` under FSDP2: one unit per decoder block (the adaptation model exposes the
    backbone's `_no_split_modules`), and the merged model equals one process's."""
    common = ["--model_name_or_path", str(setup["tied"]), "--adapt_data", str(setup["texts"]),
              *ADAPT]  # fmt: skip
    out = tmp_path / "fsdp2"
    launch(
        CONFIG,
        "adapt",
        *common,
        "--output_dir", str(out), "--per_device_train_batch_size", "2",
        probes=ON_CPU,
    )  # fmt: skip
    _assert_fsdp2(out)
    one = tmp_path / "one"
    run_one_process(
        "adapt", *common, "--output_dir", str(one), "--per_device_train_batch_size", "4"
    )
    got = weights(out)
    assert not any("lora" in k for k in got)  # merged
    assert_same_weights(got, weights(one))
    assert_moved(got, weights(setup["tied"]), merged=True)


def _resume_args(setup, out: Path, lora: bool, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(setup["tied"]), "--train_data", str(setup["groups"]),
        "--output_dir", str(out), "--group_size", "3", "--per_device_train_batch_size", "2",
        "--max_steps", "6", "--save_steps", "2", "--save_total_limit", "5", "--logging_steps", "1",
        "--learning_rate", "1e-3", "--seed", "3", "--use_lora", str(lora).lower(), "--lora_r", "4",
        *extra,
    ]  # fmt: skip


@pytest.mark.parametrize(
    "lora, state_dict_type",
    [(True, "FULL_STATE_DICT"), (False, "FULL_STATE_DICT"), (False, "SHARDED_STATE_DICT")],
    ids=["lora", "full", "full-sharded-state-dict"],
)
def test_fsdp2_resume_after_kill_equals_uninterrupted(setup, tmp_path, lora, state_dict_type):
    """Killed after its step-2 checkpoint, resumed from FSDP's own checkpoint files (the model's and
    AdamW's state dicts, loaded into DTensor parameters), the run ends on the uninterrupted weights.

    (The full fine-tune is what csplade's own loader could not resume: it loaded the plain tensors
    of its encoder folder into the DTensor parameters. With SHARDED_STATE_DICT the checkpoints hold
    FSDP's sharded files only and the final model is gathered once at the end.)"""
    config = tmp_path / "fsdp2.yaml"
    config.write_text(
        CONFIG.read_text().replace("FULL_STATE_DICT", state_dict_type)
    )  # the shipped config, or its sharded state-dict twin
    reference = tmp_path / "reference"
    launch(config, "train", *_resume_args(setup, reference, lora), probes=ON_CPU)
    interrupted = tmp_path / "interrupted"
    marker = interrupted / "checkpoint-2" / COMPLETE_MARKER
    launch_and_kill(config, "train", *_resume_args(setup, interrupted, lora), marker=marker,
                    probes=ON_CPU)  # fmt: skip
    assert not (interrupted / "run_info.json").exists()  # it really died before the end
    fsdp_files = (
        "pytorch_model_fsdp.bin" if state_dict_type == "FULL_STATE_DICT" else "pytorch_model_fsdp_0"
    )
    assert (interrupted / "checkpoint-2" / fsdp_files).exists()
    launch(
        config,
        "train",
        *_resume_args(setup, interrupted, lora, "--resume_from_checkpoint", "latest"),
        probes=ON_CPU,
    )
    _assert_fsdp2(interrupted)
    info = json.loads((interrupted / "run_info.json").read_text())
    assert info["resumed_from"] is not None and info["global_step"] == 6
    assert_same_weights(weights(interrupted), weights(reference), atol=1e-6)
