"""Interaction analysis for trained PolySAEs.

Definitions (the decoder is ``x^(z) = b_dec + sum_n lambda_n (z @ U)[:R_n]^n @ C_n``,
:mod:`polysae_lens.polynomial`):

- **First-order direction** of latent ``i``: ``d_i = dx^/dz_i`` at ``z = 0``, row
  ``i`` of ``W_dec = U @ C1``.
- **Interaction direction** of a pair ``i != j``: the mixed second derivative at
  ``z = 0``, ``v_ij = d^2 x^ / dz_i dz_j = 2 lambda2 sum_{r<R2} U[i,r] U[j,r] C2[r]``.
  It is the coefficient of ``z_i z_j`` in the quadratic term, so two latents
  firing together at magnitudes ``z_i, z_j`` add ``z_i z_j v_ij`` beyond their
  first-order directions (plus, at order 3, cubic cross terms; see
  :func:`pair_effect` for the exact difference). The cubic term has no
  second derivative at ``z = 0``, so ``v_ij`` is purely quadratic.
- **Interaction strength** ``B_ij = ||v_ij||``, in the units of the model's
  activations per unit of ``z_i z_j``.
- **Triple direction** ``t_ijk = d^3 x^ / dz_i dz_j dz_k = 6 lambda3 sum_{r<R3}
  U[i,r] U[j,r] U[k,r] C3[r]`` for distinct ``i, j, k``.

The top-pair search is exact and never builds a ``d_sae x d_sae`` matrix:
``B_ij^2 = 4 lambda2^2 w_ij^T G w_ij`` with ``w_ij = U[i,:R2] * U[j,:R2]`` and
``G = C2 C2^T``, which is a weighted inner product of the vectors
``vech(U[i] U[i]^T)`` of length ``R2 (R2+1)/2``; blocks of latents are compared
by matrix products and only a running top-N is kept. At the paper's GPT-2 shape
(d_sae 16384, R2 64) that is about 1.1 TFLOP in blocks of a few MB.

Co-occurrence statistics (:func:`cooccurrence_stats`) count, over a set of
activations, how often each pair of latents fires together, and accumulate the
latents' covariance on those pairs, all in sparse form. The paper (Sec. 5)
reports that PolySAE's interaction strengths are uncorrelated with
co-occurrence (r = 0.06) while a linear SAE's latent covariance is strongly
correlated with it (r = 0.82); :func:`correlate` gives both Pearson and
Spearman coefficients for such comparisons.

Shape suffixes as in :mod:`polysae_lens.polynomial`, plus ``P`` for latent pairs
and ``N`` for samples.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from typing import Any, Literal, NamedTuple, cast

import torch
from sae_lens.saes.sae import SAE
from scipy import stats as scipy_stats
from torch import Tensor, nn

from polysae_lens.polynomial import PolyDecoderWeights, poly_decode
from polysae_lens.sae import is_poly_sae

SteeringKind = Literal["first_order", "interaction"]
STEERING_KINDS: tuple[str, ...] = ("first_order", "interaction")


class InteractingPairs(NamedTuple):
    """Latent pairs with their interaction strengths, strongest first."""

    pairs_P2: Tensor
    """[P, 2] latent indices, ``pairs_P2[:, 0] < pairs_P2[:, 1]`` (or equal for self terms)."""
    strength_P: Tensor
    """[P] interaction strengths ``||v_ij||``."""


class CooccurrenceStats(NamedTuple):
    """How often latent pairs fire together over a set of activations (sparse)."""

    pairs_P2: Tensor
    """[P, 2] pairs ``i < j`` that co-fired at least ``min_count`` times."""
    count_P: Tensor
    """[P] number of samples in which both latents were nonzero."""
    frequency_P: Tensor
    """[P] ``count_P / n_samples``."""
    covariance_P: Tensor
    """[P] covariance ``E[z_i z_j] - E[z_i] E[z_j]`` of the latent activations."""
    firing_rate_F: Tensor
    """[d_sae] fraction of samples in which each latent fired."""
    mean_F: Tensor
    """[d_sae] mean activation of each latent."""
    n_samples: int
    """Number of activation vectors encoded."""


class Correlation(NamedTuple):
    """Pearson and Spearman correlation of two paired samples."""

    pearson: float
    spearman: float
    n: int
    """Number of pairs the coefficients were computed over."""


def poly_weights(sae: nn.Module | PolyDecoderWeights) -> PolyDecoderWeights:
    """The decoder weights of a PolySAE (or the weights themselves), detached."""
    if isinstance(sae, PolyDecoderWeights):
        weights = sae
    elif is_poly_sae(sae):
        weights = cast(PolyDecoderWeights, sae.decoder_weights)
    else:
        raise TypeError(
            f"interaction analysis needs a PolySAE or PolyDecoderWeights, got "
            f"{type(sae).__name__}; a linear SAE has no interaction terms (use "
            f"cooccurrence_stats for its covariance baseline)"
        )

    def detach(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.detach()

    return PolyDecoderWeights(
        weights.U_FR.detach(),
        weights.C1_RD.detach(),
        detach(weights.C2_SD),
        detach(weights.C3_TD),
        detach(weights.lambda2),
        detach(weights.lambda3),
    )


def _require_order(weights: PolyDecoderWeights, order: int) -> None:
    if order == 2 and (weights.C2_SD is None or weights.lambda2 is None):
        raise ValueError(
            "this PolySAE has poly_order=1: it has no quadratic term, so no pair "
            "interactions; train with poly_order >= 2"
        )
    if order == 3 and (weights.C3_TD is None or weights.lambda3 is None):
        raise ValueError(
            "this PolySAE has poly_order < 3: it has no cubic term, so no triple "
            "interactions; train with poly_order=3"
        )


def _as_index(idx: int | Tensor | Iterable[int], d_sae: int, device: torch.device) -> Tensor:
    if not isinstance(idx, (int, Tensor)):
        idx = list(idx)
    out = torch.as_tensor(idx, dtype=torch.long, device=device)
    if out.numel() and (int(out.min()) < 0 or int(out.max()) >= d_sae):
        raise IndexError(
            f"latent index out of range: got values in [{int(out.min())}, "
            f"{int(out.max())}], allowed 0..{d_sae - 1}"
        )
    return out


def interaction_direction(
    sae: nn.Module | PolyDecoderWeights, i: int | Tensor, j: int | Tensor
) -> Tensor:
    """Interaction direction ``v_ij`` [..., d_in] of latent pairs (broadcasting ``i``, ``j``)."""
    w = poly_weights(sae)
    _require_order(w, 2)
    assert w.C2_SD is not None and w.lambda2 is not None
    F, S = w.U_FR.shape[0], w.C2_SD.shape[0]
    i_, j_ = _as_index(i, F, w.U_FR.device), _as_index(j, F, w.U_FR.device)
    U_FS = w.U_FR[:, :S]
    return 2 * w.lambda2 * (U_FS[i_] * U_FS[j_]) @ w.C2_SD


def interaction_strength(
    sae: nn.Module | PolyDecoderWeights, i: int | Tensor, j: int | Tensor
) -> Tensor:
    """Interaction strength ``B_ij = ||v_ij||`` of latent pairs (broadcasting ``i``, ``j``)."""
    return interaction_direction(sae, i, j).norm(dim=-1)


def triple_direction(
    sae: nn.Module | PolyDecoderWeights, i: int | Tensor, j: int | Tensor, k: int | Tensor
) -> Tensor:
    """Third-order direction ``t_ijk`` [..., d_in] of latent triples (distinct indices)."""
    w = poly_weights(sae)
    _require_order(w, 3)
    assert w.C3_TD is not None and w.lambda3 is not None
    F, T = w.U_FR.shape[0], w.C3_TD.shape[0]
    dev = w.U_FR.device
    i_, j_, k_ = (_as_index(x, F, dev) for x in (i, j, k))
    U_FT = w.U_FR[:, :T]
    return 6 * w.lambda3 * (U_FT[i_] * U_FT[j_] * U_FT[k_]) @ w.C3_TD


def pair_effect(
    sae: nn.Module | PolyDecoderWeights,
    i: int,
    j: int,
    z_i: float = 1.0,
    z_j: float = 1.0,
) -> Tensor:
    """What firing ``i`` and ``j`` together adds beyond firing each alone [d_in].

    ``x^(z_i e_i + z_j e_j) - x^(z_i e_i) - x^(z_j e_j) + x^(0)``: exactly
    ``z_i z_j v_ij`` at order 2, plus the cubic cross terms at order 3.
    """
    w = poly_weights(sae)
    _require_order(w, 2)
    F = w.U_FR.shape[0]
    idx = _as_index([i, j], F, w.U_FR.device)
    z_4F = torch.zeros(4, F, dtype=w.U_FR.dtype, device=w.U_FR.device)
    z_4F[0, idx[0]] = z_i
    z_4F[0, idx[1]] = z_j
    z_4F[1, idx[0]] = z_i
    z_4F[2, idx[1]] = z_j
    x_4D = poly_decode(z_4F, w)
    return x_4D[0] - x_4D[1] - x_4D[2] + x_4D[3]


def _vech_weights(G_SS: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Row/column indices of the upper triangle of an S x S matrix and the
    weights that turn the ``vech`` inner product into ``w^T G w``."""
    S = G_SS.shape[0]
    r, s = torch.triu_indices(S, S, device=G_SS.device)
    weight = G_SS[r, s] * torch.where(r == s, 1.0, 2.0).to(G_SS.dtype)
    return r, s, weight


def top_interacting_pairs(
    sae: nn.Module | PolyDecoderWeights,
    n: int = 100,
    latents: Tensor | Iterable[int] | None = None,
    include_self: bool = False,
    block_size: int = 1024,
) -> InteractingPairs:
    """The ``n`` latent pairs with the largest interaction strength, exactly.

    Args:
        sae: a PolySAE of order >= 2 (or its decoder weights).
        n: number of pairs to return (fewer if there are fewer pairs).
        latents: restrict the search to these latent indices (e.g. the live
            ones); all latents by default.
        include_self: also rank the self terms ``d^2 x^/dz_i^2`` (``i == j``).
        block_size: latents compared per block; memory is about
            ``block_size * (block_size + R2^2)`` floats.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    w = poly_weights(sae)
    _require_order(w, 2)
    assert w.C2_SD is not None and w.lambda2 is not None
    F, S = w.U_FR.shape[0], w.C2_SD.shape[0]
    dev = w.U_FR.device
    idx_L = (
        torch.arange(F, device=dev) if latents is None else torch.unique(_as_index(latents, F, dev))
    )
    U_LS = w.U_FR[idx_L, :S].float()
    r, s, g = _vech_weights(w.C2_SD.float() @ w.C2_SD.float().T)
    scale = 4 * float(w.lambda2) ** 2

    best_val = torch.empty(0, device=dev)
    best_pair = torch.empty(0, 2, dtype=torch.long, device=dev)
    L = idx_L.shape[0]
    for a0 in range(0, L, block_size):
        P_a = U_LS[a0 : a0 + block_size]
        V_aK = (P_a[:, r] * P_a[:, s]) * g
        for b0 in range(a0, L, block_size):
            P_b = U_LS[b0 : b0 + block_size]
            W_bK = P_b[:, r] * P_b[:, s]
            sq_ab = (V_aK @ W_bK.T).clamp_min(0) * scale
            ia = torch.arange(a0, a0 + P_a.shape[0], device=dev)[:, None]
            ib = torch.arange(b0, b0 + P_b.shape[0], device=dev)[None, :]
            keep = ib > ia if not include_self else ib >= ia
            sq_ab = torch.where(keep, sq_ab, torch.full_like(sq_ab, -1.0))
            m = min(n, sq_ab.numel())
            vals, flat = sq_ab.flatten().topk(m)
            ok = vals >= 0
            vals, flat = vals[ok], flat[ok]
            pair = torch.stack(
                (idx_L[a0 + flat // P_b.shape[0]], idx_L[b0 + flat % P_b.shape[0]]), dim=1
            )
            best_val = torch.cat((best_val, vals))
            best_pair = torch.cat((best_pair, pair))
            if best_val.numel() > n:
                best_val, order = best_val.topk(n)
                best_pair = best_pair[order]
    order = best_val.argsort(descending=True)
    return InteractingPairs(best_pair[order], best_val[order].sqrt().to(w.U_FR.dtype))


def top_partners(
    sae: nn.Module | PolyDecoderWeights,
    latent: int,
    n: int = 10,
    latents: Tensor | Iterable[int] | None = None,
) -> InteractingPairs:
    """The ``n`` latents that interact most strongly with ``latent``.

    ``pairs_P2[:, 0]`` is ``latent`` and ``pairs_P2[:, 1]`` the partner (not
    sorted by index, unlike :func:`top_interacting_pairs`).
    """
    w = poly_weights(sae)
    F = w.U_FR.shape[0]
    dev = w.U_FR.device
    anchor = int(_as_index(latent, F, dev))
    cand = (
        torch.arange(F, device=dev) if latents is None else torch.unique(_as_index(latents, F, dev))
    )
    cand = cand[cand != anchor]
    strength = interaction_strength(w, torch.full_like(cand, anchor), cand)
    m = min(n, cand.numel())
    vals, order = strength.topk(m)
    pairs = torch.stack((torch.full_like(cand[order], anchor), cand[order]), dim=1)
    return InteractingPairs(pairs, vals)


def _batches(activations: Tensor | Iterable[Tensor], batch_size: int) -> Iterator[Tensor]:
    if isinstance(activations, Tensor):
        flat = activations.reshape(-1, activations.shape[-1])
        yield from flat.split(batch_size)
    else:
        for batch in activations:
            yield batch.reshape(-1, batch.shape[-1])


def _active_pairs(z_BF: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Rows, pair keys ``i * F + j`` (i < j) and products ``z_i z_j`` of every
    pair of latents active in the same row."""
    F = z_BF.shape[-1]
    active = z_BF != 0
    k_max = int(active.sum(dim=-1).max()) if z_BF.numel() else 0
    if k_max < 2:
        empty = torch.empty(0, dtype=torch.long, device=z_BF.device)
        return empty, empty, torch.empty(0, dtype=z_BF.dtype, device=z_BF.device)
    # Active latents of each row, padded with inactive ones flagged invalid.
    flag_BK, idx_BK = active.to(torch.int8).topk(k_max, dim=-1)
    idx_BK, sort = idx_BK.sort(dim=-1)
    valid_BK = flag_BK.gather(-1, sort).bool()
    val_BK = z_BF.gather(-1, idx_BK)
    a, b = torch.triu_indices(k_max, k_max, offset=1, device=z_BF.device)
    ok = valid_BK[:, a] & valid_BK[:, b]
    rows = torch.arange(z_BF.shape[0], device=z_BF.device)[:, None].expand_as(ok)[ok]
    keys = (idx_BK[:, a] * F + idx_BK[:, b])[ok]
    prods = (val_BK[:, a] * val_BK[:, b])[ok]
    return rows, keys, prods


@torch.no_grad()
def cooccurrence_stats(
    sae: SAE[Any],
    activations: Tensor | Iterable[Tensor],
    batch_size: int = 1024,
    min_count: int = 1,
) -> CooccurrenceStats:
    """Count latent co-firing over ``activations`` and the latents' covariance.

    Works for any SAELens SAE (linear or PolySAE): only ``sae.encode`` is used.
    Only pairs that co-fire are stored, so memory scales with the number of
    distinct co-firing pairs, never with ``d_sae ** 2``.

    Args:
        sae: the SAE whose latents are counted.
        activations: a tensor [..., d_in] or an iterable of such batches.
        batch_size: rows encoded at a time when ``activations`` is a tensor.
        min_count: keep pairs that co-fired at least this many times.
    """
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    F = int(sae.cfg.d_sae)
    n_samples = 0
    fired_F = torch.zeros(F, dtype=torch.float64)
    sum_F = torch.zeros(F, dtype=torch.float64)
    keys_acc = torch.empty(0, dtype=torch.long)
    count_acc = torch.empty(0, dtype=torch.float64)
    prod_acc = torch.empty(0, dtype=torch.float64)
    for x_BD in _batches(activations, batch_size):
        z_BF = sae.encode(x_BD).float()
        n_samples += z_BF.shape[0]
        fired_F += (z_BF != 0).sum(0).double().cpu()
        sum_F += z_BF.sum(0).double().cpu()
        _, keys, prods = _active_pairs(z_BF)
        keys = torch.cat((keys_acc, keys.cpu()))
        counts = torch.cat(
            (count_acc, torch.ones(keys.shape[0] - keys_acc.shape[0], dtype=torch.float64))
        )
        prods = torch.cat((prod_acc, prods.double().cpu()))
        keys_acc, inverse = torch.unique(keys, return_inverse=True)
        count_acc = torch.zeros(keys_acc.shape[0], dtype=torch.float64).index_add_(
            0, inverse, counts
        )
        prod_acc = torch.zeros(keys_acc.shape[0], dtype=torch.float64).index_add_(0, inverse, prods)
    if n_samples == 0:
        raise ValueError("activations is empty: no samples to count co-occurrence over")
    keep = count_acc >= min_count
    keys_acc, count_acc, prod_acc = keys_acc[keep], count_acc[keep], prod_acc[keep]
    pairs = torch.stack((keys_acc // F, keys_acc % F), dim=1)
    mean_F = sum_F / n_samples
    covariance = prod_acc / n_samples - mean_F[pairs[:, 0]] * mean_F[pairs[:, 1]]
    return CooccurrenceStats(
        pairs_P2=pairs,
        count_P=count_acc.long(),
        frequency_P=(count_acc / n_samples).float(),
        covariance_P=covariance.float(),
        firing_rate_F=(fired_F / n_samples).float(),
        mean_F=mean_F.float(),
        n_samples=n_samples,
    )


def correlate(x: Tensor, y: Tensor) -> Correlation:
    """Pearson and Spearman correlation of two 1-D samples (NaN if either is constant)."""
    x_np = x.detach().double().cpu().flatten().numpy()
    y_np = y.detach().double().cpu().flatten().numpy()
    if x_np.shape != y_np.shape:
        raise ValueError(f"x and y must have the same length, got {x_np.shape} and {y_np.shape}")
    n = int(x_np.shape[0])
    if n < 3 or x_np.std() == 0 or y_np.std() == 0:
        return Correlation(math.nan, math.nan, n)
    pearson = float(scipy_stats.pearsonr(x_np, y_np).statistic)
    spearman = float(scipy_stats.spearmanr(x_np, y_np).statistic)
    return Correlation(pearson, spearman, n)


def interaction_vs_cooccurrence(
    sae: nn.Module | PolyDecoderWeights, stats: CooccurrenceStats
) -> Correlation:
    """Correlation of PolySAE interaction strength with co-occurrence frequency,
    over the co-firing pairs in ``stats`` (the paper's r = 0.06 analysis)."""
    strength = interaction_strength(sae, stats.pairs_P2[:, 0], stats.pairs_P2[:, 1])
    return correlate(strength, stats.frequency_P)


def covariance_vs_cooccurrence(stats: CooccurrenceStats) -> Correlation:
    """Correlation of latent covariance with co-occurrence frequency over the
    co-firing pairs in ``stats`` (the paper's linear-SAE baseline, r = 0.82)."""
    return correlate(stats.covariance_P, stats.frequency_P)


def steering_vector(sae: SAE[Any], i: int, j: int, kind: SteeringKind = "first_order") -> Tensor:
    """A steering vector [d_in] for the pair ``(i, j)``.

    ``"first_order"`` is ``d_i + d_j`` (rows of ``W_dec``; the paper's Sec. 5
    steering), ``"interaction"`` is ``v_ij`` (PolySAE only).
    """
    if kind == "first_order":
        W_dec = sae.W_dec.detach()
        idx = _as_index([i, j], W_dec.shape[0], W_dec.device)
        return W_dec[idx[0]] + W_dec[idx[1]]
    if kind == "interaction":
        return interaction_direction(sae, i, j)
    raise ValueError(f"kind must be one of {STEERING_KINDS}, got {kind!r}")


def steering_hooks(
    model: Any, hook_name: str, vector_D: Tensor, scale: float
) -> AbstractContextManager[Any]:
    """A context manager that adds ``scale * vector_D`` to ``hook_name`` at every position."""
    if hook_name not in model.hook_dict:
        raise ValueError(
            f"hook {hook_name!r} is not a hook point of this model; e.g. "
            f"{list(model.hook_dict)[:3]} (see model.hook_dict)"
        )
    delta = (scale * vector_D).detach()

    def add(act: Tensor, hook: Any) -> Tensor:
        return act + delta.to(act.device, act.dtype)

    return model.hooks(fwd_hooks=[(hook_name, add)])


def generate_steered(
    model: Any,
    prompt: str,
    hook_name: str,
    vector_D: Tensor,
    scale: float,
    max_new_tokens: int = 20,
    **generate_kwargs: Any,
) -> str:
    """Generate from ``prompt`` with ``scale * vector_D`` added at ``hook_name``.

    ``model`` is a ``HookedSAETransformer`` (or any ``HookedTransformer``);
    ``generate_kwargs`` go to ``model.generate`` (e.g. ``do_sample=False``).
    """
    generate_kwargs.setdefault("verbose", False)
    with steering_hooks(model, hook_name, vector_D, scale):
        out = model.generate(prompt, max_new_tokens=max_new_tokens, **generate_kwargs)
    return str(out)
