"""``polysae-lens reproduce`` end to end on a tiny offline model: the run, its
resumption after an interruption, the table against the evaluators, bad input,
the dry run and the estimates."""

from __future__ import annotations

import csv
import importlib
import json
import re
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sae_lens import SAE, ActivationsStore
from sae_lens.evals import EvalConfig, run_evals
from sae_lens.training.activation_scaler import ActivationScaler

from polysae_lens import cli
from polysae_lens.evals import ProbingEvalConfig, ProbingSuite
from polysae_lens.reproduce import run as reproduce_run
from polysae_lens.reproduce.plan import STATE_FILENAME, ReproducePlan, estimate, sae_param_count
from polysae_lens.reproduce.settings import PAPER_SETTINGS, Setting
from polysae_lens.reproduce.table import format_table

from .lm_fixtures import (
    HOOK,
    OFFLINE_ENV,
    SMALL_CORPUS_WARNINGS,
    TEXTS,
    make_tiny_model,
    write_text_dataset,
)

pytestmark = SMALL_CORPUS_WARNINGS


# Labelled texts shaped like the paper's probing sets: a multi-class topic set
# (like ag_news) and a two-class sentiment set (like amazon_sentiment).
TOPICS = {
    "animals": ["The cat chased a mouse.", "A dog barked at night.", "Horses ran in the field.",
                "The owl hunted mice.", "A fox crept past the hens.", "Cows slept in the barn.",
                "The rabbit dug a hole.", "A bird sang on the fence."],
    "food": ["She baked fresh bread.", "The soup was hot and salty.", "We ate pizza for dinner.",
             "He sliced ripe tomatoes.", "The cake had sweet icing.", "Rice boiled in the pot.",
             "They grilled fish at noon.", "Apples filled the bowl."],
    "weather": ["Rain fell all night.", "The sky was clear and blue.", "Snow covered the road.",
                "A cold wind blew.", "Thunder rolled over the hills.", "Fog hid the valley.",
                "The sun burned hot today.", "Hail hit the roof."],
}  # fmt: skip
SENTIMENT = {
    "pos": ["I loved this phone.", "Great sound, easy setup.", "Works perfectly.",
            "Best purchase this year.", "Lovely and fast.", "Very happy with it."],
    "neg": ["Terrible quality.", "It broke in a week.", "Awful, do not buy.",
            "The screen cracked.", "Slow and noisy.", "A waste of money."],
}  # fmt: skip
N_TRAIN, N_TEST = 6, 4


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in OFFLINE_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """SAELens's load_model (the only network seam) replaced by the tiny model."""
    calls: list[str] = []

    def load_model(class_name: str, name: str, device: Any = None, **kwargs: Any) -> Any:
        calls.append(name)
        return make_tiny_model()

    monkeypatch.setattr(importlib.import_module("sae_lens.load_model"), "load_model", load_model)
    return calls


def write_csv(path: Path, classes: dict[str, list[str]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows([t, label] for label, texts in classes.items() for t in texts)
    return path


def tiny_setting(tmp_path: Path, **changes: Any) -> Path:
    data = {
        "name": "tiny",
        "model_name": "tiny-offline",
        "hook_name": HOOK,
        "d_in": 16,
        "d_sae": 48,
        "k": 4,
        "interaction_rank": 4,
        "training_tokens": 640,
        "dataset_path": str(write_text_dataset(tmp_path / "texts", TEXTS)),
        "context_size": 16,
        "batch_size_tokens": 32,
        "store_batch_size_prompts": 2,
        "n_batches_in_buffer": 4,
        "lr": 1e-2,
        **changes,
    }
    path = tmp_path / "setting.json"
    path.write_text(json.dumps(data))
    return path


def argv(tmp_path: Path, out: Path, *extra: str) -> list[str]:
    topics = write_csv(tmp_path / "topics.csv", TOPICS)
    sentiment = write_csv(tmp_path / "sentiment.csv", SENTIMENT)
    return [
        "reproduce", "--setting-file", str(tiny_setting(tmp_path)),
        "--datasets", str(topics), str(sentiment),
        "--n-train", str(N_TRAIN), "--n-test", str(N_TEST), "--eval-batches", "2",
        "--device", "cpu", "--checkpoints", "1", "--output-dir", str(out), *extra,
    ]  # fmt: skip


def table_row(table: str, label: str) -> list[float]:
    """The metric cells of the table row whose SAE column is ``label``."""
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 3 and cells[2] == label:
            return [float(c) for c in cells[3:]]
    raise AssertionError(f"no row {label!r} in\n{table}")


def test_reproduce_runs_resumes_and_matches_the_evaluators(
    tmp_path: Path,
    loads: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    trained: list[str] = []
    real_run_train = cli.run_train

    def counting_run_train(cfg: Any, **kwargs: Any) -> Any:
        trained.append(cfg.sae.architecture())
        return real_run_train(cfg, **kwargs)

    monkeypatch.setattr(cli, "run_train", counting_run_train)
    real_train_step = reproduce_run.train_step

    def interrupted_after_first_sae(plan: Any, kind: str, *args: Any) -> Any:
        if kind == "linear":
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C here
        return real_train_step(plan, kind, *args)

    monkeypatch.setattr(reproduce_run, "train_step", interrupted_after_first_sae)
    assert cli.main(argv(tmp_path, out)) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    state = json.loads((out / STATE_FILENAME).read_text())
    assert [s for s, r in state["steps"].items() if r["status"] == "done"] == ["train/poly"]
    assert trained == ["poly"]
    poly_weights = (out / "saes" / "poly" / "sae_weights.safetensors").read_bytes()

    monkeypatch.setattr(reproduce_run, "train_step", real_train_step)
    assert cli.main(argv(tmp_path, out)) == 0  # the same command resumes

    assert trained == ["poly", "topk"]  # the PolySAE was not trained again
    assert (out / "saes" / "poly" / "sae_weights.safetensors").read_bytes() == poly_weights
    state = json.loads((out / STATE_FILENAME).read_text())
    assert all(r["status"] == "done" for r in state["steps"].values())
    assert list(state["steps"])[-1] == "report"
    for plot in ("f1_per_dataset.png", "wasserstein_per_dataset.png"):
        assert (out / "plots" / plot).read_bytes()[:4] == b"\x89PNG"
    results = json.loads((out / "results.json").read_text())
    table = (out / "table.md").read_text()
    assert results["recipe"] == "package" and "package's PolySAE training defaults" in table
    assert results["time"]["total_seconds"] > 0 and results["time"]["gpu_seconds"] is None
    assert "n/a (not in our reference)" in table
    assert "--paper-settings" in format_table({**results, "recipe": "paper"})

    # The reference: one suite over both datasets through the evaluator API,
    # summarised here with numpy (the run evaluates dataset by dataset and
    # round-trips through JSON).
    topics, sentiment = tmp_path / "topics.csv", tmp_path / "sentiment.csv"
    config = ProbingEvalConfig(
        datasets=(str(topics), str(sentiment)), n_train=N_TRAIN, n_test=N_TEST,
        context_size=16, progress=False,
    )  # fmt: skip
    suite = ProbingSuite(make_tiny_model(), HOOK, config, prepend_bos=True)
    for kind, label in (("linear", "linear (ours)"), ("poly", "PolySAE (ours)")):
        sae = SAE.load_from_disk(str(out / "saes" / kind))
        evaluation = suite.evaluate(sae)
        by_dataset: dict[str, list[Any]] = {}
        for task in evaluation.tasks:
            by_dataset.setdefault(task.dataset, []).append(task)
        assert sorted(by_dataset) == ["sentiment", "topics"]
        expected = {
            f"f1_k{k}": float(
                np.mean(
                    [np.mean([t.sae_probes[f"k{k}"].f1 for t in ts]) for ts in by_dataset.values()]
                )
            )
            for k in (1, 2, 5)
        }
        expected["wasserstein_median"] = float(
            np.median([np.median([t.wasserstein for t in ts]) for ts in by_dataset.values()])
        )
        summary = results["saes"][kind]["summary"]
        row = table_row(table, label)
        for i, key in enumerate(["f1_k1", "f1_k2", "f1_k5", "wasserstein_median"]):
            assert summary[key] == pytest.approx(expected[key], rel=1e-9, abs=1e-12), key
            assert row[i] == pytest.approx(expected[key], rel=1e-3, abs=1e-4), key
        # Reconstruction: SAELens's run_evals on the same stream, built from the SAE.
        store = ActivationsStore.from_sae(
            suite.model, sae, dataset=str(tmp_path / "texts"), context_size=16,
            store_batch_size_prompts=2, n_batches_in_buffer=4, train_batch_size_tokens=32,
        )  # fmt: skip
        eval_config = EvalConfig(
            batch_size_prompts=2, n_eval_reconstruction_batches=2, compute_ce_loss=True,
            n_eval_sparsity_variance_batches=2, compute_variance_metrics=True,
        )  # fmt: skip
        metrics, _ = run_evals(sae, store, suite.model, ActivationScaler(), eval_config)
        ce = metrics["model_performance_preservation"]
        mse = metrics["reconstruction_quality"]["mse"]
        ev = metrics["reconstruction_quality"]["explained_variance"]
        increase = ce["ce_loss_with_sae"] - ce["ce_loss_without_sae"]
        assert summary["mse"] == pytest.approx(mse, rel=1e-6)
        assert summary["explained_variance"] == pytest.approx(ev, rel=1e-6)
        assert summary["ce_loss_increase"] == pytest.approx(increase, rel=1e-6, abs=1e-7)
        assert row[4:] == pytest.approx([mse, ev, increase], rel=1e-3, abs=1e-4)
    assert loads == ["tiny-offline", "tiny-offline"]  # once per command


# ---- bad input: a clear error before any model is loaded -------------------------


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--model", "gpt3"], ["'gpt3'", "gpt2, pythia-410m, pythia-1.4b, gemma-2-2b"]),
        (["--model", "gpt2", "--sparsifier", "relu"], ["'relu'", "topk, batchtopk, matryoshka"]),
        (["--model", "gpt2", "--tokens", "5000"], ["--tokens 5000", "4096 or 8192"]),
        (["--model", "gpt2", "--n-train", "7"], ["--n-train 7", "even"]),
        (["--model", "gpt2", "--datasets", "imdb"], ["'imdb'", "ag_news"]),
        ([], ["--model", "gpt2"]),
    ],
)
def test_bad_flags_fail_before_loading(
    tmp_path: Path,
    loads: list[str],
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    expected: list[str],
) -> None:
    out = tmp_path / "out"
    assert cli.main(["reproduce", *flags, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("polysae-lens reproduce: error:")
    for text in expected:
        assert text in err
    assert loads == [] and not out.exists()


def test_output_dir_checks(
    tmp_path: Path, loads: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert cli.main([*argv(tmp_path, foreign), "--tokens", "64"]) == 2
    assert "not empty and is not a reproduce run" in capsys.readouterr().err
    assert cli.main([*argv(tmp_path, tmp_path / "new"), "--resume"]) == 2
    assert "holds no reproduce run" in capsys.readouterr().err
    # A run of another plan is not resumed with different flags.
    out = tmp_path / "out"
    assert cli.main([*argv(tmp_path, out), "--tokens", "64"]) == 0
    capsys.readouterr()
    assert cli.main([*argv(tmp_path, out), "--tokens", "96", "--sparsifier", "batchtopk"]) == 2
    err = capsys.readouterr().err
    assert "sparsifier: 'topk' -> 'batchtopk'" in err and "training_tokens: 64 -> 96" in err
    assert "--overwrite" in err
    assert (foreign / "notes.txt").read_text() == "mine"
    assert loads == ["tiny-offline"]  # only the one successful run loaded the model


# ---- dry run ----------------------------------------------------------------------


def test_dry_run_prints_plan_estimates_and_step_time(
    tmp_path: Path, loads: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert cli.main([*argv(tmp_path, out), "--dry-run", "--measure-steps", "3"]) == 0
    text = capsys.readouterr().out
    assert not out.exists()  # nothing written
    assert "640 tokens per SAE = 20 steps of 32 tokens" in text
    for step in ("train/poly", "train/linear", "recon/poly", "probe/topics", "probe/sentiment"):
        assert f"[ ] {step}" in text
    assert "training poly:" in text and "disk (estimate)" in text
    times = re.findall(r"(poly|linear): ([0-9.]+) ms per step", text)
    assert [kind for kind, _ in times] == ["poly", "linear"]
    assert all(float(ms) > 0 for _, ms in times)
    assert loads == ["tiny-offline"]

    # --measure-steps 0: the plan without loading anything.
    assert cli.main(["reproduce", "--model", "gpt2", "--dry-run", "--measure-steps", "0",
                     "--output-dir", str(out)]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "300,000,000 tokens per SAE = 73,243 steps of 4096 tokens" in text
    assert "ranks (768, 64, 64)" in text and "8 dataset(s)" in text
    assert loads == ["tiny-offline"] and not out.exists()


# ---- settings, configs and estimates ---------------------------------------------


def test_paper_settings_are_the_papers() -> None:
    # From the reference notes: model, layer, tokens and R2 = R3 of each setting.
    expected = {
        "gpt2": ("blocks.8.hook_resid_post", 768, 300_000_000, 64),
        "pythia-410m": ("blocks.15.hook_resid_post", 1024, 500_000_000, 128),
        "pythia-1.4b": ("blocks.12.hook_resid_post", 2048, 500_000_000, 128),
        "gemma-2-2b": ("blocks.12.hook_resid_post", 2304, 500_000_000, 128),
    }
    assert set(PAPER_SETTINGS) == set(expected)
    for name, (hook, d_in, tokens, rank) in expected.items():
        s = PAPER_SETTINGS[name]
        assert (s.hook_name, s.d_in, s.training_tokens) == (hook, d_in, tokens)
        assert s.ranks == (d_in, rank, rank)
        assert (s.d_sae, s.k, s.batch_size_tokens, s.context_size, s.lr) == (
            16384, 64, 4096, 128, 3e-4,
        )  # fmt: skip


@pytest.mark.parametrize("sparsifier", ["topk", "batchtopk", "matryoshka"])
def test_recipes_differ_only_in_the_polysae_init_and_c1_lr(sparsifier: str) -> None:
    configs = {}
    for paper in (False, True):
        plan = ReproducePlan(PAPER_SETTINGS["gpt2"], sparsifier=sparsifier, paper_settings=paper,
                             datasets=("ag_news",))  # fmt: skip
        for kind in ("poly", "linear"):
            cfg = reproduce_run.build_runner_config(plan, kind, Path("out"))
            configs[paper, kind] = cfg
            assert (cfg.lr, cfg.lr_end, cfg.lr_scheduler_name, cfg.lr_warm_up_steps) == (
                3e-4, 3e-4, "constant", 0,
            )  # fmt: skip
            assert (cfg.train_batch_size_tokens, cfg.context_size) == (4096, 128)
            assert cfg.training_tokens == 300_000_000 and cfg.seed == 42
            assert cfg.sae.rescale_acts_by_decoder_norm is False
            assert cfg.sae.aux_loss_coefficient == 1.0
            assert cfg.sae.normalize_activations == "none"
            assert (cfg.sae.d_sae, cfg.sae.k) == (16384, 64)
            # the buffer holds at least one batch (SAELens 6.54's requirement)
            assert cfg.n_batches_in_buffer * cfg.context_size >= cfg.train_batch_size_tokens
    linear_arch = {"topk": "topk", "batchtopk": "batchtopk", "matryoshka": "matryoshka_batchtopk"}
    assert configs[False, "linear"].sae.architecture() == linear_arch[sparsifier]
    assert configs[False, "linear"].sae == configs[True, "linear"].sae
    package, paper = configs[False, "poly"].sae, configs[True, "poly"].sae
    assert package.poly_ranks == paper.poly_ranks == (768, 64, 64)
    assert (package.init_preset, package.c1_lr_scale) == ("package", None)
    assert (paper.init_preset, paper.c1_lr_scale) == ("authors", 1.0)
    assert (package.aux_dead_window, paper.aux_dead_window) == (100, 0)
    assert (package.u_lr_scale, paper.u_lr_scale) == (None, 1.0)
    assert (package.gauge_lr_scale, paper.gauge_lr_scale) == (1.0, 0.0)
    assert (package.aux_k, paper.aux_k) == ("k", "d_in/2")
    assert (package.aux_outside_interactions, paper.aux_outside_interactions) == (True, False)


def test_parameter_counts_match_built_saes() -> None:
    from sae_lens import TrainingSAE

    setting = Setting(name="small", model_name="m", hook_name="h", d_in=24, d_sae=96, k=4,
                      interaction_rank=5, training_tokens=64, dataset_path="d")  # fmt: skip
    for kind, cfg in (
        ("poly", {"architecture": "poly", "poly_ranks": [24, 5, 5]}),
        ("linear", {"architecture": "topk"}),
    ):
        sae = TrainingSAE.from_dict({**cfg, "d_in": 24, "d_sae": 96, "k": 4})
        assert sae_param_count(kind, setting) == sum(p.numel() for p in sae.parameters())
    # The notes: C1 + C2 + C3 + the two scalars are about 2.7% of a GPT-2 PolySAE.
    gpt2 = PAPER_SETTINGS["gpt2"]
    overhead = (768 + 64 + 64) * 768 + 2
    assert overhead / sae_param_count("poly", gpt2) == pytest.approx(0.027, abs=0.001)


def test_estimates_grow_with_what_they_count() -> None:
    gpt2 = PAPER_SETTINGS["gpt2"]
    plan = ReproducePlan(gpt2, datasets=("ag_news",), n_checkpoints=0)
    base = estimate(plan, {"ag_news": 4})
    # Adam, gradients and weights: 4 float32 copies of the parameters at least.
    assert base.train_memory["poly"] > 16 * sae_param_count("poly", gpt2)
    # With R1 = d_in, U is as large as a linear W_dec: the PolySAE needs the C's
    # (and the two scalars) more, 4 float32 copies each.
    c_params = (768 + 64 + 64) * 768 + 2
    assert base.train_memory["poly"] - base.train_memory["linear"] == 16 * c_params
    # ag_news: 4 classes x (4000 + 1000) / 2 texts x 128 tokens x 768 floats.
    assert base.parts["probing activation cache (largest dataset)"] == 4 * 2500 * 128 * 768 * 4
    with_checkpoints = estimate(ReproducePlan(gpt2, datasets=("ag_news",), n_checkpoints=2),
                                {"ag_news": 4})  # fmt: skip
    assert with_checkpoints.disk > base.disk


def test_latest_checkpoint_is_the_furthest(tmp_path: Path) -> None:
    from sae_lens.constants import TRAINER_STATE_FILENAME

    for run, samples in (("a1", "640"), ("a1", "1280"), ("b2", "960"), ("b2", "99999")):
        directory = tmp_path / run / samples
        directory.mkdir(parents=True)
        if samples != "99999":  # an interrupt-time save without a trainer state
            (directory / TRAINER_STATE_FILENAME).write_bytes(b"")
    assert reproduce_run.latest_checkpoint(tmp_path) == tmp_path / "a1" / "1280"
    assert reproduce_run.latest_checkpoint(tmp_path / "none") is None


def test_torchrun_trains_through_the_data_parallel_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under torchrun (WORLD_SIZE > 1) training goes to polysae_lens.distributed's
    train_distributed (replaced here: its own tests cover it) and only rank 0 evaluates."""
    calls: list[Any] = []
    fake = types.ModuleType("polysae_lens.distributed.runner")
    fake.train_distributed = lambda cfg, **kwargs: calls.append(cfg)  # type: ignore[attr-defined]
    parent = sys.modules.get("polysae_lens.distributed") or types.ModuleType(
        "polysae_lens.distributed"
    )
    monkeypatch.setitem(sys.modules, "polysae_lens.distributed", parent)
    monkeypatch.setitem(sys.modules, "polysae_lens.distributed.runner", fake)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    setting = Setting(**json.loads(tiny_setting(tmp_path).read_text()))
    plan = ReproducePlan(setting, datasets=(str(write_csv(tmp_path / "t.csv", TOPICS)),),
                         world_size=reproduce_run.world_size())  # fmt: skip
    state = reproduce_run.ReproduceState(fingerprint=plan.fingerprint())
    outcome = reproduce_run.run_reproduce(plan, tmp_path / "out", state)
    assert [cfg.sae.architecture() for cfg in calls] == ["poly", "topk"]
    assert outcome.steps_run == ["train/poly", "train/linear"] and outcome.results is None
    assert not (tmp_path / "out" / STATE_FILENAME).exists()  # rank 0 writes the state


def test_an_interrupted_training_resumes_from_its_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sae_lens.constants import TRAINER_STATE_FILENAME

    checkpoint = tmp_path / "out" / "checkpoints" / "poly" / "run1" / "320"
    checkpoint.mkdir(parents=True)
    (checkpoint / TRAINER_STATE_FILENAME).write_bytes(b"")
    seen: list[Any] = []
    monkeypatch.setattr(cli, "run_train", lambda cfg, **kwargs: seen.append(cfg))
    setting = Setting(**json.loads(tiny_setting(tmp_path).read_text()))
    plan = ReproducePlan(setting, datasets=("x.csv",))
    lazy = reproduce_run._LazyModel(plan, model=object())
    record = reproduce_run.train_step(plan, "poly", tmp_path / "out", lazy)
    assert seen[0].resume_from_checkpoint == str(checkpoint)
    assert record["resumed_from"] == str(checkpoint)
    reproduce_run.train_step(plan, "linear", tmp_path / "out", lazy)
    assert seen[1].resume_from_checkpoint is None  # each SAE has its own checkpoints
