"""The paired bootstrap behind the demo report's verdicts, and the report's wording."""

from __future__ import annotations

import numpy as np
import pytest

from polysae_lens.noise import Interval, paired_bootstrap


def test_paired_bootstrap_matches_a_hand_computation() -> None:
    a = np.array([1.0, 2.0, 4.0, 7.0, 3.0])
    b = np.array([0.5, 2.5, 3.0, 6.0, 1.0])
    got = paired_bootstrap(a, b, n_boot=200, seed=3, level=0.9)
    # Reference: one index draw per resample from one generator, difference of means
    # on the same indices, numpy's linear percentile at 5% and 95%.
    rng = np.random.default_rng(3)
    diffs = []
    for _ in range(200):
        idx = rng.integers(0, 5, size=5)
        diffs.append(sum(a[i] for i in idx) / 5 - sum(b[i] for i in idx) / 5)
    diffs.sort()
    # 5% and 95% of 200 sorted values, linearly interpolated: positions 9.95 and 189.05.
    low = diffs[9] + 0.95 * (diffs[10] - diffs[9])
    high = diffs[189] + 0.05 * (diffs[190] - diffs[189])
    assert got.difference == pytest.approx((17 - 13) / 5)
    assert got.low == pytest.approx(low)
    assert got.high == pytest.approx(high)
    assert (got.level, got.n_boot, got.n_units) == (0.9, 200, 5)


def test_identical_inputs_are_a_tie() -> None:
    x = np.random.default_rng(0).normal(size=300)
    got = paired_bootstrap(x, x.copy(), n_boot=100, seed=0)
    assert got == Interval(0.0, 0.0, 0.0, 0.95, 100, 300)
    assert not got.excludes_zero()


def test_noisy_small_difference_is_a_tie_and_separated_inputs_a_win() -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(size=500)
    tiny = paired_bootstrap(base + rng.normal(scale=1.0, size=500), base, n_boot=500, seed=0)
    assert tiny.low < 0 < tiny.high and not tiny.excludes_zero()
    clear = paired_bootstrap(base + 5.0 + rng.normal(scale=0.1, size=500), base, 500, 0)
    assert clear.low > 4.9 and clear.high < 5.1 and clear.excludes_zero()
    worse = paired_bootstrap(base - 5.0, base, 500, 0)
    assert worse.high < 0 and worse.excludes_zero()


def test_bad_inputs_name_the_value_and_the_fix() -> None:
    with pytest.raises(ValueError, match=r"\(3,\) and values_B_N \(4,\).*same order"):
        paired_bootstrap([1, 2, 3], [1, 2, 3, 4])
    with pytest.raises(ValueError, match=r"n_boot=0.*positive"):
        paired_bootstrap([1.0], [2.0], n_boot=0)
    with pytest.raises(ValueError, match=r"level=1\.5.*0\.95"):
        paired_bootstrap([1.0], [2.0], level=1.5)
    with pytest.raises(ValueError, match="NaN"):
        paired_bootstrap([1.0, float("nan")], [2.0, 1.0])
