"""Sparse-aware kernels: only the active latents of each row cost anything.

A TopK-style code has k nonzeros per row out of d_sae, so the decoder's
projection ``a = z @ U`` needs only k rows of U per token, and the encoder's
gradient reaches only the k selected pre-activations. These functions hold a
code as a :class:`SparseCode` (the active latents grouped by row, in
``torch.nn.functional.embedding_bag`` layout) and compute projections and
encoder gradients from it without any dense [batch, d_sae] product.

Shape key as in :mod:`polysae_lens.polynomial`, plus ``N``: number of active
(row, latent) entries.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor


class SparseCode(NamedTuple):
    """Active latents of a batch of codes, grouped by row (row-major order)."""

    cols_N: Tensor
    """Latent index of each active entry (int64)."""
    vals_N: Tensor
    """Value of each active entry (differentiable)."""
    offsets_B: Tensor
    """Start of each row's entries in ``cols_N`` / ``vals_N`` (int64, length B)."""
    rows_N: Tensor
    """Row of each active entry (int64), for scatters and COO conversion."""
    batch_shape: torch.Size
    """Leading dimensions of the dense code."""
    d_sae: int
    """Number of latents."""
    by_latent: LatentMajor | None = None
    """The same entries grouped by latent, for the backward passes (built once
    per selection by :meth:`with_latent_major`; computed on demand if absent)."""

    def to_coo(self, detach: bool = True) -> Tensor:
        """The code as a [B, d_sae] sparse COO tensor (SAELens accepts these).

        Marked coalesced: every selection in this module yields entries sorted by
        row and then latent, with no duplicates."""
        n_rows = self.offsets_B.shape[0]
        vals = self.vals_N.detach() if detach else self.vals_N
        indices = torch.stack([self.rows_N, self.cols_N])
        return torch.sparse_coo_tensor(
            indices, vals, (n_rows, self.d_sae), is_coalesced=True, check_invariants=False
        )

    def to_dense(self) -> Tensor:
        """The dense code [*batch_shape, d_sae] (differentiable in ``vals_N``)."""
        n_rows = self.offsets_B.shape[0]
        dense = self.vals_N.new_zeros(n_rows, self.d_sae)
        dense = dense.index_put((self.rows_N, self.cols_N), self.vals_N)
        return dense.reshape(*self.batch_shape, self.d_sae)

    def with_vals(self, vals_N: Tensor) -> SparseCode:
        return self._replace(vals_N=vals_N)

    def with_latent_major(self) -> SparseCode:
        """This code with its latent-major layout built (shared by every gradient
        that sums over the entries of each latent)."""
        if self.by_latent is not None:
            return self
        return self._replace(by_latent=latent_major(self.rows_N, self.cols_N, self.d_sae))


class LatentMajor(NamedTuple):
    """A code's entries grouped by latent (the layout of the transposed code
    [d_sae, B]), so sums over each latent's entries are one ``embedding_bag``."""

    perm_N: Tensor
    """Entry order grouped by latent (stable: rows ascending within a latent)."""
    crow_F1: Tensor
    """Start of each latent's entries in that order [d_sae + 1] (int64)."""
    rows_N: Tensor
    """Row of each entry, in that order (int64)."""


def latent_major(rows_N: Tensor, cols_N: Tensor, d_sae: int) -> LatentMajor:
    """The latent-major layout of the entries at (rows_N, cols_N)."""
    cols_sorted_N, perm_N = torch.sort(cols_N, stable=True)
    crow_F1 = torch.zeros(d_sae + 1, dtype=torch.long, device=cols_N.device)
    torch.cumsum(counts(cols_sorted_N, d_sae), 0, out=crow_F1[1:])
    return LatentMajor(perm_N, crow_F1, rows_N.index_select(0, perm_N))


def counts(index_N: Tensor, n: int) -> Tensor:
    """How often each of ``0 .. n-1`` occurs in ``index_N`` (all below n) [n]
    (int64). On the CPU ``torch.bincount``; elsewhere :func:`counts_without_sync`,
    since bincount finds its output's size on the host, a device-to-host sync
    (and ``index_add_`` is many times slower than bincount on the CPU)."""
    if index_N.device.type == "cpu":
        return torch.bincount(index_N, minlength=n)
    return counts_without_sync(index_N, n)


def counts_without_sync(index_N: Tensor, n: int) -> Tensor:
    """:func:`counts` as an ``index_add_`` into a zero [n] tensor (no host sync)."""
    out = torch.zeros(n, dtype=torch.long, device=index_N.device)
    return out.index_add_(0, index_N, torch.ones_like(index_N, dtype=torch.long))


def transposed_product(by_latent: LatentMajor, vals_N: Tensor, X_BD: Tensor) -> Tensor:
    """``Z^T @ X`` [d_sae, D] for the code Z [B, d_sae] with these entries and
    values: per latent, the value-weighted sum of the rows of X where it is active.

    An ``embedding_bag`` forward with one bag per latent, X as the table and the
    entries' rows as indices: at the GPT-2 shape about 1.8x faster than the
    same sums as a CSR matmul on CPU, and 2x faster than embedding_bag's own
    weight gradient (which sorts the indices each time; the latent-major layout
    is built once per selection and shared by every gradient that needs it).
    """
    with _summing_dtype(X_BD) as dtype:
        # all entries: bounds known on the host (the layout holds every entry)
        sums_FD = _latent_sums(
            by_latent,
            _values_by_latent(by_latent, vals_N, dtype),
            X_BD.to(dtype),
            _Bounds(0, by_latent.crow_F1.shape[0] - 1, 0, by_latent.rows_N.shape[0]),
        )
    return sums_FD.to(X_BD.dtype)


LATENT_CHUNK = 1024
"""Latents per ``embedding_bag`` call in :func:`transposed_product_DF`."""


def transposed_product_DF(by_latent: LatentMajor, vals_N: Tensor, X_BD: Tensor) -> Tensor:
    """:func:`transposed_product` transposed: ``X^T @ Z`` as a contiguous
    [D, d_sae] tensor, the layout of ``W_enc`` [d_in, d_sae].

    Returning ``transposed_product(...).T`` as W_enc's gradient would make
    autograd copy the [d_sae, D] sums into W_enc's layout: a transposing copy
    into fresh pages, plus the fresh [d_sae, D] result itself (about 100 ms at
    the GPT-2 shape on 2 cores). Here the sums are computed for
    :data:`LATENT_CHUNK` latents at a time into a small temporary that stays in
    cache and is transposed into the result.
    """
    n_latents = by_latent.crow_F1.shape[0] - 1
    with _summing_dtype(X_BD) as dtype:
        X = X_BD.to(dtype)
        vals_by_latent_N = _values_by_latent(by_latent, vals_N, dtype)
        out_DF = X.new_empty(X.shape[1], n_latents)
        starts = [*range(0, n_latents, LATENT_CHUNK), n_latents]
        # every chunk's entry range in one transfer (one sync on a GPU, not two per chunk)
        firsts = by_latent.crow_F1[starts].tolist()
        for i in range(len(starts) - 1):
            bounds = _Bounds(starts[i], starts[i + 1], firsts[i], firsts[i + 1])
            sums = _latent_sums(by_latent, vals_by_latent_N, X, bounds)
            out_DF[:, bounds.start : bounds.stop].copy_(sums.T)
    return out_DF.to(X_BD.dtype)


@contextlib.contextmanager
def _summing_dtype(X_BD: Tensor) -> Iterator[torch.dtype]:
    """The dtype the latent sums are computed in: X's, or float32 for
    half-precision inputs (bf16 models, autocast), with autocast off."""
    with torch.autocast(X_BD.device.type, enabled=False):
        yield torch.promote_types(X_BD.dtype, torch.float32)


def _values_by_latent(by_latent: LatentMajor, vals_N: Tensor, dtype: torch.dtype) -> Tensor:
    return vals_N.to(dtype).index_select(0, by_latent.perm_N)


class _Bounds(NamedTuple):
    """Latents ``[start, stop)`` and their entries ``[first, last)`` in the
    latent-major order (``first = crow[start]``, ``last = crow[stop]``)."""

    start: int
    stop: int
    first: int
    last: int


def _latent_sums(
    by_latent: LatentMajor, vals_by_latent_N: Tensor, X_BD: Tensor, bounds: _Bounds
) -> Tensor:
    """The sums of latents ``[start, stop)`` [stop - start, D]: one bag per latent."""
    entries = slice(bounds.first, bounds.last)
    offsets = by_latent.crow_F1[bounds.start : bounds.stop] - bounds.first
    return F.embedding_bag(
        by_latent.rows_N[entries],
        X_BD,
        offsets,
        mode="sum",
        per_sample_weights=vals_by_latent_N[entries],
    )


def entry_dots(code: SparseCode, A_BR: Tensor, U_FR: Tensor) -> Tensor:
    """``<A[row n], U[col n]>`` for every entry n of the code: the entries of
    ``A @ U^T`` [B, d_sae] at the code's positions, without the dense product.

    A sampled matmul (``torch.sparse.sampled_addmm``) over the code's CSR layout
    in float32 / float64, about 1.7x faster than the kernel behind
    ``embedding_bag``'s ``per_sample_weights`` gradient, which serves other dtypes.
    """
    if A_BR.dtype in (torch.float32, torch.float64) and A_BR.dtype == U_FR.dtype:
        n_entries = code.cols_N.shape[0]
        crow_B1 = torch.cat([code.offsets_B, code.offsets_B.new_tensor([n_entries])])
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            pattern = torch.sparse_csr_tensor(
                crow_B1,
                code.cols_N,
                A_BR.new_zeros(n_entries),
                (A_BR.shape[0], code.d_sae),
                check_invariants=False,
            )
            return torch.sparse.sampled_addmm(pattern, A_BR, U_FR.T, beta=0.0).values()
    # (0: the sum mode of embedding_bag)
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(
        A_BR, U_FR, code.cols_N, code.offsets_B, code.rows_N, 0
    )


def code_from_rows(cols_BK: Tensor, vals_BK: Tensor, d_sae: int) -> SparseCode:
    """A code with exactly K active latents per row (TopK layout)."""
    n_rows, k = cols_BK.shape
    device = cols_BK.device
    return SparseCode(
        cols_N=cols_BK.reshape(-1),
        vals_N=vals_BK.reshape(-1),
        offsets_B=torch.arange(n_rows, device=device) * k,
        rows_N=torch.arange(n_rows, device=device).repeat_interleave(k),
        batch_shape=torch.Size([n_rows]),
        d_sae=d_sae,
    )


def code_from_positions(
    rows_N: Tensor, cols_N: Tensor, vals_N: Tensor, shape: torch.Size
) -> SparseCode:
    """A code from (row, col) positions that are already sorted by row."""
    n_rows, d_sae = shape[0], shape[1]
    counts_B = counts(rows_N, n_rows)
    offsets_B = torch.cumsum(counts_B, 0) - counts_B
    return SparseCode(cols_N, vals_N, offsets_B, rows_N, torch.Size([n_rows]), d_sae)


def code_from_dense(z_BF: Tensor) -> SparseCode:
    """The nonzero entries of a dense code (differentiable in ``z``)."""
    code = code_if_sparse(z_BF, max_density=1.0)
    assert code is not None
    return code


def code_if_sparse(z_BF: Tensor, max_density: float) -> SparseCode | None:
    """:func:`code_from_dense`, or None if more than ``max_density`` of the
    code's entries are nonzero."""
    batch_shape = z_BF.shape[:-1]
    d_sae = z_BF.shape[-1]
    flat_z = z_BF.reshape(-1)
    # nonzero over the flat view and one index_select: about half the cost of
    # the 2-D nonzero and advanced indexing
    flat_N = flat_z.nonzero().squeeze(1)
    if flat_N.numel() > max_density * flat_z.numel():
        return None
    rows_N, cols_N = flat_N // d_sae, flat_N % d_sae
    code = code_from_positions(
        rows_N, cols_N, flat_z.index_select(0, flat_N), torch.Size([flat_z.numel() // d_sae, d_sae])
    )
    return code._replace(batch_shape=batch_shape)


def needs_exact_autograd(z_BF: Tensor) -> bool:
    """Whether a dense code must be projected densely to keep the formula's
    derivatives: the sparse kernels differentiate only through its nonzeros
    (zero gradient at every inactive latent), and they do not support
    ``torch.func`` transforms or forward-mode AD.

    True when ``z`` needs a gradient (grad mode on and ``z.requires_grad``),
    under any ``torch.func`` transform (jacrev, jvp, vmap, hessian, ...), and
    when ``z`` carries a forward-mode tangent.
    """
    if torch.is_grad_enabled() and z_BF.requires_grad:
        return True
    if torch._C._are_functorch_transforms_active():
        return True
    return fwAD._current_level >= 0 and fwAD.unpack_dual(z_BF).tangent is not None


def project_sparse(code: SparseCode, U_FR: Tensor) -> Tensor:
    """``a = z @ U`` from the active rows of U only: [*batch_shape, R]."""
    vals_N = code.vals_N.to(U_FR.dtype)
    if torch.is_grad_enabled() and U_FR.requires_grad:
        a_BR = _ProjectSparse.apply(U_FR, vals_N, code)
    else:
        a_BR = F.embedding_bag(
            code.cols_N, U_FR, code.offsets_B, mode="sum", per_sample_weights=vals_N
        )
    return a_BR.reshape(*code.batch_shape, U_FR.shape[1])


class _ProjectSparse(torch.autograd.Function):
    """embedding_bag's sum with faster gradients: U's from the shared
    latent-major layout (:func:`transposed_product`), the values' from
    :func:`entry_dots`."""

    @staticmethod
    def forward(ctx: Any, U_FR: Tensor, vals_N: Tensor, code: SparseCode) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(U_FR, vals_N)
        ctx.code = _indices_only(code)
        return F.embedding_bag(
            code.cols_N, U_FR, code.offsets_B, mode="sum", per_sample_weights=vals_N
        )

    @staticmethod
    def backward(ctx: Any, grad_BR: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        U_FR, vals_N = ctx.saved_tensors
        code: SparseCode = ctx.code
        grad_U = grad_vals = None
        if ctx.needs_input_grad[0]:
            by_latent = code.by_latent or latent_major(code.rows_N, code.cols_N, code.d_sae)
            grad_U = transposed_product(by_latent, vals_N, grad_BR.to(U_FR.dtype))
        if ctx.needs_input_grad[1]:
            grad_vals = entry_dots(code, grad_BR.to(U_FR.dtype), U_FR)
        return grad_U, grad_vals, None


def select_topk(hidden_pre_BF: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per-row top-k latents: (rows_N, cols_N), sorted by row then latent, so
    the COO form of the code is coalesced and sums over it need no sort."""
    cols_BK = topk_indices(hidden_pre_BF, k).sort(dim=-1).values
    n_rows = hidden_pre_BF.shape[0]
    rows_N = torch.arange(n_rows, device=cols_BK.device).repeat_interleave(k)
    return rows_N, cols_BK.reshape(-1)


class TopKActivation(NamedTuple):
    """The output of :func:`topk_activation` and where its nonzeros may be."""

    acts_BF: Tensor
    """The dense activations, shaped like the input."""
    cols_BK: Tensor
    """Each row's k selected latents [rows, k] over the input's 2-D view (ReLU may
    have zeroed some of them)."""


def topk_activation(x_BF: Tensor, k: int) -> TopKActivation:
    """SAELens's TopK activation (each row's k largest entries, ReLU'd, in a
    dense zero tensor) with :func:`topk_indices` selecting: the same output, ties
    aside, differentiable in ``x``."""
    x_2d = x_BF.reshape(-1, x_BF.shape[-1])
    cols_BK = topk_indices(x_2d, k)
    # in place into fresh zeros: the out-of-place scatter would copy them first
    acts_BF = torch.zeros_like(x_2d).scatter_(1, cols_BK, x_2d.gather(1, cols_BK).relu())
    return TopKActivation(acts_BF.reshape(x_BF.shape), cols_BK)


TOPK_GROUP = 8
"""Entries per group in :func:`topk_indices`' first stage."""


def topk_indices(x_BF: Tensor, k: int, group: int = TOPK_GROUP) -> Tensor:
    """Column indices [B, k] of each row's k largest entries, in no particular
    order: the set ``torch.topk`` selects (the same values even with ties).

    Two smaller top-k's instead of one over the whole row (CPU top-k costs about
    the same per entry whatever k is). Split each row into groups of ``group``
    entries and take the k groups with the largest maxima: every top-k entry
    lies in one of them (an entry outside them has k larger group maxima above
    it, so k larger entries), so the top k of their k * group entries are the
    row's top k. Rows too short for this use ``torch.topk`` directly, and so do
    half-precision inputs: ties are common there, and among tied entries the
    two may pick different ones.
    """
    n_rows, n_cols = x_BF.shape
    n_groups = n_cols // group
    full_precision = x_BF.dtype in (torch.float32, torch.float64)
    if not full_precision or n_cols % group != 0 or n_groups < 2 * k:
        return x_BF.topk(k, dim=-1, sorted=False).indices
    # group g holds entries g, g + G, g + 2G, ...: the max over a [B, group, G]
    # view runs along contiguous memory
    max_BG = x_BF.reshape(n_rows, group, n_groups).amax(1)
    groups_BK = max_BG.topk(k, dim=-1, sorted=False).indices
    steps_S = torch.arange(group, device=x_BF.device) * n_groups
    candidates_BC = (groups_BK[:, :, None] + steps_S).reshape(n_rows, k * group)
    picks_BK = x_BF.gather(1, candidates_BC).topk(k, dim=-1, sorted=False).indices
    return candidates_BC.gather(1, picks_BK)


def select_batch_topk(hidden_pre_BF: Tensor, k: float) -> tuple[Tensor, Tensor]:
    """The ``int(k * B)`` largest positive pre-activations of the whole batch,
    as SAELens's BatchTopK selects them: (rows_N, cols_N), grouped by row."""
    n_rows, d_sae = hidden_pre_BF.shape
    flat = hidden_pre_BF.relu().flatten()
    positions = flat.topk(int(k * n_rows), sorted=False).indices
    positions = positions[flat[positions] > 0].sort().values
    return positions // d_sae, positions % d_sae


class _GatherPreacts(torch.autograd.Function):
    """``pre[n] = sae_in[row n] @ W_enc[:, col n] + b_enc[col n]`` with a sparse backward.

    The forward reads the values from a dense pre-activation matrix computed
    without autograd (the encoder matmul every SAE pays); the backward touches
    only the N selected (row, latent) pairs instead of a dense [B, d_sae] gradient.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        sae_in_BD: Tensor,
        W_enc_DF: Tensor,
        b_enc_F: Tensor,
        hidden_pre_BF: Tensor,
        code: SparseCode,
        input_shift_D: Tensor | None,
    ) -> Tensor:
        ctx.save_for_backward(sae_in_BD, W_enc_DF)
        ctx.code = _indices_only(code)
        ctx.b_dtype = b_enc_F.dtype
        ctx.shift_dtype = None if input_shift_D is None else input_shift_D.dtype
        # flat positions: one contiguous gather instead of 2-D advanced indexing
        flat_N = code.rows_N * hidden_pre_BF.shape[1] + code.cols_N
        return hidden_pre_BF.reshape(-1).index_select(0, flat_N)

    @staticmethod
    def backward(ctx: Any, grad_N: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        sae_in_BD, W_enc_DF = ctx.saved_tensors
        code: SparseCode = ctx.code
        need_x, need_W, need_b = ctx.needs_input_grad[:3]
        need_shift = ctx.needs_input_grad[5]
        grad_x = grad_W = grad_b = grad_shift = None
        # (Under autocast the upstream gradient may be bf16: compute in W's dtype.)
        grad_N = grad_N.to(W_enc_DF.dtype)
        if need_x:
            # embedding_bag gathers rows: a strided view of W_enc is ~50x slower
            grad_x_BD = F.embedding_bag(
                code.cols_N,
                W_enc_DF.detach().T.contiguous(),
                code.offsets_B,
                mode="sum",
                per_sample_weights=grad_N,
            )
            grad_x = grad_x_BD.to(sae_in_BD.dtype)
        if need_W:
            by_latent = code.by_latent or latent_major(code.rows_N, code.cols_N, code.d_sae)
            grad_W = transposed_product_DF(by_latent, grad_N, sae_in_BD.to(grad_N.dtype))
        if need_b or need_shift:
            grad_F = grad_N.new_zeros(code.d_sae)
            grad_F.index_add_(0, code.cols_N, grad_N)
            if need_b:
                grad_b = grad_F.to(ctx.b_dtype)
            if need_shift:
                # sum over rows of -(input gradient) = -W_enc @ (bias gradient)
                grad_shift = -(W_enc_DF.detach() @ grad_F).to(ctx.shift_dtype)
        return grad_x, grad_W, grad_b, None, None, grad_shift


def gather_preacts(
    sae_in_BD: Tensor,
    W_enc_DF: Tensor,
    b_enc_F: Tensor,
    hidden_pre_BF: Tensor,
    code: SparseCode,
    input_shift_D: Tensor | None = None,
) -> Tensor:
    """The pre-activations at the code's entries, differentiable with a sparse backward.

    ``hidden_pre_BF`` must equal ``sae_in_BD @ W_enc_DF + b_enc_F`` (computed
    without autograd); the gradient flows to ``sae_in``, ``W_enc`` and ``b_enc``
    as if the pre-activations had been computed densely. Only the code's indices
    (and its latent-major layout, if built) are used.

    ``input_shift_D``: for an input ``sae_in = x - shift`` with a constant x
    (SAELens's ``x - b_dec``), pass ``sae_in`` detached and the shift here: the
    shift then gets the gradient it would get through the subtraction, from
    [D, d_sae] work instead of a [B, D] input gradient.
    """
    return _GatherPreacts.apply(  # type: ignore[no-any-return]
        sae_in_BD, W_enc_DF, b_enc_F, hidden_pre_BF, code, input_shift_D
    )


def _indices_only(code: SparseCode) -> SparseCode:
    """The code without its values, for saving on an autograd context (its
    values may be part of the graph, which the context must not hold)."""
    return code._replace(vals_N=code.vals_N.new_empty(0))
