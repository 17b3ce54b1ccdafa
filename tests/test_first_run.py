"""What a new user sees on a first run: a complete progress bar, no spurious
errors in the log, valid defaults, accurate examples (issue 15)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sae_lens.synthetic import ActivationGenerator, FeatureDictionary, train_toy_sae

from polysae_lens import PolyTopKTrainingSAE, PolyTopKTrainingSAEConfig, cli
from polysae_lens.progress import complete_progress_bar

from .lm_fixtures import save_tiny_hf_model, write_text_dataset
from .test_cli import OFFLINE_ENV, TINY_RUN, outputs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def local_flags(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """``train`` flags for a tiny local HF model and a local text dataset."""
    root = tmp_path_factory.mktemp("local")
    model = save_tiny_hf_model(root / "model")
    data = write_text_dataset(root / "data")
    tiny = [a for a in TINY_RUN if a not in ("--model_name", "tiny-offline")]
    return [
        *tiny,
        "--model_class_name", "AutoModelForCausalLM",
        "--model_name", str(model),
        "--hook_name", "transformer.h.0",
        "--dataset_path", str(data),
    ]  # fmt: skip


def test_local_run_ends_at_100_percent_without_a_trust_remote_code_error(
    local_flags: list[str], tmp_path: Path
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "polysae_lens", "train", *local_flags, *outputs(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, **OFFLINE_ENV},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "1280/1280" in result.stderr  # 40 steps: SAELens's bar stopped at 0/1280
    assert "trust_remote_code" not in result.stderr
    assert "ERROR" not in result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("trained poly SAE")


def test_progress_bar_completes_for_toy_training(capsys: pytest.CaptureFixture[str]) -> None:
    feature_dict = FeatureDictionary(16, 8, seed=0)
    generator = ActivationGenerator(16, firing_probabilities=0.1)
    sae = PolyTopKTrainingSAE(PolyTopKTrainingSAEConfig(d_in=8, d_sae=16, k=2))
    with complete_progress_bar():
        train_toy_sae(sae, feature_dict, generator, training_samples=3 * 1024)
    assert "3072/3072" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], False),  # SAELens's default True only makes datasets log an error
        (["--dataset_trust_remote_code", "True"], True),
    ],
)
def test_trust_remote_code_default(args: list[str], expected: bool) -> None:
    cfg = cli.parse_train_args(["--d_in", "16", "--d_sae", "48", "-k", "4", *args])
    assert cfg.dataset_trust_remote_code is expected


def test_default_poly_ranks_fit_a_narrow_sae() -> None:
    cfg = PolyTopKTrainingSAEConfig(d_in=96, d_sae=80, k=4)
    assert cfg.poly_ranks == (80, 64, 64)
    assert PolyTopKTrainingSAEConfig(d_in=32, d_sae=16, k=4).poly_ranks == (16, 16, 16)
    parsed = cli.parse_train_args(["--d_in", "32", "--d_sae", "16", "-k", "4"])
    assert parsed.sae.poly_ranks == (16, 16, 16)
    torch.manual_seed(0)
    sae = PolyTopKTrainingSAE(cfg)
    assert sae.U.shape == (80, 80)


def test_synthetic_example_does_not_claim_make_demo_runs_it() -> None:
    doc = (ROOT / "examples" / "train_synthetic.py").read_text()
    assert "Run with ``make demo``" not in doc
    assert "python examples/train_synthetic.py" in doc
