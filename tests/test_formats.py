"""Training data as the HF ecosystem publishes it: every file format and layout reads into the same
groups and trains; bad rows name their row; a stream resumes exactly; a hub id offline fails fast."""

from __future__ import annotations

import gzip
import json
import logging
import random
import shutil
import time
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from synthetic import pairs, save_base
from transformers import TrainerCallback

from csplade.data.formats import count_rows, resolve
from csplade.data.groups import load_training_groups, read_groups
from csplade.data.sampling import GroupCollator
from csplade.data.streaming import StreamingGroupDataset
from csplade.data.texts import document_texts, read_texts
from csplade.training.adaptation import run_adaptation
from csplade.training.arguments import DataArguments
from csplade.training.contrastive import SparseTrainer, run_training
from csplade.training.loading import load_encoder_for_training
from csplade.training.recipe import ADAPT_TYPES, parse_recipe

N_GROUPS, N_NEG = 24, 3


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A tiny causal base and the same 24 training groups (1 positive, 3 negatives, scores)."""
    root = tmp_path_factory.mktemp("formats")
    train = pairs(N_GROUPS, seed=1)
    groups = []
    for i, (query, doc) in enumerate(train):
        others = random.Random(i).sample([j for j in range(N_GROUPS) if j != i], N_NEG)
        scores = [5.0 - k for k in range(N_NEG + 1)]
        groups.append((f"q{i}", query, doc, [train[j][1] for j in others], scores))
    return {"root": root, "base": save_base(root / "base"), "groups": groups}


# ------------------------------------------------------------------------------- the layouts
def tevatron_rows(groups):
    return [
        {
            "query_id": qid,
            "query": query,
            "positive_passages": [{"docid": f"{qid}-p", "title": "", "text": pos}],
            "negative_passages": [{"docid": f"{qid}-n{k}", "title": "", "text": n}
                                  for k, n in enumerate(negs)],
        }
        for qid, query, pos, negs, _ in groups
    ]  # fmt: skip


def st_rows(groups, label: str | None = None, query_key: str = "anchor"):
    """sentence-transformers columns; label 'kl' = [pos, neg_1..n] scores, 'margin' = pos − neg_i."""
    rows = []
    for _, query, pos, negs, scores in groups:
        row = {query_key: query, "positive": pos}
        row.update({f"negative_{k + 1}": n for k, n in enumerate(negs)})
        if label == "kl":
            row["label"] = scores
        elif label == "margin":
            row["score"] = [scores[0] - s for s in scores[1:]]
        rows.append(row)
    return rows


def csplade_rows(groups):
    return [
        {"query": query, "query_id": qid, "positives": [pos], "negatives": negs,
         "scores": {"positives": scores[:1], "negatives": scores[1:]}}
        for qid, query, pos, negs, scores in groups
    ]  # fmt: skip


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_arrow(path: Path, rows: list[dict]) -> Path:
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return path


def gzip_file(path: Path) -> Path:
    out = path.with_name(path.name + ".gz")
    with open(path, "rb") as src, gzip.open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
    path.unlink()
    return out


def _texts(table) -> list[tuple]:
    return [(g["query"], tuple(g["positives"]), tuple(g["negatives"])) for g in table]


def test_every_format_and_layout_reads_the_same_groups(task, tmp_path):
    groups = task["groups"]
    want = [(query, (pos,), tuple(negs)) for _, query, pos, negs, _ in groups]
    sources = {
        "tevatron.parquet": write_parquet(tmp_path / "tevatron.parquet", tevatron_rows(groups)),
        "tevatron.jsonl.gz": write_jsonl(tmp_path / "tevatron.jsonl.gz", tevatron_rows(groups)),
        "st.arrow": write_arrow(tmp_path / "st.arrow", st_rows(groups, query_key="query")),
        "st.parquet.gz": gzip_file(write_parquet(tmp_path / "st.parquet", st_rows(groups))),
        "csplade.jsonl.gz": write_jsonl(tmp_path / "csplade.jsonl.gz", csplade_rows(groups)),
        "csplade.arrow.gz": gzip_file(write_arrow(tmp_path / "c.arrow", csplade_rows(groups))),
    }
    cache = tmp_path / "cache"
    for name, path in sources.items():
        table, stats = read_groups(path, cache_dir=cache)
        assert _texts(table) == want, name
        assert stats["groups"] == N_GROUPS and stats["skipped"] == 0, name
    disk = datasets.DatasetDict({"train": datasets.Dataset.from_list(tevatron_rows(groups))})
    disk.save_to_disk(str(tmp_path / "saved"))
    repo = tmp_path / "repo" / "data"
    repo.mkdir(parents=True)
    write_parquet(repo / "train-00000-of-00001.parquet", st_rows(groups))
    for folder in (tmp_path / "saved", tmp_path / "repo"):
        table, _ = read_groups(resolve(folder), cache_dir=cache)
        assert _texts(table) == want, folder


def test_sentence_transformers_scores_kl_and_margin_conventions(task, tmp_path):
    groups = task["groups"][:2]
    kl, _ = read_groups(write_parquet(tmp_path / "kl.parquet", st_rows(groups, "kl")))
    margin, _ = read_groups(write_parquet(tmp_path / "m.parquet", st_rows(groups, "margin")))
    assert kl[0]["positive_scores"] == [5.0] and kl[0]["negative_scores"] == [4.0, 3.0, 2.0]
    # margins pos − neg_i become scores 0 and −margin: the same differences within the group
    assert margin[0]["positive_scores"] == [0.0]
    assert margin[0]["negative_scores"] == [-1.0, -2.0, -3.0]


def test_malformed_rows_are_reported_with_their_row_number(task, tmp_path, caplog):
    rows = tevatron_rows(task["groups"][:6])
    rows[2]["positive_passages"] = []  # row 3
    rows[4]["negative_passages"][1] = {"docid": "x", "title": "t", "text": None}  # row 5
    path = write_parquet(tmp_path / "bad.parquet", rows)
    with pytest.raises(ValueError, match=rf"{path}: row 3: 'positive_passages' is empty"):
        read_groups(path, cache_dir=tmp_path / "cache")
    with caplog.at_level(logging.WARNING, logger="csplade.data"):
        table, stats = read_groups(path, skip_bad_rows=True, cache_dir=tmp_path / "cache")
    assert len(table) == 4 and stats["skipped_lines"] == [3, 5] and table[2]["row"] == 4
    assert any(m.startswith(f"{path}: row 3: skipped bad row") for m in caplog.messages)
    assert any("row 5: skipped bad row (negative_passages[1] needs a string 'text'" in m
               for m in caplog.messages)  # fmt: skip

    st = st_rows(task["groups"][:3], "kl")
    st[1]["label"] = [1.0, 2.0]  # row 2: 2 values for 1 positive and 3 negatives
    path = write_parquet(tmp_path / "bad-st.parquet", st)
    with pytest.raises(ValueError, match=r"bad-st.parquet: row 2: 'label' has 2 values"):
        read_groups(path, cache_dir=tmp_path / "cache")


def test_unknown_columns_list_the_columns_and_the_layouts(tmp_path):
    path = write_parquet(tmp_path / "ids.parquet", [{"query_id": "1", "positive_id": "7"}])
    with pytest.raises(ValueError) as err:
        read_groups(path)
    message = str(err.value)
    assert "columns ['positive_id', 'query_id'] match no training-group layout" in message
    for layout in ("csplade groups:", "Tevatron:", "sentence-transformers:"):
        assert layout in message
    pairs_with_label = write_parquet(
        tmp_path / "sts.parquet", [{"anchor": "a", "positive": "b", "score": 0.3}]
    )
    with pytest.raises(ValueError, match="similarity or classification data"):
        read_groups(pairs_with_label)


def test_hub_id_offline_fails_fast_and_says_what_to_do(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as err:
        load_training_groups(DataArguments(train_data="someone/msmarco-triplets"), seed=0)
    assert time.perf_counter() - start < 30
    assert "HF_HUB_OFFLINE" in str(err.value) and "save_to_disk" in str(err.value)
    with pytest.raises(FileNotFoundError, match="train_data not found: data/groups.jsonl"):
        load_training_groups(DataArguments(train_data="data/groups.jsonl"), seed=0)


# ------------------------------------------------------------------------------- training
def _train_args(task, data: Path | str, out: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(task["base"]),
        "--train_data", str(data),
        "--output_dir", str(out),
        "--per_device_train_batch_size", "4",
        "--group_size", "3",
        "--learning_rate", "3e-3",
        "--max_steps", "3",
        "--logging_steps", "1",
        "--save_steps", "1000",
        "--use_cpu", "true",
        "--seed", "3",
        *extra,
    ]  # fmt: skip


def _losses(out: Path) -> list[dict]:
    history = json.loads((out / "run_info.json").read_text())["log_history"]
    return [h for h in history if "contrastive" in h]


TRAIN_CASES = {
    "tevatron-parquet": (lambda g, p: write_parquet(p / "t.parquet", tevatron_rows(g)), ()),
    "st-kl-jsonl-gz": (
        lambda g, p: write_jsonl(p / "s.jsonl.gz", st_rows(g, "kl")),
        ("--distill_loss", "kl"),
    ),
    "st-margin-arrow": (
        lambda g, p: write_arrow(p / "s.arrow", st_rows(g, "margin")),
        ("--distill_loss", "margin_mse"),
    ),
    "csplade-jsonl-gz": (lambda g, p: write_jsonl(p / "g.jsonl.gz", csplade_rows(g)), ()),
    "save-to-disk": (
        lambda g, p: (
            datasets.Dataset.from_list(tevatron_rows(g)).save_to_disk(str(p / "d")) or p / "d"
        ),
        (),
    ),
    "tevatron-parquet-streaming": (
        lambda g, p: write_parquet(p / "t.parquet", tevatron_rows(g)),
        ("--streaming", "true", "--shuffle_buffer", "8"),
    ),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_training_runs_on_each_format(task, tmp_path, case):
    write, extra = TRAIN_CASES[case]
    data = write(task["groups"], tmp_path)
    out = run_training(*parse_recipe(None, _train_args(task, data, tmp_path / "out", *extra)))
    logged = _losses(out)
    assert [h["step"] for h in logged] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in logged)
    if "--distill_loss" in extra:
        assert all("distill" in h for h in logged)


# ------------------------------------------------------------------------------- streaming
def test_stream_is_a_function_of_seed_and_position(task, tmp_path):
    path = write_parquet(tmp_path / "t.parquet", tevatron_rows(task["groups"][:5]))
    args = DataArguments(train_data=str(path), group_size=3, streaming=True, shuffle_buffer=3)
    stream = load_training_groups(args, seed=4)
    assert isinstance(stream, StreamingGroupDataset)

    def take(dataset, n):
        it = iter(dataset)
        return [next(it) for _ in range(n)]

    first, again = take(stream, 15), take(load_training_groups(args, seed=4), 15)
    assert first == again  # the same items in the same order, pass after pass
    passes = [sorted(item["query"] for item in first[i : i + 5]) for i in range(0, 15, 5)]
    assert passes[0] == passes[1] == passes[2]  # each pass holds every group once
    assert [i["query"] for i in first[:5]] != [i["query"] for i in first[5:10]]  # reshuffled
    assert take(load_training_groups(args, seed=5), 15) != first
    # one pass in source order gives the documents (IDF, head-bias calibration)
    docs = list(document_texts(stream))
    assert len(docs) == len(set(docs)) and docs[0] == task["groups"][0][2]


class _StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def _streaming_trainer(task, data: Path, out: Path, callbacks=()):
    model_args, loss_args, data_args, training_args = parse_recipe(
        None,
        _train_args(task, data, out, "--max_steps", "6", "--save_steps", "3", "--streaming",
                    "true", "--shuffle_buffer", "4", "--per_device_train_batch_size", "4"),
    )  # fmt: skip
    encoder = load_encoder_for_training(model_args)
    dataset = load_training_groups(data_args, seed=training_args.seed)
    return SparseTrainer(
        model=encoder,
        args=training_args,
        loss_args=loss_args,
        train_dataset=dataset,
        data_collator=GroupCollator(encoder.tokenize),
        callbacks=list(callbacks),
    )


def test_streamed_run_interrupted_and_resumed_equals_uninterrupted(task, tmp_path):
    # 10 groups, 4 per step, 6 steps: 2.4 passes over the stream, resumed in the middle of pass 1
    data = write_parquet(tmp_path / "t.parquet", tevatron_rows(task["groups"][:10]))
    reference = _streaming_trainer(task, data, tmp_path / "reference")
    reference.train()
    interrupted = _streaming_trainer(task, data, tmp_path / "run", [_StopAt(3)])
    interrupted.train()
    assert interrupted.state.global_step == 3
    resumed = _streaming_trainer(task, data, tmp_path / "run")
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    assert resumed.state.global_step == 6
    want = reference.encoder().backbone.state_dict()
    got = resumed.encoder().backbone.state_dict()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6, msg=name)
    losses = [h["loss"] for h in reference.state.log_history if "loss" in h]
    resumed_losses = [h["loss"] for h in resumed.state.log_history if "loss" in h]
    assert resumed_losses[-3:] == losses[-3:]


# ------------------------------------------------------------------------------- texts (adapt_data)
def test_adaptation_texts_from_every_format(task, tmp_path):
    docs = [{"_id": str(i), "title": "T" if i % 2 else "", "text": doc}
            for i, (_, _, doc, _, _) in enumerate(task["groups"])]  # fmt: skip
    want = [read_texts_doc(d) for d in docs]
    cache = tmp_path / "cache"
    sources = [
        write_parquet(tmp_path / "corpus.parquet", docs),
        gzip_file(write_arrow(tmp_path / "corpus.arrow", docs)),
        write_jsonl(tmp_path / "corpus.jsonl.gz", docs),
    ]
    datasets.Dataset.from_list(docs).save_to_disk(str(tmp_path / "saved"))
    for source in [*sources, tmp_path / "saved"]:
        assert read_texts(source, cache_dir=cache)["text"] == want, source
    assert read_texts(sources[0], max_texts=5, cache_dir=cache)["text"] == want[:5]
    with gzip.open(tmp_path / "notes.txt.gz", "wt") as handle:
        handle.write("one\n\ntwo\n")
    assert read_texts(tmp_path / "notes.txt.gz", cache_dir=cache)["text"] == ["one", "two"]
    bad = write_parquet(tmp_path / "bad.parquet", [{"text": "a"}, {"text": None}])
    with pytest.raises(ValueError, match=r"bad.parquet: row 2: record needs a string 'text'"):
        read_texts(bad, cache_dir=cache)
    other = write_parquet(tmp_path / "other.parquet", [{"content": "a"}])
    with pytest.raises(ValueError, match=r"no 'text' column \(columns: \['content'\]\)"):
        read_texts(other, cache_dir=cache)
    assert [count_rows(resolve(s)) for s in sources] == [N_GROUPS] * 3


def read_texts_doc(doc: dict) -> str:
    return f"{doc['title']} {doc['text']}".strip()


def test_adaptation_trains_on_a_parquet_corpus(task, tmp_path):
    corpus = write_parquet(
        tmp_path / "corpus.parquet", [{"text": doc} for _, _, doc, _, _ in task["groups"]]
    )
    model_args, adapt_args, training_args = parse_recipe(
        None,
        ["--model_name_or_path", str(task["base"]), "--adapt_data", str(corpus),
         "--output_dir", str(tmp_path / "adapted"), "--max_steps", "2", "--use_cpu", "true",
         "--per_device_train_batch_size", "4", "--save_steps", "1000", "--logging_steps", "1"],
        types=ADAPT_TYPES,
    )  # fmt: skip
    out = run_adaptation(model_args, adapt_args, training_args)
    adaptation = json.loads((out / "csplade_config.json").read_text())["extra"]["adaptation"]
    assert adaptation["steps"] == 2 and adaptation["data"].endswith("corpus.parquet")
    card = (out / "README.md").read_text()
    assert "**Adaptation** (clm + ReLU activation loss): 2 steps" in card
    assert f"\n# {out.name}\n" in card  # named after its folder, not the temporary one
