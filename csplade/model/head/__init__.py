"""The SPLADE head, in one place: LM-head weight -> log(1 + ReLU) -> pooling over tokens.

- ``pooling``: the fused (vocabulary-chunked) heads and their naive twins; ``sparse_pool``.
- ``weights``: where the LM head's (V, H) weight comes from (plain, LoRA-folded; sharded refused).
- ``sharded``: ``HeadCall``, the module call in which ZeRO-3 gathers that weight.
- ``splade``: the head of an encoder (the path on the weight, or the module call), its bias and scale.
- ``quantized``: a quantized LM head (and tied input embeddings that read from it).
- ``calibration``: the per-term head bias, calibrated to a document frequency.
"""

from csplade.model.head.pooling import (
    POOLINGS,
    default_chunk_size,
    fused_max_pool,
    fused_sum_pool,
    max_pooled_logits,
    naive_max_pool,
    naive_sum_pool,
    sparse_pool,
    splade_activation,
)

__all__ = [
    "POOLINGS", "default_chunk_size", "fused_max_pool", "fused_sum_pool", "max_pooled_logits",
    "naive_max_pool",
    "naive_sum_pool", "sparse_pool", "splade_activation",
]  # fmt: skip
