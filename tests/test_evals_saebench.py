"""``protocol="saebench"``: SAEBench's dataset rules (gender / star balance, the
github-code filter, its negatives), its tokenization (the tokenizer's own call,
BOS / EOS / PAD ids not pooled) and the paper's summaries (median-of-medians W1,
F1 means with the bias_in_bios sets separate and merged).

Datasets come from a fake ``datasets.load_dataset`` returning rows shaped like the
hub datasets (bias_in_bios: ``hard_text``, ``profession``, ``gender``; amazon:
``text``, ``category``, ``rating``; github-code: ``code``, ``language``) with a
skewed natural mix, so that only an explicit balance passes."""

from __future__ import annotations

import argparse
import math
from collections import Counter
from typing import Any

import datasets
import numpy as np
import pytest
import torch

from polysae_lens.evals import (
    EvalResults,
    ProbeScore,
    ProbingEvalConfig,
    ProbingSuite,
    TaskResult,
    build_tasks,
    collect_token_activations,
    load_dataset_texts,
)
from polysae_lens.evals.cli import add_eval_arguments, build_config, format_results_table
from polysae_lens.evals.datasets import AMAZON_CATEGORY_IDS, paper_dataset

from .lm_fixtures import TEXTS, make_tiny_model, make_tokenizer

HOOK = "blocks.0.hook_resid_post"
CONTEXT = 8


def fake_load_dataset(
    monkeypatch: pytest.MonkeyPatch, tables: dict[str, dict[str, list[Any]]]
) -> None:
    """``datasets.load_dataset(path, split=...)`` returns ``tables[path or split]``."""

    def load_dataset(path: str, name: str | None = None, **kwargs: Any) -> Any:
        table = tables.get(f"{path}:{kwargs.get('split')}", tables.get(path))
        assert table is not None, path
        dataset = datasets.Dataset.from_dict(table)
        return dataset.to_iterable_dataset() if kwargs.get("streaming") else dataset

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)


def tasks_of(name: str, protocol: str, n_train: int, n_test: int, seed: int = 0):
    spec = paper_dataset(name)
    needed = (n_train + n_test) // 2
    loaded = load_dataset_texts(spec, needed_per_class=needed, seed=seed, protocol=protocol)
    return build_tasks(loaded, n_train=n_train, n_test=n_test, seed=seed, protocol=protocol)


def positives(tasks: Any, task: Any, split: str) -> list[str]:
    index = getattr(task, f"{split}_index")
    labels = getattr(task, f"{split}_labels")
    return [tasks.texts[i] for i, y in zip(index, labels, strict=True) if y == 1]


# ---- bias_in_bios: gender-balanced professions ----------------------------------------


def bios_table(split: str) -> dict[str, list[Any]]:
    """Three male bios for every female one; profession 3 is in no class set."""
    table: dict[str, list[Any]] = {"hard_text": [], "profession": [], "gender": []}
    for profession in (0, 1, 2, 3, 6, 9):
        for i in range(40):
            gender = 1 if i % 4 == 0 else 0
            table["hard_text"].append(f"bio {split} {i} of profession {profession} g{gender}")
            table["profession"].append(profession)
            table["gender"].append(gender)
    return table


def test_bias_in_bios_positives_are_half_male_per_profession(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tables = {f"LabHC/bias_in_bios:{s}": bios_table(s) for s in ("train", "test")}
    fake_load_dataset(monkeypatch, tables)
    gender_of = {
        text: g
        for t in tables.values()
        for text, g in zip(t["hard_text"], t["gender"], strict=True)
    }
    tasks = tasks_of("bias_in_bios_set1", "saebench", n_train=16, n_test=8)
    assert [t.positive_class for t in tasks.tasks] == ["0", "1", "2", "6", "9"]
    for task in tasks.tasks:
        for split, size in (("train", 8), ("test", 4)):
            genders = Counter(gender_of[text] for text in positives(tasks, task, split))
            assert genders == {0: size // 2, 1: size // 2}, (task.positive_class, split)
            assert all(f" {split} " in text for text in positives(tasks, task, split))
        # SAEBench's negatives: ceil(n / m) offered by each of the m other classes.
        negatives = [tasks.text_classes[i] for i, y in zip(*_train(task), strict=True) if y == 0]
        assert len(negatives) == 8 and task.positive_class not in negatives
        assert max(Counter(negatives).values()) <= math.ceil(8 / 4)

    # The earlier protocol samples the natural (3:1) mix: reachable, not balanced.
    native = tasks_of("bias_in_bios_set1", "native", n_train=16, n_test=8)
    female = [
        sum(gender_of[text] for text in positives(native, task, "train")) for task in native.tasks
    ]
    assert female != [4] * 5


def _train(task: Any) -> tuple[np.ndarray, np.ndarray]:
    return task.train_index, task.train_labels


# ---- amazon_category: star-balanced categories -----------------------------------------


def amazon_table(split: str) -> dict[str, list[Any]]:
    """Four 5-star reviews for every 1-star one, in each category."""
    table: dict[str, list[Any]] = {"text": [], "category": [], "rating": []}
    for category in (
        "Toys_and_Games",
        "Cell_Phones_and_Accessories",
        "Industrial_and_Scientific",
        "Musical_Instruments",
        "Electronics",
        "Books",  # not a chosen category
    ):
        for i in range(30):
            rating = 1.0 if i % 5 == 0 else 5.0
            table["text"].append(f"review {split} {i} in {category} rated {rating}")
            table["category"].append(category)
            table["rating"].append(rating)
    return table


def test_amazon_category_balances_stars_per_category(monkeypatch: pytest.MonkeyPatch) -> None:
    tables = {
        f"canrager/amazon_reviews_mcauley_1and5:{s}": amazon_table(s) for s in ("train", "test")
    }
    fake_load_dataset(monkeypatch, tables)
    rating_of = {
        text: r for t in tables.values() for text, r in zip(t["text"], t["rating"], strict=True)
    }
    category_of = {
        text: c for t in tables.values() for text, c in zip(t["text"], t["category"], strict=True)
    }
    tasks = tasks_of("amazon_category", "saebench", n_train=8, n_test=4)
    assert [t.positive_class for t in tasks.tasks] == ["1", "2", "3", "5", "6"]
    for task in tasks.tasks:
        for split, size in (("train", 4), ("test", 2)):
            texts = positives(tasks, task, split)
            assert {AMAZON_CATEGORY_IDS[category_of[t]] for t in texts} == {
                int(task.positive_class)
            }
            assert Counter(rating_of[t] for t in texts) == {1.0: size // 2, 5.0: size // 2}
    native = tasks_of("amazon_category", "native", n_train=8, n_test=4)
    one_star = [
        sum(rating_of[t] == 1.0 for t in positives(native, task, "train")) for task in native.tasks
    ]
    assert one_star != [2] * 5


# ---- github-code: long files, licence header dropped ------------------------------------


def github_table() -> dict[str, list[Any]]:
    """Per language, files of 300, 534 (the limit: dropped), 535 and 1000 characters."""
    table: dict[str, list[Any]] = {"code": [], "language": []}
    for language in ("C", "Python", "HTML", "Java", "PHP", "Rust"):
        for i in range(32):
            length = (300, 534, 535, 1000)[i % 4]
            head = f"/* licence {language} {i} */".ljust(150, "*")
            body = f"code of {language} file {i} "
            table["code"].append((head + body).ljust(length, "x"))
            table["language"].append(language)
    return table


def test_github_code_keeps_long_files_minus_their_first_150_characters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    table = github_table()
    fake_load_dataset(monkeypatch, {"parquet": table})
    sources = table["code"]
    tasks = tasks_of("github_code", "saebench", n_train=8, n_test=4)
    assert len(tasks.texts) == 5 * 6
    for text in tasks.texts:
        (source,) = [s for s in sources if s[150:] == text]
        assert len(source) > 534
    native = tasks_of("github_code", "native", n_train=8, n_test=4)
    assert set(native.texts) <= set(sources)
    assert min(len(t) for t in native.texts) <= 534  # the earlier protocol keeps short files


# ---- summaries -------------------------------------------------------------------------


def test_wasserstein_median_of_medians_and_both_f1_means() -> None:
    rng = np.random.default_rng(3)
    sizes = {"bias_in_bios_set1": 5, "bias_in_bios_set2": 4, "ag_news": 4, "europarl": 3}
    tasks = []
    w1: dict[str, list[float]] = {}
    f1: dict[str, list[float]] = {}
    for dataset, n in sizes.items():
        w1[dataset] = rng.uniform(0, 1, n).tolist()
        f1[dataset] = rng.uniform(0.5, 1, n).tolist()
        for c in range(n):
            tasks.append(
                TaskResult(
                    dataset=dataset,
                    positive_class=str(c),
                    n_train=8,
                    n_test=4,
                    sae_probes={"k1": ProbeScore(f1[dataset][c], 0.5)},
                    wasserstein=w1[dataset][c],
                    wasserstein_standardized=2 * w1[dataset][c],
                    latent_std=1.0,
                )
            )
    groups = {"bias_in_bios_set1": "bias_in_bios", "bias_in_bios_set2": "bias_in_bios"}
    results = EvalResults(tasks=tuple(tasks), k_values=(1,), dataset_groups=groups)
    metrics = results.metrics()

    per_dataset_median = [np.median(w1[d]) for d in sizes]
    assert metrics["wasserstein/median"] == pytest.approx(np.median(per_dataset_median))
    assert metrics["wasserstein/median_standardized"] == pytest.approx(
        2 * np.median(per_dataset_median)
    )
    assert metrics["wasserstein/ag_news/median"] == pytest.approx(np.median(w1["ag_news"]))
    assert metrics["wasserstein/mean"] == pytest.approx(np.mean([np.mean(w1[d]) for d in sizes]))
    # The paper's F1: 4 datasets here (bios sets separate); merged: 3.
    assert metrics["probing/mean_f1_k1"] == pytest.approx(np.mean([np.mean(f1[d]) for d in sizes]))
    bios = f1["bias_in_bios_set1"] + f1["bias_in_bios_set2"]
    merged = np.mean([np.mean(bios), np.mean(f1["ag_news"]), np.mean(f1["europarl"])])
    assert metrics["probing/merged_mean_f1_k1"] == pytest.approx(merged)
    assert metrics["probing/merged_mean_f1_k1"] != pytest.approx(metrics["probing/mean_f1_k1"])
    summary = results.to_dict()["summary"]
    assert summary["wasserstein_median"]["median"] == metrics["wasserstein/median"]
    table = format_results_table(results).splitlines()
    assert [line.split()[0] for line in table[-3:]] == ["mean", "mean", "median"]


def test_paper_bios_sets_form_one_group() -> None:
    names = ("bias_in_bios_set1", "bias_in_bios_set2", "bias_in_bios_set3", "ag_news")
    suite = ProbingSuite(None, HOOK, ProbingEvalConfig(datasets=names))
    assert suite.dataset_groups == dict.fromkeys(names[:3], "bias_in_bios")


# ---- tokenization and pooled positions ----------------------------------------------------


def gpt2_like_tokenizer() -> Any:
    """Its own call adds no BOS (GPT-2's under transformers 4.x)."""
    tokenizer = make_tokenizer()
    tokenizer.add_bos_token = False
    return tokenizer


@torch.no_grad()
def mean_over_positions(model: Any, ids: list[int], positions: list[int]) -> torch.Tensor:
    _, cache = model.run_with_cache(torch.tensor([ids]), names_filter=[HOOK])
    return cache[HOOK][0, positions].mean(0)


@torch.no_grad()
def test_saebench_tokenization_pools_the_first_token_when_no_bos_is_added() -> None:
    model = make_tiny_model(tokenizer=gpt2_like_tokenizer())
    bos = model.tokenizer.bos_token_id
    texts = TEXTS[:6]
    raw = [model.tokenizer.backend_tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
    saebench = collect_token_activations(
        model, texts, hook_name=HOOK, context_size=CONTEXT, prepend_bos=None, progress=False
    )
    native = collect_token_activations(
        model, texts, hook_name=HOOK, context_size=CONTEXT, prepend_bos=True, progress=False
    )
    for i, ids in enumerate(raw):
        first = ids[:CONTEXT]  # no BOS: position 0 is the first real token, pooled
        expected = mean_over_positions(model, first, list(range(len(first))))
        torch.testing.assert_close(saebench.pooled_ND[i], expected, rtol=1e-5, atol=1e-6)
        with_bos = [bos, *ids[: CONTEXT - 1]]  # BOS at position 0, not pooled
        expected = mean_over_positions(model, with_bos, list(range(1, len(with_bos))))
        torch.testing.assert_close(native.pooled_ND[i], expected, rtol=1e-5, atol=1e-6)
    assert (saebench.offsets.diff() == torch.tensor([min(len(r), CONTEXT) for r in raw])).all()

    # Through the config: "saebench" is the default, "native" keeps BOS.
    config = {"datasets": ("tests/data/topics.csv",), "n_train": 4, "n_test": 2}
    config |= {"context_size": CONTEXT, "progress": False, "model_reference": False}
    for protocol, offset in (("saebench", 0), ("native", 1)):
        suite = ProbingSuite(model, HOOK, ProbingEvalConfig(protocol=protocol, **config))
        suite.prepare()
        assert suite._prepared is not None
        prepared = suite._prepared[0]
        lengths = prepared.activations.offsets.diff().tolist()
        expected_lengths = [
            min(
                len(model.tokenizer.backend_tokenizer.encode(t, add_special_tokens=False).ids),
                CONTEXT - offset,
            )
            for t in prepared.tasks.texts
        ]
        assert lengths == expected_lengths, protocol
    assert ProbingEvalConfig().protocol == "saebench"


@torch.no_grad()
def test_saebench_tokenization_drops_a_bos_the_tokenizer_adds() -> None:
    tokenizer = make_tokenizer()  # its own call adds BOS (Pythia-like)
    model = make_tiny_model(tokenizer=tokenizer)
    bos = tokenizer.bos_token_id
    texts = TEXTS[6:12]
    activations = collect_token_activations(
        model, texts, hook_name=HOOK, context_size=CONTEXT, prepend_bos=None, progress=False
    )
    for i, text in enumerate(texts):
        ids = [bos, *tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids]
        ids = ids[:CONTEXT]
        expected = mean_over_positions(model, ids, list(range(1, len(ids))))
        torch.testing.assert_close(activations.pooled_ND[i], expected, rtol=1e-5, atol=1e-6)


# ---- config and CLI ------------------------------------------------------------------------


def test_protocol_validation_and_cli_flag() -> None:
    with pytest.raises(
        ValueError, match=r"protocol='sae_bench' is not allowed: use one of 'saebench', 'native'"
    ):
        ProbingEvalConfig(protocol="sae_bench")
    with pytest.raises(ValueError, match=r"prepend_bos=True applies to protocol='native' only"):
        ProbingEvalConfig(prepend_bos=True)
    assert ProbingEvalConfig(protocol="native", prepend_bos=False).to_dict()["protocol"] == "native"

    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    assert build_config(parser.parse_args(["--sae", "x"])).protocol == "saebench"
    args = parser.parse_args(["--sae", "x", "--protocol", "native"])
    assert build_config(args).protocol == "native"
