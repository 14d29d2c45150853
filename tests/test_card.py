"""Model cards: written with every saved encoder, completed by the training record and by `csplade
eval`'s results; `push` refuses clearly offline."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from synthetic import save_base, write_groups

from csplade.cli import main
from csplade.model import SparseEncoder
from csplade.model.card import EVAL_NAME, base_origin, card_text, front_matter, shown
from csplade.model.io import push_to_hub
from csplade.training.contrastive import run_training
from csplade.training.recipe import parse_recipe


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny causal encoder trained 4 steps, as `csplade train` leaves it."""
    root = tmp_path_factory.mktemp("card")
    base = save_base(root / "base")
    (base / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: org/tiny\n---\n# tiny\n")
    groups = write_groups(root / "groups.jsonl", n=32)
    args = [
        "--model_name_or_path", str(base), "--train_data", str(groups),
        "--output_dir", str(root / "out"), "--variant", "echo", "--max_steps", "4",
        "--per_device_train_batch_size", "4", "--group_size", "2", "--logging_steps", "2",
        "--save_steps", "1000", "--use_cpu", "true", "--query_max_length", "8",
    ]  # fmt: skip
    return run_training(*parse_recipe(None, args))


def test_saved_folder_has_a_card_with_hub_metadata(trained):
    meta = front_matter(trained / "README.md")
    assert meta["library_name"] == "csplade"
    assert {"sparse", "splade", "learned-sparse-retrieval", "variant-echo", "pooling-max"} <= set(
        meta["tags"]
    )
    assert meta["license"] == "apache-2.0" and meta["base_model"] == "org/tiny"  # from the base
    text = (trained / "README.md").read_text()
    assert f'SparseEncoder.from_pretrained("{trained.name}")' in text
    assert "| variant | `echo`: the text is fed twice" in text
    assert "/tmp" not in text  # local paths show their last component only


def test_card_verb_adds_the_training_record(trained, capsys):
    assert main(["card", str(trained)]) == 0
    text = capsys.readouterr().out
    assert "**Contrastive training** on `groups.jsonl (local)`: 4 steps" in text
    assert "min wall time" in text and "final mean loss" in text
    assert "<summary>Recipe keys</summary>" in text and "group_size: 2" in text
    assert text == (trained / "README.md").read_text()


def test_eval_writes_its_metrics_into_the_card(trained, adi, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "csplade", "eval", "--model", str(trained), "--datasets",
         str(adi), "--out", str(tmp_path / "eval"), "--latency-queries", "0", "--max-docs", "30"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    recorded = json.loads((trained / EVAL_NAME).read_text())["results"]["adi"]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())[trained.name]["adi"]
    assert recorded["metrics"] == metrics and recorded["slice"].startswith("slice of adi")
    text = (trained / "README.md").read_text()
    assert "## Evaluation" in text and f"| adi* | test | {metrics['ndcg_cut_10']:.3f} |" in text
    assert "not comparable with full-collection figures" in text
    assert "latency" not in json.dumps(recorded["efficiency"])  # --latency-queries 0: not measured


def test_card_of_a_packaged_base_and_an_untrained_encoder(tiny_encoder_factory, tmp_path):
    assert base_origin("smollm2-135m") == ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")
    assert base_origin("gemma3-270m")[1] == "gemma"
    assert base_origin("someone/some-model") == ("someone/some-model", None)
    assert shown("/data/runs/model-a") == "model-a (local)" and shown("org/model") == "org/model"
    encoder = tiny_encoder_factory("bert")
    encoder.save_pretrained(tmp_path / "m")
    text = card_text(tmp_path / "m", name="me/m")
    assert "No csplade training is recorded" in text and "a masked LM (bidirectional)" in text
    assert 'SparseEncoder.from_pretrained("me/m")' in text
    assert "license" not in front_matter(tmp_path / "m" / "README.md")  # unknown: not claimed


def test_push_refuses_offline_with_what_to_do(tiny_encoder_factory, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE is set.*csplade push"):
        push_to_hub(tiny_encoder_factory("bert"), "me/model")
    encoder = tiny_encoder_factory("bert")
    encoder.save_pretrained(tmp_path / "m")
    assert main(["push", str(tmp_path / "m"), "--repo-id", "me/model"]) == 2
    assert SparseEncoder.from_pretrained(tmp_path / "m") is not None  # the folder is untouched
