"""Documents per second of `SparseEncoder.encode_docs` (csplade's path) against a naive loop.

What: SmolLM2-135M (uni, max pooling) encodes the first --docs SciFact documents (BEIR `doc_text`,
at most --max-length tokens each), --batch-size at a time, two ways:
- naive: batches in corpus order and the naive SPLADE head (fused_head=False: full (B, L, V)
  logits, log(1 + ReLU), max over L), each batch through `encoder.tokenize` and `encoder(...)`;
- csplade: `encoder.encode_docs` with the fused head (vocab-chunked, csplade.model.head) and batches
  sorted longest first, so less padding goes through the backbone.
Both give a float32 CSR matrix in corpus order (the naive loop converts each batch as encode does).
The script checks that the two give the same vectors (allclose) and prints it, with the positions
each path fed through the backbone (padding included) and the non-pad tokens.

Why: encoding the corpus is the indexing cost of learned sparse retrieval. CSPLADE (arXiv
2504.10816) runs SPLADE on causal LLMs, whose (B, L, V) logits are large; the goal for csplade's
encode path is >= 2x the docs/s of the straightforward loop.

How measured: each path runs in a fresh subprocess (one case's allocations cannot help or hurt the
other's): a 2-document warm-up, then one timed pass over all documents (tokenization, forward, CSR
conversion, reordering). --rounds alternates the paths (naive, csplade, then csplade, naive, ...)
so that load from other processes on a shared machine hits both; the best time and the largest
peak memory over the rounds are reported, with the load average. Peak memory: VmHWM on CPU,
allocator stats on CUDA (benchmarks/_measure.py), above the level once model and texts are loaded.

Usage:
    python benchmarks/encode_throughput.py               # 256 docs, batch 16, max length 256
    python benchmarks/encode_throughput.py --quick       # tiny random Llama, 32 docs
    python benchmarks/encode_throughput.py --rounds 2 --threads 2

Known limits: one model, one data set, max pooling, uni variant. Sorting only removes padding (few
SciFact documents are short of 256 tokens, see the printed counts), and the fused head saves memory
traffic, not matmul work; on CPU the backbone dominates the time, so the ratio there says little
about a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from _measure import (
    MIB,
    PeakMemory,
    build_tiny_model,
    cuda_available,
    data_dir,
    load_average,
    machine_line,
    spawn,
)

QUICK = {"docs": 32, "batch_size": 8, "max_length": 128}
FULL = {"docs": 256, "batch_size": 16, "max_length": 256}
PATHS = ("naive", "csplade")
RTOL, ATOL = 1e-4, 1e-4


def first_docs(dataset: str, n: int) -> list[str]:
    """The first `n` documents of a BEIR corpus, as BEIR indexes them (title + text)."""
    from csplade.data.beir import doc_text, find_dataset, iter_corpus

    folder = find_dataset(dataset, data_dir())
    texts = []
    for _, doc in iter_corpus(folder / "corpus.jsonl"):
        texts.append(doc_text(doc))
        if len(texts) == n:
            break
    if len(texts) < n:
        raise SystemExit(f"{folder / 'corpus.jsonl'} has {len(texts)} documents, --docs asks {n}")
    return texts


def encode_naive(encoder, texts: list[str], batch_size: int):
    """The straightforward loop: corpus-order batches through tokenize + forward, CSR per batch."""
    import numpy as np
    import scipy.sparse as sp
    import torch

    blocks = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = encoder.tokenize(texts[start : start + batch_size], kind="doc")
            batch.pop("n_truncated")
            batch = {k: v.to(encoder.device) for k, v in batch.items()}
            reps = encoder(**batch)  # (b, V) float32
            blocks.append(sp.csr_matrix(reps.float().cpu().numpy(), dtype=np.float32))
    return sp.vstack(blocks, format="csr")


def fed_positions(encoder, texts: list[str], order: list[int], batch_size: int) -> tuple[int, int]:
    """(positions fed through the backbone incl. padding, non-pad tokens) for batches in `order`."""
    padded = real = 0
    for start in range(0, len(order), batch_size):
        batch = encoder.tokenize([texts[i] for i in order[start : start + batch_size]], kind="doc")
        padded += batch["attention_mask"].numel()
        real += int(batch["attention_mask"].sum())
    return padded, real


def run_case(args: argparse.Namespace) -> dict:
    """One path, in this process: load, warm up, time one pass, save the vectors for the check."""
    import scipy.sparse as sp
    import torch

    from csplade.model.encoder import SparseEncoder

    torch.set_num_threads(args.threads)
    texts = first_docs(args.dataset, args.docs)
    encoder = SparseEncoder.from_pretrained(
        args.model,
        device=args.device,
        doc_max_length=args.max_length,
        fused_head=args.case_path == "csplade",
    )

    def encode(items):
        if args.case_path == "csplade":
            return encoder.encode_docs(items, batch_size=args.batch_size, show_progress=False)
        return encode_naive(encoder, items, args.batch_size)

    encode(texts[:2])  # loads kernels and thread pools before the peak is reset
    load_start = load_average()
    memory = PeakMemory(args.device).start()
    start = time.perf_counter()
    vectors = encode(texts)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = memory.peak_bytes()
    load_end = load_average()
    sp.save_npz(args.case_out, vectors)
    if args.case_path == "csplade":  # encode()'s own order: longest text (in characters) first
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    else:
        order = list(range(len(texts)))
    padded, real = fed_positions(encoder, texts, order, args.batch_size)
    return {
        "seconds": seconds,
        "docs": len(texts),
        "peak_bytes": peak,
        "floored": memory.floored,
        "padded_tokens": padded,
        "real_tokens": real,
        "load": (load_start + load_end) / 2,
    }


def _case_argv(args: argparse.Namespace, path: str, out: str) -> list[str]:
    return [
        "--case-path",
        path,
        "--case-out",
        out,
        "--model",
        args.model,
        "--dataset",
        args.dataset,
        "--docs",
        str(args.docs),
        "--batch-size",
        str(args.batch_size),
        "--max-length",
        str(args.max_length),
        "--threads",
        str(args.threads),
        "--device",
        args.device,
    ]


def compare_vectors(file_a: str, file_b: str) -> dict:
    """allclose of two saved CSR matrices, their largest difference and their non-zero counts."""
    import numpy as np
    import scipy.sparse as sp

    a, b = sp.load_npz(file_a), sp.load_npz(file_b)
    if a.shape != b.shape:
        return {"shape": (a.shape, b.shape), "allclose": False}
    dense_a, dense_b = a.toarray(), b.toarray()
    return {
        "allclose": bool(np.allclose(dense_a, dense_b, rtol=RTOL, atol=ATOL)),
        "max_abs_diff": float(np.abs(dense_a - dense_b).max()),
        "max_value": float(max(dense_a.max(), dense_b.max())),
        "nnz": (int(a.nnz), int(b.nnz)),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random Llama, 32 docs")
    parser.add_argument("--model", default=None, help="backbone (default smollm2-135m)")
    parser.add_argument("--dataset", default="scifact", help="BEIR folder or name under data dir")
    parser.add_argument("--docs", type=int, help=f"documents (default {FULL['docs']})")
    parser.add_argument("--batch-size", type=int, help=f"default {FULL['batch_size']}")
    parser.add_argument(
        "--max-length", type=int, help=f"doc_max_length (default {FULL['max_length']})"
    )
    parser.add_argument("--rounds", type=int, default=1, help="alternated naive/csplade pairs")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per case")
    parser.add_argument("--device", default="cuda" if cuda_available() else "cpu")
    parser.add_argument("--case-path", choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--case-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for name in ("docs", "batch_size", "max_length"):
        if getattr(args, name) is None:
            setattr(args, name, preset[name])
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.case_path:
        print(json.dumps(run_case(args)))
        return
    with tempfile.TemporaryDirectory(prefix="csplade-encode-bench-") as tmp:
        if args.model is None:
            args.model = (
                build_tiny_model(os.path.join(tmp, "tiny")) if args.quick else "smollm2-135m"
            )
        model_name = "tiny random Llama (H=64, 2 layers)" if args.quick else args.model
        print(
            f"encode_docs throughput: {model_name}, first {args.docs} docs of {args.dataset}, "
            f"doc_max_length={args.max_length}, batch {args.batch_size}, uni, max pooling, "
            f"{args.rounds} round(s)"
        )
        print(machine_line(args.device, args.threads))
        header = (
            f"{'round':>5} {'path':<8} {'order':<7} {'head':<6} | {'fed pos':>8} {'tokens':>8} | "
            f"{'seconds':>8} {'docs/s':>7} | {'peak MiB':>9} | {'load':>5}"
        )
        print(header)
        print("-" * len(header))
        runs: dict[str, list[dict]] = {path: [] for path in PATHS}
        outs = {path: os.path.join(tmp, f"{path}.npz") for path in PATHS}
        for r in range(args.rounds):
            for path in PATHS if r % 2 == 0 else PATHS[::-1]:
                result = spawn(__file__, _case_argv(args, path, outs[path]), path)
                runs[path].append(result)
                order, head = ("corpus", "naive") if path == "naive" else ("sorted", "fused")
                flag = " (RSS floor)" if result["floored"] else ""
                print(
                    f"{r:>5} {path:<8} {order:<7} {head:<6} | {result['padded_tokens']:>8} "
                    f"{result['real_tokens']:>8} | {result['seconds']:>8.2f} "
                    f"{result['docs'] / result['seconds']:>7.2f} | "
                    f"{result['peak_bytes'] / MIB:>9.1f} | {result['load']:>5.1f}{flag}",
                    flush=True,
                )
            check = compare_vectors(outs["naive"], outs["csplade"])
        best = {p: min(x["seconds"] for x in runs[p]) for p in PATHS}
        peak = {p: max(x["peak_bytes"] for x in runs[p]) for p in PATHS}
        rate = {p: args.docs / best[p] for p in PATHS}
    print("-" * len(header))
    print(
        f"best of {args.rounds}: naive {rate['naive']:.2f} docs/s, csplade {rate['csplade']:.2f} "
        f"docs/s -> csplade/naive = {rate['csplade'] / rate['naive']:.2f}x (goal >= 2x)"
    )
    print(
        f"peak memory above model+texts: naive {peak['naive'] / MIB:.1f} MiB, csplade "
        f"{peak['csplade'] / MIB:.1f} MiB -> naive/csplade = "
        f"{peak['naive'] / max(peak['csplade'], 1):.1f}x"
    )
    if "max_abs_diff" in check:
        print(
            f"same vectors: allclose(rtol={RTOL:g}, atol={ATOL:g}) = {check['allclose']}; "
            f"max |diff| {check['max_abs_diff']:.2e} (largest weight {check['max_value']:.2f}); "
            f"nnz naive {check['nnz'][0]}, csplade {check['nnz'][1]}"
        )
    else:
        print(f"same vectors: False (shapes differ: {check['shape']})")
    print(f"load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
