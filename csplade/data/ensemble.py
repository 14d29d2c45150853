"""A teacher ensemble's score: each teacher's scores normalised per query, then their weighted sum.

Teachers score on different scales (cosines in [-1, 1], sparse dot products in the tens, cross-encoder
logits), so arXiv 2411.04403 normalises each teacher's scores over one query's documents (min-max or
z-score) before combining them (:func:`csplade.data.teachers.score_groups` writes both).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

NORMALIZATIONS = ("minmax", "zscore", "none")


def normalize_scores(scores: Sequence[float], method: str) -> np.ndarray:
    """One query's scores, normalised: min-max to [0, 1], z-score, or unchanged.

    A query whose scores are all equal gets zeros (no preference, rather than a division by zero).
    """
    if method not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {method!r}; allowed: {', '.join(NORMALIZATIONS)}")
    values = np.asarray(scores, dtype=np.float64)
    if method == "none" or values.size == 0:
        return values
    if method == "minmax":
        span = values.max() - values.min()
        return (values - values.min()) / span if span > 0 else np.zeros_like(values)
    std = values.std()
    return (values - values.mean()) / std if std > 0 else np.zeros_like(values)


def ensemble(
    per_teacher: dict[str, Sequence[float]], weights: dict[str, float], method: str
) -> np.ndarray:
    """Weighted sum of per-query normalised scores of several teachers for one query's documents."""
    if set(per_teacher) != set(weights):
        raise ValueError(f"weights {sorted(weights)} must name the teachers {sorted(per_teacher)}")
    lengths = {name: len(s) for name, s in per_teacher.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"teachers scored different numbers of documents: {lengths}")
    total = None
    for name, scores in per_teacher.items():
        part = weights[name] * normalize_scores(scores, method)
        total = part if total is None else total + part
    return total
