"""Metrics against pytrec_eval called directly, BM25, sparsity/latency, peak memory, results."""

from __future__ import annotations

import json
import math
import mmap
import os
import time
from pathlib import Path

import numpy as np
import pytest
import pytrec_eval
import scipy.sparse as sp

from csplade.data.beir import load_beir
from csplade.evaluation import memory as memory_module
from csplade.evaluation.memory import MIB, PeakMemory
from csplade.evaluation.metrics import (
    DEFAULT_METRICS,
    evaluate_run,
    latency_percentiles,
    sparsity_stats,
    truncate_run,
)
from csplade.evaluation.report import bar_chart, write_results
from csplade.index.bm25 import bm25_search

DATA_DIR = Path(
    os.environ.get("CSPLADE_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data")
)

# Graded judgments, a judged-non-relevant doc, and five judged queries.
QRELS = {
    "q1": {"d1": 2, "d3": 1, "d7": 3, "d9": 0},
    "q2": {"x12": 1},
    "q3": {"t_b": 1},
    "q4": {"d1": 1},  # absent from the run
    "q5": {"d2": 1},  # in the run with no documents
}


def make_run() -> dict[str, dict[str, float]]:
    run = {
        # ties between d3/d4/d5 and between d7/d8
        "q1": {"d1": 5.0, "d2": 4.0, "d3": 3.0, "d4": 3.0, "d5": 3.0, "d6": 2.0, "d7": 1.0},
        # the relevant doc is 12th: counts for recip_rank, not for MRR@10
        "q2": {f"x{i:02d}": 100.0 - i for i in range(1, 30)},
        "q5": {},
        "unjudged": {"d1": 1.0},
    }
    run["q1"]["d8"] = 1.0
    # q3: eight clear winners, then four docs tied at 1.0 across the top-10 boundary. trec_eval
    # breaks ties by doc id descending: t_d, t_c, then t_b (rank 11), t_a; ascending order would
    # put the relevant t_b at rank 10.
    run["q3"] = {f"w{i}": 10.0 - i for i in range(8)}
    run["q3"].update({"t_a": 1.0, "t_b": 1.0, "t_c": 1.0, "t_d": 1.0})
    return run


def pytrec_reference(qrels, run):
    evaluator = pytrec_eval.RelevanceEvaluator(
        qrels, {"ndcg_cut.10", "recall.100", "recall.1000", "map", "recip_rank"}
    )
    return evaluator.evaluate(run)


def test_metrics_equal_pytrec_eval_per_query_and_mean():
    run = make_run()
    result = evaluate_run(QRELS, run)
    reference = pytrec_reference(QRELS, run)

    assert list(result.per_query) == list(QRELS)
    assert result.n_queries == len(QRELS)
    assert result.missing_queries == ["q4"]
    assert result.n_unjudged_run_queries == 1
    for q, ref in reference.items():
        if q not in QRELS:
            continue
        ours = result.per_query[q]
        for name in ("ndcg_cut_10", "recall_100", "recall_1000", "map"):
            assert ours[name] == pytest.approx(ref[name], abs=1e-12), (q, name)
        # MRR@10 = trec_eval's reciprocal rank when the first relevant doc is in the top 10
        rr = ref["recip_rank"]
        expected = rr if rr > 0 and round(1 / rr) <= 10 else 0.0
        assert ours["recip_rank_10"] == pytest.approx(expected, abs=1e-12), q
    assert result.per_query["q2"]["recip_rank_10"] == 0.0 < reference["q2"]["recip_rank"]
    assert result.per_query["q3"]["recip_rank_10"] == 0.0  # t_b ranked 11th under trec ties
    assert reference["q3"]["recip_rank"] == pytest.approx(1 / 11)
    assert result.per_query["q4"] == dict.fromkeys(DEFAULT_METRICS, 0.0)
    assert result.per_query["q5"] == dict.fromkeys(DEFAULT_METRICS, 0.0)
    for name in DEFAULT_METRICS:
        values = [result.per_query[q][name] for q in QRELS]
        assert result.mean[name] == pytest.approx(sum(values) / len(QRELS))
    assert 0 < result.mean["ndcg_cut_10"] < 1


def test_missing_skip_averages_like_beir():
    run = make_run()
    result = evaluate_run(QRELS, run, missing="skip")
    reference = pytrec_reference(QRELS, run)
    # BEIR averages over whatever pytrec_eval returns: judged queries present in the run
    beir_queries = [q for q in reference if q in QRELS]
    assert sorted(result.per_query) == sorted(beir_queries)
    assert result.n_queries == len(beir_queries)
    beir_mean = sum(reference[q]["ndcg_cut_10"] for q in beir_queries) / len(beir_queries)
    assert result.mean["ndcg_cut_10"] == pytest.approx(beir_mean)
    zero = evaluate_run(QRELS, run)
    assert zero.mean["ndcg_cut_10"] < result.mean["ndcg_cut_10"]


def test_ndcg_at_10_by_hand():
    # 3 docs ranked c, a, b; graded judgments a=2, b=1, c=0; trec_eval gain = grade (linear)
    qrels = {"q": {"a": 2, "b": 1, "c": 0}}
    run = {"q": {"c": 3.0, "a": 2.0, "b": 1.0}}
    dcg = 0 / math.log2(2) + 2 / math.log2(3) + 1 / math.log2(4)  # = 1.7619
    ideal = 2 / math.log2(2) + 1 / math.log2(3) + 0 / math.log2(4)  # = 2.6309
    result = evaluate_run(qrels, run, metrics=["ndcg_cut_10", "recip_rank_10", "P_1"])
    assert result.mean["ndcg_cut_10"] == pytest.approx(dcg / ideal, abs=1e-12)
    assert result.mean["ndcg_cut_10"] == pytest.approx(0.66968, abs=1e-5)
    assert result.mean["recip_rank_10"] == pytest.approx(1 / 2)
    assert result.mean["P_1"] == 0.0


def test_truncate_run_uses_trec_eval_tie_order():
    run = {"q": {"a": 1.0, "c": 1.0, "b": 1.0, "z": 0.5, "top": 2.0}}
    assert list(truncate_run(run, 3)["q"]) == ["top", "c", "b"]
    with pytest.raises(ValueError):
        truncate_run(run, 0)


def test_bad_metric_and_bad_scores_are_errors():
    with pytest.raises(ValueError, match="unknown metric 'ndcg@10'"):
        evaluate_run(QRELS, make_run(), metrics=["ndcg@10"])
    with pytest.raises(ValueError, match=r"run\['q1'\]\['d1'\] has a non-finite score"):
        evaluate_run(QRELS, {"q1": {"d1": float("nan")}})
    with pytest.raises(ValueError, match=r"qrels\['q'\]\['d'\] must be an integer"):
        evaluate_run({"q": {"d": 0.5}}, {"q": {"d": 1.0}})
    with pytest.raises(ValueError, match="missing must be"):
        evaluate_run(QRELS, make_run(), missing="ignore")


# ---------------------------------------------------------------- BM25


TOY_IDS = ["cat", "dog", "car", "none"]
TOY_TEXTS = [
    "The cat sat on the mat with another cat",
    "A dog chased the cat",
    "Cars and engines",
    "the and of",
]


def test_bm25_ranks_term_matches_and_leaves_out_non_matches():
    run = bm25_search(TOY_IDS, TOY_TEXTS, {"q1": "cat", "q2": "engines", "q3": "zebra"}, k=10)
    assert list(run["q1"]) == ["cat", "dog"]  # higher tf wins; docs without 'cat' are absent
    assert run["q1"]["cat"] > run["q1"]["dog"] > 0
    assert list(run["q2"]) == ["car"]
    assert run["q3"] == {}  # no query term in the corpus
    assert bm25_search(TOY_IDS, TOY_TEXTS, {"q": "cat"}, k=1)["q"].keys() == {"cat"}


def test_bm25_stemmer_and_stopwords():
    plural = bm25_search(TOY_IDS, TOY_TEXTS, {"q": "car"})
    assert plural["q"] == {}  # no stemming by default: 'car' does not match 'cars'
    stemmed = bm25_search(TOY_IDS, TOY_TEXTS, {"q": "car"}, stemmer=lambda w: w.rstrip("s"))
    assert list(stemmed["q"]) == ["car"]
    assert bm25_search(TOY_IDS, TOY_TEXTS, {"q": "the"})["q"] == {}  # English stopword
    kept = bm25_search(TOY_IDS, TOY_TEXTS, {"q": "the"}, stopwords=None)
    assert "none" in kept["q"]


def test_bm25_input_errors():
    with pytest.raises(ValueError, match="2 corpus ids but 1 texts"):
        bm25_search(["a", "b"], ["x"], {"q": "x"})
    with pytest.raises(ValueError, match="duplicates"):
        bm25_search(["a", "a"], ["x", "y"], {"q": "x"})
    try:
        import Stemmer  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="PyStemmer"):
            bm25_search(TOY_IDS, TOY_TEXTS, {"q": "x"}, stemmer="english")


def _real(name: str) -> Path:
    folder = DATA_DIR / name
    if not (folder / "corpus.jsonl").is_file():
        pytest.skip(f"{folder} not available (set CSPLADE_DATA)")
    return folder


# Bands: scifact = the published range (Anserini 0.665 multifield / 0.679 flat, a plain unstemmed
# BM25 near 0.66); cranfield and adi have no published BEIR-style number, so their bands sit
# +-0.03 around what this implementation measured (0.332, 0.422) to catch regressions.
@pytest.mark.slow
@pytest.mark.parametrize(
    "name, low, high",
    [("scifact", 0.645, 0.70), ("cranfield", 0.30, 0.36), ("adi", 0.39, 0.45)],
)
def test_bm25_on_real_data(name, low, high):
    data = load_beir(_real(name))
    start = time.perf_counter()
    run = bm25_search(data.doc_ids, data.doc_texts, data.queries)
    seconds = time.perf_counter() - start
    result = evaluate_run(data.qrels, run)
    print(f"{name}: BM25 nDCG@10={result.mean['ndcg_cut_10']:.4f} in {seconds:.1f}s")
    assert low <= result.mean["ndcg_cut_10"] <= high
    assert result.missing_queries == []
    assert result.mean["recall_1000"] >= result.mean["recall_100"] > result.mean["ndcg_cut_10"]


# ---------------------------------------------------------------- efficiency statistics


def test_sparsity_stats_by_hand():
    q = np.array([[1, 0, 2, 0], [0, 0, 3, 0]], dtype=np.float32)  # p(q) = [.5, 0, 1, 0]
    d = np.array([[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float32)  # p(d) = 1/3 each
    stats = sparsity_stats(sp.csr_matrix(q), d)
    assert stats["query_nnz"] == pytest.approx(1.5)
    assert stats["doc_nnz"] == pytest.approx(4 / 3)
    assert stats["flops"] == pytest.approx(0.5 / 3 + 1 / 3)


def test_flops_is_mean_overlap_over_all_pairs_and_ignores_stored_zeros():
    rng = np.random.default_rng(0)
    q = (rng.random((7, 50)) < 0.2) * rng.random((7, 50))
    d = (rng.random((11, 50)) < 0.3) * rng.random((11, 50))
    d_csr = sp.csr_matrix(d)
    d_csr.data[:5] = 0.0  # explicitly stored zeros are not active terms
    d_dense = d_csr.toarray()
    overlap = np.mean([[np.sum((qi != 0) & (dj != 0)) for dj in d_dense] for qi in q])
    stats = sparsity_stats(q, d_csr)
    assert stats["flops"] == pytest.approx(overlap)
    assert stats["doc_nnz"] == pytest.approx(np.count_nonzero(d_dense) / 11)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_sparsity_stats_accepts_torch_and_checks_vocab():
    torch = pytest.importorskip("torch")
    q = torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.bfloat16)
    d = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 0.0]]).to_sparse_csr()
    assert sparsity_stats(q, d)["flops"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="same vocabulary"):
        sparsity_stats(np.ones((2, 3)), np.ones((2, 4)))


def test_latency_percentiles():
    stats = latency_percentiles([0.01, 0.02, 0.03, 0.04])
    assert stats["p50_ms"] == pytest.approx(25.0)
    assert stats["p95_ms"] == pytest.approx(38.5)  # 30 + 0.85 * 10, linear interpolation
    assert stats["mean_ms"] == pytest.approx(25.0)
    with pytest.raises(ValueError):
        latency_percentiles([])


# ---------------------------------------------------------------- peak memory


def _touch(n_bytes: int) -> mmap.mmap:
    """Fresh resident pages: an anonymous mapping, every page written. A heap allocation (np.ones)
    may reuse pages glibc kept resident after an earlier test freed them, so the RSS would not grow."""
    block = mmap.mmap(-1, n_bytes)
    np.frombuffer(block, dtype=np.uint8)[:] = 1
    return block


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_peak_memory_sees_an_allocation_freed_before_it_is_read():
    memory = PeakMemory("cpu").start()
    block = _touch(64 * MIB)
    del block
    assert memory.method in ("vmhwm", "sampled")
    assert memory.peak_bytes() >= 60 * MIB
    assert memory.peak_total() == memory.base + memory.peak_bytes()
    assert memory.lifetime_peak() >= memory.peak_total()
    memory.stop()


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_peak_memory_samples_the_rss_where_the_peak_cannot_be_reset(monkeypatch):
    monkeypatch.setattr(memory_module, "_reset_peak_rss", lambda: False)
    with PeakMemory("cpu") as memory:
        block = _touch(64 * MIB)
        time.sleep(0.05)  # the sampling thread reads the RSS every 5 ms
        del block
    assert memory.method == "sampled" and memory.reset_ok
    assert memory.peak_bytes() >= 60 * MIB


def test_peak_memory_without_proc_uses_the_lifetime_peak(monkeypatch):
    monkeypatch.setattr(memory_module, "_reset_peak_rss", lambda: False)
    monkeypatch.setattr(memory_module, "_statm_readable", lambda: False)
    memory = PeakMemory("cpu").start()
    assert memory.method == "rusage" and not memory.reset_ok
    assert memory.peak_total() == memory_module.max_rss_bytes()


# ---------------------------------------------------------------- result files


METRICS = {
    "bm25": {
        "scifact": {"ndcg_cut_10": 0.657, "recall_100": 0.9},
        "adi": {"ndcg_cut_10": 0.4, "recall_100": 0.8},
    },
    "csplade-bi": {"scifact": {"ndcg_cut_10": np.float64(0.7), "recall_100": 0.95}},
}
EFFICIENCY = {"csplade-bi": {"scifact": {"query_nnz": 40.0, "doc_nnz": 400.0, "p50_ms": 2.5}}}


def test_write_results_writes_the_three_files(tmp_path):
    paths = write_results(tmp_path / "out", METRICS, EFFICIENCY, slice_note=None)
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {
        "metrics.json",
        "efficiency.json",
        "table.md",
        "ndcg_cut_10.png",
    }
    assert paths["chart"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == {
        "bm25": {
            "scifact": {"ndcg_cut_10": 0.657, "recall_100": 0.9},
            "adi": {"ndcg_cut_10": 0.4, "recall_100": 0.8},
        },
        "csplade-bi": {"scifact": {"ndcg_cut_10": 0.7, "recall_100": 0.95}},
    }
    assert json.loads((out / "efficiency.json").read_text()) == EFFICIENCY

    lines = (out / "table.md").read_text().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == [
        "dataset",
        "bm25 nDCG@10",
        "bm25 R@100",
        "csplade-bi nDCG@10",
        "csplade-bi R@100",
        "csplade-bi q nnz",
        "csplade-bi d nnz",
        "csplade-bi p50 ms",
    ]
    rows = {line.split("|")[1].strip(): line for line in lines[2:] if line.startswith("|")}
    assert set(rows) == {"scifact", "adi", "average"}
    average = [c.strip() for c in rows["average"].strip("|").split("|")]
    assert average[1] == f"{(0.657 + 0.4) / 2:.3f}"  # bm25 ran on both datasets
    assert average[3] == "0.700†"  # csplade-bi only on scifact: marked partial
    assert "† averaged over" in (out / "table.md").read_text()
    adi = [c.strip() for c in rows["adi"].strip("|").split("|")]
    assert adi[3] == "–"


def test_write_results_slice_note_and_overwrite(tmp_path):
    write_results(tmp_path, {"bm25": {"adi": {"ndcg_cut_10": 0.1}}})
    write_results(tmp_path, METRICS, slice_note="slice: first 500 docs, 50 queries")
    table = (tmp_path / "table.md").read_text()
    assert table.startswith("> **slice: first 500 docs, 50 queries**")
    assert "csplade-bi" in json.loads((tmp_path / "metrics.json").read_text())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers
    fig = bar_chart(METRICS, "ndcg_cut_10", slice_note="slice: first 500 docs, 50 queries")
    (ax,) = fig.axes
    assert fig._suptitle.get_text() == "nDCG@10\nslice: first 500 docs, 50 queries"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["scifact", "adi", "average"]
    heights = [p.get_height() for p in ax.patches]  # bm25 bars, then csplade-bi bars
    assert heights[:3] == pytest.approx([0.657, 0.4, (0.657 + 0.4) / 2])
    assert heights[3] == pytest.approx(0.7) and math.isnan(heights[4])


def test_write_results_rejects_bad_values(tmp_path):
    with pytest.raises(ValueError, match=r"metrics\['s'\]\['d'\]\['ndcg_cut_10'\] is not finite"):
        write_results(tmp_path, {"s": {"d": {"ndcg_cut_10": float("nan")}}})
    with pytest.raises(ValueError, match="not a number"):
        write_results(tmp_path, {"s": {"d": {"ndcg_cut_10": "high"}}})
    with pytest.raises(ValueError, match="empty"):
        write_results(tmp_path, {})
    assert list(tmp_path.iterdir()) == []


def test_chart_title_fits_and_the_legend_is_beside_the_bars():
    note = (
        "slice of scifact: 400 of 5183 docs (all judged docs of the kept queries + the first "
        "docs), 80 of 300 queries"
    )
    metrics = {
        "smollm2-135m echo, adapted + 30 training steps": {"scifact": {"ndcg_cut_10": 0.453}},
        "bm25": {"scifact": {"ndcg_cut_10": 0.885}},
    }
    fig = bar_chart(metrics, "ndcg_cut_10", slice_note=note)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    page = fig.bbox

    def inside(box):
        return box.x0 >= page.x0 - 1 and box.x1 <= page.x1 + 1 and box.y1 <= page.y1 + 1

    title = fig._suptitle
    assert "80 of 300 queries" in title.get_text() and inside(title.get_window_extent(renderer))
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent(renderer)
    assert legend.x0 >= ax.get_window_extent(renderer).x1  # beside the plot, over no bar
    assert inside(legend)


def test_baseline_rows_and_ranking_metrics_equal_pytrec_eval_on_their_runs():
    """baseline_rows: both BM25 baselines; ranking_metrics: an index searched, scored as pytrec_eval
    scores the same run (here BM25's own vectors cannot be had, so: a query's one-hot words)."""
    from csplade.evaluation.beir_eval import BASELINES, baseline_rows, ranking_metrics
    from csplade.index import InvertedIndex

    data = load_beir(_real("adi"))
    rows = baseline_rows(data, k=100)
    assert set(rows) == set(BASELINES)
    for name, stemmer in BASELINES.items():
        run = bm25_search(data.doc_ids, data.doc_texts, data.queries, k=100, stemmer=stemmer)
        per_query = pytrec_eval.RelevanceEvaluator(data.qrels, {"ndcg_cut.10"}).evaluate(run)
        mean = float(np.mean([v["ndcg_cut_10"] for v in per_query.values()]))
        assert rows[name]["ndcg_cut_10"] == pytest.approx(mean, abs=1e-9)
    vocab = {w: i for i, w in enumerate(sorted({w for t in data.doc_texts for w in t.split()}))}

    def one_hot(texts):
        out = sp.lil_matrix((len(texts), len(vocab)), dtype=np.float32)
        for i, text in enumerate(texts):
            for w in text.split():
                if w in vocab:
                    out[i, vocab[w]] = 1.0
        return out.tocsr()

    docs, queries = one_hot(data.doc_texts), one_hot(list(data.queries.values()))
    got = ranking_metrics(data, InvertedIndex.build(docs, data.doc_ids), queries)  # every doc
    scores = (queries @ docs.T).toarray()
    run = {}
    for row, qid in enumerate(data.queries):
        run[qid] = {d: float(s) for d, s in zip(data.doc_ids, scores[row], strict=True) if s > 0}
    want = evaluate_run(data.qrels, run, ["ndcg_cut_10", "recall_100"]).mean
    assert got["ndcg_cut_10"] == pytest.approx(want["ndcg_cut_10"], abs=1e-6)
    assert got["recall_100"] == pytest.approx(want["recall_100"], abs=1e-6)
    assert got["ndcg_cut_10"] > 0


def test_ratio_table_by_hand():
    from csplade.evaluation.report import ratio_table

    table = {
        "bm25": {"a": {"ndcg_cut_10": 0.5}, "b": {"ndcg_cut_10": 0.25}},
        "model": {"a": {"ndcg_cut_10": 0.6}, "b": {"ndcg_cut_10": 0.2}},
    }
    lines = ratio_table(table)
    assert lines[0] == "| system | a | b |" and lines[1] == "|---|---|---|"
    assert lines[2] == "| bm25 | 0.500 (1.00x) | 0.250 (1.00x) |"
    assert lines[3] == "| model | 0.600 (1.20x) | 0.200 (0.80x) |"
