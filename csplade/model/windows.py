"""Long documents read in windows (``doc_windows``): each window a document of its own, pooled.

A document longer than ``doc_max_length`` tokens is cut by default. With ``doc_windows`` > 1 it is read
in up to that many consecutive windows of ``doc_max_length`` tokens; each window is encoded as the
document of those tokens alone (with the prefix and special tokens a document gets), and the windows'
vectors are pooled as the tokens of one window are (max, or sum), so the document's vector is
SPLADE's pooling over all the tokens read, each seen in a context no longer than the texts the model
trained on. A window's vector is that of the same tokens given as a whole document: a text within
one window keeps the vector it has without windows, and frozen documents' vectors are kept per window
(:class:`csplade.model.frozen_docs.DocVectors` keys them by token ids), so a file written without
windows serves every first window. Encoding only; training reads a document's first window.
"""

from __future__ import annotations

from typing import Any

import torch

from csplade.model import inputs


def encode(texts: list[str], encoder: Any, batch_size: int) -> tuple[torch.Tensor, int]:
    """(b, V) document vectors of `texts` read in windows by `encoder` (a SparseEncoder), at most
    `batch_size` windows per forward; and how many texts ran past the last window (cut there)."""
    limit, most = encoder.config.doc_max_length, encoder.config.doc_windows
    lengths = [len(ids) for ids in inputs.content_ids(encoder.tokenizer, texts)]
    spans = [
        (i, w) for i, n in enumerate(lengths) for w in range(min(most, max(1, -(-n // limit))))
    ]  # (text, window); every text has at least one, an empty text too
    pool = torch.add if encoder.config.pooling == "sum" else torch.maximum
    pooled = torch.zeros((len(texts), encoder.vocab_size), dtype=torch.float32)
    for start in range(0, len(spans), batch_size):
        part = spans[start : start + batch_size]
        batch = encoder.tokenize(
            [texts[i] for i, _ in part], kind="doc", windows=[w for _, w in part]
        )
        batch.pop("n_truncated")
        _, reps = encoder(doc={k: v.to(encoder.device) for k, v in batch.items()})  # (s, V)
        for row, (i, _) in enumerate(part):  # weights are >= 0: a max from zeros is the max
            pooled[i] = pool(pooled[i], reps[row].float().cpu())
    return pooled.to(encoder.device), sum(n > most * limit for n in lengths)
