"""Every sparse kernel against the dense computation: values and gradients."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from sae_lens.saes.batchtopk_sae import BatchTopK
from sae_lens.saes.sae import TrainStepInput

from polysae_lens.sparse import (
    code_from_dense,
    code_from_rows,
    gather_preacts,
    project_sparse,
    select_batch_topk,
    select_topk,
)

from .conftest import D_IN, D_SAE, make_training_sae

TOPK_STYLE = ["poly", "poly_batchtopk", "poly_matryoshka"]


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_gather_preacts_matches_dense_values_and_gradients() -> None:
    x = _rand(6, 5).requires_grad_()
    W = _rand(5, 9, seed=1).requires_grad_()
    b = _rand(9, seed=2).requires_grad_()
    with torch.no_grad():
        hidden = x @ W + b
    rows, cols = select_topk(hidden, 3)
    code = code_from_rows(cols.view(6, 3), torch.empty(6, 3), 9)
    sparse = gather_preacts(x, W, b, hidden, rows, cols, code.offsets_B)
    dense = (x @ W + b)[rows, cols]
    torch.testing.assert_close(sparse, dense)
    upstream = _rand(*sparse.shape, seed=3)
    grads_sparse = torch.autograd.grad((sparse * upstream).sum(), [x, W, b])
    grads_dense = torch.autograd.grad((dense * upstream).sum(), [x, W, b])
    for g_s, g_d in zip(grads_sparse, grads_dense, strict=True):
        torch.testing.assert_close(g_s, g_d)


def test_project_sparse_and_code_from_dense_match_dense_product() -> None:
    z = torch.relu(_rand(7, 20) - 1.0)  # ~16% nonzero, some rows may be empty
    z[3] = 0.0
    U = _rand(20, 4, seed=1)
    code = code_from_dense(z)
    torch.testing.assert_close(code.to_dense(), z)
    torch.testing.assert_close(project_sparse(code, U), z @ U)
    z3 = z.reshape(7, 1, 20)
    torch.testing.assert_close(project_sparse(code_from_dense(z3), U), z3 @ U)


def test_select_batch_topk_keeps_what_saelens_batchtopk_keeps() -> None:
    hidden = _rand(8, 30) - 0.5
    rows, cols = select_batch_topk(hidden, 4.0)
    mask = torch.zeros_like(hidden, dtype=torch.bool)
    mask[rows, cols] = True
    assert torch.equal(mask, BatchTopK(4.0)(hidden) > 0)
    assert bool((rows[1:] >= rows[:-1]).all()), "entries must be grouped by row"


def _step(sae: Any, x: torch.Tensor, dead: torch.Tensor) -> tuple[Any, dict[str, torch.Tensor]]:
    sae.zero_grad()
    output = sae.training_forward_pass(
        TrainStepInput(
            sae_in=x,
            coefficients={},
            dead_neuron_mask=dead,
            n_training_steps=0,
            is_logging_step=False,
        )
    )
    output.loss.backward()
    return output, {n: p.grad.clone() for n, p in sae.named_parameters()}


@pytest.mark.parametrize("arch", TOPK_STYLE)
@pytest.mark.parametrize("order", [1, 2, 3])
def test_sparse_training_step_matches_dense_step(arch: str, order: int) -> None:
    x = _rand(32, D_IN, seed=5).float() * 2
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::3] = True  # exercise the AuxK loss too
    sparse_sae = make_training_sae(arch, order)
    dense_sae = make_training_sae(arch, order)
    dense_sae.sparse_kernels = False
    out_s, grads_s = _step(sparse_sae, x, dead)
    out_d, grads_d = _step(dense_sae, x, dead)

    assert out_s.feature_acts.is_sparse and not out_d.feature_acts.is_sparse
    assert set(out_s.losses) == set(out_d.losses)
    assert out_s.losses["auxiliary_reconstruction_loss"] > 0
    for name in out_d.losses:
        torch.testing.assert_close(out_s.losses[name], out_d.losses[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_s.feature_acts.to_dense(), out_d.feature_acts)
    torch.testing.assert_close(out_s.sae_out, out_d.sae_out, rtol=1e-5, atol=1e-6)
    for name, grad in grads_d.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(grads_s[name], grad, rtol=1e-5, atol=1e-5 * scale, msg=name)
    if arch != "poly":
        torch.testing.assert_close(sparse_sae.topk_threshold, dense_sae.topk_threshold)


def test_hooks_disable_the_sparse_step() -> None:
    sae = make_training_sae("poly")
    seen: list[torch.Tensor] = []
    sae.hook_sae_acts_post.add_hook(lambda acts, hook: seen.append(acts))
    output, _ = _step(sae, _rand(4, D_IN).float(), torch.zeros(D_SAE, dtype=torch.bool))
    assert seen and not output.feature_acts.is_sparse


@pytest.mark.parametrize("arch", ["poly", "poly_jumprelu", "poly_gated", "poly_batchtopk"])
def test_sparse_and_dense_decode_agree(arch: str) -> None:
    sae = make_training_sae(arch).eval()
    z = sae.encode(_rand(16, D_IN, seed=9).float())
    z = z * (_rand(*z.shape, seed=4) > 1.0)  # ~16% of entries kept: the sparse path
    assert 0 < int((z != 0).sum()) <= 0.125 * z.numel()
    sparse_out = sae.decode(z)
    sae.sparse_kernels = False
    torch.testing.assert_close(sparse_out, sae.decode(z), rtol=1e-5, atol=1e-6)


def test_sparse_step_under_bf16_autocast_matches_dense_step() -> None:
    x = _rand(32, D_IN, seed=5).float()
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::4] = True
    results = []
    for sparse_kernels in (True, False):
        sae = make_training_sae("poly")
        sae.sparse_kernels = sparse_kernels
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(_step(sae, x, dead))
    (out_s, grads_s), (out_d, grads_d) = results
    assert out_s.feature_acts.is_sparse
    torch.testing.assert_close(out_s.loss.float(), out_d.loss.float(), rtol=2e-2, atol=1e-3)
    for name, grad in grads_d.items():
        assert grads_s[name].dtype == grad.dtype == torch.float32
        cos = torch.nn.functional.cosine_similarity(grads_s[name].flatten(), grad.flatten(), dim=0)
        assert cos > 0.99, name
