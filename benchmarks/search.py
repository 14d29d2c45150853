"""Search benchmark: exact inverted index vs scipy brute force, and Seismic vs exact.

Synthetic SPLADE-like collection: docs and queries draw their terms from one Zipf(1.0) distribution
over the vocabulary (term ids shuffled), weights ~ Gamma(2, 0.4), duplicates summed. Defaults: 100k
docs of ~120 terms over a 30k vocabulary, 1000 queries of ~20 terms, k = 10, 2 threads.

Printed, all from the same run:
1. exact index build: time, posting memory, peak traced memory;
2. queries/s of the scipy brute force `Q @ D.T` + argpartition top-k (baseline, single-threaded as
   scipy is) and of `InvertedIndex.search` (numba kernel, default; also with 1 thread, one query at
   a time, and the scipy kernel), each the best of `--repeats` runs; the script asserts that the
   top-10 doc indices are identical to the baseline's, then prints the speed ratios;
3. Seismic: build time, then queries/s and recall@10 against the exact top-10 for a grid of
   query-time knobs; the ratios are against the exact index's batch throughput.

Run: python benchmarks/search.py [--docs 100000 --queries 1000 --threads 2 ...]. The Seismic build
takes minutes on 2 cores; `--no-seismic` skips it.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np
import scipy.sparse as sp

from csplade.index import InvertedIndex


def zipf_matrix(rng, n_rows: int, n_terms: int, draws: int, order: np.ndarray) -> sp.csr_matrix:
    """(n_rows, n_terms) CSR: `draws` Zipf(1) term draws per row, Gamma(2, 0.4) weights, summed."""
    probs = 1.0 / np.arange(1, n_terms + 1)
    probs /= probs.sum()
    rows = np.repeat(np.arange(n_rows), draws)
    cols = order[rng.choice(n_terms, size=rows.size, p=probs)]
    values = rng.gamma(2.0, 0.4, size=rows.size).astype(np.float32)
    matrix = sp.csr_matrix((values, (rows, cols)), shape=(n_rows, n_terms), dtype=np.float32)
    matrix.sum_duplicates()
    return matrix


def brute_force_topk(docs: sp.csr_matrix, queries: sp.csr_matrix, k: int, block: int = 100):
    """Baseline: dense score blocks from scipy's sparse product, argpartition, sort the top k."""
    docs_t = docs.T.tocsr()  # (V, n_docs)
    top_s = np.empty((queries.shape[0], k), dtype=np.float32)
    top_d = np.empty((queries.shape[0], k), dtype=np.int64)
    for start in range(0, queries.shape[0], block):
        scores = (queries[start : start + block] @ docs_t).toarray()  # (B, n_docs)
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # (B, k)
        part_s = np.take_along_axis(scores, part, axis=1)
        order = np.lexsort((part, -part_s), axis=-1)  # score desc, doc index asc
        top_d[start : start + block] = np.take_along_axis(part, order, axis=1)
        top_s[start : start + block] = np.take_along_axis(part_s, order, axis=1)
    unmatched = ~(top_s > 0)  # same contract as the index: only positive scores are matches
    top_d[unmatched], top_s[unmatched] = -1, -np.inf
    return top_s, top_d


def best_of(repeats: int, fn):
    """(best wall seconds, last result) over `repeats` runs."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def recall_at_k(exact: np.ndarray, approx: np.ndarray) -> float:
    hits = [
        len(set(e[e >= 0]) & set(a[a >= 0])) / max(1, (e >= 0).sum())
        for e, a in zip(exact, approx, strict=True)
    ]
    return float(np.mean(hits))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--terms", type=int, default=30_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--doc-draws", type=int, default=165, help="Zipf draws per doc (~120 nnz)")
    parser.add_argument(
        "--query-draws", type=int, default=22, help="Zipf draws per query (~20 nnz)"
    )
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-seismic", action="store_true")
    parser.add_argument("--n-postings", type=int, nargs="+", default=[500, 2000])
    parser.add_argument("--centroid-fraction", type=float, default=0.1)
    parser.add_argument("--summary-energy", type=float, default=0.4)
    parser.add_argument("--query-cut", type=int, nargs="+", default=[3, 5, 8])
    parser.add_argument("--heap-factor", type=float, nargs="+", default=[1.0, 1.5, 2.0])
    args = parser.parse_args()
    k, threads = args.k, args.threads

    rng = np.random.default_rng(args.seed)
    order = rng.permutation(args.terms)
    start = time.perf_counter()
    docs = zipf_matrix(rng, args.docs, args.terms, args.doc_draws, order)
    queries = zipf_matrix(rng, args.queries, args.terms, args.query_draws, order)
    doc_ids = [f"d{i}" for i in range(args.docs)]
    print(
        f"collection: {args.docs} docs x {args.terms} terms, {docs.nnz / args.docs:.1f} nnz/doc; "
        f"{args.queries} queries, {queries.nnz / args.queries:.1f} nnz/query; "
        f"generated in {time.perf_counter() - start:.1f}s; k={k}, threads={threads}"
    )

    # 1. Build.
    tracemalloc.start()
    build_s, index = best_of(1, lambda: InvertedIndex.build(docs, doc_ids))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(
        f"\n[build] exact inverted index: {build_s:.2f}s, postings {index.nbytes / 2**20:.1f} MiB "
        f"({index.nnz} postings), peak traced memory during build {peak / 2**20:.1f} MiB"
    )
    index.search(queries[:2], k=k)  # compile / load the numba kernel outside the timings

    # 2. Exact search.
    base_s, (base_scores, base_top) = best_of(
        args.repeats, lambda: brute_force_topk(docs, queries, k)
    )
    numba_s, (our_scores, our_top) = best_of(
        args.repeats, lambda: index.search(queries, k, threads)
    )
    one_s, _ = best_of(args.repeats, lambda: index.search(queries, k, threads=1))
    scipy_s, (sp_scores, sp_top) = best_of(
        args.repeats, lambda: index.search(queries, k, threads, backend="scipy")
    )
    online = queries[: min(200, args.queries)]
    online_s, _ = best_of(
        1, lambda: [index.search(online[i], k, threads=1) for i in range(online.shape[0])]
    )
    assert np.array_equal(our_top, base_top), "numba kernel top-k differs from brute force"
    assert np.array_equal(sp_top, base_top), "scipy kernel top-k differs from brute force"
    assert np.array_equal(our_scores, base_scores), "numba kernel scores differ from brute force"
    n_q = args.queries
    qps = {
        "baseline: scipy Q @ D.T + argpartition (1 thread)": n_q / base_s,
        f"InvertedIndex numba, batched ({threads} threads)": n_q / numba_s,
        "InvertedIndex numba, batched (1 thread)": n_q / one_s,
        f"InvertedIndex scipy kernel ({threads} threads)": n_q / scipy_s,
        "InvertedIndex numba, one query per call (1 thread)": online.shape[0] / online_s,
    }
    print(f"\n[exact] queries/s (best of {args.repeats}); top-{k} identical to the baseline: yes")
    base_qps = n_q / base_s
    for name, value in qps.items():
        print(f"  {name:55s} {value:9.0f} q/s   x{value / base_qps:5.1f} vs baseline")
    exact_qps = n_q / numba_s

    # 3. Seismic.
    if args.no_seismic:
        return
    from csplade.index.seismic import SeismicSearcher

    for n_postings in args.n_postings:
        build_s, searcher = best_of(
            1,
            lambda n_postings=n_postings: SeismicSearcher.build(
                docs,
                doc_ids,
                threads=threads,
                n_postings=n_postings,
                centroid_fraction=args.centroid_fraction,
                summary_energy=args.summary_energy,
            ),
        )
        cfg = searcher.config
        print(
            f"\n[seismic] build {build_s:.0f}s with n_postings={n_postings}, "
            f"centroid_fraction={cfg.centroid_fraction}, summary_energy={cfg.summary_energy}, "
            f"max_fraction={cfg.max_fraction}, doc_cut={cfg.doc_cut}"
        )
        header = ("query_cut", "heap_factor", "q/s", "recall@10", "vs exact")
        print("  " + " ".join(f"{h:>{w}s}" for h, w in zip(header, (9, 11, 9, 9, 8), strict=True)))
        for query_cut in args.query_cut:
            for heap_factor in args.heap_factor:
                seconds, (_, approx) = best_of(
                    args.repeats,
                    lambda qc=query_cut, hf=heap_factor, s=searcher: s.search(
                        queries, k, threads, query_cut=qc, heap_factor=hf
                    ),
                )
                value = n_q / seconds
                print(
                    f"  {query_cut:9d} {heap_factor:11.2f} {value:9.0f} "
                    f"{recall_at_k(our_top, approx):9.3f} {value / exact_qps:7.2f}x"
                )


if __name__ == "__main__":
    main()
