"""Numba kernel for exact sparse top-k search (imported lazily by `csplade.index.inverted`).

Term-at-a-time over a *batch* of queries and one *range* of docs at a time:

- The batch's B queries share one accumulator block `acc` (R docs, B lanes) laid out doc-major, so a
  posting (doc, w) of a term used by several queries in the batch updates B contiguous floats. Terms
  used by at least a quarter of the batch are applied to all lanes (a vectorisable loop; absent
  queries carry weight 0 and add +0.0, which leaves a float unchanged); rarer terms update only
  their own lanes. The long posting lists of frequent terms are thus read once per batch, not once
  per query.
- Docs are processed in ranges of R docs (R * B * 4 bytes = 256 KiB, well inside L2). Postings are
  doc-sorted, so each distinct query term keeps a cursor that advances range by range.
- After a range, only the 64-doc sub-blocks that received a posting are scanned: each (doc, query)
  with a positive score is offered to that query's size-k min-heap keyed by (score, -doc), then the
  block is zeroed.

Exactness: for every (query, doc) pair, the terms are applied in increasing vocab id and each
product is rounded to float32 before the add (no fused multiply-add, no fastmath): the same
operations in the same order as scipy's CSR x CSR product, so scores are bit-identical to `Q @ D.T`
in float32. Ties: the heap root is the worst entry, "worse" = lower score, or equal score and larger
doc index, so the smaller doc index wins a tie.

Parallelism: `search_batch` handles one batch and releases the GIL (`nogil=True`); the caller runs
batches on a thread pool, each call allocating its own block and heaps. This gives the same
throughput as `parallel=True` + `prange` over batches, without the parallel compilation (which
more than doubled the first-call compile time) or a dependency on numba's threading layer.
"""

from __future__ import annotations

import numpy as np
from numba import int64, njit, uint64

_BLOCK_BYTES = 1 << 18  # accumulator block per worker (fits L2 with room to spare)


@njit(inline="always")
def _worse(s_a, d_a, s_b, d_b):
    # True when (s_a, d_a) ranks below (s_b, d_b): lower score, or equal score and larger doc index.
    return s_a < s_b or (s_a == s_b and d_a > d_b)


@njit(inline="always")
def _sift_down(heap_s, heap_d, off, size, i):
    while True:
        left = 2 * i + 1
        if left >= size:
            return
        worst = left
        right = left + 1
        if right < size and _worse(
            heap_s[off + right], heap_d[off + right], heap_s[off + left], heap_d[off + left]
        ):
            worst = right
        a, b = off + worst, off + i
        if _worse(heap_s[a], heap_d[a], heap_s[b], heap_d[b]):
            heap_s[a], heap_s[b] = heap_s[b], heap_s[a]
            heap_d[a], heap_d[b] = heap_d[b], heap_d[a]
            i = worst
        else:
            return


@njit(inline="always")
def _sift_up(heap_s, heap_d, off, i):
    while i > 0:
        parent = (i - 1) // 2
        a, b = off + i, off + parent
        if _worse(heap_s[a], heap_d[a], heap_s[b], heap_d[b]):
            heap_s[a], heap_s[b] = heap_s[b], heap_s[a]
            heap_d[a], heap_d[b] = heap_d[b], heap_d[a]
            i = parent
        else:
            return


@njit(inline="always")
def _heap_offer(heap_s, heap_d, size, threshold, lane, k, score, doc):
    b = int64(lane)
    off = b * k
    if size[b] < k:
        heap_s[off + size[b]] = score
        heap_d[off + size[b]] = doc
        _sift_up(heap_s, heap_d, off, size[b])
        size[b] += 1
        if size[b] == k:
            threshold[b] = heap_s[off]
    else:
        heap_s[off] = score
        heap_d[off] = doc
        _sift_down(heap_s, heap_d, off, k, 0)
        threshold[b] = heap_s[off]


@njit(inline="always")
def _group_terms(q_indptr, q_indices, q_data, p_indptr, q0, q1):
    """The batch's (term, lane, weight) triples grouped by term in increasing id, each distinct
    term's posting cursor, and the dense (n_dense, B) weights of the terms a quarter of the batch use."""
    n_lanes = q1 - q0
    lo_t, hi_t = q_indptr[q0], q_indptr[q1]
    n_trip = hi_t - lo_t
    lanes = np.empty(n_trip, dtype=np.uint64)
    for qi in range(q0, q1):
        for j in range(q_indptr[qi], q_indptr[qi + 1]):
            lanes[j - lo_t] = qi - q0
    terms = q_indices[lo_t:hi_t]
    order = np.argsort(terms, kind="mergesort")
    s_terms = terms[order]
    s_lanes = lanes[order]
    s_weights = q_data[lo_t:hi_t][order]
    u_start = np.empty(n_trip + 1, dtype=np.int64)  # CSR over distinct terms
    n_u = 0
    for j in range(n_trip):
        if j == 0 or s_terms[j] != s_terms[j - 1]:
            u_start[n_u] = j
            n_u += 1
    u_start[n_u] = n_trip
    u_term = np.empty(n_u, dtype=np.int64)
    cursor = np.empty(n_u, dtype=np.int64)
    dense_row = np.full(n_u, -1, dtype=np.int64)
    n_dense = 0
    for u in range(n_u):
        u_term[u] = s_terms[u_start[u]]
        cursor[u] = p_indptr[u_term[u]]
        if 4 * (u_start[u + 1] - u_start[u]) >= n_lanes:
            dense_row[u] = n_dense
            n_dense += 1
    dense_w = np.zeros((max(n_dense, 1), n_lanes), dtype=np.float32)  # (n_dense, B)
    for u in range(n_u):
        if dense_row[u] >= 0:
            for j in range(u_start[u], u_start[u + 1]):
                dense_w[dense_row[u], s_lanes[j]] = s_weights[j]
    return n_u, s_lanes, s_weights, u_start, u_term, cursor, dense_row, dense_w


@njit(inline="always")
def _accumulate(terms, p_indptr, p_docs, p_weights, lo, hi, acc, flags, lanes_u):
    """Add the postings of docs [lo, hi) of every batch term into the block `acc` (R, B)."""
    n_u, s_lanes, s_weights, u_start, u_term, cursor, dense_row, dense_w = terms
    for u in range(n_u):
        p = cursor[u]
        end = p_indptr[u_term[u] + 1]
        row = dense_row[u]
        if row >= 0:
            wv = dense_w[row]
            while p < end and p_docs[p] < hi:
                d = uint64(p_docs[p] - lo)
                w = p_weights[p]
                base = d * lanes_u
                for b in range(lanes_u):
                    acc[base + b] += wv[b] * w
                flags[d >> uint64(6)] = 1
                p += 1
        else:
            j0, j1 = uint64(u_start[u]), uint64(u_start[u + 1])
            while p < end and p_docs[p] < hi:
                d = uint64(p_docs[p] - lo)
                w = p_weights[p]
                base = d * lanes_u
                for j in range(j0, j1):
                    acc[base + s_lanes[j]] += s_weights[j] * w
                flags[d >> uint64(6)] = 1
                p += 1
        cursor[u] = p


@njit(inline="always")
def _harvest(acc, flags, lo, hi, lanes_u, heap_s, heap_d, size, threshold, k):
    """Offer every positive score of the block's touched 64-doc sub-blocks to its query's heap, and
    zero them."""
    for f in range((hi - lo + 63) // 64):
        if flags[f] == 0:
            continue
        flags[f] = 0
        for d in range(f * 64, min(f * 64 + 64, hi - lo)):
            base = uint64(d) * lanes_u
            for b in range(lanes_u):
                score = acc[base + b]
                # Docs arrive in increasing index, so a tie with the heap root (an earlier,
                # smaller doc) never displaces it: "score > threshold" is the exact test.
                if score > threshold[b]:
                    _heap_offer(heap_s, heap_d, size, threshold, b, k, score, lo + d)
        acc[uint64(f) * uint64(64) * lanes_u : uint64(f + 1) * uint64(64) * lanes_u] = 0.0


@njit(nogil=True, cache=True)
def search_batch(
    q_indptr, q_indices, q_data, p_indptr, p_docs, p_weights, n_docs, k, q0, q1, out_s, out_d
):
    n_lanes = q1 - q0
    terms = _group_terms(q_indptr, q_indices, q_data, p_indptr, q0, q1)
    block = max(64, (_BLOCK_BYTES // (4 * n_lanes)) // 64 * 64)
    acc = np.zeros(block * n_lanes, dtype=np.float32)  # (R, B) doc-major
    flags = np.zeros(block // 64, dtype=np.uint8)  # 64-doc sub-blocks that received a posting
    heap_s = np.empty(n_lanes * k, dtype=np.float32)  # (B, k)
    heap_d = np.empty(n_lanes * k, dtype=np.int64)  # (B, k)
    size = np.zeros(n_lanes, dtype=np.int64)
    threshold = np.zeros(n_lanes, dtype=np.float32)  # 0 until the heap is full, then its root
    lanes_u = uint64(n_lanes)  # unsigned indices: no negative-index wraparound, loops vectorise
    for lo in range(0, n_docs, block):
        hi = min(lo + block, n_docs)
        _accumulate(terms, p_indptr, p_docs, p_weights, lo, hi, acc, flags, lanes_u)
        _harvest(acc, flags, lo, hi, lanes_u, heap_s, heap_d, size, threshold, k)
    # Pop the worst entry into the last free slot until each heap is empty: best-first order.
    for b in range(n_lanes):
        off = b * k
        n = size[b]
        while n > 0:
            n -= 1
            out_s[q0 + b, n] = heap_s[off]
            out_d[q0 + b, n] = heap_d[off]
            heap_s[off] = heap_s[off + n]
            heap_d[off] = heap_d[off + n]
            _sift_down(heap_s, heap_d, off, n, 0)
