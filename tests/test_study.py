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


def test_curves_come_from_the_runs_eval_histories(tmp_path, data_root):
    """The curve keys parse into an evaluator of slices; curves.md and the plot read each run's
    eval/history.json (adaptation steps before 0, minutes without the evaluations' time)."""
    from csplade.evaluation.during_training import RetrievalEvaluator
    from csplade.training.recipe import parse_recipe

    study = _study()
    args = argparse.Namespace(variants=["bi"], losses=["lexdocs"], adapt_steps=100,
                              curve_datasets=["adi"], curve_split="test", curve_queries=5,
                              curve_docs=30, doc_max_length=64, eval_batch_size=4)  # fmt: skip
    parsed = parse_recipe(None, ["--output_dir", str(tmp_path), *study.curve_overrides(args, 50)])
    evaluator = RetrievalEvaluator.from_args(parsed[-1])
    assert [(d.name, len(d.data.queries), len(d.data.doc_ids)) for d in evaluator.dev_sets] == [
        ("adi-test", 5, 30)
    ]
    assert evaluator.own_vectors and evaluator.doc_max_length == 64
    assert parsed[-1].eval_steps == 50 and parsed[-1].eval_on_start

    out = tmp_path / "study"
    for run, seconds, history in (
        ("adapt-bi", 70.0, [(0, 0.0, 0.1, None), (100, 50.0, 0.2, None)]),
        ("train-bi-lexdocs", 130.0, [(0, 0.0, 0.3, 0.05), (50, 110.0, 0.4, 0.07)]),
    ):
        entries = [{"step": step, "eval_train_seconds": t, "eval_runtime": 10.0,
                    "eval_adi-test_ndcg@10": ndcg}
                   | ({"eval_adi-test_own_ndcg@10": own} if own is not None else {})
                   for step, t, ndcg, own in history]  # fmt: skip
        (out / run / "eval").mkdir(parents=True)
        (out / run / "eval" / "history.json").write_text(json.dumps(entries))
        (out / f"{run}.time.json").write_text(json.dumps({"seconds": seconds}))
    points = study.curves(args, out)
    assert [(p["arm"], p["step"]) for p in points] == [
        ("bi-adapted", -100),
        ("bi-adapted", 0),
        ("bi-lexdocs", 0),
        ("bi-lexdocs", 50),
    ]
    # training minutes count from the adaptation's start: its 70 s less its 2 evaluations of 10 s
    assert [round(p["minutes"] * 60) for p in points] == [0, 50, 50, 160]
    assert study._seconds(out, "bi-lexdocs", 50) == 50 + 110
    bm25 = study.slice_bm25(args)
    assert list(bm25) == ["adi-test"] and 0 < bm25["adi-test"] < 1
    study._curves_table(out, points, bm25)
    table = (out / "curves.md").read_text().splitlines()
    assert table[0] == "| arm | phase | step | min | adi-test | adi-test own |"
    assert table[5] == "| bi-lexdocs | train | 0 | 0.8 | 0.300 | 0.050 |"
    study._plot(args, out, points, bm25)
    assert (out / "learning_curves.png").stat().st_size > 0
