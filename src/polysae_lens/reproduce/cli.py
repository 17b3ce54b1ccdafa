"""The ``polysae-lens reproduce`` flags and run function (wired in :mod:`polysae_lens.cli`).

Every flag is checked (:func:`plan_from_args`, :func:`~polysae_lens.reproduce.plan.open_state`)
before any model or dataset is loaded. Only the stdlib and this package's light
modules are imported at parse time, so ``reproduce --help`` answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from polysae_lens.reproduce.plan import (
    PlanError,
    ReproducePlan,
    ReproduceState,
    estimate,
    format_plan,
    open_state,
)
from polysae_lens.reproduce.settings import (
    PAPER_SETTINGS,
    SPARSIFIERS,
    Setting,
    load_setting_file,
    paper_setting,
)

logger = logging.getLogger(__name__)

__all__ = ["add_reproduce_arguments", "plan_from_args", "reproduce_command"]

DESCRIPTION = (
    "Reproduce the paper's Table 1 comparison for one setting: train a PolySAE and its "
    "linear counterpart (same sparsifier, width, k, tokens, seed) through SAELens's stock "
    "runner, evaluate both (SAEBench-protocol probing F1, Wasserstein distances, "
    "explained variance, MSE, CE-loss increase), and write results.json, table.md and plots. "
    "Rerunning the same command resumes after an interruption. Under torchrun the training "
    "runs data-parallel. Needs network access for the model and data (paper settings)."
)


def add_reproduce_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    what = parser.add_argument_group("what to reproduce")
    what.add_argument(
        "--model",
        help=f"paper setting: {', '.join(PAPER_SETTINGS)} (its hook, tokens and ranks are the paper's)",
    )
    what.add_argument(
        "--hook", help="hook name; must be the setting's unless you want another layer"
    )
    what.add_argument(
        "--setting-file",
        metavar="FILE",
        help="JSON object of polysae_lens.reproduce.settings.Setting fields: another model",
    )
    what.add_argument(
        "--sparsifier", default="topk", help=f"{' | '.join(SPARSIFIERS)} (default topk)"
    )
    what.add_argument(
        "--paper-settings",
        action="store_true",
        help="the authors' training (init_preset=authors, c1_lr_scale=1.0, "
        "u_lr_scale=1.0, gauge_lr_scale=0, and SAELens's AuxK: aux_dead_window=0, "
        "aux_k=d_in/2, aux_outside_interactions=False; no subspace fit); default: "
        "the package's PolySAE training defaults",
    )
    what.add_argument("--seed", type=int, default=42, help="training seed of both SAEs (42)")

    budget = parser.add_argument_group("budget (a quick look)")
    budget.add_argument("--tokens", type=int, help="training tokens per SAE (default: the paper's)")
    budget.add_argument(
        "--batch-size", type=int, help="tokens per optimizer step (default: the paper's 4096)"
    )
    budget.add_argument(
        "--datasets",
        nargs="+",
        metavar="NAME_OR_FILE",
        help="probing datasets: paper names or local files with text,label columns "
        "(default: the paper's eight)",
    )
    budget.add_argument("--n-train", type=int, default=4000, help="train texts per task (4000)")
    budget.add_argument(
        "--n-test", type=int, help="test texts per task (default: n-train / 4, the paper's 1000)"
    )
    budget.add_argument(
        "--eval-batches",
        type=int,
        default=10,
        help="prompt batches for MSE / explained variance / CE loss (10)",
    )
    budget.add_argument("--dataset-path", help="training text instead of the setting's")

    run = parser.add_argument_group("run")
    run.add_argument(
        "--output-dir", help="output directory (default: reproduce-{model}-{sparsifier})"
    )
    run.add_argument("--resume", action="store_true", help="require an existing run to resume")
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="discard an existing run in --output-dir (or write into a non-empty directory)",
    )
    run.add_argument("--device", default="auto", help="cuda, cpu, ... (default: cuda if available)")
    run.add_argument("--checkpoints", type=int, default=4, help="training checkpoints per SAE (4)")
    run.add_argument("--cache-dir", help="memory-map the probing activation cache here")
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan, memory and disk estimates and the measured time per step; "
        "train nothing, write nothing",
    )
    run.add_argument(
        "--measure-steps",
        type=int,
        default=5,
        help="dry run: optimizer steps to time per SAE (5; 0: do not load the model)",
    )


def plan_from_args(args: argparse.Namespace) -> ReproducePlan:
    """The plan the flags describe; :class:`PlanError` names a bad flag and its fix."""
    if args.setting_file and args.model:
        raise PlanError("give --model or --setting-file, not both.")
    if args.setting_file:
        setting: Setting = load_setting_file(args.setting_file)
    elif args.model:
        setting = paper_setting(args.model)
    else:
        raise PlanError(
            f"no setting: pass --model with one of {', '.join(PAPER_SETTINGS)} "
            "(e.g. --model gpt2 --hook blocks.8.hook_resid_post), or --setting-file FILE."
        )
    changes: dict[str, object] = {}
    if args.hook and args.hook != setting.hook_name:
        logger.warning(
            "--hook %s differs from the paper's %s for %s: the numbers are not the paper's setting",
            args.hook,
            setting.hook_name,
            setting.name,
        )
        changes["hook_name"] = args.hook
    if args.batch_size is not None:
        if args.batch_size < 1:
            raise PlanError(
                f"--batch-size {args.batch_size} is not allowed: pass a positive integer."
            )
        changes["batch_size_tokens"] = args.batch_size
    if args.dataset_path:
        changes["dataset_path"] = args.dataset_path
        changes["is_dataset_tokenized"] = False
    if changes:
        setting = dataclasses.replace(setting, **changes)  # type: ignore[arg-type]
    datasets = tuple(args.datasets) if args.datasets else _paper_dataset_names()
    for entry in datasets:
        _check_dataset(entry)
    n_test = args.n_test if args.n_test is not None else max(2, args.n_train // 4 // 2 * 2)
    return ReproducePlan(
        setting=setting,
        sparsifier=args.sparsifier,
        paper_settings=args.paper_settings,
        training_tokens=args.tokens,
        seed=args.seed,
        datasets=datasets,
        n_train=args.n_train,
        n_test=n_test,
        eval_batches=args.eval_batches,
        device=args.device,
        n_checkpoints=args.checkpoints,
        cache_dir=args.cache_dir,
        world_size=_world_size(),
    )


def _paper_dataset_names() -> tuple[str, ...]:
    # Kept in one place (evals.datasets); that module imports torch through the
    # evals package, so only the run path pays for it.
    from polysae_lens.evals.datasets import PAPER_DATASET_NAMES

    return PAPER_DATASET_NAMES


def _check_dataset(entry: str) -> None:
    path = Path(entry)
    if path.suffix.lower() in (".csv", ".tsv", ".jsonl", ".json", ".parquet"):
        if not path.is_file():
            raise PlanError(f"--datasets: local file {entry!r} does not exist.")
        return
    if "/" in entry:
        return  # a hub id
    from polysae_lens.evals.datasets import PAPER_DATASET_NAMES

    if entry not in PAPER_DATASET_NAMES:
        raise PlanError(
            f"--datasets: {entry!r} is not a paper dataset ({', '.join(PAPER_DATASET_NAMES)}), "
            "a local file (.csv, .tsv, .jsonl, .json, .parquet) or a hub id (org/name)."
        )


def _world_size() -> int:
    from polysae_lens.reproduce.run import world_size

    return world_size()


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _classes_per_dataset(plan: ReproducePlan) -> dict[str, int | None]:
    from polysae_lens.evals.datasets import PAPER_DATASET_NAMES, paper_dataset

    counts: dict[str, int | None] = {}
    for entry, name in zip(plan.datasets, plan.dataset_names, strict=True):
        classes = paper_dataset(entry).classes if entry in PAPER_DATASET_NAMES else None
        counts[name] = len(classes) if classes is not None else None
    return counts


def default_output_dir(plan: ReproducePlan) -> Path:
    return Path(f"reproduce-{plan.setting.name}-{plan.sparsifier}")


def reproduce_command(args: argparse.Namespace, rest: list[str] | None = None) -> int:
    """Run function of ``polysae-lens reproduce``; returns the exit status.

    Raises :class:`PlanError` (a ``PreflightError``-compatible ``ValueError``) for bad flags.
    """
    plan = plan_from_args(args)
    plan = dataclasses.replace(plan, device=_resolve_device(plan.device))
    output_dir = Path(args.output_dir) if args.output_dir else default_output_dir(plan)
    if args.resume and args.overwrite:
        raise PlanError("--resume and --overwrite contradict each other: pass one of them.")
    if args.dry_run:
        return _dry_run(plan, output_dir, args)
    state = open_state(plan, output_dir, resume=args.resume, overwrite=args.overwrite)
    from polysae_lens.reproduce.run import run_reproduce

    try:
        outcome = run_reproduce(plan, output_dir, state)
    except KeyboardInterrupt:
        _report_interrupt(output_dir)
        return 130
    except Exception as e:
        # polysae_lens.checkpointing.TrainingInterrupted: a signal stopped training
        # after a complete step and a checkpoint was saved.
        if type(e).__name__ != "TrainingInterrupted":
            raise
        _report_interrupt(output_dir)
        return 130
    if outcome.results is not None:
        print((output_dir / "table.md").read_text())
        print(
            f"wrote {output_dir / 'results.json'}, {output_dir / 'table.md'}, {output_dir / 'plots'}"
        )
    return 0


def _report_interrupt(output_dir: Path) -> None:
    print(
        f"polysae-lens reproduce: interrupted; finished steps are kept in {output_dir}: "
        "run the same command again to resume.",
        file=sys.stderr,
    )


def _dry_run(plan: ReproducePlan, output_dir: Path, args: argparse.Namespace) -> int:
    # The same checks as a real run, without removing or writing anything.
    existing = ReproduceState.load(output_dir) if output_dir.is_dir() else None
    done: list[str] = []
    if existing is not None and existing.fingerprint == plan.fingerprint() and not args.overwrite:
        done = [step for step, record in existing.steps.items() if record.get("status") == "done"]
    elif not args.overwrite:
        open_state(plan, output_dir, resume=args.resume, overwrite=False)
    seconds = None
    if args.measure_steps:
        from polysae_lens.reproduce.run import measure_step_seconds

        seconds = measure_step_seconds(plan, args.measure_steps)
    print(format_plan(plan, estimate(plan, _classes_per_dataset(plan)), seconds, done))
    print(f"output directory: {output_dir} (dry run: nothing written)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="polysae-lens reproduce")
    add_reproduce_arguments(parser)
    sys.exit(reproduce_command(parser.parse_args()))
