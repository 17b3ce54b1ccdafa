"""The AuxK loss of PolySAEs: which dead latents reconstruct the residual, and where.

AuxK (Gao et al. 2024, App. A.2): on each row, the ``k_aux`` largest
pre-activations of the dead latents decode (without bias) the detached
residual ``x - sae_out``; the squared error, scaled by
``min(n_dead / k_aux, 1)``, trains the dead latents back into use. SAELens (and
the PolySAE paper) take ``k_aux = d_in // 2`` and compare in all of d_in. Two
config fields change that for PolySAE (``docs/inclass-plateau.md``, seventh
pass):

- ``aux_k`` (default ``"k"``: the SAE's own k). With few dead latents, which
  AuxK's own window (``aux_dead_window``) keeps the case, ``d_in // 2`` exceeds
  their number: every dead latent is then active on every row and AuxK is a
  dense low-rank regression of the residual, which trains the dead latents
  toward its principal directions rather than toward separate atoms. With k
  they compete for the residual as the live latents compete for the input.
- ``aux_outside_interactions`` (default True): the residual and the
  reconstruction are compared outside the output subspace of the interaction
  terms (the row space of C2, and of C3 at order 3). Before the polynomial has
  learned the interactions, the residual's largest part lies there, and AuxK
  revives dead latents as linear stand-ins for it; those hold TopK slots the
  atoms need until the polynomial has completed.

Shape suffixes: B batch, D d_in, F d_sae, S the interaction terms' output rank.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from sae_lens.saes.topk_sae import calculate_topk_aux_acts
from torch import Tensor

from polysae_lens.polynomial import PolyDecoderWeights

AUX_K_RULES = ("k", "d_in/2")
"""The named values of ``aux_k``: the SAE's k, or SAELens's (and the paper's) d_in // 2."""


class AuxSettings(NamedTuple):
    """How a PolySAE's AuxK loss is taken."""

    k_aux: int
    """Dead latents per row that decode the residual."""
    interaction_SD: tuple[Tensor, ...]
    """The interaction terms' output matrices (C2, and C3 at order 3), detached;
    the residual is compared outside their row space. Empty: in all of d_in."""


def resolve_aux_k(aux_k: int | str, k: float, d_in: int) -> int:
    """``aux_k`` as a number of latents: ``"k"`` the SAE's k (rounded, at least 1;
    BatchTopK's k is a mean), ``"d_in/2"`` d_in // 2, an int itself."""
    if aux_k == "k":
        return max(1, round(k))
    if aux_k == "d_in/2":
        return d_in // 2
    return int(aux_k)


def aux_settings(cfg: Any, weights: PolyDecoderWeights) -> AuxSettings:
    """The AuxK settings of a PolySAE config (or of any object with ``d_in``,
    ``k``, ``aux_k`` and ``aux_outside_interactions``; absent fields take
    SAELens's AuxK) with its current decoder ``weights``."""
    k_aux = resolve_aux_k(getattr(cfg, "aux_k", "d_in/2"), cfg.k, cfg.d_in)
    if not getattr(cfg, "aux_outside_interactions", False):
        return AuxSettings(k_aux, ())
    terms = tuple(C.detach() for C in (weights.C2_SD, weights.C3_TD) if C is not None)
    return AuxSettings(k_aux, terms)


def outside_interactions(d_BD: Tensor, interaction_SD: tuple[Tensor, ...]) -> Tensor:
    """``d_BD`` with its component in the row space of the ``interaction_SD``
    matrices removed (an orthonormal basis from QR, in float32 or wider). Where
    those rows span all of d_in nothing is outside, and ``d_BD`` is returned
    as it is: the comparison is then in all of d_in, as SAELens's."""
    if not interaction_SD:
        return d_BD
    rows_SD = torch.cat(interaction_SD)
    if rows_SD.shape[0] >= rows_SD.shape[1]:
        return d_BD
    dtype = torch.promote_types(d_BD.dtype, torch.float32)
    basis_DS = torch.linalg.qr(rows_SD.to(dtype).T)[0]
    d = d_BD.to(dtype)
    return (d - (d @ basis_DS) @ basis_DS.T).to(d_BD.dtype)


def auxk_loss(
    residual_BD: Tensor,
    dead_mask_F: Tensor | None,
    settings: AuxSettings,
    decode_top_dead: Callable[[int], Tensor],
    normalize_activations: str,
) -> Tensor:
    """The AuxK loss without its coefficient: each row's ``settings.k_aux``
    largest dead pre-activations reconstruct the residual, compared outside
    ``settings.interaction_SD``, scaled down when fewer than ``k_aux`` latents
    are dead; 0 when none is.

    ``decode_top_dead(k)`` decodes (without bias) each row's k largest dead
    pre-activations.
    """
    num_dead = 0 if dead_mask_F is None else int(dead_mask_F.sum())
    if num_dead == 0:
        return residual_BD.new_tensor(0.0)
    require_aux_compatible_normalisation(normalize_activations)
    recons_BD = decode_top_dead(min(settings.k_aux, num_dead))
    return scaled_aux_error(recons_BD, residual_BD, num_dead, settings)


def scaled_aux_error(
    recons_BD: Tensor, residual_BD: Tensor, num_dead: int, settings: AuxSettings
) -> Tensor:
    """AuxK's error for a reconstruction of the dead latents: the squared
    distance to ``residual_BD`` outside ``settings.interaction_SD`` (sum over
    d_in, mean over rows), times ``min(num_dead / k_aux, 1)``."""
    error_BD = outside_interactions(recons_BD - residual_BD, settings.interaction_SD)
    return min(num_dead / settings.k_aux, 1.0) * error_BD.pow(2).sum(dim=-1).mean()


def decode_top_dead_dense(
    hidden_pre_BF: Tensor,
    dead_mask_F: Tensor,
    decode: Callable[[Tensor], Tensor],
    k_aux: int,
) -> Tensor:
    """``decode`` of each row's ``k_aux`` largest dead pre-activations (dense)."""
    return decode(calculate_topk_aux_acts(k_aux, hidden_pre_BF, dead_mask_F))


def require_aux_compatible_normalisation(mode: str) -> None:
    """Raise ValueError for an activation normalisation AuxK cannot work with."""
    if mode in ("constant_norm_rescale", "layer_norm"):
        raise ValueError(
            f"The AuxK loss does not support normalize_activations={mode!r}: its "
            "reconstruction would live in the normalised space and the residual in "
            "the original one. Use 'none' or 'expected_average_only_in'."
        )
