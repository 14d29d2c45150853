"""eval/token_idf.py: the untrained token-IDF reference equals its definition scored by brute force."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
from beir_folder import write_beir
from tiny import tiny_tokenizer

from csplade.data.beir import load_beir

REPO = Path(__file__).resolve().parents[1]

DOCS = {
    "d1": ("", "aa ab ab ac"),
    "d2": ("", "ab ad ad ad ae"),
    "d3": ("", "af ag aa"),
    "d4": ("", "ah ai aj ak al am an ao aa"),  # 'aa' is its 9th token: cut at 8 it matches nothing
}
QUERIES = {"q1": "aa ab", "q2": "ad af", "q3": "aa"}
QRELS = [("q1", "d1", 1), ("q2", "d2", 1), ("q3", "d4", 1)]


def _module():
    spec = importlib.util.spec_from_file_location("token_idf", REPO / "eval" / "token_idf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _brute_force(max_len: int) -> dict[str, dict[str, float]]:
    docs = {d: text.split()[:max_len] for d, (_, text) in DOCS.items()}
    n = len(docs)
    run = {}
    for q, text in QUERIES.items():
        scores = {}
        for d, words in docs.items():
            score = 0.0
            for w in set(text.split()):
                df = sum(w in other for other in docs.values())
                if w in words:
                    idf = math.log1p((n - df + 0.5) / (df + 0.5))
                    score += idf * (1 + math.log(words.count(w)))
            if score > 0:
                scores[d] = score
        run[q] = scores
    return run


@pytest.mark.parametrize("max_len", [8, 256])
def test_token_idf_run_equals_the_brute_force_definition(tmp_path, max_len):
    data = load_beir(write_beir(tmp_path / "toy", DOCS, QUERIES, QRELS, "test"), "test")
    run = _module().token_idf_run(tiny_tokenizer(), data, doc_max_length=max_len)
    expected = _brute_force(max_len)
    assert set(run) == set(expected)
    for q in expected:
        assert run[q].keys() == expected[q].keys(), q
        for d, score in expected[q].items():
            assert run[q][d] == pytest.approx(score, rel=1e-5), (q, d)
    # the cut is real: at 8 tokens d4 no longer holds 'aa'
    assert ("d4" in run["q3"]) == (max_len > 8)


def test_lowercase_folds_case_before_tokenizing(tmp_path):
    """The tiny tokenizer's words are lowercase: cased texts are all <unk>, folded they give the
    lowercase collection's run."""
    upper = {d: (title, text.upper()) for d, (title, text) in DOCS.items()}
    queries = {q: text.title() for q, text in QUERIES.items()}
    data = load_beir(write_beir(tmp_path / "toy", upper, queries, QRELS, "test"), "test")
    module = _module()
    cased = module.token_idf_run(tiny_tokenizer(), data, doc_max_length=256)
    expected = _brute_force(256)
    assert any(cased[q].keys() != expected[q].keys() for q in expected)
    folded = module.token_idf_run(tiny_tokenizer(), data, doc_max_length=256, lowercase=True)
    for q in expected:
        assert folded[q] == pytest.approx(expected[q], rel=1e-5), q


def test_own_token_share_equals_a_dense_count(tiny_encoder_factory):
    encoder = tiny_encoder_factory("llama", variant="bi")
    texts = [text for _, text in DOCS.values()]
    share = _module().own_token_share(encoder, texts, doc_max_length=4, batch_size=2)
    dense = encoder.encode(texts, "doc", batch_size=2, show_progress=False).toarray()
    own = [set(encoder.tokenizer(t, add_special_tokens=False)["input_ids"][:4]) for t in texts]
    on_own = sum(dense[i, sorted(ids)].sum() for i, ids in enumerate(own))
    assert share["active_terms"] == pytest.approx((dense > 0).sum() / len(texts))
    assert share["active_own_tokens"] == pytest.approx(
        sum((dense[i, sorted(ids)] > 0).sum() for i, ids in enumerate(own)) / len(texts)
    )
    assert share["distinct_own_tokens"] == pytest.approx(sum(map(len, own)) / len(texts))
    assert share["own_weight_share"] == pytest.approx(on_own / dense.sum(), rel=1e-5)
    assert 0 < share["own_weight_share"] < 1


def test_residual_run_is_the_models_residual_alone(tiny_encoder_factory, tmp_path):
    """--residual-of: a lexical-residual model's residual alone, (k1 + 1) * bm25s over its tokens
    (the learned terms, which the tiny random model has plenty of, take no part)."""
    import bm25s

    from csplade.model import lexical

    write_beir(tmp_path, DOCS, QUERIES, QRELS, "test")
    data = load_beir(tmp_path, "test")
    encoder = tiny_encoder_factory(lexical_residual=True)
    ids = encoder.tokenizer(data.doc_texts, add_special_tokens=False)["input_ids"]
    encoder.lexical = lexical.statistics(ids, encoder.vocab_size)
    run = _module().residual_run(encoder, data, batch_size=3)
    retriever = bm25s.BM25(method="lucene", k1=lexical.K1, b=lexical.B)
    retriever.index([[str(t) for t in row] for row in ids], show_progress=False)
    for q, text in QUERIES.items():
        tokens = encoder.tokenizer(text, add_special_tokens=False)["input_ids"]
        scores = retriever.get_scores([str(t) for t in tokens]) * (lexical.K1 + 1)
        want = {d: s for d, s in zip(data.doc_ids, scores, strict=True) if s > 0}
        assert run[q].keys() == want.keys()
        for d in want:
            assert run[q][d] == pytest.approx(want[d], rel=1e-5)


def test_residual_loss_is_infonce_of_the_residual_alone(tiny_encoder_factory, tmp_path):
    """--residual-loss: InfoNCE (in-batch negatives) of the residual vectors alone (with minus
    without the residual, as encoded), by hand, over whole batches of the groups in file order."""
    import dataclasses
    import json

    import numpy as np
    from tiny import random_texts

    from csplade.model import lexical

    texts = random_texts(20, min_words=4, max_words=12, seed=5)
    rows = [  # queries share words with their positive, sometimes with their negative too
        {
            "query": " ".join(texts[i].split()[:2]),
            "positives": [texts[i]],
            "negatives": [texts[i + 10]],
        }
        for i in range(10)
    ]  # one negative each: nothing sampled
    groups = tmp_path / "groups.jsonl"
    groups.write_text("".join(json.dumps(row) + "\n" for row in rows))
    encoder = tiny_encoder_factory(lexical_residual=True)
    docs = [t for row in rows for t in (*row["positives"], *row["negatives"])]
    ids = encoder.tokenizer(docs, add_special_tokens=False)["input_ids"]
    encoder.lexical = lexical.statistics(ids, encoder.vocab_size)
    got = _module().residual_loss(encoder, str(groups), temperature=2.0, batch_size=4)

    def residual(texts, kind):
        with_it = encoder.encode(texts, kind, show_progress=False).toarray()
        saved = encoder.config
        encoder.config = dataclasses.replace(saved, lexical_residual=False)
        try:
            return with_it - encoder.encode(texts, kind, show_progress=False).toarray()
        finally:
            encoder.config = saved

    losses = []
    for batch in (rows[0:4], rows[4:8]):  # the last 2 groups make no whole batch
        q = residual([row["query"] for row in batch], "query")
        d = residual(
            [t for row in batch for t in (row["positives"][0], row["negatives"][0])], "doc"
        )
        scores = q @ d.T / 2.0
        for i in range(len(batch)):
            row = scores[i] - scores[i].max()
            losses.append(-(row[2 * i] - math.log(np.exp(row).sum())))
    assert got == pytest.approx(float(np.mean(losses)), rel=1e-4)
    assert (
        np.abs(scores).sum() > 0 and 0.01 < got < math.log(8) - 0.01
    )  # neither uniform nor solved


def test_residual_loss_bad_input_names_the_problem(tiny_encoder_factory, tmp_path, capsys):
    """--residual-loss without --residual-of stops before loading anything; too few groups for one
    batch and a model without a residual are errors naming what is wrong."""
    import json

    from csplade.model import lexical

    with pytest.raises(SystemExit):
        _module().main(["--residual-loss", str(tmp_path / "groups.jsonl")])
    assert "--residual-loss needs --residual-of MODEL" in capsys.readouterr().err
    groups = tmp_path / "groups.jsonl"
    groups.write_text(
        "".join(
            json.dumps({"query": "aa", "positives": ["aa ab"], "negatives": ["ac"]}) + "\n"
            for _ in range(3)
        )
    )
    encoder = tiny_encoder_factory(lexical_residual=True)
    encoder.lexical = lexical.statistics([[5, 6], [7]], encoder.vocab_size)
    with pytest.raises(ValueError, match="fewer than 4 groups, no whole batch"):
        _module().residual_loss(encoder, str(groups), temperature=1.0, batch_size=4)
    with pytest.raises(ValueError, match="needs a model trained with lexical_residual"):
        _module().residual_loss(tiny_encoder_factory(), str(groups), temperature=1.0)


@pytest.mark.parametrize("analyzer", ["tokens", "words"])
def test_bm25_on_an_analyzer_is_bm25s_on_the_analyzed_ids(tmp_path, analyzer):
    """`--bm25-on`: (k1 + 1) x Lucene BM25 (bm25s, the residual's k1 and b) over the token ids the
    analyzer reads; 'words' lower-cases (the tiny tokenizer knows lower-case words only) and drops
    stopwords ('an' in d4 shortens it), 'tokens' leaves cased words unknown."""
    import bm25s

    from csplade.model import lexical

    upper = {d: (title, text.upper()) for d, (title, text) in DOCS.items()}
    queries = {q: text.title() for q, text in QUERIES.items()}
    data = load_beir(write_beir(tmp_path / "toy", upper, queries, QRELS, "test"), "test")
    tok = tiny_tokenizer()
    run = _module().bm25_tokens_run(tok, data, analyzer, doc_max_length=256)
    rows = lexical.analyzed_rows(tok, data.doc_texts, analyzer)
    if analyzer == "words":
        assert rows == [tok(t.lower().replace(" an ", " "))["input_ids"] for _, t in DOCS.values()]
    retriever = bm25s.BM25(method="lucene", k1=lexical.K1, b=lexical.B)
    retriever.index([[str(t) for t in row] for row in rows], show_progress=False)
    q_rows = lexical.analyzed_rows(tok, [queries[q] for q in queries], analyzer)
    for q, row in zip(queries, q_rows, strict=True):
        scores = retriever.get_scores([str(t) for t in set(row)]) * (lexical.K1 + 1)
        want = {d: s for d, s in zip(data.doc_ids, scores, strict=True) if s > 0}
        assert run[q] == pytest.approx(want, rel=1e-5), q
    if analyzer == "words":  # 'Ad Af' finds the documents holding ad or af
        assert run["q2"].keys() == {"d2", "d3"}
    else:  # every cased word is <unk>: it matches every document
        assert all(len(hits) == len(DOCS) for hits in run.values())
