"""Distillation and inference-free training: ensemble normalisation, teacher scoring, distillation
training, and a doc-only model whose query encoding never runs the backbone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from synthetic import save_base, write_groups

from csplade.data import teachers
from csplade.data.ensemble import ensemble, normalize_scores
from csplade.data.teachers import Teacher, score_groups
from csplade.model.encoder import SparseEncoder
from csplade.training.contrastive import run_training
from csplade.training.recipe import parse_recipe


def test_normalisations_on_hand_made_scores():
    np.testing.assert_allclose(normalize_scores([2.0, 4.0, 3.0], "minmax"), [0.0, 1.0, 0.5])
    # z-score: mean 3, population std sqrt(2/3)
    z = normalize_scores([2.0, 4.0, 3.0], "zscore")
    np.testing.assert_allclose(z, [-1 / np.sqrt(2 / 3), 1 / np.sqrt(2 / 3), 0.0])
    np.testing.assert_array_equal(normalize_scores([5.0, 5.0], "minmax"), [0.0, 0.0])
    np.testing.assert_array_equal(normalize_scores([1.0, -2.0], "none"), [1.0, -2.0])
    with pytest.raises(ValueError, match="allowed: minmax, zscore, none"):
        normalize_scores([1.0], "rank")


def test_ensemble_normalises_each_teacher_before_weighting():
    # a dense teacher on [-1, 1] and a sparse one in the tens: min-max puts them on one scale
    dense = [0.9, 0.1, 0.5]  # -> 1, 0, 0.5
    sparse = [30.0, 40.0, 10.0]  # -> 2/3, 1, 0
    got = ensemble({"dense": dense, "sparse": sparse}, {"dense": 1.0, "sparse": 0.5}, "minmax")
    np.testing.assert_allclose(got, [1 + 0.5 * 2 / 3, 0 + 0.5 * 1, 0.5 + 0])
    with pytest.raises(ValueError, match="must name the teachers"):
        ensemble({"a": [1.0]}, {"b": 1.0}, "minmax")
    with pytest.raises(ValueError, match="different numbers"):
        ensemble({"a": [1.0], "b": [1.0, 2.0]}, {"a": 1, "b": 1}, "none")


def test_teacher_scores_with_a_sparse_teacher_match_its_dot_products(tmp_path):
    base = save_base(tmp_path / "base")
    teacher = SparseEncoder.from_pretrained(base)
    teacher.save_pretrained(tmp_path / "teacher")
    groups = write_groups(tmp_path / "groups.jsonl", n=6, negatives=2)
    out = tmp_path / "scored.jsonl"
    score_groups(groups, [str(tmp_path / "teacher")], out, normalization="zscore")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6
    name = str(tmp_path / "teacher")
    for row in rows:
        items = row["positives"] + row["negatives"]
        q = teacher.encode_queries([row["query"]], show_progress=False)
        d = teacher.encode_docs(items, show_progress=False)
        want = (d @ q.T).toarray().ravel()
        raw = row["teacher_scores"][name]
        np.testing.assert_allclose(raw["positives"] + raw["negatives"], want, rtol=1e-5)
        combined = row["scores"]["positives"] + row["scores"]["negatives"]
        # the combined score is the normalised raw score (one teacher, weight 1)
        expected = normalize_scores(np.asarray(raw["positives"] + raw["negatives"]), "zscore")
        np.testing.assert_allclose(combined, expected, rtol=1e-6, atol=1e-7)


class _CountingDense:
    """A dense teacher's surface (sentence-transformers' encode / similarity_pairwise) that counts
    the texts it encodes."""

    def __init__(self) -> None:
        self.encoded: list[str] = []

    def encode(self, texts, **kwargs):
        self.encoded += list(texts)
        return np.array([[len(t), t.count("a"), 1.0] for t in texts], dtype=np.float32)

    def similarity_pairwise(self, a, b):
        return (a * b).sum(axis=1)


def test_a_bi_encoder_teacher_encodes_each_distinct_text_once(tmp_path, monkeypatch):
    # 150 groups over 10 queries and 8 documents (750 pairs, more than a block of the pairs once
    # scored): every distinct text is encoded once, and every pair's score is the one scored alone
    monkeypatch.setattr(teachers, "_PAIR_BLOCK", 64)
    docs = [f"doc {i} " + "a" * (i + 1) for i in range(8)]
    groups = tmp_path / "groups.jsonl"
    with groups.open("w") as fh:
        for g in range(150):
            items = [docs[(g + k) % 8] for k in range(5)]
            row = {"query": f"query {g % 10}", "positives": items[:1], "negatives": items[1:]}
            fh.write(json.dumps(row) + "\n")
    dense = _CountingDense()
    monkeypatch.setattr(
        teachers, "load_teacher", lambda name, device=None: Teacher(name, "dense", dense)
    )
    out = tmp_path / "scored.jsonl"
    score_groups(groups, ["dense"], out, normalization="none")
    assert sorted(dense.encoded) == sorted({f"query {i}" for i in range(10)} | set(docs))
    for row in map(json.loads, out.read_text().splitlines()):
        raw = row["teacher_scores"]["dense"]
        for doc, got in zip(
            row["positives"] + row["negatives"], raw["positives"] + raw["negatives"], strict=True
        ):
            want = dense.similarity_pairwise(dense.encode([row["query"]]), dense.encode([doc]))[0]
            assert got == pytest.approx(want)

    queries = ["a b", "c d", "a b", "e a", "c d", "a b", "e a"]
    docs = ["x a", "x a", "z", "z a a", "w", "x a", "w"]
    model = SparseEncoder.from_pretrained(save_base(tmp_path / "base"))
    encoded: list[str] = []
    encode_docs = model.encode_docs

    def counting(texts, **kwargs):
        encoded.extend(texts)
        return encode_docs(texts, **kwargs)

    monkeypatch.setattr(model, "encode_docs", counting)
    got = Teacher("sparse", "sparse", model).score(queries, docs)
    assert sorted(encoded) == sorted(set(docs))
    for i, (q, d) in enumerate(zip(queries, docs, strict=True)):
        q_vec = model.encode_queries([q], show_progress=False)
        d_vec = encode_docs([d], show_progress=False)
        assert got[i] == pytest.approx(float(q_vec.multiply(d_vec).sum()), rel=1e-5)
    with pytest.raises(ValueError, match="2 queries for 1 documents"):
        Teacher("sparse", "sparse", model).score(["a", "b"], ["x"])


@pytest.mark.slow
def test_teacher_scores_with_the_packaged_dense_and_sparse_teachers(tmp_path, prepared):
    groups = tmp_path / "groups.jsonl"
    groups.write_text(
        json.dumps(
            {
                "query": "what causes vitamin d deficiency",
                "positives": ["Vitamin D deficiency is caused by a lack of sunlight."],
                "negatives": ["The stock market fell sharply on Monday.", "Cats sleep a lot."],
            }
        )
        + "\n"
    )
    out = tmp_path / "scored.jsonl"
    score_groups(groups, ["minilm-dense", "splade-tiny"], out)
    row = json.loads(out.read_text())
    for name in ("minilm-dense", "splade-tiny"):
        scores = row["teacher_scores"][name]
        assert scores["positives"][0] > max(scores["negatives"])  # both teachers get this one right
    assert row["scores"]["positives"][0] == pytest.approx(2.0)  # top for both after min-max


def test_distillation_training_runs_and_logs_its_part(tmp_path):
    base = save_base(tmp_path / "base")
    groups = write_groups(tmp_path / "groups.jsonl", n=40)
    SparseEncoder.from_pretrained(base).save_pretrained(tmp_path / "teacher")
    scored = tmp_path / "scored.jsonl"
    score_groups(groups, [str(tmp_path / "teacher")], scored)
    for loss in ("margin_mse", "kl"):
        out = run_training(
            *parse_recipe(
                None,
                [
                    "--model_name_or_path", str(base), "--train_data", str(scored),
                    "--output_dir", str(tmp_path / loss), "--distill_loss", loss,
                    "--distill_weight", "0.5", "--max_steps", "4", "--logging_steps", "1",
                    "--per_device_train_batch_size", "4", "--group_size", "3", "--use_cpu", "true",
                ],
            )
        )  # fmt: skip
        history = json.loads((out / "run_info.json").read_text())["log_history"]
        parts = [h for h in history if "distill" in h]
        assert len(parts) == 4 and all(np.isfinite(h["distill"]) for h in parts)
        assert all("contrastive" in h for h in parts)


def test_distillation_without_scores_is_a_clear_error(tmp_path):
    base = save_base(tmp_path / "base")
    groups = write_groups(tmp_path / "groups.jsonl", n=8)
    with pytest.raises(ValueError, match="needs teacher scores"):
        run_training(
            *parse_recipe(
                None,
                ["--model_name_or_path", str(base), "--train_data", str(groups),
                 "--output_dir", str(tmp_path / "o"), "--distill_loss", "kl", "--max_steps", "1",
                 "--use_cpu", "true"],
            )
        )  # fmt: skip


def test_inference_free_model_trains_saves_and_never_runs_the_backbone_for_queries(tmp_path):
    base = save_base(tmp_path / "base")
    groups = write_groups(tmp_path / "groups.jsonl", n=40)
    out = run_training(
        *parse_recipe(
            None,
            [
                "--model_name_or_path", str(base), "--train_data", str(groups),
                "--output_dir", str(tmp_path / "if"), "--doc_only", "--doc_regularizer", "idf_flops",
                "--max_steps", "5", "--per_device_train_batch_size", "4", "--group_size", "3",
                "--use_cpu", "true",
            ],
        )
    )  # fmt: skip
    encoder = SparseEncoder.from_pretrained(out)
    assert encoder.config.doc_only and encoder.query_weights is not None
    assert (encoder.query_weights > 0).all()
    # IDF: a word every document contains weighs less than one no document contains
    common = encoder._tokenize_plain("aa")[0]  # 'aa' is a document word (set A)
    unseen = encoder._tokenize_plain("zz")[0] if encoder._tokenize_plain("zz") else None
    assert unseen is None or encoder.query_weights[unseen] >= encoder.query_weights[common]
    calls = {"n": 0}

    def count(module, args, kwargs):
        calls["n"] += 1

    handle = encoder.backbone.register_forward_pre_hook(count, with_kwargs=True)
    inner = encoder.base_model.base_model.register_forward_pre_hook(count, with_kwargs=True)
    q = encoder.encode_queries(["ca cb cc", "aa"], show_progress=False)
    assert calls["n"] == 0 and q.nnz > 0
    d = encoder.encode_docs(["aa ab ac"], show_progress=False)
    assert calls["n"] > 0 and d.nnz > 0  # the hooks do see document encoding
    handle.remove()
    inner.remove()
    ids = sorted(set(encoder._tokenize_plain("ca cb cc")))
    assert q[0].indices.tolist() == ids
    np.testing.assert_allclose(q[0].data, encoder.query_weights[ids].numpy(), rtol=1e-6)
    assert torch.is_tensor(encoder.query_weights)
