"""The compositional ground-truth study behind ``polysae-lens demo``.

A stock SAELens ``TopKTrainingSAE`` ("linear"), a PolySAE ("poly") and, as an
ablation, a PolySAE of order 1 ("poly_order1": the same ``U @ C1``
parametrisation, initialisation and retraction, no interaction terms) with the
same width, k, learning rate and token budget are trained by SAELens's own
trainer (``sae_lens.synthetic.train_toy_sae``) on the synthetic activations of
:mod:`polysae_lens.groundtruth`, then scored against the planted ground truth.
:func:`run_study` returns a JSON-serialisable dict; :mod:`polysae_lens.report`
turns it into a table, a Markdown report and plots.

Metrics (per SAE unless noted):

- ``explained_variance``, ``l0``, ``dead_latents``, ``mcc``: SAELens's
  ``eval_sae_on_synthetic_data`` (MCC compares ``W_dec`` rows, for PolySAE the
  first-order decoder, with the atoms).
- ``mse``: mean over samples of ``||x - x^||^2`` on held-out activations.
- ``composite_latent_cosine``: for each planted interaction direction ``w_p``,
  the best |cosine| with any decoder row (a latent spent on the composition);
  mean over pairs.
- ``interaction_best_cosine`` (PolySAE): best |cosine| of ``w_p`` with any
  interaction direction ``v_ij`` of two live latents; mean over pairs.
- ``interaction_matched_cosine`` (PolySAE): |cosine| of ``w_p`` with ``v_ij``
  for the latents ``i, j`` best matched to the pair's atoms; mean over pairs.
- ``strength_correlation`` (PolySAE): Pearson/Spearman of the matched pairs'
  ``B_ij`` with the planted ``s_p`` over all planted pairs, decoys (``s_p = 0``)
  included.
- ``interaction_vs_cooccurrence`` (PolySAE) and ``covariance_vs_cooccurrence``
  (both): :mod:`polysae_lens.analysis` over the latent pairs that co-fire on
  held-out activations (the paper's Sec. 5 analysis).
- ``probing``: per composition task (label: both atoms of an interacting pair
  fire; negatives: exactly one fires), the paper's k-sparse probe F1 and the
  mean Wasserstein-1 between class-conditional latent distributions (raw and
  standardized), averaged over tasks.

``comparisons`` (see :func:`comparisons`): for PolySAE against each other SAE and
each metric both have, a paired bootstrap interval
(:func:`polysae_lens.noise.paired_bootstrap`) of ``PolySAE - other`` over the
metric's units: held-out samples (MSE, explained variance), atoms
(MCC, with the Hungarian matching held fixed), planted pairs (composition as a
latent) or composition tasks (probing). Evaluation noise only, not seed noise.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.saes.sae import TrainingSAE
from sae_lens.synthetic import eval_sae_on_synthetic_data, train_toy_sae
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from polysae_lens import analysis, noise
from polysae_lens.config import PolyTopKTrainingSAEConfig
from polysae_lens.evals.probing import probe_f1
from polysae_lens.evals.wasserstein import wasserstein_stats
from polysae_lens.groundtruth import GroundTruth, GroundTruthConfig, build_ground_truth
from polysae_lens.polynomial import decoder_terms
from polysae_lens.sae import PolyTopKTrainingSAE, is_poly_sae
from polysae_lens.stiefel import orthogonality_error

logger = logging.getLogger(__name__)

SAE_NAMES = ("linear", "poly", "poly_order1")
TERM_NAMES = ("linear", "quadratic", "cubic")
PAIR_CHUNK = 1 << 16
"""Latent pairs whose interaction directions are compared at once."""


@dataclass(frozen=True)
class StudyConfig:
    """Everything that determines a study's numbers."""

    ground_truth: GroundTruthConfig = field(default_factory=GroundTruthConfig)
    """The generative model."""
    d_sae: int = 512
    """Width of both SAEs."""
    k: int = 5
    """Active latents per sample of both SAEs (about the data's mean L0)."""
    training_samples: int = 4_000_000
    """Activation vectors each SAE is trained on."""
    batch_size: int = 1024
    """Training batch size of both SAEs."""
    lr: float = 3e-4
    """Adam learning rate of both SAEs (SAELens's default, the paper's)."""
    poly_order: int = 3
    """Order of the PolySAE decoder; its ranks and other settings are the package defaults."""
    eval_samples: int = 50_000
    """Held-out activations for the evaluations and co-occurrence statistics."""
    n_snapshots: int = 10
    """Points on the training curves."""
    probe_tasks: int = 4
    """Composition tasks for probing and Wasserstein (the first interacting pairs)."""
    probe_train_per_class: int = 1000
    """Training samples per class of each probing task."""
    probe_test_per_class: int = 500
    """Test samples per class of each probing task."""
    probe_ks: tuple[int, ...] = (1, 2, 5)
    """Latents per probe (the paper's k)."""
    seed: int = 0
    """Seed of SAE initialisation, training data and evaluation samples."""
    n_boot: int = 1000
    """Resamples of each paired bootstrap in ``comparisons``."""

    def __post_init__(self) -> None:
        if not 1 <= self.k <= self.d_sae:
            raise ValueError(f"k must be in [1, d_sae={self.d_sae}], got {self.k}")
        if self.training_samples < self.batch_size:
            raise ValueError(
                f"training_samples={self.training_samples} is less than one batch "
                f"(batch_size={self.batch_size})"
            )
        if self.probe_tasks > self.ground_truth.num_interacting_pairs:
            raise ValueError(
                f"probe_tasks={self.probe_tasks} exceeds the "
                f"{self.ground_truth.num_interacting_pairs} interacting pairs"
            )
        if self.poly_order not in (1, 2, 3):
            raise ValueError(f"poly_order must be 1, 2 or 3, got {self.poly_order}")
        if min(self.probe_ks, default=0) < 1:
            raise ValueError(f"probe_ks must be positive integers, got {self.probe_ks}")
        if self.n_boot < 1:
            raise ValueError(f"n_boot must be a positive number of resamples, got {self.n_boot}")

    @classmethod
    def quick(cls, seed: int = 0) -> StudyConfig:
        """A small configuration that runs in well under a minute (for tests)."""
        gt = GroundTruthConfig(
            d_in=32, num_atoms=96, num_interacting_pairs=8, num_decoy_pairs=8, seed=seed
        )
        return cls(
            ground_truth=gt,
            d_sae=192,
            k=3,
            training_samples=150_000,
            eval_samples=8_000,
            n_snapshots=4,
            probe_tasks=2,
            probe_train_per_class=300,
            probe_test_per_class=200,
            seed=seed,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_saes(cfg: StudyConfig) -> dict[str, TrainingSAE[Any]]:
    """The SAEs of :data:`SAE_NAMES`, each initialised from the same seed."""
    d_in = cfg.ground_truth.d_in
    torch.manual_seed(cfg.seed)
    linear = TopKTrainingSAE(
        TopKTrainingSAEConfig(
            d_in=d_in, d_sae=cfg.d_sae, k=cfg.k, rescale_acts_by_decoder_norm=False
        )
    )
    saes: dict[str, TrainingSAE[Any]] = {"linear": linear}
    for name, order in (("poly", cfg.poly_order), ("poly_order1", 1)):
        torch.manual_seed(cfg.seed)
        saes[name] = PolyTopKTrainingSAE(
            PolyTopKTrainingSAEConfig(d_in=d_in, d_sae=cfg.d_sae, k=cfg.k, poly_order=order)
        )
    return saes


# ---- metrics -------------------------------------------------------------------


@torch.no_grad()
def reconstruction(sae: TrainingSAE[Any], x_BD: Tensor) -> dict[str, float]:
    """MSE (sum over d_in, mean over samples) and explained variance of ``x``."""
    x_hat = sae.decode(sae.encode(x_BD))
    err = (x_BD - x_hat).pow(2).sum(-1)
    total = (x_BD - x_BD.mean(0)).pow(2).sum(-1)
    return {
        "mse": float(err.mean()),
        "explained_variance": float(1 - err.sum() / total.sum()),
    }


@torch.no_grad()
def term_shares(sae: TrainingSAE[Any], x_BD: Tensor) -> dict[str, float]:
    """Each decoder term's share of the reconstruction: ``||term||^2 / sum ||term||^2``
    over a batch (a linear SAE is all ``linear``)."""
    if not is_poly_sae(sae):
        return {"linear": 1.0}
    terms = decoder_terms(sae.encode(x_BD), sae.decoder_weights)  # type: ignore[attr-defined]
    energy = {
        name: float(t.pow(2).sum())
        for name, t in zip(TERM_NAMES, terms, strict=True)
        if t is not None
    }
    total = sum(energy.values()) or 1.0
    return {name: e / total for name, e in energy.items()}


def best_match(directions_MD: Tensor, targets_PD: Tensor) -> tuple[Tensor, Tensor]:
    """For each target, the index and |cosine| of its best-matching direction."""
    d = directions_MD / directions_MD.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    t = targets_PD / targets_PD.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cos_PM = (t @ d.T).abs()
    best, idx = cos_PM.max(dim=1)
    return idx, best


def _cosine(a_PD: Tensor, b_PD: Tensor) -> Tensor:
    return torch.nn.functional.cosine_similarity(a_PD, b_PD, dim=-1, eps=1e-12).abs()


@torch.no_grad()
def interaction_recovery(sae: TrainingSAE[Any], gt: GroundTruth, live_F: Tensor) -> dict[str, Any]:
    """How well the SAE recovers the planted interaction directions and strengths."""
    pairs = gt.pairs
    inter = pairs.interacting
    w_PD = pairs.direction_PD[inter]
    W_dec = sae.W_dec.detach()
    out: dict[str, Any] = {}
    _, comp_cos = best_match(W_dec[live_F], w_PD)
    out["composite_latent_cosine"] = float(comp_cos.mean())
    if not is_poly_sae(sae) or sae.cfg.poly_order < 2:  # type: ignore[attr-defined]
        out.update(
            interaction_best_cosine=None,
            interaction_matched_cosine=None,
            strength_correlation=None,
            matched_pairs=None,
        )
        return out
    live = live_F.nonzero().squeeze(1)
    i, j = torch.triu_indices(live.numel(), live.numel(), offset=1)
    # In chunks of pairs: all pairs of a wide SAE would not fit in memory at once.
    best_cos = torch.zeros(w_PD.shape[0])
    for start in range(0, i.numel(), PAIR_CHUNK):
        stop = start + PAIR_CHUNK
        v_QD = analysis.interaction_direction(sae, live[i[start:stop]], live[j[start:stop]])
        best_cos = torch.maximum(best_cos, best_match(v_QD, w_PD)[1])
    out["interaction_best_cosine"] = float(best_cos.mean())

    atom_latent_N, _ = best_match(W_dec, gt.atom_directions_ND)
    li = atom_latent_N[pairs.atoms_P2[:, 0]]
    lj = atom_latent_N[pairs.atoms_P2[:, 1]]
    v_PD = analysis.interaction_direction(sae, li, lj)
    out["interaction_matched_cosine"] = float(_cosine(v_PD[inter], w_PD).mean())
    learned_P = v_PD.norm(dim=-1)
    learned_P = torch.where(li == lj, torch.zeros_like(learned_P), learned_P)
    out["strength_correlation"] = analysis.correlate(learned_P, pairs.strength_P)._asdict()
    out["matched_pairs"] = {
        "planted_strength": pairs.strength_P.tolist(),
        "learned_strength": learned_P.tolist(),
        "interacting": inter.tolist(),
    }
    return out


@torch.no_grad()
def cooccurrence(sae: TrainingSAE[Any], x_BD: Tensor) -> dict[str, Any]:
    """The paper's co-occurrence analysis over the pairs that co-fire on ``x``."""
    stats = analysis.cooccurrence_stats(sae, x_BD, batch_size=4096)
    out: dict[str, Any] = {
        "n_pairs": int(stats.pairs_P2.shape[0]),
        "covariance_vs_cooccurrence": analysis.covariance_vs_cooccurrence(stats)._asdict(),
    }
    # Plots use a fixed-size subsample of the pairs (deterministic).
    gen = torch.Generator().manual_seed(0)
    take = torch.randperm(stats.pairs_P2.shape[0], generator=gen)[:3000]
    scatter: dict[str, list[float]] = {
        "frequency": stats.frequency_P[take].tolist(),
        "covariance": stats.covariance_P[take].tolist(),
    }
    if is_poly_sae(sae) and sae.cfg.poly_order >= 2:  # type: ignore[attr-defined]
        out["interaction_vs_cooccurrence"] = analysis.interaction_vs_cooccurrence(
            sae, stats
        )._asdict()
        strength = analysis.interaction_strength(sae, stats.pairs_P2[:, 0], stats.pairs_P2[:, 1])
        scatter["interaction_strength"] = strength[take].tolist()
    else:
        out["interaction_vs_cooccurrence"] = None
    out["scatter"] = scatter
    return out


@torch.no_grad()
def composition_task(gt: GroundTruth, pair: int, n_per_class: int) -> tuple[Tensor, Tensor]:
    """Activations [2n, d_in] and labels [2n] for one composition task.

    Samples from the generator conditioned on the label: positives have both
    atoms of planted pair ``pair`` firing, negatives exactly one (chosen at
    random), so no single atom's presence gives the label away.
    """
    f = gt.generator.sample(2 * n_per_class)
    a, b = gt.pairs.atoms_P2[pair].tolist()
    std = gt.cfg.magnitude_std
    fresh = (1 + std * torch.randn(2 * n_per_class, 2)).relu().clamp_min(1e-3)
    f[:, a] = torch.where(f[:, a] > 0, f[:, a], fresh[:, 0])
    f[:, b] = torch.where(f[:, b] > 0, f[:, b], fresh[:, 1])
    labels = torch.zeros(2 * n_per_class, dtype=torch.long)
    labels[:n_per_class] = 1
    neg = torch.arange(n_per_class, 2 * n_per_class)
    drop_a = torch.rand(n_per_class) < 0.5
    f[neg[drop_a], a] = 0
    f[neg[~drop_a], b] = 0
    return gt.feature_dict(f), labels


@torch.no_grad()
def probing_per_task(
    saes: dict[str, TrainingSAE[Any]], gt: GroundTruth, cfg: StudyConfig
) -> dict[str, dict[str, list[float]]]:
    """Probe F1 at each k and mean W1 per SAE, one value per composition task."""
    per_task: dict[str, dict[str, list[float]]] = {name: {} for name in saes}
    for task in range(cfg.probe_tasks):
        x_tr, y_tr = composition_task(gt, task, cfg.probe_train_per_class)
        x_te, y_te = composition_task(gt, task, cfg.probe_test_per_class)
        for name, sae in saes.items():
            z_tr, z_te = sae.encode(x_tr), sae.encode(x_te)
            row = per_task[name]
            for k in cfg.probe_ks:
                res = probe_f1(z_tr, y_tr, z_te, y_te, k, seed=cfg.seed)
                row.setdefault(f"f1_k{k}", []).append(res.f1)
            w = wasserstein_stats(z_tr, y_tr)
            row.setdefault("wasserstein", []).append(float(w.distance.mean()))
            row.setdefault("wasserstein_standardized", []).append(float(w.standardized.mean()))
    return per_task


def probing(
    saes: dict[str, TrainingSAE[Any]], gt: GroundTruth, cfg: StudyConfig
) -> dict[str, dict[str, float]]:
    """Probe F1 at each k and mean W1 per SAE, averaged over composition tasks."""
    return _average_tasks(probing_per_task(saes, gt, cfg))


def _average_tasks(per_task: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    return {
        name: {key: sum(values) / len(values) for key, values in row.items()}
        for name, row in per_task.items()
    }


# ---- noise -------------------------------------------------------------------------


@torch.no_grad()
def noise_units(sae: TrainingSAE[Any], gt: GroundTruth, x_BD: Tensor) -> dict[str, Any]:
    """Per-unit values of the metrics :func:`comparisons` bootstraps (numpy arrays)."""
    z_BF = sae.encode(x_BD)
    x_hat = sae.decode(z_BF)
    err_B = (x_BD - x_hat).pow(2).sum(-1)
    total_B = (x_BD - x_BD.mean(0)).pow(2).sum(-1)
    live_F = (z_BF != 0).any(0)
    cos_NF = best_cosines(gt.atom_directions_ND, sae.W_dec.detach())
    rows, cols = linear_sum_assignment((1 - cos_NF).numpy())
    _, comp_cos = best_match(
        sae.W_dec.detach()[live_F], gt.pairs.direction_PD[gt.pairs.interacting]
    )
    return {
        "mse": err_B.double().numpy(),
        "explained_variance": torch.stack([err_B, total_B], 1).double().numpy(),
        "mcc": cos_NF[rows, cols].double().numpy(),
        "composite_latent_cosine": comp_cos.double().numpy(),
    }


def best_cosines(atoms_ND: Tensor, rows_FD: Tensor) -> Tensor:
    """|cosine| of every atom with every decoder row, [N, F]."""
    a = atoms_ND / atoms_ND.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    r = rows_FD / rows_FD.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (a @ r.T).abs()


UNIT_STATISTICS: dict[str, noise.Statistic] = {
    "explained_variance": noise.explained_variance_statistic,
}


def comparisons(
    units: dict[str, dict[str, Any]], n_boot: int, seed: int, target: str = "poly"
) -> dict[str, dict[str, dict[str, float]]]:
    """Paired bootstrap intervals of ``target - other`` for every other SAE and every
    metric in both SAEs' ``units``; keyed ``other -> metric path -> Interval dict``
    (metric paths as in the results, ``probing.f1_k1`` for nested ones)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for other, other_units in units.items():
        if other == target:
            continue
        out[other] = {}
        for key, values in units[target].items():
            if key not in other_units:
                continue
            statistic = UNIT_STATISTICS.get(key, noise.weighted_mean)
            a, b = values, other_units[key]
            interval = noise.paired_bootstrap(a, b, n_boot, seed, statistic=statistic)
            out[other][key] = interval._asdict()
    return out


# ---- the study -------------------------------------------------------------------

Snapshot = dict[str, Any]


def _snapshot_fn(name: str, curve: list[Snapshot], x_BD: Tensor) -> Callable[[Any], None]:
    def record(trainer: Any) -> None:
        sae = trainer.sae
        point: Snapshot = {
            "samples": int(trainer.n_training_samples),
            **reconstruction(sae, x_BD),
            "term_shares": term_shares(sae, x_BD),
        }
        curve.append(point)
        logger.debug("%s at %d samples: %s", name, point["samples"], point)

    return record


def train_sae(
    sae: TrainingSAE[Any], gt: GroundTruth, cfg: StudyConfig, name: str, curve_x_BD: Tensor
) -> list[Snapshot]:
    """Train ``sae`` with SAELens's trainer; return its training curve."""
    curve: list[Snapshot] = []
    torch.manual_seed(cfg.seed + 1)
    train_toy_sae(
        sae,
        gt.feature_dict,
        gt.generator,
        training_samples=cfg.training_samples,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        n_snapshots=cfg.n_snapshots,
        snapshot_fn=_snapshot_fn(name, curve, curve_x_BD),
    )
    return curve


@torch.no_grad()
def evaluate_sae(
    sae: TrainingSAE[Any], gt: GroundTruth, cfg: StudyConfig, x_BD: Tensor
) -> dict[str, Any]:
    """Every per-SAE metric of the module docstring except probing."""
    sae.eval()
    torch.manual_seed(cfg.seed + 2)
    synth = eval_sae_on_synthetic_data(
        sae, gt.feature_dict, gt.generator, num_samples=cfg.eval_samples, batch_size=4096
    )
    live_F = (sae.encode(x_BD) != 0).any(dim=0)
    row: dict[str, Any] = {
        **reconstruction(sae, x_BD),
        "synthetic_explained_variance": synth.explained_variance,
        "l0": synth.sae_l0,
        "dead_latents": int((~live_F).sum()),
        "mcc": synth.mcc,
        "uniqueness": synth.uniqueness,
        "n_parameters": sum(p.numel() for p in sae.parameters()),
    }
    row.update(interaction_recovery(sae, gt, live_F))
    row["cooccurrence"] = cooccurrence(sae, x_BD)
    if is_poly_sae(sae):
        row["orthogonality_error"] = float(orthogonality_error(sae.U))  # type: ignore[attr-defined]
        row["term_shares"] = term_shares(sae, x_BD)
    return row


def ground_truth_summary(gt: GroundTruth, x_BD: Tensor, f_BN: Tensor) -> dict[str, Any]:
    """Facts about the data the SAEs are compared against."""
    freq_P = gt.true_cofire_frequency()
    both = (f_BN[:, gt.pairs.atoms_P2[:, 0]] > 0) & (f_BN[:, gt.pairs.atoms_P2[:, 1]] > 0)
    inter = gt.pairs.interacting
    interaction_part = gt.feature_dict.interaction_part(f_BN)
    return {
        "true_l0": float((f_BN > 0).sum(-1).float().mean()),
        "interaction_energy_share": float(
            interaction_part.pow(2).sum() / (x_BD - gt.feature_dict.bias).pow(2).sum()
        ),
        "pairs": {
            "atoms": gt.pairs.atoms_P2.tolist(),
            "strength": gt.pairs.strength_P.tolist(),
            "cofire_frequency": freq_P.tolist(),
            "empirical_cofire_frequency": both.float().mean(0).tolist(),
        },
        "strength_vs_cofire_frequency": analysis.correlate(
            gt.pairs.strength_P[inter], freq_P[inter]
        )._asdict(),
    }


def run_study(cfg: StudyConfig | None = None) -> dict[str, Any]:
    """Train both SAEs and score them; returns the JSON-serialisable results."""
    cfg = cfg or StudyConfig()
    start = time.perf_counter()
    gt = build_ground_truth(cfg.ground_truth)
    torch.manual_seed(cfg.seed + 3)
    f_eval, x_eval = gt.sample(cfg.eval_samples)
    curve_x = x_eval[:4096]
    saes = build_saes(cfg)
    results: dict[str, Any] = {
        "config": cfg.to_dict(),
        "ground_truth": ground_truth_summary(gt, x_eval, f_eval),
        "saes": {},
        "curves": {},
        "runtime_seconds": {},
    }
    units: dict[str, dict[str, Any]] = {}
    for name, sae in saes.items():
        logger.info("training %s (%d samples)", name, cfg.training_samples)
        t0 = time.perf_counter()
        results["curves"][name] = train_sae(sae, gt, cfg, name, curve_x)
        results["runtime_seconds"][f"train_{name}"] = time.perf_counter() - t0
        results["saes"][name] = evaluate_sae(sae, gt, cfg, x_eval)
        units[name] = noise_units(sae, gt, x_eval)
    logger.info("probing %d composition tasks", cfg.probe_tasks)
    torch.manual_seed(cfg.seed + 4)
    per_task = probing_per_task(saes, gt, cfg)
    for name, row in _average_tasks(per_task).items():
        results["saes"][name]["probing"] = row
        for key, values in per_task[name].items():
            units[name][f"probing.{key}"] = np.asarray(values, dtype=np.float64)
    logger.info("bootstrapping the comparisons (%d resamples each)", cfg.n_boot)
    t0 = time.perf_counter()
    results["comparisons"] = comparisons(units, cfg.n_boot, cfg.seed)
    results["runtime_seconds"]["bootstrap"] = time.perf_counter() - t0
    results["runtime_seconds"]["total"] = time.perf_counter() - start
    return results


def with_overrides(cfg: StudyConfig, **overrides: Any) -> StudyConfig:
    """``cfg`` with some fields replaced (``None`` values are ignored)."""
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
