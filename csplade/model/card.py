"""The model card (``README.md``) of a saved encoder folder: hub metadata, what it is, how it was
trained, how to load it, and its evaluation results.

The card is a function of the folder's files, so it can be written again whenever they change:
``csplade_config.json`` (settings; ``extra`` holds the adaptation phase's provenance), the backbone's
``config.json``, ``run_info.json`` (written by the trainers next to the final model: recipe keys, steps,
wall time, losses), ``csplade_eval.json`` (metrics that ``csplade eval`` recorded, :func:`record_eval`)
and ``modules.json`` (the sentence-transformers files of :mod:`csplade.model.st_files`).

YAML metadata follows the Hugging Face hub's model-card fields: ``library_name: csplade``, ``base_model``
(a hub id: a packaged backbone's origin, or the base's own id), ``license`` (known for the packaged
backbones, else read from the base folder's card), ``tags``, ``datasets`` (a hub training set).
Local paths are shown by their last component only, so a card does not publish a file system layout.

Known limit: the base of a hub-id backbone has no license here (its card is not downloaded).
"""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from csplade._io import write_json_atomic, write_text_atomic
from csplade.model.backbones import cache_dir
from csplade.model.config import CONFIG_NAME, HEAD_BIAS_NAME, QUERY_WEIGHTS_NAME
from csplade.model.st_files import MODULES_NAME, unsupported_settings

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
EVAL_NAME = "csplade_eval.json"
RUN_INFO_NAME = "run_info.json"  # written by csplade.training.base (a higher layer)
TAGS = ["sparse", "splade", "learned-sparse-retrieval", "csplade"]

# Packaged backbones (csplade.model.backbones): the hub model each comes from, and its license.
PACKAGED_ORIGINS = {
    "smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
    "gemma3-270m": ("google/gemma-3-270m", "gemma"),
    "minilm-dense": ("sentence-transformers/all-MiniLM-L6-v2", "apache-2.0"),
    "splade-tiny": (None, None),
}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
VARIANT_TEXT = {
    "uni": "causal attention, as the LM was trained",
    "echo": "the text is fed twice and the second copy is pooled, so every pooled token has seen "
    "the whole text",
    "bi": "the causal mask is replaced by a bidirectional one",
}
METRIC_LABELS = {"ndcg_cut_10": "nDCG@10", "recall_100": "R@100", "recip_rank_10": "MRR@10"}


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        logger.warning("%s: unreadable (%s); the model card leaves it out", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def shown(name: Any) -> str:
    """A model or data reference as a card shows it: a hub id or name as is, a path by its end."""
    text = str(name)
    if not text or _HUB_ID.fullmatch(text) or "/" not in text and not Path(text).exists():
        return text
    return Path(text.rstrip("/")).name + " (local)"


def base_origin(base_model: str) -> tuple[str | None, str | None]:
    """(hub id, license) of a base model, where known; never touches the network."""
    if base_model in PACKAGED_ORIGINS:
        return PACKAGED_ORIGINS[base_model]
    folder = Path(base_model).expanduser()
    if folder.is_dir():
        meta = front_matter(folder / CARD_NAME)
        base = meta.get("base_model")
        return (base if isinstance(base, str) else None), meta.get("license")
    if _HUB_ID.fullmatch(base_model):
        return base_model, None
    return None, None


def front_matter(path: Path) -> dict[str, Any]:
    """The YAML metadata block at the top of a model card ({} when there is none)."""
    if not path.is_file():
        return {}
    text = path.read_text(encoding="utf-8", errors="replace")
    match = re.match(r"---\n(.*?)\n---\n", text, re.DOTALL)
    if not match:
        return {}
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _backbone_config(folder: Path, base_model: str) -> dict[str, Any]:
    """The transformers config.json of the folder, or of its base for an adapter folder."""
    candidates = [folder / "config.json"]
    if base_model:  # an adapter: its base, as a folder or a prepared packaged backbone
        candidates += [
            Path(base_model).expanduser() / "config.json",
            cache_dir() / "backbones" / base_model / "config.json",
        ]
    for candidate in candidates:
        data = _read_json(candidate)
        if data:
            return data
    return {}


# ------------------------------------------------------------------------------------ metadata
def _metadata(folder: Path, config: dict, run_info: dict) -> dict[str, Any]:
    base_id, license_ = base_origin(str(config.get("base_model", "")))
    meta: dict[str, Any] = {"library_name": "csplade"}
    if license_:
        meta["license"] = license_
    if base_id:
        meta["base_model"] = base_id
    tags = list(TAGS)
    if (folder / MODULES_NAME).is_file():
        tags += ["sentence-transformers", "sparse-encoder"]
    tags += [f"variant-{config.get('variant', 'uni')}", f"pooling-{config.get('pooling', 'max')}"]
    meta["tags"] = tags
    meta["pipeline_tag"] = "feature-extraction"
    train_data = str((run_info.get("data_args") or {}).get("train_data") or "")
    if _HUB_ID.fullmatch(train_data) and not Path(train_data).exists():
        meta["datasets"] = [train_data]
    return meta


# ------------------------------------------------------------------------------------ body
def _model_rows(folder: Path, config: dict, backbone: dict) -> list[tuple[str, str]]:
    kind = config.get("backbone_kind") or "?"
    arch = (backbone.get("architectures") or [backbone.get("model_type", "?")])[0]
    variant = config.get("variant", "uni")
    attention = (
        VARIANT_TEXT.get(variant, variant) if kind == "causal" else "a masked LM (bidirectional)"
    )
    base = str(config.get("base_model", "?"))
    origin, _ = PACKAGED_ORIGINS.get(base, (None, None))
    rows = [
        ("base model", f"`{shown(base)}`" + (f" (packaged; from {origin})" if origin else "")),
        ("backbone", f"{'causal LM' if kind == 'causal' else 'masked LM'} ({arch})"),
        ("vocabulary (vector size)", f"{backbone.get('vocab_size', '?'):,}"
         if isinstance(backbone.get("vocab_size"), int) else "?"),
        ("variant", f"`{variant}`: {attention}"),
        ("pooling", f"`{config.get('pooling', 'max')}` over the tokens of log(1 + ReLU(logits))"),
        ("max length (tokens)", f"query {config.get('query_max_length')}, "
         f"document {config.get('doc_max_length')}"),
    ]  # fmt: skip
    for key, label in (("query_prefix", "query prefix"), ("doc_prefix", "document prefix")):
        if config.get(key):
            rows.append((label, f"`{config[key]!r}`"))
    if config.get("doc_only"):
        weights = "IDF of the training corpus" if (folder / QUERY_WEIGHTS_NAME).is_file() else "1"
        rows.append(("inference-free", f"queries run no network: token ids weighted by {weights}"))
    if (folder / HEAD_BIAS_NAME).is_file():
        rows.append(("head bias", "a calibrated per-term bias on the logits"))
    if config.get("logit_scale", 1.0) != 1.0:
        rows.append(("logit scale", str(config["logit_scale"])))
    if config.get("lexical_residual"):
        scale = config.get("lexical_scale", 1.0)
        tokens = {
            "words": "the text's words (lower-cased, no stopwords) as the model tokenizes them",
            "stems": "the text's word stems (lower-cased, no stopwords) as the model tokenizes them",
        }.get(config.get("lexical_analyzer", "tokens"), "the text's own tokens")
        rows.append(("lexical residual", f"BM25 over {tokens}, scale {scale} per side "
                     "(IDF and lengths of the training documents)"))  # fmt: skip
        if config.get("lexical_docs"):
            rows.append(("lexical documents", "a document's vector is its residual alone (no "
                         "forward pass); the queries carry the learned terms"))  # fmt: skip
    if config.get("adapter"):
        rows.append(("weights", "a LoRA adapter: loading it also loads the base model"))
    quant = (config.get("extra") or {}).get("quantization")
    if quant:
        rows.append(("quantization", f"`{json.dumps(quant)}`"))
    return rows


def _adaptation_lines(adaptation: dict) -> list[str]:
    if not adaptation:
        return []
    seconds = adaptation.get("seconds")
    return [
        f"- **Adaptation** ({adaptation.get('objective', '?')} + ReLU activation loss): "
        f"{adaptation.get('steps', '?')} steps on `{shown(adaptation.get('data', '?'))}`"
        + (f", {seconds / 60:.1f} min" if isinstance(seconds, (int, float)) else "")
        + (", LoRA merged" if adaptation.get("merged") else "")
    ]


def _training_lines(run_info: dict) -> list[str]:
    if not run_info:
        return []
    data = run_info.get("data_args") or {}
    loss = run_info.get("loss_args") or {}
    source = f"`{shown(data.get('train_data', '?'))}`"
    for key in ("train_config", "train_split"):
        if data.get(key) and not (key == "train_split" and data[key] == "train"):
            source += f" ({key.removeprefix('train_')} {data[key]})"
    seconds = run_info.get("train_seconds")
    world = run_info.get("world_size", 1)
    parts = [
        f"{run_info.get('global_step', '?')} steps",
        f"{world} process{'' if world == 1 else 'es'}",
    ]
    if isinstance(seconds, (int, float)):
        parts.append(f"{seconds / 60:.1f} min wall time")
    if isinstance(run_info.get("train_loss"), (int, float)):
        parts.append(f"final mean loss {run_info['train_loss']:.4g}")
    losses = ["InfoNCE" if loss.get("contrastive_weight", 1) else None]
    if loss.get("distill_loss", "none") != "none":
        losses.append(f"{loss['distill_loss']} distillation")
    regs = [loss.get("query_regularizer"), loss.get("doc_regularizer")]
    losses.append(f"regularizers {'/'.join(r or '?' for r in regs)} (λ_q {loss.get('lambda_q')}, "
                  f"λ_d {loss.get('lambda_d')})")  # fmt: skip
    last = next((h for h in reversed(run_info.get("log_history", [])) if "q_nnz" in h), {})
    nnz = (
        f"; last logged non-zeros: query {last['q_nnz']:.0f}, document {last['d_nnz']:.0f}"
        if "d_nnz" in last
        else ""
    )
    return [
        f"- **Contrastive training** on {source}: {', '.join(parts)}; losses: "
        f"{', '.join(p for p in losses if p)}{nnz}"
    ]


def _recipe_block(run_info: dict) -> list[str]:
    keys = {}
    for part in ("model_args", "loss_args", "data_args"):
        for key, value in (run_info.get(part) or {}).items():
            keys[key] = shown(value) if isinstance(value, str) and "/" in value else value
    if not keys:
        return []
    text = yaml.safe_dump(keys, sort_keys=False, allow_unicode=True).rstrip()
    return ["", "<details><summary>Recipe keys</summary>", "", "```yaml", text, "```", "",
            "</details>"]  # fmt: skip


def _usage_lines(name: str, st_files: bool, st_missing: str | None) -> list[str]:
    lines = [
        "```python",
        "from csplade import SparseEncoder",
        "",
        f'encoder = SparseEncoder.from_pretrained("{name}")',
        'docs = encoder.encode_docs(["A document to index."])  # scipy CSR, shape (1, V)',
        'queries = encoder.encode_queries(["a query"])',
        "scores = queries @ docs.T  # dot product",
        "print(encoder.to_tokens(docs[0], top=10))  # the heaviest terms",
        "```",
    ]
    if not st_files and st_missing:
        lines += ["", f"sentence-transformers cannot load this model, for {st_missing}. Load it "
                  "with csplade, or export its vectors (`csplade encode`, `csplade export`)."]  # fmt: skip
    if st_files:
        lines += [
            "",
            "The folder also loads in sentence-transformers (same vectors; it truncates queries at "
            "the document length):",
            "",
            "```python",
            "from sentence_transformers import SparseEncoder",
            "",
            f'model = SparseEncoder("{name}")',
            'embeddings = model.encode_document(["A document to index."])',
            "```",
        ]
    return lines


def _eval_lines(evals: dict) -> list[str]:
    results = evals.get("results") or {}
    if not results:
        return []
    lines = ["## Evaluation", "", "Zero-shot results recorded by `csplade eval`:", ""]
    lines += ["| data set | split | nDCG@10 | R@100 | MRR@10 | query nnz | doc nnz | date |",
              "|---|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    notes = []
    for dataset, entry in sorted(results.items()):
        metrics, eff = entry.get("metrics", {}), entry.get("efficiency", {})
        cells = [_fmt(metrics.get(m)) for m in METRIC_LABELS]
        cells += [_fmt(eff.get("query_nnz"), ".0f"), _fmt(eff.get("doc_nnz"), ".0f")]
        mark = "*" if entry.get("slice") else ""
        lines.append(f"| {dataset}{mark} | {entry.get('split', '?')} | " + " | ".join(cells)
                     + f" | {entry.get('date', '')} |")  # fmt: skip
        if entry.get("slice"):
            notes.append(f"\\* {entry['slice']}: not comparable with full-collection figures.")
    return lines + ([""] + notes if notes else [])


def _fmt(value: Any, spec: str = ".3f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "–"


def card_text(folder: str | Path, name: str | None = None) -> str:
    """The model card of an encoder folder (metadata and body), from the files in it.

    `name` is how the card names the model (default: the folder's name).
    """
    folder = Path(folder)
    name = name or folder.resolve().name
    config = _read_json(folder / CONFIG_NAME)
    backbone = _backbone_config(folder, str(config.get("base_model", "")))
    run_info = _read_json(folder / RUN_INFO_NAME)
    run_info = run_info or (config.get("extra") or {}).get("training") or {}
    evals = _read_json(folder / EVAL_NAME)
    st_files = (folder / MODULES_NAME).is_file()
    meta = _metadata(folder, config, run_info)
    kind = "causal" if config.get("backbone_kind") == "causal" else "masked"
    training = _adaptation_lines((config.get("extra") or {}).get("adaptation") or {})
    training += _training_lines(run_info)
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "", f"# {name}", "",
        f"A learned sparse retrieval (SPLADE) encoder over a {kind} language model, "
        f"{'trained' if training else 'saved'} with csplade. A text becomes one vector over the "
        "vocabulary: the LM head's logits at every token go through log(1 + ReLU) and are "
        "pooled over the tokens, so most terms weigh 0 and the others are readable tokens; "
        "documents go into an inverted index and a query's score is a dot product.", "",
        "## Model", "", "| setting | value |", "|---|---|",
    ]  # fmt: skip
    lines += [f"| {k} | {v} |" for k, v in _model_rows(folder, config, backbone)]
    if not training:
        training = ["No csplade training is recorded in this folder: the weights are the base's."]
    lines += ["", "## Training", "", *training, *_recipe_block(run_info)]
    st_missing = unsupported_settings(config, (folder / HEAD_BIAS_NAME).is_file())
    lines += ["", "## Usage", "", *_usage_lines(name, st_files, st_missing), ""]
    evaluation = _eval_lines(evals)
    if evaluation:
        lines += [*evaluation, ""]
    return "\n".join(lines)


def write_card(folder: str | Path, name: str | None = None) -> Path:
    """Write (or rewrite) ``README.md`` in an encoder folder; returns its path."""
    path = Path(folder) / CARD_NAME
    write_text_atomic(path, card_text(folder, name))
    return path


def record_eval(
    folder: str | Path,
    dataset: str,
    metrics: dict[str, float],
    efficiency: dict[str, float] | None = None,
    split: str = "test",
    slice_note: str | None = None,
) -> Path:
    """Keep one data set's results in ``csplade_eval.json`` and rewrite the card with them."""
    folder = Path(folder)
    evals = _read_json(folder / EVAL_NAME)
    results = evals.setdefault("results", {})
    results[dataset] = {
        "split": split,
        "metrics": {k: float(v) for k, v in metrics.items()},
        "efficiency": {k: float(v) for k, v in (efficiency or {}).items()},
        "slice": slice_note,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }
    write_json_atomic(folder / EVAL_NAME, evals)
    return write_card(folder)
