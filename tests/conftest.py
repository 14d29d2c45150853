"""Shared fixtures: the data folder, the cache, and tiny models loaded once per run (deep-copied per test)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("CSPLADE_DATA", str(REPO.parent / "shared" / "data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


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
