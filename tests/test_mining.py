"""Hard-negative mining: the window rule, judged positives excluded, output readable as training groups."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from beir_folder import write_beir

from csplade.data.beir import doc_text, load_qrels
from csplade.data.groups import read_groups_jsonl
from csplade.data.mining import mine, mine_negatives, ranked
from csplade.index.bm25 import bm25_search

DOCS = {
    "d1": ("Fruit", "apple banana cherry"),
    "d2": ("", "apple banana"),
    "d3": ("", "apple"),
    "d4": ("", "banana cherry date"),
    "d5": ("", "zebra yak"),
    "d6": ("", "cherry date elder"),
    "d7": ("", "apple cherry"),
    "d8": ("", ""),  # empty: never usable
}
QUERIES = {
    "q1": "apple banana cherry",
    "q2": "banana date",
    "q3": "zebra",
    "q5": "nothingmatches",
    "q6": "apple",
}
QRELS = [
    ("q1", "d1", 1),
    ("q1", "d2", 0),  # judged non-relevant: stays a negative
    ("q1", "d7", 2),
    ("q2", "d4", 2),
    ("q2", "missing", 1),  # absent from the corpus
    ("q3", "d5", 0),  # no positive: dropped
    ("q4", "d3", 1),  # no text in queries.jsonl: dropped
    ("q5", "d3", 1),  # BM25 finds nothing: written with no negatives
    ("q6", "d3", 1),
]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------- the window rule


def test_window_excludes_judged_positives_keeps_judged_nonrelevant_and_cuts():
    run = {"q": {"a": 5.0, "p": 4.0, "b": 3.0, "c": 3.0, "n": 2.0, "d": 1.0}}
    qrels = {"q": {"p": 1, "n": 0, "x": 2}, "empty": {"n": 0}}
    # ranks 2..5 = p, b, c, n (b before c: tie kept in run order); p is a judged positive
    negatives, stats = mine_negatives(run, qrels, depth=5, skip_top=1)
    assert negatives == {"q": ["b", "c", "n"]}
    assert stats["run_positives_excluded"] == 1
    assert stats["judged_nonrelevant_kept"] == 1
    assert stats["queries_no_judged_positive"] == 1
    negatives, stats = mine_negatives(run, qrels, depth=5, skip_top=1, n_negatives=2)
    assert negatives == {"q": ["b", "c"]} and stats["negatives_beyond_cut"] == 1
    # a run as ranked pairs (ties in list order), and a usable-docs filter applied before the cut
    pairs = {"q": [("d", 1.0), ("c", 3.0), ("b", 3.0), ("a", 5.0)]}
    negatives, stats = mine_negatives(pairs, qrels, depth=10, n_negatives=2, usable={"a", "b", "d"})
    assert negatives == {"q": ["a", "b"]} and stats["negatives_not_usable"] == 1
    # depth 1 with the positive on top: nothing left
    negatives, _ = mine_negatives({"q": {"p": 9.0, "a": 1.0}}, qrels, depth=1)
    assert negatives == {"q": []}


def test_window_argument_errors():
    with pytest.raises(ValueError, match="depth"):
        mine_negatives({}, {}, depth=0)
    with pytest.raises(ValueError, match="skip_top"):
        mine_negatives({}, {}, depth=5, skip_top=5)
    with pytest.raises(ValueError, match="n_negatives"):
        mine_negatives({}, {}, n_negatives=0)


# ---------------------------------------------------------------------------------- BM25 mining


def test_bm25_mining_on_a_small_folder(tmp_path):
    folder = write_beir(tmp_path / "toy", DOCS, QUERIES, QRELS)
    out = tmp_path / "groups.jsonl"
    stats = mine(folder, out, model="bm25", depth=4, n_negatives=3)
    groups = read_jsonl(out)
    by_id = {g["query_id"]: g for g in groups}
    assert set(by_id) == {"q1", "q2", "q5", "q6"}  # q3: no positive; q4: no text
    assert stats["queries_no_judged_positive"] == 1 and stats["queries_missing_text"] == 1
    assert stats["positives_not_in_corpus"] == 1 and stats["queries_without_negatives"] == 1

    qrels = load_qrels(folder / "qrels" / "train.tsv")
    usable = {d for d, (title, text) in DOCS.items() if text or title}
    texts = [doc_text({"title": DOCS[d][0], "text": DOCS[d][1]}) for d in sorted(usable)]
    reference = bm25_search(sorted(usable), texts, QUERIES, k=4)
    for query_id, group in by_id.items():
        positives = {d for d, s in qrels[query_id].items() if s > 0}
        negative_ids = [item["_id"] for item in group["negatives"]]
        assert not positives & set(negative_ids), query_id
        assert len(negative_ids) <= 3
        top = ranked(reference[query_id])[:4]
        assert negative_ids == [d for d in top if d not in positives][:3]
        # ids travel with their title and text
        for item in group["positives"] + group["negatives"]:
            assert (item["title"], item["text"]) == DOCS[item["_id"]]
    assert [i["_id"] for i in by_id["q1"]["positives"]] == ["d1", "d7"]
    assert "d2" in [i["_id"] for i in by_id["q1"]["negatives"]]  # judged non-relevant kept
    assert by_id["q5"]["negatives"] == []
    assert [i["_id"] for i in by_id["q2"]["positives"]] == ["d4"]

    # readable by the trainer's reader, texts as the trainer indexes them
    table, reader_stats = read_groups_jsonl(out, cache_dir=tmp_path / "cache")
    assert reader_stats["groups"] == len(groups)
    row = table[[r["query_id"] for r in table].index("q1")]
    assert row["positives"] == [
        doc_text({"title": "Fruit", "text": "apple banana cherry"}),
        "apple cherry",
    ]
    assert row["query"] == "apple banana cherry"

    kept = tmp_path / "kept.jsonl"
    stats = mine(folder, kept, model="bm25", depth=4, n_negatives=3, drop_without_negatives=True)
    assert stats["dropped_without_negatives"] == 1 and stats["groups"] == len(groups) - 1
    assert read_jsonl(kept) == [g for g in groups if g["query_id"] != "q5"]


def test_depth_and_skip_top_limit_the_window(tmp_path):
    folder = write_beir(tmp_path / "toy", DOCS, QUERIES, QRELS)
    run = {"q6": {"d3": 9.0, "d2": 8.0, "d7": 7.0, "d1": 6.0, "d4": 5.0}}
    run_file = tmp_path / "run.trec"
    run_file.write_text(
        "".join(f"q6 Q0 {d} {i + 1} {s} x\n" for i, (d, s) in enumerate(run["q6"].items()))
    )
    out = tmp_path / "g.jsonl"
    mine(folder, out, run_file=run_file, depth=4, skip_top=2)
    q6 = {g["query_id"]: g for g in read_jsonl(out)}["q6"]
    assert [i["_id"] for i in q6["negatives"]] == ["d7", "d1"]  # ranks 3..4
    mine(folder, out, run_file=run_file, depth=2)
    q6 = {g["query_id"]: g for g in read_jsonl(out)}["q6"]
    assert [i["_id"] for i in q6["negatives"]] == ["d2"]  # rank 1 is the positive d3


def test_missing_split_and_missing_corpus_name_the_path(tmp_path):
    folder = write_beir(tmp_path / "toy", DOCS, QUERIES, QRELS)
    with pytest.raises(FileNotFoundError, match=r"qrels.*test\.tsv.*splits in this folder: train"):
        mine(folder, tmp_path / "g.jsonl", split="test")
    (folder / "corpus.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=str(folder / "corpus.jsonl")):
        mine(folder, tmp_path / "g.jsonl")
    assert not (tmp_path / "g.jsonl").exists()


@pytest.mark.slow
def test_bm25_mining_on_scifact_train_excludes_every_judged_positive(data_root, tmp_path):
    out = tmp_path / "scifact.jsonl"
    start = time.perf_counter()
    stats = mine(data_root / "scifact", out, model="bm25", split="train", depth=30, n_negatives=8)
    seconds = time.perf_counter() - start
    qrels = load_qrels(data_root / "scifact" / "qrels" / "train.tsv")
    groups = read_jsonl(out)
    assert len(groups) == stats["groups"] == 809
    assert stats["run_positives_excluded"] > 50  # BM25 does find many positives in its top 30
    n_negatives = 0
    for group in groups:
        positives = {d for d, s in qrels[group["query_id"]].items() if s > 0}
        negative_ids = [item["_id"] for item in group["negatives"]]
        assert not positives & set(negative_ids)
        assert len(negative_ids) == len(set(negative_ids)) <= 8
        assert {item["_id"] for item in group["positives"]} == positives
        n_negatives += len(negative_ids)
    assert n_negatives > 800 * 7
    table, _ = read_groups_jsonl(out, cache_dir=tmp_path / "cache")
    assert len(table) == 809
    print(f"scifact train BM25 mining: {seconds:.1f}s")


def test_sentences_and_pseudo_pairs():
    from csplade.data.pseudo import pseudo_queries, sentences

    assert sentences("One thing here. Two? Three! 4 more.") == [
        "One thing here.",
        "Two?",
        "Three!",
        "4 more.",
    ]
    corpus = {
        "a": {"title": "Vitamin D and sclerosis", "text": "First claim here. Second claim. Third."},
        "b": {"title": "", "text": "No title at all here. But sentences. Plenty of them."},
        "c": {"title": "Short", "text": "x"},
    }
    queries, qrels, positives, counts = pseudo_queries(corpus, "title")
    assert queries == {"pq-a": "Vitamin D and sclerosis"} and qrels == {"pq-a": {"a": 1}}
    assert positives["a"] == {"title": "", "text": corpus["a"]["text"]}  # the body, no title
    assert counts["pseudo_skipped"] == 2
    queries, qrels, positives, _ = pseudo_queries(corpus, "sentence", seed=3)
    for query_id, query in queries.items():
        doc = next(iter(qrels[query_id]))
        assert query in corpus[doc]["text"] and query not in positives[doc]["text"]  # ICT
    with pytest.raises(ValueError, match="unknown method"):
        pseudo_queries(corpus, "summary")


def test_pseudo_query_mining_writes_groups_without_the_own_document(adi, tmp_path):
    out = tmp_path / "pseudo.jsonl"
    stats = mine(adi, out, pseudo="sentence", n_negatives=4, max_queries=30, seed=1)
    assert stats["pseudo_queries"] + stats["pseudo_skipped"] == 30
    groups, _ = read_groups_jsonl(out)
    assert len(groups) == stats["groups"] == stats["pseudo_queries"] > 10
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for row in rows:
        own = row["positives"][0]["_id"]
        assert row["query_id"] == f"pq-{own}"
        assert own not in {n["_id"] for n in row["negatives"]} and len(row["negatives"]) <= 4
        assert row["query"] not in row["positives"][0]["text"]
    assert sum(len(row["negatives"]) == 4 for row in rows) > len(rows) // 2


def test_hold_out_leaves_out_the_queries_of_the_dev_slice(data_root, tmp_path):
    """`hold_out=N` drops exactly the queries a dev slice of the same split (eval_max_queries <= N)
    evaluates on, and nothing else."""
    from csplade.data.beir import load_beir
    from csplade.evaluation.beir_eval import slice_data

    out = tmp_path / "held.jsonl"
    stats = mine(data_root / "scifact", out, model="bm25", split="train", depth=10, hold_out=60)
    dev, _ = slice_data(load_beir(data_root / "scifact", split="train"), 400, 60)
    kept = {g["query_id"] for g in read_jsonl(out)}
    assert stats["held_out_queries"] == len(dev.queries) == 60
    assert not kept & set(dev.queries)
    assert len(kept) == stats["groups"] == 809 - 60
    with pytest.raises(ValueError, match="hold_out"):
        mine(data_root / "scifact", out, model="bm25", pseudo="title", hold_out=5)
