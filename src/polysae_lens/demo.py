"""``polysae-lens demo``: two ground-truth studies, end to end, side by side.

1. Sparse pairs: a stock SAELens TopK SAE, a PolySAE and its order-1 ablation
   on synthetic activations with planted interactions
   (:mod:`polysae_lens.groundtruth`, :mod:`polysae_lens.study`), judged against
   evaluation noise of one seed.
2. In-class: the same three, PolySAE with the previous defaults and the oracle on
   activations drawn from a random PolySAE decoder
   (:mod:`polysae_lens.inclass_study`), judged against seed-to-seed noise.

Writes ``results.json`` (the in-class study under ``"inclass"``), ``report.md``
and PNG plots into ``--out`` (:mod:`polysae_lens.report`,
:mod:`polysae_lens.inclass_report`) and prints the tables. Offline, CPU-only,
seeded: the same command gives the same numbers on the same machine.
"""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING, Any

from polysae_lens.preflight import PreflightError, check_output_dir, check_threads

# torch and the study (SAELens) load in demo_command: `demo --help` stays instant.
if TYPE_CHECKING:
    from polysae_lens.inclass_study import InClassStudyConfig
    from polysae_lens.study import StudyConfig

logger = logging.getLogger(__name__)


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Compare a linear TopK SAE, a PolySAE and its order-1 ablation on two kinds of "
        "synthetic activations with known ground truth: sparse planted pair interactions "
        "(one seed), and data drawn from a random PolySAE decoder, with PolySAE's previous "
        "defaults and an oracle PolySAE started at the true decoder (3 seeds, judged against "
        "seed-to-seed noise). Measured on 2 CPU cores (load average 0.2-1.0): 6.5 minutes "
        "(--quick: about 20 seconds)."
    )
    parser.add_argument("--out", default="polysae-demo", help="output directory (created)")
    parser.add_argument(
        "--quick", action="store_true", help="small data and short training (for tests)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="write into --out even if it is not empty"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of data, init and training")
    parser.add_argument(
        "--training-samples",
        type=int,
        default=None,
        help="activation vectors per SAE (default 4,000,000; 150,000 with --quick)",
    )
    parser.add_argument(
        "--inclass-steps",
        type=int,
        default=None,
        help="training steps per in-class contender and seed (default 3000; 300 with --quick)",
    )
    parser.add_argument(
        "--inclass-seeds",
        type=int,
        default=None,
        help="in-class seeds, --seed and the next ones (default 3; at least 2 for verdicts)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default 1: the SAEs are small, and on 2 cores shared with "
        "other jobs torch's own choice, a thread per core, ran --quick's sparse-pair study "
        "20x slower)",
    )


def demo_config(args: argparse.Namespace) -> StudyConfig:
    """The study configuration the flags describe."""
    from polysae_lens.study import StudyConfig, with_overrides

    if args.training_samples is not None and args.training_samples < 1:
        raise PreflightError(
            f"--training-samples {args.training_samples} is not allowed: pass a positive "
            "number of activation vectors, or leave it out for the default."
        )
    base = StudyConfig.quick(seed=args.seed) if args.quick else StudyConfig(seed=args.seed)
    return with_overrides(base, training_samples=args.training_samples)


def inclass_config(args: argparse.Namespace) -> InClassStudyConfig:
    """The in-class study configuration the flags describe."""
    from polysae_lens.inclass_study import InClassStudyConfig, with_overrides

    for flag, value in (
        ("--inclass-steps", args.inclass_steps),
        ("--inclass-seeds", args.inclass_seeds),
    ):
        if value is not None and value < 1:
            raise PreflightError(
                f"{flag} {value} is not allowed: pass a positive number, or leave it out "
                "for the default."
            )
    base = InClassStudyConfig.quick(args.seed) if args.quick else InClassStudyConfig()
    seeds = None
    if args.inclass_seeds is not None or not args.quick:
        n = args.inclass_seeds if args.inclass_seeds is not None else len(base.seeds)
        seeds = tuple(range(args.seed, args.seed + n))
    return with_overrides(base, steps=args.inclass_steps, seeds=seeds, threads=args.threads or 1)


def demo_command(args: argparse.Namespace, rest: list[str]) -> int:
    check_threads(args.threads, default="one thread")
    check_output_dir(args.out, "--out", must_be_empty=not args.overwrite)
    import torch

    from polysae_lens.inclass_report import format_inclass_table, side_by_side_table
    from polysae_lens.inclass_study import run_inclass_study
    from polysae_lens.progress import complete_progress_bar
    from polysae_lens.report import format_table, summary_rows, write_outputs
    from polysae_lens.study import run_study

    # One thread unless asked: with small matrices more threads gain little on idle
    # cores and lose badly on busy ones (OpenMP threads waiting on each other).
    threads = args.threads if args.threads is not None else 1
    torch.set_num_threads(threads)
    cfg = demo_config(args)
    icfg = inclass_config(args)
    with complete_progress_bar():
        results: dict[str, Any] = run_study(cfg)
        inclass = run_inclass_study(icfg)
    # One runtime record: the reproducibility check compares everything else.
    for key, seconds in inclass.pop("runtime_seconds").items():
        results["runtime_seconds"][f"inclass_{key}"] = seconds
    results["inclass"] = inclass
    paths = write_outputs(results, args.out)
    rows = summary_rows(results)
    print("Sparse pairs:\n")
    print(format_table(rows))
    print("\nIn-class:\n")
    print(format_inclass_table(inclass))
    print("\nSide by side:\n")
    print(side_by_side_table(results, rows))
    print(f"\nwrote {', '.join(str(p) for p in paths)}")
    return 0
