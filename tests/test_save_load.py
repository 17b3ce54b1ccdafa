"""Save/load round trips, training-vs-inference equivalence, bad checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sae_lens import SAE, TrainingSAE
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from safetensors.torch import load_file, save_file

import polysae_lens

from .conftest import activations, make_training_sae

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
INFERENCE_ARCH = {
    "poly": "poly",
    "poly_batchtopk": "poly_jumprelu",
    "poly_matryoshka": "poly_jumprelu",
    "poly_jumprelu": "poly_jumprelu",
    "poly_gated": "poly_gated",
}


def assert_same_outputs(a: SAE, b: SAE, x: torch.Tensor) -> None:  # type: ignore[type-arg]
    a.eval()
    b.eval()
    with torch.no_grad():
        z_a, z_b = a.encode(x), b.encode(x)
        assert (z_a != 0).any(), "test data should activate some latents"
        assert torch.equal(z_a != 0, z_b != 0), "different latents selected"
        assert torch.equal(z_a, z_b)
        assert torch.equal(a.decode(z_a), b.decode(z_b))


@pytest.mark.parametrize("dtype", DTYPES)
def test_training_checkpoint_round_trip_is_bit_identical(
    arch: str, dtype: str, tmp_path: Path
) -> None:
    sae = make_training_sae(arch, dtype=dtype)
    sae.save_model(tmp_path)
    x = activations(dtype=DTYPES[dtype])

    reloaded = TrainingSAE.load_from_disk(tmp_path)
    assert type(reloaded) is type(sae)
    assert reloaded.cfg.to_dict() == sae.cfg.to_dict()
    assert_same_outputs(sae, reloaded, x)
    # SAE.load_from_disk reads a training checkpoint as the inference form
    as_inference = SAE.load_from_disk(tmp_path)
    assert as_inference.cfg.architecture() == INFERENCE_ARCH[arch]
    assert_same_outputs(sae, as_inference, x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_inference_model_matches_training_sae_in_eval_mode(
    arch: str, dtype: str, tmp_path: Path
) -> None:
    sae = make_training_sae(arch, dtype=dtype)
    sae.save_inference_model(tmp_path / "inference")
    cfg = json.loads((tmp_path / "inference" / SAE_CFG_FILENAME).read_text())
    assert cfg["architecture"] == INFERENCE_ARCH[arch]
    assert cfg["poly_ranks"] == list(sae.cfg.poly_ranks)

    inference = SAE.load_from_disk(tmp_path / "inference")
    assert isinstance(inference, polysae_lens.PolyDecoderMixin)
    assert not isinstance(inference, TrainingSAE)
    assert inference.dtype == DTYPES[dtype]
    x = activations(dtype=DTYPES[dtype])
    assert_same_outputs(sae, inference, x)

    # and the inference model itself round-trips
    inference.save_model(tmp_path / "again")
    assert_same_outputs(inference, SAE.load_from_disk(tmp_path / "again"), x)


@pytest.mark.parametrize("order", [1, 2])
def test_lower_order_checkpoints_have_no_absent_terms(order: int, tmp_path: Path) -> None:
    sae = make_training_sae("poly", order)
    sae.save_inference_model(tmp_path)
    keys = set(load_file(tmp_path / SAE_WEIGHTS_FILENAME))
    assert ("C3" in keys) is False and ("lambda3" in keys) is False
    assert ("C2" in keys) == (order >= 2)
    assert_same_outputs(sae, SAE.load_from_disk(tmp_path), activations())


def _corrupt(path: Path, edit: str) -> None:
    weights = load_file(path / SAE_WEIGHTS_FILENAME)
    if edit == "missing":
        del weights["C2"]
    elif edit == "extra":
        weights["W_dec"] = torch.zeros(3)
    else:
        weights["C2"] = torch.zeros(2, 2)
    save_file(weights, path / SAE_WEIGHTS_FILENAME)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("missing", "missing keys \\['C2'\\]"),
        ("extra", "unexpected keys \\['W_dec'\\]"),
        ("shape", "'C2' has shape \\(2, 2\\)"),
    ],
)
def test_bad_checkpoint_raises_naming_the_key(
    arch: str, edit: str, message: str, tmp_path: Path
) -> None:
    sae = make_training_sae(arch)
    sae.save_model(tmp_path)
    _corrupt(tmp_path, edit)
    with pytest.raises(ValueError, match=message):
        SAE.load_from_disk(tmp_path)
    with pytest.raises(ValueError, match=message):
        TrainingSAE.load_from_disk(tmp_path)

    # resuming into an existing SAE: nothing is half-loaded
    target = make_training_sae(arch, seed=5)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        target.load_weights_from_checkpoint(tmp_path)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_cfg_with_wrong_order_is_reported_before_weights(tmp_path: Path) -> None:
    sae = make_training_sae("poly")
    sae.save_model(tmp_path)
    cfg = json.loads((tmp_path / SAE_CFG_FILENAME).read_text())
    cfg["poly_order"] = 7
    (tmp_path / SAE_CFG_FILENAME).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="poly_order=7"):
        SAE.load_from_disk(tmp_path)
