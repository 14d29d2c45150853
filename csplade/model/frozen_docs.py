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

Documents shared by runs (``frozen_docs_file``): every run that starts from the same model encodes the
same documents to the same vectors, so :meth:`DocVectors.save` writes them to one safetensors file
(key: the hash of the token ids; the vector's non-zero ids and weights) and :meth:`DocVectors.load`
reads them back, refusing a file written by another model: the file carries a :func:`fingerprint`
of everything that shapes a document's vector (the weights with the adapter off, the head bias, the
dtype and the pooling settings). A collection encoded once for evaluation then serves the training
runs on its documents and the evaluation of every later query model without another forward pass.

Known limit: one process's vectors per process (DDP ranks keep their own; rank 0 writes the file).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import numpy as np
import safetensors.torch
import torch
from torch import Tensor, nn

from csplade._io import atomic_write
from csplade.model.prefix_cache import text_key

logger = logging.getLogger(__name__)

# the settings that shape a document's vector besides the weights and its token ids
_DOC_SETTINGS = (
    "variant", "pooling", "pool_special_tokens", "pool_next_token", "logit_scale", "learned_top_k",
    "lexical_residual", "lexical_scale",
)  # fmt: skip


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


@torch.no_grad()
def fingerprint(encoder) -> str:
    """A hex digest of what makes `encoder`'s document vectors: its weights with the adapter off (LoRA
    factors left out), the head bias, their dtypes and the pooling settings."""
    digest = hashlib.sha256()
    settings = {name: getattr(encoder.config, name, None) for name in _DOC_SETTINGS}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    tensors = [p for name, p in encoder.backbone.named_parameters() if "lora_" not in name]
    if encoder.head_bias is not None:
        tensors.append(encoder.head_bias)
    for tensor in tensors:
        digest.update(str((tuple(tensor.shape), tensor.dtype)).encode())
        flat = tensor.detach().reshape(-1).cpu()
        digest.update(memoryview(flat.view(torch.uint8).numpy()))
    return digest.hexdigest()


class DocVectors:
    """Each document's vector (V,), computed once and kept sparse, keyed by its token ids.

    `fingerprint` (:func:`fingerprint`) names the model the vectors belong to; it is written with
    them by :meth:`save` and checked by :meth:`load`.
    """

    def __init__(self, fingerprint: str = "") -> None:
        self._vectors: dict[bytes, tuple[Tensor, Tensor]] = {}
        self.hits = 0
        self.misses = 0
        self.fingerprint = fingerprint
        self.vocab: int | None = None

    def save(self, path: str | os.PathLike) -> None:
        """Write every vector to `path` (safetensors, atomically), with the fingerprint. Vectors the
        file holds and these lack (another run from the same model saved them) are kept."""
        if os.path.exists(path):
            for key, vector in DocVectors.load(path, self.fingerprint)._vectors.items():
                self._vectors.setdefault(key, vector)
        keys = list(self._vectors)
        rows = [self._vectors[key] for key in keys]
        lengths = torch.tensor([len(idx) for idx, _ in rows], dtype=torch.int64)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        empty_i, empty_v = torch.zeros(0, dtype=torch.int64), torch.zeros(0)
        keys_u8 = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 16)
        tensors = {
            "keys": torch.from_numpy(keys_u8.copy()),
            "offsets": offsets,
            "indices": torch.cat([idx.long() for idx, _ in rows]) if rows else empty_i,
            "values": torch.cat([v.float() for _, v in rows]) if rows else empty_v,
        }
        metadata = {"fingerprint": self.fingerprint, "vocab": str(self.vocab or 0)}
        with atomic_write(path) as handle:
            handle.write(safetensors.torch.save(tensors, metadata=metadata))

    @classmethod
    def for_encoder(cls, encoder, path: str | os.PathLike | None = None) -> DocVectors:
        """Vectors for `encoder`'s documents: those saved at `path` when it exists (refused when
        another model made them), else none yet."""
        key = fingerprint(encoder)
        if path is not None and os.path.exists(path):
            vectors = cls.load(path, key)
            logger.info("frozen documents: %d vectors read from %s", len(vectors), path)
            return vectors
        return cls(key)

    @classmethod
    def load(cls, path: str | os.PathLike, fingerprint: str) -> DocVectors:
        """The vectors saved at `path`; ValueError when they were made by another model (another
        `fingerprint`) or the file is not a document-vectors file."""
        with safetensors.safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            names = set(handle.keys())
            if "fingerprint" not in metadata or names != {"keys", "offsets", "indices", "values"}:
                raise ValueError(f"{path}: not a document-vectors file (DocVectors.save)")
            if metadata["fingerprint"] != fingerprint:
                raise ValueError(
                    f"{path}: its document vectors were made by another model or other settings "
                    f"(fingerprint {metadata['fingerprint'][:12]}, this model "
                    f"{fingerprint[:12]}): use another file or remove it"
                )
            tensors = {name: handle.get_tensor(name) for name in names}
        out = cls(fingerprint)
        out.vocab = int(metadata.get("vocab", 0)) or None
        offsets = tensors["offsets"].tolist()
        for row, key in enumerate(tensors["keys"]):
            start, end = offsets[row], offsets[row + 1]
            out._vectors[key.numpy().tobytes()] = (
                tensors["indices"][start:end],
                tensors["values"][start:end],
            )
        return out

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
