"""The vectorised Wasserstein-1 against scipy, its scale-free variant, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance

from polysae_lens.evals import (
    standardized_wasserstein_per_latent,
    wasserstein_per_latent,
    wasserstein_stats,
)
from polysae_lens.evals import wasserstein as wasserstein_module


@pytest.fixture(params=["numpy", "torch"])
def chunk_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test through each per-chunk implementation: CPU float inputs take the
    numpy one; "torch" forces the one CUDA and bf16 inputs take."""
    if request.param == "torch":
        monkeypatch.setattr(
            wasserstein_module, "_chunk_stats", wasserstein_module._chunk_stats_torch
        )
    return str(request.param)


def scipy_w1(latents: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    x = latents.double().numpy()
    pos = labels.bool().numpy()
    return np.array([wasserstein_distance(x[pos, f], x[~pos, f]) for f in range(x.shape[1])])


def sparse_latents(
    n: int, f: int, seed: int, density: float = 0.3, integer: bool = False
) -> torch.Tensor:
    """Mostly-zero latents with ties (integer values), negatives, dead and constant
    latents, and one dense column."""
    gen = torch.Generator().manual_seed(seed)
    if integer:
        values = torch.randint(-3, 4, (n, f), generator=gen).float()
    else:
        values = torch.randn(n, f, generator=gen) * torch.randn(f, generator=gen).exp()
    latents = values * (torch.rand(n, f, generator=gen) < density)
    latents[:, 0] = 0.0  # dead
    latents[:, 1] = 2.5  # constant, nonzero
    latents[:, 2] = torch.randn(n, generator=gen)  # dense
    return latents


def labels_of(n: int, frac: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, generator=gen) < frac).long()
    labels[0], labels[1] = 0, 1  # both classes, whatever the draw
    return labels


@pytest.mark.parametrize(
    ("n", "frac", "integer", "chunk"),
    [
        (300, 0.5, False, 1 << 21),  # balanced, one chunk
        (301, 0.2, True, 301 * 7),  # unequal classes, ties, several chunks
        (97, 0.9, True, 97 * 3),  # very unequal, many ties
        (50, 0.5, False, 1),  # one latent per chunk
    ],
)
def test_matches_scipy(n: int, frac: float, integer: bool, chunk: int, chunk_backend: str) -> None:
    latents = sparse_latents(n, 40, seed=n, integer=integer)
    labels = labels_of(n, frac, seed=n + 1)
    stats = wasserstein_stats(latents, labels, chunk_elements=chunk)
    expected = scipy_w1(latents, labels)
    np.testing.assert_allclose(stats.distance.numpy(), expected, rtol=1e-6, atol=0)
    assert stats.distance.dtype == torch.float64
    assert stats.distance[0] == 0 and stats.distance[1] == 0  # dead and constant latents
    np.testing.assert_allclose(
        stats.std.numpy(), latents.double().numpy().std(axis=0), rtol=1e-9, atol=1e-12
    )


def test_all_zero_and_all_nonzero_latents(chunk_backend: str) -> None:
    gen = torch.Generator().manual_seed(0)
    labels = labels_of(64, 0.4, seed=1)
    dead = torch.zeros(64, 5)
    dense = torch.rand(64, 5, generator=gen) + 0.1
    assert torch.equal(wasserstein_per_latent(dead, labels), torch.zeros(5, dtype=torch.float64))
    np.testing.assert_allclose(
        wasserstein_per_latent(dense, labels).numpy(), scipy_w1(dense, labels), rtol=1e-6
    )
    assert torch.equal(
        standardized_wasserstein_per_latent(dead, labels), torch.zeros(5, dtype=torch.float64)
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int32])
def test_input_dtypes(dtype: torch.dtype) -> None:
    latents = sparse_latents(120, 16, seed=3, integer=True).to(dtype)
    labels = labels_of(120, 0.3, seed=4).bool()
    np.testing.assert_allclose(
        wasserstein_per_latent(latents, labels).numpy(),
        scipy_w1(latents.double(), labels),
        rtol=1e-6,
        atol=0,
    )


def test_column_major_input_and_label_forms_agree() -> None:
    latents = sparse_latents(80, 12, seed=5)
    labels = labels_of(80, 0.5, seed=6)
    reference = wasserstein_per_latent(latents, labels)
    column_major = latents.T.contiguous().T
    assert not column_major.is_contiguous()
    torch.testing.assert_close(wasserstein_per_latent(column_major, labels), reference)
    torch.testing.assert_close(wasserstein_per_latent(latents, labels.bool()), reference)
    torch.testing.assert_close(wasserstein_per_latent(latents, labels.double()), reference)
    torch.testing.assert_close(wasserstein_per_latent(latents.numpy(), labels.numpy()), reference)
    # straight from an SAE forward pass, outside no_grad
    torch.testing.assert_close(
        wasserstein_per_latent(latents.clone().requires_grad_(), labels), reference
    )


def test_known_value() -> None:
    # class 1 at {0, 1}, class 0 at {0, 0}: W1 = 0.5; pooled std = sqrt(3/16).
    latents = torch.tensor([[0.0], [1.0], [0.0], [0.0]])
    labels = torch.tensor([1, 1, 0, 0])
    stats = wasserstein_stats(latents, labels)
    assert stats.distance.item() == pytest.approx(0.5, rel=1e-12)
    assert stats.std.item() == pytest.approx((3 / 16) ** 0.5, rel=1e-12)
    assert stats.standardized.item() == pytest.approx(0.5 / (3 / 16) ** 0.5, rel=1e-12)


def test_standardized_is_scale_and_shift_free_and_w1_is_not() -> None:
    latents = sparse_latents(150, 10, seed=7)
    labels = labels_of(150, 0.5, seed=8)
    w1 = wasserstein_per_latent(latents, labels)
    z = standardized_wasserstein_per_latent(latents, labels)
    scaled = 7.0 * latents - 3.0
    torch.testing.assert_close(wasserstein_per_latent(scaled, labels), 7.0 * w1, rtol=1e-6, atol=0)
    torch.testing.assert_close(
        standardized_wasserstein_per_latent(scaled, labels), z, rtol=1e-6, atol=1e-12
    )
    # negation mirrors both distributions: W1 unchanged
    torch.testing.assert_close(wasserstein_per_latent(-latents, labels), w1, rtol=1e-9, atol=0)
    alive = w1 > 0
    torch.testing.assert_close(z[alive], w1[alive] / latents.double().std(0, correction=0)[alive])
    assert z[0] == 0 and z[1] == 0  # dead and constant latents


def test_swapping_the_classes_changes_nothing() -> None:
    latents = sparse_latents(90, 8, seed=9)
    labels = labels_of(90, 0.3, seed=10)
    torch.testing.assert_close(
        wasserstein_per_latent(latents, 1 - labels),
        wasserstein_per_latent(latents, labels),
        rtol=1e-12,
        atol=0,
    )


@pytest.mark.parametrize(
    ("latents", "labels", "message"),
    [
        (torch.zeros(4, 3), torch.tensor([0, 1, 2, 1]), "binary"),
        (torch.zeros(4, 3), torch.tensor([1, 1, 1, 1]), "only class 1"),
        (torch.zeros(4, 3), torch.tensor([0, 0, 0, 0]), "only class 0"),
        (torch.zeros(4, 3), torch.tensor([0, 1, 1]), "3 entries"),
        (torch.zeros(4), torch.tensor([0, 1, 1, 0]), "2-D"),
        (torch.zeros(0, 3), torch.zeros(0), "empty"),
        (torch.zeros(4, 3), torch.tensor([0.0, 1.0, float("nan"), 1.0]), "NaN"),
    ],
)
def test_bad_input_is_named(latents: torch.Tensor, labels: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        wasserstein_per_latent(latents, labels)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_latents_are_named(bad: float, chunk_backend: str) -> None:
    latents = sparse_latents(20, 6, seed=11)
    latents[7, 4] = bad
    with pytest.raises(ValueError, match=r"non-finite .* sample 7, latent 4"):
        wasserstein_per_latent(latents, labels_of(20, 0.5, seed=12))
