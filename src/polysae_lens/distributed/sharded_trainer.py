"""SAETrainer for one rank of a latent-sharded TopK PolySAE run on a
``(dp, shard)`` mesh (:mod:`polysae_lens.distributed.mesh`).

Every rank's data provider yields its own ``B / world_size`` rows, as in the
data-parallel path; :meth:`ShardedSAETrainer.step` all-gathers them within the
shard group, so the ranks of a replica see the same ``B / dp`` rows. What is
SAETrainer's own and runs unchanged: the training loop (``fit``), the learning
rate and coefficient schedules, the sparsity windows, wandb logging (rank 0),
checkpoint spacing and the dead-latent window.

Why ``_train_step`` is overridden (the one place this module re-states
SAETrainer's code, 6.54's ``_train_step``): SAETrainer clips the gradient with
``clip_grad_norm_(sae.parameters(), 1.0)``, whose norm is this rank's; the
unsharded model's norm needs the sharded parameters' squares summed over the
shard group, and that reduction must run between ``backward`` and the
optimizer step, where SAETrainer offers no seam. The override keeps its order:
forward (inside autocast) -> firing statistics -> backward -> gradients
averaged over the dp group -> clip by the global norm -> optimizer step with
the gauge step and the sharded retraction of U -> zero_grad -> LR and
coefficient schedulers.

Checkpoints are ordinary: :meth:`ShardedSAETrainer.save_checkpoint` gathers the
SAE to rank 0, which writes it with SAELens's ``save_model`` (loadable by
``SAE.load_from_disk``) with the gathered feature sparsity; the optimizer state
is per slice (``trainer_state.shard<r>of<S>.pt``, written by replica 0), so a
resume needs the same number of shards (refused otherwise, naming the count).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import TrainingSAE, TrainStepInput, TrainStepOutput
from sae_lens.training.optim import get_lr_scheduler
from sae_lens.training.sae_trainer import Evaluator, SAETrainer, SaveCheckpointFn
from sae_lens.training.types import DataProvider
from torch import Tensor, nn

from polysae_lens.dead_latents import dead_mask, set_steps_since_fired_
from polysae_lens.distributed.data import local_batch_size
from polysae_lens.distributed.mesh import LatentMesh
from polysae_lens.distributed.sharded import (
    ShardedPolySAE,
    gather_poly_sae,
    keep_sharded_fit_rows,
    shard_bounds,
    sharded_adam,
    sharded_auxk_loss,
    sharded_optimizer_step,
)
from polysae_lens.distributed.stats import reduce_step_stats
from polysae_lens.distributed.trainer import StopAfterAgreedStep

logger = logging.getLogger(__name__)

CLIP_MAX_NORM = 1.0
"""SAETrainer's gradient-clipping threshold (hard-coded there)."""


def shard_state_filename(shard_rank: int, shards: int) -> str:
    """The file holding one slice's optimizer and statistics in a checkpoint."""
    return f"trainer_state.shard{shard_rank}of{shards}.pt"


class ShardedTrainingSAE(nn.Module):
    """One rank's slice of a TopK PolySAE, with the part of SAELens's
    ``TrainingSAE`` surface that SAETrainer uses.

    ``cfg`` is a copy of the whole SAE's training config with ``d_sae`` set to
    this slice's width (SAETrainer sizes its per-latent statistics from it); its
    ``metadata`` is the whole SAE's, so what the runner and trainer record there
    is saved with the gathered SAE. ``full_cfg`` is the whole SAE's config.
    """

    def __init__(self, shard: ShardedPolySAE, full_cfg: Any) -> None:
        super().__init__()
        self.shard = shard
        self.full_cfg = full_cfg
        cfg = copy.copy(full_cfg)  # shallow: shares ``metadata`` with full_cfg
        cfg.d_sae = shard.bounds.width
        self.cfg = cfg

    @property
    def device(self) -> torch.device:
        return self.shard.W_enc.device

    def get_coefficients(self) -> dict[str, Any]:
        return {}

    def log_histograms(self) -> dict[str, Any]:
        return {}

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """MSE (+ AuxK with the config's ``aux_loss_coefficient``) on the
        replica's batch, equal to the unsharded PolySAE's sparse training step;
        ``feature_acts`` is this slice's code [B, width] (sparse COO)."""
        from polysae_lens.preflight import check_finite_input

        x_BD = step_input.sae_in
        check_finite_input(x_BD)
        forward = self.shard(x_BD)
        keep_sharded_fit_rows(self.shard, forward, x_BD, step_input.n_training_steps)
        losses = {"mse_loss": (forward.sae_out_BD - x_BD).pow(2).sum(dim=-1).mean()}
        aux_coefficient = float(getattr(self.full_cfg, "aux_loss_coefficient", 0.0))
        if aux_coefficient and step_input.dead_neuron_mask is not None:
            aux = sharded_auxk_loss(self.shard, forward, x_BD, step_input.dead_neuron_mask)
            losses["auxiliary_reconstruction_loss"] = aux_coefficient * aux
        # SAETrainer's logged L0 reads feature_acts, this slice's only; the
        # whole SAE's L0 is known on every rank from the global selection
        n_positive_B = forward.sharded.selection.n_positive_B
        return TrainStepOutput(
            sae_in=x_BD,
            sae_out=forward.sae_out_BD,
            feature_acts=forward.sharded.code.to_coo(),
            hidden_pre=forward.sharded.hidden_pre_BL,
            loss=torch.stack(list(losses.values())).sum(),
            losses=losses,
            metrics={"l0": n_positive_B.float().mean()},
        )


class ShardedSAETrainer(StopAfterAgreedStep, SAETrainer[Any, Any]):
    """SAELens's ``SAETrainer`` for one rank of a latent-sharded run.

    ``cfg`` is the run's global configuration (``train_batch_size_samples``:
    tokens per optimizer step over all ranks); ``data_provider`` yields this
    rank's ``train_batch_size_samples / world_size`` rows. ``n_training_samples``
    counts global tokens. The dead-latent statistics are per slice (each rank
    keeps its own latents'), summed over the dp group. Only rank 0 logs to
    wandb; evaluators are not run (SAELens's evaluator needs the whole SAE).
    """

    act_freq_scores: Tensor
    n_forward_passes_since_fired: Tensor

    def __init__(
        self,
        cfg: SAETrainerConfig,
        sae: ShardedTrainingSAE,
        data_provider: DataProvider,
        mesh: LatentMesh,
        evaluator: Evaluator[Any] | None = None,
        save_checkpoint_fn: SaveCheckpointFn | None = None,
    ) -> None:
        import dataclasses

        self.mesh = mesh
        self.local_batch_size = local_batch_size(cfg.train_batch_size_samples, mesh.world_size)
        if not mesh.is_main and cfg.logger.log_to_wandb:
            cfg = dataclasses.replace(
                cfg, logger=dataclasses.replace(cfg.logger, log_to_wandb=False)
            )
        if evaluator is not None:
            logger.warning(
                "latent-sharded run: the evaluator is not run (it needs the whole SAE); "
                "evaluate the saved SAE afterwards."
            )
        super().__init__(cfg, sae, data_provider, save_checkpoint_fn=save_checkpoint_fn)
        # C1 and U in parameter groups of their own at lr * their step scales (the
        # unsharded PolySAE's optimizer hook does the same); the schedule is rebuilt
        self.optimizer = sharded_adam(sae.shard, cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2))
        assert cfg.lr_end is not None  # set by SAETrainerConfig's post-init
        self.lr_scheduler = get_lr_scheduler(
            cfg.lr_scheduler_name,
            lr=cfg.lr,
            optimizer=self.optimizer,
            warm_up_steps=cfg.lr_warm_up_steps,
            decay_steps=cfg.lr_decay_steps,
            training_steps=cfg.total_training_steps,
            lr_end=cfg.lr_end,
            num_cycles=cfg.n_restart_cycles,
        )
        self.stop_requested_here = False
        """Set by :meth:`request_stop` on this rank."""
        self.stop_agreed = False
        """Whether some rank requested a stop by the end of the last step."""
        self.global_dead_latents = 0
        """Dead latents of the whole SAE after the last step."""
        self.global_mean_passes_since_fired = 0.0
        """Mean over all latents of the steps since each last fired."""

    @property
    def shard(self) -> ShardedPolySAE:
        """This rank's slice."""
        return self.sae.shard  # type: ignore[no-any-return]

    # ---- one step -------------------------------------------------------------

    def step(self, batch: Tensor) -> TrainStepOutput:
        if batch.shape[0] != self.local_batch_size:
            raise ValueError(
                f"a rank got a batch of {batch.shape[0]} tokens; each of the "
                f"{self.mesh.world_size} ranks must get train_batch_size_samples / "
                f"world_size = {self.local_batch_size} tokens per step."
            )
        batch = batch.to(self.sae.device).contiguous()
        parts = [torch.empty_like(batch) for _ in range(self.mesh.shards)]
        dist.all_gather(parts, batch, group=self.mesh.shard_group)
        replica_batch = torch.cat(parts)
        act_freq_before_F = self.act_freq_scores.clone()
        since_fired_before_F = self.n_forward_passes_since_fired.clone()
        output = super().step(replica_batch)
        self.n_training_samples += replica_batch.shape[0] * (self.mesh.dp_size - 1)
        if self.mesh.dp_size > 1:
            stats = reduce_step_stats(
                act_freq_before_F,
                since_fired_before_F,
                self.act_freq_scores,
                process_group=self.mesh.dp_group,
            )
            self.act_freq_scores = stats.act_freq_scores_F
            self.n_forward_passes_since_fired = stats.since_fired_F
        # One all-reduce over every rank: any rank's stop request, and (from
        # replica 0) the whole SAE's dead-latent count and mean steps since fired,
        # for the logs. On the SAE's device: nccl reduces only CUDA tensors.
        replica0 = float(self.mesh.dp_rank == 0)
        since_fired = self.n_forward_passes_since_fired
        totals = torch.tensor(
            [
                float(self.stop_requested_here),
                replica0 * float(self.dead_neurons.sum().item()),
                replica0 * float(since_fired.sum().item()),
            ],
            dtype=torch.float64,
            device=self.sae.device,
        )
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        self.stop_agreed = bool(totals[0].item() > 0)
        self.global_dead_latents = int(totals[1].item())
        self.global_mean_passes_since_fired = totals[2].item() / self.shard.bounds.d_sae
        return output

    @torch.no_grad()
    def build_train_step_log_dict(
        self, output: TrainStepOutput, n_training_samples: int
    ) -> dict[str, Any]:
        """SAETrainer's step log with the whole SAE's dead-latent numbers (its
        own are this slice's); L0 comes from the step's ``metrics``. Loss and
        explained variance are replica 0's batch."""
        log = super().build_train_step_log_dict(output, n_training_samples)
        log["sparsity/dead_features"] = self.global_dead_latents
        log["sparsity/mean_passes_since_fired"] = self.global_mean_passes_since_fired
        return log

    def _train_step(self, sae: Any, sae_in: Tensor) -> TrainStepOutput:
        sae.train()
        with self.autocast_if_enabled:
            output = sae.training_forward_pass(
                step_input=TrainStepInput(
                    sae_in=sae_in,
                    # the slice's own count is the SAE's aux_dead_window count
                    dead_neuron_mask=dead_mask(
                        self.dead_neurons,
                        self.n_forward_passes_since_fired,
                        self.shard.cfg.aux_dead_window,
                    ),
                    coefficients=self.get_coefficients(),
                    n_training_steps=self.n_training_steps,
                    is_logging_step=self._is_logging_step(),
                ),
            )
            with torch.no_grad():
                firing_BL = output.feature_acts.bool().float()
                did_fire_L = firing_BL.sum(-2).bool().to_dense()
                self.n_forward_passes_since_fired += 1
                self.n_forward_passes_since_fired[did_fire_L] = 0
                self.act_freq_scores += firing_BL.sum(0).to_dense()
                self.n_frac_active_samples += self.cfg.train_batch_size_samples
        output.loss.backward()
        self._average_gradients_over_replicas()
        self._clip_by_global_norm()
        sharded_optimizer_step(self.shard, self.optimizer)
        self.optimizer.zero_grad()
        self.lr_scheduler.step()
        for scheduler in self.coefficient_schedulers.values():
            scheduler.step()
        return output

    @torch.no_grad()
    def _average_gradients_over_replicas(self) -> None:
        """The mean over the dp group of every gradient, one all-reduce."""
        if self.mesh.dp_size == 1:
            return
        grads = [p.grad for p in self.shard.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.mesh.dp_group)
        flat /= self.mesh.dp_size
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()

    @torch.no_grad()
    def _clip_by_global_norm(self) -> None:
        """``clip_grad_norm_(max_norm=1)`` with the unsharded model's norm: the
        sharded parameters' squares summed over the shard group, the replicated
        ones (identical on every rank) counted once."""
        from polysae_lens.distributed.sharded import REPLICATED

        sharded_sq = torch.zeros((), dtype=torch.float64, device=self.sae.device)
        replicated_sq = torch.zeros_like(sharded_sq)
        grads = []
        for name, param in self.shard.named_parameters():
            if param.grad is None:
                continue
            grads.append(param.grad)
            square = param.grad.detach().to(torch.float64).pow(2).sum()
            if name in REPLICATED:
                replicated_sq += square
            else:
                sharded_sq += square
        total = sharded_sq.reshape(1)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.mesh.shard_group)
        norm = (total[0] + replicated_sq).sqrt()
        coefficient = (CLIP_MAX_NORM / (norm + 1e-6)).clamp(max=1.0)
        for grad in grads:
            grad.mul_(coefficient.to(grad.dtype))

    # ---- whole-SAE views ----------------------------------------------------------

    @torch.no_grad()
    def set_final_sae_metadata(self) -> None:
        if self.n_frac_active_samples > 0:
            sums = torch.tensor(
                [self.feature_sparsity.sum().item(), float(self.dead_neurons.sum().item())],
                dtype=torch.float64,
                device=self.sae.device,
            )
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=self.mesh.shard_group)
            self.sae.cfg.metadata.l0 = sums[0].item()
            self.sae.cfg.metadata.num_dead_features = int(sums[1].item())

    def gather_sae(self) -> TrainingSAE[Any] | None:
        """The whole trained SAE on rank 0 (on CPU, an ordinary PolySAE),
        ``None`` elsewhere. Collective over every rank."""
        state = gather_poly_sae(self.shard) if self.mesh.dp_rank == 0 else None
        since_fired = self._gather_latent_vector(self.n_forward_passes_since_fired)
        if not self.mesh.is_main:
            return None
        assert state is not None
        full_cfg = copy.deepcopy(self.sae.full_cfg)
        full_cfg.metadata = copy.deepcopy(self.sae.cfg.metadata)
        full_cfg.sae_lens_training_version = self.sae.cfg.sae_lens_training_version
        full_cfg.device = "cpu"
        # building initialises weights: keep the global RNG (which the
        # activation store's shuffling draws from) as the other ranks have it
        with torch.random.fork_rng(devices=[]):
            sae = TrainingSAE.from_dict(full_cfg.to_dict())
        sae.load_state_dict({k: v.to("cpu", sae.dtype) for k, v in state.items()})
        assert since_fired is not None
        set_steps_since_fired_(sae, since_fired)  # AuxK's count: the slices' counts
        sae.cfg.metadata = full_cfg.metadata
        return sae

    @torch.no_grad()
    def gather_log_feature_sparsity(self) -> Tensor | None:
        """SAELens's ``log_feature_sparsity`` of the whole SAE on rank 0
        (``None`` elsewhere). Collective over every rank."""
        return self._gather_latent_vector(self.log_feature_sparsity)

    @torch.no_grad()
    def _gather_latent_vector(self, mine_L: Tensor) -> Tensor | None:
        """This slice's per-latent vector concatenated over the slices, in
        float32 on rank 0's CPU (``None`` elsewhere). Collective over every rank."""
        mine = mine_L.to(self.sae.device, torch.float32)
        bounds = self.shard.bounds
        widest = shard_bounds(bounds.d_sae, self.mesh.shards, 0).width
        padded = mine.new_zeros(widest)
        padded[: mine.shape[0]] = mine
        if self.mesh.dp_rank != 0:
            return None
        received = (
            [torch.empty_like(padded) for _ in range(self.mesh.shards)]
            if self.mesh.is_main
            else None
        )
        dst = dist.get_global_rank(self.mesh.shard_group, 0)
        dist.gather(padded, received, dst=dst, group=self.mesh.shard_group)
        if received is None:
            return None
        widths = [
            shard_bounds(bounds.d_sae, self.mesh.shards, r).width for r in range(len(received))
        ]
        return torch.cat([r[:w] for r, w in zip(received, widths, strict=True)]).cpu()

    # ---- checkpoints ------------------------------------------------------------

    def save_checkpoint(
        self,
        checkpoint_name: str,
        base_path: Path | str | None = None,
        wandb_aliases: list[str] | None = None,
    ) -> None:
        """Rank 0 writes the gathered SAE (SAELens's format) and its feature
        sparsity; replica 0 writes each slice's trainer state; every rank its
        data position (``save_checkpoint_fn``). Collective over every rank."""
        from sae_lens.constants import SPARSITY_FILENAME
        from safetensors.torch import save_file

        base = base_path if base_path is not None else self.cfg.checkpoint_path
        sae = self.gather_sae()
        sparsity = self.gather_log_feature_sparsity()
        if base is None:
            return
        checkpoint_path = Path(base) / checkpoint_name
        checkpoint_path.mkdir(parents=True, exist_ok=True)
        if sae is not None and sparsity is not None:
            weights_path, cfg_path = sae.save_model(str(checkpoint_path))
            sparsity_path = checkpoint_path / SPARSITY_FILENAME
            save_file({"sparsity": sparsity}, sparsity_path)
            if self.cfg.logger.log_to_wandb:
                self.cfg.logger.log(
                    self, weights_path, cfg_path, sparsity_path=sparsity_path,
                    wandb_aliases=wandb_aliases,
                )  # fmt: skip
        if self.mesh.dp_rank == 0:
            self.save_trainer_state(checkpoint_path)
        if self.save_checkpoint_fn is not None:
            self.save_checkpoint_fn(checkpoint_path=checkpoint_path)

    def save_trainer_state(self, checkpoint_path: Path) -> None:
        """This slice's optimizer, schedules, counters and statistics."""
        checkpoint_path.mkdir(exist_ok=True, parents=True)
        torch.save(
            {
                "shard_bounds": tuple(self.shard.bounds),
                "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict(),
                "n_training_samples": self.n_training_samples,
                "n_training_steps": self.n_training_steps,
                "act_freq_scores": self.act_freq_scores,
                "n_forward_passes_since_fired": self.n_forward_passes_since_fired,
                "n_frac_active_samples": self.n_frac_active_samples,
                "started_fine_tuning": self.started_fine_tuning,
                "coefficient_schedulers": {
                    name: s.state_dict() for name, s in self.coefficient_schedulers.items()
                },
            },
            checkpoint_path / shard_state_filename(self.mesh.shard_rank, self.mesh.shards),
        )

    def load_trainer_state(self, checkpoint_path: Path | str) -> None:
        """This slice's state from a checkpoint of a run with the same number
        of shards (the SAE's weights are re-sharded by the runner)."""
        checkpoint_path = Path(checkpoint_path)
        path = checkpoint_path / shard_state_filename(self.mesh.shard_rank, self.mesh.shards)
        if not path.exists():
            found = sorted(p.name for p in checkpoint_path.glob("trainer_state.shard*of*.pt"))
            raise ValueError(
                f"checkpoint {checkpoint_path} has no {path.name}: it was not written by a "
                f"run with shard_latents={self.mesh.shards} (found: {found or 'none'}); "
                "resume with the shard count it was written with."
            )
        state = torch.load(path, map_location=self.cfg.device)
        if tuple(state["shard_bounds"]) != tuple(self.shard.bounds):
            raise ValueError(
                f"{path} holds latents {state['shard_bounds'][:2]}, this rank "
                f"{tuple(self.shard.bounds)[:2]}: the SAE's width differs from the checkpoint's."
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.n_training_samples = state["n_training_samples"]
        self.n_training_steps = state["n_training_steps"]
        self.act_freq_scores = state["act_freq_scores"]
        self.n_forward_passes_since_fired = state["n_forward_passes_since_fired"]
        self.n_frac_active_samples = state["n_frac_active_samples"]
        self.started_fine_tuning = state["started_fine_tuning"]
        for name, scheduler_state in state["coefficient_schedulers"].items():
            self.coefficient_schedulers[name].load_state_dict(scheduler_state)
