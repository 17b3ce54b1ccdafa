"""Initial weights of a PolySAE: one pure function per ``init_preset``.

Each function takes the shapes and the preset's settings, draws from
``generator`` (torch's global generator when None) and returns
:class:`InitialWeights`; ``PolyDecoderMixin.initialize_weights`` only wraps
them in parameters. Shape suffixes as in :mod:`polysae_lens.polynomial`
(F d_sae, D d_in, R/S/T the ranks R1/R2/R3).
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor, nn

from polysae_lens.config import AUTHORS_DECODER_INIT_NORM, INIT_PRESETS
from polysae_lens.stiefel import qr_retract


class InitialWeights(NamedTuple):
    """Freshly drawn weights; ``C2_SD`` / ``C3_TD`` are None below order 2 / 3."""

    U_FR: Tensor
    C1_RD: Tensor
    C2_SD: Tensor | None
    C3_TD: Tensor | None
    W_enc_DF: Tensor


def kaiming_uniform(
    rows: int,
    cols: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> Tensor:
    """torch's ``kaiming_uniform_`` (its defaults) of a [rows, cols] tensor: fan_in = cols."""
    weight = torch.empty(rows, cols, dtype=dtype, device=device)
    nn.init.kaiming_uniform_(weight, generator=generator)
    return weight


def orthonormal_columns(
    rows: int,
    cols: int,
    *,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> Tensor:
    """A float32 [rows, cols] matrix with orthonormal columns: the Q of a
    Gaussian's QR with diag(R) > 0, so uniformly (Haar) distributed. float32
    because torch has no half-precision QR; callers cast."""
    gaussian = torch.randn(rows, cols, device=device, dtype=torch.float32, generator=generator)
    return qr_retract(gaussian)


def package_init(
    d_in: int,
    d_sae: int,
    ranks: tuple[int, int, int],
    poly_order: int,
    *,
    c1_init: str,
    decoder_init_norm: float | None,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> InitialWeights:
    """The package's init (``init_preset="package"``).

    U orthonormal; C1 ``sqrt(2)`` times orthonormal rows (``c1_init="orthogonal"``:
    Kaiming's Frobenius norm with condition number 1) or Kaiming-uniform in its
    [R1, d_in] storage; C2, C3 Kaiming-uniform in [R, d_in] storage (fan_in =
    d_in). ``decoder_init_norm`` rescales C1 so that the rows of ``U @ C1`` have
    that mean norm. W_enc is tied to the first-order decoder, ``(U @ C1)^T``: the
    package's choice, as SAELens ties W_enc to W_dec^T (the authors' code did not
    tie it; see :func:`authors_init`).
    """
    r1, r2, r3 = ranks
    kaiming = partial(kaiming_uniform, dtype=dtype, device=device, generator=generator)
    orthonormal = partial(orthonormal_columns, device=device, generator=generator)
    U_FR = orthonormal(d_sae, r1).to(dtype)
    if c1_init == "orthogonal":
        C1_RD = (math.sqrt(2.0) * orthonormal(d_in, r1).T).to(dtype).contiguous()
    else:
        C1_RD = kaiming(r1, d_in)
    C2_SD = kaiming(r2, d_in) if poly_order >= 2 else None
    C3_TD = kaiming(r3, d_in) if poly_order >= 3 else None
    if decoder_init_norm is not None and device.type != "meta":  # meta has no values
        C1_RD = C1_RD * (decoder_init_norm / (U_FR @ C1_RD).norm(dim=-1).mean())
    W_enc_DF = (U_FR @ C1_RD).T.contiguous()
    return InitialWeights(U_FR, C1_RD, C2_SD, C3_TD, W_enc_DF)


def authors_init(
    d_in: int,
    d_sae: int,
    ranks: tuple[int, int, int],
    poly_order: int,
    *,
    decoder_init_norm: float,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> InitialWeights:
    """The distribution the authors' research fork (SAELens 6.22) draws from
    (``init_preset="authors"``).

    It stores the C's as [d_in, R] and Kaiming-inits them there, so fan_in = R
    (C2 comes out sqrt(d_in / R2) times larger than in :func:`package_init`);
    we draw them in that orientation and transpose. W_enc is not tied to the
    polynomial decoder: it is the transpose of SAELens's placeholder W_dec
    [d_sae, d_in], Kaiming-uniform with rows rescaled to ``decoder_init_norm``
    (SAELens's TrainingSAE init), which the polynomial decoder never reads. Draw
    order as there: the placeholder first, then U, C1, C2, C3.
    """
    r1, r2, r3 = ranks
    kaiming = partial(kaiming_uniform, dtype=dtype, device=device, generator=generator)
    W_dec_FD = kaiming(d_sae, d_in)
    W_dec_FD = W_dec_FD / W_dec_FD.norm(dim=-1, keepdim=True) * decoder_init_norm
    U_FR = orthonormal_columns(d_sae, r1, device=device, generator=generator).to(dtype)
    C1_RD = kaiming(d_in, r1).T.contiguous()
    C2_SD = kaiming(d_in, r2).T.contiguous() if poly_order >= 2 else None
    C3_TD = kaiming(d_in, r3).T.contiguous() if poly_order >= 3 else None
    return InitialWeights(U_FR, C1_RD, C2_SD, C3_TD, W_dec_FD.T.contiguous())


def initial_weights(
    d_in: int,
    d_sae: int,
    ranks: tuple[int, int, int],
    poly_order: int,
    *,
    init_preset: str,
    c1_init: str,
    decoder_init_norm: float | None,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> InitialWeights:
    """The weights of ``init_preset``: :func:`package_init` or :func:`authors_init`."""
    if init_preset == "authors":
        return authors_init(
            d_in,
            d_sae,
            ranks,
            poly_order,
            decoder_init_norm=AUTHORS_DECODER_INIT_NORM
            if decoder_init_norm is None
            else decoder_init_norm,
            dtype=dtype,
            device=device,
            generator=generator,
        )
    if init_preset != "package":
        raise ValueError(
            f"init_preset={init_preset!r} is not allowed: use one of {list(INIT_PRESETS)}."
        )
    return package_init(
        d_in,
        d_sae,
        ranks,
        poly_order,
        c1_init=c1_init,
        decoder_init_norm=decoder_init_norm,
        dtype=dtype,
        device=device,
        generator=generator,
    )
