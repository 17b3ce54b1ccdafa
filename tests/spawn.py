"""Multi-process launches shared by the distributed tests: ranks spawned from
pytest (gloo) and ``polysae-lens train`` under torchrun."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .lm_fixtures import OFFLINE_ENV


def spawn_ranks(
    target: Callable[..., None],
    args_of_rank: Callable[[int], tuple[Any, ...]],
    world_size: int,
    timeout_s: float,
) -> tuple[list[Any], list[float]]:
    """Start ``world_size`` spawned processes ``target(*args_of_rank(rank))``;
    return them and their exit times (``time.time()``) once all exit. A rank
    still running after ``timeout_s`` is terminated and the test fails."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=args_of_rank(rank)) for rank in range(world_size)]
    for proc in procs:
        proc.start()
    exits: dict[int, float] = {}
    deadline = time.monotonic() + timeout_s
    while len(exits) < len(procs) and time.monotonic() < deadline:
        for rank, proc in enumerate(procs):
            if rank not in exits and not proc.is_alive():
                exits[rank] = time.time()
        time.sleep(0.05)
    alive = [p for p in procs if p.is_alive()]
    for proc in alive:
        proc.terminate()
        proc.join()
    assert not alive, f"{len(alive)} rank(s) still running after {timeout_s} s"
    for proc in procs:
        proc.join()
    return procs, [exits[rank] for rank in range(world_size)]


def run_ranks(
    target: Callable[..., None],
    args_of_rank: Callable[[int], tuple[Any, ...]],
    world_size: int,
    timeout_s: float,
    out_dir: Path,
) -> list[Any]:
    """:func:`spawn_ranks`, every rank exiting 0; then what each rank saved as
    ``out_dir / rank{r}.pt``."""
    procs, _ = spawn_ranks(target, args_of_rank, world_size, timeout_s)
    assert [p.exitcode for p in procs] == [0] * world_size
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


TORCHRUN_ENV = {**OFFLINE_ENV, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
"""Offline, one thread per rank, no progress bars."""


def torchrun_train(
    args: list[str], cwd: Path, nproc: int = 2, timeout_s: float = 300
) -> subprocess.CompletedProcess[str]:
    """``torchrun --nproc-per-node nproc -m polysae_lens train *args``; must exit 0."""
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
         "-m", "polysae_lens", "train", *args],
        capture_output=True, text=True, env={**os.environ, **TORCHRUN_ENV}, cwd=cwd,
        timeout=timeout_s, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result
