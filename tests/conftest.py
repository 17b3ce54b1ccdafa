"""Shared fixtures: tiny PolySAEs of every variant, with non-trivial weights."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from sae_lens import TrainingSAE

import polysae_lens
from polysae_lens import qr_retract

D_IN = 16
D_SAE = 48
RANKS = (12, 5, 3)
K = 4

ALL_ARCHS = polysae_lens.ARCHITECTURES

# The test tensors are tiny: one thread avoids OpenMP spin-waits that make tiny
# ops hundreds of times slower when another process shares the two cores.
torch.set_num_threads(1)


def sae_cfg_dict(arch: str, order: int = 3, **overrides: Any) -> dict[str, Any]:
    """A tiny config dict for ``arch`` (any PolySAE architecture)."""
    cfg: dict[str, Any] = {
        "architecture": arch,
        "d_in": D_IN,
        "d_sae": D_SAE,
        "poly_order": order,
        "poly_ranks": list(RANKS),
    }
    if arch in ("poly", "poly_batchtopk", "poly_matryoshka"):
        cfg["k"] = K
    if arch == "poly_matryoshka":
        cfg["matryoshka_widths"] = [16, 32, D_SAE]
    cfg.update(overrides)
    return cfg


@torch.no_grad()
def randomize_(sae: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter a non-trivial value, keeping U orthonormal and
    thresholds positive, so tests exercise biases, thresholds and lambdas."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in sae.named_parameters():
        noise = torch.randn(param.shape, generator=gen).to(param.dtype)
        if name in ("threshold",):
            param.copy_(0.05 + 0.1 * noise.abs())
        elif name == "U":
            param.copy_(qr_retract(param.float() + 0.1 * noise.float()).to(param.dtype))
        elif name.startswith("lambda"):
            param.add_(0.2 * noise)
        elif name in ("b_enc", "b_gate", "b_mag", "b_dec", "r_mag"):
            param.copy_(0.1 * noise)
        else:
            param.add_(0.05 * noise * param.float().std().to(param.dtype))
    if hasattr(sae, "topk_threshold"):
        sae.topk_threshold.fill_(0.05)
    return sae


def make_training_sae(
    arch: str, order: int = 3, dtype: str = "float32", seed: int = 0, **overrides: Any
) -> TrainingSAE[Any]:
    torch.manual_seed(seed)
    sae = TrainingSAE.from_dict(sae_cfg_dict(arch, order, dtype=dtype, **overrides))
    randomize_(sae, seed)
    return sae


def activations(n: int = 32, seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=gen).to(dtype)


@pytest.fixture(params=ALL_ARCHS)
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def restore_signal_handlers() -> Iterator[None]:
    """SAELens's runners install SIGINT/SIGTERM handlers and never remove them."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)
