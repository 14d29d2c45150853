"""Exact inverted index over sparse (SPLADE-style) vectors: build, top-k search, save/load.

What: documents arrive as a CSR matrix (n_docs, V) of non-negative term weights (one row per doc, as
produced by a SPLADE encoder); the index stores it transposed as posting lists (CSC: for every vocab
id, the doc indices that contain it and their weights). A query is a sparse vector over the same
vocabulary and a doc's score is the exact dot product `q . d`.

Why two kernels: both compute scores term-at-a-time, visiting each query's terms in increasing
vocab id and accumulating float32 products, so they return the same float32 scores bit for bit (and
the same scores as scipy's `Q @ D.T`).
- "numba" (`_numba_kernels.search_batch`): queries are processed in batches of up to 128 that share
  one accumulator block (docs x queries, doc-major, L2-sized), walked one doc range at a time. A
  posting of a term that many queries of the batch use updates all of them in one vectorised loop,
  so the long posting lists of frequent terms are read once per batch instead of once per query;
  each query keeps a size-k heap. Batches run on a thread pool (the kernel releases the GIL).
- "scipy": a block of queries times the posting matrix (`csr @ csr`, scipy's SMMP) materialises
  every (query, matched doc) score, then `argpartition` + a stable sort per query.
The default is "numba": on the synthetic SPLADE-like benchmark (`benchmarks/search.py`) it serves
several times more queries per second than a scipy brute force `Q @ D.T` + `argpartition`, and than
the scipy kernel, which pays for building the sparse product (two passes, one output entry per
matched doc) and for a Python-level top-k per query (figures: docs/experiments.md). The scipy kernel
stays as the reference and as the fallback when numba is not installed. The numba kernel is compiled
on first use and cached on disk (`__pycache__`) afterwards.

Ranking contract (both kernels): results are ordered by score, descending; equal scores are broken
by the smaller doc index first (doc index = row in the matrix given to `build`, i.e. corpus order).
Only docs with a strictly positive score are returned: a doc sharing no term with the query is not a
match and must not appear in a TREC run. When fewer than k docs match, the remaining slots hold doc
index -1 and score -inf (`search_ids` drops them). Negative weights are accepted but such docs
simply score lower; SPLADE weights are >= 0 by construction (log(1 + ReLU)).

Known limits: scores are float32 sums, so two docs whose exact real-valued scores differ by less
than float32 rounding may tie or swap; there is no dynamic pruning (WAND/MaxScore/block-max), so a
query costs the total length of its terms' posting lists; batching is what makes throughput high, so
one query per call is several times slower per query than a batch (latency-bound serving would want
a pruning index). `SeismicSearcher` (`csplade.index.seismic`) is the approximate alternative.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from csplade.index.runs import topk_to_run
from csplade.index.storage import (
    pack_strings,
    require_unique_ids,
    save_npz_atomic,
    unpack_strings,
)

logger = logging.getLogger(__name__)

BACKENDS = ("numba", "scipy")
FORMAT = "csplade-inverted-index"
VERSION = 1
_SCIPY_BLOCK = 64  # queries per sparse product in the scipy kernel
_NUMBA_BATCH = 128  # queries sharing one accumulator block in the numba kernel


def default_threads() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def numba_available() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def as_csr(matrix, name: str, n_cols: int | None = None) -> sp.csr_matrix:
    """Validate and normalise a sparse matrix: CSR, float32, summed duplicates, sorted indices.

    Explicit zeros are removed. Raises ValueError naming `name` for a dense input, a wrong number of
    columns, or a non-finite value (with its row and column).
    """
    if not sp.issparse(matrix):
        raise TypeError(f"{name} must be a scipy.sparse matrix (CSR), got {type(matrix).__name__}")
    if matrix.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {matrix.shape}")
    if n_cols is not None and matrix.shape[1] != n_cols:
        raise ValueError(f"{name} has {matrix.shape[1]} columns, the index vocabulary has {n_cols}")
    csr = sp.csr_matrix(matrix, dtype=np.float32, copy=True)
    csr.sum_duplicates()  # also sorts indices
    bad = ~np.isfinite(csr.data)
    if bad.any():
        pos = int(np.flatnonzero(bad)[0])
        row = int(np.searchsorted(csr.indptr, pos, side="right") - 1)
        raise ValueError(f"{name} has a non-finite value at row {row}, column {csr.indices[pos]}")
    csr.eliminate_zeros()
    csr.indptr = csr.indptr.astype(np.int64, copy=False)
    csr.indices = csr.indices.astype(np.int32, copy=False)
    return csr


def topk_stable(scores: np.ndarray, docs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of one query's (score, doc) pairs: positive scores only, score desc then doc asc."""
    keep = scores > 0
    scores, docs = scores[keep], docs[keep]
    if scores.size > k:
        part = np.argpartition(-scores, k - 1)[:k]
        kth = scores[part].min()
        keep = scores >= kth  # every doc tied with the k-th score stays a candidate
        scores, docs = scores[keep], docs[keep]
    order = np.lexsort((docs, -scores))[:k]
    return scores[order], docs[order]


def _each(fn, starts: range, threads: int) -> None:
    """fn(start) for every start: in this thread, or over a pool of `threads` (blocks are disjoint)."""
    if threads == 1:
        for start in starts:
            fn(start)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(fn, starts))


class InvertedIndex:
    """Posting lists (CSC) over a fixed vocabulary, with exact top-k search.

    Build with `InvertedIndex.build(docs_csr, doc_ids)`; query with `search` (arrays) or
    `search_ids` (a run dict ready for `write_trec_run` / pytrec_eval).
    """

    def __init__(
        self,
        indptr: np.ndarray,  # (V + 1,) int64
        doc_indices: np.ndarray,  # (nnz,) int32, sorted within each posting list
        weights: np.ndarray,  # (nnz,) float32
        doc_ids: list[str],
        backend: str | None = None,
    ):
        self.indptr = indptr
        self.doc_indices = doc_indices
        self.weights = weights
        self.doc_ids = list(doc_ids)
        self.vocab_size = len(indptr) - 1
        self.backend = backend or ("numba" if numba_available() else "scipy")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")

    @property
    def n_docs(self) -> int:
        return len(self.doc_ids)

    @property
    def nnz(self) -> int:
        return int(self.weights.size)

    @property
    def nbytes(self) -> int:
        """Memory held by the posting arrays (doc ids not counted)."""
        return self.indptr.nbytes + self.doc_indices.nbytes + self.weights.nbytes

    @classmethod
    def build(cls, docs, doc_ids: list[str], backend: str | None = None) -> InvertedIndex:
        """Index a (n_docs, V) sparse matrix whose row i is the doc `doc_ids[i]`."""
        csr = as_csr(docs, "docs")
        if csr.shape[0] != len(doc_ids):
            raise ValueError(f"docs has {csr.shape[0]} rows but {len(doc_ids)} doc ids were given")
        require_unique_ids(list(doc_ids), "doc id")
        if csr.shape[0] >= np.iinfo(np.int32).max:
            raise ValueError(f"{csr.shape[0]} docs exceed the int32 doc index range")
        csc = csr.tocsc()  # row indices within each column come out sorted
        csc.sort_indices()
        index = cls(
            csc.indptr.astype(np.int64),
            csc.indices.astype(np.int32),
            csc.data.astype(np.float32),
            doc_ids,
            backend=backend,
        )
        logger.info(
            "built inverted index: %d docs, V=%d, %d postings, %.1f MiB",
            index.n_docs,
            index.vocab_size,
            index.nnz,
            index.nbytes / 2**20,
        )
        return index

    # ----------------------------------------------------------------------------------- search

    def search(
        self, queries, k: int = 10, threads: int | None = None, backend: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k for each query row.

        Returns (scores float32 (n_q, k), doc indices int64 (n_q, k)), best first, ties by smaller
        doc index; slots beyond the matching docs hold -inf / -1 (see the module docstring).
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        backend = backend or self.backend
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        q = as_csr(queries, "queries", n_cols=self.vocab_size)
        threads = max(1, min(threads or default_threads(), max(q.shape[0], 1)))
        scores = np.full((q.shape[0], k), -np.inf, dtype=np.float32)  # (n_q, k)
        docs = np.full((q.shape[0], k), -1, dtype=np.int64)  # (n_q, k)
        if q.shape[0] == 0 or self.n_docs == 0:
            return scores, docs
        if backend == "numba":
            self._search_numba(q, k, threads, scores, docs)
        else:
            self._search_scipy(q, k, threads, scores, docs)
        return scores, docs

    def _search_numba(self, q: sp.csr_matrix, k: int, threads: int, scores, docs) -> None:
        from csplade.index._numba_kernels import search_batch

        # Lanes per batch: at most _NUMBA_BATCH, and a multiple of `threads` batches of equal size
        # so that no worker is left with a short tail batch.
        n_batches = -(-q.shape[0] // _NUMBA_BATCH)
        n_batches = -(-n_batches // threads) * threads
        batch = max(1, -(-q.shape[0] // n_batches))

        def run_batch(start: int) -> None:  # the kernel releases the GIL
            search_batch(
                q.indptr,
                q.indices,
                q.data,
                self.indptr,
                self.doc_indices,
                self.weights,
                self.n_docs,
                k,
                start,
                min(start + batch, q.shape[0]),
                scores,
                docs,
            )

        _each(run_batch, range(0, q.shape[0], batch), threads)

    def _search_scipy(self, q: sp.csr_matrix, k: int, threads: int, scores, docs) -> None:
        postings = sp.csr_matrix(  # (V, n_docs): row t = posting list of term t
            (self.weights, self.doc_indices, self.indptr), shape=(self.vocab_size, self.n_docs)
        )

        def run_block(start: int) -> None:
            block = q[start : start + _SCIPY_BLOCK] @ postings  # (B, n_docs) sparse
            for row in range(block.shape[0]):
                lo, hi = block.indptr[row], block.indptr[row + 1]
                top_s, top_d = topk_stable(block.data[lo:hi], block.indices[lo:hi], k)
                scores[start + row, : top_s.size] = top_s
                docs[start + row, : top_d.size] = top_d

        _each(run_block, range(0, q.shape[0], _SCIPY_BLOCK), threads)

    def search_ids(
        self, queries, query_ids: list[str], k: int = 10, threads: int | None = None
    ) -> dict[str, list[tuple[str, float]]]:
        """Search and return {query id: [(doc id, score), ...]} best first (no padding entries)."""
        if len(query_ids) != queries.shape[0]:
            raise ValueError(f"{queries.shape[0]} queries but {len(query_ids)} query ids")
        scores, docs = self.search(queries, k=k, threads=threads)
        return topk_to_run(scores, docs, query_ids, self.doc_ids)

    # ------------------------------------------------------------------------------ save / load

    def save(self, path: str | os.PathLike) -> None:
        """Write the index to one uncompressed .npz file, atomically (temp file + os.replace)."""
        blob, offsets = pack_strings(self.doc_ids)
        save_npz_atomic(
            path,
            {
                "format": np.array(FORMAT),
                "version": np.array(VERSION),
                "indptr": self.indptr,
                "doc_indices": self.doc_indices,
                "weights": self.weights,
                "doc_ids_blob": blob,
                "doc_ids_offsets": offsets,
            },
        )

    @classmethod
    def load(cls, path: str | os.PathLike, backend: str | None = None) -> InvertedIndex:
        path = Path(path)
        with np.load(path, allow_pickle=False) as npz:
            missing = {"format", "version", "indptr", "doc_indices", "weights"} - set(npz.files)
            if missing:
                raise ValueError(
                    f"{path}: not a csplade inverted index (missing {sorted(missing)})"
                )
            if str(npz["format"]) != FORMAT or int(npz["version"]) != VERSION:
                raise ValueError(
                    f"{path}: format {str(npz['format'])!r} v{int(npz['version'])}, "
                    f"expected {FORMAT!r} v{VERSION}"
                )
            indptr = npz["indptr"]
            doc_indices = npz["doc_indices"]
            weights = npz["weights"]
            doc_ids = unpack_strings(npz["doc_ids_blob"], npz["doc_ids_offsets"])
        if indptr[-1] != weights.size or doc_indices.size != weights.size:
            raise ValueError(f"{path}: posting arrays disagree in length (corrupt file?)")
        if doc_indices.size and int(doc_indices.max()) >= len(doc_ids):
            raise ValueError(f"{path}: a posting points past the last of {len(doc_ids)} docs")
        return cls(indptr, doc_indices, weights, doc_ids, backend=backend)
