"""Training groups read as a stream (an `IterableDataset`), with exact resume.

Why: a training set too large to copy (MS MARCO with dozens of hard negatives per query is tens of GB)
is read as it is trained on, from local files or a hub dataset streamed by ``datasets``. The HF Trainer
resumes a run over an iterable dataset by reading the stream again and skipping the batches already
trained on, so the stream must give the same items in the same order every time: pass p over the source
is shuffled through a buffer seeded by (seed, p), and its item i is drawn (positive, negatives, scores)
with a Generator seeded by (seed, p, i), never a global RNG. The k-th item ever yielded thus depends on
(seed, k) only, as `csplade.data.sampling.GroupDataset`'s items depend on (seed, epoch, index).

Known limits: the shuffle is local to the buffer (pre-shuffle a source sorted by topic); resuming
re-reads and re-collates the skipped batches (minutes per million groups); the order depends on
``dataloader_num_workers`` (keep it when resuming); no corpus, so a list of negatives shorter than
needed is completed by drawing from it again, and a group without negatives is an error.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from csplade.data.sampling import pick_negatives

logger = logging.getLogger(__name__)

# The buffer shuffle of pass p is seeded by (seed, p, 0, 1); item i by (seed, p, i), which numpy pads
# with a 0 as 4th word: the two streams never coincide.
_SHUFFLE_KEY = 1


def buffer_shuffle(rows: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """`rows` shuffled through a buffer of `size` (each new row takes a random buffered one's place)."""
    if size <= 1:
        yield from rows
        return
    buffer: list[Any] = []
    for row in rows:
        if len(buffer) < size:
            buffer.append(row)
            continue
        slot = int(rng.integers(size))
        yield buffer[slot]
        buffer[slot] = row
    rng.shuffle(buffer)
    yield from buffer


class StreamingGroupDataset(torch.utils.data.IterableDataset):
    """Training groups read as a stream, pass after pass, until the Trainer's ``max_steps``.

    `open_rows(report)` yields validated group rows (texts, see `csplade.data.groups.iter_groups`) in
    source order, logging skipped rows when `report`. Pass p keeps the first `max_queries` rows, shuffles
    them through a buffer of `shuffle_buffer` seeded by (seed, p), and item i of the pass is drawn as in
    `GroupDataset` (a positive, ``group_size - 1`` negatives, their scores) with a Generator seeded by
    (seed, p, i); a list shorter than needed is filled by drawing from it again. Items are
    ``{"query", "docs", "scores"}``. With dataloader workers, worker w takes items i ≡ w (mod workers).
    The stream has no length: the Trainer needs ``max_steps`` (it counts one epoch; passes are ours).
    """

    def __init__(
        self,
        open_rows: Callable[[bool], Iterator[dict[str, Any]]],
        group_size: int,
        seed: int = 0,
        shuffle_buffer: int = 10_000,
        max_queries: int | None = None,
        where: Callable[[int], str] = str,
        unit: str = "row",
        stats: dict[str, Any] | None = None,
    ) -> None:
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        if max_queries is not None and max_queries < 1:
            raise ValueError(f"max_train_queries must be >= 1, got {max_queries}")
        self.open_rows = open_rows
        self.group_size = group_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.max_queries = max_queries
        self.where = where
        self.unit = unit
        self.stats = dict(stats or {})
        self.epoch = 0  # the first pass (the HF Trainer, counting one epoch, leaves it at 0)

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def rows(self, report: bool = False) -> Iterator[dict[str, Any]]:
        """One pass over the source in its own order (the first `max_queries` rows)."""
        return itertools.islice(self.open_rows(report), self.max_queries)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for epoch in itertools.count(self.epoch):
            rng = np.random.default_rng([self.seed, epoch, 0, _SHUFFLE_KEY])
            first_pass = epoch == self.epoch
            rows = buffer_shuffle(
                self.rows(report=first_pass and worker == 0), self.shuffle_buffer, rng
            )
            count = 0
            for index, row in enumerate(rows):
                count += 1
                if index % workers == worker:
                    yield self._sample(row, np.random.default_rng([self.seed, epoch, index]))
            if count == 0:
                raise ValueError(f"{self.stats.get('source', 'the stream')}: no training group")
            if first_pass and worker == 0:
                logger.info("%s: one pass is %d groups", self.stats.get("source", "stream"), count)

    def _sample(self, row: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        positives, negatives = row["positives"], row["negatives"]
        need = self.group_size - 1
        if need and not negatives:
            raise ValueError(
                f"{self.where(row[self.unit])}: group_size={self.group_size} needs negatives but "
                f"this group (query {row['query']!r}) has none and a stream has no corpus to draw "
                "random negatives from; add negatives or set group_size: 1"
            )
        pos = int(rng.integers(len(positives)))
        chosen, _ = pick_negatives(rng, len(negatives), need, fill_from_corpus=False)
        docs = [positives[pos]] + [negatives[j] for j in chosen]
        scores = None
        if row["positive_scores"] is not None:
            scores = [row["positive_scores"][pos]] + [row["negative_scores"][j] for j in chosen]
        return {"query": row["query"], "docs": docs, "scores": scores}
