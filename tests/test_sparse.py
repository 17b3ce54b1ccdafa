"""Every sparse kernel against the dense computation: values and gradients."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from sae_lens.saes.batchtopk_sae import BatchTopK
from sae_lens.saes.sae import TrainStepInput
from sae_lens.saes.topk_sae import TopK

import polysae_lens
from polysae_lens import sparse
from polysae_lens.sparse import (
    code_from_dense,
    code_from_rows,
    code_if_sparse,
    entry_dots,
    gather_preacts,
    latent_major,
    project_sparse,
    select_batch_topk,
    select_topk,
    topk_activation,
    topk_indices,
    transposed_product,
    transposed_product_DF,
)

from .conftest import D_IN, D_SAE, make_training_sae, randomize_

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
    sparse = gather_preacts(x, W, b, hidden, code)
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
    # the sparse step selects from a bf16 product with the bias fused in
    assert out_s.hidden_pre.dtype == torch.bfloat16
    sae = make_training_sae("poly")
    with torch.no_grad():
        reference = (x - sae.b_dec) @ sae.W_enc + sae.b_enc  # float32, no autocast
    torch.testing.assert_close(out_s.hidden_pre.float(), reference, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out_s.loss.float(), out_d.loss.float(), rtol=2e-2, atol=1e-3)
    for name, grad in grads_d.items():
        assert grads_s[name].dtype == grad.dtype == torch.float32
        cos = torch.nn.functional.cosine_similarity(grads_s[name].flatten(), grad.flatten(), dim=0)
        assert cos > 0.99, name


# ---- the kernels of the fast training step ------------------------------------


@pytest.mark.parametrize(
    ("rows", "cols", "k"), [(9, 256, 4), (5, 640, 16), (7, 48, 4), (3, 100, 5)]
)
def test_topk_indices_selects_torch_topks_set(rows: int, cols: int, k: int) -> None:
    # (256, 4) and (640, 16) take the grouped two-stage path; the others fall back
    x = _rand(rows, cols, seed=11).float()
    expected = x.topk(k, dim=-1).indices.sort(-1).values
    assert torch.equal(topk_indices(x, k).sort(-1).values, expected)
    _, sel_cols = select_topk(x, k)
    assert torch.equal(sel_cols.view(rows, k), expected)


def test_topk_indices_keeps_topks_values_with_ties_and_masked_entries() -> None:
    x = torch.randint(0, 6, (16, 512), generator=torch.Generator().manual_seed(3)).float()
    x[:, ::3] = -torch.inf  # AuxK masks live latents with -inf
    for k in (8, 24):
        picked = x.gather(1, topk_indices(x, k)).sort(-1).values
        assert torch.equal(picked, x.topk(k, dim=-1).values.sort(-1).values)
        assert all(len(set(row.tolist())) == k for row in topk_indices(x, k))


def test_topk_activation_matches_saelens_topk_values_and_gradients() -> None:
    x = _rand(6, 3, 320, seed=12).requires_grad_()
    ours = topk_activation(x, 8).acts_BF
    theirs = TopK(8)(x)
    torch.testing.assert_close(ours, theirs)
    upstream = _rand(6, 3, 320, seed=13)
    (g_ours,) = torch.autograd.grad((ours * upstream).sum(), x)
    (g_theirs,) = torch.autograd.grad((theirs * upstream).sum(), x)
    torch.testing.assert_close(g_ours, g_theirs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_transposed_product_is_codeT_times_x(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    z = torch.relu(_rand(10, 40, seed=14) - 1.0)
    z[4] = 0.0
    code = code_from_dense(z)
    X = _rand(10, 6, seed=15).to(dtype)
    by_latent = latent_major(code.rows_N, code.cols_N, code.d_sae)
    got = transposed_product(by_latent, code.vals_N, X)
    assert got.dtype == dtype
    expected = (z.T @ X.double()).to(dtype)
    tol = {"rtol": 1e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(got, expected, **tol)
    # in W_enc's layout, in chunks of latents: several chunks, one of them empty
    # (latents 14-20 are never active), the last one partial
    z[:, 14:28] = 0.0
    code = code_from_dense(z)
    by_latent = latent_major(code.rows_N, code.cols_N, code.d_sae)
    monkeypatch.setattr(sparse, "LATENT_CHUNK", 7)
    got_DF = transposed_product_DF(by_latent, code.vals_N, X)
    assert got_DF.dtype == dtype and got_DF.is_contiguous()
    torch.testing.assert_close(got_DF, (X.double().T @ z).to(dtype), **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_entry_dots_are_the_dense_product_at_the_codes_entries(dtype: torch.dtype) -> None:
    # float32/64 take the sampled matmul, bf16 the embedding_bag kernel; rows 0,
    # 4 and 9 are empty (a BatchTopK code), the rest have different counts
    z = torch.relu(_rand(10, 40, seed=30) - 0.8)
    z[[0, 4, 9]] = 0.0
    code = code_from_dense(z)
    A = _rand(10, 6, seed=31).to(dtype)
    U = _rand(40, 6, seed=32).to(dtype)
    got = entry_dots(code, A, U)
    assert got.dtype == dtype and got.shape == code.cols_N.shape
    expected = (A.double() @ U.double().T)[code.rows_N, code.cols_N].to(dtype)
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(got, expected, **tol)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("prebuilt", [False, True])
def test_project_sparse_gradients_match_dense_product(autocast: bool, prebuilt: bool) -> None:
    z = torch.relu(_rand(7, 20, seed=16) - 1.0)
    z[[0, 3, 6]] = 0.0  # empty rows, first and last included
    dtype = torch.float32 if autocast else torch.float64
    U = _rand(20, 4, seed=17).to(dtype).requires_grad_()
    vals = code_from_dense(z).vals_N.to(dtype).requires_grad_()
    code = code_from_dense(z).with_vals(vals)
    if prebuilt:
        code = code.with_latent_major()
    dense_z = code.to_dense()  # differentiable in vals
    upstream = _rand(7, 4, seed=18).to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        sparse = project_sparse(code, U)
    dense = dense_z @ U
    torch.testing.assert_close(sparse, dense)
    g_sparse = torch.autograd.grad((sparse * upstream).sum(), [U, vals])
    g_dense = torch.autograd.grad((dense * upstream).sum(), [U, vals])
    for g_s, g_d in zip(g_sparse, g_dense, strict=True):
        torch.testing.assert_close(g_s, g_d)


def test_gather_preacts_gives_the_input_shift_its_subtraction_gradient() -> None:
    x = _rand(6, 5, seed=19)
    shift = _rand(5, seed=20).requires_grad_()
    W = _rand(5, 40, seed=21).requires_grad_()
    b = _rand(40, seed=22).requires_grad_()
    sae_in = x - shift
    with torch.no_grad():
        hidden = sae_in @ W + b
    rows, cols = select_topk(hidden, 3)
    code = code_from_rows(cols.view(6, 3), torch.empty(6, 3), 40)
    sparse = gather_preacts(sae_in.detach(), W, b, hidden, code, input_shift_D=shift)
    dense = ((x - shift) @ W + b)[rows, cols]
    torch.testing.assert_close(sparse, dense)
    upstream = _rand(*sparse.shape, seed=23)
    grads_sparse = torch.autograd.grad((sparse * upstream).sum(), [shift, W, b])
    grads_dense = torch.autograd.grad((dense * upstream).sum(), [shift, W, b])
    for g_s, g_d in zip(grads_sparse, grads_dense, strict=True):
        torch.testing.assert_close(g_s, g_d)


@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
@pytest.mark.parametrize("input_requires_grad", [False, True])
def test_sparse_step_with_grouped_selection_matches_dense_step(
    apply_b_dec_to_input: bool, input_requires_grad: bool
) -> None:
    # d_sae 256: the selection takes topk_indices' grouped path (also for AuxK)
    x = (_rand(32, D_IN, seed=24).float() * 2).requires_grad_(input_requires_grad)
    dead = torch.zeros(256, dtype=torch.bool)
    dead[::3] = True
    saes = [
        make_training_sae("poly", d_sae=256, apply_b_dec_to_input=apply_b_dec_to_input)
        for _ in range(2)
    ]
    saes[1].sparse_kernels = False
    (out_s, grads_s), (out_d, grads_d) = (_step(sae, x, dead) for sae in saes)
    assert out_s.feature_acts.is_sparse
    torch.testing.assert_close(out_s.feature_acts.to_dense(), out_d.feature_acts)
    torch.testing.assert_close(out_s.loss, out_d.loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads_d.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(grads_s[name], grad, rtol=1e-5, atol=1e-5 * scale, msg=name)
    if input_requires_grad:
        (g_s,) = torch.autograd.grad(_step_loss(saes[0], x, dead), x)
        (g_d,) = torch.autograd.grad(_step_loss(saes[1], x, dead), x)
        torch.testing.assert_close(g_s, g_d, rtol=1e-5, atol=1e-6)


def _step_loss(sae: Any, x: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    step_input = TrainStepInput(
        sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False
    )
    return sae.training_forward_pass(step_input).loss  # type: ignore[no-any-return]


def test_inference_encode_matches_saelens_topk_encode_with_hooks() -> None:
    cfg = polysae_lens.PolyTopKSAEConfig(d_in=D_IN, d_sae=256, k=6, poly_ranks=(12, 5, 3))
    sae = randomize_(polysae_lens.PolyTopKSAE(cfg))
    x = _rand(5, 3, D_IN, seed=25).float()
    seen: list[torch.Tensor] = []
    sae.hook_sae_acts_post.add_hook(lambda acts, hook: seen.append(acts))
    fast = sae.encode(x)
    sae.sparse_kernels = False
    torch.testing.assert_close(fast, sae.encode(x))
    assert len(seen) == 2 and fast.shape == (5, 3, 256)
    assert int((fast != 0).sum(-1).max()) <= 6


def _inference_sae(sparse_kernels: bool = True) -> polysae_lens.PolyTopKSAE:
    torch.manual_seed(0)
    cfg = polysae_lens.PolyTopKSAEConfig(d_in=D_IN, d_sae=256, k=6, poly_ranks=(12, 5, 3))
    sae = randomize_(polysae_lens.PolyTopKSAE(cfg))
    sae.sparse_kernels = sparse_kernels
    return sae  # type: ignore[return-value]


def _forbid_nonzero_search(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("decode searched for the nonzeros of a code it encoded")

    monkeypatch.setattr(polysae_lens.sae, "code_if_sparse", fail)


def test_forward_reuses_the_selection_and_matches_a_searched_decode_bit_for_bit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sae = _inference_sae()
    x = _rand(5, 3, D_IN, seed=27).float()
    reference = _inference_sae(sparse_kernels=False)
    with torch.no_grad():
        expected = reference.decode(reference.encode(x))
        z = sae.encode(x)
        searched = sae.decode(z)  # outside forward: the code is searched
        _forbid_nonzero_search(monkeypatch)
        out = sae(x)  # SAELens's forward: decode(encode(x)), selection reused
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    # the same sums in the same order as decoding a code found by searching
    assert torch.equal(out, searched)


def test_forward_with_gradients_matches_the_dense_decode() -> None:
    sae = _inference_sae()
    reference = _inference_sae(sparse_kernels=False)
    x = _rand(5, 3, D_IN, seed=27).float().requires_grad_()
    expected = reference.decode(reference.encode(x))
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), x)
    out = sae(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("change", ["in_place", "other_tensor", "inference_mode"])
def test_a_changed_or_different_code_is_searched_for_its_nonzeros(change: str) -> None:
    sae = _inference_sae()
    dense = _inference_sae(sparse_kernels=False)
    x = _rand(6, D_IN, seed=28).float()
    context = torch.inference_mode() if change == "inference_mode" else torch.no_grad()
    with context:
        z = sae.encode(x)
        if change == "in_place":
            z[:, 0] += 1.0  # a latent most rows did not select
        elif change == "other_tensor":
            z = sae.encode(x).roll(1, dims=0)
        torch.testing.assert_close(sae.decode(z), dense.decode(z), rtol=1e-5, atol=1e-6)


def test_an_inference_sae_still_deep_copies_after_a_forward() -> None:
    sae = _inference_sae()
    with torch.no_grad():
        sae(_rand(4, D_IN, seed=29).float())
    twin = copy.deepcopy(sae)
    x = _rand(4, D_IN, seed=30).float()
    torch.testing.assert_close(twin(x), sae(x))


def test_dense_codes_take_the_dense_decode() -> None:
    sae = make_training_sae("poly").eval()
    z = _rand(8, D_SAE, seed=26).float()  # fully dense
    assert code_if_sparse(z, max_density=0.125) is None
    out = sae.decode(z)
    sae.sparse_kernels = False
    torch.testing.assert_close(out, sae.decode(z))


def test_counts_with_and_without_a_host_sync_count_each_index() -> None:
    index = torch.tensor([3, 0, 3, 3, 5, 0])
    by_hand = [2, 0, 0, 3, 0, 1, 0]  # n = 7: trailing indices that never occur count 0
    assert sparse.counts(index, 7).tolist() == by_hand  # the CPU's bincount
    assert sparse.counts_without_sync(index, 7).tolist() == by_hand  # the GPU's path
    assert sparse.counts_without_sync(index[:0], 3).tolist() == [0, 0, 0]
