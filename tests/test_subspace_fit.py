"""The subspace fit (``subspace_fit_step``): the interaction terms' directions
fitted to the data once during training (:mod:`polysae_lens.subspace_fit`).

References are independent of the package: numpy's least squares over
explicitly listed products, planted quadratic directions, and the properties a
turn along the gauge must keep (U orthonormal, U @ C1 unchanged)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
import torch
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import TrainStepInput
from sae_lens.training.sae_trainer import SAETrainer

import polysae_lens
from polysae_lens import PolyTopKTrainingSAE, PolyTopKTrainingSAEConfig, orthogonality_error
from polysae_lens.config import PAPER_TRAINING_SETTINGS, PREVIOUS_TRAINING_DEFAULTS
from polysae_lens.polynomial import PolyDecoderWeights
from polysae_lens.subspace_fit import (
    SubspaceFitRows,
    apply_subspace_fit_,
    default_rows,
    fit_interaction_subspace,
    in_window,
    orthogonal_completion,
    quadratic_forms,
    refit_interaction_terms,
)

D_IN, D_SAE, K = 10, 40, 3


def numpy_forms(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``M_j`` of ``y_j ~ a^T M_j a + a . l_j + c_j`` by numpy's lstsq over the
    products listed one by one."""
    R = a.shape[1]
    pairs = [(p, q) for p in range(R) for q in range(p, R)]
    feats = np.column_stack([a[:, p] * a[:, q] for p, q in pairs] + [a, np.ones(len(a))])
    coef = np.linalg.lstsq(feats, y, rcond=None)[0]
    M = np.zeros((y.shape[1], R, R))
    for i, (p, q) in enumerate(pairs):
        value = coef[i] if p == q else coef[i] / 2
        M[:, p, q] = value
        M[:, q, p] = value
    return M


def test_quadratic_forms_equal_the_plain_least_squares_fit() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(600, 5, generator=gen, dtype=torch.float64) + 0.3
    y = torch.randn(600, 3, generator=gen, dtype=torch.float64)
    y = y + (a[:, :1] * a[:, 2:3]) * torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    M, relative = quadratic_forms(a, y, iterations=200)
    expected = numpy_forms(a.numpy(), y.numpy())
    np.testing.assert_allclose(M.numpy(), expected, rtol=1e-6, atol=1e-8)
    assert relative < 1e-8
    # a single CG iteration is not the solution (the comparison is not vacuous)
    M1, _ = quadratic_forms(a, y, iterations=1)
    assert np.abs(M1.numpy() - expected).max() > 1e-3


def test_quadratic_forms_with_zero_residual_are_zero() -> None:
    a = torch.randn(100, 4, dtype=torch.float64)
    M, relative = quadratic_forms(a, torch.zeros(100, 2, dtype=torch.float64), iterations=10)
    assert torch.equal(M, torch.zeros(2, 4, 4, dtype=torch.float64))
    assert relative == 0.0


def test_refit_equals_the_plain_least_squares_fit() -> None:
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(300, 6, generator=gen, dtype=torch.float64)
    r = torch.randn(300, 4, generator=gen, dtype=torch.float64)
    quad, cubic = refit_interaction_terms(a, r, 2, 3)
    feats = np.column_stack([a[:, :2] ** 2, a[:, :3] ** 3, a, np.ones(300)])
    coef = np.linalg.lstsq(feats, r.numpy(), rcond=None)[0]
    np.testing.assert_allclose(quad.numpy(), coef[:2], rtol=1e-8, atol=1e-10)
    assert cubic is not None
    np.testing.assert_allclose(cubic.numpy(), coef[2:5], rtol=1e-8, atol=1e-10)
    assert refit_interaction_terms(a, r, 2, 0)[1] is None


def test_orthogonal_completion_keeps_the_given_columns() -> None:
    V, _ = torch.linalg.qr(torch.randn(7, 3, dtype=torch.float64))
    Q = orthogonal_completion(V)
    assert torch.equal(Q[:, :3], V)
    torch.testing.assert_close(Q.T @ Q, torch.eye(7, dtype=torch.float64))


def planted(order: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Rows of sparse codes' projections ``a`` [N, 8] and a residual made of two
    planted squared directions (and a cubic one at order 3) plus linear parts."""
    gen = torch.Generator().manual_seed(seed)
    N, R = 6000, 8
    z = torch.rand(N, 30, generator=gen, dtype=torch.float64)
    z = torch.where(z > 0.85, z, torch.zeros_like(z))
    a = z @ torch.randn(30, R, generator=gen, dtype=torch.float64) / 3
    dirs, _ = torch.linalg.qr(torch.randn(R, 2, generator=gen, dtype=torch.float64))
    out = torch.randn(2, D_IN, generator=gen, dtype=torch.float64)
    r = ((a @ dirs) ** 2) @ out + a @ torch.randn(R, D_IN, generator=gen, dtype=torch.float64)
    return a, r + 0.1, (dirs, out)


def weights_for(order: int, lambda2: float = -0.5) -> PolyDecoderWeights:
    R = 8
    U, _ = torch.linalg.qr(torch.randn(20, R))
    return PolyDecoderWeights(
        U,
        torch.randn(R, D_IN),
        torch.zeros(2, D_IN),
        torch.zeros(1, D_IN) if order == 3 else None,
        torch.tensor(lambda2),
        torch.tensor(0.5) if order == 3 else None,
    )


@pytest.mark.parametrize("order", [2, 3])
def test_fit_finds_planted_squared_directions_and_their_outputs(order: int) -> None:
    a, r, (dirs, out) = planted(order)
    fit = fit_interaction_subspace(a, r, weights_for(order), n_outputs=4, iterations=100)
    Q = fit.Q_RR
    torch.testing.assert_close(Q.T @ Q, torch.eye(8, dtype=torch.float64))
    # each fitted column is one planted direction (the basis diagonalises the forms)
    cos = (Q[:, :2].T @ dirs).abs()
    assert sorted(cos.max(0).values.tolist()) == pytest.approx([1.0, 1.0], abs=1e-6)
    match = cos.argmax(0)
    assert sorted(match.tolist()) == [0, 1]
    # lambda2 * C2 reproduces the planted outputs, row by row
    np.testing.assert_allclose((-0.5 * fit.C2_SD[match]).numpy(), out.numpy(), atol=1e-6)
    if order == 3:
        assert fit.C3_TD is not None
        assert fit.C3_TD.abs().max() < 1e-6  # no cubic signal was planted
    else:
        assert fit.C3_TD is None
    # the eigenvalues show two directions and then nothing
    top = fit.top_eigenvalues
    assert top[1] > 1e6 * top[2].abs().clamp_min(1e-300)


def test_fit_refuses_an_order_1_decoder_and_a_zero_lambda2() -> None:
    a, r, _ = planted(2)
    w = weights_for(2)
    with pytest.raises(ValueError, match="order >= 2"):
        fit_interaction_subspace(a, r, w._replace(C2_SD=None, lambda2=None), 4)
    with pytest.raises(ValueError, match="lambda2_init"):
        fit_interaction_subspace(a, r, weights_for(2, lambda2=0.0), 4)


def make(**kwargs: Any) -> PolyTopKTrainingSAE:
    torch.manual_seed(0)
    cfg = {"poly_order": 2, "poly_ranks": (8, 2, 2), **kwargs}
    return PolyTopKTrainingSAE(PolyTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, **cfg))


def test_the_window_ends_at_the_fit_step() -> None:
    cfg = make(subspace_fit_step=10, subspace_fit_rows=100).cfg
    # 100 rows at 32 per step: the 4 steps 7..10 (counted from 1)
    seen = [in_window(cfg, n, 32) for n in range(12)]
    assert [n + 1 for n, (collect, _) in enumerate(seen) if collect] == [7, 8, 9, 10]
    assert [n + 1 for n, (_, last) in enumerate(seen) if last] == [10]
    for off in (None, 0):
        assert not any(in_window(make(subspace_fit_step=off).cfg, n, 32)[0] for n in range(12))
    order1 = make(poly_order=1, subspace_fit_step=10, subspace_fit_rows=100).cfg
    assert not any(in_window(order1, n, 32)[0] for n in range(12))


def test_default_rows_are_twice_the_features_within_bounds() -> None:
    assert default_rows(make().cfg) == 8192  # 2 x (36 + 9) is below the floor
    big = PolyTopKTrainingSAEConfig(d_in=768, d_sae=1536, k=8)
    assert default_rows(big) == 131_072  # 2 x 296,065 is above the ceiling
    mid = PolyTopKTrainingSAEConfig(d_in=128, d_sae=256, k=8)
    assert default_rows(mid) == 2 * (128 * 129 // 2 + 129)


def test_apply_turns_the_basis_refits_c2_and_clears_first_moments() -> None:
    sae = make(subspace_fit_rows=6000)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    x = torch.randn(64, D_IN)
    sae.training_forward_pass(TrainStepInput(x, {}, None, 0, False)).loss.backward()
    opt.step()
    a, r, _ = planted(2)
    rows = SubspaceFitRows()
    rows.collect(a[:3000], r[:3000], last=False)
    assert apply_subspace_fit_(sae, opt) is None  # nothing collected on the SAE yet
    sae._subspace_fit_rows = rows
    assert apply_subspace_fit_(sae, opt) is None  # not ready
    rows.collect(a[3000:], r[3000:], last=True)
    W_dec = sae.W_dec.detach().clone()
    W_enc_moment = opt.state[sae.W_enc]["exp_avg"].clone()
    fit = apply_subspace_fit_(sae, opt)
    assert fit is not None and sae._subspace_fit_rows is None
    torch.testing.assert_close(sae.W_dec.detach(), W_dec, rtol=1e-5, atol=1e-6)
    assert float(orthogonality_error(sae.U)) < 1e-5
    # C2 is the plain least-squares refit on the rotated coordinates (float32 rows)
    a_rot = a.float().double() @ fit.Q_RR
    feats = np.column_stack([a_rot[:, :2] ** 2, a_rot, np.ones(len(a))])
    coef = np.linalg.lstsq(feats, r.float().double().numpy(), rcond=None)[0][:2]
    lam2 = float(sae.lambda2.detach())
    np.testing.assert_allclose(sae.C2.detach().numpy(), coef / lam2, rtol=1e-4, atol=1e-5)
    for p in (sae.U, sae.C1, sae.C2):
        assert not opt.state[p]["exp_avg"].any()
    assert torch.equal(opt.state[sae.W_enc]["exp_avg"], W_enc_moment)


def test_the_trainer_fits_once_at_the_configured_step(caplog: pytest.LogCaptureFixture) -> None:
    sae = make(subspace_fit_step=6, subspace_fit_rows=96)
    gen = torch.Generator().manual_seed(3)
    batches = iter(lambda: torch.randn(32, D_IN, generator=gen), None)
    cfg = SAETrainerConfig(
        total_training_samples=10 * 32, train_batch_size_samples=32, lr=1e-3, lr_end=1e-3
    )
    states = []
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=batches)
    original = trainer._train_step

    def spy(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        rows = sae._subspace_fit_rows if hasattr(sae, "_subspace_fit_rows") else None
        states.append(None if rows is None else rows.count)
        return out

    trainer._train_step = spy  # type: ignore[method-assign]
    with caplog.at_level(logging.INFO, logger="polysae_lens.subspace_fit"):
        trainer.fit()
    fits = [r for r in caplog.records if r.getMessage().startswith("Subspace fit on")]
    assert len(fits) == 1 and "on 96 rows" in fits[0].getMessage()
    # rows collected in steps 4 and 5, the fit after step 6 took them
    assert states == [None, None, None, 32, 64, None, None, None, None, None]
    assert float(orthogonality_error(sae.U)) < 1e-5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"subspace_fit_step": -1}, r"subspace_fit_step=-1 must be an integer >= 1, or 0 or None"),
        ({"subspace_fit_step": 2.5}, "subspace_fit_step=2.5"),
        ({"subspace_fit_rows": True}, "subspace_fit_rows=True"),
        ({"subspace_fit_iterations": None}, "subspace_fit_iterations=None must be a positive"),
        ({"subspace_fit_outputs": 11}, "subspace_fit_outputs=11 exceeds d_in=10"),
        ({"subspace_fit_rows": 12}, r"subspace_fit_rows=12 is too few.*at least 13"),
    ],
)
def test_config_rejects_bad_fit_settings(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make(**kwargs)


def test_the_paper_and_previous_settings_do_not_fit() -> None:
    for settings in (PAPER_TRAINING_SETTINGS, PREVIOUS_TRAINING_DEFAULTS):
        assert make(**settings).cfg.subspace_fit_step is None
    assert make().cfg.subspace_fit_step == 1500


def test_rows_are_not_saved_with_the_sae(tmp_path: Any) -> None:
    sae = make(subspace_fit_step=2, subspace_fit_rows=64)
    x = torch.randn(32, D_IN)
    sae.training_forward_pass(TrainStepInput(x, {}, None, 0, False))
    assert sae._subspace_fit_rows.count == 32
    keys = set(sae.state_dict())
    assert not any("subspace" in k for k in keys)


def test_the_command_line_turns_the_fit_off_with_0() -> None:
    from polysae_lens.cli import parse_train_args

    common = ["--d_in", "10", "--d_sae", "40", "-k", "3", "--model_name", "m", "--hook_name", "h"]
    cfg = parse_train_args([*common, "--dataset_path", "d", "--subspace_fit_step", "0"]).sae
    assert cfg.subspace_fit_step == 0
    assert not any(in_window(cfg, n, 32)[0] for n in range(3000))
    assert parse_train_args([*common, "--dataset_path", "d"]).sae.subspace_fit_step == 1500


def test_the_fit_finds_every_quadratic_direction_of_in_class_data() -> None:
    # the oracle's decoder with its quadratic channels turned away (U's basis rotated
    # at random, C1 turned with it, C2 random): the fit must find the true term's
    # output space again (principal cosines against the planted C2, another module's code)
    from polysae_lens.inclass import (
        InClassConfig,
        build_in_class,
        oracle_sae,
        quadratic_output_cosines,
    )

    truth = build_in_class(
        InClassConfig(d_in=16, num_atoms=48, ranks=(16, 4, 4), k=2, calibration_samples=4096)
    )
    sae = oracle_sae(truth, 2, subspace_fit_rows=8192)
    gen = torch.Generator().manual_seed(5)
    Q, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen))
    with torch.no_grad():
        sae.U.copy_(sae.U @ Q)
        sae.C1.copy_(Q.T @ sae.C1)
        sae.C2.copy_(torch.randn(sae.C2.shape, generator=gen))
    assert quadratic_output_cosines(truth.weights, sae).min() < 0.9  # lost
    # the true codes: the untrained tied encoder of this tiny shape picks wrong latents
    # often enough that its errors, not the quadratic term, dominate the residual
    sample = truth.sample(8192, truth.generator(1))
    x = sample.x_BD
    with torch.no_grad():
        a = sample.z_BN @ sae.U
        rows = SubspaceFitRows()
        rows.collect(a, x - sae.b_dec - a @ sae.C1, last=True)
    sae._subspace_fit_rows = rows
    W_dec = sae.W_dec.detach().clone()
    assert apply_subspace_fit_(sae) is not None
    assert quadratic_output_cosines(truth.weights, sae).min() > 0.99
    torch.testing.assert_close(sae.W_dec.detach(), W_dec, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", list(polysae_lens.ARCHITECTURES))
@pytest.mark.parametrize("order", [2, 3])
def test_every_architecture_fits_once_in_the_trainer(
    arch: str, order: int, caplog: pytest.LogCaptureFixture
) -> None:
    from sae_lens import TrainingSAE

    from .conftest import D_IN as d_in
    from .conftest import sae_cfg_dict

    torch.manual_seed(0)
    sae = TrainingSAE.from_dict(
        sae_cfg_dict(arch, order, subspace_fit_step=4, subspace_fit_rows=64)
    )
    gen = torch.Generator().manual_seed(3)
    cfg = SAETrainerConfig(
        total_training_samples=6 * 32, train_batch_size_samples=32, lr=1e-3, lr_end=1e-3
    )
    trainer = SAETrainer(
        cfg=cfg, sae=sae, data_provider=iter(lambda: torch.randn(32, d_in, generator=gen), None)
    )
    C2_before = sae.C2.detach().clone()
    with caplog.at_level(logging.INFO, logger="polysae_lens.subspace_fit"):
        trainer.fit()
    fits = [r for r in caplog.records if r.getMessage().startswith("Subspace fit on 64 rows")]
    assert len(fits) == 1
    assert float(orthogonality_error(sae.U)) < 1e-5
    # six Adam steps at lr 1e-3 move C2 by ~6e-3 per entry; the refit moves it more
    assert (sae.C2.detach() - C2_before).abs().max() > 0.05
