"""The ``polysae-lens`` command line (also ``python -m polysae_lens``).

Subcommands:

``demo``
    The compositional ground-truth study: train a linear TopK SAE and a
    PolySAE on synthetic activations with planted interactions and write a
    report (:mod:`polysae_lens.demo`).

``eval``
    Score any SAELens SAE with the paper's sparse-probing F1 and Wasserstein
    distance (:mod:`polysae_lens.evals`), write JSON and print a table.

``train``
    Train an SAE through SAELens's stock ``LanguageModelSAETrainingRunner``.
    It accepts every flag of SAELens's own training CLI
    (``python -m sae_lens.llm_sae_training_runner``) plus the PolySAE config
    fields (``--poly_order``, ``--poly_ranks R1 R2 R3``, ``--lambda2_init``,
    ``--lambda3_init``, ``--stiefel_every_n_steps``,
    ``--stiefel_project_moments``). ``--architecture`` defaults to ``poly``
    (TopK PolySAE) and accepts every registered architecture, so linear
    baselines (``topk``, ``batchtopk``, ...) train with the same tool. Unlike
    SAELens's CLI, ``--seed`` seeds torch before the SAE is built, so two runs
    with the same flags start from the same weights.

New subcommands are added to :data:`SUBCOMMANDS` (see :class:`Subcommand`).

The flag parsing is SAELens's: ``sae_lens.llm_sae_training_runner._parse_cfg_args``
builds the ``--architecture`` choices from the training registry at call time,
and importing :mod:`polysae_lens` has registered the PolySAE variants there.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import logging
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from polysae_lens import preflight, train_help
from polysae_lens.train_help import DEFAULT_ARCHITECTURE, POLY_ARCHITECTURES

# Heavy modules (torch, SAELens, TransformerLens, the evaluators) are imported
# where they are used, so that `--help` and bad flags answer in about a second.
if TYPE_CHECKING:
    from sae_lens.config import HfDataset, LanguageModelSAERunnerConfig
    from sae_lens.saes.sae import TrainingSAE
    from transformer_lens.hook_points import HookedRootModule

logger = logging.getLogger(__name__)

PROG = "polysae-lens"
REQUIRED_SAE_LENS = "sae-lens >= 6.54, < 7 (developed against 6.54.12)"
_ARCHITECTURE_FLAGS = ("--architecture", "--sae")


class CLIError(preflight.PreflightError):
    """A command line that cannot be turned into a training run; the message
    says which flag is wrong and why."""


# ---- train -------------------------------------------------------------------


def parse_train_args(args: Sequence[str]) -> LanguageModelSAERunnerConfig[Any]:
    """Parse ``train`` flags into SAELens's ``LanguageModelSAERunnerConfig``.

    ``--architecture`` defaults to ``"poly"``. No flags at all, ``-h`` or
    ``--help`` print the quick help (:func:`polysae_lens.train_help.quick_help`,
    which loads no SAELens) and exit; ``--help-all`` prints SAELens's help of
    every flag of the chosen architecture and exits. Raises
    :class:`CLIError` for a bad value (unknown architecture, wrong type, a
    config that fails validation); argparse itself exits with status 2 on
    unknown flags.
    """
    args = list(args)
    if not args or "-h" in args or "--help" in args:
        sys.stdout.write(train_help.quick_help())
        raise SystemExit(0)
    full_help = "--help-all" in args
    if full_help:
        args = [("--help" if a == "--help-all" else a) for a in args]
    parse_cfg_args = _sae_lens_parser()
    architecture = _architecture_arg(args)
    if architecture is None:
        architecture = DEFAULT_ARCHITECTURE
        args = ["--architecture", DEFAULT_ARCHITECTURE, *args]
    else:
        _check_architecture(architecture)
    help_context = (
        train_help.corrected_sae_lens_help(architecture) if full_help else contextlib.nullcontext()
    )
    try:
        with _prog(f"{PROG} train"), help_context:
            cfg = parse_cfg_args(args)
    except argparse.ArgumentError as e:
        raise CLIError(str(e)) from e
    except (ValueError, TypeError) as e:
        raise CLIError(f"invalid configuration: {e}") from e
    if not any(a.lstrip("-").startswith(("dataset_trust", "nodataset_trust")) for a in args):
        cfg.dataset_trust_remote_code = _default_trust_remote_code(cfg.dataset_path)
    return cfg


def run_train(
    cfg: LanguageModelSAERunnerConfig[Any],
    *,
    override_model: HookedRootModule | None = None,
    override_dataset: HfDataset | None = None,
) -> TrainingSAE[Any]:
    """Train with SAELens's ``LanguageModelSAETrainingRunner``, checked first by
    :func:`polysae_lens.preflight.check_model`; on SIGINT/SIGTERM it stops after
    the current step, saves a resumable checkpoint and raises
    :class:`polysae_lens.checkpointing.TrainingInterrupted`.

    Seeds torch with ``cfg.seed`` before the runner builds the SAE. Without
    overrides the runner loads ``cfg.model_name`` and ``cfg.dataset_path``
    itself (network access); ``override_model`` / ``override_dataset`` are
    passed to the runner unchanged (offline use, tests). The SIGINT/SIGTERM
    handlers the runner installs are restored afterwards.
    """
    import torch

    from polysae_lens.checkpointing import CheckpointOnInterruptRunner

    torch.manual_seed(cfg.seed)
    from polysae_lens.progress import complete_progress_bar

    with _restored_signal_handlers(), complete_progress_bar():
        try:
            runner = CheckpointOnInterruptRunner(
                cfg, override_dataset=override_dataset, override_model=override_model
            )
        except ValueError as e:
            # SAELens's HookedProxyLM (AutoModelForCausalLM) checks hook names itself.
            if "hook_names not found" in str(e):
                raise preflight.PreflightError(
                    f"--hook_name {cfg.hook_name!r} is not a module of model "
                    f"{cfg.model_name!r}: use a module path of the HuggingFace model, e.g. "
                    "transformer.h.0 (GPT-2) or model.layers.0 (Llama-style)."
                ) from e
            raise
        preflight.check_model(cfg, runner.model)
        return runner.run()


def summarize(sae: TrainingSAE[Any], cfg: LanguageModelSAERunnerConfig[Any]) -> str:
    """One line describing a finished training run."""
    import torch

    from polysae_lens.sae import is_poly_sae
    from polysae_lens.stiefel import orthogonality_error

    parts = [
        f"trained {cfg.sae.architecture()} SAE",
        f"d_in={sae.cfg.d_in}",
        f"d_sae={sae.cfg.d_sae}",
        f"tokens={cfg.training_tokens}",
    ]
    if is_poly_sae(sae):
        poly_cfg: Any = sae.cfg
        parts.append(f"order={poly_cfg.poly_order}")
        parts.append(f"ranks={tuple(poly_cfg.ranks)}")
        for name in ("lambda2", "lambda3"):
            value = getattr(sae, name, None)
            if isinstance(value, torch.Tensor):
                parts.append(f"{name}={value.item():.4g}")
        parts.append(f"orthogonality_error={orthogonality_error(sae.U).item():.2e}")
    parts.append(f"saved to {cfg.output_path}" if cfg.output_path else "not saved")
    return ", ".join(parts)


def _train_command(args: argparse.Namespace, rest: list[str]) -> int:
    # --overwrite and --shard_latents are the plugin's own flags: SAELens's parser never sees them.
    overwrite = "--overwrite" in rest
    rest, shards = _pop_shard_latents(rest)
    cfg = parse_train_args([a for a in rest if a != "--overwrite"])
    # Before any model is loaded: the paths the run writes and wandb's credentials.
    preflight.check_output_dir(cfg.output_path, "--output_path", must_be_empty=not overwrite)
    preflight.check_output_dir(cfg.checkpoint_path, "--checkpoint_path", must_be_empty=False)
    preflight.check_wandb(cfg.logger.log_to_wandb)
    from polysae_lens.distributed.process_group import launched_with_torchrun

    if shards is not None:
        return _train_latent_sharded(cfg, shards)
    if launched_with_torchrun():
        return _train_data_parallel(cfg)
    sae = run_train(cfg)
    print(summarize(sae, cfg))
    return 0


def _train_data_parallel(cfg: LanguageModelSAERunnerConfig[Any]) -> int:
    """One rank of ``torchrun --nproc-per-node N -m polysae_lens train ...``
    (:mod:`polysae_lens.distributed`); rank 0 prints the summary."""
    from polysae_lens.distributed.process_group import env_rank, env_world_size
    from polysae_lens.distributed.runner import check_world_size, train_distributed

    try:
        check_world_size(cfg, env_world_size())
    except ValueError as e:
        raise CLIError(str(e)) from e
    sae = train_distributed(cfg)
    if env_rank() == 0:
        print(summarize(sae, cfg))
    return 0


SHARD_LATENTS_FLAGS = ("--shard_latents", "--shard-latents")


def _pop_shard_latents(args: list[str]) -> tuple[list[str], int | None]:
    """``args`` without ``--shard_latents S`` (also ``--shard-latents``, ``=S``), and S."""
    kept: list[str] = []
    shards: int | None = None
    i = 0
    while i < len(args):
        flag, eq, value = args[i].partition("=")
        if flag not in SHARD_LATENTS_FLAGS:
            kept.append(args[i])
            i += 1
            continue
        if not eq:
            if i + 1 >= len(args):
                raise CLIError(f"{flag} expects a number of shards, e.g. {flag} 2.")
            value = args[i + 1]
            i += 1
        i += 1
        try:
            shards = int(value)
        except ValueError:
            raise CLIError(
                f"{flag} {value!r} is not a whole number of shards, e.g. {flag} 2."
            ) from None
        if shards < 1:
            raise CLIError(f"{flag} {shards} must be at least 1.")
    return kept, shards


def _train_latent_sharded(cfg: LanguageModelSAERunnerConfig[Any], shards: int) -> int:
    """One rank of ``torchrun ... -m polysae_lens train ... --shard_latents S``
    (:mod:`polysae_lens.distributed.sharded_runner`); rank 0 prints the summary."""
    from polysae_lens.distributed.process_group import env_world_size, launched_with_torchrun
    from polysae_lens.distributed.sharded_runner import check_sharding, train_sharded

    if not launched_with_torchrun():
        raise CLIError(
            f"--shard_latents {shards} splits the latents over the ranks of a multi-process "
            f"launch: torchrun --nproc-per-node N -m polysae_lens train ... --shard_latents {shards}."
        )
    try:
        check_sharding(cfg, env_world_size(), shards)
    except ValueError as e:
        raise CLIError(str(e)) from e
    sae = train_sharded(cfg, shards)
    if sae is not None:
        print(summarize(sae, cfg))
    return 0


def _configure_train(parser: argparse.ArgumentParser) -> None:
    # Every flag is SAELens's: they are forwarded, unparsed, to its parser.
    parser.description = train_help.DESCRIPTION


def _configure_eval(parser: argparse.ArgumentParser) -> None:
    from polysae_lens.evals.cli import add_eval_arguments

    add_eval_arguments(parser)


def _eval_command(args: argparse.Namespace, rest: list[str]) -> int:
    from polysae_lens.evals.cli import eval_command

    preflight.check_output_file(getattr(args, "output", None), "--output")
    sae_path = getattr(args, "sae", None)
    if sae_path and Path(sae_path).is_file():
        raise CLIError(
            f"--sae {sae_path} is a file: pass the directory that holds cfg.json and the "
            f"weights, e.g. --sae {Path(sae_path).parent}."
        )
    return eval_command(args, rest)


def _configure_demo(parser: argparse.ArgumentParser) -> None:
    from polysae_lens.demo import add_demo_arguments

    add_demo_arguments(parser)


def _demo_command(args: argparse.Namespace, rest: list[str]) -> int:
    from polysae_lens.demo import demo_command

    return demo_command(args, rest)


# -- reproduce (issue #17): polysae_lens.reproduce; its parser imports no torch --


def _configure_reproduce(parser: argparse.ArgumentParser) -> None:
    from polysae_lens.reproduce.cli import add_reproduce_arguments

    add_reproduce_arguments(parser)


def _reproduce_command(args: argparse.Namespace, rest: list[str]) -> int:
    from polysae_lens.reproduce.cli import reproduce_command
    from polysae_lens.reproduce.settings import SettingError

    try:
        return reproduce_command(args, rest)
    except SettingError as e:
        raise CLIError(str(e)) from e


# -- end reproduce --


# ---- subcommand registry -----------------------------------------------------


@dataclass(frozen=True)
class Subcommand:
    """One ``polysae-lens`` subcommand.

    ``configure`` adds the subcommand's own arguments to its parser. With
    ``forward_args`` the subcommand parses its arguments itself: argparse
    hands it every argument it does not know (``train`` forwards them to
    SAELens's parser). ``run`` receives the parsed namespace and the forwarded
    arguments and returns the exit status.
    """

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, list[str]], int]
    forward_args: bool = False


SUBCOMMANDS: list[Subcommand] = [
    Subcommand(
        name="train",
        help="train a PolySAE (or any SAELens architecture) on a language model",
        configure=_configure_train,
        run=_train_command,
        forward_args=True,
    ),
    Subcommand(
        name="eval",
        help="score an SAE with the paper's sparse-probing F1 and Wasserstein distance",
        configure=_configure_eval,
        run=_eval_command,
    ),
    Subcommand(
        name="demo",
        help="compare PolySAE with a linear SAE on synthetic compositional ground truth",
        configure=_configure_demo,
        run=_demo_command,
    ),
    Subcommand(
        name="reproduce",
        help="reproduce the paper's PolySAE-vs-linear comparison (train, evaluate, table)",
        configure=_configure_reproduce,
        run=_reproduce_command,
    ),
]
"""The subcommands of ``polysae-lens``, in help order."""


def build_parser(configure: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The top-level parser, with one sub-parser per entry of :data:`SUBCOMMANDS`.

    Only the sub-parsers named in ``configure`` (all if None) get their own
    arguments: configuring ``eval`` imports the evaluators, which ``train --help``
    should not pay for.
    """
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="PolySAE (sparse autoencoders with a polynomial decoder) for SAELens.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for sub in SUBCOMMANDS:
        sub_parser = subparsers.add_parser(sub.name, help=sub.help, add_help=not sub.forward_args)
        if configure is None or sub.name in configure:
            sub.configure(sub_parser)
        sub_parser.set_defaults(subcommand=sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``polysae-lens`` and ``python -m polysae_lens``; returns the
    exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # The subcommand is the first word that is not an option (top-level options take no value).
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(configure=[command] if command else [])
    args, rest = parser.parse_known_args(argv)
    sub: Subcommand | None = getattr(args, "subcommand", None)
    if sub is None:
        parser.print_help(sys.stderr)
        return 2
    if rest and not sub.forward_args:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return sub.run(args, rest)
    except preflight.PreflightError as e:
        print(f"{PROG} {sub.name}: error: {e}", file=sys.stderr)
        return 2
    except preflight.NonFiniteInputError as e:
        print(f"{PROG} {sub.name}: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        from polysae_lens.checkpointing import TrainingInterrupted

        if not isinstance(e, TrainingInterrupted):
            raise
        print(f"{PROG} {sub.name}: {e}", file=sys.stderr)
        return 128 + e.signum  # the shell's status for death by that signal


# ---- helpers -----------------------------------------------------------------


def _sae_lens_parser() -> Callable[[Sequence[str]], LanguageModelSAERunnerConfig[Any]]:
    """SAELens's training-CLI parser, or a clear error naming the needed version."""
    try:
        from sae_lens import llm_sae_training_runner

        parse_cfg_args = llm_sae_training_runner._parse_cfg_args
    except (ImportError, AttributeError) as e:
        raise RuntimeError(
            f"'{PROG} train' reuses SAELens's training CLI "
            "(sae_lens.llm_sae_training_runner._parse_cfg_args), which the installed "
            f"sae-lens {_installed_sae_lens()} does not provide; install {REQUIRED_SAE_LENS}."
        ) from e
    return parse_cfg_args


def _architecture_arg(args: Sequence[str]) -> str | None:
    """The value of ``--architecture`` (alias ``--sae``), if given."""
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if flag in _ARCHITECTURE_FLAGS:
            if eq:
                return value
            if i + 1 < len(args):
                return args[i + 1]
            raise CLIError(f"{flag} expects a value, e.g. {flag} {DEFAULT_ARCHITECTURE}.")
    return None


def _check_architecture(architecture: str) -> None:
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

    if architecture not in SAE_TRAINING_CLASS_REGISTRY and Path(architecture).exists():
        raise CLIError(
            f"--sae {architecture} is a path, but in '{PROG} train' --sae is SAELens's alias "
            "of --architecture: to start from a saved SAE pass --from_pretrained_path "
            f"{architecture}; to evaluate one, '{PROG} eval --sae {architecture}'."
        )
    if architecture not in SAE_TRAINING_CLASS_REGISTRY:
        others = sorted(set(SAE_TRAINING_CLASS_REGISTRY) - set(POLY_ARCHITECTURES))
        raise CLIError(
            f"unknown architecture {architecture!r}. PolySAE architectures: "
            f"{', '.join(POLY_ARCHITECTURES)}; other SAELens architectures: {', '.join(others)}."
        )


@contextlib.contextmanager
def _prog(prog: str) -> Iterator[None]:
    """Make argparse messages from SAELens's parser name ``prog``: it takes its
    program name from ``sys.argv[0]`` and takes no ``prog`` argument."""
    saved = sys.argv[:1]
    sys.argv[:1] = [prog]
    try:
        yield
    finally:
        sys.argv[:1] = saved


@contextlib.contextmanager
def _restored_signal_handlers() -> Iterator[None]:
    """The runner installs SIGINT/SIGTERM handlers and never removes them."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)


def _default_trust_remote_code(dataset_path: str) -> bool:
    """SAELens's default is True, but datasets >= 4 runs no loading scripts and logs an
    error for every dataset loaded with it, as does any version for a local directory."""
    try:
        datasets_major = int(importlib.metadata.version("datasets").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        datasets_major = 0
    return not (datasets_major >= 4 or (bool(dataset_path) and Path(dataset_path).exists()))


def _installed_sae_lens() -> str:
    try:
        return importlib.metadata.version("sae-lens")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def _version() -> str:
    try:
        return importlib.metadata.version("polysae-lens")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
