"""Latent-sharded PolySAE (TopK sparsifier only) for widths that do not fit one device.

Each of N ranks holds a contiguous slice of the latents: its columns of
``W_enc`` and ``b_enc`` and its rows of ``U``; ``b_dec``, ``C1``, ``C2``,
``C3`` and the lambdas are replicated. One step on every rank, same global
batch everywhere:

- encode: each rank computes its slice's pre-activations [B, d_sae / N] and its
  per-row top k; the global top k is the top k of the all-gathered candidates
  (N * k values and global indices per row: every global top-k entry is in its
  own rank's top k);
- decode: each rank projects its active rows of U ([B, R1]); one all-reduce
  (sum) gives ``a = z @ U`` everywhere, and the polynomial runs identically on
  every rank;
- retraction: the Gram matrix ``U^T U`` (R1 x R1) is the sum of the ranks'
  Gram matrices, so one all-reduce, one Cholesky (identical on every rank) and
  each rank multiplies its rows by the same triangular factor (CholeskyQR, a
  second pass when :func:`polysae_lens.stiefel._needs_second_pass` says so);
- gauge step (``gauge_lr_scale``, on by default): the orbit gradient's
  ``U^T dU`` is a sum over latents, so one all-reduce of its [r, R1] block
  gives every rank the whole SAE's gradient; the Adam moments of the orbit and
  the rotation Q are then identical everywhere, C1 turns identically on every
  rank and each rank turns its own rows of U (``U_s Q``) before the retraction.

Gradients are the unsharded model's: the all-reduce of ``a`` is differentiated
as a sum over ranks of one replicated loss (backward: identity), and the
encoder's input is differentiated as a copy onto every rank (backward: sum), see
:func:`reduce_from_shards` and :func:`copy_to_shards`.

Supported: TopK PolySAE (architecture ``"poly"``), any order and ranks, MSE
loss, Adam with C1's and U's step scales, the gauge step, retraction every
step. Not supported (refused by :func:`shard_poly_sae` with the reason):
BatchTopK/Matryoshka/JumpReLU/gated sparsifiers, ``stiefel_every_n_steps != 1``,
moment projection,
AuxK in :func:`sharded_train_step` (MSE only; the SAETrainer integration,
:mod:`.sharded_trainer`, adds :func:`sharded_auxk_loss`). Training through
SAETrainer, the runner and the CLI on a ``(dp, shard)`` mesh:
:mod:`.mesh`, :mod:`.sharded_trainer`, :mod:`.sharded_runner`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from polysae_lens.auxk import aux_settings, scaled_aux_error
from polysae_lens.polynomial import PolyDecoderWeights, terms_from_projection
from polysae_lens.sparse import SparseCode, code_from_positions, gather_preacts, project_sparse
from polysae_lens.stiefel import (
    _needs_second_pass,
    cholesky_qr_pass_,
    gauge_adam_step,
    gauge_gradient,
    gauge_step_scale,
    interaction_rank,
    symmetric_gram,
    turn_along_gauge_,
)
from polysae_lens.subspace_fit import apply_subspace_fit_, group_size, keep_fit_rows

# ---- layout ------------------------------------------------------------------


class ShardBounds(NamedTuple):
    """The contiguous latent slice ``[start, stop)`` one rank holds."""

    start: int
    """First global latent index of the slice."""
    stop: int
    """One past the last global latent index of the slice."""
    d_sae: int
    """Number of latents of the whole (unsharded) SAE."""

    @property
    def width(self) -> int:
        """Latents on this rank (``stop - start``)."""
        return self.stop - self.start


def shard_bounds(d_sae: int, world_size: int, rank: int, k: int = 1) -> ShardBounds:
    """Rank ``rank``'s slice of ``d_sae`` latents split over ``world_size`` ranks.

    Uneven splits are supported: the first ``d_sae % world_size`` ranks hold one
    latent more. Every slice must hold at least ``k`` latents (each rank offers
    ``k`` candidates per row to the global top k).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is not in [0, world_size={world_size}).")
    base, extra = divmod(d_sae, world_size)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    if base < k:
        raise ValueError(
            f"d_sae={d_sae} over world_size={world_size} ranks leaves {base} latents on "
            f"some rank, fewer than k={k}: use fewer ranks or a wider SAE "
            f"(at least k * world_size = {k * world_size} latents)."
        )
    return ShardBounds(start, stop, d_sae)


# ---- autograd-aware collectives ----------------------------------------------
#
# Every rank computes the same replicated loss L. torch.distributed.nn's
# all_reduce would be wrong here: its backward all-reduces the gradient, i.e.
# it differentiates the *sum of the N ranks' losses* (N x the gradient). These
# two are Megatron's pair: sum forward / identity backward, and its transpose.


class _ReduceFromShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, partial: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        total = partial.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        # dL/d partial_r = dL/d total, already identical on every rank
        return grad, None


class _CopyToShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, replicated: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        ctx.group = group
        return replicated.view_as(replicated)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        # each rank's copy feeds only its own latents: the full gradient is the sum
        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        return total, None


def reduce_from_shards(partial: Tensor, group: Any = None) -> Tensor:
    """Sum of ``partial`` over the ranks; backward passes the (replicated)
    gradient through unchanged."""
    return _ReduceFromShards.apply(partial, group)  # type: ignore[no-any-return]


def copy_to_shards(replicated: Tensor, group: Any = None) -> Tensor:
    """``replicated`` itself; backward sums the ranks' gradients, so a
    replicated tensor that feeds rank-local work gets its full gradient."""
    return _CopyToShards.apply(replicated, group)  # type: ignore[no-any-return]


# ---- encode / decode ---------------------------------------------------------


class GlobalTopK(NamedTuple):
    """The global TopK selection, seen from one rank."""

    cols_BK: Tensor
    """Global latent indices of each row's k selected latents, sorted [B, k]
    (identical on every rank)."""
    rows_N: Tensor
    """Row of each selected latent that lies on this rank (row-major)."""
    local_cols_N: Tensor
    """Its index within this rank's slice."""
    n_positive_B: Tensor
    """Number of each row's selected pre-activations above 0 (the row's L0
    after the ReLU), identical on every rank."""


def select_global_topk(
    hidden_pre_BL: Tensor, k: int, bounds: ShardBounds, group: Any = None
) -> GlobalTopK:
    """Each row's k largest pre-activations over all ranks' slices.

    ``hidden_pre_BL``: this rank's pre-activations [B, width] (no gradient
    needed). Ties between equal values may pick different latents than
    ``torch.topk`` over the unsharded row. ``k`` may exceed the slice's width
    (not the SAE's): the caller must then ensure each row has at least ``k``
    entries above ``-inf`` over all ranks.
    """
    local = hidden_pre_BL.detach().topk(min(k, bounds.width), dim=-1, sorted=False)
    local_vals, local_cols = local.values, local.indices + bounds.start
    if bounds.width < k:
        # a slice narrower than k (AuxK's k_aux) offers all its latents, padded
        # with -inf candidates so every rank sends the same number
        pad = (hidden_pre_BL.shape[0], k - bounds.width)
        local_vals = torch.cat([local_vals, local_vals.new_full(pad, -torch.inf)], dim=-1)
        local_cols = torch.cat([local_cols, local_cols.new_full(pad, bounds.start)], dim=-1)
    world_size = dist.get_world_size(group)
    vals = [torch.empty_like(local_vals) for _ in range(world_size)]
    cols = [torch.empty_like(local_cols) for _ in range(world_size)]
    dist.all_gather(vals, local_vals.contiguous(), group=group)
    dist.all_gather(cols, local_cols.contiguous(), group=group)
    vals_BC, cols_BC = torch.cat(vals, dim=-1), torch.cat(cols, dim=-1)
    picks_BK = vals_BC.topk(k, dim=-1, sorted=False).indices
    cols_BK = cols_BC.gather(1, picks_BK).sort(dim=-1).values
    mine_BK = (cols_BK >= bounds.start) & (cols_BK < bounds.stop)
    rows_BK = torch.arange(cols_BK.shape[0], device=cols_BK.device)[:, None].expand_as(cols_BK)
    # boolean indexing keeps row-major order: the local code is sorted by row, then latent
    n_positive_B = (vals_BC.gather(1, picks_BK) > 0).sum(dim=-1)
    return GlobalTopK(cols_BK, rows_BK[mine_BK], cols_BK[mine_BK] - bounds.start, n_positive_B)


class ShardedCode(NamedTuple):
    """This rank's part of the code and the global selection."""

    code: SparseCode
    """This rank's active latents (local indices), values differentiable in
    W_enc, b_enc and (through :func:`copy_to_shards`) the encoder's input."""
    selection: GlobalTopK
    """The global TopK selection."""
    hidden_pre_BL: Tensor
    """This rank's pre-activations [B, width] (no gradient)."""
    shift_D: Tensor | None
    """The encoder's input shift as :func:`polysae_lens.sparse.gather_preacts`
    took it (``None`` when the input carries it)."""


def sharded_encode(
    sae_in_BD: Tensor,
    W_enc_DL: Tensor,
    b_enc_L: Tensor,
    k: int,
    bounds: ShardBounds,
    input_shift_D: Tensor | None = None,
    group: Any = None,
) -> ShardedCode:
    """TopK code of this rank's latents (ReLU of the selected pre-activations).

    ``sae_in_BD`` and ``input_shift_D`` as :func:`polysae_lens.sparse.gather_preacts`
    takes them (both replicated: pass them through :func:`copy_to_shards` if they
    need a gradient).
    """
    with torch.no_grad():
        hidden_pre_BL = sae_in_BD @ W_enc_DL + b_enc_L
    selection = select_global_topk(hidden_pre_BL, k, bounds, group)
    code = code_from_positions(
        selection.rows_N, selection.local_cols_N, hidden_pre_BL.new_empty(0), hidden_pre_BL.shape
    ).with_latent_major()
    pre_N = gather_preacts(sae_in_BD, W_enc_DL, b_enc_L, hidden_pre_BL, code, input_shift_D)
    return ShardedCode(code.with_vals(pre_N.relu()), selection, hidden_pre_BL, input_shift_D)


def sharded_project(code: SparseCode, U_LR: Tensor, group: Any = None) -> Tensor:
    """``a = z @ U`` [B, R1] on every rank, from each rank's active rows of U."""
    return reduce_from_shards(project_sparse(code, U_LR), group)


def sharded_auxk_loss(
    shard: ShardedPolySAE, forward: ShardedForward, x_BD: Tensor, dead_L: Tensor
) -> Tensor:
    """The AuxK loss (Gao et al. 2024, App. A.2) of the unsharded PolySAE, from
    the shards: each row's top ``k_aux`` dead latents over all ranks (``dead_L``:
    this rank's dead mask [width]) reconstruct the residual through the
    polynomial without bias, compared as the config's ``aux_k`` and
    ``aux_outside_interactions`` say (:mod:`polysae_lens.auxk`), scaled by
    ``min(n_dead / k_aux, 1)``; 0 when no latent is dead anywhere. Without the
    loss coefficient."""
    group = shard.group
    n_dead = dead_L.sum().to(torch.float64).reshape(1)
    dist.all_reduce(n_dead, op=dist.ReduceOp.SUM, group=group)
    num_dead = int(n_dead.item())
    if num_dead == 0:
        return x_BD.new_tensor(0.0)
    settings = aux_settings(shard.cfg, shard.decoder_weights)
    k_aux = settings.k_aux
    hidden_pre_BL = forward.sharded.hidden_pre_BL
    masked_BL = torch.where(dead_L[None], hidden_pre_BL, -torch.inf)
    selection = select_global_topk(masked_BL, min(k_aux, num_dead), shard.bounds, group)
    code = code_from_positions(
        selection.rows_N, selection.local_cols_N, hidden_pre_BL.new_empty(0), hidden_pre_BL.shape
    ).with_latent_major()
    pre_N = gather_preacts(
        forward.sae_in_BD, shard.W_enc, shard.b_enc, hidden_pre_BL, code, forward.sharded.shift_D
    )
    a_BR = sharded_project(code.with_vals(pre_N), shard.U, group)
    recons_BD = terms_from_projection(a_BR, shard.decoder_weights).total()
    residual_BD = (x_BD - forward.sae_out_BD).detach()
    return scaled_aux_error(recons_BD, residual_BD, num_dead, settings)


# ---- retraction --------------------------------------------------------------


@torch.no_grad()
def sharded_cholesky_qr_(U_LR: Tensor, group: Any = None) -> int:
    """Retract the row-sharded U in place: afterwards the union of the ranks'
    rows has orthonormal columns (U's Q factor, diag(R) > 0). Returns the
    number of CholeskyQR passes (1 or 2, the same on every rank).

    Computed in float32 like :func:`polysae_lens.stiefel.cholesky_qr_retract_`.
    All ranks see the same all-reduced Gram matrix, so they take the same
    Cholesky factor and the same pass decision.
    """
    in_place = U_LR.dtype == torch.float32 and U_LR.is_contiguous()
    Q_LR = U_LR if in_place else U_LR.to(torch.float32, memory_format=torch.contiguous_format)
    gram_RR = _global_gram(Q_LR, group)
    eye_RR = torch.eye(gram_RR.shape[0], dtype=gram_RR.dtype, device=gram_RR.device)
    passes = 2 if _needs_second_pass(gram_RR - eye_RR) else 1
    for index in range(passes):
        if index > 0:
            gram_RR = _global_gram(Q_LR, group)
        if not cholesky_qr_pass_(Q_LR, gram_RR):
            # Householder QR needs the whole of U: no sharded fallback
            raise RuntimeError(
                "Sharded Cholesky-QR retraction failed: U's Gram matrix is not numerically "
                "positive definite (U far from full rank, e.g. after a diverging step). "
                "Lower the learning rate, or gather the SAE (gather_poly_sae) and retract "
                "it with Householder QR."
            )
    if not in_place:
        U_LR.copy_(Q_LR)
    return passes


def _global_gram(Q_LR: Tensor, group: Any) -> Tensor:
    return _summed_over_shards(symmetric_gram(Q_LR), group)


def _summed_over_shards(partial: Tensor, group: Any) -> Tensor:
    dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=group)
    return partial


# ---- the module --------------------------------------------------------------


@dataclass(frozen=True)
class ShardedPolyConfig:
    """What a latent-sharded TopK PolySAE needs besides its weights."""

    d_in: int
    """Model dimension."""
    d_sae: int
    """Latents of the whole SAE (all ranks)."""
    k: int
    """Active latents per row (global TopK)."""
    ranks: tuple[int, ...]
    """(R1, R2, R3) truncated to the order."""
    poly_order: int
    """Polynomial order (1, 2 or 3)."""
    apply_b_dec_to_input: bool
    """Encode ``x - b_dec`` (SAELens's option) instead of ``x``."""
    step_scales: tuple[tuple[str, float], ...]
    """(parameter name, factor on its optimizer step): the resolved
    ``c1_lr_scale`` and ``u_lr_scale`` (:func:`polysae_lens.stiefel.step_scales`)."""
    aux_dead_window: int = 0
    """AuxK also takes latents silent for this many steps (0: the trainer's
    window only); the sharded trainer counts them per slice."""
    gauge_lr_scale: float = 0.0
    """The gauge step's learning rate relative to the optimizer's (0: off),
    :func:`sharded_optimizer_step`."""
    aux_k: int | str = "d_in/2"
    """Dead latents per row in the AuxK loss (:func:`polysae_lens.auxk.resolve_aux_k`)."""
    aux_outside_interactions: bool = False
    """AuxK compares outside the interaction terms' output subspace
    (:mod:`polysae_lens.auxk`)."""
    subspace_fit_step: int | None = None
    """Fit the interaction subspace after this step (:mod:`polysae_lens.subspace_fit`;
    None: never). The rows are the replicas' (each shard of a replica holds the
    same rows); every slice of U turns by the same rotation."""
    subspace_fit_rows: int | None = None
    """Rows the fit uses (None: :func:`polysae_lens.subspace_fit.default_rows`)."""
    subspace_fit_outputs: int | None = None
    """Residual components the fit regresses (None: min(d_in, 2 R2))."""
    subspace_fit_iterations: int = 50
    """Conjugate-gradient iterations of the fit."""


class ShardedForward(NamedTuple):
    """The output of :meth:`ShardedPolySAE.forward`."""

    sae_out_BD: Tensor
    """Reconstruction (identical on every rank)."""
    a_BR: Tensor
    """The projection ``z @ U`` (identical on every rank)."""
    sharded: ShardedCode
    """This rank's code and the global selection."""
    sae_in_BD: Tensor
    """The encoder's input (``x - b_dec`` with ``apply_b_dec_to_input``)."""


class ShardedPolySAE(nn.Module):
    """One rank's shard of a TopK PolySAE: ``W_enc`` [d_in, width], ``b_enc``
    [width], ``U`` [width, R1] for its latents; ``b_dec``, ``C1``, ``C2``,
    ``C3``, ``lambda2``, ``lambda3`` replicated. Build with :func:`shard_poly_sae`."""

    W_enc: nn.Parameter
    b_enc: nn.Parameter
    U: nn.Parameter
    b_dec: nn.Parameter
    C1: nn.Parameter
    C2: nn.Parameter
    C3: nn.Parameter
    lambda2: nn.Parameter
    lambda3: nn.Parameter

    def __init__(
        self,
        cfg: ShardedPolyConfig,
        bounds: ShardBounds,
        params: dict[str, Tensor],
        group: Any = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.bounds = bounds
        self.group = group
        for name, value in params.items():
            setattr(self, name, nn.Parameter(value))

    @property
    def decoder_weights(self) -> PolyDecoderWeights:
        """The replicated polynomial with this rank's rows of U."""
        order = self.cfg.poly_order
        return PolyDecoderWeights(
            U_FR=self.U,
            C1_RD=self.C1,
            C2_SD=self.C2 if order >= 2 else None,
            C3_TD=self.C3 if order >= 3 else None,
            lambda2=self.lambda2 if order >= 2 else None,
            lambda3=self.lambda3 if order >= 3 else None,
        )

    def forward(self, x_BD: Tensor) -> ShardedForward:  # type: ignore[override]
        """Encode and decode the global batch ``x_BD`` (the same on every rank)."""
        group = self.group
        shift_D = None
        if self.cfg.apply_b_dec_to_input:
            if x_BD.requires_grad:
                sae_in_BD = copy_to_shards(x_BD - self.b_dec, group)
            else:
                # the [D] shift instead of a [B, D] input gradient (as PolySAE does)
                sae_in_BD = (x_BD - self.b_dec).detach()
                shift_D = copy_to_shards(self.b_dec, group)
        else:
            sae_in_BD = copy_to_shards(x_BD, group) if x_BD.requires_grad else x_BD
        sharded = sharded_encode(
            sae_in_BD, self.W_enc, self.b_enc, self.cfg.k, self.bounds, shift_D, group
        )
        a_BR = sharded_project(sharded.code, self.U, group)
        # from here on every rank computes the same thing from the same a: the
        # replicated parameters get identical (and complete) gradients with no
        # all-reduce of their own (b_dec's encoder part is summed by copy_to_shards)
        sae_out_BD = terms_from_projection(a_BR, self.decoder_weights).total() + self.b_dec
        return ShardedForward(sae_out_BD, a_BR, sharded, sae_in_BD)


REPLICATED = ("b_dec", "C1", "C2", "C3", "lambda2", "lambda3")
"""Parameters every rank holds whole."""


def check_shardable(sae: nn.Module) -> None:
    """Raise ValueError, naming the option and the fix, if ``sae`` is not a
    TopK PolySAE or uses an option the sharded model does not implement."""
    from polysae_lens.sae import PolyTopKSAE, PolyTopKTrainingSAE

    if not isinstance(sae, PolyTopKSAE | PolyTopKTrainingSAE):
        raise ValueError(
            f"Latent sharding supports the TopK PolySAE (architecture 'poly') only, not "
            f"{type(sae).__name__}: BatchTopK's batch-wide threshold and JumpReLU/gated "
            "sparsifiers are not implemented sharded; train it unsharded or data-parallel."
        )
    check_shardable_options(sae.cfg)


def check_shardable_options(cfg: Any) -> None:
    """Raise ValueError, naming the option and the fix, for a PolySAE config
    option the sharded model does not implement."""
    unsupported = {
        "stiefel_every_n_steps": (getattr(cfg, "stiefel_every_n_steps", 1), 1),
        "stiefel_project_moments": (getattr(cfg, "stiefel_project_moments", False), False),
        "rescale_acts_by_decoder_norm": (
            getattr(cfg, "rescale_acts_by_decoder_norm", False),
            False,
        ),
        "normalize_activations": (getattr(cfg, "normalize_activations", "none"), "none"),
    }
    for name, (value, default) in unsupported.items():
        if value != default:
            raise ValueError(
                f"{name}={value!r} is not supported by the latent-sharded PolySAE; "
                f"set {name}={default!r} (or train unsharded)."
            )


def shard_poly_sae(sae: nn.Module, rank: int, world_size: int, group: Any = None) -> ShardedPolySAE:
    """Rank ``rank``'s shard of a TopK PolySAE (copies; ``sae`` is untouched).

    Raises ValueError for sparsifiers and options the sharded model does not
    implement, naming the option and the fix.
    """
    check_shardable(sae)
    sharded_cfg = sharded_config(sae)
    bounds = shard_bounds(sharded_cfg.d_sae, world_size, rank, sharded_cfg.k)
    params = {name: value.clone() for name, value in slice_state(sae, bounds).items()}
    return ShardedPolySAE(sharded_cfg, bounds, params, group)


def sharded_config(sae: nn.Module) -> ShardedPolyConfig:
    """The :class:`ShardedPolyConfig` of a TopK PolySAE (or of any object with
    its ``cfg``)."""
    from polysae_lens.stiefel import step_scales

    cfg: Any = sae.cfg
    return ShardedPolyConfig(
        d_in=cfg.d_in,
        d_sae=cfg.d_sae,
        k=int(cfg.k),
        ranks=tuple(cfg.ranks[: cfg.poly_order]),
        poly_order=cfg.poly_order,
        apply_b_dec_to_input=bool(cfg.apply_b_dec_to_input),
        step_scales=tuple(step_scales(sae).items()),
        aux_dead_window=int(getattr(cfg, "aux_dead_window", 0)),
        gauge_lr_scale=float(getattr(cfg, "gauge_lr_scale", 0.0)),
        aux_k=getattr(cfg, "aux_k", "d_in/2"),
        aux_outside_interactions=bool(getattr(cfg, "aux_outside_interactions", False)),
        **{
            name: getattr(cfg, name)
            for name in (
                "subspace_fit_step",
                "subspace_fit_rows",
                "subspace_fit_outputs",
                "subspace_fit_iterations",
            )
            if hasattr(cfg, name)
        },
    )


def slice_state(sae: nn.Module, bounds: ShardBounds) -> dict[str, Tensor]:
    """The parameters of the shard ``bounds`` of ``sae``: its latents' columns of
    ``W_enc``, entries of ``b_enc`` and rows of ``U``, and the replicated
    parameters; contiguous, detached, possibly views of ``sae``'s tensors."""
    state = sae.state_dict()
    params = {
        "W_enc": state["W_enc"][:, bounds.start : bounds.stop],
        "b_enc": state["b_enc"][bounds.start : bounds.stop],
        "U": state["U"][bounds.start : bounds.stop],
    }
    params.update({name: state[name] for name in REPLICATED if name in state})
    return {name: value.detach().contiguous() for name, value in params.items()}


def gather_poly_sae(shard: ShardedPolySAE) -> dict[str, Tensor] | None:
    """The full PolySAE state dict on rank 0, on the CPU (``None`` on other
    ranks), in the ordinary format (``sae.load_state_dict`` / ``save_model``).
    Collective: every rank must call it.

    Slices travel one at a time (point to point) and go to the CPU as they
    arrive, so rank 0's device never holds more than one other slice.
    """
    group = shard.group
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    widths = [shard_bounds(shard.cfg.d_sae, world_size, r).width for r in range(world_size)]
    pieces: dict[str, Tensor] = {
        "W_enc": shard.W_enc.detach().T,
        "b_enc": shard.b_enc.detach()[:, None],
        "U": shard.U.detach(),
    }
    full: dict[str, Tensor] = {}
    for name, rows in pieces.items():
        rows = rows.contiguous()
        if rank != 0:
            dist.send(rows, dst=_global_rank(group, 0), group=group)
            continue
        parts = [rows.cpu()]
        for src in range(1, world_size):
            buffer = rows.new_empty(widths[src], rows.shape[1])
            dist.recv(buffer, src=_global_rank(group, src), group=group)
            parts.append(buffer.cpu())
        full[name] = torch.cat(parts)
    if rank != 0:
        return None
    state = {
        "W_enc": full["W_enc"].T.contiguous(),
        "b_enc": full["b_enc"][:, 0].contiguous(),
        "U": full["U"],
    }
    for name in REPLICATED:
        if hasattr(shard, name):
            state[name] = getattr(shard, name).detach().cpu().clone()
    return state


def _global_rank(group: Any, group_rank: int) -> int:
    return dist.get_global_rank(group, group_rank) if group is not None else group_rank


# ---- training ----------------------------------------------------------------


class ShardedStep(NamedTuple):
    """What :func:`sharded_train_step` reports."""

    loss: float
    """The step's MSE loss (sum over d_in, mean over rows), identical on every rank."""
    retraction_passes: int
    """CholeskyQR passes the retraction took (1 or 2)."""


def sharded_adam(shard: ShardedPolySAE, lr: float, **adam_kwargs: Any) -> torch.optim.Adam:
    """Adam over the shard's parameters, C1 and U each in a group of its own at
    ``lr`` times its step scale (for Adam the same as PolySAE's scaled steps)."""
    scales = dict(shard.cfg.step_scales)
    rest = [p for name, p in shard.named_parameters() if name not in scales]
    groups: list[dict[str, Any]] = [{"params": rest}]
    groups += [{"params": [getattr(shard, n)], "lr": lr * m} for n, m in scales.items()]
    return torch.optim.Adam(groups, lr=lr, **adam_kwargs)


def sharded_optimizer_step(shard: ShardedPolySAE, optimizer: torch.optim.Optimizer) -> int:
    """``optimizer.step()`` with what the unsharded PolySAE's optimizer hooks
    do around it (:mod:`polysae_lens.stiefel`): the gauge step where the config
    asks for it (orbit gradient before the step, Adam moments of the orbit,
    turn after it) and the sharded retraction. Returns the retraction's
    CholeskyQR passes. Collective over the shard group.

    ``optimizer`` is :func:`sharded_adam`'s: U's parameter group runs at
    ``lr`` times U's step scale, so the gauge step, whose learning rate is
    ``lr * gauge_lr_scale`` as in the unsharded hooks, divides that scale out.
    """
    scale = gauge_step_scale(shard)
    U, C1 = shard.U, shard.C1
    gamma_rR = None
    if scale > 0 and U.grad is not None and C1.grad is not None:
        gamma_rR = gauge_gradient(
            U.detach(),
            U.grad,
            C1.detach(),
            C1.grad,
            interaction_rank(shard),
            sum_over_latents=lambda partial: _summed_over_shards(partial, shard.group),
        )
    optimizer.step()
    if gamma_rR is not None:
        u_scale = dict(shard.cfg.step_scales).get("U", 1.0)
        turn_rR = gauge_adam_step(shard, optimizer, gamma_rR, scale / u_scale)
        turn_along_gauge_(U.data, C1.data, turn_rR)
    passes = sharded_cholesky_qr_(U.data, shard.group)
    apply_subspace_fit_(shard, optimizer)
    return passes


def keep_sharded_fit_rows(
    shard: ShardedPolySAE, forward: ShardedForward, x_BD: Tensor, n: int
) -> None:
    """The subspace fit's rows of a sharded step (``forward`` of ``x_BD``, after
    ``n`` completed steps): ``a`` and the linear residual, the same on every
    shard of the replica."""

    def rows_of_step() -> tuple[Tensor, Tensor]:
        a_BR = forward.a_BR.detach()
        return a_BR, x_BD.detach() - shard.b_dec.detach() - a_BR @ shard.C1.detach()

    keep_fit_rows(shard, rows_of_step, n, x_BD.shape[0], group_size(shard.group))


def sharded_train_step(
    shard: ShardedPolySAE, optimizer: torch.optim.Optimizer, x_BD: Tensor
) -> ShardedStep:
    """One step on the global batch ``x_BD`` (identical on every rank):
    forward, MSE loss, backward, optimizer step with the gauge step and the
    sharded retraction (:func:`sharded_optimizer_step`)."""
    optimizer.zero_grad(set_to_none=True)
    output = shard(x_BD)
    loss = (output.sae_out_BD - x_BD).pow(2).sum(-1).mean()
    loss.backward()
    passes = sharded_optimizer_step(shard, optimizer)
    return ShardedStep(float(loss.detach()), passes)
