"""Keeping the shared projection U on the Stiefel manifold (U^T U = I), and
the other work PolySAE needs around every optimizer step (C1's and U's step
scales, the gauge step).

The paper restores orthonormality after every optimizer step with a QR
retraction (arXiv 2602.01322, Sec. 4): U is replaced by the Q factor of its
reduced QR decomposition, with column signs chosen so that diag(R) > 0, which
keeps U continuous from one step to the next.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.utils.hooks import RemovableHandle

from polysae_lens.subspace_fit import apply_subspace_fit_

logger = logging.getLogger(__name__)


def qr_retract(U_FR: Tensor) -> Tensor:
    """The Q factor of U's reduced QR decomposition with diag(R) > 0.

    Computed in float32 (torch has no half-precision QR) and returned in U's
    dtype. U must have at least as many rows as columns.
    """
    Q_FR, R_RR = torch.linalg.qr(U_FR.float(), mode="reduced")
    signs_R = torch.sign(torch.diagonal(R_RR))
    signs_R = torch.where(signs_R == 0, torch.ones_like(signs_R), signs_R)
    return (Q_FR * signs_R).to(U_FR.dtype).contiguous()


def cholesky_qr_retract(U_FR: Tensor) -> Tensor:
    """The same Q factor as :func:`qr_retract`, from Gram matrices (CholeskyQR);
    a new tensor in U's dtype (see :func:`cholesky_qr_retract_`)."""
    return cholesky_qr_retract_(U_FR.detach().clone(memory_format=torch.contiguous_format))


def cholesky_qr_retract_(U_FR: Tensor) -> Tensor:
    """Replace U by the Q factor of its QR decomposition (diag(R) > 0), in place.

    With ``U = Q R`` and diag(R) > 0, ``U^T U = R^T R`` is the Cholesky
    factorisation of the Gram matrix, so ``Q = U R^-1``: two products over U
    instead of Householder QR, several times faster for U [16384, 768]. One such
    pass loses orthogonality in proportion to cond(U)^2, so a second pass
    re-orthonormalises its output (CholeskyQR2; the product of the two triangular
    factors is again upper triangular with a positive diagonal: the Q is
    unchanged) unless U was already close to orthonormal, as it is one optimizer
    step after the previous retraction: then one pass is as accurate as
    Householder QR (see :func:`_needs_second_pass`) and the retraction costs half.
    If a Gram matrix is not numerically positive definite (U far from full rank)
    this falls back to Householder QR and logs a warning.

    Computed in float32 whatever U's dtype; a float32 contiguous U is updated
    without a [d_sae, R] temporary.
    """
    if U_FR.dtype == torch.float32 and U_FR.is_contiguous():
        return _cholesky_qr_(U_FR)
    Q_FR = U_FR.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    return U_FR.copy_(_cholesky_qr_(Q_FR))


def qr_retract_(U_FR: Tensor) -> Tensor:
    """:func:`qr_retract` (Householder QR) written back into U."""
    return U_FR.copy_(qr_retract(U_FR))


def _cholesky_qr_(Q_FR: Tensor) -> Tensor:
    """CholeskyQR(2) of a float32 contiguous matrix, in place."""
    gram_RR = symmetric_gram(Q_FR)
    eye_RR = torch.eye(gram_RR.shape[0], device=gram_RR.device)
    passes = 2 if _needs_second_pass(gram_RR - eye_RR) else 1
    for index in range(passes):
        if index > 0:
            gram_RR = symmetric_gram(Q_FR)
        if not cholesky_qr_pass_(Q_FR, gram_RR):
            # Q still spans U's columns with the same orientation (a first pass
            # multiplies by an upper triangular matrix with a positive diagonal),
            # so Householder QR of Q gives U's Q factor.
            logger.warning(
                "Cholesky-QR retraction failed (U is far from full rank); using Householder QR."
            )
            return qr_retract_(Q_FR)
    return Q_FR


def cholesky_qr_pass_(
    Q_FR: Tensor,
    gram_RR: Tensor | None = None,
    *,
    block: int | None = None,
    row_chunk: int | None = None,
) -> bool:
    """One CholeskyQR pass in place: ``Q <- Q L^-T`` with ``L L^T = Q^T Q``
    (``gram_RR``, computed here if not given). Returns False, leaving Q
    untouched, if the Gram matrix is not numerically positive definite.
    ``block`` / ``row_chunk`` (default :data:`GRAM_BLOCK` / :data:`ROW_CHUNK`)
    change how the products are split, never the result beyond rounding."""
    block = GRAM_BLOCK if block is None else block
    if gram_RR is None:
        gram_RR = symmetric_gram(Q_FR, block=block)
    L_inv_RR = _inverse_cholesky_factor(gram_RR)
    if L_inv_RR is None:
        return False
    times_upper_triangular_(Q_FR, L_inv_RR.T, block=block, row_chunk=row_chunk)
    return True


def _inverse_cholesky_factor(gram_RR: Tensor) -> Tensor | None:
    """``L^-1`` for ``L L^T = gram``, or None where the Cholesky fails (not
    numerically positive definite).

    Retractions multiply U by ``L^-T`` rather than solving against it: a
    triangular solve against the tall U (trsm) is up to 2x slower than a matmul
    on CPU. L is well conditioned whenever the Cholesky succeeds on a
    near-orthonormal U, and a second pass absorbs the first pass's rounding
    either way.
    """
    L_RR, info = torch.linalg.cholesky_ex(gram_RR)
    if int(info) != 0:
        return None
    eye_RR = torch.eye(L_RR.shape[0], dtype=L_RR.dtype, device=L_RR.device)
    return torch.linalg.solve_triangular(L_RR, eye_RR, upper=False)


ONE_PASS_MAX_DEVIATION = 0.5
"""Largest ||U^T U - I||_2 for which one CholeskyQR pass is used: cond(U^T U) is
then at most 3, while one pass leaves U within about twice Householder QR's
float32 orthogonality error up to cond(U^T U) ~ 100 (``benchmarks/retraction.py``
prints the table)."""


def _needs_second_pass(deviation_RR: Tensor, iterations: int = 16) -> bool:
    """Whether ``||U^T U - I||_2`` (the symmetric ``deviation``) may exceed
    :data:`ONE_PASS_MAX_DEVIATION`.

    The Frobenius norm bounds the spectral norm from above; when it is too
    large, a few power iterations (R x R products, negligible next to the
    [d_sae, R] Gram matrix) estimate the spectral norm from below, and the
    estimate must stay under half the limit: a factor 2 of margin for the
    estimate, on top of the ~30x margin of the limit itself.
    """
    if float(deviation_RR.norm()) <= ONE_PASS_MAX_DEVIATION:
        return False
    gen = torch.Generator(device=deviation_RR.device).manual_seed(0)
    v_R = torch.randn(deviation_RR.shape[0], device=deviation_RR.device, generator=gen)
    estimate = 0.0
    for _ in range(iterations):
        v_R = v_R / v_R.norm()
        v_R = deviation_RR @ v_R
        estimate = float(v_R.norm())
        if estimate == 0.0:
            return False
    return 2 * estimate > ONE_PASS_MAX_DEVIATION


GRAM_BLOCK = 256
"""Column block of :func:`symmetric_gram` and :func:`times_upper_triangular_`:
small enough to skip most of the zero (or mirrored) triangle, large enough for
each product to run at full matmul speed. 256 rather than 128: as fast on a
quiet machine and half the parallel regions, each of which stalls when another
process holds a core (`benchmarks/retraction.py --blocking`: U [16384, 768]
0.099 s both, beside a busy loop 2.66x slower against 3.90x)."""


def symmetric_gram(Q_FR: Tensor, block: int = GRAM_BLOCK) -> Tensor:
    """``Q^T Q`` [R, R] computing only its upper block triangle (for R > block).

    A full ``Q.T @ Q`` computes every entry twice; block rows of the upper
    triangle, mirrored, cost ~40% less for R = 768 (each entry is the same dot
    product, up to summation order).
    """
    n_cols = Q_FR.shape[1]
    if n_cols <= block:
        return Q_FR.T @ Q_FR
    gram_RR = Q_FR.new_zeros(n_cols, n_cols)
    for start in range(0, n_cols, block):
        gram_RR[start : start + block, start:] = Q_FR[:, start : start + block].T @ Q_FR[:, start:]
    return gram_RR.triu() + gram_RR.triu(1).T


ROW_CHUNK = 2048
"""Rows of U per product in :func:`times_upper_triangular_`: a [ROW_CHUNK, R]
temporary stays in cache and is copied back in place."""


def times_upper_triangular_(
    Q_FR: Tensor, T_RR: Tensor, block: int = GRAM_BLOCK, row_chunk: int | None = None
) -> Tensor:
    """``Q <- Q @ T`` in place for an upper triangular ``T``.

    Each row of the product needs only the same row of Q, so Q is processed in
    chunks of :data:`ROW_CHUNK` rows through one small temporary; within a chunk
    (for R > block) column block j of the product needs only the first j + 1
    row blocks of T, so the zero blocks are skipped. Writing in place also
    spares a fresh [d_sae, R] result: the first touch of its pages cost more
    than the zero blocks save.
    """
    n_cols = Q_FR.shape[1]

    def product(rows_QR: Tensor, out_CR: Tensor) -> None:
        if n_cols <= block:
            torch.mm(rows_QR, T_RR, out=out_CR)
            return
        for start in range(0, n_cols, block):
            stop = min(start + block, n_cols)
            torch.mm(rows_QR[:, :stop], T_RR[:stop, start:stop], out=out_CR[:, start:stop])

    return _by_row_chunks_(Q_FR, product, row_chunk)


def times_(Q_FR: Tensor, M_RR: Tensor, row_chunk: int | None = None) -> Tensor:
    """``Q <- Q @ M`` in place for any square ``M``, by row chunks like
    :func:`times_upper_triangular_`."""
    return _by_row_chunks_(
        Q_FR, lambda rows_QR, out_CR: torch.mm(rows_QR, M_RR, out=out_CR), row_chunk
    )


def _by_row_chunks_(
    Q_FR: Tensor, product: Callable[[Tensor, Tensor], object], row_chunk: int | None
) -> Tensor:
    """Replace each chunk of rows of Q by ``product(rows, out)``'s ``out``."""
    n_rows, n_cols = Q_FR.shape
    row_chunk = ROW_CHUNK if row_chunk is None else row_chunk
    chunk_CR = Q_FR.new_empty(min(row_chunk, n_rows), n_cols)
    for row in range(0, n_rows, row_chunk):
        rows_QR = Q_FR[row : row + row_chunk]
        out_CR = chunk_CR[: rows_QR.shape[0]]
        product(rows_QR, out_CR)
        rows_QR.copy_(out_CR)
    return Q_FR


RETRACTIONS = {"cholesky_qr": cholesky_qr_retract_, "qr": qr_retract_}
"""In-place retractions by config name (``stiefel_method``); both give U's Q
factor with diag(R) > 0."""


def orthogonality_error(U_FR: Tensor) -> Tensor:
    """max |U^T U - I| in float32, as a 0-dim tensor."""
    U = U_FR.detach().float()
    gram_RR = U.T @ U
    eye = torch.eye(gram_RR.shape[0], device=gram_RR.device)
    return (gram_RR - eye).abs().max()


def project_to_tangent(U_FR: Tensor, V_FR: Tensor) -> Tensor:
    """Project ``V`` onto the tangent space of the Stiefel manifold at ``U``:
    ``V - U sym(U^T V)`` with ``sym(A) = (A + A^T) / 2``."""
    UtV_RR = U_FR.T @ V_FR
    return V_FR - U_FR @ ((UtV_RR + UtV_RR.T) / 2)


# ---- around every optimizer step -------------------------------------------
#
# SAETrainer builds its own Adam and has no callback, so PolySAE's per-step work
# rides on torch's optimizer hooks: one global step pre-hook and one post-hook,
# installed when the first PolySAE is built (not at import). On an optimizer's
# first step they find which tracked PolySAEs it updates; from then on, around
# each of its steps, they scale the updates of the parameters in the SAE's step
# scale table (:func:`step_scales`; for Adam, exactly per-parameter learning
# rates, following any schedule), turn U and C1 along the gauge orbit
# (:func:`gauge_gradient`) and then retract U. Optimizers that update no PolySAE
# cost one dict lookup per step.

#
# This state must survive ``importlib.reload`` of this module (what notebook
# autoreload does): a reload re-runs the file in the same namespace while the
# hooks registered with torch stay, so a fresh set would forget every PolySAE
# built before it (they would no longer be retracted) and the hooks would be
# registered twice. Each name is therefore bound only if it is not bound yet.
# (A re-import under a new module object has its own state and its own hooks,
# and the old hooks keep serving the SAEs built by the old classes.)

_TRACKED: weakref.WeakSet[nn.Module] = globals().get("_TRACKED", weakref.WeakSet())
_TARGETS: weakref.WeakKeyDictionary[Optimizer, list[weakref.ref[nn.Module]]] = globals().get(
    "_TARGETS", weakref.WeakKeyDictionary()
)
_SNAPSHOTS: weakref.WeakKeyDictionary[Optimizer, list[tuple[Tensor, Tensor, float]]] = (
    globals().get("_SNAPSHOTS", weakref.WeakKeyDictionary())
)
_GAUGE_GRADIENTS: weakref.WeakKeyDictionary[Optimizer, list[tuple[nn.Module, Tensor, float]]] = (
    globals().get("_GAUGE_GRADIENTS", weakref.WeakKeyDictionary())
)
# One reusable snapshot buffer per scaled parameter, by module and name: a fresh
# [d_sae, R1] copy of U every step made the allocator map and fault in new pages
# (a cache only: losing it costs one allocation).
_SNAPSHOT_BUFFERS: weakref.WeakKeyDictionary[nn.Module, dict[str, Tensor]] = globals().get(
    "_SNAPSHOT_BUFFERS", weakref.WeakKeyDictionary()
)
_global_hooks: tuple[RemovableHandle, RemovableHandle] | None = globals().get("_global_hooks")


def track_for_retraction(sae: nn.Module) -> None:
    """Retract ``sae.U`` (and scale its C1 and U steps, and turn it along the
    gauge) around every step of any optimizer that updates it.

    Every PolySAE class calls this when it is built; users only need it for a
    module of their own that exposes a ``U`` parameter.
    """
    global _global_hooks
    _TRACKED.add(sae)
    if _global_hooks is None:
        _global_hooks = (
            register_optimizer_step_pre_hook(_before_any_step),
            register_optimizer_step_post_hook(_after_any_step),
        )


def attach_stiefel_retraction(
    optimizer: Optimizer, saes: Iterable[nn.Module] | None = None
) -> RemovableHandle:
    """Retract the U of ``saes`` (default: every PolySAE whose U ``optimizer``
    updates) after each ``optimizer.step()``, and scale their C1 and U steps, for
    custom training loops.

    PolySAEs need no call: any optimizer handles them automatically. Attaching
    explicitly pins the set of modules for this optimizer; the automatic hooks
    then skip it, so nothing happens twice. ``handle.remove()`` stops both.
    """
    targets = _find_targets(optimizer) if saes is None else [weakref.ref(s) for s in saes]
    for ref in targets:
        if not _optimizes(optimizer, _projection(ref())):
            raise ValueError(
                f"{type(ref()).__name__}.U is not among this optimizer's parameters; "
                "pass the SAEs whose parameters the optimizer updates."
            )
    _TARGETS[optimizer] = []  # the automatic hooks leave this optimizer alone
    use_fused_adam(optimizer, [ref() for ref in targets])
    pre = optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: _snapshot_scaled_steps(opt, targets)
    )
    post = optimizer.register_step_post_hook(lambda opt, args, kwargs: _finish_step(opt, targets))
    return _BothHandles(pre, post)


class _BothHandles(RemovableHandle):
    def __init__(self, *handles: RemovableHandle) -> None:
        self._handles = handles

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _configured_scale(sae: nn.Module, field: str, default: Callable[[Any], float]) -> float:
    """The config's ``field``, ``default(cfg)`` where it is None, 1 for modules
    without the field."""
    cfg = getattr(sae, "cfg", None)
    if cfg is None or not hasattr(cfg, field):
        return 1.0
    value = getattr(cfg, field)
    return float(value) if value is not None else float(default(cfg))


C1_RATIO_RULE = "d_sae/R1"
"""The ``c1_lr_scale`` value that means d_sae / R1, the default before sqrt(d_sae / R1)."""


def c1_step_scale(sae: nn.Module) -> float:
    """The factor applied to C1's optimizer step: the config's ``c1_lr_scale``,
    with ``None`` meaning sqrt(d_sae / R1) and ``"d_sae/R1"`` d_sae / R1; 1 for
    modules without the field."""
    cfg = getattr(sae, "cfg", None)
    if getattr(cfg, "c1_lr_scale", None) == C1_RATIO_RULE:
        return cfg.d_sae / cfg.ranks[0]  # type: ignore[union-attr]
    return _configured_scale(sae, "c1_lr_scale", lambda cfg: math.sqrt(cfg.d_sae / cfg.ranks[0]))


def u_step_scale(sae: nn.Module) -> float:
    """The factor applied to U's optimizer step: the config's ``u_lr_scale``,
    with ``None`` meaning sqrt(R1 / d_sae) (the RMS norm of U's rows); 1 for
    modules without the field."""
    return _configured_scale(sae, "u_lr_scale", lambda cfg: math.sqrt(cfg.ranks[0] / cfg.d_sae))


def step_scales(sae: nn.Module) -> dict[str, float]:
    """Factors on the optimizer's step of single parameters, by parameter name
    (parameters not listed: 1): C1's and U's."""
    return {"C1": c1_step_scale(sae), "U": u_step_scale(sae)}


def gauge_step_scale(sae: nn.Module) -> float:
    """The config's ``gauge_lr_scale``: the gauge step's learning rate relative
    to the optimizer's; 0 (no gauge step) below order 2, where the loss does
    not depend on the gauge, and for modules without the field."""
    cfg = getattr(sae, "cfg", None)
    if cfg is None or getattr(cfg, "poly_order", 1) < 2:
        return 0.0
    return float(getattr(cfg, "gauge_lr_scale", 0.0))


def interaction_rank(sae: nn.Module) -> int:
    """How many leading columns of U the interaction terms read: R2 at order 2,
    max(R2, R3) at order 3 (R1 for modules without ``cfg.ranks``)."""
    U = _projection(sae)
    cfg = getattr(sae, "cfg", None)
    ranks = getattr(cfg, "ranks", None)
    if ranks is None:
        return int(U.shape[1])
    order = int(getattr(cfg, "poly_order", 2))
    return int(max(ranks[1 : max(order, 2)]))


def gauge_gradient(
    U_FR: Tensor,
    dU_FR: Tensor,
    C1_RD: Tensor,
    dC1_RD: Tensor,
    rank: int | None = None,
    sum_over_latents: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """The loss's gradient along the gauge orbit ``U -> U Q, C1 -> Q^T C1``:
    its first ``rank`` rows (default all R1), shape [rank, R1].

    For ``Q = I + Omega`` (Omega skew, R1 x R1) the loss changes by
    ``<U^T dL/dU + C1 dL/dC1^T, Omega>``, so the gradient is the skew part of
    that matrix. The orbit leaves the first-order decoder ``U @ C1`` unchanged,
    so the linear term's contributions cancel: what remains is the interaction
    terms' pull on the basis of U, the signal that tells the first R2 columns
    which directions to square. Those terms read only the first ``rank``
    columns of U, so rows and columns past ``rank`` of the full gradient are
    zero up to rounding (only the first ``rank`` rows are computed: the rest
    follows by skew symmetry).

    ``sum_over_latents`` is for U split by rows (latent sharding): given this
    holder's flattened share of ``U^T dU`` (a sum over latents) it returns the
    sum of every holder's share, so all of them get the whole gradient.
    """
    r = U_FR.shape[1] if rank is None else rank
    dtype = _at_least_float32(U_FR.dtype)
    U, dU, C1, dC1 = (t.to(dtype) for t in (U_FR, dU_FR, C1_RD, dC1_RD))
    # rows :r of M = U^T dU + C1 dC1^T, and M[r:, :r]
    top_rR = U[:, :r].T @ dU
    rest_Qr = U[:, r:].T @ dU[:, :r]
    if sum_over_latents is not None:
        total = sum_over_latents(torch.cat([top_rR.reshape(-1), rest_Qr.reshape(-1)]))
        top_rR, rest_Qr = total[: top_rR.numel()].view_as(top_rR), total[top_rR.numel() :]
        rest_Qr = rest_Qr.view(U.shape[1] - r, r)
    top_rR = top_rR + C1[:r] @ dC1.T
    rest_Qr = rest_Qr + C1[r:] @ dC1[:r].T
    gamma_rR = torch.empty_like(top_rR)
    # the leading block from one product, so exactly skew (a rounding-sized
    # diagonal would become a full-sized Adam step)
    lead_rr = top_rR[:, :r]
    gamma_rR[:, :r] = (lead_rr - lead_rr.T) / 2
    gamma_rR[:, r:] = (top_rR[:, r:] - rest_Qr.T) / 2
    return gamma_rR


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """Half-precision weights are turned in float32; float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


class GaugeTurn(NamedTuple):
    """``U`` and ``C1`` after a turn along the gauge orbit."""

    U_FR: Tensor
    """``U @ Q`` [d_sae, R1]."""
    C1_RD: Tensor
    """``Q^T @ C1`` [R1, d_in]."""


class _CayleyFactors(NamedTuple):
    """The pieces of ``Q`` (:func:`turn_along_gauge`'s notation) in the turn's dtype."""

    step_rR: Tensor
    schur_inv_rr: Tensor
    """``P^-1``, with ``P = I + A/2 + B B^T / 4`` the Schur complement of
    ``I + S/2`` (A = ``step[:, :r]``, B = ``step[:, r:]``)."""


def _cayley_factors(step_rR: Tensor, dtype: torch.dtype) -> _CayleyFactors:
    r = step_rR.shape[0]
    step_rR = step_rR.to(dtype)
    A_rr, B_rQ = step_rR[:, :r], step_rR[:, r:]
    eye_rr = torch.eye(r, dtype=step_rR.dtype, device=step_rR.device)
    # Only the r x r Schur complement is inverted, not a 2r x 2r or R1 x R1
    # matrix (small LAPACK inverses are slow on the CPU: 0.65 ms at 128 x 128).
    # P is invertible: its symmetric part I + B B^T / 4 is positive definite.
    # inv_ex skips inv's error check, a device-to-host sync on a GPU.
    inv_rr = torch.linalg.inv_ex(eye_rr + A_rr / 2 + (B_rQ @ B_rQ.T) / 4)[0]
    return _CayleyFactors(step_rR, inv_rr)


def _woodbury_K(f: _CayleyFactors) -> Tensor:
    """``K = (I + Y^T X / 2)^-1`` [2r, 2r], with ``Y^T X = [[A, -B B^T], [I, 0]]``,
    from P^-1 by blocks."""
    r = f.step_rR.shape[0]
    B_rQ = f.step_rR[:, r:]
    eye_rr = torch.eye(r, dtype=B_rQ.dtype, device=B_rQ.device)
    inv_BBt_rr = f.schur_inv_rr @ (B_rQ @ B_rQ.T) / 2
    return torch.cat(
        [
            torch.cat([f.schur_inv_rr, inv_BBt_rr], 1),
            torch.cat([-f.schur_inv_rr / 2, eye_rr - inv_BBt_rr / 2], 1),
        ]
    )


def _woodbury_turned_C1(C1_RD: Tensor, f: _CayleyFactors, K_2r2r: Tensor) -> Tensor:
    """``Q^T C1 = C1 - Y K^T X^T C1`` in the turn's dtype."""
    r = f.step_rR.shape[0]
    C1 = C1_RD.to(K_2r2r.dtype)
    XtC1 = torch.cat([C1[:r], -(f.step_rR[:, r:] @ C1[r:])])
    T_2rD = K_2r2r.T @ XtC1
    new_C1 = C1 - f.step_rR.T @ T_2rD[:r]
    new_C1[:r] -= T_2rD[r:]
    return new_C1


def _rotation(f: _CayleyFactors, rank: int) -> Tensor:
    """``Q`` itself, [R1, R1], by blocks: ``Q = 2 (I + S/2)^-1 - I``, so
    ``Q = [[2 P^-1 - I, -P^-1 B], [B^T P^-1, I - B^T P^-1 B / 2]]``: two
    products of r x (R1 - r) blocks (a tenth of the multiply-adds of forming
    it through the Woodbury factors, at r = R1 / 2)."""
    r = f.step_rR.shape[0]
    B_rQ = f.step_rR[:, r:]
    inv_B_rQ = f.schur_inv_rr @ B_rQ
    Q_RR = torch.empty(rank, rank, dtype=B_rQ.dtype, device=B_rQ.device)
    Q_RR[:r, :r] = 2 * f.schur_inv_rr
    Q_RR[:r, :r].diagonal().sub_(1)
    Q_RR[:r, r:] = -inv_B_rQ
    Q_RR[r:, :r] = B_rQ.T @ f.schur_inv_rr
    Q_RR[r:, r:] = B_rQ.T @ inv_B_rQ / -2
    Q_RR[r:, r:].diagonal().add_(1)
    return Q_RR


def _dense_turn_is_cheaper(rank: int, r: int) -> bool:
    """Whether ``U @ Q`` (d_sae R1^2 multiply-adds) costs less than the low-rank
    update (about d_sae (2 r R1 + 3 r^2), and more passes over [d_sae, 2r]
    temporaries): so for r above ~R1 / 3, e.g. R2 = R1 / 2."""
    return rank * rank <= 2 * rank * r + 3 * r * r


def _low_rank_update(U_FR: Tensor, f: _CayleyFactors, K_2r2r: Tensor) -> Tensor:
    """``W = U X K`` [d_sae, 2r]: ``U Q = U - W[:, :r] @ step`` with ``W[:, r:]``
    taken off U's first r columns."""
    r = f.step_rR.shape[0]
    U = U_FR.to(K_2r2r.dtype)
    UX_F2r = torch.cat([U[:, :r], -(U[:, r:] @ f.step_rR[:, r:].T)], 1)
    return UX_F2r @ K_2r2r


def _turn(U_FR: Tensor, C1_RD: Tensor, step_rR: Tensor, in_place: bool) -> GaugeTurn:
    """``U Q`` and ``Q^T C1`` in the turn's dtype. With ``in_place`` and U in that
    dtype, the low-rank update is added to U itself (no [d_sae, R1] temporaries,
    which at GPT-2 scale cost more than the products) and the returned U is U."""
    f = _cayley_factors(step_rR, _at_least_float32(U_FR.dtype))
    r, rank = step_rR.shape
    dtype = f.step_rR.dtype
    if _dense_turn_is_cheaper(rank, r):
        Q_RR = _rotation(f, rank)
        return GaugeTurn(U_FR.to(dtype) @ Q_RR, Q_RR.T @ C1_RD.to(dtype))
    K_2r2r = _woodbury_K(f)
    new_C1 = _woodbury_turned_C1(C1_RD, f, K_2r2r)
    W_F2r = _low_rank_update(U_FR, f, K_2r2r)
    if in_place and U_FR.dtype == dtype:
        new_U = U_FR
        new_U.addmm_(W_F2r[:, :r], f.step_rR, alpha=-1)
    else:
        new_U = U_FR.to(dtype) - W_F2r[:, :r] @ f.step_rR
    new_U[:, :r] -= W_F2r[:, r:]
    return GaugeTurn(new_U, new_C1)


def turn_along_gauge(U_FR: Tensor, C1_RD: Tensor, step_rR: Tensor) -> GaugeTurn:
    """``U Q`` and ``Q^T C1`` for the Cayley rotation ``Q = (I + S/2)^-1 (I - S/2)``
    (orthogonal, ``exp(-S)`` to second order) of the skew matrix S whose first r
    rows are ``step_rR`` and whose other entries are zero but for
    ``S[r:, :r] = -step_rR[:, r:]^T``.

    ``I - Q`` then has rank at most 2r: with ``S = X Y^T``, ``X = [E, F]``,
    ``Y = [step^T, E]`` (E the first r columns of I, ``F = [0; -B^T]``,
    ``B = step_rR[:, r:]``), Woodbury gives ``Q = I - X K Y^T`` with
    ``K = (I + Y^T X / 2)^-1`` (2r x 2r), so turning U costs about
    ``2 d_sae r R1`` multiply-adds instead of ``d_sae R1^2``; where r is a large
    share of R1 the dense product ``U @ Q`` is cheaper and is used instead.
    """
    turned = _turn(U_FR, C1_RD, step_rR, in_place=False)
    return GaugeTurn(turned.U_FR.to(U_FR.dtype), turned.C1_RD.to(C1_RD.dtype))


@torch.no_grad()
def turn_along_gauge_(U_FR: Tensor, C1_RD: Tensor, step_rR: Tensor) -> None:
    """:func:`turn_along_gauge` in place: for float32/float64 U the low-rank
    update is added to U directly; half-precision U, and the dense product, go
    through one temporary."""
    turned = _turn(U_FR, C1_RD, step_rR, in_place=True)
    if turned.U_FR is not U_FR:
        U_FR.copy_(turned.U_FR)
    C1_RD.copy_(turned.C1_RD)


@torch.no_grad()
def turn_and_retract_(U_FR: Tensor, C1_RD: Tensor, step_rR: Tensor) -> None:
    """:func:`turn_along_gauge_` then :func:`cholesky_qr_retract_`, in place.

    Where the turn is the dense ``U @ Q`` (:func:`_dense_turn_is_cheaper`) and
    U is float32, the two take one product over U instead of three: the Gram
    matrix of ``U Q`` is ``Q^T (U^T U) Q``, so with ``L L^T`` its Cholesky
    factorisation the retracted ``U Q L^-T`` is U times the small matrix
    ``Q L^-T``. It is the same Q factor up to rounding. When one CholeskyQR
    pass would not do (U far from orthonormal: a second pass, or the
    Householder fallback), U is turned first and retracted as usual.
    """
    r, rank = step_rR.shape
    if U_FR.dtype == torch.float32 and U_FR.is_contiguous() and _dense_turn_is_cheaper(rank, r):
        Q_RR = _rotation(_cayley_factors(step_rR, torch.float32), rank)
        M_RR = _turned_retraction_factor(U_FR, Q_RR)
        if M_RR is not None:
            times_(U_FR, M_RR)
            C1_RD.copy_(Q_RR.T @ C1_RD.float())
            return
    turn_along_gauge_(U_FR, C1_RD, step_rR)
    cholesky_qr_retract_(U_FR)


def _turned_retraction_factor(U_FR: Tensor, Q_RR: Tensor) -> Tensor | None:
    """``Q L^-T`` with ``L L^T = Q^T (U^T U) Q``, so that ``U Q L^-T`` is the Q
    factor of ``U Q``; None where one CholeskyQR pass would not do."""
    gram_RR = Q_RR.T @ symmetric_gram(U_FR) @ Q_RR
    gram_RR = (gram_RR + gram_RR.T) / 2  # exactly symmetric, as a Gram matrix is
    eye_RR = torch.eye(gram_RR.shape[0], dtype=gram_RR.dtype, device=gram_RR.device)
    if _needs_second_pass(gram_RR - eye_RR):
        return None
    L_inv_RR = _inverse_cholesky_factor(gram_RR)
    return None if L_inv_RR is None else Q_RR @ L_inv_RR.T


def gauge_adam_step(sae: nn.Module, optimizer: Optimizer, gamma_rR: Tensor, scale: float) -> Tensor:
    """The gauge step: an Adam step ``lr * scale * m_hat / (sqrt(v_hat) + eps)``
    [r, R1] on ``gamma_rR`` (the first rows of :func:`gauge_gradient`, taken
    before the optimizer's step), by which U and C1 then turn along the gauge
    orbit (:func:`retract_` with ``turn_rR``).

    U's own Adam step does this only slowly: U's second moments are set mostly
    by the linear term's gradient, which is much larger than the interaction
    terms' and has no component along the orbit, so the orbit component of U's
    step is scaled down accordingly (measured in ``docs/inclass-plateau.md``:
    the first R2 columns of U find the planted quadratic subspace several times
    faster with this step). Here the orbit gradient gets moments of its own,
    kept in the optimizer's state for U (``gauge_exp_avg``, ``gauge_exp_avg_sq``,
    ``gauge_step``, so they are checkpointed with it), with the betas, eps and
    learning rate of U's parameter group times ``scale``. The rotation
    (:func:`turn_along_gauge` of the returned step) is orthogonal, so
    U stays on the manifold and U @ C1 is unchanged. Only the rows of the orbit
    that the interaction terms see move (:func:`interaction_rank`); the rest of
    the orbit only turns the linear term's basis, whose gradient is zero but for
    rounding, which Adam's normalisation would blow up into turns of their own.
    """
    U = _projection(sae)
    group = next(g for g in optimizer.param_groups if any(p is U for p in g["params"]))
    beta1, beta2 = group.get("betas", (0.9, 0.999))
    eps = float(group.get("eps", 1e-8))
    state = optimizer.state[U]
    exp_avg = state.get("gauge_exp_avg")
    if exp_avg is not None and exp_avg.shape != gamma_rR.shape:
        # moments saved before only the interaction rows were kept: [R1, R1]
        state["gauge_exp_avg"] = exp_avg[: gamma_rR.shape[0]].clone()
        state["gauge_exp_avg_sq"] = state["gauge_exp_avg_sq"][: gamma_rR.shape[0]].clone()
        exp_avg = state["gauge_exp_avg"]
    if exp_avg is None:
        exp_avg = state["gauge_exp_avg"] = torch.zeros_like(gamma_rR)
        state["gauge_exp_avg_sq"] = torch.zeros_like(gamma_rR)
        state["gauge_step"] = 0
    exp_avg_sq = state["gauge_exp_avg_sq"]
    state["gauge_step"] = step = int(state["gauge_step"]) + 1
    exp_avg.mul_(beta1).add_(gamma_rR, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(gamma_rR, gamma_rR, value=1 - beta2)
    # m and v have a skew and a symmetric leading block, so the step is skew there
    step_rR = (exp_avg / (1 - beta1**step)) / ((exp_avg_sq / (1 - beta2**step)).sqrt() + eps)
    return float(group["lr"]) * scale * step_rR


@torch.no_grad()
def retract_(
    sae: nn.Module, optimizer: Optimizer | None = None, turn_rR: Tensor | None = None
) -> None:
    """Retract ``sae.U`` in place, following the SAE's Stiefel settings; with
    ``turn_rR`` (a step of :func:`gauge_adam_step`), turn U and C1 along the
    gauge first (:func:`turn_and_retract_` where the retraction is CholeskyQR).

    ``stiefel_every_n_steps`` (default 1) is counted with the optimizer's step
    count for U (Adam's ``state["step"]``); with no such count every call
    retracts. ``stiefel_method`` picks the computation of the same Q factor
    (default ``"qr"`` for modules without the field).
    ``stiefel_project_moments`` also projects Adam's first moment of U onto the
    tangent space at the retracted point.
    """
    U = _projection(sae)
    every_n = getattr(sae.cfg, "stiefel_every_n_steps", 1)
    state = optimizer.state.get(U, {}) if optimizer is not None else {}
    step = state.get("step")
    # (every_n 1 never reads the count: fused Adam keeps it on the GPU, a sync)
    due = every_n == 1 or (every_n != 0 and (step is None or int(step) % every_n == 0))
    method = getattr(sae.cfg, "stiefel_method", "qr")
    if turn_rR is not None and due and method == "cholesky_qr":
        turn_and_retract_(U, _c1(sae), turn_rR)
    else:
        if turn_rR is not None:
            turn_along_gauge_(U, _c1(sae), turn_rR)
        if not due:
            return
        RETRACTIONS[method](U)
    exp_avg = state.get("exp_avg")
    if getattr(sae.cfg, "stiefel_project_moments", False) and exp_avg is not None:
        exp_avg.copy_(project_to_tangent(U.float(), exp_avg.float()).to(exp_avg.dtype))


def _targets(optimizer: Optimizer) -> list[weakref.ref[nn.Module]]:
    targets = _TARGETS.get(optimizer)
    if targets is None:
        targets = _TARGETS[optimizer] = _find_targets(optimizer)
        if targets:
            use_fused_adam(optimizer, [ref() for ref in targets])
    return targets


def use_fused_adam(optimizer: Optimizer, saes: Iterable[nn.Module | None]) -> bool:
    """Switch ``optimizer`` to torch's fused Adam kernel if every SAE in ``saes``
    asks for it (config field ``fused_adam``) and the switch changes nothing but
    speed; return whether it did.

    Runs before the optimizer's first step (the automatic hooks and
    :func:`attach_stiefel_retraction` call it). Only a ``torch.optim.Adam`` or
    ``AdamW`` whose groups were built with neither ``foreach`` nor ``fused`` set
    and without ``differentiable`` or ``capturable`` is switched, only before it
    has any state, and only when the fused kernel supports every parameter's
    device and dtype. Adam reads ``group["fused"]`` at each step; a checkpoint
    saved from the switched optimizer records ``fused=True`` and resumes fused.
    """
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW) or optimizer.state:
        # (state loaded from a non-fused run keeps its layout: on GPUs the fused
        # kernel wants its step counters on the device)
        return False
    saes = list(saes)
    if not saes or not all(
        sae is not None and getattr(sae.cfg, "fused_adam", False) for sae in saes
    ):
        return False
    for group in optimizer.param_groups:
        if group.get("fused") is not None or group.get("foreach"):
            return False
        if group.get("differentiable") or group.get("capturable"):
            return False
        if not all(_fused_kernel_supports(p) for p in group["params"]):
            return False
    for group in optimizer.param_groups:
        group["fused"] = True
    logger.info("polysae-lens switched %s to torch's fused kernel.", type(optimizer).__name__)
    return True


def _fused_kernel_supports(param: Tensor) -> bool:
    try:
        # the check torch's own Adam runs on fused parameters at their first step
        from torch.optim.optimizer import _device_dtype_check_for_fused

        _device_dtype_check_for_fused(param)
    except (RuntimeError, ImportError):
        return False
    return True


def _before_any_step(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
    targets = _targets(optimizer)
    if targets:
        _snapshot_scaled_steps(optimizer, targets)


def _after_any_step(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
    targets = _TARGETS.get(optimizer)
    if targets:
        _finish_step(optimizer, targets)


def _snapshot_scaled_steps(optimizer: Optimizer, targets: list[weakref.ref[nn.Module]]) -> None:
    snapshots = []
    gauges = []
    for ref in targets:
        sae = ref()
        if sae is None:
            continue
        for name, scale in step_scales(sae).items():
            param = getattr(sae, name, None)
            if isinstance(param, Tensor) and scale != 1.0 and _optimizes(optimizer, param):
                snapshots.append((param, _snapshot(sae, name, param), scale))
        gauge_scale = gauge_step_scale(sae)
        U, C1 = getattr(sae, "U", None), getattr(sae, "C1", None)
        if (
            gauge_scale > 0
            and isinstance(U, Tensor)
            and isinstance(C1, Tensor)
            and U.grad is not None
            and C1.grad is not None
            and _optimizes(optimizer, C1)
        ):
            # before the step: the linear term cancels only at the point where
            # the gradients were taken
            gamma_rR = gauge_gradient(
                U.detach(), U.grad, C1.detach(), C1.grad, interaction_rank(sae)
            )
            gauges.append((sae, gamma_rR, gauge_scale))
    _SNAPSHOTS[optimizer] = snapshots
    _GAUGE_GRADIENTS[optimizer] = gauges


def _snapshot(sae: nn.Module, name: str, param: Tensor) -> Tensor:
    """A copy of ``param``'s values in a buffer kept between steps for ``sae.<name>``."""
    buffers = _SNAPSHOT_BUFFERS.setdefault(sae, {})
    buffer = buffers.get(name)
    if (
        buffer is None
        or buffer.shape != param.shape
        or buffer.dtype != param.dtype
        or buffer.device != param.device
    ):
        buffer = buffers[name] = torch.empty_like(param, requires_grad=False)
    return buffer.copy_(param.detach())


@torch.no_grad()
def _finish_step(optimizer: Optimizer, targets: list[weakref.ref[nn.Module]]) -> None:
    for param, before, scale in _SNAPSHOTS.pop(optimizer, []):
        # before + scale * (param - before), in place: no [d_sae, R1] temporaries
        param.lerp_(before, 1.0 - scale)
    turns = {
        id(turned): gauge_adam_step(turned, optimizer, gamma_rR, scale)
        for turned, gamma_rR, scale in _GAUGE_GRADIENTS.pop(optimizer, [])
    }
    for ref in targets:
        sae = ref()
        if sae is not None:
            retract_(sae, optimizer, turns.get(id(sae)))
            apply_subspace_fit_(sae, optimizer)


def _find_targets(optimizer: Optimizer) -> list[weakref.ref[nn.Module]]:
    return [weakref.ref(sae) for sae in list(_TRACKED) if _optimizes(optimizer, _projection(sae))]


def _projection(sae: nn.Module | None) -> Tensor:
    U = getattr(sae, "U", None)
    if not isinstance(U, Tensor):
        raise ValueError(f"{type(sae).__name__} has no U parameter to retract.")
    return U


def _c1(sae: nn.Module) -> Tensor:
    C1 = getattr(sae, "C1", None)
    if not isinstance(C1, Tensor):
        raise ValueError(f"{type(sae).__name__} has no C1 parameter to turn with U.")
    return C1


def _optimizes(optimizer: Optimizer, param: Tensor) -> bool:
    return any(p is param for group in optimizer.param_groups for p in group["params"])
