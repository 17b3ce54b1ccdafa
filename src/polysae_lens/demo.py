"""``polysae-lens demo``: the compositional ground-truth study, end to end.

Trains a stock SAELens TopK SAE and a PolySAE on synthetic activations with
planted interactions (:mod:`polysae_lens.groundtruth`), scores both
(:mod:`polysae_lens.study`), writes ``results.json``, ``report.md`` and PNG
plots into ``--out`` (:mod:`polysae_lens.report`) and prints the side-by-side
table. Offline, CPU-only, seeded: the same command gives the same numbers on
the same machine.
"""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING, Any

from polysae_lens.preflight import PreflightError, check_output_dir, check_threads

# torch and the study (SAELens) load in demo_command: `demo --help` stays instant.
if TYPE_CHECKING:
    from polysae_lens.study import StudyConfig

logger = logging.getLogger(__name__)


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Train a linear TopK SAE and a PolySAE on synthetic activations with planted "
        "compositional ground truth and compare them (19 minutes measured on 2 CPU cores "
        "shared with other jobs, load average about 3.4; less on idle cores; "
        "--quick: about 10 seconds)."
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
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice)",
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


def demo_command(args: argparse.Namespace, rest: list[str]) -> int:
    check_threads(args.threads)
    check_output_dir(args.out, "--out", must_be_empty=not args.overwrite)
    import torch

    from polysae_lens.progress import complete_progress_bar
    from polysae_lens.report import format_table, summary_rows, write_outputs
    from polysae_lens.study import run_study

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cfg = demo_config(args)
    with complete_progress_bar():
        results: dict[str, Any] = run_study(cfg)
    paths = write_outputs(results, args.out)
    print(format_table(summary_rows(results)))
    print(f"\nwrote {', '.join(str(p) for p in paths)}")
    return 0
