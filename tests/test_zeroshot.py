"""Zero-shot evaluation (`beir_eval.evaluate`) on the tiny `adi` set: a tiny random model + BM25.

The tiny tokenizer knows only pseudo-words (adi's English is mostly <unk>), so these are plumbing
tests: files, structure, metrics equal to pytrec_eval on the written runs, index reuse, slices.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import pytrec_eval
from tiny import tiny_model, tiny_tokenizer

from csplade.data.beir import load_beir
from csplade.evaluation.beir_eval import SystemSpec, evaluate, slice_data
from csplade.evaluation.metrics import DEFAULT_METRICS
from csplade.index import read_trec_run
from csplade.index.bm25 import bm25_search
from csplade.model import SparseEncoder, SparseEncoderConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zs") / "tiny"
    config = SparseEncoderConfig(base_model="tiny-llama", doc_max_length=48, query_max_length=24)
    SparseEncoder(tiny_model("llama"), tiny_tokenizer(), config).save_pretrained(folder)
    return folder


@pytest.fixture
def count_encodes(monkeypatch):
    calls = []
    original = SparseEncoder.encode_docs

    def counting(self, texts, **kwargs):
        calls.append(len(texts))
        return original(self, texts, **kwargs)

    monkeypatch.setattr(SparseEncoder, "encode_docs", counting)
    return calls


def run_eval(model, adi, out, **kwargs):
    systems = [SystemSpec.parse(f"tiny={model}"), SystemSpec.parse("bm25")]
    options = dict(k=100, batch_size=16, latency_queries=3, backend="scipy")
    return evaluate(systems, [str(adi)], out, **{**options, **kwargs})


def pytrec(qrels, run_file):
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "map", "recall.100"})
    per_query = evaluator.evaluate(read_trec_run(run_file))
    return {
        name: sum(q[name] for q in per_query.values()) / len(qrels)
        for name in ("ndcg_cut_10", "map", "recall_100")
    }


def test_evaluate_writes_metrics_table_chart_runs_and_reuses_the_index(
    model, adi, tmp_path, count_encodes
):
    out = tmp_path / "out"
    written = run_eval(model, adi, out)
    assert count_encodes, "the corpus was not encoded"
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"tiny", "bm25"}
    data = load_beir(adi)
    for system in ("tiny", "bm25"):
        assert set(metrics[system]) == {"adi"}
        assert set(metrics[system]["adi"]) == set(DEFAULT_METRICS)
        assert all(0 <= v <= 1 for v in metrics[system]["adi"].values())
        # the numbers are pytrec_eval's on the run files that were written
        reference = pytrec(data.qrels, out / "adi" / f"{system}.trec")
        for name, value in reference.items():
            assert metrics[system]["adi"][name] == pytest.approx(value, abs=1e-9), (system, name)
    assert metrics["bm25"]["adi"]["ndcg_cut_10"] > 0.2  # BM25 works on real text
    assert read_trec_run(out / "adi" / "run.trec") == read_trec_run(out / "adi" / "tiny.trec")
    table = (out / "table.md").read_text()
    assert "| average |" in table and "tiny nDCG@10" in table and "bm25 nDCG@10" in table
    assert "slice" not in table
    assert written["chart"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    efficiency = json.loads((out / "efficiency.json").read_text())
    assert efficiency["tiny"]["adi"]["doc_nnz"] > 0
    shards = sorted((out / "adi").glob("index-tiny-*/shard-*.npz"))
    assert shards
    mtimes = [p.stat().st_mtime_ns for p in shards]

    count_encodes.clear()
    run_eval(model, adi, out)
    assert count_encodes == []  # the encoded corpus was reused, not re-encoded
    assert [p.stat().st_mtime_ns for p in shards] == mtimes
    assert json.loads((out / "metrics.json").read_text()) == metrics


def test_slices_are_labelled_and_settings_are_not_mixed(model, adi, tmp_path):
    out = tmp_path / "out"
    run_eval(model, adi, out, max_docs=30, max_queries=5)
    table = (out / "table.md").read_text()
    assert "slice of adi" in table and "5 of 35 queries" in table
    data, note = slice_data(load_beir(adi), 30, 5)
    run = read_trec_run(out / "adi" / "tiny.trec")
    assert set(run) == set(data.queries) and len(run) == 5
    assert {d for docs in run.values() for d in docs} <= set(data.doc_ids)
    assert len(data.doc_ids) >= 30 and note
    with pytest.raises(ValueError, match="other settings"):
        run_eval(model, adi, out, max_docs=40, max_queries=5)
    with pytest.raises(ValueError, match="other settings"):
        run_eval(model, adi, out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"tiny", "bm25"}  # the refused calls left the results alone


def test_slice_keeps_every_judged_doc_of_the_kept_queries(adi):
    data = load_beir(adi)
    part, note = slice_data(data, max_docs=20, max_queries=3)
    assert list(part.queries) == list(data.queries)[:3] and set(part.qrels) == set(part.queries)
    judged = {d for docs in part.qrels.values() for d in docs}
    assert judged <= set(part.doc_ids) and len(part.doc_ids) == 20
    order = [data.doc_ids.index(d) for d in part.doc_ids]
    assert order == sorted(order)  # corpus order
    assert part.doc_texts[0] == data.doc_texts[order[0]]
    assert "20 of 82 docs" in note and "3 of 35 queries" in note and "random" in note
    # The docs beyond the judged ones are drawn at random, the same for the same seed.
    assert slice_data(data, max_docs=20, max_queries=3)[0] == part
    other, _ = slice_data(data, max_docs=20, max_queries=3, seed=1)
    assert judged <= set(other.doc_ids) and other.doc_ids != part.doc_ids
    first = [d for d in data.doc_ids if d not in judged][: 20 - len(judged)]
    assert set(part.doc_ids) - judged != set(first)  # not the corpus's first docs
    # Fewer docs than judged ones: the judged docs are all kept (recall is not capped).
    small, _ = slice_data(data, max_docs=1, max_queries=3)
    assert set(small.doc_ids) == judged and len(judged) > 1
    assert slice_data(data, None, None) == (data, None)


def test_system_spec_and_argument_errors(tmp_path):
    assert SystemSpec.parse("bm25") == SystemSpec("bm25", None)
    assert SystemSpec.parse("runs/my-model/") == SystemSpec("my-model", "runs/my-model/")
    assert SystemSpec.parse("a=b/c") == SystemSpec("a", "b/c")
    with pytest.raises(ValueError, match="NAME=MODEL"):
        SystemSpec.parse("=x")
    with pytest.raises(ValueError, match="share a name"):
        evaluate([SystemSpec("x", "a"), SystemSpec("x", "b")], ["adi"], tmp_path)
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate([], ["adi"], tmp_path)
    with pytest.raises(FileNotFoundError, match="no-such-set"):
        evaluate([SystemSpec.parse("bm25")], ["no-such-set"], tmp_path)


def test_eval_entry_point_runs_csplade_eval(adi, model, tmp_path, capsys):
    """eval/beir.py -> `csplade eval` (the verb's parser and the wrapper's pass-through options)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_beir", REPO / "eval" / "beir.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    out = tmp_path / "out"
    assert entry.main(["--model", f"tiny={model}", "--datasets", str(adi), "--out", str(out),
                       "--k", "50", "--max-queries", "4", "--latency-queries", "2",
                       "--backend", "scipy", "--batch-size", "16"]) == 0  # fmt: skip
    assert "tiny nDCG@10" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"tiny", "bm25", "bm25-stem"}  # eval/beir.py adds both BM25 rows
    for name in ("bm25", "bm25-stem"):  # --max-queries reached evaluate
        assert len(read_trec_run(out / "adi" / f"{name}.trec")) == 4


def test_latency_zero_skips_timing_and_truncation_is_logged_once_per_call(adi, tmp_path, caplog):
    folder = tmp_path / "short"
    config = SparseEncoderConfig(base_model="tiny-llama", doc_max_length=8, query_max_length=3)
    SparseEncoder(tiny_model("llama"), tiny_tokenizer(), config).save_pretrained(folder)
    with caplog.at_level(logging.INFO, logger="csplade.model.encoder"):
        run_eval(folder, adi, tmp_path / "timed", latency_queries=20)
    truncated = [m for m in caplog.messages if "longer than 3 tokens" in m]
    assert len(truncated) == 1  # the one query encode call; the 20 timed queries add no line
    efficiency = json.loads((tmp_path / "timed" / "efficiency.json").read_text())
    assert "query_p50_ms" in efficiency["tiny"]["adi"]
    run_eval(folder, adi, tmp_path / "untimed", latency_queries=0)
    efficiency = json.loads((tmp_path / "untimed" / "efficiency.json").read_text())
    assert (
        "query_p50_ms" not in efficiency["tiny"]["adi"] and "doc_nnz" in efficiency["tiny"]["adi"]
    )


def test_stemmed_bm25_baseline_is_bm25s_with_snowball_stems(adi, tmp_path):
    """`bm25-stem` is a second BM25 row: bm25s with PyStemmer's English stems, its own run file,
    a ranking other than the unstemmed row's; an unknown baseline name fails before any work."""
    assert SystemSpec.parse("bm25-stem") == SystemSpec("bm25-stem", None)
    evaluate([SystemSpec.parse("bm25"), SystemSpec.parse("bm25-stem")], [str(adi)], tmp_path, k=100)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    data = load_beir(adi)
    want = bm25_search(data.doc_ids, data.doc_texts, data.queries, k=100, stemmer="english")
    got = read_trec_run(tmp_path / "adi" / "bm25-stem.trec")
    assert got.keys() == {q for q, hits in want.items() if hits}
    for query, hits in got.items():  # the same documents and scores (a run file breaks ties by id)
        assert hits.keys() == want[query].keys()
        for doc, score in hits.items():
            assert score == pytest.approx(want[query][doc], rel=1e-5)
    assert got != read_trec_run(tmp_path / "adi" / "bm25.trec")
    reference = pytrec(data.qrels, tmp_path / "adi" / "bm25-stem.trec")
    for name, value in reference.items():
        assert metrics["bm25-stem"]["adi"][name] == pytest.approx(value, abs=1e-9)
    with pytest.raises(ValueError, match="unknown baseline 'bm25-porter'"):
        evaluate([SystemSpec("bm25-porter", None)], [str(adi)], tmp_path / "other")
