"""Recipes: every shipped recipe parses; overrides are typed; unknown keys name the closest valid one."""

from __future__ import annotations

from pathlib import Path

import pytest

from csplade.training.arguments import (
    AdaptationArguments,
    CspladeTrainingArguments,
    DataArguments,
    LossArguments,
    ModelArguments,
)
from csplade.training.recipe import parse_recipe

REPO = Path(__file__).resolve().parents[1]
TRAIN_TYPES = (ModelArguments, LossArguments, DataArguments, CspladeTrainingArguments)
ADAPT_TYPES = (ModelArguments, AdaptationArguments, CspladeTrainingArguments)
RECIPES = sorted((REPO / "recipes").glob("*/*.yaml"))


def _types(path: Path):
    return ADAPT_TYPES if path.name.startswith("adapt") else TRAIN_TYPES


def test_the_expected_recipes_exist():
    names = {f"{p.parent.name}/{p.name}" for p in RECIPES}
    for variant in ("uni", "echo", "bi"):
        assert f"smollm2-135m/adapt-{variant}.yaml" in names
        assert f"smollm2-135m/train-{variant}.yaml" in names
        assert f"smollm2-135m/distill-{variant}.yaml" in names
        assert f"smollm2-135m/selfmine-{variant}.yaml" in names
    assert {
        "llama-3.1-8b/adapt-mntp.yaml",
        "llama-3.1-8b/train-bi-lora.yaml",
        "mistral-7b/train-echo-lora.yaml",
        "bert/splade-pp.yaml",
        "bert/inference-free.yaml",
    } <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_recipe_parses(recipe):
    # bf16 recipes are for GPUs; on this CPU machine the check only concerns the keys and values.
    parsed = parse_recipe(recipe, ["--use_cpu", "true", "--bf16", "false"], types=_types(recipe))
    model_args = parsed[0]
    assert isinstance(model_args, ModelArguments)
    assert parsed[-1].output_dir


def test_gpu_recipes_are_lora_r16_with_16_docs_per_query():
    for name in ("llama-3.1-8b/train-bi-lora.yaml", "mistral-7b/train-echo-lora.yaml"):
        m, s, d, t = parse_recipe(REPO / "recipes" / name, ["--use_cpu", "true", "--bf16", "false"])
        assert m.use_lora and m.lora_r == 16 and d.group_size == 16


def test_smollm2_bi_recipes_give_queries_a_prefix():
    # SmolLM2's tokenizer adds no BOS: under `bi`'s next-token pooling a query's first token is
    # predicted by the prefix's last position or by none (a one-token query would be a zero vector)
    for stem in ("train", "distill", "selfmine"):
        recipe = REPO / "recipes" / "smollm2-135m" / f"{stem}-bi.yaml"
        model_args = parse_recipe(recipe, ["--use_cpu", "true", "--bf16", "false"])[0]
        assert model_args.query_prefix.strip(), recipe.name


def test_overrides_are_typed(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("variant: bi\nlearning_rate: 2e-5\noutput_dir: out\n")
    m, s, d, t = parse_recipe(
        recipe,
        [
            "--lambda_q",
            "0.01",
            "--group_size=3",
            "--use_lora",
            "--lora_target_modules",
            "q_proj",
            "v_proj",
        ],
    )
    assert m.variant == "bi" and t.learning_rate == 2e-5  # YAML 1.1 reads 2e-5 as text: coerced
    assert s.lambda_q == 0.01 and d.group_size == 3
    assert m.use_lora is True and m.lora_target_modules == ["q_proj", "v_proj"]


def test_unknown_keys_name_the_closest_valid_one(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("# Model\nvarient: bi\n")
    with pytest.raises(
        ValueError, match=r"r\.yaml: unknown key 'varient'; did you mean 'variant'\?"
    ):
        parse_recipe(recipe)
    with pytest.raises(ValueError, match=r"unknown key 'lamda_q'; did you mean 'lambda_q'\?"):
        parse_recipe(None, ["--lamda_q", "0.1"])
    with pytest.raises(ValueError, match="allowed: uni, echo, bi"):
        parse_recipe(None, ["--variant", "both"])


def test_missing_or_bad_recipe_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        parse_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        parse_recipe(bad)


def test_quantized_backbone_requires_lora():
    with pytest.raises(ValueError, match="QLoRA"):
        ModelArguments(quantization="nf4")


@pytest.mark.parametrize(
    "config", sorted((REPO / "accelerate_configs").glob("*.yaml")), ids=lambda p: p.name
)
def test_accelerate_configs_load_in_accelerate(config):
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(config))
    assert loaded.num_processes >= 1 and loaded.num_machines >= 1
    if "zero" in config.name:
        assert loaded.distributed_type.value == "DEEPSPEED"
        stage = loaded.deepspeed_config["zero_stage"]
        assert stage == (2 if "zero2" in config.name else 3)
    if config.name == "multi_node.yaml":
        assert loaded.num_machines == 16 and loaded.num_processes == 128
        assert loaded.main_process_ip and loaded.main_process_port
    if config.name == "fsdp2.yaml":
        assert loaded.fsdp_config["fsdp_version"] == 2


def test_expected_accelerate_configs_exist():
    names = {p.name for p in (REPO / "accelerate_configs").glob("*.yaml")}
    assert names >= {
        "single.yaml",
        "ddp.yaml",
        "zero2.yaml",
        "zero3.yaml",
        "zero3_offload.yaml",
        "fsdp2.yaml",
        "multi_node.yaml",
    }
