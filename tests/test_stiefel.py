"""The Stiefel retraction rides on SAELens's own trainer and on custom loops."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.config import SAETrainerConfig

from polysae_lens import PolyTopKSAE, PolyTopKSAEConfig, orthogonality_error, stiefel
from polysae_lens.stiefel import attach_stiefel_retraction

from .conftest import D_IN, make_training_sae

BATCH = 64


def batches(sae: Any, record: list[float] | None = None, seed: int = 0) -> Iterator[torch.Tensor]:
    """Random activations; before handing out each batch, record U's
    orthogonality error, i.e. its state after the previous optimizer step."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(D_IN, D_IN, generator=gen)
    while True:
        if record is not None:
            record.append(orthogonality_error(sae.U).item())
        yield torch.randn(BATCH, D_IN, generator=gen) @ mixing


def trainer_cfg(steps: int, **overrides: Any) -> SAETrainerConfig:
    overrides.setdefault("lr_end", overrides.get("lr", 3e-4))
    return SAETrainerConfig(
        total_training_samples=steps * BATCH, train_batch_size_samples=BATCH, **overrides
    )


def test_stock_trainer_keeps_u_orthonormal_after_every_step(arch: str) -> None:
    sae = make_training_sae(arch)
    u_start = sae.U.detach().clone()
    record: list[float] = []
    SAETrainer(cfg=trainer_cfg(300), sae=sae, data_provider=batches(sae, record)).fit()
    record.append(orthogonality_error(sae.U).item())
    assert len(record) == 301
    assert max(record) <= 1e-5
    assert not torch.allclose(sae.U, u_start), "U should have been trained"


def test_without_retraction_u_drifts() -> None:
    sae = make_training_sae("poly", stiefel_every_n_steps=0)
    SAETrainer(cfg=trainer_cfg(100, lr=1e-2), sae=sae, data_provider=batches(sae)).fit()
    assert orthogonality_error(sae.U).item() > 1e-3


def test_every_n_steps_retracts_on_multiples_of_n() -> None:
    sae = make_training_sae("poly", stiefel_every_n_steps=3)
    record: list[float] = []
    SAETrainer(cfg=trainer_cfg(9, lr=1e-2), sae=sae, data_provider=batches(sae, record)).fit()
    # record[i] is U after step i (record[0] is the start)
    assert all(record[i] <= 1e-5 for i in (0, 3, 6))
    assert all(record[i] > 1e-5 for i in (1, 2, 4, 5, 7, 8))


def test_only_poly_u_and_c1_parameters_are_touched_in_a_shared_optimizer() -> None:
    polys = [make_training_sae("poly", seed=s) for s in (0, 1)]
    stock = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=48, k=4))
    params = [p for m in (*polys, stock) for p in m.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    snapshot: dict[int, torch.Tensor] = {}

    def take_snapshot(opt: Any, args: Any, kwargs: Any) -> None:
        # per-optimizer post hooks run before the global retraction hook
        snapshot.update({id(p): p.detach().clone() for p in params})

    optimizer.register_step_post_hook(take_snapshot)
    x = torch.randn(32, D_IN)
    for _ in range(5):
        loss = sum(((m(x) - x) ** 2).sum() for m in (*polys, stock))
        loss.backward()  # type: ignore[union-attr]
        optimizer.step()
        optimizer.zero_grad()
        touched = {id(p) for p in params if not torch.equal(snapshot[id(p)], p)}
        assert touched == {id(m.U) for m in polys} | {id(m.C1) for m in polys}
    assert all(orthogonality_error(m.U) <= 1e-5 for m in polys)


def test_explicit_attach_for_custom_loops_and_no_double_retraction(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(0)
    inference = PolyTopKSAE(PolyTopKSAEConfig(d_in=D_IN, d_sae=48, k=4))
    training = make_training_sae("poly")
    optimizer = torch.optim.Adam([*inference.parameters(), *training.parameters()], lr=1e-2)
    handle = attach_stiefel_retraction(optimizer)
    calls: list[int] = []
    for name, real in list(stiefel.RETRACTIONS.items()):
        monkeypatch.setitem(
            stiefel.RETRACTIONS, name, lambda U, real=real: calls.append(1) or real(U)
        )
    # (the training SAE's gauge turn fuses into its retraction)
    fused = stiefel.turn_and_retract_
    monkeypatch.setattr(stiefel, "turn_and_retract_", lambda *args: calls.append(1) or fused(*args))
    x = torch.randn(32, D_IN)
    for _ in range(4):
        ((inference(x) - x) ** 2 + (training(x) - x) ** 2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert len(calls) == 8  # two SAEs, four steps, once each
    assert orthogonality_error(inference.U) <= 1e-5
    handle.remove()
    ((inference(x) - x) ** 2).sum().backward()
    optimizer.step()
    assert orthogonality_error(inference.U) > 1e-5


def test_attach_rejects_saes_the_optimizer_does_not_update() -> None:
    sae = make_training_sae("poly")
    other = make_training_sae("poly", seed=1)
    optimizer = torch.optim.Adam(sae.parameters())
    with pytest.raises(ValueError, match="not among this optimizer's parameters"):
        attach_stiefel_retraction(optimizer, [other])


def test_bfloat16_training_retracts_in_float32() -> None:
    sae = make_training_sae("poly", dtype="bfloat16")
    record: list[float] = []
    data = (b.to(torch.bfloat16) for b in batches(sae, record))
    SAETrainer(cfg=trainer_cfg(20), sae=sae, data_provider=data).fit()
    assert sae.U.dtype == torch.bfloat16
    # bf16 has an 8-bit mantissa: orthonormal up to its rounding
    assert max(record) < 2e-2


def test_projected_moments_lie_in_the_tangent_space() -> None:
    sae = make_training_sae("poly", stiefel_project_moments=True)
    trainer = SAETrainer(cfg=trainer_cfg(10, lr=1e-2), sae=sae, data_provider=batches(sae))
    trainer.fit()
    m = trainer.optimizer.state[sae.U]["exp_avg"]
    sym = sae.U.T @ m
    sym = (sym + sym.T) / 2
    assert sym.abs().max() < 1e-5 * max(1.0, m.abs().max().item())
    assert m.abs().max() > 0


@pytest.mark.parametrize(
    ("c1_scale", "u_scale"), [(None, None), (1.0, 1.0), (5.0, 0.3), ("d_sae/R1", None)]
)
def test_step_scales_are_per_parameter_adam_learning_rates(
    c1_scale: float | str | None, u_scale: float | None
) -> None:
    kwargs = {
        "c1_lr_scale": c1_scale,
        "u_lr_scale": u_scale,
        "stiefel_every_n_steps": 0,
        "gauge_lr_scale": 0.0,  # the reference optimizer runs no hooks
    }
    sae = make_training_sae("poly", **kwargs)
    reference = make_training_sae("poly", **kwargs)
    expected = {  # defaults: sqrt(d_sae / R1) and sqrt(R1 / d_sae)
        "C1": {None: 2.0, "d_sae/R1": 48 / 12}.get(c1_scale, c1_scale),  # type: ignore[arg-type]
        "U": 0.5 if u_scale is None else u_scale,
    }
    assert stiefel.c1_step_scale(sae) == expected["C1"]
    assert stiefel.u_step_scale(sae) == pytest.approx(expected["U"], rel=1e-12)
    # the reference gives C1 and U Adam param groups of their own with the scaled
    # lr, and is attached to no SAE (an empty explicit attach turns the automatic
    # hooks off)
    scaled = {getattr(reference, name) for name in expected}
    others = [p for p in reference.parameters() if p not in scaled]
    groups = [{"params": others}]
    groups += [{"params": [getattr(reference, n)], "lr": 1e-3 * m} for n, m in expected.items()]
    ref_opt = torch.optim.Adam(groups, lr=1e-3)
    attach_stiefel_retraction(ref_opt, [])
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    x = torch.randn(32, D_IN)
    for _ in range(3):
        for model, optimizer in ((sae, opt), (reference, ref_opt)):
            ((model(x) - x) ** 2).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    for name in ("C1", "U", "W_enc"):
        torch.testing.assert_close(
            getattr(sae, name), getattr(reference, name), rtol=1e-5, atol=1e-7
        )


@pytest.mark.parametrize(("rows", "cols", "block"), [(300, 40, 128), (700, 300, 128), (90, 45, 16)])
def test_blocked_gram_and_triangular_product_match_full_products(
    rows: int, cols: int, block: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stiefel, "ROW_CHUNK", 64)  # several chunks, the last one partial
    gen = torch.Generator().manual_seed(0)
    Q = torch.randn(rows, cols, generator=gen)
    T = torch.randn(cols, cols, generator=gen).triu()
    gram = stiefel.symmetric_gram(Q, block)
    torch.testing.assert_close(gram, Q.T @ Q, rtol=1e-5, atol=1e-4)
    assert torch.equal(gram, gram.T)
    expected = Q @ T
    assert stiefel.times_upper_triangular_(Q, T, block) is Q
    torch.testing.assert_close(Q, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("block", "row_chunk"), [(16, 50), (64, 1000), (300, 7), (None, None)])
def test_cholesky_pass_blocking_changes_only_rounding(
    block: int | None, row_chunk: int | None
) -> None:
    gen = torch.Generator().manual_seed(2)
    U = torch.linalg.qr(torch.randn(700, 300, generator=gen))[0]
    U = U + 1e-3 * torch.randn(700, 300, generator=gen)
    Q = U.clone()
    assert stiefel.cholesky_qr_pass_(Q, block=block, row_chunk=row_chunk)
    # one pass from Q^T Q = L L^T: Q = U L^-T, written out without blocking
    L = torch.linalg.cholesky(U.double().T @ U.double())
    expected = torch.linalg.solve_triangular(L, U.double().T, upper=False).T
    torch.testing.assert_close(Q.double(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("rows", "cols"), [(200, 30), (700, 300)])
@pytest.mark.parametrize("perturbation", [1e-3, 0.3])
def test_cholesky_qr_retraction_gives_householders_q(
    rows: int, cols: int, perturbation: float
) -> None:
    # (700, 300) takes the blocked Gram and triangular products
    gen = torch.Generator().manual_seed(1)
    U = stiefel.qr_retract(torch.randn(rows, cols, generator=gen))
    U = U + perturbation * torch.randn(rows, cols, generator=gen)  # an optimizer step
    Q = stiefel.cholesky_qr_retract(U)
    assert orthogonality_error(Q) < 2e-6
    torch.testing.assert_close(Q, stiefel.qr_retract(U), rtol=0, atol=2e-5)
    Q_bf16 = stiefel.cholesky_qr_retract(U.to(torch.bfloat16))
    assert Q_bf16.dtype == torch.bfloat16 and orthogonality_error(Q_bf16) < 0.05


@pytest.mark.parametrize("layout", ["float32", "bfloat16", "transposed_view"])
def test_in_place_retraction_writes_householders_q_into_u(layout: str) -> None:
    gen = torch.Generator().manual_seed(4)
    U = stiefel.qr_retract(torch.randn(300, 40, generator=gen))
    U = U + 1e-2 * torch.randn(300, 40, generator=gen)
    if layout == "bfloat16":
        U = U.to(torch.bfloat16)
    elif layout == "transposed_view":
        U = U.T.contiguous().T
    expected = stiefel.qr_retract(U)
    for retract in stiefel.RETRACTIONS.values():
        V = U.clone() if layout != "transposed_view" else U.T.contiguous().T
        storage, strides = V.data_ptr(), V.stride()
        assert retract(V) is V
        assert (V.data_ptr(), V.stride()) == (storage, strides)
        tol = 2e-2 if layout == "bfloat16" else 2e-6
        torch.testing.assert_close(V, expected, rtol=0, atol=tol)


def _count_grams(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = stiefel.symmetric_gram
    monkeypatch.setattr(stiefel, "symmetric_gram", lambda Q, *a: calls.append(1) or real(Q, *a))
    return calls


@pytest.mark.parametrize("perturbation", [1e-4, 1e-3])
def test_one_cholesky_pass_one_step_after_a_retraction(
    monkeypatch: pytest.MonkeyPatch, perturbation: float
) -> None:
    # U one Adam-sized step from the manifold: one Gram matrix, one product
    gen = torch.Generator().manual_seed(2)
    U = stiefel.qr_retract(torch.randn(700, 300, generator=gen))
    U = U + perturbation * torch.randn(700, 300, generator=gen).sign()
    calls = _count_grams(monkeypatch)
    Q = stiefel.cholesky_qr_retract(U)
    assert len(calls) == 1
    assert orthogonality_error(Q) < 2e-6
    torch.testing.assert_close(Q, stiefel.qr_retract(U), rtol=0, atol=2e-6)


@pytest.mark.parametrize("condition", [1.5, 30.0])
def test_ill_conditioned_u_takes_the_second_cholesky_pass(
    monkeypatch: pytest.MonkeyPatch, condition: float
) -> None:
    gen = torch.Generator().manual_seed(3)
    Q0 = stiefel.qr_retract(torch.randn(700, 300, generator=gen))
    V = stiefel.qr_retract(torch.randn(300, 300, generator=gen))
    singular_values = torch.logspace(0, math.log10(condition), 300)
    U = (Q0 * singular_values) @ V.T
    calls = _count_grams(monkeypatch)
    Q = stiefel.cholesky_qr_retract(U)
    assert len(calls) == 2
    assert orthogonality_error(Q) < 2e-6
    torch.testing.assert_close(Q, stiefel.qr_retract(U), rtol=0, atol=2e-6)


def test_second_pass_decision_bounds_the_spectral_norm() -> None:
    # rank one: the Frobenius norm is the spectral norm and certifies up to the
    # limit; beyond it the power iteration finds the norm at once
    w = torch.randn(300, generator=torch.Generator().manual_seed(0))
    w = w / w.norm()
    for norm, expected in ((0.1, False), (0.45, False), (0.6, True), (2.0, True)):
        assert stiefel._needs_second_pass(norm * torch.outer(w, w)) is expected
    # full rank: Frobenius norm above the limit, so the power-iteration estimate
    # decides, with a factor 2 of margin
    noise = torch.randn(300, 300, generator=torch.Generator().manual_seed(0))
    sym = (noise + noise.T) / 2
    sym = sym / torch.linalg.matrix_norm(sym, ord=2)
    for spectral_norm, expected in ((0.1, False), (0.2, False), (0.3, True)):
        deviation = spectral_norm * sym
        assert deviation.norm() > stiefel.ONE_PASS_MAX_DEVIATION
        assert stiefel._needs_second_pass(deviation) is expected


def test_saetrainer_adam_switches_to_the_fused_kernel_with_the_same_steps() -> None:
    runs = {}
    for fused in (True, False):
        sae = make_training_sae("poly", fused_adam=fused)
        trainer = SAETrainer(cfg=trainer_cfg(20), sae=sae, data_provider=batches(sae))
        trainer.fit()
        runs[fused] = (sae, trainer.optimizer)
    assert all(g["fused"] is True for g in runs[True][1].param_groups)
    assert all(g["fused"] is None for g in runs[False][1].param_groups)
    for (name, p_fused), p_plain in zip(
        runs[True][0].named_parameters(), runs[False][0].parameters(), strict=True
    ):
        torch.testing.assert_close(p_fused, p_plain, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "case", ["foreach", "explicitly_unfused", "has_state", "sgd", "mixed_request"]
)
def test_fused_switch_leaves_other_optimizers_alone(case: str) -> None:
    sae = make_training_sae("poly")
    other = make_training_sae("poly", seed=1, fused_adam=case != "mixed_request")
    params = [*sae.parameters(), *other.parameters()]
    kwargs = {"foreach": {"foreach": True}, "explicitly_unfused": {"fused": False}}
    if case == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(params, lr=1e-3)
    else:
        optimizer = torch.optim.Adam(params, lr=1e-3, **kwargs.get(case, {}))
    if case == "has_state":  # e.g. loaded from a checkpoint of an unfused run
        optimizer.state[sae.U]["step"] = torch.tensor(1.0)
    before = [dict(g) for g in optimizer.param_groups]
    assert stiefel.use_fused_adam(optimizer, [sae, other]) is False
    assert [dict(g) for g in optimizer.param_groups] == before


def test_deep_copies_of_a_polysae_are_retracted_too(arch: str) -> None:
    # deepcopy rebuilds the module without __init__ (whole SAELens SAEs do not
    # pickle: their hook_z reshaping holds a lambda)
    import copy

    sae = make_training_sae(arch)
    twin = copy.deepcopy(sae)
    assert twin.U is not sae.U
    optimizer = torch.optim.Adam(twin.parameters(), lr=0.05)
    x = torch.randn(32, D_IN, generator=torch.Generator().manual_seed(2))
    for _ in range(3):
        (twin(x) - x).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        assert orthogonality_error(twin.U) < 1e-5
