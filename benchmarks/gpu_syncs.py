"""Which calls of one PolySAE training step make the host wait for the GPU.

Runs two warm-up ``SAETrainer`` steps of the order-3 PolySAE at the GPT-2 shape
(``benchmarks/gpu_suite.py``'s), then one step under
``torch.cuda.set_sync_debug_mode("warn")``, in float32 and under bf16 autocast,
and prints each synchronising call once with its count and the package or SAELens
frames that led to it (innermost first). A step that waits on the GPU this way
cannot queue the next kernels ahead, which matters most where a step is many
small kernels.

    python benchmarks/gpu_syncs.py            # on a CUDA machine (< 1 min)

Without a CUDA device there is nothing to observe: it says so and exits with
status 2.
"""

from __future__ import annotations

import argparse
import collections
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_suite

OWN_FRAMES = ("polysae_lens", "sae_lens")


def where(stack: list[traceback.FrameSummary], depth: int = 4) -> str:
    """The innermost ``depth`` frames of this package or SAELens, innermost first."""
    own = [f for f in stack if any(name in f.filename for name in OWN_FRAMES)]
    return " <- ".join(
        f"{Path(f.filename).name}:{f.lineno}:{f.name}" for f in reversed(own[-depth:])
    )


def syncs_in_one_step(trainer: Any, batch: torch.Tensor) -> collections.Counter[str]:
    """Synchronising calls of one ``trainer.step(batch)``, by where they were made."""
    seen: collections.Counter[str] = collections.Counter()

    def record(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
        if "synchronizing" in str(message):
            seen[where(traceback.extract_stack())] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.step(batch)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return seen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(gpu_suite.TIMING_SHAPES), default="gpt2")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"no CUDA device (torch {torch.__version__}): no host syncs to observe")
        return 2
    shape = gpu_suite.TIMING_SHAPES[args.shape]
    for autocast in (False, True):
        sae = gpu_suite.on_device(gpu_suite.poly_training_sae("poly", shape), "cuda")
        trainer = gpu_suite.make_trainer(sae, shape, "cuda", autocast)
        batch = torch.randn(shape.batch, shape.d_in, device="cuda")
        for _ in range(2):
            trainer.step(batch)
        torch.cuda.synchronize()
        seen = syncs_in_one_step(trainer, batch)
        print(f"## {shape.name}, autocast={autocast}: {sum(seen.values())} synchronising calls")
        for frames, n in seen.most_common():
            print(f"{n:4d}  {frames}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
