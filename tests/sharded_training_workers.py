"""Rank processes for the latent-sharded training tests (importable by spawned workers).

:func:`mesh_main` is one rank of a ``(dp, shard)`` mesh training a TopK PolySAE
(d_sae = 25: slices of 13 + 12 latents) with ``ShardedSAETrainer`` on rank
``r``'s contiguous rows of deterministic synthetic global batches; it records
the applied gradients of the first step, a hash of its slice after every step,
the gathered SAE and a checkpoint. :func:`runner_main` trains through the
entry points (:func:`train_sharded`, :func:`train_distributed`) on a tiny
language model. The single-process reference (:func:`train_reference`, a plain
``SAETrainer``) shares no sharding code.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import torch
from sae_lens import TrainingSAE
from sae_lens.config import SAETrainerConfig

import polysae_lens  # noqa: F401  (registers the PolySAE architectures)

from . import sharded_workers

D_IN = 16
D_SAE, K, RANKS = sharded_workers.D_SAE, sharded_workers.K, sharded_workers.RANKS
GLOBAL_BATCH = 32
STEPS = 30
MESHES = {"1x2": (1, 2), "2x1": (2, 1), "2x2": (2, 2)}
"""Scenario -> (dp, shards)."""


FIT_STEP = 10
"""The SAE fits its interaction subspace after this step, on the rows of steps 6-10
(before the checkpoint the resume test restarts from)."""


def make_sae() -> TrainingSAE[Any]:
    """A float64 TopK PolySAE of order 3, biases and lambdas away from their init,
    with the subspace fit inside the run."""
    return sharded_workers.make_sae(
        "float64", d_in=D_IN, subspace_fit_step=FIT_STEP, subspace_fit_rows=5 * GLOBAL_BATCH
    )


def trainer_cfg(checkpoint_path: str | None = None) -> SAETrainerConfig:
    # a short dead-latent window, so AuxK (coefficient 1) acts within the run
    return SAETrainerConfig(
        total_training_samples=STEPS * GLOBAL_BATCH,
        train_batch_size_samples=GLOBAL_BATCH,
        lr=3e-3,
        lr_end=3e-4,
        lr_decay_steps=10,
        dead_feature_window=1,
        feature_sampling_window=10,
        n_checkpoints=1 if checkpoint_path else 0,
        checkpoint_path=checkpoint_path,
        device="cpu",
    )


def global_batch(step: int) -> torch.Tensor:
    """Sparse combinations of a fixed dictionary plus noise, [GLOBAL_BATCH, D_IN], float64."""
    dictionary = torch.randn(40, D_IN, generator=torch.Generator().manual_seed(1234))
    gen = torch.Generator().manual_seed(step)
    codes = torch.rand(GLOBAL_BATCH, 40, generator=gen)
    codes = torch.where(codes > 0.9, 3 * codes, torch.zeros_like(codes))
    noise = 0.05 * torch.randn(GLOBAL_BATCH, D_IN, generator=gen)
    return (codes @ dictionary + noise).to(torch.float64)


class Batches:
    """Global batches (``rank`` None) or rank ``rank``'s rows of them, from ``start``."""

    def __init__(self, rank: int | None, world_size: int, start: int = 0) -> None:
        self.rank, self.world_size, self.step = rank, world_size, start

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> torch.Tensor:
        batch = global_batch(self.step)
        self.step += 1
        if self.rank is None:
            return batch
        local = GLOBAL_BATCH // self.world_size
        return batch[self.rank * local : (self.rank + 1) * local]


def first_step_grads(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, Any]:
    """Record the gradients the optimizer's first step applies (into the returned dict)."""
    seen: dict[str, Any] = {}

    def hook(opt: Any, args: Any, kwargs: Any) -> None:
        if not seen:
            for group in opt.param_groups:
                for p in group["params"]:
                    seen[names[id(p)]] = p.grad.detach().clone()

    optimizer.register_step_pre_hook(hook)
    return seen


def train_reference() -> dict[str, Any]:
    """The plain single-process run on the global batches."""
    from sae_lens.training.sae_trainer import SAETrainer

    sae = make_sae()
    trainer = SAETrainer(cfg=trainer_cfg(), sae=sae, data_provider=Batches(None, 1))
    grads = first_step_grads(trainer.optimizer, {id(p): n for n, p in sae.named_parameters()})
    outputs = record_outputs(trainer)
    trainer.fit()
    return {
        "log": last_step_log(trainer, outputs),
        "state": {k: v.detach().clone() for k, v in sae.state_dict().items()},
        "grads": grads,
        "dead": trainer.dead_neurons.clone(),
        "act_freq_scores": trainer.act_freq_scores.clone(),
    }


LOGGED = ("metrics/l0", "sparsity/dead_features", "sparsity/mean_passes_since_fired")
"""Step-log entries the tests compare."""


def record_outputs(trainer: Any) -> list[Any]:
    """The outputs of ``trainer``'s steps, appended as it trains."""
    outputs: list[Any] = []
    step = trainer.step

    def recording(batch: torch.Tensor) -> Any:
        outputs.append(step(batch))
        return outputs[-1]

    trainer.step = recording
    return outputs


def last_step_log(trainer: Any, outputs: list[Any]) -> dict[str, float]:
    """SAETrainer's wandb step log of the last step (as plain numbers)."""
    log = trainer.build_train_step_log_dict(outputs[-1], trainer.n_training_samples)
    return {key: float(log[key]) for key in LOGGED}


def slice_hash(module: torch.nn.Module, names: tuple[str, ...] | None = None) -> str:
    digest = hashlib.sha256()
    for name, tensor in module.named_parameters():
        if names is None or name in names:
            digest.update(name.encode())
            digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _mesh_run(
    rank: int, world_size: int, shards: int, out_dir: Path, name: str, resume: bool
) -> dict[str, Any]:
    from polysae_lens.distributed.mesh import init_latent_mesh
    from polysae_lens.distributed.sharded import REPLICATED, shard_poly_sae
    from polysae_lens.distributed.sharded_trainer import ShardedSAETrainer, ShardedTrainingSAE

    mesh = init_latent_mesh(shards)
    whole = make_sae()
    shard = shard_poly_sae(whole, mesh.shard_rank, mesh.shards, mesh.shard_group)
    sae = ShardedTrainingSAE(shard, whole.cfg)
    checkpoints = str(out_dir / f"ckpt_{name}")
    data = _Hashing(Batches(rank, world_size), shard)
    trainer = ShardedSAETrainer(
        cfg=trainer_cfg(checkpoints if resume else None), sae=sae, data_provider=data, mesh=mesh
    )
    data.trainer = trainer
    grads = first_step_grads(trainer.optimizer, {id(p): n for n, p in shard.named_parameters()})
    outputs = record_outputs(trainer)
    trainer.fit()
    hashes = [*data.hashes, slice_hash(shard)]
    result: dict[str, Any] = {
        "mesh": (mesh.dp_rank, mesh.shard_rank),
        "bounds": tuple(shard.bounds),
        "grads": grads,
        "hashes": hashes,
        "replicated_hash": slice_hash(shard, REPLICATED),
        "dead": trainer.dead_neurons.clone(),
        "dead_counts": data.dead_counts,
        "log": last_step_log(trainer, outputs),
        "act_freq_scores": trainer.act_freq_scores.clone(),
        "n_training_samples": trainer.n_training_samples,
        "l0": sae.cfg.metadata.l0,
        "num_dead": sae.cfg.metadata.num_dead_features,
    }
    gathered = trainer.gather_sae()
    result["gathered"] = None if gathered is None else gathered.state_dict()
    final_dir = out_dir / f"saved_{name}"
    trainer.save_checkpoint("final", base_path=final_dir)
    result["saved"] = str(final_dir / "final")
    if resume:
        result["resumed"] = _resume_run(rank, world_size, shards, mesh, Path(checkpoints))
    return result


def _resume_run(
    rank: int, world_size: int, shards: int, mesh: Any, checkpoints: Path
) -> dict[str, Any]:
    """Re-shard the mid-run checkpoint's SAE and train to the end again."""
    from polysae_lens.distributed.sharded import shard_poly_sae
    from polysae_lens.distributed.sharded_trainer import ShardedSAETrainer, ShardedTrainingSAE

    (checkpoint,) = [p for p in checkpoints.iterdir() if p.is_dir()]
    whole = TrainingSAE.load_from_disk(checkpoint, "cpu")
    shard = shard_poly_sae(whole, mesh.shard_rank, mesh.shards, mesh.shard_group)
    cfg = dataclasses.replace(trainer_cfg(), checkpoint_path=None)
    trainer = ShardedSAETrainer(
        cfg=cfg, sae=ShardedTrainingSAE(shard, whole.cfg), data_provider=iter([]), mesh=mesh
    )
    trainer.load_trainer_state(checkpoint)
    trainer.data_provider = Batches(rank, world_size, trainer.n_training_samples // GLOBAL_BATCH)
    trainer.fit()
    gathered = trainer.gather_sae()
    return {
        "checkpoint": str(checkpoint),
        "state": None if gathered is None else gathered.state_dict(),
        "refusal": _refused_resume(trainer, checkpoint, mesh),
    }


def _refused_resume(trainer: Any, checkpoint: Path, mesh: Any) -> str:
    """The error of loading the checkpoint as if it had been written with another shard count."""
    bad = dataclasses.replace(mesh, shards=mesh.shards + 1)
    trainer.mesh = bad
    try:
        trainer.load_trainer_state(checkpoint)
    except ValueError as e:
        return str(e)
    finally:
        trainer.mesh = mesh
    return ""


class _Hashing:
    """Batches that record a hash of ``module``'s parameters, and the trainer's
    number of dead latents (this slice's), before each step."""

    def __init__(self, inner: Batches, module: torch.nn.Module) -> None:
        self.inner, self.module = inner, module
        self.hashes: list[str] = []
        self.dead_counts: list[int] = []
        self.trainer: Any = None

    def __iter__(self) -> _Hashing:
        return self

    def __next__(self) -> torch.Tensor:
        self.hashes.append(slice_hash(self.module))
        if self.trainer is not None:
            self.dead_counts.append(int(self.trainer.dead_neurons.sum()))
        return next(self.inner)


def mesh_main(rank: int, world_size: int, out_dir: str, names: list[str]) -> None:
    """One rank: train every mesh scenario in ``names``, save what it saw."""
    torch.set_num_threads(1)
    import torch.distributed as dist

    out = Path(out_dir)
    dist.init_process_group(
        "gloo", init_method=f"file://{out / 'rendezvous'}", rank=rank, world_size=world_size
    )
    results: dict[str, Any] = {}
    try:
        for name in names:
            dp, shards = MESHES[name]
            assert dp * shards == world_size
            results[name] = _mesh_run(rank, world_size, shards, out, name, resume=name == "1x2")
    finally:
        dist.destroy_process_group()
    if world_size == 2:
        results["runner"] = runner_main(rank, out)
    torch.save(results, out / f"rank{rank}.pt")


# ---- the entry points on a tiny language model ------------------------------------


def runner_cfg(out: Path, **overrides: Any) -> Any:
    from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig

    from polysae_lens import PolyTopKTrainingSAEConfig

    from .lm_fixtures import HOOK

    fields: dict[str, Any] = {
        "sae": PolyTopKTrainingSAEConfig(d_in=16, d_sae=D_SAE, k=K, poly_ranks=(6, 4, 2)),
        "model_name": "tiny-offline",
        "hook_name": HOOK,
        "dataset_path": "in-memory",
        "is_dataset_tokenized": False,
        "streaming": False,
        "context_size": 16,
        "training_tokens": 12 * 32,
        "train_batch_size_tokens": 32,
        "store_batch_size_prompts": 2,
        "n_batches_in_buffer": 4,
        "lr": 1e-2,
        "lr_end": 1e-2,
        "dead_feature_window": 3,
        "logger": LoggingConfig(log_to_wandb=False),
        "checkpoint_path": str(out / "runner_checkpoints"),
        "n_checkpoints": 1,
        "verbose": False,
        "output_path": None,  # SAELens's default writes ./output
        "seed": 7,
    }
    fields.update(overrides)
    return LanguageModelSAERunnerConfig(**fields)


def runner_main(rank: int, out: Path) -> dict[str, Any]:
    """Train through :func:`train_sharded` (with a mid-run checkpoint, then
    resumed from it) and through :func:`train_distributed` on the same config."""
    import datasets

    from polysae_lens.distributed import DistributedConfig, train_distributed
    from polysae_lens.distributed.sharded_runner import train_sharded

    from .lm_fixtures import TEXTS, make_tiny_model

    def config(tag: str) -> DistributedConfig:
        rendezvous = f"file://{out / f'rendezvous_{tag}'}"
        return DistributedConfig(
            backend="gloo", init_method=rendezvous, rank=rank, world_size=2, timeout_s=60
        )

    def data() -> Any:
        return datasets.Dataset.from_dict({"text": TEXTS})

    def state(sae: Any) -> Any:
        return None if sae is None else {k: v.clone() for k, v in sae.state_dict().items()}

    def initial_sae() -> Any:
        torch.manual_seed(3)
        return TrainingSAE.from_dict(runner_cfg(out).get_training_sae_cfg_dict())

    cfg = runner_cfg(out, output_path=str(out / "runner_output"))
    sharded = train_sharded(
        cfg,
        2,
        config=config("a"),
        override_model=make_tiny_model(),
        override_dataset=data(),
        override_sae=initial_sae(),
    )
    reference = train_distributed(
        runner_cfg(out, checkpoint_path=None),
        config=config("b"),
        override_model=make_tiny_model(),
        override_dataset=data(),
        override_sae=initial_sae(),
    )
    (run_dir,) = (out / "runner_checkpoints").iterdir()
    (checkpoint,) = [p for p in run_dir.iterdir() if p.is_dir()]
    resumed = train_sharded(
        runner_cfg(out, checkpoint_path=None, resume_from_checkpoint=str(checkpoint)),
        2,
        config=config("c"),
        override_model=make_tiny_model(),
        override_dataset=data(),
    )
    return {
        "sharded": state(sharded),
        "reference": state(reference),
        "resumed": state(resumed),
        "checkpoint": str(checkpoint),
        "l0": None if sharded is None else sharded.cfg.metadata.l0,
    }
