"""The in-class generator (activations from a random PolySAE decoder) and the oracle."""

from __future__ import annotations

import pytest
import torch

from polysae_lens.inclass import InClassConfig, build_in_class, oracle_sae

TINY = InClassConfig(d_in=12, num_atoms=40, ranks=(10, 4, 3), k=3, calibration_samples=4096, seed=3)
TINY3 = InClassConfig(
    d_in=12,
    num_atoms=40,
    ranks=(10, 4, 3),
    poly_order=3,
    quadratic_share=0.2,
    cubic_share=0.25,
    k=3,
    calibration_samples=4096,
    seed=5,
)


def plain_decode(z, U, C1, C2, C3, lam2, lam3, b):  # type: ignore[no-untyped-def]
    """The decoder's formula written out latent by latent (shares nothing with the package)."""
    x = b.expand(z.shape[0], -1).clone()
    a = torch.einsum("bn,nr->br", z, U)
    x += torch.einsum("br,rd->bd", a, C1)
    if C2 is not None:
        s = C2.shape[0]
        x += lam2 * torch.einsum("br,rd->bd", a[:, :s] ** 2, C2)
    if C3 is not None:
        t = C3.shape[0]
        x += lam3 * torch.einsum("br,rd->bd", a[:, :t] ** 3, C3)
    return x


def centred_energy(t: torch.Tensor) -> float:
    return float(((t - t.mean(0)) ** 2).sum(1).mean())


@pytest.mark.parametrize("cfg", [TINY, TINY3], ids=["order2", "order3"])
def test_data_is_the_formula_applied_to_the_returned_codes(cfg: InClassConfig) -> None:
    truth = build_in_class(cfg)
    z, x = truth.sample(256, truth.generator(0))
    w = truth.weights
    expected = plain_decode(
        z, w.U_FR, w.C1_RD, w.C2_SD, w.C3_TD, w.lambda2, w.lambda3, truth.b_dec_D
    )
    assert z.shape == (256, cfg.num_atoms) and x.shape == (256, cfg.d_in)
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)
    assert (w.C3_TD is not None) == (cfg.poly_order == 3)
    assert w.C2_SD is not None and w.C2_SD.shape == (cfg.ranks[1], cfg.d_in)
    U = w.U_FR
    torch.testing.assert_close(U.T @ U, torch.eye(cfg.ranks[0]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("cfg", [TINY, TINY3], ids=["order2", "order3"])
def test_energy_shares_hold_on_fresh_samples(cfg: InClassConfig) -> None:
    truth = build_in_class(cfg)
    z, _ = truth.sample(20000, truth.generator(7))
    w = truth.weights
    zero = torch.zeros(cfg.d_in)
    lin = plain_decode(z, w.U_FR, w.C1_RD, None, None, None, None, zero)
    quad = plain_decode(z, w.U_FR, 0 * w.C1_RD, w.C2_SD, None, w.lambda2, None, zero)
    energies = [centred_energy(lin), centred_energy(quad)]
    if cfg.poly_order == 3:
        energies.append(
            centred_energy(
                plain_decode(z, w.U_FR, 0 * w.C1_RD, None, w.C3_TD, None, w.lambda3, zero)
            )
        )
    total = sum(energies)
    assert total == pytest.approx(cfg.signal_energy, rel=0.1)
    wanted = cfg.shares[: len(energies)]
    for got, want in zip([e / total for e in energies], wanted, strict=True):
        assert got == pytest.approx(want, abs=0.04)


def test_exact_k_codes_have_k_positive_entries_and_zipfian_frequencies() -> None:
    truth = build_in_class(TINY)
    z, _ = truth.sample(20000, truth.generator(1))
    assert ((z > 0).sum(1) == TINY.k).all()
    assert (z >= 0).all()
    freq = (z > 0).float().mean(0)
    weights = truth.firing_weights_N
    # frequent latents fire more often: the ranking follows the Zipfian weights
    rho = torch.corrcoef(
        torch.stack([freq.argsort().argsort().float(), weights.argsort().argsort().float()])
    )[0, 1]
    assert rho > 0.9
    assert float(freq.max()) > 4 * float(freq.min())
    active = z[z > 0]
    assert float(active.mean()) == pytest.approx(TINY.magnitude_mean, abs=0.05)


def test_bernoulli_codes_have_mean_l0_k() -> None:
    truth = build_in_class(InClassConfig(**{**TINY.to_dict(), "code": "bernoulli"}))
    z, _ = truth.sample(20000, truth.generator(2))
    l0 = (z > 0).sum(1).float()
    assert float(l0.mean()) == pytest.approx(TINY.k, rel=0.05)
    assert float(l0.std()) > 0.5  # not exactly k per row


def test_noise_is_added_with_its_std() -> None:
    noisy = build_in_class(InClassConfig(**{**TINY.to_dict(), "noise_std": 0.3}))
    z, x = noisy.sample(4000, noisy.generator(0))
    w = noisy.weights
    clean = plain_decode(z, w.U_FR, w.C1_RD, w.C2_SD, None, w.lambda2, None, noisy.b_dec_D)
    assert float((x - clean).std()) == pytest.approx(0.3, rel=0.05)


def test_same_seed_same_data_other_seed_other_data() -> None:
    a, b = build_in_class(TINY), build_in_class(TINY)
    xa = a.sample(64, a.generator(4)).x_BD
    xb = b.sample(64, b.generator(4)).x_BD
    assert torch.equal(xa, xb)
    assert not torch.equal(xa, a.sample(64, a.generator(5)).x_BD)
    other = build_in_class(InClassConfig(**{**TINY.to_dict(), "seed": 4}))
    assert not torch.equal(other.weights.U_FR, a.weights.U_FR)


@pytest.mark.parametrize("cfg", [TINY, TINY3], ids=["order2", "order3"])
def test_oracle_decoder_is_the_generators(cfg: InClassConfig) -> None:
    truth = build_in_class(cfg)
    sae = oracle_sae(truth, k=cfg.k)
    z, x = truth.sample(128, truth.generator(0))
    w = truth.weights
    torch.testing.assert_close(sae.decode(z), x, rtol=1e-5, atol=1e-5)
    assert sae.cfg.d_sae == cfg.num_atoms and sae.cfg.poly_ranks == cfg.ranks
    assert torch.equal(sae.U.detach(), w.U_FR)
    torch.testing.assert_close(sae.W_enc.detach(), (w.U_FR @ w.C1_RD).T)
    assert all(p.requires_grad for p in sae.parameters())


def test_frozen_oracle_trains_only_the_encoder() -> None:
    truth = build_in_class(TINY)
    sae = oracle_sae(truth, k=TINY.k, freeze_decoder=True)
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    opt = torch.optim.Adam([p for p in sae.parameters() if p.requires_grad], lr=1e-2)
    x = truth.sample(64, truth.generator(0)).x_BD
    loss = (sae(x) - x).pow(2).sum()
    loss.backward()
    opt.step()
    changed = {n for n, p in sae.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert "W_enc" in changed
    assert not changed & {"U", "C1", "C2", "lambda2", "b_dec"}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"ranks": (13, 4, 3)}, "R1"),
        ({"ranks": (10, 11, 3)}, "R2 and R3"),
        ({"quadratic_share": 1.2}, "quadratic_share=1.2"),
        ({"quadratic_share": 0.6, "cubic_share": 0.5, "poly_order": 3}, "must be < 1"),
        ({"poly_order": 1}, "quadratic_share=0.3 needs poly_order"),
        ({"cubic_share": 0.1}, "cubic_share=0.1 needs poly_order=3"),
        ({"code": "topk"}, "code='topk'"),
        ({"k": 0}, "k=0"),
        ({"code": "bernoulli", "k": 30}, "probability"),
        ({"noise_std": -1.0}, "noise_std=-1.0"),
    ],
)
def test_config_rejects_bad_values_naming_them(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        InClassConfig(**{**TINY.to_dict(), **changes})
