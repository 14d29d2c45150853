"""`csplade encode / search / export / mine` end to end on the tiny `adi` set with a tiny random model.

The tiny tokenizer knows only pseudo-words, so adi's English is mostly <unk>: these tests check the
plumbing (the right vectors reach the right files), not retrieval quality.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny import tiny_model, tiny_tokenizer

from csplade.cli import main
from csplade.data.beir import load_queries
from csplade.index import load_index, read_manifest, read_trec_run
from csplade.model import SparseEncoder, SparseEncoderConfig

REPO = Path(__file__).resolve().parents[1]


def save_tiny(folder: Path, seed: int = 0) -> Path:
    config = SparseEncoderConfig(base_model="tiny-llama", doc_max_length=48, query_max_length=24)
    SparseEncoder(tiny_model("llama", seed=seed), tiny_tokenizer(), config).save_pretrained(folder)
    return folder


def cli(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return save_tiny(root / "m0", seed=0), save_tiny(root / "m1", seed=1)


@pytest.fixture(scope="module")
def index(models, adi, tmp_path_factory):
    out = tmp_path_factory.mktemp("index") / "adi"
    assert cli("encode", "--model", models[0], "--corpus", adi, "--out", out, "--shard-size", 25,
               "--batch-size", 16) == 0  # fmt: skip
    return out


def count_encodes(monkeypatch, fail_on_call: int | None = None) -> list[int]:
    """Patch SparseEncoder.encode_docs to record each call's size (and fail on the n-th call)."""
    calls: list[int] = []
    original = SparseEncoder.encode_docs

    def counting(self, texts, **kwargs):
        calls.append(len(texts))
        if len(calls) == fail_on_call:
            raise RuntimeError(f"simulated crash in call {fail_on_call}")
        return original(self, texts, **kwargs)

    monkeypatch.setattr(SparseEncoder, "encode_docs", counting)
    return calls


def brute_force(q_reps, docs, doc_ids, k):
    """Exact top-k by dense scores: score desc, ties by doc index (the index's contract)."""
    scores = (q_reps @ docs.T).toarray()  # (n_q, n_docs)
    out = []
    for row in scores:
        order = np.lexsort((np.arange(row.size), -row))
        out.append([(doc_ids[i], float(row[i])) for i in order[:k] if row[i] > 0])
    return out


def test_encode_then_search_writes_the_exact_run(models, adi, index, tmp_path, capsys):
    docs, doc_ids, manifest = load_index(index)
    corpus_ids = [json.loads(line)["_id"] for line in open(adi / "corpus.jsonl")]
    assert doc_ids == corpus_ids and docs.shape == (82, 256) and manifest["n_shards"] == 4
    describe = manifest["settings"]["describe"]
    assert describe["model"] == str(models[0].resolve())
    assert (
        describe["encoder"]["fingerprint"] == SparseEncoder.from_pretrained(models[0]).fingerprint()
    )

    run_file = tmp_path / "run.trec"
    assert cli("search", "--index", index, "--queries", adi / "queries.jsonl", "--out", run_file,
               "--k", 5, "--backend", "scipy", "--tag", "tiny") == 0  # fmt: skip
    assert "35 queries" in capsys.readouterr().out
    run = read_trec_run(run_file)
    assert run_file.read_text().split("\n")[0].endswith(" tiny")
    queries = load_queries(adi / "queries.jsonl")
    encoder = SparseEncoder.from_pretrained(models[0])
    q_reps = encoder.encode_queries(list(queries.values()), batch_size=32, show_progress=False)
    expected = brute_force(q_reps, docs, doc_ids, 5)
    assert list(run) == list(queries)
    for query_id, want in zip(queries, expected, strict=True):
        got = list(run[query_id].items())
        assert [d for d, _ in got] == [d for d, _ in want], query_id
        np.testing.assert_allclose([s for _, s in got], [s for _, s in want], rtol=1e-6)


def test_search_refuses_another_model_and_needs_model_when_moved(models, adi, tmp_path, capsys):
    model = Path(shutil.copytree(models[0], tmp_path / "model"))
    index = tmp_path / "index"
    assert cli("encode", "--model", model, "--corpus", adi, "--out", index, "--max-docs", 30) == 0
    queries = adi / "queries.jsonl"
    capsys.readouterr()
    assert cli("search", "--index", index, "--queries", queries, "--out", tmp_path / "r.trec",
               "--model", models[1], "--backend", "scipy") == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "is not the encoder that built" in err and "fingerprint" in err
    moved = model.rename(tmp_path / "moved")
    assert cli("search", "--index", index, "--queries", queries, "--out", tmp_path / "r.trec",
               "--backend", "scipy") == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "cannot be loaded here" in err and "--model" in err and str(model.resolve()) in err
    assert not (tmp_path / "r.trec").exists()
    assert cli("search", "--index", index, "--queries", queries, "--out", tmp_path / "r.trec",
               "--model", moved, "--backend", "scipy", "--k", 3) == 0  # fmt: skip
    run = read_trec_run(tmp_path / "r.trec")
    assert len(run) == 35 and all(len(hits) == 3 for hits in run.values())


def test_tsv_queries_and_their_errors(index, tmp_path, capsys):
    good = tmp_path / "queries.tsv"
    good.write_text("q1\tfirst query aa ab\n\nq2\tsecond ac\n")
    assert cli("search", "--index", index, "--queries", good, "--out", tmp_path / "r.trec",
               "--backend", "scipy", "--k", 2) == 0  # fmt: skip
    assert list(read_trec_run(tmp_path / "r.trec")) == ["q1", "q2"]
    for text, line in (("q1\tok\nno tab here\n", 2), ("q1\tok\nq2\tfine\nq1\tagain\n", 3),
                       ("q1\t  \n", 1)):  # fmt: skip
        bad = tmp_path / "bad.tsv"
        bad.write_text(text)
        capsys.readouterr()
        assert cli("search", "--index", index, "--queries", bad, "--out", tmp_path / "x.trec") == 2
        assert f"{bad}:{line}:" in capsys.readouterr().err
    assert not (tmp_path / "x.trec").exists()


def test_bad_corpus_inputs_are_clear_errors(models, adi, tmp_path, capsys):
    empty = tmp_path / "nocorpus"
    empty.mkdir()
    assert cli("encode", "--model", models[0], "--corpus", empty, "--out", tmp_path / "i") == 2
    assert str(empty / "corpus.jsonl") in capsys.readouterr().err
    dup = tmp_path / "dup.jsonl"
    dup.write_text(
        "".join(json.dumps({"_id": i, "text": "aa ab"}) + "\n" for i in ("x1", "x2", "x1"))
    )
    assert cli("encode", "--model", models[0], "--corpus", dup, "--out", tmp_path / "i") == 2
    err = capsys.readouterr().err
    assert "duplicate doc id 'x1'" in err and "lines 1 and 3" in err
    assert (
        cli("search", "--index", tmp_path / "none", "--queries", adi, "--out", tmp_path / "r") == 2
    )
    assert "manifest.json not found" in capsys.readouterr().err
    assert cli("encode", "--model", models[0], "--corpus", dup, "--out", tmp_path / "i",
               "--scale", 10) == 2  # fmt: skip
    assert "--scale needs --quantize uint8" in capsys.readouterr().err
    assert cli("mine", "--model", "bm25", "--data", adi, "--out", tmp_path / "g.jsonl") == 2
    assert str(adi / "qrels" / "train.tsv") in capsys.readouterr().err  # adi has no train split


def test_encode_resumes_after_a_crash_encoding_only_missing_shards(
    models, adi, index, tmp_path, monkeypatch, capsys
):
    calls = count_encodes(monkeypatch, fail_on_call=3)
    out = tmp_path / "index"
    args = ("encode", "--model", models[0], "--corpus", adi, "--out", out, "--shard-size", 25,
            "--batch-size", 8)  # fmt: skip
    assert cli(*args) == 2
    assert "simulated crash" in capsys.readouterr().err
    with pytest.raises(ValueError, match="incomplete"):
        read_manifest(out)

    monkeypatch.undo()
    calls = count_encodes(monkeypatch)
    assert cli(*args) == 0  # a different batch size than the first run is fine
    assert calls == [25, 7]  # shards 2 and 3 only
    assert "encoded 32 docs" in capsys.readouterr().out
    # identical to the uninterrupted index (other batch size, same vectors)
    docs, ids, manifest = load_index(out)
    ref_docs, ref_ids, ref_manifest = load_index(index)
    assert ids == ref_ids
    np.testing.assert_allclose(docs.toarray(), ref_docs.toarray(), rtol=1e-5, atol=1e-6)
    calls.clear()
    assert cli(*args) == 0 and calls == []
    assert "already encoded" in capsys.readouterr().out
    # other settings are refused, not mixed in
    assert cli(*args, "--top-k", 5) == 2
    err = capsys.readouterr().err
    assert "different settings" in err and "top_k: None (on disk) != 5 (now)" in err


def test_quantized_pruned_encode_and_search(models, adi, tmp_path):
    out = tmp_path / "index"
    assert cli("encode", "--model", models[0], "--corpus", adi, "--out", out, "--quantize",
               "uint8", "--top-k", 10, "--shard-size", 50) == 0  # fmt: skip
    docs, _, manifest = load_index(out)
    assert manifest["settings"]["quantize"] == "uint8"
    assert manifest["settings"]["describe"]["top_k"] == 10
    assert (np.diff(docs.indptr) <= 10).all() and docs.nnz > 82 * 5
    assert cli("search", "--index", out, "--queries", adi, "--out", tmp_path / "r.trec",
               "--backend", "scipy", "--k", 4) == 0  # fmt: skip
    assert len(read_trec_run(tmp_path / "r.trec")) == 35


def test_export_every_format_with_queries(models, adi, index, tmp_path, monkeypatch):
    out = tmp_path / "export"
    assert cli("export", "--index", index, "--format", "anserini", "opensearch", "elasticsearch",
               "qdrant", "--out", out, "--queries", adi / "queries.jsonl") == 0  # fmt: skip
    docs, doc_ids, _ = load_index(index)
    encoder = SparseEncoder.from_pretrained(models[0])
    vocab = encoder.vocabulary()

    def lines(path):
        return [json.loads(x) for x in path.read_text().splitlines()]

    anserini = lines(out / "anserini" / "docs.jsonl")
    assert [d["id"] for d in anserini] == doc_ids
    row = docs[0]
    expected = {vocab[t]: int(np.rint(w * 100)) for t, w in zip(row.indices, row.data, strict=True)}
    assert anserini[0]["vector"] == {t: v for t, v in expected.items() if v > 0}
    qdrant = lines(out / "qdrant" / "docs.jsonl")
    assert qdrant[5]["indices"] == docs[5].indices.tolist()
    np.testing.assert_array_equal(np.float32(qdrant[5]["values"]), docs[5].data)
    for flavour, kind in (("opensearch", "rank_features"), ("elasticsearch", "sparse_vector")):
        bulk = lines(out / flavour / "bulk.ndjson")
        assert len(bulk) == 2 * 82 and bulk[0] == {"index": {"_id": doc_ids[0]}}
        mapping = json.loads((out / flavour / "mapping.json").read_text())
        assert mapping["mappings"]["properties"]["splade"]["type"] == kind
        assert len(lines(out / flavour / "queries.jsonl")) == 35
    queries = load_queries(adi / "queries.jsonl")
    q_reps = encoder.encode_queries(list(queries.values()), show_progress=False)
    q_qdrant = lines(out / "qdrant" / "queries.jsonl")
    assert [q["id"] for q in q_qdrant] == list(queries)
    assert q_qdrant[3]["indices"] == q_reps[3].indices.tolist()
    tsv = (out / "anserini" / "queries.tsv").read_text().splitlines()
    assert len(tsv) == 35 and tsv[0].split("\t")[0] == "1"
    first = q_reps[0]
    assert len(tsv[0].split("\t")[1].split()) == int(np.rint(first.data * 100).sum())

    # Qdrant documents need no token names: no model is loaded
    def no_model(*args, **kwargs):
        raise AssertionError("the model should not be loaded")

    monkeypatch.setattr(SparseEncoder, "from_pretrained", no_model)
    assert cli("export", "--index", index, "--format", "qdrant", "--out", tmp_path / "q") == 0
    assert (tmp_path / "q" / "qdrant" / "docs.jsonl").read_text() == (
        out / "qdrant" / "docs.jsonl"
    ).read_text()


def test_seismic_backend_returns_exactly_rescored_results(models, adi, index, tmp_path, capsys):
    pytest.importorskip("seismic")
    run_file = tmp_path / "seismic.trec"
    assert cli("search", "--index", index, "--queries", adi, "--out", run_file, "--k", 10,
               "--backend", "seismic", "--n-postings", 40, "--query-cut", 8,
               "--heap-factor", 0.9) == 0  # fmt: skip
    run = read_trec_run(run_file)
    docs, doc_ids, _ = load_index(index)
    position = {d: i for i, d in enumerate(doc_ids)}
    encoder = SparseEncoder.from_pretrained(models[0])
    queries = load_queries(adi / "queries.jsonl")
    q_reps = encoder.encode_queries(list(queries.values()), show_progress=False)
    exact = (q_reps @ docs.T).toarray()
    assert len(run) == 35 and sum(map(len, run.values())) > 35 * 5
    for row, query_id in enumerate(queries):
        for doc_id, score in run[query_id].items():
            assert score == pytest.approx(exact[row, position[doc_id]], rel=1e-5)
    assert cli("search", "--index", index, "--queries", adi, "--out", run_file, "--backend",
               "scipy", "--query-cut", 3) == 2  # fmt: skip
    assert "only apply to --backend seismic" in capsys.readouterr().err


def test_mine_with_a_model_excludes_positives_and_reuses_its_index(
    models, adi, tmp_path, monkeypatch
):
    out, cache = tmp_path / "groups.jsonl", tmp_path / "mine-index"
    assert cli("mine", "--model", models[0], "--data", adi, "--split", "test", "--out", out,
               "--depth", 20, "--negatives", 5, "--index-dir", cache) == 0  # fmt: skip
    qrels = {}
    for line in (adi / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        q, d, s = line.split("\t")
        qrels.setdefault(q, {})[d] = int(s)
    groups = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(groups) == 35
    for group in groups:
        negatives = {item["_id"] for item in group["negatives"]}
        assert 0 < len(negatives) <= 5
        assert not negatives & {d for d, s in qrels[group["query_id"]].items() if s > 0}
    calls = count_encodes(monkeypatch)
    assert cli("mine", "--model", models[0], "--data", adi, "--split", "test", "--out", out,
               "--depth", 20, "--negatives", 5, "--index-dir", cache) == 0  # fmt: skip
    assert calls == []  # the corpus encoding was reused
    assert [json.loads(x) for x in out.read_text().splitlines()] == groups


@pytest.mark.distributed
def test_two_process_encode_equals_one_process(models, adi, index, tmp_path):
    out = tmp_path / "index2"
    launcher = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", "0", "-m", "csplade", "encode", "--model", str(models[0]),
        "--corpus", str(adi), "--out", str(out), "--shard-size", "25", "--batch-size", "16",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        launcher, env=env, capture_output=True, text=True, timeout=600, cwd=REPO
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "processes: 2" in result.stdout
    assert "rank 1 of 2" in result.stderr and "rank 0 of 2" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in index.iterdir())
    one, two = read_manifest(index), read_manifest(out)
    assert two["complete"] and two["settings"] == one["settings"]
    assert [s["sha256"] for s in two["shards"]] == [s["sha256"] for s in one["shards"]]
