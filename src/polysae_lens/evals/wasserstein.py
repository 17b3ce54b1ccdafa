"""Exact 1-D Wasserstein-1 distances between the two classes of every latent.

For one binary task the paper (method-notes, "Paper evaluation") measures, for
each latent, the Wasserstein-1 distance between its values on the label-1 and the
label-0 samples, and averages over all latents (dead latents count 0).

Public functions:

- :func:`wasserstein_per_latent` ``(latents_NF, labels_N) -> [F]``: the exact W1.
- :func:`standardized_wasserstein_per_latent`: the scale-free variant, W1 divided
  by the latent's standard deviation over both classes pooled (ddof = 0). W1 of
  ``a * x + b`` is ``|a|`` times W1 of ``x`` and so is that standard deviation, so
  the ratio is invariant to any affine rescaling of a latent. Latents with W1 = 0
  (dead or constant latents, or equal class distributions) are defined as 0.
- :func:`wasserstein_stats`: both, plus the standard deviations, in one pass.

Results are float64 tensors on the input's device.

Shape suffixes: N samples, F latents, C latents of one chunk, W padded width of a
chunk's rows.

How it is exact and fast
------------------------
W1 of two empirical distributions P (n_pos samples) and Q (n_neg samples) is the
integral of ``|F_P(t) - F_Q(t)|``. Sort the pooled samples of a latent: between
consecutive sorted values ``v_i <= v_{i+1}`` the ECDF difference is constant, so
``W1 = sum_i |D_i| (v_{i+1} - v_i)`` where ``D_i`` is the difference after the
i-th value. Weighting a class-1 sample by ``n_neg`` and a class-0 sample by
``-n_pos`` makes ``n_pos * n_neg * D_i`` an integer cumulative sum (exact in
int64) that ends at exactly 0 for every latent. Ties are exact: tied values add
zero-width intervals whatever their order.

SAE latents are mostly zero, and all zeros of a latent are one point mass at 0:
only the nonzero entries are gathered and sorted (per latent, in padded rows),
plus one "atom" entry at 0 carrying the weight of all its zeros. The class of
each entry rides in the two lowest bits of its float64 key: a float32 (or bf16 or
fp16) value converted to float64 has 29 zero low mantissa bits, so tagging them
changes no ordering between distinct values and is undone exactly after the sort.
(For float64 inputs the tag perturbs values by at most 3 ulp: exact up to float64
rounding.) The one sort per chunk is a batched row sort. On CPU every step of a
chunk runs in numpy (its row sort is several times faster than ``torch.sort``,
its scans and gathers about twice as fast as torch's, and it uses one thread, so
it does not stall when another process holds the second core); on CUDA the same
steps run in torch. Memory: one
latent-major copy of the input (none if it is already latent-major, e.g.
``x_FN.T``) plus O(chunk) scratch.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from polysae_lens.evals._checks import as_2d_float, binary_labels

__all__ = [
    "WassersteinStats",
    "standardized_wasserstein_per_latent",
    "wasserstein_per_latent",
    "wasserstein_stats",
]

_CHUNK_ELEMENTS = 1 << 18
"""Dense elements (latents x samples) handled per chunk: keeps scratch cache-sized."""

# Class tags in the two low bits of a float64 key (see the module docstring).
_PAD, _POS, _NEG, _ATOM = 0, 1, 2, 3
_TAG_MASK = 3


class WassersteinStats(NamedTuple):
    """Per-latent class-separation statistics of one binary task (float64, [F])."""

    distance: Tensor
    """Exact W1 between the label-1 and label-0 values of each latent."""
    std: Tensor
    """Standard deviation of each latent over all samples of both classes (ddof = 0):
    the scale ``distance`` was measured at."""
    standardized: Tensor
    """``distance / std``; 0 where ``distance`` is 0 (dead or constant latents)."""


def wasserstein_per_latent(latents: Tensor, labels: Tensor) -> Tensor:
    """Exact 1-D Wasserstein-1 distance between the label-1 and label-0 samples of
    every latent.

    Args:
        latents: [N, F] latent values (any float dtype; ints are converted).
        labels: [N] binary labels (0/1 or bool); both classes must be present.

    Returns:
        [F] float64 distances, on the input's device; 0 for dead latents. Equal to
        ``scipy.stats.wasserstein_distance`` per latent (to float64 rounding).

    Raises:
        ValueError: bad shapes, empty input, non-binary or single-class labels,
            NaN or inf latents.
    """
    return wasserstein_stats(latents, labels).distance


def standardized_wasserstein_per_latent(latents: Tensor, labels: Tensor) -> Tensor:
    """W1 divided by each latent's standard deviation over both classes pooled.

    Scale-free: invariant to ``latent -> a * latent + b`` for any ``a != 0``. Dead
    and constant latents (and any latent with W1 = 0) give 0. Same arguments and
    errors as :func:`wasserstein_per_latent`.
    """
    return wasserstein_stats(latents, labels).standardized


@torch.no_grad()
def wasserstein_stats(
    latents: Tensor, labels: Tensor, *, chunk_elements: int = _CHUNK_ELEMENTS
) -> WassersteinStats:
    """W1, pooled standard deviation and standardized W1 of every latent, in one pass.

    ``chunk_elements`` bounds the dense elements (latents x samples) processed at
    once; it changes speed and memory only, never the result.
    """
    latents_NF = as_2d_float(latents, "latents")
    pos_N = binary_labels(labels, latents_NF.shape[0], "labels").to(latents_NF.device)
    if chunk_elements < 1:
        raise ValueError(f"chunk_elements={chunk_elements} must be >= 1.")
    out_device = latents_NF.device
    if out_device.type not in ("cpu", "cuda"):
        # The tagged keys need float64 sorts, which MPS and other backends lack.
        latents_NF, pos_N = latents_NF.cpu(), pos_N.cpu()
    n_samples, n_latents = latents_NF.shape
    n_pos = int(pos_N.sum())
    n_neg = n_samples - n_pos
    device = latents_NF.device

    # Latent-major [F, N] rows; a column-major input (e.g. ``x.T`` of a [F, N]
    # tensor) is used as is, without a copy.
    latents_FN = latents_NF.T if latents_NF.T.is_contiguous() else latents_NF.T.contiguous()
    tag_N = torch.where(pos_N, _POS, _NEG).to(torch.int64)
    # Integer ECDF weights: a class-1 sample adds n_neg, a class-0 sample -n_pos.
    weight_of_tag = torch.tensor([0, n_neg, -n_pos, 0], dtype=torch.int64, device=device)

    distance_F = torch.empty(n_latents, dtype=torch.float64, device=device)
    std_F = torch.empty(n_latents, dtype=torch.float64, device=device)
    rows_per_chunk = max(1, chunk_elements // n_samples)
    for f0 in range(0, n_latents, rows_per_chunk):
        f1 = min(n_latents, f0 + rows_per_chunk)
        distance_F[f0:f1], std_F[f0:f1] = _chunk_stats(
            latents_FN[f0:f1], tag_N, weight_of_tag, first_latent=f0
        )
    distance_F /= n_pos * n_neg
    standardized_F = torch.where(
        distance_F > 0, distance_F / std_F.clamp_min(torch.finfo(torch.float64).tiny), 0.0
    )
    return WassersteinStats(
        distance=distance_F.to(out_device),
        std=std_F.to(out_device),
        standardized=standardized_F.to(out_device),
    )


def _chunk_stats(
    rows_CN: Tensor,
    tag_N: Tensor,
    weight_of_tag: Tensor,
    first_latent: int,
) -> tuple[Tensor, Tensor]:
    """Unnormalised W1 (times n_pos * n_neg) and pooled std of C latents.

    On CPU the steps run in numpy (:func:`_chunk_stats_numpy`): its gathers and
    row scans are about twice as fast as torch's single-threaded ones, and numpy
    never starts a thread pool, so a busy second core does not stall the
    evaluator (issue 16 measured 2-thread torch losing to scipy there). Other
    devices run the same steps in torch (:func:`_chunk_stats_torch`).
    """
    if rows_CN.device.type == "cpu" and rows_CN.dtype != torch.bfloat16:
        distance_C, std_C = _chunk_stats_numpy(
            rows_CN.numpy(), tag_N.numpy(), weight_of_tag.numpy(), first_latent
        )
        return torch.from_numpy(distance_C), torch.from_numpy(std_C)
    return _chunk_stats_torch(rows_CN, tag_N, weight_of_tag, first_latent)


def _non_finite_error(
    value: float, flat_index: int, n_samples: int, first_latent: int
) -> ValueError:
    kind = "NaN" if value != value else "inf"
    return ValueError(
        f"latents contain non-finite values (NaN or inf): the first is {kind} at "
        f"sample {flat_index % n_samples}, latent {first_latent + flat_index // n_samples}."
    )


def _chunk_stats_numpy(
    rows_CN: np.ndarray,
    tag_N: np.ndarray,
    weight_of_tag: np.ndarray,
    first_latent: int,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_chunk_stats` in numpy; the steps of :func:`_chunk_stats_torch`."""
    n_rows, n_samples = rows_CN.shape
    # NaN != 0, so NaN and inf are among the gathered nonzeros: check only those.
    # (The scan of a bool mask is several times faster than of the floats.)
    flat_i = np.flatnonzero(rows_CN != 0)
    # flat_i ascends, so each row's entries are one run; its bounds give the counts.
    bounds = np.searchsorted(flat_i, np.arange(n_rows + 1) * n_samples)
    count_C = np.diff(bounds)
    values = rows_CN.reshape(-1).take(flat_i).astype(np.float64)
    finite = np.isfinite(values)
    if not finite.all():
        bad = int(np.argmin(finite))
        raise _non_finite_error(float(values[bad]), int(flat_i[bad]), n_samples, first_latent)
    row_i = np.repeat(np.arange(n_rows), count_C)
    tags = tag_N.take(flat_i - row_i * n_samples)

    # Padded rows: each latent's nonzeros, then zero padding; the last slot (never
    # written: width > max count) holds the zero atom. A boolean assignment fills
    # the True slots in row-major order, i.e. the first count_C slots of each row.
    width = int(count_C.max()) + 1
    keys_CW = np.zeros((n_rows, width), dtype=np.int64)
    keys_CW[np.arange(width) < count_C[:, None]] = values.view(np.int64) | tags
    keys_CW[:, -1] = _ATOM
    keys_CW.view(np.float64).sort(axis=1)

    tag_CW = keys_CW & _TAG_MASK
    sorted_CW = (keys_CW & ~_TAG_MASK).view(np.float64)
    weight_CW = weight_of_tag.take(tag_CW)
    # The atom carries every zero; its weight makes the row sum exactly 0 (the
    # weights of all n_samples values sum to n_pos * n_neg - n_neg * n_pos), so a
    # row-wise cumsum is the ECDF gap. One atom per row: the assignment is in row order.
    weight_CW[tag_CW == _ATOM] = -weight_CW.sum(axis=1)
    gap_CW = weight_CW.cumsum(axis=1)[:, :-1]
    distance_C = (np.abs(gap_CW) * np.diff(sorted_CW, axis=1)).sum(axis=1)

    # Pooled standard deviation over all n_samples values, two-pass. A row holds
    # every nonzero plus (width - count) zeros; the other zeros are added back.
    mean_C = sorted_CW.sum(axis=1) / n_samples
    centred_sq_C = np.square(sorted_CW - mean_C[:, None]).sum(axis=1)
    centred_sq_C += (n_samples - width) * np.square(mean_C)
    std_C = np.sqrt(np.maximum(centred_sq_C, 0) / n_samples)
    return distance_C, std_C


def _chunk_stats_torch(
    rows_CN: Tensor,
    tag_N: Tensor,
    weight_of_tag: Tensor,
    first_latent: int,
) -> tuple[Tensor, Tensor]:
    """:func:`_chunk_stats` in torch (CUDA, bf16); the steps of :func:`_chunk_stats_numpy`."""
    n_rows, n_samples = rows_CN.shape
    device = rows_CN.device
    flat_i = (rows_CN != 0).view(-1).nonzero().squeeze(1)
    bounds = torch.searchsorted(flat_i, torch.arange(n_rows + 1, device=device) * n_samples)
    count_C = bounds.diff()
    values = rows_CN.reshape(-1).take(flat_i).to(torch.float64)
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        bad = int((~finite).nonzero()[0, 0])
        raise _non_finite_error(float(values[bad]), int(flat_i[bad]), n_samples, first_latent)
    row_i = torch.repeat_interleave(torch.arange(n_rows, device=device), count_C)
    tags = tag_N.take(flat_i - row_i * n_samples)

    width = int(count_C.max()) + 1
    keys_CW = torch.zeros((n_rows, width), dtype=torch.int64, device=device)
    keys_CW[torch.arange(width, device=device) < count_C[:, None]] = values.view(torch.int64) | tags
    keys_CW[:, -1] = _ATOM
    keys_CW = keys_CW.view(torch.float64).sort(dim=1).values.view(torch.int64)

    tag_CW = keys_CW & _TAG_MASK
    sorted_CW = (keys_CW & ~_TAG_MASK).view(torch.float64)
    weight_CW = weight_of_tag.take(tag_CW)
    weight_CW[tag_CW == _ATOM] = -weight_CW.sum(dim=1)
    gap_CW = weight_CW.cumsum(dim=1)[:, :-1]
    distance_C = (gap_CW.abs() * sorted_CW.diff(dim=1)).sum(dim=1)

    mean_C = sorted_CW.sum(dim=1) / n_samples
    centred_sq_C = (sorted_CW - mean_C[:, None]).square().sum(dim=1)
    centred_sq_C += (n_samples - width) * mean_C.square()
    std_C = (centred_sq_C.clamp_min(0) / n_samples).sqrt()
    return distance_C, std_C
