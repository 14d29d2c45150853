"""Frozen documents: a LoRA run moves the queries; documents keep the vectors of the model it
started from, computed once per document."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from synthetic import mrr_at_10, pairs, save_base, write_groups
from tiny import random_texts

from csplade.model import SparseEncoder
from csplade.model.frozen_docs import DocVectors
from csplade.training.contrastive import merge_adapter, run_training
from csplade.training.recipe import parse_recipe

TEXTS = random_texts(10, min_words=4, max_words=12, seed=5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("frozen")
    base = save_base(root / "base")
    groups = write_groups(root / "groups.jsonl", n=200)
    argv = [
        "--model_name_or_path", str(base), "--train_data", str(groups),
        "--output_dir", str(root / "out"), "--per_device_train_batch_size", "16",
        "--group_size", "4", "--learning_rate", "1e-2", "--max_steps", "40", "--save_steps",
        "1000", "--use_cpu", "true", "--seed", "7", "--use_lora", "--lora_r", "8",
        "--lora_dropout", "0", "--frozen_docs", "true", "--logging_steps", "10",
    ]  # fmt: skip
    out = run_training(*parse_recipe(None, argv))
    return {"base": base, "out": out}


def test_documents_keep_the_starting_models_vectors_and_queries_learn(trained):
    base = SparseEncoder.from_pretrained(trained["base"])
    model = SparseEncoder.from_pretrained(trained["out"])
    assert model.is_adapter and model.config.frozen_docs
    docs = (
        base.encode_docs(TEXTS, show_progress=False),
        model.encode_docs(TEXTS, show_progress=False),
    )
    assert abs(docs[0] - docs[1]).max() < 1e-6
    queries = [e.encode_queries(TEXTS, show_progress=False) for e in (base, model)]
    assert abs(queries[0] - queries[1]).max() > 1e-2  # the adapter moved the queries
    held = pairs(100, seed=2)
    # the task needs expansion and the random base's documents are noise: the queries still learn
    assert mrr_at_10(model, held) > 2 * mrr_at_10(base, held)


def test_each_document_is_encoded_once_and_no_document_regularizer_runs(trained):
    info = json.loads((trained["out"] / "run_info.json").read_text())
    logged = [h for h in info["log_history"] if "contrastive" in h]
    assert logged and all("reg_d" not in h for h in logged) and "reg_q" in logged[0]
    assert info["doc_vectors"]["misses"] <= 200 * 4  # at most every distinct document once
    assert info["doc_vectors"]["hits"] > info["doc_vectors"]["misses"]


def test_doc_vectors_equal_the_encoding_they_replace():
    base = SparseEncoder.from_pretrained(save_base_tmp())
    batch = base.tokenize(TEXTS[:6], kind="doc")
    batch.pop("n_truncated")
    cache = DocVectors()
    with torch.no_grad():
        first = cache.vectors(base._encode_batch, batch)
        again = cache.vectors(base._encode_batch, batch)
        plain = base._encode_batch(**batch)
    assert (cache.misses, cache.hits) == (6, 6)
    torch.testing.assert_close(first, plain)
    torch.testing.assert_close(again, plain)


def test_a_document_read_in_windows_keeps_a_vector_per_window():
    # the first window of a long document is the document cut at doc_max_length: a file written
    # without windows serves it, and only the later windows are encoded
    base = SparseEncoder.from_pretrained(save_base_tmp(), doc_max_length=4)
    base.config = replace(base.config, frozen_docs=True)
    texts = ["aa ab ac ad ae af ag", "ba bb", "ca cb cc cd ce cf cg ch ci"]
    base.doc_vectors = DocVectors()
    cut = base.encode_docs(texts, show_progress=False).toarray()
    assert (base.doc_vectors.misses, len(base.doc_vectors)) == (3, 3)
    base.config = replace(base.config, doc_windows=3)
    whole = base.encode_docs(texts, show_progress=False).toarray()
    assert (base.doc_vectors.hits, len(base.doc_vectors)) == (3, 3 + 1 + 2)
    again = base.encode_docs(texts, show_progress=False).toarray()
    assert base.doc_vectors.misses == 6 and base.doc_vectors.hits == 3 + 6
    assert (whole >= cut - 1e-6).all() and (whole[0] > cut[0] + 1e-4).any()
    assert (whole == again).all()


def save_base_tmp():
    import tempfile
    from pathlib import Path

    return save_base(Path(tempfile.mkdtemp(prefix="csplade-frozen-")) / "base")


def test_merging_or_training_on_a_frozen_docs_model_is_refused(trained, tmp_path):
    with pytest.raises(ValueError, match="frozen_docs"):
        merge_adapter(trained["out"], tmp_path / "merged")
    argv = [
        "--model_name_or_path", str(trained["out"]), "--train_data", "x.jsonl",
        "--output_dir", str(tmp_path / "again"), "--use_cpu", "true", "--frozen_docs", "true",
    ]  # fmt: skip
    from csplade.training.loading import load_encoder_for_training

    model_args = parse_recipe(None, argv)[0]
    with pytest.raises(ValueError, match="frozen_docs"):
        load_encoder_for_training(model_args)


def test_frozen_docs_needs_lora_and_a_model_side():
    from csplade.model.config import EncoderSettings
    from csplade.training.arguments import ModelArguments

    with pytest.raises(ValueError, match="frozen_docs"):
        EncoderSettings(frozen_docs=True, lexical_residual=True, lexical_docs=True)
    from csplade.training.loading import load_encoder_for_training

    with pytest.raises(ValueError, match="use_lora"):
        load_encoder_for_training(
            ModelArguments(model_name_or_path=save_base_tmp(), frozen_docs=True)
        )


def test_eval_script_ranks_both_models_over_one_index_as_csplade_eval_does(trained, adi, tmp_path):
    """eval/frozen_docs.py encodes each corpus once: its `trained` row equals `csplade eval` of the
    trained model and its `start` row `csplade eval` of the base (documents are the base's)."""
    import importlib.util
    from pathlib import Path

    from csplade.evaluation.beir_eval import SystemSpec, evaluate

    path = Path(__file__).resolve().parents[1] / "eval" / "frozen_docs.py"
    spec = importlib.util.spec_from_file_location("frozen_docs_eval", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "script"
    assert script.main(["--model", str(trained["out"]), "--datasets", str(adi),
                        "--doc-max-length", "16", "--out", str(out)]) == 0  # fmt: skip
    got = json.loads((out / "metrics.json").read_text())
    assert set(got) == {"bm25", "bm25-stem", "start (adapter off)", "trained"}
    systems = [SystemSpec("trained", str(trained["out"])), SystemSpec("base", str(trained["base"])),
               SystemSpec("bm25", None)]  # fmt: skip
    evaluate(systems, [str(adi)], tmp_path / "eval", latency_queries=0, dtype="float32",
             encoder_overrides={"doc_max_length": 16})  # fmt: skip
    want = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    name = adi.name
    for mine, theirs in (("trained", "trained"), ("start (adapter off)", "base"), ("bm25", "bm25")):
        for metric in ("ndcg_cut_10", "recall_100"):
            assert got[mine][name][metric] == pytest.approx(want[theirs][name][metric], abs=1e-9)
    assert got["trained"][name] != got["start (adapter off)"][name]
    # the start itself: its step-0 row, the same as the trained model's `start` row
    start = tmp_path / "start"
    assert script.main(["--model", str(trained["base"]), "--datasets", str(adi),
                        "--doc-max-length", "16", "--out", str(start)]) == 0  # fmt: skip
    alone = json.loads((start / "metrics.json").read_text())
    assert set(alone) == {"bm25", "bm25-stem", "start (adapter off)"}
    assert alone["start (adapter off)"][name] == pytest.approx(got["start (adapter off)"][name])


def test_documents_in_windows_rank_alike_in_the_script_and_csplade_eval(trained, adi, tmp_path):
    """--doc-windows reaches the documents in eval/frozen_docs.py and in `csplade eval`: both rank
    the trained model's queries over the same windowed documents; without windows they differ."""
    from csplade.cli import main

    script = _script()
    argv = ["--model", str(trained["out"]), "--datasets", str(adi), "--doc-max-length", "8"]
    assert script.main([*argv, "--doc-windows", "4", "--out", str(tmp_path / "script")]) == 0
    assert script.main([*argv, "--out", str(tmp_path / "cut")]) == 0
    assert main(["eval", "--model", str(trained["out"]), "--datasets", str(adi),
                 "--latency-queries", "0", "--dtype", "float32", "--doc-max-length", "8",
                 "--doc-windows", "4", "--out", str(tmp_path / "eval")]) == 0  # fmt: skip
    got = json.loads((tmp_path / "script" / "metrics.json").read_text())["trained"][adi.name]
    cut = json.loads((tmp_path / "cut" / "metrics.json").read_text())["trained"][adi.name]
    name = trained["out"].name
    want = json.loads((tmp_path / "eval" / "metrics.json").read_text())[name][adi.name]
    for metric in ("ndcg_cut_10", "recall_100"):
        assert got[metric] == pytest.approx(want[metric], abs=1e-9)
    assert got["doc_nnz"] > cut["doc_nnz"]  # ADI's documents run past 8 tokens: more is read


def test_eval_script_ranks_a_chosen_split_and_prunes_documents_not_the_file(trained, adi, tmp_path):
    import shutil

    folder = tmp_path / "adi"  # ADI with its test judgments also under a dev split
    shutil.copytree(adi, folder)
    shutil.copy(folder / "qrels" / "test.tsv", folder / "qrels" / "dev.tsv")
    script = _script()
    argv = ["--model", str(trained["out"]), "--datasets", str(folder), "--doc-max-length", "16"]
    vectors = str(tmp_path / "docs.safetensors")
    runs = {
        "test": [],
        "dev": ["--split", "dev"],
        "pruned": ["--doc-threshold", "0.5", "--doc-vectors", vectors],
    }
    got = {}
    for name, extra in runs.items():
        assert script.main([*argv, *extra, "--out", str(tmp_path / name)]) == 0
        got[name] = json.loads((tmp_path / name / "metrics.json").read_text())["trained"]["adi"]
    assert got["dev"] == got["test"]
    assert got["pruned"]["doc_nnz"] < got["test"]["doc_nnz"]
    encoder = SparseEncoder.from_pretrained(trained["out"], doc_max_length=16)
    kept = DocVectors.for_encoder(encoder, vectors)  # the file holds the vectors unpruned
    values = torch.cat([v for _, v in kept._vectors.values()])
    assert len(kept) > 0 and (values < 0.5).any()


def _script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "eval" / "frozen_docs.py"
    spec = importlib.util.spec_from_file_location("frozen_docs_eval", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_doc_vectors_file_reads_back_what_was_saved_and_refuses_other_models(tmp_path):
    from csplade.model.frozen_docs import fingerprint

    base = SparseEncoder.from_pretrained(save_base_tmp())
    batch = base.tokenize(TEXTS[:6], kind="doc")
    batch.pop("n_truncated")
    cache = DocVectors(fingerprint(base))
    with torch.no_grad():
        first = cache.vectors(base._encode_batch, batch)
    cache.save(tmp_path / "docs.safetensors")
    again = DocVectors.load(tmp_path / "docs.safetensors", fingerprint(base))
    assert len(again) == 6
    with torch.no_grad():
        read = again.vectors(base._encode_batch, batch)
    assert (again.misses, again.hits) == (0, 6)
    assert torch.equal(read, first)
    later = DocVectors(fingerprint(base))  # another run saves two more documents to the file
    two = base.tokenize(TEXTS[6:8], kind="doc")
    two.pop("n_truncated")
    with torch.no_grad():
        later.vectors(base._encode_batch, two)
    later.save(tmp_path / "docs.safetensors")
    assert len(DocVectors.load(tmp_path / "docs.safetensors", fingerprint(base))) == 8
    other = SparseEncoder.from_pretrained(save_base_tmp(), variant="bi")
    assert fingerprint(other) != fingerprint(base)
    with pytest.raises(ValueError, match="another model"):
        DocVectors.for_encoder(other, tmp_path / "docs.safetensors")
    import safetensors.torch

    safetensors.torch.save_file({"x": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a document-vectors file"):
        DocVectors.load(tmp_path / "other.safetensors", fingerprint(base))


def test_runs_share_the_documents_file_of_a_training_run_and_an_evaluation(trained, adi, tmp_path):
    """A run with frozen_docs_file writes its documents' vectors; a second run from the same base
    encodes none of them again and trains the same adapter; the evaluation script of the trained
    model reads the same file (one fingerprint for the base and the trained folder) and ranks as it
    does without it."""
    from safetensors.torch import load_file

    from csplade.training.loading import load_encoder_for_training

    groups = write_groups(tmp_path / "groups.jsonl", n=48)
    shared = tmp_path / "docs.safetensors"

    def run(name):
        argv = [
            "--model_name_or_path", str(trained["base"]), "--train_data", str(groups),
            "--output_dir", str(tmp_path / name), "--per_device_train_batch_size", "16",
            "--group_size", "4", "--learning_rate", "1e-2", "--max_steps", "4", "--save_steps",
            "1000", "--use_cpu", "true", "--seed", "7", "--use_lora", "--lora_r", "8",
            "--lora_dropout", "0", "--frozen_docs", "true", "--frozen_docs_file", str(shared),
        ]  # fmt: skip
        out = run_training(*parse_recipe(None, argv))
        return out, json.loads((out / "run_info.json").read_text())["doc_vectors"]

    first, info = run("first")
    assert info["misses"] > 0 and shared.exists()
    second, again = run("second")
    assert again["misses"] == 0 and again["hits"] == info["hits"] + info["misses"]
    adapters = [load_file(o / "adapter_model.safetensors") for o in (first, second)]
    for name, tensor in adapters[0].items():
        assert torch.equal(tensor, adapters[1][name]), name

    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "eval" / "frozen_docs.py"
    spec = importlib.util.spec_from_file_location("frozen_docs_eval", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    common = ["--model", str(second), "--datasets", str(adi), "--doc-max-length", "16"]
    assert script.main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert (
        script.main([*common, "--out", str(tmp_path / "file"), "--doc-vectors", str(shared)]) == 0
    )
    plain, filed = (
        json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("plain", "file")
    )
    name = adi.name
    assert filed["trained"][name] == pytest.approx(plain["trained"][name], abs=1e-6)
    kept = len(DocVectors.load(shared, info_fingerprint(second)))
    assert info["docs"] < kept <= info["docs"] + 82  # + ADI's distinct token sequences

    argv = ["--model_name_or_path", str(trained["base"]), "--output_dir", str(tmp_path / "x"),
            "--use_cpu", "true", "--use_lora", "--frozen_docs", "true", "--variant", "bi",
            "--frozen_docs_file", str(shared)]  # fmt: skip
    with pytest.raises(ValueError, match="another model"):
        load_encoder_for_training(parse_recipe(None, argv)[0])


def info_fingerprint(folder):
    from csplade.model.frozen_docs import fingerprint

    return fingerprint(SparseEncoder.from_pretrained(folder))


def test_lexical_ceiling_reads_a_frozen_docs_runs_documents_from_its_start_and_the_file(
    trained, adi, tmp_path, capsys
):
    """eval/lexical_ceiling.py: a frozen_docs run's documents are its start's (the same rows for
    both), and the same whether they are encoded or read from the shared file."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "eval" / "lexical_ceiling.py"
    spec = importlib.util.spec_from_file_location("lexical_ceiling", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    def table(model, *extra):
        common = ["--model", str(model), "--datasets", str(adi), "--doc-max-length", "16"]
        assert script.main([*common, "--analyzer", "tokens", *extra]) == 0  # a tiny vocabulary
        rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()[2:]]
        return {row[0].strip("| "): float(row[1].split()[0]) for row in rows}

    base = table(trained["base"])
    filed = table(trained["out"], "--doc-vectors", str(tmp_path / "docs.safetensors"))
    again = table(trained["out"], "--doc-vectors", str(tmp_path / "docs.safetensors"))
    assert (tmp_path / "docs.safetensors").exists()
    assert base == filed == again  # documents of the trained model are its base's
    assert set(base) == {"bm25", "bm25-stem", "targets", "target queries x model documents"}
    assert base["targets"] > 0 and base["bm25"] > 0
