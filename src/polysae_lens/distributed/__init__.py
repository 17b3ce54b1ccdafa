"""Data-parallel training on torch.distributed, for any SAELens architecture.

Launch ``torchrun --nproc-per-node N -m polysae_lens train <flags>``, or call
:func:`train_distributed` on every rank of a script started by torchrun. For
custom loops, :class:`DistributedSAETrainer` is SAELens's ``SAETrainer`` for
one rank (any data provider yielding the rank's share of each step).

Modules, one job each: :mod:`.process_group` (launch, timeouts, reporting,
fail-fast), :mod:`.data` (dataset shards, per-rank batch size), :mod:`.grads`
(gradient averaging with DistributedDataParallel), :mod:`.stats` (dead-latent
statistics, BatchTopK threshold and activation-normalisation estimates over
all ranks), :mod:`.trainer` (the SAETrainer seam) and :mod:`.runner` (the
LanguageModelSAETrainingRunner seam and :func:`train_distributed`).

Latent sharding of a TopK PolySAE (each rank holds a slice of the latents;
widths that do not fit one device): the model and step function in
:mod:`.sharded` (:func:`shard_poly_sae`, :func:`sharded_train_step`,
:func:`gather_poly_sae`); training on a ``(dp, shard)`` DeviceMesh
(:mod:`.mesh`) through SAETrainer (:mod:`.sharded_trainer`) and the runner,
:func:`train_sharded` (:mod:`.sharded_runner`), behind
``torchrun ... -m polysae_lens train ... --shard_latents S``.

Names are imported on first use, so importing this package stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from polysae_lens.distributed.data import local_batch_size, shard_dataset
    from polysae_lens.distributed.mesh import LatentMesh, init_latent_mesh
    from polysae_lens.distributed.process_group import (
        DistributedConfig,
        DistributedContext,
        init_process_group,
        launched_with_torchrun,
    )
    from polysae_lens.distributed.runner import DistributedTrainingRunner, train_distributed
    from polysae_lens.distributed.sharded import (
        ShardedPolySAE,
        gather_poly_sae,
        shard_poly_sae,
        sharded_adam,
        sharded_train_step,
    )
    from polysae_lens.distributed.sharded_runner import train_sharded
    from polysae_lens.distributed.sharded_trainer import ShardedSAETrainer, ShardedTrainingSAE
    from polysae_lens.distributed.trainer import DistributedSAETrainer

_EXPORTS = {
    "DistributedConfig": "process_group",
    "DistributedContext": "process_group",
    "init_process_group": "process_group",
    "launched_with_torchrun": "process_group",
    "local_batch_size": "data",
    "shard_dataset": "data",
    "DistributedSAETrainer": "trainer",
    "DistributedTrainingRunner": "runner",
    "train_distributed": "runner",
    "ShardedPolySAE": "sharded",
    "gather_poly_sae": "sharded",
    "shard_poly_sae": "sharded",
    "sharded_adam": "sharded",
    "sharded_train_step": "sharded",
    "LatentMesh": "mesh",
    "init_latent_mesh": "mesh",
    "ShardedSAETrainer": "sharded_trainer",
    "ShardedTrainingSAE": "sharded_trainer",
    "train_sharded": "sharded_runner",
}

__all__ = [
    "DistributedConfig",
    "DistributedContext",
    "DistributedSAETrainer",
    "DistributedTrainingRunner",
    "LatentMesh",
    "ShardedPolySAE",
    "ShardedSAETrainer",
    "ShardedTrainingSAE",
    "gather_poly_sae",
    "init_latent_mesh",
    "init_process_group",
    "launched_with_torchrun",
    "local_batch_size",
    "shard_dataset",
    "shard_poly_sae",
    "sharded_adam",
    "sharded_train_step",
    "train_distributed",
    "train_sharded",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
