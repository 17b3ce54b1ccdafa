"""SAELens's training progress bar, completed.

``SAETrainer`` advances its tqdm bar by 100 steps' worth of samples every 100th
step, so a run whose step count is not a multiple of 100 ends short of 100%
(0% under 100 steps), and a resumed run overshoots it. :func:`complete_progress_bar`
sets the bar to the samples trained for the runs the plugin starts
(``polysae-lens train`` and ``demo``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def complete_progress_bar() -> Iterator[None]:
    """While active, every ``SAETrainer`` bar reaches its total at the last step."""
    from sae_lens.training.sae_trainer import SAETrainer

    original = SAETrainer._update_pbar

    def update_pbar(self: Any, step_output: Any, pbar: Any, *args: Any, **kwargs: Any) -> None:
        original(self, step_output, pbar, *args, **kwargs)
        # SAETrainer adds 100 steps' worth at a time, also past the total on a resumed run
        # (it starts from the checkpoint's count): show the samples actually trained.
        done = min(self.n_training_samples, pbar.total)
        if self.n_training_samples >= self.cfg.total_training_samples or pbar.n > done:
            pbar.n = done
            pbar.refresh()

    SAETrainer._update_pbar = update_pbar  # type: ignore[method-assign]
    try:
        yield
    finally:
        SAETrainer._update_pbar = original  # type: ignore[method-assign]
