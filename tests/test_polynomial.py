"""The decoder math: hand-set values, and every path against the reference."""

from __future__ import annotations

import pytest
import torch

from polysae_lens.polynomial import (
    PolyDecoderWeights,
    decoder_terms,
    first_order_decoder,
    poly_decode,
    poly_decode_reference,
)
from polysae_lens.stiefel import orthogonality_error, qr_retract


def random_weights(
    order: int, d_sae: int = 10, d_in: int = 6, ranks: tuple[int, int, int] = (5, 3, 2)
) -> PolyDecoderWeights:
    gen = torch.Generator().manual_seed(order)
    r1, r2, r3 = ranks

    def param(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    U = qr_retract(torch.randn(d_sae, r1, generator=gen, dtype=torch.float64))
    return PolyDecoderWeights(
        U_FR=U.requires_grad_(),
        C1_RD=param(r1, d_in),
        C2_SD=param(r2, d_in) if order >= 2 else None,
        C3_TD=param(r3, d_in) if order >= 3 else None,
        lambda2=torch.tensor(-0.5, dtype=torch.float64, requires_grad=True) if order >= 2 else None,
        lambda3=torch.tensor(0.5, dtype=torch.float64, requires_grad=True) if order >= 3 else None,
    )


def sparse_code(batch: int = 7, d_sae: int = 10, k: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    pre = torch.randn(batch, d_sae, generator=gen, dtype=torch.float64)
    vals, idx = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, idx, vals.abs())


def test_hand_set_weights_give_exact_values() -> None:
    # a = z @ U = [2, 3]; linear = a @ C1 = [2, 3];
    # quadratic = -0.5 * 2**2 * [1, 1] = [-2, -2]; cubic = 0.5 * 2**3 * [2, 0] = [8, 0]
    weights = PolyDecoderWeights(
        U_FR=torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]),
        C1_RD=torch.eye(2),
        C2_SD=torch.tensor([[1.0, 1.0]]),
        C3_TD=torch.tensor([[2.0, 0.0]]),
        lambda2=torch.tensor(-0.5),
        lambda3=torch.tensor(0.5),
    )
    z = torch.tensor([[2.0, 3.0, 7.0]])
    terms = decoder_terms(z, weights)
    assert torch.equal(terms.linear, torch.tensor([[2.0, 3.0]]))
    assert terms.quadratic is not None and terms.cubic is not None
    assert torch.equal(terms.quadratic, torch.tensor([[-2.0, -2.0]]))
    assert torch.equal(terms.cubic, torch.tensor([[8.0, 0.0]]))
    assert torch.equal(poly_decode(z, weights), torch.tensor([[8.0, 1.0]]))
    assert torch.equal(poly_decode_reference(z, weights), torch.tensor([[8.0, 1.0]]))


@pytest.mark.parametrize("order", [1, 2, 3])
def test_fast_path_matches_reference_values_and_gradients(order: int) -> None:
    weights = random_weights(order)
    z = sparse_code().requires_grad_()
    fast = poly_decode(z, weights)
    ref = poly_decode_reference(z, weights)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)

    upstream = torch.randn_like(fast)
    inputs = [z] + [t for t in weights if t is not None]
    grads_fast = torch.autograd.grad((fast * upstream).sum(), inputs)
    grads_ref = torch.autograd.grad((ref * upstream).sum(), inputs)
    for g_fast, g_ref in zip(grads_fast, grads_ref, strict=True):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_lower_orders_drop_terms(order: int) -> None:
    terms = decoder_terms(sparse_code(), random_weights(order))
    assert (terms.quadratic is not None) == (order >= 2)
    assert (terms.cubic is not None) == (order >= 3)


def test_sparse_coo_code_matches_dense() -> None:
    weights = random_weights(3)
    z = sparse_code()
    torch.testing.assert_close(poly_decode(z.to_sparse(), weights), poly_decode(z, weights))


def test_leading_dimensions_are_preserved() -> None:
    weights = random_weights(3)
    z = sparse_code(batch=6).reshape(2, 3, -1)
    out = poly_decode(z, weights)
    assert out.shape == (2, 3, 6)
    torch.testing.assert_close(out.reshape(6, -1), poly_decode(z.reshape(6, -1), weights))


def test_zero_code_decodes_to_zero_and_first_order_decoder_is_jacobian() -> None:
    weights = random_weights(3)
    z0 = torch.zeros(1, 10, dtype=torch.float64)
    assert torch.equal(poly_decode(z0, weights), torch.zeros(1, 6, dtype=torch.float64))
    jac = torch.autograd.functional.jacobian(lambda z: poly_decode(z, weights)[0], z0)
    torch.testing.assert_close(jac[:, 0, :].T, first_order_decoder(weights))


def test_qr_retract_is_orthonormal_sign_fixed_and_half_precision_safe() -> None:
    gen = torch.Generator().manual_seed(0)
    U = torch.randn(40, 8, generator=gen)
    Q = qr_retract(U)
    assert orthogonality_error(Q) < 1e-5
    # diag(R) > 0 means each column of Q has a positive inner product with U's
    assert bool((torch.diagonal(Q.T @ U) > 0).all())
    # a point already on the manifold is a fixed point
    torch.testing.assert_close(qr_retract(Q), Q, atol=1e-5, rtol=0)
    Q_bf16 = qr_retract(U.to(torch.bfloat16))
    assert Q_bf16.dtype == torch.bfloat16
    assert orthogonality_error(Q_bf16) < 0.05
