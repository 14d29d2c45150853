"""Hard-negative mining: training groups from the top of a retrieval run over a BEIR training split.

What: for every query judged in the split, `mine_negatives` takes the documents a first-stage run ranks
at positions ``skip_top + 1 … depth`` and removes the query's judged positives; `mine` produces that
run (BM25, a csplade encoder with exact search, or a TREC run file), mines, and writes training groups
JSONL in the format of :func:`csplade.data.groups.read_groups_jsonl`::

    {"query": str, "query_id": str,
     "positives": [{"_id", "title", "text"}, ...], "negatives": [{"_id", "title", "text"}, ...]}

Items are objects so the doc ids travel with the texts (the trainer reads only the text).

Why: contrastive training learns most from negatives that the current retriever confuses with the
positives. SPLADE v2 (Formal et al., arXiv 2109.10086) trains on BM25 negatives; SPLADE++ (Formal,
Lassance, Piwowarski, Clinchant, "From Distillation to Hard Negative Sampling", SIGIR 2022, arXiv
2205.04733) mines them with a trained SPLADE model itself. The loop is: train -> `csplade mine --model
<trained>` -> retrain on those groups.

Rules (every drop is counted in the returned statistics and logged):
- A positive is a document judged with score > 0 (any grade). Every judged positive of a query is
  excluded from its negatives, wherever the run ranks it (`run_positives_excluded`).
- Documents judged non-relevant (score <= 0) are KEPT as negatives when the run retrieves them: they
  are confirmed negatives, the most reliable kind (`judged_nonrelevant_kept`). The same rule as
  :func:`csplade.data.groups.read_groups_beir`.
- Unjudged documents are taken as negatives. Some are relevant in truth (false negatives); this is
  the known weakness of mined negatives, and `skip_top` (leave out the first ranks, where unjudged
  relevant documents concentrate) is the usual mitigation.
- Ranks are the run's order: score descending, ties in the run's own order (a stable sort). `depth`
  counts run ranks, positives included; `n_negatives` then keeps the best-ranked N usable negatives
  (not a random sample: `GroupDataset` samples group_size - 1 of the list anew every epoch).
- Documents absent from the corpus or with no text are not usable and are skipped before the
  `n_negatives` cut (`negatives_not_usable`).
- Queries with no judged positive, no text in queries.jsonl, or whose positives are all absent from
  the corpus (or empty) are dropped. Queries the run has no entry for, or whose window holds no
  usable negative, are still written, with an empty negative list (`queries_without_negatives`):
  `GroupDataset` then fills the group with random corpus documents.

Known limits: the whole corpus is held in memory (twice: raw fields and joined texts); a model run
searches exactly (no Seismic), and its corpus encoding is cached only when `index_dir` is given.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from csplade._io import atomic_write
from csplade.data.beir import (
    doc_text,
    find_dataset,
    load_corpus,
    load_qrels,
    load_queries,
    qrels_path,
)
from csplade.data.pseudo import pseudo_queries
from csplade.index import InvertedIndex, encode_corpus, load_index, read_trec_run
from csplade.index.bm25 import bm25_search
from csplade.index.storage import fingerprint_ids
from csplade.model.encoder import SparseEncoder

logger = logging.getLogger(__name__)

# {query id: {doc id: score}} (pytrec_eval / read_trec_run) or {query id: [(doc id, score), ...]}.
AnyRun = Mapping[str, Mapping[str, float] | Sequence[tuple[str, float]]]


def ranked(results: Mapping[str, float] | Sequence[tuple[str, float]]) -> list[str]:
    """Doc ids of one query's results, best first: score descending, ties in the given order."""
    pairs = list(results.items()) if isinstance(results, Mapping) else list(results)
    return [doc for doc, _ in sorted(pairs, key=lambda pair: -float(pair[1]))]


def mine_negatives(
    run: AnyRun,
    qrels: Mapping[str, Mapping[str, int]],
    depth: int = 100,
    n_negatives: int | None = None,
    skip_top: int = 0,
    usable: Mapping[str, Any] | None = None,
) -> tuple[dict[str, list[str]], dict[str, int]]:
    """Negatives per judged query: run ranks skip_top+1..depth minus judged positives (see module).

    `usable` (e.g. {doc id: doc}) restricts negatives to its keys; None: any doc id is usable.
    Queries of `qrels` without a judged positive get no entry. Returns ({query id: [doc id, ...]},
    counters).
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if not 0 <= skip_top < depth:
        raise ValueError(f"skip_top must be in [0, depth={depth}), got {skip_top}")
    if n_negatives is not None and n_negatives < 1:
        raise ValueError(f"n_negatives must be >= 1 (or None for all), got {n_negatives}")
    stats = dict.fromkeys(
        (
            "queries_no_judged_positive",
            "queries_not_in_run",
            "run_positives_excluded",
            "judged_nonrelevant_kept",
            "negatives_not_usable",
            "negatives_beyond_cut",
        ),
        0,
    )
    negatives: dict[str, list[str]] = {}
    for query_id, judged in qrels.items():
        positives = {doc for doc, score in judged.items() if score > 0}
        if not positives:
            stats["queries_no_judged_positive"] += 1
            continue
        results = run.get(query_id)
        if results is None:
            stats["queries_not_in_run"] += 1
            negatives[query_id] = []
            continue
        window = ranked(results)[skip_top:depth]
        chosen = [doc for doc in window if doc not in positives]
        stats["run_positives_excluded"] += len(window) - len(chosen)
        if usable is not None:
            kept = [doc for doc in chosen if doc in usable]
            stats["negatives_not_usable"] += len(chosen) - len(kept)
            chosen = kept
        if n_negatives is not None and len(chosen) > n_negatives:
            stats["negatives_beyond_cut"] += len(chosen) - n_negatives
            chosen = chosen[:n_negatives]
        stats["judged_nonrelevant_kept"] += sum(doc in judged for doc in chosen)
        negatives[query_id] = chosen
    return negatives, stats


def _item(doc_id: str, doc: Mapping[str, str]) -> dict[str, str]:
    return {"_id": doc_id, "title": doc.get("title") or "", "text": doc["text"]}


def build_groups(
    queries: Mapping[str, str],
    qrels: Mapping[str, Mapping[str, int]],
    negatives: Mapping[str, list[str]],
    corpus: Mapping[str, Mapping[str, str]],
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Training groups (JSON-ready dicts) for the queries in `negatives`, in qrels order.

    Positives are the judged (score > 0) docs present in `corpus` with some text; a query left
    without one, or without text in `queries`, is dropped (counted).
    """
    stats = dict.fromkeys(
        ("queries_missing_text", "positives_not_in_corpus", "queries_no_usable_positive"), 0
    )
    groups = []
    for query_id, judged in qrels.items():
        if query_id not in negatives:
            continue  # no judged positive (counted by mine_negatives)
        text = queries.get(query_id)
        if text is None or not text.strip():
            stats["queries_missing_text"] += 1
            continue
        positive_ids = [d for d, score in judged.items() if score > 0]
        present = [d for d in positive_ids if d in corpus and doc_text(corpus[d])]
        stats["positives_not_in_corpus"] += len(positive_ids) - len(present)
        if not present:
            stats["queries_no_usable_positive"] += 1
            continue
        groups.append(
            {
                "query": text,
                "query_id": query_id,
                "positives": [_item(d, corpus[d]) for d in present],
                "negatives": [_item(d, corpus[d]) for d in negatives[query_id]],
            }
        )
    return groups, stats


def write_groups_jsonl(path: str | os.PathLike, groups: Sequence[Mapping[str, Any]]) -> None:
    """One JSON object per line, written atomically (temp file + rename)."""
    with atomic_write(path, "w") as handle:
        for group in groups:
            handle.write(json.dumps(group, ensure_ascii=False) + "\n")


def encoder_run(
    encoder: Any,
    doc_ids: list[str],
    texts: list[str],
    queries: Mapping[str, str],
    depth: int,
    index_dir: str | os.PathLike | None = None,
    batch_size: int = 32,
    backend: str | None = None,
) -> dict[str, list[tuple[str, float]]]:
    """Exact top-`depth` run of a SparseEncoder: corpus -> shards -> inverted index -> search.

    With `index_dir` the encoded corpus is kept there and reused (resumed) by the next call with the
    same encoder and corpus; without it a temporary folder is used and removed.
    """
    describe = {"encoder": encoder.describe(), "texts_sha256": fingerprint_ids(texts)}

    def encode_fn(batch: list[str]):
        return encoder.encode_docs(batch, batch_size=batch_size, show_progress=False)

    def search(folder: Path):
        encode_corpus(encode_fn, doc_ids, texts, folder, describe=describe)
        docs, ids, _ = load_index(folder)
        index = InvertedIndex.build(docs, ids, backend=backend)
        query_ids = list(queries)
        q_reps = encoder.encode_queries(
            [queries[q] for q in query_ids], batch_size=batch_size, show_progress=True
        )
        return index.search_ids(q_reps, query_ids, k=min(depth, len(ids)))

    if index_dir is not None:
        return search(Path(index_dir))
    with tempfile.TemporaryDirectory(prefix="csplade-mine-") as tmp:
        return search(Path(tmp))


def _first_stage_run(
    options: MiningOptions, usable: dict[str, dict], targets: dict[str, str]
) -> tuple[AnyRun, str]:
    """The run to mine from, and its name: a TREC run file, BM25, or a csplade model's exact run."""
    if options.run_file is not None:
        return read_trec_run(options.run_file), str(options.run_file)
    doc_ids = list(usable)
    texts = [doc_text(usable[d]) for d in doc_ids]
    model, depth = options.model, options.depth
    if model == "bm25":
        return (bm25_search(doc_ids, texts, targets, k=depth) if targets else {}), "bm25"
    encoder = model
    if isinstance(model, (str, os.PathLike)):
        encoder = SparseEncoder.from_pretrained(model, device=options.device)
    source = str(model) if isinstance(model, (str, os.PathLike)) else "encoder"
    run = encoder_run(
        encoder, doc_ids, texts, targets, depth,
        index_dir=options.index_dir, batch_size=options.batch_size, backend=options.backend,
    )  # fmt: skip
    return run, source


_WARNED_COUNTS = (
    "queries_no_judged_positive",
    "queries_missing_text",
    "queries_no_usable_positive",
    "positives_not_in_corpus",
    "negatives_not_usable",
    "queries_not_in_run",
    "queries_without_negatives",
    "dropped_without_negatives",
)


def _targets(
    folder, split: str, pseudo: str | None, max_queries: int | None, seed: int
) -> tuple[dict, dict, dict, dict, dict[str, Any]]:
    """(corpus, items corpus, queries, qrels, counters): judged queries of `split`, or pseudo ones."""
    corpus = load_corpus(folder / "corpus.jsonl")
    if pseudo is None:
        queries = load_queries(folder / "queries.jsonl")
        qrels = load_qrels(qrels_path(folder, split))
        return corpus, corpus, queries, qrels, {}
    queries, qrels, positives, counters = pseudo_queries(corpus, pseudo, max_queries, seed)
    # The items of a pseudo group are bodies (no titles): the title is the query of its own doc.
    items = {d: {"title": "", "text": doc.get("text") or ""} for d, doc in corpus.items()}
    items.update(positives)
    return corpus, items, queries, qrels, counters


@dataclass(frozen=True)
class MiningOptions:
    """What :func:`mine` mines from and keeps (module docstring for the rules).

    The run comes from `run_file` (a TREC run) when given, else from `model`: "bm25"
    (:func:`csplade.index.bm25.bm25_search`), a model folder or packaged name, or a loaded
    `SparseEncoder` (searched exactly; its encoded corpus kept in `index_dir` when given). Only the
    `split`'s judged queries with a positive are searched; with `pseudo` ("title" | "sentence",
    :mod:`csplade.data.pseudo`), pseudo-queries of the corpus (up to `max_queries`, sampled with
    `seed`) replace them.
    """

    model: Any = "bm25"
    run_file: str | os.PathLike | None = None
    split: str = "train"
    # which ranks become negatives
    depth: int = 100
    n_negatives: int | None = None
    skip_top: int = 0
    # pseudo-queries instead of the split's
    pseudo: str | None = None
    max_queries: int | None = None
    seed: int = 0
    # the split's first judged queries (file order) left out: those a dev slice of it evaluates on
    hold_out: int = 0
    # leave out the groups the run found no negative for (counted in the stats), instead of writing
    # them with none: a trainer with group_size > 1 and no corpus to draw from cannot fill them
    drop_without_negatives: bool = False
    # a model's run
    index_dir: str | os.PathLike | None = None
    batch_size: int = 32
    device: str | None = None
    backend: str | None = None

    def __post_init__(self) -> None:
        if self.run_file is None and self.model is None:
            raise ValueError("give a model ('bm25', a csplade model) or a run file to mine from")
        # the window's checks, before any expensive step
        mine_negatives(
            {}, {}, depth=self.depth, n_negatives=self.n_negatives, skip_top=self.skip_top
        )
        if self.hold_out < 0:
            raise ValueError(f"hold_out must be >= 0, got {self.hold_out}")
        if self.hold_out and self.pseudo:
            raise ValueError("hold_out leaves out judged queries: not with pseudo-queries")


def mine(
    data: str | os.PathLike,
    out: str | os.PathLike,
    options: MiningOptions | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Mine negatives for a BEIR split and write training groups to `out`; returns the counters.

    `data`: a BEIR folder or a name under $CSPLADE_DATA. `options` (or its fields as keywords,
    ``mine(data, out, model="bm25", depth=30)``): :class:`MiningOptions`.
    """
    options = replace(options, **settings) if options else MiningOptions(**settings)
    folder = find_dataset(data)
    split, pseudo = options.split, options.pseudo
    corpus, items, queries, qrels, pseudo_stats = _targets(
        folder, split, pseudo, options.max_queries, options.seed
    )
    usable = {doc_id: doc for doc_id, doc in corpus.items() if doc_text(doc)}
    held = set([q for q in queries if q in qrels][: options.hold_out])  # slice_data's first ones
    qrels = {q: judged for q, judged in qrels.items() if q not in held}
    targets = {
        q: queries[q]
        for q, judged in qrels.items()
        if q in queries and any(score > 0 for score in judged.values())
    }
    what = f"{pseudo} pseudo-queries" if pseudo else f"queries of split {split!r}"
    logger.info("%s: mining for %d %s", folder.name, len(targets), what)
    run, source = _first_stage_run(options, usable, targets)
    negatives, mine_stats = mine_negatives(
        run, qrels, options.depth, options.n_negatives, options.skip_top, usable=usable
    )
    groups, group_stats = build_groups(queries, qrels, negatives, items)
    if not groups:
        raise ValueError(f"{folder}: split {split!r} has no query with a usable positive document")
    n_neg = [len(g["negatives"]) for g in groups]
    n_groups = len(groups)
    if options.drop_without_negatives:
        groups = [g for g in groups if g["negatives"]]
        if not groups:
            raise ValueError(f"{folder}: the run found no negative for any query of {split!r}")
    write_groups_jsonl(out, groups)
    stats: dict[str, Any] = {
        "source": source,
        "split": split,
        "depth": options.depth,
        "skip_top": options.skip_top,
        "n_negatives": options.n_negatives,
        "judged_queries": len(qrels),
        "held_out_queries": len(held),
        "groups": len(groups),
        "negatives_mean": round(sum(n_neg) / len(n_neg), 2),
        "queries_without_negatives": sum(n == 0 for n in n_neg),
        "dropped_without_negatives": n_groups - len(groups),
        "empty_docs_in_corpus": len(corpus) - len(usable),
        **pseudo_stats,
        **mine_stats,
        **group_stats,
    }
    _log_mined(out, source, stats)
    return stats


def _log_mined(out, source: str, stats: dict[str, Any]) -> None:
    logger.info(
        "mined %s: %d groups, %.1f negatives each on average -> %s",
        source,
        stats["groups"],
        stats["negatives_mean"],
        out,
    )
    for key in _WARNED_COUNTS:
        if stats[key]:
            logger.warning("%s: %s = %d", out, key, stats[key])
