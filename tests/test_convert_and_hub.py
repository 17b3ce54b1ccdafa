"""from_pretrained from a local HuggingFace cache, and research-fork checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import huggingface_hub.constants as hf_constants
import pytest
import torch
from sae_lens import SAE, TrainingSAE
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME
from safetensors.torch import load_file, save_file

import polysae_lens
from polysae_lens.convert import FORK_ARCHITECTURES, fork_disk_loader, fork_huggingface_loader

from .conftest import D_SAE, activations, make_training_sae
from .test_save_load import assert_same_outputs

REPO = "polysae-test/poly-tiny"
COMMIT = "0" * 40
OURS_TO_FORK = {ours: fork for fork, ours in FORK_ARCHITECTURES.items()}


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HuggingFace hub cache, with the hub switched offline."""
    cache = tmp_path / "hub"
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return cache


def add_to_cache(cache: Path, repo_id: str, folder: str, source: Path) -> None:
    """Place ``source``'s files under ``folder`` of ``repo_id``'s cached snapshot,
    laid out as huggingface_hub's cache (refs/main -> snapshots/<commit>)."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    target = repo_dir / "snapshots" / COMMIT / folder
    target.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        shutil.copy(file, target / file.name)


def test_from_pretrained_loads_a_polysae_from_the_hub_cache(
    arch: str, hf_cache: Path, tmp_path: Path
) -> None:
    sae = make_training_sae(arch)
    sae.save_inference_model(tmp_path / "saved")
    sparsity = torch.linspace(-3, 0, D_SAE)
    save_file({"sparsity": sparsity}, tmp_path / "saved" / SPARSITY_FILENAME)
    add_to_cache(hf_cache, REPO, "layer_0", tmp_path / "saved")

    loaded, cfg, log_sparsity = SAE.from_pretrained_with_cfg_and_sparsity(REPO, "layer_0")
    assert polysae_lens.is_poly_sae(loaded)
    assert cfg["poly_ranks"] == list(sae.cfg.poly_ranks)
    assert log_sparsity is not None and torch.equal(log_sparsity, sparsity)
    assert_same_outputs(sae, loaded, activations())


def write_fork_checkpoint(sae: Any, path: Path, **cfg_changes: Any) -> None:
    """Save ``sae`` the way the research fork lays its checkpoints out."""
    state = {k: v.detach().clone() for k, v in sae.state_dict().items()}
    state["U_shared"] = state.pop("U")
    for key in ("C1", "C2", "C3"):
        if key in state:
            state[key] = state[key].T.contiguous()
    d_sae, d_in = sae.cfg.d_sae, sae.cfg.d_in
    state["W_dec"] = torch.randn(d_sae, d_in)  # the fork's unused placeholder
    for key in ("U1", "U2", "U3"):
        state[key] = torch.zeros(d_sae, 4)
    cfg = sae.cfg.to_dict()
    cfg.update(
        architecture=OURS_TO_FORK[cfg["architecture"]],
        shared_u=True,
        poly_rank=cfg["poly_ranks"][1],
        rescale_acts_by_decoder_norm=False,
    )
    cfg.update(cfg_changes)
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, path / SAE_WEIGHTS_FILENAME)
    (path / SAE_CFG_FILENAME).write_text(json.dumps(cfg))


@pytest.mark.parametrize("fork_arch", sorted(FORK_ARCHITECTURES))
def test_fork_checkpoint_loads_with_identical_outputs(fork_arch: str, tmp_path: Path) -> None:
    ours = FORK_ARCHITECTURES[fork_arch]
    source = make_training_sae(ours)
    if fork_arch in ("poly_topk", "poly_jumprelu"):  # the fork's inference forms
        source.save_inference_model(tmp_path / "inference")
        source = SAE.load_from_disk(tmp_path / "inference")
    write_fork_checkpoint(source, tmp_path / "fork")
    assert "W_dec" in load_file(tmp_path / "fork" / SAE_WEIGHTS_FILENAME)

    loaded = SAE.load_from_disk(tmp_path / "fork", converter=fork_disk_loader)
    assert polysae_lens.is_poly_sae(loaded)
    assert "W_dec" not in loaded.state_dict()
    assert_same_outputs(source, loaded, activations())
    if fork_arch in ("poly_batchtopk", "poly_matryoshka"):
        as_training = TrainingSAE.load_from_disk(tmp_path / "fork", converter=fork_disk_loader)
        assert type(as_training) is type(source)
        assert_same_outputs(source, as_training, activations())


def test_fork_checkpoint_from_the_hub_cache(hf_cache: Path, tmp_path: Path) -> None:
    source = make_training_sae("poly_batchtopk")
    write_fork_checkpoint(source, tmp_path / "fork")
    add_to_cache(hf_cache, REPO, "fork_l8", tmp_path / "fork")
    loaded = SAE.from_pretrained(REPO, "fork_l8", converter=fork_huggingface_loader)
    assert_same_outputs(source, loaded, activations())


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"shared_u": False}, "shared_u=False"),
        ({"rescale_acts_by_decoder_norm": True}, "rescale_acts_by_decoder_norm=True"),
        ({"architecture": "poly_gated_v2"}, "Unknown research-fork architecture 'poly_gated_v2'"),
        ({"poly_ranks": [12, 7, 3]}, "disagree with the weight shapes"),
    ],
)
def test_unconvertible_fork_checkpoints_are_refused(
    changes: dict[str, Any], message: str, tmp_path: Path
) -> None:
    write_fork_checkpoint(make_training_sae("poly_batchtopk"), tmp_path, **changes)
    with pytest.raises(ValueError, match=message):
        SAE.load_from_disk(tmp_path, converter=fork_disk_loader)


def test_fork_converter_refuses_a_polysae_lens_checkpoint(tmp_path: Path) -> None:
    make_training_sae("poly").save_inference_model(tmp_path)
    with pytest.raises(ValueError, match="already in polysae-lens format"):
        SAE.load_from_disk(tmp_path, converter=fork_disk_loader)
