"""What a PolySAE decoder can represent of the demo's sparse planted interactions (issue 13, item 5).

Decoders are fitted to the demo's sparse-pair data (:mod:`polysae_lens.groundtruth`: 256
atoms in d_in 64, 16 interacting pairs, 16 decoys) **given the true atom activations**: no
encoder, one latent per atom, so only the decoder's expressiveness is measured. Contenders:

- ``linear``: the best free linear decoder ``z W + b`` (least squares on the held-out rows:
  the floor of any linear SAE's decoder);
- ``poly order 1``: PolySAE's ``U @ C1`` decoder trained the same way as the others (a check
  that the training budget reaches the linear floor);
- ``poly R2=r``: the order-2 PolySAE decoder (package init and optimizer hooks, U retracted
  after every step) with ranks (64, r);
- ``truth``: the generator itself, atoms plus planted terms (MSE 0 up to rounding).

Printed: held-out MSE, and the share of what the linear decoder leaves unexplained (the
planted interactions' non-linear part) that each PolySAE decoder explains. The argument of
README "What PolySAE cannot represent" predicts it stays well below 1 when R2 = R1 = d_in
(every latent then reaches the interaction coordinates, so a decoder for all 256 atoms adds
interaction vectors to every co-firing pair) and that a smaller R2 frees the linear term but
leaves only R2 coordinates for the interactions.

    .venv/bin/python benchmarks/representability.py [--quick] [--steps 4000]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from torch import Tensor

from polysae_lens import PolyTopKTrainingSAE, PolyTopKTrainingSAEConfig
from polysae_lens.groundtruth import GroundTruthConfig, build_ground_truth


def best_linear_mse(z_BN: Tensor, x_BD: Tensor) -> float:
    """MSE of the least-squares fit of ``x`` on ``[z, 1]`` (in float64)."""
    f = torch.cat([z_BN, torch.ones(z_BN.shape[0], 1)], 1).double()
    # gelsd: rare atoms can leave columns of zeros, which the default driver mishandles
    sol = torch.linalg.lstsq(f, x_BD.double(), driver="gelsd").solution
    return float((f @ sol - x_BD.double()).pow(2).sum(-1).mean())


def poly_decoder(n: int, d: int, order: int, r2: int) -> Any:
    return PolyTopKTrainingSAE(
        PolyTopKTrainingSAEConfig(d_in=d, d_sae=n, k=1, poly_order=order, poly_ranks=(d, r2, r2))
    )


def fit(model: Any, sample: Any, steps: int, batch: int, lr: float) -> None:
    """Adam on the squared error of ``model.decode(z)`` against ``x`` (true codes given)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        z, x = sample(batch)
        opt.zero_grad()
        (model.decode(z) - x).pow(2).sum(-1).mean().backward()
        opt.step()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few steps")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--ranks", type=int, nargs="+", default=None, help="R2 values")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        cfg = GroundTruthConfig(d_in=16, num_atoms=32, num_interacting_pairs=4, num_decoy_pairs=4)
    else:
        cfg = GroundTruthConfig()
    steps = args.steps or (60 if args.quick else 4000)
    ranks = args.ranks or ([4, 16] if args.quick else [8, 16, 32, 64])
    torch.manual_seed(0)
    truth = build_ground_truth(cfg)
    z_eval, x_eval = truth.sample(512 if args.quick else 50_000)
    with torch.no_grad():
        planted = truth.feature_dict.interaction_part(z_eval)
    energy = float(x_eval.var(0).sum())
    print(
        f"# sparse-pair data: d_in {cfg.d_in}, {cfg.num_atoms} atoms, "
        f"{cfg.num_interacting_pairs} interacting + {cfg.num_decoy_pairs} decoy pairs; "
        f"planted term's share of the centred energy {float(planted.var(0).sum()) / energy:.4f}"
    )
    contenders: dict[str, Any] = {"poly order 1": poly_decoder(cfg.num_atoms, cfg.d_in, 1, 1)}
    contenders |= {f"poly R2={r}": poly_decoder(cfg.num_atoms, cfg.d_in, 2, r) for r in ranks}
    mse: dict[str, float] = {"linear": best_linear_mse(z_eval, x_eval)}
    for name, model in contenders.items():
        torch.manual_seed(1)  # the same training stream for every decoder
        start = time.perf_counter()
        fit(model, truth.sample, steps, 256 if args.quick else 1024, 3e-3)
        with torch.no_grad():
            mse[name] = float((model.decode(z_eval) - x_eval).pow(2).sum(-1).mean())
        print(f"  {name}: fitted in {time.perf_counter() - start:.0f}s", flush=True)
    with torch.no_grad():
        mse["truth"] = float((truth.feature_dict(z_eval) - x_eval).pow(2).sum(-1).mean())
    print(
        f"\n| decoder (true codes given, {steps} steps) | held-out MSE | share of linear's residual explained |"
    )
    print("|---|---|---|")
    for name, value in mse.items():
        share = 1 - value / mse["linear"] if mse["linear"] > 0 else float("nan")
        print(f"| {name} | {value:.5f} | {share:+.3f} |")
    return mse


if __name__ == "__main__":
    main()
