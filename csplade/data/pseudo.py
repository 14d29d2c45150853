"""Pseudo-queries from a corpus: training pairs for a collection that has no (or few) judged queries.

Two ways to turn a document into a (query, positive) pair, both well established for unsupervised
retrieval training:

- ``title``: the document's title is the query and its body (without the title) the positive, as in
  the title–body pairs of sentence-embedding training sets;
- ``sentence``: one sentence of the body is the query and the rest of the body the positive: the
  Inverse Cloze Task (Lee et al., ACL 2019, "Latent Retrieval for Weakly Supervised Open Domain
  Question Answering"), whose positive leaves the query sentence out, so the pair cannot be matched by
  copying it.

`csplade mine --pseudo-queries title|sentence` mines negatives for these pairs (BM25 or a model, every
pseudo-query's own document excluded) and `csplade teacher-scores` scores the groups, so distillation
has thousands of groups where the qrels give hundreds. Documents with no title (``title``) or fewer
than three sentences (``sentence``) give no pair; they are counted.

Known limits: sentences are split after ".", "?" and "!" followed by white space (no abbreviation
handling: the short pieces of "e. g." are too short to be queries); a pseudo-query
can be relevant to other documents than its own, which then serve as (false) negatives.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from typing import Any

PSEUDO_METHODS = ("title", "sentence")
_SENTENCE_END = re.compile(r"(?<=[.?!])\s+(?=\S)")
_MIN_QUERY_CHARS = 12


def sentences(text: str) -> list[str]:
    """The sentences of `text` (split after ., ? or ! followed by white space)."""
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def _pair(doc: Mapping[str, str], method: str, rng: random.Random) -> tuple[str, str] | None:
    """(query, positive text) of one document, or None when it gives none."""
    body = (doc.get("text") or "").strip()
    if method == "title":
        title = (doc.get("title") or "").strip()
        if len(title) < _MIN_QUERY_CHARS or not body:
            return None
        return title, body
    parts = sentences(body)
    if len(parts) < 3:
        return None
    i = rng.randrange(len(parts))
    if len(parts[i]) < _MIN_QUERY_CHARS:
        return None
    return parts[i], " ".join(parts[:i] + parts[i + 1 :])


def pseudo_queries(
    corpus: Mapping[str, Mapping[str, str]],
    method: str = "title",
    max_queries: int | None = None,
    seed: int = 0,
) -> tuple[dict[str, str], dict[str, dict[str, int]], dict[str, dict[str, str]], dict[str, Any]]:
    """Pseudo-queries of a corpus: (queries, qrels, positives, counters).

    Query ids are ``pq-<doc id>``; each judges its own document relevant (``qrels``) and ``positives``
    maps that document to the text the pair uses (``{"title": "", "text": ...}``: the body, or the body
    without the query sentence). With `max_queries`, a random sample of documents (seeded) is used.
    """
    if method not in PSEUDO_METHODS:
        raise ValueError(f"pseudo-queries: unknown method {method!r}; allowed: {PSEUDO_METHODS}")
    if max_queries is not None and max_queries < 1:
        raise ValueError(f"max_queries must be >= 1, got {max_queries}")
    rng = random.Random(seed)
    doc_ids = list(corpus)
    if max_queries is not None and max_queries < len(doc_ids):
        chosen = set(rng.sample(doc_ids, max_queries))
        doc_ids = [d for d in doc_ids if d in chosen]  # corpus order
    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    positives: dict[str, dict[str, str]] = {}
    skipped = 0
    for doc_id in doc_ids:
        pair = _pair(corpus[doc_id], method, rng)
        if pair is None:
            skipped += 1
            continue
        query_id = f"pq-{doc_id}"
        queries[query_id], text = pair
        qrels[query_id] = {doc_id: 1}
        positives[doc_id] = {"title": "", "text": text}
    if not queries:
        raise ValueError(f"pseudo-queries ({method}): no document of the corpus gives a pair")
    counters = {"pseudo_method": method, "pseudo_queries": len(queries), "pseudo_skipped": skipped}
    return queries, qrels, positives, counters
