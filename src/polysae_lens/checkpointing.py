"""Ctrl-C and SIGTERM during ``polysae-lens train``: a resumable checkpoint.

SAELens's runner raises from inside its signal handler, so the interrupt can
land in the middle of an optimizer step (U half updated, not retracted), and on
it saves only the activation store's state and the runner config, into a
directory it never creates: nothing resumable is left. The runner here defers
the first SIGINT/SIGTERM to the end of the current training step, saves what
``--resume_from_checkpoint`` needs (SAE weights, optimizer, scheduler and
trainer counters, activation-store position, runner config) with SAETrainer's
own checkpoint writer, and raises :class:`TrainingInterrupted`. A second signal
aborts at once without saving.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

from sae_lens import LanguageModelSAETrainingRunner
from typing_extensions import override

logger = logging.getLogger(__name__)

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """Training stopped on a signal after a complete step; ``checkpoint`` is the
    saved directory (None without ``checkpoint_path``)."""

    def __init__(self, signum: int, n_samples: int, checkpoint: Path | None) -> None:
        self.signum = signum
        self.n_samples = n_samples
        self.checkpoint = checkpoint
        name = signal.Signals(signum).name
        where = (
            f"checkpoint saved to {checkpoint}; resume with the same flags plus "
            f"--resume_from_checkpoint {checkpoint}"
            if checkpoint is not None
            else "nothing saved (no --checkpoint_path)"
        )
        super().__init__(f"interrupted by {name} after {n_samples} training samples: {where}")


class CheckpointOnInterruptRunner(LanguageModelSAETrainingRunner):
    """SAELens's ``LanguageModelSAETrainingRunner`` that stops on SIGINT/SIGTERM
    between steps and leaves a resumable checkpoint."""

    @override
    def run_trainer_with_interruption_handling(self, trainer: Any) -> Any:
        received: list[int] = []
        original_update = trainer._update_pbar

        def update_then_stop(*args: Any, **kwargs: Any) -> None:
            # Called after every complete step, once the step counters are updated.
            original_update(*args, **kwargs)
            if received:
                raise _Stop()

        trainer._update_pbar = update_then_stop
        with _deferred_signals(received):
            try:
                return trainer.fit()
            except _Stop:
                pass
        raise_interrupted(trainer, self.cfg.checkpoint_path, received[0])


def raise_interrupted(trainer: Any, checkpoint_path: str | Path | None, signum: int) -> NoReturn:
    """After a stopped ``trainer.fit()``: save a checkpoint named after the
    training-sample count under ``checkpoint_path`` (when set) and raise
    :class:`TrainingInterrupted`."""
    checkpoint = None
    if checkpoint_path is not None:
        name = str(trainer.n_training_samples)
        trainer.save_checkpoint(checkpoint_name=name)
        checkpoint = Path(checkpoint_path) / name
    raise TrainingInterrupted(signum, trainer.n_training_samples, checkpoint)


class _Stop(Exception):
    pass


@contextlib.contextmanager
def _deferred_signals(received: list[int]) -> Iterator[None]:
    """Record the first SIGINT/SIGTERM in ``received``; a second one raises
    KeyboardInterrupt at once. The previous handlers are restored on exit."""

    def handler(signum: int, frame: Any) -> None:
        if received:
            raise KeyboardInterrupt
        received.append(signum)
        logger.warning(
            "%s received: stopping after this training step to save a checkpoint "
            "(send it again to abort without saving).",
            signal.Signals(signum).name,
        )

    saved = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    for sig in _SIGNALS:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, previous in saved.items():
            if previous is not None:
                signal.signal(sig, previous)
