"""Statistics that must describe the global batch, not one rank's share.

Dead latents
    SAETrainer counts, per latent, the tokens it fired on (``act_freq_scores``)
    and the steps since it last fired (``n_forward_passes_since_fired``); the
    dead-latent mask that AuxK reads, the sparsity logs and the final L0 /
    dead count all come from them. After each step :func:`reduce_step_stats`
    replaces each rank's local update by the global one: firing counts summed
    over ranks, and a latent counts as fired if it fired on any rank. The
    trainer's ``n_frac_active_samples`` already counts global tokens (it adds
    the configured global batch), so ``feature_sparsity`` is the global firing
    rate and every rank holds the same statistics, hence the same dead mask.

BatchTopK
    Selection is *local*: each rank keeps the top ``k * B_local`` activations
    of its own ``B_local = B / N`` tokens (SAELens's BatchTopK applied to the
    rank's share; selection over the global batch would need the other ranks'
    pre-activations before every encode). The running threshold follows
    SAELens's rule ``t <- (1 - lr) t + lr * m`` with ``m`` the smallest
    positive selected activation *over all ranks* (an all-reduced minimum: the
    minimum over the union of the local selections), so the threshold, which
    becomes the JumpReLU threshold of the saved model, is identical on every
    rank. :func:`global_topk_threshold_update` installs this for the run.

Activation normalisation
    ``expected_average_only_in``'s scaling factor comes from the mean token
    norm over the ranks' estimation batches (all ranks draw the same number of
    equal batches, so this is the mean over the global batches), and
    ``covariance_whitening`` is estimated from the global batches themselves
    (gathered from all ranks): identical factors on every rank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.training.types import DataProvider
from torch import Tensor

_UPDATE = "update_topk_threshold"


class StepStats(NamedTuple):
    """The statistics every rank holds after a step."""

    act_freq_scores_F: Tensor
    """Tokens each latent fired on, summed over ranks (since the last reset)."""
    since_fired_F: Tensor
    """Steps since each latent last fired on any rank."""
    stop_requested: bool
    """Whether any rank asked to stop after this step (a signal)."""


@torch.no_grad()
def reduce_step_stats(
    act_freq_before_F: Tensor,
    since_fired_before_F: Tensor,
    act_freq_after_F: Tensor,
    stop_requested: bool = False,
    process_group: Any = None,
) -> StepStats:
    """The global dead-latent statistics after a step, from the values before
    it and this rank's ``act_freq_scores`` after it, and whether any rank
    wants to stop.

    One all-reduce of d_sae + 1 floats: the summed firing counts also tell
    which latents fired anywhere (a count above zero), and the stop request
    rides along so that every rank stops after the same step.
    """
    import torch.distributed as dist

    counts = torch.cat(
        [act_freq_after_F - act_freq_before_F, act_freq_after_F.new_tensor([float(stop_requested)])]
    )
    dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=process_group)
    fired_count_F = counts[:-1]
    since_fired_F = torch.where(
        fired_count_F > 0,
        torch.zeros_like(since_fired_before_F),
        since_fired_before_F + 1,
    )
    return StepStats(act_freq_before_F + fired_count_F, since_fired_F, bool(counts[-1] > 0))


@contextlib.contextmanager
def global_topk_threshold_update(sae: torch.nn.Module, process_group: Any = None) -> Iterator[None]:
    """Within the block, a BatchTopK SAE's threshold update (SAELens's
    ``update_topk_threshold``, which stock and PolySAE BatchTopK/Matryoshka
    SAEs call after each training forward pass) sees the minimum positive
    selected activation over all ranks. A no-op for other SAEs."""
    original = getattr(sae, _UPDATE, None)
    if original is None or not isinstance(getattr(sae, "topk_threshold", None), Tensor):
        yield
        return
    had_instance_attr = _UPDATE in sae.__dict__

    @torch.no_grad()
    def update(acts: Tensor) -> None:
        original(_global_min_positive(acts, process_group))

    setattr(sae, _UPDATE, update)
    try:
        yield
    finally:
        if had_instance_attr:
            setattr(sae, _UPDATE, original)
        else:
            delattr(sae, _UPDATE)


def _global_min_positive(acts: Tensor, process_group: Any) -> Tensor:
    """A tensor holding the smallest positive entry of ``acts`` over all
    ranks, or an empty one if no rank has one: SAELens's update rule then
    takes its minimum (or skips the update) exactly as for the global batch."""
    import torch.distributed as dist

    if acts.is_sparse:
        acts = acts.coalesce().values()
    positive = acts[acts > 0]
    # float64 holds every float dtype's values exactly, and infinity for "none"
    local_min = positive.min() if positive.numel() else acts.new_tensor(torch.inf)
    min_1 = local_min.to(torch.float64).reshape(1)
    dist.all_reduce(min_1, op=dist.ReduceOp.MIN, group=process_group)
    global_min = min_1.to(acts.dtype)
    return global_min if torch.isfinite(min_1).all() else global_min[:0]


@dataclass
class DistributedActivationScaler(ActivationScaler):
    """SAELens's ``ActivationScaler`` whose estimates use every rank's batches
    (identical results on all ranks); applying and saving are unchanged."""

    process_group: Any = None
    """The ranks to estimate over (default: all)."""

    def estimate_scaling_factor(
        self,
        d_in: int,
        data_provider: DataProvider,
        n_batches_for_norm_estimate: int = int(1e3),
    ) -> None:
        import torch.distributed as dist

        super().estimate_scaling_factor(d_in, data_provider, n_batches_for_norm_estimate)
        local_factor: float = self.scaling_factor  # type: ignore[has-type]
        # equal token counts on every rank: the global mean norm is the mean of
        # the ranks' mean norms
        mean_norm = torch.tensor([d_in**0.5 / local_factor], dtype=torch.float64)
        dist.all_reduce(mean_norm, op=dist.ReduceOp.SUM, group=self.process_group)
        world_size = dist.get_world_size(self.process_group)
        self.scaling_factor = (d_in**0.5) / (mean_norm.item() / world_size)

    def estimate_whitening(
        self,
        d_in: int,
        data_provider: DataProvider,
        n_batches_for_norm_estimate: int = int(1e3),
        eps: float = 1e-3,
    ) -> None:
        super().estimate_whitening(
            d_in,
            _GlobalBatches(data_provider, self.process_group),
            n_batches_for_norm_estimate,
            eps,
        )


class _GlobalBatches:
    """An iterator of global batches: each rank's next local batch, gathered
    from all ranks in rank order (the estimate then runs identically
    everywhere, on the data a single process with the global batch would see)."""

    def __init__(self, local: DataProvider, process_group: Any) -> None:
        self._local = local
        self._group = process_group

    def __iter__(self) -> _GlobalBatches:
        return self

    def __next__(self) -> Tensor:
        import torch.distributed as dist

        batch_BD = next(self._local).contiguous()
        parts = [torch.empty_like(batch_BD) for _ in range(dist.get_world_size(self._group))]
        dist.all_gather(parts, batch_BD, group=self._group)
        return torch.cat(parts)
