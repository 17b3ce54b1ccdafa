"""The paper's k-sparse probe (SAEBench "sparse probing").

On the train split, pick the k latents with the largest
``|mean over label-1 samples - mean over label-0 samples|``; fit sklearn's
``LogisticRegression`` (L2, C = 1, max_iter = 1000) on those k columns; report the
binary F1 of label 1 (and the accuracy) on the test split.

Public functions:

- :func:`top_k_by_mean_difference` ``(latents_NF, labels_N, k) -> [k]`` indices.
- :func:`probe_f1` ``(train_latents, train_labels, test_latents, test_labels, k)
  -> ProbeResult``.

Shape suffixes: N samples, F latents (or model dimensions), K selected latents.
Deterministic: ties in the mean difference go to the lower latent index, and the
solver (lbfgs) is deterministic; ``seed`` is passed to sklearn as
``random_state``.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from threadpoolctl import threadpool_limits
from torch import Tensor

from polysae_lens.evals._checks import as_2d_float, binary_labels, check_all_finite

__all__ = [
    "PROBE_C",
    "PROBE_MAX_ITER",
    "ProbeResult",
    "fit_probe",
    "mean_difference_ranking",
    "probe_f1",
    "single_threaded_blas",
    "top_k_by_mean_difference",
]

PROBE_C = 1.0
"""Inverse L2 regularisation strength of the probe (the paper's, sklearn's default)."""
PROBE_MAX_ITER = 1000
"""lbfgs iteration limit of the probe (the paper's)."""

_MEAN_BLOCK = 4096
"""Columns per float64 block when computing class means (bounds the temporary copy)."""


class ProbeResult(NamedTuple):
    """Test-split scores of one k-sparse probe."""

    f1: float
    """Binary F1 of label 1 on the test split (0 if the probe predicts no label 1
    and there is none, by sklearn's ``zero_division=0``)."""
    accuracy: float
    """Fraction of test samples classified correctly."""
    latents: tuple[int, ...]
    """The selected latent indices, by decreasing |mean difference| on train."""
    converged: bool
    """Whether lbfgs converged within ``max_iter`` iterations."""


def top_k_by_mean_difference(latents: Tensor, labels: Tensor, k: int) -> Tensor:
    """The ``k`` latents with the largest ``|mean_pos - mean_neg|``.

    Args:
        latents: [N, F] values.
        labels: [N] binary labels (0/1 or bool) with both classes present.
        k: number of latents, ``1 <= k <= F``.

    Returns:
        [k] int64 indices by decreasing |mean difference|; ties go to the lower
        index.
    """
    latents_NF = as_2d_float(latents, "latents")
    pos_N = binary_labels(labels, latents_NF.shape[0], "labels")
    _check_k(k, latents_NF.shape[1])
    check_all_finite(latents_NF, "latents")
    return _top_k(latents_NF, pos_N, k)


def probe_f1(
    train_latents: Tensor,
    train_labels: Tensor,
    test_latents: Tensor,
    test_labels: Tensor,
    k: int | None,
    *,
    seed: int = 0,
    C: float = PROBE_C,
    max_iter: int = PROBE_MAX_ITER,
) -> ProbeResult:
    """Test F1 and accuracy of the paper's k-sparse logistic-regression probe.

    Args:
        train_latents: [N_train, F] values (SAE latents or model activations).
        train_labels: [N_train] binary labels; both classes must be present.
        test_latents: [N_test, F] values.
        test_labels: [N_test] binary labels (one class alone is allowed).
        k: number of latents selected on the train split (``1 <= k <= F``), or
            ``None`` for a probe on all F columns (the dense reference probe).
        seed: ``random_state`` of the sklearn estimator.
        C, max_iter: the paper's L2 strength and iteration limit (defaults).

    Raises:
        ValueError: mismatched shapes, empty splits, non-binary or single-class
            train labels, non-binary test labels, NaN or inf values, bad ``k``.
    """
    train_NF = as_2d_float(train_latents, "train_latents")
    test_NF = as_2d_float(test_latents, "test_latents")
    if test_NF.shape[1] != train_NF.shape[1]:
        raise ValueError(
            f"test_latents has {test_NF.shape[1]} latents but train_latents has "
            f"{train_NF.shape[1]}."
        )
    train_pos_N = binary_labels(train_labels, train_NF.shape[0], "train_labels")
    test_pos_N = _test_labels(test_labels, test_NF.shape[0])
    if k is not None:
        _check_k(k, train_NF.shape[1])
    check_all_finite(train_NF, "train_latents")
    check_all_finite(test_NF, "test_latents")
    with single_threaded_blas():
        return fit_probe(
            train_NF, train_pos_N, test_NF, test_pos_N, k, seed=seed, C=C, max_iter=max_iter
        )


def single_threaded_blas() -> threadpool_limits:
    """Context manager limiting BLAS to one thread.

    The probes are small (k columns, a few thousand rows): multi-threaded BLAS
    only adds synchronisation, and on a busy CPU its spin-waits made lbfgs ~10x
    slower in our measurements. Entering it costs ~2 ms, so callers fitting many
    probes enter it once around all of them.
    """
    return threadpool_limits(limits=1, user_api="blas")


def fit_probe(
    train_NF: Tensor,
    train_pos_N: Tensor,
    test_NF: Tensor,
    test_pos_N: Tensor,
    k: int | None,
    *,
    seed: int = 0,
    C: float = PROBE_C,
    max_iter: int = PROBE_MAX_ITER,
    ranking_F: Tensor | None = None,
) -> ProbeResult:
    """:func:`probe_f1` on already-checked inputs (bool labels, finite values).

    The evaluators check each dataset's pooled latents once, rank a task's latents
    once (``ranking_F``, from :func:`mean_difference_ranking`) and call this for
    every k, inside one :func:`single_threaded_blas` block. Inputs may be views of
    latent-major storage (``x_FN.T``): only the k selected columns are copied.
    """
    if k is None:
        selected_K = torch.arange(train_NF.shape[1])
    else:
        if ranking_F is None:
            ranking_F = mean_difference_ranking(train_NF, train_pos_N)
        selected_K = ranking_F[:k].cpu()
    x_train = _columns(train_NF, selected_K)
    x_test = _columns(test_NF, selected_K)
    y_train = train_pos_N.cpu().numpy().astype(np.int64)
    y_test = test_pos_N.cpu().numpy().astype(np.int64)

    probe = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        # Reported in ProbeResult.converged instead: a warning per probe would
        # flood training logs at every eval.
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe.fit(x_train, y_train)
    predicted = probe.predict(x_test)
    return ProbeResult(
        f1=float(f1_score(y_test, predicted, pos_label=1, zero_division=0)),
        accuracy=float(accuracy_score(y_test, predicted)),
        latents=tuple(int(i) for i in selected_K.tolist()),
        converged=bool(np.all(probe.n_iter_ < max_iter)),
    )


def mean_difference_ranking(latents_NF: Tensor, pos_N: Tensor) -> Tensor:
    """All latent indices by decreasing ``|mean_pos - mean_neg|`` ([F] int64);
    ties go to the lower index. No input checks (see
    :func:`top_k_by_mean_difference`)."""
    pos_N = pos_N.to(latents_NF.device)
    n_pos = int(pos_N.sum())
    n_neg = pos_N.shape[0] - n_pos
    # mean_pos - mean_neg = x @ w, with w = 1/n_pos on label 1 and -1/n_neg on
    # label 0: one float64 pass per column block (the copy stays bounded), so the
    # ranking does not depend on float32 summation order.
    weight_N = torch.where(pos_N, 1.0 / n_pos, -1.0 / n_neg).to(torch.float64)
    diff_F = torch.empty(latents_NF.shape[1], dtype=torch.float64, device=latents_NF.device)
    latent_major = latents_NF.T.is_contiguous()  # a view of [F, N] storage
    for f0 in range(0, latents_NF.shape[1], _MEAN_BLOCK):
        if latent_major:
            block_FN = latents_NF.T[f0 : f0 + _MEAN_BLOCK].to(torch.float64)
            diff_F[f0 : f0 + _MEAN_BLOCK] = (block_FN @ weight_N).abs()
        else:
            block_NF = latents_NF[:, f0 : f0 + _MEAN_BLOCK].to(torch.float64)
            diff_F[f0 : f0 + _MEAN_BLOCK] = (weight_N @ block_NF).abs()
    # A stable descending sort breaks ties by the lower index (topk does not
    # promise an order for ties).
    return torch.sort(diff_F, descending=True, stable=True).indices


def _top_k(latents_NF: Tensor, pos_N: Tensor, k: int) -> Tensor:
    return mean_difference_ranking(latents_NF, pos_N)[:k]


def _columns(latents_NF: Tensor, columns_K: Tensor) -> np.ndarray:
    """The selected columns as a C-ordered float64 array (what sklearn wants)."""
    columns_K = columns_K.to(latents_NF.device)
    if latents_NF.T.is_contiguous():  # latent-major storage: select its rows
        selected = latents_NF.T.index_select(0, columns_K).T
    else:
        selected = latents_NF.index_select(1, columns_K)
    return np.ascontiguousarray(selected.to(torch.float64).cpu().numpy())


def _check_k(k: int, n_latents: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n_latents:
        raise ValueError(
            f"k={k!r} must be an integer with 1 <= k <= {n_latents} (the number of latents)."
        )


def _test_labels(labels: Tensor, n_samples: int) -> Tensor:
    """Binary test labels; unlike train labels, a single class is allowed."""
    tensor = labels if isinstance(labels, Tensor) else torch.as_tensor(labels)
    if tensor.ndim != 1 or tensor.shape[0] != n_samples:
        raise ValueError(
            f"test_labels must have shape [{n_samples}] (one per test sample); got "
            f"{tuple(tensor.shape)}."
        )
    if tensor.dtype == torch.bool:
        return tensor
    is_binary = (tensor == 0) | (tensor == 1)
    if not bool(is_binary.all()):
        found = sorted({float(v) for v in tensor[~is_binary].unique()[:5].tolist()})
        raise ValueError(f"test_labels must be binary (0 or 1, or bool); found {found}.")
    return tensor == 1
