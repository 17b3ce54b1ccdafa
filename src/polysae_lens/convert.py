"""Loading checkpoints written by the authors' research fork of SAELens.

The fork (SAELens 6.22) saves PolySAEs with its own names and orientation:
architectures ``poly_topk`` / ``poly_jumprelu`` (inference) and
``poly_batchtopk`` / ``poly_matryoshka`` (training); cfg keys ``poly_rank``,
``poly_ranks``, ``poly_order``, ``shared_u``, ``lambda2_init``,
``lambda3_init``, ``k``, ``rescale_acts_by_decoder_norm``; state keys
``U_shared`` [d_sae, R1], ``C1``/``C2``/``C3`` as [d_in, R] (ours are [R, d_in]),
an unused random ``W_dec`` and zero buffers ``U1``/``U2``/``U3``. Its decoder is
the same formula with ``a = z @ U_shared``, so the conversion is exact.

Use the loaders as SAELens converters::

    sae = SAE.load_from_disk(path, converter=polysae_lens.fork_disk_loader)
    sae = SAE.from_pretrained(repo_id, folder, converter=polysae_lens.fork_huggingface_loader)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME
from sae_lens.loading.pretrained_sae_loaders import get_sae_lens_config_from_disk
from sae_lens.util import str_to_dtype
from safetensors.torch import load_file

from polysae_lens.stiefel import orthogonality_error

logger = logging.getLogger(__name__)

FORK_ARCHITECTURES = {
    "poly_topk": "poly",
    "poly_jumprelu": "poly_jumprelu",
    "poly_batchtopk": "poly_batchtopk",
    "poly_matryoshka": "poly_matryoshka",
}
"""Fork architecture name -> polysae-lens architecture name."""

_DROPPED_KEYS = ("W_dec", "U1", "U2", "U3")
_RENAMED_KEYS = {"U_shared": "U"}
_TRANSPOSED_KEYS = ("C1", "C2", "C3")
_FORK_ONLY_CFG_KEYS = ("poly_rank", "shared_u")


def convert_fork_checkpoint(
    cfg_dict: dict[str, Any], state_dict: dict[str, torch.Tensor]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A fork checkpoint's (cfg, weights) in polysae-lens layout.

    Raises ``ValueError`` for what cannot be converted faithfully: an unknown
    architecture, a non-shared U, or ``rescale_acts_by_decoder_norm=True`` (the
    fork's training ranks latents by one decoder norm while its saved model folds
    another, so such a checkpoint does not hold the model that was trained).
    """
    arch = cfg_dict.get("architecture")
    if arch in FORK_ARCHITECTURES.values() and "U" in state_dict:
        raise ValueError(
            f"This checkpoint (architecture {arch!r}, key 'U') is already in polysae-lens "
            "format: load it without the fork converter."
        )
    if arch not in FORK_ARCHITECTURES:
        raise ValueError(
            f"Unknown research-fork architecture {arch!r}: expected one of "
            f"{sorted(FORK_ARCHITECTURES)}."
        )
    if not cfg_dict.get("shared_u", True):
        raise ValueError(
            "This fork checkpoint has shared_u=False (separate projections per order); "
            "polysae-lens supports only the shared-projection decoder used in the paper."
        )
    if cfg_dict.get("rescale_acts_by_decoder_norm", False):
        raise ValueError(
            "This fork checkpoint was saved with rescale_acts_by_decoder_norm=True. The fork "
            "trains by ranking latents with one decoder norm but folds another into the saved "
            "weights, so the checkpoint does not reproduce the trained model and cannot be "
            "converted faithfully. Retrain with rescale_acts_by_decoder_norm=False."
        )
    missing = [key for key in ("W_enc", "b_dec", "U_shared", "C1") if key not in state_dict]
    if missing:
        raise ValueError(f"Fork checkpoint is missing keys {missing}.")

    state = {
        _RENAMED_KEYS.get(key, key): value
        for key, value in state_dict.items()
        if key not in _DROPPED_KEYS
    }
    for key in _TRANSPOSED_KEYS:
        if key in state:
            state[key] = state[key].T.contiguous()
    for key in ("lambda2", "lambda3"):
        if key in state:
            state[key] = state[key].reshape(())

    order = int(cfg_dict.get("poly_order", 1 + ("C2" in state) + ("C3" in state)))
    ranks = (
        state["U"].shape[1],
        state["C2"].shape[0] if "C2" in state else state["U"].shape[1],
        state["C3"].shape[0] if "C3" in state else state["U"].shape[1],
    )
    declared = cfg_dict.get("poly_ranks")
    if declared is not None and order >= 2 and list(declared)[:order] != list(ranks)[:order]:
        raise ValueError(
            f"Fork cfg poly_ranks={declared} disagree with the weight shapes, which imply "
            f"{list(ranks)}."
        )
    cfg = {k: v for k, v in cfg_dict.items() if k not in _FORK_ONLY_CFG_KEYS}
    cfg.update(
        architecture=FORK_ARCHITECTURES[arch],
        poly_order=order,
        poly_ranks=list(ranks),
        rescale_acts_by_decoder_norm=False,
    )
    error = orthogonality_error(state["U"]).item()
    if error > 1e-3:
        logger.warning(
            "The fork checkpoint's U is not orthonormal (max |U^T U - I| = %.2e); it was "
            "probably saved before a retraction. Outputs are still converted exactly.",
            error,
        )
    return cfg, state


def fork_disk_loader(
    path: str | Path,
    device: str = "cpu",
    cfg_overrides: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A SAELens ``PretrainedSaeDiskLoader`` for research-fork checkpoints."""
    cfg_dict = get_sae_lens_config_from_disk(path, device, cfg_overrides)
    weights = load_file(Path(path) / SAE_WEIGHTS_FILENAME, device=device)
    return _convert_and_cast(cfg_dict, weights)


def fork_huggingface_loader(
    repo_id: str,
    folder_name: str,
    device: str = "cpu",
    force_download: bool = False,
    cfg_overrides: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], torch.Tensor | None]:
    """A SAELens ``PretrainedSaeHuggingfaceLoader`` for research-fork checkpoints."""
    cfg_path = hf_hub_download(
        repo_id, f"{folder_name}/{SAE_CFG_FILENAME}", force_download=force_download
    )
    hf_hub_download(repo_id, f"{folder_name}/{SAE_WEIGHTS_FILENAME}", force_download=force_download)
    cfg_dict, state_dict = fork_disk_loader(Path(cfg_path).parent, device, cfg_overrides)
    try:
        sparsity_path = hf_hub_download(
            repo_id, f"{folder_name}/{SPARSITY_FILENAME}", force_download=force_download
        )
    except EntryNotFoundError:
        return cfg_dict, state_dict, None
    return cfg_dict, state_dict, load_file(sparsity_path, device=device)["sparsity"]


def _convert_and_cast(
    cfg_dict: dict[str, Any], weights: dict[str, torch.Tensor]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    cfg, state = convert_fork_checkpoint(cfg_dict, weights)
    dtype = str_to_dtype(cfg.get("dtype", "float32"))
    # BatchTopK's threshold stays double, as SAELens keeps it
    return cfg, {k: v if k == "topk_threshold" else v.to(dtype) for k, v in state.items()}
