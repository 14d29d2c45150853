"""Read BEIR-layout evaluation folders: corpus, queries and relevance judgments (qrels).

Why: every evaluation in csplade (SPLADE-style sparse retrieval, the BM25 baseline, the result
tables) starts from the same three files, so one reader owns their format and their errors.

Layout (Thakur et al., "BEIR: A Heterogeneous Benchmark for Zero-shot Evaluation of Information
Retrieval Models", NeurIPS 2021 Datasets and Benchmarks)::

    <folder>/corpus.jsonl      {"_id": str, "title": str (optional), "text": str}  one per line
    <folder>/queries.jsonl     {"_id": str, "text": str}                         one per line
    <folder>/qrels/<split>.tsv header "query-id<TAB>corpus-id<TAB>score", integer scores

BEIR conventions kept here, each counted and logged rather than done silently:
- a document is indexed as ``title + " " + text`` when it has a title (`doc_text`);
- only queries judged in the chosen split are evaluated; the others are dropped;
- judgments that point at a document absent from the corpus are kept (they can never be
  retrieved, so they lower recall, as in BEIR) and counted.

Known limits: plain (not gzipped) files only; qrels must be the 3-column BEIR TSV (not the
4-column TREC format); `load_beir` holds the whole corpus in memory (use `iter_corpus` to stream).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

DATA_ENV = "CSPLADE_DATA"
BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{name}.zip"
QRELS_HEADER = ("query-id", "corpus-id", "score")


@dataclass
class BeirData:
    """One BEIR folder loaded for one qrels split.

    `doc_ids`/`doc_texts` are aligned lists in corpus file order (texts already joined by
    `doc_text`). `queries` maps query id -> text, in file order, holding only the queries with
    judgments in `split`. `qrels` maps query id -> {doc id: score}.
    """

    name: str
    folder: Path
    split: str
    doc_ids: list[str]
    doc_texts: list[str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    n_queries_dropped: int  # in queries.jsonl but without judgments in this split
    n_qrels_unknown_docs: int  # qrels rows whose doc id is not in corpus.jsonl (kept)
    n_qrels_unknown_queries: int  # qrels queries absent from queries.jsonl (removed from qrels)
    n_empty_docs: int = 0  # docs whose title and text are both empty (kept; they match nothing)

    def __repr__(self) -> str:
        return (
            f"BeirData(name={self.name!r}, split={self.split!r}, docs={len(self.doc_ids)}, "
            f"queries={len(self.queries)}, judgments={sum(map(len, self.qrels.values()))}, "
            f"queries_dropped={self.n_queries_dropped}, "
            f"qrels_unknown_docs={self.n_qrels_unknown_docs}, "
            f"qrels_unknown_queries={self.n_qrels_unknown_queries}, "
            f"empty_docs={self.n_empty_docs})"
        )


def doc_text(doc: dict) -> str:
    """The text BEIR indexes for a document: ``title + " " + text`` if a title exists, stripped."""
    title = (doc.get("title") or "").strip()
    text = (doc.get("text") or "").strip()
    return f"{title} {text}".strip() if title else text


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")


def _iter_jsonl(path: Path, kind: str) -> Iterator[tuple[int, str, dict]]:
    """Yield (line number, id, record) for each non-blank line, checking `_id` and `text`."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: malformed JSON in {kind} file ({exc.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            raw_id = record.get("_id")
            if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
                raise ValueError(f"{where}: {kind} record needs a string '_id', got {raw_id!r}")
            if not isinstance(record.get("text"), str):
                raise ValueError(
                    f"{where}: {kind} record {raw_id!r} needs a string 'text', "
                    f"got {record.get('text')!r}"
                )
            title = record.get("title", "")
            if title is not None and not isinstance(title, str):
                raise ValueError(f"{where}: {kind} record {raw_id!r} has a non-string 'title'")
            yield line_no, str(raw_id), record


def iter_corpus(
    path: str | os.PathLike, check_duplicates: bool = True
) -> Iterator[tuple[str, dict]]:
    """Stream (doc id, {"title", "text"}) from a corpus.jsonl in file order.

    With `check_duplicates`, a second occurrence of an id raises ValueError naming both lines (this
    keeps one int per id in memory; turn it off for corpora too big for that).
    """
    path = Path(path)
    _require_file(path, "corpus file")
    seen: dict[str, int] = {}
    for line_no, doc_id, record in _iter_jsonl(path, "corpus"):
        if check_duplicates:
            if doc_id in seen:
                raise ValueError(
                    f"{path}: duplicate doc id {doc_id!r} on lines {seen[doc_id]} and {line_no}"
                )
            seen[doc_id] = line_no
        yield doc_id, {"title": record.get("title") or "", "text": record["text"]}


def load_corpus(path: str | os.PathLike) -> dict[str, dict]:
    """corpus.jsonl -> {doc id: {"title", "text"}} in file order; duplicate ids are an error."""
    return dict(iter_corpus(path))


def load_queries(path: str | os.PathLike) -> dict[str, str]:
    """queries.jsonl -> {query id: text} in file order; duplicate ids are an error."""
    path = Path(path)
    _require_file(path, "queries file")
    queries: dict[str, str] = {}
    lines: dict[str, int] = {}
    for line_no, query_id, record in _iter_jsonl(path, "query"):
        if query_id in queries:
            raise ValueError(
                f"{path}: duplicate query id {query_id!r} on lines {lines[query_id]} and {line_no}"
            )
        queries[query_id] = record["text"]
        lines[query_id] = line_no
    return queries


def load_qrels(path: str | os.PathLike) -> dict[str, dict[str, int]]:
    """qrels TSV -> {query id: {doc id: score}}.

    The BEIR header line is skipped when present. A row must have exactly three tab-separated
    fields with an integer score. The same (query, doc) pair twice with different scores is an
    error; an exact repeat is ignored with a warning.
    """
    path = Path(path)
    _require_file(path, "qrels file")
    qrels: dict[str, dict[str, int]] = {}
    first_line: dict[tuple[str, str], int] = {}
    n_repeats = 0
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if line_no == 1 and tuple(x.strip() for x in fields) == QRELS_HEADER:
                continue
            where = f"{path}:{line_no}"
            if len(fields) != 3:
                raise ValueError(
                    f"{where}: expected 3 tab-separated fields (query-id, corpus-id, score), "
                    f"got {len(fields)}: {line!r}"
                )
            query_id, doc_id, raw_score = (x.strip() for x in fields)
            if not query_id or not doc_id:
                raise ValueError(f"{where}: empty query-id or corpus-id: {line!r}")
            try:
                score = int(raw_score)
            except ValueError:
                raise ValueError(f"{where}: score must be an integer, got {raw_score!r}") from None
            judged = qrels.setdefault(query_id, {})
            if doc_id in judged:
                if judged[doc_id] != score:
                    raise ValueError(
                        f"{path}: conflicting scores for query {query_id!r}, doc {doc_id!r} on "
                        f"lines {first_line[(query_id, doc_id)]} ({judged[doc_id]}) and "
                        f"{line_no} ({score})"
                    )
                n_repeats += 1
                continue
            judged[doc_id] = score
            first_line[(query_id, doc_id)] = line_no
    if n_repeats:
        logger.warning("%s: %d repeated (query, doc) rows ignored", path, n_repeats)
    return qrels


def available_splits(folder: str | os.PathLike) -> list[str]:
    """Names of the qrels splits present in a BEIR folder (``qrels/<split>.tsv``)."""
    qrels_dir = Path(folder) / "qrels"
    if not qrels_dir.is_dir():
        return []
    return sorted(p.stem for p in qrels_dir.glob("*.tsv"))


def drop_unknown_queries(
    qrels: dict[str, dict[str, int]], queries: dict[str, str], qrels_file: Path, queries_path: Path
) -> int:
    """Remove from `qrels` the judged queries `queries` lacks, with a warning naming both files and
    a few ids; return how many there were (a judgment of a query without text cannot be used)."""
    unknown = [q for q in qrels if q not in queries]
    if unknown:
        logger.warning(
            "%s: %d judged queries are missing from %s and are left out (e.g. %r)",
            qrels_file,
            len(unknown),
            queries_path,
            unknown[:3],
        )
        for q in unknown:
            del qrels[q]
    return len(unknown)


def qrels_path(folder: str | os.PathLike, split: str) -> Path:
    """``folder/qrels/<split>.tsv``; FileNotFoundError naming it and the splits present if missing."""
    path = Path(folder) / "qrels" / f"{split}.tsv"
    if not path.is_file():
        splits = available_splits(folder)
        raise FileNotFoundError(
            f"qrels file for split {split!r} not found: {path} "
            f"(splits in this folder: {', '.join(splits) if splits else 'none'})"
        )
    return path


def load_beir(folder: str | os.PathLike, split: str = "test") -> BeirData:
    """Load a BEIR folder for one split (see the module docstring for what is dropped/kept)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"BEIR folder not found: {folder}")
    corpus_path = folder / "corpus.jsonl"
    queries_path = folder / "queries.jsonl"
    _require_file(corpus_path, "corpus file")
    _require_file(queries_path, "queries file")
    qrels_file = qrels_path(folder, split)

    doc_ids: list[str] = []
    doc_texts: list[str] = []
    for doc_id, doc in iter_corpus(corpus_path):
        doc_ids.append(doc_id)
        doc_texts.append(doc_text(doc))
    n_empty_docs = sum(not text for text in doc_texts)
    if n_empty_docs:
        logger.warning(
            "%s: %d documents have no title and no text (kept)", corpus_path, n_empty_docs
        )
    all_queries = load_queries(queries_path)
    qrels = load_qrels(qrels_file)

    n_unknown_queries = drop_unknown_queries(qrels, all_queries, qrels_file, queries_path)
    queries = {q: text for q, text in all_queries.items() if q in qrels}
    n_dropped = len(all_queries) - len(queries)
    if n_dropped:
        logger.info(
            "%s: %d of %d queries have no judgments in split %r and are dropped",
            folder.name,
            n_dropped,
            len(all_queries),
            split,
        )
    known_docs = set(doc_ids)
    n_unknown_docs = sum(d not in known_docs for judged in qrels.values() for d in judged)
    if n_unknown_docs:
        logger.warning(
            "%s: %d judgments point at doc ids absent from the corpus (kept; they cap recall)",
            qrels_file,
            n_unknown_docs,
        )
    data = BeirData(
        name=folder.name,
        folder=folder,
        split=split,
        doc_ids=doc_ids,
        doc_texts=doc_texts,
        queries=queries,
        qrels=qrels,
        n_queries_dropped=n_dropped,
        n_qrels_unknown_docs=n_unknown_docs,
        n_qrels_unknown_queries=n_unknown_queries,
        n_empty_docs=n_empty_docs,
    )
    logger.info("loaded %r", data)
    return data


def find_dataset(
    name_or_path: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    *,
    files: bool = False,
) -> Path:
    """Resolve a dataset argument: the one place a data set name is looked up.

    An existing folder (or, with `files`, an existing file) is returned as is. Otherwise the argument
    is taken as a dataset name and looked up under `data_dir`, or under $CSPLADE_DATA when `data_dir`
    is None. When nothing is found the error says how to get the data.
    """
    candidate = Path(name_or_path).expanduser()
    if candidate.is_dir() or (files and candidate.is_file()):
        return candidate
    name = str(name_or_path)
    root = data_dir if data_dir is not None else os.environ.get(DATA_ENV)
    if root is not None and (Path(root) / name).is_dir():
        return Path(root) / name
    if root is None:
        looked = f"it is not a folder, and ${DATA_ENV} is not set"
    else:
        looked = f"it is not a folder, and {Path(root) / name} does not exist"
    url = BEIR_URL.format(name=Path(name).name)
    raise FileNotFoundError(
        f"dataset {name!r} not found: {looked}. Either pass the path of a BEIR folder, or set "
        f"{DATA_ENV} to the directory that holds BEIR folders (one per dataset), or download it: "
        f"`python -c \"from csplade.data.beir import download_beir; download_beir('{Path(name).name}', "
        f"'<dir>')\"` (or fetch {url} and unzip it into <dir>), then set {DATA_ENV}=<dir>."
    )


def download_beir(name: str, dest: str | os.PathLike, url: str | None = None) -> Path:
    """Download and unzip one BEIR dataset into ``dest/<name>``; returns that folder.

    Only call this when the user asked for it (it needs network). The archive is fetched and
    extracted inside a temporary folder in `dest`, then moved into place with one rename, so an
    interrupted download never leaves a half-written dataset. An existing ``dest/<name>`` is
    returned untouched. `url` defaults to BEIR's public location (`BEIR_URL`).
    """
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(f"dataset name must be a plain folder name, got {name!r}")
    dest = Path(dest)
    target = dest / name
    if target.is_dir():
        logger.info("%s already exists; not downloading", target)
        return target
    dest.mkdir(parents=True, exist_ok=True)
    url = url or BEIR_URL.format(name=name)
    with tempfile.TemporaryDirectory(dir=dest, prefix=f".{name}.download-") as tmp:
        archive = Path(tmp) / f"{name}.zip"
        logger.info("downloading %s", url)
        with urllib.request.urlopen(url) as response, open(archive, "wb") as out:
            shutil.copyfileobj(response, out)
        extract_dir = Path(tmp) / "extracted"
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                parts = Path(member).parts
                if Path(member).is_absolute() or ".." in parts:
                    raise ValueError(f"{url}: unsafe path in archive: {member!r}")
            zf.extractall(extract_dir)
        # BEIR zips hold one top-level folder named after the dataset; accept a flat zip too.
        inner = extract_dir / name
        source = inner if inner.is_dir() else extract_dir
        if not (source / "corpus.jsonl").is_file():
            raise ValueError(f"{url}: archive has no {name}/corpus.jsonl; not a BEIR dataset")
        os.replace(source, target)
    logger.info("dataset %s ready at %s", name, target)
    return target
