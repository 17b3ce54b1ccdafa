"""The ``polysae-lens`` command line: flag parsing, errors, help and offline training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from sae_lens import SAE, TopKTrainingSAEConfig, TrainingSAE
from sae_lens.llm_sae_training_runner import LanguageModelSAETrainingRunner
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

import polysae_lens
from polysae_lens import PolyTopKSAE, PolyTopKTrainingSAEConfig, cli, orthogonality_error

from .lm_fixtures import HOOK, OFFLINE_ENV, SMALL_CORPUS_WARNINGS, TEXTS, make_tiny_model

pytestmark = SMALL_CORPUS_WARNINGS

TINY_SAE = ["--d_in", "16", "--d_sae", "48", "-k", "4"]
# 40 steps of 32 tokens on the tiny model; nothing is downloaded or logged
TINY_RUN = [
    *TINY_SAE,
    "--poly_ranks", "12", "5", "3",
    "--model_name", "tiny-offline",
    "--hook_name", HOOK,
    "--context_size", "16",
    "--is_dataset_tokenized", "False",
    "--training_tokens", "1280",
    "--train_batch_size_tokens", "32",
    "--store_batch_size_prompts", "2",
    "--n_batches_in_buffer", "4",
    "--lr", "1e-2",
    "--lr_end", "1e-2",
    "--log_to_wandb", "False",
    "--verbose", "False",
]  # fmt: skip


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in OFFLINE_ENV.items():
        monkeypatch.setenv(name, value)


def outputs(tmp_path: Path) -> list[str]:
    return [
        "--output_path", str(tmp_path / "output"),
        "--checkpoint_path", str(tmp_path / "checkpoints"),
    ]  # fmt: skip


# ---- parsing -------------------------------------------------------------------


@pytest.mark.parametrize(("text", "value"), [("d_sae/R1", "d_sae/R1"), ("2.5", 2.5)])
def test_c1_lr_scale_flag_takes_a_number_or_the_ratio_rule(text: str, value: object) -> None:
    args = ["--model_name", "gpt2", "--hook_name", "blocks.8.hook_resid_post"]
    args += ["--dataset_path", "some/dataset"]
    cfg = cli.parse_train_args(["--architecture", "poly", *TINY_SAE, "--c1_lr_scale", text, *args])
    assert cfg.sae.c1_lr_scale == value


def test_flags_map_to_config_fields() -> None:
    cfg = cli.parse_train_args(
        [
            "--architecture", "poly",
            *TINY_SAE,
            "--poly_order", "2",
            "--poly_ranks", "16", "4", "4",
            "--lambda2_init", "-0.25",
            "--lambda3_init", "0.75",
            "--stiefel_every_n_steps", "3",
            "--stiefel_project_moments", "True",
            "--aux_loss_coefficient", "0.5",
            "--model_name", "gpt2",
            "--hook_name", "blocks.8.hook_resid_post",
            "--dataset_path", "some/dataset",
            "--context_size", "128",
            "--training_tokens", "5000",
            "--train_batch_size_tokens", "256",
            "--lr", "3e-4",
            "--seed", "7",
            "--log_to_wandb", "False",
            "--wandb_log_frequency", "5",
        ]
    )  # fmt: skip
    sae = cfg.sae
    assert type(sae) is PolyTopKTrainingSAEConfig
    assert (sae.d_in, sae.d_sae, sae.k) == (16, 48, 4)
    assert sae.poly_order == 2
    assert sae.poly_ranks == (16, 4, 4)
    assert (sae.lambda2_init, sae.lambda3_init) == (-0.25, 0.75)
    assert sae.stiefel_every_n_steps == 3
    assert sae.stiefel_project_moments is True
    assert sae.aux_loss_coefficient == 0.5
    assert (cfg.model_name, cfg.hook_name, cfg.dataset_path) == (
        "gpt2",
        "blocks.8.hook_resid_post",
        "some/dataset",
    )
    assert (cfg.context_size, cfg.training_tokens, cfg.train_batch_size_tokens) == (128, 5000, 256)
    assert (cfg.lr, cfg.seed) == (3e-4, 7)
    assert cfg.logger.log_to_wandb is False
    assert cfg.logger.wandb_log_frequency == 5
    # the config the runner builds the SAE from carries the PolySAE fields
    sae_dict = cfg.get_training_sae_cfg_dict()
    assert sae_dict["architecture"] == "poly"
    assert tuple(sae_dict["poly_ranks"]) == (16, 4, 4)


@pytest.mark.parametrize(
    "arch_args",
    [[], ["--architecture", "poly"], ["--architecture=poly"], ["--sae", "poly"]],
    ids=["default", "flag", "equals", "alias"],
)
def test_architecture_defaults_to_poly(arch_args: list[str]) -> None:
    cfg = cli.parse_train_args([*arch_args, *TINY_SAE])
    assert type(cfg.sae) is PolyTopKTrainingSAEConfig
    assert cfg.sae.poly_ranks == (16, 16, 16)  # resolved from d_in


@pytest.mark.parametrize("arch", polysae_lens.ARCHITECTURES)
def test_every_poly_architecture_is_accepted(arch: str) -> None:
    k = ["-k", "4"] if arch in ("poly", "poly_batchtopk", "poly_matryoshka") else []
    cfg = cli.parse_train_args(
        ["--architecture", arch, "--d_in", "16", "--d_sae", "48", *k, "--poly_ranks", "8", "2", "2"]
    )
    assert type(cfg.sae) is SAE_TRAINING_CLASS_REGISTRY[arch][1]
    assert cfg.sae.architecture() == arch
    assert cfg.sae.poly_ranks == (8, 2, 2)


def test_stock_architectures_stay_available() -> None:
    cfg = cli.parse_train_args(["--architecture", "topk", *TINY_SAE])
    assert type(cfg.sae) is TopKTrainingSAEConfig


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--architecture", "nope"], r"unknown architecture 'nope'\. PolySAE architectures: poly,"),
        (["--architecture"], r"--architecture expects a value"),
        (["--poly_ranks", "12", "5"], r"--poly_ranks: expected 3 arguments"),
        (["--poly_ranks", "12", "x", "3"], r"--poly_ranks: invalid int value: 'x'"),
        (["--poly_ranks", "20", "5", "3"], r"R1\)=20 must be <= min\(d_in, d_sae\)=16"),
        (["--poly_ranks", "8", "9", "3"], r"R2 and R3 must be <= R1=8"),
        (["--poly_order", "4"], r"poly_order=4 is not allowed"),
        (["--lambda2_init", "nan"], r"lambda2_init=nan must be a finite number"),
        (["--lambda3_init", "abc"], r"--lambda3_init: invalid float value: 'abc'"),
        (["--stiefel_every_n_steps", "-1"], r"stiefel_every_n_steps=-1 must be an integer >= 1"),
        (["-k", "64"], r"k=64 is larger than d_sae=48"),
        (["--rescale_acts_by_decoder_norm", "True"], r"rescale_acts_by_decoder_norm=True is not"),
    ],
)
def test_bad_values_give_clear_errors(args: list[str], message: str) -> None:
    with pytest.raises(cli.CLIError, match=message):
        cli.parse_train_args([*TINY_SAE, *args])


@pytest.mark.parametrize(
    "args", [["--architecture", "nope"], ["--poly_ranks", "12", "x", "3"], ["--poly_order", "4"]]
)
def test_bad_values_exit_with_one_error_line(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["train", *TINY_SAE, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("polysae-lens train: error: ")
    assert len(err.splitlines()) == 1


def test_unknown_flag_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", *TINY_SAE, "--no_such_flag", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "polysae-lens train" in err
    assert "unrecognized arguments: --no_such_flag 1" in err


@pytest.mark.parametrize("argv", [["train", "--help"], ["train"]], ids=["help", "no-flags"])
def test_train_help_lists_sae_lens_and_poly_flags(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: polysae-lens train")
    for flag in (
        "--poly_order",
        "--poly_ranks",
        "--lambda2_init",
        "--lambda3_init",
        "--stiefel_every_n_steps",
        "--stiefel_project_moments",
        "--training_tokens",
        "--hook_name",
        "--resume_from_checkpoint",
        "--log_to_wandb",
    ):
        assert flag in out, flag
    assert all(arch in out for arch in polysae_lens.ARCHITECTURES)


def test_no_subcommand_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert "usage: polysae-lens" in err
    assert "train" in err


def test_missing_sae_lens_parser_names_the_required_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sae_lens import llm_sae_training_runner

    monkeypatch.delattr(llm_sae_training_runner, "_parse_cfg_args")
    with pytest.raises(RuntimeError, match=r"_parse_cfg_args.*install sae-lens >= 6\.54, < 7"):
        cli.parse_train_args(TINY_SAE)


# ---- training ------------------------------------------------------------------


def held_out_activations() -> torch.Tensor:
    model = make_tiny_model()
    _, cache = model.run_with_cache(model.to_tokens(TEXTS[-8:]), names_filter=[HOOK])
    return cache[HOOK].reshape(-1, 16)


def mse(sae: TrainingSAE[Any], x: torch.Tensor) -> float:
    sae.eval()
    with torch.no_grad():
        return (sae(x) - x).pow(2).sum(-1).mean().item()


def test_train_offline_with_overrides(tmp_path: Path) -> None:
    cfg = cli.parse_train_args([*TINY_RUN, "--seed", "3", *outputs(tmp_path)])
    # run_train seeds torch with --seed, so this is the SAE the runner starts from
    torch.manual_seed(3)
    initial = TrainingSAE.from_dict(cfg.get_training_sae_cfg_dict())
    sigterm_handler = signal.getsignal(signal.SIGTERM)

    sae = cli.run_train(
        cfg,
        override_model=make_tiny_model(),
        override_dataset=Dataset.from_dict({"text": TEXTS}),
    )

    assert signal.getsignal(signal.SIGTERM) is sigterm_handler  # the runner's is removed
    x = held_out_activations()
    assert mse(sae, x) < 0.5 * mse(initial, x)
    assert abs(sae.lambda2.item() + 0.5) > 1e-3
    assert abs(sae.lambda3.item() - 0.5) > 1e-3
    assert orthogonality_error(sae.U).item() <= 1e-5
    loaded = SAE.load_from_disk(tmp_path / "output")
    assert type(loaded) is PolyTopKSAE
    with torch.no_grad():
        assert torch.equal(loaded(x), sae(x))
    line = cli.summarize(sae, cfg)
    assert line.startswith("trained poly SAE, d_in=16, d_sae=48, tokens=1280, order=3")
    assert f"saved to {tmp_path / 'output'}" in line


def test_run_train_is_seeded(tmp_path: Path) -> None:
    def train(seed: int, tag: str) -> dict[str, torch.Tensor]:
        cfg = cli.parse_train_args(
            [*TINY_RUN, "--training_tokens", "160", "--seed", str(seed), *outputs(tmp_path / tag)]
        )
        sae = cli.run_train(
            cfg,
            override_model=make_tiny_model(),
            override_dataset=Dataset.from_dict({"text": TEXTS}),
        )
        return sae.state_dict()

    first, same, other = train(0, "a"), train(0, "b"), train(1, "c")
    assert all(torch.equal(first[name], same[name]) for name in first)
    assert not torch.equal(first["U"], other["U"])


def test_main_trains_through_the_real_loading_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``main`` lets the stock runner load the model by name (the only network
    seam, replaced here) and the dataset by path (a local directory)."""
    from sae_lens import llm_sae_training_runner

    data_dir = tmp_path / "texts"
    data_dir.mkdir()
    (data_dir / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    loaded_models: list[tuple[Any, ...]] = []

    def load_tiny_model(*args: Any, **kwargs: Any) -> Any:
        loaded_models.append(args)
        return make_tiny_model()

    monkeypatch.setattr(llm_sae_training_runner, "load_model", load_tiny_model)
    runners: list[LanguageModelSAETrainingRunner] = []
    real_run = LanguageModelSAETrainingRunner.run

    def run_and_record(self: LanguageModelSAETrainingRunner) -> Any:
        runners.append(self)
        return real_run(self)

    monkeypatch.setattr(LanguageModelSAETrainingRunner, "run", run_and_record)

    argv = ["train", *TINY_RUN, "--dataset_path", str(data_dir), "--streaming", "True"]
    assert cli.main([*argv, *outputs(tmp_path)]) == 0

    assert [args[:2] for args in loaded_models] == [("HookedTransformer", "tiny-offline")]
    assert len(runners) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("trained poly SAE, d_in=16, d_sae=48, tokens=1280, order=3")
    assert "orthogonality_error=" in out[-1]
    saved = json.loads((tmp_path / "output" / "cfg.json").read_text())
    assert saved["architecture"] == "poly"
    assert saved["metadata"]["dataset_path"] == str(data_dir)
    runner_cfg = json.loads((tmp_path / "output" / "runner_cfg.json").read_text())
    assert runner_cfg["sae"]["poly_ranks"] == [12, 5, 3]


def test_python_dash_m_help_runs_in_a_subprocess() -> None:
    env = {**os.environ, **OFFLINE_ENV}
    result = subprocess.run(
        [sys.executable, "-m", "polysae_lens", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: polysae-lens")
    assert "train" in result.stdout
