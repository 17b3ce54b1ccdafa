"""Issue 13's figures for remedy screens, from saved runs: per seed, the share of the
TopK-to-oracle MSE gap a screened PolySAE closes (in-class) or its MSE over TopK's
(linear), with the mean, spread and minimum over seeds, and the paired MSE difference
from the reports' own ``poly2`` runs, or from another screened variant (``--baseline``;
mean and 95% t interval).

``--reports``: ``benchmarks/inclass.py --json`` reports holding ``topk``, ``oracle``
(in-class) and ``poly2`` runs of the seeds; ``--screens``: the JSON lines of
``benchmarks/inclass_remedies.py`` (one run each). Nothing is trained. Example (the
tenth pass of docs/inclass-plateau.md)::

    .venv/bin/python benchmarks/inclass_gaps.py \\
        --reports benchmarks/results/epyc2core-2026-12-05/inclass_topk_seeds0-10_from_sixth_pass.json \\
        benchmarks/results/epyc2core-2026-12-05/inclass_c1sqrt_seeds0-10.json \\
        benchmarks/results/xeon2core-2026-12-05/inclass_c1sqrt_seeds11-13.json \\
        --screens benchmarks/results/xeon2core-2026-12-05/inclass_subspace_fit_seeds0-13.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from typing import Any

T95 = {
    1: 12.71,
    2: 4.30,
    3: 3.18,
    4: 2.78,
    5: 2.57,
    6: 2.45,
    7: 2.36,
    8: 2.31,
    9: 2.26,
    10: 2.23,
    11: 2.20,
    12: 2.18,
    13: 2.16,
    14: 2.14,
    15: 2.13,
    20: 2.09,
    30: 2.04,
}
"""Two-sided 95% Student t quantiles by degrees of freedom (tables; 1.96 beyond 30)."""


def t95(dof: int) -> float:
    known = [d for d in T95 if d <= dof]
    return T95[max(known)] if dof <= 30 else 1.96


def load_reports(paths: list[str]) -> dict[tuple[str, int], dict[int, float]]:
    """(run name, seed) -> {budget: MSE} from ``inclass.py`` reports (any suite)."""
    runs: dict[tuple[str, int], dict[int, float]] = {}
    for path in paths:
        with open(path) as fh:
            for rows in json.load(fh).values():
                for row in rows:
                    runs[(row["name"], row["seed"])] = {int(b): v for b, v in row["mse"].items()}
    return runs


def load_screens(paths: list[str]) -> dict[str, dict[int, dict[int, float]]]:
    """variant -> seed -> {budget: MSE} from ``inclass_remedies.py`` JSON lines."""
    screens: dict[str, dict[int, dict[int, float]]] = defaultdict(dict)
    for path in paths:
        with open(path) as fh:
            for line in fh:
                if line.strip():
                    row = json.loads(line)
                    mse = {int(b): v for b, v in row["mse"].items()}
                    screens[row["variant"]][row["seed"]] = mse
    return screens


def score(
    runs: dict[tuple[str, int], dict[int, float]], seed: int, mse: dict[int, float], budget: int
) -> float | None:
    """Gap closed against the seed's TopK and oracle; MSE / TopK's without an oracle."""
    topk = runs.get(("topk", seed))
    if topk is None:
        return None
    oracle = runs.get(("oracle", seed))
    if oracle is None:
        return mse[budget] / topk[budget]
    return (topk[budget] - mse[budget]) / (topk[budget] - oracle[budget])


def summary(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f} (min {min(values):.3f}, n {len(values)})"


def paired(diffs: list[float]) -> str:
    if len(diffs) < 2:
        return "n/a"
    mean = statistics.mean(diffs)
    half = t95(len(diffs) - 1) * statistics.stdev(diffs) / len(diffs) ** 0.5
    return f"{mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}]"


def report(reports: list[str], screens: list[str], baseline: str | None = None) -> dict[str, Any]:
    """Print and return every screened variant's figures; the paired differences are
    against the reports' ``poly2`` runs, or against the screened variant ``baseline``."""
    runs = load_reports(reports)
    screened = load_screens(screens)
    if baseline is not None and baseline not in screened:
        raise SystemExit(
            f"--baseline {baseline!r} is not among the screens' variants: {sorted(screened)}"
        )
    base_runs = {("poly2", s): mse for s, mse in screened[baseline].items()} if baseline else runs
    table: dict[str, Any] = {}
    for variant, by_seed in sorted(screened.items()):
        budgets = sorted({b for mse in by_seed.values() for b in mse})
        table[variant] = {}
        for budget in budgets:
            seeds = sorted(s for s in by_seed if score(runs, s, by_seed[s], budget) is not None)
            scores = [score(runs, s, by_seed[s], budget) for s in seeds]
            base = [s for s in seeds if ("poly2", s) in base_runs]
            base_scores = [score(runs, s, base_runs[("poly2", s)], budget) for s in base]
            diffs = [by_seed[s][budget] - base_runs[("poly2", s)][budget] for s in base]
            kind = "gap closed" if ("oracle", seeds[0]) in runs else "MSE / TopK"
            print(f"{variant} at {budget} steps, {kind} per seed {seeds}:")
            print("  " + ", ".join(f"{v:.3f}" for v in scores if v is not None))
            print(f"  screen: {summary([v for v in scores if v is not None])}")
            if base_scores:
                label = baseline or "reports' poly2"
                print(f"  {label}: {summary([v for v in base_scores if v is not None])}")
                print(f"  MSE, screen - {label} (paired, 95% t): {paired(diffs)}")
            table[variant][budget] = {"seeds": seeds, "scores": scores, "paired": diffs}
    return table


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reports", nargs="+", required=True)
    ap.add_argument("--screens", nargs="+", required=True)
    ap.add_argument(
        "--baseline", help="a screened variant to pair the others with (default: reports' poly2)"
    )
    args = ap.parse_args(argv)
    return report(args.reports, args.screens, args.baseline)


if __name__ == "__main__":
    main()
