"""Bad input gets one error line naming the problem and the fix, before the
expensive part: config values, the model against the flags, CLI paths, NaN input."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from sae_lens import SAE, TrainingSAE
from sae_lens.saes.sae import TrainStepInput

from polysae_lens import cli, preflight

from .lm_fixtures import (
    HOOK,
    OFFLINE_ENV,
    SMALL_CORPUS_WARNINGS,
    TEXTS,
    make_tiny_model,
    save_tiny_hf_model,
    write_text_dataset,
)
from .test_cli import TINY_RUN, outputs

pytestmark = SMALL_CORPUS_WARNINGS

ENV = {**os.environ, **OFFLINE_ENV}


def run_cli(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "polysae_lens", *argv],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
        cwd=cwd,
    )


def error_line(result: subprocess.CompletedProcess[str], command: str) -> str:
    """The last stderr line, which must be the command's one-line error."""
    assert "Traceback" not in result.stderr, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"polysae-lens {command}: error: "), result.stderr
    return line


# ---- config values -------------------------------------------------------------


def saved_poly(tmp_path: Path) -> Path:
    sae = TrainingSAE.from_dict({"architecture": "poly", "d_in": 16, "d_sae": 48, "k": 4})
    path = tmp_path / "sae"
    sae.save_inference_model(str(path))
    return path


@pytest.mark.parametrize("value", ["16", 16.0])
def test_cfg_json_d_in_of_the_wrong_type_names_the_field(tmp_path: Path, value: object) -> None:
    path = saved_poly(tmp_path)
    cfg = json.loads((path / "cfg.json").read_text())
    cfg["d_in"] = value
    (path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"d_in=.*must be a positive integer.*cfg\.json"):
        SAE.load_from_disk(path)


def test_cfg_json_missing_k_is_reported_as_missing(tmp_path: Path) -> None:
    path = saved_poly(tmp_path)
    cfg = json.loads((path / "cfg.json").read_text())
    del cfg["k"]
    (path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"^k is missing .*d_sae=48.*\"k\": N"):
        SAE.load_from_disk(path)


def test_cli_missing_k_is_reported_as_missing() -> None:
    with pytest.raises(cli.CLIError, match=r"k is missing .*-k N"):
        cli.parse_train_args(["--d_in", "16", "--d_sae", "48"])


# ---- the model against the flags (subprocess, local HF model) --------------------


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("local")
    model = save_tiny_hf_model(root / "model")
    data = write_text_dataset(root / "data")
    return [
        "--model_class_name", "AutoModelForCausalLM",
        "--model_name", str(model),
        "--dataset_path", str(data),
        *[a for a in TINY_RUN if a not in ("--model_name", "tiny-offline")],
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--hook_name", "transformer.h.7"],
            r"--hook_name 'transformer\.h\.7' is not a module of model .*: use a module path",
        ),
        (
            ["--hook_name", "transformer.h.0", "--d_in", "24"],
            r"--d_in 24 does not match the width of 'transformer\.h\.0' .* 16: pass --d_in 16\.",
        ),
        (
            ["--hook_name", "transformer.h.0", "--context_size", "64"],
            r"--context_size 64 is longer than .* 32 tokens: pass --context_size 32 or less\.",
        ),
    ],
    ids=["hook", "d_in", "context"],
)
def test_model_mismatch_fails_before_training(
    local_run: list[str], tmp_path: Path, flags: list[str], message: str
) -> None:
    # the later flags win: TINY_RUN's hook is a TransformerLens name
    result = run_cli("train", *local_run, *flags, *outputs(tmp_path))
    assert result.returncode == 2

    assert re.search(message, error_line(result, "train")), result.stderr
    assert "Training SAE" not in result.stderr  # no training step ran
    assert not (tmp_path / "output").exists()


# ---- paths and flags -----------------------------------------------------------


def test_eval_sae_pointing_at_a_file(tmp_path: Path) -> None:
    path = saved_poly(tmp_path)
    result = run_cli("eval", "--sae", str(path / "cfg.json"), "--datasets", "x.csv")
    assert result.returncode == 2
    line = error_line(result, "eval")
    assert f"--sae {path / 'cfg.json'} is a file" in line
    assert f"--sae {path}." in line


def test_train_sae_flag_given_a_path(tmp_path: Path) -> None:
    path = saved_poly(tmp_path)
    with pytest.raises(cli.CLIError, match=r"--sae .* is a path.*--from_pretrained_path"):
        cli.parse_train_args(["--sae", str(path), "--d_in", "16"])


def test_demo_threads_zero() -> None:
    result = run_cli("demo", "--threads", "0", "--quick")
    assert result.returncode == 2
    assert "--threads 0 is not allowed: pass a number of CPU threads >= 1" in error_line(
        result, "demo"
    )


# ---- NaN input -------------------------------------------------------------------


def test_nan_batch_is_named_not_a_retraction_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = make_tiny_model()
    calls = {"n": 0}

    def poison(act: torch.Tensor, hook: object) -> torch.Tensor:
        calls["n"] += 1  # the pre-flight forward and the first buffer stay finite
        return act * float("nan") if calls["n"] > 2 else act

    model.add_perma_hook(HOOK, poison)
    cfg = cli.parse_train_args([*TINY_RUN, *outputs(tmp_path)])
    with caplog.at_level(logging.WARNING), pytest.raises(preflight.NonFiniteInputError) as info:
        cli.run_train(
            cfg, override_model=model, override_dataset=Dataset.from_dict({"text": TEXTS})
        )
    assert "input activations contains NaN" in str(info.value)
    assert "retraction" not in caplog.text


def test_training_step_rejects_non_finite_input() -> None:
    sae = TrainingSAE.from_dict({"architecture": "poly", "d_in": 16, "d_sae": 48, "k": 4})
    x = torch.randn(8, 16)
    x[3, 5] = float("inf")
    step = TrainStepInput(
        sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=0, is_logging_step=False
    )
    with pytest.raises(preflight.NonFiniteInputError, match=r"0 NaN and 1 inf of 128 values"):
        sae.training_forward_pass(step)


@pytest.mark.parametrize(
    "values, bad",
    [
        ([1.0, 2.0, -3.0], False),
        ([3e38, 3e38, 1.0], False),  # finite, though the sum overflows to inf
        ([3e38, 3e38, -3e38, -3e38], False),
        ([float("inf"), float("-inf"), 1.0], True),  # the sum is NaN
        ([float("-inf"), 0.0], True),
        ([float("nan"), 1.0], True),
        ([0.0, 0.0], False),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_check_finite_input_against_isfinite(
    values: list[float], bad: bool, dtype: torch.dtype
) -> None:
    x = torch.tensor(values).to(dtype)  # 3e38 is inf in float16: bad there
    expected_bad = not bool(torch.isfinite(x).all())
    assert expected_bad == (bad or (dtype == torch.float16 and 3e38 in values))
    if expected_bad:
        with pytest.raises(preflight.NonFiniteInputError):
            preflight.check_finite_input(x)
    else:
        preflight.check_finite_input(x)


# ---- fail fast: output paths and wandb, before any model is loaded ----------------


@pytest.fixture
def no_model_loading(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace SAELens's model loader: records calls, then stops the run."""
    from sae_lens import llm_sae_training_runner

    calls: list[str] = []

    def load_model(*args: object, **kwargs: object) -> None:
        calls.append(str(args[1]))
        raise RuntimeError("model loading reached")

    monkeypatch.setattr(llm_sae_training_runner, "load_model", load_model)
    return calls


def train_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert cli.main(["train", *TINY_RUN, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    return err


def test_output_path_is_a_file(
    tmp_path: Path, no_model_loading: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "out").write_text("x")
    err = train_error(["--output_path", str(tmp_path / "out")], capsys)
    assert f"--output_path {tmp_path / 'out'} is a file" in err
    assert no_model_loading == []


def test_output_path_not_empty_needs_overwrite(
    tmp_path: Path, no_model_loading: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "cfg.json").write_text("{}")
    args = ["--output_path", str(out), "--checkpoint_path", str(tmp_path / "ck")]
    err = train_error(args, capsys)
    assert "is not empty: pass another directory, or --overwrite" in err
    assert no_model_loading == []
    with pytest.raises(RuntimeError, match="model loading reached"):
        cli.main(["train", *TINY_RUN, *args, "--overwrite"])
    assert no_model_loading == ["tiny-offline"]


def test_wandb_without_credentials_fails_at_start(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_model_loading: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    err = train_error([*outputs(tmp_path), "--log_to_wandb", "True"], capsys)
    assert "no wandb credentials" in err and "WANDB_MODE=offline" in err
    assert no_model_loading == []
    monkeypatch.setenv("WANDB_MODE", "offline")
    preflight.check_wandb(True)  # offline logging needs no account


def test_demo_out_not_empty_and_eval_output_a_directory(tmp_path: Path) -> None:
    (tmp_path / "old.txt").write_text("x")
    demo = run_cli("demo", "--quick", "--out", str(tmp_path))
    assert demo.returncode == 2
    assert f"--out {tmp_path} is not empty" in error_line(demo, "demo")
    sae = saved_poly(tmp_path / "s")
    ev = run_cli("eval", "--sae", str(sae), "--output", str(tmp_path), "--datasets", "x.csv")
    assert ev.returncode == 2
    assert f"--output {tmp_path} is a directory" in error_line(ev, "eval")
