"""Loading labelled texts (local files, in-memory, the hub registry through a fake
``load_dataset``), building balanced one-vs-rest tasks, and the config checks."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
import pytest

from polysae_lens.evals import (
    PAPER_DATASET_NAMES,
    PAPER_DATASETS,
    ProbingDataset,
    ProbingEvalConfig,
    build_tasks,
    load_dataset_texts,
)
from polysae_lens.evals.datasets import AMAZON_CATEGORY_IDS, europarl_rows, label_key

DATA = Path(__file__).parent / "data"
TOPICS = DATA / "topics.csv"
REVIEWS = DATA / "reviews.jsonl"


def topics_frame() -> pd.DataFrame:
    return pd.read_csv(TOPICS)


def load(spec: ProbingDataset, needed: int = 6, seed: int = 0):
    return load_dataset_texts(spec, needed_per_class=needed, seed=seed)


# ---- sources -----------------------------------------------------------------


def test_csv_file(tmp_path: Path) -> None:
    loaded = load(ProbingDataset("topics", TOPICS))
    assert loaded.classes == ("animals", "food", "weather")  # sorted when not listed
    assert {c: len(t) for c, t in loaded.train.items()} == {"animals": 8, "food": 8, "weather": 8}
    assert "The cat chased a mouse across the barn." in loaded.train["animals"]
    assert loaded.test is None


def test_parquet_tsv_and_in_memory_sources_agree(tmp_path: Path) -> None:
    frame = topics_frame()
    frame.to_parquet(tmp_path / "topics.parquet")
    frame.to_csv(tmp_path / "topics.tsv", sep="\t", index=False)
    expected = load(ProbingDataset("t", TOPICS)).train
    for source in (
        tmp_path / "topics.parquet",
        str(tmp_path / "topics.tsv"),
        datasets.Dataset.from_pandas(frame),
    ):
        assert load(ProbingDataset("t", source)).train == expected


def test_jsonl_skips_missing_and_empty_rows(caplog: pytest.LogCaptureFixture) -> None:
    spec = ProbingDataset("reviews", REVIEWS, text_column="review", label_column="stars")
    with caplog.at_level(logging.WARNING):
        loaded = load(spec)
    assert loaded.classes == ("1", "5")
    assert [len(loaded.train[c]) for c in loaded.classes] == [5, 5]
    assert "1 row(s) with a missing text or label and 1 empty text(s) out of 12" in caplog.text


def test_listed_classes_and_label_map_select_and_rename() -> None:
    spec = ProbingDataset(
        "topics",
        TOPICS,
        classes=("meal", "animals"),
        label_map={"food": "meal"},
    )
    loaded = load(spec)
    assert loaded.classes == ("meal", "animals")
    assert set(loaded.train) == {"meal", "animals"}  # weather is not used at all
    assert len(loaded.train["meal"]) == 8


def test_streamed_sources_stop_once_every_class_is_full() -> None:
    frame = topics_frame()
    read = []

    def rows():
        for row in frame.to_dict("records"):
            read.append(row)
            yield row

    spec = ProbingDataset("topics", rows, classes=("animals", "weather"))
    loaded = load(spec, needed=3)
    assert all(len(texts) == 3 for texts in loaded.train.values())
    assert len(read) == 11  # 8 animals rows, then 3 weather rows: reading stops there
    iterable = datasets.Dataset.from_pandas(frame).to_iterable_dataset()
    streamed = load(ProbingDataset("topics", iterable), needed=4)
    # without listed classes everything is read (the classes are not known upfront)
    assert sorted(len(t) for t in streamed.train.values()) == [8, 8, 8]


def test_label_keys() -> None:
    assert label_key(5) == label_key(5.0) == label_key("5") == label_key(np.int64(5)) == "5"
    assert label_key(2.5) == "2.5"
    assert label_key(" en ") == "en"
    for missing in (None, float("nan"), "", "  "):
        assert label_key(missing) is None
    assert label_key(True) == "True"


# ---- the paper's hub datasets, through a fake load_dataset ----------------------


def fake_hub(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replace ``datasets.load_dataset`` by a generator of small labelled datasets
    shaped like the paper's hub datasets; returns the recorded calls."""
    calls: list[dict[str, Any]] = []
    category_names = {v: k for k, v in AMAZON_CATEGORY_IDS.items()}

    def load_dataset(path: str, name: str | None = None, **kwargs: Any) -> Any:
        calls.append({"path": path, "name": name, **kwargs})
        if path == "Helsinki-NLP/europarl":
            langs = name.split("-")
            rows = [
                {"translation": {lang: f"{lang} sentence {i} of {name}" for lang in langs}}
                for i in range(40)
            ]
            return datasets.Dataset.from_list(rows).to_iterable_dataset()
        specs = [s for s in PAPER_DATASETS if s.source == path]
        assert specs, path
        rows = []
        for spec in specs:  # both amazon datasets read the same hub dataset
            labels: list[Any] = [*spec.classes, -1 if isinstance(spec.classes[0], int) else "Go"]
            for label in labels:
                if spec.label_map:  # the raw amazon data holds category names
                    label = category_names.get(label, "Books")
                for i in range(12):
                    text = f"{spec.name} {kwargs['split']} text {i} of {label}"
                    if spec.name == "github_code":  # SAEBench keeps long files minus a header
                        text = "/" * 150 + text + " x" * 200
                    row = {spec.text_column: text, spec.label_column: label}
                    rules = spec.saebench
                    if rules is not None and rules.balance_column:  # e.g. gender 0 / 1
                        row[rules.balance_column] = rules.balance_values[i % 2]
                    rows.append(row)
        frame = pd.DataFrame(rows)
        dataset = datasets.Dataset.from_pandas(frame.fillna({"rating": 3, "category": "Books"}))
        return dataset.to_iterable_dataset() if kwargs.get("streaming") else dataset

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


@pytest.mark.parametrize("name", PAPER_DATASET_NAMES)
def test_paper_datasets_load_through_load_dataset(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = fake_hub(monkeypatch)
    spec = ProbingEvalConfig(datasets=(name,)).resolved_datasets()[0]
    loaded = load(spec, needed=6)
    tasks = build_tasks(loaded, n_train=8, n_test=4)
    assert loaded.classes == spec.class_keys
    assert [t.positive_class for t in tasks.tasks] == list(spec.class_keys)
    for task in tasks.tasks:
        assert len(task.train_index) == 8 and len(task.test_index) == 4
    assert all(
        c["path"] == ("Helsinki-NLP/europarl" if name == "europarl" else spec.source) for c in calls
    )
    if spec.test_split:  # train and test texts come from their own splits
        assert {c["split"] for c in calls} == {"train", "test"}
        for task in tasks.tasks:
            assert all(" test text " in tasks.texts[i] for i in task.test_index)
            assert all(" train text " in tasks.texts[i] for i in task.train_index)


def test_paper_registry() -> None:
    assert PAPER_DATASET_NAMES == (
        "bias_in_bios_set1",
        "bias_in_bios_set2",
        "bias_in_bios_set3",
        "amazon_category",
        "amazon_sentiment",
        "github_code",
        "ag_news",
        "europarl",
    )
    assert ProbingEvalConfig().datasets == PAPER_DATASET_NAMES
    assert sum(len(s.class_keys or ()) for s in PAPER_DATASETS) == 36  # SAEBench's 36 tasks


def test_europarl_rows_labels_each_side_by_language(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_hub(monkeypatch)
    rows = list(europarl_rows(("en", "fr", "de")))
    assert {c["name"] for c in calls} == {"en-fr", "de-en"}
    counts = Counter(row["language"] for row in rows)
    assert counts == {"fr": 20, "de": 20, "en": 40}
    for row in rows:
        assert row["text"].startswith(row["language"] + " sentence")
    texts = [row["text"].split(" sentence ")[1] for row in rows]
    assert len(set(texts)) == len(texts)  # no sentence appears with its translation


# ---- tasks -------------------------------------------------------------------------


def test_tasks_are_balanced_disjoint_and_one_vs_rest() -> None:
    loaded = load(ProbingDataset("topics", TOPICS), needed=8)
    tasks = build_tasks(loaded, n_train=8, n_test=4, seed=0)
    # each class pools 4 train + 2 test texts: 3 classes -> 18 texts to encode
    assert len(tasks.texts) == 18
    for task in tasks.tasks:
        for index, labels, size in (
            (task.train_index, task.train_labels, 8),
            (task.test_index, task.test_labels, 4),
        ):
            assert len(index) == size and labels.sum() == size // 2
            classes = [tasks.text_classes[i] for i in index]
            assert all(
                (c == task.positive_class) == bool(y) for c, y in zip(classes, labels, strict=True)
            )
            assert len(set(index.tolist())) == size
        assert not set(task.train_index.tolist()) & set(task.test_index.tolist())
    again = build_tasks(loaded, n_train=8, n_test=4, seed=0)
    assert again.texts == tasks.texts
    assert all(
        np.array_equal(a.train_index, b.train_index)
        for a, b in zip(again.tasks, tasks.tasks, strict=True)
    )
    other = build_tasks(loaded, n_train=8, n_test=4, seed=1)
    assert other.texts != tasks.texts


def test_small_classes_shrink_their_task(caplog: pytest.LogCaptureFixture) -> None:
    spec = ProbingDataset("reviews", REVIEWS, text_column="review", label_column="stars")
    with caplog.at_level(logging.WARNING):
        tasks = build_tasks(load(spec), n_train=8, n_test=4)
    for task in tasks.tasks:  # 5 texts per class: 3 train + 2 test each
        assert (len(task.train_index), len(task.test_index)) == (6, 4)
    assert "2 task(s) are smaller than the requested 8 train / 4 test" in caplog.text


# ---- errors ---------------------------------------------------------------------------


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("content", "kwargs", "message"),
    [
        ("text,label\n", {}, "is empty"),
        ("", {}, "is empty"),
        (
            "sentence,label\nhello,a\nbye,b\n",
            {},
            r"text column 'text' not found; available columns: \['sentence', 'label'\]",
        ),
        ("text,topic\nhello,a\nbye,b\n", {}, "label column 'label' not found"),
        ("text,label\nhello,a\nbye,a\n", {}, r"single class \('a'\)"),
        (
            "text,label\nhello,a\nbye,b\n",
            {"classes": ("a", "c")},
            r"class\(es\) \['c'\] have no texts",
        ),
        ("text,label\n1,a\n2,b\n", {}, "must hold strings; row 0 holds int"),
        ("text,label\nhello,\n,b\n", {}, "is empty: no row"),
    ],
)
def test_bad_files_are_named(tmp_path: Path, content: str, kwargs: dict, message: str) -> None:
    path = write(tmp_path, "bad.csv", content)
    with pytest.raises(ValueError, match=message) as info:
        load(ProbingDataset("bad", path, **kwargs))
    assert "'bad'" in str(info.value)


def test_single_class_in_memory_and_tiny_class() -> None:
    one_class = datasets.Dataset.from_dict({"text": ["a b", "c d"], "label": [1, 1]})
    with pytest.raises(ValueError, match="single class"):
        load(ProbingDataset("one", one_class))
    tiny = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 0, 1]})
    with pytest.raises(ValueError, match="class '1' has 1 text"):
        build_tasks(load(ProbingDataset("tiny", tiny)), n_train=4, n_test=2)


def test_bad_sources_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load(ProbingDataset("missing", tmp_path / "nope.csv"))
    with pytest.raises(ValueError, match="unsupported source int"):
        load(ProbingDataset("number", 42))


# ---- config ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_train": 3}, "n_train=3 is not allowed: use an even integer"),
        ({"n_test": 0}, "n_test=0 is not allowed: use an integer >= 2"),
        ({"context_size": 1}, "context_size=1"),
        ({"k_values": ()}, "k_values=()"),
        ({"k_values": (1, 1)}, "distinct positive integers"),
        ({"k_values": (0,)}, r"k_values=\(0,\)"),
        ({"cache_dtype": "int8"}, "cache_dtype='int8' is not allowed: use one of float32"),
        ({"datasets": ()}, r"datasets=\(\) is not allowed"),
        ({"datasets": ("imdb",)}, "unknown paper dataset 'imdb'; the paper's datasets are"),
        ({"datasets": ("missing.csv",)}, "local file 'missing.csv' does not exist"),
        ({"datasets": (str(TOPICS), str(TOPICS))}, "duplicate names"),
        (
            {"datasets": (datasets.Dataset.from_dict({"text": []}),)},
            "wrap an in-memory datasets.Dataset",
        ),
        ({"llm_batch_size": 0}, "llm_batch_size=0"),
        ({"prepend_bos": "yes"}, "prepend_bos='yes'"),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ProbingEvalConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "a/b"}, "without '/'"),
        ({"name": ""}, "non-empty string"),
        ({"text_column": ""}, "text_column=''"),
        ({"classes": ("a",)}, "at least two classes"),
        ({"classes": ("5", 5.0)}, "distinct"),
    ],
)
def test_dataset_spec_validation(kwargs: dict, message: str) -> None:
    fields = {"name": "d", "source": TOPICS, **kwargs}
    with pytest.raises(ValueError, match=message):
        ProbingDataset(**fields)


def test_other_hub_ids_load_their_train_split(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, ...]] = []

    def load_dataset(path: str, name: str | None = None, **kwargs: Any) -> Any:
        calls.append((path, name, kwargs["split"], kwargs["streaming"]))
        return datasets.Dataset.from_pandas(topics_frame())

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    (spec,) = ProbingEvalConfig(datasets=("someorg/topics",)).resolved_datasets()
    assert (spec.name, spec.source, spec.text_column, spec.label_column) == (
        "topics",
        "someorg/topics",
        "text",
        "label",
    )
    loaded = load(spec)
    assert calls == [("someorg/topics", None, "train", False)]
    assert loaded.classes == ("animals", "food", "weather")
