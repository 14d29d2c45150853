"""Approximate top-k search with Seismic (Bruch, Nardini, Rulli, Venturini, SIGIR 2024,
"Efficient Inverted Indexes for Approximate Retrieval over Learned Sparse Representations").

What: `SeismicSearcher` wraps `pyseismic-lsr` (`import seismic`) behind the same contract as
`InvertedIndex`: `build(docs_csr, doc_ids)`, `search(queries_csr, k) -> (scores (n_q, k), doc
indices (n_q, k))` padded with -inf / -1, and `search_ids` returning a run dict.

Why: Seismic prunes each posting list to its highest-weight entries (`n_postings` on average,
`max_fraction` cap), clusters every list into blocks with a summary vector (`centroid_fraction`,
`summary_energy`), and at query time uses only the `query_cut` heaviest query terms and skips blocks
whose summary score cannot beat `heap_factor` x the current k-th score. It is typically an order of
magnitude faster than exhaustive search at a small recall cost; the knobs trade one for the other.

Details of this wrapper:
- Vocab ids are remapped to the compact range of terms that occur in the collection, so the u16
  component index (`seismic.SeismicIndex`) serves any vocabulary with < 65,536 used terms (a Qwen or
  Llama vocabulary has ~150k ids, most never used by a given corpus); above that the u32
  `SeismicIndexLV` is used. Query terms absent from the collection are dropped (they score 0
  anyway).
- Seismic stores values in half precision, so its scores are approximate. With `rescore=True`
  (default) the returned candidates are re-scored exactly against the float32 doc vectors and
  re-sorted with the package's tie rule (score desc, smaller doc index first); the doc matrix is
  kept for that (its memory is reported by `nbytes`).
- Only docs with a positive score are returned, as for the exact index.
- Seismic's Rust code prints build progress to stdout; `build` silences the process's stdout file
  descriptor for the duration (`quiet=False` keeps it), which also hides other threads' output then.

Measured (benchmarks/search.py, synthetic Zipf collection of 100k docs, 2 threads): the best
setting with recall@10 >= 0.95 (n_postings=500, query_cut=8, heap_factor=1.0: recall 0.959) ran
at 0.43x the exact index's batched throughput, 2.0x the exact index called one query at a time,
and 2.7x a scipy brute force. Two reasons: the exact kernel amortises long posting lists over
batches of queries, and random synthetic docs have no topical structure, so block summaries rarely
prune (heap_factor <= 1 skipped nothing there). Seismic's published gains are on real corpora of
millions of docs with much longer posting lists; measure on yours before choosing it.

Known limits: no save/load (rebuild from the shards); results are approximate by design; the build
is slow on few cores (3-5 minutes for 100k docs on 2 busy cores).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import scipy.sparse as sp

from csplade.index.inverted import as_csr, default_threads
from csplade.index.runs import topk_to_run
from csplade.index.storage import require_unique_ids

logger = logging.getLogger(__name__)

_U16_LIMIT = 1 << 16


def _import_seismic():
    try:
        import seismic
    except ImportError as exc:
        raise ImportError(
            "SeismicSearcher needs the Seismic bindings: pip install pyseismic-lsr "
            "(or pip install 'csplade[eval]')"
        ) from exc
    return seismic


@contextmanager
def _quiet_stdout(enabled: bool):
    """Redirect file descriptor 1 to a temp file; log what was written at DEBUG level."""
    if not enabled:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
            sink.seek(0)
            for line in sink.read().decode("utf-8", "replace").splitlines():
                if line.strip():
                    logger.debug("seismic: %s", line)


@dataclass
class SeismicConfig:
    """Seismic's knobs. Build-time ones shape the index; query-time ones can be changed per search.

    Defaults are pyseismic-lsr's build defaults and the query settings of its examples. Block
    skipping: a block is skipped when (query . block summary) < heap_factor * (current k-th score);
    summaries are per-term maxima over the block, so heap_factor <= 1 skips little and values above
    1 trade recall for speed (see benchmarks/search.py for a sweep).
    """

    # Build
    n_postings: int = 3500  # average posting-list length kept after pruning
    max_fraction: float = 1.5  # a list keeps at most n_postings * max_fraction entries
    centroid_fraction: float = 0.1  # blocks per list, as a fraction of its length
    min_cluster_size: int = 2
    summary_energy: float = 0.4  # fraction of a block's L1 mass kept in its summary vector
    doc_cut: int = 15  # doc terms used when assigning docs to blocks
    nknn: int = 0  # k-NN graph size (0 = none); makes the build much slower
    # Search
    query_cut: int = 10  # heaviest query terms used
    heap_factor: float = 0.7  # skip a block when summary score < heap_factor * k-th score
    n_knn: int = 0  # neighbours of each result re-examined (needs nknn > 0 at build)
    sorted_summaries: bool = True  # visit blocks in decreasing summary score
    rescore: bool = True  # exact float32 re-scoring of the returned candidates

    def __post_init__(self) -> None:
        for name in ("max_fraction", "centroid_fraction", "summary_energy", "heap_factor"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SeismicConfig.{name} must be > 0, got {getattr(self, name)}")
        for name in ("min_cluster_size", "doc_cut", "query_cut"):
            if getattr(self, name) < 1:
                raise ValueError(f"SeismicConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_postings < 1:
            raise ValueError(f"SeismicConfig.n_postings must be >= 1, got {self.n_postings}")
        if self.n_knn > 0 and self.nknn == 0:
            raise ValueError("SeismicConfig.n_knn > 0 needs a k-NN graph: set nknn > 0 at build")


class SeismicSearcher:
    """Approximate search over a (n_docs, V) CSR collection with Seismic (see module docstring)."""

    def __init__(self, index, docs: sp.csr_matrix, doc_ids: list[str], term_map, config):
        self._index = index
        self.docs = docs  # (n_docs, V) float32, kept for exact re-scoring
        self.doc_ids = doc_ids
        self.term_map = term_map  # (V,) int64: vocab id -> compact component id, -1 if unused
        self.config = config
        self.vocab_size = docs.shape[1]

    @property
    def n_docs(self) -> int:
        return len(self.doc_ids)

    @property
    def nbytes(self) -> int:
        """Bytes of the doc matrix and term map kept by the wrapper (Seismic's own not included)."""
        return (
            self.docs.data.nbytes
            + self.docs.indices.nbytes
            + self.docs.indptr.nbytes
            + self.term_map.nbytes
        )

    @classmethod
    def build(
        cls,
        docs,
        doc_ids: list[str],
        config: SeismicConfig | None = None,
        threads: int | None = None,
        quiet: bool = True,
        **overrides,
    ) -> SeismicSearcher:
        """Build from a (n_docs, V) sparse matrix; keyword overrides set `SeismicConfig` fields."""
        seismic = _import_seismic()
        config = SeismicConfig(**{**asdict(config or SeismicConfig()), **overrides})
        csr = as_csr(docs, "docs")
        if csr.shape[0] != len(doc_ids):
            raise ValueError(f"docs has {csr.shape[0]} rows but {len(doc_ids)} doc ids were given")
        doc_ids = list(doc_ids)
        require_unique_ids(doc_ids, "doc id")
        if csr.nnz == 0:
            raise ValueError("docs has no non-zero weight: nothing to index")
        if (csr.data < 0).any():
            raise ValueError("Seismic needs non-negative weights; docs has negative values")

        used = np.flatnonzero(np.bincount(csr.indices, minlength=csr.shape[1]))
        term_map = np.full(csr.shape[1], -1, dtype=np.int64)
        term_map[used] = np.arange(used.size)
        large = used.size >= _U16_LIMIT
        dataset = (seismic.SeismicDatasetLV if large else seismic.SeismicDataset)(dim=used.size)
        # Seismic ids are row numbers as strings: results map back to rows without a dict lookup.
        dataset.add_documents_by_id(
            [str(i) for i in range(csr.shape[0])],
            term_map[csr.indices],  # strictly increasing per row: remap preserves order
            csr.data,
            csr.indptr.astype(np.int64),
        )
        n_postings = config.n_postings
        index_cls = seismic.SeismicIndexLV if large else seismic.SeismicIndex
        start = time.perf_counter()
        with _quiet_stdout(quiet):
            index = index_cls.build_from_dataset(
                dataset,
                n_postings=n_postings,
                centroid_fraction=config.centroid_fraction,
                min_cluster_size=config.min_cluster_size,
                summary_energy=config.summary_energy,
                max_fraction=config.max_fraction,
                doc_cut=config.doc_cut,
                nknn=config.nknn,
                num_threads=threads or default_threads(),
            )
        logger.info(
            "built Seismic index: %d docs, %d used terms (%s), n_postings=%d, %.1fs",
            csr.shape[0],
            used.size,
            "u32" if large else "u16",
            n_postings,
            time.perf_counter() - start,
        )
        return cls(index, csr, doc_ids, term_map, config)

    def search(
        self,
        queries,
        k: int = 10,
        threads: int | None = None,
        query_cut: int | None = None,
        heap_factor: float | None = None,
        n_knn: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-k: (scores float32 (n_q, k), doc indices int64 (n_q, k)), -inf/-1 pad."""
        seismic = _import_seismic()
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        cfg = self.config
        query_cut = cfg.query_cut if query_cut is None else query_cut
        heap_factor = cfg.heap_factor if heap_factor is None else heap_factor
        n_knn = cfg.n_knn if n_knn is None else n_knn
        q = as_csr(queries, "queries", n_cols=self.vocab_size)
        n_q = q.shape[0]
        scores = np.full((n_q, k), -np.inf, dtype=np.float32)  # (n_q, k)
        docs = np.full((n_q, k), -1, dtype=np.int64)  # (n_q, k)
        if n_q == 0:
            return scores, docs

        string_type = seismic.get_seismic_string()
        mapped = self.term_map[q.indices]  # (q_nnz,)
        components, values = [], []
        for row in range(n_q):
            lo, hi = q.indptr[row], q.indptr[row + 1]
            keep = mapped[lo:hi] >= 0
            components.append(mapped[lo:hi][keep].astype(str).astype(string_type))
            values.append(q.data[lo:hi][keep])
        results = self._index.batch_search(
            np.array([str(i) for i in range(n_q)], dtype=string_type),
            components,
            values,
            k=k,
            query_cut=query_cut,
            heap_factor=heap_factor,
            n_knn=n_knn,
            sorted=cfg.sorted_summaries,
            num_threads=threads or default_threads(),
        )
        for hits in results:
            for col, (query, score, doc) in enumerate(hits[:k]):
                row = int(query)  # results are not guaranteed to come back in query order
                scores[row, col] = score
                docs[row, col] = int(doc)
        if cfg.rescore:
            scores, docs = self._rescore(q, scores, docs, k)
        else:  # same contract as the exact index: positive scores only
            drop = ~(scores > 0)
            scores[drop], docs[drop] = -np.inf, -1
        return scores, docs

    def _rescore(self, q: sp.csr_matrix, scores, docs, k: int):
        """Exact float32 scores for the candidates, re-sorted by (score desc, doc index asc).

        The element-wise product of two CSR rows followed by a sequential row sum adds the float32
        products in increasing term id, the same arithmetic as the exact index, so the scores match
        `InvertedIndex.search` bit for bit.
        """
        rows, cols = np.nonzero(docs >= 0)  # (n_cand,) candidate (query, slot) pairs
        cand = docs[rows, cols]
        products = self.docs[cand].multiply(q[rows]).tocsr()  # (n_cand, V) float32
        products.sort_indices()
        # csr @ ones adds each row's products sequentially (`.sum(axis=1)` would sum pairwise).
        exact = products @ np.ones(products.shape[1], dtype=np.float32)  # (n_cand,)
        order = np.lexsort((cand, -exact, rows))
        rows, cand, exact = rows[order], cand[order], exact[order]
        keep = exact > 0
        rows, cand, exact = rows[keep], cand[keep], exact[keep]
        rank = np.arange(rows.size) - np.searchsorted(rows, rows, side="left")
        out_s = np.full_like(scores, -np.inf)
        out_d = np.full_like(docs, -1)
        out_s[rows, rank] = exact
        out_d[rows, rank] = cand
        return out_s, out_d

    def search_ids(
        self, queries, query_ids: list[str], k: int = 10, threads: int | None = None, **knobs
    ) -> dict[str, list[tuple[str, float]]]:
        """Search and return {query id: [(doc id, score), ...]} best first (no padding entries)."""
        if len(query_ids) != queries.shape[0]:
            raise ValueError(f"{queries.shape[0]} queries but {len(query_ids)} query ids")
        scores, docs = self.search(queries, k=k, threads=threads, **knobs)
        return topk_to_run(scores, docs, query_ids, self.doc_ids)
