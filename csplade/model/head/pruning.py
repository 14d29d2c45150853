"""What an encoder keeps of its pooled vectors: weights over a threshold, each row's top k, as CSR."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch


def prune(reps: torch.Tensor, top_k: int | None, threshold: float | None) -> torch.Tensor:
    """`reps` with weights below `threshold` zeroed, then each row's `top_k` largest kept."""
    if threshold is not None:
        reps = torch.where(reps >= threshold, reps, torch.zeros_like(reps))
    if top_k is not None:
        reps = keep_top_k(reps, top_k)
    return reps


def keep_top_k(reps: torch.Tensor, k: int) -> torch.Tensor:
    """(B, V) `reps` with each row's `k` largest values kept and the rest zeroed (differentiable
    through the kept ones)."""
    if k >= reps.shape[1]:
        return reps
    values, ids = reps.topk(k, dim=1)
    return torch.zeros_like(reps).scatter(1, ids, values)


def to_csr(reps: torch.Tensor) -> sp.csr_matrix:
    """(B, V) vectors as the float32 CSR rows `encode` returns."""
    dense = reps.detach().float().cpu().numpy()
    return sp.csr_matrix(dense, dtype=np.float32)
