"""The standalone evaluation: flags, loading a saved SAE (PolySAE or a SAELens
baseline) and its model, the JSON report and the printed table."""

from __future__ import annotations

import argparse
import importlib
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig

from polysae_lens.evals import PAPER_DATASET_NAMES, ProbingEvalConfig, ProbingSuite
from polysae_lens.evals.cli import (
    add_eval_arguments,
    build_config,
    eval_command,
    format_results_table,
    run_standalone_eval,
)

from .conftest import make_training_sae
from .lm_fixtures import make_tiny_model

HOOK = "blocks.0.hook_resid_post"
DATA = Path(__file__).parent / "data"
TOPICS = DATA / "topics.csv"
SMALL = ["--n-train", "8", "--n-test", "4", "--context-size", "16", "--no-progress"]


def parser() -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(prog="polysae-lens eval")
    add_eval_arguments(result)
    return result


def saved_sae(tmp_path: Path, kind: str = "poly") -> Path:
    """A tiny SAE trained on nothing, saved with the metadata a run records."""
    if kind == "poly":
        sae: Any = make_training_sae("poly")
    else:
        torch.manual_seed(0)
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=16, d_sae=32, k=4))
    sae.cfg.metadata.hook_name = HOOK
    sae.cfg.metadata.model_name = "tiny-offline"
    sae.cfg.metadata.prepend_bos = True
    path = tmp_path / kind
    sae.save_inference_model(str(path))
    return path


@pytest.fixture
def fake_model_loader(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """SAELens's load_model, replaced by the tiny offline model."""
    calls: list[tuple[Any, ...]] = []

    def load_model(class_name: str, name: str, device: Any = None, **kwargs: Any) -> Any:
        calls.append((class_name, name, str(device)))
        return make_tiny_model()

    monkeypatch.setattr(importlib.import_module("sae_lens.load_model"), "load_model", load_model)
    return calls


def test_flags_and_defaults() -> None:
    args = parser().parse_args(["--sae", "x"])
    config = build_config(args)
    assert config == ProbingEvalConfig()  # the paper's protocol by default
    assert tuple(args.datasets) == PAPER_DATASET_NAMES
    flags = ["--sae", "x", "--datasets", str(TOPICS), "ag_news", "org/news", "--k", "3"]
    flags += ["--text-column", "body", "--label-column", "topic"]
    flags += ["--cache-dtype", "float16", "--no-model-reference"]
    args = parser().parse_args(flags)
    config = build_config(args)
    local, paper, hub = config.resolved_datasets()
    assert (local.name, local.text_column, local.label_column) == ("topics", "body", "topic")
    assert paper.name == "ag_news" and paper.text_column == "text"  # the registry's columns
    assert (hub.name, hub.source, hub.text_column, hub.label_column) == (
        "news",
        "org/news",
        "body",
        "topic",
    )
    assert config.k_values == (3,)
    assert (config.cache_dtype, config.model_reference) == ("float16", False)


@pytest.mark.parametrize("kind", ["poly", "topk"])
def test_eval_command_writes_json_and_prints_a_table(
    kind: str,
    tmp_path: Path,
    fake_model_loader: list[tuple[Any, ...]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    output = tmp_path / "out" / "eval.json"
    flags = ["--sae", str(saved_sae(tmp_path, kind)), "--datasets", str(TOPICS)]
    flags += ["--output", str(output), "--per-task", *SMALL]
    args = parser().parse_args(flags)
    assert eval_command(args, []) == 0
    assert fake_model_loader == [("HookedTransformer", "tiny-offline", "cpu")]

    report = json.loads(output.read_text())
    assert report["sae"]["architecture"] == ("poly" if kind == "poly" else "topk")
    assert report["sae"]["hook_name"] == HOOK
    assert report["model"]["name"] == "tiny-offline"
    assert report["config"]["n_train"] == 8 and report["config"]["k_values"] == [1, 2, 5]
    assert report["datasets"]["topics"]["n_tasks"] == 3
    assert len(report["tasks"]) == 3
    metrics = report["metrics"]
    for key in ("probing/mean_f1_k1", "probing/topics/animals/f1_k5", "wasserstein/mean"):
        assert math.isfinite(metrics[key])
    assert metrics["probing/mean_f1_k2"] == report["summary"]["probing"]["f1_k2"]

    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["dataset", "tasks", "F1@1", "F1@2"]
    assert "model F1@all" in lines[0] and "W1/std" in lines[0]
    assert lines[1].split()[:2] == ["topics", "3"]
    assert [line.split()[0] for line in lines[2:5]] == ["animals", "food", "weather"]
    assert lines[5].split()[:2] == ["mean", "3"]
    assert f"{metrics['probing/mean_f1_k1']:.3f}" == lines[5].split()[2]
    assert f"wrote {output}" in out


def test_same_numbers_as_the_suite(tmp_path: Path) -> None:
    """The standalone path and the evaluators share the computation."""
    path = saved_sae(tmp_path)
    config = ProbingEvalConfig(
        datasets=(str(TOPICS),), n_train=8, n_test=4, context_size=16, progress=False
    )
    model = make_tiny_model()
    outcome = run_standalone_eval(sae_path=path, model=model, config=config)
    assert outcome.output is None
    sae = make_training_sae("poly").eval()
    direct = ProbingSuite(model, HOOK, config).evaluate(sae)
    assert outcome.results.metrics() == pytest.approx(direct.metrics(), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ([], "give exactly one SAE: --sae PATH, or --release and --sae-id."),
        (["--sae", "a", "--release", "r", "--sae-id", "i"], "(got sae_path, release/sae_id)"),
        (["--release", "r"], "--release and --sae-id must be given together"),
        (["--sae", "/no/such/sae"], "SAE path '/no/such/sae' does not exist"),
        (["--sae", "x", "--n-train", "7"], "n_train=7 is not allowed"),
        (["--sae", "x", "--datasets", "nope.csv"], "local file 'nope.csv' of dataset 'nope'"),
    ],
)
def test_errors_exit_2_with_a_message(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert eval_command(parser().parse_args(flags), []) == 2
    err = capsys.readouterr().err
    assert err.startswith("polysae-lens eval: error: ")
    assert message in err


def test_missing_metadata_and_extra_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sae = make_training_sae("poly")  # no hook or model name recorded
    with pytest.raises(ValueError, match="no model_name: pass --model-name"):
        run_standalone_eval(sae=sae)
    with pytest.raises(ValueError, match="no hook_name: pass --hook-name"):
        run_standalone_eval(sae=sae, model=make_tiny_model())
    assert eval_command(parser().parse_args(["--sae", "x"]), ["--bogus"]) == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_table_without_model_reference(tmp_path: Path) -> None:
    config = ProbingEvalConfig(
        datasets=(str(TOPICS),),
        n_train=8,
        n_test=4,
        context_size=16,
        model_reference=False,
        k_values=(2,),
        progress=False,
    )
    outcome = run_standalone_eval(
        sae=make_training_sae("poly"), model=make_tiny_model(), hook_name=HOOK, config=config
    )
    header = format_results_table(outcome.results).splitlines()[0]
    assert header.split() == ["dataset", "tasks", "F1@2", "W1", "W1/std", "latent", "std"]


def test_polysae_lens_main_dispatches_eval(
    tmp_path: Path, fake_model_loader: list[tuple[Any, ...]]
) -> None:
    from polysae_lens.cli import main

    output = tmp_path / "eval.json"
    flags = ["eval", "--sae", str(saved_sae(tmp_path, "poly")), "--datasets", str(TOPICS)]
    assert main([*flags, "--output", str(output), *SMALL]) == 0
    assert fake_model_loader == [("HookedTransformer", "tiny-offline", "cpu")]
    assert json.loads(output.read_text())["sae"]["architecture"] == "poly"
