"""``polysae-lens demo --quick``: the files it writes, their structure, finite
numbers, and the same numbers from the same command."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from polysae_lens import groundtruth
from polysae_lens.cli import main
from polysae_lens.noise import Interval
from polysae_lens.report import PLOT_FILES, Row, markdown_report, summary_rows

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PER_SAE_KEYS = {
    "mse",
    "explained_variance",
    "l0",
    "dead_latents",
    "mcc",
    "composite_latent_cosine",
    "cooccurrence",
    "probing",
}
POLY_ONLY_KEYS = {
    "interaction_best_cosine",
    "interaction_matched_cosine",
    "strength_correlation",
    "orthogonality_error",
    "term_shares",
}


def _numbers(tree: Any) -> list[float]:
    if isinstance(tree, dict):
        return [v for value in tree.values() for v in _numbers(value)]
    if isinstance(tree, list):
        return [v for value in tree for v in _numbers(value)]
    if isinstance(tree, bool) or tree is None or isinstance(tree, str):
        return []
    return [float(tree)]


def _without_runtime(results: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in results.items() if k != "runtime_seconds"}


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, str]]:
    runs = []
    for name in ("first", "second"):
        out = tmp_path_factory.mktemp(name)
        import contextlib
        import io

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert main(["demo", "--quick", "--out", str(out)]) == 0
        runs.append((out, buf.getvalue()))
    return runs


def test_quick_demo_writes_results_report_and_plots(quick_runs: list[tuple[Path, str]]) -> None:
    out, printed = quick_runs[0]
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {
        "config",
        "ground_truth",
        "saes",
        "curves",
        "runtime_seconds",
        "comparisons",
        "inclass",
    }
    assert set(results["saes"]) == {"linear", "poly", "poly_order1"}
    assert set(results["saes"]["linear"]) >= PER_SAE_KEYS
    assert set(results["saes"]["poly"]) >= PER_SAE_KEYS | POLY_ONLY_KEYS
    assert set(results["saes"]["poly_order1"]) >= PER_SAE_KEYS
    for name in ("linear", "poly_order1"):
        assert results["saes"][name]["interaction_best_cosine"] is None
    assert results["saes"]["poly_order1"]["term_shares"] == {"linear": 1.0}
    for name in ("linear", "poly", "poly_order1"):
        row = results["saes"][name]
        assert row["l0"] == pytest.approx(results["config"]["k"])
        assert set(row["probing"]) == {
            "f1_k1",
            "f1_k2",
            "f1_k5",
            "wasserstein",
            "wasserstein_standardized",
        }
        assert len(results["curves"][name]) == results["config"]["n_snapshots"]
    shares = results["saes"]["poly"]["term_shares"]
    assert set(shares) == {"linear", "quadratic", "cubic"}
    assert sum(shares.values()) == pytest.approx(1.0)
    assert results["saes"]["poly"]["orthogonality_error"] < 1e-4

    # Every number is finite, except correlations, which may not be NaN either here.
    numbers = _numbers(_without_runtime(results))
    assert numbers and all(math.isfinite(v) for v in numbers)

    report = (out / "report.md").read_text()
    assert "| metric" in report and "Where PolySAE does not win" in report
    assert "PolySAE order 1" in report and "What the polynomial terms add" in report
    for png in PLOT_FILES.values():
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
        assert f"]({png})" in report
    # Every printed table is the report's.
    tables = [b for b in printed.split("\n\nwrote")[0].split("\n\n") if b.startswith("|")]
    assert len(tables) == 3
    for table in tables:
        assert table in report


def test_quick_demo_writes_the_inclass_study_beside_it(
    quick_runs: list[tuple[Path, str]],
) -> None:
    out, printed = quick_runs[0]
    results = json.loads((out / "results.json").read_text())
    inclass = results["inclass"]
    assert set(inclass) == {"config", "truth", "runs", "summary", "comparisons", "curves"}
    assert set(inclass["runs"]) == {"linear", "poly", "poly_order1", "poly_previous", "oracle"}
    assert len(inclass["config"]["seeds"]) >= 2
    assert "inclass_total" in results["runtime_seconds"]
    report = (out / "report.md").read_text()
    for needle in (
        "# Both regimes side by side",
        "## In-class study",
        "oracle PolySAE",
        "seed-to-seed noise",
        "](inclass_training.png)",
    ):
        assert needle in report, needle
    assert (out / "inclass_training.png").read_bytes()[:8] == PNG_MAGIC
    assert "In-class:" in printed and "Side by side:" in printed


def test_quick_demo_is_reproducible(quick_runs: list[tuple[Path, str]]) -> None:
    (a, _), (b, _) = quick_runs
    ra = json.loads((a / "results.json").read_text())
    rb = json.loads((b / "results.json").read_text())
    assert _without_runtime(ra) == _without_runtime(rb)


def _interval(low: float, high: float, n_units: int = 100) -> Interval:
    return Interval((low + high) / 2, low, high, 0.95, 1000, n_units)


def test_verdicts_follow_the_noise_interval() -> None:
    win = {"linear": _interval(-2.0, -0.5), "poly_order1": _interval(0.5, 2.0)}
    within = {"linear": _interval(-0.1, 0.2), "poly_order1": _interval(-0.3, 0.1)}
    rows = [
        Row("mse", {"linear": 2.0, "poly": 1.0, "poly_order1": 0.5}, "lower", win),
        Row("f1", {"linear": 0.9, "poly": 0.8, "poly_order1": 0.8}, "higher", win),
        Row("ev", {"linear": 0.5, "poly": 0.6, "poly_order1": 0.6}, "higher", within),
        Row(
            "few",
            {"linear": 0.5, "poly": 0.9, "poly_order1": 0.9},
            "higher",
            {
                "linear": _interval(0.3, 0.5, n_units=4),
                "poly_order1": _interval(0.3, 0.5, n_units=4),
            },
        ),
        # The interval's side decides, not the observed difference (here 0).
        Row(
            "dead",
            {"linear": 0.0, "poly": 0.0, "poly_order1": 0.0},
            "lower",
            {
                "linear": Interval(0.0, 1.0, 10.0, 0.95, 1000, 100),
                "poly_order1": Interval(0.0, -10.0, -1.0, 0.95, 1000, 100),
            },
        ),
        # A 50% difference without a noise estimate gets no verdict.
        Row("no noise", {"linear": 1.0, "poly": 1.5, "poly_order1": 1.0}, "higher"),
        Row("l0", {"linear": 5.0, "poly": 5.0, "poly_order1": 5.0}, "none", win),
        Row("only poly", {"linear": None, "poly": 0.3, "poly_order1": None}, "higher"),
    ]
    verdicts = [r.winner() for r in rows]
    assert verdicts == ["poly", "linear", "tie", "unjudged", "linear", "", "", ""]
    ablation = [r.winner("poly_order1", "poly") for r in rows]
    assert ablation == ["poly_order1", "poly", "tie", "unjudged", "poly", "", "", ""]


def _with_mse_interval(results: dict[str, Any], low: float, high: float) -> dict[str, Any]:
    comparisons = {other: dict(by_metric) for other, by_metric in results["comparisons"].items()}
    comparisons["linear"]["mse"] = _interval(low, high, n_units=8000)._asdict()
    return {**results, "comparisons": comparisons}


def _report_line(report: str, metric: str) -> str:
    return next(line for line in report.splitlines() if line.startswith(f"| {metric}"))


def test_report_words_a_win_only_outside_noise(quick_runs: list[tuple[Path, str]]) -> None:
    results = json.loads((quick_runs[0][0] / "results.json").read_text())
    tie = markdown_report(_with_mse_interval(results, -0.004, 0.002))
    line = _report_line(tie, "MSE (held out)")
    assert "tie (within noise)" in line and "[-0.0040, +0.0020]" in line
    assert "PolySAE " not in line.split("|")[5]
    assert "- MSE (held out): tie (within noise), PolySAE - linear" in tie
    win = markdown_report(_with_mse_interval(results, -0.004, -0.002))
    line = _report_line(win, "MSE (held out)")
    assert line.split("|")[5].strip() == "PolySAE" and "[-0.0040, -0.0020]" in line
    assert "- MSE (held out):" not in win
    loss = markdown_report(_with_mse_interval(results, 0.002, 0.004))
    assert _report_line(loss, "MSE (held out)").split("|")[5].strip() == "linear TopK"
    assert "- MSE (held out): linear TopK, PolySAE - linear" in loss
    assert "seed-to-seed" in win
    # Dead latents: no verdict and no interval, even where results hold one.
    dead = _with_mse_interval(results, 0.002, 0.004)
    dead["comparisons"]["linear"]["dead_latents"] = _interval(1.0, 10.0)._asdict()
    cells = _report_line(markdown_report(dead), "dead latents").split("|")
    assert cells[5].strip() == "" and cells[6].strip() == ""


def test_comparisons_bootstrap_the_reported_metrics(quick_runs: list[tuple[Path, str]]) -> None:
    results = json.loads((quick_runs[0][0] / "results.json").read_text())
    saes, comparisons = results["saes"], results["comparisons"]
    assert set(comparisons) == {"linear", "poly_order1"}
    expected_keys = {"mse", "explained_variance", "mcc", "composite_latent_cosine"}
    expected_keys |= {f"probing.{key}" for key in saes["poly"]["probing"]}
    for other, by_metric in comparisons.items():
        assert set(by_metric) == expected_keys
        for key, interval in by_metric.items():
            path = key.split(".")
            poly, rival = saes["poly"], saes[other]
            for part in path:
                poly, rival = poly[part], rival[part]
            # The bootstrap's observed difference is the reported one: same units.
            assert interval["difference"] == pytest.approx(poly - rival, abs=1e-5), key
            assert interval["low"] <= interval["high"]
            assert interval["n_boot"] == results["config"]["n_boot"]
    assert comparisons["linear"]["mse"]["n_units"] == results["config"]["eval_samples"]
    assert comparisons["linear"]["probing.f1_k1"]["n_units"] == results["config"]["probe_tasks"]


def test_summary_rows_cover_the_issue_metrics(quick_runs: list[tuple[Path, str]]) -> None:
    results = json.loads((quick_runs[0][0] / "results.json").read_text())
    metrics = {r.metric for r in summary_rows(results)}
    for needle in (
        "MSE",
        "explained variance",
        "L0",
        "dead latents",
        "MCC",
        "best cos",
        "planted strength",
        "co-occurrence",
        "probe F1",
        "Wasserstein",
    ):
        assert any(needle in m for m in metrics), needle


def test_ground_truth_generator_plants_what_it_says() -> None:
    cfg = groundtruth.GroundTruthConfig(
        d_in=16, num_atoms=40, num_interacting_pairs=3, num_decoy_pairs=2, seed=1
    )
    gt = groundtruth.build_ground_truth(cfg)
    pairs = gt.pairs
    assert pairs.atoms_P2.unique().numel() == 10  # disjoint atoms
    assert (pairs.strength_P[:3] > 0).all() and (pairs.strength_P[3:] == 0).all()
    torch.testing.assert_close(pairs.direction_PD[:3].norm(dim=1), torch.ones(3))
    torch.manual_seed(0)
    f, x = gt.sample(20_000)
    # The activation is the atoms' linear part plus s_p f_i f_j w_p, exactly.
    linear = f @ gt.atom_directions_ND
    a, b = pairs.atoms_P2[:, 0], pairs.atoms_P2[:, 1]
    extra = (f[:, a] * f[:, b] * pairs.strength_P) @ pairs.direction_PD
    torch.testing.assert_close(x, linear + extra)
    # Co-firing frequency matches q + (1 - q) p_i p_j within sampling error.
    both = ((f[:, a] > 0) & (f[:, b] > 0)).float().mean(0)
    expected = gt.true_cofire_frequency()
    assert torch.allclose(both, expected, atol=4 * (expected / 20_000).sqrt().max().item() + 2e-3)
    # The same seed builds the same ground truth.
    again = groundtruth.build_ground_truth(cfg)
    assert torch.equal(again.pairs.atoms_P2, pairs.atoms_P2)
    assert torch.equal(again.atom_directions_ND, gt.atom_directions_ND)


def test_ground_truth_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="exceeds num_atoms"):
        groundtruth.GroundTruthConfig(num_atoms=10, num_interacting_pairs=4, num_decoy_pairs=2)
    with pytest.raises(ValueError, match="cofire_rate"):
        groundtruth.GroundTruthConfig(cofire_rate=(0.1, 0.01))


def test_demo_rejects_bad_flags(tmp_path: Path) -> None:
    assert main(["demo", "--quick", "--training-samples", "0", "--out", str(tmp_path)]) == 2
    assert main(["demo", "--quick", "--inclass-steps", "0", "--out", str(tmp_path)]) == 2
    assert main(["demo", "--quick", "--inclass-seeds", "-1", "--out", str(tmp_path)]) == 2
    assert not any(tmp_path.iterdir())
