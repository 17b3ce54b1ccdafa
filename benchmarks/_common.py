"""Helpers shared by the benchmark scripts (imported as ``_common``: the
scripts' own folder is on ``sys.path`` when they run or are imported by tests)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor


def scale_steps(optimizer: torch.optim.Optimizer, multipliers: dict[Tensor, float]) -> None:
    """Multiply the optimizer's update of each parameter by its multiplier.

    A pre-step hook snapshots the parameters and a post-step hook rescales the
    update; per-optimizer post hooks run before torch's global ones, so this
    happens before the package's Stiefel retraction. For Adam this is exactly a
    per-parameter learning rate, and it follows whatever schedule the optimizer's
    lr follows.
    """
    items = [(p, m) for p, m in multipliers.items() if m != 1.0]
    if not items:
        return
    before: list[Tensor] = []

    def pre(opt: Any, args: Any, kwargs: Any) -> None:
        before[:] = [p.detach().clone() for p, _ in items]

    @torch.no_grad()
    def post(opt: Any, args: Any, kwargs: Any) -> None:
        for (p, m), p0 in zip(items, before, strict=True):
            p.copy_(p0 + m * (p - p0))

    optimizer.register_step_pre_hook(pre)
    optimizer.register_step_post_hook(post)


def timed_batches(
    sample: Callable[[], Tensor],
    before_step: Callable[[int], None],
    step_times: list[float],
) -> Iterator[Tensor]:
    """Endless ``sample()`` batches for SAETrainer's ``data_provider``.

    ``before_step(step)`` runs before batch ``step`` is drawn (step 0 first);
    the time from handing out one batch to the request for the next (the
    trainer's step alone) is appended to ``step_times``.
    """
    step = 0
    handed_out: float | None = None
    while True:
        if handed_out is not None:
            step_times.append(time.perf_counter() - handed_out)
        before_step(step)
        x = sample()
        step += 1
        handed_out = time.perf_counter()
        yield x
