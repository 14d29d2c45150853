"""The lexical residual (csplade.model.lexical): its scores are BM25 on the model's tokens (bm25s is
the reference), it counts the text once (not the echo copy, not the prefix), documents are normalised
at the encoder's truncation, it is saved with the model, and training computes it from its documents."""

from __future__ import annotations

import dataclasses
import json

import bm25s
import numpy as np
import pytest
import torch
from synthetic import save_base, write_groups
from tiny import random_texts

from csplade.model import lexical
from csplade.model.encoder import SparseEncoder
from csplade.model.st_files import unsupported

QUERIES = ["aa ab ac", "ad ae", "af ag ah ai", "aa zz"]


def _encoder(factory, docs, **settings):
    encoder = factory(lexical_residual=True, **settings)
    ids = encoder.tokenizer(docs, add_special_tokens=False)["input_ids"]
    encoder.lexical = lexical.statistics(ids, encoder.vocab_size)
    return encoder


def _residual(encoder, texts, kind):
    """The residual alone: the vectors with it minus the same encoder's vectors without it."""
    with_it = encoder.encode(texts, kind, show_progress=False).toarray()
    learned_only = dataclasses.replace(encoder.config, lexical_residual=False)
    encoder.config, saved = learned_only, encoder.config
    try:
        without = encoder.encode(texts, kind, show_progress=False).toarray()
    finally:
        encoder.config = saved
    return with_it - without, without


@pytest.mark.parametrize(
    "settings",
    [
        {"variant": "uni"},
        {"variant": "echo", "doc_prefix": "passage: "},
        {"variant": "bi", "query_prefix": "query: ", "doc_prefix": "passage: "},
    ],
)
def test_the_residual_scores_are_bm25_on_the_tokens(tiny_encoder_factory, settings):
    """Query residual . document residual == scale^2 (k1 + 1) * bm25s (Lucene's IDF, no (k1 + 1))
    over the same token ids: each text counted once, its prefix and echo copy left out."""
    docs = random_texts(40, min_words=3, max_words=30, seed=3)
    scale = 0.7
    encoder = _encoder(tiny_encoder_factory, docs, lexical_scale=scale, **settings)
    q_res, q_learned = _residual(encoder, QUERIES, "query")
    d_res, _ = _residual(encoder, docs, "doc")
    assert np.abs(q_learned).sum() > 0  # the learned terms are there too, and left unchanged

    ids = encoder.tokenizer(docs, add_special_tokens=False)["input_ids"]
    retriever = bm25s.BM25(method="lucene", k1=lexical.K1, b=lexical.B)
    retriever.index([[str(t) for t in row] for row in ids], show_progress=False)
    for q, query in enumerate(QUERIES):
        tokens = encoder.tokenizer(query, add_special_tokens=False)["input_ids"]
        want = retriever.get_scores([str(t) for t in tokens]) * (lexical.K1 + 1) * scale**2
        np.testing.assert_allclose(d_res @ q_res[q], want, rtol=1e-5, atol=1e-6)


def test_documents_are_normalised_at_the_encoders_truncation(tiny_encoder_factory):
    """Cut to doc_max_length, a document's weights use its cut length and the training documents'
    mean length at that cut (not their whole length); IDF stays the whole documents'."""
    docs = random_texts(30, min_words=5, max_words=40, seed=5)
    limit = 12
    encoder = _encoder(tiny_encoder_factory, docs, doc_max_length=limit)
    d_res, _ = _residual(encoder, docs, "doc")
    ids = encoder.tokenizer(docs, add_special_tokens=False)["input_ids"]
    avgdl = np.mean([min(len(row), limit) for row in ids])
    assert encoder.lexical.avgdl(limit) == pytest.approx(avgdl)
    assert avgdl < np.mean([len(row) for row in ids])
    k1, b = lexical.K1, lexical.B
    for i, row in enumerate(ids):
        cut = row[:limit]
        want = np.zeros(encoder.vocab_size)
        for token in set(cut):
            tf = cut.count(token)
            want[token] = tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(cut) / avgdl))
        np.testing.assert_allclose(d_res[i], want, rtol=1e-5, atol=1e-6)


def test_saved_and_loaded_with_the_model(tiny_encoder_factory, tmp_path):
    docs = random_texts(20, seed=1)
    encoder = _encoder(tiny_encoder_factory, docs, lexical_scale=1.5)
    before = encoder.encode(docs, "doc", show_progress=False)
    encoder.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "lexical_weights.safetensors").exists()
    bert = tiny_encoder_factory("bert", lexical_residual=True)  # otherwise sentence-transformers'
    assert unsupported(bert) == "a lexical residual (no module adds it)"
    assert "lexical residual" in (tmp_path / "model" / "README.md").read_text()
    loaded = SparseEncoder.from_pretrained(tmp_path / "model")
    assert loaded.config.lexical_residual and loaded.config.lexical_scale == 1.5
    after = loaded.encode(docs, "doc", show_progress=False)
    np.testing.assert_allclose(after.toarray(), before.toarray(), rtol=1e-5, atol=1e-6)

    other = _encoder(tiny_encoder_factory, docs[:5], lexical_scale=1.5)
    assert other.fingerprint() != encoder.fingerprint()  # the weights are part of its identity


def test_without_weights_encoding_fails_clearly(tiny_encoder_factory):
    encoder = tiny_encoder_factory(lexical_residual=True)
    with pytest.raises(ValueError, match="no 'lexical' weights"):
        encoder.encode(["aa ab"], "doc", show_progress=False)
    with pytest.raises(ValueError, match="exclude each other"):
        tiny_encoder_factory(lexical_residual=True, doc_only=True)
    lexical_docs = tiny_encoder_factory(lexical_residual=True, lexical_docs=True)
    with pytest.raises(ValueError, match="no 'lexical' weights"):
        lexical_docs.encode(["aa ab"], "doc", show_progress=False)
    with pytest.raises(ValueError, match="documents use no head: calibrate on queries"):
        lexical_docs.calibrate_head_bias(["aa ab ac"], doc_fraction=0.1)


@pytest.mark.parametrize("analyzer", ["tokens", "words"])
def test_training_computes_the_weights_from_its_documents(tmp_path, analyzer):
    """`lexical_residual: true` in a recipe: the run computes IDF and lengths from its training
    documents (the groups' distinct texts, read by its `lexical_analyzer`) and saves them; the saved
    model encodes."""
    from csplade.training.contrastive import run_training
    from csplade.training.recipe import parse_recipe

    groups = write_groups(tmp_path / "groups.jsonl", n=40)
    base = save_base(tmp_path / "base")
    args = ["--model_name_or_path", str(base), "--train_data", str(groups),
            "--output_dir", str(tmp_path / "out"), "--per_device_train_batch_size", "4",
            "--group_size", "2", "--max_steps", "2", "--use_cpu", "true",
            "--lexical_residual", "true", "--lexical_scale", "0.5",
            "--lexical_analyzer", analyzer]  # fmt: skip
    out = run_training(*parse_recipe(None, args))
    saved = lexical.load(out)
    texts = []
    for line in groups.read_text().splitlines():
        row = json.loads(line)
        texts += [t for t in (*row["positives"], *row["negatives"]) if t not in texts]
    trained = SparseEncoder.from_pretrained(out)
    assert trained.config.lexical_analyzer == analyzer
    model_tokens = trained.tokenizer(texts, add_special_tokens=False)["input_ids"]
    want = lexical.statistics(
        lexical.analyzed_rows(trained.tokenizer, texts, analyzer), trained.vocab_size
    )
    if analyzer == "words":  # the documents hold stopwords: the two analyses differ
        assert not torch.equal(
            want.lengths, lexical.statistics(model_tokens, trained.vocab_size).lengths
        )
    assert saved.n_docs == len(texts)
    torch.testing.assert_close(saved.idf, want.idf)
    assert torch.equal(saved.lengths, want.lengths)
    batch = trained.tokenize(texts[:3], "doc")
    assert ("lexical_ids" in batch) == (analyzer == "words")
    d_res = trained.encode(texts[:3], "doc", show_progress=False).toarray()
    assert (d_res > 0).sum() > 0


# Upper-case words the tiny tokenizer does not know (its words are lower-case), and stopwords
WORD_QUERIES = ["AA Ab of ac", "AD the ae IS", "af ag AH ai", "aa zz"]
CLEAN_QUERIES = ["aa ab ac", "ad ae", "af ag ah ai", "aa zz"]  # what bm25s's analyzer keeps


@pytest.mark.parametrize("lexical_docs", [False, True])
def test_word_analyzer_residual_is_bm25_on_the_words(tiny_encoder_factory, lexical_docs):
    """lexical_analyzer 'words': the residual reads lower-cased words without English stopwords, as
    the model tokenizes them: query . document residual == (k1 + 1) * bm25s over the documents'
    words with their stopwords dropped, for upper-case queries that the model's own tokens (<unk>
    here) would not match; the learned query terms stay the model's."""
    docs = random_texts(40, min_words=3, max_words=30, seed=3)
    assert any(" is " in f" {doc} " for doc in docs)  # stopwords the analysis must drop
    encoder = tiny_encoder_factory(lexical_residual=True, lexical_analyzer="words", variant="bi",
                                   query_prefix="query: ", lexical_docs=lexical_docs)  # fmt: skip
    tok = encoder.tokenizer
    encoder.lexical = lexical.statistics(lexical.analyzed_rows(tok, docs, "words"), len(tok))
    assert lexical.analyzed_rows(tok, WORD_QUERIES, "words") == [
        tok(q, add_special_tokens=False)["input_ids"] for q in CLEAN_QUERIES
    ]
    unk = tok.unk_token_id
    assert unk in tok("AA Ab", add_special_tokens=False)["input_ids"]  # the model's tokens miss
    queries = encoder.encode(WORD_QUERIES, "query", show_progress=False).toarray()
    learned_only = dataclasses.replace(
        encoder.config, lexical_residual=False, lexical_docs=False, lexical_analyzer="tokens"
    )
    encoder.config, saved = learned_only, encoder.config
    try:
        q_learned = encoder.encode(WORD_QUERIES, "query", show_progress=False).toarray()
        d_learned = encoder.encode(docs, "doc", show_progress=False).toarray()
    finally:
        encoder.config = saved
    assert np.abs(q_learned).sum() > 0
    q_res = queries - q_learned
    d_vectors = encoder.encode(docs, "doc", show_progress=False).toarray()
    d_res = d_vectors if lexical_docs else d_vectors - d_learned

    words = [[w for w in doc.split() if w not in {"an", "as", "at", "be", "by", "if", "in", "is",
                                                  "it"}] for doc in docs]  # fmt: skip
    retriever = bm25s.BM25(method="lucene", k1=lexical.K1, b=lexical.B)
    retriever.index(words, show_progress=False)
    for q, query in enumerate(CLEAN_QUERIES):
        want = retriever.get_scores(query.split()) * (lexical.K1 + 1)
        np.testing.assert_allclose(d_res @ q_res[q], want, rtol=1e-5, atol=1e-6)
    assert (d_res @ q_res[0]).max() > 0


def test_word_analyzers_on_a_real_tokenizer(prepared):
    """On SmolLM2's cased BPE tokenizer: 'words' gives a text's first word the id it has inside a
    text (with its leading space) and lower-cases it; 'stems' also stems; 'tokens' is the model's own
    tokenization; a text of stopwords alone reads as nothing."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(prepared("smollm2-135m"))

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    query = "Breast Cancer Cells Feed on Cholesterol"
    document = "tumours of the breast feed on cholesterol"
    assert lexical.analyzed_rows(tok, [query], "tokens") == [ids(query)]
    (words,) = lexical.analyzed_rows(tok, [query], "words")
    assert words == ids(" breast cancer cells feed cholesterol")
    assert ids(query)[0] not in ids(document)  # "Breast" opening a text: not the document's id
    assert words[0] in ids(document)
    assert lexical.analyzed_rows(tok, ["The Studies of Breast-Cancer cells!", "of the", ""],
                                 "stems") == [ids(" studi breast cancer cell"), [], []]  # fmt: skip
    with pytest.raises(ValueError, match="lexical_analyzer must be one of"):
        lexical.analyzed_rows(tok, [query], "porter")


def test_lexical_analyzer_settings_fail_clearly(tiny_encoder_factory):
    with pytest.raises(ValueError, match="lexical_analyzer 'words' needs lexical_residual"):
        tiny_encoder_factory(lexical_analyzer="words")
    with pytest.raises(ValueError, match="lexical_analyzer"):
        tiny_encoder_factory(lexical_residual=True, lexical_analyzer="porter")


def _one_step_with_residual(tmp_path, *extra: str):
    """One full-weight training step with the lexical residual and FLOPS on both sides (from the
    first step), on 8 synthetic groups; `extra` adds recipe overrides. Returns (base, output)."""
    from csplade.training.contrastive import run_training
    from csplade.training.recipe import parse_recipe

    groups = write_groups(tmp_path / "groups.jsonl", n=8)
    base = save_base(tmp_path / "base")
    args = ["--model_name_or_path", str(base), "--train_data", str(groups),
            "--output_dir", str(tmp_path / "out"), "--per_device_train_batch_size", "4",
            "--max_steps", "1", "--use_cpu", "true", "--use_lora", "false",
            "--lexical_residual", "true", "--lambda_q", "1e-3", "--lambda_d", "1e-3",
            "--reg_warmup_steps", "0", *extra]  # fmt: skip
    return base, run_training(*parse_recipe(None, args))


@pytest.mark.parametrize("analyzer", ["tokens", "words"])
def test_training_regularizes_the_learned_terms_only(tmp_path, monkeypatch, analyzer):
    """FLOPS in training sees the learned terms alone: what it is given equals the same model's
    vectors with the residual off, on the same batch (the residual is fixed BM25; counting it would
    press hardest on the learned weights of a text's own tokens), whichever tokens it reads."""
    from csplade.training.contrastive import SparseTrainer
    from csplade.training.losses import regularization

    seen = {}
    original_loss, original_reg = SparseTrainer.compute_loss, regularization.regularize

    def capture_loss(self, model, inputs, *args, **kwargs):
        seen.setdefault("inputs", inputs)
        return original_loss(self, model, inputs, *args, **kwargs)

    def capture_reg(reps, kind, **kwargs):
        seen.setdefault("reps", []).append(reps.detach().clone())
        return original_reg(reps, kind, **kwargs)

    monkeypatch.setattr(SparseTrainer, "compute_loss", capture_loss)
    monkeypatch.setattr(regularization, "regularize", capture_reg)
    base, _ = _one_step_with_residual(tmp_path, "--group_size", "2", "--lexical_analyzer", analyzer)
    q_reg, d_reg = seen["reps"][:2]
    reference = SparseEncoder.from_pretrained(base)  # the weights of the first step's forward
    reference.config = dataclasses.replace(
        reference.config, lexical_residual=False, lexical_analyzer="tokens"
    )
    reference.eval()
    with torch.no_grad():
        for batch, got in ((seen["inputs"]["query"], q_reg), (seen["inputs"]["doc"], d_reg)):
            assert ("lexical_ids" in batch) == (analyzer == "words")
            plain = {k: v for k, v in batch.items() if k not in ("lexical", "lexical_ids")}
            want = reference(**plain)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            full = lexical.batch_residual(batch, got.shape[1])
            assert (full > 0).sum() > 0  # there was a residual to leave out


def test_lexical_docs_are_their_residual_and_run_no_forward(tiny_encoder_factory, monkeypatch):
    """`lexical_docs`: a document's vector is exactly its residual and encoding documents never
    reaches the backbone; queries are what the same model gives them without the setting."""
    docs = random_texts(30, min_words=3, max_words=30, seed=5)
    encoder = _encoder(tiny_encoder_factory, docs, variant="bi", query_prefix="query: ")
    d_res, _ = _residual(encoder, docs, "doc")
    queries_before = encoder.encode(QUERIES, "query", show_progress=False).toarray()
    encoder.config = dataclasses.replace(encoder.config, lexical_docs=True)

    def no_forward(*args, **kwargs):
        raise AssertionError("a lexical_docs document ran the backbone")

    with monkeypatch.context() as patch:
        patch.setattr(encoder, "_learned_terms", no_forward)
        got = encoder.encode(docs, "doc", show_progress=False).toarray()
        with torch.no_grad():
            batch = encoder.tokenize(docs[:4], "doc")
            batch.pop("n_truncated")
            _, d_reps = encoder(doc=batch)
    np.testing.assert_allclose(got, d_res, atol=1e-5)
    np.testing.assert_allclose(d_reps.numpy(), d_res[:4], atol=1e-5)
    assert (got > 0).sum(axis=1).min() > 0
    queries_after = encoder.encode(QUERIES, "query", show_progress=False).toarray()
    np.testing.assert_allclose(queries_after, queries_before, atol=1e-6)
    with pytest.raises(ValueError, match="lexical_docs needs lexical_residual"):
        tiny_encoder_factory(lexical_docs=True)


def test_training_with_lexical_docs_learns_the_queries_only(tmp_path, monkeypatch):
    """A `lexical_docs` run: the loss is given the documents' residual (no gradient path), FLOPS is
    not asked for documents, the head bias is calibrated on queries alone, and the setting is saved."""
    from csplade.model.head import calibration
    from csplade.training.contrastive import SparseTrainer
    from csplade.training.losses import regularization

    seen = {"kinds": [], "reg": 0}
    original_loss, original_reg = SparseTrainer.compute_loss, regularization.regularize
    original_quantile = calibration._quantile

    def capture_loss(self, model, inputs, *args, **kwargs):
        if "doc" not in seen:
            seen["doc"] = inputs["doc"]
            seen["d_reps"] = model(doc=inputs["doc"])[1]
        return original_loss(self, model, inputs, *args, **kwargs)

    def capture_reg(reps, kind, **kwargs):
        seen["reg"] += 1
        return original_reg(reps, kind, **kwargs)

    def capture_quantile(encoder, texts, kind, *args, **kwargs):
        seen["kinds"].append(kind)
        return original_quantile(encoder, texts, kind, *args, **kwargs)

    monkeypatch.setattr(SparseTrainer, "compute_loss", capture_loss)
    monkeypatch.setattr(regularization, "regularize", capture_reg)
    monkeypatch.setattr(calibration, "_quantile", capture_quantile)
    _, out = _one_step_with_residual(
        tmp_path, "--group_size", "3", "--lexical_docs", "true", "--head_bias_df", "0.2"
    )
    batch = seen["doc"]
    want = lexical.residual(batch["input_ids"], batch["lexical"], seen["d_reps"].shape[1])
    torch.testing.assert_close(seen["d_reps"], want)
    assert not seen["d_reps"].requires_grad
    assert seen["reg"] == 1  # the queries' FLOPS only
    assert seen["kinds"] == ["query"]
    trained = SparseEncoder.from_pretrained(out)
    assert trained.config.lexical_docs and trained.head_bias is not None
    assert unsupported(trained) is not None


@pytest.mark.parametrize("kind", ["query", "doc"])
def test_learned_top_k_caps_the_learned_terms_not_the_residual(tiny_encoder_factory, kind):
    """`learned_top_k`: each text keeps its k largest learned terms (those of the same model
    without the cap); the residual is added whole after the cap."""
    docs = random_texts(30, min_words=3, max_words=30, seed=7)
    texts = QUERIES if kind == "query" else docs[:6]
    encoder = _encoder(tiny_encoder_factory, docs, variant="bi")
    residual, learned = _residual(encoder, texts, kind)
    k = 4
    assert (learned > 0).sum(axis=1).min() > k  # the cap has something to cut
    want = np.zeros_like(learned)
    for i, row in enumerate(learned):
        top = np.argsort(-row, kind="stable")[:k]
        want[i, top] = row[top]
    encoder.config = dataclasses.replace(encoder.config, learned_top_k=k)
    got = encoder.encode(texts, kind, show_progress=False).toarray()
    np.testing.assert_allclose(got, want + residual, atol=1e-5)
    with pytest.raises(ValueError, match="learned_top_k must be a positive integer"):
        tiny_encoder_factory(learned_top_k=0)


def test_eval_can_reestimate_the_lexical_statistics_on_each_corpus(tiny_encoder_factory, tmp_path):
    """`csplade eval --lexical-stats collection`: a lexical-docs model's residual takes the IDF and
    lengths of the corpus it indexes (its run equals the same model saved with that corpus's
    statistics), not those saved with it (another run); the saved model is left as it was, and a
    model without a residual is unaffected."""
    from beir_folder import write_beir

    from csplade.data.beir import load_beir
    from csplade.evaluation.beir_eval import SystemSpec, evaluate
    from csplade.index import read_trec_run

    corpus = random_texts(60, min_words=3, max_words=30, seed=11)
    queries = {f"q{i}": " ".join(corpus[i].split()[:3]) for i in range(12)}
    folder = write_beir(tmp_path / "data", {f"d{i}": ("", t) for i, t in enumerate(corpus)},
                        queries, [(f"q{i}", f"d{i}", 1) for i in range(12)], split="test")  # fmt: skip
    doc_texts = load_beir(folder, split="test").doc_texts
    encoder = tiny_encoder_factory(lexical_residual=True, lexical_docs=True, lexical_analyzer="words",
                                   variant="bi", query_prefix="query: ")  # fmt: skip
    training_docs = random_texts(200, min_words=3, max_words=8, seed=12)
    encoder.lexical = lexical.statistics(encoder.lexical_rows(training_docs), encoder.vocab_size)
    encoder.save_pretrained(tmp_path / "trained")
    saved_idf = encoder.lexical.idf.clone()
    before = encoder.fingerprint()
    encoder.fit_lexical(doc_texts)
    assert encoder.fingerprint() != before  # an index's identity follows the statistics
    encoder.save_pretrained(tmp_path / "fitted")
    tiny_encoder_factory().save_pretrained(tmp_path / "plain")

    def run(name: str, model: str, stats: str) -> dict:
        # one folder: an index cached under the saved statistics must not be reused
        out = tmp_path / "out"
        evaluate([SystemSpec(name, str(tmp_path / model))], [str(folder)], out, k=20,
                 latency_queries=0, lexical_stats=stats)  # fmt: skip
        return read_trec_run(out / "data" / f"{name}.trec")

    kept = run("trained", "trained", "model")
    refit = run("trained", "trained", "collection")
    fitted = run("fitted", "fitted", "model")
    assert refit.keys() == fitted.keys() == set(queries)
    for q in queries:
        assert list(refit[q]) == list(fitted[q])
        np.testing.assert_allclose(list(refit[q].values()), list(fitted[q].values()), rtol=1e-5)
    assert any(list(refit[q].items())[:5] != list(kept[q].items())[:5] for q in queries)
    assert torch.equal(lexical.load(tmp_path / "trained").idf, saved_idf)
    assert run("plain-c", "plain", "collection") == run("plain-m", "plain", "model")
    with pytest.raises(ValueError, match="lexical_stats must be one of"):
        evaluate([], [str(folder)], tmp_path / "x", lexical_stats="corpus")
    with pytest.raises(ValueError, match="no lexical residual"):
        tiny_encoder_factory().fit_lexical(doc_texts)


def test_encode_then_search_with_collection_statistics_equals_eval(tiny_encoder_factory, tmp_path):
    """`csplade encode --lexical-stats collection` stores the corpus's lexical statistics with the
    index and `csplade search` reads them back: the run equals `csplade eval --lexical-stats
    collection`'s, and differs from an index built with the statistics saved with the model."""
    from beir_folder import write_beir

    from csplade.cli import main
    from csplade.evaluation.beir_eval import EvalOptions, SystemSpec, evaluate
    from csplade.index import read_manifest, read_trec_run

    corpus = random_texts(60, min_words=3, max_words=30, seed=21)
    queries = {f"q{i}": " ".join(corpus[i].split()[:3]) for i in range(12)}
    folder = write_beir(tmp_path / "data", {f"d{i}": ("", t) for i, t in enumerate(corpus)},
                        queries, [(f"q{i}", f"d{i}", 1) for i in range(12)], split="test")  # fmt: skip
    encoder = tiny_encoder_factory(lexical_residual=True, lexical_analyzer="words", variant="bi",
                                   query_prefix="query: ")  # fmt: skip
    training_docs = random_texts(200, min_words=3, max_words=8, seed=22)
    encoder.lexical = lexical.statistics(encoder.lexical_rows(training_docs), encoder.vocab_size)
    model = tmp_path / "model"
    encoder.save_pretrained(model)

    def encode_and_search(name: str, *flags: str) -> dict:
        index, run = tmp_path / f"index-{name}", tmp_path / f"{name}.trec"
        assert main(["encode", "--model", str(model), "--corpus", str(folder), "--out", str(index),
                     *flags]) == 0  # fmt: skip
        assert main(["search", "--index", str(index), "--queries", str(folder / "queries.jsonl"),
                     "--out", str(run), "--k", "20"]) == 0  # fmt: skip
        return index, read_trec_run(run)

    index, searched = encode_and_search("collection", "--lexical-stats", "collection")
    assert read_manifest(index)["settings"]["describe"]["lexical_stats"] == "collection"
    assert not torch.equal(lexical.load(index).idf, encoder.lexical.idf)
    options = EvalOptions(k=20, latency_queries=0, lexical_stats="collection")
    evaluate([SystemSpec("model", str(model))], [str(folder)], tmp_path / "eval", options)
    evaluated = read_trec_run(tmp_path / "eval" / "data" / "model.trec")
    assert searched.keys() == evaluated.keys() == set(queries)
    for q in queries:
        assert list(searched[q]) == list(evaluated[q])
        np.testing.assert_allclose(
            list(searched[q].values()), list(evaluated[q].values()), rtol=1e-6
        )
    index_model, kept = encode_and_search("model")
    assert "lexical_stats" not in read_manifest(index_model)["settings"]["describe"]
    assert any(list(kept[q].items())[:5] != list(searched[q].items())[:5] for q in queries)


def test_eval_own_vectors_ranks_the_model_without_its_residual(tiny_encoder_factory, tmp_path):
    """`csplade eval --own-vectors`: beside a model with a lexical residual, NAME-own is the same
    model with the residual off on both sides (its run equals that model saved so); a baseline and
    a model without a residual get no extra row; the own row stays out of the model card."""
    from beir_folder import write_beir

    from csplade.cli import main
    from csplade.evaluation.beir_eval import SystemSpec, evaluate, with_own_vectors

    corpus = random_texts(40, min_words=3, max_words=20, seed=5)
    queries = {f"q{i}": " ".join(corpus[i].split()[:3]) for i in range(8)}
    folder = write_beir(tmp_path / "data", {f"d{i}": ("", t) for i, t in enumerate(corpus)},
                        queries, [(f"q{i}", f"d{i}", 1) for i in range(8)], split="test")  # fmt: skip
    encoder = tiny_encoder_factory(lexical_residual=True, lexical_docs=True, variant="bi",
                                   lexical_analyzer="words")  # fmt: skip
    encoder.lexical = lexical.statistics(encoder.lexical_rows(corpus), encoder.vocab_size)
    encoder.save_pretrained(tmp_path / "hybrid")
    encoder.config = dataclasses.replace(encoder.config, lexical_residual=False, lexical_docs=False,
                                         lexical_analyzer="tokens")  # fmt: skip
    encoder.save_pretrained(tmp_path / "learned")
    tiny_encoder_factory().save_pretrained(tmp_path / "plain")

    systems = with_own_vectors([SystemSpec.parse(str(tmp_path / m)) for m in ("hybrid", "plain")]
                               + [SystemSpec.parse("bm25")])  # fmt: skip
    assert [s.name for s in systems] == ["hybrid", "hybrid-own", "plain", "bm25"]
    out = tmp_path / "out"
    code = main(["eval", "--model", str(tmp_path / "hybrid"), "--model", str(tmp_path / "learned"),
                 "--datasets", str(folder), "--baseline", "bm25", "--own-vectors", "--k", "20",
                 "--latency-queries", "0", "--doc-max-length", "8", "--out", str(out)])  # fmt: skip
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"hybrid", "hybrid-own", "learned", "bm25"}
    for length in (8, None):  # --doc-max-length reaches every model, the own row's too
        evaluate([SystemSpec("learned", str(tmp_path / "learned"))], [str(folder)],
                 tmp_path / f"ref-{length}", k=20, latency_queries=0,
                 encoder_overrides={"doc_max_length": length} if length else None)  # fmt: skip
    want = json.loads((tmp_path / "ref-8" / "metrics.json").read_text())["learned"]
    assert metrics["hybrid-own"] == metrics["learned"] == want
    uncut = json.loads((tmp_path / "ref-None" / "metrics.json").read_text())["learned"]
    assert uncut != want
    assert metrics["hybrid-own"] != metrics["hybrid"]
    card = json.loads((tmp_path / "hybrid" / "csplade_eval.json").read_text())
    assert "own" not in json.dumps(card)
