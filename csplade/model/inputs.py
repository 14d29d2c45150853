"""Token layout of one batch of texts: the template, prefixes, the echo copy and the pooling mask.

Tokenization is done here, not by the tokenizer's own truncation, so that the pooling mask is exact:

    [template head] [prefix] [text …] ([prefix] [text …] under echo) [template tail] [padding]

`max_length` caps the text tokens of one copy (under ``echo`` the model sees about twice as many;
Springer et al., "Repetition improves language model embeddings"). The template's special tokens (BOS
for Llama-3, [CLS]/[SEP] for BERT) and the prefix are pooled only when ``pool_special_tokens`` is on:
by default for MLM backbones (classic SPLADE pools [CLS] and [SEP]) and not for causal ones, where the
vector of a BOS or prefix token does not depend on the text and would add the same terms to every
vector. Padding never takes part in pooling; an empty text gives a zero vector. For inference-free
queries (``doc_only``) only the query's own tokens are marked.

``pool_next_token`` (on for ``bi``) pools, instead of the text's positions, the positions just before
them: a causal LM's logits at a position predict the next token, so these are the positions whose
predictions are the text's tokens (under ``bi`` they see them). The text's last position, whose logits
predict a token after the text, is left out: under ``bi`` no training signal reaches it (MNTP and L_ReLU
score positions that have a next token), and after adaptation it fired up to 34,000 of SmolLM2's 49,152
terms where the median query fired 155. The text's first token is predicted by the template's head
(BOS) or the prefix when there is one, and by no position otherwise.

Known limit: the prefix is tokenized separately from the text (a BPE merge across the boundary is lost).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from csplade.model.config import EncoderSettings

logger = logging.getLogger(__name__)

KINDS = ("query", "doc")


@dataclass(frozen=True)
class Template:
    """Special tokens the tokenizer adds around a text, found by probing it once."""

    head: tuple[int, ...]
    tail: tuple[int, ...]


def probe_template(tokenizer: Any) -> Template:
    plain = tokenizer("a b", add_special_tokens=False)["input_ids"]
    full = tokenizer("a b", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return Template(head=tuple(full[:start]), tail=tuple(full[start + len(plain) :]))
    logger.warning("could not locate the text inside the tokenizer's template; adding no specials")
    return Template(head=(), tail=())


def pick_pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def check_texts(texts: Any) -> list[str]:
    """`texts` as a list of str; a TypeError for a bare str or a non-str item (naming its index)."""
    if isinstance(texts, str):
        raise TypeError("expected a list of strings, got a single str (wrap it in a list)")
    if not isinstance(texts, Sequence):
        texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is {type(text).__name__}, expected str")
    return list(texts)


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be 'query' or 'doc', got {kind!r}")


def max_length(settings: EncoderSettings, kind: str) -> int:
    return settings.query_max_length if kind == "query" else settings.doc_max_length


def plain_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` without any special token."""
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _row(
    ids: list[int], prefix: list[int], template: Template, settings: EncoderSettings, kind: str
) -> tuple[list[int], list[bool], int]:
    """(token ids, pool mask, where the pooled copy of the text starts) of one text, truncated ids
    given."""
    pool_specials = bool(settings.pool_special_tokens)
    copies = 2 if settings.variant == "echo" else 1
    seq, pool = list(template.head), [pool_specials] * len(template.head)
    for copy in range(copies):
        pooled_copy = copy == copies - 1
        seq += prefix
        pool += [pool_specials and pooled_copy] * len(prefix)
        text_start = len(seq)
        seq += ids
        pool += [pooled_copy] * len(ids)
    seq += template.tail
    pool += [pool_specials] * len(template.tail)
    if not ids:  # an empty text is a zero vector, even where specials are pooled
        pool = [False] * len(pool)
    elif kind == "query" and settings.doc_only:  # inference-free: the text's own tokens
        own_end = len(seq) - len(template.tail)
        pool = [False] * (own_end - len(ids)) + [True] * len(ids) + [False] * len(template.tail)
    elif settings.pool_next_token:  # the positions whose logits predict a pooled token
        pool = pool[1:] + [False]
    return seq, pool, text_start


def tokenize(
    tokenizer: Any,
    template: Template,
    pad_id: int,
    settings: EncoderSettings,
    texts: Sequence[str],
    kind: str = "doc",
    with_text_mask: bool = False,
    windows: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Token ids, attention mask and pooling mask (all (B, L)) for `texts` as queries or docs.

    Also returns ``n_truncated`` (an int tensor): how many texts were cut at the max length; with
    `with_text_mask`, ``text_mask`` (B, L): the text's own tokens (one copy, no prefix or specials).
    `windows` (one per text, default all 0): row i holds text i's tokens from ``windows[i] * max
    length`` on, up to the max length, with the prefix and special tokens a whole text gets (a long
    document read in windows: :meth:`csplade.model.encoder.SparseEncoder.encode`).
    """
    check_kind(kind)
    texts = check_texts(texts)
    limit = max_length(settings, kind)
    prefix_text = settings.query_prefix if kind == "query" else settings.doc_prefix
    prefix = plain_ids(tokenizer, prefix_text) if prefix_text else []
    content = content_ids(tokenizer, texts)
    starts = [0] * len(content) if windows is None else [w * limit for w in windows]
    if len(starts) != len(content):
        raise ValueError(f"{len(starts)} windows for {len(content)} texts")
    n_truncated = sum(len(ids) > start + limit for ids, start in zip(content, starts, strict=True))
    content = [list(ids[start : start + limit]) for ids, start in zip(content, starts, strict=True)]
    rows = [_row(ids, prefix, template, settings, kind) for ids in content]
    width = max([len(s) for s, _, _ in rows] + [1])
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, L)
    attention = torch.zeros((len(rows), width), dtype=torch.long)  # (B, L)
    pool_mask = torch.zeros((len(rows), width), dtype=torch.bool)  # (B, L)
    text_mask = torch.zeros((len(rows), width), dtype=torch.bool)  # (B, L)
    for i, (seq, pool, text_start) in enumerate(rows):
        if not seq:  # nothing at all to feed: one dummy token, never pooled
            attention[i, 0] = 1
            continue
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention[i, : len(seq)] = 1
        pool_mask[i, : len(seq)] = torch.tensor(pool, dtype=torch.bool)
        text_mask[i, text_start : text_start + len(content[i])] = True
    out = {
        "input_ids": input_ids,
        "attention_mask": attention,
        "pool_mask": pool_mask,
        "n_truncated": torch.tensor(n_truncated),
    }
    if with_text_mask:
        out["text_mask"] = text_mask
    return out


def content_ids(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Each text's own token ids, whole (no prefix, no special tokens)."""
    return (
        tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
        if texts
        else []
    )


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L') ids of token-id rows padded with `pad_id` to the longest, and the mask of real ones."""
    width = max([len(row) for row in rows] + [1])
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = True
    return ids, mask
