"""Exports to Anserini, OpenSearch / Elasticsearch and Qdrant, checked against our exact search."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp

from csplade.index import InvertedIndex, encode_corpus
from csplade.index.export import (
    elasticsearch_query,
    export_index,
    opensearch_query,
    search_qdrant,
    upsert_qdrant,
    write_anserini_queries,
    write_qdrant_jsonl,
)

VOCAB = 30
# Tokens a real tokenizer produces: word pieces, a dot, a space, a percent sign, a newline.
TOKENS = ["the", "##ing", "a.b", "Ġcat", "▁dog", "50%", "new line\n", "x y"] + [
    f"tok{i}" for i in range(VOCAB - 8)
]


def random_collection(seed=0, n_docs=300, n_queries=20):
    rng = np.random.default_rng(seed)
    docs = sp.random(n_docs, VOCAB, density=0.2, format="csr", rng=rng, dtype=np.float32)
    docs.data = (docs.data * 3).astype(np.float32)
    queries = sp.random(n_queries, VOCAB, density=0.25, format="csr", rng=rng, dtype=np.float32)
    return docs, queries, [f"doc-{i}" for i in range(n_docs)]


@pytest.fixture
def index_dir(tmp_path):
    docs, _, ids = random_collection()
    texts = [str(i) for i in range(len(ids))]
    encode_corpus(
        lambda batch: docs[[int(t) for t in batch]], ids, texts, tmp_path / "index",
        describe={"model": "random"}, shard_size=128, progress=False,
    )  # fmt: skip
    return tmp_path / "index"


def test_qdrant_in_memory_top10_equals_exact_search():
    pytest.importorskip("qdrant_client")
    from qdrant_client import QdrantClient

    docs, queries, ids = random_collection(seed=1)
    scores, top = InvertedIndex.build(docs, ids).search(queries, k=11)
    # Only compare queries whose top 10 is separated from the rest: no ties to order arbitrarily.
    separated = (np.diff(scores[:, :11], axis=1) < -1e-4).all(axis=1)
    assert separated.sum() >= 15

    client = QdrantClient(":memory:")
    assert upsert_qdrant(client, "docs", [(docs, ids)], batch_size=64) == len(ids)
    results = search_qdrant(client, "docs", queries, k=10)
    for row in np.flatnonzero(separated):
        assert [doc for doc, _ in results[row]] == [ids[d] for d in top[row, :10]]
        np.testing.assert_allclose([s for _, s in results[row]], scores[row, :10], rtol=1e-5)
    with pytest.raises(ValueError, match="already exists"):
        upsert_qdrant(client, "docs", [(docs, ids)])


def test_export_index_writes_parsable_files_with_the_right_weights(index_dir, tmp_path):
    docs, _, ids = random_collection()
    paths = export_index(index_dir, tmp_path / "out", TOKENS)
    dense = docs.toarray()

    def escaped(token, unsafe):
        return "".join(
            "".join(f"%{b:02X}" for b in ch.encode()) if ch == "%" or unsafe(ch) else ch
            for ch in token
        )

    # Anserini: integer impacts round(w * 100), zeros dropped, whitespace-free token names.
    lines = paths["anserini"].read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(ids)
    for line, doc_id, row in zip(lines, ids, dense, strict=True):
        record = json.loads(line)
        assert record["id"] == doc_id and record["contents"] == ""
        impacts = np.rint(row.astype(np.float64) * 100).astype(int)
        expected = {
            escaped(TOKENS[t], str.isspace): int(impacts[t]) for t in np.flatnonzero(impacts)
        }
        assert record["vector"] == expected
        assert all(not any(ch.isspace() for ch in key) for key in record["vector"])

    # OpenSearch / Elasticsearch: action + source pairs, float weights exact to float32, no dots.
    for flavour, field_type in (
        ("opensearch", "rank_features"),
        ("elasticsearch", "sparse_vector"),
    ):
        lines = paths[flavour].read_text(encoding="utf-8").splitlines()
        assert len(lines) == 2 * len(ids)
        for i, doc_id in enumerate(ids):
            action, source = json.loads(lines[2 * i]), json.loads(lines[2 * i + 1])
            assert action == {"index": {"_id": doc_id}}
            features = source["splade"]
            assert not any("." in key for key in features)
            expected = {
                escaped(TOKENS[t], lambda ch: ch == "."): dense[i, t]
                for t in np.flatnonzero(dense[i])
            }
            assert features.keys() == expected.keys()
            for key, value in features.items():
                assert np.float32(value) == expected[key]
        mapping = json.loads(paths[f"{flavour}_mapping"].read_text())
        assert mapping["mappings"]["properties"]["splade"] == {"type": field_type}

    # Qdrant JSONL: raw vocab ids and float32-exact values.
    lines = paths["qdrant"].read_text().splitlines()
    for line, doc_id, row in zip(lines, ids, dense, strict=True):
        record = json.loads(line)
        assert record["id"] == doc_id
        assert record["indices"] == np.flatnonzero(row).tolist()
        np.testing.assert_array_equal(np.float32(record["values"]), row[row != 0])


def test_anserini_queries_repeat_tokens_by_impact(tmp_path):
    queries = sp.csr_matrix(
        np.array([[0.034, 0, 0.021, 0, 0, 0.004] + [0] * (VOCAB - 6)], np.float32)
    )
    write_anserini_queries(tmp_path / "q.tsv", [(queries, ["q1"])], TOKENS)
    qid, text = (tmp_path / "q.tsv").read_text().rstrip("\n").split("\t")
    assert qid == "q1"
    assert text.split(" ") == ["the"] * 3 + ["a.b"] * 2  # 0.004 rounds to 0 and is dropped


def test_query_bodies_and_token_errors():
    os_body = opensearch_query([2, 3], [0.5, 1.25], TOKENS)
    assert os_body["query"]["bool"]["should"][0]["rank_feature"] == {
        "field": "splade.a%2Eb",
        "linear": {},
        "boost": 0.5,
    }
    es_body = elasticsearch_query([2, 3], [0.5, 1.25], TOKENS)
    assert es_body["query"]["sparse_vector"]["query_vector"] == {"a%2Eb": 0.5, "Ġcat": 1.25}
    with pytest.raises(ValueError, match="vocab ids 0 and 1 are both 'same'"):
        opensearch_query([0, 1], [1.0, 1.0], ["same", "same"])
    with pytest.raises(ValueError, match="vocab id 5 has no entry"):
        elasticsearch_query([5], [1.0], ["a", "b"])


def test_writers_are_atomic_on_error(tmp_path):
    docs, _, ids = random_collection()
    target = tmp_path / "qdrant.jsonl"
    target.write_text("previous\n")
    with pytest.raises(ValueError, match="rows but"):
        write_qdrant_jsonl(target, [(docs[:5], ids[:5]), (docs[:5], ids[:4])])
    assert target.read_text() == "previous\n"
    assert [p.name for p in tmp_path.iterdir()] == ["qdrant.jsonl"]
