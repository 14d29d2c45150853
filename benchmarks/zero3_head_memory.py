"""Peak memory of ZeRO-3 training steps with every parameter partitioned (2 CPU processes, gloo):
the fused head vs the (B, L, V) head, on the same tiny setup.

Usage:
    python benchmarks/zero3_head_memory.py                 # 4 queries x 4 docs of 128 tokens per process
    python benchmarks/zero3_head_memory.py --doc-length 64 --queries 2

Baseline: ``fused_head: false``, the naive head, which builds the (B, L, V) float32 logits of every
text: the tensors csplade built under ZeRO-3 before its fused head ran inside a module of its own (a
trainable, partitioned LM head fell back to calling the module, which builds the same logits; with
LoRA the old path crashed at the second step). Candidate: the fused head, its partitioned weight
gathered for forward and backward by ZeRO-3's own hooks (csplade.model.head.sharded.HeadCall).

Model: a 2-layer random Llama with SmolLM2's tokenizer and vocabulary (V = 49,152;
_measure.build_tiny_model), full fine-tune (the head trains), DeepSpeed ZeRO-3 with
``stage3_param_persistence_threshold: 0`` so every parameter is partitioned, float32.
Figure: each process's peak RSS during ``trainer.train`` above its level when training starts
(VmHWM reset; MALLOC_MMAP_THRESHOLD_ fixed so freed tensors leave the RSS, see _measure), the larger
of the 2 processes. Known limit: RSS counts everything the step allocates, backbone included.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from _measure import MIB, MMAP_THRESHOLD, ROOT, build_tiny_model, machine_line

CASES = {"naive (B, L, V) head": ["--fused_head", "false"], "fused head": []}


def _worker(out: str, argv: list[str]) -> int:
    """Inside one launched process: csplade's CLI, with the peak memory of `train` written to `out`."""
    from csplade.cli import main
    from csplade.evaluation.memory import PeakMemory
    from csplade.training.base import CheckpointingTrainer

    train = CheckpointingTrainer.train

    def measured(self, *args, **kwargs):
        with PeakMemory("cpu") as peak:
            result = train(self, *args, **kwargs)
        rank = self.accelerator.process_index
        record = {"rank": rank, "peak": peak.peak_bytes(), "method": peak.method}
        record["head_calls"] = dict(getattr(self.encoder(), "head_calls", {}))
        Path(f"{out}.{rank}").write_text(json.dumps(record))
        return result

    CheckpointingTrainer.train = measured
    return main(argv)


def _groups(path: Path, n: int, doc_words: int, seed: int = 0) -> Path:
    """`n` training groups of random lowercase words (1 positive + 3 negatives each)."""
    rng = random.Random(seed)
    words = [a + b + c for a in "bcdfglmnprst" for b in "aeiou" for c in "kmnrst"]

    def text(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(k))

    with path.open("w") as fh:
        for _ in range(n):
            group = {"query": text(8), "positives": [text(doc_words)],
                     "negatives": [text(doc_words) for _ in range(3)]}  # fmt: skip
            fh.write(json.dumps(group) + "\n")
    return path


def _config(folder: Path) -> Path:
    ds = {
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": 0,
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
    }
    (folder / "ds.json").write_text(json.dumps(ds))
    config = folder / "zero3.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\n"
        f"deepspeed_config:\n  deepspeed_config_file: {folder / 'ds.json'}\n  zero3_init_flag: true\n"
        "num_machines: 1\nnum_processes: 2\nmachine_rank: 0\nuse_cpu: false\n"
    )
    return config


def _run(case: str, extra: list[str], args, folder: Path, base: str, groups: Path) -> dict:
    out = folder / case.split()[0]
    train = [
        "train", "--model_name_or_path", base, "--train_data", str(groups),
        "--output_dir", str(out), "--group_size", str(args.group),
        "--per_device_train_batch_size", str(args.queries), "--max_steps", str(args.steps),
        "--doc_max_length", str(args.doc_length), "--query_max_length", "16",
        "--save_strategy", "no", "--logging_steps", "1", "--optim", "sgd", *extra,
    ]  # fmt: skip
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(_config(folder)),
        "--num_processes", "2", "--main_process_port", "0", os.path.abspath(__file__),
        "--worker", str(folder / "peak"), "--", *train,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{case} failed:\n{done.stderr[-4000:]}")
    ranks = [json.loads((folder / f"peak.{r}").read_text()) for r in range(2)]
    return {"peak": max(r["peak"] for r in ranks), "ranks": ranks}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=4, help="queries per process and step")
    parser.add_argument("--group", type=int, default=4, help="docs per query")
    parser.add_argument("--doc-length", type=int, default=128, help="doc_max_length (tokens)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("argv", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return _worker(args.worker, args.argv[1:] if args.argv[:1] == ["--"] else args.argv)
    with tempfile.TemporaryDirectory(prefix="zero3-head-") as tmp:
        folder = Path(tmp)
        base = build_tiny_model(str(folder / "base"))
        groups = _groups(folder / "groups.jsonl", 2 * args.queries * args.steps, args.doc_length)
        results = {}
        for case, extra in CASES.items():
            case_dir = folder / case.split()[0]
            case_dir.mkdir()
            results[case] = _run(case, extra, args, case_dir, base, groups)
    print(machine_line("cpu", args.threads))
    print(f"ZeRO-3, 2 processes, V=49,152, H=64, {args.queries} queries x {args.group} docs of "
          f"{args.doc_length} tokens per process, {args.steps} steps, float32")  # fmt: skip
    print(f"{'case':<22} {'peak MiB (max of ranks)':>24} {'ranks':>20}  head calls")
    for case, res in results.items():
        ranks = " / ".join(f"{r['peak'] / MIB:.0f}" for r in res["ranks"])
        calls = res["ranks"][0]["head_calls"]
        print(f"{case:<22} {res['peak'] / MIB:>24.0f} {ranks:>20}  {calls}")
    base_peak, fused = (results[c]["peak"] for c in CASES)
    print(f"fused / naive peak: {fused / base_peak:.3f} ({base_peak / fused:.1f}x lower)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
