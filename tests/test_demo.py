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
from polysae_lens.report import PLOT_FILES, Row, summary_rows

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
    assert set(results) == {"config", "ground_truth", "saes", "curves", "runtime_seconds"}
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
    # The printed table is the report's.
    table = printed.split("\n\nwrote")[0]
    assert table in report


def test_quick_demo_is_reproducible(quick_runs: list[tuple[Path, str]]) -> None:
    (a, _), (b, _) = quick_runs
    ra = json.loads((a / "results.json").read_text())
    rb = json.loads((b / "results.json").read_text())
    assert _without_runtime(ra) == _without_runtime(rb)


def test_report_names_what_poly_does_not_win() -> None:
    rows = [
        Row("mse", {"linear": 1.0, "poly": 2.0, "poly_order1": 0.5}, "lower"),
        Row("f1", {"linear": 0.9, "poly": 0.8, "poly_order1": 0.8}, "higher"),
        Row("r", {"linear": 0.5, "poly": -0.1, "poly_order1": 0.2}, "closer_to_zero"),
        Row("l0", {"linear": 5.0, "poly": 5.0, "poly_order1": 5.0}, "none"),
        Row("only poly", {"linear": None, "poly": 0.3, "poly_order1": None}, "higher"),
    ]
    assert [r.winner() for r in rows] == ["linear", "linear", "poly", "", ""]
    ablation = [r.winner("poly_order1", "poly") for r in rows]
    assert ablation == ["poly_order1", "tie", "poly", "", ""]


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
    assert not any(tmp_path.iterdir())
