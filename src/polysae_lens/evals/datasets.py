"""Labelled text datasets and the balanced one-vs-rest probing tasks built from them.

A :class:`ProbingDataset` names a source of (text, label) rows:

- a HuggingFace hub dataset id (loaded with ``datasets.load_dataset``; needs network
  access the first time), optionally with a config, splits, ``data_files`` and
  streaming;
- a local file: ``.csv``, ``.tsv``, ``.jsonl`` / ``.json`` (JSON lines) or
  ``.parquet``, with text and label columns;
- an in-memory ``datasets.Dataset`` or ``IterableDataset``;
- a callable returning an iterable of row mappings (used for Europarl).

:data:`PAPER_DATASETS` lists the paper's datasets (SAEBench's sparse-probing
suite), all on the hub: the ids, columns and classes are kept here and nowhere
else.

:func:`build_tasks` turns a loaded dataset into one balanced binary task per
class (label 1 = that class, label 0 = texts of the dataset's other classes), with
disjoint train and test texts.

Under ``protocol="saebench"`` (the default) a dataset's :class:`SAEBenchRules`
(``ProbingDataset.saebench``) also apply: sub-groups balanced within each class
(bias_in_bios: gender; amazon_category: star rating), github-code's length filter
and licence-header cut, and SAEBench's near-stratified negatives; see
:mod:`polysae_lens.evals.saebench`. ``protocol="native"`` ignores them: classes
are sampled in their natural mix and negatives uniformly from the other classes.

Labels are compared by a normalised string key (:func:`label_key`): integers and
integral floats become their integer digits (``5``, ``5.0`` and ``"5"`` are all
``"5"``), strings are stripped.
"""

from __future__ import annotations

import logging
import math
import os
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from polysae_lens.evals.saebench import (
    GITHUB_MIN_CHARS,
    GITHUB_SKIP_CHARS,
    SAEBenchRules,
    apply_text_rules,
    balanced_sample,
    check_protocol,
    saebench_negatives,
)
from polysae_lens.preflight import PreflightError

logger = logging.getLogger(__name__)

__all__ = [
    "LOCAL_SUFFIXES",
    "PAPER_DATASETS",
    "PAPER_DATASET_NAMES",
    "BinaryTask",
    "DatasetTasks",
    "LoadedDataset",
    "ProbingDataset",
    "ProbingDatasetError",
    "build_tasks",
    "europarl_rows",
    "label_key",
    "load_dataset_texts",
    "paper_dataset",
]

LOCAL_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
"""File suffixes accepted as local datasets."""

RowSource = Callable[[], Iterable[Mapping[str, Any]]]


class ProbingDatasetError(PreflightError):
    """A probing dataset that cannot be evaluated (unreachable, a missing column,
    fewer than two classes, too few texts); raised when the evaluators are built,
    before training. The message names the dataset, the problem and the fix."""


@dataclass(frozen=True)
class ProbingDataset:
    """One labelled text dataset; each of its classes becomes a one-vs-rest task."""

    name: str
    """Short name used in metric keys (``probing/{name}/f1_k1``); no ``/``."""
    source: Any
    """Where the rows come from: a hub dataset id (or a ``datasets`` builder such as
    ``"parquet"`` together with ``data_files``), a local file path
    (:data:`LOCAL_SUFFIXES`), a ``datasets.Dataset`` / ``IterableDataset``, or a
    callable returning an iterable of row mappings."""
    text_column: str = "text"
    """Column holding the text."""
    label_column: str = "label"
    """Column holding the class label (any scalar; see :func:`label_key`)."""
    classes: tuple[Any, ...] | None = None
    """Labels that become tasks (after ``label_map``), in task order. Rows of other
    labels are ignored (they are not used as negatives either). ``None``: every
    label present, sorted."""
    label_map: Mapping[Any, Any] | None = None
    """Raw label -> class, applied before matching ``classes`` (e.g. category names
    to the ids used in ``classes``). Unmapped labels are kept as they are."""
    hf_config: str | None = None
    """Hub dataset config (second argument of ``load_dataset``)."""
    split: str = "train"
    """Split the train texts (and, without ``test_split``, also the test texts) come from."""
    test_split: str | None = None
    """If set, the test texts come from this split (hub datasets only)."""
    data_files: str | Sequence[str] | None = None
    """``data_files`` for ``load_dataset`` (e.g. parquet shards on the hub)."""
    streaming: bool = False
    """Stream the hub dataset, reading only until every class has enough texts."""
    max_rows: int | None = None
    """Stop reading a streamed source after this many rows (``None``: no limit)."""
    saebench: SAEBenchRules | None = None
    """SAEBench's sampling rules for this dataset (balanced sub-groups, text
    filters), applied under ``protocol="saebench"`` only; ``None``: none."""
    group: str | None = None
    """Datasets sharing a group count as one dataset in the merged averages
    (``probing/merged_mean_...``): the three bias_in_bios sets are ``"bias_in_bios"``.
    ``None``: the dataset is its own group."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            raise ValueError(
                f"ProbingDataset.name={self.name!r} must be a non-empty string without '/' "
                "(it is part of metric keys)."
            )
        for column in ("text_column", "label_column"):
            value = getattr(self, column)
            if not isinstance(value, str) or not value:
                raise ValueError(
                    f"ProbingDataset.{column}={value!r} must be a non-empty column name."
                )
        if self.classes is not None:
            keys = [label_key(c) for c in self.classes]
            if any(k is None for k in keys) or len(set(keys)) != len(keys):
                raise ValueError(
                    f"ProbingDataset.classes={self.classes!r} must be distinct, non-missing labels."
                )
            if len(keys) < 2:
                raise ValueError(
                    f"ProbingDataset.classes={self.classes!r}: one-vs-rest tasks need at "
                    "least two classes."
                )
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError(f"ProbingDataset.max_rows={self.max_rows!r} must be >= 1 or None.")
        if self.saebench is not None and not isinstance(self.saebench, SAEBenchRules):
            raise ValueError(
                f"ProbingDataset.saebench={self.saebench!r} must be a SAEBenchRules or None."
            )
        if self.group is not None and (
            not isinstance(self.group, str) or not self.group or "/" in self.group
        ):
            raise ValueError(
                f"ProbingDataset.group={self.group!r} must be a non-empty string without '/' "
                "or None."
            )

    @property
    def class_keys(self) -> tuple[str, ...] | None:
        """``classes`` as normalised label keys."""
        if self.classes is None:
            return None
        return tuple(str(label_key(c)) for c in self.classes)

    def describe_source(self) -> str:
        """A short, JSON-friendly description of ``source``."""
        if isinstance(self.source, (str, os.PathLike)):
            text = os.fspath(self.source)
            if self.hf_config:
                text += f" ({self.hf_config})"
            if self.data_files:
                text += f" data_files={self.data_files!r}"
            return text
        if callable(self.source):
            func = getattr(self.source, "func", self.source)
            return f"callable {getattr(func, '__name__', type(func).__name__)}"
        return f"in-memory {type(self.source).__name__}"


@dataclass(frozen=True)
class LoadedDataset:
    """The texts of a dataset, grouped by class key (only the classes in use)."""

    name: str
    classes: tuple[str, ...]
    """Class keys in task order."""
    train: dict[str, list[str]]
    """Class key -> texts for train (and for test when ``test`` is None)."""
    test: dict[str, list[str]] | None = None
    """Class key -> texts for test, when the source has a separate test split."""
    balance: tuple[str, ...] | None = None
    """Sub-group keys balanced within each class (``protocol="saebench"`` with a
    balance column), else ``None``."""
    train_strata: dict[str, list[str]] | None = None
    """Class key -> the sub-group key of each of ``train``'s texts (with ``balance``)."""
    test_strata: dict[str, list[str]] | None = None
    """Class key -> the sub-group key of each of ``test``'s texts (with ``balance``)."""


@dataclass(frozen=True)
class BinaryTask:
    """One balanced one-vs-rest task; indices point into :attr:`DatasetTasks.texts`."""

    dataset: str
    positive_class: str
    """The class key that is label 1; label 0 is any other class of the dataset."""
    train_index: np.ndarray
    """[n_train] text indices of the train split."""
    train_labels: np.ndarray
    """[n_train] 0/1 labels (int64)."""
    test_index: np.ndarray
    test_labels: np.ndarray


@dataclass(frozen=True)
class DatasetTasks:
    """The texts a dataset needs encoded and its tasks."""

    name: str
    texts: list[str]
    """Every text used by some task, once."""
    text_classes: list[str]
    """Class key of each text."""
    tasks: list[BinaryTask] = field(default_factory=list)


# ---- label keys ----------------------------------------------------------------


def label_key(value: Any) -> str | None:
    """Normalised string key of a label; ``None`` for a missing label (None, NaN, "")."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        number = float(value)
        if math.isnan(number):
            return None
        if number.is_integer():
            return str(int(number))
        return repr(number)
    if isinstance(value, str):
        text = value.strip()
        return text or None
    return str(value)


def _sort_keys(keys: Iterable[str]) -> list[str]:
    """Numeric keys in numeric order, then the others alphabetically."""

    def order(key: str) -> tuple[int, float, str]:
        try:
            return (0, float(key), key)
        except ValueError:
            return (1, 0.0, key)

    return sorted(keys, key=order)


# ---- loading -------------------------------------------------------------------


def load_dataset_texts(
    spec: ProbingDataset, *, needed_per_class: int, seed: int = 0, protocol: str = "saebench"
) -> LoadedDataset:
    """Read ``spec``'s rows and group its texts by class.

    Streamed sources (``streaming=True`` hub datasets, ``IterableDataset``s,
    callables) are read until every wanted class has ``needed_per_class`` texts
    (or ``max_rows`` rows). Rows with a missing text or label, empty texts and
    labels outside ``spec.classes`` are skipped (missing and empty rows are
    counted in a warning).

    Under ``protocol="saebench"`` the spec's :class:`SAEBenchRules` apply: texts
    too short for ``min_chars`` are skipped and the rest lose ``skip_chars``
    leading characters; with a balance column each text's sub-group is kept
    (rows of other sub-group values are skipped) and a streamed source is read
    until every (class, sub-group) has its share of ``needed_per_class``.

    Raises:
        ValueError: a missing text, label or balance column, a text that is not a
            string, no rows at all, fewer than two classes, a listed class absent,
            or an unknown ``protocol``.
    """
    rules = spec.saebench if check_protocol(protocol) == "saebench" else None
    train_rows, test_rows = _open_source(spec, seed, rules)
    wanted = spec.class_keys
    cap = needed_per_class if _is_streamed(spec) else None
    train, train_strata = _group_rows(spec, train_rows, wanted, cap, spec.split, rules)
    test = test_strata = None
    if test_rows is not None:
        test, test_strata = _group_rows(spec, test_rows, wanted, cap, str(spec.test_split), rules)
    classes = wanted if wanted is not None else tuple(_sort_keys(train))
    _check_classes(spec, classes, train, "train" if test is not None else None)
    if test is not None:
        _check_classes(spec, classes, test, "test")
    balance = rules.balance_keys if rules is not None and rules.balance_column else None
    return LoadedDataset(
        name=spec.name,
        classes=tuple(classes),
        train=train,
        test=test,
        balance=balance,
        train_strata=train_strata if balance else None,
        test_strata=test_strata if balance else None,
    )


def _is_streamed(spec: ProbingDataset) -> bool:
    if callable(spec.source) and not _is_dataset(spec.source):
        return True
    if _is_iterable_dataset(spec.source):
        return True
    return spec.streaming


def _columns(spec: ProbingDataset, rules: SAEBenchRules | None) -> dict[str, str]:
    """Role -> column of the columns a load reads."""
    columns = {"text": spec.text_column, "label": spec.label_column}
    if rules is not None and rules.balance_column is not None:
        columns["balance"] = rules.balance_column
    return columns


def _open_source(
    spec: ProbingDataset, seed: int, rules: SAEBenchRules | None
) -> tuple[Iterable[Mapping[str, Any]], Iterable[Mapping[str, Any]] | None]:
    """(train rows, test rows or None) of any source."""
    source = spec.source
    columns = _columns(spec, rules)
    if _is_dataset(source) or _is_iterable_dataset(source):
        _check_columns(spec, getattr(source, "column_names", None), columns)
        return _rows_of(source, columns, seed), None
    if isinstance(source, (str, os.PathLike)) and _looks_local(source):
        return _read_local(spec, Path(source), columns), None
    if callable(source):
        return source(), None
    if isinstance(source, str):
        train = _load_hub_split(spec, spec.split, seed, columns)
        test = _load_hub_split(spec, spec.test_split, seed, columns) if spec.test_split else None
        return train, test
    raise ValueError(
        f"dataset {spec.name!r}: unsupported source {type(source).__name__}; use a hub "
        f"dataset id, a local file ({', '.join(LOCAL_SUFFIXES)}), a datasets.Dataset or a "
        "callable returning rows."
    )


def _looks_local(source: str | os.PathLike[str]) -> bool:
    path = Path(source)
    return path.suffix.lower() in LOCAL_SUFFIXES or path.exists()


def _is_dataset(obj: Any) -> bool:
    import datasets

    return isinstance(obj, datasets.Dataset)


def _is_iterable_dataset(obj: Any) -> bool:
    import datasets

    return isinstance(obj, datasets.IterableDataset)


def _rows_of(dataset: Any, columns: Mapping[str, str], seed: int) -> Iterator[Mapping[str, Any]]:
    """Rows of an in-memory or streamed ``datasets`` object, the read columns only."""
    import datasets

    if isinstance(dataset, datasets.IterableDataset):
        # A shuffle buffer keeps a streamed sample from being the source's first rows.
        yield from dataset.shuffle(seed=seed, buffer_size=10_000)
        return
    names = list(dict.fromkeys(columns.values()))
    values = [dataset[name] for name in names]
    for row in zip(*values, strict=True):
        yield dict(zip(names, row, strict=True))


def _load_hub_split(
    spec: ProbingDataset, split: str | None, seed: int, columns: Mapping[str, str]
) -> Iterable[Any]:
    """One split of a hub dataset (network access unless it is cached)."""
    import datasets

    dataset = datasets.load_dataset(
        str(spec.source),
        spec.hf_config,
        split=split,
        data_files=spec.data_files,
        streaming=spec.streaming,
    )
    _check_columns(spec, getattr(dataset, "column_names", None), columns)
    return _rows_of(dataset, columns, seed)


def _read_local(
    spec: ProbingDataset, path: Path, columns: Mapping[str, str]
) -> Iterator[Mapping[str, Any]]:
    import pandas as pd

    if not path.is_file():
        raise ValueError(f"dataset {spec.name!r}: file {str(path)!r} does not exist.")
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            frame = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")
        elif suffix in (".jsonl", ".json"):
            frame = pd.read_json(path, lines=True)
        elif suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            raise ValueError(
                f"dataset {spec.name!r}: unsupported file type {suffix!r} of {str(path)!r}; "
                f"use one of {', '.join(LOCAL_SUFFIXES)}."
            )
    except pd.errors.EmptyDataError as e:
        raise ValueError(f"dataset {spec.name!r}: file {str(path)!r} is empty.") from e
    except ValueError as e:
        if "dataset" in str(e):
            raise
        raise ValueError(f"dataset {spec.name!r}: cannot read {str(path)!r}: {e}") from e
    _check_columns(spec, list(frame.columns), columns)
    names = list(dict.fromkeys(columns.values()))
    yield from frame[names].to_dict("records")


def _check_columns(
    spec: ProbingDataset, available: Sequence[str] | None, columns: Mapping[str, str]
) -> None:
    """Raise if a known column list lacks a column the load reads."""
    if available is None:
        return
    for role, column in columns.items():
        if column not in available:
            fix = (
                f"Set ProbingDataset.{role}_column"
                if role != "balance"
                else "Fix ProbingDataset.saebench.balance_column (or use protocol='native')"
            )
            raise ValueError(
                f"dataset {spec.name!r}: {role} column {column!r} not found; available "
                f"columns: {list(available)}. {fix}."
            )


def _group_rows(
    spec: ProbingDataset,
    rows: Iterable[Mapping[str, Any]],
    wanted: tuple[str, ...] | None,
    cap: int | None,
    split: str,
    rules: SAEBenchRules | None,
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(class -> texts, class -> sub-group key of each text; ``""`` without balance)."""
    label_map = {label_key(k): label_key(v) for k, v in (spec.label_map or {}).items()}
    groups: dict[str, list[str]] = {c: [] for c in wanted} if wanted is not None else {}
    strata: dict[str, list[str]] = {c: [] for c in groups}
    columns = _columns(spec, rules)
    balance = rules.balance_keys if rules is not None and rules.balance_column else ()
    # With balance, a streamed read stops once every (class, sub-group) is full.
    counts: dict[tuple[str, str], int] = {}
    sub_cap = math.ceil(cap / len(balance)) if cap is not None and balance else cap
    n_rows = n_missing = n_empty = n_filtered = 0
    for row in rows:
        if n_rows == 0:
            _check_columns(spec, list(row.keys()), columns)
        n_rows += 1
        text = row[spec.text_column]
        key = label_key(row[spec.label_column])
        if text is None or (isinstance(text, float) and math.isnan(text)) or key is None:
            n_missing += 1
        elif not isinstance(text, str):
            raise ValueError(
                f"dataset {spec.name!r}: text column {spec.text_column!r} must hold strings; "
                f"row {n_rows - 1} holds {type(text).__name__} {text!r}."
            )
        elif not text.strip():
            n_empty += 1
        else:
            key = str(label_map.get(key) or key)
            stratum = ""
            if balance:
                stratum = str(label_key(row[columns["balance"]]))
            kept = apply_text_rules(text, rules) if rules is not None else text
            if kept is None or (balance and stratum not in balance):
                n_filtered += 1
            elif wanted is None or (
                key in groups and (sub_cap is None or counts.get((key, stratum), 0) < sub_cap)
            ):
                groups.setdefault(key, []).append(kept)
                strata.setdefault(key, []).append(stratum)
                counts[key, stratum] = counts.get((key, stratum), 0) + 1
        if sub_cap is not None and wanted is not None:
            full = all(counts.get((c, s), 0) >= sub_cap for c in wanted for s in balance or ("",))
            if full:
                break
        if spec.max_rows is not None and n_rows >= spec.max_rows:
            break
    if n_rows == 0:
        raise ValueError(f"dataset {spec.name!r} is empty: split {split!r} has no rows.")
    if n_missing or n_empty:
        logger.warning(
            "dataset %r (%s): skipped %d row(s) with a missing text or label and %d empty "
            "text(s) out of %d.",
            spec.name,
            split,
            n_missing,
            n_empty,
            n_rows,
        )
    if n_filtered:
        logger.info(
            "dataset %r (%s): SAEBench's rules dropped %d of %d row(s) (text length or "
            "sub-group value).",
            spec.name,
            split,
            n_filtered,
            n_rows,
        )
    if not any(groups.values()):
        raise ValueError(
            f"dataset {spec.name!r} is empty: no row of split {split!r} has both a text and "
            f"a label{' of the listed classes' if wanted is not None else ''}."
        )
    return groups, strata


def _check_classes(
    spec: ProbingDataset, classes: Sequence[str], groups: Mapping[str, list[str]], split: str | None
) -> None:
    where = f" in split {split!r}" if split else ""
    present = [c for c in groups if groups[c]]
    missing = [c for c in classes if not groups.get(c)]
    if missing and present:
        raise ValueError(
            f"dataset {spec.name!r}: class(es) {missing} have no texts{where}; labels found: "
            f"{_sort_keys(present)[:20]}. List only labels the data holds in "
            "ProbingDataset.classes (or fix its label_map)."
        )
    if len(present) < 2:
        found = present[0] if present else None
        raise ValueError(
            f"dataset {spec.name!r} has a single class ({found!r}){where}: one-vs-rest tasks "
            f"need at least two classes. Use data with two or more labels in column "
            f"{spec.label_column!r}, or point ProbingDataset.label_column at the column that "
            "holds them."
        )


# ---- tasks ---------------------------------------------------------------------


def build_tasks(
    loaded: LoadedDataset, *, n_train: int, n_test: int, seed: int = 0, protocol: str = "saebench"
) -> DatasetTasks:
    """One balanced binary task per class, with disjoint train and test texts.

    Each class contributes up to ``n_train // 2`` train and ``n_test // 2`` test
    texts (its *pools*); a task uses its class's pools as label 1 and as many
    texts sampled from the other classes' pools of the same split as label 0.
    A class with fewer texts keeps the train:test proportion and its task is
    smaller (a warning says so); each class needs at least two texts. Only pooled
    texts are encoded, so a dataset costs ``n_classes * (n_train + n_test) / 2``
    texts. Deterministic given ``seed`` and the dataset name.

    When ``loaded`` has sub-groups (``loaded.balance``, from a ``"saebench"``
    load), each pool holds ``n_train // 2 // n_subgroups`` texts of every
    sub-group (SAEBench: ``n_train // 4`` male and as many female bios), fewer but
    still equal when one sub-group is short. ``protocol="saebench"`` draws the
    negatives as SAEBench does (:func:`~polysae_lens.evals.saebench.saebench_negatives`);
    ``"native"`` uniformly from the other classes' pools.
    """
    check_protocol(protocol)
    half_train, half_test = n_train // 2, n_test // 2
    rng = np.random.default_rng([seed, zlib.crc32(loaded.name.encode())])
    texts: list[str] = []
    text_classes: list[str] = []
    train_pools: dict[str, np.ndarray] = {}
    test_pools: dict[str, np.ndarray] = {}

    def add(cls: str, chosen: list[str]) -> np.ndarray:
        start = len(texts)
        texts.extend(chosen)
        text_classes.extend([cls] * len(chosen))
        return np.arange(start, len(texts), dtype=np.int64)

    for cls in loaded.classes:
        available = loaded.train[cls]
        if loaded.balance is not None:
            train_pick, test_pick = _balanced_pools(loaded, cls, half_train, half_test, rng)
            train_pools[cls] = add(cls, [available[i] for i in train_pick])
            test_source = loaded.test[cls] if loaded.test is not None else available
            test_pools[cls] = add(cls, [test_source[i] for i in test_pick])
            continue
        order = rng.permutation(len(available))
        if loaded.test is not None:
            test_available = loaded.test[cls]
            n_train_c = min(len(available), half_train)
            n_test_c = min(len(test_available), half_test)
            test_order = rng.permutation(len(test_available))
            test_chosen = [test_available[i] for i in test_order[:n_test_c]]
        else:
            take = min(len(available), half_train + half_test)
            if take < 2:
                raise ValueError(
                    f"dataset {loaded.name!r}: class {cls!r} has {take} text(s); each class "
                    "needs at least 2 (one for train, one for test)."
                )
            if take == half_train + half_test:
                n_train_c, n_test_c = half_train, half_test
            else:
                n_test_c = min(take - 1, max(1, round(take * n_test / (n_train + n_test))))
                n_train_c = take - n_test_c
            test_chosen = [available[i] for i in order[n_train_c : n_train_c + n_test_c]]
        train_pools[cls] = add(cls, [available[i] for i in order[:n_train_c]])
        test_pools[cls] = add(cls, test_chosen)

    tasks = []
    small: list[str] = []
    for cls in loaded.classes:
        train_index, train_labels = _balanced_split(cls, train_pools, rng, protocol)
        test_index, test_labels = _balanced_split(cls, test_pools, rng, protocol)
        if len(train_index) < n_train or len(test_index) < n_test:
            small.append(f"{cls} ({len(train_index)} train / {len(test_index)} test)")
        tasks.append(
            BinaryTask(
                dataset=loaded.name,
                positive_class=cls,
                train_index=train_index,
                train_labels=train_labels,
                test_index=test_index,
                test_labels=test_labels,
            )
        )
        if len(train_index) < 2 or len(test_index) < 2:
            raise ValueError(
                f"dataset {loaded.name!r}: the task for class {cls!r} has "
                f"{len(train_index)} train and {len(test_index)} test texts; it needs at "
                "least one text of each label in both splits."
            )
    if small:
        logger.warning(
            "dataset %r: %d task(s) are smaller than the requested %d train / %d test "
            "texts (not enough texts): %s.",
            loaded.name,
            len(small),
            n_train,
            n_test,
            "; ".join(small),
        )
    return DatasetTasks(name=loaded.name, texts=texts, text_classes=text_classes, tasks=tasks)


def _balanced_pools(
    loaded: LoadedDataset, cls: str, half_train: int, half_test: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices of a class's sub-group-balanced pools: into
    ``loaded.train[cls]`` and ``loaded.test[cls]`` (or ``loaded.train[cls]`` when
    there is no test split)."""
    assert loaded.balance is not None and loaded.train_strata is not None
    values = loaded.balance
    per_train, per_test = half_train // len(values), half_test // len(values)
    if loaded.test is not None:
        assert loaded.test_strata is not None
        train_pick, n_train_v = balanced_sample(loaded.train_strata[cls], values, per_train, rng)
        test_pick, n_test_v = balanced_sample(loaded.test_strata[cls], values, per_test, rng)
        if n_train_v == 0 or n_test_v == 0:
            split = "train" if n_train_v == 0 else "test"
            strata = loaded.train_strata if split == "train" else loaded.test_strata
            raise ValueError(
                f"dataset {loaded.name!r}: class {cls!r} lacks texts of some sub-group in "
                f"split {split!r} (sub-groups {list(values)}, found "
                f"{sorted(set(strata[cls]))}); SAEBench balances them, so each needs one. "
                "Use protocol='native' to sample the natural mix."
            )
        short = n_train_v < per_train or n_test_v < per_test
    else:
        pick, take = balanced_sample(loaded.train_strata[cls], values, per_train + per_test, rng)
        if take < 2:
            raise ValueError(
                f"dataset {loaded.name!r}: class {cls!r} has {take} text(s) of its smallest "
                f"sub-group (of {list(values)}); each sub-group needs at least 2 (train and "
                "test). Use protocol='native' to sample the natural mix."
            )
        if take == per_train + per_test:
            n_train_v, n_test_v = per_train, per_test
        else:
            n_test_v = min(take - 1, max(1, round(take * per_test / (per_train + per_test))))
            n_train_v = take - n_test_v
        blocks = pick.reshape(len(values), take)  # one row per sub-group
        train_pick = blocks[:, :n_train_v].reshape(-1)
        test_pick = blocks[:, n_train_v : n_train_v + n_test_v].reshape(-1)
        short = take < per_train + per_test
    if short:
        logger.warning(
            "dataset %r: class %r keeps %d train / %d test texts per sub-group (%s), fewer "
            "than the %d / %d wanted: its smallest sub-group is short.",
            loaded.name,
            cls,
            n_train_v,
            n_test_v,
            ", ".join(values),
            per_train,
            per_test,
        )
    return train_pick, test_pick


def _balanced_split(
    cls: str, pools: Mapping[str, np.ndarray], rng: np.random.Generator, protocol: str
) -> tuple[np.ndarray, np.ndarray]:
    positives = pools[cls]
    others = np.concatenate([p for c, p in pools.items() if c != cls])
    n = min(len(positives), len(others))
    positives = positives[rng.permutation(len(positives))[:n]] if n < len(positives) else positives
    if protocol == "saebench":
        negatives = saebench_negatives(pools, cls, n, rng)
    else:
        negatives = others[rng.choice(len(others), size=n, replace=False)]
    index = np.concatenate([positives, negatives])
    labels = np.concatenate([np.ones(n, dtype=np.int64), np.zeros(n, dtype=np.int64)])
    return index, labels


# ---- the paper's datasets --------------------------------------------------------

EUROPARL_LANGUAGES = ("en", "fr", "de", "es", "nl")
"""Languages of the Europarl language-ID task (SAEBench's choice)."""


def europarl_rows(
    languages: Sequence[str] = EUROPARL_LANGUAGES, pivot: str = "en"
) -> Iterator[dict[str, str]]:
    """Europarl sentences labelled by language, streamed from ``Helsinki-NLP/europarl``.

    The hub dataset is a set of parallel corpora (configs ``"de-en"``,
    ``"en-fr"``, ...). For each non-pivot language its pair with ``pivot`` is
    streamed; even rows give the non-pivot sentence, odd rows the pivot one, so
    no two texts are translations of each other. Pairs are interleaved row by row.
    Yields ``{"text": ..., "language": ...}``. Needs network access.
    """
    import datasets

    others = [lang for lang in languages if lang != pivot]
    streams = []
    for lang in others:
        config = "-".join(sorted((lang, pivot)))
        stream = datasets.load_dataset(
            "Helsinki-NLP/europarl", config, split="train", streaming=True
        )
        streams.append((lang, iter(stream)))
    row_index = 0
    while streams:
        alive = []
        for lang, stream in streams:
            row = next(stream, None)
            if row is None:
                continue
            alive.append((lang, stream))
            side = lang if row_index % 2 == 0 or pivot not in languages else pivot
            yield {"text": row["translation"][side], "language": side}
        streams = alive
        row_index += 1


AMAZON_CATEGORY_IDS: dict[str, int] = {
    name: i
    for i, name in enumerate(
        (
            "All_Beauty",
            "Toys_and_Games",
            "Cell_Phones_and_Accessories",
            "Industrial_and_Scientific",
            "Gift_Cards",
            "Musical_Instruments",
            "Electronics",
            "Handmade_Products",
            "Arts_Crafts_and_Sewing",
            "Baby_Products",
            "Health_and_Household",
            "Office_Products",
            "Digital_Music",
            "Grocery_and_Gourmet_Food",
            "Sports_and_Outdoors",
            "Home_and_Kitchen",
            "Subscription_Boxes",
            "Tools_and_Home_Improvement",
            "Pet_Supplies",
            "Video_Games",
            "Kindle_Store",
            "Clothing_Shoes_and_Jewelry",
            "Patio_Lawn_and_Garden",
            "Unknown",
            "Books",
            "Automotive",
            "CDs_and_Vinyl",
            "Beauty_and_Personal_Care",
            "Amazon_Fashion",
            "Magazine_Subscriptions",
            "Software",
            "Health_and_Personal_Care",
            "Appliances",
            "Movies_and_TV",
        )
    )
}
"""Amazon (McAuley) category name -> the integer id SAEBench's classes refer to."""


def _bias_in_bios(name: str, professions: tuple[int, ...]) -> ProbingDataset:
    return ProbingDataset(
        name,
        source="LabHC/bias_in_bios",
        text_column="hard_text",
        label_column="profession",
        classes=professions,
        split="train",
        test_split="test",
        # SAEBench: as many male (0) as female (1) bios per profession.
        saebench=SAEBenchRules(balance_column="gender", balance_values=(0, 1)),
        group="bias_in_bios",
    )


def _amazon(
    name: str,
    label_column: str,
    classes: tuple[int, ...],
    label_map: Mapping[str, int] | None,
    saebench: SAEBenchRules | None = None,
) -> ProbingDataset:
    return ProbingDataset(
        name,
        source="canrager/amazon_reviews_mcauley_1and5",
        text_column="text",
        label_column=label_column,
        classes=classes,
        label_map=label_map,
        split="train",
        test_split="test",
        saebench=saebench,
    )


PAPER_DATASETS: tuple[ProbingDataset, ...] = (
    # Profession ids of LabHC/bias_in_bios (0 accountant, 1 architect, 2 attorney,
    # 6 dentist, 9 filmmaker, 11 journalist, 13 nurse, 14 painter, 18 photographer,
    # 19 physician, 20 poet, 21 professor, 22 psychologist, 25 surgeon, 26 teacher).
    _bias_in_bios("bias_in_bios_set1", (0, 1, 2, 6, 9)),
    _bias_in_bios("bias_in_bios_set2", (11, 13, 14, 18, 19)),
    _bias_in_bios("bias_in_bios_set3", (20, 21, 22, 25, 26)),
    # Toys_and_Games, Cell_Phones_and_Accessories, Industrial_and_Scientific,
    # Musical_Instruments, Electronics.
    # SAEBench: as many 1-star as 5-star reviews per category.
    _amazon(
        "amazon_category",
        "category",
        (1, 2, 3, 5, 6),
        AMAZON_CATEGORY_IDS,
        SAEBenchRules(balance_column="rating", balance_values=(1, 5)),
    ),
    # Star ratings: the dataset holds only 1-star and 5-star reviews (SAEBench
    # samples each rating without balancing categories).
    _amazon("amazon_sentiment", "rating", (1, 5), None),
    # codeparrot/github-code's loading script is not supported by datasets >= 4: its
    # parquet shards are read directly, streamed (the dataset is ~1 TB).
    ProbingDataset(
        "github_code",
        source="parquet",
        data_files="hf://datasets/codeparrot/github-code/data/*.parquet",
        text_column="code",
        label_column="language",
        classes=("C", "Python", "HTML", "Java", "PHP"),
        streaming=True,
        max_rows=2_000_000,
        # SAEBench: files longer than 534 characters, their first 150 dropped.
        saebench=SAEBenchRules(min_chars=GITHUB_MIN_CHARS, skip_chars=GITHUB_SKIP_CHARS),
    ),
    # World, Sports, Business, Sci/Tech.
    ProbingDataset(
        "ag_news",
        source="fancyzhx/ag_news",
        classes=(0, 1, 2, 3),
        split="train",
        test_split="test",
    ),
    ProbingDataset(
        "europarl",
        source=partial(europarl_rows, EUROPARL_LANGUAGES),
        label_column="language",
        classes=EUROPARL_LANGUAGES,
        max_rows=2_000_000,
    ),
)
"""The paper's probing datasets (SAEBench's sparse-probing suite), by name."""

PAPER_DATASET_NAMES: tuple[str, ...] = tuple(d.name for d in PAPER_DATASETS)
"""Names of :data:`PAPER_DATASETS`, the default of ``ProbingEvalConfig.datasets``."""


def paper_dataset(name: str) -> ProbingDataset:
    """The paper dataset called ``name`` (see :data:`PAPER_DATASET_NAMES`)."""
    for spec in PAPER_DATASETS:
        if spec.name == name:
            return spec
    raise ValueError(
        f"unknown paper dataset {name!r}; the paper's datasets are "
        f"{', '.join(PAPER_DATASET_NAMES)} (or give a local file path or a ProbingDataset)."
    )
