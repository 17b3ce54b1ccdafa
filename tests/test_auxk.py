"""PolySAE's AuxK settings (:mod:`polysae_lens.auxk`): the comparison outside the
interaction terms' output subspace, ``aux_k``, and the Matryoshka per-level loss,
each against a reference written out here (least squares, not QR)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from polysae_lens import PolyMatryoshkaTrainingSAE, PolyMatryoshkaTrainingSAEConfig
from polysae_lens.auxk import outside_interactions, resolve_aux_k

from .compare import least_squares_residual

D_IN, D_SAE, K, RANKS = 8, 24, 2, (6, 2, 3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n_terms", [1, 2])
def test_outside_interactions_removes_the_row_space(dtype: torch.dtype, n_terms: int) -> None:
    gen = torch.Generator().manual_seed(n_terms)
    rows = [torch.randn(r, D_IN, generator=gen, dtype=dtype) for r in RANKS[1 : 1 + n_terms]]
    d = torch.randn(5, D_IN, generator=gen, dtype=dtype)
    d[0] = 0  # a zero row stays zero
    d[1] = 3 * rows[0][0] - rows[0][1]  # a row inside the subspace vanishes
    got = outside_interactions(d, tuple(rows))
    assert got.dtype == dtype
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.double(), least_squares_residual(d, rows), atol=tol, rtol=0)
    assert got[1].abs().max() < tol * 10 and torch.equal(got[0], torch.zeros(D_IN, dtype=dtype))
    assert (got - d).abs().max() > 0.1  # something was removed


def test_outside_interactions_keeps_everything_where_the_rows_fill_d_in() -> None:
    gen = torch.Generator().manual_seed(0)
    rows = (torch.randn(5, D_IN, generator=gen), torch.randn(3, D_IN, generator=gen))
    d = torch.randn(4, D_IN, generator=gen)
    assert outside_interactions(d, rows) is d  # 8 rows span all of d_in: nothing is outside
    assert outside_interactions(d, ()) is d


def test_resolve_aux_k() -> None:
    assert resolve_aux_k("k", 3, 64) == 3
    assert resolve_aux_k("k", 2.6, 64) == 3  # BatchTopK's k is a mean per row
    assert resolve_aux_k("k", 0.2, 64) == 1
    assert resolve_aux_k("d_in/2", 3, 65) == 32
    assert resolve_aux_k(7, 3, 64) == 7


def _matryoshka(**kwargs: Any) -> PolyMatryoshkaTrainingSAE:
    torch.manual_seed(0)
    cfg = PolyMatryoshkaTrainingSAEConfig(
        d_in=D_IN,
        d_sae=D_SAE,
        k=K,
        poly_order=3,
        poly_ranks=RANKS,
        matryoshka_widths=[10, D_SAE],
        use_matryoshka_aux_loss=True,
        dtype="float64",
        **kwargs,
    )
    sae = PolyMatryoshkaTrainingSAE(cfg)
    with torch.no_grad():
        sae.b_dec.copy_(0.1 * torch.randn(D_IN, generator=torch.Generator().manual_seed(3)))
    return sae


def _plain_matryoshka_auxk(
    sae: Any,
    x: torch.Tensor,
    feature_acts: torch.Tensor,
    dead: torch.Tensor,
    k_aux: int,
    outside: bool,
) -> float:
    """Per level [start, width): the level's prefix reconstruction's residual is
    decoded by each row's k_aux largest dead pre-activations of the level."""
    r2, r3 = RANKS[1], RANKS[2]

    def poly(z: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
        a = z @ U
        return (
            a @ sae.C1
            + sae.lambda2 * (a[:, :r2] ** 2) @ sae.C2
            + sae.lambda3 * (a[:, :r3] ** 3) @ sae.C3
        )

    with torch.no_grad():
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        total, start = 0.0, 0
        for width in sae.cfg.matryoshka_widths:
            level_out = poly(feature_acts[:, :width], sae.U[:width]) + sae.b_dec
            level_dead = dead[start:width]
            n_dead = int(level_dead.sum())
            if n_dead:
                masked = torch.where(level_dead, pre[:, start:width], torch.tensor(-torch.inf))
                top = masked.topk(min(k_aux, n_dead), dim=-1)
                z = torch.zeros_like(masked).scatter(-1, top.indices, top.values)
                error = poly(z, sae.U[start:width]) - (x - level_out)
                if outside:
                    error = least_squares_residual(error, [sae.C2, sae.C3])
                total += min(n_dead / k_aux, 1.0) * float((error**2).sum(-1).mean())
            start = width
    return sae.cfg.aux_loss_coefficient * total


@pytest.mark.parametrize(
    ("overrides", "k_aux", "outside"),
    [({}, K, True), ({"aux_k": "d_in/2", "aux_outside_interactions": False}, D_IN // 2, False)],
)
def test_matryoshka_aux_loss_follows_the_settings(
    overrides: dict[str, Any], k_aux: int, outside: bool
) -> None:
    sae = _matryoshka(**overrides)
    x = torch.randn(12, D_IN, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[[1, 4, 7, 12, 15, 20, 22]] = True  # in both levels, more than K in each
    feature_acts = sae.encode(x).detach()
    hidden_pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    got = sae.calculate_matryoshka_aux_loss(
        x, sae.decode(feature_acts), feature_acts, hidden_pre, dead
    )
    expected = _plain_matryoshka_auxk(sae, x, feature_acts, dead, k_aux, outside)
    assert float(got.detach()) == pytest.approx(expected, rel=1e-9)
    other = _plain_matryoshka_auxk(sae, x, feature_acts, dead, D_IN // 2 + K - k_aux, not outside)
    assert other != pytest.approx(expected, rel=1e-3)  # the settings matter here
