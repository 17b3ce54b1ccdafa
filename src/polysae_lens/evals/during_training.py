"""Evaluators during a training run: they run with wandb off too, and every
result is kept.

SAELens's ``SAETrainer.fit`` calls its evaluator only inside
``if cfg.logger.log_to_wandb``, so with ``log_to_wandb=False`` the probing and
Wasserstein evaluators attached to a runner never ran, and nothing said so.
:func:`attach_to_trainer` (which :func:`polysae_lens.evals.add_probing_evaluators`
installs on the runner, :func:`install_on_runner`) changes that for one trainer:

The eval cadence
    Every :func:`eval_cadence` = ``wandb_log_frequency * eval_every_n_wandb_logs``
    training steps (SAELens's own; defaults 10 x 100 = 1000): the evaluation
    after the step that makes ``step`` a multiple of it. With wandb on, SAELens
    calls the evaluator; with it off, the plugin calls it at the same point of
    that step (after the optimizer step, before the step's checkpoint). As in
    SAELens, the last step is evaluated only if it falls on the cadence; a run
    with no step on it is warned about when training starts.

Where the results go
    Each evaluation is logged at INFO (logger ``polysae_lens.evals.during_training``,
    one line: the step and the headline metrics) and appended as one JSON line to
    ``evals.jsonl`` beside the checkpoints (``checkpoint_path``, else
    ``output_path``; console only without either): ``{"step", "n_training_samples",
    "time", "metrics"}``. ``step`` counts completed steps (wandb shows the same
    evaluation at ``step - 1``, SAELens's 0-based step index); ``metrics`` holds
    every key the evaluator returned, non-finite values as ``null``.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from sae_lens.config import LanguageModelSAERunnerConfig, LoggingConfig
    from sae_lens.llm_sae_training_runner import LanguageModelSAETrainingRunner
    from sae_lens.training.sae_trainer import SAETrainer

logger = logging.getLogger(__name__)

__all__ = [
    "EVALS_FILENAME",
    "EvalRecorder",
    "RecordingEvaluator",
    "attach_to_trainer",
    "eval_cadence",
    "evals_file_for",
    "install_on_runner",
]

EVALS_FILENAME = "evals.jsonl"
"""One JSON line per evaluation, in the run's checkpoint directory."""

_HEADLINE = re.compile(r"^(probing/mean_f1_k\d+|wasserstein/median|wasserstein/mean)$")
"""Metrics shown in the console line (the paper's summaries)."""


def eval_cadence(logging_cfg: LoggingConfig) -> int:
    """Training steps between evaluations: SAELens's
    ``wandb_log_frequency * eval_every_n_wandb_logs``, used with wandb off too."""
    return int(logging_cfg.wandb_log_frequency * logging_cfg.eval_every_n_wandb_logs)


def evals_file_for(cfg: LanguageModelSAERunnerConfig[Any]) -> Path | None:
    """``evals.jsonl`` in ``checkpoint_path``, else in ``output_path``, else None."""
    for directory in (cfg.checkpoint_path, cfg.output_path):
        if directory is not None:
            return Path(directory) / EVALS_FILENAME
    return None


class EvalRecorder:
    """Logs each evaluation's metrics and appends them to ``path`` (if given)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.n_records = 0

    def record(self, step: int, n_training_samples: int, metrics: Mapping[str, Any]) -> None:
        values = _jsonable_dict(metrics)
        if self.path is not None:
            line = {
                "step": step,
                "n_training_samples": n_training_samples,
                "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "metrics": values,
            }
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Appended and closed per record: a crash later keeps the earlier ones.
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(line, allow_nan=False) + "\n")
        self.n_records += 1
        headline = ", ".join(
            f"{key}={value:.4g}"
            for key, value in values.items()
            if _HEADLINE.match(key) and isinstance(value, (int, float))
        )
        where = (
            f"all {len(values)} metrics in {self.path}" if self.path else f"{len(values)} metrics"
        )
        _log_above_progress_bars(
            "evaluation at step %d (%d training samples): %s (%s)",
            step,
            n_training_samples,
            headline or "no probing / Wasserstein metrics",
            where,
        )


class RecordingEvaluator:
    """An SAETrainer evaluator that records what ``evaluator`` returns (with the
    trainer's step) and returns it unchanged, for wandb when it is on."""

    def __init__(self, evaluator: Any, trainer: SAETrainer[Any, Any], recorder: EvalRecorder):
        self.evaluator = evaluator
        self.trainer = trainer
        self.recorder = recorder

    def __call__(self, sae: Any, data_provider: Any, activation_scaler: Any) -> dict[str, Any]:
        metrics: dict[str, Any] = self.evaluator(sae, data_provider, activation_scaler)
        # Called where SAELens evaluates: n_training_steps is still the 0-based
        # index of the step just taken.
        self.recorder.record(
            self.trainer.n_training_steps + 1, self.trainer.n_training_samples, metrics
        )
        return metrics


def attach_to_trainer(trainer: SAETrainer[Any, Any], evals_file: Path | None) -> None:
    """Record every evaluation of ``trainer`` and, with wandb off, run its evaluator
    at :func:`eval_cadence`. Call before ``trainer.fit()`` (after loading a
    checkpoint). Does nothing for a trainer without an evaluator or one already
    attached."""
    if trainer.evaluator is None or isinstance(trainer.evaluator, RecordingEvaluator):
        return
    recorder = EvalRecorder(evals_file)
    trainer.evaluator = RecordingEvaluator(trainer.evaluator, trainer, recorder)
    every = eval_cadence(trainer.cfg.logger)
    _announce(trainer, every, evals_file)
    if trainer.cfg.logger.log_to_wandb:
        return  # SAELens calls the evaluator itself
    checkpoint_if_needed = getattr(trainer, "_checkpoint_if_needed", None)
    if checkpoint_if_needed is None:
        raise RuntimeError(
            "running evaluators with log_to_wandb=False needs SAETrainer._checkpoint_if_needed "
            "(sae-lens 6.54); this sae-lens has none: install sae-lens >= 6.54, < 7, or log "
            "to wandb."
        )

    def evaluate_then_checkpoint() -> None:
        # fit() calls this right after the place it evaluates when wandb is on,
        # with the same counters, so both paths evaluate the same steps.
        if (trainer.n_training_steps + 1) % every == 0:
            _evaluate(trainer)
        checkpoint_if_needed()

    # The one per-step call of fit() at the point where SAELens evaluates; an
    # instance attribute, so no other trainer is affected.
    trainer._checkpoint_if_needed = evaluate_then_checkpoint  # type: ignore[method-assign]


def install_on_runner(runner: LanguageModelSAETrainingRunner) -> Path | None:
    """Make ``runner`` attach its trainer (:func:`attach_to_trainer`) before
    training; returns the ``evals.jsonl`` path (None: console only)."""
    evals_file = evals_file_for(runner.cfg)
    run_trainer = runner.run_trainer_with_interruption_handling

    def run_trainer_with_evals(trainer: Any) -> Any:
        attach_to_trainer(trainer, evals_file)
        return run_trainer(trainer)

    # run() hands its trainer to this method just before fit(): the seam a runner
    # subclass overrides (CheckpointOnInterruptRunner does); set on this instance
    # only, it works for a stock runner and for subclasses alike.
    runner.run_trainer_with_interruption_handling = run_trainer_with_evals  # type: ignore[method-assign]
    return evals_file


def _evaluate(trainer: SAETrainer[Any, Any]) -> None:
    """What SAELens's ``_run_and_log_evals`` does, minus wandb."""
    assert trainer.evaluator is not None
    trainer.sae.eval()
    try:
        with torch.no_grad():
            trainer.evaluator(trainer.sae, trainer.data_provider, trainer.activation_scaler)
    finally:
        trainer.sae.train()


def _announce(trainer: SAETrainer[Any, Any], every: int, evals_file: Path | None) -> None:
    logging_cfg = trainer.cfg.logger
    total_steps = math.ceil(
        trainer.cfg.total_training_samples / trainer.cfg.train_batch_size_samples
    )
    n_evals = total_steps // every - trainer.n_training_steps // every
    if n_evals <= 0:
        logger.warning(
            "the evaluators will not run: this run ends at step %d, before the first eval at "
            "step %d (wandb_log_frequency %d x eval_every_n_wandb_logs %d). Lower "
            "eval_every_n_wandb_logs (or wandb_log_frequency) to evaluate during training, "
            "or evaluate the saved SAE with `polysae-lens eval`.",
            total_steps,
            (trainer.n_training_steps // every + 1) * every,
            logging_cfg.wandb_log_frequency,
            logging_cfg.eval_every_n_wandb_logs,
        )
        return
    logger.info(
        "evaluators run every %d training steps (%d evaluation(s) in this run)%s; results: %s",
        every,
        n_evals,
        "" if logging_cfg.log_to_wandb else " with wandb off",
        evals_file
        if evals_file is not None
        else "console only (no checkpoint_path or output_path)",
    )


def _log_above_progress_bars(msg: str, *args: Any) -> None:
    """Log at INFO without breaking SAELens's tqdm bar (cleared, then redrawn)."""
    from tqdm import tqdm

    with tqdm.external_write_mode(file=sys.stderr):
        logger.info(msg, *args)


def _jsonable_dict(metrics: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in metrics.items():
        converted = _jsonable(value)
        if converted is not _SKIP:
            out[str(key)] = converted
    return out


_SKIP = object()


def _jsonable(value: Any) -> Any:
    """Strict-JSON value (NaN / inf -> None); ``_SKIP`` for what is not a number,
    string or nesting of them (e.g. histograms)."""
    if isinstance(value, Mapping):
        return _jsonable_dict(value)
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return _SKIP
        value = value.item()
    elif hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()  # numpy scalars
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return _SKIP
