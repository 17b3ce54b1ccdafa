"""The CUDA path against the CPU reference (runs only where a CUDA device is present).

Each check of ``benchmarks/gpu_suite.py`` part 1 computes the same step, kernel or
retraction on the device and on the CPU from the same weights and inputs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_suite

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason=f"no CUDA device (torch {torch.__version__}): the CUDA checks need a GPU",
)

PARTS = [
    gpu_suite.check_training_steps,
    gpu_suite.check_inference,
    gpu_suite.check_retraction,
    gpu_suite.check_trainer_steps,
    gpu_suite.check_autocast,
]


@pytest.mark.parametrize("part", PARTS, ids=lambda part: part.__name__)
def test_cuda_matches_cpu(part: object) -> None:
    checks = part("cuda")  # type: ignore[operator]
    assert checks
    failed = [f"{c.name}: {c.error:.2e} > {c.limit:.0e}" for c in checks if not c.ok]
    assert not failed, failed
