"""Standalone probing / Wasserstein evaluation of any SAELens SAE.

The ``polysae-lens eval`` subcommand (wired in :mod:`polysae_lens.cli`) is
:func:`add_eval_arguments` (its flags) plus :func:`eval_command` (its run
function); :func:`run_standalone_eval` is the same evaluation as a Python call.

Example::

    polysae-lens eval --sae out/poly --datasets ag_news europarl --output poly.json
    polysae-lens eval --release gpt2-small-res-jb --sae-id blocks.8.hook_resid_pre \\
        --datasets my_labels.csv --text-column sentence --label-column topic

``--protocol saebench`` (default) samples and tokenizes texts as SAEBench does,
as in the paper; ``--protocol native`` keeps the natural class mix and prepends
BOS (see ``ProbingEvalConfig.protocol``).

The SAE (a directory from ``save_inference_model`` or a training checkpoint, or a
SAELens ``from_pretrained`` release) brings its model name, hook and BOS setting
in its metadata; ``--model-name`` / ``--hook-name`` override them. Every SAELens
architecture works, PolySAE or not. The JSON holds the configuration, every metric
key (see :mod:`polysae_lens.evals.results`), per-dataset means and every task.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from polysae_lens.evals.config import CACHE_DTYPES, ProbingEvalConfig
from polysae_lens.evals.datasets import LOCAL_SUFFIXES, PAPER_DATASET_NAMES, ProbingDataset
from polysae_lens.evals.evaluator import ProbingSuite
from polysae_lens.evals.results import EvalResults
from polysae_lens.evals.saebench import PROTOCOLS

logger = logging.getLogger(__name__)

__all__ = [
    "StandaloneEvalResult",
    "add_eval_arguments",
    "build_config",
    "eval_command",
    "format_results_table",
    "run_standalone_eval",
]

PROG = "polysae-lens eval"
DEFAULT_OUTPUT = "probing_eval.json"


@dataclass(frozen=True)
class StandaloneEvalResult:
    """What :func:`run_standalone_eval` produced."""

    results: EvalResults
    report: dict[str, Any]
    """The JSON document (also written to ``output`` if given)."""
    output: Path | None


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``eval`` subcommand's flags to ``parser``."""
    parser.description = (
        "Score an SAELens SAE (PolySAE or any other architecture) with the paper's "
        "sparse-probing F1 and class-conditional Wasserstein distance; write JSON and "
        "print a table."
    )
    source = parser.add_argument_group("SAE and model")
    source.add_argument(
        "--sae", metavar="PATH", help="SAE directory (save_inference_model or a checkpoint)"
    )
    source.add_argument("--release", help="SAELens pretrained release (with --sae-id)")
    source.add_argument("--sae-id", help="SAE id within --release")
    source.add_argument(
        "--model-name", help="model to load (default: the SAE's metadata model_name)"
    )
    source.add_argument(
        "--model-class-name",
        help="SAELens model class, e.g. HookedTransformer (default: the SAE's metadata)",
    )
    source.add_argument("--hook-name", help="hook point (default: the SAE's metadata hook_name)")
    source.add_argument("--device", default="cpu", help="device of the model and SAE (cpu)")

    data = parser.add_argument_group("datasets")
    data.add_argument(
        "--datasets",
        nargs="+",
        metavar="NAME_OR_FILE",
        default=list(PAPER_DATASET_NAMES),
        help="paper dataset names, local files "
        f"({', '.join(LOCAL_SUFFIXES)}) and/or HuggingFace hub ids (org/name, train split); "
        f"default: all paper datasets ({', '.join(PAPER_DATASET_NAMES)})",
    )
    data.add_argument(
        "--text-column", default="text", help="text column of local files and hub ids (text)"
    )
    data.add_argument(
        "--label-column", default="label", help="label column of local files and hub ids (label)"
    )

    defaults = ProbingEvalConfig()
    protocol = parser.add_argument_group("protocol")
    protocol.add_argument(
        "--protocol",
        choices=list(PROTOCOLS),
        default=defaults.protocol,
        help="saebench: SAEBench's dataset sampling and tokenization, as in the paper "
        "(default); native: natural class mix, no text filters, BOS prepended (the SAE's "
        "setting)",
    )
    protocol.add_argument(
        "--n-train", type=int, default=defaults.n_train, help="train texts per task (4000)"
    )
    protocol.add_argument(
        "--n-test", type=int, default=defaults.n_test, help="test texts per task (1000)"
    )
    protocol.add_argument(
        "--context-size", type=int, default=defaults.context_size, help="tokens per text (128)"
    )
    protocol.add_argument(
        "--k",
        type=int,
        nargs="+",
        default=list(defaults.k_values),
        help="latents per sparse probe (1 2 5)",
    )
    protocol.add_argument("--seed", type=int, default=defaults.seed, help="sampling seed (0)")
    protocol.add_argument(
        "--no-model-reference",
        action="store_true",
        help="skip the probes on the model's raw activations",
    )
    protocol.add_argument(
        "--llm-batch-size",
        type=int,
        default=defaults.llm_batch_size,
        help="texts per model forward pass (32)",
    )
    protocol.add_argument(
        "--sae-batch-size-tokens",
        type=int,
        default=defaults.sae_batch_size_tokens,
        help="tokens per SAE encoding batch (4096)",
    )
    protocol.add_argument(
        "--cache-dir", help="memory-map cached activations in this directory (default: RAM)"
    )
    protocol.add_argument(
        "--cache-dtype",
        choices=list(CACHE_DTYPES),
        default=defaults.cache_dtype,
        help="dtype of cached activations (float32)",
    )

    output = parser.add_argument_group("output")
    output.add_argument(
        "--output", default=DEFAULT_OUTPUT, help=f"JSON file to write ({DEFAULT_OUTPUT})"
    )
    output.add_argument("--per-task", action="store_true", help="also print one row per task")
    output.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_config(args: argparse.Namespace) -> ProbingEvalConfig:
    """The :class:`ProbingEvalConfig` of parsed ``eval`` flags."""
    datasets: list[str | ProbingDataset] = []
    for entry in args.datasets:
        path = Path(entry)
        columns = {"text_column": args.text_column, "label_column": args.label_column}
        if path.suffix.lower() in LOCAL_SUFFIXES:
            datasets.append(ProbingDataset(name=path.stem, source=path, **columns))
        elif "/" in entry and entry not in PAPER_DATASET_NAMES:
            datasets.append(ProbingDataset(name=entry.rsplit("/", 1)[-1], source=entry, **columns))
        else:
            datasets.append(entry)
    return ProbingEvalConfig(
        datasets=tuple(datasets),
        n_train=args.n_train,
        n_test=args.n_test,
        protocol=args.protocol,
        context_size=args.context_size,
        k_values=tuple(args.k),
        seed=args.seed,
        model_reference=not args.no_model_reference,
        llm_batch_size=args.llm_batch_size,
        sae_batch_size_tokens=args.sae_batch_size_tokens,
        cache_dir=args.cache_dir,
        cache_dtype=args.cache_dtype,
        progress=not args.no_progress,
    )


def eval_command(args: argparse.Namespace, rest: list[str] | None = None) -> int:
    """Run function of the ``eval`` subcommand: evaluate, write JSON, print the table.

    Returns 0, or 2 with a message on stderr for bad input (flags, files, data).
    """
    if rest:
        print(f"{PROG}: error: unrecognized arguments: {' '.join(rest)}", file=sys.stderr)
        return 2
    try:
        config = build_config(args)
        outcome = run_standalone_eval(
            sae_path=args.sae,
            release=args.release,
            sae_id=args.sae_id,
            model_name=args.model_name,
            model_class_name=args.model_class_name,
            hook_name=args.hook_name,
            device=args.device,
            config=config,
            output=args.output,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(format_results_table(outcome.results, per_task=args.per_task))
    if outcome.output is not None:
        print(f"wrote {outcome.output}")
    return 0


def run_standalone_eval(
    *,
    sae: Any = None,
    sae_path: str | Path | None = None,
    release: str | None = None,
    sae_id: str | None = None,
    model: Any = None,
    model_name: str | None = None,
    model_class_name: str | None = None,
    hook_name: str | None = None,
    device: str = "cpu",
    config: ProbingEvalConfig | None = None,
    output: str | Path | None = None,
) -> StandaloneEvalResult:
    """Evaluate one SAE with both evaluations and (optionally) write the JSON report.

    Give the SAE as an object (``sae``), a directory (``sae_path``) or a SAELens
    release (``release`` and ``sae_id``). The model is ``model`` if given, else
    loaded by SAELens's ``load_model`` from ``model_name`` / ``model_class_name``
    or the SAE's metadata. ``hook_name`` overrides the SAE's hook.

    Raises:
        ValueError: no or several SAE sources, no hook or model name, bad data.
    """
    config = config if config is not None else ProbingEvalConfig()
    sae, sae_source = _load_sae(sae, sae_path, release, sae_id, device)
    sae.eval()
    metadata = sae.cfg.metadata
    if model is None:
        model = _load_model(sae, model_name, model_class_name, device)
    hook = hook_name or getattr(metadata, "hook_name", None)
    if not hook:
        raise ValueError("the SAE's metadata has no hook_name: pass --hook-name.")
    prepend_bos = getattr(metadata, "prepend_bos", None)
    suite = ProbingSuite(
        model,
        hook,
        config,
        hook_head_index=getattr(metadata, "hook_head_index", None),
        prepend_bos=True if prepend_bos is None else bool(prepend_bos),
        model_kwargs=getattr(metadata, "model_kwargs", None) or None,
    )
    results = suite.evaluate(sae)
    report = {
        "sae": {
            **sae_source,
            "architecture": sae.cfg.architecture(),
            "d_in": int(sae.cfg.d_in),
            "d_sae": int(sae.cfg.d_sae),
            "hook_name": hook,
        },
        "model": {
            "name": model_name or getattr(metadata, "model_name", None),
            "class_name": model_class_name or getattr(metadata, "model_class_name", None),
        },
        "config": config.to_dict(),
        "versions": {name: _version(name) for name in ("polysae-lens", "sae-lens", "torch")},
        "metrics": results.metrics(per_task=True),
        **results.to_dict(),
    }
    path = None
    if output is not None:
        path = Path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, allow_nan=True) + "\n")
    return StandaloneEvalResult(results=results, report=report, output=path)


def format_results_table(results: EvalResults, per_task: bool = False) -> str:
    """A plain-text table: F1 per dataset, model reference, W1; then the summaries:
    ``mean`` (F1: the paper's, bias_in_bios sets separate), ``mean (merged)``
    (F1 with grouped datasets merged) and ``median`` (W1: the paper's Table 1)."""
    ks = [f"k{k}" for k in results.k_values]
    has_model = any(task.model_probes for task in results.tasks)
    columns = [(f"F1@{k[1:]}", f"f1_{k}") for k in ks]
    if has_model:
        columns += [(f"model F1@{k[1:]}", f"model_f1_{k}") for k in ks]
        columns.append(("model F1@all", "model_f1_all"))
    w_columns = [("W1", "mean"), ("W1/std", "mean_standardized"), ("latent std", "mean_latent_std")]
    rows: list[tuple[str, int, dict[str, float], dict[str, float]]] = []
    for dataset in results.datasets:
        tasks = results.dataset_tasks(dataset)
        rows.append(
            (
                dataset,
                len(tasks),
                results.dataset_probing(dataset),
                results.dataset_wasserstein(dataset),
            )
        )
        if per_task:
            for task in tasks:
                rows.append(
                    (
                        f"  {task.positive_class}",
                        1,
                        task.probing_values(),
                        task.wasserstein_values(),
                    )
                )
    rows.append(
        ("mean", len(results.tasks), results.probing_summary(), results.wasserstein_summary())
    )
    if len(results.groups) < len(results.datasets):
        rows.append(("mean (merged)", len(results.tasks), results.merged_probing_summary(), {}))
    medians = results.wasserstein_median_summary()
    rows.append(
        (
            "median",
            len(results.tasks),
            {},
            {k.replace("median", "mean"): v for k, v in medians.items()},
        )
    )
    name_width = max(len("dataset"), *(len(r[0]) for r in rows))
    header = [f"{'dataset':<{name_width}}", f"{'tasks':>5}"]
    header += [f"{title:>{max(7, len(title))}}" for title, _ in columns + w_columns]
    lines = ["  ".join(header)]
    for name, n_tasks, probing, wasserstein in rows:
        cells = [f"{name:<{name_width}}", f"{n_tasks:>5}"]
        # A summary that does not apply to a column leaves it blank.
        for title, key in columns:
            width = max(7, len(title))
            cells.append(f"{probing[key]:>{width}.3f}" if key in probing else " " * width)
        for title, key in w_columns:
            width = max(7, len(title))
            cells.append(f"{wasserstein[key]:>{width}.4g}" if key in wasserstein else " " * width)
        lines.append("  ".join(cells))
    return "\n".join(lines)


def _load_sae(
    sae: Any, sae_path: str | Path | None, release: str | None, sae_id: str | None, device: str
) -> tuple[Any, dict[str, Any]]:
    from sae_lens import SAE

    given = [name for name, value in (("sae", sae), ("sae_path", sae_path)) if value is not None]
    if release is not None or sae_id is not None:
        given.append("release/sae_id")
    if len(given) != 1:
        raise ValueError(
            "give exactly one SAE: --sae PATH, or --release and --sae-id"
            + (f" (got {', '.join(given)})" if given else "")
            + "."
        )
    if sae is not None:
        return sae, {"source": "object"}
    if sae_path is not None:
        path = Path(sae_path)
        if not path.exists():
            raise ValueError(f"SAE path {str(path)!r} does not exist.")
        return SAE.load_from_disk(path, device=device), {"path": str(path)}
    if release is None or sae_id is None:
        raise ValueError("--release and --sae-id must be given together.")
    return SAE.from_pretrained(release, sae_id, device=device), {
        "release": release,
        "sae_id": sae_id,
    }


def _load_model(sae: Any, model_name: str | None, model_class_name: str | None, device: str) -> Any:
    # The module, not a name imported from it: sae_lens's package namespace binds
    # `load_model` to the submodule.
    sae_lens_load_model = importlib.import_module("sae_lens.load_model")
    metadata = sae.cfg.metadata
    name = model_name or getattr(metadata, "model_name", None)
    if not name:
        raise ValueError("the SAE's metadata has no model_name: pass --model-name.")
    class_name = model_class_name or getattr(metadata, "model_class_name", None)
    kwargs = getattr(metadata, "model_from_pretrained_kwargs", None) or {}
    model = sae_lens_load_model.load_model(
        class_name or "HookedTransformer",
        name,
        device=torch.device(device),
        model_from_pretrained_kwargs=kwargs,
    )
    model.eval()
    return model


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
