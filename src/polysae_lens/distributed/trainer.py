"""SAETrainer for one rank of a data-parallel run.

The seams used are SAETrainer's public ones: ``fit`` (runs inside the DDP
route and the global BatchTopK threshold), ``step`` (counts global tokens
and reduces the dead-latent statistics after each step), ``save_checkpoint``
(rank 0 writes the SAE and trainer state; every rank writes its own data
position) and the ``activation_scaler`` attribute (estimates over all ranks).
Everything else, including the order backward -> clip -> optimizer step, is
SAETrainer's own code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import T_TRAINING_SAE, T_TRAINING_SAE_CONFIG, TrainStepOutput
from sae_lens.training.sae_trainer import Evaluator, SAETrainer, SaveCheckpointFn
from sae_lens.training.types import DataProvider

from polysae_lens.dead_latents import set_steps_since_fired_
from polysae_lens.distributed.data import local_batch_size
from polysae_lens.distributed.grads import ddp_training_forward
from polysae_lens.distributed.process_group import DistributedContext
from polysae_lens.distributed.stats import (
    DistributedActivationScaler,
    global_topk_threshold_update,
    reduce_step_stats,
)

logger = logging.getLogger(__name__)


class StopRequested(Exception):
    """Raised by :meth:`DistributedSAETrainer.fit` on every rank after the step
    in which some rank called :meth:`~DistributedSAETrainer.request_stop`."""

    def __init__(self, n_training_samples: int) -> None:
        super().__init__(f"stop requested after {n_training_samples} training samples")
        self.n_training_samples = n_training_samples


class StopAfterAgreedStep:
    """The stop protocol of the multi-rank trainers: a signal handler calls
    :meth:`request_stop` on one rank; the trainer's per-step all-reduce sets
    ``stop_agreed`` on every rank, and all raise :class:`StopRequested` at the
    same point of the same step. Mixed in before ``SAETrainer``."""

    stop_requested_here: bool
    stop_agreed: bool
    n_training_samples: int

    def request_stop(self) -> None:
        """Ask every rank to stop after the current step (safe to call from a
        signal handler): :meth:`fit` then raises :class:`StopRequested` on all
        ranks after the same step, with identical state everywhere."""
        self.stop_requested_here = True

    def _update_pbar(
        self, step_output: TrainStepOutput, pbar: Any, *args: Any, **kwargs: Any
    ) -> None:
        # SAETrainer calls this last in each iteration, after the step counters,
        # logging and checkpointing: the one point where every rank has finished
        # the same whole step.
        super()._update_pbar(step_output, pbar, *args, **kwargs)  # type: ignore[misc]
        if self.stop_agreed:
            raise StopRequested(self.n_training_samples)


class DistributedSAETrainer(StopAfterAgreedStep, SAETrainer[T_TRAINING_SAE, T_TRAINING_SAE_CONFIG]):
    """SAELens's ``SAETrainer`` for one rank of a data-parallel run.

    ``cfg`` is the run's global configuration, the same on every rank:
    ``train_batch_size_samples`` is the number of tokens per optimizer step
    summed over ranks and ``total_training_samples`` the total. The
    ``data_provider`` yields this rank's share of each step,
    ``train_batch_size_samples / world_size`` rows. The process group must be
    initialised (:func:`polysae_lens.distributed.init_process_group`).

    After every step all ranks hold bitwise-identical parameters, optimizer
    states and dead-latent statistics; ``n_training_samples`` counts global
    tokens. Only rank 0 logs to wandb, evaluates and writes checkpoints.
    """

    act_freq_scores: torch.Tensor
    n_forward_passes_since_fired: torch.Tensor

    def __init__(
        self,
        cfg: SAETrainerConfig,
        sae: T_TRAINING_SAE,
        data_provider: DataProvider,
        context: DistributedContext,
        evaluator: Evaluator[T_TRAINING_SAE] | None = None,
        save_checkpoint_fn: SaveCheckpointFn | None = None,
        process_group: Any = None,
        comm_hook: tuple[Any, Callable[..., Any]] | None = None,
    ) -> None:
        self.context = context
        self.process_group = process_group
        self.comm_hook = comm_hook
        """``(state, hook)`` for DistributedDataParallel's ``register_comm_hook``,
        e.g. ``(None, torch.distributed.algorithms.ddp_comm_hooks.default_hooks.bf16_compress_hook)``
        to send bf16 gradients (then the ranks stay identical, but no longer
        equal a single-process run)."""
        self.local_batch_size = local_batch_size(cfg.train_batch_size_samples, context.world_size)
        if not context.is_main and cfg.logger.log_to_wandb:
            cfg = dataclasses.replace(
                cfg, logger=dataclasses.replace(cfg.logger, log_to_wandb=False)
            )
        super().__init__(
            cfg,
            sae,
            data_provider,
            evaluator=evaluator if context.is_main else None,
            save_checkpoint_fn=save_checkpoint_fn,
        )
        self.activation_scaler = DistributedActivationScaler(process_group=process_group)
        self.stop_requested_here = False
        """Set by :meth:`request_stop` on this rank."""
        self.stop_agreed = False
        """Whether some rank requested a stop by the end of the last step."""

    def fit(self) -> T_TRAINING_SAE:
        self.sae.to(self.cfg.device)
        with contextlib.ExitStack() as stack:
            ddp = stack.enter_context(
                ddp_training_forward(self.sae, self.context.config, self.process_group)
            )
            if self.comm_hook is not None:
                ddp.register_comm_hook(*self.comm_hook)
            stack.enter_context(global_topk_threshold_update(self.sae, self.process_group))
            return super().fit()

    def step(self, batch: torch.Tensor) -> TrainStepOutput:
        if batch.shape[0] != self.local_batch_size:
            raise ValueError(
                f"rank {self.context.rank} got a batch of {batch.shape[0]} tokens; each of "
                f"the {self.context.world_size} ranks must get train_batch_size_samples / "
                f"world_size = {self.local_batch_size} tokens per step."
            )
        act_freq_before_F = self.act_freq_scores.clone()
        since_fired_before_F = self.n_forward_passes_since_fired.clone()
        output = super().step(batch)
        self.n_training_samples += batch.shape[0] * (self.context.world_size - 1)
        stats = reduce_step_stats(
            act_freq_before_F,
            since_fired_before_F,
            self.act_freq_scores,
            self.stop_requested_here,
            self.process_group,
        )
        self.act_freq_scores = stats.act_freq_scores_F
        self.n_forward_passes_since_fired = stats.since_fired_F
        # the SAE's own count (AuxK's aux_dead_window) is the same global count
        set_steps_since_fired_(self.sae, stats.since_fired_F)
        self.stop_agreed = stats.stop_requested
        return output

    def save_checkpoint(
        self,
        checkpoint_name: str,
        base_path: Path | str | None = None,
        wandb_aliases: list[str] | None = None,
    ) -> None:
        if self.context.is_main:
            super().save_checkpoint(checkpoint_name, base_path, wandb_aliases)
            return
        # The other ranks hold the same SAE and trainer state; only their data
        # position (written by save_checkpoint_fn) is their own.
        base = base_path if base_path is not None else self.cfg.checkpoint_path
        if base is not None and self.save_checkpoint_fn is not None:
            checkpoint_path = Path(base) / checkpoint_name
            checkpoint_path.mkdir(parents=True, exist_ok=True)
            self.save_checkpoint_fn(checkpoint_path=checkpoint_path)
