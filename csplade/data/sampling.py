"""Sampling one group per query, batching groups into token tensors, and the adaptation batches.

Sampling is a pure function of (seed, epoch, index): `GroupDataset` seeds a local numpy Generator from
the three, never a global RNG. The HF Trainer skips the batches of a resumed epoch without calling the
dataset, and it calls ``set_epoch`` on the dataset through accelerate, so a resumed run sees exactly
the groups it would have seen (for data read as a stream: :mod:`csplade.data.streaming`).

The adaptation phase's collator (:class:`AdaptationCollator`) tokenizes unlabeled texts for causal LM
(CLM) or masked next-token prediction (MNTP, LLM2Vec, arXiv 2404.05961; see :func:`mntp_inputs`).

Known limits: with ``dataloader_persistent_workers`` the worker copies of the dataset do not see
``set_epoch``; a random corpus negative can still be relevant (unjudged), as in every random-negative
scheme.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from torch import Tensor

logger = logging.getLogger(__name__)


def pick_negatives(
    rng: np.random.Generator, available: int, need: int, fill_from_corpus: bool
) -> tuple[list[int], int]:
    """`need` positions in a list of `available` negatives, and how many corpus docs must complete them.

    Without replacement when the list is long enough; else the whole list (shuffled), completed by
    random corpus documents (`fill_from_corpus`) or by drawing from the list again.
    """
    if available >= need:
        return rng.choice(available, size=need, replace=False).tolist(), 0
    chosen = rng.permutation(available).tolist()
    if fill_from_corpus:
        return chosen, need - available
    extra = rng.choice(available, size=need - available, replace=True).tolist()
    return chosen + extra, 0


class GroupDataset(torch.utils.data.Dataset):
    """One training group per query: ``{"query", "docs": [positive, negatives...], "scores"}``.

    `groups` comes from `read_groups_jsonl` (items are texts) or `read_groups_beir` (items are
    rows of `corpus`, whose ``text`` column gives the text). Item i draws one positive at random and
    ``group_size - 1`` negatives without replacement from its list, using a numpy Generator seeded
    by (seed, epoch, i) only. A list shorter than that is used whole and then filled:
    with random corpus documents that are not the query's positives nor already chosen (when a
    corpus is known and the group has no teacher scores: a random document has none), otherwise by
    drawing again from the list (with replacement). ``scores`` are the teacher scores of the chosen
    documents, in the same order, or None.
    """

    def __init__(
        self,
        groups: datasets.Dataset,
        group_size: int,
        seed: int = 0,
        corpus: datasets.Dataset | None = None,
        max_queries: int | None = None,
        stats: dict[str, Any] | None = None,
    ) -> None:
        missing = {"query", "positives", "negatives"} - set(groups.column_names)
        if missing:
            raise ValueError(f"groups lack column(s) {sorted(missing)}: {groups.column_names}")
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        item_dtype = getattr(groups.features["positives"].feature, "dtype", None)
        if corpus is not None:
            if "text" not in corpus.column_names:
                raise ValueError(f"corpus needs a 'text' column, has {corpus.column_names}")
            if item_dtype != "int64":
                raise ValueError(
                    f"with a corpus, items must be corpus rows (int64), not {item_dtype}"
                )
            corpus = corpus.select_columns(["text"])
        elif item_dtype != "string":
            raise ValueError(f"without a corpus, items must be texts (string), not {item_dtype}")
        self.stats = dict(stats or {})
        if max_queries is not None:
            if max_queries < 1:
                raise ValueError(f"max_train_queries must be >= 1, got {max_queries}")
            if max_queries < len(groups):
                logger.info(
                    "max_train_queries=%d: training on the first %d of %d queries",
                    max_queries,
                    max_queries,
                    len(groups),
                )
                self.stats["truncated_from"] = len(groups)
                groups = groups.select(range(max_queries))
        self.groups = groups
        self.corpus = corpus
        self.group_size = group_size
        self.seed = seed
        self.epoch = 0
        # readers guarantee that every row has teacher scores or none does
        self.has_scores = (
            "positive_scores" in groups.column_names
            and len(groups) > 0
            and groups[0]["positive_scores"] is not None
        )
        self._check_negatives()
        self.stats["groups"] = len(groups)

    def _check_negatives(self) -> None:
        """Fail on groups that cannot be filled; log once how many groups need filling."""
        need = self.group_size - 1
        if need == 0:
            self.stats["groups_filled"] = 0
            return
        negatives = self.groups.with_format("arrow")["negatives"]  # memory-mapped, not copied
        lengths = pc.list_value_length(negatives).to_numpy(zero_copy_only=False)
        short = np.flatnonzero(lengths < need)
        self.stats["groups_filled"] = len(short)
        if len(short) == 0:
            return
        from_corpus = self.corpus is not None and not self.has_scores
        if not from_corpus:
            empty = np.flatnonzero(lengths == 0)
            if len(empty):
                first = self.groups[int(empty[0])]
                unit = "line" if "line" in first else "row"
                where = f"{unit} {first[unit]}" if unit in first else f"row {int(empty[0])}"
                raise ValueError(
                    f"group_size={self.group_size} needs negatives, but {len(empty)} groups have "
                    f"none (first: {where}, query {first['query']!r}) and "
                    + (
                        "teacher-scored groups are never filled with random corpus documents"
                        if self.corpus is not None
                        else "no corpus is known to draw random negatives from"
                    )
                    + "; add negatives or set group_size: 1"
                )
        logger.info(
            "%d of %d groups have fewer than %d negatives; filled %s",
            len(short),
            len(lengths),
            need,
            "with random corpus documents (not positives)"
            if from_corpus
            else "by drawing their negatives again (with replacement)",
        )

    def set_epoch(self, epoch: int) -> None:
        """Change the sampling of every group (called by the HF Trainer through accelerate)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self.groups):
            raise IndexError(f"group index {index} out of range for {len(self.groups)} groups")
        row = self.groups[index]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        positives, negatives = row["positives"], row["negatives"]
        pos = int(rng.integers(len(positives)))
        chosen, fill = self._pick_negatives(rng, len(negatives))
        docs = [positives[pos]] + [negatives[j] for j in chosen]
        if fill:
            docs += self._random_corpus_docs(rng, fill, exclude={*positives, *docs})
        scores = None
        if self.has_scores and row["positive_scores"] is not None:
            scores = [row["positive_scores"][pos]] + [row["negative_scores"][j] for j in chosen]
        if self.corpus is not None:
            docs = self.corpus[docs]["text"]
        return {"query": row["query"], "docs": docs, "scores": scores}

    def _pick_negatives(self, rng: np.random.Generator, available: int) -> tuple[list[int], int]:
        """Positions in the negative list, and how many random corpus docs must complete them."""
        from_corpus = self.corpus is not None and not self.has_scores
        return pick_negatives(rng, available, self.group_size - 1, from_corpus)

    def _random_corpus_docs(self, rng: np.random.Generator, k: int, exclude: set[int]) -> list[int]:
        """`k` corpus rows outside `exclude`, distinct when the corpus has enough of them."""
        n = len(self.corpus)
        if n - len(exclude) < 4 * k:  # small corpus: draw from the explicit complement
            pool = np.setdiff1d(np.arange(n), np.fromiter(exclude, dtype=np.int64))
            if len(pool) == 0:
                raise ValueError(f"the corpus ({n} docs) has no document that is not a positive")
            return rng.choice(pool, size=k, replace=len(pool) < k).tolist()
        out: list[int] = []
        while len(out) < k:
            doc = int(rng.integers(n))
            if doc not in exclude:
                exclude.add(doc)
                out.append(doc)
        return out


# ------------------------------------------------------------------------------------ collator
class GroupCollator:
    """Batch `GroupDataset` items into token tensors.

    `tokenize(texts, kind)` is e.g. `SparseEncoder.tokenize`. Returns ``query`` (B, Lq) and ``doc``
    (B*n, Ld) tensor dicts, doc rows ``i*n .. i*n+n-1`` being query i's group (positive first),
    ``teacher_scores`` (B, n) float32 when every item has scores, and the counts
    ``n_truncated_query`` / ``n_truncated_doc`` of texts cut at the max length.
    """

    def __init__(self, tokenize: Callable[[Sequence[str], str], dict[str, torch.Tensor]]) -> None:
        self.tokenize = tokenize

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        n = len(items[0]["docs"])
        for i, item in enumerate(items):
            if len(item["docs"]) != n:
                raise ValueError(f"item {i} has {len(item['docs'])} docs, item 0 has {n}")
            scores = item.get("scores")
            if scores is not None and len(scores) != n:
                raise ValueError(f"item {i} has {len(scores)} scores for {n} docs")
        with_scores = [i for i, item in enumerate(items) if item.get("scores") is not None]
        if with_scores and len(with_scores) != len(items):
            without = sorted(set(range(len(items))) - set(with_scores))
            raise ValueError(
                f"items {with_scores} have teacher scores but items {without} do not; "
                "a batch must be all scored or all unscored"
            )
        query = dict(self.tokenize([item["query"] for item in items], "query"))  # (B, Lq)
        doc = dict(self.tokenize([d for item in items for d in item["docs"]], "doc"))  # (B*n, Ld)
        batch: dict[str, Any] = {
            "query": query,
            "doc": doc,
            "n_truncated_query": int(query.pop("n_truncated", 0)),
            "n_truncated_doc": int(doc.pop("n_truncated", 0)),
        }
        if with_scores:
            batch["teacher_scores"] = torch.tensor(
                [item["scores"] for item in items], dtype=torch.float32
            )  # (B, n)
        return batch


# --------------------------------------------------------------------------------- adaptation text
IGNORE_INDEX = -100
ADAPT_OBJECTIVES = ("clm", "mntp")
LLM2VEC_MASK_TOKEN = "_"


def mntp_inputs(
    input_ids: Tensor,
    attention_mask: Tensor,
    mask_ratio: float,
    mask_token_id: int,
    special_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Mask tokens for MNTP: ``(masked_input_ids, labels)``, both (B, L).

    Maskable: attended, not a special token, not position 0 (no logits at i − 1 to predict it from).
    Each maskable token is drawn with probability `mask_ratio`; a row with maskable tokens but no
    draw gets one (chosen uniformly). Masked tokens become `mask_token_id`; `labels` hold the
    original token there and IGNORE_INDEX everywhere else. Deterministic given `generator` (None:
    the global torch RNG).
    """
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
            "must both be (B, L)"
        )
    maskable = attention_mask.bool().clone()  # (B, L)
    maskable[:, 0] = False
    if len(special_ids):
        maskable &= ~torch.isin(
            input_ids, torch.as_tensor(list(special_ids), dtype=input_ids.dtype)
        )
    draws = torch.rand(input_ids.shape, generator=generator)  # (B, L), on CPU
    masked = maskable & (draws.to(input_ids.device) < mask_ratio)
    empty = maskable.any(dim=1) & ~masked.any(dim=1)  # (B,)
    if bool(empty.any()):
        # one masked token for rows left without any: the maskable position with the smallest draw
        scores = torch.where(maskable, draws.to(input_ids.device), torch.full_like(draws, 2.0))
        first = scores.argmin(dim=1)  # (B,)
        rows = empty.nonzero(as_tuple=True)[0]
        masked[rows, first[rows]] = True
    labels = torch.where(masked, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    masked_ids = torch.where(masked, torch.full_like(input_ids, mask_token_id), input_ids)
    return masked_ids, labels


def pick_mask_token_id(tokenizer) -> int:
    """The token MNTP writes over masked positions: mask token, else "_", else pad, else unk."""
    if getattr(tokenizer, "mask_token_id", None) is not None:
        return int(tokenizer.mask_token_id)
    unk = getattr(tokenizer, "unk_token_id", None)
    blank = tokenizer.convert_tokens_to_ids(LLM2VEC_MASK_TOKEN)
    if isinstance(blank, int) and blank != unk and blank >= 0:
        return blank
    for attr in ("pad_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    raise ValueError(
        "the tokenizer has no mask, '_', pad or unk token to mask with; "
        "pass mask_token_id explicitly"
    )


@dataclass
class AdaptationCollator:
    """Texts -> ``input_ids``, ``attention_mask`` (B, L, right-padded) and ``labels`` (B, L).

    Tokenized with the tokenizer's own special tokens (BOS for Llama-3), truncated to `max_length`
    tokens. CLM: labels are the input ids, IGNORE_INDEX on padding. MNTP: see :func:`mntp_inputs`;
    the batch also holds ``tokens``, the unmasked input ids (IGNORE_INDEX on padding).
    With `seed` the masks come from a private generator (one stream per dataloader worker: seed +
    worker id); without, from the global torch RNG, which the Trainer seeds and restores on resume.
    `n_texts` / `n_full` count the texts seen and those that filled `max_length` (were cut, or
    exactly that long), in this process (not in dataloader workers).

    With `lexical` (a :class:`csplade.data.lexical_targets.LexicalTargets`), the batch also holds the
    lexical adaptation's document and query batches and targets; examples are then ``{"text",
    "query"}`` (a sentence of the text). `language_model` False leaves the LM batch out (an adaptation
    with the lexical objective alone).
    """

    tokenizer: Any
    objective: str = "clm"
    max_length: int = 256
    mask_ratio: float = 0.2
    mask_token_id: int | None = None
    seed: int | None = None
    lexical: Any = None
    language_model: bool = True
    n_texts: int = field(default=0, init=False)
    n_full: int = field(default=0, init=False)
    _generator: torch.Generator | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.objective not in ADAPT_OBJECTIVES:
            raise ValueError(
                f"objective must be one of {', '.join(ADAPT_OBJECTIVES)}, got {self.objective!r}"
            )
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 (one prediction), got {self.max_length}")
        if self.objective == "mntp":
            if self.mask_token_id is None:
                self.mask_token_id = pick_mask_token_id(self.tokenizer)
            if not 0.0 < self.mask_ratio < 1.0:
                raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(self.tokenizer, "eos_token_id", None)
        self._pad_id = int(pad) if pad is not None else 0
        self._special_ids = sorted(set(getattr(self.tokenizer, "all_special_ids", []) or []))

    def _rng(self) -> torch.Generator | None:
        if self.seed is None:
            return None
        if self._generator is None:
            info = torch.utils.data.get_worker_info()
            self._generator = torch.Generator().manual_seed(
                self.seed + (info.id if info is not None else 0)
            )
        return self._generator

    def __call__(self, examples: Sequence[Any]) -> dict[str, Any]:
        texts = []
        for i, example in enumerate(examples):
            text = example["text"] if isinstance(example, dict) else example
            if not isinstance(text, str):
                raise TypeError(f"example {i}: expected a str text, got {type(text).__name__}")
            texts.append(text)
        batch: dict[str, Any] = self._language_model_batch(texts) if self.language_model else {}
        if self.lexical is not None:
            queries = []
            for i, example in enumerate(examples):
                query = example.get("query") if isinstance(example, dict) else None
                if not isinstance(query, str):
                    raise TypeError(f"example {i}: the lexical objective needs a str 'query'")
                queries.append(query)
            batch.update(self.lexical(texts, queries))
        return batch

    def _language_model_batch(self, texts: list[str]) -> dict[str, Tensor]:
        encoded = self.tokenizer(
            texts, add_special_tokens=True, truncation=True, max_length=self.max_length
        )["input_ids"]
        self.n_texts += len(encoded)
        self.n_full += sum(len(ids) >= self.max_length for ids in encoded)
        width = max([len(ids) for ids in encoded] + [1])
        input_ids = torch.full((len(texts), width), self._pad_id, dtype=torch.long)  # (B, L)
        attention_mask = torch.zeros((len(texts), width), dtype=torch.long)  # (B, L)
        for row, ids in enumerate(encoded):
            if ids:
                input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, : len(ids)] = 1
        tokens = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)  # (B, L) the text itself
        if self.objective == "clm":
            return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": tokens}
        masked_ids, labels = mntp_inputs(
            input_ids,
            attention_mask,
            self.mask_ratio,
            int(self.mask_token_id),
            self._special_ids,
            generator=self._rng(),
        )
        return {
            "input_ids": masked_ids,
            "attention_mask": attention_mask,
            "labels": labels,  # the masked tokens only (the MNTP loss)
            "tokens": tokens,  # every token (L_ReLU: every position, see csplade.training.adaptation)
        }
