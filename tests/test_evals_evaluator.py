"""The probing / Wasserstein suite and evaluators on a tiny model, and inside a
short stock ``LanguageModelSAETrainingRunner`` training."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest
import torch
import wandb
from sae_lens import LanguageModelSAETrainingRunner
from sae_lens.training.activation_scaler import ActivationScaler

import polysae_lens.evals.evaluator as evaluator_module
from polysae_lens.evals import (
    CombinedEvaluator,
    ProbingDataset,
    ProbingEvalConfig,
    ProbingEvaluator,
    ProbingSuite,
    WassersteinEvaluator,
    add_probing_evaluators,
    pool_sae_latents,
    probe_f1,
    wasserstein_stats,
)

from .conftest import make_training_sae
from .lm_fixtures import HOOK, SMALL_CORPUS_WARNINGS, TEXTS, make_runner, make_tiny_model

DATA = Path(__file__).parent / "data"
TOPICS = DATA / "topics.csv"
REVIEWS = ProbingDataset(
    "reviews", DATA / "reviews.jsonl", text_column="review", label_column="stars"
)

pytestmark = SMALL_CORPUS_WARNINGS


def small_config(**overrides: Any) -> ProbingEvalConfig:
    fields: dict[str, Any] = {
        "datasets": (str(TOPICS), REVIEWS),
        "n_train": 8,
        "n_test": 4,
        "context_size": 16,
        "progress": False,
    }
    fields.update(overrides)
    return ProbingEvalConfig(**fields)


@pytest.fixture(scope="module")
def model() -> Any:
    return make_tiny_model()


@pytest.fixture
def suite(model: Any) -> ProbingSuite:
    return ProbingSuite(model, HOOK, small_config())


@pytest.fixture
def sae() -> Any:
    return make_training_sae("poly").eval()


# ---- the suite -----------------------------------------------------------------


def test_metric_keys_and_averages(suite: ProbingSuite, sae: Any) -> None:
    results = suite.evaluate(sae)
    assert results.datasets == ["topics", "reviews"]
    assert [(t.dataset, t.positive_class) for t in results.tasks] == [
        ("topics", "animals"),
        ("topics", "food"),
        ("topics", "weather"),
        ("reviews", "1"),
        ("reviews", "5"),
    ]
    probe_names = [f"{m}_{k}" for k in ("k1", "k2", "k5") for m in ("f1", "accuracy")]
    probe_names += [f"model_{m}_{k}" for k in ("k1", "k2", "k5", "all") for m in ("f1", "accuracy")]
    w_names = ["mean", "mean_standardized", "mean_latent_std"]
    medians = ["median", "median_standardized", "median_latent_std"]
    expected = {f"probing/{s}_{n}" for s in ("mean", "merged_mean") for n in probe_names}
    expected |= {f"probing/{d}/{n}" for d in ("topics", "reviews") for n in probe_names}
    expected |= {f"wasserstein/{n}" for n in w_names + medians}
    expected |= {f"wasserstein/{d}/{n}" for d in ("topics", "reviews") for n in w_names + medians}
    metrics = results.metrics()
    assert set(metrics) == expected
    assert all(math.isfinite(v) for v in metrics.values())
    per_task = results.metrics(per_task=True)
    assert set(per_task) - expected == {
        f"{family}/{t.dataset}/{t.positive_class}/{n}"
        for t in results.tasks
        for family, names in (("probing", probe_names), ("wasserstein", w_names))
        for n in names
    }

    # mean over classes, then over datasets
    topics = [t.sae_probes["k2"].f1 for t in results.tasks[:3]]
    reviews = [t.sae_probes["k2"].f1 for t in results.tasks[3:]]
    assert metrics["probing/topics/f1_k2"] == pytest.approx(np.mean(topics))
    assert metrics["probing/mean_f1_k2"] == pytest.approx((np.mean(topics) + np.mean(reviews)) / 2)
    w1 = [t.wasserstein for t in results.tasks]
    assert metrics["wasserstein/mean"] == pytest.approx((np.mean(w1[:3]) + np.mean(w1[3:])) / 2)
    assert 0 <= metrics["probing/mean_f1_k1"] <= 1
    assert metrics["wasserstein/mean"] > 0 and metrics["wasserstein/mean_latent_std"] > 0


def test_task_scores_match_the_core_functions(suite: ProbingSuite, sae: Any) -> None:
    results = suite.evaluate(sae)
    assert suite._prepared is not None
    prepared = suite._prepared[0]
    pooled = pool_sae_latents(sae, prepared.activations)
    raw = prepared.activations.pooled_ND
    for task, result in zip(prepared.tasks.tasks, results.tasks[:3], strict=True):
        train = torch.from_numpy(task.train_index)
        test = torch.from_numpy(task.test_index)
        y_train = torch.from_numpy(task.train_labels)
        y_test = torch.from_numpy(task.test_labels)
        for k in (1, 2, 5):
            expected = probe_f1(pooled[train], y_train, pooled[test], y_test, k)
            assert result.sae_probes[f"k{k}"] == (expected.f1, expected.accuracy)
        dense = probe_f1(raw[train], y_train, raw[test], y_test, None)
        assert result.model_probes["all"] == (dense.f1, dense.accuracy)
        stats = wasserstein_stats(pooled[train], y_train)
        assert result.wasserstein == pytest.approx(stats.distance.mean().item(), rel=1e-12)
        assert result.wasserstein_standardized == pytest.approx(stats.standardized.mean().item())
        assert result.latent_std == pytest.approx(stats.std.mean().item())


def test_activations_are_collected_once_and_results_memoised(suite: ProbingSuite, sae: Any) -> None:
    first = suite.evaluate(sae)
    batches = suite.n_model_batches
    assert (suite.n_collections, suite.n_encodings) == (1, 1)
    assert batches == 2  # one batch of <= 32 texts per dataset
    assert suite.evaluate(sae) is first  # unchanged SAE: memoised
    with torch.no_grad():
        sae.b_enc.add_(0.5)  # an in-place update, like an optimizer step
    second = suite.evaluate(sae)
    assert second is not first and second.metrics() != first.metrics()
    assert (suite.n_collections, suite.n_encodings, suite.n_model_batches) == (1, 2, batches)


def test_activation_scaler_is_applied(suite: ProbingSuite, sae: Any) -> None:
    scaled = suite.evaluate(sae, ActivationScaler(scaling_factor=3.0))
    encode = sae.encode
    sae.encode = lambda x: encode(3.0 * x)
    try:
        manual = ProbingSuite(suite.model, HOOK, suite.config).evaluate(sae)
    finally:
        del sae.encode
    assert scaled.metrics() == pytest.approx(manual.metrics(), rel=1e-6)
    assert scaled.metrics() != pytest.approx(suite.evaluate(sae).metrics(), rel=1e-6)


def test_evaluators_split_the_metrics_and_combine(suite: ProbingSuite, sae: Any) -> None:
    probing = ProbingEvaluator(suite)(sae, None, ActivationScaler())
    wasserstein = WassersteinEvaluator(suite, per_task=True)(sae, None, ActivationScaler())
    assert probing and all(k.startswith("probing/") for k in probing)
    assert wasserstein and all(k.startswith("wasserstein/") for k in wasserstein)
    assert "wasserstein/topics/food/mean" in wasserstein
    assert not any(k.count("/") == 3 for k in probing)  # per-task keys are off by default
    assert suite.n_encodings == 1  # both evaluators share one encoding

    def other(sae: Any, data_provider: Any, scaler: Any) -> dict[str, float]:
        return {"metrics/other": 1.0}

    combined = CombinedEvaluator(other, ProbingEvaluator(suite), WassersteinEvaluator(suite))
    merged = combined(sae, None, ActivationScaler())
    assert merged == {
        "metrics/other": 1.0,
        **probing,
        **{k: wasserstein[k] for k in merged if k.startswith("wasserstein/")},
    }
    with pytest.raises(ValueError, match=r"same metric key\(s\) \['metrics/other'\]"):
        CombinedEvaluator(other, other)(sae, None, ActivationScaler())


def test_in_memory_datasets_and_errors(
    model: Any, sae: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    in_memory = ProbingDataset(
        "memory",
        datasets.Dataset.from_dict({"text": TEXTS[:12], "label": [0, 1, 2] * 4}),
    )
    results = ProbingSuite(model, HOOK, small_config(datasets=(in_memory,))).evaluate(sae)
    assert [t.positive_class for t in results.tasks] == ["0", "1", "2"]

    with pytest.raises(ValueError, match=r"k_values \[64\] are larger than the SAE's d_sae=48"):
        ProbingSuite(model, HOOK, small_config(k_values=(1, 64), model_reference=False)).evaluate(
            sae
        )
    with pytest.raises(
        ValueError, match=r"k_values \[20\] are larger than the model.s dimension 16"
    ):
        ProbingSuite(model, HOOK, small_config(k_values=(20,))).evaluate(sae)

    encode = sae.encode
    monkeypatch.setattr(sae, "encode", lambda x: encode(x) * float("nan"))
    with pytest.raises(ValueError, match=r"latents on dataset 'topics' contains .* NaN"):
        ProbingSuite(model, HOOK, small_config()).evaluate(sae)


def test_suite_for_sae_reads_the_metadata(model: Any, sae: Any) -> None:
    sae.cfg.metadata.hook_name = "blocks.1.hook_resid_post"
    sae.cfg.metadata.prepend_bos = False
    suite = ProbingSuite.for_sae(sae, model, small_config(protocol="native"))
    assert (suite.hook_name, suite.prepend_bos) == ("blocks.1.hook_resid_post", False)
    # SAEBench's tokenization ignores the SAE's BOS setting: the tokenizer decides.
    assert ProbingSuite.for_sae(sae, model, small_config()).prepend_bos is None
    sae.cfg.metadata.hook_name = None
    with pytest.raises(ValueError, match="no hook_name"):
        ProbingSuite.for_sae(sae, model)


# ---- inside a stock training run ----------------------------------------------


@pytest.mark.parametrize("prefetch", [False, True])
def test_logged_at_the_eval_cadence_of_a_stock_runner(
    prefetch: bool, monkeypatch: pytest.MonkeyPatch, restore_signal_handlers: None
) -> None:
    logged: list[tuple[int | None, dict[str, Any]]] = []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: None)
    monkeypatch.setattr(wandb, "finish", lambda *args, **kwargs: None)
    monkeypatch.setattr(
        wandb, "log", lambda data, step=None, **kwargs: logged.append((step, dict(data)))
    )
    collections: list[int] = []
    real_collect = evaluator_module.collect_token_activations

    def counting_collect(model: Any, texts: Any, **kwargs: Any) -> Any:
        collections.append(len(texts))
        return real_collect(model, texts, **kwargs)

    monkeypatch.setattr(evaluator_module, "collect_token_activations", counting_collect)

    runner = make_runner(
        LanguageModelSAETrainingRunner,
        steps=24,
        log_to_wandb=True,
        checkpoint_path=None,
        log_every=4,
        eval_every=2,  # evals after steps 8, 16, 24
        prefetch=prefetch,
    )
    suite = add_probing_evaluators(runner, small_config(datasets=(str(TOPICS),)))  # the one line
    with pytest.raises(ValueError, match="already has the probing / Wasserstein evaluators"):
        add_probing_evaluators(runner)
    runner.run()

    eval_logs = [(step, data) for step, data in logged if "model_performance_preservation" in data]
    assert [step for step, _ in eval_logs] == [7, 15, 23]
    for step, data in logged:
        if "model_performance_preservation" not in data:  # training / sparsity logs
            assert not [k for k in data if k.startswith(("probing/", "wasserstein/"))], step
    for _, data in eval_logs:
        for key in ("probing/mean_f1_k1", "probing/topics/f1_k5", "probing/mean_model_f1_all"):
            assert math.isfinite(data[key]), key
        for key in ("wasserstein/mean", "wasserstein/topics/mean_standardized"):
            assert math.isfinite(data[key]) and data[key] > 0, key
        assert math.isfinite(data["model_performance_preservation"]["ce_loss_with_sae"])
    w1 = [data["wasserstein/mean"] for _, data in eval_logs]
    assert len(set(w1)) == 3  # the SAE trained between evals
    # text activations were collected once, at the first eval; each eval re-encoded
    assert collections == [18]
    assert (suite.n_collections, suite.n_model_batches, suite.n_encodings) == (1, 1, 3)
