"""Teacher scores for distillation: score every (query, document) of training groups with one or more
teachers, normalise per query and combine them into one ensemble score.

SPLADE++ (Formal et al., SIGIR'22) distils from cross-encoder scores with MarginMSE; arXiv 2411.04403
distils an inference-free sparse retriever from a heterogeneous ensemble of dense and sparse teachers,
whose raw scores live on different scales (cosines in [-1, 1], sparse dot products in the tens): each
teacher's scores are normalised per query (min-max or z-score over that query's documents) before the
weighted sum. Both the raw scores of each teacher and the combined score are written, so a recipe can
re-weight without scoring again.

Teachers (a packaged name, a local folder, or a hub id where a network is available):

- a csplade encoder or any SPLADE-style MLM/causal LM (``csplade_config.json``, or a masked-LM head):
  sparse, the dot product of SPLADE vectors (:class:`csplade.model.encoder.SparseEncoder`);
- a sentence-transformers folder (``modules.json``): dense, the similarity the model defines (cosine
  when its last module normalises, else its configured similarity);
- a cross-encoder (a ``*ForSequenceClassification`` config): the relevance logit of (query, document).

Dense teachers and cross-encoders go through sentence-transformers (``pip install 'csplade[distill]'``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from csplade._io import atomic_write
from csplade._progress import progress
from csplade.data.ensemble import NORMALIZATIONS, ensemble
from csplade.data.groups import read_groups
from csplade.model.backbones import resolve_model
from csplade.model.config import CONFIG_NAME
from csplade.model.encoder import SparseEncoder

logger = logging.getLogger(__name__)


@dataclass
class Teacher:
    """A loaded teacher with a `score(queries, docs) -> scores` over aligned (query, doc) pairs."""

    name: str
    kind: str  # sparse | dense | cross
    model: Any

    def score(self, queries: list[str], docs: list[str], batch_size: int = 32) -> np.ndarray:
        """The teacher's score of each aligned (query, doc) pair.

        A bi-encoder (sparse, dense) encodes each distinct text once, however many pairs it is in
        (a document shared by many queries' groups, a query with many positives), then scores the
        pairs from the vectors in blocks; a cross-encoder reads every pair.
        """
        if len(queries) != len(docs):
            raise ValueError(f"{len(queries)} queries for {len(docs)} documents")
        if self.kind == "cross":
            pairs = list(zip(queries, docs, strict=True))
            step = max(batch_size * 16, 256)
            parts = [
                np.asarray(
                    self.model.predict(
                        pairs[start : start + step], batch_size=batch_size, show_progress_bar=False
                    ),
                    dtype=np.float64,
                ).reshape(-1)
                for start in progress(
                    range(0, len(pairs), step), desc=f"scoring with {self.name}", unit="block"
                )
            ]
            return np.concatenate(parts) if parts else np.empty(0)
        uniq_q, qi = _distinct(queries)
        uniq_d, di = _distinct(docs)
        logger.info(
            "%s: %d pairs, %d distinct queries, %d distinct documents",
            self.name, len(queries), len(uniq_q), len(uniq_d),
        )  # fmt: skip
        if self.kind == "sparse":
            q = self.model.encode_queries(uniq_q, batch_size=batch_size)
            d = self.model.encode_docs(uniq_d, batch_size=batch_size)
        else:
            q = self.model.encode(
                uniq_q, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=True
            )
            d = self.model.encode(
                uniq_d, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=True
            )
        out = np.empty(len(queries))
        for start in range(0, len(queries), _PAIR_BLOCK):  # bounded memory for the gathered rows
            rows = slice(start, start + _PAIR_BLOCK)
            if self.kind == "sparse":
                sim = q[qi[rows]].multiply(d[di[rows]]).sum(axis=1)
            else:
                sim = self.model.similarity_pairwise(q[qi[rows]], d[di[rows]])
            out[rows] = np.asarray(sim, dtype=np.float64).reshape(-1)
        return out


_PAIR_BLOCK = 16_384


def _distinct(texts: list[str]) -> tuple[list[str], np.ndarray]:
    """The distinct texts in first-seen order, and each input's index into them."""
    position: dict[str, int] = {}
    index = np.fromiter(
        (position.setdefault(t, len(position)) for t in texts), dtype=np.int64, count=len(texts)
    )
    return list(position), index


def load_teacher(name_or_path: str, device: str | None = None) -> Teacher:
    """Load a teacher and decide its kind from the files of its folder (see the module docstring)."""
    path = resolve_model(name_or_path)
    if (path / CONFIG_NAME).exists():
        return Teacher(name_or_path, "sparse", SparseEncoder.from_pretrained(path, device=device))
    if (path / "modules.json").exists():
        st = _sentence_transformers()
        return Teacher(
            name_or_path, "dense", st.SentenceTransformer(str(path), device=device or "cpu")
        )
    config = json.loads((path / "config.json").read_text())
    archs = config.get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        st = _sentence_transformers()
        return Teacher(name_or_path, "cross", st.CrossEncoder(str(path), device=device or "cpu"))
    if any(a.endswith("ForMaskedLM") or a.endswith("ForCausalLM") for a in archs):
        return Teacher(name_or_path, "sparse", SparseEncoder.from_pretrained(path, device=device))
    raise ValueError(
        f"teacher {name_or_path!r} ({path}): not a csplade encoder, sentence-transformers model, "
        f"cross-encoder or LM with a vocabulary head (architectures: {archs})"
    )


def _sentence_transformers():
    try:
        import sentence_transformers
    except ImportError as exc:
        raise ImportError(
            "dense and cross-encoder teachers need sentence-transformers: "
            "pip install 'csplade[distill]'"
        ) from exc
    return sentence_transformers


def _score_items(teacher: Any, table: Any, batch_size: int) -> list[np.ndarray]:
    """One teacher's raw score of every (query, item) of the groups, one array per group."""
    queries, docs, sizes = [], [], []
    for q, pos, neg in zip(table["query"], table["positives"], table["negatives"], strict=True):
        items = list(pos) + list(neg or [])
        queries += [q] * len(items)
        docs += items
        sizes.append(len(items))
    flat = teacher.score(queries, docs, batch_size)
    return np.split(flat, np.cumsum(sizes)[:-1])


def _scored_row(group: dict, raw: dict[str, np.ndarray], combined: np.ndarray) -> dict[str, Any]:
    """A group as training reads it, with the ensemble's ``scores`` and each teacher's raw ones."""
    n_pos = len(group["positives"])
    row: dict[str, Any] = {"query": group["query"]}
    if group.get("query_id") is not None:
        row["query_id"] = group["query_id"]
    row["positives"] = list(group["positives"])
    row["negatives"] = list(group["negatives"] or [])
    row["scores"] = {"positives": combined[:n_pos].tolist(), "negatives": combined[n_pos:].tolist()}
    row["teacher_scores"] = {
        name: {"positives": scores[:n_pos].tolist(), "negatives": scores[n_pos:].tolist()}
        for name, scores in raw.items()
    }
    return row


def score_groups(
    groups_path: str | os.PathLike,
    teachers: Sequence[str],
    out_path: str | os.PathLike,
    weights: Sequence[float] | None = None,
    normalization: str = "minmax",
    batch_size: int = 32,
    device: str | None = None,
) -> dict[str, Any]:
    """Score every (query, item) of a JSONL of training groups with each teacher; write scored groups.

    Each output row is the group as training reads it (items as texts, in the reader's order) plus
    ``teacher_scores`` (``{teacher: {"positives": […],
    "negatives": […]}}``, raw) and ``scores`` (the ensemble: per-query `normalization` of each teacher,
    then the weighted sum). Written atomically. Returns counts.
    """

    if not teachers:
        raise ValueError("no teachers given")
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"unknown normalization {normalization!r}; allowed: {', '.join(NORMALIZATIONS)}"
        )
    weight_list = list(weights) if weights is not None else [1.0] * len(teachers)
    if len(weight_list) != len(teachers):
        raise ValueError(f"{len(weight_list)} weights for {len(teachers)} teachers")
    names = [str(t) for t in teachers]
    if len(set(names)) != len(names):
        raise ValueError(f"a teacher is named twice: {names}")
    table, _stats = read_groups(groups_path)
    loaded = [load_teacher(t, device=device) for t in teachers]
    per_teacher = {teacher.name: _score_items(teacher, table, batch_size) for teacher in loaded}
    weight_map = dict(zip(names, weight_list, strict=True))
    out = Path(out_path)
    with atomic_write(out, "w") as fh:
        for i in range(len(table)):
            raw = {name: per_teacher[name][i] for name in names}
            combined = ensemble(raw, weight_map, normalization)
            row = _scored_row(table[i], raw, combined)
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    logger.info("wrote %d scored groups to %s", len(table), out)
    return {"groups": len(table), "teachers": names, "normalization": normalization}
