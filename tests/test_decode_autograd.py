"""``decode`` has the autograd semantics of the plain formula, whatever the code.

The reference here is the decoder written out in the test (no package code):
``x^ = b_dec + a C1 + lambda2 (a[:, :R2])^2 C2 + lambda3 (a[:, :R3])^3 C3`` with
``a = z U``. Gradients are compared at *every* entry of the code, zeros
included (the sparse kernels alone would give 0 there), also through
``torch.func`` transforms, forward-mode AD and a ``HookedSAETransformer``.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from sae_lens import SAE, TrainingSAE
from sae_lens.saes.sae import TrainStepInput

import polysae_lens

from .conftest import D_IN, D_SAE, K, make_training_sae
from .lm_fixtures import TEXTS, make_tiny_model, make_tiny_sae_transformer


def plain_decode(sae: Any, z: torch.Tensor) -> torch.Tensor:
    """The PolySAE decoder, written out from its definition."""
    a = z @ sae.U
    out = sae.b_dec + a @ sae.C1
    if hasattr(sae, "C2") and isinstance(sae.C2, torch.nn.Parameter):
        r2 = sae.C2.shape[0]
        out = out + sae.lambda2 * (a[..., :r2] ** 2) @ sae.C2
    if hasattr(sae, "C3") and isinstance(sae.C3, torch.nn.Parameter):
        r3 = sae.C3.shape[0]
        out = out + sae.lambda3 * (a[..., :r3] ** 3) @ sae.C3
    return out


def sparse_code(n_rows: int, seed: int = 0) -> torch.Tensor:
    """K positive entries per row (one all-zero row): sparse enough for the
    sparse kernels (K / D_SAE < 1/8)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.zeros(n_rows, D_SAE)
    for row in range(1, n_rows):
        cols = torch.randperm(D_SAE, generator=gen)[:K]
        z[row, cols] = 0.2 + torch.rand(K, generator=gen)
    return z


def poly_sae(arch: str, kind: str, order: int, tmp_path: Path) -> Any:
    """An inference PolySAE (saved and reloaded) or a training one in eval mode."""
    training = make_training_sae(arch, order)
    if kind == "training":
        return training.eval()
    training.save_inference_model(tmp_path / arch)
    return SAE.load_from_disk(tmp_path / arch)


KINDS = ["inference", "training"]


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_decode_gradients_match_the_formula_at_every_entry(
    arch: str, kind: str, order: int, tmp_path: Path
) -> None:
    sae = poly_sae(arch, kind, order, tmp_path)
    z = sparse_code(6).requires_grad_()
    weight = torch.randn(6, D_IN, generator=torch.Generator().manual_seed(3))

    out = sae.decode(z)
    torch.testing.assert_close(out, plain_decode(sae, z), rtol=1e-5, atol=1e-6)
    (grad_z,) = torch.autograd.grad((out * weight).sum(), z)
    ref = z.detach().clone().requires_grad_()
    (ref_grad,) = torch.autograd.grad((plain_decode(sae, ref) * weight).sum(), ref)
    torch.testing.assert_close(grad_z, ref_grad, rtol=1e-5, atol=1e-6)
    inactive = z.detach() == 0
    # the first-order term alone makes these nonzero: W_dec @ weight per row
    assert (grad_z[inactive].abs() > 0).float().mean() > 0.99


def test_decode_jacobian_at_zero_is_the_first_order_decoder(arch: str, tmp_path: Path) -> None:
    sae = poly_sae(arch, "inference", 3, tmp_path)
    W_dec_DF = (sae.U @ sae.C1).T.detach()
    J = torch.func.jacrev(sae.decode)(torch.zeros(D_SAE))
    torch.testing.assert_close(J, W_dec_DF, rtol=1e-5, atol=1e-6)
    J_autograd = torch.autograd.functional.jacobian(sae.decode, torch.zeros(D_SAE))
    torch.testing.assert_close(J_autograd, W_dec_DF, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_torch_func_transforms_match_the_formula(arch: str, kind: str, tmp_path: Path) -> None:
    sae = poly_sae(arch, kind, 3, tmp_path)
    z_F = sparse_code(2, seed=5)[1]
    w_D = torch.randn(D_IN, generator=torch.Generator().manual_seed(6))

    def ours(z: torch.Tensor) -> torch.Tensor:
        return sae.decode(z) @ w_D

    def reference(z: torch.Tensor) -> torch.Tensor:
        return plain_decode(sae, z) @ w_D

    with torch.no_grad():  # the transforms must not depend on grad mode
        torch.testing.assert_close(
            torch.func.jacrev(sae.decode)(z_F),
            torch.func.jacrev(lambda z: plain_decode(sae, z))(z_F),
            rtol=1e-5,
            atol=1e-6,
        )
        torch.testing.assert_close(
            torch.func.hessian(ours)(z_F), torch.func.hessian(reference)(z_F), rtol=1e-4, atol=1e-6
        )
        tangent_F = torch.randn(D_SAE, generator=torch.Generator().manual_seed(7))
        _, jvp_ours = torch.func.jvp(sae.decode, (z_F,), (tangent_F,))
        _, jvp_ref = torch.func.jvp(lambda z: plain_decode(sae, z), (z_F,), (tangent_F,))
        torch.testing.assert_close(jvp_ours, jvp_ref, rtol=1e-5, atol=1e-6)
        codes_BF = sparse_code(4, seed=8)
        torch.testing.assert_close(
            torch.func.vmap(torch.func.jacrev(ours))(codes_BF),
            torch.func.vmap(torch.func.jacrev(reference))(codes_BF),
            rtol=1e-5,
            atol=1e-6,
        )


def test_forward_mode_ad_matches_the_formula(arch: str, tmp_path: Path) -> None:
    sae = poly_sae(arch, "inference", 3, tmp_path)
    z = sparse_code(5, seed=9)
    tangent = torch.randn(5, D_SAE, generator=torch.Generator().manual_seed(10))
    with torch.no_grad(), fwAD.dual_level():
        out_tangent = fwAD.unpack_dual(sae.decode(fwAD.make_dual(z, tangent))).tangent
        ref_tangent = fwAD.unpack_dual(plain_decode(sae, fwAD.make_dual(z, tangent))).tangent
    torch.testing.assert_close(out_tangent, ref_tangent, rtol=1e-5, atol=1e-6)


HOOK = "blocks.0.hook_resid_post"


def test_gradients_at_hook_sae_acts_post_in_a_hooked_sae_transformer(arch: str) -> None:
    model = make_tiny_sae_transformer()
    sae = make_training_sae(arch).eval()
    sae.cfg.metadata.hook_name = HOOK
    tokens = make_tiny_model().to_tokens(TEXTS[:2])
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Any:
        def hook(tensor: torch.Tensor, hook: Any) -> None:
            tensor.retain_grad()
            seen[name] = tensor

        return hook

    model.add_sae(sae)
    try:
        sae.hook_sae_acts_post.add_hook(keep("acts"))
        sae.hook_sae_recons.add_hook(keep("recons"))
        model(tokens).logsumexp(-1).sum().backward()
    finally:
        sae.reset_hooks()
        model.reset_saes()
    acts, recons = seen["acts"], seen["recons"]
    assert acts.grad is not None and recons.grad is not None
    # the reference: the formula's vector-Jacobian product with the gradient
    # that reached the reconstruction
    _, vjp = torch.func.vjp(lambda z: plain_decode(sae, z), acts.detach())
    (expected,) = vjp(recons.grad)
    torch.testing.assert_close(acts.grad, expected, rtol=1e-5, atol=1e-6)
    inactive = acts.detach() == 0
    assert inactive.any() and (acts.grad[inactive] != 0).any()


def test_jumprelu_threshold_gradient_sees_the_reconstruction_of_inactive_latents() -> None:
    """JumpReLU's straight-through threshold gradient reads the reconstruction
    gradient at latents just below the threshold (which are zero in the code)."""
    sae = make_training_sae("poly_jumprelu", jumprelu_bandwidth=1.0)
    with torch.no_grad():
        sae.threshold.fill_(1.0)  # about 7% active: a code sparse enough for the kernels
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(11))
    step = TrainStepInput(
        sae_in=x,
        coefficients={"l0": 0.0},
        dead_neuron_mask=None,
        n_training_steps=0,
        is_logging_step=False,
    )
    sae.training_forward_pass(step).losses["mse_loss"].backward()
    grad = sae.threshold.grad.clone()
    # the same loss with the code projected by the plain product
    sae.zero_grad()
    original = polysae_lens.sae.PolyDecoderMixin._project
    try:
        polysae_lens.sae.PolyDecoderMixin._project = lambda self, z: z @ self.U  # type: ignore[method-assign]
        sae.training_forward_pass(step).losses["mse_loss"].backward()
    finally:
        polysae_lens.sae.PolyDecoderMixin._project = original  # type: ignore[method-assign]
    assert sae.threshold.grad.abs().max() > 0
    torch.testing.assert_close(grad, sae.threshold.grad, rtol=1e-5, atol=1e-7)


# ---- the fast path stays where no gradient reaches the code -------------------


def _count_sparse_projections(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = polysae_lens.sae.project_sparse

    def counting(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(polysae_lens.sae, "project_sparse", counting)
    return calls


@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "code_without_grad"])
def test_codes_that_need_no_gradient_take_the_sparse_path(
    arch: str, context: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    sae = poly_sae(arch, "inference", 3, tmp_path)
    z = sparse_code(6, seed=12)
    calls = _count_sparse_projections(monkeypatch)
    if context == "no_grad":
        with torch.no_grad():
            out = sae.decode(z.requires_grad_())
    elif context == "inference_mode":
        with torch.inference_mode():
            out = sae.decode(z)
    else:
        out = sae.decode(z)
    assert calls == [1]
    torch.testing.assert_close(out, plain_decode(sae, z.detach()), rtol=1e-5, atol=1e-6)


# ---- edits to a code are never ignored -------------------------------------


def _topk_sae() -> polysae_lens.PolyTopKSAE:
    return make_training_sae("poly").eval()  # type: ignore[return-value]


@pytest.mark.parametrize("edit", ["data", "numpy", "in_place"])
def test_decode_sees_edits_made_to_an_encoded_code(edit: str) -> None:
    for cls_sae in (_topk_sae(), _saved_topk_sae()):
        x = torch.randn(5, D_IN, generator=torch.Generator().manual_seed(13))
        with torch.no_grad():
            z = cls_sae.encode(x)
            inactive = int((z[0] == 0).nonzero()[0])
            if edit == "data":
                z.data[0, inactive] = 2.0
            elif edit == "numpy":
                z.numpy()[0, inactive] = 2.0
            else:
                z[0, inactive] = 2.0
            assert z[0, inactive] == 2.0
            torch.testing.assert_close(
                cls_sae.decode(z), plain_decode(cls_sae, z), rtol=1e-5, atol=1e-6
            )


def _saved_topk_sae() -> Any:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        _topk_sae().save_inference_model(tmp)
        return SAE.load_from_disk(tmp)


def test_forward_sees_a_hook_that_edits_the_code_through_data(arch: str, tmp_path: Path) -> None:
    sae = poly_sae(arch, "inference", 3, tmp_path)
    x = torch.randn(5, D_IN, generator=torch.Generator().manual_seed(14))
    edited: list[torch.Tensor] = []

    def activate_latent_7(acts: torch.Tensor, hook: Any) -> None:
        acts.data[..., 7] = 3.0  # invisible to the version counter
        edited.append(acts)

    sae.hook_sae_acts_post.add_hook(activate_latent_7)
    with torch.no_grad():
        out = sae(x)
    torch.testing.assert_close(out, plain_decode(sae, edited[0]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_forward_reuses_the_encoders_selection(
    context: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sae = _saved_topk_sae()
    assert isinstance(sae, polysae_lens.PolyTopKSAE)
    x = torch.randn(3, 5, D_IN, generator=torch.Generator().manual_seed(15))

    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("forward searched for the nonzeros of the code it encoded")

    monkeypatch.setattr(polysae_lens.sae, "code_if_sparse", fail)
    with torch.inference_mode() if context == "inference_mode" else torch.no_grad():
        out = sae(x)
        monkeypatch.undo()
        expected = plain_decode(sae, sae.encode(x))
    assert sae._forward_selection is None  # nothing outlives the call
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


# ---- the retraction survives module reloads ----------------------------------


RELOAD_SCRIPT = textwrap.dedent(
    """
    import importlib, sys
    import torch
    import polysae_lens
    from sae_lens import TrainingSAE

    def build():
        torch.manual_seed(0)
        return TrainingSAE.from_dict(dict(
            architecture="poly", d_in=16, d_sae=48, k=4, poly_order=2, poly_ranks=[12, 5, 5]))

    def train(sae, steps=3):
        opt = torch.optim.Adam(sae.parameters(), lr=0.05)
        gen = torch.Generator().manual_seed(1)
        for _ in range(steps):
            x = torch.randn(32, 16, generator=gen)
            (sae(x) - x).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
        return torch.cat([p.detach().flatten() for p in sae.parameters()])

    mode = sys.argv[1]
    reference = train(build())
    sae = build()
    if mode == "reload_stiefel":
        importlib.reload(polysae_lens.stiefel)
    elif mode == "reload_all":
        for name in ["polysae_lens.stiefel", "polysae_lens.sae", "polysae_lens"]:
            importlib.reload(sys.modules[name])
    elif mode == "reimport":
        for name in [n for n in sys.modules if n.startswith("polysae_lens")]:
            del sys.modules[name]
        import polysae_lens as fresh  # noqa: F401
    after = build()  # built after the reload, by the reloaded classes if any
    for model in (sae, after):
        params = train(model)
        err = float(polysae_lens.orthogonality_error(model.U)) if mode != "reimport" else float(
            (model.U.T @ model.U - torch.eye(12)).abs().max())
        assert err < 1e-5, (mode, err)
        assert torch.equal(params, reference), mode
    print("OK", mode)
    """
)


@pytest.mark.parametrize("mode", ["reload_stiefel", "reload_all", "reimport"])
def test_retraction_survives_reloads_and_reimports(mode: str, tmp_path: Path) -> None:
    script = tmp_path / "reload.py"
    script.write_text(RELOAD_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), mode], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"OK {mode}" in result.stdout


def test_reload_in_process_keeps_tracked_saes() -> None:
    sae = make_training_sae("poly")
    tracked_before = set(polysae_lens.stiefel._TRACKED)
    importlib.reload(polysae_lens.stiefel)
    assert sae in polysae_lens.stiefel._TRACKED
    assert tracked_before <= set(polysae_lens.stiefel._TRACKED)
    assert isinstance(sae, TrainingSAE)
