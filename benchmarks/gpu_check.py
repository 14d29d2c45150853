"""GPU correctness check for csplade: one command, a pass/fail table, each row a comparison with a
reference (about 5 to 8 minutes on one H100).

Usage:
    make gpu-check                                   # every check on cuda:0, SmolLM2-135M
    python benchmarks/gpu_check.py --only head attention --json report.json
    python benchmarks/gpu_check.py --dry-run --allow-skip   # the same code paths on the CPU, toy sizes

Rows (tolerances are stated in the code beside each check and printed with it):

- head: the fused SPLADE max head against the naive (B, L, V) one, bfloat16 and float32, at
  SmolLM2's vocabulary (49,152 x 576) and a 128k one (128,256 x 4,096): values and the hidden states'
  gradient within the tolerance; peak CUDA memory and time of both.
- attention: the ``bi`` variant's hidden states (bfloat16) under sdpa and flash-attention 2 against
  eager. flash-attn is installed by the set-up when a GPU is present and a wheel exists for its
  CUDA / torch; otherwise the row says why it skipped, and the run fails unless ``--allow-skip``.
- bitsandbytes: int8 and nf4 on the device against bfloat16: nDCG@10 on a fixed SciFact slice (the
  difference stated), cosine of the vectors, docs/s of each.
- encode: encoding throughput in bfloat16 with the fused head against the naive head (docs/s and
  their ratio), and the vectors of both equal within tolerance.
- train (benchmarks/_gpu_train.py): short LoRA runs of the model on a fixed seed: one process in
  float32; DeepSpeed ZeRO-3 (accelerate_configs/zero3.yaml, one process) whose adapter must equal
  it; one process in bfloat16 autocast, within the bf16 tolerance of it. Each: the loss goes down,
  the weights moved, tokens/s.
- multi-GPU (where more than one GPU is visible; ``--dry-run`` runs them with 2 CPU processes over
  gloo): the same steps under DDP, ZeRO-3 and FSDP2 (the shipped configs) against one process on the
  whole batch.

Prints the GPU, torch, CUDA and library versions, then the table; ``--json`` writes the same as a
report. Exit status 0 only when every row passed (skips count as failures without ``--allow-skip``).
``--dry-run`` uses a tiny random Llama with SmolLM2's tokenizer and vocabulary (49,152 terms) and toy
sizes: its figures mean nothing, its comparisons run the same code (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from importlib import metadata
from pathlib import Path

from _gpu_train import check_multi_gpu, check_training
from _measure import MIB, build_tiny_model, data_dir

ROWS: list[dict] = []
SIZES = {  # GPU sizes, and the dry run's
    "gpu": {"batch": 16, "length": 512, "heads": [(49152, 576), (128256, 4096)], "texts": 64,
            "text_length": 256, "queries": 50, "docs": 1000, "dataset": "scifact"},
    "dry": {"batch": 2, "length": 16, "heads": [(4096, 32), (8192, 64)], "texts": 4,
            "text_length": 32, "queries": 4, "docs": 16, "dataset": "adi"},
}  # fmt: skip
# fused vs naive head, |fused - naive| / |naive| (norms over the batch). float32: the same products
# summed in another order (chunks), measured 5e-7 on the gradients. bfloat16: the values are equal
# (the max logit is exact in both), but the naive head's backward rounds its (B, L, V) logit
# gradients to bfloat16 (2**-9 relative each) before summing V of them, where the fused head sums in
# float32: measured 1.0e-2 to 1.4e-2 on the dry run's sizes. A wrong gradient (a missed chunk, the
# wrong argmax, a factor of 2) is off by 0.1 to 1.
HEAD_RTOL = {"float32": 1e-5, "bfloat16": 3e-2}
# hidden states of one model under two attention kernels, bfloat16, |a - b| / |eager| (norms over
# the real tokens of each text, worst text): each of the 30 layers rounds its attention output to
# bfloat16 after summing in another order; 3e-2 is some 15 roundings of 2**-9.
ATTENTION_RTOL = 3e-2
# quantized vs bfloat16 encoding on the fixed slice: nDCG@10 within these (absolute) and a mean
# cosine of the vectors at least COSINE_MIN (int8: LLM.int8 keeps outliers in 16 bits; nf4 4-bit
# codes are coarser).
NDCG_DELTA = {"int8": 0.02, "nf4": 0.05}
COSINE_MIN = {"int8": 0.95, "nf4": 0.85}


def add_row(check: str, setting: str, status: str, figures: str, **values) -> None:
    """One row of the table and its values for the JSON report. status: ok, FAILED, skipped (what
    should run here could not: a failure unless --allow-skip), n/a (nothing to check here: one GPU
    for the multi-GPU rows)."""
    ROWS.append(
        {"check": check, "setting": setting, "status": status, "figures": figures, **values}
    )


def _rel(a, b) -> float:
    """|a - b| / |b|, norms, in float64."""
    import torch

    b = b.double()
    return float(
        torch.linalg.vector_norm(a.double() - b) / torch.linalg.vector_norm(b).clamp_min(1e-30)
    )


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _head_case(device, b, length, v, h, dtype, fused, repeats):
    """One head's output, hidden-state gradient, peak memory above the inputs and best time."""
    import torch

    from csplade.evaluation.memory import PeakMemory
    from csplade.model.head import sparse_pool

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(b, length, h, generator=gen).to(device, dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=gen) / h**0.5).to(device, dtype)  # frozen, as under LoRA
    lengths = torch.randint(length // 2, length + 1, (b,), generator=gen)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).to(device)  # (B, L), right padding
    grad = torch.rand(b, v, generator=gen).to(device)

    def step():
        hidden.grad = None
        out = sparse_pool(hidden, weight, mask, fused=fused)  # (B, V) float32
        out.backward(grad)
        _sync(device)
        return out

    step()  # warm-up
    with PeakMemory(str(device)) as peak:
        out = step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return out.detach(), hidden.grad.detach().clone(), peak.peak_bytes() / MIB, min(times)


def check_head(args, size) -> None:
    import torch

    device = torch.device(args.device)
    b, length = size["batch"], size["length"]
    for v, h in size["heads"]:
        for dtype in (torch.bfloat16, torch.float32):
            name = str(dtype).removeprefix("torch.")
            setting = f"B={b} L={length} V={v:,} H={h} {name}, frozen weight"
            cases = {}
            for fused in (True, False):
                try:
                    cases[fused] = _head_case(device, b, length, v, h, dtype, fused, args.repeats)
                except torch.OutOfMemoryError:
                    cases[fused] = None
                finally:
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            if cases[False] is None or cases[True] is None:
                which = "naive (no reference)" if cases[False] is None else "fused"
                add_row("head", setting, "FAILED", f"{which} head out of memory")
                continue
            (f_out, f_grad, f_mib, f_s), (n_out, n_grad, n_mib, n_s) = cases[True], cases[False]
            err_out, err_grad = _rel(f_out, n_out), _rel(f_grad, n_grad)
            tol = HEAD_RTOL[name]
            ok = err_out <= tol and err_grad <= tol
            figures = (
                f"rel. diff values {err_out:.1e}, grads {err_grad:.1e} (tol {tol:g}); fused "
                f"{f_mib:,.0f} MiB {f_s * 1e3:.1f} ms, naive {n_mib:,.0f} MiB {n_s * 1e3:.1f} ms "
                f"(naive/fused: memory {n_mib / max(f_mib, 1e-9):.1f}x, time {n_s / f_s:.2f}x)"
            )
            add_row("head", setting, "ok" if ok else "FAILED", figures, values_rel=err_out,
                    grads_rel=err_grad, tolerance=tol, fused_mib=f_mib, naive_mib=n_mib,
                    fused_s=f_s, naive_s=n_s)  # fmt: skip


def _flash_unavailable(device: str) -> str | None:
    """Why flash-attention 2 cannot run here, or None."""
    from transformers.utils import is_flash_attn_2_available

    if not device.startswith("cuda"):
        return "no CUDA device (flash-attn runs on CUDA only)"
    try:
        version = metadata.version("flash-attn")
    except metadata.PackageNotFoundError:
        return (
            "flash-attn is not installed: make setup installs it on a GPU machine when a wheel "
            "exists for this CUDA / torch (see the Makefile's FLASH_ATTN)"
        )
    if not is_flash_attn_2_available():
        return f"flash-attn {version} is installed but does not load with this torch / GPU"
    return None


def _bi_hidden(model_dir, impl, device, texts, max_length):
    """Last hidden states (B, L, H) float32 of the `bi` variant under `impl`, and the mask."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from csplade.model.bidirectional import make_bidirectional

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16, attn_implementation=impl
    ).to(device)
    make_bidirectional(model.eval())
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt").to(device)  # fmt: skip
    with torch.no_grad():
        out = model.model(**batch, use_cache=False).last_hidden_state
    return out.float().cpu(), batch["attention_mask"].bool().cpu()


def check_attention(args, size, model_dir) -> None:
    texts = _texts(args, size["texts"])
    setting = f"bi, {len(texts)} texts <= {size['text_length']} tokens, bf16, vs eager"
    eager, mask = _bi_hidden(model_dir, "eager", args.device, texts, size["text_length"])
    for impl in ("sdpa", "flash_attention_2"):
        why = _flash_unavailable(args.device) if impl.startswith("flash") else None
        if why:
            add_row(f"attention {impl}", setting, "skipped", why)
            continue
        got, _ = _bi_hidden(model_dir, impl, args.device, texts, size["text_length"])
        worst = max(_rel(got[i][mask[i]], eager[i][mask[i]]) for i in range(len(texts)))
        status = "ok" if worst <= ATTENTION_RTOL else "FAILED"
        add_row(f"attention {impl}", setting, status,
                f"worst text: rel. diff {worst:.1e} (tol {ATTENTION_RTOL:g})",
                rel_diff=worst, tolerance=ATTENTION_RTOL)  # fmt: skip


def _texts(args, n: int) -> list[str]:
    """The first `n` documents of the check's data set (real text of mixed lengths)."""
    from csplade.data.beir import iter_corpus

    out = []
    for _, doc in iter_corpus(Path(data_dir()) / args.dataset / "corpus.jsonl"):
        out.append(" ".join(x for x in (doc.get("title"), doc.get("text")) if x))
        if len(out) == n:
            break
    return out


def _slice(args, size):
    from csplade.data.beir import load_beir
    from csplade.evaluation.beir_eval import slice_data

    data = load_beir(Path(data_dir()) / args.dataset, split="test")
    return slice_data(data, size["docs"], size["queries"], seed=0)[0]


def _evaluate(args, model_dir, data, **kwargs):
    """(nDCG@10, doc vectors, docs/s) of the model loaded with `kwargs` on the slice."""
    import torch

    from csplade import SparseEncoder
    from csplade.evaluation.metrics import evaluate_run

    encoder = SparseEncoder.from_pretrained(model_dir, device=args.device, **kwargs)
    _sync(torch.device(args.device))
    start = time.perf_counter()
    docs = encoder.encode_docs(data.doc_texts, batch_size=32, show_progress=False)
    _sync(torch.device(args.device))
    docs_per_s = len(data.doc_texts) / (time.perf_counter() - start)
    queries = encoder.encode_queries(list(data.queries.values()), show_progress=False)
    scores = (queries @ docs.T).toarray()  # (Q, D)
    run = {}
    for qid, row in zip(data.queries, scores, strict=True):
        top = row.argsort()[::-1][:10]
        run[qid] = {data.doc_ids[j]: float(row[j]) for j in top}
    ndcg = evaluate_run(data.qrels, run, ["ndcg_cut_10"]).mean["ndcg_cut_10"]
    del encoder
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return ndcg, docs, docs_per_s


def _mean_cosine(a, b) -> float:
    import numpy as np

    a, b = a.toarray(), b.toarray()
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12
    return float(np.mean((a * b).sum(axis=1) / den))


def check_bitsandbytes(args, size, model_dir) -> None:
    data = _slice(args, size)
    setting = f"{args.dataset} slice {len(data.queries)} q x {len(data.doc_ids)} docs, vs bf16"
    ref_ndcg, ref_docs, ref_speed = _evaluate(args, model_dir, data, dtype="bfloat16")
    for mode in ("int8", "nf4"):
        ndcg, docs, speed = _evaluate(args, model_dir, data, quantization=mode)
        delta, cosine = ndcg - ref_ndcg, _mean_cosine(docs, ref_docs)
        ok = abs(delta) <= NDCG_DELTA[mode] and cosine >= COSINE_MIN[mode]
        figures = (
            f"nDCG@10 {ndcg:.3f} vs {ref_ndcg:.3f} (delta {delta:+.3f}, tol {NDCG_DELTA[mode]}), "
            f"cosine {cosine:.3f} (min {COSINE_MIN[mode]}), {speed:.0f} vs {ref_speed:.0f} docs/s"
        )
        add_row(f"bitsandbytes {mode}", setting, "ok" if ok else "FAILED", figures, ndcg=ndcg,
                ndcg_bf16=ref_ndcg, cosine=cosine, docs_per_s=speed,
                docs_per_s_bf16=ref_speed)  # fmt: skip


def check_encode(args, size, model_dir) -> None:
    import numpy as np

    from csplade import SparseEncoder

    texts = _texts(args, size["texts"] * 2)
    setting = f"{len(texts)} docs <= {size['text_length']} tokens, bf16, batch 32"
    results = {}
    for fused in (False, True, False, True):  # alternated: warm caches count for both
        encoder = SparseEncoder.from_pretrained(model_dir, device=args.device, dtype="bfloat16",
                                                fused_head=fused, doc_max_length=size["text_length"])  # fmt: skip
        encoder.encode_docs(texts[:32], batch_size=32, show_progress=False)  # warm-up
        start = time.perf_counter()
        vectors = encoder.encode_docs(texts, batch_size=32, show_progress=False)
        seconds = time.perf_counter() - start
        best = results.get(fused, (None, float("inf")))[1]
        results[fused] = (vectors.toarray(), min(seconds, best))
    (fused_v, fused_s), (naive_v, naive_s) = results[True], results[False]
    err = float(np.linalg.norm(fused_v - naive_v) / max(np.linalg.norm(naive_v), 1e-30))
    tol = HEAD_RTOL["bfloat16"]
    figures = (
        f"fused {len(texts) / fused_s:.0f} docs/s, naive {len(texts) / naive_s:.0f} docs/s "
        f"(fused/naive {naive_s / fused_s:.2f}x); rel. diff of the vectors {err:.1e} (tol {tol:g})"
    )
    add_row("encode", setting, "ok" if err <= tol else "FAILED", figures,
            fused_docs_per_s=len(texts) / fused_s, naive_docs_per_s=len(texts) / naive_s,
            rel_diff=err)  # fmt: skip


def versions(args) -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}  # fmt: skip
    for dist in ("transformers", "accelerate", "peft", "deepspeed", "bitsandbytes", "flash-attn"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    if args.device.startswith("cuda"):
        props = torch.cuda.get_device_properties(args.device)
        out["gpu"] = f"{props.name}, {props.total_memory / 1024**3:.0f} GiB"
        out["gpus_visible"] = torch.cuda.device_count()
    else:
        out["gpu"] = "none: CPU (dry run)"
    return out


CHECKS = ("head", "attention", "bitsandbytes", "encode", "train", "multi-gpu")


def _run_checks(args, size, model_dir, work: Path) -> None:
    runs = {
        "head": lambda: check_head(args, size),
        "attention": lambda: check_attention(args, size, model_dir),
        "bitsandbytes": lambda: check_bitsandbytes(args, size, model_dir),
        "encode": lambda: check_encode(args, size, model_dir),
        "train": lambda: check_training(args, model_dir, work, add_row),
        "multi-gpu": lambda: check_multi_gpu(args, model_dir, work, add_row),
    }
    for name in args.only:
        started = time.perf_counter()
        try:
            runs[name]()
        except Exception as exc:  # one broken check is a row; the others still run
            add_row(name, "", "FAILED", f"{type(exc).__name__}: {str(exc)[:300]}",
                    traceback=traceback.format_exc())  # fmt: skip
        print(f"[gpu-check] {name}: {time.perf_counter() - started:.0f} s", file=sys.stderr)


def report(args, info: dict, seconds: float) -> bool:
    passed = all(r["status"] in ("ok", "n/a") or (r["status"] == "skipped" and args.allow_skip)
                 for r in ROWS)  # fmt: skip
    print(f"\ncsplade GPU check on {info['gpu']}: model {args.model}"
          f"{' (dry run: tiny model, toy sizes; figures mean nothing)' if args.dry_run else ''}, "
          f"{seconds:.0f} s")  # fmt: skip
    print("versions: " + ", ".join(f"{k} {v}" for k, v in info.items() if k != "gpu"))
    print("| check | setting | status | figures |\n|---|---|---|---|")
    for row in ROWS:
        print(f"| {row['check']} | {row['setting']} | {row['status']} | {row['figures']} |")
    for row in ROWS:
        if "traceback" in row:
            print(f"\n{row['check']} failed:\n{row['traceback']}", file=sys.stderr)
    skipped = [r["check"] for r in ROWS if r["status"] == "skipped"]
    verdict = "PASSED" if passed else "FAILED"
    if skipped:
        verdict += f" ({len(skipped)} skipped{', allowed' if args.allow_skip else ''}: "
        verdict += ", ".join(skipped) + ")"
    print(f"\n{verdict}")
    if args.json:
        report = {"passed": passed, "dry_run": args.dry_run, "model": args.model,
                  "seconds": seconds, "versions": info, "rows": ROWS}  # fmt: skip
        tmp = Path(str(args.json) + ".tmp")
        tmp.write_text(json.dumps(report, indent=1, default=str))
        os.replace(tmp, args.json)
    return passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="model of the encode/train checks")
    parser.add_argument("--device", default=None, help="default: cuda, or cpu with --dry-run")
    parser.add_argument("--only", nargs="+", choices=CHECKS, default=list(CHECKS))
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU")
    parser.add_argument("--allow-skip", action="store_true", help="a skipped row is not a failure")
    parser.add_argument("--json", type=Path, default=None, help="write the report there")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each head case")
    parser.add_argument("--timeout", type=int, default=900, help="seconds for each training run")
    args = parser.parse_args(argv)
    import torch

    from csplade.model.backbones import resolve_model

    args.device = args.device or ("cpu" if args.dry_run else "cuda:0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --dry-run")
    size = SIZES["dry" if args.dry_run else "gpu"]
    args.dataset = size["dataset"]
    started = time.perf_counter()
    info = versions(args)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        if args.dry_run:
            model_dir = build_tiny_model(str(work / "tiny"))
        else:
            model_dir = str(resolve_model(args.model))
        _run_checks(args, size, model_dir, work)
    return 0 if report(args, info, time.perf_counter() - started) else 1


if __name__ == "__main__":
    sys.exit(main())
