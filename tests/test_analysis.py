"""The interaction-analysis API: definitions against autograd derivatives of the
reference decoder, exact top-N search against brute force, sparse co-occurrence
statistics against dense counts, and steering on a tiny HookedSAETransformer."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
from scipy import stats as scipy_stats

from polysae_lens import analysis
from polysae_lens.polynomial import poly_decode_reference

from .conftest import D_IN, D_SAE, activations, make_training_sae
from .lm_fixtures import make_tiny_sae_transformer


def _decode_pair(sae: Any, idx: list[int]) -> Any:
    """x^ as a function of the magnitudes of the latents in ``idx`` (others zero)."""
    w = analysis.poly_weights(sae)
    index = torch.tensor(idx)

    def f(v: torch.Tensor) -> torch.Tensor:
        z = torch.zeros(D_SAE, dtype=v.dtype).index_put((index,), v)
        return poly_decode_reference(z[None], w)[0]

    return f


@pytest.mark.parametrize("order", [2, 3])
def test_interaction_direction_is_the_mixed_second_derivative_at_zero(order: int) -> None:
    sae = make_training_sae("poly", order=order)
    for i, j in [(0, 1), (5, 40), (47, 3)]:
        f = _decode_pair(sae, [i, j])
        jac2 = torch.autograd.functional.jacobian(
            lambda v, f=f: torch.autograd.functional.jacobian(f, v, create_graph=True),
            torch.zeros(2),
        )  # [D, 2, 2]
        torch.testing.assert_close(analysis.interaction_direction(sae, i, j), jac2[:, 0, 1])
    # Broadcasting over index tensors gives the same rows.
    ii, jj = torch.tensor([0, 5, 47]), torch.tensor([1, 40, 3])
    rows = analysis.interaction_direction(sae, ii, jj)
    assert rows.shape == (3, D_IN)
    torch.testing.assert_close(rows[1], analysis.interaction_direction(sae, 5, 40))
    torch.testing.assert_close(analysis.interaction_strength(sae, ii, jj), rows.norm(dim=-1))


def test_triple_direction_is_the_third_derivative_at_zero() -> None:
    sae = make_training_sae("poly", order=3)
    i, j, k = 2, 9, 30
    f = _decode_pair(sae, [i, j, k])

    def third(v: torch.Tensor) -> torch.Tensor:
        def second(u: torch.Tensor) -> torch.Tensor:
            return torch.autograd.functional.jacobian(f, u, create_graph=True)[:, 0]

        return torch.autograd.functional.jacobian(second, v, create_graph=True)[:, 1]

    d3 = torch.autograd.functional.jacobian(third, torch.zeros(3))[:, 2]
    torch.testing.assert_close(analysis.triple_direction(sae, i, j, k), d3)


def test_pair_effect_is_z_i_z_j_v_ij_at_order_two_and_adds_cubic_terms_at_three() -> None:
    sae2 = make_training_sae("poly", order=2)
    effect = analysis.pair_effect(sae2, 4, 17, z_i=1.5, z_j=-0.7)
    torch.testing.assert_close(effect, 1.5 * -0.7 * analysis.interaction_direction(sae2, 4, 17))
    sae3 = make_training_sae("poly", order=3)
    f = _decode_pair(sae3, [4, 17])
    expected = (
        f(torch.tensor([1.5, -0.7]))
        - f(torch.tensor([1.5, 0.0]))
        - f(torch.tensor([0.0, -0.7]))
        + f(torch.zeros(2))
    )
    torch.testing.assert_close(analysis.pair_effect(sae3, 4, 17, 1.5, -0.7), expected)


def _brute_force_pairs(sae: Any, include_self: bool) -> tuple[torch.Tensor, torch.Tensor]:
    ii, jj = torch.triu_indices(D_SAE, D_SAE, offset=0 if include_self else 1)
    return torch.stack((ii, jj), 1), analysis.interaction_strength(sae, ii, jj)


@pytest.mark.parametrize("block_size", [1, 7, 16, 1024])
@pytest.mark.parametrize("include_self", [False, True])
def test_top_pairs_match_brute_force(block_size: int, include_self: bool) -> None:
    sae = make_training_sae("poly", order=2, seed=3)
    pairs, strength = _brute_force_pairs(sae, include_self)
    top = analysis.top_interacting_pairs(
        sae, n=25, include_self=include_self, block_size=block_size
    )
    order = strength.argsort(descending=True)[:25]
    torch.testing.assert_close(top.strength_P, strength[order], rtol=1e-5, atol=1e-7)
    assert torch.equal(top.pairs_P2, pairs[order])
    assert (top.pairs_P2[:, 0] <= top.pairs_P2[:, 1]).all()
    if not include_self:
        assert (top.pairs_P2[:, 0] < top.pairs_P2[:, 1]).all()


def test_top_pairs_restricted_to_latents_and_more_than_exist() -> None:
    sae = make_training_sae("poly", order=3, seed=1)
    subset = [3, 11, 12, 30, 41]
    top = analysis.top_interacting_pairs(sae, n=100, latents=subset, block_size=2)
    assert top.pairs_P2.shape == (10, 2)  # all 5 * 4 / 2 pairs, no more
    assert set(top.pairs_P2.flatten().tolist()) == set(subset)
    expected = analysis.interaction_strength(sae, top.pairs_P2[:, 0], top.pairs_P2[:, 1])
    torch.testing.assert_close(top.strength_P, expected, rtol=1e-5, atol=1e-7)
    assert (top.strength_P[:-1] >= top.strength_P[1:]).all()


def test_top_partners_match_brute_force() -> None:
    sae = make_training_sae("poly", order=2, seed=2)
    others = torch.tensor([j for j in range(D_SAE) if j != 10])
    strength = analysis.interaction_strength(sae, torch.full_like(others, 10), others)
    top = analysis.top_partners(sae, 10, n=5)
    order = strength.argsort(descending=True)[:5]
    assert (top.pairs_P2[:, 0] == 10).all()
    assert torch.equal(top.pairs_P2[:, 1], others[order])
    torch.testing.assert_close(top.strength_P, strength[order])


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="poly_order=1"):
        analysis.interaction_direction(make_training_sae("poly", order=1), 0, 1)
    with pytest.raises(ValueError, match="no cubic term"):
        analysis.triple_direction(make_training_sae("poly", order=2), 0, 1, 2)
    sae = make_training_sae("poly", order=2)
    with pytest.raises(IndexError, match=f"allowed 0..{D_SAE - 1}"):
        analysis.interaction_strength(sae, 0, D_SAE)
    with pytest.raises(ValueError, match="n must be >= 1"):
        analysis.top_interacting_pairs(sae, n=0)
    linear = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4))
    with pytest.raises(TypeError, match="linear SAE has no interaction"):
        analysis.interaction_direction(linear, 0, 1)
    with pytest.raises(ValueError, match="kind must be one of"):
        analysis.steering_vector(sae, 0, 1, kind="sum")  # type: ignore[arg-type]


def _dense_cooccurrence(sae: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        z = sae.encode(x).double()
    fired = (z != 0).double()
    counts = fired.T @ fired
    cov = z.T @ z / z.shape[0] - z.mean(0)[:, None] * z.mean(0)[None, :]
    return counts, cov


@pytest.mark.parametrize("arch", ["poly", "poly_jumprelu", "linear_topk"])
def test_cooccurrence_stats_match_dense_counts(arch: str) -> None:
    if arch == "linear_topk":
        torch.manual_seed(0)
        sae: Any = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4))
    else:
        sae = make_training_sae(arch)
    x = activations(300, seed=5)
    stats = analysis.cooccurrence_stats(sae, x, batch_size=64)
    counts, cov = _dense_cooccurrence(sae, x)
    upper = torch.triu(counts, diagonal=1)
    assert stats.pairs_P2.shape[0] == int((upper > 0).sum()) > 0
    i, j = stats.pairs_P2[:, 0], stats.pairs_P2[:, 1]
    assert (i < j).all()
    assert torch.equal(stats.count_P, counts[i, j].long())
    torch.testing.assert_close(stats.frequency_P, (counts[i, j] / 300).float())
    torch.testing.assert_close(stats.covariance_P, cov[i, j].float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(stats.firing_rate_F, (counts.diagonal() / 300).float())
    assert stats.n_samples == 300

    # The same statistics from an iterable of batches, and the min_count filter.
    again = analysis.cooccurrence_stats(sae, iter(x.split(100)))
    assert torch.equal(again.pairs_P2, stats.pairs_P2)
    assert torch.equal(again.count_P, stats.count_P)
    frequent = analysis.cooccurrence_stats(sae, x, min_count=3)
    assert (frequent.count_P >= 3).all()
    assert frequent.pairs_P2.shape[0] == int((upper >= 3).sum())


def test_cooccurrence_correlations_use_the_right_quantities() -> None:
    sae = make_training_sae("poly", order=2)
    stats = analysis.cooccurrence_stats(sae, activations(400, seed=7))
    strength = analysis.interaction_strength(sae, stats.pairs_P2[:, 0], stats.pairs_P2[:, 1])
    got = analysis.interaction_vs_cooccurrence(sae, stats)
    assert got.n == stats.pairs_P2.shape[0]
    assert math.isclose(
        got.pearson,
        float(np.corrcoef(strength.double(), stats.frequency_P.double())[0, 1]),
        rel_tol=1e-6,
    )
    cov = analysis.covariance_vs_cooccurrence(stats)
    expected = scipy_stats.spearmanr(stats.covariance_P.numpy(), stats.frequency_P.numpy())
    assert math.isclose(cov.spearman, float(expected.statistic), rel_tol=1e-6)


def test_correlate_handles_constants_and_mismatch() -> None:
    x = torch.arange(10.0)
    assert analysis.correlate(x, 2 * x + 1).pearson == pytest.approx(1.0)
    assert analysis.correlate(x, -(x**3)).spearman == pytest.approx(-1.0)
    assert math.isnan(analysis.correlate(x, torch.ones(10)).pearson)
    with pytest.raises(ValueError, match="same length"):
        analysis.correlate(x, x[:5])
    with pytest.raises(ValueError, match="empty"):
        analysis.cooccurrence_stats(make_training_sae("poly"), torch.empty(0, D_IN))


def test_steering_adds_the_scaled_vector_and_changes_generation() -> None:
    model = make_tiny_sae_transformer()
    sae = make_training_sae("poly", order=2)
    hook = "blocks.0.hook_resid_post"
    first = analysis.steering_vector(sae, 3, 8, kind="first_order")
    torch.testing.assert_close(first, sae.W_dec[3].detach() + sae.W_dec[8].detach())
    inter = analysis.steering_vector(sae, 3, 8, kind="interaction")
    torch.testing.assert_close(inter, analysis.interaction_direction(sae, 3, 8))

    toks = model.to_tokens("The cat sat on the mat.")
    with torch.no_grad():
        _, base = model.run_with_cache(toks, names_filter=hook)
        with analysis.steering_hooks(model, hook, first, scale=4.0):
            _, steered = model.run_with_cache(toks, names_filter=hook)
    torch.testing.assert_close(steered[hook] - base[hook], (4.0 * first).expand_as(base[hook]))

    # Greedy generation is deterministic; a large push changes what is generated.
    plain = analysis.generate_steered(
        model, "The cat", hook, first, 0.0, max_new_tokens=8, do_sample=False
    )
    pushed = analysis.generate_steered(
        model, "The cat", hook, first / first.norm(), 200.0, max_new_tokens=8, do_sample=False
    )
    assert plain.startswith("The cat") and pushed.startswith("The cat")
    assert plain != pushed
    # The hook is removed afterwards.
    with torch.no_grad():
        _, after = model.run_with_cache(toks, names_filter=hook)
    torch.testing.assert_close(after[hook], base[hook])
    with pytest.raises(ValueError, match="not a hook point"):
        analysis.steering_hooks(model, "blocks.9.hook_resid_post", first, 1.0)
