"""Probing-F1 and Wasserstein evaluators for SAELens's training loop.

SAETrainer calls its evaluator as ``evaluator(sae, data_provider,
activation_scaler) -> dict`` every ``wandb_log_frequency * eval_every_n_wandb_logs``
steps and logs the dict to wandb (only when logging to wandb; see below).
:class:`ProbingEvaluator` and
:class:`WassersteinEvaluator` have that signature; :class:`CombinedEvaluator`
merges several (for example with the runner's own ``LLMSaeEvaluator``). One line
adds both to a stock runner::

    runner = LanguageModelSAETrainingRunner(cfg)
    polysae_lens.evals.add_probing_evaluators(runner, ProbingEvalConfig(n_train=1000, n_test=500))
    runner.run()   # logs probing/... and wasserstein/... at the eval cadence

Both evaluators share one :class:`ProbingSuite`. Building an evaluator loads
and checks the suite's datasets (:meth:`ProbingSuite.load_datasets`), so a
dataset that cannot work (unreachable, a missing column, a single class) raises
:class:`~polysae_lens.evals.datasets.ProbingDatasetError` before training, not
at the first eval step. The model's activations of every text are collected once,
at the first evaluation (or at :meth:`ProbingSuite.prepare`); each evaluation only
re-encodes the cached activations with the current SAE. The two evaluators of one
eval step share a single encoding: results are memoised on the SAE's parameter
versions.

With ``log_to_wandb=False`` SAELens never calls its evaluator;
:func:`add_probing_evaluators` makes the runner call it at the same cadence and
record every result (console and ``evals.jsonl``, see
:mod:`polysae_lens.evals.during_training`).

Metric keys: see :mod:`polysae_lens.evals.results`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from datasets.exceptions import DatasetsError
from torch import Tensor

from polysae_lens.evals._checks import check_all_finite
from polysae_lens.evals.activations import (
    TokenActivations,
    collect_token_activations,
    pool_sae_latents,
)
from polysae_lens.evals.config import ProbingEvalConfig
from polysae_lens.evals.datasets import (
    BinaryTask,
    DatasetTasks,
    ProbingDatasetError,
    build_tasks,
    load_dataset_texts,
)
from polysae_lens.evals.during_training import install_on_runner
from polysae_lens.evals.probing import (
    ProbeResult,
    fit_probe,
    mean_difference_ranking,
    single_threaded_blas,
)
from polysae_lens.evals.results import EvalResults, ProbeScore, TaskResult
from polysae_lens.evals.wasserstein import wasserstein_stats

if TYPE_CHECKING:
    from sae_lens.llm_sae_training_runner import LanguageModelSAETrainingRunner

logger = logging.getLogger(__name__)

__all__ = [
    "CombinedEvaluator",
    "ProbingEvaluator",
    "ProbingSuite",
    "WassersteinEvaluator",
    "add_probing_evaluators",
]


@dataclass
class _PreparedDataset:
    tasks: DatasetTasks
    activations: TokenActivations
    model_probes: dict[str, dict[str, ProbeScore]]
    """positive class -> {"k1": ..., "all": ...} (empty without the reference)."""


class ProbingSuite:
    """The tasks, cached model activations and scoring shared by the evaluators.

    Args:
        model: the TransformerLens model (``HookedRootModule`` with a tokenizer).
        hook_name: the SAE's hook point.
        config: protocol settings (paper defaults).
        hook_head_index: the SAE's head index for per-head hooks.
        prepend_bos: prepend BOS to each text under ``protocol="native"``
            (``config.prepend_bos`` wins if set); unused under ``"saebench"``, where
            the tokenizer's own call decides.
        model_kwargs: extra ``run_with_cache`` keyword arguments.

    Attributes:
        n_collections: how many times activations were collected (1 after the
            first evaluation, and it stays 1).
        n_model_batches: model forward passes made by the suite.
        n_encodings: SAE encodings of the cached activations (one per distinct
            SAE state evaluated).
        dataset_groups: dataset name -> ``ProbingDataset.group`` (the merged
            averages of :class:`EvalResults`).
    """

    def __init__(
        self,
        model: Any,
        hook_name: str,
        config: ProbingEvalConfig | None = None,
        *,
        hook_head_index: int | None = None,
        prepend_bos: bool = True,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.hook_name = hook_name
        self.config = config if config is not None else ProbingEvalConfig()
        self.hook_head_index = hook_head_index
        # None: the tokenizer's own call (SAEBench's tokenization).
        self.prepend_bos: bool | None = None
        if self.config.protocol == "native":
            self.prepend_bos = (
                self.config.prepend_bos if self.config.prepend_bos is not None else prepend_bos
            )
        self.model_kwargs = dict(model_kwargs or {})
        self.n_collections = 0
        self.n_model_batches = 0
        self.n_encodings = 0
        self._tasks: list[DatasetTasks] | None = None
        self._prepared: list[_PreparedDataset] | None = None
        self._memo: tuple[tuple[Any, ...], EvalResults] | None = None
        # Fail on a bad dataset entry now rather than at the first eval, hours in.
        self.dataset_groups = {
            spec.name: spec.group for spec in self.config.resolved_datasets() if spec.group
        }

    @classmethod
    def from_runner(
        cls, runner: LanguageModelSAETrainingRunner, config: ProbingEvalConfig | None = None
    ) -> ProbingSuite:
        """A suite on a ``LanguageModelSAETrainingRunner``'s model and hook."""
        cfg = runner.cfg
        return cls(
            runner.model,
            cfg.hook_name,
            config,
            hook_head_index=cfg.hook_head_index,
            prepend_bos=cfg.prepend_bos,
            model_kwargs=cfg.model_kwargs,
        )

    @classmethod
    def for_sae(cls, sae: Any, model: Any, config: ProbingEvalConfig | None = None) -> ProbingSuite:
        """A suite at the hook recorded in ``sae.cfg.metadata``."""
        metadata = sae.cfg.metadata
        if not getattr(metadata, "hook_name", None):
            raise ValueError(
                "the SAE's metadata has no hook_name: build ProbingSuite(model, hook_name, ...) "
                "with the hook it was trained on."
            )
        prepend_bos = getattr(metadata, "prepend_bos", None)
        return cls(
            model,
            metadata.hook_name,
            config,
            hook_head_index=getattr(metadata, "hook_head_index", None),
            prepend_bos=True if prepend_bos is None else bool(prepend_bos),
            model_kwargs=getattr(metadata, "model_kwargs", None) or None,
        )

    # ---- preparation (once) --------------------------------------------------

    def load_datasets(self) -> list[DatasetTasks]:
        """Load and check every dataset and build its tasks; no model call. Does
        the work once (the evaluators call it when they are built, so that a bad
        dataset fails before training); later calls return the same tasks.

        Raises:
            ProbingDatasetError: a dataset that cannot be read or reached, lacks
                the text or label column, has fewer than two classes or too few
                texts for ``n_train`` / ``n_test``. The message names the dataset
                and the fix.
        """
        if self._tasks is not None:
            return self._tasks
        cfg = self.config
        all_tasks = []
        for spec in cfg.resolved_datasets():
            try:
                loaded = load_dataset_texts(
                    spec,
                    needed_per_class=(cfg.n_train + cfg.n_test) // 2,
                    seed=cfg.seed,
                    protocol=cfg.protocol,
                )
                tasks = build_tasks(
                    loaded,
                    n_train=cfg.n_train,
                    n_test=cfg.n_test,
                    seed=cfg.seed,
                    protocol=cfg.protocol,
                )
            except ProbingDatasetError:
                raise
            except ValueError as e:
                # The loaders' messages already name the dataset, the problem and the fix.
                raise ProbingDatasetError(str(e)) from e
            except (OSError, DatasetsError) as e:
                # Hub datasets: no network, an unknown id, offline mode without a cache.
                raise ProbingDatasetError(
                    f"dataset {spec.name!r}: cannot load {spec.describe_source()!r}: {e}. "
                    "Check the dataset id and the network (or set HF_DATASETS_OFFLINE=1 "
                    "with a cached copy), or use a local file."
                ) from e
            all_tasks.append(tasks)
        self._tasks = all_tasks
        return all_tasks

    @torch.no_grad()
    def prepare(self, data_provider: Any = None) -> None:
        """Load the datasets (:meth:`load_datasets`), collect activations and fit
        the model-reference probes. Does nothing after the first call.

        ``data_provider``: the trainer's data provider; a prefetching one is paused
        while the suite runs the model (the prefetch thread runs it too).
        """
        if self._prepared is not None:
            return
        cfg = self.config
        # Every dataset is loaded before any model call: a dataset that fails to
        # load (bad column, no network) fails before minutes of collection.
        all_tasks = self.load_datasets()
        prepared = []
        with _paused(data_provider):
            for tasks in all_tasks:
                activations = collect_token_activations(
                    self.model,
                    tasks.texts,
                    hook_name=self.hook_name,
                    context_size=cfg.context_size,
                    prepend_bos=self.prepend_bos,
                    hook_head_index=self.hook_head_index,
                    batch_size=cfg.llm_batch_size,
                    model_kwargs=self.model_kwargs,
                    cache_dtype=cfg.torch_cache_dtype,
                    cache_dir=cfg.cache_dir,
                    progress=cfg.progress,
                    desc=f"Collecting activations ({tasks.name})",
                    on_batch=self._count_batch,
                )
                model_probes = {}
                if cfg.model_reference:
                    with single_threaded_blas():
                        model_probes = self._model_probes(tasks, activations)
                prepared.append(_PreparedDataset(tasks, activations, model_probes))
        self.n_collections += 1
        self._prepared = prepared

    def _count_batch(self) -> None:
        self.n_model_batches += 1

    def _model_probes(
        self, tasks: DatasetTasks, activations: TokenActivations
    ) -> dict[str, dict[str, ProbeScore]]:
        pooled_FN = activations.pooled_ND.T.contiguous()
        d_model = pooled_FN.shape[0]
        too_large = [k for k in self.config.k_values if k > d_model]
        if too_large:
            raise ValueError(
                f"k_values {too_large} are larger than the model's dimension {d_model} at "
                f"{self.hook_name!r}: lower k_values or set model_reference=False."
            )
        results: dict[str, dict[str, ProbeScore]] = {}
        for task in tasks.tasks:
            split = _TaskSplit.of(pooled_FN, task)
            ranking_F = mean_difference_ranking(split.train_NF, split.train_pos_N)
            scores = {}
            for k in [*self.config.k_values, None]:
                probe = split.fit(k, self.config.seed, ranking_F)
                scores["all" if k is None else f"k{k}"] = ProbeScore(probe.f1, probe.accuracy)
            results[task.positive_class] = scores
        return results

    # ---- evaluation (every eval) ---------------------------------------------

    @torch.no_grad()
    def evaluate(
        self, sae: Any, activation_scaler: Any = None, data_provider: Any = None
    ) -> EvalResults:
        """Scores of ``sae`` on every task (see :class:`EvalResults`).

        ``activation_scaler`` (SAETrainer's) is applied before encoding. The SAE
        is used in its current train/eval mode (SAETrainer puts it in eval mode).
        Repeated calls with an unchanged SAE return the memoised result.

        Raises:
            ValueError: a dataset problem (:class:`ProbingDatasetError`, at the
                first call unless an evaluator or :meth:`load_datasets` checked
                them already), a k larger than d_sae, or NaN / inf latents.
        """
        self.prepare(data_provider)
        assert self._prepared is not None
        fingerprint = _fingerprint(sae, activation_scaler)
        if self._memo is not None and self._memo[0] == fingerprint:
            return self._memo[1]
        d_sae = int(sae.cfg.d_sae)
        too_large = [k for k in self.config.k_values if k > d_sae]
        if too_large:
            raise ValueError(
                f"k_values {too_large} are larger than the SAE's d_sae={d_sae}: a probe "
                "cannot select more latents than there are."
            )
        # CUDA keeps the pooled latents (and the Wasserstein sorts) on the GPU;
        # elsewhere they live on CPU, where the float64 ops they need exist.
        sae_device = torch.device(getattr(sae, "device", "cpu"))
        device = sae_device if sae_device.type == "cuda" else torch.device("cpu")
        start = time.perf_counter()
        results = []
        for dataset in self._prepared:
            pooled_FN = pool_sae_latents(
                sae,
                dataset.activations,
                activation_scaler=activation_scaler,
                batch_size_tokens=self.config.sae_batch_size_tokens,
                device=device,
                latent_major=True,
            )
            check_all_finite(pooled_FN.T, f"the SAE's latents on dataset {dataset.tasks.name!r}")
            with single_threaded_blas():
                for task in dataset.tasks.tasks:
                    results.append(self._score_task(pooled_FN, task, dataset))
        self.n_encodings += 1
        evaluation = EvalResults(
            tasks=tuple(results),
            k_values=self.config.k_values,
            dataset_groups=dict(self.dataset_groups),
        )
        logger.info(
            "probing / Wasserstein evaluation of %d task(s) took %.1f s",
            len(results),
            time.perf_counter() - start,
        )
        # Fingerprint again: only memoise a state that did not change meanwhile.
        self._memo = (_fingerprint(sae, activation_scaler), evaluation)
        return evaluation

    def _score_task(
        self, pooled_FN: Tensor, task: BinaryTask, dataset: _PreparedDataset
    ) -> TaskResult:
        split = _TaskSplit.of(pooled_FN, task)
        ranking_F = mean_difference_ranking(split.train_NF, split.train_pos_N)
        sae_probes = {}
        unconverged = 0
        for k in self.config.k_values:
            probe = split.fit(k, self.config.seed, ranking_F)
            sae_probes[f"k{k}"] = ProbeScore(probe.f1, probe.accuracy)
            unconverged += not probe.converged
        # A column-major view of latent-major storage: read without a transposed copy.
        stats = wasserstein_stats(split.train_NF, split.train_pos_N)
        return TaskResult(
            dataset=task.dataset,
            positive_class=task.positive_class,
            n_train=len(task.train_index),
            n_test=len(task.test_index),
            sae_probes=sae_probes,
            model_probes=dataset.model_probes.get(task.positive_class, {}),
            wasserstein=float(stats.distance.mean()),
            wasserstein_standardized=float(stats.standardized.mean()),
            latent_std=float(stats.std.mean()),
            unconverged_probes=unconverged,
        )


@dataclass
class _TaskSplit:
    """One task's train and test rows of a dataset's pooled values."""

    train_NF: Tensor
    train_pos_N: Tensor
    test_NF: Tensor
    test_pos_N: Tensor

    @classmethod
    def of(cls, pooled_FN: Tensor, task: BinaryTask) -> _TaskSplit:
        """From latent-major [F, N] storage; the splits are [n, F] views of
        latent-major copies."""
        device = pooled_FN.device
        train = torch.from_numpy(task.train_index).to(device)
        test = torch.from_numpy(task.test_index).to(device)
        return cls(
            train_NF=pooled_FN.index_select(1, train).T,
            train_pos_N=torch.from_numpy(task.train_labels == 1).to(device),
            test_NF=pooled_FN.index_select(1, test).T,
            test_pos_N=torch.from_numpy(task.test_labels == 1).to(device),
        )

    def fit(self, k: int | None, seed: int, ranking_F: Tensor | None = None) -> ProbeResult:
        return fit_probe(
            self.train_NF,
            self.train_pos_N,
            self.test_NF,
            self.test_pos_N,
            k,
            seed=seed,
            ranking_F=ranking_F,
        )


class _SuiteEvaluator:
    """An SAETrainer evaluator returning one family of a suite's metrics.

    Building one loads and checks the suite's datasets (raises
    :class:`~polysae_lens.evals.datasets.ProbingDatasetError`): an evaluator is
    built before training, its first call comes an eval cadence into it.
    """

    metrics_method: ClassVar[str]

    def __init__(self, suite: ProbingSuite, *, per_task: bool | None = None) -> None:
        self.suite = suite
        self.per_task = suite.config.per_task_metrics if per_task is None else per_task
        suite.load_datasets()

    def __call__(
        self, sae: Any, data_provider: Any = None, activation_scaler: Any = None
    ) -> dict[str, Any]:
        results = self.suite.evaluate(sae, activation_scaler, data_provider)
        metrics: dict[str, Any] = getattr(results, self.metrics_method)(per_task=self.per_task)
        return metrics


class ProbingEvaluator(_SuiteEvaluator):
    """SAETrainer evaluator returning the ``probing/...`` metrics of a suite."""

    metrics_method = "probing_metrics"


class WassersteinEvaluator(_SuiteEvaluator):
    """SAETrainer evaluator returning the ``wasserstein/...`` metrics of a suite."""

    metrics_method = "wasserstein_metrics"


class CombinedEvaluator:
    """Runs several SAETrainer evaluators and merges their dicts.

    A key returned by two evaluators raises ``ValueError`` rather than silently
    dropping one of the values.
    """

    def __init__(self, *evaluators: Any) -> None:
        self.evaluators = [e for e in evaluators if e is not None]

    def __call__(self, sae: Any, data_provider: Any, activation_scaler: Any) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for evaluator in self.evaluators:
            metrics = evaluator(sae, data_provider, activation_scaler)
            clash = merged.keys() & metrics.keys()
            if clash:
                raise ValueError(
                    f"evaluators return the same metric key(s) {sorted(clash)[:5]}; "
                    "each key must come from one evaluator."
                )
            merged.update(metrics)
        return merged


def add_probing_evaluators(
    runner: LanguageModelSAETrainingRunner, config: ProbingEvalConfig | None = None
) -> ProbingSuite:
    """Make a ``LanguageModelSAETrainingRunner`` (stock or a subclass) also evaluate
    ``probing/...`` and ``wasserstein/...`` at its eval cadence (call before
    ``runner.run()``).

    Loads and checks the datasets now (raises
    :class:`~polysae_lens.evals.datasets.ProbingDatasetError` before any training).
    The runner's own evaluator is kept and runs first. Every evaluation is logged
    to the console and appended to ``evals.jsonl`` beside the checkpoints, and
    runs with ``log_to_wandb=False`` too (see
    :mod:`polysae_lens.evals.during_training`). Returns the shared
    :class:`ProbingSuite` (e.g. to inspect ``n_collections``).
    """
    existing = runner.evaluator
    if isinstance(existing, CombinedEvaluator) and any(
        isinstance(e, (ProbingEvaluator, WassersteinEvaluator)) for e in existing.evaluators
    ):
        raise ValueError(
            "this runner already has the probing / Wasserstein evaluators: call "
            "add_probing_evaluators once per runner."
        )
    suite = ProbingSuite.from_runner(runner, config)
    combined = CombinedEvaluator(
        runner.evaluator, ProbingEvaluator(suite), WassersteinEvaluator(suite)
    )
    # The runner hands `evaluator` to SAETrainer, which accepts any callable with
    # the evaluator signature; the attribute is annotated with the LLM one only.
    runner.evaluator = combined  # type: ignore[assignment]
    install_on_runner(runner)
    return suite


def _fingerprint(sae: Any, activation_scaler: Any) -> tuple[Any, ...]:
    """Identifies an SAE state: in-place updates (optimizer steps, retractions,
    loads) bump a tensor's version counter."""
    tensors = [*sae.parameters(), *sae.buffers()]
    scaler_state: tuple[Any, ...] = ()
    if activation_scaler is not None:
        # By value: the trainer passes the same scaler each time, a caller may not.
        scaler_state = (
            getattr(activation_scaler, "scaling_factor", None),
            id(getattr(activation_scaler, "whitening", None)),
        )
    return (
        id(sae),
        bool(getattr(sae, "training", False)),
        tuple((t.data_ptr(), t._version) for t in tensors),
        scaler_state,
    )


@contextlib.contextmanager
def _paused(data_provider: Any) -> Iterator[None]:
    """Pause SAELens's prefetching data provider, whose thread also runs the model
    (two concurrent hooked forward passes would see each other's hooks)."""
    paused = getattr(data_provider, "paused", None)
    if data_provider is None or paused is None:
        yield
        return
    with paused():
        yield
