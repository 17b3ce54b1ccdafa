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

from typing import Any, NamedTuple

import torch
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
    counts_B = torch.bincount(rows_N, minlength=n_rows)
    offsets_B = torch.cumsum(counts_B, 0) - counts_B
    return SparseCode(cols_N, vals_N, offsets_B, rows_N, torch.Size([n_rows]), d_sae)


def code_from_dense(z_BF: Tensor) -> SparseCode:
    """The nonzero entries of a dense code (differentiable in ``z``)."""
    batch_shape = z_BF.shape[:-1]
    z_2d = z_BF.reshape(-1, z_BF.shape[-1])
    rows_N, cols_N = torch.nonzero(z_2d, as_tuple=True)
    code = code_from_positions(rows_N, cols_N, z_2d[rows_N, cols_N], z_2d.shape)
    return code._replace(batch_shape=batch_shape)


def project_sparse(code: SparseCode, U_FR: Tensor) -> Tensor:
    """``a = z @ U`` from the active rows of U only: [*batch_shape, R]."""
    a_BR = F.embedding_bag(
        code.cols_N,
        U_FR,
        code.offsets_B,
        mode="sum",
        per_sample_weights=code.vals_N.to(U_FR.dtype),
    )
    return a_BR.reshape(*code.batch_shape, U_FR.shape[1])


def select_topk(hidden_pre_BF: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per-row top-k latents: (rows_N, cols_N), sorted by row then latent, so
    the COO form of the code is coalesced and sums over it need no sort."""
    cols_BK = hidden_pre_BF.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values
    n_rows = hidden_pre_BF.shape[0]
    rows_N = torch.arange(n_rows, device=cols_BK.device).repeat_interleave(k)
    return rows_N, cols_BK.reshape(-1)


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
        rows_N: Tensor,
        cols_N: Tensor,
        offsets_B: Tensor,
    ) -> Tensor:
        ctx.save_for_backward(sae_in_BD, W_enc_DF, cols_N, offsets_B)
        ctx.d_sae = b_enc_F.shape[0]
        ctx.b_dtype = b_enc_F.dtype
        return hidden_pre_BF[rows_N, cols_N]

    @staticmethod
    def backward(ctx: Any, grad_N: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        sae_in_BD, W_enc_DF, cols_N, offsets_B = ctx.saved_tensors
        need_x, need_W, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_W = grad_b = None
        if need_x or need_W:
            # One embedding_bag gives both: its output is the input gradient,
            # and its weight gradient for upstream gradient sae_in is W_enc's.
            # (Under autocast the upstream gradient may be bf16: compute in W's dtype.)
            with torch.enable_grad():
                # embedding_bag gathers rows: a strided view of W_enc is ~50x slower
                W_enc_FD = W_enc_DF.detach().T.contiguous().requires_grad_(need_W)
                grad_x_BD = F.embedding_bag(
                    cols_N,
                    W_enc_FD,
                    offsets_B,
                    mode="sum",
                    per_sample_weights=grad_N.to(W_enc_FD.dtype),
                )
                if need_W:
                    (grad_W_FD,) = torch.autograd.grad(
                        grad_x_BD, W_enc_FD, sae_in_BD.detach().to(grad_x_BD.dtype)
                    )
                    grad_W = grad_W_FD.T
            if need_x:
                grad_x = grad_x_BD.detach().to(sae_in_BD.dtype)
        if need_b:
            grad_b = grad_N.new_zeros(ctx.d_sae, dtype=ctx.b_dtype)
            grad_b.index_add_(0, cols_N, grad_N.to(ctx.b_dtype))
        return grad_x, grad_W, grad_b, None, None, None, None


def gather_preacts(
    sae_in_BD: Tensor,
    W_enc_DF: Tensor,
    b_enc_F: Tensor,
    hidden_pre_BF: Tensor,
    rows_N: Tensor,
    cols_N: Tensor,
    offsets_B: Tensor,
) -> Tensor:
    """The selected pre-activations, differentiable with a sparse backward.

    ``hidden_pre_BF`` must equal ``sae_in_BD @ W_enc_DF + b_enc_F`` (computed
    without autograd); the gradient flows to ``sae_in``, ``W_enc`` and ``b_enc``
    as if the pre-activations had been computed densely.
    """
    return _GatherPreacts.apply(  # type: ignore[no-any-return]
        sae_in_BD, W_enc_DF, b_enc_F, hidden_pre_BF, rows_N, cols_N, offsets_B
    )
