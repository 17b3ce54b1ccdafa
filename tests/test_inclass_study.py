"""The demo's in-class study (polysae_lens.inclass_study): structure of its
results on tiny sizes, the oracle beating TopK beyond seed noise, and the
seed-noise verdict rule against hand-made per-seed values."""

from __future__ import annotations

import math
import statistics
from typing import Any

import pytest
import torch

from polysae_lens.inclass import InClassConfig, build_in_class
from polysae_lens.inclass_report import format_inclass_table, pair_verdict
from polysae_lens.inclass_study import (
    CONTENDERS,
    InClassStudyConfig,
    ReplayStream,
    run_inclass_study,
    seed_verdict,
)
from polysae_lens.noise import paired_t_interval

T_975_DF2 = 4.302652729911275
"""Student's t quantile at 0.975 with 2 degrees of freedom (tables)."""


@pytest.fixture(scope="module")
def quick() -> dict[str, Any]:
    return run_inclass_study(InClassStudyConfig.quick(seed=0))


def test_quick_study_has_every_contender_seed_and_curve(quick: dict[str, Any]) -> None:
    cfg = quick["config"]
    assert set(quick["runs"]) == set(CONTENDERS)
    for name in CONTENDERS:
        runs = quick["runs"][name]
        assert [r["seed"] for r in runs] == [0, 1, 2]
        for r in runs:
            assert math.isfinite(r["mse"]) and r["mse"] > 0
            assert sum(r["term_shares"].values()) == pytest.approx(1.0)
        curves = quick["curves"][name]
        assert len(curves) == 3
        for curve in curves:
            # The initialisation, n_snapshots during training, and the end.
            assert len(curve) == cfg["n_snapshots"] + 2
            assert curve[0]["samples"] == 0
            assert curve[-1]["samples"] == cfg["steps"] * cfg["batch_size"]
            # The last point is the final model, scored on a prefix of the same rows.
            assert curve[-1]["term_shares"].keys() == runs[0]["term_shares"].keys()
    # Interaction recovery (a signed cosine) exists for the order-2 models only.
    for name in ("poly", "poly_previous", "oracle"):
        assert all(-1 <= r["pair_cos"] <= 1 for r in quick["runs"][name])
    for name in ("linear", "poly_order1"):
        assert all(r["pair_cos"] is None for r in quick["runs"][name])
    assert all(r["term_shares"] == {"linear": 1.0} for r in quick["runs"]["poly_order1"])


def test_gap_closed_and_summary_follow_the_plain_formulas(quick: dict[str, Any]) -> None:
    runs = quick["runs"]
    for s in range(3):
        lin, orc, poly = runs["linear"][s]["mse"], runs["oracle"][s]["mse"], runs["poly"][s]["mse"]
        assert runs["poly"][s]["gap_closed"] == pytest.approx((lin - poly) / (lin - orc))
        assert runs["linear"][s]["gap_closed"] == pytest.approx(0.0)
        assert runs["oracle"][s]["gap_closed"] == pytest.approx(1.0)
    # Against TopK or the oracle the gap only restates the MSE: not compared there.
    assert "gap_closed" not in quick["comparisons"]["poly - linear"]
    assert "gap_closed" in quick["comparisons"]["poly - poly_order1"]
    mses = [r["mse"] for r in runs["poly"]]
    stat = quick["summary"]["poly"]["mse"]
    assert stat["mean"] == pytest.approx(sum(mses) / 3)
    mean = sum(mses) / 3
    assert stat["sd"] == pytest.approx(math.sqrt(sum((m - mean) ** 2 for m in mses) / 2))
    iv = quick["comparisons"]["poly - linear"]["mse"]
    diffs = [p - q for p, q in zip(mses, [r["mse"] for r in runs["linear"]], strict=True)]
    assert iv["per_seed"] == pytest.approx(diffs)
    half = T_975_DF2 * statistics.stdev(diffs) / math.sqrt(3)
    assert iv["low"] == pytest.approx(sum(diffs) / 3 - half)
    assert iv["high"] == pytest.approx(sum(diffs) / 3 + half)


def test_oracle_beats_topk_beyond_seed_noise_in_the_quick_config(quick: dict[str, Any]) -> None:
    # The oracle starts at the true decoder; at 300 steps TopK is far from it.
    for orc, lin in zip(quick["runs"]["oracle"], quick["runs"]["linear"], strict=True):
        assert orc["mse"] < lin["mse"]
    iv = quick["comparisons"]["oracle - linear"]["mse"]
    assert seed_verdict(iv, "lower") == "A"
    assert pair_verdict(quick, "oracle", "linear", "mse", "lower") == "oracle PolySAE"
    # Started at the planted interactions, it keeps them better than PolySAE finds them.
    oracle_cos = [r["pair_cos"] for r in quick["runs"]["oracle"]]
    assert min(oracle_cos) > 0.7
    assert min(oracle_cos) > max(r["pair_cos"] for r in quick["runs"]["poly"])


def test_table_lists_contenders_and_verdict_column(quick: dict[str, Any]) -> None:
    table = format_inclass_table(quick)
    header = table.splitlines()[0]
    for label in (
        "linear TopK",
        "PolySAE",
        "order 1",
        "previous defaults",
        "oracle PolySAE",
        "better",
    ):
        assert label in header
    mse_line = next(line for line in table.splitlines() if line.startswith("| MSE"))
    assert " ± " in mse_line


def test_seed_verdict_rule_on_hand_made_values() -> None:
    # d = (0.05, 0.06, 0.04): mean 0.05, sd 0.01, half width 4.3027 * 0.01 / sqrt(3).
    iv = paired_t_interval([1.05, 2.06, 3.04], [1.0, 2.0, 3.0])
    half = T_975_DF2 * 0.01 / math.sqrt(3)
    assert iv.difference == pytest.approx(0.05)
    assert (iv.low, iv.high) == pytest.approx((0.05 - half, 0.05 + half))
    assert iv.n_units == 3
    assert seed_verdict(iv, "higher") == "A"
    assert seed_verdict(iv, "lower") == "B"
    # Same mean, but the seeds disagree: within seed noise.
    tie = paired_t_interval([0.05, -0.03, 0.13], [0.0, 0.0, 0.0])
    assert tie.low < 0 < tie.high
    assert seed_verdict(tie, "lower") == "tie"
    # Large per-contender spread (different data per seed) does not hide a
    # consistent paired difference.
    a, b = [0.30, 0.10, 0.20], [0.31, 0.11, 0.21]
    assert statistics.stdev(a) > 0.05
    assert seed_verdict(paired_t_interval(a, b), "lower") == "A"
    # One seed: no verdict.
    one = paired_t_interval([0.3], [0.1])
    assert math.isnan(one.low) and seed_verdict(one, "higher") == "unjudged"
    # Dicts as stored in results.json work too.
    assert seed_verdict({**iv._asdict(), "per_seed": [0.05, 0.06, 0.04]}, "higher") == "A"


def test_paired_t_interval_and_config_reject_bad_values() -> None:
    with pytest.raises(ValueError, match="one value per seed"):
        paired_t_interval([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        paired_t_interval([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(ValueError, match="seeds"):
        InClassStudyConfig(seeds=(0, 0))
    with pytest.raises(ValueError, match="contenders"):
        InClassStudyConfig(contenders=("linear", "mlp"))
    with pytest.raises(ValueError, match="poly_order"):
        InClassStudyConfig(data=InClassConfig(poly_order=1, quadratic_share=0.0))
    with pytest.raises(ValueError, match="curve_samples"):
        InClassStudyConfig(eval_samples=100, curve_samples=200)
    with pytest.raises(ValueError, match="better"):
        seed_verdict(paired_t_interval([1.0, 2.0], [0.0, 0.0]), "closer")


def test_replay_stream_gives_every_contender_the_fresh_stream() -> None:
    truth = build_in_class(InClassConfig(d_in=8, num_atoms=16, ranks=(8, 2, 2), k=2, seed=3))
    stream = ReplayStream(truth, 4, truth.generator(7))
    first, second = stream(), stream()
    drawn = [next(first) for _ in range(3)]
    replayed = [next(second) for _ in range(4)]  # one more than drawn: drawn on demand
    gen = truth.generator(7)
    fresh = [truth.sample(4, gen).x_BD for _ in range(4)]
    for a, b in zip([*drawn, replayed[3]], fresh, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(replayed, fresh, strict=True):
        assert torch.equal(a, b)
