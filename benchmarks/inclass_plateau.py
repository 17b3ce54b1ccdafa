"""Why PolySAE plateaus on in-class data (issue 13, item 2): one measurement per cause.

Same data, trainer and settings as ``benchmarks/inclass.py`` (d_in 64, 256
atoms, k 3, R2 8, 30% quadratic energy, lr 3e-3, batch 512, stock
SAETrainer). Each variant changes one thing against the package defaults
(``poly2``), and a probe records along training:

- ``quad_capture``: how much of the true quadratic term the model's quadratic
  *features* can express. On held-out data, the true quadratic term
  ``q = lambda2* (a*_S)^2 C2*`` (a* = z* U*, the true codes) is regressed by
  least squares on the model's linear features ``[a, 1]`` (a = z U, z the
  model's codes), then on ``[a, (a_S)^2, 1]`` (its quadratic features added);
  ``quad_capture`` is the share of what the linear features leave unexplained
  that the quadratic features explain (0: the first R2 columns of U are no use
  for the true quadratic; 1: they express it exactly). It needs no latent
  matching and is invariant to the gauge ``U -> U Q`` restricted to the last
  R1 - R2 columns, but not to rotations mixing the first R2 (the element-wise
  square is basis dependent: that is the point).
- ``subspace``: mean squared canonical correlation between ``a_S`` and ``a*_S``
  (1: the first R2 columns span the true quadratic coordinates, in any basis).
- ``lambda2``, ``|C2|`` (Frobenius), ``quad share`` (the quadratic term's share
  of the reconstruction's centred energy), held-out MSE.
- ``atoms_found``: the share of true atoms some latent's first-order decoder row
  matches at cosine >= 0.9; ``unmatched``: latents whose row matches no atom;
  ``quad_latents``: latents whose row has more than half its energy in the
  true quadratic term's output subspace (the row space of C2*: R2 of d_in
  dimensions, so a random direction has R2 / d_in of its energy there), the
  latents that stand in for the quadratic term linearly, as a linear SAE's do;
  ``quad_unmatched``: those that also match no atom. Also for TopK.

Run: ``.venv/bin/python benchmarks/inclass_plateau.py [--variants ...] [--seeds 0 1]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAETrainer
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import inclass as bench
from _common import scale_steps

from polysae_lens.inclass import InClassConfig, InClassGroundTruth, build_in_class
from polysae_lens.polynomial import decoder_terms


def _lstsq_r2(features_BP: Tensor, target_BD: Tensor) -> float:
    """1 - SSE / SST of the least-squares fit of ``target`` on ``[features, 1]``."""
    f = torch.cat([features_BP, torch.ones(features_BP.shape[0], 1)], 1).double()
    t = target_BD.double()
    sol = torch.linalg.lstsq(f, t).solution
    sse = (f @ sol - t).pow(2).sum()
    sst = (t - t.mean(0)).pow(2).sum()
    return float(1 - sse / sst)


def _mean_cca2(a_BS: Tensor, b_BS: Tensor) -> float:
    """Mean squared canonical correlation of two sets of coordinates."""

    def whiten(m: Tensor) -> Tensor:
        m = (m - m.mean(0)).double()
        q, r = torch.linalg.qr(m)
        return q[:, (r.diagonal().abs() > 1e-9 * r.diagonal().abs().max())]

    s = torch.linalg.svdvals(whiten(a_BS).T @ whiten(b_BS))
    return float((s**2).sum() / b_BS.shape[1])


def make_probe(truth: InClassGroundTruth, n: int = 4096) -> bench.Probe:
    z_true, x = truth.sample(n, truth.generator(424242))
    w = truth.weights
    terms = decoder_terms(z_true, w)
    assert terms.quadratic is not None
    q_BD = terms.quadratic
    r2 = truth.cfg.ranks[1]
    a_true_S = (z_true @ w.U_FR)[:, :r2]
    atoms_ND = nn.functional.normalize(w.U_FR @ w.C1_RD, dim=1)
    assert w.C2_SD is not None
    quad_out_DS = torch.linalg.qr(w.C2_SD.T)[0]  # orthonormal basis of C2*'s row space

    @torch.no_grad()
    def probe(sae: Any, step: int) -> dict[str, float]:
        was = sae.training
        sae.eval()
        z = sae.encode(x)
        mse = float((sae.decode(z) - x).pow(2).sum(-1).mean())
        sae.train(was)
        out = {"mse": mse}
        rows_FD = sae.W_dec.detach()
        cos_FN = nn.functional.normalize(rows_FD, dim=1) @ atoms_ND.T
        unmatched_F = cos_FN.max(1).values < 0.9
        in_quad_F = (rows_FD @ quad_out_DS).pow(2).sum(1) > rows_FD.pow(2).sum(1) / 2
        out["atoms_found"] = float((cos_FN.max(0).values >= 0.9).float().mean())
        out["unmatched"] = float(unmatched_F.sum())
        out["quad_latents"] = float(in_quad_F.sum())
        out["quad_unmatched"] = float((in_quad_F & unmatched_F).sum())
        U = getattr(sae, "U", None)
        if U is None:
            return out
        a = z @ U.detach()
        a_S = a[:, :r2]
        lin = _lstsq_r2(a, q_BD)
        both = _lstsq_r2(torch.cat([a, a_S**2], 1), q_BD)
        out["quad_capture"] = (both - lin) / max(1 - lin, 1e-9)
        out["subspace"] = _mean_cca2(a_S, a_true_S)
        if getattr(sae.cfg, "poly_order", 1) >= 2:
            model_terms = decoder_terms(z, sae.decoder_weights)
            e_lin = float((model_terms.linear - model_terms.linear.mean(0)).pow(2).sum(-1).mean())
            qt = model_terms.quadratic
            assert qt is not None
            e_q = float((qt - qt.mean(0)).pow(2).sum(-1).mean())
            out["quad_share"] = e_q / (e_q + e_lin)
            out["lambda2"] = float(sae.lambda2.detach())
            out["C2_norm"] = float(sae.C2.detach().norm())
        out["z_mean"] = float(z[z > 0].mean()) if (z > 0).any() else 0.0
        return out

    return probe


# ---- variants: one change each against the package defaults -------------------


@torch.no_grad()
def untie_encoder_(sae: Any) -> None:
    """W_enc <- an independent Kaiming-uniform matrix with the same column norms."""
    w = torch.empty_like(sae.W_enc)
    nn.init.kaiming_uniform_(w)
    sae.W_enc.copy_(w * sae.W_enc.norm(dim=0, keepdim=True) / w.norm(dim=0, keepdim=True))


def gauge_steps(
    trainer: SAETrainer, sae: Any, scale: float, betas: tuple[float, float] = (0.9, 0.999)
) -> None:
    """Rotation-aware update of U (experiment): a step along the gauge orbit
    ``U -> U Q, C1 -> Q^T C1`` (which leaves the linear term unchanged) with its
    own Adam normalisation.

    The loss's gradient along the orbit is the skew part of
    ``U^T dL/dU + C1 dL/dC1^T`` (R1 x R1); the linear term's contributions
    cancel in it, so it carries only the interaction terms' signal, which in
    U's own Adam moments is drowned by the linear term's much larger gradient.
    Applied after the package's hooks (a global post hook registered later),
    as ``Q = exp(-lr * scale * m_hat / (sqrt(v_hat) + eps))``, orthogonal, so U
    stays on the manifold.
    """
    from torch.optim.optimizer import register_optimizer_step_post_hook

    opt = trainer.optimizer
    state: dict[str, Any] = {"t": 0}

    def pre(o: Any, args: Any, kwargs: Any) -> None:
        if sae.U.grad is None or sae.C1.grad is None:
            state["gamma"] = None
            return
        M = sae.U.detach().T @ sae.U.grad + sae.C1.detach() @ sae.C1.grad.T
        state["gamma"] = (M - M.T) / 2

    @torch.no_grad()
    def post(o: Any, args: Any, kwargs: Any) -> None:
        if o is not opt or state.get("gamma") is None:
            return
        g = state["gamma"]
        b1, b2 = betas
        state["t"] += 1
        t = state["t"]
        m = state["m"] = b1 * state.get("m", torch.zeros_like(g)) + (1 - b1) * g
        v = state["v"] = b2 * state.get("v", torch.zeros_like(g)) + (1 - b2) * g * g
        step = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + 1e-8)
        lr = opt.param_groups[0]["lr"]
        Q = torch.linalg.matrix_exp(-lr * scale * step)
        sae.U.copy_(sae.U @ Q)
        sae.C1.copy_(Q.T @ sae.C1)

    opt.register_step_pre_hook(pre)
    register_optimizer_step_post_hook(post)


def variant(name: str) -> tuple[bench.Contender, Any]:
    """(contender, setup(trainer, sae) or None) for a variant name."""
    P = bench.Contender
    kw = name.split(":", 1)[1] if ":" in name else ""
    base = name.split(":", 1)[0]
    if base in ("topk",):
        return P("topk", "topk"), None
    if base == "oracle":
        return P("oracle", "oracle", 2), None
    if base == "poly1":
        return P("poly1", "poly", 1), None
    if base == "poly2":
        return P("poly2", "poly", 2), None
    if base == "paper":
        return P("paper", "poly", 2, tuple(bench.paper_kwargs().items())), None
    if base == "lambda2":  # lambda2:<init>
        return P(name, "poly", 2, (("lambda2_init", float(kw)),)), None
    if base == "cfg":  # cfg:FIELD=VALUE, any PolySAE config field (a number)
        field_name, _, number = kw.partition("=")
        value = int(number) if number.lstrip("-").isdigit() else float(number)
        return P(name, "poly", 2, ((field_name, value),)), None
    if base == "proj":
        return P(name, "poly", 2, (("stiefel_project_moments", True),)), None
    if base == "noretract":
        return P(name, "poly", 2, (("stiefel_every_n_steps", 0),)), None
    if base == "gauge":  # gauge:<scale>, or gauge:<scale>+lr (C2, lambda2 steps x10 too)
        gauge_scale, _, plus = kw.partition("+")

        def setup_gauge(trainer: SAETrainer, sae: Any) -> None:
            gauge_steps(trainer, sae, float(gauge_scale))
            if plus == "lr":
                scale_steps(trainer.optimizer, {sae.C2: 10.0, sae.lambda2: 10.0})

        return P(name, "poly", 2), setup_gauge
    if base == "untie":
        return P(name, "poly", 2), lambda trainer, sae: untie_encoder_(sae)
    if base == "lr":  # lr:C2=10,lambda2=10,U=4
        mults = {k: float(v) for k, v in (item.split("=") for item in kw.split(","))}

        def setup(trainer: SAETrainer, sae: nn.Module) -> None:
            scale_steps(trainer.optimizer, {getattr(sae, k): m for k, m in mults.items()})

        return P(name, "poly", 2), setup
    raise ValueError(f"unknown variant {name!r}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=["poly2", "oracle"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--probe-every", type=int, default=500)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = InClassConfig()
    report: dict[str, Any] = {}
    for seed in args.seeds:
        truth = build_in_class(InClassConfig(**{**cfg.to_dict(), "seed": seed}))
        source = bench.DataSource(truth)
        eval_x = source.sample(8192, truth.generator(999_999))
        probe = make_probe(truth)
        for name in args.variants:
            c, setup = variant(name)
            t0 = time.perf_counter()
            res = bench.train(
                c,
                source,
                seed,
                args.steps,
                [args.steps // 4],
                eval_x,
                probe=probe,
                probe_every=args.probe_every,
                setup=setup,
            )
            trace: Any = res.extra["trace"]
            report.setdefault(name, []).append({"seed": seed, "mse": res.mse, "trace": trace})
            print(
                f"\n--- {name} seed {seed} ({time.perf_counter() - t0:.0f}s, "
                f"{res.ms_per_step:.2f} ms/step): MSE {res.mse}",
                flush=True,
            )
            keys = [k for k in trace[0] if k != "step"]
            print("step " + " ".join(f"{k:>12}" for k in keys))
            for row in trace:
                print(f"{int(row['step']):>4} " + " ".join(f"{row[k]:>12.4g}" for k in keys))

    def sd(v: list[float]) -> str:
        return f" ± {statistics.stdev(v):.3f}" if len(v) > 1 else ""

    print("\n=== summary: held-out MSE at B and 4B, mean over seeds ===")
    for name, runs in report.items():
        b = [r["mse"][min(r["mse"])] for r in runs]
        e = [r["mse"][max(r["mse"])] for r in runs]
        print(f"{name:<28} {statistics.mean(b):.3f}{sd(b)}  {statistics.mean(e):.3f}{sd(e)}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
