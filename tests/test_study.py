"""eval/study.py's training data: groups of several data sets, those without a negative left out."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
from pathlib import Path

from beir_folder import write_beir

from csplade.data.groups import read_groups_jsonl

REPO = Path(__file__).resolve().parents[1]


def _study():
    spec = importlib.util.spec_from_file_location("study", REPO / "eval" / "study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_groups_of_two_data_sets_leave_out_queries_without_a_bm25_negative(tmp_path, caplog):
    study = _study()
    first = write_beir(
        tmp_path / "first",
        {"a1": ("", "apple banana"), "a2": ("", "apple cherry"), "a3": ("", "apple date")},
        {"q1": "apple banana"},
        [("q1", "a1", 1)],
    )
    # q3's only BM25 hit is its judged document (NFCorpus has 243 such train queries)
    second = write_beir(
        tmp_path / "second",
        {"b1": ("", "zebra yak"), "b2": ("", "lemon lime"), "b3": ("", "lemon melon")},
        {"q2": "lemon lime", "q3": "zebra"},
        [("q2", "b2", 1), ("q3", "b1", 1)],
    )
    args = argparse.Namespace(train_data=[str(first), str(second)], pseudo=None, losses=["infonce"])
    out = tmp_path / "study"
    out.mkdir()
    with caplog.at_level(logging.INFO, logger="csplade.study"):
        plain, _ = study.training_groups(args, out)
    rows = [json.loads(line) for line in plain.read_text().splitlines()]
    assert sorted(r["query_id"] for r in rows) == ["q1", "q2"]
    assert all(r["negatives"] for r in rows)
    assert "groups-second-bm25.jsonl: 1 of 2 groups have no BM25 negative" in caplog.text
    table, _ = read_groups_jsonl(plain, cache_dir=tmp_path / "cache")
    assert len(table) == 2
    assert study._training_data(args, out) == (
        "first 1 + second 1 groups (BM25 negatives), 2 in all"
    )


def test_each_loss_has_its_recipe_and_lexdocs_keeps_its_document_length(tmp_path, monkeypatch):
    """Every arm's recipe exists for `bi`; a `lexdocs` checkpoint is evaluated at its own (whole-
    document) length, the others at --doc-max-length."""
    study = _study()
    for loss in study.LOSSES:
        assert (study.RECIPES / f"{study.RECIPE_OF[loss]}-bi.yaml").exists()
    calls = []

    def fake_evaluate(systems, datasets, out, **kwargs):
        calls.append((systems[0].name, kwargs.get("encoder_overrides")))
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text("{}")

    monkeypatch.setattr(study, "evaluate", fake_evaluate)
    args = argparse.Namespace(steps=[0, 50], datasets=["adi"], curve_datasets=["adi"],
                              doc_max_length=256, dtype="float32", eval_batch_size=4)  # fmt: skip
    rows = [("bi-infonce-step50", "bi-infonce", 50, tmp_path / "a"),
            ("bi-lexdocs-step50", "bi-lexdocs", 50, tmp_path / "b")]  # fmt: skip
    study.evaluate_all(args, tmp_path / "study", rows)
    assert calls[1:] == [("bi-infonce-step50", {"doc_max_length": 256}), ("bi-lexdocs-step50", {})]
