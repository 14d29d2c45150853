"""Which encoder built an index, and the check that queries are encoded by that same encoder.

An index's manifest records, under ``settings.describe`` (:func:`encoding_record`): ``encoder``, the
encoder's ``describe()`` (its settings and a fingerprint of its weights); ``model``, what to reload it
from; ``dtype``; the pruning options (``top_k``, ``threshold``); a fingerprint of the document texts;
and ``lexical_stats: collection`` when a lexical residual's IDF and document lengths were estimated on
the indexed corpus itself, saved beside the shards (``lexical_weights.safetensors``).

Queries encoded by another model than the documents (or a model retrained in place: another
fingerprint) give a meaningless run, so :func:`check_encoder` makes that an error, never a warning;
:func:`encoder_for_index` loads the recorded model (or the one given), applies the index's lexical
statistics, and checks it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from csplade.index.shards import read_manifest
from csplade.index.storage import fingerprint_ids, settings_diff
from csplade.model import lexical
from csplade.model.config import LEXICAL_STATS
from csplade.model.encoder import SparseEncoder

logger = logging.getLogger(__name__)


def _model_ref(model: str) -> str:
    """What the manifest records to reload the model: an absolute folder, or the name as given."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def encoding_record(
    encoder: SparseEncoder,
    model: str,
    texts: list[str],
    top_k: int | None = None,
    threshold: float | None = None,
    lexical_stats: str = "model",
) -> dict[str, Any]:
    """What an index records about how its documents were encoded (module docstring)."""
    record = {
        "encoder": encoder.describe(),
        "model": _model_ref(model),
        "dtype": str(next(encoder.parameters()).dtype).removeprefix("torch."),
        "top_k": top_k,
        "threshold": threshold,
        "texts_sha256": fingerprint_ids(texts),
    }
    if lexical_stats == "collection":  # absent otherwise: earlier indexes resume as they were
        record["lexical_stats"] = lexical_stats
    return record


def fit_to_collection(encoder: SparseEncoder, texts: list[str], lexical_stats: str) -> str:
    """With ``lexical_stats="collection"``, estimate a lexical residual's statistics on the corpus
    about to be indexed (as BM25 does); returns what the index records ("model" for an encoder
    without a residual, whose vectors do not change)."""
    if lexical_stats not in LEXICAL_STATS:
        raise ValueError(f"lexical_stats must be one of {LEXICAL_STATS}, got {lexical_stats!r}")
    if lexical_stats == "model" or not encoder.config.lexical_residual:
        return "model"
    encoder.fit_lexical(texts)
    return "collection"


def save_collection_statistics(encoder: SparseEncoder, index_dir: str | os.PathLike) -> None:
    """Write the statistics :func:`fit_to_collection` estimated beside the index's shards."""
    Path(index_dir).mkdir(parents=True, exist_ok=True)
    lexical.save(encoder.lexical, index_dir)


def recorded_encoding(index_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest's record of how the documents were encoded (:func:`encoding_record`)."""
    return read_manifest(index_dir)["settings"]["describe"]


def check_encoder(index_dir: str | os.PathLike, encoder: SparseEncoder, model: str) -> None:
    """ValueError listing every difference between `encoder` and the one that built `index_dir`.

    An index whose manifest records no encoder cannot be checked: a warning says so.
    """
    recorded = recorded_encoding(index_dir).get("encoder")
    if recorded is None:
        logger.warning(
            "%s: the manifest records no encoder description; cannot check that %s encoded it",
            index_dir,
            model,
        )
        return
    now = json.loads(json.dumps(encoder.describe(), sort_keys=True, default=str))
    before = json.loads(json.dumps(recorded, sort_keys=True, default=str))
    diffs = settings_diff(before, now, ("index", "model"))
    if diffs:
        raise ValueError(
            f"model {model!r} is not the encoder that built {index_dir}:\n  "
            + "\n  ".join(diffs)
            + "\nQueries must be encoded by the same model and settings as the documents."
        )


def encoder_for_index(
    index_dir: str | os.PathLike,
    model: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> SparseEncoder:
    """The encoder that built `index_dir`: `model`, or the one the manifest records, loaded in the
    dtype the documents were encoded in (unless `dtype`), with the index's lexical statistics, and
    checked (:func:`check_encoder`)."""
    record = recorded_encoding(index_dir)  # a dict (encode_corpus checks)
    dtype = dtype or record.get("dtype")
    if model is None:
        model = record.get("model")
        if model is None:
            raise ValueError(
                f"{index_dir}: the manifest records no model to reload; pass --model (the encoder "
                "that encoded this index)"
            )
        try:
            encoder = SparseEncoder.from_pretrained(model, device=device, dtype=dtype)
        except OSError as exc:  # FileNotFoundError included: moved or deleted
            raise ValueError(
                f"{index_dir} was encoded with model {model!r}, which cannot be loaded here "
                f"({exc}); pass --model with that encoder"
            ) from None
    else:
        encoder = SparseEncoder.from_pretrained(model, device=device, dtype=dtype)
    if record.get("lexical_stats") == "collection" and encoder.config.lexical_residual:
        weights = lexical.load(index_dir)
        if weights is None:
            raise ValueError(
                f"{index_dir}: encoded with the collection's lexical statistics, but its "
                f"{lexical.LEXICAL_NAME} is missing"
            )
        encoder.use_lexical(weights)
    check_encoder(index_dir, encoder, model)
    return encoder
