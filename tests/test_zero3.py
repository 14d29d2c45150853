"""DeepSpeed ZeRO-3 with every parameter partitioned (2 CPU processes, gloo): the fused head, adapt +
merge + calibration, kill -> resume, and the refusal to save without gathered weights.

The equality tests take 3 SGD steps with 2 processes x 4 queries and compare the saved weights with one
process stepping on the same loss over all 8 queries (tests/launching.py), to 1e-5. The first step is
the one-step comparison; from the second on DeepSpeed's module trace is complete and it prefetches and
releases by it (where the old `GatheredParameters` head crashed: "Cannot free a ZeRO-3 parameter while
it is still active in submodules"). The fused head is asserted taken twice: the encoder counts its
head paths (and `csplade plan` names the same one), and the `--no-vocab-tensors` probe fails the run
on any (B, L, V)-shaped tensor, forward or backward (the head's chunks are 64 of 256 terms). Every run
asserts that each process holds a shard of every parameter.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import deepspeed  # noqa: F401  (required: a missing install fails the suite, never skips it)
import pytest
import torch
from launching import (
    ADAPT,
    BF16_LR,
    LR,
    QUERIES,
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
    zero_config,
)
from synthetic import save_base, write_groups
from tiny import tiny_model, tiny_tokenizer

from csplade.training.base import COMPLETE_MARKER

pytestmark = [pytest.mark.distributed]

VOCAB = 256
PROBES = ("--no-vocab-tensors", str(VOCAB), "--sharding-report")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero3")
    untied = root / "untied"
    tiny_model("llama", tie_word_embeddings=False).save_pretrained(untied)
    tiny_tokenizer().save_pretrained(untied)
    return {
        "tied": save_base(root / "tied"),
        "untied": untied,
        "groups": write_groups(root / "groups.jsonl", n=2 * QUERIES * STEPS),
        "config": zero_config(root),
        "texts": equal_length_texts(root / "texts.txt", 2 * 2 * 3),
    }


def _assert_partitioned_and_fused(out: Path, head_calls: dict | None = None) -> None:
    info = json.loads((out / "run_info.json").read_text())
    assert info["world_size"] == 2 and "DEEPSPEED" in info["distributed_type"]
    for report in sharding_reports(out):
        assert report["world_size"] == 2, report
        assert report["sharded"] == report["parameters"] > 0, report  # every parameter partitioned
        if head_calls is not None:
            assert report["head_calls"] == head_calls, report


def _assert_fails_against_half_lr(got: dict, reference, compare, lr: float = LR) -> None:
    """The comparison that passed must fail against a reference trained at half the learning rate
    (the update a reduction that halves, or a reference that doubles, the gradient gives)."""
    with pytest.raises(AssertionError):
        compare(got, reference(lr=lr / 2))


CASES = {  # a full fine-tune of the tied model: test_trainer_distributed.test_deepspeed_zero_steps_on_cpu
    "lora-tied": ("tied", ["--use_lora", "true", "--lora_r", "4"]),
    "lora-tied-calibrated": ("tied", ["--use_lora", "true", "--lora_r", "4",
                                      "--head_bias_df", "0.05"]),
    "full-untied": ("untied", []),
    "lora-on-the-head-untied": ("untied", ["--use_lora", "true", "--lora_r", "4",
                                           "--lora_lm_head", "true"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_zero3_step_equals_one_process(setup, tmp_path, case):
    base, extra = CASES[case]
    extra = [*extra, "--head_chunk_size", "64"]
    out = tmp_path / "zero3"
    args = train_args(setup[base], setup["groups"], out, *extra)
    launch(setup["config"], "train", *args, probes=PROBES)
    planned = planned_head(tmp_path, args)  # what `csplade plan` counts in its head term
    assert planned == "fused"
    _assert_partitioned_and_fused(out, head_calls={planned: 2 * STEPS})  # queries, docs
    want = reference_train_step(setup[base], setup["groups"], tmp_path / "reference", *extra)
    got = weights(out)
    assert_same_weights(got, want)
    assert_moved(got, weights(setup[base]))
    if case == "lora-tied":
        _assert_fails_against_half_lr(
            got,
            lambda lr: reference_train_step(
                setup[base], setup["groups"], tmp_path / "half", *extra, lr=lr
            ),
            assert_same_weights,
        )


# Untied tiny Llama: embeddings and LM head 256 x 32 = 8,192 elements; q/o 1,024, k/v 512,
# MLP 2,048, norms 32, LoRA factors (r 4) 64 to 128. DeepSpeed's default threshold (1e5) keeps
# every one whole; at 4,096 the embeddings and the head are partitioned and the rest stays whole,
# as an 8B model's LoRA factors and norms stay whole while its 128k-row head is partitioned.
THRESHOLD = 4096
PARTITIONED = ("embed_tokens.weight", "lm_head.weight")


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_zero3_at_an_intermediate_persistence_threshold_equals_one_process(setup, tmp_path, lora):
    """Whole small tensors beside a partitioned head: their gradients (reduced whole) and the
    head's (gathered for the fused head, reduce-scattered) train as one process does, to 1e-5."""
    config = zero_config(tmp_path, stage3_param_persistence_threshold=THRESHOLD)
    extra = ["--head_chunk_size", "64", *(["--use_lora", "true", "--lora_r", "4"] if lora else [])]
    out = tmp_path / "zero3"
    args = train_args(setup["untied"], setup["groups"], out, *extra)
    launch(config, "train", *args, probes=PROBES)
    info = json.loads((out / "run_info.json").read_text())
    assert info["world_size"] == 2 and "DEEPSPEED" in info["distributed_type"]
    for report in sharding_reports(out):
        assert report["world_size"] == 2, report
        assert sorted(n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1]
                      for n in report["sharded_names"]) == sorted(PARTITIONED), report  # fmt: skip
        whole = report["persistent_names"]
        assert len(whole) == report["parameters"] - 2 and any("lora_B" in n for n in whole) == lora
        assert report["head_calls"] == {"fused": 2 * STEPS}, report
    got = weights(out)
    want = reference_train_step(setup["untied"], setup["groups"], tmp_path / "reference", *extra)
    assert_same_weights(got, want)
    assert_moved(got, weights(setup["untied"]))
    _assert_fails_against_half_lr(
        got,
        lambda lr: reference_train_step(
            setup["untied"], setup["groups"], tmp_path / "half", *extra, lr=lr
        ),
        assert_same_weights,
    )


def test_zero3_bf16_steps_equal_one_bf16_process(setup, tmp_path):
    """The shipped precision: DeepSpeed bf16 (the loaded model in bfloat16, the LoRA factors peft
    adds after zero.Init in float32, float32 master weights in the optimizer), every parameter
    partitioned, against one process computing the same steps so (tests/launching.py:
    BF16_UPDATE_RTOL), and not against one at half the learning rate. ZeRO-3 rounds the LoRA
    factors to bfloat16 once, when it partitions them (its float32 masters start from the rounded
    values): the reference starts from them too (without it every LoRA A factor is off by its
    rounding, 2**-9 of its norm, thousands of times what 3 steps move the attention ones)."""
    extra = ["--use_lora", "true", "--lora_r", "4", "--head_chunk_size", "64", "--bf16", "true"]
    out = tmp_path / "zero3"
    args = train_args(setup["tied"], setup["groups"], out, *extra, lr=BF16_LR)
    launch(setup["config"], "train", *args, probes=PROBES)
    _assert_partitioned_and_fused(out, head_calls={"fused": 2 * STEPS})
    for report in sharding_reports(out):
        assert report["mixed_precision"] == "bf16", report
        lora = 2 * 7 * 2  # A and B on 7 projections of 2 blocks
        assert report["dtypes"] == {"torch.bfloat16": report["parameters"] - lora,
                                    "torch.float32": lora}, report  # fmt: skip

    def reference(lr=BF16_LR):
        return reference_train_step(setup["tied"], setup["groups"], tmp_path / f"reference-{lr}",
                                    *extra, lr=lr, bf16=True, fp32_names=("lora_",),
                                    rounded_names=("lora_",))  # fmt: skip

    got, start = weights(out), reference(lr=0)
    assert_same_update(got, reference(), start)
    assert_moved(got, weights(setup["tied"]))
    _assert_fails_against_half_lr(
        got, reference, lambda g, w: assert_same_update(g, w, start), lr=BF16_LR
    )


@pytest.mark.parametrize("calibrate", [False, True], ids=["merge", "merge-and-calibrate"])
def test_zero3_adapt_merge_equals_one_process(setup, tmp_path, calibrate):
    """`csplade adapt` + merge (+ head-bias calibration) under ZeRO-3 saves the one-process weights.

    2 processes x 2 texts against 1 process x 4 texts, 3 SGD steps: the texts have equal token counts,
    so the mean of the two processes' per-token mean losses is the one-process loss.
    """
    extra = ["--head_bias_df", "0.05"] if calibrate else []
    common = ["--model_name_or_path", str(setup["tied"]), "--adapt_data", str(setup["texts"]),
              *ADAPT, *extra]  # fmt: skip
    out = tmp_path / "zero3"
    launch(
        setup["config"],
        "adapt",
        *common,
        "--output_dir", str(out), "--per_device_train_batch_size", "2",
        probes=("--sharding-report",),
    )  # fmt: skip
    for report in sharding_reports(out):
        assert report["sharded"] == report["parameters"] > 0, report
    one = tmp_path / "one"
    run_one_process(
        "adapt", *common, "--output_dir", str(one), "--per_device_train_batch_size", "4"
    )
    got = weights(out)
    assert "model.embed_tokens.weight" in got and not any("lora" in k for k in got)  # merged
    assert ("head_bias" in got) == calibrate
    assert_same_weights(got, weights(one))
    assert_moved(got, weights(setup["tied"]), merged=True)


def test_zero3_adapt_trains_a_head_bias_like_one_process(setup, tmp_path):
    """Adapting an encoder that already has a head bias (L_ReLU reads it) under ZeRO-3."""
    from csplade.model.encoder import SparseEncoder

    start = tmp_path / "calibrated"
    encoder = SparseEncoder.from_pretrained(setup["tied"])
    encoder.calibrate_head_bias(setup["texts"].read_text().splitlines(), doc_fraction=0.05)
    encoder.save_pretrained(start)
    common = ["--model_name_or_path", str(start), "--adapt_data", str(setup["texts"]), *ADAPT]
    out = tmp_path / "zero3"
    launch(
        setup["config"],
        "adapt",
        *common,
        "--output_dir", str(out), "--per_device_train_batch_size", "2",
        probes=("--sharding-report",),
    )  # fmt: skip
    for report in sharding_reports(out):  # (adapt writes no run_info.json)
        assert report["world_size"] == 2 and "DEEPSPEED" in report["distributed_type"], report
        assert report["sharded"] == report["parameters"] > 0, report  # every parameter partitioned
        assert any(n.endswith("encoder.head_bias") for n in report["sharded_names"]), report
    one = tmp_path / "one"
    run_one_process(
        "adapt", *common, "--output_dir", str(one), "--per_device_train_batch_size", "4"
    )
    got = weights(out)
    assert not torch.equal(got["head_bias"], weights(start)["head_bias"])  # L_ReLU trained it
    assert_same_weights(got, weights(one))
    assert_moved(got, weights(setup["tied"]), merged=True)


def _resume_args(setup, out: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(setup["tied"]), "--train_data", str(setup["groups"]),
        "--output_dir", str(out), "--group_size", "3", "--per_device_train_batch_size", "2",
        "--max_steps", "6", "--save_steps", "2", "--save_total_limit", "5", "--logging_steps", "1",
        "--learning_rate", "1e-3", "--seed", "3", "--use_lora", "true", "--lora_r", "4", *extra,
    ]  # fmt: skip


def test_zero3_resume_after_kill_equals_uninterrupted(setup, tmp_path):
    """Killed after its checkpoint of step 2, resumed from DeepSpeed's own checkpoint files (AdamW
    states, LR schedule, RNG with LoRA dropout on), the run ends on the uninterrupted run's weights."""
    reference = tmp_path / "reference"
    launch(setup["config"], "train", *_resume_args(setup, reference))
    interrupted = tmp_path / "interrupted"
    marker = interrupted / "checkpoint-2" / COMPLETE_MARKER
    launch_and_kill(setup["config"], "train", *_resume_args(setup, interrupted), marker=marker)
    assert not (interrupted / "run_info.json").exists()  # it really died before the end
    assert any((interrupted / "checkpoint-2").glob("global_step2/*optim_states.pt"))
    launch(
        setup["config"],
        "train",
        *_resume_args(setup, interrupted, "--resume_from_checkpoint", "latest"),
        probes=("--sharding-report",),
    )
    _assert_partitioned_and_fused(interrupted)
    info = json.loads((interrupted / "run_info.json").read_text())
    assert info["resumed_from"] is not None and info["global_step"] == 6
    assert_same_weights(weights(interrupted), weights(reference), atol=1e-6)


def test_zero3_without_gathered_saves_is_refused(setup, tmp_path):
    """Without stage3_gather_16bit_weights_on_model_save the Trainer would write empty (partitioned)
    tensors into csplade's folders: refused before training, with the setting to change."""
    config = zero_config(tmp_path, stage3_gather_16bit_weights_on_model_save=False)
    out = tmp_path / "refused"
    result = subprocess.run(
        launcher(config, "train", *train_args(setup["tied"], setup["groups"], out)),
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 0
    assert "stage3_gather_16bit_weights_on_model_save: true" in result.stderr
    assert not (out / "run_info.json").exists()
