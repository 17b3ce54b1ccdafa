"""The k-sparse probe against a direct numpy + sklearn computation, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score

from polysae_lens.evals import probe_f1, top_k_by_mean_difference


def task(seed: int, n_train: int = 200, n_test: int = 80, f: int = 30):
    """Latents where columns 3, 11, 17, 25 carry the label, plus noise columns."""
    gen = torch.Generator().manual_seed(seed)
    n = n_train + n_test
    labels = (torch.rand(n, generator=gen) < 0.5).long()
    latents = torch.rand(n, f, generator=gen) * (torch.rand(n, f, generator=gen) < 0.3)
    signal = torch.tensor([1.5, -1.0, 0.7, 0.4])
    latents[:, [3, 11, 17, 25]] += labels[:, None] * signal + 0.5 * torch.randn(n, 4, generator=gen)
    return latents[:n_train], labels[:n_train], latents[n_train:], labels[n_train:]


def sklearn_reference(train_x, train_y, test_x, test_y, k):
    """The paper's probe written directly: numpy means, argsort, sklearn."""
    x, y = train_x.double().numpy(), train_y.numpy()
    diff = np.abs(x[y == 1].mean(0) - x[y == 0].mean(0))
    chosen = np.argsort(-diff, kind="stable")[:k]
    model = LogisticRegression(C=1.0, max_iter=1000).fit(x[:, chosen], y)
    predicted = model.predict(test_x.double().numpy()[:, chosen])
    return chosen, f1_score(test_y.numpy(), predicted), accuracy_score(test_y.numpy(), predicted)


@pytest.mark.parametrize("k", [1, 2, 5, 30])
def test_matches_direct_sklearn(k: int) -> None:
    train_x, train_y, test_x, test_y = task(seed=k)
    result = probe_f1(train_x, train_y, test_x, test_y, k)
    chosen, f1, accuracy = sklearn_reference(train_x, train_y, test_x, test_y, k)
    assert result.latents == tuple(int(i) for i in chosen)
    assert result.f1 == pytest.approx(f1, abs=1e-12)
    assert result.accuracy == pytest.approx(accuracy, abs=1e-12)
    assert result.converged


def test_selects_the_informative_latents_and_scores_well() -> None:
    train_x, train_y, test_x, test_y = task(seed=0)
    assert set(top_k_by_mean_difference(train_x, train_y, 2).tolist()) == {3, 11}
    result = probe_f1(train_x, train_y, test_x, test_y, 2)
    assert result.f1 > 0.8
    noise = probe_f1(train_x[:, [0, 1]], train_y, test_x[:, [0, 1]], test_y, 2)
    assert noise.f1 < result.f1


def test_dense_probe_uses_every_latent_and_is_deterministic() -> None:
    train_x, train_y, test_x, test_y = task(seed=1)
    dense = probe_f1(train_x, train_y, test_x, test_y, None)
    assert dense.latents == tuple(range(30))
    reference = LogisticRegression(C=1.0, max_iter=1000).fit(train_x.double().numpy(), train_y)
    assert dense.accuracy == pytest.approx(reference.score(test_x.double().numpy(), test_y))
    assert probe_f1(train_x, train_y, test_x, test_y, None, seed=0) == dense


def test_latents_that_require_grad() -> None:
    train_x, train_y, test_x, test_y = task(seed=5)
    expected = probe_f1(train_x, train_y, test_x, test_y, 2)
    train_x.requires_grad_()
    assert probe_f1(train_x, train_y, test_x.requires_grad_(), test_y, 2) == expected


def test_ties_go_to_the_lower_index() -> None:
    latents = torch.zeros(6, 5)
    latents[:3, [1, 3, 4]] = 1.0  # three latents with the same mean difference
    labels = torch.tensor([1, 1, 1, 0, 0, 0])
    assert top_k_by_mean_difference(latents, labels, 2).tolist() == [1, 3]


def test_test_split_may_hold_one_class() -> None:
    train_x, train_y, test_x, _ = task(seed=2)
    result = probe_f1(train_x, train_y, test_x, torch.zeros(len(test_x)), 1)
    assert 0 <= result.accuracy <= 1
    assert result.f1 == 0.0  # no label 1 to find


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"k": 0}, "k=0"),
        ({"k": 31}, "k=31"),
        ({"k": 2.0}, "k=2.0"),
        ({"train_labels": torch.full((200,), 2)}, "binary"),
        ({"train_labels": torch.ones(200)}, "only class 1"),
        ({"test_labels": torch.full((80,), 3)}, "test_labels must be binary"),
        ({"test_labels": torch.zeros(79)}, "test_labels must have shape"),
        ({"test_latents": torch.zeros(80, 29)}, "29 latents"),
        ({"train_latents": torch.zeros(0, 30), "train_labels": torch.zeros(0)}, "empty"),
    ],
)
def test_bad_input_is_named(change: dict, message: str) -> None:
    train_x, train_y, test_x, test_y = task(seed=3)
    args = {
        "train_latents": train_x,
        "train_labels": train_y,
        "test_latents": test_x,
        "test_labels": test_y,
        "k": 2,
    }
    args.update(change)
    with pytest.raises(ValueError, match=message):
        probe_f1(**args)


@pytest.mark.parametrize("split", ["train_latents", "test_latents"])
def test_non_finite_latents_are_named(split: str) -> None:
    train_x, train_y, test_x, test_y = task(seed=4)
    args = {"train_latents": train_x, "test_latents": test_x}
    args[split] = args[split].clone()
    args[split][5, 7] = float("nan")
    with pytest.raises(ValueError, match=rf"{split} contains 1 non-finite .* sample 5, latent 7"):
        probe_f1(args["train_latents"], train_y, args["test_latents"], test_y, 2)
