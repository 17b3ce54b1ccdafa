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
from safetensors.torch import save_file

import polysae_lens
from polysae_lens.convert import FORK_ARCHITECTURES, fork_disk_loader, fork_huggingface_loader

from .conftest import D_IN, D_SAE, RANKS, K, activations, make_training_sae
from .test_save_load import assert_same_outputs

REPO = "polysae-test/poly-tiny"
COMMIT = "0" * 40


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


# ---- research-fork checkpoints --------------------------------------------
# Built from facts about the fork's layout (method notes, "Facts measured by
# running the authors' code"), never from our own state dict: U_shared
# [d_sae, R1] with orthonormal columns; C1/C2/C3 stored [d_in, R]; an unused
# random W_dec [d_sae, d_in]; zero buffers U1/U2/U3 [d_sae, R]; below order 2
# zero buffers C2 [d_in, R2] and lambda2 (0-dim), below order 3 C3/lambda3.
# Training checkpoints carry the training architecture name; BatchTopK and
# Matryoshka inference saves are poly_jumprelu with a per-latent threshold.

FORK_SAVES = [
    ("poly_topk", "training"),
    ("poly_topk", "inference"),
    ("poly_jumprelu", "training"),
    ("poly_jumprelu", "inference"),
    ("poly_batchtopk", "training"),
    ("poly_batchtopk", "inference"),
    ("poly_matryoshka", "training"),
    ("poly_matryoshka", "inference"),
]
TOPK_THRESHOLD = 1.2345678901234  # a double, as the fork's BatchTopK buffer is
# Reconstructions match the fork's formula up to float rounding (the bias and the
# terms are summed in another order): measured over these saves, 5 seeds, 256 rows,
# bit-identical at order 1 and at most 2 ulps of the largest |x^| entry (1.75 * eps
# * max |x^|) at orders 2 and 3. Entries near zero can differ by many of their own
# ulps (cancellation), so the bound is on the scale of max |x^|.
RECONSTRUCTION_ULPS = 4


def fork_checkpoint(
    trained_as: str, form: str, order: int = 3, seed: int = 0
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(cfg.json dict, weights) of a fork model trained as ``trained_as`` with
    ``rescale_acts_by_decoder_norm=False``, saved in ``form``."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return scale * torch.randn(*shape, generator=gen)

    r1, r2, r3 = RANKS
    U_shared = torch.linalg.qr(randn(D_SAE, r1)).Q  # kept orthonormal by the fork's retraction
    state = {
        "W_enc": randn(D_IN, D_SAE, scale=0.5),
        "b_enc": randn(D_SAE, scale=0.1),
        "b_dec": randn(D_IN, scale=0.1),
        "W_dec": randn(D_SAE, D_IN, scale=0.025),  # unused random placeholder
        "U_shared": U_shared,
        "C1": randn(D_IN, r1),
        "C2": randn(D_IN, r2) if order >= 2 else torch.zeros(D_IN, r2),
        "lambda2": torch.tensor(-0.4 if order >= 2 else 0.0),
        "C3": randn(D_IN, r3) if order >= 3 else torch.zeros(D_IN, r3),
        "lambda3": torch.tensor(0.3 if order >= 3 else 0.0),
        "U1": torch.zeros(D_SAE, r1),
        "U2": torch.zeros(D_SAE, r2),
        "U3": torch.zeros(D_SAE, r3),
    }
    cfg: dict[str, Any] = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"sae_lens_version": "6.22.3", "hook_name": "blocks.0.hook_resid_post"},
        "poly_rank": None,
        "poly_ranks": list(RANKS),
        "poly_order": order,
        "shared_u": True,
        "lambda2_init": -0.5,
        "lambda3_init": 0.5,
    }
    batch_topk = trained_as in ("poly_batchtopk", "poly_matryoshka")
    if trained_as == "poly_jumprelu":
        state["threshold"] = 0.5 + 0.5 * torch.rand(D_SAE, generator=gen)
    elif batch_topk and form == "inference":
        state["threshold"] = torch.ones(D_SAE) * TOPK_THRESHOLD
    elif batch_topk:
        state["topk_threshold"] = torch.tensor(TOPK_THRESHOLD, dtype=torch.float64)
    if form == "inference" and trained_as != "poly_topk":
        # the fork copies only the JumpReLU inference config's fields
        cfg["architecture"] = "poly_jumprelu"
        return cfg, state
    cfg["architecture"] = trained_as
    if trained_as != "poly_jumprelu":
        cfg.update(k=K, rescale_acts_by_decoder_norm=False)
    if form == "training":
        cfg.update(decoder_init_norm=0.1, l1_coefficient=1.0, aux_loss_coefficient=1.0)
    if form == "training" and trained_as == "poly_jumprelu":
        cfg.update(jumprelu_init_threshold=0.01, jumprelu_bandwidth=0.05, l0_coefficient=1.0)
    if form == "training" and batch_topk:
        cfg.update(topk_threshold_lr=0.01)
    if form == "training" and trained_as == "poly_matryoshka":
        cfg.update(matryoshka_widths=[16, 32, D_SAE])
    return cfg, state


def write_fork_checkpoint(
    path: Path, cfg: dict[str, Any], state: dict[str, torch.Tensor], **cfg_changes: Any
) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, path / SAE_WEIGHTS_FILENAME)
    (path / SAE_CFG_FILENAME).write_text(json.dumps({**cfg, **cfg_changes}))
    return path


def fork_latents(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The fork's (SAELens 6.22's) eval-mode encoder, written out."""
    hidden_pre = (x - state["b_dec"]) @ state["W_enc"] + state["b_enc"]
    if "threshold" in state or "topk_threshold" in state:
        threshold = state.get("threshold")
        if threshold is None:  # as the fork's inference save turns it into a threshold
            threshold = torch.ones(D_SAE) * state["topk_threshold"].item()
        return hidden_pre.relu() * (hidden_pre > threshold)
    values, indices = hidden_pre.topk(K, dim=-1)
    return torch.zeros_like(hidden_pre).scatter(-1, indices, values.relu())


def fork_reconstruction(
    state: dict[str, torch.Tensor], z: torch.Tensor, order: int
) -> torch.Tensor:
    """x^ = b_dec + a C1^T + l2 (a[:, :R2]^2) C2^T + l3 (a[:, :R3]^3) C3^T, a = z U_shared."""
    _, r2, r3 = RANKS
    a = z @ state["U_shared"]
    out = state["b_dec"] + a @ state["C1"].T
    if order >= 2:
        out = out + state["lambda2"] * ((a[:, :r2] ** 2) @ state["C2"].T)
    if order >= 3:
        out = out + state["lambda3"] * ((a[:, :r3] ** 3) @ state["C3"].T)
    return out


def assert_matches_fork(
    sae: Any, state: dict[str, torch.Tensor], order: int, x: torch.Tensor
) -> None:
    """Latents bit-identical; reconstructions equal up to float rounding."""
    sae.eval()
    with torch.no_grad():
        z = sae.encode(x)
        z_fork = fork_latents(state, x)
        assert (z_fork != 0).any(dim=-1).all(), "test data should activate latents in every row"
        assert torch.equal(z, z_fork)
        x_hat, x_hat_fork = sae.decode(z), fork_reconstruction(state, z_fork, order)
    ulp = torch.finfo(torch.float32).eps * x_hat_fork.abs().max()  # >= ulp(max |x^|)
    assert (x_hat - x_hat_fork).abs().max() <= RECONSTRUCTION_ULPS * ulp
    torch.testing.assert_close(x_hat, x_hat_fork, rtol=1e-6, atol=RECONSTRUCTION_ULPS * ulp)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize(("trained_as", "form"), FORK_SAVES)
def test_fork_checkpoint_loads_with_the_forks_outputs(
    trained_as: str, form: str, order: int, tmp_path: Path
) -> None:
    cfg, state = fork_checkpoint(trained_as, form, order)
    path = write_fork_checkpoint(tmp_path, cfg, state)
    x = activations()

    loaded = SAE.load_from_disk(path, converter=fork_disk_loader)
    assert polysae_lens.is_poly_sae(loaded)
    assert loaded.cfg.poly_order == order
    assert list(loaded.cfg.poly_ranks) == list(RANKS)
    assert "W_dec" not in loaded.state_dict()
    assert_matches_fork(loaded, state, order, x)
    if form == "training":
        as_training = TrainingSAE.load_from_disk(path, converter=fork_disk_loader)
        assert as_training.cfg.architecture() == FORK_ARCHITECTURES[trained_as]
        assert_matches_fork(as_training, state, order, x)


def test_fork_checkpoint_from_the_hub_cache(hf_cache: Path, tmp_path: Path) -> None:
    cfg, state = fork_checkpoint("poly_batchtopk", "training")
    add_to_cache(hf_cache, REPO, "fork_l8", write_fork_checkpoint(tmp_path / "fork", cfg, state))
    loaded = SAE.from_pretrained(REPO, "fork_l8", converter=fork_huggingface_loader)
    assert_matches_fork(loaded, state, 3, activations())


@pytest.mark.parametrize(
    ("order", "placeholders"),
    [
        (1, {"C2": torch.zeros(()), "C3": torch.zeros(())}),  # scalar-shaped
        (1, {"C2": torch.zeros(0), "C3": torch.zeros(D_IN, 0)}),  # empty
        (2, {"C3": torch.zeros(()), "lambda3": torch.zeros(1)}),
    ],
)
def test_fork_zero_placeholders_of_any_shape_are_dropped(
    order: int, placeholders: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    cfg, state = fork_checkpoint("poly_batchtopk", "inference", order)
    state.update(placeholders)
    loaded = SAE.load_from_disk(
        write_fork_checkpoint(tmp_path, cfg, state), converter=fork_disk_loader
    )
    assert loaded.cfg.poly_order == order
    assert_matches_fork(loaded, state, order, activations())


@pytest.mark.parametrize(
    ("order", "key"),
    [(1, "C2"), (1, "lambda2"), (1, "C3"), (1, "lambda3"), (2, "C3"), (2, "lambda3")],
)
def test_fork_nonzero_placeholder_above_the_order_is_refused(
    order: int, key: str, tmp_path: Path
) -> None:
    cfg, state = fork_checkpoint("poly_topk", "inference", order)
    state[key] = state[key].clone()
    state[key].view(-1)[0] = 0.25
    with pytest.raises(ValueError) as refusal:
        SAE.load_from_disk(write_fork_checkpoint(tmp_path, cfg, state), converter=fork_disk_loader)
    assert f"nonzero '{key}'" in str(refusal.value)
    assert f"poly_order={order}" in str(refusal.value)


def rescaled_inference_save(
    cfg: dict[str, Any], state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """What the fork's BatchTopK/Matryoshka inference save writes for a model
    trained with rescale_acts_by_decoder_norm=True (method notes): U's rows divided
    by the norms of U_shared @ C1^T's rows, the norms folded into the encoder and
    threshold, and W_dec set to the divided U_shared @ C1^T."""
    norms_F = (state["U_shared"] @ state["C1"].T).norm(dim=-1)
    saved = dict(state)
    saved["U_shared"] = state["U_shared"] / norms_F[:, None]
    saved["W_enc"] = state["W_enc"] * norms_F
    saved["b_enc"] = state["b_enc"] * norms_F
    saved["threshold"] = state["threshold"] * norms_F
    saved["W_dec"] = saved["U_shared"] @ state["C1"].T
    return saved


@pytest.mark.parametrize("trained_as", ["poly_batchtopk", "poly_matryoshka"])
@pytest.mark.parametrize("order", [1, 3])
def test_fork_inference_save_of_a_rescaled_model_is_refused(
    trained_as: str, order: int, tmp_path: Path
) -> None:
    cfg, state = fork_checkpoint(trained_as, "inference", order)
    assert "rescale_acts_by_decoder_norm" not in cfg  # the flag is invisible in cfg.json
    path = write_fork_checkpoint(tmp_path, cfg, rescaled_inference_save(cfg, state))
    with pytest.raises(
        ValueError, match=r"(?s)rescale_acts_by_decoder_norm=True.*does not reproduce.*Retrain"
    ):
        SAE.load_from_disk(path, converter=fork_disk_loader)


@pytest.mark.parametrize("look_alike", ["normalized_W_dec", "unretracted_U"])
def test_fork_checkpoints_with_one_rescale_signal_still_load(
    look_alike: str, tmp_path: Path
) -> None:
    """A normal checkpoint shows at most one of the two signals of a rescaled save."""
    cfg, state = fork_checkpoint("poly_batchtopk", "inference")
    if look_alike == "normalized_W_dec":  # the fork's activation-norm fold writes this
        W_dec = state["U_shared"] @ state["C1"].T
        state["W_dec"] = W_dec / W_dec.norm(dim=-1, keepdim=True)
    else:  # saved between an optimizer step and the retraction
        state["U_shared"] = state["U_shared"] + 0.01 * torch.randn(D_SAE, RANKS[0])
    loaded = SAE.load_from_disk(
        write_fork_checkpoint(tmp_path, cfg, state), converter=fork_disk_loader
    )
    assert_matches_fork(loaded, state, 3, activations())


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
    cfg, state = fork_checkpoint("poly_batchtopk", "training")
    write_fork_checkpoint(tmp_path, cfg, state, **changes)
    with pytest.raises(ValueError, match=message):
        SAE.load_from_disk(tmp_path, converter=fork_disk_loader)


def test_fork_converter_refuses_a_polysae_lens_checkpoint(tmp_path: Path) -> None:
    make_training_sae("poly").save_inference_model(tmp_path)
    with pytest.raises(ValueError, match="already in polysae-lens format"):
        SAE.load_from_disk(tmp_path, converter=fork_disk_loader)
