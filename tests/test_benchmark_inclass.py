"""benchmarks/inclass.py measures what its table says (run on tiny sizes, not timed)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import inclass as bench

from polysae_lens import PolyTopKTrainingSAE
from polysae_lens.inclass import build_in_class


def test_quick_run_prints_every_contender_and_both_budgets(
    capsys: pytest.CaptureFixture[str],
) -> None:
    report = bench.main(["--quick"])
    out = capsys.readouterr().out
    for row in ("| 20 |", "| 80 |", "gap closed by poly2 at 20", "MSE poly1 / topk at 80"):
        assert row in out
    names = {r["name"] for r in report["inclass"]}
    assert names == {"topk", "poly2", "poly2 previous", "poly2 paper", "poly1", "oracle"}
    assert {r["name"] for r in report["linear_wide"]} == names - {"oracle"}
    assert "width 96" in out  # linear_wide: twice the 48 atoms
    for r in report["inclass"]:
        assert set(r["mse"]) == {20, 80}
        assert all(0 < v < 10 for v in r["mse"].values())
    # the oracle starts at the true decoder: every quadratic direction is there
    (oracle,) = [r for r in report["inclass"] if r["name"] == "oracle"]
    assert oracle["extra"]["metric"][20]["quad_dirs_found"] == bench.QUICK_CFG.ranks[1]
    assert "quadratic output directions found" in out
    assert f"oracle: s0 {bench.QUICK_CFG.ranks[1]}/" in out


def test_reports_merge_into_one_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for seed in (0, 1):
        bench.main(["--quick", "--suite", "linear", "--seeds", str(seed), "--json",
                    str(tmp_path / f"s{seed}.json")])  # fmt: skip
    capsys.readouterr()
    merged = bench.main(["--from-json", str(tmp_path / "s0.json"), str(tmp_path / "s1.json")])
    out = capsys.readouterr().out
    assert "linear data, seeds [0, 1] (from 2 reports)" in out
    assert sorted({r["seed"] for r in merged["linear"]}) == [0, 1]
    # two seeds: mean ± sd cells, from the same numbers the runs reported
    topk = [r["mse"]["20"] for r in merged["linear"] if r["name"] == "topk"]
    mean, sd = sum(topk) / 2, abs(topk[0] - topk[1]) / 2**0.5
    assert f"| 20 | {mean:.3f} ± {sd:.3f} |" in out


def test_contenders_are_configured_as_labelled() -> None:
    truth = build_in_class(bench.QUICK_CFG)
    built: dict[str, Any] = {
        c.name: bench.build(c, truth, k=bench.QUICK_CFG.k) for c in bench.contenders()
    }
    assert not isinstance(built["topk"], PolyTopKTrainingSAE)
    assert built["topk"].cfg.d_sae == bench.QUICK_CFG.num_atoms
    assert built["poly2"].cfg.poly_order == 2 and built["poly1"].cfg.poly_order == 1
    paper = built["poly2 paper"].cfg
    assert paper.c1_lr_scale == 1.0 and paper.c1_init == "kaiming"
    assert paper.gauge_lr_scale == 0.0
    assert paper.aux_dead_window == 0  # SAELens's AuxK
    assert built["poly2"].cfg.aux_dead_window == 100  # package default
    assert built["poly2"].cfg.gauge_lr_scale == 1.0  # package default
    assert built["poly2"].cfg.u_lr_scale is None  # sqrt(R1 / d_sae)
    previous = built["poly2 previous"].cfg
    assert (previous.gauge_lr_scale, previous.u_lr_scale) == (0.0, 1.0)
    assert paper.u_lr_scale == 1.0
    assert getattr(paper, "init_preset", "authors") == "authors"
    assert built["poly2"].cfg.c1_lr_scale is None  # package defaults
    oracle = built["oracle"]
    assert torch.equal(oracle.U.detach(), truth.weights.U_FR)
    z, x = truth.sample(32, truth.generator(0))
    torch.testing.assert_close(oracle.decode(z), x, rtol=1e-5, atol=1e-5)


def test_gap_closed() -> None:
    assert bench.gap_closed(1.0, 0.5, 0.0) == pytest.approx(0.5)
    assert bench.gap_closed(0.8, 0.8, 0.4) == pytest.approx(0.0)
    assert bench.gap_closed(0.8, 0.9, 0.4) < 0


def test_chosen_contenders_and_a_run_cut_short_keeps_what_it_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "r.json"
    real_train = bench.train

    def train_until_poly1(c: bench.Contender, *args: Any, **kwargs: Any) -> bench.RunResult:
        if c.name == "poly1":
            raise KeyboardInterrupt  # as if the run were killed here
        return real_train(c, *args, **kwargs)

    monkeypatch.setattr(bench, "train", train_until_poly1)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--quick", "--suite", "inclass", "linear", "--contenders", "topk", "poly2",
                    "poly1", "--json", str(path)])  # fmt: skip
    report = json.loads(path.read_text())
    assert [r["name"] for r in report["inclass"]] == ["topk", "poly2"]  # in order, no others
    assert "linear" not in report
    assert not (tmp_path / "r.json.tmp").exists()


def test_gap_closed_pairs_runs_by_seed_and_names_the_seeds_left_out(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # seed 7 has no oracle run (cut short); seeds 3 and 5 pair up, whatever the order
    runs = [
        bench.RunResult("topk", 3, {10: 1.0}),
        bench.RunResult("topk", 7, {10: 9.0}),
        bench.RunResult("topk", 5, {10: 2.0}),
        bench.RunResult("poly2", 7, {10: 9.0}),
        bench.RunResult("poly2", 5, {10: 1.0}),
        bench.RunResult("poly2", 3, {10: 0.5}),
        bench.RunResult("oracle", 5, {10: 0.0}),
        bench.RunResult("oracle", 3, {10: 0.0}),
    ]
    bench.print_table("t", runs, [10])
    out = capsys.readouterr().out
    # seed 3: (1 - 0.5) / (1 - 0) = 0.5; seed 5: (2 - 1) / (2 - 0) = 0.5
    assert "gap closed by poly2 at 10: 0.500 ± 0.000 (per seed [0.5, 0.5]; seeds [7] lack" in out


def test_width_sets_every_sae_but_the_oracle_and_refuses_an_oracle_of_another_width(
    capsys: pytest.CaptureFixture[str],
) -> None:
    truth = build_in_class(bench.QUICK_CFG)
    for c in bench.contenders():
        sae: Any = bench.build(c, truth, k=2, width=96)
        assert sae.cfg.d_sae == (bench.QUICK_CFG.num_atoms if c.kind == "oracle" else 96)
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--suite", "inclass", "--width", "96"])
    assert "the oracle has one latent per true atom (48)" in capsys.readouterr().err
    report = bench.main(["--quick", "--suite", "linear", "--width", "96", "--contenders", "topk"])
    assert "width 96" in capsys.readouterr().out
    assert [r["name"] for r in report["linear"]] == ["topk"]


def test_topk_rerun_is_topk_from_another_seed_on_the_same_data(
    capsys: pytest.CaptureFixture[str],
) -> None:
    report = bench.main(
        ["--quick", "--suite", "linear", "--contenders", "topk", "topk rerun", "--topk-rerun"]
    )
    assert "MSE topk rerun / topk at 80" in capsys.readouterr().out
    by_name = {r["name"]: r for r in report["linear"]}
    assert by_name["topk rerun"]["seed"] == by_name["topk"]["seed"] == 0  # paired as seed 0
    assert by_name["topk rerun"]["mse"] != by_name["topk"]["mse"]
    # the same as TopK trained with seed 1000 on seed 0's data
    truth = build_in_class(bench.QUICK_CFG)
    source = bench.DataSource(truth, linear=True)
    eval_x = source.sample(512, truth.generator(999_999))
    direct = bench.train(bench.Contender("topk", "topk"), source, 1000, 80, [20], eval_x, batch=64,
                         k=bench.QUICK_CFG.k)  # fmt: skip
    assert direct.mse == by_name["topk rerun"]["mse"]


def test_data_overrides_are_typed_and_refuse_unknown_fields() -> None:
    cfg = bench.InClassConfig()
    overrides = bench.data_overrides(
        cfg, ["num_atoms=128", "zipf_exponent=0.5", "ranks=32,4,4", "code=bernoulli"]
    )
    assert overrides == {
        "num_atoms": 128,
        "zipf_exponent": 0.5,
        "ranks": (32, 4, 4),
        "code": "bernoulli",
    }
    assert type(overrides["num_atoms"]) is int and type(overrides["zipf_exponent"]) is float
    for bad, message in [
        ("nope=1", "FIELD one of"),
        ("num_atoms", "FIELD one of"),
        ("seed=3", "FIELD one of"),  # --seeds sets it
        ("num_atoms=x", "invalid literal"),
    ]:
        with pytest.raises(ValueError, match=message):
            bench.data_overrides(cfg, [bad])


def test_linear_wide_is_linear_data_with_a_flatter_firing_law_and_twice_the_latents(
    capsys: pytest.CaptureFixture[str],
) -> None:
    wide = bench.main(["--quick", "--suite", "linear_wide", "--contenders", "topk"])
    assert "linear data, a flatter firing law (Zipf exponent 0.01)" in capsys.readouterr().out
    # the same as TopK of width 96 trained directly on linear data with that firing law
    truth = build_in_class(dataclasses.replace(bench.QUICK_CFG, zipf_exponent=0.01))
    weights = truth.firing_weights_N
    steep = build_in_class(bench.QUICK_CFG).firing_weights_N
    # the same range of probabilities, but the most frequent atom has a smaller share
    assert weights.max().item() == pytest.approx(steep.max().item())
    assert weights.min().item() == pytest.approx(steep.min().item())
    assert weights.max() / weights.sum() < 0.5 * steep.max() / steep.sum()
    source = bench.DataSource(truth, linear=True)
    eval_x = source.sample(512, truth.generator(999_999))
    direct = bench.train(bench.Contender("topk", "topk"), source, 0, 80, [20], eval_x, batch=64,
                         k=bench.QUICK_CFG.k, width=96)  # fmt: skip
    assert direct.mse == wide["linear_wide"][0]["mse"]
    # --width and --data still apply to it
    report = bench.main(["--quick", "--suite", "linear_wide", "--contenders", "topk", "--width",
                         "64", "--data", "zipf_exponent=0.5"])  # fmt: skip
    out = capsys.readouterr().out
    assert "width 64" in out and "(Zipf exponent 0.5)" in out
    assert report["linear_wide"][0]["mse"] != direct.mse


def test_data_option_reaches_the_data(capsys: pytest.CaptureFixture[str]) -> None:
    report = bench.main(
        ["--quick", "--suite", "linear", "--contenders", "topk", "--data", "num_atoms=40"]
    )
    assert "width 40" in capsys.readouterr().out
    assert [row["name"] for row in report["linear"]] == ["topk"]
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--data", "zipf_exponent=fast"])
