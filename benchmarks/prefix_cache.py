"""Steps per hour of a contrastive LoRA step, and where the step goes: LoRA on every block (the
baseline) against LoRA on the last K blocks with the prefix cache (csplade.model.prefix_cache).

What: SmolLM2-135M `bi`, bf16 weights (the demo's), LoRA r16 (csplade's default targets), one
contrastive step = encode a batch of SciFact training queries and their groups (1 positive + BM25-free
random negatives, seeded) in one `encoder(query=, doc=)` call, InfoNCE with in-batch negatives +
1e-3 FLOPS on each side, backward, AdamW. The same --batches batches are run for --epochs epochs:
the cache fills in the first and serves the rest, as training revisits its documents every epoch.

Cases, each in this process one after the other (same batches, same seed):
  baseline   LoRA on every block
  last-K     LoRA on the last K blocks (backward stops there), no cache
  last-K+cache   the same with the prefix cache; its first epoch fills the cache
  last-K+cache, --candidate-dtype   the same with the weights in that dtype (float32: on a CPU
                 without AMX, bf16 matmuls are slower than float32 ones)

Printed: per case the mean step seconds of the first epoch and of the later ones, steps/hour of
the later ones, and the ratio to the baseline; where the baseline's step goes (tokenize, backbone
forward, head, loss, backward, optimizer; seconds per step); the cache's texts and bytes.

Usage:
    python benchmarks/prefix_cache.py                     # K 6, 4 batches of 8 x (1 + 1), 3 epochs
    python benchmarks/prefix_cache.py --quick             # a tiny random Llama (seconds)

Known limits: one batch shape; steps/hour of the later epochs is the steady state of a run that
revisits its texts (a run that sees each text once gains only the last-K part).
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import tempfile
import time
from contextlib import contextmanager

import torch
from _measure import data_dir, load_average, machine_line

from csplade.data.beir import load_beir
from csplade.model import SparseEncoder
from csplade.model.head.splade import splade_head
from csplade.training.arguments import ModelArguments
from csplade.training.loading import apply_lora, attach_prefix_cache
from csplade.training.losses import contrastive_loss, flops


def batches(n_batches: int, size: int, negatives: int, seed: int = 0):
    data = load_beir(os.path.join(data_dir(), "scifact"), split="train")
    rng = random.Random(seed)
    by_id = dict(zip(data.doc_ids, data.doc_texts, strict=True))
    qids = [q for q in data.queries if data.qrels.get(q)]
    rng.shuffle(qids)
    out = []
    for b in range(n_batches):
        queries, docs = [], []
        for q in qids[b * size : (b + 1) * size]:
            queries.append(data.queries[q])
            docs.append(by_id[next(iter(data.qrels[q]))])
            docs += rng.sample(data.doc_texts, negatives)
        out.append((queries, docs))
    return out


class Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def _head(encoder, hidden, out_emb, batch):
    """The encoder's own head (csplade.model.head.splade_head) on hidden states already computed."""
    mask = batch["pool_mask"].bool() & batch["attention_mask"].bool()
    return splade_head(hidden, mask, out_emb, encoder.base_model, head_bias=encoder.head_bias,
                       config=encoder.config, head_call=encoder.head_call,
                       calls=encoder.head_calls)  # fmt: skip


def step(encoder, optimizer, queries, docs, group: int, timer: Timer) -> float:
    with timer("tokenize"):
        q = encoder.tokenize(queries, kind="query")
        d = encoder.tokenize(docs, kind="doc")
        q.pop("n_truncated"), d.pop("n_truncated")
    with timer("backbone forward"):
        q_hidden, out_emb = encoder._hidden_states(q["input_ids"], q["attention_mask"])
        d_hidden, _ = encoder._hidden_states(d["input_ids"], d["attention_mask"])
    with timer("head"):
        q_reps = _head(encoder, q_hidden, out_emb, q)
        d_reps = _head(encoder, d_hidden, out_emb, d)
    with timer("loss"):
        loss = contrastive_loss(q_reps, d_reps, group) + 1e-3 * (flops(q_reps) + flops(d_reps))
    with timer("backward"):
        loss.backward()
    with timer("optimizer"):
        optimizer.step()
        optimizer.zero_grad()
    return float(loss.detach())


def run_case(name, base, args, data, last_k: int | None, cache: bool) -> dict:
    encoder = copy.deepcopy(base)
    model_args = ModelArguments(use_lora=True, lora_r=16, lora_dropout=0.0, lora_last_layers=last_k)
    apply_lora(encoder, model_args)
    if cache:
        attach_prefix_cache(encoder, last_k)
    encoder.train()
    torch.manual_seed(0)
    params = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    epochs = []
    timer = Timer()
    for epoch in range(args.epochs):
        times = []
        for queries, docs in data:
            start = time.perf_counter()
            step(encoder, optimizer, queries, docs, 1 + args.negatives, timer if epoch else Timer())
            times.append(time.perf_counter() - start)
        epochs.append(sum(times) / len(times))
    later = sum(epochs[1:]) / len(epochs[1:])
    n_later = len(data) * (args.epochs - 1)
    row = {
        "case": name,
        "first_epoch_s": epochs[0],
        "later_s": later,
        "steps_per_hour": 3600 / later,
        "breakdown": {k: v / n_later for k, v in timer.seconds.items()},
    }
    if cache:
        c = encoder.prefix_cache
        row["cache"] = {"texts": len(c), "MiB": c.bytes / 2**20, "hits": c.hits, "misses": c.misses}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--last-k", type=int, default=6)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--negatives", type=int, default=1)
    parser.add_argument("--doc-length", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", help="the weights of the first three cases")
    parser.add_argument("--candidate-dtype", default="float32", help="the fourth case's weights")
    parser.add_argument("--quick", action="store_true", help="a tiny random Llama")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the first fills the cache)")
    settings = dict(variant="bi", query_prefix="query: ", query_max_length=32)
    if args.quick:  # a 2-block random Llama with SmolLM2's tokenizer and vocabulary
        from _measure import build_tiny_model

        folder = build_tiny_model(tempfile.mkdtemp(prefix="csplade-bench-"))
        base = SparseEncoder.from_pretrained(folder, doc_max_length=64, **settings)
        candidate = SparseEncoder.from_pretrained(
            folder, dtype=args.candidate_dtype, doc_max_length=64, **settings
        )
        args.last_k = 1
    else:
        base = SparseEncoder.from_pretrained(
            "smollm2-135m", dtype=args.dtype, doc_max_length=args.doc_length, **settings
        )
        candidate = SparseEncoder.from_pretrained(
            "smollm2-135m", dtype=args.candidate_dtype, doc_max_length=args.doc_length, **settings
        )
    data = batches(args.batches, args.batch_size, args.negatives)
    print(machine_line("cpu", torch.get_num_threads()), f"weights {args.dtype}")
    rows = [
        run_case("baseline (LoRA on every block)", base, args, data, None, False),
        run_case(f"last {args.last_k} blocks", base, args, data, args.last_k, False),
        run_case(f"last {args.last_k} blocks + prefix cache", base, args, data, args.last_k, True),
        run_case(
            f"last {args.last_k} blocks + prefix cache, {args.candidate_dtype}",
            candidate,
            args,
            data,
            args.last_k,
            True,
        ),  # fmt: skip
    ]
    baseline = rows[0]["steps_per_hour"]
    print("| case | s/step epoch 1 | s/step later | steps/hour | x baseline |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['case']} | {row['first_epoch_s']:.2f} | {row['later_s']:.2f} | "
            f"{row['steps_per_hour']:.0f} | {row['steps_per_hour'] / baseline:.2f} |"
        )
    for row in rows:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in row["breakdown"].items())
        print(f"{row['case']}: seconds per step: {parts}")
        if "cache" in row:
            print(f"{row['case']}: cache {row['cache']}")
    print(f"load average {load_average()}")


if __name__ == "__main__":
    main()
