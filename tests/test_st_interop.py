"""A saved masked-LM encoder also loads in sentence_transformers.SparseEncoder, with the same vectors;
encoders sentence-transformers cannot reproduce get no such files, and their card says so."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from csplade.data.beir import doc_text, load_corpus, load_queries
from csplade.model import SparseEncoder
from csplade.model.card import front_matter
from csplade.model.st_files import FILES, unsupported

st = pytest.importorskip("sentence_transformers")


def _texts(adi, n_docs=12, n_queries=8):
    docs = [doc_text(d) for d in list(load_corpus(adi / "corpus.jsonl").values())[:n_docs]]
    queries = list(load_queries(adi / "queries.jsonl").values())[:n_queries]
    return docs + ["a"], queries  # a one-letter text too


def _st_vectors(folder, docs, queries):
    model = st.SparseEncoder(str(folder), device="cpu")
    kwargs = {"convert_to_tensor": True, "convert_to_sparse_tensor": False, "batch_size": 4}
    return (
        model.encode_document(docs, **kwargs).numpy(),
        model.encode_query(queries, **kwargs).numpy(),
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "settings",
    [
        {"doc_max_length": 24, "query_max_length": 24},  # documents cut at 24 tokens
        {"doc_max_length": 128, "query_max_length": 128, "pooling": "sum"},
        {
            "doc_max_length": 40,
            "query_max_length": 40,
            "query_prefix": "query: ",
            "doc_prefix": "passage: ",
        },
    ],  # fmt: skip
)
def test_splade_tiny_folder_gives_the_same_vectors_in_sentence_transformers(
    adi, prepared, tmp_path, settings
):
    prepared("splade-tiny")
    encoder = SparseEncoder.from_pretrained("splade-tiny", **settings)
    encoder.save_pretrained(tmp_path / "model")
    assert all((tmp_path / "model" / name).is_file() for name in FILES)
    docs, queries = _texts(adi)  # (an empty text differs: a zero vector in csplade, not there)
    want_docs = encoder.encode_docs(docs, show_progress=False, batch_size=4).toarray()
    want_queries = encoder.encode_queries(queries, show_progress=False, batch_size=4).toarray()
    got_docs, got_queries = _st_vectors(tmp_path / "model", docs, queries)
    np.testing.assert_allclose(got_docs, want_docs, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got_queries, want_queries, rtol=0, atol=1e-5)
    assert (want_docs > 0).sum(axis=1).min() > 0  # real vectors, not all-zero ones
    # the same folder still loads in csplade, unchanged
    again = SparseEncoder.from_pretrained(tmp_path / "model")
    np.testing.assert_allclose(
        again.encode_docs(docs[:3], show_progress=False).toarray(), want_docs[:3], atol=1e-5
    )
    card = front_matter(tmp_path / "model" / "README.md")
    assert {"sentence-transformers", "sparse-encoder"} <= set(card["tags"])


def test_encoders_sentence_transformers_cannot_reproduce_get_no_files(
    tiny_encoder_factory, tmp_path
):
    cases = {
        "causal": tiny_encoder_factory("llama"),
        "doc_only": tiny_encoder_factory("bert", doc_only=True),
        "logit_scale": tiny_encoder_factory("bert", logit_scale=0.5),
        "no_specials": tiny_encoder_factory("bert", pool_special_tokens=False),
    }
    biased = tiny_encoder_factory("bert")
    biased.head_bias = torch.nn.Parameter(torch.zeros(biased.vocab_size))
    cases["head_bias"] = biased
    for name, encoder in cases.items():
        assert unsupported(encoder), name
        encoder.save_pretrained(tmp_path / name)
        assert not (tmp_path / name / "modules.json").exists(), name
        tags = front_matter(tmp_path / name / "README.md")["tags"]
        assert "sentence-transformers" not in tags, name
    plain = tiny_encoder_factory("bert")
    assert unsupported(plain) is None
    plain.save_pretrained(tmp_path / "plain")
    modules = json.loads((tmp_path / "plain" / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["MLMTransformer", "SpladePooling"]
