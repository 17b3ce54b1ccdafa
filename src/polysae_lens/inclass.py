"""In-class ground truth: activations drawn from a random PolySAE decoder, and the oracle.

The compositional study (:mod:`polysae_lens.groundtruth`) plants structure that
PolySAE can express only approximately. To ask whether *training* finds what
the model class *can* express, this module draws activations from the model
class itself::

    z    sparse codes over ``num_atoms`` latents (see ``code`` below)
    a    = z @ U                                   U [num_atoms, R1], orthonormal columns
    x    = b_dec + a @ C1 + lambda2 (a[:, :R2])**2 @ C2 + lambda3 (a[:, :R3])**3 @ C3
           + noise

with ``U`` Haar-random (QR of a Gaussian), Gaussian ``C``'s and the scales of
``C1``, ``lambda2`` and ``lambda3`` calibrated on a sample of codes so that
each term carries the requested share of the signal energy (centred energy:
``E ||term - E term||^2``, summed over d_in; ``b_dec`` absorbs the means, so
these are the parts an SAE must reconstruct). The total signal energy is
``signal_energy`` (default 1, so an MSE reads as a fraction of it).

Codes (``code``): ``"exact_k"`` picks exactly ``k`` distinct latents per row,
drawn without replacement with weights from SAELens's Zipfian firing
probabilities (a few frequent latents, a long tail of rare ones), matching a
TopK SAE with the same ``k``; ``"bernoulli"`` fires each latent independently
with those probabilities rescaled to a mean L0 of ``k`` (as in
``sae_lens.synthetic``). Magnitudes are ``|N(magnitude_mean, magnitude_std)|``.

**The oracle** (:func:`oracle_sae`) is a PolySAE of the same width, order and
ranks whose decoder starts *at the true decoder* (U, C's, lambdas, b_dec) and
whose encoder starts tied to the true first-order decoder, as the package ties
it. It is then trained exactly like any contender: same trainer, optimizer,
learning rate, step hooks and budget, decoder not frozen. It therefore differs
from a PolySAE trained from scratch in one thing only, the initial decoder, so
the gap between the two is the price of having to *find* the structure; that
is the fair test of "can training find what the model class can express".
Freezing the decoder would change the procedure as well (a different set of
trained parameters), and a frozen true decoder is not even an upper bound:
with an imperfect encoder, a decoder that co-adapts to the encoder's errors
reconstructs better. ``freeze_decoder=True`` is available as a diagnostic.

Shape suffixes: ``N`` atoms (= the SAE's latents), ``D`` d_in, ``R``/``S``/``T``
ranks R1/R2/R3, ``B`` batch, ``K`` the dimension of a subspace (a basis's columns).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
from sae_lens.synthetic.firing_probabilities import zipfian_firing_probabilities
from torch import Tensor, nn

from polysae_lens.config import PolyTopKTrainingSAEConfig
from polysae_lens.polynomial import PolyDecoderWeights, decoder_terms
from polysae_lens.sae import PolyTopKTrainingSAE
from polysae_lens.stiefel import qr_retract

logger = logging.getLogger(__name__)

CODES = ("exact_k", "bernoulli")


@dataclass(frozen=True)
class InClassConfig:
    """Settings of the in-class generative model (module docstring)."""

    d_in: int = 64
    """Dimension of the activations."""
    num_atoms: int = 256
    """Latents of the true decoder (the rows of U); the SAEs use this width."""
    poly_order: int = 2
    """Order of the true decoder: 1, 2 or 3."""
    ranks: tuple[int, int, int] = (64, 8, 8)
    """(R1, R2, R3) of the true decoder; need 1 <= R2, R3 <= R1 <= min(d_in, num_atoms)."""
    quadratic_share: float = 0.3
    """Share of the centred signal energy in the quadratic term (0 at order 1)."""
    cubic_share: float = 0.0
    """Share of the centred signal energy in the cubic term (0 below order 3)."""
    signal_energy: float = 1.0
    """Total centred signal energy per sample (sum of the terms' energies)."""
    code: str = "exact_k"
    """``"exact_k"`` (k distinct latents per row) or ``"bernoulli"`` (independent firing)."""
    k: int = 3
    """Active latents per row (``exact_k``) or mean L0 (``bernoulli``)."""
    max_firing_prob: float = 0.3
    """Firing weight of the most frequent latent (SAELens's Zipfian helper)."""
    min_firing_prob: float = 0.01
    """Firing weight of the rarest latent."""
    zipf_exponent: float = 1.0
    """Exponent of the Zipfian firing weights."""
    magnitude_mean: float = 1.0
    """Mean of the active latents' magnitudes (before the absolute value)."""
    magnitude_std: float = 0.25
    """Standard deviation of the active latents' magnitudes."""
    noise_std: float = 0.0
    """Standard deviation of isotropic Gaussian noise added to every coordinate."""
    calibration_samples: int = 32768
    """Codes used to calibrate the term scales."""
    seed: int = 0
    """Seed of the true decoder, the firing weights and the calibration codes."""

    def __post_init__(self) -> None:
        if self.d_in < 2 or self.num_atoms < 2:
            raise ValueError(f"d_in={self.d_in} and num_atoms={self.num_atoms} must both be >= 2.")
        if self.poly_order not in (1, 2, 3):
            raise ValueError(f"poly_order={self.poly_order!r} must be 1, 2 or 3.")
        r1, r2, r3 = self.ranks
        if not 1 <= r1 <= min(self.d_in, self.num_atoms):
            raise ValueError(
                f"ranks[0] (R1)={r1} must be in [1, min(d_in, num_atoms)="
                f"{min(self.d_in, self.num_atoms)}]."
            )
        if not (1 <= r2 <= r1 and 1 <= r3 <= r1):
            raise ValueError(f"ranks={self.ranks}: R2 and R3 must be in [1, R1={r1}].")
        for name in ("quadratic_share", "cubic_share"):
            share = getattr(self, name)
            if not 0 <= share < 1:
                raise ValueError(f"{name}={share} must be in [0, 1).")
        if self.quadratic_share + self.cubic_share >= 1:
            raise ValueError(
                f"quadratic_share + cubic_share = {self.quadratic_share + self.cubic_share} "
                "must be < 1 (the linear term needs a positive share)."
            )
        if self.poly_order < 2 and self.quadratic_share > 0:
            raise ValueError(
                f"quadratic_share={self.quadratic_share} needs poly_order >= 2 "
                f"(got {self.poly_order}); set it to 0 or raise the order."
            )
        if self.poly_order == 2 and self.quadratic_share == 0:
            raise ValueError("poly_order=2 needs quadratic_share in (0, 1); got 0.")
        if self.poly_order < 3 and self.cubic_share > 0:
            raise ValueError(
                f"cubic_share={self.cubic_share} needs poly_order=3 (got {self.poly_order})."
            )
        if self.poly_order == 3 and self.cubic_share == 0:
            raise ValueError("poly_order=3 needs cubic_share in (0, 1); got 0.")
        if not self.signal_energy > 0:
            raise ValueError(f"signal_energy={self.signal_energy} must be > 0.")
        if self.code not in CODES:
            raise ValueError(f"code={self.code!r} is not allowed: use one of {list(CODES)}.")
        if not 1 <= self.k <= self.num_atoms:
            raise ValueError(f"k={self.k} must be in [1, num_atoms={self.num_atoms}].")
        if not 0 < self.min_firing_prob < self.max_firing_prob <= 1:
            raise ValueError(
                f"need 0 < min_firing_prob < max_firing_prob <= 1, got "
                f"{self.min_firing_prob}, {self.max_firing_prob}."
            )
        if self.magnitude_std < 0 or self.noise_std < 0:
            raise ValueError(
                f"magnitude_std={self.magnitude_std} and noise_std={self.noise_std} must be >= 0."
            )
        if self.calibration_samples < 256:
            raise ValueError(
                f"calibration_samples={self.calibration_samples} must be >= 256 "
                "for a stable calibration."
            )
        if self.code == "bernoulli":
            probs = firing_weights(self)
            if float(probs.max()) > 1:
                raise ValueError(
                    f"code='bernoulli' with k={self.k}: the most frequent latent would "
                    f"fire with probability {float(probs.max()):.2f} > 1; lower k or "
                    "max_firing_prob / min_firing_prob's ratio."
                )

    @property
    def shares(self) -> tuple[float, float, float]:
        """The requested energy shares of the (linear, quadratic, cubic) terms."""
        return (1 - self.quadratic_share - self.cubic_share, self.quadratic_share, self.cubic_share)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def firing_weights(cfg: InClassConfig) -> Tensor:
    """[N] firing weights, in random order (seeded): SAELens's Zipfian
    probabilities; for ``bernoulli`` rescaled to sum to ``k`` (the mean L0)."""
    probs_N = zipfian_firing_probabilities(
        cfg.num_atoms,
        exponent=cfg.zipf_exponent,
        max_prob=cfg.max_firing_prob,
        min_prob=cfg.min_firing_prob,
    )
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    probs_N = probs_N[torch.randperm(cfg.num_atoms, generator=gen)]
    if cfg.code == "bernoulli":
        probs_N = probs_N * (cfg.k / probs_N.sum())
    return probs_N


def sample_codes(cfg: InClassConfig, weights_N: Tensor, n: int, gen: torch.Generator) -> Tensor:
    """[n, N] non-negative sparse codes (dense tensor) per ``cfg.code``."""
    if cfg.code == "exact_k":
        idx_BK = torch.multinomial(weights_N.expand(n, -1), cfg.k, replacement=False, generator=gen)
        active_BN = torch.zeros(n, cfg.num_atoms, dtype=torch.bool)
        active_BN.scatter_(1, idx_BK, True)
    else:
        active_BN = torch.rand(n, cfg.num_atoms, generator=gen) < weights_N
    mags_BN = (
        cfg.magnitude_mean + cfg.magnitude_std * torch.randn(n, cfg.num_atoms, generator=gen)
    ).abs()
    return torch.where(active_BN, mags_BN, torch.zeros(()))


def centred_energy(t_BD: Tensor) -> float:
    """``E ||t - E t||^2`` over the rows of ``t``."""
    return float((t_BD - t_BD.mean(0)).pow(2).sum(-1).mean())


class InClassSample(NamedTuple):
    """A batch of in-class activations."""

    z_BN: Tensor
    """[B, N] the true codes."""
    x_BD: Tensor
    """[B, D] the activations (signal plus noise)."""


@dataclass
class InClassGroundTruth:
    """The true decoder of an :class:`InClassConfig` and a sampler."""

    cfg: InClassConfig
    weights: PolyDecoderWeights
    """The true decoder (U, C1, C2, C3, lambda2, lambda3); absent terms are None."""
    b_dec_D: Tensor
    """[D] the true decoder bias (zero: the terms' means already shift the data)."""
    firing_weights_N: Tensor
    """[N] the Zipfian firing weights (probabilities for ``bernoulli``)."""

    def generator(self, seed: int) -> torch.Generator:
        """A sampling RNG; different ``seed``s give independent streams."""
        return torch.Generator().manual_seed(1_000_003 * (self.cfg.seed + 1) + seed)

    @torch.no_grad()
    def sample(self, n: int, gen: torch.Generator) -> InClassSample:
        """``n`` codes and their activations, drawn from ``gen``."""
        z_BN = sample_codes(self.cfg, self.firing_weights_N, n, gen)
        x_BD = decoder_terms(z_BN, self.weights).total() + self.b_dec_D
        if self.cfg.noise_std > 0:
            x_BD = x_BD + self.cfg.noise_std * torch.randn(x_BD.shape, generator=gen)
        return InClassSample(z_BN, x_BD)

    @torch.no_grad()
    def energy_shares(self, n: int, gen: torch.Generator) -> tuple[float, float, float]:
        """Measured centred-energy shares of the (linear, quadratic, cubic) terms."""
        z_BN = sample_codes(self.cfg, self.firing_weights_N, n, gen)
        terms = decoder_terms(z_BN, self.weights)
        energy = [centred_energy(t) if t is not None else 0.0 for t in terms]
        total = sum(energy)
        return (energy[0] / total, energy[1] / total, energy[2] / total)


def build_in_class(cfg: InClassConfig | None = None) -> InClassGroundTruth:
    """Draw the true decoder of ``cfg`` and calibrate its term scales."""
    cfg = cfg or InClassConfig()
    gen = torch.Generator().manual_seed(cfg.seed)
    r1, r2, r3 = cfg.ranks
    U_NR = qr_retract(torch.randn(cfg.num_atoms, r1, generator=gen))
    C1_RD = torch.randn(r1, cfg.d_in, generator=gen)
    C2_SD = torch.randn(r2, cfg.d_in, generator=gen) if cfg.poly_order >= 2 else None
    C3_TD = torch.randn(r3, cfg.d_in, generator=gen) if cfg.poly_order >= 3 else None
    weights_N = firing_weights(cfg)
    z_BN = sample_codes(cfg, weights_N, cfg.calibration_samples, gen)
    one = torch.tensor(1.0)
    raw = decoder_terms(
        z_BN,
        PolyDecoderWeights(
            U_NR,
            C1_RD,
            C2_SD,
            C3_TD,
            one if C2_SD is not None else None,
            one if C3_TD is not None else None,
        ),
    )
    # Each term is linear in its scale, so its energy is quadratic in it: one
    # calibration pass sets every share exactly on the calibration codes.
    shares = cfg.shares
    C1_RD = C1_RD * math.sqrt(cfg.signal_energy * shares[0] / centred_energy(raw.linear))
    lambdas: list[Tensor | None] = []
    for term, share in ((raw.quadratic, shares[1]), (raw.cubic, shares[2])):
        if term is None:
            lambdas.append(None)
        else:
            lambdas.append(
                torch.tensor(math.sqrt(cfg.signal_energy * share / centred_energy(term)))
            )
    weights = PolyDecoderWeights(U_NR, C1_RD, C2_SD, C3_TD, lambdas[0], lambdas[1])
    logger.info("in-class ground truth: lambda2=%s lambda3=%s", lambdas[0], lambdas[1])
    return InClassGroundTruth(cfg, weights, torch.zeros(cfg.d_in), weights_N)


def oracle_sae(
    truth: InClassGroundTruth,
    k: int,
    *,
    freeze_decoder: bool = False,
    **cfg_overrides: Any,
) -> PolyTopKTrainingSAE:
    """A TopK PolySAE whose decoder starts at ``truth``'s (module docstring).

    Width ``num_atoms``, the true order and ranks; the encoder is tied to the
    true first-order decoder (``W_enc = (U @ C1)^T``, zero ``b_enc``), as the
    package ties a fresh PolySAE's. ``cfg_overrides`` go to
    :class:`PolyTopKTrainingSAEConfig` (e.g. the same training settings as the
    contender it is compared with). ``freeze_decoder`` turns off gradients of
    the decoder's parameters (a diagnostic; not the fair test).
    """
    cfg = truth.cfg
    sae = PolyTopKTrainingSAE(
        PolyTopKTrainingSAEConfig(
            d_in=cfg.d_in,
            d_sae=cfg.num_atoms,
            k=k,
            poly_order=cfg.poly_order,
            poly_ranks=cfg.ranks,
            **cfg_overrides,
        )
    )
    w = truth.weights
    with torch.no_grad():
        sae.U.copy_(w.U_FR)
        sae.C1.copy_(w.C1_RD)
        sae.b_dec.copy_(truth.b_dec_D)
        if cfg.poly_order >= 2:
            assert w.C2_SD is not None and w.lambda2 is not None
            sae.C2.copy_(w.C2_SD)
            sae.lambda2.copy_(w.lambda2)
        if cfg.poly_order >= 3:
            assert w.C3_TD is not None and w.lambda3 is not None
            sae.C3.copy_(w.C3_TD)
            sae.lambda3.copy_(w.lambda3)
        sae.W_enc.copy_((w.U_FR @ w.C1_RD).T)
        sae.b_enc.zero_()
    if freeze_decoder:
        for name in ("U", "C1", "C2", "C3", "lambda2", "lambda3", "b_dec"):
            param = getattr(sae, name, None)
            if isinstance(param, torch.nn.Parameter):
                param.requires_grad_(False)
    return sae


class InteractionRecovery(NamedTuple):
    """How well a learned PolySAE's pairwise interactions match the planted ones
    (:func:`interaction_recovery`)."""

    mean_cos: float
    """Mean cosine between planted and learned ``v_ij`` over the co-firing pairs
    whose two atoms are both matched, each pair counted once (nan if none)."""
    weighted_cos: float
    """The same mean, each pair weighted by how often it co-fires in the codes."""
    strict_weighted_cos: float
    """The weighted mean over *all* co-firing pairs, a pair with an unmatched atom
    counting as cosine 0 (a lower bound that does not reward leaving atoms out)."""
    matched_fraction: float
    """Share of the true atoms matched to a learned latent above the threshold."""
    pair_coverage: float
    """Share of the co-firing weight on pairs whose two atoms are both matched."""
    n_pairs: int
    """Distinct co-firing pairs (``i < j``) in the codes."""
    match_N: Tensor
    """[N] the learned latent matched to each true atom, -1 where none is."""
    match_cos_N: Tensor
    """[N] the cosine of each atom's first-order row with its match's (nan if none)."""


def _double_cpu(w: PolyDecoderWeights) -> PolyDecoderWeights:
    def cast(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.detach().double().cpu()

    return PolyDecoderWeights(
        w.U_FR.detach().double().cpu(),
        w.C1_RD.detach().double().cpu(),
        cast(w.C2_SD),
        cast(w.C3_TD),
        cast(w.lambda2),
        cast(w.lambda3),
    )


def pair_directions(weights: PolyDecoderWeights, i_P: Tensor, j_P: Tensor) -> Tensor:
    """[P, D] ``v_ij = 2 lambda2 sum_{r<R2} U[i, r] U[j, r] C2[r]`` of the pairs ``(i_P, j_P)``
    (the coefficient of ``z_i z_j`` in the decoder; the same as
    :func:`polysae_lens.analysis.interaction_direction`)."""
    if weights.C2_SD is None or weights.lambda2 is None:
        raise ValueError(
            "pair_directions needs an order >= 2 decoder (C2 and lambda2); got one without "
            "a quadratic term: an order-1 model has no pairwise interactions to compare."
        )
    s = weights.C2_SD.shape[0]
    U_FS = weights.U_FR[:, :s]
    return 2 * weights.lambda2 * (U_FS[i_P] * U_FS[j_P]) @ weights.C2_SD


def row_space_DK(M_KD: Tensor, rel_tol: float = 1e-6) -> Tensor:
    """[D, K'] an orthonormal basis of the row space of ``M_KD`` (singular values
    below ``rel_tol`` times the largest are dropped; K' = 0 for a zero matrix)."""
    left_DK, sv_K, _ = torch.linalg.svd(M_KD.detach().double().cpu().T, full_matrices=False)
    if sv_K.numel() == 0 or float(sv_K[0]) == 0.0:
        return left_DK[:, :0]
    return left_DK[:, sv_K > rel_tol * sv_K[0]]


@torch.no_grad()
def quadratic_output_cosines(
    truth: PolyDecoderWeights, learned: nn.Module | PolyDecoderWeights, *, rel_tol: float = 1e-6
) -> Tensor:
    """[S*] how well the learned quadratic term can write along each direction the
    planted one writes along, largest first.

    The quadratic term of a decoder adds ``lambda2 (a[:, :R2])**2 @ C2``, so its
    output lies in the row space of C2. The result holds the cosines of the
    principal angles between the true row space (of dimension S*, the true R2)
    and the learned one: 1 for a direction the learned term can produce, near 0
    for one it cannot (a quadratic direction training did not find), padded with
    zeros when the learned row space has fewer dimensions than the true one. It
    looks at the output side only: which latents' products reach a direction is
    :func:`interaction_recovery`'s question. Rows below ``rel_tol`` of C2's
    largest singular value do not count (a zero row writes nowhere).
    """
    from polysae_lens.analysis import poly_weights

    learned_w = poly_weights(learned)
    if truth.C2_SD is None or learned_w.C2_SD is None:
        raise ValueError(
            "quadratic_output_cosines needs two order >= 2 decoders; got one without a "
            "quadratic term (C2 is None)."
        )
    if truth.C2_SD.shape[1] != learned_w.C2_SD.shape[1]:
        raise ValueError(
            f"d_in differs: truth {truth.C2_SD.shape[1]}, learned {learned_w.C2_SD.shape[1]}; "
            "compare decoders of the same activations."
        )
    true_DK = row_space_DK(truth.C2_SD, rel_tol)
    learned_DK = row_space_DK(learned_w.C2_SD, rel_tol)
    cos_K = torch.linalg.svdvals(true_DK.T @ learned_DK).clamp(max=1.0)
    out = torch.zeros(true_DK.shape[1], dtype=torch.float64)
    out[: cos_K.numel()] = cos_K
    return out


@torch.no_grad()
def interaction_recovery(
    truth: PolyDecoderWeights,
    learned: nn.Module | PolyDecoderWeights,
    z_BN: Tensor,
    *,
    match_threshold: float = 0.7,
    eps: float = 1e-12,
) -> InteractionRecovery:
    """Do the learned interaction vectors of matched latent pairs point where the
    planted ones do (issue 13's interaction target)?

    **Matching.** Each true atom ``i`` has a first-order decoder row
    ``(U* C1*)[i]``; each learned latent ``f`` has ``(U C1)[f]``. The atoms are
    matched one-to-one to learned latents by maximising the summed cosine of
    these rows (Hungarian assignment, :func:`scipy.optimize.linear_sum_assignment`);
    a match is kept when its cosine is at least ``match_threshold`` (default 0.7,
    well above the largest cosine a random direction reaches against a few
    hundred others in 64 dimensions, ~0.4). The codes are non-negative, so the
    sign matters and is not folded.

    **Pairs.** The pairs ``i < j`` of true atoms that fire together in at least
    one row of the codes ``z_BN`` (the generator's codes, [B, N]), each with its
    co-firing count. For each, the planted ``v*_ij`` and the learned
    ``v_{m(i) m(j)}`` (``2 lambda2 sum_{r<R2} U[i, r] U[j, r] C2[r]``) are
    compared by cosine; cosine is blind to the latents' scales, which the
    learned model is free to change. A zero vector has cosine 0 with anything.

    ``learned`` is a PolySAE or its :class:`PolyDecoderWeights`. Both decoders
    must have a quadratic term. Returns an :class:`InteractionRecovery`.
    """
    from scipy.optimize import linear_sum_assignment

    from polysae_lens.analysis import poly_weights

    learned_w = poly_weights(learned)
    if not 0 <= match_threshold <= 1:
        raise ValueError(f"match_threshold={match_threshold} must be in [0, 1] (a cosine).")
    n_atoms = truth.U_FR.shape[0]
    if z_BN.ndim != 2 or z_BN.shape[1] != n_atoms:
        raise ValueError(
            f"z_BN has shape {tuple(z_BN.shape)}; expected [B, {n_atoms}] (the true codes, "
            "one column per true atom)."
        )
    if truth.C1_RD.shape[1] != learned_w.C1_RD.shape[1]:
        raise ValueError(
            f"d_in differs: truth {truth.C1_RD.shape[1]}, learned {learned_w.C1_RD.shape[1]}; "
            "compare decoders of the same activations."
        )
    true_rows_ND = (truth.U_FR @ truth.C1_RD).double()
    learned_rows_FD = (learned_w.U_FR @ learned_w.C1_RD).detach().double().cpu()
    true_rows_ND = true_rows_ND.cpu()
    cos_NF = (true_rows_ND / (true_rows_ND.norm(dim=1, keepdim=True) + eps)) @ (
        learned_rows_FD / (learned_rows_FD.norm(dim=1, keepdim=True) + eps)
    ).T
    rows, cols = linear_sum_assignment(cos_NF.numpy(), maximize=True)
    match_N = torch.full((n_atoms,), -1, dtype=torch.long)
    match_cos_N = torch.full((n_atoms,), float("nan"), dtype=torch.float64)
    rows_t, cols_t = torch.as_tensor(rows), torch.as_tensor(cols)
    kept = cos_NF[rows_t, cols_t] >= match_threshold
    match_N[rows_t[kept]] = cols_t[kept]
    match_cos_N[rows_t] = cos_NF[rows_t, cols_t]
    match_cos_N[rows_t[~kept]] = float("nan")

    active_BN = (z_BN != 0).double().cpu()
    count_NN = torch.triu(active_BN.T @ active_BN, diagonal=1)
    i_P, j_P = torch.nonzero(count_NN > 0, as_tuple=True)
    weight_P = count_NN[i_P, j_P]
    both_P = (match_N[i_P] >= 0) & (match_N[j_P] >= 0)
    cos_P = torch.zeros(len(i_P), dtype=torch.float64)
    if bool(both_P.any()):
        cpu, lrn = _double_cpu(truth), _double_cpu(learned_w)
        v_true_PD = pair_directions(cpu, i_P[both_P], j_P[both_P])
        v_learned_PD = pair_directions(lrn, match_N[i_P[both_P]], match_N[j_P[both_P]])
        norms_P = v_true_PD.norm(dim=1) * v_learned_PD.norm(dim=1)
        cos_P[both_P] = (v_true_PD * v_learned_PD).sum(1) / norms_P.clamp_min(eps)
    n_both = int(both_P.sum())
    total_weight = float(weight_P.sum())
    matched_weight = float(weight_P[both_P].sum())
    nan = float("nan")
    return InteractionRecovery(
        mean_cos=float(cos_P[both_P].mean()) if n_both else nan,
        weighted_cos=float((cos_P * weight_P)[both_P].sum() / matched_weight) if n_both else nan,
        strict_weighted_cos=float((cos_P * weight_P).sum() / total_weight) if total_weight else nan,
        matched_fraction=float((match_N >= 0).double().mean()),
        pair_coverage=matched_weight / total_weight if total_weight else nan,
        n_pairs=len(i_P),
        match_N=match_N,
        match_cos_N=match_cos_N,
    )
