"""SparseEncoder: tokenization and pooling masks, variants, encoding, persistence, bad input."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from tiny import CAUSAL_ARCHS, random_texts, tiny_model, tiny_tokenizer

from csplade.model import SparseEncoder, SparseEncoderConfig
from csplade.model.head import naive_max_pool
from csplade.model.head.pruning import prune

TEXTS = ["aa ab ac ad", "ba bb", "ca cb cc cd ce cf cg ch", "", "da"]


def dense(m: sp.csr_matrix) -> np.ndarray:
    return np.asarray(m.todense())


@pytest.mark.parametrize("arch", CAUSAL_ARCHS + ("bert",))
def test_encode_shape_dtype_and_nonneg(tiny_encoder_factory, arch):
    enc = tiny_encoder_factory(arch)
    out = enc.encode_docs(TEXTS, show_progress=False)
    assert sp.isspmatrix_csr(out) and out.dtype == np.float32
    assert out.shape == (len(TEXTS), enc.vocab_size)
    assert (out.data >= 0).all()
    assert out[0].nnz > 0
    assert out[3].nnz == 0  # empty text: a zero row, not a crash


def test_empty_list_gives_empty_matrix(tiny_encoder_factory):
    enc = tiny_encoder_factory()
    out = enc.encode_queries([], show_progress=False)
    assert out.shape == (0, enc.vocab_size)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "bert"])
@pytest.mark.parametrize("variant", ["uni", "echo", "bi"])
def test_padding_never_changes_a_vector(tiny_encoder_factory, arch, variant):
    """Each text encoded alone equals it encoded in a padded batch next to longer texts."""
    if arch == "bert" and variant == "bi":
        pytest.skip("bi is for causal backbones")
    enc = tiny_encoder_factory(arch, variant=variant)
    texts = random_texts(7, 1, 15, seed=3)
    batched = dense(enc.encode_docs(texts, batch_size=7, show_progress=False))
    for i, text in enumerate(texts):
        alone = dense(enc.encode_docs([text], show_progress=False))[0]
        np.testing.assert_allclose(batched[i], alone, rtol=1e-5, atol=1e-6)


def test_padding_never_wins_max_pooling(tiny_encoder_factory):
    """Forcing huge logits at padded positions leaves the pooled vectors unchanged."""
    enc = tiny_encoder_factory("llama")
    batch = enc.tokenize(["aa ab", "ba bb bc bd be bf"], kind="doc")
    batch.pop("n_truncated")
    with torch.no_grad():
        ref = enc(**batch)
        # Padding tokens are fed as <pad>; give that token an enormous output row so that if any padded
        # position were pooled, its logit would dominate.
        head = enc.base_model.get_output_embeddings()
        pad = enc._pad_id
        hidden, _ = enc._hidden_states(batch["input_ids"], batch["attention_mask"])
        assert (batch["attention_mask"][0] == 0).any()
        emb_before = head.weight.clone()
        head.weight[pad] = hidden[0][batch["attention_mask"][0] == 0].mean(0) * 1e3
        out = enc(**batch)
        head.weight.copy_(emb_before)
    assert torch.equal(out[:, :pad], ref[:, :pad]) and torch.equal(
        out[:, pad + 1 :], ref[:, pad + 1 :]
    )


def test_echo_pools_exactly_the_second_copy(tiny_encoder_factory):
    enc = tiny_encoder_factory("llama", variant="echo")
    text = "aa ab ac"
    ids = enc._tokenize_plain(text)
    batch = enc.tokenize([text, "ba"], kind="doc")
    seq = batch["input_ids"][0].tolist()
    pool = batch["pool_mask"][0].tolist()
    n = len(ids)
    assert (
        seq[:n] == ids and seq[n : 2 * n] == ids
    )  # text, then its copy (tiny tokenizer: no specials)
    assert pool[: 2 * n] == [False] * n + [True] * n
    assert not any(pool[2 * n :])
    # the encoder's vector is the naive max over exactly those positions
    with torch.no_grad():
        hidden, head = enc._hidden_states(batch["input_ids"], batch["attention_mask"])
        expect = naive_max_pool(hidden, head.weight, batch["pool_mask"])
        got = enc(batch["input_ids"], batch["attention_mask"], batch["pool_mask"])
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)
    second_only = torch.zeros_like(batch["pool_mask"])
    second_only[0, n : 2 * n] = True
    second_only[1] = batch["pool_mask"][1]
    assert torch.equal(batch["pool_mask"], second_only)


def test_echo_first_copy_influences_second_copy(tiny_encoder_factory):
    """Under echo the pooled copy has seen the whole text: changing the last word changes every weight."""
    enc = tiny_encoder_factory("llama", variant="echo")
    a, b = dense(enc.encode_docs(["aa ab ac", "aa ab ad"], show_progress=False))
    uni = tiny_encoder_factory("llama")
    # Under uni the first token's contribution is the same for both texts; under echo it differs.
    batch = enc.tokenize(["aa ab ac", "aa ab ad"], kind="doc")
    with torch.no_grad():
        h_echo, _ = enc._hidden_states(batch["input_ids"], batch["attention_mask"])
        ub = uni.tokenize(["aa ab ac", "aa ab ad"], kind="doc")
        h_uni, _ = uni._hidden_states(ub["input_ids"], ub["attention_mask"])
    assert torch.allclose(h_uni[0, 0], h_uni[1, 0])
    assert not torch.allclose(h_echo[0, 3], h_echo[1, 3])  # first pooled position of the copy
    assert not np.allclose(a, b)


def test_special_tokens_and_prefix_pooling():
    tok = tiny_tokenizer(bert_style=True)
    mlm = SparseEncoder(tiny_model("bert"), tok, SparseEncoderConfig(query_prefix="aa"))
    batch = mlm.tokenize(["ba bb"], kind="query")
    # [CLS] aa ba bb [SEP]: MLM default pools specials (classic SPLADE) and the prefix
    assert batch["pool_mask"][0].tolist() == [True] * 5
    causal = SparseEncoder(
        tiny_model("llama"), tiny_tokenizer(), SparseEncoderConfig(query_prefix="aa")
    )
    batch = causal.tokenize(["ba bb"], kind="query")
    assert (
        batch["input_ids"][0].tolist()[0] == causal._tokenize_plain(causal.config.query_prefix)[0]
    )
    assert batch["pool_mask"][0].tolist() == [False, True, True]  # the prefix is not pooled


def test_truncation_is_counted_and_logged_once(tiny_encoder_factory, caplog):
    enc = tiny_encoder_factory("llama", doc_max_length=4)
    texts = ["aa ab ac ad ae af", "ba", "ca cb cc cd ce"]
    with caplog.at_level(logging.INFO, logger="csplade.model.encoder"):
        enc.encode_docs(texts, batch_size=1, show_progress=False)
    lines = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert lines == ["2 of 3 docs were longer than 4 tokens and truncated"]
    batch = enc.tokenize(texts, kind="doc")
    assert batch["input_ids"].shape[1] == 4 and int(batch["n_truncated"]) == 2


WINDOW_WORDS = "aa ab ac ad ae af ag ah ai aj ak".split()
WINDOW_TEXTS = [" ".join(WINDOW_WORDS[:n]) for n in (11, 1, 4, 5, 8, 0, 9)]


def _windows_alone(plain, text: str, size: int, most: int, reduce) -> np.ndarray:
    """A text's windows of `size` words (the tiny tokenizer: a word is a token), at most `most`,
    each encoded as a whole document by `plain`, pooled by `reduce`."""
    words = text.split()
    parts = [" ".join(words[s : s + size]) for s in range(0, len(words), size)][:most] or [text]
    return reduce(dense(plain.encode_docs(parts, show_progress=False)), axis=0)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "bert"])
@pytest.mark.parametrize("variant", ["uni", "echo", "bi"])
def test_a_document_in_windows_pools_its_windows_encoded_alone(tiny_encoder_factory, arch, variant):
    """doc_windows: each window is encoded as the document of its tokens alone (with the prefix and
    specials a document gets) and the windows are max-pooled; a text within one window keeps its
    vector; windows past doc_windows are cut and counted."""
    if arch == "bert" and variant == "bi":
        pytest.skip("bi is for causal backbones")
    settings = {"variant": variant, "doc_max_length": 4, "doc_prefix": "aa"}
    plain = tiny_encoder_factory(arch, **settings)
    windowed = tiny_encoder_factory(arch, doc_windows=2, **settings)
    got = dense(windowed.encode_docs(WINDOW_TEXTS, batch_size=3, show_progress=False))
    for i, text in enumerate(WINDOW_TEXTS):
        want = _windows_alone(plain, text, 4, 2, np.max)
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6, err_msg=text)
    within = [i for i, t in enumerate(WINDOW_TEXTS) if len(t.split()) <= 4]
    cut = dense(plain.encode_docs(WINDOW_TEXTS, show_progress=False))
    np.testing.assert_allclose(got[within], cut[within], rtol=1e-5, atol=1e-6)
    assert (got[0] > cut[0] + 1e-4).any()  # the second window adds to the first one's vector


def test_windows_pool_as_tokens_do_and_prune_after_pooling(tiny_encoder_factory, caplog):
    summed = tiny_encoder_factory("llama", doc_max_length=4, doc_windows=3, pooling="sum")
    plain = tiny_encoder_factory("llama", doc_max_length=4, pooling="sum")
    got = dense(summed.encode_docs(WINDOW_TEXTS, show_progress=False))
    for i, text in enumerate(WINDOW_TEXTS):
        want = _windows_alone(plain, text, 4, 3, np.sum)
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-5, err_msg=text)

    windowed = tiny_encoder_factory("llama", doc_max_length=4, doc_windows=2)
    with caplog.at_level(logging.INFO, logger="csplade.model.encoder"):
        full = dense(windowed.encode_docs(WINDOW_TEXTS, show_progress=False))
    lines = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert lines == ["2 of 7 docs were longer than 8 tokens and truncated"]  # 11 and 9 words
    top = dense(windowed.encode_docs(WINDOW_TEXTS, top_k=3, show_progress=False))
    want = dense(sp.csr_matrix(prune(torch.from_numpy(full), 3, None).numpy()))
    np.testing.assert_allclose(top, want, rtol=1e-6)
    assert (np.count_nonzero(full, axis=1) > 3).any()  # the cap cut something
    # queries are never read in windows
    queries = tiny_encoder_factory("llama", query_max_length=4, doc_windows=2)
    q = dense(queries.encode_queries(WINDOW_TEXTS, show_progress=False))
    q_cut = dense(tiny_encoder_factory("llama", query_max_length=4).encode_queries(
        WINDOW_TEXTS, show_progress=False))  # fmt: skip
    np.testing.assert_allclose(q, q_cut, rtol=1e-6)


def test_doc_windows_settings_are_checked():
    with pytest.raises(ValueError, match="doc_windows must be a positive integer, got 0"):
        SparseEncoderConfig(doc_windows=0)
    with pytest.raises(ValueError, match="doc_windows > 1 and lexical_residual exclude"):
        SparseEncoderConfig(doc_windows=2, lexical_residual=True)


def test_fused_and_naive_heads_give_the_same_vectors(tiny_encoder_factory):
    texts = random_texts(6, seed=1)
    fused = dense(tiny_encoder_factory("qwen3").encode_docs(texts, show_progress=False))
    naive = dense(
        tiny_encoder_factory("qwen3", fused_head=False).encode_docs(texts, show_progress=False)
    )
    np.testing.assert_allclose(fused, naive, rtol=1e-5, atol=1e-6)


def test_sum_pooling_is_at_least_max_pooling(tiny_encoder_factory):
    texts = random_texts(4, seed=2)
    mx = dense(tiny_encoder_factory("llama").encode_docs(texts, show_progress=False))
    sm = dense(tiny_encoder_factory("llama", pooling="sum").encode_docs(texts, show_progress=False))
    assert (sm >= mx - 1e-6).all() and (sm > mx + 1e-4).any()


def test_pruning_and_to_tokens(tiny_encoder_factory):
    enc = tiny_encoder_factory("llama")
    out = enc.encode_docs(TEXTS, top_k=5, show_progress=False)
    assert max(out[i].nnz for i in range(out.shape[0])) <= 5
    tokens = enc.to_tokens(out[0])
    assert len(tokens) == out[0].nnz and list(tokens.values()) == sorted(
        tokens.values(), reverse=True
    )
    thr = enc.encode_docs(TEXTS, threshold=0.5, show_progress=False)
    assert thr.data.min() >= 0.5


def test_bad_input_errors(tiny_encoder_factory, tmp_path):
    enc = tiny_encoder_factory("llama")
    with pytest.raises(TypeError, match=r"texts\[1\] is NoneType"):
        enc.encode_docs(["aa", None], show_progress=False)
    with pytest.raises(TypeError, match=r"texts\[0\] is int"):
        enc.encode_queries([3], show_progress=False)
    with pytest.raises(TypeError, match="single str"):
        enc.encode_queries("aa ab", show_progress=False)
    with pytest.raises(ValueError, match="allowed: uni, echo, bi"):
        SparseEncoderConfig(variant="bidir")
    with pytest.raises(ValueError, match="allowed: max, sum"):
        SparseEncoderConfig(pooling="mean")
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        SparseEncoder.from_pretrained(missing)
    with pytest.raises(ValueError, match="unknown encoder setting"):
        SparseEncoderConfig().with_overrides(varient="bi")


def _save_tiny_backbone(tmp_path, arch="llama"):
    folder = tmp_path / f"tiny-{arch}"
    tiny_model(arch).save_pretrained(folder)
    tiny_tokenizer(bert_style=arch == "bert").save_pretrained(folder)
    return folder


@pytest.mark.parametrize("variant", ["uni", "echo", "bi"])
def test_save_load_roundtrip(tmp_path, variant):
    base = _save_tiny_backbone(tmp_path)
    enc = SparseEncoder.from_pretrained(
        base, variant=variant, query_prefix="ab", doc_max_length=9, pooling="max"
    )
    enc.query_weights = None
    texts = random_texts(5, seed=4)
    before_d = dense(enc.encode_docs(texts, show_progress=False))
    before_q = dense(enc.encode_queries(texts, show_progress=False))
    enc.save_pretrained(tmp_path / "saved")
    again = SparseEncoder.from_pretrained(tmp_path / "saved")
    assert again.config == enc.config
    np.testing.assert_array_equal(dense(again.encode_docs(texts, show_progress=False)), before_d)
    np.testing.assert_array_equal(dense(again.encode_queries(texts, show_progress=False)), before_q)


def test_save_load_roundtrip_with_lora_adapter(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = _save_tiny_backbone(tmp_path)
    enc = SparseEncoder.from_pretrained(base, variant="bi")
    enc.backbone = get_peft_model(
        enc.backbone, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    texts = random_texts(5, seed=5)
    before = dense(enc.encode_docs(texts, show_progress=False))
    plain = dense(
        SparseEncoder.from_pretrained(base, variant="bi").encode_docs(texts, show_progress=False)
    )
    assert not np.allclose(before, plain)  # the adapter does change the vectors
    enc.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    again = SparseEncoder.from_pretrained(tmp_path / "adapter")
    assert again.is_adapter and again.config.variant == "bi"
    np.testing.assert_allclose(
        dense(again.encode_docs(texts, show_progress=False)), before, rtol=1e-6
    )


def test_doc_only_queries_skip_the_backbone(tmp_path):
    base = _save_tiny_backbone(tmp_path)
    enc = SparseEncoder.from_pretrained(base, doc_only=True)
    weights = torch.rand(enc.vocab_size) + 0.5
    enc.query_weights = weights

    def boom(*args, **kwargs):
        raise AssertionError("the backbone ran for a doc-only query")

    enc.backbone.forward = boom
    enc.backbone.model.forward = boom
    q = enc.encode_queries(["aa ab aa", ""], show_progress=False)
    ids = enc._tokenize_plain("aa ab")
    assert sorted(q[0].indices.tolist()) == sorted(ids)
    np.testing.assert_allclose(q[0].data, weights[q[0].indices].numpy(), rtol=1e-6)
    assert q[1].nnz == 0
    enc.save_pretrained(tmp_path / "if")
    again = SparseEncoder.from_pretrained(tmp_path / "if")
    assert torch.equal(again.query_weights, weights)


def test_mlm_rejects_bi():
    with pytest.raises(ValueError, match="already bidirectional"):
        SparseEncoder(
            tiny_model("bert"), tiny_tokenizer(bert_style=True), SparseEncoderConfig(variant="bi")
        )


@pytest.mark.slow
def test_splade_tiny_matches_sentence_transformers(prepared):
    """Peer cross-check: csplade's vectors for splade-tiny equal sentence-transformers' SparseEncoder."""
    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers.sparse_encoder.models import MLMTransformer, SpladePooling

    path = prepared("splade-tiny")
    texts = [
        "what causes aging of the immune system",
        "Vitamin D deficiency is associated with multiple sclerosis.",
        "a",
        "The quick brown fox jumps over the lazy dog " * 8,
    ]
    peer = st.SparseEncoder(
        modules=[MLMTransformer(str(path), max_seq_length=64), SpladePooling("max")], device="cpu"
    )
    theirs = peer.encode(texts, convert_to_tensor=True).to_dense().numpy()
    # 64 = 62 text tokens + [CLS] + [SEP]
    ours = SparseEncoder.from_pretrained(path, doc_max_length=62).encode_docs(
        texts, show_progress=False
    )
    np.testing.assert_allclose(dense(ours), theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_smollm2_query_vector_carries_its_own_tokens(prepared):
    enc = SparseEncoder.from_pretrained(prepared("smollm2-135m"), variant="uni")
    query = "vitamin deficiency and multiple sclerosis"
    vec = enc.encode_queries([query], show_progress=False)
    assert 0 < vec.nnz < enc.vocab_size
    own = set(enc._tokenize_plain(query))
    weights = dense(vec)[0]
    own_w = [weights[i] for i in own]
    assert sum(w > 0 for w in own_w) >= len(own) // 2
    # the query's own tokens sit well above the median non-zero weight
    assert np.median(own_w) > np.median(vec.data)


def test_head_bias_calibration_sets_each_terms_document_frequency(tmp_path):
    base = _save_tiny_backbone(tmp_path)
    enc = SparseEncoder.from_pretrained(base)
    texts = random_texts(200, 4, 10, seed=11)
    dense_before = dense(enc.encode_docs(texts, show_progress=False))
    enc.calibrate_head_bias(texts, doc_fraction=0.05)
    after = dense(enc.encode_docs(texts, show_progress=False))
    df = (after > 0).mean(axis=0)  # fraction of texts in which each term fires
    assert abs(df.mean() - 0.05) < 0.01, df.mean()
    assert (after > 0).sum(1).mean() < (dense_before > 0).sum(1).mean()
    raw = enc.raw_max_logits(texts[:3]).numpy()
    np.testing.assert_allclose(
        np.log1p(np.maximum(raw + enc.head_bias.detach().numpy(), 0)),
        after[:3],
        rtol=1e-4,
        atol=1e-5,
    )
    enc.save_pretrained(tmp_path / "calibrated")
    again = SparseEncoder.from_pretrained(tmp_path / "calibrated")
    assert torch.equal(again.head_bias.detach(), enc.head_bias.detach())
    np.testing.assert_array_equal(
        dense(again.encode_docs(texts[:5], show_progress=False)),
        dense(enc.encode_docs(texts[:5], show_progress=False)),
    )
    with pytest.raises(ValueError, match=r"doc_fraction must be in \(0, 1\)"):
        enc.calibrate_head_bias(texts, doc_fraction=1.5)


def test_head_bias_calibrated_on_queries_too_caps_both_frequencies(tmp_path):
    base = _save_tiny_backbone(tmp_path)
    enc = SparseEncoder.from_pretrained(base, query_max_length=4)
    docs = random_texts(200, 8, 16, seed=11)
    queries = random_texts(200, 1, 3, seed=12)
    doc_only = enc.calibrate_head_bias(docs, doc_fraction=0.05).clone()
    both = enc.calibrate_head_bias(docs, doc_fraction=0.05, queries=queries).clone()
    enc.head_bias = None
    raw_docs, raw_queries = enc.raw_max_logits(docs), enc.raw_max_logits(queries, kind="query")
    k = int(np.ceil(0.95 * 200))
    want = -torch.maximum(raw_docs.kthvalue(k, 0).values, raw_queries.kthvalue(k, 0).values)
    torch.testing.assert_close(both, want)
    torch.testing.assert_close(doc_only, -raw_docs.kthvalue(k, 0).values)
    # each term fires in at most ~5% of the documents and of the queries
    for raw in (raw_docs, raw_queries):
        assert ((raw + both) > 0).float().mean(0).max() <= 0.05
    # never a lower threshold than the documents' alone; a higher one where queries run hotter
    assert (both <= doc_only).all() and (both < doc_only).any()
    with pytest.raises(ValueError, match="at least 2 non-empty query texts"):
        enc.calibrate_head_bias(docs, doc_fraction=0.05, queries=["", "a"])


def test_folder_saved_by_csplade_0_1_loads(tmp_path):
    # csplade_config.json exactly as csplade 0.1 (one modeling.py) wrote it: same keys, same meaning
    folder = _save_tiny_backbone(tmp_path)
    saved = {
        "adapter": False,
        "backbone_kind": "causal",
        "base_model": "tiny-llama",
        "doc_max_length": 12,
        "doc_only": False,
        "doc_prefix": "",
        "extra": {"adaptation": {"steps": 6}},
        "fused_head": True,
        "head_chunk_size": None,
        "pool_special_tokens": False,
        "pooling": "max",
        "query_max_length": 7,
        "query_prefix": "",
        "variant": "echo",
    }
    (folder / "csplade_config.json").write_text(json.dumps(saved, indent=2, sort_keys=True))
    enc = SparseEncoder.from_pretrained(folder)
    assert (enc.config.variant, enc.config.doc_max_length, enc.config.query_max_length) == (
        "echo",
        12,
        7,
    )
    assert enc.config.extra == {"adaptation": {"steps": 6}}
    enc.save_pretrained(tmp_path / "again")
    resaved = json.loads((tmp_path / "again" / "csplade_config.json").read_text())
    # settings added since take the value that computes what 0.1 computed
    no_op = {"logit_scale": 1.0, "pool_next_token": False, "lexical_residual": False,
             "lexical_scale": 1.0, "lexical_docs": False, "learned_top_k": None,
             "lexical_analyzer": "tokens", "frozen_docs": False, "doc_windows": 1}  # fmt: skip
    assert resaved == {**saved, **no_op}


def test_logit_scale_multiplies_logits_before_the_activation(tiny_encoder_factory):
    plain = tiny_encoder_factory("llama")
    scaled = tiny_encoder_factory("llama", logit_scale=0.25)
    scaled.load_state_dict(plain.state_dict())
    texts = random_texts(4, seed=3)
    batch = plain.tokenize(texts)
    batch.pop("n_truncated")
    with torch.no_grad():
        hidden, head = plain._hidden_states(batch["input_ids"], batch["attention_mask"])
        logits = head(hidden).float()  # (B, L, V)
        mask = batch["pool_mask"].unsqueeze(-1)
        want = (torch.log1p(torch.relu(0.25 * logits)) * mask).amax(dim=1)
        got = scaled(**batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # same support as the unscaled model (ReLU's threshold does not move), smaller weights
    base = plain(**batch)
    assert torch.equal(base > 0, got > 0) and bool((got <= base).all())
    with pytest.raises(ValueError, match="logit_scale"):
        tiny_encoder_factory("llama", logit_scale=0)


def test_bi_pools_the_positions_that_predict_the_text(tiny_encoder_factory):
    uni = tiny_encoder_factory("llama", variant="uni")
    bi = tiny_encoder_factory("llama", variant="bi")
    assert (uni.config.pool_next_token, bi.config.pool_next_token) == (False, True)
    texts = ["aa ab ac", "ba"]
    own, shifted = uni.tokenize(texts), bi.tokenize(texts)
    assert torch.equal(own["input_ids"], shifted["input_ids"])
    for row in range(len(texts)):
        text = own["pool_mask"][row].nonzero().flatten().tolist()
        # each pooled position is the one before a text token (position 0 has none before it here:
        # this tokenizer adds no BOS); the last text token's own position is not pooled
        before = [i - 1 for i in text if i > 0]
        assert shifted["pool_mask"][row].nonzero().flatten().tolist() == before
    # inference-free queries weight their own tokens: no shift there
    free = tiny_encoder_factory("llama", variant="bi", doc_only=True)
    query = free.tokenize(texts, kind="query")
    assert torch.equal(query["pool_mask"], uni.tokenize(texts, kind="query")["pool_mask"])
    # describe() leaves out added settings at the value that computes what csplade 0.1 did, so
    # indexes encoded before them still match their encoder
    assert "pool_next_token" not in uni.describe() and "logit_scale" not in uni.describe()
    assert bi.describe()["pool_next_token"] is True


def test_bi_needs_a_query_prefix_without_bos(tiny_encoder_factory, caplog):
    # this tokenizer adds no BOS: under next-token pooling a one-token query has no position that
    # predicts it, so it encodes to a zero vector, and the encoder says so when it is built
    with caplog.at_level(logging.WARNING, logger="csplade.model.encoder"):
        bare = tiny_encoder_factory("llama", variant="bi")
    assert any("query_prefix" in r.getMessage() for r in caplog.records)
    one = bare.tokenizer("aa", add_special_tokens=False)["input_ids"]
    assert len(one) == 1
    assert not bare.tokenize(["aa"], kind="query")["pool_mask"].any()
    with torch.no_grad():
        assert bare.encode_queries(["aa"]).nnz == 0
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="csplade.model.encoder"):
        prefixed = tiny_encoder_factory("llama", variant="bi", query_prefix="query: ")
    assert not any("query_prefix" in r.getMessage() for r in caplog.records)
    batch = prefixed.tokenize(["aa"], kind="query")
    n_prefix = len(prefixed.tokenizer("query: ", add_special_tokens=False)["input_ids"])
    # the prefix's last position predicts the query's token: the one pooled position
    assert batch["pool_mask"][0].nonzero().flatten().tolist() == [n_prefix - 1]
    with torch.no_grad():
        assert prefixed.encode_queries(["aa"]).nnz > 0
