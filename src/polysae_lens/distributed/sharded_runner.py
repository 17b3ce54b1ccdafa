"""Latent-sharded training of a TopK PolySAE from a ``LanguageModelSAERunnerConfig``:
the Python entry point (:func:`train_sharded`) behind
``torchrun --nproc-per-node N -m polysae_lens train ... --shard_latents S``.

The N ranks form a ``(N / S, S)`` mesh (:mod:`.mesh`): S ranks share one copy
of the SAE, each holding ``d_sae / S`` latents, and the ``N / S`` copies train
data-parallel. The activation source is the data-parallel path's: every rank
runs its own language model and ``ActivationsStore`` over its own shard of the
dataset, ``train_batch_size_tokens / N`` tokens per step; the ranks of a copy
exchange their rows, so ``train_batch_size_tokens`` and ``training_tokens``
keep SAELens's meaning (global tokens per step, total tokens).

The whole SAE is built (or loaded, for ``from_pretrained_path`` and
``resume_from_checkpoint``) on rank 0 alone, on the CPU, and every rank gets
its slice from there (point to point): only the slices go to the devices. Checkpoints and the final
SAE are gathered to rank 0 and written in SAELens's ordinary format.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from polysae_lens.distributed.data import local_batch_size
from polysae_lens.distributed.mesh import LatentMesh, init_latent_mesh, mesh_shape
from polysae_lens.distributed.process_group import (
    DistributedConfig,
    DistributedContext,
    env_world_size,
    fail_fast,
    init_process_group,
)
from polysae_lens.distributed.runner import (
    DistributedTrainingRunner,
    _agreed_across_ranks,
    _on_rank_device,
)

if TYPE_CHECKING:
    from sae_lens.config import HfDataset, LanguageModelSAERunnerConfig
    from sae_lens.saes.sae import TrainingSAE
    from transformer_lens.hook_points import HookedRootModule

    from polysae_lens.distributed.sharded_trainer import ShardedSAETrainer, ShardedTrainingSAE

logger = logging.getLogger(__name__)

SHARDABLE_ARCHITECTURES = ("poly",)
"""Architectures latent sharding supports (the TopK PolySAE)."""


def check_sharding(cfg: LanguageModelSAERunnerConfig[Any], world_size: int, shards: int) -> None:
    """Raise ``ValueError`` (naming the value and the fix) if ``cfg`` cannot
    train latent-sharded over ``shards`` of ``world_size`` ranks. Reads only
    the config: call it before anything loads."""
    from polysae_lens.distributed.sharded import check_shardable_options, shard_bounds

    mesh_shape(world_size, shards)
    local_batch_size(cfg.train_batch_size_tokens, world_size)
    architecture = cfg.sae.architecture()
    if architecture not in SHARDABLE_ARCHITECTURES:
        raise ValueError(
            f"--shard_latents needs architecture 'poly' (the TopK PolySAE), not "
            f"{architecture!r}: other sparsifiers are not implemented sharded; train "
            "it without --shard_latents (data-parallel under torchrun)."
        )
    check_shardable_options(cfg.sae)
    shard_bounds(cfg.sae.d_sae, shards, 0, int(cfg.sae.k))  # type: ignore[attr-defined]
    if cfg.compile_sae:
        raise ValueError(
            "compile_sae=True is not supported with --shard_latents (the sharded step "
            "runs collectives inside the forward pass); leave it False."
        )


def train_sharded(
    cfg: LanguageModelSAERunnerConfig[Any],
    shards: int,
    *,
    config: DistributedConfig | None = None,
    override_model: HookedRootModule | None = None,
    override_dataset: HfDataset | None = None,
    override_sae: TrainingSAE[Any] | None = None,
) -> TrainingSAE[Any] | None:
    """Train one TopK PolySAE with its latents split over ``shards`` ranks
    (and ``world_size / shards`` data-parallel copies); call it on every rank
    of a script started by torchrun.

    Returns the whole trained SAE (on CPU) on rank 0 and ``None`` on the
    others; rank 0 alone logs to wandb and writes checkpoints and
    ``cfg.output_path``. ``override_sae`` is the whole initial SAE (rank 0's
    is used; the other ranks may pass ``None``); ``override_model`` /
    ``override_dataset`` as for SAELens's runner. Configuration errors raise ``ValueError`` before the
    process group is joined; a failure on any rank ends the others at their
    next collective (within ``config.timeout_s``).
    """
    config = config if config is not None else DistributedConfig.from_env()
    world_size = config.world_size if config.world_size is not None else env_world_size()
    check_sharding(cfg, world_size, shards)
    context = init_process_group(config, cfg.device)
    saved_handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        from polysae_lens.checkpointing import TrainingInterrupted

        with fail_fast(context, orderly=(TrainingInterrupted,)):
            mesh = init_latent_mesh(shards, context.device.type)
            # the data side is the data-parallel path's (every rank its own shard)
            data_side = context.describe(cfg.train_batch_size_tokens).partition(": ")[2]
            logger.info("%s; %s", mesh.describe(), data_side)
            cfg = _agreed_across_ranks(cfg)
            cfg = _on_rank_device(cfg, context)
            torch.manual_seed(cfg.seed)
            runner = ShardedTrainingRunner(
                cfg,
                context,
                mesh,
                override_dataset=override_dataset,
                override_model=override_model,
                override_sae=override_sae,
            )
            from polysae_lens import preflight

            preflight.check_model(cfg, runner.model)
            sae = runner.run()
            if sae is not None:
                logger.info(
                    "latent-sharded run finished on %d ranks (dp=%d, shard=%d), tokens=%d, "
                    "l0=%s, dead_latents=%s",
                    mesh.world_size,
                    mesh.dp_size,
                    mesh.shards,
                    cfg.training_tokens,
                    sae.cfg.metadata.l0,
                    sae.cfg.metadata.num_dead_features,
                )
            return sae
    finally:
        for sig, handler in saved_handlers.items():
            if handler is not None:
                signal.signal(sig, handler)


def whole_sae_on_cpu(
    cfg: LanguageModelSAERunnerConfig[Any], override_sae: TrainingSAE[Any] | None
) -> TrainingSAE[Any]:
    """The whole SAE to cut slices from, on the CPU: ``override_sae``, else
    ``from_pretrained_path``, else a fresh one built as SAELens's runner does;
    with the weights of ``resume_from_checkpoint`` when resuming."""
    from sae_lens.saes.sae import TrainingSAE, TrainingSAEConfig

    if override_sae is not None:
        sae = override_sae
    elif cfg.from_pretrained_path is not None:
        sae = TrainingSAE.load_from_disk(cfg.from_pretrained_path, "cpu")
    else:
        cfg_dict = {**cfg.get_training_sae_cfg_dict(), "device": "cpu"}
        sae = TrainingSAE.from_dict(TrainingSAEConfig.from_dict(cfg_dict).to_dict())
    if cfg.resume_from_checkpoint is not None:
        sae.load_weights_from_checkpoint(cfg.resume_from_checkpoint)
    return sae


def scatter_slices(
    whole: TrainingSAE[Any] | None, mesh: LatentMesh, device: torch.device
) -> ShardedTrainingSAE:
    """Every rank's slice of rank 0's ``whole`` SAE (``None`` on the other
    ranks), sent point to point on ``device``: only rank 0 ever holds the whole
    SAE. Collective over every rank."""
    import types

    import torch.distributed as dist

    from polysae_lens.distributed.sharded import (
        ShardedPolySAE,
        check_shardable,
        shard_bounds,
        sharded_config,
        slice_state,
    )
    from polysae_lens.distributed.sharded_trainer import ShardedTrainingSAE

    main = dist.get_rank() == 0
    if main:
        assert whole is not None
        check_shardable(whole)
        manifest = [(n, p.shape, p.dtype) for n, p in slice_state(whole, _all(whole)).items()]
    header: list[Any] = [(whole.cfg, manifest) if main else None]  # type: ignore[union-attr]
    dist.broadcast_object_list(header, src=0, device=device if device.type == "cuda" else None)
    full_cfg, manifest = header[0]
    sharded_cfg = sharded_config(types.SimpleNamespace(cfg=full_cfg))  # type: ignore[arg-type]

    def bounds_of(rank: int) -> Any:
        return shard_bounds(full_cfg.d_sae, mesh.shards, rank % mesh.shards, sharded_cfg.k)

    if main:
        assert whole is not None
        for dst in range(1, mesh.world_size):
            for value in slice_state(whole, bounds_of(dst)).values():
                dist.send(value.to(device), dst=dst)
        params = {n: v.to(device, copy=True) for n, v in slice_state(whole, bounds_of(0)).items()}
    else:
        bounds = bounds_of(dist.get_rank())
        params = {}
        for name, shape, dtype in manifest:
            shape = list(shape)
            if name in ("W_enc", "b_enc", "U"):
                shape[1 if name == "W_enc" else 0] = bounds.width
            params[name] = torch.empty(shape, dtype=dtype, device=device)
            dist.recv(params[name], src=0)
    shard = ShardedPolySAE(sharded_cfg, bounds_of(dist.get_rank()), params, mesh.shard_group)
    return ShardedTrainingSAE(shard, full_cfg)


def _all(sae: TrainingSAE[Any]) -> Any:
    from polysae_lens.distributed.sharded import ShardBounds

    d_sae = int(sae.cfg.d_sae)
    return ShardBounds(0, d_sae, d_sae)


class ShardedTrainingRunner(DistributedTrainingRunner):
    """SAELens's ``LanguageModelSAETrainingRunner`` for one rank of a
    latent-sharded run: ``self.sae`` is this rank's
    :class:`~polysae_lens.distributed.sharded_trainer.ShardedTrainingSAE`
    (cut from :func:`whole_sae_on_cpu`, so a resume re-shards the checkpoint's
    SAE), trained by :class:`~polysae_lens.distributed.sharded_trainer.ShardedSAETrainer`."""

    sae: ShardedTrainingSAE  # type: ignore[assignment]

    def __init__(
        self,
        cfg: LanguageModelSAERunnerConfig[Any],
        context: DistributedContext,
        mesh: LatentMesh,
        override_dataset: HfDataset | None = None,
        override_model: HookedRootModule | None = None,
        override_sae: TrainingSAE[Any] | None = None,
    ) -> None:
        self.mesh = mesh
        # rank 0 alone builds (or loads) the whole SAE, on the CPU, and sends
        # every rank its slice; the slices are copies, the whole SAE is freed
        # (its random init must not advance rank 0's global RNG alone: the
        # activation stores shuffle with it)
        whole = None
        if context.is_main:
            with torch.random.fork_rng(devices=[]):
                whole = whole_sae_on_cpu(cfg, override_sae)
        sliced = scatter_slices(whole, mesh, context.device)
        del whole
        super().__init__(
            cfg,
            context,
            override_dataset=override_dataset,
            override_model=override_model,
            override_sae=sliced,  # type: ignore[arg-type]
        )

    def run(self) -> TrainingSAE[Any] | None:  # type: ignore[override]
        import wandb
        from sae_lens.training.prefetch import PrefetchingIterator

        from polysae_lens.distributed.sharded_trainer import ShardedSAETrainer

        log_to_wandb = self._start_run(self.mesh.is_main)
        data_provider = self._data_provider()
        try:
            trainer = ShardedSAETrainer(
                cfg=self.cfg.to_sae_trainer_config(),
                sae=self.sae,
                data_provider=data_provider,
                mesh=self.mesh,
                save_checkpoint_fn=self.save_checkpoint,
            )
            if self.cfg.resume_from_checkpoint is not None:
                self._resume(trainer, Path(self.cfg.resume_from_checkpoint))
            self.run_trainer_with_interruption_handling(trainer)
            sae = trainer.gather_sae()
            sparsity = trainer.gather_log_feature_sparsity()
            if sae is not None and self.cfg.output_path is not None:
                self.save_final_sae(
                    sae=sae, output_path=self.cfg.output_path, log_feature_sparsity=sparsity
                )
            if log_to_wandb:
                wandb.finish()
            return sae
        finally:
            if isinstance(data_provider, PrefetchingIterator):
                data_provider.close()

    def _resume(self, trainer: ShardedSAETrainer, path: Path) -> None:  # type: ignore[override]
        # the weights were re-sharded from the checkpoint when the slice was cut
        logger.info("rank %d resuming from checkpoint %s", self.context.rank, path)
        trainer.load_trainer_state(path)
        self._load_data_position(path)
