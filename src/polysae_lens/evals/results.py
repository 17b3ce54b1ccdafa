"""Results of a probing / Wasserstein evaluation, and their flat metric keys.

Summaries, and which one the paper reports (method-notes, "Facts measured by
running SAEBench 0.6.0's sparse probing"):

- Probing F1: the mean over a dataset's classes (tasks), then the mean over
  datasets, the three bias_in_bios sets counted as three datasets
  (``probing/mean_...``): **the paper's F1** (8 datasets). A per-dataset panel
  merges the bios sets into one dataset (mean over its 15 classes), then
  averages over the 6 datasets: ``probing/merged_mean_...`` (datasets merge by
  ``ProbingDataset.group``).
- Wasserstein: the median over a dataset's classes, then the median over
  datasets (``wasserstein/median``): **the paper's Table 1 value**. The means
  (``wasserstein/mean``) are kept beside it. Each task's value is W1 averaged
  over all d_sae latents in both.

Metric keys (the evaluators log them; ``{k}`` is each of ``k_values``):

``probing/mean_f1_k{k}``, ``probing/mean_accuracy_k{k}``
    SAE k-sparse probe, averaged over classes, then datasets.
``probing/mean_model_f1_k{k}``, ``probing/mean_model_f1_all`` (and ``accuracy``)
    The same probe on the model's mean-pooled activations at the SAE's hook
    (k dimensions, or all of them): the reference rows.
``probing/{dataset}/f1_k{k}``, ``probing/{dataset}/model_f1_k{k}``, ...
    Per dataset (mean over its classes).
``probing/{dataset}/{class}/f1_k{k}``, ...
    Per task (only with ``per_task=True``).
``probing/merged_mean_f1_k{k}``, ``probing/merged_mean_model_f1_all``, ...
    As ``probing/mean_...`` but datasets of one group (the bias_in_bios sets)
    merged into one before the mean over datasets.
``wasserstein/mean``
    W1 between the label-1 and label-0 pooled latents of each task (train split),
    averaged over all d_sae latents (dead latents count 0), then classes, then
    datasets.
``wasserstein/mean_standardized``
    The same with each latent's W1 divided by its standard deviation over both
    classes (scale-free; dead and constant latents count 0).
``wasserstein/mean_latent_std``
    The mean over latents of that standard deviation: the scale W1 was measured at.
``wasserstein/median``, ``wasserstein/median_standardized``, ``wasserstein/median_latent_std``
    The same per-task values, median over classes, then median over datasets
    (the paper's Table 1 summary).
``wasserstein/{dataset}/mean``, ``.../mean_standardized``, ``.../mean_latent_std``
    Per dataset (mean over classes); ``wasserstein/{dataset}/median``, ... the
    median over classes; ``wasserstein/{dataset}/{class}/...`` per task
    (``per_task=True``).

Class names in keys have ``/`` replaced by ``_``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

__all__ = ["EvalResults", "ProbeScore", "TaskResult"]


class ProbeScore(NamedTuple):
    """Test-split scores of one probe."""

    f1: float
    accuracy: float


@dataclass(frozen=True)
class TaskResult:
    """Every score of one balanced one-vs-rest task."""

    dataset: str
    positive_class: str
    n_train: int
    n_test: int
    sae_probes: Mapping[str, ProbeScore] = field(default_factory=dict)
    """``"k1"``, ``"k2"``, ... -> scores of the SAE k-sparse probes."""
    model_probes: Mapping[str, ProbeScore] = field(default_factory=dict)
    """``"k1"``, ..., ``"all"`` -> scores of the probes on raw model activations
    (empty without the model reference)."""
    wasserstein: float = math.nan
    """Mean over all latents of W1 (train split)."""
    wasserstein_standardized: float = math.nan
    """Mean over all latents of W1 / std."""
    latent_std: float = math.nan
    """Mean over all latents of the pooled standard deviation."""
    unconverged_probes: int = 0
    """Probes whose lbfgs hit max_iter (their scores are still reported)."""

    def probing_values(self) -> dict[str, float]:
        """Flat probing scores of this task: ``f1_k1``, ``model_accuracy_all``, ..."""
        values = {}
        for prefix, probes in (("", self.sae_probes), ("model_", self.model_probes)):
            for name, score in probes.items():
                values[f"{prefix}f1_{name}"] = score.f1
                values[f"{prefix}accuracy_{name}"] = score.accuracy
        return values

    def wasserstein_values(self) -> dict[str, float]:
        return {
            "mean": self.wasserstein,
            "mean_standardized": self.wasserstein_standardized,
            "mean_latent_std": self.latent_std,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "class": self.positive_class,
            "n_train": self.n_train,
            "n_test": self.n_test,
            "probing": self.probing_values(),
            "wasserstein": self.wasserstein_values(),
            "unconverged_probes": self.unconverged_probes,
        }


@dataclass(frozen=True)
class EvalResults:
    """All task results of one evaluation of one SAE."""

    tasks: tuple[TaskResult, ...]
    k_values: tuple[int, ...]
    dataset_groups: Mapping[str, str] = field(default_factory=dict)
    """Dataset name -> group for the merged averages; a dataset not listed is
    its own group."""

    @property
    def datasets(self) -> list[str]:
        """Dataset names, in evaluation order."""
        return list(dict.fromkeys(task.dataset for task in self.tasks))

    def dataset_tasks(self, dataset: str) -> list[TaskResult]:
        return [task for task in self.tasks if task.dataset == dataset]

    def dataset_probing(self, dataset: str) -> dict[str, float]:
        """Mean over the dataset's classes of each probing score."""
        return _mean_dicts(task.probing_values() for task in self.dataset_tasks(dataset))

    def dataset_wasserstein(self, dataset: str) -> dict[str, float]:
        return _mean_dicts(task.wasserstein_values() for task in self.dataset_tasks(dataset))

    def dataset_wasserstein_median(self, dataset: str) -> dict[str, float]:
        """Median over the dataset's classes (keys ``median``, ``median_standardized``,
        ``median_latent_std``)."""
        medians = _median_dicts(task.wasserstein_values() for task in self.dataset_tasks(dataset))
        return {_median_key(k): v for k, v in medians.items()}

    def probing_summary(self) -> dict[str, float]:
        """Mean over datasets of :meth:`dataset_probing` (the paper's F1)."""
        return _mean_dicts(self.dataset_probing(d) for d in self.datasets)

    @property
    def groups(self) -> list[str]:
        """Dataset groups, in evaluation order."""
        return list(dict.fromkeys(self.dataset_groups.get(d, d) for d in self.datasets))

    def merged_probing_summary(self) -> dict[str, float]:
        """Mean over groups of the mean over each group's classes (the bias_in_bios
        sets merged into one dataset)."""
        per_group = (
            _mean_dicts(
                task.probing_values()
                for task in self.tasks
                if self.dataset_groups.get(task.dataset, task.dataset) == group
            )
            for group in self.groups
        )
        return _mean_dicts(per_group)

    def wasserstein_summary(self) -> dict[str, float]:
        """Mean over datasets of :meth:`dataset_wasserstein`."""
        return _mean_dicts(self.dataset_wasserstein(d) for d in self.datasets)

    def wasserstein_median_summary(self) -> dict[str, float]:
        """Median over datasets of :meth:`dataset_wasserstein_median` (the paper's
        Table 1 value)."""
        return _median_dicts(self.dataset_wasserstein_median(d) for d in self.datasets)

    def probing_metrics(self, per_task: bool = False) -> dict[str, float]:
        """Flat ``probing/...`` metrics (see the module docstring)."""
        metrics = {f"probing/mean_{k}": v for k, v in self.probing_summary().items()}
        for name, value in self.merged_probing_summary().items():
            metrics[f"probing/merged_mean_{name}"] = value
        for dataset in self.datasets:
            for name, value in self.dataset_probing(dataset).items():
                metrics[f"probing/{dataset}/{name}"] = value
            if per_task:
                for task in self.dataset_tasks(dataset):
                    cls = _key_part(task.positive_class)
                    for name, value in task.probing_values().items():
                        metrics[f"probing/{dataset}/{cls}/{name}"] = value
        return metrics

    def wasserstein_metrics(self, per_task: bool = False) -> dict[str, float]:
        """Flat ``wasserstein/...`` metrics (see the module docstring)."""
        metrics = {f"wasserstein/{k}": v for k, v in self.wasserstein_summary().items()}
        for name, value in self.wasserstein_median_summary().items():
            metrics[f"wasserstein/{name}"] = value
        for dataset in self.datasets:
            for name, value in self.dataset_wasserstein(dataset).items():
                metrics[f"wasserstein/{dataset}/{name}"] = value
            for name, value in self.dataset_wasserstein_median(dataset).items():
                metrics[f"wasserstein/{dataset}/{name}"] = value
            if per_task:
                for task in self.dataset_tasks(dataset):
                    cls = _key_part(task.positive_class)
                    for name, value in task.wasserstein_values().items():
                        metrics[f"wasserstein/{dataset}/{cls}/{name}"] = value
        return metrics

    def metrics(self, per_task: bool = False) -> dict[str, float]:
        return {**self.probing_metrics(per_task), **self.wasserstein_metrics(per_task)}

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: summary, per-dataset means and every task."""
        return {
            "k_values": list(self.k_values),
            "summary": {
                "probing": self.probing_summary(),
                "probing_merged": self.merged_probing_summary(),
                "wasserstein": self.wasserstein_summary(),
                "wasserstein_median": self.wasserstein_median_summary(),
            },
            "dataset_groups": dict(self.dataset_groups),
            "datasets": {
                d: {
                    "n_tasks": len(self.dataset_tasks(d)),
                    "probing": self.dataset_probing(d),
                    "wasserstein": self.dataset_wasserstein(d),
                    "wasserstein_median": self.dataset_wasserstein_median(d),
                }
                for d in self.datasets
            },
            "tasks": [task.to_dict() for task in self.tasks],
        }


def _mean_dicts(dicts: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Key-wise mean (keys in first-seen order)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for values in dicts:
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + value
            counts[key] = counts.get(key, 0) + 1
    return {key: sums[key] / counts[key] for key in sums}


def _median_dicts(dicts: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Key-wise median (keys in first-seen order; the mean of the two middle values
    for an even count)."""
    columns: dict[str, list[float]] = {}
    for values in dicts:
        for key, value in values.items():
            columns.setdefault(key, []).append(value)
    return {key: statistics.median(column) for key, column in columns.items()}


def _median_key(name: str) -> str:
    """``mean`` -> ``median``, ``mean_standardized`` -> ``median_standardized``."""
    return "median" + name.removeprefix("mean")


def _key_part(name: str) -> str:
    return name.replace("/", "_")
