"""Shared fixtures: the data folder, the cache, and tiny models loaded once per run (deep-copied per test).

Also the guard against going green by skipping: every package `make test` installs (the Makefile's
EXTRAS) is required by the tests. A missing one stops the run at start with its name
(:func:`pytest_configure`); one that is present but fails to import turns the test that
`pytest.importorskip`-ed it into a failure (:func:`pytest_runtest_makereport`). Only flash-attn,
which the set-up cannot install without CUDA, may be skipped.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("CSPLADE_DATA", str(REPO.parent / "shared" / "data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


# distribution (as in pyproject's extras) -> the module the tests import; tests/test_required.py
# checks that this covers every extra of the Makefile's EXTRAS.
REQUIRED = {
    "bitsandbytes": "bitsandbytes",
    "torchao": "torchao",
    "deepspeed": "deepspeed",
    "pytrec-eval-terrier": "pytrec_eval",
    "pyseismic-lsr": "seismic",
    "matplotlib": "matplotlib",
    "numba": "numba",
    "gguf": "gguf",
    "qdrant-client": "qdrant_client",
    "sentence-transformers": "sentence_transformers",
    "pytest": "pytest",
    "ruff": "ruff",
    "tensorboard": "tensorboard",
}
NOT_INSTALLABLE_HERE = {"flash-attn"}  # needs CUDA: set-up installs it on GPU machines only


def missing_required() -> list[str]:
    """The required distributions whose module cannot be found (cheap: no import)."""
    missing = []
    for dist, module in REQUIRED.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError:
            found = False
        if not found:
            missing.append(f"{dist} (import {module})")
    return missing


def pytest_configure(config) -> None:
    missing = missing_required()
    if missing:
        pytest.exit(
            f"packages that `make test` installs are missing: {', '.join(missing)}. The tests "
            "require them (none is skipped): run `make clean setup`",
            returncode=pytest.ExitCode.TESTS_FAILED,
        )


_SKIPPED_IMPORT = re.compile(r"could not import '([\w.]+)'")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A `pytest.importorskip` of a required package that fails to import is a failure."""
    report = yield
    if report.skipped and isinstance(report.longrepr, tuple):
        found = _SKIPPED_IMPORT.search(str(report.longrepr[2]))
        module = found and found.group(1).split(".")[0]
        if module in REQUIRED.values():
            report.outcome = "failed"
            report.longrepr = f"{module} is required by the tests but failed to import: {found[0]}"
    return report


def data_dir() -> Path:
    return Path(os.environ["CSPLADE_DATA"])


@pytest.fixture
def data_root() -> Path:
    root = data_dir()
    if not (root / "scifact" / "corpus.jsonl").exists():
        pytest.fail(f"evaluation data not found under {root} (set CSPLADE_DATA)")
    return root


@pytest.fixture(scope="session")
def adi() -> Path:
    """The tiny ADI collection (82 docs, 35 queries) from $CSPLADE_DATA."""
    folder = data_dir() / "adi"
    if not (folder / "corpus.jsonl").exists():
        pytest.fail(f"adi not found under {folder.parent} (set CSPLADE_DATA)")
    return folder


_CACHE: dict = {}


def _once(key, build):
    if key not in _CACHE:
        _CACHE[key] = build()
    return copy.deepcopy(_CACHE[key])


@pytest.fixture
def tiny_encoder_factory():
    """`make(arch='llama', **settings)` -> a SparseEncoder over a tiny random backbone (a fresh copy)."""
    from tiny import tiny_model, tiny_tokenizer

    from csplade.model import SparseEncoder, SparseEncoderConfig

    def make(arch: str = "llama", attn_implementation: str = "eager", **settings):
        backbone = _once(
            ("tiny", arch, attn_implementation), lambda: tiny_model(arch, attn_implementation)
        )
        tokenizer = _once(
            ("tok", arch == "bert"), lambda: tiny_tokenizer(bert_style=arch == "bert")
        )
        config = SparseEncoderConfig(base_model=f"tiny-{arch}", **settings)
        return SparseEncoder(backbone, tokenizer, config).eval()

    return make


@pytest.fixture
def prepared():
    """`prepared(name)` -> folder of a packaged model (built into the cache on first use)."""
    from csplade.model.backbones import prepare

    return prepare
