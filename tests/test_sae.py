"""Parameter contract, W_dec, registration, input validation and decoding."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from sae_lens import SAE, TopKTrainingSAE, TopKTrainingSAEConfig, TrainingSAE
from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY

import polysae_lens
from polysae_lens import PolyTopKTrainingSAE, PolyTopKTrainingSAEConfig, poly_decode_reference

from .conftest import D_IN, D_SAE, RANKS, activations, make_training_sae, sae_cfg_dict

SPARSIFIER_PARAMS = {
    "poly": {"b_enc"},
    "poly_batchtopk": {"b_enc"},
    "poly_matryoshka": {"b_enc"},
    "poly_jumprelu": {"b_enc", "threshold"},
    "poly_gated": {"b_gate", "b_mag", "r_mag"},
}


@pytest.mark.parametrize("order", [1, 2, 3])
def test_parameter_names_and_shapes(arch: str, order: int) -> None:
    sae = make_training_sae(arch, order)
    r1, r2, r3 = RANKS
    expected = {"W_enc": (D_IN, D_SAE), "b_dec": (D_IN,), "U": (D_SAE, r1), "C1": (r1, D_IN)}
    if order >= 2:
        expected |= {"C2": (r2, D_IN), "lambda2": ()}
    if order >= 3:
        expected |= {"C3": (r3, D_IN), "lambda3": ()}
    params = {name: tuple(p.shape) for name, p in sae.named_parameters()}
    for name in SPARSIFIER_PARAMS[arch]:
        assert params.pop(name) == (D_SAE,)
    assert params == expected
    # no dense decoder anywhere: neither a parameter nor a buffer
    assert "W_dec" not in sae.state_dict()


def test_w_dec_is_the_first_order_decoder_and_read_only(arch: str) -> None:
    sae = make_training_sae(arch)
    W_dec = sae.W_dec
    assert W_dec.shape == (D_SAE, D_IN)
    torch.testing.assert_close(W_dec, sae.U @ sae.C1)
    W_dec.sum().backward()
    assert sae.U.grad is not None and sae.C1.grad is not None
    with pytest.raises((AttributeError, KeyError)):
        sae.W_dec = torch.nn.Parameter(torch.zeros(D_SAE, D_IN))  # type: ignore[misc]


def test_initialisation_follows_the_paper(arch: str) -> None:
    torch.manual_seed(0)
    sae = TrainingSAE.from_dict(sae_cfg_dict(arch))
    assert polysae_lens.orthogonality_error(sae.U) < 1e-5
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T)
    assert sae.lambda2.item() == -0.5
    assert sae.lambda3.item() == 0.5


def test_decoder_init_norm_sets_mean_first_order_row_norm() -> None:
    torch.manual_seed(0)
    sae = TrainingSAE.from_dict(sae_cfg_dict("poly", decoder_init_norm=0.1))
    assert sae.W_dec.norm(dim=-1).mean().item() == pytest.approx(0.1, rel=1e-5)
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_decode_matches_reference_including_bias(arch: str, order: int) -> None:
    sae = make_training_sae(arch, order).double()
    sae.eval()
    z = sae.encode(activations().double())
    assert (z != 0).any()
    expected = poly_decode_reference(z, sae.decoder_weights) + sae.b_dec
    torch.testing.assert_close(sae.decode(z), expected, rtol=1e-10, atol=1e-10)


def test_parameter_overhead_at_gpt2_small_shape_is_at_most_3_percent() -> None:
    # Built on the meta device: shapes only, no memory.
    poly = PolyTopKTrainingSAE(
        PolyTopKTrainingSAEConfig(d_in=768, d_sae=16384, k=64, device="meta")
    )
    stock = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=768, d_sae=16384, k=64, device="meta"))
    n_poly = sum(p.numel() for p in poly.parameters())
    n_stock = sum(p.numel() for p in stock.parameters())
    overhead = n_poly / n_stock - 1
    assert poly.cfg.poly_ranks == (768, 64, 64)
    assert 0 < overhead <= 0.03
    # C1 + C2 + C3 + two scalars is the whole difference
    assert n_poly - n_stock == 768 * 768 + 2 * 64 * 768 + 2


def test_wrong_input_width_gets_a_clear_error(arch: str) -> None:
    sae = make_training_sae(arch)
    with pytest.raises(ValueError, match=f"last dimension 15 but this SAE has d_in={D_IN}"):
        sae.encode(torch.randn(4, 15))
    with pytest.raises(ValueError, match=f"last dimension 47 but this SAE has d_sae={D_SAE}"):
        sae.decode(torch.randn(4, 47))


def test_every_variant_is_registered_in_both_registries() -> None:
    for arch in polysae_lens.ARCHITECTURES:
        assert arch in SAE_CLASS_REGISTRY
        assert arch in SAE_TRAINING_CLASS_REGISTRY
        assert polysae_lens.is_poly_sae(TrainingSAE.from_dict(sae_cfg_dict(arch)))
    assert SAE_CLASS_REGISTRY["poly"][0] is polysae_lens.PolyTopKSAE
    assert SAE_CLASS_REGISTRY["poly_batchtopk"][0] is polysae_lens.PolyJumpReLUSAE


def test_importing_twice_and_reloading_never_raises() -> None:
    # In a fresh interpreter, so the reloaded classes do not leak into other tests.
    script = """
import importlib
import polysae_lens, polysae_lens.sae
from sae_lens import TrainingSAE
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY
importlib.import_module("polysae_lens")
polysae_lens.register_architectures()
importlib.reload(polysae_lens)
reloaded = importlib.reload(polysae_lens.sae)
assert SAE_TRAINING_CLASS_REGISTRY["poly"][0] is reloaded.PolyTopKTrainingSAE
sae = TrainingSAE.from_dict({"architecture": "poly", "d_in": 8, "d_sae": 16, "k": 2})
assert type(sae) is reloaded.PolyTopKTrainingSAE
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr


def test_registering_over_a_foreign_class_raises() -> None:
    saved = SAE_CLASS_REGISTRY["poly"]
    SAE_CLASS_REGISTRY["poly"] = (SAE, saved[1])  # type: ignore[assignment]
    try:
        with pytest.raises(ValueError, match="already registered"):
            polysae_lens.register_architectures()
    finally:
        SAE_CLASS_REGISTRY["poly"] = saved


def test_fold_w_dec_norm_is_a_no_op(arch: str) -> None:
    sae = make_training_sae(arch)
    sae.eval()
    x = activations()
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    out = sae(x)
    sae.fold_W_dec_norm()
    assert all(torch.equal(before[k], v) for k, v in sae.state_dict().items())
    assert torch.equal(sae(x), out)
    with pytest.raises(NotImplementedError, match="no-op"):
        sae.fold_and_get_W_dec_norm()
