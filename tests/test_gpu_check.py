"""benchmarks/gpu_check.py: its --dry-run (the GPU check's code paths on the CPU, toy sizes) passes,
a skipped row fails the run unless allowed, and its head comparison catches a wrong gradient.

The GPU figures themselves come only from a GPU (`make gpu-check`); this keeps the script right
between the times one is lent.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
# what a CPU cannot run, and the dry run says why
DRY_SKIPS = {"attention flash_attention_2", "multi-gpu fsdp2.yaml"}


def _run(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--json", str(out), *args],
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=REPO,
    )
    report = json.loads(out.read_text()) if out.exists() else {}
    return result, report


@pytest.mark.slow
@pytest.mark.distributed
def test_the_dry_run_passes_every_check(tmp_path):
    result, report = _run(tmp_path, "--allow-skip")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert report["passed"] and report["dry_run"]
    rows = {row["check"]: row for row in report["rows"]}
    expected = {"head", "attention sdpa", "attention flash_attention_2", "bitsandbytes int8",
                "bitsandbytes nf4", "encode", "train: one process fp32",
                "train: ZeRO-3 (1 process) fp32", "train: one process bf16 autocast",
                "multi-gpu ddp.yaml", "multi-gpu zero3.yaml", "multi-gpu fsdp2.yaml"}  # fmt: skip
    assert set(rows) == expected
    assert sum(row["check"] == "head" for row in report["rows"]) == 4  # 2 sizes x 2 dtypes
    for row in report["rows"]:
        want = "skipped" if row["check"] in DRY_SKIPS else "ok"
        assert row["status"] == want, row
    assert "no CUDA device" in rows["attention flash_attention_2"]["figures"]
    assert "DEEPSPEED, world 2" in rows["multi-gpu zero3.yaml"]["figures"]
    assert "MULTI_CPU, world 2" in rows["multi-gpu ddp.yaml"]["figures"]
    for name in ("torch", "transformers", "deepspeed", "bitsandbytes", "cuda"):
        assert name in report["versions"]
    assert "| check | setting | status | figures |" in result.stdout
    assert "PASSED (2 skipped, allowed" in result.stdout


def test_a_skipped_row_fails_the_run_unless_allowed(tmp_path):
    result, report = _run(tmp_path, "--only", "attention")
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert not report["passed"]
    assert "FAILED (1 skipped: attention flash_attention_2)" in result.stdout
    assert [r["status"] for r in report["rows"]] == ["ok", "skipped"]


@pytest.fixture
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    module = importlib.import_module("gpu_check")
    monkeypatch.setattr(module, "ROWS", [])
    return module


def test_the_head_check_fails_a_fused_head_whose_gradient_is_doubled(gpu_check, monkeypatch):
    """The tolerance bites: the same values with twice the hidden-state gradient fail every row."""
    import csplade.model.head as head

    real = head.sparse_pool

    def doubled(hidden, weight, mask, bias=None, **kwargs):
        if kwargs.get("fused", True):
            hidden = 2 * hidden - hidden.detach()  # same values, gradient x 2
        return real(hidden, weight, mask, bias, **kwargs)

    args = type("Args", (), {"device": "cpu", "repeats": 1})()
    size = {"batch": 2, "length": 8, "heads": [(512, 16)]}
    gpu_check.check_head(args, size)
    assert [r["status"] for r in gpu_check.ROWS] == ["ok", "ok"]  # bf16, fp32
    gpu_check.ROWS.clear()
    monkeypatch.setattr(head, "sparse_pool", doubled)
    gpu_check.check_head(args, size)
    assert [r["status"] for r in gpu_check.ROWS] == ["FAILED", "FAILED"]
    assert all(r["values_rel"] == 0 and r["grads_rel"] > 0.5 for r in gpu_check.ROWS)
