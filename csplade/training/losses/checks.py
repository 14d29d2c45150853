"""Input checks shared by the losses: a wrong shape fails with both shapes named, never broadcasts."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_matrix(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} has no rows (shape {tuple(t.shape)})")


def check_groups(q_reps: Tensor, d_reps: Tensor, group_size: int) -> None:
    """``d_reps`` (B * n, V) holds one group of ``group_size`` documents per query of ``q_reps`` (B, V)."""
    check_matrix("q_reps", q_reps)
    check_matrix("d_reps", d_reps)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(
            f"group_size must be an int >= 1 (1 positive + #negatives), got {group_size!r}"
        )
    shapes = f"(shapes: q_reps {tuple(q_reps.shape)}, d_reps {tuple(d_reps.shape)})"
    if q_reps.shape[1] != d_reps.shape[1]:
        raise ValueError(f"q_reps and d_reps have different vocabulary sizes {shapes}")
    if d_reps.shape[0] % group_size != 0:
        raise ValueError(
            f"d_reps has {d_reps.shape[0]} rows, not a multiple of group_size={group_size} {shapes}"
        )
    n_queries = d_reps.shape[0] // group_size
    if n_queries != q_reps.shape[0]:
        raise ValueError(
            f"d_reps holds {n_queries} groups of {group_size} but q_reps has {q_reps.shape[0]} "
            f"queries {shapes}"
        )


def check_scores(student_scores: Tensor, teacher_scores: Tensor, min_group: int) -> None:
    check_matrix("student_scores", student_scores)
    check_matrix("teacher_scores", teacher_scores)
    if student_scores.shape != teacher_scores.shape:
        raise ValueError(
            f"student_scores {tuple(student_scores.shape)} and teacher_scores "
            f"{tuple(teacher_scores.shape)} must have the same (B, n) shape"
        )
    if student_scores.shape[1] < min_group:
        raise ValueError(
            f"scores need at least {min_group} columns (positive first, then negatives), got shape "
            f"{tuple(student_scores.shape)}"
        )


def check_temperature(temperature: float) -> None:
    if not (
        isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def check_idf(idf: Tensor, reps: Tensor) -> None:
    if not isinstance(idf, Tensor):
        raise TypeError(f"idf must be a torch.Tensor of shape (V,), got {type(idf).__name__}")
    if idf.shape != (reps.shape[1],):
        raise ValueError(
            f"idf must have shape (V,) = ({reps.shape[1]},) to match reps {tuple(reps.shape)}, "
            f"got {tuple(idf.shape)}"
        )
    bad = torch.nonzero(~(idf > 0) | ~torch.isfinite(idf))
    if bad.numel():
        i = int(bad[0, 0])
        raise ValueError(
            f"idf must be finite and > 0 everywhere ({bad.numel()} bad entries); first at index {i}: "
            f"{float(idf[i])}. Clamp it, e.g. idf.clamp_min(1e-3)"
        )
