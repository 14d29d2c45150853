"""The demo pipeline (`csplade.demo.run_demo`) end to end on the tiny ADI collection with a tiny model.

Same code path as `make demo` (adaptation recipe, training recipe, evaluation of untrained, trained and
BM25, table, chart, cached stages); only the backbone, the collection and the step counts are small.
ADI has no train split, so the smoke run trains on its test judgments: the figures mean nothing, the
plumbing is what is tested.
"""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
from tiny import tiny_model, tiny_tokenizer

from csplade.cli.demo import summary_table
from csplade.demo import DEMO, _training_recalibrates, find_scifact, for_variant, run_demo


def _tiny_settings(variant: str):
    settings = for_variant(variant)
    return dataclasses.replace(
        settings,
        name="tiny",
        model_dtype="float32",
        adapt={
            **DEMO.adapt,
            "max_steps": 2,
            "per_device_train_batch_size": 4,
            "lora_last_layers": 1,
        },
        train={
            **settings.train,
            "group_size": 2,
            "max_steps": 3,
            "per_device_train_batch_size": 4,
            "lora_last_layers": 1,
        },
        max_docs=None,
        max_queries=None,
        compare_untrained=True,
    )


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo") / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize(("variant", "recipe"), [("echo", "train"), ("bi", "lexdocs")])
def test_demo_runs_end_to_end_and_caches_its_stages(backbone, adi, tmp_path, variant, recipe):
    """`bi` runs the demo's recipe (learned queries over lexical documents); `echo` has none of that
    kind and runs the recipe that learns both sides."""
    settings = _tiny_settings(variant)
    assert settings.recipe == recipe
    out = tmp_path / "demo"
    written = run_demo(out, settings=settings, data=adi, backbone=backbone, train_split="test")

    assert (out / f"adapt-{variant}" / "csplade_config.json").exists()
    assert (out / "groups-bm25-test.jsonl").stat().st_size > 0  # BM25 negatives mined first
    assert (out / f"train-{variant}" / "adapter_model.safetensors").exists()
    # a training recipe with head_bias_recalibrate (bi's and echo's) calibrates the bias itself: the
    # adaptation then leaves it out
    recalibrates = _training_recalibrates(settings)
    assert recalibrates is (variant in ("bi", "echo"))
    adapted_bias = (out / f"adapt-{variant}" / "head_bias.safetensors").exists()
    assert adapted_bias is not recalibrates
    assert (out / f"train-{variant}" / "head_bias.safetensors").exists()
    # lexdocs-bi.yaml adds the lexical residual: the demo's trained model carries its training IDF,
    # and its documents are that residual alone
    lexical = (out / f"train-{variant}" / "lexical_weights.safetensors").exists()
    assert lexical is (variant == "bi")
    config = json.loads((out / f"train-{variant}" / "csplade_config.json").read_text())
    assert config.get("lexical_docs", False) is (recipe == "lexdocs")
    metrics = json.loads((written["table"].parent / "metrics.json").read_text())
    # a hybrid model (lexdocs) is shown with its own vectors beside it (its residual off)
    own = [f"tiny-{variant}-trained-own"] if recipe == "lexdocs" else []
    systems = [f"tiny-{variant}-untrained", f"tiny-{variant}-trained", *own, "bm25", "bm25-stem"]
    assert list(metrics) == systems
    for system in systems:
        assert 0.0 <= metrics[system]["adi"]["ndcg_cut_10"] <= 1.0
    assert metrics["bm25"]["adi"]["ndcg_cut_10"] > 0.1  # real English text, real BM25
    assert written["chart"].exists() and written["chart"].stat().st_size > 0
    table = summary_table(written["table"].parent)
    assert all(f"| {system} | adi |" in table for system in systems)
    timings = json.loads((out / "timings.json").read_text())
    assert {"adapt_s", "mine_s", "train_s", "eval_s"} <= set(timings)

    # second run: adaptation and training are skipped (their folders are not rewritten)
    stamp = (out / f"train-{variant}" / "adapter_model.safetensors").stat().st_mtime_ns
    time.sleep(0.01)
    again = run_demo(out, settings=settings, data=adi, backbone=backbone, train_split="test")
    assert (out / f"train-{variant}" / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((again["table"].parent / "metrics.json").read_text()) == metrics


def test_missing_data_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("CSPLADE_DATA", str(tmp_path / "nowhere"))
    monkeypatch.setenv("CSPLADE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr("csplade.demo.download_beir", offline)
    with pytest.raises(FileNotFoundError, match="CSPLADE_DATA=") as info:
        find_scifact()
    assert "network unreachable" in str(info.value)


def test_auto_dtype_is_bfloat16_only_where_its_matmuls_are_fast(tmp_path, monkeypatch):
    """The demo's `auto` dtype: bfloat16 on a CPU with AMX (or a CUDA GPU), float32 on one without
    (where bf16 matmuls are slower), float32 where the CPU's flags cannot be read; a named dtype
    is kept."""
    from csplade.demo import DEMO, resolve_dtype

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    amx, avx = tmp_path / "amx", tmp_path / "avx"
    amx.write_text("flags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n")
    avx.write_text("flags\t\t: fpu avx512f avx512_bf16\n")
    assert DEMO.model_dtype == "auto"
    assert resolve_dtype("auto", amx) == "bfloat16"
    assert resolve_dtype("auto", avx) == "float32"
    assert resolve_dtype("auto", tmp_path / "missing") == "float32"
    assert resolve_dtype("bfloat16", avx) == "bfloat16"
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert resolve_dtype("auto", avx) == "bfloat16"
