"""Exact inverted index, Seismic wrapper and TREC run files."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from csplade.index import InvertedIndex, read_trec_run, write_trec_run
from csplade.index.inverted import numba_available

BACKENDS = ["scipy"] + (["numba"] if numba_available() else [])


def integer_collection(seed: int, n_docs=400, n_queries=60, vocab=50, density=0.08):
    """Small integer weights: many exact score ties, and exact float32 sums."""
    rng = np.random.default_rng(seed)

    def weights(size):
        return rng.integers(1, 4, size)

    docs = sp.random(n_docs, vocab, density=density, format="csr", rng=rng, data_rvs=weights)
    queries = sp.random(n_queries, vocab, density=density, format="csr", rng=rng, data_rvs=weights)
    return docs.astype(np.float32), queries.astype(np.float32)


def brute_force_topk(docs, queries, k):
    """Reference: dense Q @ D.T, positive scores only, score desc then doc index asc, -1 padded."""
    scores = (queries @ docs.T).toarray()  # (n_q, n_docs)
    top_s = np.full((scores.shape[0], k), -np.inf, dtype=np.float32)
    top_d = np.full((scores.shape[0], k), -1, dtype=np.int64)
    for row in range(scores.shape[0]):
        matched = np.flatnonzero(scores[row] > 0)
        order = matched[np.lexsort((matched, -scores[row, matched]))][:k]
        top_s[row, : order.size] = scores[row, order]
        top_d[row, : order.size] = order
    return top_s, top_d


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 10, 25])
def test_exact_search_matches_brute_force_with_ties(backend, k):
    docs, queries = integer_collection(seed=k)
    index = InvertedIndex.build(docs, [f"d{i}" for i in range(docs.shape[0])], backend=backend)
    scores, indices = index.search(queries, k=k, threads=2)
    ref_scores, ref_indices = brute_force_topk(docs, queries, k)
    # The data must put ties across the k-th position, or the tie rule is not tested.
    wider, _ = brute_force_topk(docs, queries, k + 1)
    assert (wider[:, k - 1] == wider[:, k]).sum() > 5, "too few ties at the cut"
    np.testing.assert_array_equal(indices, ref_indices)
    np.testing.assert_array_equal(scores, ref_scores)


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_search_float_weights_and_many_queries(backend):
    """Real-valued weights, more queries than one kernel batch, bit-identical scores."""
    rng = np.random.default_rng(7)
    docs = sp.random(3000, 300, density=0.05, format="csr", rng=rng, dtype=np.float32)
    queries = sp.random(300, 300, density=0.04, format="csr", rng=rng, dtype=np.float32)
    index = InvertedIndex.build(docs, [str(i) for i in range(3000)], backend=backend)
    scores, indices = index.search(queries, k=10, threads=2)
    ref_scores, ref_indices = brute_force_topk(docs, queries, 10)
    np.testing.assert_array_equal(indices, ref_indices)
    np.testing.assert_array_equal(scores, ref_scores)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fewer_matches_than_k_are_padded_not_invented(backend):
    # doc 0 and doc 2 share term 1 with the query; doc 1 shares nothing; doc 3 is empty.
    docs = sp.csr_matrix(
        np.array([[0, 2, 0, 0], [1, 0, 0, 0], [0, 1, 3, 0], [0, 0, 0, 0]], np.float32)
    )
    queries = sp.csr_matrix(np.array([[0, 1, 0, 0], [0, 0, 0, 5]], np.float32))
    index = InvertedIndex.build(docs, ["a", "b", "c", "d"], backend=backend)
    scores, indices = index.search(queries, k=3, threads=1)
    np.testing.assert_array_equal(indices, [[0, 2, -1], [-1, -1, -1]])
    np.testing.assert_array_equal(scores, [[2, 1, -np.inf], [-np.inf] * 3])
    assert index.search_ids(queries, ["q1", "q2"], k=3) == {
        "q1": [("a", 2.0), ("c", 1.0)],
        "q2": [],
    }


def test_backends_agree_and_index_round_trips_through_save_load(tmp_path):
    docs, queries = integer_collection(seed=3)
    ids = [f"doc-{i}" for i in range(docs.shape[0])]
    index = InvertedIndex.build(docs, ids)
    index.save(tmp_path / "index.npz")
    loaded = InvertedIndex.load(tmp_path / "index.npz")
    assert loaded.doc_ids == ids and loaded.vocab_size == docs.shape[1]
    for backend in BACKENDS:
        np.testing.assert_array_equal(
            loaded.search(queries, 10, backend=backend)[1], index.search(queries, 10)[1]
        )
    assert not list(tmp_path.glob(".*tmp")), "temporary file left behind"


def test_build_and_search_reject_bad_input(tmp_path):
    docs, queries = integer_collection(seed=1)
    with pytest.raises(ValueError, match="duplicate doc id 'x'"):
        InvertedIndex.build(docs[:3], ["x", "y", "x"])
    with pytest.raises(ValueError, match="3 rows but 2 doc ids"):
        InvertedIndex.build(docs[:3], ["x", "y"])
    bad = docs[:3].copy()
    bad.data[0] = np.nan
    with pytest.raises(ValueError, match="non-finite value at row 0"):
        InvertedIndex.build(bad, ["x", "y", "z"])
    index = InvertedIndex.build(docs, [str(i) for i in range(docs.shape[0])])
    with pytest.raises(ValueError, match="columns"):
        index.search(sp.csr_matrix((1, docs.shape[1] + 1), dtype=np.float32))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError):
        InvertedIndex.load(tmp_path / "junk.npz")


def zipf_collection(seed: int, n_docs: int, vocab: int, n_queries: int = 100):
    """Zipf-like term frequencies, so posting lists have realistic skew; Gamma weights."""
    rng = np.random.default_rng(seed)
    probs = 1.0 / np.arange(1, vocab + 1)
    probs /= probs.sum()
    rows = np.repeat(np.arange(n_docs), 60)
    docs = sp.csr_matrix(
        (rng.gamma(2.0, 0.5, rows.size), (rows, rng.choice(vocab, rows.size, p=probs))),
        shape=(n_docs, vocab),
        dtype=np.float32,
    )
    q_rows = np.repeat(np.arange(n_queries), 12)
    queries = sp.csr_matrix(
        (rng.gamma(2.0, 0.5, q_rows.size), (q_rows, rng.choice(vocab, q_rows.size, p=probs))),
        shape=(n_queries, vocab),
        dtype=np.float32,
    )
    return docs, queries


def test_seismic_recall_against_exact_search():
    pytest.importorskip("seismic")
    from csplade.index.seismic import SeismicSearcher

    docs, queries = zipf_collection(seed=0, n_docs=2000, vocab=1000)
    ids = [f"d{i}" for i in range(docs.shape[0])]
    exact_scores, exact = InvertedIndex.build(docs, ids).search(queries, k=10)
    searcher = SeismicSearcher.build(docs, ids, threads=1)
    scores, approx = searcher.search(queries, k=10, threads=1)
    recall = np.mean([len(set(exact[i]) & set(approx[i])) / 10 for i in range(100)])
    assert recall >= 0.9, f"Seismic recall@10 {recall:.3f} with default knobs"
    # Re-scored candidates carry exact scores, sorted like the exact index.
    same = approx == exact
    np.testing.assert_array_equal(scores[same], exact_scores[same])
    assert (np.diff(scores, axis=1) <= 0).all()
    run = searcher.search_ids(queries[:2], ["q0", "q1"], k=5)
    assert [doc for doc, _ in run["q0"]] == [ids[d] for d in approx[0, :5]]
    # Pruned lists (100 postings on average) and aggressive block skipping still find most.
    pruned = SeismicSearcher.build(docs, ids, threads=1, n_postings=100)
    _, approx = pruned.search(queries, k=10, threads=1, heap_factor=1.5)
    assert np.mean([len(set(exact[i]) & set(approx[i])) / 10 for i in range(100)]) >= 0.9


def test_seismic_large_vocabulary_path_and_unused_terms(monkeypatch):
    """The u32 index (forced here by lowering the u16 limit) and vocab ids no doc uses."""
    pytest.importorskip("seismic")
    import csplade.index.seismic as seismic_backend

    docs, queries = zipf_collection(seed=1, n_docs=500, vocab=300, n_queries=30)
    docs = sp.hstack([sp.csr_matrix((500, 200), dtype=np.float32), docs], format="csr")
    queries = sp.hstack([sp.csr_matrix(np.ones((30, 200), np.float32)), queries], format="csr")
    ids = [f"d{i}" for i in range(500)]
    _, exact = InvertedIndex.build(docs, ids).search(queries, k=10)
    monkeypatch.setattr(seismic_backend, "_U16_LIMIT", 2)
    searcher = seismic_backend.SeismicSearcher.build(docs, ids, threads=1, query_cut=20)
    assert type(searcher._index).__name__ == "SeismicIndexLV"
    assert (searcher.term_map[:200] == -1).all()  # ids 0..199 appear in no doc
    _, approx = searcher.search(queries, k=10, threads=1)
    recall = np.mean([len(set(exact[i]) & set(approx[i])) / 10 for i in range(30)])
    assert recall >= 0.9


def test_trec_run_round_trip_and_stable_ties(tmp_path):
    run = {
        "q1": [("d3", 1.5), ("d1", 2.25), ("d2", 1.5), ("d9", 0.1 + 0.2)],
        "q2": [("d7", -1.0)],
    }
    path = tmp_path / "run.trec"
    write_trec_run(path, run, tag="test")
    lines = path.read_text().splitlines()
    assert lines[0] == "q1 Q0 d1 1 2.25 test"
    # d3 and d2 tie: input order kept, ranks consecutive.
    assert [line.split()[2:4] for line in lines[1:3]] == [["d3", "2"], ["d2", "3"]]
    back = read_trec_run(path)
    assert back == {qid: dict(pairs) for qid, pairs in run.items()}  # floats exact


@pytest.mark.parametrize(
    "line, message",
    [
        ("q1 Q0 d1 1 0.5", "expected 6 fields"),
        ("q1 Q0 d1 one 0.5 tag", "rank 'one' is not an integer"),
        ("q1 Q0 d1 1 high tag", "score 'high' is not a number"),
        ("q1 Q0 d1 1 nan tag", "not finite"),
        ("q1 Q0 d0 2 0.4 tag", "appears twice"),
    ],
)
def test_read_trec_run_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.trec"
    path.write_text(f"q1 Q0 d0 1 0.9 tag\n\n{line}\n")
    with pytest.raises(ValueError, match=message) as info:
        read_trec_run(path)
    assert f"{path}:3:" in str(info.value)


def test_write_trec_run_rejects_bad_runs(tmp_path):
    with pytest.raises(ValueError, match="whitespace"):
        write_trec_run(tmp_path / "r", {"q 1": [("d", 1.0)]})
    with pytest.raises(ValueError, match="listed twice"):
        write_trec_run(tmp_path / "r", {"q": [("d", 1.0), ("d", 0.5)]})
    with pytest.raises(ValueError, match="score inf"):
        write_trec_run(tmp_path / "r", {"q": [("d", float("inf"))]})
    assert not (tmp_path / "r").exists()
