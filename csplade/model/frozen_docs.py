"""Frozen documents: the document side keeps the vectors of the model a LoRA run starts from.

With ``frozen_docs`` a document is encoded with the LoRA adapter switched off (peft's
``disable_adapter``), so by the model the adapter was put on: after the lexical adaptation, documents
keep its vectors (their own words at BM25-like weights, learned by the LLM) and contrastive training
moves the queries only. Both sides stay the LLM's own vectors; the saved folder is the base plus the
adapter, and encoding documents turns the adapter off again (a merged model would encode them with
the query weights: merging is refused).

Why: on a CPU a document's forward and backward pass is most of a contrastive step. A frozen document
needs one forward pass without gradient, once: :class:`DocVectors` keeps each document's vector (keyed
by its token ids, stored sparse) for the rest of the run, so every later step that draws it costs
nothing, and hard negatives cost no more than in-batch ones. The head bias is frozen with it (it
shapes both sides).

Known limit: one process's vectors per process (DDP ranks keep their own).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor, nn

from csplade.model.prefix_cache import text_key


def encode(encoder, batch: dict[str, Tensor]) -> Tensor:
    """(B, V): a tokenized batch of documents, adapter off, no gradient; from the encoder's
    :class:`DocVectors` when it keeps them (training)."""
    with torch.no_grad(), adapter_off(encoder.backbone):
        if encoder.doc_vectors is None:
            return encoder._encode_batch(**batch)
        return encoder.doc_vectors.vectors(encoder._encode_batch, batch)


@contextmanager
def adapter_off(backbone: nn.Module) -> Iterator[None]:
    """The backbone with its peft adapter switched off inside the block (no adapter: as it is)."""
    context = backbone.disable_adapter() if hasattr(backbone, "peft_config") else nullcontext()
    with context:
        yield


class DocVectors:
    """Each document's vector (V,), computed once and kept sparse, keyed by its token ids."""

    def __init__(self) -> None:
        self._vectors: dict[bytes, tuple[Tensor, Tensor]] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._vectors)

    def vectors(self, encode: Callable[..., Tensor], batch: dict[str, Tensor]) -> Tensor:
        """(B, V) float32: the batch's document vectors, encoding (`encode(**sub_batch)`) only those
        not seen before."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        keys = [text_key(ids[i][mask[i].bool()]) for i in range(ids.shape[0])]
        missing = [i for i, key in enumerate(keys) if key not in self._vectors]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            index = torch.tensor(missing, device=ids.device)
            sub = {k: v.index_select(0, index.to(v.device)) for k, v in batch.items()}
            fresh = encode(**sub).float()  # (b, V)
            for row, i in enumerate(missing):
                nonzero = fresh[row].nonzero().flatten()
                self._vectors[keys[i]] = (nonzero.cpu(), fresh[row, nonzero].cpu())
            vocab = fresh.shape[1]
        else:
            vocab = None
        return self._stack(keys, vocab, ids.device)

    def _stack(self, keys: list[bytes], vocab: int | None, device) -> Tensor:
        if vocab is None:
            vocab = self.vocab
        self.vocab = vocab
        out = torch.zeros((len(keys), vocab), dtype=torch.float32)
        for row, key in enumerate(keys):
            idx, values = self._vectors[key]
            out[row, idx] = values
        return out.to(device)
