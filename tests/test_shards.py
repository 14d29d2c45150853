"""Resumable sharded corpus encoding: round trip, resume, corruption, ranks, quantization."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import scipy.sparse as sp

from csplade.index import encode_corpus, load_index
from csplade.index.shards import iter_shards, shard_name

VOCAB = 40
DESCRIBE = {"model": "tiny", "max_length": 16, "pooling": "max"}


def fake_vector(text: str) -> np.ndarray:
    """Deterministic per-text sparse vector, so re-encoding yields the same shard bytes."""
    rng = np.random.default_rng(int(text.split("-")[1]))
    vec = np.zeros(VOCAB, dtype=np.float32)
    terms = rng.choice(VOCAB, size=6, replace=False)
    vec[terms] = rng.uniform(0.05, 3.0, size=6).astype(np.float32)
    return vec


class Encoder:
    """Counts calls and the texts it saw; can fail on the n-th call."""

    def __init__(self, fail_on_call: int | None = None):
        self.calls: list[list[str]] = []
        self.fail_on_call = fail_on_call

    def __call__(self, texts: list[str]) -> sp.csr_matrix:
        self.calls.append(texts)
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise RuntimeError("simulated crash")
        return sp.csr_matrix(np.stack([fake_vector(t) for t in texts]))


def corpus(n=23):
    ids = [f"doc{i}" for i in range(n)]
    texts = [f"text-{i}" for i in range(n)]
    return ids, texts


def expected_matrix(texts):
    return np.stack([fake_vector(t) for t in texts])


def test_round_trip_keeps_corpus_order_and_manifest(tmp_path):
    ids, texts = corpus()
    manifest = encode_corpus(
        Encoder(), ids, texts, tmp_path, describe=DESCRIBE, shard_size=5, progress=False
    )
    docs, loaded_ids, on_disk = load_index(tmp_path)
    assert loaded_ids == ids
    np.testing.assert_array_equal(docs.toarray(), expected_matrix(texts))
    assert docs.dtype == np.float32
    assert manifest == on_disk
    assert manifest["complete"] and manifest["n_shards"] == 5 and manifest["vocab_size"] == VOCAB
    assert [s["n_docs"] for s in manifest["shards"]] == [5, 5, 5, 5, 3]
    assert manifest["nnz"] == docs.nnz == 23 * 6
    assert manifest["settings"]["describe"] == DESCRIBE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"] + [
        shard_name(i) for i in range(5)
    ]


def test_resume_after_crash_skips_finished_shards(tmp_path):
    ids, texts = corpus()
    crashing = Encoder(fail_on_call=3)  # shards 0 and 1 written, crash while encoding shard 2
    with pytest.raises(RuntimeError, match="simulated crash"):
        encode_corpus(
            crashing, ids, texts, tmp_path, describe=DESCRIBE, shard_size=5, progress=False
        )
    partial = json.loads((tmp_path / "manifest.json").read_text())
    assert not partial["complete"] and [bool(s) for s in partial["shards"]] == [1, 1, 0, 0, 0]
    with pytest.raises(ValueError, match="incomplete"):
        load_index(tmp_path)

    debris = tmp_path / f".{shard_name(2)}.x1y2.tmp"  # as left by a kill during a write
    debris.write_bytes(b"partial")
    resumed = Encoder()
    encode_corpus(resumed, ids, texts, tmp_path, describe=DESCRIBE, shard_size=5, progress=False)
    assert resumed.calls == [texts[10:15], texts[15:20], texts[20:23]]  # shards 2, 3, 4 only
    assert not debris.exists()

    fresh_dir = tmp_path / "fresh"
    encode_corpus(Encoder(), ids, texts, fresh_dir, describe=DESCRIBE, shard_size=5, progress=False)
    for i in range(5):  # identical index, byte for byte (shard files are deterministic)
        assert (tmp_path / shard_name(i)).read_bytes() == (fresh_dir / shard_name(i)).read_bytes()

    again = Encoder()  # a finished index is left alone
    encode_corpus(again, ids, texts, tmp_path, describe=DESCRIBE, shard_size=5, progress=False)
    assert again.calls == []


def test_corrupt_shard_is_detected_and_re_encoded(tmp_path):
    ids, texts = corpus()
    encode_corpus(Encoder(), ids, texts, tmp_path, describe=DESCRIBE, shard_size=5, progress=False)
    path = tmp_path / shard_name(3)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="sha256 mismatch"):
        load_index(tmp_path)
    redo = Encoder()
    encode_corpus(redo, ids, texts, tmp_path, describe=DESCRIBE, shard_size=5, progress=False)
    assert redo.calls == [texts[15:20]]
    docs, _, _ = load_index(tmp_path)
    np.testing.assert_array_equal(docs.toarray(), expected_matrix(texts))


def test_changed_settings_are_refused_unless_overwrite(tmp_path):
    ids, texts = corpus()
    encode_corpus(Encoder(), ids, texts, tmp_path, describe=DESCRIBE, shard_size=5, progress=False)
    other = {**DESCRIBE, "max_length": 32}
    with pytest.raises(ValueError, match=r"describe\.max_length: 16 \(on disk\) != 32"):
        encode_corpus(Encoder(), ids, texts, tmp_path, describe=other, shard_size=5, progress=False)
    with pytest.raises(ValueError, match="shard_size"):
        encode_corpus(
            Encoder(), ids, texts, tmp_path, describe=DESCRIBE, shard_size=4, progress=False
        )
    redo = Encoder()
    encode_corpus(
        redo, ids, texts, tmp_path, describe=other, shard_size=4, overwrite=True, progress=False
    )
    assert len(redo.calls) == 6
    _, _, manifest = load_index(tmp_path)
    assert manifest["settings"]["describe"]["max_length"] == 32
    assert not (tmp_path / shard_name(6)).exists()


def test_bad_inputs_raise_clear_errors(tmp_path):
    ids, texts = corpus(6)
    with pytest.raises(ValueError, match="duplicate doc id 'doc1' at positions 1 and 4"):
        encode_corpus(Encoder(), ids[:4] + ["doc1", "doc5"], texts, tmp_path, describe=DESCRIBE)
    with pytest.raises(ValueError, match="6 doc ids but 5 texts"):
        encode_corpus(Encoder(), ids, texts[:5], tmp_path, describe=DESCRIBE)
    with pytest.raises(ValueError, match="barrier"):
        encode_corpus(Encoder(), ids, texts, tmp_path, describe=DESCRIBE, world_size=2)

    def nan_encoder(batch):
        out = Encoder()(batch).toarray()
        out[1, out[1].nonzero()[0][0]] = np.nan
        return sp.csr_matrix(out)

    with pytest.raises(ValueError, match="non-finite weight for doc 'doc1'"):
        encode_corpus(nan_encoder, ids, texts, tmp_path / "nan", describe=DESCRIBE, progress=False)


@pytest.mark.parametrize("quantize", ["fp16", "uint8"])
def test_quantized_round_trip_within_quantization_error(tmp_path, quantize):
    ids, texts = corpus()
    manifest = encode_corpus(
        Encoder(),
        ids,
        texts,
        tmp_path,
        describe=DESCRIBE,
        shard_size=5,
        quantize=quantize,
        progress=False,
    )
    docs, _, _ = load_index(tmp_path)
    exact = expected_matrix(texts)
    got = docs.toarray()
    assert got.dtype == np.float32 and docs.nnz == np.count_nonzero(exact)
    if quantize == "fp16":
        np.testing.assert_allclose(got, exact, rtol=2**-11, atol=0)
    else:
        # Per-shard scale = 255 / shard max: error <= 0.5 / scale for every weight.
        for s, record in enumerate(manifest["shards"]):
            rows = slice(5 * s, 5 * s + record["n_docs"])
            assert record["scale"] == pytest.approx(255 / exact[rows].max())
            assert np.abs(got[rows] - exact[rows]).max() <= 0.5 / record["scale"] + 1e-6
    stored = np.load(tmp_path / shard_name(0))["data"]
    assert stored.dtype == (np.float16 if quantize == "fp16" else np.uint8)


def test_uint8_with_fixed_scale_clips_and_counts(tmp_path):
    ids, texts = corpus()
    manifest = encode_corpus(
        Encoder(), ids, texts, tmp_path, describe=DESCRIBE, shard_size=5,
        quantize="uint8", scale=100.0, progress=False,
    )  # fmt: skip
    docs, _, _ = load_index(tmp_path)
    exact = expected_matrix(texts)
    expected = np.minimum(np.rint(exact * 100.0), 255) / 100.0
    np.testing.assert_allclose(docs.toarray(), expected, rtol=1e-6)
    assert (
        sum(s["n_clipped"] for s in manifest["shards"])
        == int((np.rint(exact * 100) > 255).sum())
        > 0
    )


def test_ranks_split_shards_round_robin_and_rank0_finalises(tmp_path):
    ids, texts = corpus()
    world = 3
    barrier = threading.Barrier(world)
    encoders = [Encoder() for _ in range(world)]
    results: dict[int, object] = {}
    errors: list[BaseException] = []

    def run(rank):
        try:
            results[rank] = encode_corpus(
                encoders[rank], ids, texts, tmp_path, describe=DESCRIBE, shard_size=4,
                rank=rank, world_size=world, barrier=barrier.wait, progress=False,
            )  # fmt: skip
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    # 6 shards of 4 docs: rank r encodes shards r, r + 3.
    for rank in range(world):
        assert encoders[rank].calls == [texts[4 * i : 4 * i + 4] for i in (rank, rank + 3)]
    assert results[1] is None and results[2] is None
    assert results[0]["complete"] and not list(tmp_path.glob("manifest.rank*.json"))
    docs, loaded_ids, _ = load_index(tmp_path)
    assert loaded_ids == ids
    np.testing.assert_array_equal(docs.toarray(), expected_matrix(texts))

    # A single-process rerun honours the records written by the three ranks.
    rerun = Encoder()
    encode_corpus(rerun, ids, texts, tmp_path, describe=DESCRIBE, shard_size=4, progress=False)
    assert rerun.calls == []


def test_iter_shards_streams_in_corpus_order(tmp_path):
    ids, texts = corpus()
    encode_corpus(Encoder(), ids, texts, tmp_path, describe=DESCRIBE, shard_size=10, progress=False)
    chunks = list(iter_shards(tmp_path))
    assert [len(chunk_ids) for _, chunk_ids in chunks] == [10, 10, 3]
    assert sum((chunk_ids for _, chunk_ids in chunks), []) == ids
