"""Noise estimates for the demo report's comparisons: a paired bootstrap over
evaluation units and a paired t interval over seeds.

A comparison of two SAEs is a *paired* one: both are scored on the same units
(held-out samples, atoms, planted pairs, composition tasks). The bootstrap
resamples those units with replacement, recomputes each SAE's metric on the
same resample, and takes a percentile interval of the difference. A difference
whose interval contains 0 is a tie within noise.

The bootstrap estimates evaluation noise only (which units happened to be
drawn), not seed-to-seed training variance; a report built on it says so.
:func:`paired_t_interval` estimates seed-to-seed noise from a few training
seeds (the in-class study's verdicts).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

Statistic = Callable[[NDArray[np.float64], NDArray[np.float64]], float]
"""``statistic(values, counts_N)``: a metric of ``values`` (units along axis 0)
where unit ``n`` is drawn ``counts_N[n]`` times; the full sample is
``counts_N = 1`` everywhere."""


class Interval(NamedTuple):
    """A paired bootstrap estimate of ``metric(A) - metric(B)``."""

    difference: float
    """The observed difference ``metric(A) - metric(B)`` on all units."""
    low: float
    """Lower end of the percentile interval of the resampled differences."""
    high: float
    """Upper end of the percentile interval of the resampled differences."""
    level: float
    """Coverage of ``[low, high]`` (e.g. 0.95)."""
    n_boot: int
    """Number of resamples."""
    n_units: int
    """Number of units resampled (samples, atoms, pairs or tasks)."""

    def excludes_zero(self) -> bool:
        """Whether the difference is outside noise (the interval does not contain 0)."""
        return self.low > 0 or self.high < 0


def weighted_mean(values: NDArray[np.float64], counts_N: NDArray[np.float64]) -> float:
    """The default statistic: the mean of ``values`` over the resampled units."""
    return float(counts_N @ values / counts_N.sum())


def paired_bootstrap(
    values_A_N: ArrayLike,
    values_B_N: ArrayLike,
    n_boot: int = 1000,
    seed: int = 0,
    *,
    level: float = 0.95,
    statistic: Statistic = weighted_mean,
) -> Interval:
    """Percentile bootstrap interval of ``statistic(A) - statistic(B)``.

    Resample ``i`` draws unit indices ``numpy.random.default_rng(seed).integers(0,
    N, size=N)`` (one such draw per resample, in order, from one generator), and
    both A and B are scored on those same units. The interval is
    ``numpy.percentile`` (linear interpolation) of the ``n_boot`` differences at
    ``(1 - level) / 2`` and ``(1 + level) / 2``.

    Args:
        values_A_N, values_B_N: per-unit values of the two contenders, units along
            axis 0 in the same order for both (extra axes are passed to
            ``statistic`` unchanged).
        n_boot: number of resamples (at least 1).
        seed: seed of the resampling.
        level: coverage of the interval, in (0, 1).
        statistic: the metric, see :data:`Statistic`; default the mean.

    Raises:
        ValueError: mismatched or empty inputs, NaN values, bad ``n_boot`` or ``level``.
    """
    a = np.asarray(values_A_N, dtype=np.float64)
    b = np.asarray(values_B_N, dtype=np.float64)
    if a.ndim == 0 or b.ndim == 0 or a.shape[0] != b.shape[0]:
        raise ValueError(
            f"values_A_N {a.shape} and values_B_N {b.shape} must hold the same units "
            "along axis 0: pass both contenders' per-unit values in the same order"
        )
    n = a.shape[0]
    if n == 0:
        raise ValueError("no units to resample: pass at least one value per contender")
    if np.isnan(a).any() or np.isnan(b).any():
        raise ValueError("NaN in the per-unit values: drop or fix those units before comparing")
    if n_boot < 1:
        raise ValueError(f"n_boot={n_boot} is not allowed: pass a positive number of resamples")
    if not 0 < level < 1:
        raise ValueError(f"level={level} is not allowed: pass a coverage in (0, 1), e.g. 0.95")
    ones = np.ones(n)
    observed = statistic(a, ones) - statistic(b, ones)
    rng = np.random.default_rng(seed)
    diffs = np.empty(n_boot)
    for i in range(n_boot):
        counts = np.bincount(rng.integers(0, n, size=n), minlength=n).astype(np.float64)
        diffs[i] = statistic(a, counts) - statistic(b, counts)
    low, high = np.percentile(diffs, [50 * (1 - level), 50 * (1 + level)])
    return Interval(float(observed), float(low), float(high), level, n_boot, n)


def explained_variance_statistic(
    values: NDArray[np.float64], counts_N: NDArray[np.float64]
) -> float:
    """``1 - sum(err) / sum(total)`` over the resampled units; ``values`` is
    ``[N, 2]``: each sample's squared error and squared deviation from the mean."""
    err, total = counts_N @ values
    return float(1 - err / total)


def paired_t_interval(
    values_A_S: ArrayLike, values_B_S: ArrayLike, *, level: float = 0.95
) -> Interval:
    """Paired t interval of ``mean(A - B)`` over seeds: seed-to-seed noise.

    With ``d_s = A_s - B_s`` over ``S`` seeds (each seed shared by both
    contenders: the same data and initialisation seed), the interval is
    ``mean(d) -/+ t_{S-1, (1 + level) / 2} * sd(d) / sqrt(S)`` (``sd`` with
    ``S - 1`` in the denominator). ``n_boot`` is 0 (no resampling) and
    ``n_units`` is ``S``; with one seed the interval is ``(nan, nan)``.

    Raises:
        ValueError: mismatched or empty inputs, NaN values, bad ``level``.
    """
    from scipy.stats import t as student_t

    a = np.asarray(values_A_S, dtype=np.float64)
    b = np.asarray(values_B_S, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or a.size == 0:
        raise ValueError(
            f"values_A_S {a.shape} and values_B_S {b.shape} must be 1-D with one value "
            "per seed, in the same seed order"
        )
    if np.isnan(a).any() or np.isnan(b).any():
        raise ValueError("NaN in the per-seed values: drop or fix those seeds before comparing")
    if not 0 < level < 1:
        raise ValueError(f"level={level} is not allowed: pass a coverage in (0, 1), e.g. 0.95")
    d = a - b
    n = d.size
    mean = float(d.mean())
    if n < 2:
        return Interval(mean, float("nan"), float("nan"), level, 0, n)
    half = float(student_t.ppf((1 + level) / 2, n - 1) * d.std(ddof=1) / np.sqrt(n))
    return Interval(mean, mean - half, mean + half, level, 0, n)
