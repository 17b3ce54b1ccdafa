"""AuxK's own dead-latent window (``aux_dead_window``, :mod:`polysae_lens.dead_latents`)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import SAE, TrainingSAE
from sae_lens.saes.sae import TrainStepInput

from polysae_lens import (
    PolyBatchTopKTrainingSAE,
    PolyBatchTopKTrainingSAEConfig,
    PolyJumpReLUTrainingSAE,
    PolyJumpReLUTrainingSAEConfig,
    PolyTopKTrainingSAE,
    PolyTopKTrainingSAEConfig,
)
from polysae_lens.dead_latents import count_step_, dead_mask, fired_latents

from .compare import least_squares_residual

D_IN, D_SAE, K, RANKS = 6, 20, 2, (5, 2, 2)
VARIANTS = {
    "poly": (PolyTopKTrainingSAE, PolyTopKTrainingSAEConfig),
    "poly_batchtopk": (PolyBatchTopKTrainingSAE, PolyBatchTopKTrainingSAEConfig),
}


def make(name: str = "poly", **kwargs: Any) -> Any:
    cls, cfg_cls = VARIANTS[name]
    torch.manual_seed(0)
    return cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, k=K, poly_order=2, poly_ranks=RANKS, **kwargs))


def step_input(x: torch.Tensor, mask: torch.Tensor | None) -> TrainStepInput:
    return TrainStepInput(
        sae_in=x,
        coefficients={},
        dead_neuron_mask=mask,
        n_training_steps=0,
        is_logging_step=False,
    )


# ---- the pure functions -----------------------------------------------------------


def test_dead_mask_widens_the_trainers_mask_by_the_window() -> None:
    trainer = torch.tensor([True, False, False, False])
    since = torch.tensor([0, 3, 4, 5], dtype=torch.int32)
    assert dead_mask(trainer, since, 4).tolist() == [True, False, False, True]
    assert dead_mask(trainer, since, 2).tolist() == [True, True, True, True]
    assert dead_mask(trainer, since, 0) is trainer  # 0: the trainer's mask only
    assert dead_mask(None, since, 4) is None  # no AuxK this step stays so


def test_fired_latents_of_dense_and_sparse_codes() -> None:
    acts = torch.tensor([[0.0, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]])
    assert fired_latents(acts).tolist() == [False, True, False, True]
    assert fired_latents(acts.to_sparse()).tolist() == [False, True, False, True]
    # a stored zero or negative value is not a firing
    coo = torch.sparse_coo_tensor(torch.tensor([[0, 1], [0, 2]]), torch.tensor([0.0, -1.0]), (2, 4))
    assert fired_latents(coo).tolist() == [False, False, False, False]
    assert fired_latents(torch.zeros(3, 4)).tolist() == [False] * 4


def test_fired_latents_of_an_uncoalesced_code_sums_repeated_entries() -> None:
    # (0, 1) is stored twice: 1 - 3 = -2 is not a firing; (1, 1) = 3 is one; (1, 2) and
    # (0, 3) repeat with a positive sum: fired; a latent seen only with zeros is not
    coo = torch.sparse_coo_tensor(
        torch.tensor([[0, 0, 1, 1, 1, 0, 0, 1], [1, 1, 1, 2, 2, 3, 3, 0]]),
        torch.tensor([1.0, -3.0, 3.0, -1.0, 2.0, 0.5, 0.5, 0.0]),
        (2, 4),
    )
    assert not coo.is_coalesced()
    dense = coo.to_dense()
    expected = (dense > 0).any(0).tolist()
    assert expected == [False, True, True, True]
    assert fired_latents(coo).tolist() == expected
    assert fired_latents(coo.coalesce()).tolist() == expected


def test_count_step_restarts_the_fired_and_ages_the_rest() -> None:
    since = torch.tensor([0, 7, 2, 9], dtype=torch.int32)
    count_step_(since, torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    assert since.tolist() == [1, 0, 3, 10]
    count_step_(since, torch.zeros(2, 4))
    assert since.tolist() == [2, 1, 4, 11]


# ---- in the SAE ---------------------------------------------------------------------


def plain_auxk(
    sae: Any,
    x: torch.Tensor,
    out: torch.Tensor,
    dead_F: torch.Tensor,
    k_aux: int = D_IN // 2,
    outside_C2: bool = False,
) -> float:
    """Gao et al.'s AuxK through the order-2 decoder, written out here: each row's
    ``k_aux`` largest dead pre-activations decode the residual; with
    ``outside_C2`` the error is measured after removing its least-squares fit by
    C2's rows (its projection onto their row space)."""
    with torch.no_grad():
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        used = min(k_aux, int(dead_F.sum()))
        masked = torch.where(dead_F, pre, torch.tensor(-torch.inf))
        top = masked.topk(used, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
        a = z @ sae.U
        recon = a @ sae.C1 + sae.lambda2 * (a[:, : RANKS[1]] ** 2) @ sae.C2
        error = (recon - (x - out)).double()
        if outside_C2:
            error = least_squares_residual(error, [sae.C2])
        scale = min(int(dead_F.sum()) / k_aux, 1.0)
        loss = scale * (error**2).sum(-1).mean()
    return float(sae.cfg.aux_loss_coefficient * loss)


AUX_SETTINGS = {
    "defaults": ({}, K, True),
    "paper": ({"aux_k": "d_in/2", "aux_outside_interactions": False}, D_IN // 2, False),
    "k_aux 1": ({"aux_k": 1}, 1, True),
}
"""Config overrides -> (k_aux, compared outside C2's row space)."""


@pytest.mark.parametrize("setting", list(AUX_SETTINGS))
@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_aux_loss_takes_the_latents_silent_past_the_window(
    name: str, sparse: bool, setting: str
) -> None:
    overrides, k_aux, outside = AUX_SETTINGS[setting]
    sae = make(name, aux_dead_window=3, **overrides)
    sae.sparse_kernels = sparse
    sae.train()
    with torch.no_grad():
        sae.steps_since_fired.copy_(torch.tensor([0, 5, 3, 4] * 5, dtype=torch.int32))
    x = torch.randn(16, D_IN, generator=torch.Generator().manual_seed(1))
    trainer_mask = torch.zeros(D_SAE, dtype=torch.bool)
    trainer_mask[2] = True  # the trainer's own dead latent stays dead
    expected_dead = (sae.steps_since_fired > 3) | trainer_mask
    out = sae.training_forward_pass(step_input(x, trainer_mask))
    got = float(out.losses["auxiliary_reconstruction_loss"])
    assert got > 0
    reference = plain_auxk(sae, x, out.sae_out.detach(), expected_dead, k_aux, outside)
    assert got == pytest.approx(reference, rel=1e-4)
    # not vacuous: each setting differs from the others' rules
    for other, (_, other_k, other_outside) in AUX_SETTINGS.items():
        if other != setting:
            alternative = plain_auxk(
                sae, x, out.sae_out.detach(), expected_dead, other_k, other_outside
            )
            assert alternative != pytest.approx(got, rel=1e-3), other


def test_window_zero_is_saelens_auxk() -> None:
    sae = make(aux_dead_window=0)
    with torch.no_grad():
        sae.steps_since_fired.fill_(10_000)
    x = torch.randn(16, D_IN, generator=torch.Generator().manual_seed(1))
    out = sae.training_forward_pass(step_input(x, torch.zeros(D_SAE, dtype=torch.bool)))
    assert float(out.losses["auxiliary_reconstruction_loss"]) == 0.0


def test_a_training_step_counts_firing() -> None:
    sae = make()
    with torch.no_grad():
        sae.steps_since_fired.fill_(4)
    x = torch.randn(16, D_IN, generator=torch.Generator().manual_seed(2))
    out = sae.training_forward_pass(step_input(x, torch.zeros(D_SAE, dtype=torch.bool)))
    fired = (out.feature_acts.to_dense() > 0).any(0)
    assert 0 < int(fired.sum()) < D_SAE
    assert torch.equal(sae.steps_since_fired, torch.where(fired, 0, 5).to(torch.int32))


def test_samplers_without_auxk_keep_no_count() -> None:
    sae = PolyJumpReLUTrainingSAE(
        PolyJumpReLUTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, poly_order=2, poly_ranks=RANKS)
    )
    assert "steps_since_fired" not in sae.state_dict()


@pytest.mark.parametrize("bad", [-1, 1.5, True, "100"])
def test_config_rejects_a_bad_window(bad: Any) -> None:
    with pytest.raises(ValueError, match="aux_dead_window="):
        make(aux_dead_window=bad)


# ---- saving, loading, resuming ---------------------------------------------------------


@pytest.mark.parametrize("name", list(VARIANTS))
def test_count_travels_in_the_state_dict(name: str) -> None:
    sae = make(name)
    counts = torch.arange(D_SAE, dtype=torch.int32)
    with torch.no_grad():
        sae.steps_since_fired.copy_(counts)
    other = make(name, dtype="bfloat16")
    other.load_state_dict(sae.state_dict())
    assert other.steps_since_fired.dtype == torch.int32  # counts stay integers
    assert torch.equal(other.steps_since_fired, counts)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_count_is_saved_with_the_training_sae_only(tmp_path: Path, dtype: str) -> None:
    sae = make("poly", dtype=dtype)
    counts = torch.arange(D_SAE, dtype=torch.int32) * 7  # exact in bf16 too (< 256)
    with torch.no_grad():
        sae.steps_since_fired.copy_(counts)
    sae.save_model(tmp_path / "training")
    loaded = TrainingSAE.load_from_disk(tmp_path / "training", "cpu")
    assert loaded.steps_since_fired.dtype == torch.int32
    assert torch.equal(loaded.steps_since_fired, counts)
    inference = SAE.load_from_disk(tmp_path / "training", "cpu")
    assert "steps_since_fired" not in inference.state_dict()
    sae.save_inference_model(tmp_path / "inference")
    # an inference file (or one written before the count existed) trains on from 0
    fresh = TrainingSAE.load_from_disk(tmp_path / "inference", "cpu")
    assert torch.equal(fresh.steps_since_fired, torch.zeros(D_SAE, dtype=torch.int32))


def test_resume_from_the_state_dict_continues_exactly() -> None:
    """AuxK's mask follows the count, so resuming must restore it: with the
    window at 1, latents drop in and out of the mask every few steps."""
    # 4 rows x k 2 per step: most of the 20 latents are silent in any one step
    data = torch.randn(12, 4, D_IN, generator=torch.Generator().manual_seed(3))

    def steps(sae: Any, opt: torch.optim.Optimizer, batches: torch.Tensor) -> None:
        for x in batches:
            opt.zero_grad()
            out = sae.training_forward_pass(step_input(x, torch.zeros(D_SAE, dtype=torch.bool)))
            out.loss.backward()
            opt.step()

    straight = make(aux_dead_window=1)
    opt = torch.optim.Adam(straight.parameters(), lr=1e-2)
    steps(straight, opt, data[:6])
    saved_model = copy.deepcopy(straight.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    assert int(saved_model["steps_since_fired"].max()) > 1  # some were in AuxK's mask
    steps(straight, opt, data[6:])
    resumed = make(aux_dead_window=1)
    resumed.load_state_dict(saved_model)
    opt2 = torch.optim.Adam(resumed.parameters(), lr=1e-2)
    opt2.load_state_dict(saved_opt)
    steps(resumed, opt2, data[6:])
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    # a resume that lost the count would train differently
    lost = make(aux_dead_window=1)
    lost.load_state_dict({k: v for k, v in saved_model.items() if k != "steps_since_fired"})
    opt3 = torch.optim.Adam(lost.parameters(), lr=1e-2)
    opt3.load_state_dict(saved_opt)
    steps(lost, opt3, data[6:])
    assert not torch.equal(lost.W_enc, straight.W_enc)
