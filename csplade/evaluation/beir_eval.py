"""Zero-shot BEIR evaluation of sparse encoders (and BM25): encode, index, search, score, report.

For each data set and system: encode the corpus into resumable shards (:mod:`csplade.index.shards`,
reused when the encoder, its settings and the corpus are the same), encode the judged queries,
search the exact inverted index, write a TREC run and score it with pytrec_eval
(:mod:`csplade.evaluation.metrics`). Efficiency is measured alongside: non-zeros, FLOPS, index size
and the latency of one query (encode + search) at p50/p95. Results go to `OUT/metrics.json`,
`OUT/efficiency.json`, `OUT/table.md`, a bar chart (:mod:`csplade.evaluation.report`) and
`OUT/<dataset>/<system>.trec` (the first model's run also as `OUT/<dataset>/run.trec`). A second
call with the same `OUT` adds its systems to the same table if the settings (split, slices, k)
match.

A model given as a local csplade folder also gets its results written into its model card
(:func:`csplade.model.card.record_eval`: ``csplade_eval.json`` and ``README.md`` in the folder).
``latency_queries=0`` skips the latency measurement.

Known limit: slices (`max_docs`, `max_queries`, for smoke runs) keep every judged doc of the kept
queries, so their scores are higher than on the full collection; every output says it is a slice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from csplade._io import write_json_atomic
from csplade._logging import muted
from csplade.data.beir import BeirData, find_dataset, load_beir
from csplade.evaluation.memory import PeakMemory
from csplade.evaluation.metrics import (
    DEFAULT_METRICS,
    evaluate_run,
    latency_percentiles,
    sparsity_stats,
)
from csplade.evaluation.report import write_results
from csplade.index import InvertedIndex, encode_corpus, load_index, write_trec_run
from csplade.index.bm25 import bm25_search
from csplade.index.identity import LEXICAL_STATS, fit_to_collection
from csplade.model.card import record_eval
from csplade.model.config import CONFIG_NAME
from csplade.model.encoder import SparseEncoder
from csplade.model.io import read_config

logger = logging.getLogger(__name__)

SETTINGS_FILE = "eval_settings.json"


# BM25 baselines by name: bm25s's analyzer with no stemmer (the project's reference row), or stemmed
BASELINES = {"bm25": None, "bm25-stem": "english"}


# A model's own vectors: its lexical residual off on both sides (documents through the model too)
OWN_VECTORS = {"lexical_residual": False, "lexical_docs": False, "lexical_analyzer": "tokens"}


@dataclass(frozen=True)
class SystemSpec:
    """A system to evaluate: a name and a model (name or path), or the BM25 baseline; `overrides`:
    encoder settings of this system alone (over :class:`EvalOptions`' ``encoder_overrides``)."""

    name: str
    model: str | None  # None: BM25 (`bm25`, or `bm25-stem` with Snowball English stemming)
    overrides: dict[str, Any] = field(default_factory=dict)

    def own_vectors(self, **overrides: Any) -> SystemSpec | None:
        """This model with its lexical residual off (`NAME-own`: what the LLM's vectors rank
        alone), or None for a baseline or a model without a residual (its vectors are its own)."""
        if self.model is None or not _has_residual(self.model):
            return None
        return SystemSpec(f"{self.name}-own", self.model, {**OWN_VECTORS, **overrides})

    @classmethod
    def parse(cls, value: str) -> SystemSpec:
        """`NAME=MODEL` or just `MODEL` (named after its folder), or a baseline: `bm25`, `bm25-stem`."""
        if value in BASELINES:
            return cls(value, None)
        if "=" in value:
            name, model = value.split("=", 1)
            if not name or not model:
                raise ValueError(f"system {value!r}: expected NAME=MODEL")
            return cls(name, model)
        return cls(Path(value.rstrip("/")).name or value, value)


def _has_residual(model: str) -> bool:
    """Whether a saved csplade folder holds a lexical residual (a packaged or hub name: no)."""
    config = read_config(Path(model)) if Path(model).is_dir() else None
    return config is not None and config.lexical_residual


def with_own_vectors(systems: list[SystemSpec], **overrides: Any) -> list[SystemSpec]:
    """`systems` with each hybrid model followed by its own vectors (:meth:`SystemSpec.own_vectors`)."""
    out = []
    for spec in systems:
        out.append(spec)
        own = spec.own_vectors(**overrides)
        if own is not None:
            out.append(own)
    return out


def slice_data(
    data: BeirData, max_docs: int | None, max_queries: int | None, seed: int = 0
) -> tuple[BeirData, str | None]:
    """The data restricted to a slice, and a note saying so (None: no slice asked, all the data).

    Queries: the first `max_queries` judged queries (file order). Docs, in corpus order: every doc
    judged for a kept query, plus other docs of the corpus drawn at random (`seed`) up to `max_docs`
    in all (the judged docs are kept even when they alone exceed `max_docs`). Random, not the first
    docs: a corpus's first docs can be a topic of their own (one source, one year), which makes the
    distractors easier or harder than the collection's.
    """
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
        others = [i for i, d in enumerate(doc_ids) if d not in judged]
        fill = min(max(max_docs - len(keep), 0), len(others))
        keep = sorted(keep + random.Random(seed).sample(others, fill))
        doc_ids = [data.doc_ids[i] for i in keep]
        texts = [data.doc_texts[i] for i in keep]
    note = (
        f"slice of {data.name}: {len(doc_ids)} of {len(data.doc_ids)} docs (all judged docs of the "
        f"kept queries + docs drawn at random, seed {seed}), {len(queries)} of {len(data.queries)} queries"
    )
    return replace(data, doc_ids=doc_ids, doc_texts=texts, queries=queries, qrels=qrels), note


def _index_dir(root: Path, system: str, describe: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(describe, sort_keys=True, default=str).encode()).hexdigest()
    return root / f"index-{system}-{digest[:10]}"


def _dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("shard-*.npz"))


def _csr_bytes(matrix: sp.csr_matrix) -> int:
    """Bytes of a CSR matrix stored as float32 values, int32 column ids and int64 row pointers."""
    return matrix.data.size * 4 + matrix.indices.size * 4 + matrix.indptr.size * 8


@dataclass(frozen=True)
class SystemOptions:
    """How :func:`evaluate_system` runs one encoder: run depth, batches, timed queries, search."""

    k: int = 1000  # depth of the run that is scored
    batch_size: int = 32  # docs per encode batch (and queries, unless query_batch_size is set)
    query_batch_size: int | None = None  # 1: every query encoded alone, as in the timed loop
    latency_queries: int = 100  # queries timed one at a time: encode it, then search (0: none)
    latency_k: int = 10  # search depth of the timed queries
    threads: int | None = None  # search threads (None: the index's default)
    backend: str | None = None  # exact search kernel (None: the index's default)
    profile_encoding: bool = False  # time the doc encoding and take its peak memory
    show_progress: bool = True


def _encode_docs(
    encoder: Any,
    data: BeirData,
    index_dir: Path,
    describe: dict[str, Any],
    options: SystemOptions,
) -> dict[str, float]:
    """Encode the corpus into resumable shards; profile the encoding if ``options`` ask.

    The profile (after one warm-up doc): seconds inside ``encode_docs``, docs per second, and the
    peak memory meanwhile in absolute bytes. Reused shards encode nothing: time and rate are NaN.
    """
    seconds: list[float] = []
    n_encoded = 0

    def encode_fn(texts: list[str]):
        nonlocal n_encoded
        start = time.perf_counter()
        # a shard can take minutes on a CPU: its batches show progress too (the outer bar: shards)
        reps = encoder.encode_docs(
            texts, batch_size=options.batch_size, show_progress=options.show_progress
        )
        seconds.append(time.perf_counter() - start)
        n_encoded += len(texts)
        return reps

    def encode_all() -> None:
        encode_corpus(
            encode_fn, data.doc_ids, data.doc_texts, index_dir, describe=describe,
            progress=options.show_progress,
        )  # fmt: skip

    if not options.profile_encoding:
        encode_all()
        return {}
    encoder.encode_docs(data.doc_texts[:1], batch_size=1, show_progress=False)  # warm-up
    with PeakMemory(str(getattr(encoder, "device", "cpu"))) as memory:
        encode_all()
        peak = memory.peak_total()
    encode_s = sum(seconds) if n_encoded else math.nan
    return {
        "encode_s": encode_s,
        "docs_per_s": n_encoded / encode_s if n_encoded else math.nan,
        "encode_peak_bytes": float(peak),
    }


def _query_latencies(
    encoder: Any, index: InvertedIndex, texts: list[str], options: SystemOptions
) -> list[float]:
    """Seconds per query, each encoded alone and searched to ``latency_k``.

    The encoder's per-call INFO lines (texts truncated) are muted here: these queries were encoded
    (and counted) once already, and one line per timed query would flood the output.
    """
    timings = []
    with muted(SparseEncoder.__module__):  # where `encode` logs
        for text in texts[: options.latency_queries]:
            start = time.perf_counter()
            vec = encoder.encode_queries([text], show_progress=False)  # (1, V)
            index.search(vec, k=options.latency_k, threads=options.threads)
            timings.append(time.perf_counter() - start)
    return timings


def evaluate_system(
    encoder: Any,
    data: BeirData,
    out_dir: Path,
    system: str,
    options: SystemOptions = SystemOptions(),
    slice_note: str | None = None,
    describe: dict[str, Any] | None = None,
) -> tuple[dict[str, float], dict[str, float], dict[str, dict[str, float]]]:
    """Encode, index, search and score one encoder on one data set: (metrics, efficiency, run).

    Shards go to ``out_dir/<dataset>/index-<system>-<hash>`` (reused when `describe`, the slice and
    the batch size match; `describe` defaults to ``encoder.describe()``) and the run to
    ``out_dir/<dataset>/<system>.trec``. Efficiency: query_nnz, doc_nnz, flops, index_mb (shard
    files), query_p50_ms, query_p95_ms; with ``options.profile_encoding`` also encode_s, docs_per_s,
    encode_peak_bytes (peak RSS while encoding, weights included; CUDA: peak allocated) and
    index_bytes (the docs' CSR matrix, :func:`_csr_bytes`).
    """
    describe = {
        "encoder": encoder.describe() if describe is None else describe,
        "dataset": data.name,
        "slice": slice_note,
        "batch_size": options.batch_size,
    }
    index_dir = _index_dir(out_dir / data.name, system, describe)
    profile = _encode_docs(encoder, data, index_dir, describe, options)
    docs, doc_ids, _manifest = load_index(index_dir)
    index = InvertedIndex.build(docs, doc_ids, backend=options.backend)
    query_ids = list(data.queries)
    query_texts = [data.queries[q] for q in query_ids]
    q_reps = encoder.encode_queries(
        query_texts,
        batch_size=options.query_batch_size or options.batch_size,
        show_progress=options.show_progress,
    )  # (Q, V)
    k = min(options.k, max(1, len(doc_ids)))
    ranked = index.search_ids(q_reps, query_ids, k=k, threads=options.threads)
    write_trec_run(out_dir / data.name / f"{system}.trec", ranked, tag=system)
    run = {q: dict(pairs) for q, pairs in ranked.items()}
    result = evaluate_run(data.qrels, run, DEFAULT_METRICS)
    efficiency = dict(sparsity_stats(q_reps, docs))
    efficiency["index_mb"] = _dir_bytes(index_dir) / 2**20
    if options.latency_queries > 0:  # 0: no latency measurement
        lat = latency_percentiles(_query_latencies(encoder, index, query_texts, options))
        efficiency.update(query_p50_ms=lat["p50_ms"], query_p95_ms=lat["p95_ms"])
    if options.profile_encoding:
        efficiency.update(profile, index_bytes=float(_csr_bytes(docs)))
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


def _check_systems(systems: list[SystemSpec], datasets: list[str]) -> None:
    if not systems:
        raise ValueError("nothing to evaluate: give at least one model or a --baseline")
    if not datasets:
        raise ValueError("no data sets given")
    names = [s.name for s in systems]
    if len(set(names)) != len(names):
        raise ValueError(f"two systems share a name: {names} (use NAME=MODEL)")
    for spec in systems:
        if spec.model is None and spec.name not in BASELINES:
            raise ValueError(
                f"unknown baseline {spec.name!r}: one of {sorted(BASELINES)}, or give a model"
            )


def baseline_rows(
    data: BeirData, k: int = 1000, metrics: tuple[str, ...] = ("ndcg_cut_10", "recall_100")
) -> dict[str, dict[str, float]]:
    """{baseline: mean metrics} of each of :data:`BASELINES` on `data` (nothing written)."""
    out = {}
    for name, stemmer in BASELINES.items():
        run = bm25_search(data.doc_ids, data.doc_texts, data.queries, k=k, stemmer=stemmer)
        out[name] = dict(evaluate_run(data.qrels, run, list(metrics)).mean)
    return out


def ranking_metrics(
    data: BeirData,
    index: InvertedIndex,
    q_reps: Any,
    k: int = 1000,
    metrics: tuple[str, ...] = ("ndcg_cut_10", "recall_100"),
) -> dict[str, float]:
    """Mean metrics of `q_reps` (rows in ``data.queries`` order) searched in `index`."""
    query_ids = list(data.queries)
    ranked = index.search_ids(q_reps, query_ids, k=min(k, len(data.doc_ids)))
    run = {q: dict(pairs) for q, pairs in ranked.items()}
    return dict(evaluate_run(data.qrels, run, list(metrics)).mean)


def _evaluate_bm25(data: BeirData, out: Path, k: int, name: str = "bm25") -> dict[str, float]:
    run = bm25_search(data.doc_ids, data.doc_texts, data.queries, k=k, stemmer=BASELINES[name])
    write_trec_run(out / data.name / f"{name}.trec", _ranked(run), tag=name)
    return evaluate_run(data.qrels, run, DEFAULT_METRICS).mean


def _record_in_card(spec: SystemSpec, dataset: str, metrics, efficiency, split, note) -> None:
    """Results of a local csplade folder go into its model card (csplade_eval.json, README.md)."""
    card = record_eval(
        spec.model,
        dataset,
        metrics[spec.name][dataset],
        efficiency.get(spec.name, {}).get(dataset),
        split=split,
        slice_note=note,
    )
    logger.info("%s on %s: results added to the model card %s", spec.name, dataset, card)


@dataclass(frozen=True)
class EvalOptions:
    """How :func:`evaluate` runs: the split and slice, run depth, batches, timed queries, how models
    load (`device`, `dtype`, `encoder_overrides`: SparseEncoderConfig fields), the search kernel.

    `lexical_stats`: for models with a lexical residual, "model" keeps the IDF and document lengths
    saved with the model (its training documents'); "collection" re-estimates them on each data
    set's corpus (:func:`csplade.index.identity.fit_to_collection`), as BM25 does. Other systems
    are unaffected.
    """

    split: str = "test"
    max_docs: int | None = None
    max_queries: int | None = None
    k: int = 1000
    batch_size: int = 32
    latency_queries: int = 100
    device: str | None = None
    dtype: str | None = None
    encoder_overrides: dict[str, Any] | None = None
    backend: str | None = None
    lexical_stats: str = "model"

    def __post_init__(self) -> None:
        if self.lexical_stats not in LEXICAL_STATS:
            raise ValueError(
                f"lexical_stats must be one of {LEXICAL_STATS}, got {self.lexical_stats!r}"
            )

    def system_options(self) -> SystemOptions:
        return SystemOptions(
            k=self.k,
            batch_size=self.batch_size,
            latency_queries=self.latency_queries,
            backend=self.backend,
        )


def evaluate(
    systems: list[SystemSpec],
    datasets: list[str],
    out_dir: str | os.PathLike,
    options: EvalOptions | None = None,
    **settings: Any,
) -> dict[str, Path]:
    """Evaluate every system on every data set; write runs, metrics.json, table.md and a chart.

    `options` (or its fields as keywords, ``evaluate(systems, datasets, out, k=100)``):
    :class:`EvalOptions`. Results already in `out_dir` under the same split and slice are kept.
    """
    options = replace(options, **settings) if options else EvalOptions(**settings)
    _check_systems(systems, datasets)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "split": options.split, "max_docs": options.max_docs,
        "max_queries": options.max_queries, "k": options.k,
    }  # fmt: skip
    metrics, efficiency = _load_settings(out, settings)
    loaded = [(name, load_beir(find_dataset(name), split=options.split)) for name in datasets]
    sliced = [
        (name, *slice_data(data, options.max_docs, options.max_queries)) for name, data in loaded
    ]
    first_model = next((s for s in systems if s.model is not None), None)
    for spec in systems:
        results = _evaluate_spec(spec, sliced, out, options, write_run=spec is first_model)
        for dataset, result, eff, note in results:  # recorded as each data set is done
            metrics.setdefault(spec.name, {})[dataset] = {m: float(v) for m, v in result.items()}
            if eff:
                efficiency.setdefault(spec.name, {})[dataset] = {
                    m: float(v) for m, v in eff.items() if np.isfinite(v)
                }
            if (
                spec.model is not None
                and not spec.overrides
                and (Path(spec.model) / CONFIG_NAME).is_file()
            ):
                _record_in_card(spec, dataset, metrics, efficiency, options.split, note)
    notes = [note for _, _, note in sliced if note]
    slice_note = "; ".join(notes) if notes else None
    written = write_results(out, metrics, efficiency or None, slice_note=slice_note)
    write_json_atomic(out / SETTINGS_FILE, settings)
    return written


def _evaluate_spec(
    spec: SystemSpec, sliced: list, out: Path, options: EvalOptions, write_run: bool
) -> Iterator[tuple[str, dict[str, float], dict[str, float], str | None]]:
    """One system on every data set, one at a time: (dataset, metrics, efficiency, note)."""
    encoder = None
    if spec.model is not None:
        encoder = SparseEncoder.from_pretrained(
            spec.model, device=options.device, dtype=options.dtype,
            **{**(options.encoder_overrides or {}), **spec.overrides},
        )  # fmt: skip
    for _name, data, note in sliced:
        (out / data.name).mkdir(parents=True, exist_ok=True)
        logger.info("evaluating %s on %s (%d docs, %d queries)", spec.name, data.name,
                    len(data.doc_ids), len(data.queries))  # fmt: skip
        eff: dict[str, float] = {}
        if encoder is None:
            result = _evaluate_bm25(data, out, options.k, spec.name)
        else:
            if fit_to_collection(encoder, data.doc_texts, options.lexical_stats) == "collection":
                note = "; ".join(filter(None, [note, "lexical IDF and lengths of this corpus"]))
            result, eff, run = evaluate_system(
                encoder, data, out, spec.name, options.system_options(), slice_note=note
            )
            if write_run:
                write_trec_run(out / data.name / "run.trec", _ranked(run), tag=spec.name)
        logger.info("%s on %s: nDCG@10 %.4f", spec.name, data.name, result["ndcg_cut_10"])
        yield data.name, result, eff, note
