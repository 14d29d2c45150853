"""Evaluation during training: the evaluator scores what `csplade eval` scores, the trainers log it at
`eval_steps`, keep and restore the best checkpoint (through a resume too), the own-vectors evaluation
is the model without its residual, and bad dev sets fail before any model loads."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from beir_folder import write_beir
from safetensors.torch import load_file
from synthetic import A, pairs, save_base, write_groups

from csplade.evaluation.beir_eval import SystemSpec, evaluate
from csplade.evaluation.during_training import RetrievalEvaluator, load_dev_set
from csplade.model import lexical
from csplade.model.encoder import SparseEncoder
from csplade.training.arguments import AdaptationArguments, EvalSet, ModelArguments
from csplade.training.base import EVAL_HISTORY
from csplade.training.contrastive import run_training
from csplade.training.recipe import ADAPT_TYPES, parse_recipe


def _dev_folder(folder: Path, rows: list[tuple[str, str]], extra_docs: int = 0) -> Path:
    """A BEIR folder whose query i is judged relevant to doc i (split dev), plus unjudged docs."""
    docs = {f"d{i}": ("", doc) for i, (_, doc) in enumerate(rows)}
    docs.update({f"x{i}": ("", doc) for i, (_, doc) in enumerate(pairs(extra_docs, seed=9))})
    queries = {f"q{i}": query for i, (query, _) in enumerate(rows)}
    qrels = [(f"q{i}", f"d{i}", 1) for i in range(len(rows))]
    return write_beir(folder, docs, queries, qrels, split="dev")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaltask")
    rng = __import__("random").Random(5)
    docs = [rng.sample(A, 5) for _ in range(40)]
    return {
        "base": save_base(root / "base"),
        "groups": write_groups(root / "groups.jsonl"),
        # queries in other words than their documents: only a trained model finds them
        "dev": _dev_folder(root / "synthetic", pairs(40, seed=2), extra_docs=40),
        # queries made of two of their document's words: lexical matching finds them
        "lexical": _dev_folder(root / "lexical", [(" ".join(d[:2]), " ".join(d)) for d in docs]),
    }


def _args(task, out, *extra):
    return [
        "--model_name_or_path", str(task["base"]), "--train_data", str(task["groups"]),
        "--output_dir", str(out), "--per_device_train_batch_size", "8", "--group_size", "4",
        "--learning_rate", "3e-3", "--logging_steps", "2", "--save_steps", "1000",
        "--use_cpu", "true", "--seed", "7", "--report_to", "none", *extra,
    ]  # fmt: skip


def _eval_args(task, *extra):
    return ["--eval_data", f"{task['dev']}", "--eval_strategy", "steps", *extra]


def _train(task, out, *extra, evaluator="from_args"):
    parsed = parse_recipe(None, _args(task, out, *extra))
    if evaluator == "from_args":
        evaluator = RetrievalEvaluator.from_args(parsed[-1])
    return run_training(*parsed, evaluator=evaluator)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _evals(history: list[dict]) -> list[dict]:
    return [h for h in history if any(k.startswith("eval_") for k in h)]


# ------------------------------------------------------------------ the evaluator


def test_evaluator_scores_what_csplade_eval_scores_on_the_same_slice(task, tmp_path):
    """Same model, same slice (first 25 queries, their judged docs + random others up to 50): the
    evaluator's nDCG@10, R@100, MRR@10 and nnz are those of `csplade eval` (pytrec_eval on its run)."""
    dev = load_dev_set(EvalSet(str(task["dev"]), "dev", "syn-dev"), max_queries=25, max_docs=50)
    assert len(dev.data.queries) == 25 and len(dev.data.doc_ids) == 50
    assert any(d.startswith("x") for d in dev.data.doc_ids)  # unjudged documents drawn in
    evaluator = RetrievalEvaluator([dev], batch_size=16)
    encoder = SparseEncoder.from_pretrained(task["base"])
    got = evaluator(encoder)
    assert set(got) == set(evaluator.metric_names(encoder))

    out = tmp_path / "eval"
    evaluate([SystemSpec("tiny", str(task["base"]))], [str(task["dev"])], out, split="dev",
             max_docs=50, max_queries=25, k=1000, batch_size=16, latency_queries=0)  # fmt: skip
    name = task["dev"].name
    want = json.loads((out / "metrics.json").read_text())["tiny"][name]
    efficiency = json.loads((out / "efficiency.json").read_text())["tiny"][name]
    assert 0 < got["syn-dev_ndcg@10"] < 1
    assert got["syn-dev_ndcg@10"] == pytest.approx(want["ndcg_cut_10"], abs=1e-12)
    assert got["syn-dev_recall@100"] == pytest.approx(want["recall_100"], abs=1e-12)
    assert got["syn-dev_mrr@10"] == pytest.approx(want["recip_rank_10"], abs=1e-12)
    assert got["syn-dev_query_nnz"] == pytest.approx(efficiency["query_nnz"])
    assert got["syn-dev_doc_nnz"] == pytest.approx(efficiency["doc_nnz"])


def _residual_encoder(task, lexical_docs: bool) -> SparseEncoder:
    encoder = SparseEncoder.from_pretrained(
        task["base"], lexical_residual=True, lexical_docs=lexical_docs, doc_max_length=16
    )
    texts = [json.loads(line)["text"] for line in (task["lexical"] / "corpus.jsonl").open()]
    encoder.lexical = lexical.statistics(encoder.lexical_rows(texts), encoder.vocab_size)
    return encoder


@pytest.mark.parametrize("lexical_docs", [False, True])
def test_own_vectors_are_the_model_without_its_residual(task, lexical_docs):
    """With a residual, the own evaluation differs from the full one and equals the full evaluation
    of a copy with the residual off (for lexical documents: documents through the model, at
    eval_doc_max_length; their full evaluation keeps the model's length)."""
    dev = load_dev_set(EvalSet(str(task["lexical"]), "dev", "lex-dev"))
    encoder = _residual_encoder(task, lexical_docs)
    config = encoder.config
    evaluator = RetrievalEvaluator([dev], batch_size=8, own_vectors=True, doc_max_length=6)
    got = evaluator(encoder)
    assert encoder.config == config  # the settings are the model's again
    assert set(got) == set(evaluator.metric_names(encoder))
    assert got["lex-dev_ndcg@10"] > 0.9  # BM25 on the query's own words finds its document
    assert abs(got["lex-dev_own_ndcg@10"] - got["lex-dev_ndcg@10"]) > 0.01

    learned_only = copy.deepcopy(encoder)
    learned_only.config = dataclasses.replace(
        config, lexical_residual=False, lexical_docs=False, doc_max_length=6
    )
    plain = RetrievalEvaluator([dev], batch_size=8)(learned_only)
    for name, value in plain.items():
        assert got[name.replace("lex-dev_", "lex-dev_own_")] == value, name
    # the full evaluation: documents at eval_doc_max_length, lexical documents at the model's length
    at = 16 if lexical_docs else 6
    full = copy.deepcopy(encoder)
    full.config = dataclasses.replace(config, doc_max_length=at)
    for name, value in RetrievalEvaluator([dev], batch_size=8)(full).items():
        assert got[name] == value, name


def test_no_residual_means_no_own_metrics(task, caplog):
    dev = load_dev_set(EvalSet(str(task["lexical"]), "dev", "lex-dev"))
    encoder = SparseEncoder.from_pretrained(task["base"])
    evaluator = RetrievalEvaluator([dev], batch_size=8, own_vectors=True)
    with caplog.at_level(logging.INFO, logger="csplade"):
        got = evaluator(encoder)
    assert not [k for k in got if "_own_" in k]
    assert "its vectors are its own" in caplog.text


# ------------------------------------------------------------------ recipe keys and early errors


def test_eval_keys_parse_into_named_sets_and_refuse_what_evaluates_nothing(task, tmp_path):
    targs = parse_recipe(None, _args(task, tmp_path, *_eval_args(task), "--eval_data",
                                     f"{task['dev']}", f"{task['lexical']}:test",
                                     "--load_best_model_at_end", "true"))[-1]  # fmt: skip
    assert [(s.split, s.name) for s in targs.eval_sets()] == [
        ("dev", "synthetic-dev"),
        ("test", "lexical-test"),
    ]
    assert targs.metric_for_best_model == "synthetic-dev_ndcg@10" and targs.greater_is_better
    with pytest.raises(ValueError, match="eval_strategy is 'no'"):
        parse_recipe(None, _args(task, tmp_path, "--eval_data", str(task["dev"])))
    with pytest.raises(ValueError, match="share a name"):
        parse_recipe(None, _args(task, tmp_path, *_eval_args(task), "--eval_data", "a/x", "b/x"))
    with pytest.raises(ValueError, match="eval_max_docs must be >= 1"):
        parse_recipe(None, _args(task, tmp_path, *_eval_args(task), "--eval_max_docs", "0"))
    with pytest.raises(ValueError, match="nothing to evaluate"):
        _train(task, tmp_path / "x", "--eval_strategy", "steps", evaluator=None)
    with pytest.raises(ValueError, match="no evaluator was given"):
        _train(task, tmp_path / "x", *_eval_args(task), evaluator=None)


@pytest.mark.parametrize(
    ("data", "message"),
    [("no-such-set", "dataset 'no-such-set' not found"), (None, "split 'nope' not found")],
)
def test_a_wrong_dev_set_fails_before_the_model_loads(
    task, tmp_path, monkeypatch, capsys, data, message
):
    import csplade.training.contrastive as contrastive
    from csplade.cli import main

    def refuse(*_args, **_kwargs):
        raise AssertionError("training data or model loaded before the dev sets were checked")

    monkeypatch.setattr(contrastive, "load_encoder_for_training", refuse)
    monkeypatch.setattr(contrastive, "load_training_groups", refuse)
    spec = data or f"{task['dev']}:nope"
    argv = _args(task, tmp_path / "bad", *_eval_args(task), "--eval_data", spec)
    assert main(["train", *argv]) == 2
    assert message in capsys.readouterr().err


def test_an_unknown_best_metric_fails_before_training(task, tmp_path):
    with pytest.raises(ValueError, match="synthetic-dev_ndcg@10"):
        _train(task, tmp_path / "m", *_eval_args(task), "--load_best_model_at_end", "true",
               "--metric_for_best_model", "synthetic-dev_ndgc@10", "--max_steps", "2")  # fmt: skip
    assert not (tmp_path / "m" / "checkpoint-2").exists()


# ------------------------------------------------------------------ the trainers


def test_training_logs_the_model_of_each_eval_step(task, tmp_path, caplog):
    """Evaluations at steps 0 (eval_on_start), 3 and 6 are logged with the training metrics, to
    TensorBoard and to eval/history.json; each equals the evaluation of that step's checkpoint."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="csplade"):
        _train(task, out, *_eval_args(task), "--eval_steps", "3", "--eval_on_start", "true",
               "--save_steps", "3", "--save_total_limit", "5", "--max_steps", "6",
               "--report_to", "tensorboard", "--eval_max_queries", "30")  # fmt: skip
    info = json.loads((out / "run_info.json").read_text())
    evals = _evals(info["log_history"])
    assert [h["step"] for h in evals] == [0, 3, 6]
    assert [h["step"] for h in info["log_history"] if "contrastive" in h] == [2, 4, 6]
    assert json.loads((out / EVAL_HISTORY).read_text()) == evals
    for entry in evals:
        assert entry["eval_runtime"] > 0 and "eval_synthetic-dev_query_nnz" in entry
    seconds = [h["eval_train_seconds"] for h in evals]
    assert 0 <= seconds[0] < seconds[1] < seconds[2]
    assert caplog.text.count("evaluation at step") == 3
    assert "synthetic-dev nDCG@10" in caplog.text

    evaluator = RetrievalEvaluator.from_args(parse_recipe(None, _args(task, out, *_eval_args(task),
                                             "--eval_max_queries", "30"))[-1])  # fmt: skip
    for entry, folder in ((evals[1], out / "checkpoint-3"), (evals[2], out)):
        again = evaluator(SparseEncoder.from_pretrained(folder))
        for name, value in again.items():
            assert entry[f"eval_{name}"] == pytest.approx(value, abs=1e-9), (folder, name)
    assert evals[0]["eval_synthetic-dev_ndcg@10"] != evals[2]["eval_synthetic-dev_ndcg@10"]

    events = EventAccumulator(str(next(out.glob("runs/*")))).Reload()
    steps = [e.step for e in events.Scalars("eval/synthetic-dev_ndcg@10")]
    assert steps == [0, 3, 6]


class Scripted:
    """An evaluator that returns a fixed sequence of scores, one per call."""

    def __init__(self, scores):
        self.scores = list(scores)

    def metric_names(self, encoder):
        return ["dev_ndcg@10"]

    def __call__(self, encoder):
        return {"dev_ndcg@10": self.scores.pop(0)}


BEST = ["--eval_strategy", "steps", "--eval_steps", "2", "--save_steps", "2",
        "--load_best_model_at_end", "true", "--metric_for_best_model", "dev_ndcg@10",
        "--save_total_limit", "2"]  # fmt: skip


def test_the_best_checkpoint_is_restored_and_kept_through_a_resume(task, tmp_path):
    """Scores 0.1, 0.5, 0.3 at steps 2, 4, 6: the saved model is checkpoint-4's (not the last
    step's), which save_total_limit keeps. Resumed from checkpoint-6 to step 8 where the score is
    0.4, the restored best (0.5) still wins."""
    out = tmp_path / "best"
    run_training(*parse_recipe(None, _args(task, out, *BEST, "--max_steps", "6")),
                 evaluator=Scripted([0.1, 0.5, 0.3]))  # fmt: skip
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    info = json.loads((out / "run_info.json").read_text())
    assert info["best_checkpoint"] == str(out / "checkpoint-4")
    final, best, last = (
        _weights(out),
        _weights(out / "checkpoint-4"),
        _weights(out / "checkpoint-6"),
    )
    assert final.keys() == best.keys()
    assert all(torch.equal(final[k], best[k]) for k in best)
    assert any(not torch.equal(final[k], last[k]) for k in last)

    run_training(*parse_recipe(None, _args(task, out, *BEST, "--max_steps", "8",
                                           "--resume_from_checkpoint", "latest")),
                 evaluator=Scripted([0.4]))  # fmt: skip
    info = json.loads((out / "run_info.json").read_text())
    assert info["resumed_from"] == str(out / "checkpoint-6") and info["global_step"] == 8
    assert [h["eval_dev_ndcg@10"] for h in _evals(info["log_history"])] == [0.1, 0.5, 0.3, 0.4]
    assert info["best_checkpoint"] == str(out / "checkpoint-4")
    final = _weights(out)
    assert all(torch.equal(final[k], best[k]) for k in best)
    eighth = _weights(out / "checkpoint-8")
    assert any(not torch.equal(final[k], eighth[k]) for k in eighth)


def test_the_best_lora_checkpoint_is_restored(task, tmp_path):
    out = tmp_path / "lora"
    run_training(*parse_recipe(None, _args(task, out, *BEST, "--max_steps", "4", "--use_lora",
                                           "--lora_r", "4", "--lora_dropout", "0")),
                 evaluator=Scripted([0.9, 0.2]))  # fmt: skip
    final, best = _weights(out), _weights(out / "checkpoint-2")
    assert any("lora_B" in k for k in final) and final.keys() == best.keys()
    assert all(torch.equal(final[k], best[k]) for k in best)


def _adapt_corpus(folder: Path) -> Path:
    folder.mkdir()
    with (folder / "corpus.jsonl").open("w") as fh:
        for i, (_, doc) in enumerate(pairs(48, seed=4)):
            fh.write(json.dumps({"_id": str(i), "text": doc}) + "\n")
    return folder / "corpus.jsonl"


def test_adaptation_curves_evaluate_the_model_it_would_save(task, tmp_path, monkeypatch):
    """During adaptation with head_bias_df, each evaluation calibrates the bias the save would: the
    last evaluation equals evaluating the saved model. Evaluating does not change the training."""
    import datasets

    from csplade.training.adaptation import run_adaptation

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    corpus = _adapt_corpus(tmp_path / "corpus")

    def adapt(out, *extra):
        argv = ["--model_name_or_path", str(task["base"]), "--adapt_data", str(corpus),
                "--output_dir", str(out), "--max_steps", "4", "--learning_rate", "1e-2",
                "--per_device_train_batch_size", "8", "--head_bias_df", "0.1", "--use_cpu", "true",
                "--save_strategy", "no", "--report_to", "none", "--seed", "0", *extra]  # fmt: skip
        parsed = parse_recipe(None, argv, types=ADAPT_TYPES)
        return run_adaptation(*parsed, evaluator=RetrievalEvaluator.from_args(parsed[-1]))

    evaluated = adapt(tmp_path / "eval", *_eval_args(task), "--eval_steps", "2")
    plain = adapt(tmp_path / "plain")
    history = json.loads((evaluated / EVAL_HISTORY).read_text())
    assert [h["step"] for h in history] == [2, 4]
    saved = SparseEncoder.from_pretrained(evaluated)
    assert saved.head_bias is not None
    again = RetrievalEvaluator([load_dev_set(EvalSet(str(task["dev"]), "dev", "synthetic-dev"))],
                               batch_size=8)(saved)  # fmt: skip
    for name, value in again.items():
        assert history[-1][f"eval_{name}"] == pytest.approx(value, abs=1e-9), name
    want, got = _weights(plain), _weights(evaluated)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_adaptation_restores_its_best_checkpoint(task, tmp_path, monkeypatch):
    import datasets

    from csplade.training.adaptation import run_adaptation

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    model_args = ModelArguments(model_name_or_path=str(task["base"]))
    adapt_args = AdaptationArguments(adapt_data=str(_adapt_corpus(tmp_path / "corpus")))
    targs = parse_recipe(None, ["--output_dir", str(tmp_path / "a"), "--max_steps", "4",
                                "--learning_rate", "1e-2", "--use_cpu", "true", "--report_to",
                                "none", *BEST], types=ADAPT_TYPES)[-1]  # fmt: skip
    out = run_adaptation(model_args, adapt_args, targs, evaluator=Scripted([0.7, 0.1]))
    final, best = _weights(out), _weights(out / "checkpoint-2")
    assert final.keys() == best.keys()
    assert all(torch.equal(final[k], best[k]) for k in best)
    saved = SparseEncoder.from_pretrained(out)
    assert saved.config.extra["adaptation"]["best_checkpoint"] == str(out / "checkpoint-2")
    shutil.rmtree(out)


# ------------------------------------------------------------------ 2 processes


@pytest.mark.distributed
@pytest.mark.parametrize("engine", ["ddp", "zero3"])
def test_two_processes_log_the_one_process_evaluation(task, tmp_path, engine):
    """Under DDP the main process evaluates and hands its numbers to the other (both then choose the
    same best checkpoint); under ZeRO-3 (every parameter partitioned) both evaluate, each forward
    gathering the shards. The logged numbers are one process's evaluation of the saved checkpoints."""
    from launching import launch, zero_config

    config = zero_config(tmp_path / "cfg") if engine == "zero3" else None
    out = tmp_path / engine
    launch(config, "train", *_args(task, out, *_eval_args(task), "--eval_steps", "1",
                                   "--save_steps", "1", "--max_steps", "2",
                                   "--load_best_model_at_end", "true", "--save_total_limit", "3",
                                   "--eval_max_queries", "20"))  # fmt: skip
    info = json.loads((out / "run_info.json").read_text())
    assert info["world_size"] == 2
    evals = _evals(info["log_history"])
    assert [h["step"] for h in evals] == [1, 2]
    evaluator = RetrievalEvaluator.from_args(
        parse_recipe(None, _args(task, out, *_eval_args(task), "--eval_max_queries", "20"))[-1]
    )
    for entry in evals:
        again = evaluator(SparseEncoder.from_pretrained(out / f"checkpoint-{entry['step']}"))
        for name, value in again.items():
            assert entry[f"eval_{name}"] == pytest.approx(value, abs=1e-6), (entry["step"], name)
    scores = [h["eval_synthetic-dev_ndcg@10"] for h in evals]
    best = evals[scores.index(max(scores))]["step"]
    assert info["best_checkpoint"] == str(out / f"checkpoint-{best}")


def test_the_documented_commands_parse(data_root):
    """docs/evaluation-during-training.md's two commands: valid keys, dev sets that exist, and (for
    train) a best-checkpoint metric and save_steps transformers accepts."""
    repo = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-135m"
    slices = ["--eval_max_queries", "100", "--eval_max_docs", "1000"]
    adapt = parse_recipe(repo / "adapt-bi.yaml", ["--eval_data", "scifact:test", *slices,
                         "--eval_strategy", "steps", "--eval_steps", "25", "--eval_on_start",
                         "true", "--use_cpu", "true"], types=ADAPT_TYPES)[-1]  # fmt: skip
    train = parse_recipe(repo / "lexdocs-bi.yaml", ["--eval_data", "nfcorpus", "scifact:test",
                         *slices, "--eval_own_vectors", "true", "--eval_doc_max_length", "256",
                         "--eval_strategy", "steps", "--eval_steps", "50", "--eval_on_start", "true",
                         "--load_best_model_at_end", "true", "--metric_for_best_model",
                         "nfcorpus-dev_ndcg@10", "--use_cpu", "true"])[-1]  # fmt: skip
    assert [s.name for s in train.eval_sets()] == ["nfcorpus-dev", "scifact-test"]
    evaluator = RetrievalEvaluator.from_args(train)
    assert [len(d.data.queries) for d in evaluator.dev_sets] == [100, 100]
    assert adapt.eval_sets()[0].name == "scifact-test" and adapt.eval_steps == 25
