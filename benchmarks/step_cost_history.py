"""PolySAE's training-step cost now against an earlier commit's, measured in one run.

Issue 13 asks that the cost per step stay within 10% of the cost on the day it
was filed. ``training_step.py --contenders poly poly_previous`` answers a
narrower question (what the new defaults cost over the old ones *in today's
code*); this script answers the issue's: the package as it is against the
package as it was at ``--against`` (default: the commit the issue was filed
on), each with its own defaults.

The two trees cannot share a process, so runs alternate between them, one
fresh process each (``--runs`` per tree). Every process times SAELens's TopK
step beside PolySAE's, both through SAELens's own ``SAETrainer.step``; TopK's
code is the installed SAELens's in both trees, so ``poly / topk`` within one
process removes the machine's drift between processes (on a shared machine the
absolute step times move by up to 50% from run to run). Two orders are timed:
``mixed`` (the two contenders round-robin, each step after the other's, whose
larger working set evicts the caches) and ``alone`` (blocks of steps of one
contender). The cost is the median over run pairs of
``(poly / topk)_now / (poly / topk)_then - 1``, and beside it the plain
``poly_now / poly_then - 1`` of the same pairs (processes adjacent in time): TopK's
own step time varies from process to process too (it is memory-bound), so
neither is exact, and where they disagree the measurement is noise.

    python benchmarks/step_cost_history.py                    # small shape, 6 runs per tree
    python benchmarks/step_cost_history.py --shapes gpt2 --runs 3 --repeats 7
    python benchmarks/step_cost_history.py --against 4e2c482

The earlier tree is checked out with ``git worktree`` into a temporary folder
(removed afterwards); the child processes import only what both trees have.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ISSUE_13_FILED_ON = "20fae18"
"""The last commit before issue 13's first (21a94dd, the in-class ground truth)."""


def child(shape_name: str, repeats: int, threads: int | None) -> dict[str, float]:
    """Medians of the TopK and PolySAE steps in this process (the package on
    ``sys.path`` is whichever tree the parent chose)."""
    import torch

    sys.path.insert(0, str(HERE))
    from _common import (
        SHAPES,
        make_trainer,
        median_times,
        poly_topk_training_sae,
        topk_training_sae,
    )

    if threads is not None:
        torch.set_num_threads(threads)
    shape = SHAPES[shape_name]
    torch.manual_seed(0)
    topk = topk_training_sae(shape)
    torch.manual_seed(0)
    poly = poly_topk_training_sae(shape)
    batch = torch.randn(shape.batch, shape.d_in, generator=torch.Generator().manual_seed(1))
    trainers = {"poly": make_trainer(poly, shape, False), "topk": make_trainer(topk, shape, False)}
    steps: dict[str, Callable[[], Any]] = {
        name: (lambda t=trainer: t.step(batch)) for name, trainer in trainers.items()
    }
    mixed = median_times(steps, repeats)
    # alone: one contender's steps back to back, the blocks alternating
    alone: dict[str, list[float]] = {name: [] for name in steps}
    for block in range(4):
        names = list(steps)[block % 2 :] + list(steps)[: block % 2]
        for name in names:
            alone[name].append(median_times({name: steps[name]}, max(3, repeats // 4))[name])
    return {
        **{f"{name}_mixed": seconds for name, seconds in mixed.items()},
        **{f"{name}_alone": statistics.median(values) for name, values in alone.items()},
    }


def run_child(src: Path, shape: str, repeats: int, threads: int | None) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run(
        [sys.executable, __file__, "--child", shape, str(repeats), str(threads or 0)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def relative_cost(
    now: list[dict[str, float]], then: list[dict[str, float]], order: str, yardstick: bool
) -> list[float]:
    """For each pair of runs (adjacent in time), ``poly_now / poly_then - 1``, with
    each divided by its own process's TopK step first if ``yardstick``."""
    key_poly, key_topk = f"poly_{order}", f"topk_{order}"

    def step(run: dict[str, float]) -> float:
        return run[key_poly] / run[key_topk] if yardstick else run[key_poly]

    return [step(a) / step(b) - 1 for a, b in zip(now, then, strict=True)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--against", default=ISSUE_13_FILED_ON, help="git revision to compare with")
    parser.add_argument("--shapes", nargs="+", default=["small"], choices=["small", "gpt2", "tiny"])
    parser.add_argument("--runs", type=int, default=6, help="processes per tree and shape")
    parser.add_argument("--repeats", type=int, default=40, help="timed rounds per process")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per process (default: torch's)"
    )
    parser.add_argument("--json", default=None, help="write every run's medians here")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.repeats < 1:
        parser.error(f"--runs {args.runs} / --repeats {args.repeats}: both must be at least 1")
    revision = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--verify", f"{args.against}^{{commit}}"],
        capture_output=True,
        text=True,
    )
    if revision.returncode != 0:
        parser.error(f"--against {args.against!r} is not a commit of {REPO}: {revision.stderr}")
    commit = revision.stdout.strip()
    report: dict[str, Any] = {"against": commit, "shapes": {}}
    with tempfile.TemporaryDirectory(prefix="polysae-then-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), commit],
            check=True,
            capture_output=True,
        )
        try:
            trees = {"now": REPO / "src", "then": tree / "src"}
            for shape in args.shapes:
                runs: dict[str, list[dict[str, float]]] = {"now": [], "then": []}
                for index in range(args.runs):
                    # alternate which tree goes first, as the contenders within a run do
                    order = ["now", "then"] if index % 2 == 0 else ["then", "now"]
                    for name in order:
                        runs[name].append(run_child(trees[name], shape, args.repeats, args.threads))
                report["shapes"][shape] = runs
                print_shape(shape, commit, runs)
        finally:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                capture_output=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


def print_shape(shape: str, commit: str, runs: dict[str, list[dict[str, float]]]) -> None:
    print(f"\nshape {shape}: PolySAE step now against {commit[:7]}, {len(runs['now'])} runs each")
    print(
        f"{'order':6s} {'poly/topk now':>13s} {'then':>6s} "
        f"{'cost, TopK yardstick (median, range)':>38s} {'cost, plain (median, range)':>30s}"
    )
    for order in ("mixed", "alone"):
        ratios = {
            name: statistics.median(r[f"poly_{order}"] / r[f"topk_{order}"] for r in rs)
            for name, rs in runs.items()
        }
        cells = []
        for yardstick in (True, False):
            costs = relative_cost(runs["now"], runs["then"], order, yardstick)
            cells.append(
                f"{statistics.median(costs):+.1%} ({min(costs):+.1%} to {max(costs):+.1%})"
            )
        print(
            f"{order:6s} {ratios['now']:13.3f} {ratios['then']:6.3f} {cells[0]:>38s} {cells[1]:>30s}"
        )


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]) or None)))
    else:
        main()
