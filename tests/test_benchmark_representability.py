"""benchmarks/representability.py measures what its table says (tiny sizes, not timed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import representability as bench


def test_quick_run_bounds_every_decoder_by_the_linear_floor_and_the_truth(
    capsys: pytest.CaptureFixture[str],
) -> None:
    mse = bench.main(["--quick", "--steps", "150"])
    out = capsys.readouterr().out
    assert "| poly R2=4 |" in out and "| truth |" in out
    assert mse["truth"] < 1e-8  # the generator reproduces its own samples
    assert mse["linear"] > 1e-3  # the planted interactions are not linear
    # the least-squares floor is below any linear decoder on the same rows
    assert mse["linear"] <= mse["poly order 1"]


def test_best_linear_fit_handles_atoms_that_never_fire() -> None:
    gen = torch.Generator().manual_seed(0)
    z = torch.rand(200, 6, generator=gen)
    z[:, 2] = 0  # a column of zeros, as a rare atom leaves in a short sample
    W = torch.randn(6, 3, generator=gen)
    x = z @ W + 0.5
    assert bench.best_linear_mse(z, x) < 1e-12
