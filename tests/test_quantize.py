"""Quantized loading (every mode, head on/off, save/reload) and the quantization sweep.

Models are tiny random Llama / BERT backbones saved to a temporary folder (tests/tiny.py); the sweep
runs on the real `adi` collection from $CSPLADE_DATA. A mode is skipped only when its package is
missing.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from conftest import data_dir
from tiny import random_texts, tiny_model, tiny_tokenizer

from csplade.evaluation import quant_sweep
from csplade.evaluation.quant_sweep import ROW_KEYS, SweepSettings, pareto_front, run_sweep
from csplade.model.encoder import SparseEncoder
from csplade.model.head.quantized import QuantizedLMHead, TiedQuantizedEmbedding, module_counts
from csplade.quantization.loading import resolve_request
from csplade.quantization.modes import MODES, parameter_bytes, quiet_int8_cast_notice

quiet_int8_cast_notice()

INTEGER_MODES = ("int8", "nf4", "fp4", "torchao-int8-wo", "torchao-int8-dyn")
LOADABLE = ("none", "bf16", "fp16", *INTEGER_MODES)
# Smallest cosine to the float32 vectors on the tiny model (hidden size 32): int8 and half
# precision stay within 1e-4; 4-bit codes (16 levels per block of 64) are visibly coarser.
MIN_COSINE = {"int8": 0.99, "torchao-int8-wo": 0.99, "torchao-int8-dyn": 0.99, "nf4": 0.85}
MIN_COSINE.update({"fp4": 0.85, "bf16": 0.99, "fp16": 0.99, "none": 1.0 - 1e-6})
TEXTS = random_texts(12, seed=3)


def _needs(mode: str) -> None:
    package = {"int8": "bitsandbytes", "nf4": "bitsandbytes", "fp4": "bitsandbytes"}.get(mode)
    if mode.startswith("torchao"):
        package = "torchao"
    if package and importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (needed by quantization={mode!r})")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def fp32_vectors(llama_dir):
    return SparseEncoder.from_pretrained(llama_dir).encode(TEXTS, show_progress=False).toarray()


def _encode(encoder) -> np.ndarray:
    return encoder.encode(TEXTS, batch_size=4, show_progress=False).toarray()


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    dots = (a * b).sum(1)
    return float((dots / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


# ------------------------------------------------------------------------------------ modes


def test_unknown_mode_is_an_error_with_a_suggestion(llama_dir):
    with pytest.raises(ValueError, match="did you mean 'nf4'"):
        SparseEncoder.from_pretrained(llama_dir, quantization="nf44")


def test_gptq_says_what_to_install(llama_dir):
    if any(importlib.util.find_spec(m) for m in ("gptqmodel", "auto_gptq")):
        pytest.skip("a GPTQ package is installed here")
    with pytest.raises(ImportError, match="pip install gptqmodel"):
        SparseEncoder.from_pretrained(llama_dir, quantization="gptq")


def test_quantize_head_needs_a_mode(llama_dir):
    with pytest.raises(ValueError, match="quantize_head=True needs a quantization mode"):
        SparseEncoder.from_pretrained(llama_dir, quantize_head=True)


@pytest.mark.parametrize("mode", LOADABLE)
def test_every_mode_loads_and_encodes(llama_dir, fp32_vectors, mode):
    _needs(mode)
    encoder = SparseEncoder.from_pretrained(llama_dir, quantization=mode)
    vectors = _encode(encoder)
    assert vectors.shape == fp32_vectors.shape
    assert np.isfinite(vectors).all() and (vectors > 0).sum(1).min() > 0
    assert _min_cosine(vectors, fp32_vectors) > MIN_COSINE[mode]
    counts = module_counts(encoder.base_model)
    if mode in INTEGER_MODES:  # every transformer-block projection is quantized, the head is not
        assert counts == {"quantized_linear": 14, "float_linear": 0, "quantized_head": 0}
    else:
        assert counts["quantized_linear"] == 0
    if mode in ("bf16", "fp16"):
        want = {"bf16": torch.bfloat16, "fp16": torch.float16}[mode]
        assert {p.dtype for p in encoder.parameters()} == {want}
    if mode == "none":
        assert "quantization" not in encoder.config.extra
    else:
        assert encoder.config.extra["quantization"] == {"mode": mode, "quantize_head": False}


@pytest.mark.parametrize("mode", INTEGER_MODES)
def test_quantized_head_shrinks_the_model_and_keeps_the_vectors(llama_dir, fp32_vectors, mode):
    _needs(mode)
    plain = SparseEncoder.from_pretrained(llama_dir, quantization=mode)
    headq = SparseEncoder.from_pretrained(llama_dir, quantization=mode, quantize_head=True)
    base = headq.base_model
    assert isinstance(base.get_output_embeddings(), QuantizedLMHead)
    assert isinstance(base.get_input_embeddings(), TiedQuantizedEmbedding)  # tiny llama is tied
    # The (256 x 32) float32 head was 32 KiB; stored in 8 or 4 bits it saves at least 20 KiB.
    saved = parameter_bytes(plain.backbone) - parameter_bytes(headq.backbone)
    assert saved > 20 * 1024
    vectors = _encode(headq)
    assert _min_cosine(vectors, fp32_vectors) > MIN_COSINE[mode] - 0.05
    assert headq.config.extra["quantization"] == {"mode": mode, "quantize_head": True}


@pytest.mark.parametrize("mode", INTEGER_MODES)
def test_tied_embedding_reads_the_quantized_head_rows(llama_dir, mode):
    _needs(mode)
    encoder = SparseEncoder.from_pretrained(llama_dir, quantization=mode, quantize_head=True)
    head = encoder.base_model.get_output_embeddings()
    embed = encoder.base_model.get_input_embeddings()
    first = _encode(encoder)
    second = _encode(encoder)  # a forward must not change how the head is stored
    np.testing.assert_array_equal(first, second)
    ids = torch.tensor([[0, 5, 255], [7, 7, 100]])
    full = head.dequantize()  # (V, H)
    torch.testing.assert_close(embed(ids), full[ids], rtol=0, atol=0)
    assert embed(ids).shape == (2, 3, 32)


def test_untied_head_is_quantized_and_input_embeddings_stay_float(tmp_path, fp32_vectors):
    _needs("int8")
    tiny_model("llama", tie_word_embeddings=False).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    plain = SparseEncoder.from_pretrained(tmp_path, quantization="int8")
    headq = SparseEncoder.from_pretrained(tmp_path, quantization="int8", quantize_head=True)
    assert isinstance(headq.base_model.get_output_embeddings(), QuantizedLMHead)
    embed = headq.base_model.get_input_embeddings()
    assert type(embed) is torch.nn.Embedding and embed.weight.dtype == torch.float32
    assert parameter_bytes(plain.backbone) - parameter_bytes(headq.backbone) > 20 * 1024
    reference = SparseEncoder.from_pretrained(tmp_path)
    assert _min_cosine(_encode(headq), _encode(reference)) > 0.99


def test_mlm_head_with_bias(tmp_path):
    _needs("int8")
    model = tiny_model("bert")
    with torch.no_grad():
        model.cls.predictions.bias.normal_()  # a non-zero bias must survive head quantization
    model.save_pretrained(tmp_path)
    tiny_tokenizer(bert_style=True).save_pretrained(tmp_path)
    reference = _encode(SparseEncoder.from_pretrained(tmp_path))
    headq = SparseEncoder.from_pretrained(tmp_path, quantization="int8", quantize_head=True)
    head = headq.base_model.get_output_embeddings()
    assert isinstance(head, QuantizedLMHead) and head.bias is not None
    assert _min_cosine(_encode(headq), reference) > 0.99


# ------------------------------------------------------------------------------ accounting


def test_parameter_bytes_counts_tied_weights_once_and_packed_4bit_honestly():
    _needs("nf4")
    model = tiny_model("llama")  # 256 x 32 tied embedding
    n_params = sum(p.numel() for p in model.parameters())  # parameters() deduplicates tied ones
    n_buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert parameter_bytes(model) == 4 * n_params + n_buffers
    linear = torch.nn.Linear(128, 512, bias=False)
    head = QuantizedLMHead.from_linear(linear, "nf4")
    packed = 512 * 128 // 2  # two 4-bit codes per byte
    n_blocks = 512 * 128 // 64  # one 8-bit scale per block of 64 weights (double quantization)
    stored = parameter_bytes(head)
    assert packed + n_blocks <= stored <= packed + n_blocks + 2048  # + code books and outer scales
    assert stored < 0.15 * parameter_bytes(linear)


def test_pareto_front():
    xs = [1.0, 2.0, 3.0, 4.0, 2.5]
    ys = [0.1, 0.5, 0.4, 0.6, 0.5]
    assert pareto_front(xs, ys, x_lower_is_better=True) == [0, 1, 3]
    assert pareto_front(xs, ys, x_lower_is_better=False) == [3]


# ---------------------------------------------------------------------------- save / reload


@pytest.mark.parametrize("mode", ("bf16", *INTEGER_MODES))
def test_saved_quantized_encoder_reloads_to_the_same_vectors(llama_dir, tmp_path, mode):
    _needs(mode)
    encoder = SparseEncoder.from_pretrained(llama_dir, quantization=mode)
    before = _encode(encoder)
    encoder.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "csplade_config.json").read_text())["extra"] == {
        "quantization": {"mode": mode, "quantize_head": False}
    }
    again = SparseEncoder.from_pretrained(tmp_path / "saved")  # default: as saved
    np.testing.assert_array_equal(_encode(again), before)
    assert module_counts(again.base_model) == module_counts(encoder.base_model)
    other = "nf4" if mode != "nf4" else "int8"
    with pytest.raises(ValueError, match=f"saved with quantization='{mode}'"):
        SparseEncoder.from_pretrained(tmp_path / "saved", quantization=other)


def test_half_precision_records_no_separate_head_quantization(llama_dir):
    encoder = SparseEncoder.from_pretrained(llama_dir, quantization="bf16", quantize_head=True)
    assert encoder.config.extra["quantization"] == {"mode": "bf16", "quantize_head": False}
    assert encoder.base_model.get_output_embeddings().weight.dtype == torch.bfloat16


def test_a_bad_saved_quantization_record_names_the_file(llama_dir, tmp_path):
    SparseEncoder.from_pretrained(llama_dir).save_pretrained(tmp_path / "saved")
    config_file = tmp_path / "saved" / "csplade_config.json"
    config = json.loads(config_file.read_text())
    config["extra"] = {"quantization": {"mode": "int9", "quantize_head": False}}
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"csplade_config.json: extra\['quantization'\]\['mode'\]"):
        SparseEncoder.from_pretrained(tmp_path / "saved")


def test_resolve_request_checks_the_saved_record_and_the_request():
    where = "m/csplade_config.json"
    assert resolve_request(None, "nf4", True, where) == ("nf4", True)
    assert resolve_request({"mode": "int8", "quantize_head": False}, "none", True, where) == (
        "int8",
        True,
    )
    assert resolve_request({"mode": "none", "quantize_head": False}, "fp4", False, where) == (
        "fp4",
        False,
    )
    with pytest.raises(ValueError, match=r"m/csplade_config.json records an encoder saved with"):
        resolve_request({"mode": "int8", "quantize_head": False}, "nf4", False, where)
    with pytest.raises(ValueError, match=r"m/csplade_config.json: extra\['quantization'\] must"):
        resolve_request({"mode": "int8"}, "none", False, where)
    with pytest.raises(ValueError, match=r"\['quantize_head'\] must be true or false"):
        resolve_request({"mode": "int8", "quantize_head": "yes"}, "none", False, where)
    with pytest.raises(ValueError, match="did you mean 'nf4'"):
        resolve_request(None, "nf44", False, where)
    with pytest.raises(ValueError, match="quantize_head=True needs a quantization mode"):
        resolve_request(None, "none", True, where)


def test_int8_head_reloads_exactly(llama_dir, tmp_path):
    _needs("int8")
    encoder = SparseEncoder.from_pretrained(llama_dir, quantization="int8", quantize_head=True)
    before = _encode(encoder)
    encoder.save_pretrained(tmp_path / "saved")
    again = SparseEncoder.from_pretrained(tmp_path / "saved")
    assert isinstance(again.base_model.get_output_embeddings(), QuantizedLMHead)
    assert parameter_bytes(again.backbone) == parameter_bytes(encoder.backbone)
    np.testing.assert_array_equal(_encode(again), before)


@pytest.mark.parametrize("mode", ("nf4", "torchao-int8-wo"))
def test_saving_an_inexact_quantized_head_is_refused(llama_dir, tmp_path, mode):
    _needs(mode)
    encoder = SparseEncoder.from_pretrained(llama_dir, quantization=mode, quantize_head=True)
    with pytest.raises(NotImplementedError, match="Load with quantize_head=False, save that"):
        encoder.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
    # The advised route: save the float-head model, quantize the head when loading it.
    SparseEncoder.from_pretrained(llama_dir, quantization=mode).save_pretrained(tmp_path / "ok")
    again = SparseEncoder.from_pretrained(tmp_path / "ok", quantize_head=True)
    np.testing.assert_array_equal(_encode(again), _encode(encoder))


# ------------------------------------------------------------------------------------ sweep


def _settings(llama_dir, out, **changes) -> SweepSettings:
    values = dict(
        model=str(llama_dir),
        datasets=["adi"],
        out=out,
        modes=["none", "int8"],
        quantize_head=True,
        max_docs=30,
        max_queries=8,
        batch_size=8,
        threads=1,
        isolate=False,
        show_progress=False,
    )
    values.update(changes)
    return SweepSettings(**values)


def test_sweep_writes_every_file_and_skips_done_rows(llama_dir, tmp_path, monkeypatch):
    _needs("int8")
    monkeypatch.setenv("CSPLADE_DATA", str(data_dir()))
    rows = run_sweep(_settings(llama_dir, tmp_path))
    for name in ("sweep.json", "sweep.md", "pareto_memory.png", "pareto_throughput.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved == rows and [(r["mode"], r["dataset"]) for r in rows] == [
        ("none", "adi"),
        ("int8", "adi"),
    ]
    none, int8 = rows
    for row in rows:
        assert set(ROW_KEYS) <= set(row)
        assert 0 <= row["ndcg_cut_10"] <= 1 and 0 <= row["recall_100"] <= 1
        assert row["n_docs"] == 30 and row["n_queries"] == 8 and row["slice"] is True
        assert row["docs_per_s"] > 0 and row["peak_rss_bytes"] > row["param_bytes"]
        assert row["query_p95_ms"] >= row["query_p50_ms"] > 0
        assert 0 < row["q_nnz"] <= 256 and 0 < row["d_nnz"] <= 256
        # CSR bytes: float32 value + int32 column per non-zero, int64 row pointers
        assert row["index_bytes"] == round(row["d_nnz"] * 30) * 8 + 31 * 8
    assert none["quantize_head"] is False and int8["quantize_head"] is True
    assert int8["param_bytes"] < 0.5 * none["param_bytes"]
    assert abs(int8["ndcg_cut_10"] - none["ndcg_cut_10"]) < 0.05
    table = (tmp_path / "sweep.md").read_text()
    assert "Slice" in table and "| int8 | yes |" in table

    # A rerun measures only the rows that are missing.
    measured = []

    def fake_measure(settings, mode, dataset):
        measured.append((mode, dataset))
        return {**none, "mode": mode}

    monkeypatch.setattr(quant_sweep, "measure_row", fake_measure)
    assert run_sweep(_settings(llama_dir, tmp_path)) == rows
    assert measured == []
    rows3 = run_sweep(_settings(llama_dir, tmp_path, modes=["none", "int8", "nf4"]))
    assert measured == [("nf4", "adi")] and len(rows3) == 3
    assert len(json.loads((tmp_path / "sweep.json").read_text())) == 3
    with pytest.raises(ValueError, match="comes from another sweep"):
        run_sweep(_settings(llama_dir, tmp_path, max_docs=40))


def test_sweep_settings_are_validated(tmp_path):
    with pytest.raises(ValueError, match="unknown quantization mode"):
        SweepSettings(model="m", datasets=["adi"], out=tmp_path, modes=["int4"])
    with pytest.raises(ValueError, match="modes listed twice"):
        SweepSettings(model="m", datasets=["adi"], out=tmp_path, modes=["int8", "int8"])
    with pytest.raises(ValueError, match="max_docs must be a positive integer"):
        SweepSettings(model="m", datasets=["adi"], out=tmp_path, max_docs=0)


def test_cli_builds_the_sweep_settings(tmp_path, monkeypatch):
    from csplade.cli import build_parser, main

    captured = {}

    def fake_run(settings):
        captured["settings"] = settings
        return []

    # the verb imports the sweep when it runs: patch it where it lives
    monkeypatch.setattr("csplade.evaluation.quant_sweep.run_sweep", fake_run)
    argv = ["quant-sweep", "--model", "m", "--datasets", "adi", "cranfield", "--out", str(tmp_path)]
    argv += ["--modes", "none,nf4", "--quantize-head", "--max-docs", "50", "--threads", "2"]
    argv += ["--doc-max-length", "128"]
    assert main(argv) == 0
    settings = captured["settings"]
    assert settings.modes == ["none", "nf4"] and settings.datasets == ["adi", "cranfield"]
    assert settings.quantize_head and settings.max_docs == 50 and settings.max_queries is None
    assert settings.threads == 2 and settings.isolate
    assert settings.encoder_overrides == {"doc_max_length": 128}
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv[:-2] + ["--modes", "none,int3"])


@pytest.mark.slow
def test_sweep_row_in_a_subprocess(llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CSPLADE_DATA", str(data_dir()))
    rows = run_sweep(_settings(llama_dir, tmp_path, modes=["none"], isolate=True, max_docs=10))
    # The 8 queries judge 20 docs: the slice keeps them all, above max_docs.
    assert len(rows) == 1 and rows[0]["n_docs"] == 20 and rows[0]["max_rss_bytes"] > 0
    assert rows[0]["peak_rss_bytes"] <= rows[0]["max_rss_bytes"]


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "ratio"), (("int8", 0.30), ("nf4", 0.20)))
def test_packaged_splade_tiny_meets_the_memory_goals(prepared, mode, ratio):
    _needs(mode)
    folder = prepared("splade-tiny")
    full = parameter_bytes(SparseEncoder.from_pretrained(folder).backbone)
    small = SparseEncoder.from_pretrained(folder, quantization=mode, quantize_head=True)
    assert parameter_bytes(small.backbone) <= ratio * full
    vectors = small.encode(["what is a sparse retrieval model"], show_progress=False)
    assert vectors.nnz > 0


def test_all_modes_are_covered():
    assert set(MODES) == {*LOADABLE, "gptq"}
