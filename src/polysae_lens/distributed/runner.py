"""Data-parallel training of any SAELens architecture from a
``LanguageModelSAERunnerConfig``: the Python entry point
(:func:`train_distributed`) behind ``torchrun ... -m polysae_lens train``.

Each rank runs its own copy of the language model and its own
``ActivationsStore`` over a disjoint shard of the dataset, and computes
1/N of every optimizer step; ``train_batch_size_tokens`` and
``training_tokens`` keep SAELens's meaning (global tokens per step, total
tokens), so the learning rate and its schedule need no change.
"""

from __future__ import annotations

import copy
import json
import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from sae_lens import LanguageModelSAETrainingRunner

from polysae_lens.distributed.data import local_batch_size, shard_activations_store
from polysae_lens.distributed.process_group import (
    DistributedConfig,
    DistributedContext,
    env_world_size,
    fail_fast,
    init_process_group,
)

if TYPE_CHECKING:
    from sae_lens.config import HfDataset, LanguageModelSAERunnerConfig
    from sae_lens.saes.sae import TrainingSAE
    from transformer_lens.hook_points import HookedRootModule

logger = logging.getLogger(__name__)


def rank_store_state_filename(rank: int) -> str:
    """The file holding rank ``rank``'s data position in a checkpoint (rank 0
    uses SAELens's own file name, so its checkpoints stay SAELens checkpoints)."""
    from sae_lens.constants import ACTIVATIONS_STORE_STATE_FILENAME

    if rank == 0:
        return ACTIVATIONS_STORE_STATE_FILENAME
    stem, dot, ext = ACTIVATIONS_STORE_STATE_FILENAME.rpartition(".")
    return f"{stem}.rank{rank}{dot}{ext}"


def check_world_size(cfg: LanguageModelSAERunnerConfig[Any], world_size: int) -> None:
    """Raise ``ValueError`` if ``cfg`` cannot be split over ``world_size`` ranks."""
    local_batch_size(cfg.train_batch_size_tokens, world_size)


def train_distributed(
    cfg: LanguageModelSAERunnerConfig[Any],
    *,
    config: DistributedConfig | None = None,
    override_model: HookedRootModule | None = None,
    override_dataset: HfDataset | None = None,
    override_sae: TrainingSAE[Any] | None = None,
) -> TrainingSAE[Any]:
    """Train one SAE data-parallel; call it on every rank (e.g. from a script
    started with ``torchrun --nproc-per-node N script.py``).

    Joins the process group (``config``, default :meth:`DistributedConfig.from_env`),
    trains, and leaves the group. Every rank returns the same trained SAE;
    rank 0 alone logs to wandb, evaluates, and writes checkpoints and
    ``cfg.output_path``. ``override_model`` / ``override_dataset`` /
    ``override_sae`` are used as by SAELens's runner (each rank trains on its
    shard of the dataset; rank 0's ``override_sae`` is broadcast). A
    failure on any rank raises on that rank and ends the others at their next
    collective (within ``config.timeout_s``).
    """
    config = config if config is not None else DistributedConfig.from_env()
    world_size = config.world_size if config.world_size is not None else env_world_size()
    check_world_size(cfg, world_size)  # before any work
    context = init_process_group(config, cfg.device)
    saved_handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        from polysae_lens.checkpointing import TrainingInterrupted

        with fail_fast(context, orderly=(TrainingInterrupted,)):
            logger.info(context.describe(cfg.train_batch_size_tokens))
            cfg = _agreed_across_ranks(cfg)
            cfg = _on_rank_device(cfg, context)
            torch.manual_seed(cfg.seed)
            runner = DistributedTrainingRunner(
                cfg,
                context,
                override_dataset=override_dataset,
                override_model=override_model,
                override_sae=override_sae,
            )
            # the single-process CLI's checks of the model against the config
            from polysae_lens import preflight

            preflight.check_model(cfg, runner.model)
            sae = runner.run()
            if context.is_main:
                logger.info(final_metrics_line(sae, cfg, context))
            return sae
    finally:
        for sig, handler in saved_handlers.items():
            if handler is not None:
                signal.signal(sig, handler)


def final_metrics_line(
    sae: TrainingSAE[Any], cfg: LanguageModelSAERunnerConfig[Any], context: DistributedContext
) -> str:
    """The run's final metrics (over all ranks' data), in one line."""
    metadata = sae.cfg.metadata
    l0 = getattr(metadata, "l0", None)
    dead = getattr(metadata, "num_dead_features", None)
    parts = [
        f"data-parallel run finished on {context.world_size} ranks",
        f"tokens={cfg.training_tokens}",
        f"l0={l0:.4g}" if isinstance(l0, float) else f"l0={l0}",
        f"dead_latents={dead}",
    ]
    return ", ".join(parts)


_RANK_LOCAL_FIELDS = ("checkpoint_path", "device", "llm_device", "act_store_device")


def _agreed_across_ranks(
    cfg: LanguageModelSAERunnerConfig[Any],
) -> LanguageModelSAERunnerConfig[Any]:
    """``cfg`` with rank 0's ``checkpoint_path``; raises if the ranks were
    started with different settings.

    SAELens appends a random id to ``checkpoint_path`` when it builds the
    config, so each rank's parse picks a different directory; rank 0's wins.
    """
    import torch.distributed as dist

    settings = {k: v for k, v in cfg.to_dict().items() if k not in _RANK_LOCAL_FIELDS}
    mine = json.dumps(settings, sort_keys=True, default=str)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (mine, cfg.checkpoint_path))
    reference = json.loads(gathered[0][0])
    for rank, (theirs, _) in enumerate(gathered):
        if theirs != gathered[0][0]:
            differ = sorted(k for k, v in json.loads(theirs).items() if reference.get(k) != v)
            raise ValueError(
                f"rank {rank} was started with other settings than rank 0 ({', '.join(differ)}); "
                "launch every rank with the same flags."
            )
    cfg = copy.deepcopy(cfg)
    cfg.checkpoint_path = gathered[0][1]
    return cfg


def _on_rank_device(
    cfg: LanguageModelSAERunnerConfig[Any], context: DistributedContext
) -> LanguageModelSAERunnerConfig[Any]:
    """``cfg`` with every CUDA device (SAE, LLM, activation store) replaced by
    this rank's GPU: each rank keeps its whole pipeline on its own device."""
    if context.device.type != "cuda":
        return cfg
    cfg = copy.deepcopy(cfg)
    for name in ("device", "llm_device", "act_store_device"):
        value = getattr(cfg, name)
        if value is not None and torch.device(value).type == "cuda":
            setattr(cfg, name, str(context.device))
    return cfg


class DistributedTrainingRunner(LanguageModelSAETrainingRunner):
    """SAELens's ``LanguageModelSAETrainingRunner`` for one rank.

    Builds the model, store and SAE as SAELens does, then shards the store;
    :meth:`run` mirrors SAELens's ``run`` (6.54) with
    :class:`~polysae_lens.distributed.trainer.DistributedSAETrainer` in place
    of ``SAETrainer`` (SAELens builds its trainer inside ``run``) and with
    wandb and the final save on rank 0 only.
    """

    def __init__(
        self,
        cfg: LanguageModelSAERunnerConfig[Any],
        context: DistributedContext,
        override_dataset: HfDataset | None = None,
        override_model: HookedRootModule | None = None,
        override_sae: TrainingSAE[Any] | None = None,
    ) -> None:
        check_world_size(cfg, context.world_size)
        self.context = context
        super().__init__(
            cfg,
            override_dataset=override_dataset,
            override_model=override_model,
            override_sae=override_sae,
        )
        shard_activations_store(
            self.activations_store, context.rank, context.world_size, cfg.train_batch_size_tokens
        )

    def run(self) -> TrainingSAE[Any]:
        import wandb
        from sae_lens.training.prefetch import PrefetchingIterator

        from polysae_lens.distributed.trainer import DistributedSAETrainer

        main = self.context.is_main
        log_to_wandb = self._start_run(main)
        data_provider = self._data_provider()
        try:
            trainer = DistributedSAETrainer(
                cfg=self.cfg.to_sae_trainer_config(),
                sae=self.sae,
                data_provider=data_provider,
                context=self.context,
                evaluator=self.evaluator,
                save_checkpoint_fn=self.save_checkpoint,
            )
            if self.cfg.resume_from_checkpoint is not None:
                self._resume(trainer, Path(self.cfg.resume_from_checkpoint))
            self._compile_sae_if_needed()
            sae = self.run_trainer_with_interruption_handling(trainer)
            if main and self.cfg.output_path is not None:
                self.save_final_sae(
                    sae=sae,
                    output_path=self.cfg.output_path,
                    log_feature_sparsity=trainer.log_feature_sparsity,
                )
            if log_to_wandb:
                wandb.finish()
            return sae
        finally:
            if isinstance(data_provider, PrefetchingIterator):
                data_provider.close()

    def run_trainer_with_interruption_handling(self, trainer: Any) -> Any:
        """Train; on SIGINT/SIGTERM (on any rank) every rank stops after the
        same step, a resumable checkpoint is written (with ``checkpoint_path``)
        and :class:`~polysae_lens.checkpointing.TrainingInterrupted` is raised
        on every rank. A second signal aborts at once."""
        from polysae_lens.checkpointing import raise_interrupted
        from polysae_lens.distributed.trainer import StopRequested

        received: list[int] = []

        def handler(signum: int, frame: Any) -> None:
            if received:
                raise KeyboardInterrupt
            received.append(signum)
            trainer.request_stop()
            logger.warning(
                "rank %d: %s received, all ranks stop after this step to save a "
                "checkpoint (send it again to abort without saving).",
                self.context.rank,
                signal.Signals(signum).name,
            )

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, handler)
        try:
            return trainer.fit()
        except StopRequested:
            pass
        # a rank that saw no signal itself stops for another rank's
        raise_interrupted(
            trainer, self.cfg.checkpoint_path, received[0] if received else signal.SIGTERM
        )

    def save_checkpoint(self, checkpoint_path: Path | None) -> None:
        """Rank 0: SAELens's checkpoint extras (its data position, the runner
        config); other ranks: their own data position only."""
        if checkpoint_path is None:
            return
        if self.context.is_main:
            super().save_checkpoint(checkpoint_path)
            return
        Path(checkpoint_path).mkdir(parents=True, exist_ok=True)
        self.activations_store.save(
            str(Path(checkpoint_path) / rank_store_state_filename(self.context.rank))
        )

    def _start_run(self, main: bool) -> bool:
        """SAELens's run start (SAE metadata; wandb on the main rank only):
        whether this rank logs to wandb."""
        import wandb

        log_to_wandb = main and self.cfg.logger.log_to_wandb
        self._set_sae_metadata()
        if log_to_wandb:
            wandb.init(
                project=self.cfg.logger.wandb_project,
                entity=self.cfg.logger.wandb_entity,
                config=self.cfg.to_dict(),
                name=self.cfg.logger.run_name,
                id=self.cfg.logger.wandb_id,
            )
        return log_to_wandb

    def _data_provider(self) -> Any:
        """The activation store, behind SAELens's prefetching iterator when the
        config asks for it (the caller closes it)."""
        from sae_lens.training.prefetch import PrefetchingIterator

        if not self.cfg.prefetch_llm_batches:
            return self.activations_store
        prefetch = (
            1 if isinstance(self.cfg.prefetch_llm_batches, bool) else self.cfg.prefetch_llm_batches
        )
        return PrefetchingIterator(iter(self.activations_store), prefetch=prefetch)

    def _resume(self, trainer: Any, path: Path) -> None:
        logger.info("rank %d resuming from checkpoint %s", self.context.rank, path)
        trainer.load_trainer_state(path)
        self.sae.load_weights_from_checkpoint(path)
        self._load_data_position(path)

    def _load_data_position(self, path: Path) -> None:
        """This rank's activation-store position from a checkpoint (rank 0's if
        the checkpoint has none for it)."""
        own = path / rank_store_state_filename(self.context.rank)
        if own.exists():
            self.activations_store.load(str(own))
        else:
            logger.warning(
                "checkpoint %s has no data position for rank %d (%s); using rank 0's.",
                path,
                self.context.rank,
                own.name,
            )
            self.activations_store.load_from_checkpoint(path)
