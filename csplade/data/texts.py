"""Texts: unlabeled text (the adaptation phase's data), and the texts of the training data.

`read_texts` reads a corpus (JSONL, Parquet or Arrow, optionally gzipped; a BEIR folder; a `datasets`
folder or hub dataset with a 'text' column) or a plain-text file into a cached Arrow table
(:mod:`csplade.data.rows`). `document_texts`, `calibration_documents` and `query_texts` pick the texts
of the training groups that the encoder is fitted on before training (:mod:`csplade.training.setup`).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from datasets import Features, Value

from csplade.data.beir import doc_text
from csplade.data.formats import Source, file_kind, is_saved_dataset, resolve
from csplade.data.pseudo import sentences
from csplade.data.rows import (
    SKIP_FEATURES,
    BadRow,
    Skip,
    attach_skips,
    describe,
    fingerprint,
    from_generator,
    open_binary,
    read_lines,
    report_skips,
    require_rows,
)
from csplade.data.sampling import GroupDataset
from csplade.data.streaming import StreamingGroupDataset

logger = logging.getLogger(__name__)

_TEXT_FEATURES = Features({"text": Value("string"), "line": Value("int64"), **SKIP_FEATURES})


def _text_rows(
    source: Source | str, skip_bad_rows: bool, max_texts: int | None
) -> Iterator[dict[str, Any] | Skip]:
    """Texts of a record source (a corpus: 'text', optional 'title'), or of a plain-text file."""
    if isinstance(source, Source):
        numbered, where = source.records(), source.where
    else:
        numbered, where = read_lines(Path(source)), (lambda n: f"{source}:{n}")
    n_texts = 0
    for number, item in numbered:
        if max_texts is not None and n_texts >= max_texts:
            return
        try:
            if isinstance(item, BadRow):
                raise item
            text = _record_text(item) if isinstance(source, Source) else item.strip()
        except BadRow as exc:
            if not skip_bad_rows:
                raise ValueError(
                    f"{where(number)}: {exc} (skip_bad_rows=True skips such rows)"
                ) from None
            yield Skip(number, str(exc))
            continue
        if not text:
            yield Skip(number)
            continue
        n_texts += 1
        yield {"text": text, "line": number}


def _generate_texts(
    source: Source | str, skip_bad_rows: bool, max_texts: int | None
) -> Iterator[dict[str, Any]]:
    name, unit = (source.name, source.unit) if isinstance(source, Source) else (source, "line")
    yield from attach_skips(_text_rows(source, skip_bad_rows, max_texts), name, unit)


def _record_text(record: Any) -> str:
    """The `doc_text` of one corpus record ("" for an empty document); `BadRow` if invalid."""
    if not isinstance(record, dict):
        raise BadRow(f"expected a JSON object, got {type(record).__name__}")
    if not isinstance(record.get("text"), str):
        raise BadRow(f"record needs a string 'text', got {describe(record.get('text'))}")
    title = record.get("title")
    if title is not None and not isinstance(title, str):
        raise BadRow(f"record has a non-string 'title': {describe(title)}")
    return doc_text(record)


def _text_source(
    path: str | os.PathLike, split: str, config: str | None
) -> tuple[Source | Path, str]:
    """What `read_texts` reads: a record Source or a plain-text file; and the name for messages."""
    plain = Path(path).expanduser()
    if plain.is_file() and file_kind(plain) is None:
        return plain, str(plain)  # any other file: plain text, one text per line
    if plain.is_dir() and not is_saved_dataset(plain):  # a BEIR folder, or a folder with a corpus
        corpus = plain / "corpus.jsonl"
        if not corpus.is_file():
            raise FileNotFoundError(
                f"{plain} is a folder without corpus.jsonl (nor a `datasets` save_to_disk folder)"
            )
        return Source("jsonl", str(corpus)), str(corpus)
    found = resolve(path, what="adapt_data", split=split, config=config)
    if isinstance(found, Path):  # a BEIR name under $CSPLADE_DATA, or a text file
        corpus = found / "corpus.jsonl"
        return (
            (Source("jsonl", str(corpus)), str(corpus)) if found.is_dir() else (found, str(found))
        )
    if found.kind != "jsonl" and "text" not in found.columns():
        raise ValueError(
            f"{found.name}: no 'text' column (columns: {sorted(found.columns())}); unlabeled "
            "texts are read from a 'text' column (and 'title' when there is one)"
        )
    return found, found.name


def read_texts(
    path: str | os.PathLike,
    skip_bad_rows: bool = False,
    max_texts: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    split: str = "train",
    config: str | None = None,
) -> datasets.Dataset:
    """Unlabeled texts (a Dataset with one column, ``text``) for the adaptation phase.

    `path` is a corpus (records with 'text' and optional 'title', read with `doc_text`): a .jsonl,
    .parquet or .arrow file (optionally .gz), a BEIR folder (its corpus.jsonl), a `datasets` folder,
    a hub dataset id (`split`, `config`); or any other file read as plain text, one text per line.
    Blank lines and empty documents are not texts: they are counted and logged. A bad record raises
    ValueError "path:line: reason" unless `skip_bad_rows`. `max_texts` keeps the first texts only.
    """
    if max_texts is not None and max_texts < 1:
        raise ValueError(f"max_texts must be >= 1, got {max_texts}")
    source, name = _text_source(path, split, config)
    records = isinstance(source, Source)
    if not records:
        _warn_if_jsonl(source)
    if not records or source.kind == "jsonl":
        require_rows(Path(source.location if records else source))
    key = ("texts", skip_bad_rows, max_texts)
    table = from_generator(
        _generate_texts,
        {
            "source": source if records else str(source),
            "skip_bad_rows": skip_bad_rows,
            "max_texts": max_texts,
        },
        _TEXT_FEATURES,
        source.fingerprint(*key) if records else fingerprint(source, "plain", *key),
        cache_dir,
    )
    where = source.where if records else None
    _, n_empty = report_skips(table, name, "record", where=where)
    if n_empty:
        what = "empty documents" if records else "blank lines"
        logger.warning("%s: %d %s are not texts (not used)", name, n_empty, what)
    texts = table.select_columns(["text"])
    if max_texts is not None and len(texts) == max_texts:
        logger.info("%s: stopped at max_texts=%d texts", name, max_texts)
    logger.info("%s: %d texts", name, len(texts))
    return texts


def _warn_if_jsonl(path: Path) -> None:
    """A plain-text file whose first line is a JSON object was probably meant as JSONL."""
    with open_binary(path) as handle:
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


def document_texts(dataset: GroupDataset | StreamingGroupDataset) -> Iterator[str]:
    """Every distinct document text of the training data: its corpus, or the texts in its groups.

    A stream is read once, in source order.
    """
    if isinstance(dataset, StreamingGroupDataset):
        seen_texts: set[str] = set()
        for row in dataset.rows():
            for text in (*row["positives"], *row["negatives"]):
                if text not in seen_texts:
                    seen_texts.add(text)
                    yield text
        return
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


def spread_groups(dataset: GroupDataset | StreamingGroupDataset, n: int) -> list[dict[str, Any]]:
    """Up to `n` groups spread evenly over the training data (a stream: its first `n`).

    Training files are often several sources one after the other (SciFact's then NFCorpus's
    groups): the first `n` would sample the first source only.
    """
    if isinstance(dataset, StreamingGroupDataset):
        return list(itertools.islice(dataset.rows(), n))
    size = len(dataset.groups)
    picks = sorted({int(i) for i in np.linspace(0, size - 1, num=min(n, size))}) if size else []
    return list(dataset.groups.select(picks))


def calibration_documents(dataset: GroupDataset | StreamingGroupDataset, n: int) -> list[str]:
    """Up to `n` distinct training documents for the head-bias calibration.

    Groups holding their texts: a positive of each of `n` groups spread over the data, then their
    other documents round by round; a corpus or a stream: its first `n` (:func:`document_texts`).
    """
    if isinstance(dataset, StreamingGroupDataset) or dataset.corpus is not None:
        return list(itertools.islice(document_texts(dataset), n))
    groups = spread_groups(dataset, n)
    per_group = [[*row["positives"], *row["negatives"]] for row in groups]
    chosen: dict[str, None] = {}
    for depth in range(max(map(len, per_group), default=0)):
        for texts in per_group:
            if depth < len(texts):
                chosen.setdefault(texts[depth])
                if len(chosen) >= n:
                    return list(chosen)
    return list(chosen)


def query_texts(dataset: GroupDataset | StreamingGroupDataset, n: int) -> list[str]:
    """Up to `n` distinct query texts of the training data, spread over it (:func:`spread_groups`)."""
    return list(dict.fromkeys(row["query"] for row in spread_groups(dataset, n)))


def query_length_spans(texts: list[str], seed: int = 0) -> list[str]:
    """One query-like span per text: a sentence drawn at random (seeded), else the whole text.

    Stand-ins for queries where only documents are known (the adaptation phase): a query is encoded
    at ``query_max_length``, so a text with no sentence boundary is cut there like one.
    """
    rng = np.random.default_rng(seed)
    spans = []
    for text in texts:
        parts = [s for s in sentences(text) if len(s.split()) >= 3] or [text]
        spans.append(parts[int(rng.integers(len(parts)))])
    return spans
