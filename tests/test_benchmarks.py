"""The benchmarks measure what their tables say they measure (they are not timed here)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from polysae_lens import PolyTopKTrainingSAE, orthogonality_error

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _common
import training_step

BENCHMARKS = Path(_common.__file__).resolve().parent

TINY = training_step.SHAPES["tiny"]


@pytest.mark.parametrize("contender", training_step.CONTENDERS)
def test_training_contenders_are_configured_as_labelled(contender: str) -> None:
    sae: Any = training_step.build(contender, TINY, training=True)
    if contender.startswith("topk"):
        assert not isinstance(sae, PolyTopKTrainingSAE)
        assert sae.cfg.rescale_acts_by_decoder_norm is False
        return
    assert isinstance(sae, PolyTopKTrainingSAE)
    assert sae.sparse_kernels is (contender != "poly_dense")
    assert sae.cfg.stiefel_every_n_steps == (4 if contender == "poly_every4" else 1)
    previous = contender == "poly_previous"
    assert sae.cfg.gauge_lr_scale == (0.0 if previous else 1.0)
    assert sae.cfg.u_lr_scale == (1.0 if previous else None)
    assert sae.cfg.poly_ranks == TINY.ranks


def test_every4_contender_retracts_only_every_fourth_step() -> None:
    sae: Any = training_step.build("poly_every4", TINY, training=True)
    trainer = training_step.make_trainer(sae, TINY, autocast=False)
    x = torch.randn(TINY.batch, TINY.d_in)
    errors = []
    for _ in range(4):
        trainer.step(x)
        errors.append(orthogonality_error(sae.U).item())
    assert [e <= 1e-5 for e in errors] == [False, False, False, True]


@pytest.mark.parametrize("contender", ["topk_auxk", "poly_auxk"])
def test_auxk_contenders_run_auxk_every_step(contender: str) -> None:
    def aux_losses(marked: bool) -> list[float]:
        sae: Any = training_step.build(contender, TINY, training=True)
        trainer = training_step.make_trainer(sae, TINY, autocast=False)
        seen: list[float] = []
        forward = sae.training_forward_pass

        def recording(step_input: Any) -> Any:
            out = forward(step_input)
            seen.append(float(out.losses["auxiliary_reconstruction_loss"]))
            return out

        sae.training_forward_pass = recording
        x = torch.randn(TINY.batch, TINY.d_in, generator=torch.Generator().manual_seed(0))
        step = training_step.with_dead_latents(trainer, torch.arange(3), x)
        for _ in range(3):
            step() if marked else trainer.step(x)
        return seen

    assert all(loss > 0 for loss in aux_losses(marked=True))
    assert aux_losses(marked=False) == [0.0, 0.0, 0.0]  # fresh: nothing dead


def test_quick_run_prints_every_row(capsys: pytest.CaptureFixture[str]) -> None:
    training_step.main(["--quick", "--no-memory"])
    out = capsys.readouterr().out
    for row in (
        "encoder addmm (floor)",
        "poly part: retraction",
        "train/poly_every4",
        "train/poly_auxk",
        "train/topk_auxk",
        "infer/poly",
    ):
        assert row in out


def test_gpu_suite_cpu_fallback_runs_its_checks_and_timings(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import gpu_suite

    assert gpu_suite.main(["--device", "cpu", "--quick", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "no CUDA device" in out
    assert "FAIL" not in out
    for row in (
        "poly_matryoshka step gradients (worst)",
        "decode gradient, every latent",
        "max |U^T U - I| after every step",
        "bf16 autocast step loss vs float32",
        "train/polysae",
        "train/polysae_previous",
        "infer/saelens_topk",
    ):
        assert row in out
    assert out.count("## tiny") == 2  # float32 and bf16 autocast


def test_gpu_suite_profiles_polysae_steps_and_can_skip_its_checks(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import gpu_suite

    assert gpu_suite.main(["--device", "cpu", "--quick", "--skip-checks", "--profile", "2"]) == 0
    out = capsys.readouterr().out
    assert "## checks" not in out
    assert out.count("### profile: 2 PolySAE training steps") == 2  # float32 and bf16
    assert "aten::" in out  # the profiler's rows


def test_gpu_suite_reports_a_failed_check() -> None:
    import gpu_suite

    assert gpu_suite.Check("x", 2e-3, 1e-3).ok is False
    assert gpu_suite.Check("x", 1e-3, 1e-3).ok is True


def test_growth_exponent_recovers_a_power_law() -> None:
    sizes = [4096.0, 16384.0, 65536.0]
    seconds = [0.003 * (s / 1000) ** 0.8 for s in sizes]
    assert training_step.growth_exponent(sizes, seconds) == pytest.approx(0.8, abs=1e-12)
    # two points: the slope through them, by hand
    slope = training_step.growth_exponent([2.0, 8.0], [1.0, 3.0])
    assert slope == pytest.approx(math.log(3.0) / math.log(4.0), abs=1e-12)


def test_sweep_shapes_vary_one_axis_each() -> None:
    base = training_step.SHAPES["gpt2"]
    swept = training_step.sweep_shapes(base, [4096, 65536], [32])
    assert [(axis, s.d_sae, s.k) for axis, s in swept] == [
        ("d_sae", 4096, 64),
        ("d_sae", 65536, 64),
        ("k", 16384, 32),
    ]
    assert all((s.d_in, s.batch, s.ranks) == (base.d_in, base.batch, base.ranks) for _, s in swept)


@pytest.mark.parametrize("kind", _common.CONTENTION_KINDS)
def test_contention_runs_beside_the_block_and_is_killed_after(kind: str) -> None:
    with _common.contention(kind) as proc:
        assert proc is not None and proc.poll() is None
    assert proc.poll() is not None
    with pytest.raises(RuntimeError), _common.contention("busy") as proc:
        raise RuntimeError("the block fails")
    assert proc is not None and proc.poll() is not None
    with pytest.raises(ValueError, match="not one of"), _common.contention("spin"):
        pass


def test_wasserstein_benchmark_rows_agree_with_scipy(capsys: pytest.CaptureFixture[str]) -> None:
    import wasserstein as bench

    args = argparse.Namespace(
        density=0.1, seed=0, device="cpu", repeats=1, scipy_latents=32, scipy_repeats=1
    )
    row = bench.measure(64, 300, args)
    assert (row.n_latents, row.n_samples, row.scipy_latents) == (64, 300, 32)
    assert row.rel_diff < 1e-9
    assert row.ours > 0 and row.ours_latent_major > 0 and row.scipy > 0
    bench.main(["--sizes", "64x300", "32x200", "--repeats", "1", "--scipy-latents", "16"])
    out = capsys.readouterr().out
    assert "64 x 300" in out and "32 x 200" in out and "latent-major" in out
    with pytest.raises(SystemExit):
        bench.main(["--sizes", "64by300"])


def test_gpu_syncs_says_there_is_nothing_to_observe_without_cuda(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import gpu_syncs

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the script observes it (tests/test_cuda.py)")
    assert gpu_syncs.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().out


def test_gpu_syncs_names_the_package_frames_innermost_first() -> None:
    import traceback

    import gpu_syncs

    stack = [
        traceback.FrameSummary("/x/site-packages/sae_lens/training/sae_trainer.py", 10, "fit"),
        traceback.FrameSummary("/x/lib/python3.11/threading.py", 5, "run"),
        traceback.FrameSummary("/w/src/polysae_lens/sparse.py", 155, "transposed_product_DF"),
    ]
    assert gpu_syncs.where(stack) == (
        "sparse.py:155:transposed_product_DF <- sae_trainer.py:10:fit"
    )


def test_median_times_rotates_the_order_so_each_contender_follows_each_other() -> None:
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = training_step.median_times(fns, repeats=6)
    assert set(times) == {"a", "b", "c"}
    timed = calls[3:]  # after one warm-up call each
    follows = {(timed[i - 1], timed[i]) for i in range(1, len(timed))}
    assert {("a", "b"), ("b", "a"), ("c", "a"), ("a", "c"), ("b", "c"), ("c", "b")} <= follows
    assert sorted(timed) == sorted("abc" * 6)


def test_steps_alone_times_only_the_polysae_training_steps(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    stepped: list[str] = []
    real_build = training_step.build

    def build(contender: str, shape: Any, training: bool, autocast: bool = False) -> Any:
        sae = real_build(contender, shape, training, autocast)
        stepped.append(contender)
        return sae

    monkeypatch.setattr(training_step, "build", build)
    times = training_step.time_steps_alone(
        TINY, 2, False, ("topk", "poly", "poly_previous", "poly_auxk")
    )
    assert list(times) == ["poly", "poly_previous"] == stepped
    training_step.main(["--quick", "--no-memory", "--contenders", "poly_previous", "--steps-alone"])
    line = next(r for r in capsys.readouterr().out.splitlines() if r.startswith("training steps"))
    assert "poly " in line and "(1.000)" in line and "poly_previous" in line


def test_step_cost_history_child_times_both_contenders_in_both_orders() -> None:
    import step_cost_history

    medians = step_cost_history.child("tiny", repeats=2, threads=None)
    assert set(medians) == {"poly_mixed", "topk_mixed", "poly_alone", "topk_alone"}
    assert all(seconds > 0 for seconds in medians.values())


def test_step_cost_history_relative_cost_pairs_runs() -> None:
    import step_cost_history

    now = [{"poly_mixed": 12.0, "topk_mixed": 20.0}, {"poly_mixed": 9.0, "topk_mixed": 10.0}]
    then = [{"poly_mixed": 10.0, "topk_mixed": 25.0}, {"poly_mixed": 9.0, "topk_mixed": 9.0}]
    plain = step_cost_history.relative_cost(now, then, "mixed", yardstick=False)
    assert plain == pytest.approx([0.2, 0.0])
    # (12 / 20) / (10 / 25) - 1 = 0.5; (9 / 10) / (9 / 9) - 1 = -0.1
    ratios = step_cost_history.relative_cost(now, then, "mixed", yardstick=True)
    assert ratios == pytest.approx([0.5, -0.1])


def test_step_cost_history_refuses_an_unknown_revision(capsys: pytest.CaptureFixture[str]) -> None:
    import step_cost_history

    with pytest.raises(SystemExit):
        step_cost_history.main(["--against", "no-such-revision-here"])
    assert "--against 'no-such-revision-here' is not a commit" in capsys.readouterr().err


def test_training_dynamics_one_lr_contenders_keep_c1_at_one_step() -> None:
    """The paper's single learning rate: C1's step unscaled even though the previous
    defaults they build on carry ``c1_lr_scale="d_sae/R1"``."""
    import training_dynamics as td

    from polysae_lens import stiefel

    spec = td.DataSpec(d_in=8, d_sae=32, k=2, n_features=32)
    for contender in (td.AUTHORS, td.KAIMING, td.FIX):
        sae = td.build(contender, spec, stream=None)  # type: ignore[arg-type]
        assert stiefel.c1_step_scale(sae) == 1.0, contender.name
    defaults = td.build(td.PKG_DEFAULTS, spec, stream=None)  # type: ignore[arg-type]
    assert stiefel.c1_step_scale(defaults) == 2.0  # sqrt(d_sae / R1) = sqrt(32 / 8)


def test_importing_the_benchmarks_leaves_saelens_progress_bar_alone() -> None:
    """A benchmark that patched SAETrainer's tqdm at import silenced the bar for every
    test that ran after it (test_first_run's bar check failed only in the full suite)."""
    import subprocess

    modules = sorted(p.stem for p in BENCHMARKS.glob("*.py") if not p.stem.startswith("_"))
    assert {"inclass", "training_dynamics", "retraction"} <= set(modules)
    script = (
        "import importlib, sys\n"
        f"sys.path.insert(0, {str(BENCHMARKS)!r})\n"
        "import sae_lens.training.sae_trainer as m\n"
        "before = m.tqdm\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "    assert m.tqdm is before, name\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_quiet_fit_hides_the_bar_for_its_call_only(capsys: pytest.CaptureFixture[str]) -> None:
    import sae_lens.training.sae_trainer as sae_trainer_module

    before = sae_trainer_module.tqdm
    seen: list[Any] = []

    class Trainer:
        def fit(self) -> str:
            seen.append(sae_trainer_module.tqdm)
            sae_trainer_module.tqdm(range(3), desc="Training SAE").close()
            return "fitted"

    assert _common.quiet_fit(Trainer()) == "fitted"  # type: ignore[arg-type]
    assert seen[0] is not before
    assert "Training SAE" not in capsys.readouterr().err
    assert sae_trainer_module.tqdm is before


def test_c2_revive_reaims_only_the_channel_below_the_fraction() -> None:
    """``inclass_remedies.py +c2revive``: the small C2 row gets the median row norm in a
    direction orthogonal to the other rows, with its Adam moments cleared; the others and
    their moments are untouched."""
    import types

    import inclass_remedies

    from polysae_lens import PolyTopKTrainingSAEConfig

    torch.manual_seed(0)
    sae = PolyTopKTrainingSAE(
        PolyTopKTrainingSAEConfig(d_in=12, d_sae=32, k=2, poly_order=2, poly_ranks=(8, 4, 4))
    )
    with torch.no_grad():
        sae.C2.copy_(torch.randn(4, 12))
        sae.C2[2] *= 0.01
    opt = torch.optim.Adam(sae.parameters(), lr=0.0)  # lr 0: the hook alone moves C2
    sae.C2.grad = torch.ones_like(sae.C2)
    opt.step()  # moments exist before the hook is set up
    inclass_remedies.make_c2_revive(1, 0.25)(types.SimpleNamespace(optimizer=opt), sae)
    before = sae.C2.detach().clone()
    moments = opt.state[sae.C2]["exp_avg"].clone()
    median = float(before.norm(dim=1).median())
    opt.step()
    after = sae.C2.detach()
    assert torch.equal(after[[0, 1, 3]], before[[0, 1, 3]])
    assert float(after[2].norm()) == pytest.approx(median, rel=1e-5)
    for r in (0, 1, 3):  # orthogonal to every other row, each checked on its own
        assert abs(float(after[2] @ after[r])) < 1e-4 * median * float(after[r].norm())
    state = opt.state[sae.C2]
    assert torch.all(state["exp_avg"][2] == 0) and torch.all(state["exp_avg_sq"][2] == 0)
    assert torch.equal(state["exp_avg"][[0, 1, 3]], moments[[0, 1, 3]] * 0.9 + 0.1)


def test_channel_probe_on_the_oracle_and_on_a_channel_turned_away() -> None:
    """``inclass_remedies.py +trace``: at the true decoder every channel is found and
    writes inside the true output space; a row replaced by a direction orthogonal to
    that space counts as wholly outside, and one direction is then missing."""
    import inclass_remedies

    from polysae_lens.inclass import InClassConfig, build_in_class, oracle_sae

    cfg = InClassConfig(d_in=16, num_atoms=32, ranks=(12, 3, 3), k=2, calibration_samples=2048)
    truth = build_in_class(cfg)
    sae = oracle_sae(truth, cfg.k)
    probe = inclass_remedies.channel_probe(truth)
    out = probe(sae, 0)
    assert out["found"] == 3
    assert out["outside"] == [0.0, 0.0, 0.0]
    expected = [round(abs(float(truth.weights.lambda2)) * float(row.norm()), 2)
                for row in truth.weights.C2_SD]  # fmt: skip
    assert out["scale"] == expected
    # a unit vector orthogonal to the three true rows (least-squares residual of e_0)
    C2 = truth.weights.C2_SD.double()
    e0 = torch.zeros(16, dtype=torch.float64)
    e0[0] = 1.0
    coef = torch.linalg.lstsq(C2.T, e0[:, None]).solution
    away = e0 - (C2.T @ coef)[:, 0]
    with torch.no_grad():
        sae.C2[1] = (away / away.norm()).float()
    out = probe(sae, 1)
    assert out["outside"][1] == 1.0 and out["outside"][0] == 0.0
    assert out["found"] == 2


def test_inclass_gaps_scores_screens_against_the_reports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    import inclass_gaps

    def run(name: str, seed: int, b: float, b4: float) -> dict[str, Any]:
        return {"name": name, "seed": seed, "mse": {"10": b, "40": b4}, "extra": {}}

    reports = tmp_path / "r.json"
    reports.write_text(
        json.dumps(
            {
                "inclass": [
                    run("topk", 0, 0.20, 0.18),
                    run("oracle", 0, 0.10, 0.08),
                    run("poly2", 0, 0.15, 0.10),
                    run("topk", 1, 0.30, 0.20),
                    run("oracle", 1, 0.10, 0.10),
                    run("poly2", 1, 0.20, 0.12),
                ]
            }
        )
    )
    screens = tmp_path / "s.jsonl"
    screens.write_text(
        "\n".join(
            json.dumps({"variant": "v", "seed": s, "mse": {"10": b, "40": b4}})
            for s, b, b4 in ((0, 0.12, 0.09), (1, 0.16, 0.11))
        )
    )
    table = inclass_gaps.main(["--reports", str(reports), "--screens", str(screens)])
    # (0.20 - 0.12) / (0.20 - 0.10) and (0.30 - 0.16) / (0.30 - 0.10), worked by hand
    assert table["v"][10]["scores"] == pytest.approx([0.8, 0.7])
    assert table["v"][40]["scores"] == pytest.approx([0.9, 0.9])
    assert table["v"][10]["paired"] == pytest.approx([-0.03, -0.04])
    out = capsys.readouterr().out
    assert "0.750 ± 0.071 (min 0.700, n 2)" in out  # mean and sample sd of 0.8, 0.7
    assert "-0.0350 [-0.0986, +0.0286]" in out  # 12.71 * 0.00707 / sqrt(2) = 0.06355
    # paired with another screened variant instead of the reports' poly2
    screens.write_text(
        screens.read_text()
        + "\n"
        + "\n".join(
            json.dumps({"variant": "base", "seed": s, "mse": {"10": b, "40": b4}})
            for s, b, b4 in ((0, 0.14, 0.10), (1, 0.18, 0.12))
        )
    )
    table = inclass_gaps.main(
        ["--reports", str(reports), "--screens", str(screens), "--baseline", "base"]
    )
    assert table["v"][10]["paired"] == pytest.approx([-0.02, -0.02])
    with pytest.raises(SystemExit, match="'nope' is not among"):
        inclass_gaps.main(
            ["--reports", str(reports), "--screens", str(screens), "--baseline", "nope"]
        )
