"""The PolySAE decoder as pure tensor functions.

PolySAE (arXiv 2602.01322, Sec. 3) decodes a sparse code through a shared
projection ``U`` with orthonormal columns and a low-rank polynomial::

    a    = z @ U
    x^   = b_dec + a @ C1
                 + lambda2 * (a[..., :R2] ** 2) @ C2
                 + lambda3 * (a[..., :R3] ** 3) @ C3

Powers are element-wise. Order 1 keeps only the linear term, order 2 drops the
cubic one. The functions here never add ``b_dec``: callers own the bias, the
hooks and the activation normalisation.

Shape key for the suffixes used throughout the package:

- ``B``: batch (any number of leading dimensions)
- ``F``: latents (``d_sae``)
- ``D``: model dimension (``d_in``)
- ``R``: rank of the shared projection (``R1``); ``S`` and ``T`` are ``R2`` and
  ``R3``, the ranks of the quadratic and cubic terms
- ``K``: active latents per row (TopK ``k``)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class PolyDecoderWeights(NamedTuple):
    """The decoder parameters of one PolySAE, without the bias ``b_dec``."""

    U_FR: Tensor
    """Shared projection [d_sae, R1] with orthonormal columns."""
    C1_RD: Tensor
    """Linear term [R1, d_in]."""
    C2_SD: Tensor | None
    """Quadratic term [R2, d_in]; ``None`` at order 1."""
    C3_TD: Tensor | None
    """Cubic term [R3, d_in]; ``None`` below order 3."""
    lambda2: Tensor | None
    """0-dim scale of the quadratic term; ``None`` at order 1."""
    lambda3: Tensor | None
    """0-dim scale of the cubic term; ``None`` below order 3."""


class DecoderTerms(NamedTuple):
    """The contribution of each polynomial order to a reconstruction (no bias)."""

    linear: Tensor
    """``a @ C1``, shape [..., d_in]."""
    quadratic: Tensor | None
    """``lambda2 * (a[..., :R2] ** 2) @ C2``, or ``None`` at order 1."""
    cubic: Tensor | None
    """``lambda3 * (a[..., :R3] ** 3) @ C3``, or ``None`` below order 3."""

    def total(self) -> Tensor:
        """Sum of the present terms."""
        out = self.linear
        if self.quadratic is not None:
            out = out + self.quadratic
        if self.cubic is not None:
            out = out + self.cubic
        return out


def project(z_BF: Tensor, U_FR: Tensor) -> Tensor:
    """``a = z @ U`` for a dense or a 2-D sparse COO code."""
    if z_BF.is_sparse:
        if z_BF.ndim != 2:
            z_BF = z_BF.to_dense()
        else:
            # sparse.mm has no bf16 autocast kernel; run it in the code's dtype
            with torch.autocast(device_type=z_BF.device.type, enabled=False):
                return torch.sparse.mm(z_BF, U_FR.to(z_BF.dtype))
    return z_BF @ U_FR


def terms_from_projection(a_BR: Tensor, weights: PolyDecoderWeights) -> DecoderTerms:
    """Each order's contribution, given the projected code ``a = z @ U``."""
    linear = a_BR @ weights.C1_RD
    quadratic = cubic = None
    if weights.C2_SD is not None and weights.lambda2 is not None:
        a_BS = a_BR[..., : weights.C2_SD.shape[0]]
        quadratic = weights.lambda2 * (a_BS * a_BS) @ weights.C2_SD
    if weights.C3_TD is not None and weights.lambda3 is not None:
        a_BT = a_BR[..., : weights.C3_TD.shape[0]]
        cubic = weights.lambda3 * (a_BT * a_BT * a_BT) @ weights.C3_TD
    return DecoderTerms(linear, quadratic, cubic)


def decoder_terms(z_BF: Tensor, weights: PolyDecoderWeights) -> DecoderTerms:
    """Each order's contribution to the reconstruction of code ``z``."""
    return terms_from_projection(project(z_BF, weights.U_FR), weights)


def poly_decode(z_BF: Tensor, weights: PolyDecoderWeights) -> Tensor:
    """The polynomial reconstruction of ``z`` without ``b_dec`` (fast dense path)."""
    return decoder_terms(z_BF, weights).total()


def poly_decode_reference(z_BF: Tensor, weights: PolyDecoderWeights) -> Tensor:
    """A plain, slow version of :func:`poly_decode` for tests (tiny sizes only).

    It expands the decoder into its Volterra kernels, ``Q[i, j] = lambda2 *
    sum_r U[i, r] U[j, r] C2[r]`` and ``T[i, j, k] = lambda3 * sum_r U[i, r]
    U[j, r] U[k, r] C3[r]``, and sums ``z_i z_j Q[i, j] + z_i z_j z_k T[i, j, k]``
    over all latent pairs and triples, so it shares no code path with the
    factorised form. Memory grows as d_sae**3 * d_in.
    """
    z = z_BF.to_dense() if z_BF.is_sparse else z_BF
    U = weights.U_FR
    out = torch.einsum("...i,ir,rd->...d", z, U, weights.C1_RD)
    if weights.C2_SD is not None and weights.lambda2 is not None:
        S = weights.C2_SD.shape[0]
        Q_FFD = weights.lambda2 * torch.einsum("ir,jr,rd->ijd", U[:, :S], U[:, :S], weights.C2_SD)
        out = out + torch.einsum("...i,...j,ijd->...d", z, z, Q_FFD)
    if weights.C3_TD is not None and weights.lambda3 is not None:
        T = weights.C3_TD.shape[0]
        T_FFFD = weights.lambda3 * torch.einsum(
            "ir,jr,kr,rd->ijkd", U[:, :T], U[:, :T], U[:, :T], weights.C3_TD
        )
        out = out + torch.einsum("...i,...j,...k,ijkd->...d", z, z, z, T_FFFD)
    return out


def first_order_decoder(weights: PolyDecoderWeights) -> Tensor:
    """``U @ C1`` [d_sae, d_in]: the decoder's Jacobian at z = 0, SAELens's ``W_dec``."""
    return weights.U_FR @ weights.C1_RD
