"""The benchmarks measure what their tables say they measure (they are not timed here)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from polysae_lens import PolyTopKTrainingSAE, orthogonality_error

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import training_step

TINY = training_step.SHAPES["tiny"]


@pytest.mark.parametrize("contender", training_step.CONTENDERS)
def test_training_contenders_are_configured_as_labelled(contender: str) -> None:
    sae: Any = training_step.build(contender, TINY, training=True)
    if contender == "topk":
        assert not isinstance(sae, PolyTopKTrainingSAE)
        assert sae.cfg.rescale_acts_by_decoder_norm is False
        return
    assert isinstance(sae, PolyTopKTrainingSAE)
    assert sae.sparse_kernels is (contender != "poly_dense")
    assert sae.cfg.stiefel_every_n_steps == (4 if contender == "poly_every4" else 1)
    assert sae.cfg.poly_ranks == TINY.ranks


def test_every4_contender_retracts_only_every_fourth_step() -> None:
    sae: Any = training_step.build("poly_every4", TINY, training=True)
    trainer = training_step.make_trainer(sae, TINY, autocast=False)
    x = torch.randn(TINY.batch, TINY.d_in)
    errors = []
    for _ in range(4):
        trainer.step(x)
        errors.append(orthogonality_error(sae.U).item())
    assert [e <= 1e-5 for e in errors] == [False, False, False, True]


def test_quick_run_prints_every_row(capsys: pytest.CaptureFixture[str]) -> None:
    training_step.main(["--quick", "--no-memory"])
    out = capsys.readouterr().out
    for row in (
        "encoder addmm (floor)",
        "poly part: retraction",
        "train/poly_every4",
        "infer/poly",
    ):
        assert row in out


def test_gpu_suite_cpu_fallback_runs_its_checks_and_timings(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import gpu_suite

    assert gpu_suite.main(["--device", "cpu", "--quick", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "no CUDA device" in out
    assert "FAIL" not in out
    for row in (
        "poly_matryoshka step gradients (worst)",
        "decode gradient, every latent",
        "max |U^T U - I| after every step",
        "bf16 autocast step loss vs float32",
        "train/polysae",
        "infer/saelens_topk",
    ):
        assert row in out
    assert out.count("## tiny") == 2  # float32 and bf16 autocast


def test_gpu_suite_reports_a_failed_check() -> None:
    import gpu_suite

    assert gpu_suite.Check("x", 2e-3, 1e-3).ok is False
    assert gpu_suite.Check("x", 1e-3, 1e-3).ok is True
