"""BEIR folder reading: formats, every error path, the drop/keep conventions, real data counts."""

from __future__ import annotations

import json
import logging
import os
import zipfile
from pathlib import Path

import pytest

from csplade.data.beir import (
    BEIR_URL,
    available_splits,
    doc_text,
    download_beir,
    find_dataset,
    iter_corpus,
    load_beir,
    load_corpus,
    load_qrels,
    load_queries,
)

DATA_DIR = Path(
    os.environ.get("CSPLADE_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data")
)


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_qrels(path: Path, rows: list[tuple], header: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["query-id\tcorpus-id\tscore"] if header else []
    lines += ["\t".join(str(x) for x in row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def make_folder(root: Path, name: str = "toy") -> Path:
    folder = root / name
    write_jsonl(
        folder / "corpus.jsonl",
        [
            {"_id": "d2", "title": "Second", "text": "beta text"},
            {"_id": "d1", "title": "", "text": "  alpha text  "},
            {"_id": 3, "text": "gamma"},  # integer id, no title
            {"_id": "d4", "title": " ", "text": ""},  # empty: kept and counted
        ],
    )
    write_jsonl(
        folder / "queries.jsonl",
        [
            {"_id": "q1", "text": "alpha?"},
            {"_id": "q2", "text": "beta?"},
            {"_id": "q3", "text": "never judged"},
        ],
    )
    write_qrels(
        folder / "qrels" / "test.tsv", [("q2", "d2", 1), ("q1", "d1", 2), ("q1", "gone", 1)]
    )
    write_qrels(folder / "qrels" / "train.tsv", [("q3", "d2", 1)])
    return folder


# ---------------------------------------------------------------- happy path


def test_load_beir_keeps_file_order_and_counts_what_it_drops(tmp_path, caplog):
    folder = make_folder(tmp_path)
    with caplog.at_level(logging.INFO, logger="csplade.data.beir"):
        data = load_beir(folder)
    assert data.name == "toy" and data.split == "test"
    assert data.doc_ids == ["d2", "d1", "3", "d4"]
    assert data.doc_texts == ["Second beta text", "alpha text", "gamma", ""]
    assert data.n_empty_docs == 1
    # q3 has no judgment in test: dropped and counted; order follows queries.jsonl
    assert data.queries == {"q1": "alpha?", "q2": "beta?"}
    assert data.n_queries_dropped == 1
    # the judgment of a doc that is not in the corpus is kept (it caps recall) and counted
    assert data.qrels == {"q2": {"d2": 1}, "q1": {"d1": 2, "gone": 1}}
    assert data.n_qrels_unknown_docs == 1
    assert data.n_qrels_unknown_queries == 0
    assert "no judgments" in caplog.text and "absent from the corpus" in caplog.text


def test_load_beir_other_split(tmp_path):
    data = load_beir(make_folder(tmp_path), split="train")
    assert data.queries == {"q3": "never judged"}
    assert data.n_queries_dropped == 2
    assert available_splits(tmp_path / "toy") == ["test", "train"]


def test_qrels_for_unknown_queries_are_removed_and_counted(tmp_path):
    folder = make_folder(tmp_path)
    write_qrels(folder / "qrels" / "test.tsv", [("q1", "d1", 1), ("q404", "d2", 1)])
    data = load_beir(folder)
    assert set(data.qrels) == {"q1"} and list(data.queries) == ["q1"]
    assert data.n_qrels_unknown_queries == 1


def test_doc_text_follows_beir_convention():
    assert doc_text({"title": "T", "text": "body"}) == "T body"
    assert doc_text({"title": "  ", "text": " body "}) == "body"
    assert doc_text({"text": "body"}) == "body"
    assert doc_text({"title": "Only title", "text": ""}) == "Only title"
    assert doc_text({"title": None, "text": "x"}) == "x"


def test_qrels_header_is_optional_and_scores_are_ints(tmp_path):
    path = write_qrels(tmp_path / "q.tsv", [("1", "a", 0), ("1", "b", 3)], header=False)
    assert load_qrels(path) == {"1": {"a": 0, "b": 3}}


def test_iter_corpus_is_lazy(tmp_path):
    path = write_jsonl(tmp_path / "corpus.jsonl", [{"_id": "a", "text": "x"}, "{broken"])
    stream = iter_corpus(path)
    assert next(stream) == ("a", {"title": "", "text": "x"})
    with pytest.raises(ValueError, match=r"corpus\.jsonl:2"):
        next(stream)


# ---------------------------------------------------------------- bad input


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_beir(tmp_path / "nope")


@pytest.mark.parametrize("missing", ["corpus.jsonl", "queries.jsonl"])
def test_missing_corpus_or_queries_names_the_path(tmp_path, missing):
    folder = make_folder(tmp_path)
    (folder / missing).unlink()
    with pytest.raises(FileNotFoundError) as info:
        load_beir(folder)
    assert str(folder / missing) in str(info.value)


def test_missing_split_names_path_and_existing_splits(tmp_path):
    folder = make_folder(tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        load_beir(folder, split="dev")
    message = str(info.value)
    assert str(folder / "qrels" / "dev.tsv") in message
    assert "test, train" in message


def test_missing_qrels_folder_says_no_splits(tmp_path):
    folder = make_folder(tmp_path)
    for p in (folder / "qrels").iterdir():
        p.unlink()
    with pytest.raises(FileNotFoundError, match="splits in this folder: none"):
        load_beir(folder)


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = write_jsonl(
        tmp_path / "corpus.jsonl",
        [{"_id": "a", "text": "x"}, {"_id": "b", "text": "y"}, '{"_id": "c", "text": '],
    )
    with pytest.raises(ValueError, match=rf"{path}:3: malformed JSON"):
        load_corpus(path)


@pytest.mark.parametrize(
    "record, problem",
    [
        ({"text": "no id"}, "_id"),
        ({"_id": "a"}, "text"),
        ({"_id": "a", "text": None}, "text"),
        ({"_id": ["a"], "text": "x"}, "_id"),
        ({"_id": "a", "text": "x", "title": 5}, "title"),
        ([1, 2], "JSON object"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, record, problem):
    path = write_jsonl(tmp_path / "queries.jsonl", [{"_id": "ok", "text": "fine"}, record])
    with pytest.raises(ValueError, match=rf"queries\.jsonl:2: .*{problem}"):
        load_queries(path)


def test_duplicate_doc_id_names_id_and_both_lines(tmp_path):
    path = write_jsonl(
        tmp_path / "corpus.jsonl",
        [{"_id": "a", "text": "1"}, {"_id": "b", "text": "2"}, {"_id": "a", "text": "3"}],
    )
    with pytest.raises(ValueError, match=r"duplicate doc id 'a' on lines 1 and 3"):
        load_corpus(path)


def test_duplicate_doc_id_caught_by_load_beir(tmp_path):
    folder = make_folder(tmp_path)
    write_jsonl(folder / "corpus.jsonl", [{"_id": "d1", "text": "1"}, {"_id": "d1", "text": "2"}])
    with pytest.raises(ValueError, match="duplicate doc id 'd1'"):
        load_beir(folder)


def test_duplicate_query_id(tmp_path):
    path = write_jsonl(
        tmp_path / "queries.jsonl", [{"_id": "q", "text": "1"}, {"_id": "q", "text": "2"}]
    )
    with pytest.raises(ValueError, match=r"duplicate query id 'q' on lines 1 and 2"):
        load_queries(path)


@pytest.mark.parametrize(
    "row, problem",
    [
        ("q1\td1", "expected 3 tab-separated fields"),
        ("q1\td1\t1\textra", "expected 3 tab-separated fields"),
        ("q1 d1 1", "expected 3 tab-separated fields"),
        ("q1\td1\trelevant", "score must be an integer"),
        ("q1\td1\t0.5", "score must be an integer"),
        ("\td1\t1", "empty query-id"),
    ],
)
def test_malformed_qrels_row_names_file_and_line(tmp_path, row, problem):
    path = tmp_path / "test.tsv"
    path.write_text(f"query-id\tcorpus-id\tscore\nq0\td0\t1\n{row}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"test\.tsv:3: {problem}"):
        load_qrels(path)


def test_conflicting_qrels_rows(tmp_path):
    path = write_qrels(tmp_path / "test.tsv", [("q", "d", 1), ("q", "e", 1), ("q", "d", 2)])
    with pytest.raises(ValueError, match=r"conflicting scores .* lines 2 \(1\) and 4 \(2\)"):
        load_qrels(path)


def test_repeated_identical_qrels_row_is_logged(tmp_path, caplog):
    path = write_qrels(tmp_path / "test.tsv", [("q", "d", 1), ("q", "d", 1)])
    with caplog.at_level(logging.WARNING, logger="csplade.data.beir"):
        assert load_qrels(path) == {"q": {"d": 1}}
    assert "1 repeated" in caplog.text


# ---------------------------------------------------------------- locating and downloading


def test_find_dataset_by_path_by_name_and_not_found(tmp_path, monkeypatch):
    folder = make_folder(tmp_path)
    assert find_dataset(folder) == folder
    monkeypatch.setenv("CSPLADE_DATA", str(tmp_path))
    assert find_dataset("toy") == folder
    assert find_dataset("toy", data_dir=tmp_path) == folder
    with pytest.raises(FileNotFoundError) as info:
        find_dataset("nfcorpus")
    message = str(info.value)
    assert str(tmp_path / "nfcorpus") in message
    assert BEIR_URL.format(name="nfcorpus") in message
    assert "CSPLADE_DATA" in message and "download_beir" in message
    monkeypatch.delenv("CSPLADE_DATA")
    with pytest.raises(FileNotFoundError, match=r"\$CSPLADE_DATA is not set"):
        find_dataset("toy")


def _zip_folder(folder: Path, archive: Path, prefix: str) -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for p in folder.rglob("*"):
            if p.is_file():
                zf.write(p, f"{prefix}{p.relative_to(folder)}")
    return archive


def test_download_beir_from_a_local_url(tmp_path):
    source = make_folder(tmp_path / "src")
    archive = _zip_folder(source, tmp_path / "toy.zip", prefix="toy/")
    dest = tmp_path / "datasets"
    got = download_beir("toy", dest, url=archive.as_uri())
    assert got == dest / "toy"
    assert load_beir(got).doc_ids == ["d2", "d1", "3", "d4"]
    assert sorted(p.name for p in dest.iterdir()) == ["toy"]  # no temporary leftovers
    # an existing folder is returned without fetching anything (this URL does not exist)
    assert download_beir("toy", dest, url=(tmp_path / "missing.zip").as_uri()) == got


def test_download_beir_rejects_bad_archives(tmp_path):
    unsafe = tmp_path / "unsafe.zip"
    with zipfile.ZipFile(unsafe, "w") as zf:
        zf.writestr("../evil/corpus.jsonl", "{}")
    with pytest.raises(ValueError, match="unsafe path"):
        download_beir("toy", tmp_path / "a", url=unsafe.as_uri())
    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("toy/readme.txt", "nothing here")
    with pytest.raises(ValueError, match="not a BEIR dataset"):
        download_beir("toy", tmp_path / "b", url=empty.as_uri())
    assert not (tmp_path / "b" / "toy").exists()
    assert list((tmp_path / "b").iterdir()) == []
    with pytest.raises(ValueError, match="plain folder name"):
        download_beir("../x", tmp_path)


# ---------------------------------------------------------------- real data


def _real(name: str) -> Path:
    folder = DATA_DIR / name
    if not (folder / "corpus.jsonl").is_file():
        pytest.skip(f"{folder} not available (set CSPLADE_DATA)")
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("name", ["scifact", "cranfield", "adi"])
def test_real_datasets_match_their_stats(name):
    folder = _real(name)
    stats = json.loads((folder / "stats.json").read_text())
    for split, expected in stats["splits"].items():
        data = load_beir(folder, split=split)
        assert len(data.doc_ids) == stats["docs"]
        assert len(data.queries) == expected["queries"]
        assert sum(map(len, data.qrels.values())) == expected["qrels"]
        scores: dict[str, int] = {}
        for judged in data.qrels.values():
            for s in judged.values():
                scores[str(s)] = scores.get(str(s), 0) + 1
        assert scores == expected["score_counts"]
        assert data.n_qrels_unknown_docs == 0 and data.n_qrels_unknown_queries == 0
        assert data.n_queries_dropped == stats["queries_kept"] - expected["queries"]
        assert data.n_empty_docs == stats["empty_docs"] == sum(not t for t in data.doc_texts)
