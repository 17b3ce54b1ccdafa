"""Input checks shared by the evaluation functions.

Every check raises ``ValueError`` with a message naming the argument and the
problem (never ``assert``): these functions are called on user data.
"""

from __future__ import annotations

import torch
from torch import Tensor


def as_2d_float(latents: object, name: str) -> Tensor:
    """``latents`` as a 2-D floating tensor [n_samples, n_features], detached.

    Integer and boolean inputs are converted to float64 (exact for |x| < 2**53).
    Detached because evaluation never backpropagates, and numpy (used for sorting
    and by sklearn) refuses tensors that require grad, such as a bare
    ``sae.encode(x)``.
    """
    tensor = latents if isinstance(latents, Tensor) else torch.as_tensor(latents)
    tensor = tensor.detach()
    if tensor.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D [n_samples, n_latents]; got shape {tuple(tensor.shape)}."
        )
    if tensor.shape[0] == 0:
        raise ValueError(f"{name} is empty: it has no samples (shape {tuple(tensor.shape)}).")
    if tensor.shape[1] == 0:
        raise ValueError(f"{name} has no latents (shape {tuple(tensor.shape)}).")
    if not tensor.is_floating_point():
        tensor = tensor.to(torch.float64)
    return tensor


def check_all_finite(values: Tensor, name: str) -> None:
    """Raise if ``values`` (any shape) holds NaN or inf, naming the first bad entry."""
    finite = torch.isfinite(values)
    if bool(finite.all()):
        return
    bad = (~finite).nonzero()
    first = tuple(int(i) for i in bad[0])
    kind = "NaN" if bool(torch.isnan(values[first])) else "inf"
    where = f"sample {first[0]}, latent {first[1]}" if len(first) == 2 else f"index {first}"
    raise ValueError(
        f"{name} contains {bad.shape[0]} non-finite value(s) (NaN or inf); the first is "
        f"{kind} at {where}. Check the SAE and its inputs (e.g. a diverged training run)."
    )


def binary_labels(labels: object, n_samples: int, name: str) -> Tensor:
    """``labels`` as a bool tensor [n_samples] (True = class 1), checked to be
    binary and to contain both classes."""
    tensor = labels if isinstance(labels, Tensor) else torch.as_tensor(labels)
    if tensor.ndim != 1:
        raise ValueError(f"{name} must be 1-D [n_samples]; got shape {tuple(tensor.shape)}.")
    if tensor.shape[0] != n_samples:
        raise ValueError(
            f"{name} has {tensor.shape[0]} entries but the latents have {n_samples} samples."
        )
    if tensor.dtype != torch.bool:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{name} contains NaN or inf; labels must be 0 or 1.")
        is_binary = (tensor == 0) | (tensor == 1)
        if not bool(is_binary.all()):
            found = sorted({float(v) for v in tensor[~is_binary].unique()[:5].tolist()})
            raise ValueError(
                f"{name} must be binary (0 or 1, or bool); found other values such as "
                f"{found}. For a multi-class label, build one-vs-rest tasks "
                "(label == class)."
            )
        tensor = tensor == 1
    n_pos = int(tensor.sum())
    if n_pos == 0 or n_pos == n_samples:
        present = 1 if n_pos else 0
        raise ValueError(
            f"{name} contains only class {present} ({n_samples} samples): both classes "
            "(0 and 1) are needed."
        )
    return tensor
