"""Tokens per second and peak memory of one LoRA training step: fused SPLADE head vs naive head.

What: SmolLM2-135M + LoRA (r=16, alpha=32, dropout 0.05, csplade's default targets
q/k/v/o/gate/up/down; the tied LM head stays frozen), uni variant, max pooling, float32. One batch
of --queries SciFact train queries, each with its first judged document as positive and
--negatives documents drawn at random (seeded) from the rest of the corpus; queries at most
--query-length tokens, documents at most --doc-length (real texts: SciFact claims are ~20 tokens,
so queries stay below 32; two thirds of the documents reach 256). One step = encode queries and
documents (one `encoder(query=, doc=)` call), loss = InfoNCE with in-batch negatives + 1e-3 * FLOPS
on each side (csplade.training.losses), backward, AdamW step. Two heads, everything else the same:
`fused_head=True` (csplade.model.head's vocab-chunked head) and `fused_head=False` (full (B, L, V)
logits, activation, max over L, autograd keeps its tensors). With --breakdown a third case runs the
backbone alone (a loss on its hidden states, no head) to show how much of each peak is the
backbone's activations and how much the head's.

Why: the SPLADE head over an LLM vocabulary is the memory wall of CSPLADE training (arXiv
2504.10816): float32 (B, L, V) logits for 32 documents of 256 tokens over 49,152 terms are 1.5 GiB,
and autograd keeps several such tensors. Goal: fused >= 1.3x the naive tokens/s, <= 0.5x its peak.

How measured: each case in a fresh subprocess (model loaded, LoRA applied, optimizer built, batch
tokenized, then the peak is reset), one warm-up step, then --steps timed steps. AdamW's state is
allocated in the warm-up and counts in the peak; the bytes autograd saves for backward are summed
there too, through saved-tensor hooks (an exact figure, next to RSS). Tokens = non-pad tokens of
queries + documents; tokens/s from the fastest timed step. Peak memory over all steps, above the
level after setup (VmHWM on CPU, allocator stats on CUDA; benchmarks/_measure.py). --rounds
alternates the cases (naive, fused, then fused, naive, ...); best time and largest peak over the
rounds are reported, with the load average. The two heads' losses must agree step by step (same
seed, same dropout masks): checked and printed.

Usage:
    python benchmarks/train_step.py                       # 8 x (1 + 3), L_q=32, L_d=256, 2 steps
    python benchmarks/train_step.py --activation-checkpointing --breakdown
    python benchmarks/train_step.py --quick               # tiny random Llama, 4 x (1 + 3), L_d=64

Known limits: one batch shape, max pooling; negatives are random, not mined. Without
--activation-checkpointing the backbone's own activations dominate the peak (about 3.3 MiB per
token for SmolLM2-135M + LoRA in float32 on CPU, by RSS), so the head's share, and with it the
fused/naive memory ratio, depends on that switch; the full default batch then needs ~30 GiB.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
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

from csplade.model.config import DTYPES

QUICK = {"queries": 4, "doc_length": 64, "steps": 2}
FULL = {"queries": 8, "doc_length": 256, "steps": 2}
REG_WEIGHT = 1e-3
LOSS_RTOL = 1e-3


def training_batch(
    dataset: str, n_queries: int, n_negatives: int, seed: int
) -> tuple[list[str], list[str]]:
    """Queries and their groups (positive, then random negatives) from the BEIR train split."""
    from csplade.data.beir import find_dataset, load_beir

    data = load_beir(find_dataset(dataset, data_dir()), split="train")
    text_of = dict(zip(data.doc_ids, data.doc_texts, strict=True))
    rng = random.Random(seed)
    queries, docs = [], []
    for query_id, query in data.queries.items():
        judged = [d for d in data.qrels[query_id] if d in text_of and data.qrels[query_id][d] > 0]
        if not judged:
            continue
        pool = [d for d in data.doc_ids if d not in data.qrels[query_id]]
        queries.append(query)
        docs += [text_of[judged[0]]] + [text_of[d] for d in rng.sample(pool, n_negatives)]
        if len(queries) == n_queries:
            return queries, docs
    raise SystemExit(f"{dataset}: only {len(queries)} train queries with a judged document")


class SavedTensorBytes:
    """Bytes autograd keeps for backward: unique storages packed while active, parameters excluded.

    Exact, unlike RSS (no allocator caching), but blind to what activation checkpointing keeps
    (its own hooks replace these inside checkpointed layers; it holds each layer's input instead).
    """

    def __init__(self, module) -> None:
        tensors = list(module.parameters()) + list(module.buffers())
        self.skip = {t.untyped_storage().data_ptr() for t in tensors}
        self.sizes: dict[int, int] = {}

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.skip:
            self.sizes[storage.data_ptr()] = storage.nbytes()
        return tensor

    @staticmethod
    def unpack(tensor):
        return tensor

    def total(self) -> int:
        return sum(self.sizes.values())


def run_case(args: argparse.Namespace) -> dict:
    """One head (or the backbone alone), in this process: setup, warm-up step, timed steps."""
    import torch

    from csplade.training import losses
    from csplade.training.arguments import ModelArguments
    from csplade.training.loading import load_encoder_for_training

    torch.set_num_threads(args.threads)
    queries, docs = training_batch(args.dataset, args.queries, args.negatives, args.seed)
    torch.manual_seed(args.seed)  # LoRA init and dropout masks: the same in every case
    encoder = load_encoder_for_training(
        ModelArguments(
            model_name_or_path=args.model,
            use_lora=True,
            lora_r=16,
            fused_head=args.case_impl != "naive",
            query_max_length=args.query_length,
            doc_max_length=args.doc_length,
            model_dtype=args.dtype,
        )
    ).to(args.device)
    if args.activation_checkpointing:
        encoder.activation_checkpointing_enable()
    params = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    query = encoder.tokenize(queries, kind="query")
    doc = encoder.tokenize(docs, kind="doc")
    query.pop("n_truncated"), doc.pop("n_truncated")
    query = {k: v.to(args.device) for k, v in query.items()}
    doc = {k: v.to(args.device) for k, v in doc.items()}
    tokens = int(query["attention_mask"].sum() + doc["attention_mask"].sum())
    group_size = 1 + args.negatives

    def step(saved: SavedTensorBytes | None = None) -> float:
        hooks = (
            torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack)
            if saved is not None
            else contextlib.nullcontext()
        )
        with hooks:
            loss = forward_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return float(loss.detach())

    def forward_loss():
        if args.case_impl == "backbone":  # no head: what the backbone alone keeps for backward
            loss = 0.0
            for batch in (query, doc):
                hidden, _ = encoder._hidden_states(batch["input_ids"], batch["attention_mask"])
                loss = loss + hidden.float().pow(2).mean()  # hidden (B, L, H)
        else:
            q_reps, d_reps = encoder(query=query, doc=doc)  # (Q, V), (Q * group, V)
            parts = {
                "contrastive": losses.contrastive_loss(q_reps, d_reps, group_size),
                "reg_q": losses.flops(q_reps),
                "reg_d": losses.flops(d_reps),
            }
            weights = {"contrastive": 1.0, "reg_q": REG_WEIGHT, "reg_d": REG_WEIGHT}
            loss, _ = losses.combine(parts, weights)
        return loss

    load_start = load_average()
    memory = PeakMemory(args.device).start()
    saved = SavedTensorBytes(encoder)
    step_losses = [step(saved)]  # warm-up, also counts what autograd saves
    seconds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step_losses.append(step())
        seconds.append(time.perf_counter() - start)
    return {
        "seconds": min(seconds),
        "all_seconds": seconds,
        "losses": step_losses,
        "tokens": tokens,
        "doc_shape": list(doc["input_ids"].shape),
        "query_shape": list(query["input_ids"].shape),
        "vocab": encoder.vocab_size,
        "trainable": sum(p.numel() for p in params),
        "peak_bytes": memory.peak_bytes(),
        "saved_bytes": saved.total(),
        "floored": memory.floored,
        "load": (load_start + load_average()) / 2,
    }


def _case_argv(args: argparse.Namespace, impl: str) -> list[str]:
    argv = ["--case-impl", impl, "--model", args.model, "--dataset", args.dataset]
    for name in ("queries", "negatives", "query_length", "doc_length", "steps", "threads", "seed"):
        argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    argv += ["--device", args.device, "--dtype", args.dtype]
    if args.activation_checkpointing:
        argv.append("--activation-checkpointing")
    return argv


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random Llama, small batch")
    parser.add_argument("--model", default=None, help="backbone (default smollm2-135m)")
    parser.add_argument("--dataset", default="scifact", help="BEIR folder (train split) or name")
    parser.add_argument(
        "--queries", type=int, help=f"queries per batch (default {FULL['queries']})"
    )
    parser.add_argument("--negatives", type=int, default=3, help="negatives per query")
    parser.add_argument("--query-length", type=int, default=32, help="query_max_length")
    parser.add_argument("--doc-length", type=int, help=f"doc_max_length ({FULL['doc_length']})")
    parser.add_argument("--steps", type=int, help=f"timed steps after warm-up ({FULL['steps']})")
    parser.add_argument("--rounds", type=int, default=1, help="alternated case rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per case")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if cuda_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    parser.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="recompute the backbone's layer activations in backward",
    )
    parser.add_argument(
        "--breakdown", action="store_true", help="also run the backbone alone (no head)"
    )
    parser.add_argument(
        "--case-impl", choices=("naive", "fused", "backbone"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for name in ("queries", "doc_length", "steps"):
        if getattr(args, name) is None:
            setattr(args, name, preset[name])
    for name in ("queries", "query_length", "doc_length", "steps", "rounds", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.negatives < 0:
        parser.error("--negatives must be >= 0")
    return args


def _report(args: argparse.Namespace, runs: dict[str, list[dict]], header_width: int) -> None:
    best = {k: min(r["seconds"] for r in v) for k, v in runs.items()}
    peak = {k: max(r["peak_bytes"] for r in v) for k, v in runs.items()}
    tokens = runs["fused"][0]["tokens"]
    rate = {k: tokens / best[k] for k in runs}
    print("-" * header_width)
    print(
        f"best of {args.rounds}: naive {rate['naive']:.1f} tok/s, fused {rate['fused']:.1f} tok/s "
        f"-> fused/naive = {rate['fused'] / rate['naive']:.2f}x (goal >= 1.3x)"
    )
    print(
        f"peak memory above setup: naive {peak['naive'] / MIB:.0f} MiB, fused "
        f"{peak['fused'] / MIB:.0f} MiB -> fused/naive = "
        f"{peak['fused'] / max(peak['naive'], 1):.2f}x (goal <= 0.5x)"
    )
    naive_losses, fused_losses = runs["naive"][-1]["losses"], runs["fused"][-1]["losses"]
    same = all(
        abs(a - b) <= LOSS_RTOL * max(abs(a), abs(b), 1e-12)
        for a, b in zip(naive_losses, fused_losses, strict=True)
    )
    print(
        f"same losses step by step (rtol {LOSS_RTOL:g}): {same}; naive "
        f"{', '.join(f'{x:.5f}' for x in naive_losses)}; fused "
        f"{', '.join(f'{x:.5f}' for x in fused_losses)}"
    )
    run = runs["fused"][0]
    n_docs, doc_len = run["doc_shape"]
    n_queries, query_len = run["query_shape"]
    logits = (n_docs * doc_len + n_queries * query_len) * run["vocab"] * 4
    print(
        f"size of one float32 (B, L, V) tensor of this batch (docs {n_docs}x{doc_len} + queries "
        f"{n_queries}x{query_len}, V={run['vocab']}): {logits / MIB:.0f} MiB; "
        f"LoRA trainable parameters: {run['trainable']:,}"
    )
    if "backbone" in runs:
        base = peak["backbone"]
        saved = {k: v[0]["saved_bytes"] for k, v in runs.items()}
        print(
            f"breakdown, peak: backbone alone {base / MIB:.0f} MiB ({rate['backbone']:.1f} tok/s); "
            f"head on top of it: naive {(peak['naive'] - base) / MIB:.0f} MiB "
            f"= {(peak['naive'] - base) / logits:.1f} (B, L, V) tensors, fused "
            f"{(peak['fused'] - base) / MIB:.0f} MiB"
        )
        print(
            f"breakdown, saved for backward: backbone alone {saved['backbone'] / MIB:.0f} MiB; "
            f"head on top of it: naive {(saved['naive'] - saved['backbone']) / MIB:.0f} MiB, "
            f"fused {(saved['fused'] - saved['backbone']) / MIB:.0f} MiB"
        )
    print(f"load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.case_impl:
        print(json.dumps(run_case(args)))
        return
    impls = ["naive", "fused"] + (["backbone"] if args.breakdown else [])
    with tempfile.TemporaryDirectory(prefix="csplade-train-bench-") as tmp:
        if args.model is None:
            args.model = (
                build_tiny_model(os.path.join(tmp, "tiny")) if args.quick else "smollm2-135m"
            )
        model_name = "tiny random Llama (H=64, 2 layers)" if args.quick else args.model
        print(
            f"LoRA train step (fwd + bwd + AdamW): {model_name}, {args.queries} {args.dataset} "
            f"train queries x (1 positive + {args.negatives} random negatives), "
            f"L_q<={args.query_length}, L_d<={args.doc_length}, {args.dtype}, activation "
            f"checkpointing {'on' if args.activation_checkpointing else 'off'}, "
            f"{args.steps} timed step(s) after 1 warm-up, {args.rounds} round(s)"
        )
        print(machine_line(args.device, args.threads))
        header = (
            f"{'round':>5} {'case':<9} | {'tokens':>6} {'best s':>8} {'steps s':>17} "
            f"{'tok/s':>7} | {'peak MiB':>9} {'saved MiB':>9} | {'load':>5}"
        )
        print(header)
        print("-" * len(header))
        runs: dict[str, list[dict]] = {impl: [] for impl in impls}
        failed: dict[str, str] = {}
        for r in range(args.rounds):
            for impl in impls if r % 2 == 0 else impls[::-1]:
                try:
                    result = spawn(__file__, _case_argv(args, impl), impl)
                except SystemExit as exc:  # e.g. the naive head killed for memory (exit -9)
                    failed[impl] = str(exc).splitlines()[0].rstrip(":")
                    print(f"{r:>5} {impl:<9} | {failed[impl]}", flush=True)
                    continue
                runs[impl].append(result)
                steps = " ".join(f"{s:.1f}" for s in result["all_seconds"])
                flag = " (RSS floor)" if result["floored"] else ""
                print(
                    f"{r:>5} {impl:<9} | {result['tokens']:>6} {result['seconds']:>8.2f} "
                    f"{steps:>17} {result['tokens'] / result['seconds']:>7.1f} | "
                    f"{result['peak_bytes'] / MIB:>9.0f} {result['saved_bytes'] / MIB:>9.0f} | "
                    f"{result['load']:>5.1f}{flag}",
                    flush=True,
                )
    if failed:
        print("-" * len(header))
        for impl, reason in failed.items():
            hint = " (the kernel's out-of-memory kill)" if "exit -9" in reason else ""
            print(f"{impl}: {reason}{hint}; no ratio")
        for impl, results in runs.items():
            if results:
                best = min(r["seconds"] for r in results)
                peak = max(r["peak_bytes"] for r in results)
                print(f"{impl}: {results[0]['tokens'] / best:.1f} tok/s, peak {peak / MIB:.0f} MiB")
        raise SystemExit(1)
    _report(args, runs, len(header))


if __name__ == "__main__":
    main()
