"""The in-class study behind ``polysae-lens demo``: data PolySAE's model class fits exactly.

Activations come from a random order-2 PolySAE decoder (:mod:`polysae_lens.inclass`).
On the same stream, with the same width (the true number of atoms), k, learning
rate, batch and steps, SAELens's stock ``SAETrainer`` trains:

- ``linear``: SAELens's ``TopKTrainingSAE``;
- ``poly``: a TopK PolySAE of the true order and ranks, package defaults;
- ``poly_order1``: the order-1 ablation (same ``U @ C1`` parametrisation, no
  interaction term);
- ``poly_previous``: ``poly`` with the package's defaults before issue 13's
  fourth pass (:data:`polysae_lens.config.PREVIOUS_TRAINING_DEFAULTS`: no gauge
  step, U's step unscaled, C1's step d_sae / R1, SAELens's AuxK k and
  comparison), an extra
  contender, labelled as such;
- ``oracle``: ``poly`` started at the true decoder (encoder tied to it), trained
  the same way (:func:`polysae_lens.inclass.oracle_sae`): what training reaches
  when it does not have to *find* the structure.

Each seed ``s`` draws its own true decoder, stream and initialisations, and every
contender of that seed sees the same ones, so contenders are compared seed by
seed (:func:`seed_comparisons`). Metrics per contender and seed:

- ``mse``, ``explained_variance`` on held-out activations
  (:func:`polysae_lens.study.reconstruction`);
- ``gap_closed`` = (MSE_linear - MSE) / (MSE_linear - MSE_oracle): the share of
  the TopK-to-oracle gap closed (1 = as good as the oracle, 0 = no better than
  TopK, negative = worse than TopK);
- ``pair_cos`` (order-2 models): issue 13's interaction target,
  :func:`polysae_lens.inclass.interaction_recovery`'s co-firing-weighted cosine
  of planted and learned pairwise interaction vectors of matched latent pairs,
  with ``matched``, the share of true atoms matched;
- ``term_shares``: each decoder term's share of the reconstruction's energy
  (:func:`polysae_lens.study.term_shares`), also recorded over training with the
  held-out MSE (``curves``; the first point is the initialisation), which shows
  the plateau: the quadratic share stays small while the MSE stays at TopK's.

**Verdicts against seed noise.** For two contenders A, B and a metric, the
per-seed differences ``d_s = A_s - B_s`` give a paired t interval
(:func:`polysae_lens.noise.paired_t_interval`). A side wins only when the 95%
interval excludes 0; otherwise the difference is within seed-to-seed noise (a
tie). Fewer than 2 seeds: no verdict.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.saes.sae import TrainingSAE
from torch import Tensor

from polysae_lens import noise
from polysae_lens.config import PREVIOUS_TRAINING_DEFAULTS, PolyTopKTrainingSAEConfig
from polysae_lens.inclass import (
    InClassConfig,
    InClassGroundTruth,
    build_in_class,
    interaction_recovery,
    oracle_sae,
)
from polysae_lens.polynomial import decoder_terms
from polysae_lens.sae import PolyTopKTrainingSAE, is_poly_sae
from polysae_lens.study import TERM_NAMES, Snapshot, _snapshot_fn, reconstruction, term_shares

logger = logging.getLogger(__name__)

CONTENDERS = ("linear", "poly", "poly_order1", "poly_previous", "oracle")
"""Every contender the study can train, in table order."""

COMPARED: tuple[tuple[str, str], ...] = (
    ("poly", "linear"),
    ("poly", "poly_order1"),
    ("poly", "oracle"),
    ("poly", "poly_previous"),
    ("oracle", "linear"),
)
"""The (A, B) pairs judged against seed noise: PolySAE against each rival, the
defaults against the previous ones, and the oracle against TopK (the premise)."""

METRICS = ("mse", "explained_variance", "gap_closed", "pair_cos")
"""Per-seed metrics that are compared (where both contenders have them)."""


@dataclass(frozen=True)
class InClassStudyConfig:
    """Everything that determines the in-class study's numbers."""

    data: InClassConfig = field(default_factory=InClassConfig)
    """The true decoder's settings; its ``seed`` is replaced by each of ``seeds``."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds of the true decoder, the stream and the SAEs' initialisation."""
    steps: int = 3000
    """Training steps per contender and seed (3000: TopK is within about 3% of its
    4x-longer MSE there, docs/inclass-plateau.md)."""
    batch_size: int = 512
    """Training batch size."""
    lr: float = 3e-3
    """Adam learning rate of every contender (constant)."""
    eval_samples: int = 8192
    """Held-out activations for MSE and explained variance."""
    recovery_samples: int = 4096
    """Generated codes whose co-firing pairs ``pair_cos`` averages over."""
    curve_samples: int = 2048
    """Held-out activations (a prefix of the evaluation set) scored at each snapshot."""
    n_snapshots: int = 10
    """Points on the training curves after the initial one."""
    contenders: tuple[str, ...] = CONTENDERS
    """Contenders to train (``linear`` and ``oracle`` are needed for ``gap_closed``)."""
    level: float = 0.95
    """Coverage of the seed-noise intervals."""
    threads: int | None = 1
    """torch CPU threads while the study runs (restored after); ``None`` keeps the
    current setting. 1 by default: its matrices are small, and on 2 cores shared
    with other jobs 2 threads ran the ``quick`` study 7x slower than 1 (55 s vs 8 s,
    load ~3.5)."""

    def __post_init__(self) -> None:
        if self.data.poly_order < 2:
            raise ValueError(
                f"data.poly_order={self.data.poly_order}: the in-class study needs a "
                "polynomial truth (order 2 or 3) so there is structure to find."
            )
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds={self.seeds} must be a non-empty tuple of distinct seeds.")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(
                f"steps={self.steps} and batch_size={self.batch_size} must be positive."
            )
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0.")
        for name in ("eval_samples", "recovery_samples", "curve_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be positive.")
        if self.curve_samples > self.eval_samples:
            raise ValueError(
                f"curve_samples={self.curve_samples} must be <= eval_samples="
                f"{self.eval_samples} (the curves use a prefix of the evaluation set)."
            )
        if not 0 <= self.n_snapshots < self.steps:
            raise ValueError(f"n_snapshots={self.n_snapshots} must be in [0, steps={self.steps}).")
        unknown = [c for c in self.contenders if c not in CONTENDERS]
        if unknown or not self.contenders:
            raise ValueError(
                f"contenders={self.contenders}: use a non-empty subset of {list(CONTENDERS)}."
            )
        if not 0 < self.level < 1:
            raise ValueError(f"level={self.level} must be in (0, 1), e.g. 0.95.")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads={self.threads} must be >= 1, or None to keep torch's.")

    @classmethod
    def quick(cls, seed: int = 0) -> InClassStudyConfig:
        """Tiny shapes and a short budget (seconds; for tests and ``demo --quick``)."""
        data = InClassConfig(d_in=16, num_atoms=48, ranks=(16, 4, 4), k=2, calibration_samples=4096)
        return cls(
            data=data,
            seeds=(seed, seed + 1, seed + 2),
            steps=300,
            batch_size=64,
            eval_samples=1024,
            recovery_samples=1024,
            curve_samples=512,
            n_snapshots=4,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- contenders ------------------------------------------------------------------


def build_contender(name: str, truth: InClassGroundTruth) -> TrainingSAE[Any]:
    """A fresh contender ``name`` of :data:`CONTENDERS` for ``truth``'s data."""
    cfg = truth.cfg
    k = cfg.k
    if name == "linear":
        return TopKTrainingSAE(
            TopKTrainingSAEConfig(
                d_in=cfg.d_in, d_sae=cfg.num_atoms, k=k, rescale_acts_by_decoder_norm=False
            )
        )
    if name == "oracle":
        return oracle_sae(truth, k)
    order = 1 if name == "poly_order1" else cfg.poly_order
    # Only the previous-defaults contender departs from the package defaults.
    extra: dict[str, Any] = dict(PREVIOUS_TRAINING_DEFAULTS) if name == "poly_previous" else {}
    return PolyTopKTrainingSAE(
        PolyTopKTrainingSAEConfig(
            d_in=cfg.d_in,
            d_sae=cfg.num_atoms,
            k=k,
            poly_order=order,
            poly_ranks=cfg.ranks,
            **extra,
        )
    )


class ReplayStream:
    """One seeded stream of training batches, drawn once and replayed.

    Every contender of a seed trains on the same batches; drawing them costs
    about as much as a training step (exact-k codes sample without replacement),
    so the first contender draws and keeps them and the others replay them
    (``batch_size * d_in`` floats per step: 400 MB at the default 3000 steps).
    """

    def __init__(self, truth: InClassGroundTruth, batch_size: int, gen: torch.Generator) -> None:
        self.truth, self.batch_size, self.gen = truth, batch_size, gen
        self.batches: list[Tensor] = []

    def __call__(self) -> Iterator[Tensor]:
        """A fresh iterator from the first batch."""
        step = 0
        while True:
            if step == len(self.batches):
                self.batches.append(self.truth.sample(self.batch_size, self.gen).x_BD)
            yield self.batches[step]
            step += 1


def train_contender(
    sae: TrainingSAE[Any],
    stream: Iterator[Tensor],
    cfg: InClassStudyConfig,
    name: str,
    curve_x_BD: Tensor,
) -> list[Snapshot]:
    """Train ``sae`` with SAELens's stock trainer on ``stream``; return its
    training curve."""
    curve: list[Snapshot] = []
    record = _snapshot_fn(name, curve, curve_x_BD)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=cfg.steps * cfg.batch_size,
        train_batch_size_samples=cfg.batch_size,
        lr=cfg.lr,
        lr_end=cfg.lr,
        n_checkpoints=cfg.n_snapshots,
        logger=LoggingConfig(log_to_wandb=False),
    )
    trainer: SAETrainer[Any, Any] = SAETrainer(
        cfg=trainer_cfg,
        sae=sae,
        data_provider=stream,
        save_checkpoint_fn=lambda checkpoint_path: record(trainer),
    )
    record(trainer)  # the initialisation: 0 samples
    trainer.fit()
    record(trainer)
    return curve


@torch.no_grad()
def truth_term_shares(truth: InClassGroundTruth, z_BN: Tensor) -> dict[str, float]:
    """The true decoder's term shares on codes ``z_BN``, measured like
    :func:`polysae_lens.study.term_shares` (sum of squares, not centred)."""
    terms = decoder_terms(z_BN, truth.weights)
    energy = {
        name: float(t.pow(2).sum())
        for name, t in zip(TERM_NAMES, terms, strict=True)
        if t is not None
    }
    total = sum(energy.values())
    return {name: e / total for name, e in energy.items()}


@torch.no_grad()
def score(
    sae: TrainingSAE[Any], truth: InClassGroundTruth, x_BD: Tensor, z_BN: Tensor
) -> dict[str, Any]:
    """Held-out reconstruction, term shares and (order >= 2) interaction recovery."""
    sae.eval()
    row: dict[str, Any] = {**reconstruction(sae, x_BD), "term_shares": term_shares(sae, x_BD)}
    row["pair_cos"] = row["matched"] = row["lambda2"] = None
    if is_poly_sae(sae) and sae.cfg.poly_order >= 2:  # type: ignore[attr-defined]
        rec = interaction_recovery(truth.weights, sae, z_BN)
        row["pair_cos"] = None if math.isnan(rec.weighted_cos) else rec.weighted_cos
        row["matched"] = rec.matched_fraction
        row["lambda2"] = float(sae.lambda2.detach())  # type: ignore[attr-defined]
    return row


def gap_closed(mse_linear: float, mse: float, mse_oracle: float) -> float | None:
    """Share of the TopK-to-oracle MSE gap that ``mse`` closes (None without a gap)."""
    gap = mse_linear - mse_oracle
    if gap == 0:
        return None
    return (mse_linear - mse) / gap


# ---- seed noise ---------------------------------------------------------------------


def seed_comparisons(
    runs: dict[str, list[dict[str, Any]]], level: float = 0.95
) -> dict[str, dict[str, dict[str, Any]]]:
    """For each pair of :data:`COMPARED` present in ``runs`` and each metric of
    :data:`METRICS` both have on every seed: the paired t interval of ``A - B``
    over seeds (:func:`polysae_lens.noise.paired_t_interval`), as a dict with the
    per-seed differences. Keyed ``"A - B" -> metric``."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for a, b in COMPARED:
        if a not in runs or b not in runs:
            continue
        by_metric: dict[str, dict[str, Any]] = {}
        for metric in METRICS:
            va = [r.get(metric) for r in runs[a]]
            vb = [r.get(metric) for r in runs[b]]
            if any(v is None for v in va + vb):
                continue
            # The gap is 0 for TopK and 1 for the oracle by definition: against
            # either it only restates the MSE comparison.
            if metric == "gap_closed" and {a, b} & {"linear", "oracle"}:
                continue
            interval = noise.paired_t_interval(va, vb, level=level)  # type: ignore[arg-type]
            by_metric[metric] = {
                **interval._asdict(),
                "per_seed": [x - y for x, y in zip(va, vb, strict=True)],  # type: ignore[operator]
            }
        out[f"{a} - {b}"] = by_metric
    return out


def seed_verdict(interval: dict[str, Any] | noise.Interval, better: str) -> str:
    """``"A"`` or ``"B"`` (the side that wins beyond seed noise), ``"tie"`` when the
    interval of ``A - B`` contains 0, ``"unjudged"`` with fewer than 2 seeds.
    ``better`` is ``"higher"`` or ``"lower"``."""
    iv = (
        interval
        if isinstance(interval, noise.Interval)
        else noise.Interval(**{k: interval[k] for k in noise.Interval._fields})
    )
    if better not in ("higher", "lower"):
        raise ValueError(f"better={better!r} must be 'higher' or 'lower'.")
    if iv.n_units < 2 or math.isnan(iv.low):
        return "unjudged"
    if not iv.excludes_zero():
        return "tie"
    a_larger = iv.low > 0
    return "A" if a_larger == (better == "higher") else "B"


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Mean, sd (n - 1) and per-seed values of each numeric metric per contender."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, per_seed in runs.items():
        out[name] = {}
        for metric in (*METRICS, "matched", "lambda2"):
            maybe = [r.get(metric) for r in per_seed]
            values = [float(v) for v in maybe if v is not None]
            if len(values) < len(maybe):
                continue
            out[name][metric] = {
                "mean": statistics.fmean(values),
                "sd": statistics.stdev(values) if len(values) > 1 else float("nan"),
                "values": values,
            }
        shares = [r["term_shares"] for r in per_seed]
        out[name]["term_shares"] = {
            term: statistics.fmean(s[term] for s in shares) for term in shares[0]
        }
    return out


# ---- the study -----------------------------------------------------------------------


def run_inclass_study(cfg: InClassStudyConfig | None = None) -> dict[str, Any]:
    """Train every contender on every seed and score them; JSON-serialisable results."""
    cfg = cfg or InClassStudyConfig()
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: InClassStudyConfig) -> dict[str, Any]:
    start = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in cfg.contenders}
    curves: dict[str, list[list[Snapshot]]] = {name: [] for name in cfg.contenders}
    runtime: dict[str, float] = {f"train_{name}": 0.0 for name in cfg.contenders}
    truths: list[dict[str, Any]] = []
    for seed in cfg.seeds:
        truth = build_in_class(replace(cfg.data, seed=seed))
        x_eval = truth.sample(cfg.eval_samples, truth.generator(999_999)).x_BD
        z_rec = truth.sample(cfg.recovery_samples, truth.generator(777_777)).z_BN
        truths.append(
            {
                "seed": seed,
                "lambda2": float(truth.weights.lambda2)  # type: ignore[arg-type]
                if truth.weights.lambda2 is not None
                else None,
                "term_shares": truth_term_shares(truth, z_rec),
            }
        )
        stream = ReplayStream(truth, cfg.batch_size, truth.generator(100 + seed))
        for name in cfg.contenders:
            logger.info("in-class seed %d: training %s (%d steps)", seed, name, cfg.steps)
            t0 = time.perf_counter()
            torch.manual_seed(seed)
            sae = build_contender(name, truth)
            curves[name].append(
                train_contender(sae, stream(), cfg, name, x_eval[: cfg.curve_samples])
            )
            runtime[f"train_{name}"] += time.perf_counter() - t0
            runs[name].append({"seed": seed, **score(sae, truth, x_eval, z_rec)})
    if "linear" in runs and "oracle" in runs:
        for per_seed in runs.values():
            for r, lin, orc in zip(per_seed, runs["linear"], runs["oracle"], strict=True):
                r["gap_closed"] = gap_closed(lin["mse"], r["mse"], orc["mse"])
    runtime["total"] = time.perf_counter() - start
    return {
        "config": cfg.to_dict(),
        "truth": truths,
        "runs": runs,
        "summary": summarise(runs),
        "comparisons": seed_comparisons(runs, cfg.level),
        "curves": curves,
        "runtime_seconds": runtime,
    }


def with_overrides(cfg: InClassStudyConfig, **overrides: Any) -> InClassStudyConfig:
    """``cfg`` with some fields replaced (``None`` values are ignored)."""
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
