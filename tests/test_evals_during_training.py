"""Probing / Wasserstein evaluators in a training run (issue 15): a bad dataset
fails before the first training step, and with wandb off the evaluators still run
at the eval cadence, log a console line and write ``evals.jsonl``."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import wandb
from sae_lens import LanguageModelSAETrainingRunner
from sae_lens.training.sae_trainer import SAETrainer

from polysae_lens.checkpointing import CheckpointOnInterruptRunner
from polysae_lens.evals import (
    ProbingDatasetError,
    ProbingEvalConfig,
    ProbingEvaluator,
    ProbingSuite,
    add_probing_evaluators,
)
from polysae_lens.evals.during_training import EVALS_FILENAME
from polysae_lens.preflight import PreflightError

from .lm_fixtures import HOOK, SMALL_CORPUS_WARNINGS, make_runner

TOPICS = Path(__file__).parent / "data" / "topics.csv"
LOGGER = "polysae_lens.evals.during_training"

pytestmark = [*SMALL_CORPUS_WARNINGS, pytest.mark.usefixtures("restore_signal_handlers")]


@pytest.fixture
def trained_steps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts SAETrainer training steps (each one runs the SAE's training forward)."""
    steps: list[int] = []
    real_step = SAETrainer.step

    def counting_step(self: Any, batch: torch.Tensor) -> Any:
        steps.append(self.n_training_steps)
        return real_step(self, batch)

    monkeypatch.setattr(SAETrainer, "step", counting_step)
    return steps


@pytest.fixture
def no_wandb(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("wandb used with log_to_wandb=False")

    for name in ("init", "log", "finish"):
        monkeypatch.setattr(wandb, name, refuse)


def probing_config(*paths: Path) -> ProbingEvalConfig:
    return ProbingEvalConfig(
        datasets=tuple(str(p) for p in paths),
        n_train=8,
        n_test=4,
        context_size=16,
        progress=False,
    )


def read_records(runner: LanguageModelSAETrainingRunner) -> list[dict[str, Any]]:
    assert runner.cfg.checkpoint_path is not None
    path = Path(runner.cfg.checkpoint_path) / EVALS_FILENAME
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---- fail fast -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("csv", "message"),
    [
        (
            "text,label\nThe cat sat.,animals\nA dog ran.,animals\nOwls hunt.,animals\n",
            r"dataset 'bad' has a single class \('animals'\).*two or more labels in column "
            r"'label'",
        ),
        (
            "text,topic\nThe cat sat.,animals\nIt rained.,weather\n",
            r"dataset 'bad': label column 'label' not found; available columns: "
            r"\['text', 'topic'\]\. Set ProbingDataset\.label_column",
        ),
    ],
    ids=["single-class", "missing-label-column"],
)
def test_a_bad_dataset_fails_before_the_first_training_step(
    csv: str, message: str, tmp_path: Path, trained_steps: list[int], no_wandb: None
) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text(csv)
    runner = make_runner(
        LanguageModelSAETrainingRunner, steps=8, log_to_wandb=False, checkpoint_path=tmp_path
    )
    config = probing_config(TOPICS, bad)
    with pytest.raises(ProbingDatasetError, match=message) as raised:
        add_probing_evaluators(runner, config)
        runner.run()  # before the fix: trains, the error waits for the first eval
    assert trained_steps == []
    # The CLI prints a PreflightError as one line and exits with status 2.
    assert isinstance(raised.value, PreflightError)
    assert "\n" not in str(raised.value)
    # An evaluator built by hand checks at construction too.
    with pytest.raises(ProbingDatasetError, match=message):
        ProbingEvaluator(ProbingSuite(runner.model, HOOK, config))


# ---- wandb off -------------------------------------------------------------------


@pytest.mark.parametrize(
    "runner_class", [LanguageModelSAETrainingRunner, CheckpointOnInterruptRunner]
)
def test_with_wandb_off_the_evaluators_run_at_the_cadence_and_are_recorded(
    runner_class: type[LanguageModelSAETrainingRunner],
    tmp_path: Path,
    no_wandb: None,
    trained_steps: list[int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # cadence 4 x 2 = 8 steps: evals after steps 8, 16, 24; the last step (26) is
    # off the cadence and, as in SAELens, not evaluated.
    runner = make_runner(runner_class, steps=26, log_to_wandb=False, checkpoint_path=tmp_path)
    suite = add_probing_evaluators(runner, probing_config(TOPICS))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        runner.run()
    assert len(trained_steps) == 26

    records = read_records(runner)
    assert [r["step"] for r in records] == [8, 16, 24]
    assert [r["n_training_samples"] for r in records] == [8 * 32, 16 * 32, 24 * 32]
    for record in records:
        metrics = record["metrics"]
        for key in ("probing/mean_f1_k1", "probing/topics/f1_k5", "probing/mean_model_f1_all"):
            assert 0 <= metrics[key] <= 1, key
        for key in ("wasserstein/mean", "wasserstein/median", "wasserstein/topics/mean"):
            assert metrics[key] > 0, key
        # the runner's own evaluator (SAELens's run_evals) is recorded too
        assert math.isfinite(metrics["model_performance_preservation"]["ce_loss_with_sae"])
    assert len({r["metrics"]["wasserstein/mean"] for r in records}) == 3  # trained between
    assert (suite.n_collections, suite.n_encodings) == (1, 3)

    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    evals = [line for line in lines if line.startswith("evaluation at step")]
    assert len(evals) == 3
    first = records[0]["metrics"]
    assert evals[0].startswith(
        f"evaluation at step 8 (256 training samples): "
        f"probing/mean_f1_k1={first['probing/mean_f1_k1']:.4g}, "
    )
    assert f"wasserstein/median={first['wasserstein/median']:.4g}" in evals[0]
    assert str(Path(runner.cfg.checkpoint_path or "") / EVALS_FILENAME) in evals[0]
    assert any("every 8 training steps (3 evaluation(s) in this run) with wandb off" in line
               for line in lines)  # fmt: skip


def test_a_run_shorter_than_the_cadence_says_the_evaluators_will_not_run(
    tmp_path: Path, no_wandb: None, caplog: pytest.LogCaptureFixture
) -> None:
    runner = make_runner(
        LanguageModelSAETrainingRunner, steps=6, log_to_wandb=False, checkpoint_path=tmp_path
    )
    add_probing_evaluators(runner, probing_config(TOPICS))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        runner.run()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "evaluators will not run: this run ends at step 6, before the first eval at step 8" in w
        for w in warnings
    ), warnings
    assert not (Path(runner.cfg.checkpoint_path or "") / EVALS_FILENAME).exists()


# ---- wandb on --------------------------------------------------------------------


def test_with_wandb_on_the_logged_evaluations_are_recorded_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    logged: list[tuple[int | None, dict[str, Any]]] = []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: None)
    monkeypatch.setattr(wandb, "finish", lambda *args, **kwargs: None)
    monkeypatch.setattr(
        wandb, "log", lambda data, step=None, **kwargs: logged.append((step, dict(data)))
    )
    runner = make_runner(
        LanguageModelSAETrainingRunner, steps=16, log_to_wandb=True, checkpoint_path=tmp_path
    )
    add_probing_evaluators(runner, probing_config(TOPICS))
    runner.run()
    wandb_evals = [(step, data) for step, data in logged if "wasserstein/mean" in data]
    records = read_records(runner)
    # one evaluation each, not a second run: wandb's 0-based step is step - 1
    assert [step for step, _ in wandb_evals] == [7, 15]
    assert [r["step"] for r in records] == [8, 16]
    for (_, data), record in zip(wandb_evals, records, strict=True):
        assert record["metrics"]["wasserstein/mean"] == data["wasserstein/mean"]
