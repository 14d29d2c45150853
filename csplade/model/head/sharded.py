"""The module call that lets a sharding engine gather the LM head's weight for the fused head.

Reading a weight outside the module that owns it is what sharding engines cannot see, so the encoder
runs the fused head inside a module of its own, :class:`HeadCall`:

- DeepSpeed ZeRO-3 partitions every parameter and gathers a module's parameters in that module's
  forward pre-hook, again in its pre-backward hook, and releases them after each. The head's
  parameters (the LM-head weight and bias, tied or not, and LoRA factors on the head) are registered
  as *external parameters* of :class:`HeadCall` (``deepspeed.zero.register_external_parameter``),
  so the engine gathers them for the head's forward and for its backward, through its own hooks.
- FSDP2 (``fully_shard``) unshards the root module's parameters (the embeddings, the final norm, the
  LM head: everything outside the per-layer groups) in the root's forward pre-hook and keeps them
  unsharded until its backward is done, so inside the encoder's forward the weight is a plain tensor.

Known limits: with LoRA on the LM head the folded weight (base + delta) is a (V, H) tensor kept for
the backward of each head call (the frozen base alone is re-gathered instead).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class HeadCall(nn.Module):
    """Runs the fused head as a call of its own module, so a ZeRO-3 engine gathers its weight.

    ``head_call(run, hidden, mask, *rest)`` returns ``run(hidden, mask, *rest)``. The tensors go
    through the module's arguments (not a closure) so the engine's hooks see them: the output
    triggers the re-gather before the head's backward, the hidden states the release after it.
    :meth:`register` makes parameters external parameters of this module (ZeRO-3 only); without
    an engine the call is a plain function call. It holds no parameters of its own.
    """

    def __init__(self) -> None:
        super().__init__()
        self._external: set[int] = set()

    def register(self, params: list[nn.Parameter]) -> None:
        """Make `params` (ZeRO-3 parameters) gathered around this module's forward and backward."""
        new = [p for p in params if id(p) not in self._external]
        if not new:
            return
        try:
            import deepspeed
        except ImportError as exc:  # partitioned parameters without deepspeed cannot happen
            raise ImportError("ZeRO-3 parameters need deepspeed: pip install deepspeed") from exc
        for param in new:
            deepspeed.zero.register_external_parameter(self, param)
            self._external.add(id(param))

    def forward(self, run, *tensors: Any) -> torch.Tensor:
        return run(*tensors)
