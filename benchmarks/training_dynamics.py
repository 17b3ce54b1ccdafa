"""Training dynamics of PolySAE against SAELens's TopK SAE (issue 3, items 2 and 3).

Every contender is trained by SAELens's stock ``SAETrainer`` (one Adam over
``sae.parameters()``, grad-norm clip 1, constant lr) on the same stream of
synthetic activations from ``sae_lens.synthetic``, from the same seed, and is
evaluated on the same held-out batch at fixed step counts.

Suites
------
``linear``
    Plain sparse-linear data (d_in 64, 1024 true features, L0 ~16; SAE width
    1024, k 16). Ablations of PolySAE order 1, one change at a time, against
    the stock TopK SAE (``rescale_acts_by_decoder_norm=False``).
``lr``
    The headline contenders of ``linear`` at a second learning rate (1e-3).
``planted``
    The same generator plus a planted ground-truth quadratic decoder term
    (x = f @ D + ((f @ G)[:, :16] ** 2) @ C2*, where D = G @ R is the feature
    dictionary with G orthonormal: exactly PolySAE's model class). Light
    superposition (256 features in 64 dims, L0 ~4, width 256, k 4): with more
    superposition (1024 features, L0 16) even a PolySAE started at the true U
    and C1 gains nothing from the quadratic term, because encoder noise gets
    squared.
``retraction``
    Cost of the Stiefel retraction hook alone (plain vs projected moments).

Candidate fixes
---------------
The first two are now the package's defaults (``c1_init="orthogonal"``,
``c1_lr_scale=None`` meaning d_sae / R1). The "authors init" contenders are the
paper's settings (``init_preset="authors"``, ``c1_lr_scale=1.0``: the authors'
code's initialisation and single learning rate); the "kaiming C1" contenders,
the base of the ablations, keep the package's init otherwise (W_enc tied to
U @ C1, C's with fan_in = d_in) with ``c1_init="kaiming"`` and one learning
rate; the "FIX" contenders re-apply the two changes with this script's own
helpers. All of them keep U's step unscaled and the package's gauge step off
(``PREVIOUS_TRAINING_DEFAULTS``: both became defaults after these rows were
measured); the "pkg defaults" row is the package as it is now (``u_lr_scale``
None = sqrt(R1 / d_sae) included), so it differs from "FIX" by U's step scale.

- ``orthogonal_c1_``: C1 = sqrt(2) * (orthonormal rows) instead of
  Kaiming-uniform: the same Frobenius norm, but condition number 1. With U on
  the Stiefel manifold, the spectrum of the first-order decoder U @ C1 *is* the
  spectrum of C1, and a square Kaiming matrix has singular values from ~0 to
  ~2.8 that Adam repairs only slowly.
- ``scale_steps``: per-parameter step multipliers, applied after the optimizer
  step and before the retraction (an exact per-parameter lr for Adam that
  follows any lr schedule). C1 gets d_sae / R1 (sqrt(d_sae / R1) as a
  variant): under the Stiefel constraint only C1's R1 x d_in entries can
  reshape or rescale the decoder's spectrum, where a linear SAE does it with
  all d_sae x d_in decoder entries.
- Not in the package (interaction terms): C2, lambda2 (C3, lambda3) steps get
  C1's factor times sqrt(d_sae / k) per order, because a = z @ U has entries of
  size ~sqrt(k / d_sae) * |z|, so a**2 and a**3 are that much smaller than a.
- Not in the package: ``GaugedPolyTopKTrainingSAE``, an extra orthogonal
  R1 x R1 matrix V (the "gauge") through which the interaction terms read the
  projection: x^ = b_dec + a @ C1 + lambda2 * ((a @ V)[:, :R2] ** 2) @ C2 + ...
  It is a reparameterisation of the paper's model (fold: U <- U @ V,
  C1 <- V^T @ C1; the table reports the fold error), but it lets the
  element-wise-power basis rotate without moving the linear term. Without it,
  U's basis is pinned by the linear term and the planted quadratic is found
  only slowly from a random start.

Run (from the repository root)::

    .venv/bin/python benchmarks/training_dynamics.py --quick   # ~7 min on 2 cores
    .venv/bin/python benchmarks/training_dynamics.py           # ~25-40 min

``--threads 1`` if another heavy process shares the machine (timings then
compare only within one run).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.config import SAETrainerConfig
from sae_lens.synthetic import ActivationGenerator, FeatureDictionary
from torch import Tensor, nn

from polysae_lens import PolyTopKTrainingSAE, PolyTopKTrainingSAEConfig, orthogonality_error
from polysae_lens.config import PREVIOUS_TRAINING_DEFAULTS
from polysae_lens.polynomial import project
from polysae_lens.stiefel import qr_retract, retract_

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import quiet_fit, scale_steps, timed_batches

# ---- data ------------------------------------------------------------------


@dataclass(frozen=True)
class DataSpec:
    """A synthetic activation distribution (and the SAE shape trained on it)."""

    d_in: int = 64
    n_features: int = 1024
    mean_l0: float = 16.0
    quad_frac: float = 0.0
    """Centred variance of the planted quadratic term / that of the linear term."""
    truth_r2: int = 16
    """Number of columns of G whose squares the planted quadratic term uses."""
    d_sae: int = 1024
    k: int = 16
    seed: int = 0


class SyntheticStream:
    """Activations ``x = f @ D (+ planted quadratic)`` from ``sae_lens.synthetic``.

    Features f come from an ``ActivationGenerator`` (firing probabilities spread
    linearly around mean_l0 / n, magnitudes N(1, 0.5) clipped at 0) and D is an
    orthogonalised ``FeatureDictionary``. The generator draws from a private RNG
    state, so every contender sees exactly the same batches whatever its training
    code does with torch's global RNG. ``G`` is the orthonormal factor of
    ``D = G @ R``: the ground-truth shared projection of the planted term.
    """

    def __init__(self, spec: DataSpec, stream_seed: int = 1) -> None:
        self.spec = spec
        gen = torch.Generator().manual_seed(spec.seed)
        with torch.random.fork_rng():
            torch.manual_seed(spec.seed)
            self.dictionary = FeatureDictionary(spec.n_features, spec.d_in, seed=spec.seed)
        n = spec.n_features
        p = spec.mean_l0 / n
        probs = torch.linspace(1.75 * p, 0.25 * p, n)[torch.randperm(n, generator=gen)]
        self.features = ActivationGenerator(
            n, probs, std_firing_magnitudes=0.5, mean_firing_magnitudes=1.0
        )
        D = self.dictionary.feature_vectors.detach()
        self.G, self.R = torch.linalg.qr(D)  # D = G @ R, G [n, d_in] orthonormal
        self.quad_C2: Tensor | None = None
        if spec.quad_frac > 0:
            self._rng = torch.Generator().manual_seed(spec.seed + 12345).get_state()
            f = self._sample_features(8192)
            lin_var = (f @ D).var(dim=0).sum()
            C2 = torch.randn(spec.truth_r2, spec.d_in, generator=gen)
            quad_var = ((f @ self.G)[:, : spec.truth_r2] ** 2 @ C2).var(dim=0).sum()
            self.quad_C2 = C2 * (spec.quad_frac * lin_var / quad_var).sqrt()
        self._rng = torch.Generator().manual_seed(spec.seed * 1000 + stream_seed).get_state()

    def _sample_features(self, batch: int) -> Tensor:
        saved = torch.random.get_rng_state()
        torch.random.set_rng_state(self._rng)
        try:
            f = self.features.sample(batch)
            self._rng = torch.random.get_rng_state()
        finally:
            torch.random.set_rng_state(saved)
        return f

    @torch.no_grad()
    def sample(self, batch: int) -> Tensor:
        f = self._sample_features(batch)
        x = self.dictionary(f)
        if self.quad_C2 is not None:
            x = x + (f @ self.G)[:, : self.spec.truth_r2] ** 2 @ self.quad_C2
        return x

    def __iter__(self) -> Iterator[Tensor]:
        return self

    def __next__(self) -> Tensor:
        return self.sample(1024)


# ---- candidate fixes -------------------------------------------------------


@torch.no_grad()
def orthogonal_c1_(sae: PolyTopKTrainingSAE) -> None:
    """C1 <- sqrt(2) * (orthonormal rows): Kaiming's Frobenius norm, condition 1.

    Re-ties the encoder to the new first-order decoder, as the package does."""
    r1, d_in = sae.C1.shape
    q_DR = qr_retract(torch.randn(d_in, r1, dtype=torch.float32))
    sae.C1.copy_(math.sqrt(2.0) * q_DR.T.to(sae.C1.dtype))
    sae.W_enc.copy_(sae.W_dec.T)


@torch.no_grad()
def untie_encoder_(sae: nn.Module) -> None:
    """W_enc <- an independent Kaiming-uniform matrix with the same column norms."""
    w = torch.empty_like(sae.W_enc)
    nn.init.kaiming_uniform_(w)
    sae.W_enc.copy_(w * sae.W_enc.norm(dim=0, keepdim=True) / w.norm(dim=0, keepdim=True))


@torch.no_grad()
def true_decoder_init_(sae: PolyTopKTrainingSAE, stream: SyntheticStream) -> None:
    """Reference only: U, C1 at the ground truth (U = G, C1 = R; needs d_sae =
    n_features), encoder tied to it; C2 stays random."""
    sae.U.copy_(stream.G)
    sae.C1.copy_(stream.R)
    sae.W_enc.copy_(sae.W_dec.T)


class GaugedPolyTopKTrainingSAE(PolyTopKTrainingSAE):
    """PolySAE whose interaction terms read the projection through a learned
    orthogonal ``V`` [R1, R1] (identity at init, QR-retracted after each step):

        a = z @ U,  b = a @ V,
        x^ = b_dec + a @ C1 + lambda2 (b[:, :R2]**2) @ C2 + lambda3 (b[:, :R3]**3) @ C3.

    The paper's model with U' = U @ V and C1' = V^T @ C1 (see :meth:`folded`).
    """

    def initialize_weights(self) -> None:
        super().initialize_weights()
        self.V = nn.Parameter(torch.eye(self.cfg.ranks[0], dtype=self.dtype, device=self.device))

    def _terms(self, a_BR: Tensor) -> Tensor:
        out = a_BR @ self.C1
        order = self.cfg.poly_order
        if order >= 2:
            _, r2, r3 = self.cfg.ranks
            b_BR = a_BR @ self.V
            out = out + self.lambda2 * (b_BR[..., :r2] ** 2) @ self.C2
            if order >= 3:
                out = out + self.lambda3 * (b_BR[..., :r3] ** 3) @ self.C3
        return out

    def _decode_without_bias(self, feature_acts: Tensor) -> Tensor:
        return self._terms(project(feature_acts, self.U))

    def _decode_code(self, code: Any, weights: Any = None) -> Tensor:
        # the package's sparse training path (present in newer versions)
        from polysae_lens.sparse import project_sparse

        return self._terms(project_sparse(code, self.U))

    @torch.no_grad()
    def folded(self) -> PolyTopKTrainingSAE:
        """The same function as a plain PolyTopKTrainingSAE (U <- U V, C1 <- V^T C1)."""
        plain = PolyTopKTrainingSAE(self.cfg)
        state = {k: v for k, v in self.state_dict().items() if k != "V"}
        V = self.V.detach()
        state["U"] = self.U.detach() @ V
        state["C1"] = V.T @ self.C1.detach()
        plain.load_state_dict(state)
        return plain


# ---- contenders ------------------------------------------------------------


@dataclass(frozen=True)
class Contender:
    """One SAE recipe. ``order=0`` is the stock SAELens TopK SAE."""

    name: str
    order: int = 1
    c1_orthogonal: bool = False
    c1_mult: str = "1"
    """Step multiplier for C1: "1", "sqrt" (sqrt(d_sae/R1)) or "ratio" (d_sae/R1)."""
    interaction_mult: bool = False
    """C2, lambda2 (C3, lambda3) steps x (C1 multiplier) * sqrt(d_sae/k) per order."""
    gauge: bool = False
    u_mult: str = "1"
    untie: bool = False
    true_init: bool = False
    poly_kwargs: tuple[tuple[str, Any], ...] = ()

    def with_(self, name: str, **changes: Any) -> Contender:
        if "poly_kwargs" in changes:  # merged, so derived rows keep the paper's settings
            changes["poly_kwargs"] = tuple(
                {**dict(self.poly_kwargs), **dict(changes["poly_kwargs"])}.items()
            )
        return replace(self, name=name, **changes)


def _multiplier(kind: str, spec: DataSpec) -> float:
    ratio = spec.d_sae / spec.d_in  # R1 = d_in (the package's default)
    return {"1": 1.0, "sqrt": math.sqrt(ratio), "ratio": ratio}[kind]


def build(c: Contender, spec: DataSpec, stream: SyntheticStream) -> nn.Module:
    if c.order == 0:
        cfg = TopKTrainingSAEConfig(
            d_in=spec.d_in, d_sae=spec.d_sae, k=spec.k, rescale_acts_by_decoder_norm=False
        )
        return TopKTrainingSAE(cfg)
    poly_cfg = PolyTopKTrainingSAEConfig(
        d_in=spec.d_in, d_sae=spec.d_sae, k=spec.k, poly_order=c.order, **dict(c.poly_kwargs)
    )
    cls = GaugedPolyTopKTrainingSAE if c.gauge else PolyTopKTrainingSAE
    sae = cls(poly_cfg)
    if c.c1_orthogonal:
        orthogonal_c1_(sae)
    if c.true_init:
        true_decoder_init_(sae, stream)
    if c.untie:
        untie_encoder_(sae)
    return sae


def attach(c: Contender, trainer: SAETrainer, sae: nn.Module, spec: DataSpec) -> None:
    """Per-parameter step multipliers and the gauge's retraction."""
    if c.order == 0:
        return
    m1 = _multiplier(c.c1_mult, spec)
    mult: dict[Tensor, float] = {sae.C1: m1, sae.U: _multiplier(c.u_mult, spec)}
    if c.interaction_mult:
        per_order = math.sqrt(spec.d_sae / spec.k)
        for order in range(2, c.order + 1):
            m = m1 * per_order ** (order - 1)
            mult[getattr(sae, f"C{order}")] = m
            mult[getattr(sae, f"lambda{order}")] = m
        if c.gauge:
            mult[sae.V] = m1 * per_order
    scale_steps(trainer.optimizer, mult)
    if c.gauge:

        @torch.no_grad()
        def retract_gauge(opt: Any, args: Any, kwargs: Any) -> None:
            sae.V.copy_(qr_retract(sae.V))

        trainer.optimizer.register_step_post_hook(retract_gauge)


# ---- training and evaluation ---------------------------------------------


@dataclass
class RunResult:
    name: str
    mse: dict[int, float] = field(default_factory=dict)
    ev: dict[int, float] = field(default_factory=dict)
    ortho: float = float("nan")
    ms_per_step: float = float("nan")
    extra: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def evaluate(sae: nn.Module, x: Tensor) -> tuple[float, float]:
    """Mean over rows of the summed squared error (SAELens's mse_loss), and
    explained variance 1 - SSE / SST."""
    was_training = sae.training
    sae.eval()
    out = sae(x)
    sae.train(was_training)
    sse = (out - x).pow(2).sum(-1).mean().item()
    sst = (x - x.mean(0)).pow(2).sum(-1).mean().item()
    return sse, 1.0 - sse / sst


def train(
    c: Contender,
    spec: DataSpec,
    steps: int,
    checkpoints: list[int],
    lr: float,
    eval_x: Tensor,
    batch: int = 1024,
) -> RunResult:
    stream = SyntheticStream(spec)
    torch.manual_seed(spec.seed)
    sae = build(c, spec, stream)
    result = RunResult(c.name)
    step_times: list[float] = []

    def before_step(step: int) -> None:
        if step in checkpoints:
            result.mse[step], result.ev[step] = evaluate(sae, eval_x)

    data = timed_batches(lambda: stream.sample(batch), before_step, step_times)
    cfg = SAETrainerConfig(
        total_training_samples=steps * batch, train_batch_size_samples=batch, lr=lr, lr_end=lr
    )
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=data)
    attach(c, trainer, sae, spec)
    quiet_fit(trainer)
    result.mse[steps], result.ev[steps] = evaluate(sae, eval_x)
    result.ms_per_step = 1000 * statistics.median(step_times[5:] or step_times)
    with torch.no_grad():
        z = sae.encode(eval_x)
        result.extra["dead"] = (z.abs().sum(0) == 0).float().mean().item()
        if c.order > 0:
            result.ortho = orthogonality_error(sae.U).item()
            sv = torch.linalg.svdvals(sae.W_dec.float())
            result.extra["cond"] = (sv.max() / sv.min()).item()
            for name in ("lambda2", "lambda3"):
                if hasattr(sae, name):
                    result.extra[name] = getattr(sae, name).item()
        if isinstance(sae, GaugedPolyTopKTrainingSAE):
            plain = sae.folded()
            result.extra["fold_err"] = (plain(eval_x) - sae(eval_x)).abs().max().item()
    return result


# ---- suites ----------------------------------------------------------------

# The authors' code's init (init_preset="authors": C's with fan_in = R, W_enc an
# untied placeholder) and its single learning rate: the paper's settings.
# U's step unscaled and no package gauge step (this script's rows predate both
# defaults; its own gauge experiment is ``gauge=True``).
# (c1_lr_scale=1.0 last: it replaces the previous defaults' "d_sae/R1")
ONE_LR = (*PREVIOUS_TRAINING_DEFAULTS.items(), ("c1_lr_scale", 1.0))
AUTHORS = Contender("poly1 authors init", poly_kwargs=(("init_preset", "authors"), *ONE_LR))
# Kaiming C1 with one lr on the package's init otherwise (W_enc tied to U @ C1, C's
# with fan_in = d_in): the base of the ablations. The package's defaults include
# the fix (FIX applies the same two changes on top of it, in this script).
KAIMING = Contender("poly1 kaiming C1", poly_kwargs=(("c1_init", "kaiming"), *ONE_LR))
LINEAR = Contender("linear TopK", order=0)
FIX = KAIMING.with_("poly1 FIX", c1_orthogonal=True, c1_mult="ratio")
PKG_DEFAULTS = Contender("poly1 pkg defaults")  # every field left to the package


def linear_suite(quick: bool) -> list[Contender]:
    rows = [
        LINEAR,
        AUTHORS,
        KAIMING,
        KAIMING.with_("poly1 no retraction", poly_kwargs=(("stiefel_every_n_steps", 0),)),
        KAIMING.with_("poly1 proj. moments", poly_kwargs=(("stiefel_project_moments", True),)),
        KAIMING.with_("poly1 untied W_enc", untie=True),
        KAIMING.with_("poly1 decoder_init_norm=.1", poly_kwargs=(("decoder_init_norm", 0.1),)),
        KAIMING.with_("poly1 U lr x sqrt(F/R1)", u_mult="sqrt"),
        KAIMING.with_("poly1 orthogonal C1", c1_orthogonal=True),
        KAIMING.with_("poly1 C1 lr x sqrt(F/R1)", c1_mult="sqrt"),
        KAIMING.with_("poly1 C1 lr x F/R1", c1_mult="ratio"),
        FIX.with_("poly1 FIX, C1 lr x sqrt(F/R1)", c1_mult="sqrt"),
        FIX,
        FIX.with_("poly1 FIX + proj. moments", poly_kwargs=(("stiefel_project_moments", True),)),
        FIX.with_("poly1 FIX + no retraction", poly_kwargs=(("stiefel_every_n_steps", 0),)),
        FIX.with_("poly1 FIX + U lr x F/R1", u_mult="ratio"),
        PKG_DEFAULTS,
    ]
    if quick:
        keep = {"linear TopK", "poly1 authors init", "poly1 kaiming C1", "poly1 no retraction"}
        keep |= {"poly1 proj. moments"}
        keep |= {"poly1 orthogonal C1", "poly1 C1 lr x F/R1", "poly1 FIX"}
        keep |= {"poly1 FIX + proj. moments", "poly1 pkg defaults"}
        rows = [r for r in rows if r.name in keep]
    return rows


def lr_suite(quick: bool) -> list[Contender]:
    rows = [
        LINEAR,
        AUTHORS,
        KAIMING,
        FIX.with_("poly1 FIX, C1 lr x sqrt(F/R1)", c1_mult="sqrt"),
        FIX,
    ]
    return [LINEAR, AUTHORS, KAIMING, FIX, PKG_DEFAULTS] if quick else [*rows, PKG_DEFAULTS]


def moments_suite(quick: bool) -> list[Contender]:
    """Item 2: the paper's plain retraction vs projecting Adam's first moment."""
    proj = (("stiefel_project_moments", True),)
    return [
        KAIMING,
        KAIMING.with_("poly1 proj. moments", poly_kwargs=proj),
        FIX,
        FIX.with_("poly1 FIX + proj. moments", poly_kwargs=proj),
    ]


def planted_suite(quick: bool) -> list[Contender]:
    fix2 = FIX.with_("poly2 FIX (C1 only)", order=2)
    full2 = fix2.with_("poly2 FIX+inter+gauge", interaction_mult=True, gauge=True)
    rows = [
        LINEAR,
        AUTHORS.with_("poly2 authors init", order=2),
        KAIMING,
        KAIMING.with_("poly2 kaiming C1", order=2),
        KAIMING.with_("poly3 kaiming C1", order=3),
        FIX,
        fix2,
        FIX.with_("poly3 FIX (C1 only)", order=3),
        fix2.with_("poly2 FIX+inter", interaction_mult=True),
        fix2.with_("poly2 FIX+gauge", gauge=True),
        full2,
        full2.with_("poly3 FIX+inter+gauge", order=3),
        FIX.with_("poly1 FIX + U lr x F/R1", u_mult="ratio"),
        full2.with_("poly2 FIX+inter+gauge+U", u_mult="ratio"),
        FIX.with_("ref: poly1 true U,C1", true_init=True),
        fix2.with_("ref: poly2 true U,C1 +inter", true_init=True, interaction_mult=True),
    ]
    if quick:
        keep = {"linear TopK", "poly1 FIX", "poly2 FIX (C1 only)"}
        keep |= {"poly2 FIX+inter+gauge", "poly1 FIX + U lr x F/R1", "poly2 FIX+inter+gauge+U"}
        rows = [r for r in rows if r.name in keep]
    return rows


LINEAR_SPEC = DataSpec()
PLANTED_SPEC = DataSpec(n_features=256, mean_l0=4.0, d_sae=256, k=4, quad_frac=0.5)


def held_out(spec: DataSpec, n: int) -> Tensor:
    return SyntheticStream(spec, stream_seed=999).sample(n)


# ---- retraction cost -------------------------------------------------------


def retraction_cost(shapes: list[tuple[int, int]], repeats: int) -> list[dict[str, Any]]:
    """Time the package's retraction hook body (``retract_``) on its own, for a
    U of each shape with Adam state, plain vs projecting Adam's first moment."""
    rows = []
    for d_sae, r1 in shapes:
        for method in ("cholesky_qr", "qr"):
            for project_moments in (False, True):
                holder = nn.Module()
                holder.U = nn.Parameter(qr_retract(torch.randn(d_sae, r1)))
                holder.cfg = SimpleNamespace(  # type: ignore[assignment]
                    stiefel_every_n_steps=1,
                    stiefel_method=method,
                    stiefel_project_moments=project_moments,
                )
                opt = torch.optim.Adam([holder.U], lr=3e-4)
                holder.U.grad = torch.randn_like(holder.U)
                opt.step()  # creates Adam state (and the package retracts U)
                times = []
                for _ in range(repeats):
                    with torch.no_grad():
                        holder.U.add_(1e-4 * torch.randn_like(holder.U))
                    t0 = time.perf_counter()
                    retract_(holder, opt)
                    times.append(time.perf_counter() - t0)
                rows.append(
                    {
                        "shape": f"{d_sae}x{r1}",
                        "method": method,
                        "project_moments": project_moments,
                        "ms": 1000 * statistics.median(times),
                        "ortho": orthogonality_error(holder.U).item(),
                    }
                )
    return rows


# ---- reporting -------------------------------------------------------------


def print_table(title: str, results: list[RunResult], checkpoints: list[int]) -> None:
    print(f"\n=== {title} ===")
    head = f"{'contender':<30}" + "".join(f"{'MSE@' + str(s):>10}" for s in checkpoints)
    head += f"{'EV':>8}{'max|UtU-I|':>12}{'ms/step':>9}  notes"
    print(head)
    print("-" * len(head))
    for r in results:
        line = f"{r.name:<30}" + "".join(f"{r.mse[s]:>10.3f}" for s in checkpoints)
        ortho = "-" if math.isnan(r.ortho) else f"{r.ortho:.1e}"
        line += f"{r.ev[checkpoints[-1]]:>8.4f}{ortho:>12}{r.ms_per_step:>9.1f}  "
        notes = [f"dead {r.extra['dead']:.0%}"]
        if "cond" in r.extra:
            notes.append(f"cond(W_dec) {r.extra['cond']:.1f}")
        notes += [f"{k} {r.extra[k]:+.2f}" for k in ("lambda2", "lambda3") if k in r.extra]
        if "fold_err" in r.extra:
            notes.append(f"fold err {r.extra['fold_err']:.0e}")
        print(line + ", ".join(notes), flush=True)


def run_suite(
    title: str,
    contenders: list[Contender],
    spec: DataSpec,
    steps: int,
    checkpoints: list[int],
    lr: float,
    n_eval: int,
) -> list[RunResult]:
    eval_x = held_out(spec, n_eval)
    results = []
    for c in contenders:
        t0 = time.perf_counter()
        results.append(train(c, spec, steps, checkpoints, lr, eval_x))
        print(f"  [{title}] {c.name}: {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    print_table(f"{title} (lr {lr:g}, {steps} steps of 1024)", results, [*checkpoints, steps])
    return results


def moments_summary(per_seed: list[list[RunResult]], steps: int) -> None:
    print(f"\n=== item 2: plain retraction vs projected moments, {len(per_seed)} seeds ===")
    print(
        f"{'contender':<30}{'final MSE mean':>15}{'(min..max)':>18}{'max|UtU-I|':>12}{'ms/step':>9}"
    )
    for i, first in enumerate(per_seed[0]):
        runs = [results[i] for results in per_seed]
        mses = [r.mse[steps] for r in runs]
        print(
            f"{first.name:<30}{statistics.mean(mses):>15.3f}"
            f"{f'({min(mses):.3f}..{max(mses):.3f})':>18}"
            f"{max(r.ortho for r in runs):>12.1e}"
            f"{statistics.median(r.ms_per_step for r in runs):>9.1f}"
        )


SUITES = ["linear", "lr", "planted", "moments", "retraction"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and contenders")
    parser.add_argument(
        "--suite",
        nargs="+",
        default=None,
        choices=SUITES,
        help="default: all (--quick: all but moments; its rows are in the linear suite)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json", default=None, help="also write all results here")
    args = parser.parse_args(argv)
    if args.suite is None:
        args.suite = [x for x in SUITES if not (args.quick and x == "moments")]
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    report: dict[str, Any] = {}
    quick = args.quick
    n_eval = 4096 if quick else 8192

    if "linear" in args.suite:
        steps, cps = (600, [100, 200, 400]) if quick else (2000, [250, 500, 1000, 1500])
        results = run_suite(
            "linear data", linear_suite(quick), LINEAR_SPEC, steps, cps, 3e-4, n_eval
        )
        report["linear"] = [vars(r) for r in results]
    if "lr" in args.suite:
        steps, cps = (600, [100, 200, 400]) if quick else (1500, [250, 500, 1000])
        results = run_suite("linear data", lr_suite(quick), LINEAR_SPEC, steps, cps, 1e-3, n_eval)
        report["lr"] = [vars(r) for r in results]
    if "planted" in args.suite:
        steps, cps = 3000, [500, 1000, 2000]  # the quadratic pays off after ~2000 steps
        results = run_suite(
            "planted quadratic", planted_suite(quick), PLANTED_SPEC, steps, cps, 3e-4, n_eval
        )
        report["planted"] = [vars(r) for r in results]
    if "moments" in args.suite:
        seeds, steps, cps = ([1, 2], 400, [200]) if quick else ([1, 2, 3], 1000, [250, 500])
        per_seed = [
            run_suite(
                f"linear data, seed {seed}",
                moments_suite(quick),
                replace(LINEAR_SPEC, seed=seed),
                steps,
                cps,
                3e-4,
                n_eval,
            )
            for seed in seeds
        ]
        moments_summary(per_seed, steps)
        report["moments"] = [[vars(r) for r in results] for results in per_seed]
    if "retraction" in args.suite:
        shapes = [(1024, 64)] if quick else [(1024, 64), (16384, 768)]
        rows = retraction_cost(shapes, repeats=20 if quick else 10)
        report["retraction"] = rows
        print("\n=== retraction hook alone (median ms per call) ===")
        for row in rows:
            print(
                f"U {row['shape']:>10}  {row['method']:<12} "
                f"project_moments={row['project_moments']!s:<5}  {row['ms']:8.2f} ms   "
                f"max|UtU-I| {row['ortho']:.1e}"
            )
    print(
        f"\ntotal wall time {time.perf_counter() - start:.0f}s (threads {torch.get_num_threads()})"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
