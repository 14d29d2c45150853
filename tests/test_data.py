"""Training data readers: JSONL groups, BEIR groups, sampling determinism, the collator, raw texts."""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

from csplade.data.beir import doc_text, iter_corpus, load_qrels, load_queries
from csplade.data.beir_groups import read_groups_beir
from csplade.data.groups import load_training_groups, read_groups_jsonl
from csplade.data.sampling import GroupCollator, GroupDataset
from csplade.data.texts import read_texts
from csplade.model import SparseEncoder, SparseEncoderConfig
from csplade.training.arguments import DataArguments

DATA_DIR = Path(
    os.environ.get("CSPLADE_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data")
)
SCIFACT = DATA_DIR / "scifact"


def write_lines(path: Path, rows: list) -> Path:
    """One line per row: dicts as JSON, strings verbatim."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def group(query: str, positives: list, negatives: list | None = None, **extra) -> dict:
    row = {"query": query, "positives": positives, **extra}
    if negatives is not None:
        row["negatives"] = negatives
    return row


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "hf-cache"


# ------------------------------------------------------------------------------------- JSONL
def test_jsonl_string_and_object_items_with_parallel_scores(tmp_path, cache):
    path = write_lines(
        tmp_path / "train.jsonl",
        [
            group(
                "what is alpha",
                ["alpha doc", {"_id": "d7", "title": "Alpha", "text": "second alpha doc"}],
                ["beta doc", {"_id": 3, "text": "  gamma doc  "}],
                query_id=11,
                scores={"positives": [9.0, 8.5], "negatives": [1.0, -2]},
            ),
            group(
                "what is delta",
                [{"text": "delta doc"}],
                [],
                scores={"positives": [3.25], "negatives": []},
            ),
        ],
    )
    groups, stats = read_groups_jsonl(path, cache_dir=cache)
    assert stats["rows"] == 2 and stats["groups"] == 2 and stats["skipped"] == 0
    first = groups[0]
    assert first["query"] == "what is alpha" and first["query_id"] == "11"
    assert first["positives"] == ["alpha doc", "Alpha second alpha doc"]  # doc_text: title + text
    assert first["negatives"] == ["beta doc", "gamma doc"]
    assert first["positive_scores"] == [9.0, 8.5] and first["negative_scores"] == [1.0, -2.0]
    assert groups[1]["query_id"] is None and groups[1]["negatives"] == []
    assert groups[1]["positive_scores"] == [3.25]

    # sampled groups keep every score next to its own document
    score_of = {"alpha doc": 9.0, "Alpha second alpha doc": 8.5, "beta doc": 1.0, "gamma doc": -2.0}
    dataset = GroupDataset(groups.select([0]), group_size=3, seed=0)
    for epoch in range(5):
        dataset.set_epoch(epoch)
        item = dataset[0]
        assert item["docs"][0] in ("alpha doc", "Alpha second alpha doc")
        assert sorted(item["docs"][1:]) == ["beta doc", "gamma doc"]
        assert item["scores"] == [score_of[d] for d in item["docs"]]


def test_jsonl_without_scores_gives_none(tmp_path, cache):
    path = write_lines(tmp_path / "t.jsonl", [group("q", ["p"], ["n1", "n2"])])
    groups, _ = read_groups_jsonl(path, cache_dir=cache)
    item = GroupDataset(groups, group_size=2)[0]
    assert item["scores"] is None and item["docs"][0] == "p"


BAD_ROWS = [
    ('{"query": "q", "positives": ["p"]', "malformed JSON"),
    (group(7, ["p"]), "'query' must be a string"),
    ({"positives": ["p"]}, "missing 'query'"),
    (group("q", []), "'positives' is empty"),
    (group("q", "p"), "'positives' must be a list"),
    (group("q", ["p", 3]), "positives[1] must be a string or an object"),
    (group("q", [{"title": "t"}]), "positives[0] needs a string 'text'"),
    (group("q", ["p"], ["   "]), "negatives[0] is empty"),
    (
        group("q", ["p"], ["n"], scores={"positives": [1.0, 2.0], "negatives": [0.0]}),
        "has 2 values",
    ),
    (group("q", ["p"], ["n"], scores={"positives": [1.0]}), "'scores' has no 'negatives'"),
    (group("q", ["p"], scores={"positives": ["high"]}), "must be a finite number"),
    (group("q", ["p"], scores={"positives": [1.0], "pos": []}), "unknown key(s) ['pos']"),
    ("[1, 2]", "expected a JSON object"),
]


@pytest.mark.parametrize("bad, reason", BAD_ROWS)
def test_jsonl_bad_row_names_file_and_line(tmp_path, cache, bad, reason):
    path = write_lines(tmp_path / "bad.jsonl", [group("fine", ["p"]), "", bad])
    with pytest.raises(ValueError) as err:
        read_groups_jsonl(path, cache_dir=cache)
    assert f"{path}:3:" in str(err.value)
    assert reason in str(err.value)


def test_jsonl_nan_score_and_invalid_utf8_are_bad_rows(tmp_path, cache):
    path = tmp_path / "raw.jsonl"
    path.write_bytes(
        b'{"query": "q", "positives": ["p"], "scores": {"positives": [NaN]}}\n'
        b'{"query": "q\xff", "positives": ["p"]}\n'
    )
    with pytest.raises(ValueError, match=rf"{path}:1: 'scores.positives\[0\]'"):
        read_groups_jsonl(path, cache_dir=cache)
    path.write_bytes(
        b'{"query": "q", "positives": ["p"]}\n{"query": "q\xff", "positives": ["p"]}\n'
    )
    with pytest.raises(ValueError, match=rf"{path}:2: not valid UTF-8"):
        read_groups_jsonl(path, cache_dir=cache)


def test_jsonl_rows_must_agree_on_scores(tmp_path, cache):
    path = write_lines(
        tmp_path / "mixed.jsonl",
        [group("a", ["p"], scores={"positives": [1.0]}), group("b", ["p"])],
    )
    with pytest.raises(ValueError, match=rf"{path}:2: has no teacher 'scores'.*line 1"):
        read_groups_jsonl(path, cache_dir=cache)


def test_skip_bad_rows_logs_each_and_counts(tmp_path, cache, caplog):
    path = write_lines(
        tmp_path / "mixed.jsonl",
        [
            group("good one", ["p1"], ["n1"]),
            "{broken",
            group(["not", "a", "string"], ["p"]),
            group("good two", ["p2"], ["n2"]),
            group("no positives", []),
            group("a", ["p"], ["n"], scores={"positives": [1.0, 2.0], "negatives": [0.0]}),
        ],
    )
    with caplog.at_level(logging.WARNING, logger="csplade.data"):
        groups, stats = read_groups_jsonl(path, skip_bad_rows=True, cache_dir=cache)
    assert [g["query"] for g in groups] == ["good one", "good two"]
    assert [g["line"] for g in groups] == [1, 4]
    assert stats["rows"] == 6 and stats["skipped"] == 4 and stats["groups"] == 2
    assert stats["skipped_lines"] == [2, 3, 5, 6]
    messages = [r.getMessage() for r in caplog.records]
    for line in (2, 3, 5, 6):
        assert any(m.startswith(f"{path}:{line}: skipped") for m in messages), line
    assert any("skipped 4 bad row(s) of 6" in m for m in messages)

    # a second read is served from the cache and still reports every skipped row
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="csplade.data"):
        _, again = read_groups_jsonl(path, skip_bad_rows=True, cache_dir=cache)
    assert again["skipped_lines"] == [2, 3, 5, 6]
    assert sum(": skipped bad row (" in m for m in caplog.messages) == 4


def test_all_rows_bad_or_empty_file_is_an_error(tmp_path, cache):
    path = write_lines(tmp_path / "allbad.jsonl", ["{", "[]"])
    with pytest.raises(ValueError, match=r"no usable rows \(2 bad rows skipped, first on line 1"):
        read_groups_jsonl(path, skip_bad_rows=True, cache_dir=cache)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"{empty}: empty file"):
        read_groups_jsonl(empty, cache_dir=cache)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_groups_jsonl(tmp_path / "missing.jsonl", cache_dir=cache)


def test_negative_equal_to_positive_is_removed_and_logged(tmp_path, cache, caplog):
    path = write_lines(
        tmp_path / "dup.jsonl",
        [
            group(
                "q",
                ["same doc"],
                ["other", {"text": "same doc"}],
                scores={"positives": [5.0], "negatives": [1.0, 4.0]},
                answers=["x"],
            )
        ],
    )
    with caplog.at_level(logging.WARNING, logger="csplade.data"):
        groups, stats = read_groups_jsonl(path, cache_dir=cache)
    assert groups[0]["negatives"] == ["other"] and groups[0]["negative_scores"] == [1.0]
    assert stats["negatives_dropped"] == 1
    assert any("removed 1 negatives identical to a positive" in m for m in caplog.messages)
    assert any("unknown key 'answers'" in m and "line 1" in m for m in caplog.messages)


def test_skips_and_unknown_keys_are_found_beyond_the_first_arrow_batch(tmp_path, cache, caplog):
    rows = [group(f"q{i}", [f"p{i}"]) for i in range(2500)]
    rows[2100] = group("q2100", ["p"], note="x")  # line 2101
    rows[1700] = "{bad"  # line 1701
    path = write_lines(tmp_path / "big.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="csplade.data"):
        groups, stats = read_groups_jsonl(path, skip_bad_rows=True, cache_dir=cache)
    assert len(groups) == 2499 and stats["skipped_lines"] == [1701]
    assert groups[2099]["line"] == 2101
    assert any("unknown key 'note' on 1 row(s), first on line 2101" in m for m in caplog.messages)


def test_changed_file_is_reread_not_served_stale(tmp_path, cache):
    path = write_lines(tmp_path / "train.jsonl", [group("first query", ["aaa"])])
    stamp = path.stat().st_mtime_ns
    groups, _ = read_groups_jsonl(path, cache_dir=cache)
    assert groups[0]["query"] == "first query"
    n_cached = len(list(cache.rglob("*.arrow")))

    # unchanged file: loaded from the cache, nothing new written
    groups, _ = read_groups_jsonl(path, cache_dir=cache)
    assert groups[0]["query"] == "first query"
    assert len(list(cache.rglob("*.arrow"))) == n_cached

    # same size, same modification time, different bytes: must be read again
    write_lines(path, [group("other query", ["bbb"])])
    os.utime(path, ns=(stamp, stamp))
    groups, _ = read_groups_jsonl(path, cache_dir=cache)
    assert groups[0]["query"] == "other query" and groups[0]["positives"] == ["bbb"]

    # a file that failed (nothing cached) and is then fixed is read fine
    write_lines(path, ["{oops"])
    with pytest.raises(ValueError, match=":1: malformed JSON"):
        read_groups_jsonl(path, cache_dir=cache)
    with pytest.raises(ValueError, match=":1: malformed JSON"):  # still an error, not a stale table
        read_groups_jsonl(path, cache_dir=cache)
    write_lines(path, [group("fixed", ["ccc"])])
    groups, _ = read_groups_jsonl(path, cache_dir=cache)
    assert groups[0]["query"] == "fixed"


def test_changed_text_file_is_reread(tmp_path, cache):
    path = tmp_path / "texts.txt"
    path.write_text("one\ntwo\n", encoding="utf-8")
    assert read_texts(path, cache_dir=cache)["text"] == ["one", "two"]
    path.write_text("six\nten\n", encoding="utf-8")
    assert read_texts(path, cache_dir=cache)["text"] == ["six", "ten"]


# -------------------------------------------------------------------------------------- BEIR
@pytest.fixture(scope="module")
def scifact(tmp_path_factory):
    if not (SCIFACT / "qrels" / "train.tsv").is_file():
        pytest.fail(f"scifact train split not found under {DATA_DIR} (set CSPLADE_DATA)")
    cache = tmp_path_factory.mktemp("hf-cache")
    groups, corpus, stats = read_groups_beir(SCIFACT, split="train", cache_dir=cache)
    return SimpleNamespace(groups=groups, corpus=corpus, stats=stats, cache=cache)


def test_scifact_train_positives_match_qrels(scifact):
    qrels = load_qrels(SCIFACT / "qrels" / "train.tsv")
    queries = load_queries(SCIFACT / "queries.jsonl")
    corpus_ids = {doc_id for doc_id, _ in iter_corpus(SCIFACT / "corpus.jsonl")}
    expected = {
        q: {d for d, s in judged.items() if s > 0 and d in corpus_ids}
        for q, judged in qrels.items()
        if q in queries
    }
    expected = {q: docs for q, docs in expected.items() if docs}
    assert len(expected) == 809  # BEIR scifact train: 809 queries, all with a relevant doc
    assert len(scifact.groups) == len(expected) == scifact.stats["groups"]
    ids = scifact.corpus["_id"]
    for row in scifact.groups:
        assert row["query"] == queries[row["query_id"]]
        assert {ids[r] for r in row["positives"]} == expected[row["query_id"]]
        assert row["negatives"] == []


def test_scifact_random_negatives_are_never_positives(scifact):
    dataset = GroupDataset(scifact.groups, group_size=8, seed=3, corpus=scifact.corpus)
    texts = scifact.corpus["text"]
    for epoch in range(2):
        dataset.set_epoch(epoch)
        for i in range(0, len(dataset), 3):
            item = dataset[i]
            positives = {texts[r] for r in scifact.groups[i]["positives"]}
            assert len(item["docs"]) == 8
            assert item["docs"][0] in positives
            assert not positives & set(item["docs"][1:])
            assert len(set(item["docs"][1:])) == 7  # distinct


def test_scifact_run_negatives_exclude_judged_positives(scifact, tmp_path):
    qrels = load_qrels(SCIFACT / "qrels" / "train.tsv")
    doc_ids = scifact.corpus["_id"]
    rng = random.Random(0)
    run_path = tmp_path / "run.trec"
    top: dict[str, list[str]] = {}
    with open(run_path, "w", encoding="utf-8") as f:
        for q in list(qrels)[:50]:
            ranked = list(qrels[q]) + rng.sample(doc_ids, 12) + ["not-a-doc"]
            ranked = list(dict.fromkeys(ranked))
            top[q] = ranked
            for rank, d in enumerate(ranked, start=1):
                f.write(f"{q} Q0 {d} {rank} {100.0 - rank} test\n")
        f.write("unjudged-query Q0 x 1 1.0 test\n")
    depth = 6
    groups, _, stats = read_groups_beir(
        SCIFACT, "train", negatives_run=run_path, negatives_depth=depth, cache_dir=scifact.cache
    )
    assert len(groups) == len(scifact.groups)
    by_query = {row["query_id"]: row for row in groups}
    for q, ranked in top.items():
        positives = {d for d, s in qrels[q].items() if s > 0}
        negatives = [doc_ids[r] for r in by_query[q]["negatives"]]
        assert negatives == [d for d in ranked[:depth] if d not in positives]
        assert not positives & set(negatives)
    assert stats["run_positives_excluded"] == sum(len(qrels[q]) for q in top)
    assert stats["queries_not_in_run"] == len(scifact.groups) - len(top)
    # groups whose run list is short are completed with random corpus docs, never positives
    dataset = GroupDataset(groups, group_size=depth + 2, seed=0, corpus=scifact.corpus)
    texts = scifact.corpus["text"]
    row_of = {row["query_id"]: i for i, row in enumerate(groups)}
    for q in top:
        i = row_of[q]
        item = dataset[i]
        positives = {texts[r] for r in groups[i]["positives"]}
        run_docs = {texts[r] for r in groups[i]["negatives"]}
        assert run_docs <= set(item["docs"][1:])  # the whole short list is used
        assert not positives & set(item["docs"][1:])


def make_beir(root: Path) -> Path:
    folder = root / "toy"
    write_lines(
        folder / "corpus.jsonl",
        [{"_id": f"d{i}", "title": "", "text": f"doc number {i}"} for i in range(6)],
    )
    write_lines(
        folder / "queries.jsonl",
        [{"_id": q, "text": f"query {q}"} for q in ("q1", "q2", "q3", "q4")],
    )
    rows = [
        ("q1", "d0", 1),
        ("q1", "d1", 0),  # judged non-relevant: a fine negative
        ("q2", "d2", 0),  # no positive at all: dropped
        ("q3", "gone", 2),  # positive absent from the corpus: dropped
        ("q4", "d3", 1),
        ("q4", "gone", 1),  # one positive absent: ignored, d3 kept
        ("q9", "d4", 1),  # query without text: dropped
    ]
    (folder / "qrels").mkdir()
    lines = ["query-id\tcorpus-id\tscore"] + ["\t".join(map(str, r)) for r in rows]
    (folder / "qrels" / "train.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def test_beir_drops_and_counts_queries_without_positive(tmp_path, cache, caplog):
    folder = make_beir(tmp_path)
    run = tmp_path / "run.trec"
    run.write_text(
        "q1 Q0 d0 1 9.0 r\nq1 Q0 d1 2 8.0 r\nq1 Q0 nowhere 3 7.0 r\nq1 Q0 d5 4 6.0 r\n",
        encoding="utf-8",
    )
    with caplog.at_level(logging.WARNING, logger="csplade.data"):
        groups, corpus, stats = read_groups_beir(folder, negatives_run=run, cache_dir=cache)
    assert [g["query_id"] for g in groups] == ["q1", "q4"]
    ids = corpus["_id"]
    assert [ids[r] for r in groups[0]["negatives"]] == ["d1", "d5"]  # d0 excluded, d1 kept
    assert stats["queries_no_positive"] == 2
    assert stats["queries_no_judged_positive"] == 1
    assert stats["queries_positives_not_in_corpus"] == 1
    assert stats["positives_not_in_corpus"] == 2
    assert stats["judged_queries_missing_text"] == 1
    assert stats["run_docs_not_in_corpus"] == 1
    assert stats["queries_not_in_run"] == 1
    assert any("dropped 2 queries without a positive" in m for m in caplog.messages)
    with pytest.raises(FileNotFoundError, match="split 'dev'.*splits in this folder: train"):
        read_groups_beir(folder, split="dev", cache_dir=cache)


# ------------------------------------------------------------------------------ GroupDataset
@pytest.fixture
def long_groups(tmp_path, cache):
    rows = [
        group(
            f"query {i}",
            [f"pos {i}.{k}" for k in range(3)],
            [f"neg {i}.{k}" for k in range(40)],
            scores={
                "positives": [10.0 + k for k in range(3)],
                "negatives": [float(k) for k in range(40)],
            },
        )
        for i in range(6)
    ]
    groups, _ = read_groups_jsonl(write_lines(tmp_path / "long.jsonl", rows), cache_dir=cache)
    return groups


def test_sampling_is_a_function_of_seed_epoch_index(long_groups):
    a = GroupDataset(long_groups, group_size=5, seed=7)
    b = GroupDataset(long_groups, group_size=5, seed=7)
    first = [a[i] for i in range(len(a))]
    # global RNG state and access order play no part
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    assert [b[i] for i in reversed(range(len(b)))] == first[::-1]
    assert a[2] == first[2]
    for item in first:
        assert len(item["docs"]) == 5 and len(item["scores"]) == 5
        assert len(set(item["docs"][1:])) == 4  # negatives without replacement
    a.set_epoch(1)
    second = [a[i] for i in range(len(a))]
    assert all(x["docs"] != y["docs"] for x, y in zip(first, second, strict=True))
    b.set_epoch(1)
    assert [b[i] for i in range(len(b))] == second  # what a resumed run recomputes
    other_seed = GroupDataset(long_groups, group_size=5, seed=8)
    assert [other_seed[i]["docs"] for i in range(len(a))] != [x["docs"] for x in first]
    with pytest.raises(IndexError):
        a[len(a)]


def test_set_epoch_reaches_dataset_through_accelerate(long_groups):
    from accelerate.data_loader import DataLoaderShard

    dataset = GroupDataset(long_groups, group_size=3, seed=0)
    expected = GroupDataset(long_groups, group_size=3, seed=0)
    expected.set_epoch(4)
    loader = DataLoaderShard(dataset, batch_size=3, collate_fn=list)
    loader.set_epoch(4)
    assert dataset.epoch == 4
    assert [item for batch in loader for item in batch] == [expected[i] for i in range(6)]


def test_group_size_one_and_max_queries(long_groups, caplog):
    with caplog.at_level(logging.INFO, logger="csplade.data"):
        dataset = GroupDataset(long_groups, group_size=1, seed=0, max_queries=4)
    assert len(dataset) == 4 and dataset.stats["truncated_from"] == 6
    assert any("first 4 of 6 queries" in m for m in caplog.messages)
    item = dataset[3]
    assert item["query"] == "query 3"
    assert len(item["docs"]) == 1 and item["docs"][0].startswith("pos 3.")
    assert item["scores"] == [10.0 + int(item["docs"][0].split(".")[1])]


def test_short_negative_lists_are_filled_with_replacement_without_corpus(tmp_path, cache, caplog):
    path = write_lines(
        tmp_path / "short.jsonl",
        [group("q0", ["p0"], ["a", "b"]), group("q1", ["p1"], [f"n{k}" for k in range(9)])],
    )
    groups, _ = read_groups_jsonl(path, cache_dir=cache)
    with caplog.at_level(logging.INFO, logger="csplade.data"):
        dataset = GroupDataset(groups, group_size=6, seed=0)
    assert dataset.stats["groups_filled"] == 1
    assert sum("1 of 2 groups have fewer than 5 negatives" in m for m in caplog.messages) == 1
    for epoch in range(4):
        dataset.set_epoch(epoch)
        negatives = dataset[0]["docs"][1:]
        assert len(negatives) == 5 and set(negatives) == {"a", "b"}  # both used, then repeats
        assert len(set(dataset[1]["docs"][1:])) == 5


def test_short_lists_are_filled_from_corpus_when_known(tmp_path, cache):
    folder = make_beir(tmp_path)
    groups, corpus, _ = read_groups_beir(folder, cache_dir=cache)
    dataset = GroupDataset(groups, group_size=4, seed=0, corpus=corpus)
    assert dataset.stats["groups_filled"] == 2
    for epoch in range(5):
        dataset.set_epoch(epoch)
        item = dataset[0]  # q1: positive d0
        assert item["docs"][0] == "doc number 0"
        assert "doc number 0" not in item["docs"][1:] and len(set(item["docs"])) == 4
    # a corpus with nothing but positives cannot give negatives
    with pytest.raises(ValueError, match="no document that is not a positive"):
        GroupDataset(groups, group_size=4, corpus=corpus.select([0]))[0]


def test_no_negatives_and_no_corpus_is_an_error(tmp_path, cache):
    path = write_lines(tmp_path / "nonneg.jsonl", [group("q0", ["p0"], ["n"]), group("q1", ["p1"])])
    groups, _ = read_groups_jsonl(path, cache_dir=cache)
    with pytest.raises(ValueError, match="line 2.*no corpus is known"):
        GroupDataset(groups, group_size=2)
    assert GroupDataset(groups, group_size=1)[1]["docs"] == ["p1"]


# ---------------------------------------------------------------------------------- collator
@pytest.fixture(scope="module")
def encoder():
    config = SparseEncoderConfig(query_max_length=8, doc_max_length=6)
    return SparseEncoder(tiny_model("llama"), tiny_tokenizer(), config)


def test_collator_shapes_and_grouping(encoder):
    items = [
        {"query": "aa ab", "docs": ["ba bb", "ca", "da db dc"], "scores": [3.0, 1.0, 0.5]},
        {"query": "ac", "docs": ["ea eb ec ed ee ef eg eh", "fa", "ga gb"], "scores": [2, 0, -1]},
    ]
    batch = GroupCollator(encoder.tokenize)(items)
    q, d = batch["query"], batch["doc"]
    assert set(q) == set(d) == {"input_ids", "attention_mask", "pool_mask"}
    assert q["input_ids"].shape[0] == 2
    assert d["input_ids"].shape[0] == 6 and d["pool_mask"].shape == d["input_ids"].shape
    assert batch["teacher_scores"].shape == (2, 3)
    assert batch["teacher_scores"].dtype == torch.float32
    assert batch["teacher_scores"].tolist() == [[3.0, 1.0, 0.5], [2.0, 0.0, -1.0]]
    assert batch["n_truncated_doc"] == 1 and batch["n_truncated_query"] == 0
    flat = [doc for item in items for doc in item["docs"]]
    for row, text in enumerate(flat):  # row i*n + j holds query i's doc j
        alone = encoder.tokenize([text], "doc")
        width = int(alone["attention_mask"].sum())
        assert torch.equal(d["input_ids"][row, :width], alone["input_ids"][0, :width])
        assert int(d["attention_mask"][row].sum()) == width
    alone = encoder.tokenize(["ac"], "query")
    width = int(alone["attention_mask"].sum())
    assert torch.equal(q["input_ids"][1, :width], alone["input_ids"][0, :width])


def test_collator_without_scores_and_bad_batches(encoder):
    collate = GroupCollator(encoder.tokenize)
    plain = [{"query": "aa", "docs": ["ba", "bb"], "scores": None}] * 3
    batch = collate(plain)
    assert "teacher_scores" not in batch and batch["doc"]["input_ids"].shape[0] == 6
    scored = {"query": "aa", "docs": ["ba", "bb"], "scores": [1.0, 0.0]}
    with pytest.raises(ValueError, match=r"items \[1\] have teacher scores but items \[0, 2\]"):
        collate([plain[0], scored, plain[0]])
    with pytest.raises(ValueError, match="item 1 has 3 docs"):
        collate([plain[0], {"query": "x", "docs": ["a", "b", "c"], "scores": None}])
    with pytest.raises(ValueError, match="empty batch"):
        collate([])


def test_dataset_and_collator_together(long_groups, encoder):
    dataset = GroupDataset(long_groups, group_size=4, seed=0)
    batch = GroupCollator(encoder.tokenize)([dataset[i] for i in range(3)])
    assert batch["doc"]["input_ids"].shape[0] == 12
    assert batch["teacher_scores"].shape == (3, 4)
    assert (batch["teacher_scores"][:, 0] >= 10).all()  # column 0 is the positive


# ---------------------------------------------------------------------------------- raw texts
def test_read_texts_plain_text_counts_blank_lines(tmp_path, cache, caplog):
    path = tmp_path / "texts.txt"
    path.write_text("first text\n\n   \nsecond text\r\nthird\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="csplade.data"):
        texts = read_texts(path, cache_dir=cache)
    assert texts.column_names == ["text"]
    assert texts["text"] == ["first text", "second text", "third"]
    assert any("2 blank lines are not texts" in m for m in caplog.messages)
    assert read_texts(path, max_texts=2, cache_dir=cache)["text"] == ["first text", "second text"]
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"{blank}: empty file"):
        read_texts(blank, cache_dir=cache)


def test_read_texts_jsonl_and_folder(tmp_path, cache, caplog):
    folder = tmp_path / "beir"
    docs = [
        {"_id": "a", "title": "Title", "text": "body a"},
        {"_id": "b", "text": "body b"},
        {"_id": "c", "title": "", "text": ""},
    ]
    write_lines(folder / "corpus.jsonl", docs)
    with caplog.at_level(logging.WARNING, logger="csplade.data"):
        from_file = read_texts(folder / "corpus.jsonl", cache_dir=cache)
    assert from_file["text"] == [doc_text(d) for d in docs[:2]] == ["Title body a", "body b"]
    assert any("1 empty documents are not texts" in m for m in caplog.messages)
    assert read_texts(folder, cache_dir=cache)["text"] == from_file["text"]
    with pytest.raises(FileNotFoundError, match="without corpus.jsonl"):
        read_texts(tmp_path, cache_dir=cache)


def test_read_texts_bad_jsonl_record(tmp_path, cache, caplog):
    path = write_lines(
        tmp_path / "c.jsonl", [{"text": "ok"}, "{nope", {"text": 3}, {"text": "yes"}]
    )
    with pytest.raises(ValueError, match=rf"{path}:2: malformed JSON"):
        read_texts(path, cache_dir=cache)
    with caplog.at_level(logging.WARNING, logger="csplade.data"):
        texts = read_texts(path, skip_bad_rows=True, cache_dir=cache)
    assert texts["text"] == ["ok", "yes"]
    assert any(m.startswith(f"{path}:3: skipped") for m in caplog.messages)
    assert any("skipped 2 bad record(s)" in m for m in caplog.messages)


def test_plain_text_that_looks_like_jsonl_warns(tmp_path, cache, caplog):
    path = write_lines(tmp_path / "corpus.json", [{"_id": "a", "text": "x"}])
    with caplog.at_level(logging.WARNING, logger="csplade.data"):
        texts = read_texts(path, cache_dir=cache)
    assert texts["text"] == ['{"_id": "a", "text": "x"}']
    assert any("name it *.jsonl" in m for m in caplog.messages)


# ------------------------------------------------------------------------------- entry point
def test_load_training_groups_dispatch(tmp_path, cache):
    path = write_lines(
        tmp_path / "g.jsonl", [group(f"q{i}", ["p"], ["n1", "n2"]) for i in range(5)]
    )
    args = DataArguments(train_data=str(path), group_size=3, max_train_queries=2)
    dataset = load_training_groups(args, seed=1, cache_dir=cache)
    assert len(dataset) == 2 and dataset[0]["docs"][0] == "p" and len(dataset[0]["docs"]) == 3

    folder = make_beir(tmp_path)
    dataset = load_training_groups(
        DataArguments(train_data=str(folder), group_size=2), seed=0, cache_dir=cache
    )
    assert [len(item["docs"]) for item in (dataset[0], dataset[1])] == [2, 2]

    other = tmp_path / "notes.txt"
    other.write_text("hello\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"train_data {other}: a text file, not training groups"):
        load_training_groups(DataArguments(train_data=str(other)), seed=0, cache_dir=cache)
    table = tmp_path / "groups.csv"
    table.write_text("query,positive\n", encoding="utf-8")
    with pytest.raises(
        ValueError, match=f"train_data {table}: unknown file type; expected a .jsonl"
    ):
        load_training_groups(DataArguments(train_data=str(table)), seed=0, cache_dir=cache)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.md").write_text("hello\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not a BEIR folder.*holds no .jsonl/.parquet/.arrow"):
        load_training_groups(
            DataArguments(train_data=str(tmp_path / "notes")), seed=0, cache_dir=cache
        )
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        load_training_groups(
            DataArguments(train_data=str(tmp_path / "nowhere.jsonl")), seed=0, cache_dir=cache
        )
    with pytest.raises(ValueError, match="train_data is not set"):
        load_training_groups(DataArguments(), seed=0, cache_dir=cache)
    with pytest.raises(ValueError, match="negatives_run applies to a BEIR folder"):
        load_training_groups(
            DataArguments(train_data=str(path), negatives_run="run.trec"), seed=0, cache_dir=cache
        )


def test_calibration_texts_are_spread_over_sources_in_one_file(tmp_path):
    """Groups of two data sets one after the other: calibration samples both, not the first only."""
    from csplade.data.groups import load_training_groups
    from csplade.data.texts import calibration_documents, query_texts
    from csplade.training.arguments import DataArguments

    path = tmp_path / "groups.jsonl"
    with path.open("w") as f:
        for source in ("first", "second"):
            for i in range(50):
                row = {"query": f"{source} query {i}", "positives": [f"{source} doc {i}"],
                       "negatives": [f"{source} negative {i} {j}" for j in range(3)]}  # fmt: skip
                f.write(json.dumps(row) + "\n")
    dataset = load_training_groups(
        DataArguments(train_data=str(path), group_size=2), seed=0, cache_dir=tmp_path / "cache"
    )
    queries = query_texts(dataset, 10)
    assert len(queries) == 10 == len(set(queries))
    assert {q.split()[0] for q in queries} == {"first", "second"}
    assert queries[0] == "first query 0" and queries[-1] == "second query 49"
    docs = calibration_documents(dataset, 20)
    assert len(docs) == 20 == len(set(docs))
    # a positive of each of the 20 spread groups first, both sources among them
    assert all(" doc " in d for d in docs) and {d.split()[0] for d in docs} == {"first", "second"}
    docs = calibration_documents(dataset, 500)  # every document once
    assert len(docs) == 400 == len(set(docs))


def test_query_length_spans_draw_one_sentence_per_text_seeded():
    from csplade.data.texts import query_length_spans

    texts = ["First claim here. Second claim is longer! A third one?", "no boundary at all here"]
    spans = query_length_spans(texts, seed=3)
    assert spans == query_length_spans(texts, seed=3)
    assert spans[0] in {"First claim here.", "Second claim is longer!", "A third one?"}
    assert spans[1] == texts[1]
    drawn = {query_length_spans(texts, seed=s)[0] for s in range(20)}
    assert len(drawn) == 3
