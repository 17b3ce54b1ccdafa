"""Rank processes for the latent-sharding tests (importable by spawned workers).

:func:`rank_main` is one of :data:`WORLD_SIZE` gloo ranks: it shards a TopK
PolySAE built by :func:`make_sae` (d_sae = 25: an uneven split, 13 + 12
latents), runs every scenario and saves what it saw. The single-process
reference (a plain PolySAE, no sharding code) is computed by the tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from sae_lens import TrainingSAE

import polysae_lens  # noqa: F401  (registers the PolySAE architectures)

WORLD_SIZE = 2
D_IN = 8
D_SAE = 25
K = 3
RANKS = [6, 4, 2]
BATCH = 16
TRAIN_STEPS = 20
LR = 1e-2


GAUGE_SCALES = (1.0, 0.0)
"""The training run's ``gauge_lr_scale``s: the default gauge step, and off."""


def make_sae(dtype: str, d_in: int = D_IN, gauge_lr_scale: float = 1.0, **cfg: Any) -> Any:
    """A TopK PolySAE of order 3 with every parameter away from its init
    (non-zero biases and lambdas, so every gradient path matters)."""
    torch.manual_seed(0)
    sae = TrainingSAE.from_dict(
        {
            "architecture": "poly",
            "d_in": d_in,
            "d_sae": D_SAE,
            "k": K,
            "poly_ranks": RANKS,
            "apply_b_dec_to_input": True,
            "dtype": dtype,
            "gauge_lr_scale": gauge_lr_scale,
            **cfg,
        }
    )
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in ("b_enc", "b_dec"):
            param = getattr(sae, name)
            param.copy_(0.1 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
        sae.lambda2.fill_(0.7)
        sae.lambda3.fill_(-0.4)
    return sae


def batch(step: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(BATCH, D_IN, generator=torch.Generator().manual_seed(100 + step)).to(dtype)


def far_from_orthonormal() -> torch.Tensor:
    """A full-rank U [D_SAE, R1] with ||U^T U - I|| far above one pass's limit."""
    gen = torch.Generator().manual_seed(7)
    return torch.randn(D_SAE, RANKS[0], generator=gen) * torch.linspace(0.5, 3.0, RANKS[0])


def rank_main(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist

    from polysae_lens.distributed.sharded import (
        gather_poly_sae,
        shard_bounds,
        shard_poly_sae,
        sharded_adam,
        sharded_cholesky_qr_,
        sharded_train_step,
    )

    dist.init_process_group(
        "gloo",
        init_method=f"file://{Path(out_dir) / 'rendezvous'}",
        rank=rank,
        world_size=WORLD_SIZE,
    )
    results: dict[str, Any] = {}
    try:
        # forward and gradients, float64, input with and without a gradient
        for x_grad in (False, True):
            shard = shard_poly_sae(make_sae("float64"), rank, WORLD_SIZE)
            x = batch(0, torch.float64).requires_grad_(x_grad)
            out = shard(x)
            loss = (out.sae_out_BD - x).pow(2).sum(-1).mean()
            loss.backward()
            results[f"grads_{x_grad}"] = {
                "bounds": tuple(shard.bounds),
                "sae_out": out.sae_out_BD.detach(),
                "cols_BK": out.sharded.selection.cols_BK,
                "grads": {n: p.grad.clone() for n, p in shard.named_parameters()},  # type: ignore[union-attr]
                "x_grad": x.grad.clone() if x_grad else None,  # type: ignore[union-attr]
            }
        # a short training run, float32, with the sharded retraction, with
        # and without the gauge step
        for gauge in GAUGE_SCALES:
            shard = shard_poly_sae(make_sae("float32", gauge_lr_scale=gauge), rank, WORLD_SIZE)
            optimizer = sharded_adam(shard, LR)
            steps = [
                sharded_train_step(shard, optimizer, batch(s, torch.float32))
                for s in range(TRAIN_STEPS)
            ]
            results[f"train_{gauge}"] = {
                "losses": [s.loss for s in steps],
                "passes": [s.retraction_passes for s in steps],
                "replicated": {
                    n: getattr(shard, n).detach().clone() for n in ("b_dec", "C1", "C2")
                },
                "gauge_moments": {
                    key: value.clone() if isinstance(value, torch.Tensor) else value
                    for key, value in optimizer.state[shard.U].items()
                    if key.startswith("gauge_")
                },
                "state": gather_poly_sae(shard),
            }
        # the retraction alone, far from the manifold (two passes)
        bounds = shard_bounds(D_SAE, WORLD_SIZE, rank)
        U_rows = far_from_orthonormal()[bounds.start : bounds.stop].clone()
        passes = sharded_cholesky_qr_(U_rows)
        results["retract"] = {"passes": passes, "U_rows": U_rows}
    finally:
        dist.destroy_process_group()
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
