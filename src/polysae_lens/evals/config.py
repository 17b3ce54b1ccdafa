"""Configuration of the probing and Wasserstein evaluations.

Defaults follow the paper (method-notes, "Paper evaluation"): SAEBench's
sparse-probing datasets, balanced one-vs-rest tasks of 4000 train / 1000 test
texts, context 128, k in (1, 2, 5), and SAEBench's dataset construction and
tokenization (``protocol="saebench"``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from polysae_lens.evals.datasets import (
    LOCAL_SUFFIXES,
    PAPER_DATASET_NAMES,
    ProbingDataset,
    paper_dataset,
)
from polysae_lens.evals.saebench import PROTOCOLS, check_protocol

__all__ = ["CACHE_DTYPES", "PROTOCOLS", "ProbingEvalConfig"]

CACHE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
"""Allowed ``ProbingEvalConfig.cache_dtype`` values."""


@dataclass(frozen=True)
class ProbingEvalConfig:
    """Settings shared by the probing and Wasserstein evaluators and the CLI."""

    datasets: tuple[str | ProbingDataset, ...] = PAPER_DATASET_NAMES
    """Datasets to evaluate on: names of the paper's datasets
    (``polysae_lens.evals.PAPER_DATASET_NAMES``), local file paths (name = file
    stem), other HuggingFace hub ids such as ``"org/name"`` (name = ``name``; its
    ``train`` split) -- both with columns ``text`` and ``label`` -- or
    :class:`ProbingDataset` specs (other columns or splits, in-memory
    ``datasets.Dataset``, ...)."""
    n_train: int = 4000
    """Train texts per binary task (half label 1, half label 0); even, >= 2."""
    n_test: int = 1000
    """Test texts per binary task (half label 1, half label 0); even, >= 2."""
    protocol: str = "saebench"
    """How texts are sampled and tokenized; one of :data:`PROTOCOLS`.

    ``"saebench"`` (default; what the paper's numbers come from): SAEBench's
    dataset rules (``ProbingDataset.saebench``: bias_in_bios gender-balanced per
    profession, amazon_category 1-/5-star-balanced per category, github-code
    files > 534 characters minus their first 150; near-stratified negatives) and
    SAEBench's tokenization: the tokenizer's own call, pooling every token but
    BOS / EOS / PAD ids. GPT-2's tokenizer adds no BOS (transformers 4.x), so the
    first real token is at position 0 and pooled; Pythia's adds one.
    ``prepend_bos`` must stay ``None``.

    ``"native"``: this package's earlier protocol: classes in their natural mix,
    no text filters, uniform negatives, BOS prepended (``prepend_bos``, else the
    SAE's setting) and dropped from pooling: every text is read as SAELens
    training reads it."""
    context_size: int = 128
    """Tokens per text, special tokens included (longer texts are truncated); >= 2."""
    k_values: tuple[int, ...] = (1, 2, 5)
    """Numbers of latents the sparse probes select; distinct positive integers."""
    seed: int = 0
    """Seed of the task sampling and of the probes."""
    model_reference: bool = True
    """Also probe the model's raw (mean-pooled) activations at the SAE's hook: the
    same k values plus a dense probe on every dimension (``all``)."""
    prepend_bos: bool | None = None
    """``protocol="native"`` only: prepend BOS to each text; ``None`` takes the
    SAE's (or the training run's) setting. Under ``"saebench"`` the tokenizer
    decides and this must be ``None``."""
    llm_batch_size: int = 32
    """Texts per model forward pass during activation collection."""
    sae_batch_size_tokens: int = 4096
    """Tokens per SAE encoding batch: bounds the dense [tokens, d_sae] latents
    held at once."""
    cache_dtype: str = "float32"
    """dtype of the cached model activations: float32, float16 or bfloat16."""
    cache_dir: str | None = None
    """Directory for file-backed activation caches (memory-mapped, deleted when the
    suite is garbage-collected). ``None`` keeps them in RAM: about
    ``n_texts * tokens_per_text * d_in * 4`` bytes in float32, e.g. ~38 GB for the
    full paper suite on GPT-2 small, so set this (or reduce n_train) for it."""
    per_task_metrics: bool = False
    """Evaluators also log one metric per task (``probing/{dataset}/{class}/...``);
    the standalone JSON always holds them."""
    progress: bool = True
    """Show progress bars while collecting activations."""

    def __post_init__(self) -> None:
        _check_int("n_train", self.n_train, minimum=2, even=True)
        _check_int("n_test", self.n_test, minimum=2, even=True)
        _check_int("context_size", self.context_size, minimum=2)
        _check_int("seed", self.seed, minimum=0)
        _check_int("llm_batch_size", self.llm_batch_size, minimum=1)
        _check_int("sae_batch_size_tokens", self.sae_batch_size_tokens, minimum=1)
        k_values = tuple(self.k_values) if not isinstance(self.k_values, int) else None
        if (
            not k_values
            or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in k_values)
            or len(set(k_values)) != len(k_values)
        ):
            raise ValueError(
                f"k_values={self.k_values!r} is not allowed: give one or more distinct "
                "positive integers, e.g. (1, 2, 5)."
            )
        object.__setattr__(self, "k_values", k_values)
        if self.cache_dtype not in CACHE_DTYPES:
            raise ValueError(
                f"cache_dtype={self.cache_dtype!r} is not allowed: use one of "
                f"{', '.join(CACHE_DTYPES)}."
            )
        check_protocol(self.protocol)
        if self.prepend_bos is not None and not isinstance(self.prepend_bos, bool):
            raise ValueError(f"prepend_bos={self.prepend_bos!r} must be True, False or None.")
        if self.prepend_bos is not None and self.protocol != "native":
            raise ValueError(
                f"prepend_bos={self.prepend_bos!r} applies to protocol='native' only: under "
                f"protocol={self.protocol!r} the tokenizer's own call decides (SAEBench). Set "
                "protocol='native' or leave prepend_bos=None."
            )
        if isinstance(self.datasets, (str, ProbingDataset)):
            object.__setattr__(self, "datasets", (self.datasets,))
        object.__setattr__(self, "datasets", tuple(self.datasets))
        names = [spec.name for spec in self.resolved_datasets()]
        if len(set(names)) != len(names):
            raise ValueError(
                f"datasets={names} has duplicate names: each dataset needs its own name "
                "(it keys the metrics)."
            )

    def resolved_datasets(self) -> tuple[ProbingDataset, ...]:
        """``datasets`` as :class:`ProbingDataset` specs.

        Raises:
            ValueError: no datasets, an unknown name, or an unsupported entry.
        """
        if not self.datasets:
            raise ValueError(
                "datasets=() is not allowed: give at least one dataset (paper names: "
                f"{', '.join(PAPER_DATASET_NAMES)})."
            )
        return tuple(_resolve(entry) for entry in self.datasets)

    @property
    def torch_cache_dtype(self) -> torch.dtype:
        return CACHE_DTYPES[self.cache_dtype]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view (datasets by name and source)."""
        return {
            "datasets": [
                {"name": spec.name, "source": spec.describe_source()}
                for spec in self.resolved_datasets()
            ],
            "n_train": self.n_train,
            "n_test": self.n_test,
            "protocol": self.protocol,
            "context_size": self.context_size,
            "k_values": list(self.k_values),
            "seed": self.seed,
            "model_reference": self.model_reference,
            "prepend_bos": self.prepend_bos,
            "llm_batch_size": self.llm_batch_size,
            "sae_batch_size_tokens": self.sae_batch_size_tokens,
            "cache_dtype": self.cache_dtype,
        }


def _resolve(entry: Any) -> ProbingDataset:
    if isinstance(entry, ProbingDataset):
        source = entry.source
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if path.suffix.lower() in LOCAL_SUFFIXES and not path.is_file():
                raise ValueError(
                    f"datasets: local file {str(path)!r} of dataset {entry.name!r} does not exist."
                )
        return entry
    if isinstance(entry, (str, os.PathLike)):
        path = Path(entry)
        if path.suffix.lower() in LOCAL_SUFFIXES:
            if not path.is_file():
                raise ValueError(f"datasets: local file {str(path)!r} does not exist.")
            return ProbingDataset(name=path.stem, source=path)
        if isinstance(entry, str) and "/" in entry and entry not in PAPER_DATASET_NAMES:
            # Any other hub dataset id, e.g. "fancyzhx/ag_news": columns text / label.
            return ProbingDataset(name=entry.rsplit("/", 1)[-1], source=entry)
        return paper_dataset(str(entry))
    raise ValueError(
        f"datasets: entry {entry!r} ({type(entry).__name__}) is not allowed: use a paper "
        "dataset name, a local file path or a ProbingDataset (wrap an in-memory "
        "datasets.Dataset as ProbingDataset(name=..., source=dataset))."
    )


def _check_int(name: str, value: Any, *, minimum: int, even: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} is not allowed: use an integer >= {minimum}.")
    if even and value % 2:
        raise ValueError(
            f"{name}={value!r} is not allowed: use an even integer (tasks are balanced, "
            "half label 1 and half label 0)."
        )
