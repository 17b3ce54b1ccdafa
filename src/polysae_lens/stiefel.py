"""Keeping the shared projection U on the Stiefel manifold (U^T U = I).

The paper restores orthonormality after every optimizer step with a QR
retraction (arXiv 2602.01322, Sec. 4): U is replaced by the Q factor of its
reduced QR decomposition, with column signs chosen so that diag(R) > 0, which
keeps U continuous from one step to the next.
"""

from __future__ import annotations

import torch
from torch import Tensor


def qr_retract(U_FR: Tensor) -> Tensor:
    """The Q factor of U's reduced QR decomposition with diag(R) > 0.

    Computed in float32 (torch has no half-precision QR) and returned in U's
    dtype. U must have at least as many rows as columns.
    """
    Q_FR, R_RR = torch.linalg.qr(U_FR.float(), mode="reduced")
    signs_R = torch.sign(torch.diagonal(R_RR))
    signs_R = torch.where(signs_R == 0, torch.ones_like(signs_R), signs_R)
    return (Q_FR * signs_R).to(U_FR.dtype).contiguous()


def orthogonality_error(U_FR: Tensor) -> Tensor:
    """max |U^T U - I| in float32, as a 0-dim tensor."""
    U = U_FR.detach().float()
    gram_RR = U.T @ U
    eye = torch.eye(gram_RR.shape[0], device=gram_RR.device)
    return (gram_RR - eye).abs().max()
