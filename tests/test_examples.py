"""The README's main command runs end to end (on a small budget)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_synthetic_example_trains_both_saes() -> None:
    results = _load("train_synthetic").main(
        ["--d-in", "16", "--num-features", "32", "--d-sae", "64", "--k", "4", "--samples", "20000"]
    )
    assert set(results) == {"topk (SAELens)", "poly (PolySAE)"}
    for row in results.values():
        assert all(math.isfinite(v) for v in row.values())
        assert row["l0"] == 4
        assert 0 < row["explained_variance"] <= 1
    assert results["poly (PolySAE)"]["orthogonality_error"] <= 1e-5
