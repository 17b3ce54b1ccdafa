"""Loading checkpoints written by the authors' research fork of SAELens.

The fork (SAELens 6.22) saves PolySAEs with its own names and orientation:
architectures ``poly_topk`` / ``poly_jumprelu`` (inference) and
``poly_batchtopk`` / ``poly_matryoshka`` (training); cfg keys ``poly_rank``,
``poly_ranks``, ``poly_order``, ``shared_u``, ``lambda2_init``,
``lambda3_init``, ``k``, ``rescale_acts_by_decoder_norm``; state keys
``U_shared`` [d_sae, R1], ``C1``/``C2``/``C3`` as [d_in, R] (ours are [R, d_in]),
an unused random ``W_dec`` and zero buffers ``U1``/``U2``/``U3``. Below order 2
it also saves zero buffers ``C2``/``lambda2``, below order 3 ``C3``/``lambda3``.
Its decoder is the same formula with ``a = z @ U_shared``, so the converted
model's latents are bit-identical to the fork's, and its reconstructions equal the
fork's up to float rounding: the bias and the terms are summed in another order,
so at order 2 and 3 entries differ by at most a few ulps of the largest entry's
magnitude (measured: at most 2 ulps in float32; bit-identical at order 1).

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
_TERM_KEYS = {2: ("C2", "lambda2"), 3: ("C3", "lambda3")}
"""Order -> the keys of its term; the fork saves them as zero buffers above its order."""
_FORK_DEFAULT_ORDER = 3  # the fork config's default poly_order
_RESCALED_W_DEC_RTOL = 1e-2  # bf16 rounding passes; a random placeholder is O(1) away
_ORTHONORMAL_ATOL = 1e-3
_RENAMED_KEYS = {"U_shared": "U"}
_TRANSPOSED_KEYS = ("C1", "C2", "C3")
_FORK_ONLY_CFG_KEYS = ("poly_rank", "shared_u")


def convert_fork_checkpoint(
    cfg_dict: dict[str, Any], state_dict: dict[str, torch.Tensor]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A fork checkpoint's (cfg, weights) in polysae-lens layout.

    The converted model's latents are bit-identical to the fork's; its
    reconstructions equal the fork's up to float rounding (a few ulps of the
    largest entry, from summing the bias and the terms in another order).

    Raises ``ValueError`` for what cannot be converted faithfully: an unknown
    architecture, a non-shared U, a nonzero ``C2``/``lambda2``/``C3``/``lambda3``
    above ``poly_order``, or a model trained with ``rescale_acts_by_decoder_norm=True``
    (the fork's training ranks latents by one decoder norm while its saved model
    folds another, so such a checkpoint does not hold the model that was trained).
    Its training checkpoints say so in cfg.json; its BatchTopK/Matryoshka inference
    saves do not, and are recognised by their weights (see :func:`_check_not_rescaled`).
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
    # the order is the cfg's: the fork saves C2/C3 (as zeros) at every order
    order = int(cfg_dict.get("poly_order", _FORK_DEFAULT_ORDER))
    if order not in (1, 2, 3):
        raise ValueError(f"Fork cfg poly_order={order} is not 1, 2 or 3.")
    required = ["W_enc", "b_dec", "U_shared", "C1"]
    required += [key for o in range(2, order + 1) for key in _TERM_KEYS[o]]
    missing = [key for key in required if key not in state_dict]
    if missing:
        raise ValueError(f"Fork checkpoint (poly_order={order}) is missing keys {missing}.")
    _check_not_rescaled(state_dict)

    unused = [key for o in range(order + 1, 4) for key in _TERM_KEYS[o]]
    for key in unused:
        if key in state_dict and state_dict[key].count_nonzero() > 0:
            raise ValueError(
                f"Fork checkpoint has poly_order={order} but a nonzero {key!r}, which the "
                "fork saves as a zero placeholder at this order: the cfg and the weights "
                "disagree. Fix poly_order in cfg.json to the order the model was trained with."
            )
    state = {
        _RENAMED_KEYS.get(key, key): value
        for key, value in state_dict.items()
        if key not in _DROPPED_KEYS and key not in unused
    }
    for key in _TRANSPOSED_KEYS:
        if key in state:
            state[key] = state[key].T.contiguous()
    for key in ("lambda2", "lambda3"):
        if key in state:
            state[key] = state[key].reshape(())

    r1 = state["U"].shape[1]
    declared = _declared_ranks(cfg_dict)
    ranks = [r1]
    for o, key in ((2, "C2"), (3, "C3")):
        if o <= order:
            ranks.append(state[key].shape[0])
        elif declared is not None and 1 <= declared[o - 1] <= r1:
            ranks.append(declared[o - 1])  # unused; kept as the fork's cfg declared it
        else:
            ranks.append(r1)
    if declared is not None and declared[:order] != ranks[:order]:
        raise ValueError(
            f"Fork cfg poly_ranks={declared} disagree with the weight shapes, which imply "
            f"{ranks[:order]} for the terms up to poly_order={order}."
        )
    cfg = {k: v for k, v in cfg_dict.items() if k not in _FORK_ONLY_CFG_KEYS}
    cfg.update(
        architecture=FORK_ARCHITECTURES[arch],
        poly_order=order,
        poly_ranks=ranks,
        rescale_acts_by_decoder_norm=False,
    )
    error = orthogonality_error(state["U"]).item()
    if error > _ORTHONORMAL_ATOL:
        logger.warning(
            "The fork checkpoint's U is not orthonormal (max |U^T U - I| = %.2e); it was "
            "probably saved before a retraction. It is converted as saved.",
            error,
        )
    return cfg, state


def _declared_ranks(cfg_dict: dict[str, Any]) -> list[int] | None:
    """The fork cfg's (R1, R2, R3): ``poly_ranks``, else ``poly_rank`` for all three."""
    if cfg_dict.get("poly_ranks") is not None:
        return [int(r) for r in cfg_dict["poly_ranks"]]
    if cfg_dict.get("poly_rank") is not None:
        return [int(cfg_dict["poly_rank"])] * 3
    return None


def _check_not_rescaled(state_dict: dict[str, torch.Tensor]) -> None:
    """Refuse a BatchTopK/Matryoshka inference save of a model trained with
    ``rescale_acts_by_decoder_norm=True``, whose cfg.json has no rescale field.

    That save divides U_shared's rows by the norms of ``U_shared @ C1^T``'s rows
    (leaving U not orthonormal) and writes ``W_dec = U_shared @ C1^T``. Both signals
    are required: a normal checkpoint's ``W_dec`` is the unused random placeholder
    (or, after the fork's activation-norm fold, ``U_shared @ C1^T`` with unit rows,
    while U stays orthonormal), and a normal U saved between an optimizer step and
    the retraction is slightly off orthonormal while its W_dec matches nothing.
    """
    if "W_dec" not in state_dict:
        return
    U_FR = state_dict["U_shared"].float()
    linear_FD = U_FR @ state_dict["C1"].float().T
    W_dec_FD = state_dict["W_dec"].float()
    if W_dec_FD.shape != linear_FD.shape:
        return
    mismatch = (W_dec_FD - linear_FD).norm() / linear_FD.norm().clamp_min(1e-30)
    if mismatch > _RESCALED_W_DEC_RTOL:
        return
    if orthogonality_error(U_FR).item() <= _ORTHONORMAL_ATOL:
        return
    raise ValueError(
        "This fork checkpoint is an inference save of a model trained with "
        "rescale_acts_by_decoder_norm=True: its W_dec equals U_shared @ C1^T "
        f"(relative difference {mismatch.item():.1e}) and U_shared is not orthonormal "
        "(its rows were divided by decoder norms when it was saved). The fork's "
        "BatchTopK/Matryoshka training ranks latents by one decoder norm but this save "
        "folds another, so the saved form does not reproduce the trained model, and its "
        "cfg.json does not record the flag. Retrain with rescale_acts_by_decoder_norm=False."
    )


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
