"""The gauge step (``gauge_lr_scale``): U and C1 turn along U -> U Q, C1 -> Q^T C1."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from polysae_lens import PolyTopKTrainingSAE, PolyTopKTrainingSAEConfig, orthogonality_error
from polysae_lens.inclass import InClassConfig, build_in_class, oracle_sae
from polysae_lens.stiefel import (
    gauge_gradient,
    interaction_rank,
    turn_along_gauge,
    turn_along_gauge_,
    turn_and_retract_,
)

D_IN, D_SAE, RANKS, K = 10, 30, (8, 3, 2), 3


def make(order: int = 2, seed: int = 0, **kwargs: Any) -> PolyTopKTrainingSAE:
    torch.manual_seed(seed)
    return PolyTopKTrainingSAE(
        PolyTopKTrainingSAEConfig(
            d_in=D_IN, d_sae=D_SAE, k=K, poly_order=order, poly_ranks=RANKS, **kwargs
        )
    )


def quadratic_loss(U, C1, C2, lam2, z, x):  # type: ignore[no-untyped-def]
    """Squared error of the order-2 decoder, written out here (not the package's)."""
    a = z @ U
    s = C2.shape[0]
    return ((a @ C1 + lam2 * (a[:, :s] ** 2) @ C2 - x) ** 2).sum()


def test_gauge_gradient_is_the_derivative_along_the_orbit() -> None:
    gen = torch.Generator().manual_seed(1)
    U = torch.linalg.qr(torch.randn(D_SAE, RANKS[0], generator=gen, dtype=torch.float64))[0]
    C1 = torch.randn(RANKS[0], D_IN, generator=gen, dtype=torch.float64)
    C2 = torch.randn(RANKS[1], D_IN, generator=gen, dtype=torch.float64)
    z = torch.randn(16, D_SAE, generator=gen, dtype=torch.float64).relu()
    x = torch.randn(16, D_IN, generator=gen, dtype=torch.float64)
    Ug, C1g = U.clone().requires_grad_(), C1.clone().requires_grad_()
    quadratic_loss(Ug, C1g, C2, 0.7, z, x).backward()
    assert Ug.grad is not None and C1g.grad is not None
    gamma = gauge_gradient(U, Ug.grad, C1, C1g.grad).double()
    A = torch.randn(RANKS[0], RANKS[0], generator=gen, dtype=torch.float64)
    omega = A - A.T
    for_t = [
        quadratic_loss(
            U @ torch.linalg.matrix_exp(t * omega),
            torch.linalg.matrix_exp(t * omega).T @ C1,
            C2,
            0.7,
            z,
            x,
        )
        for t in (-1e-5, 1e-5)
    ]
    numeric = float((for_t[1] - for_t[0]) / 2e-5)
    assert float((gamma * omega).sum()) == pytest.approx(numeric, rel=1e-4)
    # float32 inputs are computed in float32; skew by construction
    torch.testing.assert_close(gamma, -gamma.T)


def test_gauge_gradient_vanishes_for_a_linear_decoder() -> None:
    gen = torch.Generator().manual_seed(2)
    U = torch.linalg.qr(torch.randn(D_SAE, RANKS[0], generator=gen, dtype=torch.float64))[0]
    C1 = torch.randn(RANKS[0], D_IN, generator=gen, dtype=torch.float64)
    z = torch.randn(16, D_SAE, generator=gen, dtype=torch.float64).relu()
    x = torch.randn(16, D_IN, generator=gen, dtype=torch.float64)
    Ug, C1g = U.clone().requires_grad_(), C1.clone().requires_grad_()
    ((z @ Ug @ C1g - x) ** 2).sum().backward()
    assert Ug.grad is not None and C1g.grad is not None
    assert float(gauge_gradient(U, Ug.grad, C1, C1g.grad).abs().max()) < 1e-4
    assert float(Ug.grad.abs().max()) > 1.0  # while U's own gradient is large


def dense_cayley(S: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(S.shape[0], dtype=S.dtype)
    return torch.linalg.solve(eye + S / 2, eye - S / 2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("rows", "rank"), [(3, 8), (1, 8), (8, 8), (5, 12)])
def test_turn_along_gauge_matches_the_dense_rotation(
    rows: int, rank: int, dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(rows * rank)
    U = torch.linalg.qr(torch.randn(40, rank, generator=gen, dtype=torch.float64))[0]
    C1 = torch.randn(rank, 7, generator=gen, dtype=torch.float64)
    A = torch.randn(rank, rank, generator=gen, dtype=torch.float64)
    S = 0.5 * (A - A.T)
    S[rows:, rows:] = 0  # the orbit directions the interaction terms do not see
    Q = dense_cayley(S)
    turned = turn_along_gauge(U.to(dtype), C1.to(dtype), S[:rows].to(dtype))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert turned.U_FR.dtype == dtype and turned.C1_RD.dtype == dtype
    torch.testing.assert_close(turned.U_FR.double(), U @ Q, atol=tol, rtol=0)
    # the turn is a rotation: U stays orthonormal
    eye = torch.eye(rank, dtype=torch.float64)
    torch.testing.assert_close(
        turned.U_FR.double().T @ turned.U_FR.double(), eye, atol=tol * 10, rtol=0
    )
    torch.testing.assert_close(turned.C1_RD.double(), Q.T @ C1, atol=tol * 10, rtol=0)
    torch.testing.assert_close(
        turned.U_FR.double() @ turned.C1_RD.double(), U @ C1, atol=tol * 10, rtol=0
    )


def test_turn_along_gauge_by_zero_is_the_identity() -> None:
    U = torch.linalg.qr(torch.randn(20, 6, dtype=torch.float64))[0]
    C1 = torch.randn(6, 4, dtype=torch.float64)
    turned = turn_along_gauge(U, C1, torch.zeros(2, 6, dtype=torch.float64))
    assert torch.equal(turned.U_FR, U) and torch.equal(turned.C1_RD, C1)


@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)]
)
@pytest.mark.parametrize("scale", [0.0, 1.0])
# (1, 8) and (2, 12) take the low-rank update, (3, 8) and (8, 8) the dense U @ Q
@pytest.mark.parametrize(("rows", "rank"), [(1, 8), (2, 12), (3, 8), (8, 8)])
def test_in_place_turn_matches_the_dense_rotation(
    dtype: torch.dtype, tol: float, scale: float, rows: int, rank: int
) -> None:
    gen = torch.Generator().manual_seed(3)
    U = torch.linalg.qr(torch.randn(40, rank, generator=gen, dtype=torch.float64))[0]
    C1 = torch.randn(rank, 7, generator=gen, dtype=torch.float64)
    A = torch.randn(rank, rank, generator=gen, dtype=torch.float64)
    S = scale * 0.5 * (A - A.T)
    S[rows:, rows:] = 0
    Q = dense_cayley(S)
    U_turned, C1_turned = U.to(dtype, copy=True), C1.to(dtype, copy=True)
    storage = U_turned.data_ptr()
    turn_along_gauge_(U_turned, C1_turned, S[:rows].to(dtype))
    assert U_turned.data_ptr() == storage and U_turned.dtype == dtype  # in place
    torch.testing.assert_close(U_turned.double(), U @ Q, atol=tol, rtol=0)
    torch.testing.assert_close(C1_turned.double(), Q.T @ C1, atol=tol * 10, rtol=0)


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_gauge_gradient_rows_are_those_of_the_full_skew_part(rank: int) -> None:
    gen = torch.Generator().manual_seed(rank)
    U, dU = (torch.randn(D_SAE, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    C1, dC1 = (torch.randn(8, D_IN, generator=gen, dtype=torch.float64) for _ in range(2))
    full = torch.zeros(8, 8, dtype=torch.float64)
    for i in range(8):  # the skew part of U^T dU + C1 dC1^T, entry by entry
        for j in range(8):
            m_ij = (U[:, i] * dU[:, j]).sum() + (C1[i] * dC1[j]).sum()
            m_ji = (U[:, j] * dU[:, i]).sum() + (C1[j] * dC1[i]).sum()
            full[i, j] = (m_ij - m_ji) / 2
    got = gauge_gradient(U, dU, C1, dC1, rank)
    assert got.shape == (rank, 8)
    torch.testing.assert_close(got, full[:rank], atol=1e-12, rtol=0)
    lead = got[:, :rank]
    assert torch.equal(lead, -lead.T)  # exactly skew: a zero diagonal, not rounding
    # U split by rows (latent sharding): each holder's share of U^T dU summed
    # through ``sum_over_latents`` gives the whole gradient
    shares: list[torch.Tensor] = []
    gauge_gradient(U[10:], dU[10:], C1, dC1, rank, lambda share: shares.append(share) or share)
    split = gauge_gradient(U[:10], dU[:10], C1, dC1, rank, lambda share: share + shares[0])
    torch.testing.assert_close(split, full[:rank], atol=1e-12, rtol=0)
    alone = gauge_gradient(U[:10], dU[:10], C1, dC1, rank)
    assert (alone - full[:rank]).abs().max() > 1e-2  # the other rows' share mattered


@pytest.mark.parametrize(("order", "expected"), [(2, RANKS[1]), (3, max(RANKS[1:]))])
def test_interaction_rank_is_what_the_interaction_terms_read(order: int, expected: int) -> None:
    assert interaction_rank(make(order)) == expected


def test_one_gauge_step_is_an_adam_step_along_the_full_orbit() -> None:
    """The package's step (interaction rows only, low-rank turn) against Adam's
    first step written out on the full R1 x R1 orbit gradient with the rows the
    quadratic term does not read set to zero."""
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(4))
    # no retraction: it would act on U Q in one and on U in the other
    sae = make(gauge_lr_scale=2.0, stiefel_every_n_steps=0)
    ref = make(gauge_lr_scale=0.0, stiefel_every_n_steps=0)
    ref.load_state_dict(sae.state_dict())
    for model in (sae, ref):
        (model(x) - x).pow(2).sum(-1).mean().backward()
    opt, opt_ref = (torch.optim.Adam(m.parameters(), lr=1e-2) for m in (sae, ref))
    U0, C10 = sae.U.detach().double().clone(), sae.C1.detach().double().clone()
    dU, dC1 = sae.U.grad.double(), sae.C1.grad.double()
    M = U0.T @ dU + C10 @ dC1.T
    G = (M - M.T) / 2
    r = RANKS[1]
    G[r:, r:] = 0
    step = G / (G.abs() + 1e-8)  # Adam's first step: m_hat / (sqrt(v_hat) + eps)
    Q = dense_cayley(1e-2 * 2.0 * step)
    opt.step()
    opt_ref.step()  # the same optimizer step without the turn
    # the turn acts on the post-step U and C1 of the reference
    torch.testing.assert_close(sae.U.double(), ref.U.double() @ Q, atol=1e-5, rtol=0)
    torch.testing.assert_close(sae.C1.double(), Q.T @ ref.C1.double(), atol=1e-5, rtol=0)


def signed_q(A: torch.Tensor) -> torch.Tensor:
    """A's Q factor with diag(R) > 0, by Householder QR in float64."""
    Q, R = torch.linalg.qr(A.double())
    return Q * torch.sign(torch.diagonal(R))


@pytest.mark.parametrize("scale", [0.0, 1.0])
# (1, 8) turns by the low-rank update; (3, 8) and (8, 8) fuse the dense turn into
# the retraction; "far" U need a second CholeskyQR pass
@pytest.mark.parametrize(("rows", "rank"), [(1, 8), (3, 8), (8, 8)])
@pytest.mark.parametrize("far", [False, True])
def test_turn_and_retract_is_the_q_factor_of_the_turned_u(
    scale: float, rows: int, rank: int, far: bool
) -> None:
    gen = torch.Generator().manual_seed(rows + rank)
    U = torch.linalg.qr(torch.randn(40, rank, generator=gen, dtype=torch.float64))[0]
    # one optimizer step off the manifold, or (far) well off it
    U = U + (0.2 if far else 0.01) * torch.randn(40, rank, generator=gen, dtype=torch.float64)
    C1 = torch.randn(rank, 7, generator=gen, dtype=torch.float64)
    A = torch.randn(rank, rank, generator=gen, dtype=torch.float64)
    S = scale * 0.5 * (A - A.T)
    S[rows:, rows:] = 0
    Q = dense_cayley(S)
    U_got, C1_got = U.float().contiguous(), C1.float()  # (qr returns column-major)
    storage = U_got.data_ptr()
    turn_and_retract_(U_got, C1_got, S[:rows].float())
    assert U_got.data_ptr() == storage
    torch.testing.assert_close(U_got.double(), signed_q(U @ Q), atol=2e-5, rtol=0)
    torch.testing.assert_close(C1_got.double(), Q.T @ C1, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["cholesky_qr", "qr"])
def test_the_hooks_turn_then_retract(method: str) -> None:
    """After one optimizer step U is the Q factor of the stepped U turned by the
    gauge step (RANKS turn densely: the CholeskyQR path fuses the two)."""
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(5))
    sae = make(gauge_lr_scale=1.0, stiefel_method=method)
    ref = make(gauge_lr_scale=0.0, stiefel_every_n_steps=0)
    ref.load_state_dict(sae.state_dict())
    for model in (sae, ref):
        (model(x) - x).pow(2).sum(-1).mean().backward()
    opt, opt_ref = (torch.optim.Adam(m.parameters(), lr=1e-2) for m in (sae, ref))
    M = sae.U.detach().double().T @ sae.U.grad.double()
    M = M + sae.C1.detach().double() @ sae.C1.grad.double().T
    G = (M - M.T) / 2
    G[RANKS[1] :, RANKS[1] :] = 0
    Q = dense_cayley(1e-2 * G / (G.abs() + 1e-8))
    opt.step()
    opt_ref.step()
    torch.testing.assert_close(sae.U.double(), signed_q(ref.U.double() @ Q), atol=1e-5, rtol=0)
    torch.testing.assert_close(sae.C1.double(), Q.T @ ref.C1.double(), atol=1e-5, rtol=0)


def test_gauge_moments_saved_before_rows_were_dropped_still_resume() -> None:
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(0))
    sae = make(gauge_lr_scale=1.0)
    opt = _steps(sae, x, 2)
    state = opt.state[sae.U]
    kept = state["gauge_exp_avg"].clone()
    # the earlier layout: [R1, R1], with the kept rows first
    full = torch.zeros(RANKS[0], RANKS[0])
    full[: RANKS[1]] = kept
    state["gauge_exp_avg"] = full
    state["gauge_exp_avg_sq"] = torch.cat(
        [state["gauge_exp_avg_sq"], torch.zeros(RANKS[0] - RANKS[1], RANKS[0])]
    )
    opt.zero_grad()
    (sae(x) - x).pow(2).sum(-1).mean().backward()
    opt.step()
    assert state["gauge_exp_avg"].shape == (RANKS[1], RANKS[0])
    assert state["gauge_step"] == 3


def _steps(sae: PolyTopKTrainingSAE, x: torch.Tensor, n: int) -> torch.optim.Adam:
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(n):
        opt.zero_grad()
        (sae(x) - x).pow(2).sum(-1).mean().backward()
        opt.step()
    return opt


def test_gauge_step_keeps_u_orthonormal_and_stores_its_moments_with_u() -> None:
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(0))
    sae = make(gauge_lr_scale=1.0)
    opt = _steps(sae, x, 3)
    assert orthogonality_error(sae.U) < 1e-5
    state = opt.state[sae.U]
    assert state["gauge_step"] == 3
    # only the orbit rows the quadratic term sees (R2) carry moments
    assert state["gauge_exp_avg"].shape == (RANKS[1], RANKS[0])
    off = make(gauge_lr_scale=0.0)
    opt_off = _steps(off, x, 3)
    assert "gauge_exp_avg" not in opt_off.state[off.U]
    assert not torch.allclose(sae.U, off.U)


def test_order_one_takes_no_gauge_step() -> None:
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(0))
    on, off = make(1, gauge_lr_scale=1.0), make(1, gauge_lr_scale=0.0)
    opt = _steps(on, x, 3)
    _steps(off, x, 3)
    assert torch.equal(on.U, off.U) and torch.equal(on.C1, off.C1)
    assert "gauge_step" not in opt.state[on.U]


def test_gauge_state_resumes_exactly() -> None:
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(0))
    straight = make(gauge_lr_scale=1.0)
    _steps_continue = _steps(straight, x, 2)
    for _ in range(2):
        _steps_continue.zero_grad()
        (straight(x) - x).pow(2).sum(-1).mean().backward()
        _steps_continue.step()
    first = make(gauge_lr_scale=1.0)
    opt = _steps(first, x, 2)
    saved_model, saved_opt = copy.deepcopy(first.state_dict()), copy.deepcopy(opt.state_dict())
    resumed = make(gauge_lr_scale=1.0, seed=5)
    resumed.load_state_dict(saved_model)
    opt2 = torch.optim.Adam(resumed.parameters(), lr=1e-2)
    opt2.load_state_dict(saved_opt)
    for _ in range(2):
        opt2.zero_grad()
        (resumed(x) - x).pow(2).sum(-1).mean().backward()
        opt2.step()
    assert opt2.state[resumed.U]["gauge_step"] == 4
    torch.testing.assert_close(resumed.U, straight.U, atol=1e-6, rtol=0)
    torch.testing.assert_close(resumed.C1, straight.C1, atol=1e-6, rtol=0)


def test_gauge_step_recovers_a_turned_true_decoder() -> None:
    """Start at a true order-2 decoder whose basis is turned by a random Q (the
    linear term is still exact); only the gauge step can undo the turn."""
    cfg = InClassConfig(d_in=12, num_atoms=40, ranks=(10, 3, 3), k=3, calibration_samples=4096)
    truth = build_in_class(cfg)
    losses = {}
    for scale in (0.0, 1.0):
        sae = oracle_sae(truth, k=3, gauge_lr_scale=scale, c1_lr_scale=1.0)
        A = torch.randn(10, 10, generator=torch.Generator().manual_seed(3))
        Q = torch.linalg.matrix_exp(0.3 * (A - A.T))
        with torch.no_grad():
            sae.U.copy_(sae.U @ Q)
            sae.C1.copy_(Q.T @ sae.C1)
        gen = truth.generator(0)
        z_eval, x_eval = truth.sample(2048, gen)
        opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
        for _ in range(300):
            z, x = truth.sample(256, gen)
            opt.zero_grad()
            # decode the true codes: this isolates the decoder's basis
            (sae.decode(z) - x).pow(2).sum(-1).mean().backward()
            opt.step()
        with torch.no_grad():
            losses[scale] = float((sae.decode(z_eval) - x_eval).pow(2).sum(-1).mean())
    assert losses[1.0] < 0.5 * losses[0.0], losses


def test_config_rejects_a_negative_gauge_scale() -> None:
    with pytest.raises(ValueError, match="gauge_lr_scale=-1"):
        make(gauge_lr_scale=-1.0)
