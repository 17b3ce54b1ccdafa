"""Comparing the state dicts of runs that must agree."""

from __future__ import annotations

import torch


def least_squares_residual(d_BD: torch.Tensor, rows: list[torch.Tensor]) -> torch.Tensor:
    """What is left of each row of ``d_BD`` (float64) after its least-squares fit
    by ``rows``: its component outside their row space."""
    basis = torch.cat(rows).double()  # [S, D]
    coef = torch.linalg.lstsq(basis.T, d_BD.double().T).solution.T
    return d_BD.double() - coef @ basis


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / |b|`` (Frobenius) for floating tensors; 0 or inf for counts
    (such as AuxK's ``steps_since_fired``), which must agree exactly."""
    if not b.is_floating_point():
        return 0.0 if torch.equal(a, b) else float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
