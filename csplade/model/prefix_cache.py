"""The outputs of a causal LM's frozen lower blocks, computed once per text and reused.

With LoRA on the last K blocks only (``lora_last_layers``), the first N = n_layers - K blocks never
change during training: a text's hidden states after block N - 1 are the same at every step. The
cache keeps them per text (keyed by its token ids) and, when every text of a batch has been seen,
runs only the upper blocks, from those states, through the model's own forward: the states go in as
``inputs_embeds`` and the lower blocks are swapped for pass-throughs for the call, so the masks,
rotary embeddings and per-layer attention types (Gemma 3's sliding layers, Qwen's) are the model's
own. A batch with unseen texts runs the lower blocks for those texts alone (upper blocks swapped out),
then the upper blocks for the whole batch. Exactness: the upper blocks see the same states the
uncached forward computes (bitwise when the text was cached from a batch of the same shape; else up
to the rounding differences batch shapes cause anyway: ``tests/test_prefix_cache.py``).

Cost: H values per token in the model's dtype (SmolLM2-135M in bf16: 1.1 KiB a token, 147 KiB for a
128-token text), held in memory (``max_bytes`` stops adding beyond it). What it saves per step is the
lower blocks' forward of every text seen before: training revisits its documents every epoch, and an
evaluation during training re-encodes the same dev slice each time.

Limits: right-padded batches only (csplade's own tokenization; a left-padded batch runs uncached);
the lower blocks and the embeddings must be frozen (checked when the cache is attached); one process's
cache per process (DDP ranks each keep their own); no FSDP (sharded blocks expect their own calls).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)


class _PassThrough(nn.Module):
    """Stands for a decoder block: returns the hidden states it is given."""

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        return hidden_states


@contextmanager
def _swapped(layers: nn.ModuleList, indices: range) -> Iterator[None]:
    saved = {i: layers[i] for i in indices}
    try:
        for i in indices:
            layers[i] = _PassThrough()
        yield
    finally:
        for i, layer in saved.items():
            layers[i] = layer


def text_key(ids: Tensor) -> bytes:
    """A text's key in the per-text caches (this one, csplade.model.frozen_docs): its token ids."""
    return hashlib.blake2b(ids.cpu().numpy().tobytes(), digest_size=16).digest()


class PrefixCache:
    """Hidden states after the first `n_frozen` decoder blocks, per text (see the module docstring)."""

    def __init__(self, n_frozen: int, max_bytes: int = 4 * 1024**3) -> None:
        if n_frozen < 1:
            raise ValueError(f"n_frozen must be >= 1, got {n_frozen}")
        self.n_frozen = n_frozen
        self.max_bytes = max_bytes
        self._states: dict[bytes, Tensor] = {}
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.full = False

    def __len__(self) -> int:
        return len(self._states)

    @staticmethod
    def check_frozen(decoder: nn.Module, n_frozen: int) -> None:
        """Raise when a parameter of the embeddings or of the first `n_frozen` blocks is trained."""
        layers = decoder.layers
        if n_frozen >= len(layers):
            raise ValueError(f"{n_frozen} frozen blocks of {len(layers)}: nothing would train")
        modules = [("embeddings", decoder.get_input_embeddings())]
        modules += [(f"block {i}", layers[i]) for i in range(n_frozen)]
        for name, module in modules:
            trained = [n for n, p in module.named_parameters() if p.requires_grad]
            if trained:
                raise ValueError(
                    f"the prefix cache needs frozen lower blocks, but {name} trains {trained[:3]}"
                )

    def last_hidden_state(
        self, decoder: nn.Module, input_ids: Tensor, attention_mask: Tensor
    ) -> Tensor:
        """The decoder's ``last_hidden_state`` (B, L, H), its lower blocks' outputs from the cache."""
        lengths = attention_mask.sum(dim=1)  # (B,)
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        right_padded = bool((attention_mask.bool() == (positions < lengths.unsqueeze(1))).all())
        if not right_padded:
            return self._plain(decoder, input_ids, attention_mask)
        keys = [text_key(input_ids[i, : int(n)]) for i, n in enumerate(lengths)]
        missing = [i for i, key in enumerate(keys) if key not in self._states]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            self._fill(decoder, input_ids, attention_mask, missing, keys, lengths)
        states = self._assemble(keys, lengths, input_ids.shape[1])
        if any(states_i is None for states_i in states):  # the cache is full
            return self._plain(decoder, input_ids, attention_mask)
        prefix = torch.stack(states)  # (B, L, H)
        layers = decoder.layers
        with _swapped(layers, range(self.n_frozen)):
            out = decoder(inputs_embeds=prefix, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state

    def _plain(self, decoder, input_ids, attention_mask) -> Tensor:
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state

    @torch.no_grad()
    def _fill(self, decoder, input_ids, attention_mask, rows, keys, lengths) -> None:
        """Run the lower blocks alone for `rows` of the batch and store each text's states."""
        layers = decoder.layers
        captured: dict[str, Tensor] = {}

        def grab(_module, _args, output):
            captured["states"] = output[0] if isinstance(output, tuple) else output

        index = torch.tensor(rows, device=input_ids.device)
        ids, mask = input_ids.index_select(0, index), attention_mask.index_select(0, index)
        handle = layers[self.n_frozen - 1].register_forward_hook(grab)
        try:
            with _swapped(layers, range(self.n_frozen, len(layers))):
                decoder(input_ids=ids, attention_mask=mask, use_cache=False)
        finally:
            handle.remove()
        states = captured["states"]  # (b, L, H)
        for row, i in enumerate(rows):
            kept = states[row, : int(lengths[i])].detach().clone()
            size = kept.numel() * kept.element_size()
            if self.bytes + size > self.max_bytes:
                if not self.full:
                    logger.warning(
                        "prefix cache full at %d texts (%.0f MiB): later texts run uncached",
                        len(self._states),
                        self.bytes / 2**20,
                    )
                self.full = True
                continue
            self._states[keys[i]] = kept
            self.bytes += size

    def _assemble(self, keys, lengths, width: int) -> list[Tensor | None]:
        out: list[Tensor | None] = []
        for key, n in zip(keys, lengths, strict=True):
            states = self._states.get(key)
            if states is None:
                out.append(None)
                continue
            if states.is_inference() and torch.is_grad_enabled():
                states = (
                    states.clone()
                )  # cached under inference_mode (an evaluation), used in training
            pad = width - int(n)
            if pad:
                states = torch.cat([states, states.new_zeros(pad, states.shape[1])])
            out.append(states)
        return out
