"""The paper's evaluations: sparse-probing F1 and class-conditional Wasserstein distance.

Core computations (pure functions on tensors):

- :func:`wasserstein_per_latent` ``(latents, labels) -> [n_latents]``: exact 1-D
  W1 between the label-1 and label-0 samples of every latent;
  :func:`standardized_wasserstein_per_latent` divides it by the latent's standard
  deviation over both classes (scale-free); :func:`wasserstein_stats` gives both.
- :func:`probe_f1` ``(train_latents, train_labels, test_latents, test_labels, k)
  -> ProbeResult``: the paper's k-sparse logistic-regression probe.

The protocol (balanced one-vs-rest tasks per dataset and class, mean-pooled
latents over non-special tokens, a model-activation reference probe; SAEBench's
dataset rules and tokenization by default, see :mod:`polysae_lens.evals.saebench`
and ``ProbingEvalConfig.protocol``) runs in a
:class:`ProbingSuite`, used by

- SAETrainer evaluators :class:`ProbingEvaluator` and :class:`WassersteinEvaluator`
  (and :func:`add_probing_evaluators` for a stock
  ``LanguageModelSAETrainingRunner``, which also runs them with wandb off and
  writes ``evals.jsonl``: :mod:`polysae_lens.evals.during_training`), and
- the standalone evaluation :func:`polysae_lens.evals.cli.run_standalone_eval`
  (``python -m polysae_lens eval``).

Metric keys are documented in :mod:`polysae_lens.evals.results`.
"""

from polysae_lens.evals.activations import (
    TokenActivations,
    collect_token_activations,
    pool_sae_latents,
)
from polysae_lens.evals.config import ProbingEvalConfig
from polysae_lens.evals.datasets import (
    PAPER_DATASET_NAMES,
    PAPER_DATASETS,
    BinaryTask,
    DatasetTasks,
    LoadedDataset,
    ProbingDataset,
    ProbingDatasetError,
    build_tasks,
    load_dataset_texts,
)
from polysae_lens.evals.evaluator import (
    CombinedEvaluator,
    ProbingEvaluator,
    ProbingSuite,
    WassersteinEvaluator,
    add_probing_evaluators,
)
from polysae_lens.evals.probing import ProbeResult, probe_f1, top_k_by_mean_difference
from polysae_lens.evals.results import EvalResults, ProbeScore, TaskResult
from polysae_lens.evals.saebench import PROTOCOLS, SAEBenchRules
from polysae_lens.evals.wasserstein import (
    WassersteinStats,
    standardized_wasserstein_per_latent,
    wasserstein_per_latent,
    wasserstein_stats,
)

__all__ = [
    "PAPER_DATASETS",
    "PAPER_DATASET_NAMES",
    "PROTOCOLS",
    "BinaryTask",
    "CombinedEvaluator",
    "DatasetTasks",
    "EvalResults",
    "LoadedDataset",
    "ProbeResult",
    "ProbeScore",
    "ProbingDataset",
    "ProbingDatasetError",
    "ProbingEvalConfig",
    "ProbingEvaluator",
    "ProbingSuite",
    "SAEBenchRules",
    "TaskResult",
    "TokenActivations",
    "WassersteinEvaluator",
    "WassersteinStats",
    "add_probing_evaluators",
    "build_tasks",
    "collect_token_activations",
    "load_dataset_texts",
    "pool_sae_latents",
    "probe_f1",
    "standardized_wasserstein_per_latent",
    "top_k_by_mean_difference",
    "wasserstein_per_latent",
    "wasserstein_stats",
]
