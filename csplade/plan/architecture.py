"""The numbers of a backbone that memory and FLOPs depend on, and where the planner finds them.

`resolve_architecture` looks, in order, at ``--architecture``; a local folder's ``config.json`` (a
csplade adapter folder leads to its ``base_model``); a packaged model already prepared in the cache;
:data:`KNOWN_ARCHITECTURES`, a table copied from each model's published ``config.json`` on the hub;
a ``config.json`` already in the local Hugging Face cache; and last a table entry whose short name
appears in the path, reported as a guess. Nothing is downloaded or built (docs/plan.md,
"Architecture").

Known limits: two block families, "llama" (RMSNorm, gated MLP; Mistral and Qwen2 too) and "bert"
(LayerNorm, GELU MLP); any other decoder type is planned as a Llama-style block, without the extra
norms of Gemma or Qwen3.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from csplade.model.backbones import PACKAGED_MODELS, cache_dir
from csplade.model.config import CONFIG_NAME

logger = logging.getLogger(__name__)

_BERT_FAMILY = ("bert", "distilbert", "roberta", "xlm-roberta", "electra", "camembert")


@dataclass(frozen=True)
class Architecture:
    """The numbers of a backbone that memory and FLOPs depend on."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    head_dim: int | None = None
    # llama: RMSNorm, gated MLP, no biases | bert: LayerNorm, GELU MLP, biases
    family: str = "llama"
    attention_bias: str = ""  # "" | "qkv" (Qwen2) | "qkvo" (Llama's attention_bias)
    mlp_bias: bool = False
    max_positions: int = 512  # BERT's learned position embeddings
    special_tokens: int | None = None  # added around a text by the tokenizer (None: by family)
    name: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        for key in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"architecture {self.name!r}: {key} must be a positive int, got {value!r}"
                )
        if self.family not in ("llama", "bert"):
            raise ValueError(f"architecture {self.name!r}: unknown family {self.family!r}")
        if self.attention_bias not in ("", "qkv", "qkvo"):
            raise ValueError(
                f"architecture {self.name!r}: attention_bias must be '', 'qkv' or 'qkvo', "
                f"got {self.attention_bias!r}"
            )
        if self.heads % self.kv_heads:
            raise ValueError(
                f"architecture {self.name!r}: {self.heads} heads is not a multiple of "
                f"{self.kv_heads} key/value heads"
            )

    @property
    def specials(self) -> int:
        """Special tokens around one text: probed from a local tokenizer, else BOS / [CLS] [SEP]."""
        if self.special_tokens is not None:
            return self.special_tokens
        return 2 if self.family == "bert" else 1

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        return self.heads * self.dim_per_head

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.dim_per_head

    def linears(self) -> dict[str, list[tuple[int, int]]]:
        """Linear layers of one decoder block by module name: [(in_features, out_features), …]."""
        h, i = self.hidden, self.intermediate
        if self.family == "bert":
            return {
                "query": [(h, h)],
                "key": [(h, h)],
                "value": [(h, h)],
                # attention.output.dense, intermediate.dense, output.dense
                "dense": [(h, h), (h, i), (i, h)],
            }
        return {
            "q_proj": [(h, self.q_dim)],
            "k_proj": [(h, self.kv_dim)],
            "v_proj": [(h, self.kv_dim)],
            "o_proj": [(self.q_dim, h)],
            "gate_proj": [(h, i)],
            "up_proj": [(h, i)],
            "down_proj": [(i, h)],
        }

    def layer_matmul_params(self) -> int:
        return sum(a * b for dims in self.linears().values() for a, b in dims)

    def layer_other_params(self) -> int:
        """Norms and biases of one block."""
        h, i = self.hidden, self.intermediate
        if self.family == "bert":
            return 9 * h + i  # biases of q, k, v, o, intermediate, output; two LayerNorms
        bias = {
            "": 0,
            "qkv": self.q_dim + 2 * self.kv_dim,
            "qkvo": self.q_dim + 2 * self.kv_dim + h,
        }
        mlp = 2 * i + h if self.mlp_bias else 0
        return 2 * h + bias[self.attention_bias] + mlp

    def layer_params(self) -> int:
        return self.layer_matmul_params() + self.layer_other_params()

    def embedding_params(self) -> int:
        extra = (
            (self.max_positions + 2) * self.hidden + 2 * self.hidden if self.family == "bert" else 0
        )
        return self.vocab * self.hidden + extra

    def head_params(self) -> int:
        """Parameters of the LM head not shared with the embeddings (incl. BERT's MLM transform)."""
        head = 0 if self.tied else self.vocab * self.hidden
        if self.family == "bert":
            head += self.hidden * self.hidden + 3 * self.hidden + self.vocab  # transform, LN, bias
        return head

    def total_params(self) -> int:
        final_norm = self.hidden if self.family == "llama" else 0
        return (
            self.embedding_params()
            + self.layers * self.layer_params()
            + final_norm
            + self.head_params()
        )


# From each model's published config.json on the Hugging Face hub: name, hidden_size,
# num_hidden_layers, num_attention_heads, num_key_value_heads, intermediate_size, vocab_size,
# tie_word_embeddings, then what differs from a plain Llama block.
_BERT = {"family": "bert"}
_TABLE: tuple[tuple[Any, ...], ...] = (
    ("meta-llama/Llama-3.1-8B", 4096, 32, 32, 8, 14336, 128256, False, {}),
    ("meta-llama/Llama-3.1-8B-Instruct", 4096, 32, 32, 8, 14336, 128256, False, {}),
    ("meta-llama/Meta-Llama-3-8B", 4096, 32, 32, 8, 14336, 128256, False, {}),
    ("meta-llama/Llama-3.2-1B", 2048, 16, 32, 8, 8192, 128256, True, {}),
    ("meta-llama/Llama-3.2-3B", 3072, 28, 24, 8, 8192, 128256, True, {}),
    ("mistralai/Mistral-7B-v0.1", 4096, 32, 32, 8, 14336, 32000, False, {}),
    ("mistralai/Mistral-7B-v0.3", 4096, 32, 32, 8, 14336, 32768, False, {}),
    ("Qwen/Qwen2.5-7B", 3584, 28, 28, 4, 18944, 152064, False, {"attention_bias": "qkv"}),
    ("HuggingFaceTB/SmolLM2-135M", 576, 30, 9, 3, 1536, 49152, True, {"special_tokens": 0}),
    ("HuggingFaceTB/SmolLM2-360M", 960, 32, 15, 5, 2560, 49152, True, {"special_tokens": 0}),
    ("bert-base-uncased", 768, 12, 12, 12, 3072, 30522, True, _BERT),
    ("naver/splade-cocondenser-ensembledistil", 768, 12, 12, 12, 3072, 30522, True, _BERT),
)
KNOWN_ARCHITECTURES: dict[str, Architecture] = {
    row[0].lower(): Architecture(*row[1:8], name=row[0], **row[8]) for row in _TABLE
}
# Packaged csplade names (csplade.model.backbones) and short names found in run folders -> table
# entries.
_ALIASES = {
    "smollm2-135m": "huggingfacetb/smollm2-135m",
    "smollm2-360m": "huggingfacetb/smollm2-360m",
    "llama-3.1-8b": "meta-llama/llama-3.1-8b",
    "llama-3-8b": "meta-llama/meta-llama-3-8b",
    "llama-3.2-1b": "meta-llama/llama-3.2-1b",
    "llama-3.2-3b": "meta-llama/llama-3.2-3b",
    "mistral-7b-v0.1": "mistralai/mistral-7b-v0.1",
    "mistral-7b": "mistralai/mistral-7b-v0.3",
    "qwen2.5-7b": "qwen/qwen2.5-7b",
    "splade-cocondenser": "naver/splade-cocondenser-ensembledistil",
    "bert-base": "bert-base-uncased",
}


def architecture_from_config(
    config: dict[str, Any], name: str = "", source: str = ""
) -> Architecture:
    """An :class:`Architecture` from a Hugging Face ``config.json`` dict (text config if nested)."""
    cfg = config.get("text_config") or config
    model_type = str(cfg.get("model_type") or config.get("model_type") or "")
    family = "bert" if model_type in _BERT_FAMILY else "llama"
    where = source or name or "config"
    try:
        hidden = int(cfg.get("hidden_size") or cfg["dim"])
        heads = int(cfg.get("num_attention_heads") or cfg["n_heads"])
        layers = int(cfg.get("num_hidden_layers") or cfg["n_layers"])
        vocab = int(cfg["vocab_size"])
        inter = int(cfg.get("intermediate_size") or cfg.get("hidden_dim") or 4 * hidden)
    except KeyError as exc:
        raise ValueError(
            f"{where}: config has no {exc.args[0]!r}; cannot plan this backbone"
        ) from None
    kv = int(cfg.get("num_key_value_heads") or heads)
    tied = cfg.get("tie_word_embeddings", config.get("tie_word_embeddings"))
    if tied is None:
        tied = family == "bert"
    if family == "llama" and model_type not in ("llama", "mistral", "qwen2", ""):
        logger.info("%s: model type %r planned as a Llama-style block", where, model_type)
    return Architecture(
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv,
        intermediate=inter,
        vocab=vocab,
        tied=bool(tied),
        head_dim=int(cfg["head_dim"]) if cfg.get("head_dim") else None,
        family=family,
        attention_bias="qkv"
        if model_type == "qwen2"
        else ("qkvo" if cfg.get("attention_bias") else ""),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        max_positions=int(cfg.get("max_position_embeddings") or 512),
        name=name,
        source=source,
    )


def _probe_specials(folder: Path) -> int | None:
    """How many special tokens the folder's tokenizer adds around a text (None without one)."""
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        full = tokenizer("a b", add_special_tokens=True)["input_ids"]
        plain = tokenizer("a b", add_special_tokens=False)["input_ids"]
    except Exception as exc:  # noqa: BLE001 - an unreadable tokenizer only loses this refinement
        logger.debug("%s: tokenizer not probed (%s)", folder, exc)
        return None
    return max(len(full) - len(plain), 0)


def _read_config_json(path: Path, name: str) -> Architecture:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    arch = architecture_from_config(data, name=name, source=str(path))
    return dataclasses.replace(arch, special_tokens=_probe_specials(path.parent))


def _from_folder(folder: Path, name: str, seen: set[Path]) -> Architecture | None:
    """config.json of a local model folder, following a csplade adapter folder to its base model."""
    if folder.resolve() in seen:
        raise ValueError(f"{folder}: adapter base_model chain loops back to itself")
    seen.add(folder.resolve())
    encoder_config = folder / CONFIG_NAME
    if encoder_config.is_file():
        try:
            settings = json.loads(encoder_config.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{encoder_config}: invalid JSON ({exc})") from exc
        if settings.get("adapter") and settings.get("base_model"):
            return _resolve(str(settings["base_model"]), seen)
    if (folder / "config.json").is_file():
        return _read_config_json(folder / "config.json", name)
    return None


def _resolve(name_or_path: str, seen: set[Path]) -> Architecture | None:
    """A local folder, a prepared packaged model, the built-in table, then the local hub cache; None
    when none of them knows `name_or_path`."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        found = _from_folder(path, name_or_path, seen)
        if found is not None:
            return found
    if name_or_path in PACKAGED_MODELS:
        prepared = cache_dir() / "backbones" / name_or_path / "config.json"
        if prepared.is_file():
            return _read_config_json(prepared, name_or_path)
    key = name_or_path.lower()
    key = _ALIASES.get(key, key)
    if key in KNOWN_ARCHITECTURES:
        arch = KNOWN_ARCHITECTURES[key]
        return dataclasses.replace(
            arch, source="built-in table (the model's published config.json)"
        )
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name_or_path):
        try:  # the local hub cache only: never a download
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name_or_path, "config.json")
        except Exception:  # noqa: BLE001 - an unusable cache is the same as no cache here
            cached = None
        if isinstance(cached, str) and Path(cached).is_file():
            return _read_config_json(Path(cached), name_or_path)
    return None


def resolve_architecture(model_name_or_path: str, override: str | None = None) -> Architecture:
    """The architecture of a recipe's backbone, from local files or the built-in table (module
    docstring); an unknown name is an error that lists the table and asks for ``--architecture``."""
    if override:
        arch = _resolve(override, set())
        if arch is None:
            raise ValueError(
                f"--architecture {override!r}: not a local folder with config.json nor a known "
                f"architecture ({', '.join(a.name for a in KNOWN_ARCHITECTURES.values())})"
            )
        return arch
    arch = _resolve(str(model_name_or_path), set())
    if arch is not None:
        return arch
    lowered = str(model_name_or_path).lower()
    hits = [alias for alias in _ALIASES if alias in lowered]
    hits += [k for k in KNOWN_ARCHITECTURES if k.split("/")[-1] in lowered]
    if hits:
        best = max(hits, key=len)
        arch = KNOWN_ARCHITECTURES[_ALIASES.get(best, best)]
        return dataclasses.replace(
            arch,
            source=f"built-in table, guessed from the name {model_name_or_path!r} "
            "(pass --architecture to choose)",
        )
    raise ValueError(
        f"cannot tell the architecture of model_name_or_path {model_name_or_path!r}: not a local folder "
        "with config.json, not a prepared packaged model, not in the local hub cache, and not in the "
        f"built-in table ({', '.join(a.name for a in KNOWN_ARCHITECTURES.values())}); pass "
        "--architecture NAME_OR_FOLDER"
    )
