"""SAEBench's dataset-construction rules, used by ``protocol="saebench"``.

The paper scored its SAEs with SAEBench's sparse probing (method-notes, "Facts
measured by running SAEBench 0.6.0's sparse probing"). On identical latents the
probe, the latent selection, the pooling and W1 already agree with it; these are
the rules that decide *which texts* a task holds:

- **Balanced sub-groups** (:attr:`SAEBenchRules.balance_column`): within each
  class, texts are drawn in equal numbers from every value of a second column --
  bias_in_bios: per profession as many male as female bios (1000 + 1000 train,
  250 + 250 test at 4000 / 1000); amazon_category: per category as many 1-star as
  5-star reviews. Each class's pool is then exactly balanced; negatives come from
  the other classes' balanced pools, so their mix is balanced in expectation only
  (SAEBench does not balance them further).
- **Text filters** (:attr:`SAEBenchRules.min_chars`, :attr:`SAEBenchRules.skip_chars`):
  github-code keeps only files longer than 534 characters and drops their first
  150 (licence headers): 150 = 50 tokens x 3 characters skipped, 534 = 150 + a
  128-token context x 3 characters.
- **Negatives** (:func:`saebench_negatives`): for a class with n positives, each
  of the m other classes offers ``ceil(n / m)`` random texts of its pool, and n of
  those are drawn at random (near-stratified over the other classes).

Not reproduced: SAEBench redraws the negatives for every probe (every k, and the
train and test sets separately) from its global torch seed; here a task's
negatives are drawn once, from this package's seed, so the texts differ from
SAEBench's while following the same rules. A class with too few texts in some
sub-group is skipped by SAEBench; here its pool shrinks (still balanced) with a
warning. europarl differs in construction (SAEBench takes each language from one
fixed language pair; see :func:`~polysae_lens.evals.datasets.europarl_rows`), and
github-code is read through a shuffle buffer where SAEBench takes the stream's
first files.

Pure functions on index arrays; nothing here reads data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "GITHUB_MIN_CHARS",
    "GITHUB_SKIP_CHARS",
    "PROTOCOLS",
    "SAEBenchRules",
    "apply_text_rules",
    "balanced_sample",
    "check_protocol",
    "saebench_negatives",
]

PROTOCOLS: tuple[str, ...] = ("saebench", "native")
"""Allowed ``ProbingEvalConfig.protocol`` values (see its docstring)."""

GITHUB_SKIP_CHARS = 150
"""Leading characters of a github-code file SAEBench drops (licence headers)."""

GITHUB_MIN_CHARS = 534
"""SAEBench keeps github-code files strictly longer than this many characters."""


@dataclass(frozen=True)
class SAEBenchRules:
    """SAEBench's sampling rules for one dataset (applied under ``protocol="saebench"``)."""

    balance_column: str | None = None
    """Column whose values are sampled in equal numbers within each class
    (bias_in_bios: ``"gender"``; amazon_category: ``"rating"``). ``None``: the
    class's natural mix."""
    balance_values: tuple[Any, ...] = ()
    """The values of ``balance_column`` to balance (e.g. ``(0, 1)``); rows with
    other values are skipped. Required with ``balance_column``."""
    min_chars: int = 0
    """Keep only texts strictly longer than this many characters (measured before
    ``skip_chars`` is applied)."""
    skip_chars: int = 0
    """Drop this many leading characters of every kept text."""

    def __post_init__(self) -> None:
        if self.balance_column is not None:
            if not isinstance(self.balance_column, str) or not self.balance_column:
                raise ValueError(
                    f"SAEBenchRules.balance_column={self.balance_column!r} must be a non-empty "
                    "column name or None."
                )
            values = tuple(self.balance_values)
            keys = [_value_key(v) for v in values]
            if len(values) < 2 or len(set(keys)) != len(keys):
                raise ValueError(
                    f"SAEBenchRules.balance_values={self.balance_values!r} must list at least "
                    f"two distinct values of {self.balance_column!r}, e.g. (0, 1)."
                )
            object.__setattr__(self, "balance_values", values)
        elif self.balance_values:
            raise ValueError(
                f"SAEBenchRules.balance_values={self.balance_values!r} needs a balance_column."
            )
        for name in ("min_chars", "skip_chars"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"SAEBenchRules.{name}={value!r} must be an integer >= 0.")

    @property
    def balance_keys(self) -> tuple[str, ...]:
        """``balance_values`` as normalised string keys."""
        return tuple(_value_key(v) for v in self.balance_values)


def _value_key(value: Any) -> str:
    # Local import: datasets.py imports this module.
    from polysae_lens.evals.datasets import label_key

    return str(label_key(value))


def apply_text_rules(text: str, rules: SAEBenchRules) -> str | None:
    """``text`` after the length filter and prefix cut; ``None`` when it is dropped."""
    if len(text) <= rules.min_chars:
        return None
    return text[rules.skip_chars :] if rules.skip_chars else text


def balanced_sample(
    strata_N: Sequence[str], values: Sequence[str], per_value: int, rng: np.random.Generator
) -> tuple[np.ndarray, int]:
    """Indices of ``per_value`` random texts of every stratum value (fewer, equally
    for all values, when some value has fewer texts).

    Args:
        strata_N: the stratum (e.g. gender) key of each of one class's N texts.
        values: the stratum keys to balance, in output order.
        per_value: texts wanted per value.

    Returns:
        (indices grouped by value, texts taken per value).
    """
    strata = np.asarray(strata_N, dtype=object)
    groups = [np.flatnonzero(strata == value) for value in values]
    take = min(per_value, *(len(g) for g in groups))
    chosen = [g[rng.permutation(len(g))[:take]] for g in groups]
    return np.concatenate(chosen).astype(np.int64), take


def saebench_negatives(
    pools: Mapping[str, np.ndarray], positive: str, n: int, rng: np.random.Generator
) -> np.ndarray:
    """SAEBench's negatives of one task: ``ceil(n / m)`` random texts from each of
    the m other classes' pools, then ``n`` of them at random (fewer if the other
    pools hold fewer)."""
    others = [pool for cls, pool in pools.items() if cls != positive]
    per_class = math.ceil(n / len(others))
    offered = np.concatenate([pool[rng.permutation(len(pool))[:per_class]] for pool in others])
    return offered[rng.permutation(len(offered))[:n]]


def check_protocol(protocol: Any) -> str:
    """``protocol`` if it is one of :data:`PROTOCOLS`; else a ``ValueError`` naming it."""
    if protocol not in PROTOCOLS:
        raise ValueError(
            f"protocol={protocol!r} is not allowed: use one of {', '.join(map(repr, PROTOCOLS))}."
        )
    return str(protocol)
