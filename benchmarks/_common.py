"""Helpers shared by the benchmark scripts (imported as ``_common``: the
scripts' own folder is on ``sys.path`` when they run or are imported by tests)."""

from __future__ import annotations

import functools
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from unittest import mock

import sae_lens.training.sae_trainer as sae_trainer_module
import torch
from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.config import SAETrainerConfig
from torch import Tensor
from tqdm.auto import tqdm


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


CONTENTION_KINDS = ("busy", "torch")
"""What ``--contended`` runs beside a benchmark: ``busy``, a pure-Python busy loop
(one core taken); ``torch``, another process doing multi-threaded float32 matmuls
with torch's default thread count (a second training job)."""

_CONTENTION_CODE = {
    "busy": "print('ready', flush=True)\nwhile True:\n    pass\n",
    "torch": (
        "import torch\n"
        "a = torch.randn(1024, 1024)\n"
        "print('ready', flush=True)\n"
        "while True:\n"
        "    a = torch.tanh(a @ a)\n"
    ),
}


@contextmanager
def contention(kind: str | None) -> Iterator[subprocess.Popen[str] | None]:
    """Run a competing process of ``kind`` (see CONTENTION_KINDS) for the duration
    of the block and yield it; ``None`` runs nothing (yields None). The process is
    killed on exit, also when the block raises."""
    if kind is None:
        yield None
        return
    if kind not in _CONTENTION_CODE:
        raise ValueError(f"contention kind {kind!r} is not one of {CONTENTION_KINDS}")
    proc = subprocess.Popen(
        [sys.executable, "-c", _CONTENTION_CODE[kind]], stdout=subprocess.PIPE, text=True
    )
    try:
        if proc.stdout is not None:
            proc.stdout.readline()  # "ready": imports done, the loop starts now
        yield proc
    finally:
        proc.kill()
        proc.wait()


def sparsify_fns(
    d_in: int, d_sae: int, k: int, batch: Tensor, autocast: bool = False
) -> dict[str, Callable[[], None]] | None:
    """Training-step and inference callables of EleutherAI sparsify's TopK
    ``SparseCoder`` (fvu + AuxK loss, Adam lr 3e-4, as its trainer does), keyed
    ``train/sparsify`` and ``infer/sparsify``; None if sparsify is not installed."""
    try:
        from sparsify import SparseCoder, SparseCoderConfig  # type: ignore[import-not-found]
    except ImportError:
        return None
    torch.manual_seed(0)
    model = SparseCoder(
        d_in, SparseCoderConfig(num_latents=d_sae, k=k), device=batch.device, dtype=torch.float32
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    dev_type = batch.device.type

    def step() -> None:
        with torch.autocast(dev_type, torch.bfloat16, enabled=autocast):
            out = model(batch)
        (out.fvu + out.auxk_loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def infer() -> None:
        with torch.no_grad(), torch.autocast(dev_type, torch.bfloat16, enabled=autocast):
            model(batch)

    return {"train/sparsify": step, "infer/sparsify": infer}


@dataclass(frozen=True)
class Shape:
    name: str
    d_in: int
    d_sae: int
    k: int
    batch: int
    ranks: tuple[int, int, int]


SHAPES = {
    "gpt2": Shape("gpt2", 768, 16384, 64, 4096, (768, 64, 64)),
    "small": Shape("small", 128, 2048, 32, 1024, (128, 64, 64)),
    "tiny": Shape("tiny", 32, 256, 8, 128, (32, 8, 8)),
}


def quiet_fit(trainer: SAETrainer[Any, Any]) -> Any:
    """``trainer.fit()`` without SAETrainer's progress bar (it would interleave with
    a benchmark's table). Patched for this call only: a module that patched SAELens at
    import would silence the bar for everything imported after it (tests included)."""
    with mock.patch.object(sae_trainer_module, "tqdm", functools.partial(tqdm, disable=True)):
        return trainer.fit()


def make_trainer(
    sae: Any, shape: Shape, autocast: bool, device: str = "cpu"
) -> SAETrainer[Any, Any]:
    cfg = SAETrainerConfig(
        total_training_samples=10**12,
        train_batch_size_samples=shape.batch,
        lr=3e-4,
        lr_end=3e-4,
        autocast=autocast,
        device=device,
    )
    return SAETrainer(cfg=cfg, sae=sae, data_provider=iter(()))


def _wall_seconds(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_times(
    fns: dict[str, Callable[[], Any]],
    repeats: int,
    timer: Callable[[Callable[[], Any]], float] | None = None,
    warmup: int = 1,
) -> dict[str, float]:
    """Median seconds per call, calling the contenders round-robin (``timer(fn)``
    times one call; default the wall clock; ``warmup`` untimed calls each first).

    Each round starts one place further along the list, so every contender
    follows every other equally often: a call right after one that evicts the
    caches (a large TopK step) runs slower, and a fixed order charged that to
    whichever contender came next (at the small shape, 2-3 ms of a 17-20 ms step).
    """
    timer = timer or _wall_seconds
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(timer(fns[name]))
    return {name: statistics.median(values) for name, values in samples.items()}


def topk_training_sae(shape: Shape, device: str = "cpu") -> TopKTrainingSAE:
    """SAELens's TopK SAE as the paper trains it (no decoder-norm rescaling)."""
    cfg = TopKTrainingSAEConfig(
        d_in=shape.d_in,
        d_sae=shape.d_sae,
        k=shape.k,
        rescale_acts_by_decoder_norm=False,
        device=device,
    )
    return TopKTrainingSAE(cfg)


def poly_topk_training_sae(shape: Shape, **fields: Any) -> Any:
    """A TopK PolySAE at ``shape``, package defaults but for ``fields`` (only names
    every version of the package has, so that older trees can be timed too)."""
    from polysae_lens import PolyTopKTrainingSAE, PolyTopKTrainingSAEConfig

    return PolyTopKTrainingSAE(
        PolyTopKTrainingSAEConfig(
            d_in=shape.d_in, d_sae=shape.d_sae, k=shape.k, poly_ranks=shape.ranks, **fields
        )
    )
