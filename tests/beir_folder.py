"""A BEIR folder written from Python literals, for tests that need one on disk."""

from __future__ import annotations

import json
from pathlib import Path


def write_beir(
    folder: Path,
    docs: dict[str, tuple[str, str]],
    queries: dict[str, str],
    qrels: list[tuple[str, str, int]],
    split: str = "train",
) -> Path:
    """`folder`/corpus.jsonl ({id: (title, text)}), queries.jsonl and qrels/`split`.tsv; returns `folder`."""
    (folder / "qrels").mkdir(parents=True)
    with open(folder / "corpus.jsonl", "w") as fh:
        for doc_id, (title, text) in docs.items():
            fh.write(json.dumps({"_id": doc_id, "title": title, "text": text}) + "\n")
    with open(folder / "queries.jsonl", "w") as fh:
        for query_id, text in queries.items():
            fh.write(json.dumps({"_id": query_id, "text": text}) + "\n")
    with open(folder / "qrels" / f"{split}.tsv", "w") as fh:
        fh.write("query-id\tcorpus-id\tscore\n")
        fh.writelines(f"{q}\t{d}\t{s}\n" for q, d, s in qrels)
    return folder
