"""from_pretrained from a local HuggingFace cache, SAELens's upload_saes_to_huggingface
with the hub mocked, and research-fork checkpoints."""

from __future__ import annotations

import fnmatch
import io
import json
import shutil
from pathlib import Path
from typing import Any

import huggingface_hub.constants as hf_constants
import pytest
import torch
from sae_lens import SAE, TrainingSAE
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME
from sae_lens.training import upload_saes_to_huggingface as uploader
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


def hub_error(cls: type[Exception], message: str) -> Exception:
    """An instance of a huggingface_hub error class, whose constructor signature
    differs between huggingface_hub versions (some require an HTTP response)."""
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    return error


class FakeHub:
    """Stands in for the huggingface_hub calls of SAELens's uploader, offline.

    Uploads land in a local hub cache laid out as huggingface_hub's (see
    :func:`add_to_cache`), so ``SAE.from_pretrained`` reads them back.
    """

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.repos: set[str] = set()
        self.created: list[str] = []
        self.files: dict[str, set[str]] = {}  # path_in_repo -> uploaded file names
        self.readme: dict[str, str] = {}

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(uploader, "HfApi", lambda: self)
        monkeypatch.setattr(uploader, "create_repo", self.create_repo)
        monkeypatch.setattr(uploader, "hf_hub_url", self.hf_hub_url)
        monkeypatch.setattr(uploader, "get_hf_file_metadata", self.get_hf_file_metadata)

    def snapshot(self, repo_id: str) -> Path:
        repo_dir = self.cache / f"models--{repo_id.replace('/', '--')}"
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / "main").write_text(COMMIT)
        return repo_dir / "snapshots" / COMMIT

    def create_repo(self, repo_id: str, **_: Any) -> None:
        self.created.append(repo_id)
        self.repos.add(repo_id)

    def repo_info(self, repo_id: str, **_: Any) -> dict[str, str]:
        if repo_id not in self.repos:
            raise hub_error(uploader.RepositoryNotFoundError, f"no repo {repo_id}")
        return {"id": repo_id}

    def hf_hub_url(self, repo_id: str, filename: str, revision: str = "main", **_: Any) -> str:
        return f"{repo_id}@{revision}:{filename}"

    def get_hf_file_metadata(self, url: str, **_: Any) -> dict[str, str]:
        repo_id, filename = url.split("@")[0], url.split(":")[-1]
        if not (self.snapshot(repo_id) / filename).exists():
            raise hub_error(uploader.EntryNotFoundError, f"no file {url}")
        return {"url": url}

    def upload_folder(
        self,
        *,
        folder_path: Path,
        path_in_repo: str,
        repo_id: str,
        allow_patterns: list[str],
        repo_type: str,
        **_: Any,
    ) -> None:
        assert repo_id in self.repos and repo_type == "model"
        target = self.snapshot(repo_id) / path_in_repo
        target.mkdir(parents=True, exist_ok=True)
        for file in Path(folder_path).iterdir():
            if any(fnmatch.fnmatch(file.name, pattern) for pattern in allow_patterns):
                shutil.copy(file, target / file.name)
                self.files.setdefault(path_in_repo, set()).add(file.name)

    def upload_file(
        self, *, path_or_fileobj: io.BytesIO, path_in_repo: str, repo_id: str, **_: Any
    ) -> None:
        text = path_or_fileobj.read().decode("utf-8")
        (self.snapshot(repo_id) / path_in_repo).write_text(text)
        self.readme[repo_id] = text


def test_upload_saes_to_huggingface_round_trips_polysaes(
    arch: str, hf_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = FakeHub(hf_cache)
    hub.install(monkeypatch)
    trained = make_training_sae(arch)
    trained.save_inference_model(tmp_path / "saved")
    inference = SAE.load_from_disk(tmp_path / "saved")
    sparsity = torch.linspace(-4, -1, D_SAE)
    save_file({"sparsity": sparsity}, tmp_path / "saved" / SPARSITY_FILENAME)
    (tmp_path / "saved" / "notes.txt").write_text("not uploaded")

    uploader.upload_saes_to_huggingface(
        {
            "blocks.0.hook_resid_post": inference,  # an SAE object: saved by the uploader
            "from_folder": tmp_path / "saved",  # a folder, with its sparsity file
            "training": trained,  # a training SAE object: its training checkpoint
        },
        hf_repo_id=REPO,
        show_progress=False,
    )

    assert hub.created == [REPO]
    model_files = {SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME}
    assert hub.files == {
        "blocks.0.hook_resid_post": model_files,
        "from_folder": model_files | {SPARSITY_FILENAME},
        "training": model_files,
    }
    assert f'SAE.from_pretrained("{REPO}", "<sae_id>")' in hub.readme[REPO]

    loaded, cfg, log_sparsity = SAE.from_pretrained_with_cfg_and_sparsity(
        REPO, "blocks.0.hook_resid_post"
    )
    assert polysae_lens.is_poly_sae(loaded)
    assert cfg["architecture"] == inference.cfg.architecture()
    assert log_sparsity is None
    assert_same_outputs(inference, loaded, activations())

    loaded, cfg, log_sparsity = SAE.from_pretrained_with_cfg_and_sparsity(REPO, "from_folder")
    assert cfg["poly_ranks"] == list(trained.cfg.poly_ranks)
    assert log_sparsity is not None and torch.equal(log_sparsity, sparsity)
    assert_same_outputs(inference, loaded, activations())

    assert_same_outputs(inference, SAE.from_pretrained(REPO, "training"), activations())
    as_training = TrainingSAE.load_from_disk(
        hf_cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT / "training"
    )
    assert type(as_training) is type(trained)
    assert_same_outputs(trained, as_training, activations())


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
