"""Data-parallel training throughput: tokens/s on 1 and N ranks, and the
share of an N-rank step spent communicating.

Every rank trains the same SAE (``DistributedSAETrainer``) on in-memory random
activations, so the language model is out of the picture: this measures the
SAE step and its gradient all-reduce. The 1-rank row is a plain SAELens
``SAETrainer`` (no distributed code). The communication share is
``1 - t_local / t_dp``, where ``t_local`` is the same N-rank run with a DDP
comm hook that skips the gradient all-reduce (everything else unchanged):
the time the all-reduce adds to a step, waiting included.

    python benchmarks/distributed.py                      # CPU, gloo, 2 ranks
    python benchmarks/distributed.py --quick              # seconds: a smoke run
    python benchmarks/distributed.py --device cuda --ranks 8 --d-in 768 --d-sae 16384 \\
        --batch 4096 --steps 50                           # one node, nccl

On CPU the ranks split the cores (``--threads`` per rank, default
cores / ranks; the 1-rank row uses ranks x threads), so the speedup shows what
data parallelism buys on the same machine.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

ARCHITECTURES: dict[str, dict[str, Any]] = {
    "poly": {"architecture": "poly"},  # default ranks: R1 = d_in, R2 = R3 = min(64, d_in)
    "topk": {"architecture": "topk"},
    "batchtopk": {"architecture": "batchtopk"},
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--architectures", nargs="+", default=["poly", "topk"])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument(
        "--device", default="cpu", help="cpu (gloo) or cuda (nccl, one GPU per rank)"
    )
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("-k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1024, help="global tokens per step")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per rank")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, a few steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.d_in, args.d_sae, args.k, args.batch, args.steps, args.warmup = 32, 256, 8, 128, 3, 1
    for name in args.architectures:
        if name not in ARCHITECTURES:
            parser.error(f"unknown architecture {name!r}; choose from {', '.join(ARCHITECTURES)}")
    if args.batch % args.ranks:
        parser.error(f"--batch {args.batch} is not divisible by --ranks {args.ranks}")
    if args.device.startswith("cuda") and torch.cuda.device_count() < args.ranks:
        parser.error(f"--ranks {args.ranks} needs as many GPUs; found {torch.cuda.device_count()}")
    if args.threads is None:
        args.threads = max(1, (os.cpu_count() or 1) // args.ranks)
    return args


def make_sae(args: argparse.Namespace, name: str) -> Any:
    from sae_lens import TrainingSAE

    import polysae_lens  # noqa: F401  (registers the PolySAE architectures)

    torch.manual_seed(0)
    cfg = {"d_in": args.d_in, "d_sae": args.d_sae, "k": args.k, **ARCHITECTURES[name]}
    return TrainingSAE.from_dict(cfg)


def trainer_cfg(args: argparse.Namespace, device: str) -> Any:
    from sae_lens.config import SAETrainerConfig

    return SAETrainerConfig(
        total_training_samples=(args.warmup + args.steps) * args.batch,
        train_batch_size_samples=args.batch,
        lr=3e-4,
        lr_end=3e-4,
        device=device,
    )


class _TimedBatches:
    """Cycles through a few pre-made batches; records when each step starts."""

    def __init__(self, n_rows: int, d_in: int, device: str) -> None:
        gen = torch.Generator().manual_seed(0)
        self.pool = [torch.randn(n_rows, d_in, generator=gen).to(device) for _ in range(4)]
        self.starts: list[float] = []
        self.device = device

    def __iter__(self) -> _TimedBatches:
        return self

    def __next__(self) -> torch.Tensor:
        _sync(self.device)
        self.starts.append(time.perf_counter())
        return self.pool[len(self.starts) % len(self.pool)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed_fit(trainer: Any, data: _TimedBatches, args: argparse.Namespace) -> float:
    """Seconds for the timed steps (after the warm-up)."""
    trainer.fit()
    _sync(data.device)
    return time.perf_counter() - data.starts[args.warmup]


def single_process(args: argparse.Namespace, name: str) -> float:
    from sae_lens.training.sae_trainer import SAETrainer

    torch.set_num_threads(args.threads * args.ranks)
    device = "cuda" if args.device.startswith("cuda") else "cpu"
    sae = make_sae(args, name).to(device)
    data = _TimedBatches(args.batch, args.d_in, device)
    trainer = SAETrainer(cfg=trainer_cfg(args, device), sae=sae, data_provider=data)
    return _timed_fit(trainer, data, args)


def _skip_allreduce(state, bucket):  # type: ignore[no-untyped-def]
    # (DDP checks hook annotations against its own types: left unannotated)
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def rank_main(rank: int, args: argparse.Namespace, name: str, out_dir: str, local: bool) -> None:
    torch.set_num_threads(args.threads)
    from polysae_lens.distributed import DistributedConfig, DistributedSAETrainer
    from polysae_lens.distributed.process_group import fail_fast, init_process_group

    config = DistributedConfig(
        init_method=f"file://{Path(out_dir) / f'rdv-{name}-{local}'}",
        rank=rank,
        world_size=args.ranks,
        timeout_s=600,
    )
    context = init_process_group(config, "cuda" if args.device.startswith("cuda") else "cpu")
    with fail_fast(context):
        device = str(context.device)
        sae = make_sae(args, name).to(device)
        data = _TimedBatches(args.batch // args.ranks, args.d_in, device)
        trainer = DistributedSAETrainer(
            cfg=trainer_cfg(args, device),
            sae=sae,
            data_provider=data,
            context=context,
            comm_hook=(None, _skip_allreduce) if local else None,
        )
        seconds = _timed_fit(trainer, data, args)
        if rank == 0:
            Path(out_dir, f"{name}-{local}.txt").write_text(str(seconds))


def data_parallel(args: argparse.Namespace, name: str, local: bool) -> float:
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(rank_main, args=(args, name, out_dir, local), nprocs=args.ranks)
        return float(Path(out_dir, f"{name}-{local}.txt").read_text())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import sae_lens.training.sae_trainer as sae_trainer_module
    from tqdm.auto import tqdm

    # SAETrainer's progress bar would interleave with the table (spawned
    # ranks inherit it through the environment)
    sae_trainer_module.tqdm = functools.partial(tqdm, disable=True)  # type: ignore[attr-defined]
    os.environ["TQDM_DISABLE"] = "1"
    backend = "nccl" if args.device.startswith("cuda") else "gloo"
    tokens = args.steps * args.batch
    print(
        f"d_in={args.d_in} d_sae={args.d_sae} k={args.k} batch={args.batch} tokens/step "
        f"(global), {args.steps} timed steps after {args.warmup}; device {args.device}, "
        f"{args.threads} thread(s) per rank, {os.cpu_count()} cores"
    )
    header = f"{'arch':<10} {'ranks':>5} {'backend':>7} {'tokens/s':>12} {'speedup':>8} {'comm share':>11}"
    print(header)
    print("-" * len(header))
    for name in args.architectures:
        t1 = single_process(args, name)
        print(f"{name:<10} {1:>5} {'-':>7} {tokens / t1:>12.0f} {1.0:>8.2f} {'-':>11}", flush=True)
        t_dp = data_parallel(args, name, local=False)
        t_local = data_parallel(args, name, local=True)
        share = max(0.0, 1 - t_local / t_dp)
        print(
            f"{name:<10} {args.ranks:>5} {backend:>7} {tokens / t_dp:>12.0f} "
            f"{t1 / t_dp:>8.2f} {share:>10.0%}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
