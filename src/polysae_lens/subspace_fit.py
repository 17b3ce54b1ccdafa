"""Fitting the interaction subspace to data, once, early in training (issue 13).

The interaction terms square (and cube) the first R2 (R3) coordinates of the
projection ``a = z @ U``. Gradient training, even with the gauge step, can leave
one of those channels aimed at nothing: in the in-class benchmark two seeds in
fourteen find only seven of the eight planted quadratic directions, and the
stuck channel's output stays an order of magnitude below the others from step
1000 on (``docs/inclass-plateau.md``, ninth pass). The fit looks at the data
instead:

1. regress the linear term's residual ``r = x - b_dec - a @ C1``, along its top
   J principal components, on every product ``a_p a_q`` (one quadratic form
   ``M_j`` per component, plus a linear and a constant term);
2. take the R2 directions those forms use most (top eigenvectors of
   ``sum_j M_j^2``), with the basis inside them that diagonalises a random mix
   of the forms (the model's quadratic term is diagonal in U's basis);
3. turn U's basis there, ``U -> U Q``, ``C1 -> Q^T C1``, which leaves the
   first-order decoder ``U @ C1`` unchanged;
4. refit C2 (and C3 at order 3) by least squares in the new coordinates.

A form over R1 coordinates has R1 (R1 + 1) / 2 coefficients (295,296 at the
paper's R1 = 768), too many features to form, so step 1 solves the normal
equations matrix-free by conjugate gradients (:func:`quadratic_forms`): each
iteration is one pass over the rows, O(N J R1^2). (A cheaper screen that chose
2 R2 candidate directions from third-order moments first missed what the full
regression finds: ``docs/inclass-plateau.md``, tenth pass.)

Pure functions here; :class:`SubspaceFitRows` (the rows a training SAE collects)
and :func:`apply_subspace_fit_` (called after the optimizer step, where Adam's
state is at hand) are thin wrappers used by :mod:`polysae_lens.sae` and
:mod:`polysae_lens.stiefel`.

Shape key (besides :mod:`polysae_lens.polynomial`'s): ``N`` rows, ``J`` the
residual's principal components, ``P`` regression features.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from polysae_lens.polynomial import PolyDecoderWeights, project

logger = logging.getLogger(__name__)

MIN_ROWS = 8192
"""The fewest rows the fit collects by default (:func:`default_rows`)."""

ROWS_PER_FEATURE = 2
"""Rows per regression feature (:func:`product_count`) the fit collects by default."""

MAX_DEFAULT_ROWS = 131_072
"""The most rows the fit collects by default: 0.8 GB of float32 ``a`` and residual
rows at R1 = d_in = 768 (all ranks' together), fewer than the 296,065 features there:
CG then converges towards the smallest-norm solution. Not measured at that shape; the
fit's arithmetic is about 4 x rows x J x R1^2 per CG iteration (4e13 at GPT-2 small's
defaults, J = 128: about a second on a data-centre GPU in float64, many minutes on a
CPU, where ``subspace_fit_rows`` / ``subspace_fit_iterations`` should be lowered)."""

DEFAULT_ITERATIONS = 50
"""CG iterations of :func:`quadratic_forms` by default (``subspace_fit_iterations``)."""


class SubspaceFit(NamedTuple):
    """What :func:`fit_interaction_subspace` found."""

    Q_RR: Tensor
    """Orthogonal [R1, R1]: the new basis is ``U @ Q`` (its first R2 columns the fitted directions)."""
    C2_SD: Tensor
    """Refitted quadratic term [R2, d_in], for the SAE's current ``lambda2``."""
    C3_TD: Tensor | None
    """Refitted cubic term [R3, d_in] for the current ``lambda3``; None below order 3."""
    top_eigenvalues: Tensor
    """The largest eigenvalues of ``sum_j M_j^2`` (R2 + 2 of them, at most R1),
    descending: a gap after the R2-th says the data has that many quadratic directions."""


def whitening(a_NR: Tensor) -> tuple[Tensor, Tensor]:
    """(mean [R1], symmetric ``W`` [R1, R1]) with ``(a - mean) @ W`` of identity
    covariance (eigenvalues floored at 1e-6 of the largest)."""
    mean_R = a_NR.mean(0)
    centred = a_NR - mean_R
    evals_R, evecs_RR = torch.linalg.eigh(centred.T @ centred / a_NR.shape[0])
    evals_R = evals_R.clamp_min(float(evals_R.max()) * 1e-6 + torch.finfo(a_NR.dtype).tiny)
    return mean_R, evecs_RR @ torch.diag(evals_R.rsqrt()) @ evecs_RR.T


class _Forms(NamedTuple):
    """One quadratic model per output: ``w^T M w + w . l + c``."""

    M_JRR: Tensor
    l_JR: Tensor
    c_J: Tensor

    def dot(self, other: _Forms) -> Tensor:
        return torch.stack([(x * y).sum() for x, y in zip(self, other, strict=True)]).sum()

    def plus(self, other: _Forms, alpha: Tensor | float) -> _Forms:
        return _Forms(*(x + alpha * y for x, y in zip(self, other, strict=True)))


def _moments(w_NR: Tensor, y_NJ: Tensor, chunk: int) -> _Forms:
    """``(E[y_j w w^T], E[y_j w], E[y_j])``: the regression's gradient against ``y``."""
    N, R = w_NR.shape
    J = y_NJ.shape[1]
    M_JR_R = w_NR.new_zeros(J * R, R)
    for start in range(0, N, chunk):
        w, y = w_NR[start : start + chunk], y_NJ[start : start + chunk]
        # one [J R, n] x [n, R] product for every j at once
        M_JR_R.addmm_((y[:, :, None] * w[:, None, :]).reshape(-1, J * R).T, w)
    return _Forms(M_JR_R.view(J, R, R) / N, y_NJ.T @ w_NR / N, y_NJ.mean(0))


def _predict(w_NR: Tensor, forms: _Forms, chunk: int) -> Tensor:
    """``w^T M_j w + w . l_j + c_j`` [N, J]."""
    J, R, _ = forms.M_JRR.shape
    M_R_JR = forms.M_JRR.permute(1, 0, 2).reshape(R, J * R)
    parts = [((w @ M_R_JR).view(-1, J, R) * w[:, None, :]).sum(-1) for w in w_NR.split(chunk)]
    return torch.cat(parts) + w_NR @ forms.l_JR.T + forms.c_J


def quadratic_forms(
    a_NR: Tensor, y_NJ: Tensor, iterations: int, chunk: int = 1024
) -> tuple[Tensor, float]:
    """(forms ``M_j`` [J, R1, R1] in ``a``'s coordinates, relative residual of the
    normal equations) of the least-squares fit ``y_j ~ a^T M_j a + a . l_j + c_j``
    over every product ``a_p a_q``.

    R1 (R1 + 1) / 2 products are too many features to form (295,296 at R1 =
    768), so the normal equations are solved matrix-free by conjugate gradients:
    applying their matrix to a set of forms costs one prediction and one
    moment pass over the rows, O(N J R1^2). The coordinates are whitened first
    (a quadratic form in ``w = (a - mean) W`` is one in ``a`` plus linear and
    constant terms, which the model has), which conditions the system; CG
    starts at zero, so with fewer rows than products it converges to the
    smallest-norm solution.
    """
    mean_R, W_RR = whitening(a_NR)
    w_NR = (a_NR - mean_R) @ W_RR
    rhs = _moments(w_NR, y_NJ, chunk)
    x = _Forms(*(torch.zeros_like(t) for t in rhs))
    residual, direction = rhs, rhs
    rr = rhs.dot(rhs)
    rr0 = float(rr)
    for _ in range(iterations):
        if float(rr) <= 1e-30 * max(rr0, 1e-300):
            break
        applied = _moments(w_NR, _predict(w_NR, direction, chunk), chunk)
        alpha = rr / direction.dot(applied)
        x = x.plus(direction, alpha)
        residual = residual.plus(applied, -alpha)
        rr_new = residual.dot(residual)
        direction = residual.plus(direction, rr_new / rr)
        rr = rr_new
    relative = math.sqrt(float(rr) / rr0) if rr0 > 0 else 0.0
    return W_RR @ x.M_JRR @ W_RR, relative


def residual_components(r_ND: Tensor, n_outputs: int) -> Tensor:
    """The centred residual's coordinates along its top ``n_outputs`` principal
    directions [N, J]: where the interaction terms' outputs must lie."""
    centred = r_ND - r_ND.mean(0)
    Vh = torch.linalg.svd(centred, full_matrices=False).Vh
    return centred @ Vh[:n_outputs].T


def interaction_directions(M_JRR: Tensor, rank: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(orthonormal [R1, rank] directions, the top eigenvalues of ``sum_j M_j^2``).

    The directions span the top ``rank`` eigenvectors of ``sum_j M_j^2`` (the
    subspace the forms live in), in the basis that diagonalises a random
    combination of the forms projected there: for forms that are all diagonal in
    one basis of that subspace, as the model's quadratic term is, that basis.
    """
    S_RR = torch.einsum("jab,jbc->ac", M_JRR, M_JRR)
    evals_R, evecs_RR = torch.linalg.eigh(S_RR)
    order = evals_R.argsort(descending=True)
    V_Rs = evecs_RR[:, order[:rank]]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    mix_J = torch.randn(M_JRR.shape[0], generator=gen, dtype=M_JRR.dtype).to(M_JRR.device)
    mixed_ss = torch.einsum("j,as,jab,bt->st", mix_J, V_Rs, M_JRR, V_Rs)
    _, E_ss = torch.linalg.eigh((mixed_ss + mixed_ss.T) / 2)
    return V_Rs @ E_ss, evals_R[order[: rank + 2]]


def orthogonal_completion(V_RS: Tensor) -> Tensor:
    """Orthogonal [R1, R1] whose first S columns are the orthonormal ``V``; the rest
    are the remaining coordinate directions projected off ``V`` and orthonormalised
    (Householder QR, column signs fixed so diag(R) > 0 past S)."""
    R, S = V_RS.shape
    eye_RR = torch.eye(R, dtype=V_RS.dtype, device=V_RS.device)
    Q_RR, R_RR = torch.linalg.qr(torch.cat([V_RS, eye_RR], 1))
    Q_RR = Q_RR[:, :R] * torch.sign(torch.diagonal(R_RR)[:R]).where(
        torch.diagonal(R_RR)[:R] != 0, torch.ones((), dtype=V_RS.dtype, device=V_RS.device)
    )
    Q_RR[:, :S] = V_RS  # exactly, not up to QR's rounding
    return Q_RR


def least_squares(
    features: Callable[[slice], Tensor], y_ND: Tensor, chunk: int = 4096, ridge: float = 1e-10
) -> Tensor:
    """Coefficients [P, D] minimising ``||F X - y||`` for ``F`` built by row chunks
    (``features(rows)``), through the normal equations in float64. ``ridge``
    (relative to the Gram matrix's mean diagonal) only keeps the Cholesky
    factorisation defined for exactly collinear features."""
    gram_PP = cross_PD = None
    for start in range(0, y_ND.shape[0], chunk):
        rows = slice(start, start + chunk)
        F_NP = features(rows).double()
        y = y_ND[rows].double()
        gram_PP = F_NP.T @ F_NP if gram_PP is None else gram_PP + F_NP.T @ F_NP
        cross_PD = F_NP.T @ y if cross_PD is None else cross_PD + F_NP.T @ y
    if gram_PP is None or cross_PD is None:
        raise ValueError("least_squares needs at least one row.")
    scale = float(gram_PP.diagonal().mean()) or 1.0
    eye = torch.eye(gram_PP.shape[0], dtype=gram_PP.dtype, device=gram_PP.device)
    L_PP, info = torch.linalg.cholesky_ex(gram_PP + ridge * scale * eye)
    if int(info) != 0:  # singular beyond the ridge: the minimum-norm solution
        return torch.linalg.pinv(gram_PP, hermitian=True) @ cross_PD
    return torch.cholesky_solve(cross_PD, L_PP)


def refit_interaction_terms(
    a_NR: Tensor, r_ND: Tensor, n_quadratic: int, n_cubic: int
) -> tuple[Tensor, Tensor | None]:
    """Least-squares coefficients of ``a[:, :S]^2`` [S, D] and ``a[:, :T]^3``
    [T, D] (None for T = 0) in ``r ~ a_S^2 C + a_T^3 C' + a . l + c``."""

    def features(rows: slice) -> Tensor:
        a = a_NR[rows]
        ones = torch.ones(a.shape[0], 1, dtype=a.dtype, device=a.device)
        return torch.cat([a[:, :n_quadratic] ** 2, a[:, :n_cubic] ** 3, a, ones], 1)

    coef_PD = least_squares(features, r_ND)
    quad_SD = coef_PD[:n_quadratic]
    cubic_TD = coef_PD[n_quadratic : n_quadratic + n_cubic] if n_cubic else None
    return quad_SD, cubic_TD


def fit_interaction_subspace(
    a_NR: Tensor,
    r_ND: Tensor,
    weights: PolyDecoderWeights,
    n_outputs: int,
    iterations: int = DEFAULT_ITERATIONS,
    seed: int = 0,
) -> SubspaceFit:
    """Fit the interaction subspace to rows of ``a = z @ U`` and the linear
    residual ``r = x - b_dec - a @ C1`` (module docstring), for a PolySAE with
    decoder ``weights`` (order >= 2): the forms of the residual's top
    ``n_outputs`` principal components, by ``iterations`` CG steps. Computed in
    float64."""
    if weights.C2_SD is None or weights.lambda2 is None:
        raise ValueError("The subspace fit needs an order >= 2 PolySAE (it has no C2).")
    a = a_NR.double()
    r = r_ND.double()
    S = weights.C2_SD.shape[0]
    T = 0 if weights.C3_TD is None else weights.C3_TD.shape[0]
    M_JRR, _ = quadratic_forms(a, residual_components(r, n_outputs), iterations)
    V_RS, top = interaction_directions(M_JRR, S, seed)
    Q_RR = orthogonal_completion(V_RS)
    quad_SD, cubic_TD = refit_interaction_terms(a @ Q_RR, r, S, T)
    C2_SD = quad_SD / _nonzero(weights.lambda2)
    C3_TD = None
    if cubic_TD is not None and weights.lambda3 is not None:
        C3_TD = cubic_TD / _nonzero(weights.lambda3)
    return SubspaceFit(Q_RR, C2_SD, C3_TD, top)


def _nonzero(scale: Tensor) -> float:
    value = float(scale.detach())
    if value == 0.0:
        raise ValueError(
            "The subspace fit refits C2 (C3) for the current lambda2 (lambda3), which is 0; "
            "set lambda2_init (lambda3_init) to a nonzero value."
        )
    return value


# ---- during training -------------------------------------------------------


def output_count(cfg: Any) -> int:
    """J: the config's ``subspace_fit_outputs``, None meaning min(d_in, 2 R2)."""
    value = getattr(cfg, "subspace_fit_outputs", None)
    return min(int(cfg.d_in), 2 * int(cfg.ranks[1])) if value is None else int(value)


def product_count(R1: int) -> int:
    """Features of :func:`quadratic_forms` at rank R1: R1 (R1 + 1) / 2 products, R1 + 1 more."""
    return R1 * (R1 + 1) // 2 + R1 + 1


def default_rows(cfg: Any) -> int:
    """Rows the fit collects: the config's ``subspace_fit_rows``, None meaning
    :data:`ROWS_PER_FEATURE` x :func:`product_count`, between :data:`MIN_ROWS`
    and :data:`MAX_DEFAULT_ROWS`."""
    value = getattr(cfg, "subspace_fit_rows", None)
    if value is not None:
        return int(value)
    wanted = ROWS_PER_FEATURE * product_count(int(cfg.ranks[0]))
    return max(MIN_ROWS, min(MAX_DEFAULT_ROWS, wanted))


class SubspaceFitRows:
    """The rows a training PolySAE collects for its subspace fit: ``a = z @ U``
    and the linear residual, from the training batches of the steps just before
    ``subspace_fit_step`` (as many steps as the rows need).

    Kept on the SAE (attribute ``_subspace_fit_rows``) between its training
    forward passes and the optimizer's post-step hook. Not checkpointed: the
    window is fixed by the trainer's step count, so a run resumed inside it
    fits on the rows collected since the resume (and logs how many).
    """

    def __init__(self, copies: int = 1) -> None:
        self.a: list[Tensor] = []
        self.r: list[Tensor] = []
        self.ready = False
        self.copies = copies
        """Ranks holding each row (the shards of a replica): gathered rows repeat
        that many times, which leaves every mean, and so the fit, unchanged."""

    @property
    def count(self) -> int:
        return sum(t.shape[0] for t in self.a)

    @torch.no_grad()
    def collect(self, a_BR: Tensor, r_BD: Tensor, last: bool) -> None:
        self.a.append(a_BR.detach().float().clone())
        self.r.append(r_BD.detach().float().clone())
        self.ready = last


def in_window(
    cfg: Any, n_training_steps: int, batch_rows: int, copies: int = 1
) -> tuple[bool, bool]:
    """(collect this step's rows, this is the window's last step) for the forward
    pass of the step after ``n_training_steps`` completed ones: the window is the
    ``ceil(rows / global rows per step)`` steps ending with step
    ``subspace_fit_step`` (counted from 1). A step's global rows are
    ``batch_rows`` times the ranks that hold distinct rows (the world size over
    ``copies``, the ranks that hold each row: the shards of a replica)."""
    fit_step = getattr(cfg, "subspace_fit_step", None)
    step = n_training_steps + 1
    # every training step asks: past the fit (most of a run) it costs two lookups
    if not fit_step or step > fit_step or getattr(cfg, "poly_order", 1) < 2:
        return False, False
    global_rows = batch_rows * max(group_size() // copies, 1)
    steps = math.ceil(default_rows(cfg) / max(global_rows, 1))
    return fit_step - steps < step, step == fit_step


@torch.no_grad()
def keep_fit_rows(
    sae: Any,
    rows_of_step: Callable[[], tuple[Tensor, Tensor]],
    n_training_steps: int,
    batch_rows: int,
    copies: int = 1,
) -> None:
    """If this step is in the fit's window (:func:`in_window`), keep the rows
    ``rows_of_step()`` returns (``a = z @ U`` and the linear residual) on ``sae``
    (its ``_subspace_fit_rows``); outside it they are never computed."""
    collect, last = in_window(sae.cfg, n_training_steps, batch_rows, copies)
    if not collect:
        return
    rows = getattr(sae, "_subspace_fit_rows", None)
    if rows is None:
        rows = sae._subspace_fit_rows = SubspaceFitRows(copies)
    rows.collect(*rows_of_step(), last)


def collect_fit_rows(
    sae: Any, sae_in_BD: Tensor, feature_acts_BF: Tensor, n_training_steps: int
) -> None:
    """:func:`keep_fit_rows` for a PolySAE's training step: ``a`` from its code,
    the residual in the space the decoder reconstructs (after the SAE's run-time
    input normalisation)."""

    def rows_of_step() -> tuple[Tensor, Tensor]:
        a_BR = project(feature_acts_BF.detach(), sae.U.detach())
        target_BD = sae.run_time_activation_norm_fn_in(sae_in_BD.detach())
        return a_BR, target_BD - sae.b_dec.detach() - a_BR @ sae.C1.detach()

    keep_fit_rows(sae, rows_of_step, n_training_steps, sae_in_BD.shape[0])


def group_size(group: Any = None) -> int:
    """Ranks in ``group`` (default: all) under torch.distributed; 1 without it."""
    dist = torch.distributed
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _gathered(local: Tensor) -> Tensor:
    """Every rank's rows in rank order, on every rank (the default process group)."""
    world = group_size()
    if world == 1:
        return local
    dist = torch.distributed
    sizes = [torch.zeros(1, dtype=torch.long, device=local.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([local.shape[0]], device=local.device))
    most = max(int(s) for s in sizes)
    padded = local.new_zeros(most, local.shape[1])
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(n)] for part, n in zip(parts, sizes, strict=True)])


@torch.no_grad()
def apply_subspace_fit_(sae: Any, optimizer: Any = None) -> SubspaceFit | None:
    """Run the fit if ``sae`` has collected its rows (else nothing, returns None):
    turn U and C1, set C2 (and C3), and clear Adam's first moments of U, C1, C2
    and C3 in ``optimizer`` (they point along the old basis). Under
    torch.distributed every rank fits on all ranks' rows, and rank 0's result is
    broadcast, so the replicas stay identical."""
    rows: SubspaceFitRows | None = getattr(sae, "_subspace_fit_rows", None)
    if rows is None or not rows.ready:
        return None
    sae._subspace_fit_rows = None
    a_NR = _gathered(torch.cat(rows.a))
    r_ND = _gathered(torch.cat(rows.r))
    distinct = a_NR.shape[0] // rows.copies
    wanted = default_rows(sae.cfg)
    if distinct < wanted:
        logger.warning(
            "Subspace fit on %d rows instead of %d (the run resumed inside the fit's window).",
            distinct,
            wanted,
        )
    weights: PolyDecoderWeights = sae.decoder_weights
    fit = fit_interaction_subspace(
        a_NR,
        r_ND,
        weights,
        output_count(sae.cfg),
        int(getattr(sae.cfg, "subspace_fit_iterations", DEFAULT_ITERATIONS)),
    )
    fit = _broadcast(fit)
    U, C1 = sae.U, sae.C1
    U.copy_((U.double() @ fit.Q_RR).to(U.dtype))
    C1.copy_((fit.Q_RR.T @ C1.double()).to(C1.dtype))
    sae.C2.copy_(fit.C2_SD.to(sae.C2.dtype))
    changed = [U, C1, sae.C2]
    if fit.C3_TD is not None:
        sae.C3.copy_(fit.C3_TD.to(sae.C3.dtype))
        changed.append(sae.C3)
    if optimizer is not None:
        for param in changed:
            exp_avg = optimizer.state.get(param, {}).get("exp_avg")
            if exp_avg is not None:
                exp_avg.zero_()
    logger.info(
        "Subspace fit on %d rows; top eigenvalues of the fitted forms: %s",
        distinct,
        [round(float(v), 6) for v in fit.top_eigenvalues],
    )
    return fit


def _broadcast(fit: SubspaceFit) -> SubspaceFit:
    if group_size() == 1:
        return fit
    for tensor in fit:
        if tensor is not None:
            torch.distributed.broadcast(tensor, src=0)
    return fit
