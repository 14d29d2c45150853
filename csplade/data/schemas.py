"""The layouts of training groups csplade reads, recognised by their columns, and one row of each.

Every layout becomes the same group: ``query``, ``query_id``, ``positives`` and ``negatives`` (texts),
and teacher scores parallel to them (or None). Three layouts:

- **csplade** (``csplade teacher-scores`` / ``csplade mine`` write it)::

      {"query": str, "query_id": str?, "positives": [item, ...], "negatives": [item, ...]?,
       "scores": {"positives": [float, ...], "negatives": [float, ...]}?}

  An item is a string or an object ``{"_id"?, "title"?, "text"}``.
- **Tevatron** (its MS MARCO training set, which CSPLADE itself trained on)::

      {"query_id": str, "query": str, "positive_passages": [{"docid", "title", "text"}, ...],
       "negative_passages": [...]}

- **sentence-transformers** (its retrieval training sets): ``anchor`` or ``query``, ``positive``, then
  ``negative`` and/or ``negative_1 … negative_n`` (a null negative: the row has fewer), and optionally a
  label column (``label``, ``labels``, ``score`` or ``scores``) with teacher scores, read by length as
  sentence-transformers' distillation losses define them: n + 1 values are the teacher's scores of
  [positive, negative_1 … negative_n] (``SparseDistillKLDivLoss``); n values (or one number when n = 1)
  are margins ``score(positive) − score(negative_i)`` (``SparseMarginMSELoss``), stored as the scores
  ``0`` for the positive and ``−margin_i`` for negative i. csplade's distillation losses (KL, MarginMSE)
  depend only on score differences within a group, so both readings train the same. A label on plain
  (anchor, positive) pairs is a similarity label, not a teacher score: refused.

A document is indexed as ``title + " " + text`` (`beir.doc_text`); a negative identical to a positive
of the same row is removed (counted). Known limit: layouts that hold ids only (Tevatron's newer
``positive_document_ids`` + a corpus, sentence-transformers' ``triplet-ids``) are not read.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from csplade.data.beir import doc_text
from csplade.data.rows import BadRow, describe

CSPLADE, TEVATRON, SENTENCE_TRANSFORMERS = "csplade", "Tevatron", "sentence-transformers"
GROUP_KEYS = ("query", "query_id", "positives", "negatives", "scores", "teacher_scores")
# `teacher_scores` (per-teacher raw scores written by `csplade teacher-scores`) is kept for the record
# and not read by training, which uses the combined `scores`.
SCORE_KEYS = ("positives", "negatives")
TEVATRON_KEYS = ("query_id", "query", "positive_passages", "negative_passages")
ST_QUERY_KEYS = ("anchor", "query")
ST_LABEL_KEYS = ("label", "labels", "score", "scores")  # sentence-transformers' label columns
_NEGATIVE_N = re.compile(r"negative_(\d+)")

ACCEPTED = (
    "  csplade groups: query, positives [, negatives, scores, query_id]\n"
    "  Tevatron: query_id, query, positive_passages [, negative_passages] "
    "(passages: {docid, title, text})\n"
    "  sentence-transformers: anchor|query, positive [, negative | negative_1..negative_n]"
    " [, label|labels|score|scores]"
)


def detect_schema(columns: Sequence[str], where: str) -> str:
    """The layout whose columns `columns` are; ValueError listing them and the accepted layouts."""
    cols = set(columns)
    if "positive_passages" in cols and "query" in cols:
        return TEVATRON
    if "positives" in cols and "query" in cols:
        return CSPLADE
    if "positive" in cols and len(cols & set(ST_QUERY_KEYS)) == 1:
        negatives = [c for c in cols if c == "negative" or _NEGATIVE_N.fullmatch(c)]
        label = next((c for c in ST_LABEL_KEYS if c in cols), None)
        if label is not None and not negatives:
            raise ValueError(
                f"{where}: (anchor, positive) pairs with a {label!r} column are similarity or "
                "classification data (a label per pair), not retrieval groups with teacher scores; "
                f"drop the {label!r} column to train on the pairs"
            )
        return SENTENCE_TRANSFORMERS
    hint = ""
    if "positive" in cols and cols >= set(ST_QUERY_KEYS):
        hint = " (both 'anchor' and 'query': which one is the query?)"
    elif any(c.endswith(("_id", "_ids")) for c in cols) and not cols & {"text", "positive"}:
        hint = " (ids only: a layout that needs a separate corpus is not read; write the texts)"
    raise ValueError(
        f"{where}: columns {sorted(cols)} match no training-group layout{hint}. Accepted:\n"
        + ACCEPTED
    )


def ignored_columns(schema: str, columns: Sequence[str]) -> list[str]:
    """Columns of a Tevatron or sentence-transformers table that training does not read."""
    if schema == TEVATRON:
        known = set(TEVATRON_KEYS)
    elif schema == SENTENCE_TRANSFORMERS:
        known = {*ST_QUERY_KEYS, "positive", "negative", *ST_LABEL_KEYS}
        known |= {c for c in columns if _NEGATIVE_N.fullmatch(c)}
    else:
        return []  # csplade rows report their unknown keys row by row
    return sorted(set(columns) - known)


def parse_record(record: Any, schema: str) -> dict[str, Any]:
    """One record (a dict) of `schema` -> a group row; `BadRow` with the reason when unusable.

    The row: query, query_id, positives, negatives, positive_scores, negative_scores (None without
    teacher scores), n_negatives_dropped (negatives equal to a positive), unknown_keys.
    """
    if not isinstance(record, dict):
        raise BadRow(f"expected a JSON object, got {type(record).__name__}")
    if schema == TEVATRON:
        row = _tevatron(record)
    elif schema == SENTENCE_TRANSFORMERS:
        row = _sentence_transformers(record)
    else:
        row = _csplade(record)
    return _drop_negatives_equal_to_positives(row)


# ------------------------------------------------------------------------------------- helpers
def _query(record: dict, key: str) -> str:
    if key not in record or record[key] is None:
        raise BadRow(f"missing '{key}'")
    query = record[key]
    if not isinstance(query, str):
        raise BadRow(f"'{key}' must be a string, got {describe(query)}")
    if not query.strip():
        raise BadRow(f"'{key}' is empty")
    return query


def _query_id(value: Any, key: str = "query_id") -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise BadRow(f"'{key}' must be a string, got {describe(value)}")
    return str(value)


def _item_text(item: Any, where: str, id_key: str = "_id") -> str:
    """The text of one document: a string, or an object read with `doc_text`."""
    if isinstance(item, str):
        text = item.strip()
    elif isinstance(item, dict):
        if not isinstance(item.get("text"), str):
            raise BadRow(f"{where} needs a string 'text', got {describe(item.get('text'))}")
        title = item.get("title")
        if title is not None and not isinstance(title, str):
            raise BadRow(f"{where} has a non-string 'title': {describe(title)}")
        doc_id = item.get(id_key)
        if doc_id is not None and (isinstance(doc_id, bool) or not isinstance(doc_id, (str, int))):
            raise BadRow(f"{where} has an '{id_key}' that is not a string: {describe(doc_id)}")
        text = doc_text(item)
    else:
        raise BadRow(f"{where} must be a string or an object with 'text', got {describe(item)}")
    if not text:
        raise BadRow(f"{where} is empty")
    return text


def _items(record: dict, key: str, required: bool, id_key: str = "_id") -> list[str]:
    value = record.get(key)
    if value is None:
        if required:
            raise BadRow(f"missing '{key}'")
        return []
    if not isinstance(value, list):
        raise BadRow(f"'{key}' must be a list, got {describe(value)}")
    if required and not value:
        raise BadRow(f"'{key}' is empty")
    return [_item_text(item, f"{key}[{i}]", id_key) for i, item in enumerate(value)]


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRow(f"'{where}' must be a finite number, got {describe(value)}")
    return float(value)


def _score_list(scores: dict, key: str, n_items: int) -> list[float]:
    value = scores.get(key)
    if value is None:
        if n_items == 0:
            return []
        raise BadRow(f"'scores' has no '{key}' but there are {n_items} {key}")
    if not isinstance(value, list):
        raise BadRow(f"'scores.{key}' must be a list, got {describe(value)}")
    if len(value) != n_items:
        raise BadRow(f"'scores.{key}' has {len(value)} values but '{key}' has {n_items} items")
    return [_number(x, f"scores.{key}[{i}]") for i, x in enumerate(value)]


def _row(query, query_id, positives, negatives, pos_scores=None, neg_scores=None, unknown=()):
    return {
        "query": query,
        "query_id": query_id,
        "positives": positives,
        "negatives": negatives,
        "positive_scores": pos_scores,
        "negative_scores": neg_scores,
        "n_negatives_dropped": 0,
        "unknown_keys": sorted(unknown),
    }


def _drop_negatives_equal_to_positives(row: dict[str, Any]) -> dict[str, Any]:
    positive_set = set(row["positives"])
    keep = [i for i, text in enumerate(row["negatives"]) if text not in positive_set]
    n_dropped = len(row["negatives"]) - len(keep)
    if n_dropped:
        row["negatives"] = [row["negatives"][i] for i in keep]
        if row["negative_scores"] is not None:
            row["negative_scores"] = [row["negative_scores"][i] for i in keep]
    row["n_negatives_dropped"] = n_dropped
    return row


# ------------------------------------------------------------------------------------- layouts
def _csplade(record: dict) -> dict[str, Any]:
    query = _query(record, "query")
    query_id = _query_id(record.get("query_id"))
    positives = _items(record, "positives", required=True)
    negatives = _items(record, "negatives", required=False)
    positive_scores = negative_scores = None
    scores = record.get("scores")
    if scores is not None:
        if not isinstance(scores, dict):
            raise BadRow(f"'scores' must be an object, got {describe(scores)}")
        unknown = sorted(k for k, v in scores.items() if k not in SCORE_KEYS and v is not None)
        if unknown:
            raise BadRow(f"'scores' has unknown key(s) {unknown}; allowed: {list(SCORE_KEYS)}")
        positive_scores = _score_list(scores, "positives", len(positives))
        negative_scores = _score_list(scores, "negatives", len(negatives))
    unknown_keys = set(record) - set(GROUP_KEYS)
    return _row(
        query, query_id, positives, negatives, positive_scores, negative_scores, unknown_keys
    )


def _tevatron(record: dict) -> dict[str, Any]:
    query = _query(record, "query")
    query_id = _query_id(record.get("query_id"))
    positives = _items(record, "positive_passages", required=True, id_key="docid")
    negatives = _items(record, "negative_passages", required=False, id_key="docid")
    return _row(query, query_id, positives, negatives)


def _negative_keys(record: dict) -> list[str]:
    numbered = sorted((int(m.group(1)), key) for key in record if (m := _NEGATIVE_N.fullmatch(key)))
    return (["negative"] if "negative" in record else []) + [key for _, key in numbered]


def _sentence_transformers(record: dict) -> dict[str, Any]:
    query_key = next((k for k in ST_QUERY_KEYS if k in record), "anchor")
    query = _query(record, query_key)
    positive = _item_text(record.get("positive"), "positive") if "positive" in record else None
    if positive is None:
        raise BadRow("missing 'positive'")
    keys = _negative_keys(record)
    label_key = next((k for k in ST_LABEL_KEYS if k in record), None)
    present = [j for j, key in enumerate(keys) if record[key] is not None]
    negatives = [_item_text(record[keys[j]], keys[j]) for j in present]
    if label_key is None:
        return _row(query, None, [positive], negatives)
    pos_score, neg_scores = _st_scores(record[label_key], label_key, len(keys))
    return _row(query, None, [positive], negatives, [pos_score], [neg_scores[j] for j in present])


def _st_scores(value: Any, key: str, n: int) -> tuple[float, list[float]]:
    """(positive score, negative scores) from a sentence-transformers label (see the docstring)."""
    if value is None:
        raise BadRow(f"'{key}' is null (every row needs its teacher scores)")
    if n == 0:
        raise BadRow(f"'{key}' is set but the row has no negative to score")
    values = [value] if not isinstance(value, list) else value
    if not isinstance(value, list) and n != 1:
        raise BadRow(f"'{key}' is one number for {n} negatives; expected a list")
    numbers = [_number(x, f"{key}[{i}]") for i, x in enumerate(values)]
    if len(numbers) == n + 1:  # teacher scores of [positive, negative_1..n]
        return numbers[0], numbers[1:]
    if len(numbers) == n:  # margins score(positive) - score(negative_i)
        return 0.0, [-m for m in numbers]
    raise BadRow(
        f"'{key}' has {len(numbers)} values for 1 positive and {n} negatives; expected {n + 1} "
        f"teacher scores [positive, negatives…] or {n} margins (positive − negative_i)"
    )
