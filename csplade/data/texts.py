"""Unlabeled text (the adaptation phase's data) and the IDF of the training documents.

`read_texts` reads a corpus.jsonl, a BEIR folder or a plain-text file into a cached Arrow table
(:mod:`csplade.data.rows`); `corpus_idf` counts document frequencies over a `GroupDataset`'s documents.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from datasets import Features, Value
from tqdm.auto import tqdm

from csplade.data.beir import doc_text
from csplade.data.rows import (
    SKIP_FEATURES,
    BadRow,
    Skip,
    attach_skips,
    describe,
    fingerprint,
    from_generator,
    read_lines,
    report_skips,
    require_rows,
)
from csplade.data.sampling import GroupDataset

logger = logging.getLogger(__name__)

_TEXT_FEATURES = Features({"text": Value("string"), "line": Value("int64"), **SKIP_FEATURES})


def _text_rows(
    path: str, jsonl: bool, skip_bad_rows: bool, max_texts: int | None
) -> Iterator[dict[str, Any] | Skip]:
    n_texts = 0
    for line_no, line in read_lines(Path(path)):
        if max_texts is not None and n_texts >= max_texts:
            return
        try:
            if isinstance(line, BadRow):
                raise line
            if jsonl and not line.strip():
                continue  # a blank line between JSON records is not a record
            text = _corpus_line_text(line) if jsonl else line.strip()
        except BadRow as exc:
            if not skip_bad_rows:
                raise ValueError(
                    f"{path}:{line_no}: {exc} (skip_bad_rows=True skips such rows)"
                ) from None
            yield Skip(line_no, str(exc))
            continue
        if not text:
            yield Skip(line_no)
            continue
        n_texts += 1
        yield {"text": text, "line": line_no}


def _generate_texts(
    path: str, jsonl: bool, skip_bad_rows: bool, max_texts: int | None
) -> Iterator[dict[str, Any]]:
    yield from attach_skips(_text_rows(path, jsonl, skip_bad_rows, max_texts), path)


def _corpus_line_text(line: str) -> str:
    """The `doc_text` of one corpus.jsonl record ("" for an empty document); `BadRow` if invalid."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise BadRow(f"malformed JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise BadRow(f"expected a JSON object, got {type(record).__name__}")
    if not isinstance(record.get("text"), str):
        raise BadRow(f"record needs a string 'text', got {describe(record.get('text'))}")
    title = record.get("title")
    if title is not None and not isinstance(title, str):
        raise BadRow(f"record has a non-string 'title': {describe(title)}")
    return doc_text(record)


def read_texts(
    path: str | os.PathLike,
    skip_bad_rows: bool = False,
    max_texts: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> datasets.Dataset:
    """Unlabeled texts (a Dataset with one column, ``text``) for the adaptation phase.

    `path` is a corpus.jsonl (each record read with `doc_text`), a BEIR folder (its corpus.jsonl)
    or any other file read as plain text, one text per line. Blank lines (plain text) and empty
    documents (JSONL) are not texts: they are counted and logged. A bad JSONL record raises
    ValueError "path:line: reason" unless `skip_bad_rows`. `max_texts` keeps the first texts only.
    """
    path = Path(path)
    if path.is_dir():
        folder, path = path, path / "corpus.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{folder} is a folder without corpus.jsonl")
    elif not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    if max_texts is not None and max_texts < 1:
        raise ValueError(f"max_texts must be >= 1, got {max_texts}")
    require_rows(path)
    jsonl = path.suffix == ".jsonl"
    if not jsonl:
        _warn_if_jsonl(path)
    table = from_generator(
        _generate_texts,
        {"path": str(path), "jsonl": jsonl, "skip_bad_rows": skip_bad_rows, "max_texts": max_texts},
        _TEXT_FEATURES,
        fingerprint(path, "texts", jsonl, skip_bad_rows, max_texts),
        cache_dir,
    )
    _, n_empty = report_skips(table, path, "record")
    if n_empty:
        what = "empty documents" if jsonl else "blank lines"
        logger.warning("%s: %d %s are not texts (not used)", path, n_empty, what)
    texts = table.select_columns(["text"])
    if max_texts is not None and len(texts) == max_texts:
        logger.info("%s: stopped at max_texts=%d texts", path, max_texts)
    logger.info("%s: %d texts", path, len(texts))
    return texts


def _warn_if_jsonl(path: Path) -> None:
    """A plain-text file whose first line is a JSON object was probably meant as JSONL."""
    with open(path, "rb") as handle:
        first = handle.readline().strip()
    if first.startswith(b"{"):
        try:
            record = json.loads(first)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return
        if isinstance(record, dict) and "text" in record:
            logger.warning(
                "%s: read as plain text (one text per line) but its first line is a JSON record; "
                "name it *.jsonl to read it as a corpus",
                path,
            )


def document_texts(dataset: GroupDataset) -> Iterator[str]:
    """Every distinct document text of a `GroupDataset`: its corpus, or the texts in its groups."""
    if dataset.corpus is not None:
        for start in range(0, len(dataset.corpus), 10_000):
            yield from dataset.corpus[start : start + 10_000]["text"]
        return
    seen: set[str] = set()
    for start in range(0, len(dataset.groups), 10_000):
        batch = dataset.groups[start : start + 10_000]
        for items in (*batch["positives"], *batch["negatives"]):
            for text in items:
                if text not in seen:
                    seen.add(text)
                    yield text


def corpus_idf(encoder: Any, dataset: GroupDataset, batch_size: int = 1024) -> torch.Tensor:
    """IDF (V,) of every vocabulary id over the training documents, float32, always > 0.

    BM25's form ``log(1 + (N - df + 0.5) / (df + 0.5))`` (Robertson & Zaragoza): positive for every id,
    which IDF-aware FLOPS divides by, and largest for ids no document contains. Used as the query
    weights of inference-free models (arXiv 2411.04403) and by ``doc_regularizer: idf_flops``.
    """
    vocab = encoder.vocab_size
    df = np.zeros(vocab, dtype=np.int64)
    n_docs = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal n_docs
        ids = encoder.tokenizer(batch, add_special_tokens=False)["input_ids"]
        for row in ids:
            if row:
                df[np.unique(np.asarray(row, dtype=np.int64))] += 1
        n_docs += len(batch)
        batch.clear()

    for text in tqdm(document_texts(dataset), desc="document frequencies", unit="doc"):
        batch.append(text)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if n_docs == 0:
        raise ValueError("cannot compute IDF: the training data holds no documents")
    idf = np.log1p((n_docs - df + 0.5) / (df + 0.5))
    logger.info(
        "IDF over %d training documents (%d distinct tokens seen)", n_docs, int((df > 0).sum())
    )
    return torch.from_numpy(idf.astype(np.float32))
