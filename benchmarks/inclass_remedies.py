"""Remedies tried against the in-class plateau (issue 13; docs/inclass-plateau.md, second pass).

Same data, trainer and settings as ``benchmarks/inclass.py``; one JSON line per run with the
held-out MSE, ``pair cos`` (:func:`polysae_lens.inclass.interaction_recovery`) and the share
of atoms matched at B and 4B. Variant syntax: ``poly2`` (package defaults), ``gauge``
(``gauge_lr_scale=1``, the default since the fourth pass of docs/inclass-plateau.md),
``topk``, ``oracle``, plus any of ``+gauge=S``, ``+warm=T`` (spectral warm start of the
quadratic subspace after step T), ``+norefit`` (without refitting C2), ``+l2=V``
(``lambda2_init``), ``+gsched=S:T`` (gauge scale S until step T, then the configured one),
``+lr=NAME:M,...`` (parameter NAME's optimizer step times M, e.g. ``+lr=C2:3,lambda2:3``),
``+dfw=N`` (the trainer's ``dead_feature_window``, SAELens's default 1000),
``+cfg=FIELD:VALUE`` (any PolySAE config field: a number, true/false or a word such as
``aux_k:d_in/2``), ``+c2norm`` (C2's Frobenius
norm held at its initial value after every step: lambda2 carries the term's scale),
``+compret`` (U retracted with C1 compensated, ``U = Q R -> Q, C1 -> R C1``, so the
retraction leaves ``U @ C1`` unchanged), ``+release=T`` (after step T, the latents whose
first-order decoder rows have more than half their energy in the row space of the model's
C2 are handed to AuxK: encoder columns x 0.1, counted as silent for ``aux_dead_window``
steps), ``+topkaux=N`` (SAELens's TopK with AuxK's k_aux = N instead of d_in // 2: for ``topk``,
whose AuxK is SAELens's own; PolySAE's is the ``aux_k`` field), ``+c2revive=T:F`` (every T
steps, a quadratic channel whose C2 row is below F times the median row's norm is re-aimed:
median norm, a random direction orthogonal to the other rows, Adam moments cleared),
``+trace=N`` (every N steps, each quadratic channel's output scale and the share of its C2
row outside the true quadratic output space, in the row's ``trace``).

Run from the repository root (one thread, ~1 min per 6000-step run)::

    .venv/bin/python benchmarks/inclass_remedies.py --variants poly2 gauge gauge+gsched=3:500 \
        oracle --seeds 0 1 2 --mult 4
    .venv/bin/python benchmarks/inclass_remedies.py --variants poly2+warm=300 gauge+warm=800
"""

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

sys.path.insert(0, str(Path(__file__).resolve().parent))
import inclass as bench
from _common import scale_steps

from polysae_lens.inclass import (
    InClassConfig,
    build_in_class,
    quadratic_output_cosines,
    row_space_DK,
)

Setup = Callable[[Any, Any], None]


@torch.no_grad()
def spectral_warm_start_(sae: Any, x_BD: torch.Tensor, refit_c2: bool = True) -> dict[str, Any]:
    """Turn U's basis (``U <- U Q, C1 <- Q^T C1``) so its first R2 columns span, and
    diagonalise, the quadratic forms fitted to the linear residual; then refit C2.

    The residual ``x - b_dec - (zU) C1`` is regressed on all products ``a_p a_q`` of
    ``a = zU`` (plus ``a`` and 1); the forms ``M_d`` (one per output dimension) give the
    subspace (top R2 eigenvectors of ``sum_d M_d^2``) and a basis in it (eigenvectors of a
    random mix of the projected ``M_d``).
    """
    was = sae.training
    sae.eval()
    z = sae.encode(x_BD)
    sae.train(was)
    U, C1 = sae.U.detach(), sae.C1.detach()
    R1, R2 = U.shape[1], sae.C2.shape[0]
    a = (z @ U).double()
    r = (x_BD - sae.b_dec.detach() - (z @ U) @ C1).double()
    iu, ju = torch.triu_indices(R1, R1)
    feats = torch.cat([a[:, iu] * a[:, ju], a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
    coef = torch.linalg.lstsq(feats, r).solution[: len(iu)]  # [P, D]
    D = r.shape[1]
    M = torch.zeros(D, R1, R1, dtype=a.dtype)
    offdiag = iu != ju
    M[:, iu, ju] = (coef * torch.where(offdiag, 0.5, 1.0)[:, None]).T
    M[:, ju, iu] = (coef * torch.where(offdiag, 0.5, 1.0)[:, None]).T
    S = torch.einsum("dij,djk->ik", M, M)
    evals, evecs = torch.linalg.eigh(S)
    order = evals.argsort(descending=True)
    V = evecs[:, order]
    Vs = V[:, :R2]
    # basis inside the subspace: joint-diagonalise the projected forms (eigh of a random mix)
    g = torch.randn(D, generator=torch.Generator().manual_seed(0), dtype=a.dtype)
    Ms = torch.einsum("d,ia,dij,jb->ab", g, Vs, M, Vs)
    _, E = torch.linalg.eigh(Ms)
    Q = torch.cat([Vs @ E, V[:, R2:]], 1).float()
    sae.U.copy_(U @ Q)
    sae.C1.copy_(Q.T @ C1)
    if refit_c2:
        a2 = (z @ sae.U.detach())[:, :R2].double() ** 2
        feats2 = torch.cat(
            [a2, (z @ sae.U.detach()).double(), torch.ones(a.shape[0], 1, dtype=a.dtype)], 1
        )
        sol = torch.linalg.lstsq(feats2, r).solution[:R2]
        sae.C2.copy_((sol / sae.lambda2.detach().double()).float())
    return {"top_eigs": evals[order][: R2 + 2].tolist()}


def after_each_step(trainer: Any, fn: Callable[[int], None]) -> None:
    """Call ``fn(t)`` (without autograd) after the trainer's optimizer takes its t-th
    step (from 1); torch's post-hook is global, so other optimizers' steps are ignored."""
    opt = trainer.optimizer
    count = [0]

    @torch.no_grad()
    def post(o: Any, args: Any, kwargs: Any) -> None:
        if o is opt:
            count[0] += 1
            fn(count[0])

    register_optimizer_step_post_hook(post)


def make_setup(at_step: int, source: bench.DataSource, refit: bool, n: int = 8192) -> Setup:
    """Spectral warm start after optimizer step ``at_step`` (first moments cleared)."""

    def setup(trainer: Any, sae: Any) -> None:
        def warm(t: int) -> None:
            if t != at_step:
                return
            x = source.sample(n, source.truth.generator(4242))
            spectral_warm_start_(sae, x, refit)
            # Adam state of U/C1/C2 no longer matches the rotated basis: reset
            for p in (sae.U, sae.C1, sae.C2):
                st = trainer.optimizer.state.get(p)
                if st:
                    st["exp_avg"].zero_()

        after_each_step(trainer, warm)

    return setup


def make_sched(early: float, until: int) -> Setup:
    """Gauge scale ``early`` until optimizer step ``until``, then the configured one."""

    def setup(trainer: Any, sae: Any) -> None:
        base = sae.cfg.gauge_lr_scale
        object.__setattr__(sae.cfg, "gauge_lr_scale", early)

        def restore(t: int) -> None:
            if t == until:
                object.__setattr__(sae.cfg, "gauge_lr_scale", base)

        after_each_step(trainer, restore)

    return setup


def hold_c2_norm(trainer: Any, sae: Any) -> None:
    """After every optimizer step, rescale C2 back to its initial Frobenius norm."""
    norm0 = float(sae.C2.detach().norm())
    after_each_step(trainer, lambda t: sae.C2.mul_(norm0 / sae.C2.norm().clamp_min(1e-12)))


def compensated_retraction(trainer: Any, sae: Any) -> None:
    """Retract U after every step with C1 compensated (``U = Q R -> U <- Q, C1 <- R C1``),
    so the linear term ``U @ C1`` is unchanged by the retraction; run with the package's
    own retraction off (``stiefel_every_n_steps=0``)."""
    object.__setattr__(sae.cfg, "stiefel_every_n_steps", 0)

    def retract(t: int) -> None:
        L = torch.linalg.cholesky(sae.U.T @ sae.U)
        sae.U.copy_(torch.linalg.solve_triangular(L, sae.U.T, upper=False).T)
        sae.C1.copy_(L.T @ sae.C1)

    after_each_step(trainer, retract)


def make_release(at_step: int) -> Setup:
    """After step ``at_step``: the latents standing in for the quadratic term linearly
    (first-order decoder row more than half in the row space of the model's C2) get their
    encoder columns shrunk 10x and are counted silent, so AuxK retrains them at once."""

    def setup(trainer: Any, sae: Any) -> None:
        def release(t: int) -> None:
            if t != at_step:
                return
            rows_FD = sae.W_dec
            basis_DS = torch.linalg.qr(sae.C2.T)[0]
            chosen_F = (rows_FD @ basis_DS).pow(2).sum(1) > rows_FD.pow(2).sum(1) / 2
            sae.W_enc[:, chosen_F] *= 0.1
            sae.steps_since_fired[chosen_F] = sae.cfg.aux_dead_window
            print(f"step {at_step}: released {int(chosen_F.sum())} latents", flush=True)

        after_each_step(trainer, release)

    return setup


def make_c2_revive(every: int, fraction: float) -> Setup:
    """Every ``every`` steps: a quadratic channel r whose output scale ``||C2[r]||`` is
    below ``fraction`` times the median channel's is re-aimed: C2[r] gets the median
    norm in a random direction orthogonal to the other rows, and its Adam moments are
    cleared (as AuxK re-aims dead latents; docs/inclass-plateau.md, ninth pass: the runs
    that miss a quadratic direction hold one channel at ~1/10 of the others' scale)."""

    def setup(trainer: Any, sae: Any) -> None:
        gen = torch.Generator().manual_seed(12345)

        def revive(t: int) -> None:
            if t % every:
                return
            C2_SD = sae.C2
            norms_S = C2_SD.norm(dim=1)
            median = float(norms_S.median())
            for r in torch.nonzero(norms_S < fraction * median).flatten().tolist():
                others_KD = torch.cat([C2_SD[:r], C2_SD[r + 1 :]])
                basis_DK = torch.linalg.qr(others_KD.T)[0]
                v_D = torch.randn(C2_SD.shape[1], generator=gen)
                v_D = v_D - basis_DK @ (basis_DK.T @ v_D)
                C2_SD[r] = median * v_D / v_D.norm()
                state = trainer.optimizer.state.get(sae.C2)
                if state:
                    state["exp_avg"][r] = 0
                    state["exp_avg_sq"][r] = 0
                print(f"step {t}: re-aimed C2 row {r}", flush=True)

        after_each_step(trainer, revive)

    return setup


def channel_probe(truth: Any) -> Callable[[Any, int], dict[str, Any]]:
    """Per quadratic channel r of a PolySAE: ``|lambda2| ||C2[r]||`` (its output scale) and
    the share of C2[r]'s norm outside the true quadratic output space; with the number of
    true directions found (:func:`polysae_lens.inclass.quadratic_output_cosines` >= 0.9)."""
    true_DK = row_space_DK(truth.weights.C2_SD)

    @torch.no_grad()
    def probe(sae: Any, step: int) -> dict[str, Any]:
        C2_SD = sae.C2.detach().double()
        outside_S = (C2_SD - (C2_SD @ true_DK) @ true_DK.T).norm(dim=1) / C2_SD.norm(dim=1)
        cos_S = quadratic_output_cosines(truth.weights, sae)
        return {
            "found": int((cos_S >= bench.QUAD_FOUND_COS).sum()),
            "scale": [round(float(v), 2) for v in C2_SD.norm(dim=1) * abs(float(sae.lambda2))],
            "outside": [round(float(v), 2) for v in outside_S],
        }

    return probe


def make_topk_aux_k(k_aux: int) -> Setup:
    """SAELens's TopK SAE with its AuxK loss taking ``k_aux`` dead latents per row
    (SAELens fixes d_in // 2); the loss is otherwise SAELens's formula."""
    from sae_lens.saes.topk_sae import calculate_topk_aux_acts

    def setup(trainer: Any, sae: Any) -> None:
        def aux_loss(
            sae_in: torch.Tensor,
            sae_out: torch.Tensor,
            hidden_pre: torch.Tensor,
            dead_neuron_mask: Any,
        ) -> torch.Tensor:
            dead = dead_neuron_mask  # (SAELens passes the arguments by name)
            if dead is None or (num_dead := int(dead.sum())) == 0:
                return sae_out.new_tensor(0.0)
            acts = calculate_topk_aux_acts(min(k_aux, num_dead), hidden_pre, dead)
            error = acts @ sae.W_dec - (sae_in - sae_out).detach()
            scale = min(num_dead / k_aux, 1.0)
            return sae.cfg.aux_loss_coefficient * scale * error.pow(2).sum(-1).mean()

        sae.calculate_topk_aux_loss = aux_loss

    return setup


def make_dead_window(window: int) -> Setup:
    """The trainer's ``dead_feature_window`` (steps without firing before AuxK
    treats a latent as dead)."""

    def setup(trainer: Any, sae: Any) -> None:
        trainer.cfg.dead_feature_window = window

    return setup


def combined(setups: list[Setup]) -> Setup:
    def setup(trainer: Any, sae: Any) -> None:
        for one in setups:
            one(trainer, sae)

    return setup


def make_lr_scales(mults: dict[str, float]) -> Setup:
    """Scale the optimizer's step of the named SAE parameters."""

    def setup(trainer: Any, sae: Any) -> None:
        scale_steps(trainer.optimizer, {getattr(sae, n): m for n, m in mults.items()})

    return setup


def config_value(text: str) -> Any:
    """A ``+cfg=FIELD:VALUE`` value: an int, a float, true/false, or else the text."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="+", default=["poly2", "gauge", "poly2+warm=300"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--budget", type=int, default=1500)
    ap.add_argument("--mult", type=int, default=1)
    ap.add_argument("--linear", action="store_true")
    ap.add_argument(
        "--width",
        type=int,
        default=None,
        help="latents of every SAE but the oracle (as inclass.py)",
    )
    ap.add_argument(
        "--data", nargs="+", default=[], metavar="FIELD=VALUE", help="data fields (as inclass.py)"
    )
    args = ap.parse_args(argv)
    try:
        data_cfg = dataclasses.replace(
            InClassConfig(), **bench.data_overrides(InClassConfig(), args.data)
        )
    except ValueError as error:
        ap.error(f"--data: {error}")
    torch.set_num_threads(1)
    out = []
    for seed in args.seeds:
        truth = build_in_class(dataclasses.replace(data_cfg, seed=seed))
        source = bench.DataSource(truth, linear=args.linear)
        eval_x = source.sample(8192, truth.generator(999_999))
        metric = None if args.linear else bench.recovery_metric(truth)
        for v in args.variants:
            kw: dict[str, Any] = {}
            setups: list[Setup] = []
            name = v
            # syntax: base[+gauge=S][+warm=T][+norefit][+l2=V][+gsched=S:T] (module docstring)
            parts = v.split("+")
            kind, order = "poly", 2
            if parts[0] == "topk":
                kind = "topk"
            elif parts[0] == "oracle":
                kind = "oracle"
            elif parts[0] == "gauge":
                kw["gauge_lr_scale"] = 1.0
            elif parts[0] == "poly1":
                order = 1
            warm = None
            refit = True
            trace_every = 0
            for p in parts[1:]:
                k_, _, val = p.partition("=")
                if k_ == "gauge":
                    kw["gauge_lr_scale"] = float(val)
                if k_ == "warm":
                    warm = int(val)
                if k_ == "norefit":
                    refit = False
                if k_ == "l2":
                    kw["lambda2_init"] = float(val)
                if k_ == "gsched":
                    s0, t0_ = val.split(":")
                    setups.append(make_sched(float(s0), int(t0_)))
                if k_ == "cfg":
                    field, _, text = val.partition(":")
                    kw[field] = config_value(text)
                if k_ == "compret":
                    setups.append(compensated_retraction)
                if k_ == "topkaux":
                    setups.append(make_topk_aux_k(int(val)))
                if k_ == "release":
                    setups.append(make_release(int(val)))
                if k_ == "trace":
                    trace_every = int(val)
                if k_ == "c2revive":
                    every_, fraction_ = val.split(":")
                    setups.append(make_c2_revive(int(every_), float(fraction_)))
                if k_ == "c2norm":
                    setups.append(hold_c2_norm)
                if k_ == "dfw":
                    setups.append(make_dead_window(int(val)))
                if k_ == "lr":
                    setups.append(
                        make_lr_scales(
                            {n: float(m) for n, m in (item.split(":") for item in val.split(","))}
                        )
                    )
            if warm is not None:
                setups.append(make_setup(warm, source, refit))
            c = bench.Contender(name, kind, order, tuple(kw.items()))
            setup = combined(setups) if setups else None
            t0 = time.perf_counter()
            steps = args.budget * args.mult
            cps = [b for b in (args.budget, 4 * args.budget) if b < steps]
            res = bench.train(
                c,
                source,
                seed,
                steps,
                cps,
                eval_x,
                setup=setup,
                metric=metric,
                width=args.width,
                probe=channel_probe(truth) if trace_every else None,
                probe_every=trace_every,
            )
            m = res.extra.get("metric", {})
            row = {
                "variant": name,
                "seed": seed,
                "mse": res.mse,
                "pair_cos": {b: round(x["pair_cos"], 3) for b, x in m.items()},
                "matched": {b: round(x["matched"], 3) for b, x in m.items()},
                "ms": round(res.ms_per_step, 2),
                "wall": round(time.perf_counter() - t0),
            }
            if trace_every:
                row["trace"] = res.extra["trace"]
            print(json.dumps(row), flush=True)
            out.append(row)
    return out


if __name__ == "__main__":
    main()
