"""The process group of a data-parallel run: launch detection, set-up with
collective timeouts, the start-up report, fail-fast teardown.

torchrun (``torchrun --nproc-per-node N ...``) starts one process per rank and
describes it in environment variables (``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``); :func:`launched_with_torchrun`
reads them and :func:`init_process_group` joins the group they describe. Every
collective of the run is bounded by :attr:`DistributedConfig.timeout_s`, so a
rank that dies or stalls ends the job with an error instead of a hang.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "nccl", "gloo")
TIMEOUT_ENV = "POLYSAE_LENS_DIST_TIMEOUT_S"
"""Environment variable overriding :attr:`DistributedConfig.timeout_s` (the
``train`` command takes SAELens's flags only, so the timeout travels this way)."""


@dataclass
class DistributedConfig:
    """How a data-parallel run talks between ranks (not what it trains)."""

    backend: str = "auto"
    """``"nccl"`` (GPUs), ``"gloo"`` (CPU) or ``"auto"``: nccl when the SAE's
    device is CUDA, else gloo."""
    timeout_s: float = 1800.0
    """Longest any collective may wait for the other ranks, in seconds. It must
    exceed the longest stretch one rank works alone: rank 0's evaluations and
    checkpoint writes, and the model loading before the first step."""
    init_method: str = "env://"
    """Rendezvous: ``"env://"`` (torchrun's variables), ``"tcp://host:port"`` or
    ``"file:///shared/path"`` (then ``rank`` and ``world_size`` are needed)."""
    rank: int | None = None
    """This process's rank; ``None`` reads ``RANK`` (torchrun sets it)."""
    world_size: int | None = None
    """Number of ranks; ``None`` reads ``WORLD_SIZE`` (torchrun sets it)."""
    local_rank: int | None = None
    """Rank on this node (picks the GPU); ``None`` reads ``LOCAL_RANK``, else ``rank``."""
    bucket_cap_mb: float = 25.0
    """Gradient bucket size of DistributedDataParallel (its default): smaller
    buckets start communicating earlier in the backward pass."""
    find_unused_parameters: bool = False
    """Passed to DistributedDataParallel: needed only by an architecture with
    parameters that some steps leave without a gradient (every SAELens and
    PolySAE architecture gives all of them gradients)."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} is not one of {BACKENDS}.")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s={self.timeout_s} must be positive (seconds).")
        if self.bucket_cap_mb <= 0:
            raise ValueError(f"bucket_cap_mb={self.bucket_cap_mb} must be positive.")
        for name in ("rank", "world_size", "local_rank"):
            value = getattr(self, name)
            if value is not None and value < (1 if name == "world_size" else 0):
                raise ValueError(f"{name}={value} is out of range.")
        if self.init_method != "env://" and (self.rank is None or self.world_size is None):
            raise ValueError(
                f"init_method={self.init_method!r} needs rank and world_size; "
                "only 'env://' reads them from torchrun's environment."
            )

    @classmethod
    def from_env(cls, **overrides: Any) -> DistributedConfig:
        """The defaults, with ``timeout_s`` from :data:`TIMEOUT_ENV` if set."""
        if TIMEOUT_ENV in os.environ and "timeout_s" not in overrides:
            try:
                overrides["timeout_s"] = float(os.environ[TIMEOUT_ENV])
            except ValueError:
                raise ValueError(
                    f"{TIMEOUT_ENV}={os.environ[TIMEOUT_ENV]!r} is not a number of seconds."
                ) from None
        return cls(**overrides)


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in an initialised process group."""

    backend: str
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    """The device this rank trains on (``cuda:<local_rank>`` under nccl)."""
    config: DistributedConfig

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, evaluates and saves."""
        return self.rank == 0

    def describe(self, global_batch_tokens: int | None = None) -> str:
        """The one-line start-up report (backend, world size, rank, shard)."""
        parts = [
            f"backend {self.backend}",
            f"world size {self.world_size}",
            f"rank {self.rank} (local rank {self.local_rank})",
            f"device {self.device}",
            f"data shard {self.rank} of {self.world_size}",
        ]
        if global_batch_tokens is not None:
            parts.append(
                f"{global_batch_tokens // self.world_size} of {global_batch_tokens} tokens per step"
            )
        return "data-parallel run: " + ", ".join(parts)


def launched_with_torchrun() -> bool:
    """Whether this process is one rank of a multi-process launch (torchrun
    or any launcher that sets ``WORLD_SIZE`` > 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when not launched)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    """``RANK`` from the environment (0 when not launched)."""
    return int(os.environ.get("RANK", "0"))


def init_process_group(config: DistributedConfig, device: str | torch.device) -> DistributedContext:
    """Join the process group described by ``config`` (and the environment),
    with ``config.timeout_s`` on every collective; returns this rank's context.

    ``device`` is the training device before rank placement: any CUDA device
    becomes ``cuda:<local_rank>`` (set as current).
    """
    import torch.distributed as dist

    rank = config.rank if config.rank is not None else int(os.environ.get("RANK", "0"))
    world_size = config.world_size if config.world_size is not None else env_world_size()
    local_rank = (
        config.local_rank
        if config.local_rank is not None
        else int(os.environ.get("LOCAL_RANK", str(rank)))
    )
    device = torch.device(device)
    if device.type == "cuda":
        if device.index not in (None, local_rank):
            logger.warning(
                "rank %d trains on cuda:%d (its local rank), not on the configured %s: "
                "each rank of a data-parallel run uses its own GPU.",
                rank,
                local_rank,
                device,
            )
        device = torch.device("cuda", local_rank)
    backend = config.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"backend 'nccl' needs a CUDA device, not {device}; use 'gloo' on CPU.")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # nccl binds the group to this rank's GPU up front
        extra: dict[str, Any] = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(
            backend=backend,
            init_method=config.init_method,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=config.timeout_s),
            **extra,
        )
    context = DistributedContext(
        backend=backend,
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=device,
        config=config,
    )
    return context


def destroy_process_group() -> None:
    """Leave the process group (a no-op if none is initialised)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def fail_fast(
    context: DistributedContext, orderly: tuple[type[BaseException], ...] = ()
) -> Iterator[None]:
    """Run the body; if it raises, log which rank failed and why, abort the
    process group so no collective of this rank waits any longer, and re-raise.

    Exceptions of the ``orderly`` types are raised on every rank at the same
    point (e.g. a stop all ranks agreed on): they leave the group as a success
    does, then propagate.

    The other ranks then fail at their next collective: at once when the
    failed process exits (gloo sees the closed connection; torchrun also stops
    the remaining workers), at the latest after ``timeout_s``. On success the
    ranks meet at a barrier before leaving the group, so rank 0 can still be
    writing the final SAE while the others wait.
    """
    try:
        yield
    except orderly:
        _leave()
        raise
    except BaseException as e:
        logger.error(
            "rank %d of %d failed (%s: %s); ending the data-parallel run.",
            context.rank,
            context.world_size,
            type(e).__name__,
            e,
        )
        _abort()
        raise
    else:
        _leave()


def _leave() -> None:
    """Meet the other ranks, then leave the group."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
    destroy_process_group()


def _abort() -> None:
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    if not dist.is_initialized():
        return
    # Aborting (rather than destroying) the group does not wait for pending
    # collectives; torch has no public name for it yet.
    abort = getattr(c10d, "_abort_process_group", None)
    try:
        if abort is not None:
            abort()
        else:
            dist.destroy_process_group()
    except Exception as e:  # the group may already be broken: nothing left to do
        logger.debug("aborting the process group failed: %s", e)
