"""PolySAE's own count of steps since each latent fired, for the AuxK loss.

SAELens's trainer hands the AuxK loss the latents that fired in none of the last
``dead_feature_window`` steps (1000 by default). A TopK SAE's losers stop firing
altogether and are caught by it. PolySAE's losers do not (measured on in-class
data, ``docs/inclass-plateau.md``): about 7% of its latents keep firing a few
times per thousand steps on rows they do not explain, match no planted atom and
never recover, because the trainer's window never counts them as dead. PolySAE
therefore also counts, in a buffer of its own (``steps_since_fired`` [d_sae],
int32, saved with the training SAE so that resuming is exact), and the AuxK loss
treats as dead every latent that the trainer's mask names or that fired in none
of the last ``aux_dead_window`` steps.

Multi-rank trainers overwrite the buffer with their global count after each step
(:func:`set_steps_since_fired_`), so every replica uses the same mask.

Shape key: ``B`` batch rows, ``F`` latents (``d_sae``).
"""

from __future__ import annotations

import dataclasses

import torch
from sae_lens.saes.sae import TrainStepInput
from torch import Tensor, nn

BUFFER = "steps_since_fired"
"""Name of the training SAE's buffer (a key of its training state dict)."""


def register_counter(module: nn.Module, d_sae: int, device: torch.device | str) -> None:
    """Give ``module`` a zeroed ``steps_since_fired`` buffer (persistent)."""
    module.register_buffer(BUFFER, torch.zeros(d_sae, dtype=torch.int32, device=device))


def dead_mask(trainer_mask_F: Tensor | None, since_fired_F: Tensor, window: int) -> Tensor | None:
    """The trainer's mask, widened to the latents that fired in none of the last
    ``window`` steps; ``None`` (no AuxK this step) stays ``None``, and
    ``window == 0`` keeps the trainer's mask as it is."""
    if trainer_mask_F is None or window == 0:
        return trainer_mask_F
    return trainer_mask_F.bool() | (since_fired_F.to(trainer_mask_F.device) > window)


def with_dead_mask(
    step_input: TrainStepInput, since_fired_F: Tensor, window: int
) -> TrainStepInput:
    """``step_input`` whose ``dead_neuron_mask`` is :func:`dead_mask`'s."""
    mask = dead_mask(step_input.dead_neuron_mask, since_fired_F, window)
    if mask is step_input.dead_neuron_mask:
        return step_input
    return dataclasses.replace(step_input, dead_neuron_mask=mask)


def fired_latents(feature_acts_BF: Tensor) -> Tensor:
    """[F] bool: which latents are positive in at least one row (dense or 2-D COO)."""
    if feature_acts_BF.is_sparse:
        # a count of positive entries per latent, without boolean indexing (a
        # host sync); coalesced first only if it is not (repeated entries sum)
        acts = feature_acts_BF.detach()
        acts = acts if acts.is_coalesced() else acts.coalesce()
        positive_N = (acts.values() > 0).to(torch.int32)
        fired_F = torch.zeros(acts.shape[-1], dtype=torch.int32, device=acts.device)
        return fired_F.index_add_(0, acts.indices()[-1], positive_N) > 0
    return (feature_acts_BF.detach() > 0).reshape(-1, feature_acts_BF.shape[-1]).any(0)


@torch.no_grad()
def count_step_(since_fired_F: Tensor, feature_acts_BF: Tensor) -> None:
    """One training step: every count grows by one, the fired latents' restart at 0."""
    fired_F = fired_latents(feature_acts_BF).to(since_fired_F.device)
    since_fired_F.add_(1).masked_fill_(fired_F, 0)


@torch.no_grad()
def set_steps_since_fired_(sae: nn.Module, since_fired_F: Tensor) -> None:
    """Overwrite ``sae``'s count (if it keeps one) with a trainer's global count."""
    counter = getattr(sae, BUFFER, None)
    if isinstance(counter, Tensor):
        counter.copy_(since_fired_F.to(counter.device).round().to(counter.dtype))
