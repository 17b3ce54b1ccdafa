"""Latent-sharded PolySAE (polysae_lens.distributed.sharded) with 2 gloo ranks on CPU.

One spawn runs every scenario (:mod:`tests.sharded_workers`); the reference is a
plain single-process PolySAE built from the same weights (dense autograd, the
automatic Stiefel hooks), sharing no sharding code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from polysae_lens.distributed.sharded import shard_bounds

from . import sharded_workers as workers
from .compare import relative_error
from .spawn import run_ranks

SPAWN_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out_dir = tmp_path_factory.mktemp("sharded")
    return run_ranks(
        workers.rank_main,
        lambda rank: (rank, str(out_dir)),
        workers.WORLD_SIZE,
        SPAWN_TIMEOUT_S,
        Path(out_dir),
    )


SHARDED = {"W_enc": 1, "b_enc": 0, "U": 0}
"""Sharded parameter -> its latent dimension."""


@pytest.mark.parametrize("x_grad", [False, True])
def test_outputs_selection_and_gradients_equal_unsharded(
    runs: list[dict[str, Any]], x_grad: bool
) -> None:
    sae = workers.make_sae("float64")
    x = workers.batch(0, torch.float64).requires_grad_(x_grad)
    out = sae(x)
    (out - x).pow(2).sum(-1).mean().backward()
    with torch.no_grad():
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    ref_cols = pre.topk(workers.K, dim=-1).indices.sort(dim=-1).values

    widths = []
    for run in runs:
        got = run[f"grads_{x_grad}"]
        start, stop, _ = got["bounds"]
        widths.append(stop - start)
        assert torch.equal(got["cols_BK"], ref_cols)
        assert torch.allclose(got["sae_out"], out.detach(), rtol=1e-12, atol=1e-12)
        for name, param in sae.named_parameters():
            ref = param.grad
            assert ref is not None and ref.abs().max() > 0, name  # not vacuous
            if name in SHARDED:
                ref = ref.narrow(SHARDED[name], start, stop - start)
            assert torch.allclose(got["grads"][name], ref, rtol=1e-10, atol=1e-12), name
        if x_grad:
            assert x.grad is not None
            assert torch.allclose(got["x_grad"], x.grad, rtol=1e-10, atol=1e-12)
    assert widths == [13, 12]  # the uneven split was exercised
    # replicated gradients are bitwise identical across ranks
    for name in ("b_dec", "C1", "C2", "C3", "lambda2", "lambda3"):
        grads = [run[f"grads_{x_grad}"]["grads"][name] for run in runs]
        assert torch.equal(grads[0], grads[1]), name


def _train_unsharded(gauge: float) -> tuple[Any, torch.optim.Adam, list[float]]:
    """The plain PolySAE trained on the workers' batches; the automatic hooks
    apply C1's and U's step scales, the gauge step and the retraction."""
    sae = workers.make_sae("float32", gauge_lr_scale=gauge)
    optimizer = torch.optim.Adam(sae.parameters(), lr=workers.LR)
    losses = []
    for step in range(workers.TRAIN_STEPS):
        x = workers.batch(step, torch.float32)
        optimizer.zero_grad()
        loss = (sae(x) - x).pow(2).sum(-1).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return sae, optimizer, losses


@pytest.mark.parametrize("gauge", workers.GAUGE_SCALES)
def test_training_run_equals_unsharded(runs: list[dict[str, Any]], gauge: float) -> None:
    initial = workers.make_sae("float32").state_dict()
    sae, optimizer, losses = _train_unsharded(gauge)
    train = [run[f"train_{gauge}"] for run in runs]
    state = train[0]["state"]
    assert train[1]["state"] is None
    workers.make_sae("float32").load_state_dict(state)  # the ordinary format, every key
    for name, param in sae.named_parameters():
        assert relative_error(state[name], param.detach()) < 1e-5, name
        assert relative_error(initial[name], param.detach()) > 1e-3, name  # it trained
    assert train[0]["losses"] == pytest.approx(losses, rel=1e-5)
    assert train[0]["losses"] == train[1]["losses"]
    for name, value in train[0]["replicated"].items():
        assert torch.equal(value, train[1]["replicated"][name]), name
    # the gauge step's Adam moments: the unsharded ones, identical on both ranks
    reference = {k: v for k, v in optimizer.state[sae.U].items() if k.startswith("gauge_")}
    assert set(train[0]["gauge_moments"]) == set(reference)
    assert bool(reference) == (gauge > 0)
    for key, value in reference.items():
        got = train[0]["gauge_moments"][key]
        if isinstance(value, torch.Tensor):
            assert value.abs().max() > 0, key  # not vacuous
            assert relative_error(got, value) < 1e-4, key
            assert torch.equal(got, train[1]["gauge_moments"][key]), key
        else:
            assert got == value == workers.TRAIN_STEPS, key


def test_the_gauge_step_changes_the_sharded_run(runs: list[dict[str, Any]]) -> None:
    """With and without the gauge step the runs differ by far more than the
    tolerance above, so the equality with gauge on is not the gauge-off run's."""
    on, off = (runs[0][f"train_{gauge}"]["state"] for gauge in (1.0, 0.0))
    assert relative_error(on["U"], off["U"]) > 1e-2
    assert relative_error(on["C1"], off["C1"]) > 1e-2


def test_U_orthonormal_across_the_union_of_the_shards(runs: list[dict[str, Any]]) -> None:
    U = runs[0]["train_1.0"]["state"]["U"]
    assert U.shape == (workers.D_SAE, workers.RANKS[0])
    eye = torch.eye(U.shape[1])
    assert (U.T @ U - eye).abs().max() < 1e-5
    # each rank's rows alone are not orthonormal: the check needs the union
    top = U[:13]
    assert (top.T @ top - eye).abs().max() > 1e-2
    assert set(runs[0]["train_1.0"]["passes"]) <= {1, 2}


def test_retraction_far_from_the_manifold_equals_householder_qr(
    runs: list[dict[str, Any]],
) -> None:
    from polysae_lens.stiefel import qr_retract

    U = workers.far_from_orthonormal()
    assert (U.T @ U - torch.eye(U.shape[1])).abs().max() > 1  # a second pass is needed
    assert [run["retract"]["passes"] for run in runs] == [2, 2]
    union = torch.cat([run["retract"]["U_rows"] for run in runs])
    assert relative_error(union, qr_retract(U)) < 1e-5


def test_shard_bounds_split_unevenly_and_refuse_too_narrow_shards() -> None:
    assert [tuple(shard_bounds(10, 3, r)) for r in range(3)] == [
        (0, 4, 10),
        (4, 7, 10),
        (7, 10, 10),
    ]
    with pytest.raises(ValueError, match="fewer than k=3"):
        shard_bounds(5, 2, 0, k=3)
    with pytest.raises(ValueError, match="rank=2"):
        shard_bounds(10, 2, 2)


def test_unsupported_sparsifier_is_refused() -> None:
    from sae_lens import TrainingSAE

    from polysae_lens.distributed.sharded import shard_poly_sae

    sae = TrainingSAE.from_dict(
        {"architecture": "poly_batchtopk", "d_in": 8, "d_sae": 16, "k": 2, "poly_ranks": [4, 2, 2]}
    )
    with pytest.raises(ValueError, match="TopK PolySAE"):
        shard_poly_sae(sae, 0, 2)
    topk = workers.make_sae("float32")
    topk.cfg.stiefel_every_n_steps = 2
    with pytest.raises(ValueError, match=r"stiefel_every_n_steps=2 .*set stiefel_every_n_steps=1"):
        shard_poly_sae(topk, 0, 2)
