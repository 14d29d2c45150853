"""Peak memory and time of the SPLADE head, forward + backward: naive (B, L, V) twin vs fused.

Usage:
    python benchmarks/head_memory.py             # B=8, L=512, H=576, V=49,152 and 128,256
    python benchmarks/head_memory.py --quick     # small V / L smoke run
    python benchmarks/head_memory.py --pooling sum --frozen-weight --vocab 128256

Each case (implementation x vocab size) runs in a fresh subprocess so that one case's allocations
cannot hide or inflate another's. How peak memory is measured:
- CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus the memory
  allocated once the inputs exist.
- CPU: the process's peak resident set size (VmHWM) minus the resident size once the inputs exist.
  The peak is reset first by writing "5" to /proc/self/clear_refs (Linux >= 4.0), so import-time
  spikes do not count; without that file it falls back to getrusage ru_maxrss (a lower bound if
  an earlier spike was higher, flagged in the table).
The figure covers everything the head allocates: logits / chunks, autograd buffers, and the input
gradients (grad of W alone is V*H*4 bytes in fp32; pass --frozen-weight for the LoRA case).

Time is the best of --repeats forward+backward passes after the measured first pass, and the best
over --rounds alternated naive/fused subprocess pairs (other load on a shared machine hits both).
Goal (csplade): fused peak <= 1/8 of naive, fused time <= 1.3x naive.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from _measure import MIB, PeakMemory

from csplade.model.config import DTYPES

QUICK = {"batch": 4, "length": 64, "hidden": 64, "vocab": [2048, 8192]}
FULL = {"batch": 8, "length": 512, "hidden": 576, "vocab": [49152, 128256]}


def run_case(args: argparse.Namespace) -> dict:
    """One implementation at one vocab size, in this process. Returns the measured figures."""
    import torch

    from csplade.model.head import default_chunk_size, sparse_pool

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    batch, length, width, vocab = args.batch, args.length, args.hidden, args.case_vocab
    hidden = torch.randn(batch, length, width, generator=gen).to(device, dtype).requires_grad_()
    weight = (torch.randn(vocab, width, generator=gen) / width**0.5).to(device, dtype)
    weight.requires_grad_(not args.frozen_weight)
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=gen)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).to(device)  # (B, L), right padding
    grad_out = torch.rand(batch, vocab, generator=gen).to(device)  # (B, V) fp32

    def step(hidden, weight, mask, grad_out) -> None:
        reps = sparse_pool(
            hidden,
            weight,
            mask,
            pooling=args.pooling,
            fused=args.case_impl == "fused",
            chunk_size=args.chunk_size,
        )
        reps.backward(grad_out)
        hidden.grad = None
        weight.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()

    # Warm-up on a tiny problem: loads kernels and thread pools (tens of MiB of RSS) before the
    # peak is reset, without leaving big freed blocks in the allocator that the real run could reuse.
    tiny = [hidden[:1, :4].detach(), weight[:8].detach(), mask[:1, :4], grad_out[:1, :8]]
    tiny[0].requires_grad_()
    tiny[1].requires_grad_(weight.requires_grad)
    step(*tiny)
    del tiny

    memory = PeakMemory(device.type).start()
    step(hidden, weight, mask, grad_out)
    peak, floored = memory.peak_bytes(), memory.floored
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step(hidden, weight, mask, grad_out)
        times.append(time.perf_counter() - start)
    chunk = args.chunk_size or default_chunk_size(batch, length, width, vocab)
    return {"peak_bytes": peak, "seconds": min(times), "floored": floored, "chunk": chunk}


def _spawn(args: argparse.Namespace, impl: str, vocab: int) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--case-impl",
        impl,
        "--case-vocab",
        str(vocab),
        "--batch",
        str(args.batch),
        "--length",
        str(args.length),
        "--hidden",
        str(args.hidden),
        "--pooling",
        args.pooling,
        "--dtype",
        args.dtype,
        "--device",
        args.device,
        "--threads",
        str(args.threads),
        "--repeats",
        str(args.repeats),
    ]
    if args.frozen_weight:
        cmd.append("--frozen-weight")
    if args.chunk_size:
        cmd += ["--chunk-size", str(args.chunk_size)]
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"case {impl} V={vocab} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _best(results: list[dict]) -> dict:
    """Across rounds: the fastest time and the largest peak."""
    best = dict(results[0])
    best["seconds"] = min(r["seconds"] for r in results)
    best["peak_bytes"] = max(r["peak_bytes"] for r in results)
    best["floored"] = any(r["floored"] for r in results)
    return best


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small V and L smoke run")
    parser.add_argument("--batch", type=int, help=f"B (default {FULL['batch']})")
    parser.add_argument("--length", type=int, help=f"L (default {FULL['length']})")
    parser.add_argument("--hidden", type=int, help=f"H (default {FULL['hidden']})")
    parser.add_argument("--vocab", type=str, help="comma-separated V values (default 49152,128256)")
    parser.add_argument("--pooling", choices=("max", "sum"), default="max")
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    parser.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per case")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed passes per subprocess (default 3, full 1)"
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="fresh naive/fused subprocess pairs, alternated"
    )
    parser.add_argument("--chunk-size", type=int, default=None, help="fused vocab chunk size")
    parser.add_argument("--frozen-weight", action="store_true", help="LM head without grad (LoRA)")
    parser.add_argument("--case-impl", choices=("naive", "fused"), help=argparse.SUPPRESS)
    parser.add_argument("--case-vocab", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    args.batch = args.batch or preset["batch"]
    args.length = args.length or preset["length"]
    args.hidden = args.hidden or preset["hidden"]
    args.vocab = [int(v) for v in args.vocab.split(",")] if args.vocab else preset["vocab"]
    args.repeats = args.repeats or (3 if args.quick else 1)
    return args


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.case_impl:
        print(json.dumps(run_case(args)))
        return
    method = "cuda max_memory_allocated" if args.device.startswith("cuda") else "peak RSS (VmHWM)"
    print(
        f"SPLADE head fwd+bwd, pooling={args.pooling}, B={args.batch} L={args.length} "
        f"H={args.hidden} dtype={args.dtype} device={args.device} threads={args.threads} "
        f"weight={'frozen' if args.frozen_weight else 'trainable'}; peak = {method} above inputs"
    )
    header = (
        f"{'V':>7} {'chunk':>6} | {'naive MiB':>10} {'fused MiB':>10} {'naive/fused':>11} | "
        f"{'naive s':>8} {'fused s':>8} {'fused/naive':>11}"
    )
    print(header)
    print("-" * len(header))
    for vocab in args.vocab:
        runs = {"naive": [], "fused": []}
        for _ in range(args.rounds):  # alternate, so that load from other processes hits both
            for impl in runs:
                runs[impl].append(_spawn(args, impl, vocab))
        naive, fused = (_best(runs[impl]) for impl in ("naive", "fused"))
        flag = " (RSS floor: lower bound)" if naive["floored"] or fused["floored"] else ""
        print(
            f"{vocab:>7} {fused['chunk']:>6} | {naive['peak_bytes'] / MIB:>10.1f} "
            f"{fused['peak_bytes'] / MIB:>10.1f} "
            f"{naive['peak_bytes'] / max(fused['peak_bytes'], 1):>10.1f}x | "
            f"{naive['seconds']:>8.3f} {fused['seconds']:>8.3f} "
            f"{fused['seconds'] / naive['seconds']:>10.2f}x{flag}",
            flush=True,
        )
    print("goal: naive/fused memory >= 8x, fused/naive time <= 1.3x")


if __name__ == "__main__":
    main()
