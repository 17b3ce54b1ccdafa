"""Gradient averaging: torch's DistributedDataParallel around the SAE's
training forward pass.

DDP reduces gradients from autograd hooks as the backward pass produces them
(bucketed all-reduces that overlap the rest of the backward pass) and waits
for them at the end of ``loss.backward()``. But it only arms those hooks for a
forward pass that goes through ``DistributedDataParallel.forward``, and
SAETrainer never calls the SAE's ``forward``: it calls
``sae.training_forward_pass(step_input=...)``. So :func:`ddp_training_forward`
wraps the SAE in a small module whose ``forward`` *is* the training forward
pass, wraps that in DDP, and while training routes
``sae.training_forward_pass`` through DDP (an attribute on the SAE instance,
removed afterwards). SAETrainer's own step then runs unchanged, in the order
that matters: backward (gradients averaged over ranks as it runs) ->
``clip_grad_norm_`` (sees the averaged gradients) -> ``optimizer.step()``
(+ PolySAE's retraction hook) on every rank with identical inputs.

Every loss SAELens and PolySAE train with is a mean over the batch's tokens,
so the average of the ranks' gradients is the gradient of the global batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from sae_lens.saes.sae import TrainingSAE, TrainStepInput, TrainStepOutput
    from torch.nn.parallel import DistributedDataParallel

    from polysae_lens.distributed.process_group import DistributedConfig

_ROUTE = "training_forward_pass"


class _TrainingForward(nn.Module):
    """``forward(step_input)`` = the SAE's training forward pass, for DDP."""

    _training_forward: Callable[..., Any]

    def __init__(self, sae: nn.Module, training_forward: Callable[..., Any]) -> None:
        super().__init__()
        self.sae = sae
        # a plain attribute: the bound method (or compiled function) is no module
        self.__dict__["_training_forward"] = training_forward

    def forward(self, step_input: TrainStepInput) -> TrainStepOutput:
        return self._training_forward(step_input=step_input)


@contextlib.contextmanager
def ddp_training_forward(
    sae: TrainingSAE[Any], config: DistributedConfig, process_group: Any = None
) -> Iterator[DistributedDataParallel]:
    """Within the block, ``sae.training_forward_pass`` runs through DDP, so
    the gradients of every backward pass after it are averaged over the ranks
    of ``process_group`` (default: all). Yields the DDP module.

    Building DDP broadcasts rank 0's parameters and buffers to every rank,
    so all ranks start from the same SAE. Buffers are not broadcast again at
    each forward pass: the only buffer training changes (BatchTopK's
    threshold) is kept identical by :mod:`polysae_lens.distributed.stats`.
    """
    from torch.nn.parallel import DistributedDataParallel

    had_instance_attr = _ROUTE in sae.__dict__
    original = getattr(sae, _ROUTE)  # the class's method, or torch.compile's wrapper
    ddp = DistributedDataParallel(
        _TrainingForward(sae, original),
        device_ids=None,  # inputs are already on the SAE's device
        process_group=process_group,
        bucket_cap_mb=config.bucket_cap_mb,
        find_unused_parameters=config.find_unused_parameters,
        **_no_buffer_sync_per_forward(),
    )

    def routed(step_input: TrainStepInput) -> TrainStepOutput:
        return ddp(step_input)

    setattr(sae, _ROUTE, routed)
    try:
        yield ddp
    finally:
        if had_instance_attr:
            setattr(sae, _ROUTE, original)
        else:
            delattr(sae, _ROUTE)


def _no_buffer_sync_per_forward() -> dict[str, Any]:
    """DDP's option for "sync buffers at construction, not at every forward":
    ``forward_sync_buffers=False`` where torch has it (2.13+, which deprecates
    the older spelling), else ``broadcast_buffers=False``."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}
