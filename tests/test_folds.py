"""Folding activation normalisation into the weights preserves the function."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from .conftest import D_IN, activations, make_training_sae


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@torch.no_grad()
def assert_fold_preserves_function(
    sae: Any,
    x: torch.Tensor,
    to_trained_space: Callable[[torch.Tensor], torch.Tensor],
    from_trained_space: Callable[[torch.Tensor], torch.Tensor],
    fold: Callable[[], None],
) -> None:
    """The folded SAE on raw x equals the original SAE wrapped in the transform."""
    z_ref = sae.encode(to_trained_space(x))
    out_ref = from_trained_space(sae.decode(z_ref))
    fold()
    z = sae.encode(x)
    assert sae.cfg.normalize_activations == "none"
    assert torch.equal(z != 0, z_ref != 0)
    _close(z, z_ref)
    _close(sae.decode(z), out_ref)


@pytest.mark.parametrize("scaling_factor", [0.37, 4.0])
def test_fold_norm_scaling_factor_preserves_function(arch: str, scaling_factor: float) -> None:
    sae = make_training_sae(arch, normalize_activations="expected_average_only_in")
    sae.eval()
    x = activations() * 3
    assert_fold_preserves_function(
        sae,
        x,
        lambda x: x * scaling_factor,
        lambda out: out / scaling_factor,
        lambda: sae.fold_activation_norm_scaling_factor(scaling_factor),
    )


@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
def test_fold_whitening_preserves_function(arch: str, apply_b_dec_to_input: bool) -> None:
    sae = make_training_sae(
        arch,
        normalize_activations="covariance_whitening",
        apply_b_dec_to_input=apply_b_dec_to_input,
    )
    sae.eval()
    gen = torch.Generator().manual_seed(7)
    mean = torch.randn(D_IN, generator=gen)
    M = torch.eye(D_IN) + 0.2 * torch.randn(D_IN, D_IN, generator=gen)
    M_inv = torch.linalg.inv(M)
    x = activations() + mean
    assert_fold_preserves_function(
        sae,
        x,
        lambda x: (x - mean) @ M,
        lambda out: out @ M_inv + mean,
        lambda: sae.fold_activation_whitening(mean, M, M_inv),
    )
