"""`csplade plan`: the memory model against autograd and real models, sharding, verdicts, errors, and
predicted vs measured peak memory of a real (tiny) CPU training run."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from csplade.plan import (
    KNOWN_ARCHITECTURES,
    Architecture,
    Cluster,
    Workload,
    architecture_from_config,
    count_examples,
    estimate,
    load_cluster,
    parse_memory,
    plan_recipe,
    read_workload,
    resolve_architecture,
    suggest,
)
from csplade.plan.memory import layer_activation_bytes
from csplade.plan.sizes import parameter_counts, precision
from csplade.training.arguments import ModelArguments

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
CONFIGS = REPO / "accelerate_configs"
LLAMA_8B = KNOWN_ARCHITECTURES["meta-llama/llama-3.1-8b"]
LLAMA_RECIPES = ("llama-3.1-8b/adapt-mntp.yaml", "llama-3.1-8b/train-bi-lora.yaml")


def _workload(**model_changes) -> Workload:
    settings = {"model_name_or_path": "x", "model_dtype": "bfloat16", **model_changes}
    return Workload(
        phase="train",
        model=ModelArguments(**settings),
        batch_size=4,
        group_size=8,
        mixed_precision="bf16",
    )


def _parts(plan) -> dict[str, float]:
    return {p.name: p.bytes for p in plan.parts}


# ---------------------------------------------------------------------------------------- breakdown
@pytest.mark.parametrize(
    "recipe, config",
    [
        ("llama-3.1-8b/train-bi-lora.yaml", "multi_node.yaml"),
        ("llama-3.1-8b/adapt-mntp.yaml", "fsdp2.yaml"),
        ("mistral-7b/train-echo-lora.yaml", "zero3_offload.yaml"),
        ("bert/splade-pp.yaml", "ddp.yaml"),
        ("smollm2-135m/train-echo.yaml", "single.yaml"),
    ],
)
def test_breakdown_adds_up(recipe, config):
    plan = plan_recipe(RECIPES / recipe, CONFIGS / config, gpu_memory="80GB", num_queries=1000)
    parts = _parts(plan)
    assert all(math.isfinite(v) and v >= 0 for v in parts.values()), parts
    assert sum(parts.values()) == pytest.approx(plan.total_bytes, rel=1e-12)
    as_json = json.loads(json.dumps(plan.to_dict()))
    assert sum(as_json["memory_bytes"].values()) == pytest.approx(as_json["total_bytes"], rel=1e-12)
    assert as_json["fits"] == (plan.total_bytes <= 80e9)
    # the largest parts of a 7-8B LoRA run are activations/transients, never the frozen weights
    # once ZeRO-3 shards them
    if config == "multi_node.yaml":
        assert parts["weights"] < parts["activations"]


def test_zero_stages_and_fsdp_shard_what_they_should():
    arch, world = LLAMA_8B, 16
    full = _workload(use_lora=False)
    plans = {
        name: estimate(arch, full, Cluster(nodes=2, gpus_per_node=8, **kw))
        for name, kw in {
            "ddp": {"distributed_type": "MULTI_GPU"},
            "z1": {"distributed_type": "DEEPSPEED", "zero_stage": 1},
            "z2": {"distributed_type": "DEEPSPEED", "zero_stage": 2},
            "z3": {"distributed_type": "DEEPSPEED", "zero_stage": 3},
            "fsdp": {"distributed_type": "FSDP", "fsdp_sharding": "FULL_SHARD"},
            "hybrid": {"distributed_type": "FSDP", "fsdp_sharding": "HYBRID_SHARD"},
        }.items()
    }
    p = {k: _parts(v) for k, v in plans.items()}
    total = arch.total_params()
    # weights: replicated by DDP/ZeRO-1/2, total/GPUs under ZeRO-3
    assert p["ddp"]["weights"] == total * 2
    assert p["z2"]["weights"] == p["ddp"]["weights"]
    assert p["z3"]["weights"] == pytest.approx(total * 2 / world)
    # ZeRO-1 shards the optimizer (12 B per parameter: fp32 master, m, v), not the gradients
    assert p["z1"]["optimizer"] == pytest.approx(12 * total / world)
    assert p["z1"]["gradients"] == pytest.approx(2 * total)
    # ZeRO-2 shards the gradients too
    assert p["z2"]["gradients"] == pytest.approx(2 * total / world)
    assert p["z3"]["gradients"] == pytest.approx(p["z2"]["gradients"])
    # FSDP with mixed precision keeps fp32 trainable weights, sharded over all GPUs or, hybrid, a node
    assert p["fsdp"]["weights"] == pytest.approx(4 * total / world)
    assert p["hybrid"]["weights"] == pytest.approx(4 * total / 8)
    # DDP without sharding keeps AdamW's m and v in the bf16 weights' dtype: 4 B per parameter
    assert p["ddp"]["optimizer"] == pytest.approx(4 * total)
    states = {k: v["weights"] + v["gradients"] + v["optimizer"] for k, v in p.items()}
    assert states["z3"] < states["z2"] < states["z1"] < states["ddp"] * 3
    # full fine-tuning under ZeRO-3 trains a partitioned head, gathered for the fused head: no
    # (B, L, V) term; the whole (V, H) gradient before its reduce-scatter is a transient
    assert p["z3"]["head"] == p["z2"]["head"] == p["ddp"]["head"]
    assert all(part.detail.startswith("fused") for part in plans["z3"].parts if part.name == "head")
    assert p["z3"]["transient"] >= arch.vocab * arch.hidden * 2


def test_offload_moves_states_to_cpu():
    on_gpu = plan_recipe(RECIPES / "mistral-7b/train-echo-lora.yaml", CONFIGS / "zero3.yaml")
    offload = plan_recipe(
        RECIPES / "mistral-7b/train-echo-lora.yaml", CONFIGS / "zero3_offload.yaml"
    )
    gpu, off = _parts(on_gpu), _parts(offload)
    assert off["optimizer"] == 0 and off["weights"] == 0 and off["lora"] == 0
    assert gpu["optimizer"] > 0 and gpu["weights"] > 0
    assert offload.cpu_offload_bytes == pytest.approx(
        gpu["optimizer"] + gpu["weights"] + gpu["lora"]
    )
    assert on_gpu.cpu_offload_bytes == 0


def test_qlora_weights_are_four_bit_plus_constants():
    arch = LLAMA_8B
    plan = estimate(arch, _workload(use_lora=True, quantization="nf4"), Cluster())
    quantized = arch.layers * arch.layer_matmul_params()
    rest = arch.total_params() - quantized
    # 4 bits + one 8-bit absmax per 64 + one fp32 per 256 blocks; the rest cast to fp32 by peft
    expected = quantized * (0.5 + 1 / 64 + 4 / 16384) + rest * 4
    assert _parts(plan)["weights"] == pytest.approx(expected)
    bf16 = estimate(arch, _workload(use_lora=True), Cluster())
    # under half of bf16: the 4-bit decoder is ~1/4, the fp32 embeddings and head are the rest
    assert _parts(plan)["weights"] < 0.5 * _parts(bf16)["weights"]


def test_naive_head_is_the_big_term_and_fused_fixes_it():
    fused = estimate(LLAMA_8B, _workload(use_lora=True), Cluster(), gpu_memory=40e9)
    naive = estimate(LLAMA_8B, _workload(use_lora=True, fused_head=False), Cluster())
    rows, length, vocab = 4 * 8, 256 + 1, LLAMA_8B.vocab
    # naive: ReLU output + masked activations saved, two (B, L, V) float32 gradients transient
    assert _parts(naive)["head"] >= 8 * rows * length * vocab
    assert _parts(naive)["head"] > 100 * _parts(fused)["head"]


# ---------------------------------------------------------------------------------------- verdicts
@pytest.mark.parametrize("recipe", LLAMA_RECIPES)
def test_llama_recipes_fit_on_16_nodes_of_8_gpus(recipe):
    multi = plan_recipe(RECIPES / recipe, CONFIGS / "multi_node.yaml", gpu_memory="80GB")
    assert multi.cluster.world == 128 and multi.cluster.zero_stage == 3
    assert multi.fits and multi.verdict() == "fits"
    zero3 = plan_recipe(
        RECIPES / recipe, CONFIGS / "zero3.yaml", nodes=16, gpus_per_node=8, gpu_memory="80GB"
    )
    assert zero3.cluster.world == 128
    assert zero3.fits and zero3.verdict() == "fits"


def test_cli_prints_fits_for_the_llama_recipe(capsys):
    from csplade.cli import main

    args = [
        "plan",
        str(RECIPES / "llama-3.1-8b/train-bi-lora.yaml"),
        "--accelerate-config",
        str(CONFIGS / "zero3.yaml"),
        "--nodes",
        "16",
        "--gpus-per-node",
        "8",
        "--gpu-memory",
        "80GB",
        "--num-queries",
        "500000",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "verdict: fits" in out
    assert "16 x 8 GPUs, DeepSpeed ZeRO-3" in out
    assert "epoch" in out
    assert main([*args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] is True and data["cluster"]["world"] == 128
    assert data["time"]["steps_per_epoch"] == math.ceil(500000 / (4 * 128))


def test_does_not_fit_names_the_knobs(capsys):
    from csplade.cli import main

    recipe = str(RECIPES / "llama-3.1-8b/train-bi-lora.yaml")
    argv = ["plan", recipe, "--accelerate-config", str(CONFIGS / "single.yaml")]
    argv += ["--gpu-memory", "40GB", "--activation_checkpointing", "false"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "verdict: does not fit" in out
    assert "gradient_checkpointing: true" in out
    plan = plan_recipe(
        recipe,
        CONFIGS / "single.yaml",
        gpu_memory="40GB",
        overrides=["--activation_checkpointing", "false"],
    )
    assert not plan.fits
    knobs = {s.knob: s for s in plan.suggestions}
    assert knobs["gradient_checkpointing: true"].fits
    assert knobs["gradient_checkpointing: true"].total_bytes < plan.total_bytes
    assert any(k.startswith("per_device_train_batch_size: 2") for k in knobs)
    assert "quantization: nf4 (QLoRA 4-bit base)" in knobs
    # what the recipe says is what is planned: with checkpointing on it fits in 40 GB
    assert plan_recipe(recipe, CONFIGS / "single.yaml", gpu_memory="40GB").fits


def test_combined_knobs_when_no_single_one_is_enough():
    workload = dataclasses.replace(_workload(use_lora=False, fused_head=False), batch_size=16)
    plan = estimate(LLAMA_8B, workload, Cluster(), gpu_memory=40e9)
    assert not plan.fits
    suggestions = suggest(LLAMA_8B, workload, Cluster(), gpu_memory=40e9)
    assert not any(s.fits for s in suggestions if not s.knob.startswith("combined"))
    combined = [s for s in suggestions if s.knob.startswith("combined")]
    assert combined and combined[0].total_bytes < min(
        s.total_bytes for s in suggestions if not s.knob.startswith("combined")
    )


# ---------------------------------------------------------------------------------------- the model vs reality
def _tiny_config(**overrides):
    from transformers import LlamaConfig

    settings = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return LlamaConfig(**{**settings, **overrides})


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_word_embeddings": False},
        {"num_key_value_heads": 4, "num_hidden_layers": 3},
        {"attention_bias": True, "mlp_bias": True},
    ],
)
def test_parameter_counts_match_transformers(overrides):
    from transformers import AutoModelForCausalLM

    config = _tiny_config(**overrides)
    model = AutoModelForCausalLM.from_config(config)
    arch = architecture_from_config(config.to_dict())
    assert arch.total_params() == sum(p.numel() for p in model.parameters())


def test_qwen2_parameter_count_matches_transformers():
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**_tiny_config().to_dict())
    model = AutoModelForCausalLM.from_config(config)
    arch = architecture_from_config(config.to_dict())
    assert arch.total_params() == sum(p.numel() for p in model.parameters())


def test_bert_parameter_count_matches_transformers():
    from transformers import AutoModelForMaskedLM, BertConfig

    config = BertConfig(
        vocab_size=300,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    model = AutoModelForMaskedLM.from_config(config)
    arch = architecture_from_config(config.to_dict())
    assert arch.family == "bert"
    assert arch.total_params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "targets",
    [
        ["q_proj", "v_proj"],
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ],
)
def test_lora_parameter_count_matches_peft(targets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = _tiny_config(num_hidden_layers=2)
    model = get_peft_model(
        AutoModelForCausalLM.from_config(config),
        LoraConfig(r=8, target_modules=targets),
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model_args = ModelArguments(use_lora=True, lora_r=8, lora_target_modules=targets)
    arch = architecture_from_config(config.to_dict())
    assert parameter_counts(arch, model_args).lora == trainable


def _saved_bytes_per_token_per_layer(config, dtype, lora_dropout, attn, batch=2, length=24):
    """What autograd saves in one decoder layer per token: (3 layers - 1 layer) / 2, padded batch."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    def saved(layers: int) -> int:
        torch.manual_seed(0)
        cfg = copy.deepcopy(config)
        cfg.num_hidden_layers = layers
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=dtype)
        if lora_dropout is not None:
            model = get_peft_model(
                model,
                LoraConfig(r=8, lora_dropout=lora_dropout, target_modules=list(_ALL_TARGETS)),
            ).get_base_model()
        model.train()
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen: dict[int, int] = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr and ptr not in params:
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        ids = torch.randint(4, cfg.vocab_size, (batch, length))
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[0, length // 2 :] = 0  # a padded row: the model gets an attention mask
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.model(input_ids=ids, attention_mask=mask, use_cache=False)
        return sum(seen.values())

    return (saved(3) - saved(1)) / 2 / (batch * length)


_ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize(
    "dtype, lora_dropout, attn",
    [
        ("float32", None, "sdpa"),
        ("float32", None, "eager"),
        ("float32", 0.0, "sdpa"),
        ("float32", 0.1, "sdpa"),
        ("bfloat16", None, "sdpa"),
        ("bfloat16", 0.0, "sdpa"),
        ("bfloat16", 0.1, "sdpa"),
    ],
)
def test_activation_formula_matches_autograd(dtype, lora_dropout, attn):
    config = _tiny_config()
    measured = _saved_bytes_per_token_per_layer(
        config, getattr(torch, dtype), lora_dropout, attn, length=24
    )
    use_lora = lora_dropout is not None
    workload = Workload(
        phase="train",
        model=ModelArguments(
            model_dtype=dtype,
            attn_implementation=attn,
            use_lora=use_lora,
            lora_r=8,
            lora_dropout=lora_dropout or 0.0,
        ),
        batch_size=2,
    )
    arch = architecture_from_config(config.to_dict())
    predicted = layer_activation_bytes(
        arch, workload, precision(workload, Cluster()), 24, device="cpu"
    )
    assert predicted == pytest.approx(measured, rel=0.02)


@pytest.mark.slow  # two fresh training subprocesses (each imports the whole stack): ~40 s of CPU
def test_measured_peak_memory_within_25_percent(tmp_path):
    """A real CPU training run (tiny Llama, run_training) in a fresh subprocess per case."""
    spec = importlib.util.spec_from_file_location(
        "plan_validation", REPO / "benchmarks" / "plan_validation.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for case in bench.TEST_CASES:
        row = bench.run_case(case, tmp_path)
        assert abs(row["ratio"] - 1) <= 0.25, (case, row["predicted"], row["measured"])


# ---------------------------------------------------------------------------------------- time
def test_time_model_counts_lora_backward_through_frozen_weights():
    arch = LLAMA_8B
    full = estimate(arch, _workload(use_lora=False), Cluster())
    lora = estimate(arch, _workload(use_lora=True), Cluster())
    tokens = full.time.tokens_per_step
    matmul = arch.layers * arch.layer_matmul_params()
    f, lo = full.time.flops_per_step, lora.time.flops_per_step
    # full fine-tuning: 2P forward + 2P input gradients + 2P weight gradients (plus attention)
    assert f["backward_weight"] == pytest.approx(2 * matmul * tokens)
    assert f["forward"] > 2 * matmul * tokens
    # LoRA: the frozen weights still cost forward + input gradients, ~4P, not 6P
    assert lo["backward_input"] >= 2 * matmul * tokens
    assert lo["backward_weight"] == pytest.approx(2 * lora.parameters["lora"] * tokens)
    ratio = sum(lo.values()) / sum(f.values())
    assert 0.6 < ratio < 0.75
    checkpointed = estimate(
        arch, dataclasses.replace(_workload(use_lora=True), gradient_checkpointing=True), Cluster()
    )
    assert checkpointed.time.flops_per_step["recompute"] == pytest.approx(lo["forward"])


def test_time_per_step_and_epoch():
    workload = dataclasses.replace(_workload(use_lora=True), examples=10_000, grad_accum=2)
    cluster = Cluster(distributed_type="MULTI_GPU", gpus_per_node=8)
    plan = estimate(LLAMA_8B, workload, cluster, tflops=500, mfu=0.5)
    t = plan.time
    assert t.seconds_per_step == pytest.approx(sum(t.flops_per_step.values()) / (500e12 * 0.5))
    assert t.steps_per_epoch == math.ceil(10_000 / (4 * 8))
    assert t.optimizer_steps_per_epoch == math.ceil(t.steps_per_epoch / 2)
    assert t.seconds_per_epoch == pytest.approx(t.steps_per_epoch * t.seconds_per_step)


# ---------------------------------------------------------------------------------------- inputs
def test_architecture_sources(tmp_path):
    config = _tiny_config(num_hidden_layers=3)
    config.save_pretrained(tmp_path / "backbone")
    arch = resolve_architecture(str(tmp_path / "backbone"))
    assert (arch.hidden, arch.layers, arch.kv_heads) == (64, 3, 2)
    assert arch.source.endswith("config.json")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "csplade_config.json").write_text(
        json.dumps({"adapter": True, "base_model": str(tmp_path / "backbone")})
    )
    assert resolve_architecture(str(adapter)).layers == 3
    mistral = resolve_architecture("mistralai/Mistral-7B-v0.3")
    assert (mistral.vocab, mistral.kv_heads, mistral.tied) == (32768, 8, False)
    guessed = resolve_architecture("runs/llama-3.1-8b/adapt-mntp")
    assert guessed.vocab == 128256 and "guessed" in guessed.source
    assert resolve_architecture("anything", override="meta-llama/Llama-3.1-8B").layers == 32
    with pytest.raises(ValueError, match="--architecture"):
        resolve_architecture("some-org/unknown-model-xyz")


def test_known_architectures_have_their_published_sizes():
    assert isinstance(LLAMA_8B, Architecture)
    # 8.03 B parameters: Llama-3.1-8B's published size
    assert LLAMA_8B.total_params() == pytest.approx(8.03e9, rel=0.002)
    mistral = KNOWN_ARCHITECTURES["mistralai/mistral-7b-v0.3"]
    assert mistral.total_params() == pytest.approx(7.25e9, rel=0.002)


def test_cluster_from_accelerate_configs():
    multi = load_cluster(CONFIGS / "multi_node.yaml")
    assert (multi.nodes, multi.gpus_per_node, multi.zero_stage) == (16, 8, 3)
    assert load_cluster(CONFIGS / "zero3.yaml", nodes=16, gpus_per_node=8).world == 128
    assert load_cluster(CONFIGS / "zero3.yaml", nodes=4).world == 32  # 8 per node from the config
    fsdp = load_cluster(CONFIGS / "fsdp2.yaml")
    assert fsdp.fsdp and fsdp.fsdp_sharding == "FULL_SHARD"
    offload = load_cluster(CONFIGS / "zero3_offload.yaml")
    assert offload.offload_optimizer and offload.offload_params
    assert load_cluster(CONFIGS / "single.yaml").world == 1


def test_cli_reports_a_missing_recipe(tmp_path, capsys):
    from csplade.cli import main

    code = main(
        ["plan", str(tmp_path / "gone.yaml"), "--accelerate-config", str(CONFIGS / "ddp.yaml")]
    )
    assert code == 2
    assert "gone.yaml" in capsys.readouterr().err


def test_bad_paths_and_values_are_clear_errors(tmp_path):
    recipe = RECIPES / "llama-3.1-8b/train-bi-lora.yaml"
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        plan_recipe(tmp_path / "nope.yaml", CONFIGS / "ddp.yaml")
    with pytest.raises(FileNotFoundError, match="missing-accelerate.yaml"):
        plan_recipe(recipe, tmp_path / "missing-accelerate.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("distributed_type: TPU\nnum_processes: 8\n")
    with pytest.raises(ValueError, match=r"bad.yaml.*TPU"):
        load_cluster(bad)
    bad.write_text("distributed_type: MULTI_GPU\nnum_machines: 4\nnum_processes: 10\n")
    with pytest.raises(ValueError, match=r"bad.yaml.*num_processes"):
        load_cluster(bad)
    bad.write_text(
        "distributed_type: DEEPSPEED\ndeepspeed_config:\n  offload_optimizer_device: gpu\n"
    )
    with pytest.raises(ValueError, match=r"bad.yaml.*offload_optimizer_device"):
        load_cluster(bad)
    bad.write_text("[unclosed")
    with pytest.raises(ValueError, match="bad.yaml"):
        load_cluster(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("model_name_or_path: meta-llama/Llama-3.1-8B\nper_device_batch_size: 4\n")
    with pytest.raises(ValueError, match="per_device_batch_size"):
        read_workload(typo)


@pytest.mark.parametrize(
    "text, expected",
    [("80GB", 80e9), ("79GiB", 79 * 1024**3), ("24000MB", 24e9), ("40", 40e9), ("1.5TB", 1.5e12)],
)
def test_parse_memory(text, expected):
    assert parse_memory(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["80 gigs", "-3GB", "GB", "0GB"])
def test_parse_memory_rejects(text):
    with pytest.raises(ValueError):
        parse_memory(text)


def test_examples_counted_from_local_data(tmp_path):
    groups = tmp_path / "groups.jsonl"
    groups.write_text('{"query": "a"}\n\n{"query": "b"}\n{"query": "c"}\n')
    assert count_examples("train", str(groups)) == 3
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "qrels" / "train.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t1\nq2\td1\t1\nq3\td3\t0\n"
    )
    (beir / "corpus.jsonl").write_text('{"_id": "d1", "text": "x"}\n{"_id": "d2", "text": "y"}\n')
    assert count_examples("train", str(beir)) == 2  # q3 has no positive
    assert count_examples("adapt", str(beir)) == 2
    assert count_examples("train", str(tmp_path / "absent.jsonl")) is None
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model_name_or_path: meta-llama/Llama-3.1-8B\ntrain_data: {groups}\nmax_train_queries: 2\n"
    )
    workload = read_workload(recipe)
    assert workload.examples == 2 and "capped" in workload.examples_source
    assert read_workload(recipe, num_examples=1).examples == 1


# ------------------------------------------------------------------------------- the head it models
HEAD_SETTINGS = {
    "full": [],
    "naive": ["--fused_head", "false"],
    "lora": ["--use_lora", "true", "--lora_r", "4"],
    "lora-on-the-head": ["--use_lora", "true", "--lora_r", "4", "--lora_lm_head", "true"],
    "qlora-nf4": ["--use_lora", "true", "--lora_r", "4", "--quantization", "nf4"],
}


@pytest.mark.parametrize("setting", list(HEAD_SETTINGS))
def test_the_planned_head_is_the_head_the_encoder_runs(tmp_path, setting):
    """`head_path` (the head term of every plan) names the head SparseEncoder.head_calls counts
    when the recipe's encoder trains; under ZeRO-3 and FSDP2 the distributed tests compare it with
    the runs' own counts (tests/test_zero3.py, tests/test_fsdp.py)."""
    from synthetic import save_base

    from csplade.plan.memory import head_path
    from csplade.training.loading import load_encoder_for_training

    if setting.startswith("qlora"):
        pytest.importorskip("bitsandbytes")
    base = save_base(tmp_path / "base")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model_name_or_path: {base}\n")
    workload = read_workload(recipe, HEAD_SETTINGS[setting])
    planned = head_path(workload)
    for config in ("single.yaml", "ddp.yaml", "zero3.yaml", "fsdp2.yaml"):
        plan = estimate(KNOWN_ARCHITECTURES["meta-llama/llama-3.1-8b"], workload,
                        load_cluster(CONFIGS / config))  # fmt: skip
        assert next(p for p in plan.parts if p.name == "head").detail.startswith(planned), config
    encoder = load_encoder_for_training(workload.model)
    batch = encoder.tokenize(["aa ab ac", "ba bb"])
    batch.pop("n_truncated")
    encoder(**batch).sum().backward()
    assert dict(encoder.head_calls) == {planned: 1}


def test_lexical_documents_cost_no_backbone_call():
    """`lexical_docs`: a training step runs the backbone on its queries only."""
    from csplade.plan.sizes import backbone_calls

    both = backbone_calls(LLAMA_8B, _workload(use_lora=True))
    lexical = backbone_calls(
        LLAMA_8B, _workload(use_lora=True, lexical_residual=True, lexical_docs=True)
    )
    assert len(both) == 2 and lexical == both[:1]
    memory = estimate(LLAMA_8B, _workload(use_lora=True), Cluster())
    less = estimate(
        LLAMA_8B, _workload(use_lora=True, lexical_residual=True, lexical_docs=True), Cluster()
    )
    assert _parts(less)["activations"] < _parts(memory)["activations"]
