"""Zero-shot BEIR evaluation of sparse encoders (and BM25) over one or more BEIR folders.

For each data set and each system: encode the corpus into resumable shards (reused when the encoder,
its settings and the corpus are the same; :mod:`csplade.index.shards`), encode the judged queries of the
split, search with the exact inverted index (:class:`csplade.index.InvertedIndex`), write a TREC run and
score it with pytrec_eval (:mod:`csplade.evaluation.metrics`). Efficiency is measured alongside: mean non-zeros of
query and document vectors, FLOPS (expected multiplications per query-document pair), index size, and the
end-to-end latency of one query (encode + search) at p50/p95 over up to `latency_queries` queries, one at
a time. Results go to `OUT/metrics.json` (``{system: {dataset: {metric: value}}}``), `OUT/table.md`, a
bar chart, and the runs to `OUT/<dataset>/<system>.trec` (the first model's run also as
`OUT/<dataset>/run.trec`).

A second call with the same `OUT` adds its systems to the same table, provided the evaluation settings
(split, slices, k) are the same; different settings are refused rather than mixed in one table.

Slices (`max_docs`, `max_queries`) are for smoke runs and CPU budgets: the first `max_queries` judged
queries (file order) and a corpus made of every document judged for them plus the first documents of
the corpus up to `max_docs`. Every output then says it is a slice, and BM25 is evaluated on the same slice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from csplade.data.beir import BeirData, find_dataset, load_beir
from csplade.evaluation.metrics import (
    DEFAULT_METRICS,
    bm25_search,
    evaluate_run,
    latency_percentiles,
    sparsity_stats,
    write_results,
)

logger = logging.getLogger(__name__)

SETTINGS_FILE = "eval_settings.json"


@dataclass(frozen=True)
class SystemSpec:
    """A system to evaluate: a name and a model (name or path), or the BM25 baseline."""

    name: str
    model: str | None  # None: BM25

    @classmethod
    def parse(cls, value: str) -> SystemSpec:
        """`NAME=MODEL` or just `MODEL` (named after its folder), or `bm25`."""
        if value == "bm25":
            return cls("bm25", None)
        if "=" in value:
            name, model = value.split("=", 1)
            if not name or not model:
                raise ValueError(f"system {value!r}: expected NAME=MODEL")
            return cls(name, model)
        return cls(Path(value.rstrip("/")).name or value, value)


def slice_data(
    data: BeirData, max_docs: int | None, max_queries: int | None
) -> tuple[BeirData, str | None]:
    """The data restricted to a slice (see the module docstring) and a note saying so (None: full)."""
    if max_docs is None and max_queries is None:
        return data, None
    queries = data.queries
    if max_queries is not None:
        if max_queries < 1:
            raise ValueError(f"max_queries must be >= 1, got {max_queries}")
        queries = dict(list(queries.items())[:max_queries])
    qrels = {q: data.qrels[q] for q in queries}
    doc_ids, texts = data.doc_ids, data.doc_texts
    if max_docs is not None:
        if max_docs < 1:
            raise ValueError(f"max_docs must be >= 1, got {max_docs}")
        judged = {d for rel in qrels.values() for d in rel}
        keep = [i for i, d in enumerate(doc_ids) if d in judged]
        seen = set(keep)
        for i in range(len(doc_ids)):
            if len(keep) >= max_docs:
                break
            if i not in seen:
                keep.append(i)
                seen.add(i)
        keep.sort()
        doc_ids = [data.doc_ids[i] for i in keep]
        texts = [data.doc_texts[i] for i in keep]
    note = (
        f"slice of {data.name}: {len(doc_ids)} of {len(data.doc_ids)} docs (all judged docs of the "
        f"kept queries + the first docs), {len(queries)} of {len(data.queries)} queries"
    )
    return replace(data, doc_ids=doc_ids, doc_texts=texts, queries=queries, qrels=qrels), note


def _index_dir(root: Path, system: str, describe: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(describe, sort_keys=True, default=str).encode()).hexdigest()
    return root / f"index-{system}-{digest[:10]}"


def _dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("shard-*.npz"))


def evaluate_system(
    encoder: Any,
    data: BeirData,
    out_dir: Path,
    system: str,
    k: int = 1000,
    batch_size: int = 32,
    latency_queries: int = 100,
    slice_note: str | None = None,
    backend: str | None = None,
) -> tuple[dict[str, float], dict[str, float], dict[str, dict[str, float]]]:
    """Encode, index, search and score one encoder on one data set: (metrics, efficiency, run)."""
    from csplade.index import InvertedIndex, encode_corpus, load_index, write_trec_run

    describe = {
        "encoder": encoder.describe(),
        "dataset": data.name,
        "slice": slice_note,
        "batch_size": batch_size,
    }
    index_dir = _index_dir(out_dir / data.name, system, describe)

    def encode_fn(texts: list[str]):
        return encoder.encode_docs(texts, batch_size=batch_size, show_progress=False)

    encode_corpus(encode_fn, data.doc_ids, data.doc_texts, index_dir, describe=describe)
    docs, doc_ids, _manifest = load_index(index_dir)
    index = InvertedIndex.build(docs, doc_ids, backend=backend)
    query_ids = list(data.queries)
    query_texts = [data.queries[q] for q in query_ids]
    q_reps = encoder.encode_queries(query_texts, batch_size=batch_size, show_progress=True)
    ranked = index.search_ids(q_reps, query_ids, k=min(k, max(1, len(doc_ids))))
    write_trec_run(out_dir / data.name / f"{system}.trec", ranked, tag=system)
    run = {q: dict(pairs) for q, pairs in ranked.items()}
    result = evaluate_run(data.qrels, run, DEFAULT_METRICS)
    timings = []
    for text in query_texts[:latency_queries]:
        start = time.perf_counter()
        vec = encoder.encode_queries([text], show_progress=False)
        index.search(vec, k=10)
        timings.append(time.perf_counter() - start)
    efficiency = dict(sparsity_stats(q_reps, docs))
    lat = latency_percentiles(timings)
    efficiency.update(
        {
            "index_mb": _dir_bytes(index_dir) / 2**20,
            "query_p50_ms": lat["p50_ms"],
            "query_p95_ms": lat["p95_ms"],
        }
    )
    return dict(result.mean), efficiency, run


def _ranked(run: dict[str, dict[str, float]]) -> dict[str, list[tuple[str, float]]]:
    """{query: {doc: score}} -> {query: [(doc, score), …]} best first (ties by doc id)."""
    return {q: sorted(docs.items(), key=lambda p: (-p[1], p[0])) for q, docs in run.items()}


def _load_settings(out: Path, settings: dict[str, Any]) -> tuple[dict, dict]:
    """Earlier metrics/efficiency of this OUT folder, if its settings match; else an error."""
    file = out / SETTINGS_FILE
    if not file.exists():
        return {}, {}
    earlier = json.loads(file.read_text())
    if earlier != settings:
        raise ValueError(
            f"{out} holds results evaluated with other settings ({earlier}); now {settings}. "
            "Use another --out folder (results with different slices or splits are not mixed)."
        )
    metrics = (
        json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").exists() else {}
    )
    eff_file = out / "efficiency.json"
    efficiency = json.loads(eff_file.read_text()) if eff_file.exists() else {}
    return metrics, efficiency


def evaluate(
    systems: list[SystemSpec],
    datasets: list[str],
    out_dir: str | os.PathLike,
    split: str = "test",
    max_docs: int | None = None,
    max_queries: int | None = None,
    k: int = 1000,
    batch_size: int = 32,
    latency_queries: int = 100,
    device: str | None = None,
    encoder_overrides: dict[str, Any] | None = None,
    backend: str | None = None,
    dtype: str | None = None,
) -> dict[str, Path]:
    """Evaluate every system on every data set; write runs, metrics.json, table.md and a chart."""
    from csplade.model.encoder import SparseEncoder

    if not systems:
        raise ValueError("nothing to evaluate: give at least one model or --baseline bm25")
    if not datasets:
        raise ValueError("no data sets given")
    names = [s.name for s in systems]
    if len(set(names)) != len(names):
        raise ValueError(f"two systems share a name: {names} (use NAME=MODEL)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"split": split, "max_docs": max_docs, "max_queries": max_queries, "k": k}
    metrics, efficiency = _load_settings(out, settings)
    loaded = [(name, load_beir(find_dataset(name), split=split)) for name in datasets]
    sliced = [(name, *slice_data(data, max_docs, max_queries)) for name, data in loaded]
    notes = [note for _, _, note in sliced if note]
    for spec in systems:
        encoder = None
        if spec.model is not None:
            encoder = SparseEncoder.from_pretrained(
                spec.model, device=device, dtype=dtype, **(encoder_overrides or {})
            )
        for _name, data, note in sliced:
            (out / data.name).mkdir(parents=True, exist_ok=True)
            logger.info("evaluating %s on %s (%d docs, %d queries)", spec.name, data.name,
                        len(data.doc_ids), len(data.queries))  # fmt: skip
            if encoder is None:
                run = bm25_search(data.doc_ids, data.doc_texts, data.queries, k=k)
                from csplade.index import write_trec_run

                write_trec_run(out / data.name / "bm25.trec", _ranked(run), tag="bm25")
                result = evaluate_run(data.qrels, run, DEFAULT_METRICS).mean
                eff: dict[str, float] = {}
            else:
                result, eff, run = evaluate_system(
                    encoder,
                    data,
                    out,
                    spec.name,
                    k=k,
                    batch_size=batch_size,
                    latency_queries=latency_queries,
                    slice_note=note,
                    backend=backend,
                )
                if spec is next(s for s in systems if s.model is not None):
                    from csplade.index import write_trec_run

                    write_trec_run(out / data.name / "run.trec", _ranked(run), tag=spec.name)
            metrics.setdefault(spec.name, {})[data.name] = {m: float(v) for m, v in result.items()}
            if eff:
                efficiency.setdefault(spec.name, {})[data.name] = {
                    m: float(v) for m, v in eff.items() if np.isfinite(v)
                }
            logger.info("%s on %s: nDCG@10 %.4f", spec.name, data.name, result["ndcg_cut_10"])
        del encoder
    slice_note = "; ".join(notes) if notes else None
    written = write_results(out, metrics, efficiency or None, slice_note=slice_note)
    tmp = out / f".{SETTINGS_FILE}.tmp"
    tmp.write_text(json.dumps(settings, indent=2))
    os.replace(tmp, out / SETTINGS_FILE)
    return written
