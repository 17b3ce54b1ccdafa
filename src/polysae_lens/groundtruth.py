"""Synthetic activations with planted compositional structure and known ground truth.

The generative model, built on ``sae_lens.synthetic``:

1. **Atoms.** ``num_atoms`` unit directions ``e_n`` in ``R^d_in`` (SAELens's
   ``FeatureDictionary`` with its default orthogonalising initialiser). Each
   atom fires independently with a Zipfian probability (SAELens's
   ``zipfian_firing_probabilities``: a few frequent atoms, a long tail of rare
   ones) at magnitude ``relu(N(1, magnitude_std))``.
2. **Co-firing events.** A set of disjoint atom pairs is chosen at random. Each
   pair ``p`` has a rate ``q_p``, drawn log-uniformly from ``cofire_rate``; in
   every sample, with probability ``q_p``, both atoms of the pair are switched
   on (those already firing keep their magnitude). This is an
   ``ActivationGenerator`` modifier.
3. **Interactions.** Half of the pairs interact: pair ``p = (i, j)`` adds
   ``s_p * f_i * f_j * w_p`` to the activation, where ``f`` are the atom
   magnitudes, ``w_p`` is a random unit direction and ``s_p`` is drawn
   log-uniformly from ``strength_range``. The other pairs are **decoys**: they
   co-fire just as often but add nothing beyond their atoms.

``s_p`` and ``q_p`` are drawn independently, so interaction strength is
uncorrelated with co-occurrence by construction: frequent decoys, rare strong
interactions and everything between occur. That is what makes the study a
test of the paper's claim (Sec. 5: PolySAE's interaction strengths reflect
composition, not co-occurrence) rather than a setting tuned to PolySAE:

- a model that merely tracks which latents fire together (e.g. a linear SAE's
  latent covariance) is rewarded by the decoys as much as by real interactions,
  so it cannot score well on the planted strengths;
- the planted term is a product of two atom magnitudes, which PolySAE's
  quadratic term can express only through its rank-``R2`` shared projection,
  while a linear SAE can express each composition exactly by spending one of
  its spare latents on it (``d_sae`` exceeds atoms plus pairs); neither model
  is told which pairs exist;
- all settings are fixed before the study and the same for both SAEs.

Shape suffixes: ``N`` atoms, ``D`` d_in, ``P`` planted pairs, ``B`` batch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
from sae_lens.synthetic import ActivationGenerator, FeatureDictionary
from sae_lens.synthetic.firing_probabilities import zipfian_firing_probabilities
from torch import Tensor


@dataclass(frozen=True)
class GroundTruthConfig:
    """Settings of the compositional generative model (module docstring)."""

    d_in: int = 64
    """Dimension of the synthetic activations."""
    num_atoms: int = 256
    """Number of ground-truth atoms (first-order features)."""
    num_interacting_pairs: int = 16
    """Planted pairs that add an interaction direction when they co-fire."""
    num_decoy_pairs: int = 16
    """Planted pairs that co-fire as often but add no interaction."""
    max_firing_prob: float = 0.3
    """Firing probability of the most frequent atom (Zipfian ranks; the default
    and the two below are those of SAELens's ``zipfian_firing_probabilities``)."""
    min_firing_prob: float = 0.01
    """Firing probability of the rarest atom."""
    zipf_exponent: float = 1.0
    """Exponent of the Zipfian firing probabilities."""
    magnitude_std: float = 0.25
    """Standard deviation of atom magnitudes around 1 (clipped at 0)."""
    cofire_rate: tuple[float, float] = (0.003, 0.05)
    """Range of the per-sample co-firing event rate ``q_p`` (log-uniform)."""
    strength_range: tuple[float, float] = (0.3, 1.5)
    """Range of the interaction strength ``s_p`` (log-uniform)."""
    seed: int = 0
    """Seed of everything the generator draws at construction."""

    def __post_init__(self) -> None:
        if self.d_in < 2 or self.num_atoms < 2:
            raise ValueError(
                f"d_in and num_atoms must be >= 2, got d_in={self.d_in}, num_atoms={self.num_atoms}"
            )
        if min(self.num_interacting_pairs, self.num_decoy_pairs) < 0:
            raise ValueError("num_interacting_pairs and num_decoy_pairs must be >= 0")
        n_pairs = self.num_interacting_pairs + self.num_decoy_pairs
        if 2 * n_pairs > self.num_atoms:
            raise ValueError(
                f"planted pairs use disjoint atoms: 2 * (num_interacting_pairs + "
                f"num_decoy_pairs) = {2 * n_pairs} exceeds num_atoms={self.num_atoms}"
            )
        if not 0 < self.min_firing_prob < self.max_firing_prob <= 1:
            raise ValueError(
                f"need 0 < min_firing_prob < max_firing_prob <= 1, got "
                f"{self.min_firing_prob}, {self.max_firing_prob}"
            )
        for name in ("cofire_rate", "strength_range"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must satisfy 0 < low <= high, got {(lo, hi)}")
        if self.cofire_rate[1] > 1:
            raise ValueError(f"cofire_rate must be <= 1, got {self.cofire_rate}")
        if self.magnitude_std < 0:
            raise ValueError(f"magnitude_std must be >= 0, got {self.magnitude_std}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PlantedPairs(NamedTuple):
    """The planted pairs; the first ``num_interacting_pairs`` rows interact."""

    atoms_P2: Tensor
    """[P, 2] atom indices of each pair (disjoint across pairs)."""
    cofire_rate_P: Tensor
    """[P] probability per sample of a forced co-firing event."""
    strength_P: Tensor
    """[P] interaction strength ``s_p`` (0 for decoys)."""
    direction_PD: Tensor
    """[P, d_in] unit interaction direction ``w_p`` (zero rows for decoys)."""

    @property
    def interacting(self) -> Tensor:
        """[P] bool, True for pairs with an interaction."""
        return self.strength_P > 0


def _log_uniform(n: int, bounds: tuple[float, float], gen: torch.Generator) -> Tensor:
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    return torch.exp(lo + (hi - lo) * torch.rand(n, generator=gen))


def _plant_pairs(cfg: GroundTruthConfig, gen: torch.Generator) -> PlantedPairs:
    n_int, n_dec = cfg.num_interacting_pairs, cfg.num_decoy_pairs
    P = n_int + n_dec
    atoms_P2 = torch.randperm(cfg.num_atoms, generator=gen)[: 2 * P].reshape(P, 2)
    atoms_P2 = atoms_P2.sort(dim=1).values
    rate_P = _log_uniform(P, cfg.cofire_rate, gen)
    strength_P = torch.cat((_log_uniform(n_int, cfg.strength_range, gen), torch.zeros(n_dec)))
    direction_PD = torch.randn(P, cfg.d_in, generator=gen)
    direction_PD = direction_PD / direction_PD.norm(dim=1, keepdim=True)
    direction_PD[n_int:] = 0
    return PlantedPairs(atoms_P2, rate_P, strength_P, direction_PD)


class CompositionalFeatureDictionary(FeatureDictionary):
    """SAELens's ``FeatureDictionary`` plus the planted pair interactions."""

    def __init__(self, num_atoms: int, d_in: int, pairs: PlantedPairs, seed: int) -> None:
        super().__init__(num_atoms, d_in, seed=seed)
        self.register_buffer("pair_atoms_P2", pairs.atoms_P2.clone())
        self.register_buffer("pair_vectors_PD", pairs.strength_P[:, None] * pairs.direction_PD)

    def interaction_part(self, feature_acts_BN: Tensor) -> Tensor:
        """``sum_p s_p f_i f_j w_p`` for each sample [B, d_in]."""
        f = feature_acts_BN.to_dense() if feature_acts_BN.is_sparse else feature_acts_BN
        atoms = self.pair_atoms_P2
        prod_BP = f[:, atoms[:, 0]] * f[:, atoms[:, 1]]
        return prod_BP @ self.pair_vectors_PD.to(prod_BP.dtype)

    def forward(self, feature_activations: Tensor) -> Tensor:
        return super().forward(feature_activations) + self.interaction_part(feature_activations)


class _CofireModifier:
    """Switches on both atoms of pair ``p`` with probability ``q_p`` per sample."""

    def __init__(self, pairs: PlantedPairs, magnitude_std: float) -> None:
        self.atoms_P2 = pairs.atoms_P2
        self.rate_P = pairs.cofire_rate_P
        self.magnitude_std = magnitude_std

    def __call__(self, acts_BN: Tensor) -> Tensor:
        B, P = acts_BN.shape[0], self.rate_P.shape[0]
        event_BP = torch.rand(B, P, device=acts_BN.device) < self.rate_P.to(acts_BN.device)
        for side in (0, 1):
            cols = self.atoms_P2[:, side].to(acts_BN.device)
            current = acts_BN[:, cols]
            fresh = (1 + self.magnitude_std * torch.randn(B, P, device=acts_BN.device)).relu()
            switch = event_BP & (current == 0)
            acts_BN[:, cols] = torch.where(switch, fresh.to(acts_BN.dtype), current)
        return acts_BN


@dataclass
class GroundTruth:
    """A ready-to-sample compositional data source and its ground truth."""

    cfg: GroundTruthConfig
    feature_dict: CompositionalFeatureDictionary
    """Maps atom activations to model-space activations (atoms + interactions)."""
    generator: ActivationGenerator
    """Samples atom activations (uses torch's global RNG, like SAELens's)."""
    pairs: PlantedPairs

    @property
    def atom_directions_ND(self) -> Tensor:
        return self.feature_dict.feature_vectors.detach()

    @torch.no_grad()
    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        """``(atom activations [n, num_atoms], model-space activations [n, d_in])``."""
        f_BN = self.generator.sample(n)
        return f_BN, self.feature_dict(f_BN)

    def true_cofire_frequency(self) -> Tensor:
        """[P] probability that both atoms of each pair fire in a sample."""
        p = self.generator.firing_probabilities
        a, b = self.pairs.atoms_P2[:, 0], self.pairs.atoms_P2[:, 1]
        q = self.pairs.cofire_rate_P
        return q + (1 - q) * p[a] * p[b]


def build_ground_truth(cfg: GroundTruthConfig | None = None) -> GroundTruth:
    """Build the generative model of the module docstring from ``cfg``."""
    cfg = cfg or GroundTruthConfig()
    gen = torch.Generator().manual_seed(cfg.seed)
    pairs = _plant_pairs(cfg, gen)
    firing = zipfian_firing_probabilities(
        cfg.num_atoms,
        exponent=cfg.zipf_exponent,
        max_prob=cfg.max_firing_prob,
        min_prob=cfg.min_firing_prob,
    )
    # Which atoms are frequent is random, not tied to the pair assignment.
    firing = firing[torch.randperm(cfg.num_atoms, generator=gen)]
    feature_dict = CompositionalFeatureDictionary(cfg.num_atoms, cfg.d_in, pairs, seed=cfg.seed)
    generator = ActivationGenerator(
        cfg.num_atoms,
        firing_probabilities=firing,
        std_firing_magnitudes=cfg.magnitude_std,
        mean_firing_magnitudes=1.0,
        modify_activations=_CofireModifier(pairs, cfg.magnitude_std),
    )
    return GroundTruth(cfg, feature_dict, generator, pairs)
