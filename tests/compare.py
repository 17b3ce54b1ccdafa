"""Comparing the state dicts of runs that must agree."""

from __future__ import annotations

import torch


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / |b|`` (Frobenius) for floating tensors; 0 or inf for counts
    (such as AuxK's ``steps_since_fired``), which must agree exactly."""
    if not b.is_floating_point():
        return 0.0 if torch.equal(a, b) else float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
