"""Orchestration of ``polysae-lens reproduce``: train, evaluate, report, resume.

Steps (:func:`~polysae_lens.reproduce.plan.plan_steps`), each recorded in
``reproduce_state.json`` when it finishes:

``train/poly``, ``train/linear``
    SAELens's stock ``LanguageModelSAETrainingRunner`` through
    :func:`polysae_lens.cli.run_train` (the path of ``polysae-lens train``; under
    torchrun the data-parallel path of :mod:`polysae_lens.distributed`). Saved to
    ``saes/{kind}``; an interrupted training resumes from its last checkpoint in
    ``checkpoints/{kind}``.
``recon/poly``, ``recon/linear``
    SAELens's ``run_evals``: explained variance, MSE, L0 and the CE loss with the
    SAE spliced in, on ``eval_batches`` prompt batches of the training stream.
``probe/{dataset}``
    The probing F1 and Wasserstein evaluation (:class:`polysae_lens.evals.ProbingSuite`)
    of both SAEs on one dataset (activations collected once for both).
``report``
    ``results.json``, ``table.md`` and ``plots/`` (:mod:`polysae_lens.reproduce.table`).

Heavy imports (torch, SAELens, the evaluators) happen inside the functions.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import itertools
import json
import logging
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from polysae_lens.config import PAPER_TRAINING_SETTINGS
from polysae_lens.reproduce.plan import (
    SAE_KINDS,
    PlanError,
    ReproducePlan,
    ReproduceState,
    atomic_write_json,
    plan_steps,
)
from polysae_lens.reproduce.settings import sparsifier

if TYPE_CHECKING:
    from sae_lens.config import LanguageModelSAERunnerConfig

    from polysae_lens.evals import EvalResults

logger = logging.getLogger(__name__)

__all__ = [
    "build_runner_config",
    "load_eval_results",
    "measure_step_seconds",
    "run_reproduce",
]

RECON_KEYS = (
    "explained_variance",
    "mse",
    "l0",
    "ce_loss_without_sae",
    "ce_loss_with_sae",
    "ce_loss_with_ablation",
    "ce_loss_score",
    "ce_loss_increase",
)
"""Reconstruction metrics kept from SAELens's ``run_evals`` (``ce_loss_increase`` =
``ce_loss_with_sae - ce_loss_without_sae``)."""

PROBE_SEED = 0
"""Seed of the probing tasks and probes (``ProbingEvalConfig``'s default, so the
numbers match ``polysae-lens eval``)."""


def world_size() -> int:
    """Processes of this launch (torchrun sets ``WORLD_SIZE``); 1 otherwise."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


# ---- configuration -------------------------------------------------------------


def sae_config(plan: ReproducePlan, kind: str) -> Any:
    """The training SAE config of the run's PolySAE (``kind="poly"``) or linear SAE.

    Both: the paper's d_sae, k, float32, no activation normalisation, no
    decoder-norm rescaling, AuxK coefficient 1. The linear counterpart is trained
    the same way in both recipes (only the PolySAE's init and C1 learning rate
    differ), so the comparison isolates the decoder.
    """
    from sae_lens.registry import get_sae_training_class

    import polysae_lens  # noqa: F401  (registers the PolySAE architectures)

    s = plan.setting
    sp = sparsifier(plan.sparsifier)
    architecture = sp.poly_architecture if kind == "poly" else sp.linear_architecture
    _, cfg_class = get_sae_training_class(architecture)
    kwargs: dict[str, Any] = {
        "d_in": s.d_in,
        "d_sae": s.d_sae,
        "k": s.k,
        "dtype": "float32",
        "device": plan.device,
        "normalize_activations": "none",
        "aux_loss_coefficient": 1.0,
        "rescale_acts_by_decoder_norm": False,
    }
    if plan.sparsifier == "matryoshka":
        # The notes do not give the paper's levels: ours are d_sae/16, d_sae/4, d_sae.
        kwargs["matryoshka_widths"] = sorted({max(1, s.d_sae // 16), max(1, s.d_sae // 4), s.d_sae})
    if kind == "poly":
        kwargs["poly_ranks"] = s.ranks
        if plan.paper_settings:
            kwargs.update(PAPER_TRAINING_SETTINGS)
    return cfg_class(**kwargs)


def build_runner_config(
    plan: ReproducePlan, kind: str, output_dir: Path | None, *, training_tokens: int | None = None
) -> LanguageModelSAERunnerConfig[Any]:
    """SAELens's runner config for training ``kind``: the paper's optimiser (Adam
    3e-4, betas 0.9 / 0.999, constant schedule, no warm-up), batch, context and data.

    ``output_dir`` None: nothing is saved (the dry run's measurement).
    """
    from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig

    s = plan.setting
    return LanguageModelSAERunnerConfig(
        sae=sae_config(plan, kind),
        model_name=s.model_name,
        model_class_name=s.model_class_name,
        hook_name=s.hook_name,
        dataset_path=s.dataset_path,
        is_dataset_tokenized=s.is_dataset_tokenized,
        # SAELens's default (True) makes `datasets` log an error for every
        # dataset without a loading script, which the paper's datasets are.
        dataset_trust_remote_code=False,
        streaming=True,
        context_size=s.context_size,
        prepend_bos=s.prepend_bos,
        training_tokens=training_tokens if training_tokens is not None else plan.tokens,
        train_batch_size_tokens=s.batch_size_tokens,
        store_batch_size_prompts=s.store_batch_size_prompts,
        n_batches_in_buffer=s.n_batches_in_buffer,
        lr=s.lr,
        lr_end=s.lr,
        lr_scheduler_name="constant",
        lr_warm_up_steps=0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        dtype="float32",
        model_from_pretrained_kwargs={"dtype": s.model_dtype} if s.model_dtype != "float32" else {},
        device=plan.device,
        seed=plan.seed,
        n_checkpoints=plan.n_checkpoints if output_dir is not None else 0,
        checkpoint_path=str(output_dir / "checkpoints" / kind) if output_dir is not None else None,
        output_path=str(output_dir / "saes" / kind) if output_dir is not None else None,
        logger=LoggingConfig(log_to_wandb=False),
        verbose=False,
    )


# ---- model ---------------------------------------------------------------------


def load_model(plan: ReproducePlan) -> Any:
    """The setting's model, loaded as SAELens's runner loads it."""
    import torch

    # Through the module attribute: tests replace sae_lens.load_model.load_model.
    loader = importlib.import_module("sae_lens.load_model")
    s = plan.setting
    kwargs = {"dtype": s.model_dtype} if s.model_dtype != "float32" else {}
    model = loader.load_model(
        s.model_class_name,
        s.model_name,
        device=torch.device(plan.device),
        model_from_pretrained_kwargs=kwargs,
    )
    model.eval()
    return model


class _LazyModel:
    """Loads the model at first use: a resumed run past its last model step loads none."""

    def __init__(self, plan: ReproducePlan, model: Any = None) -> None:
        self.plan = plan
        self._model = model

    def get(self) -> Any:
        if self._model is None:
            logger.info("loading %s", self.plan.setting.model_name)
            self._model = load_model(self.plan)
        return self._model


# ---- timing --------------------------------------------------------------------


@contextlib.contextmanager
def timed(device: str) -> Iterator[dict[str, float]]:
    """Wall seconds of the block (synchronising CUDA first and last, so queued
    kernels count where they ran)."""
    sync = _synchronizer(device)
    sync()
    record: dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield record
    finally:
        sync()
        record["seconds"] = time.perf_counter() - start


def _synchronizer(device: str) -> Callable[[], None]:
    if not str(device).startswith("cuda"):
        return lambda: None
    import torch

    return torch.cuda.synchronize


# ---- steps ---------------------------------------------------------------------


def latest_checkpoint(directory: Path) -> Path | None:
    """The checkpoint with the most training samples under ``directory`` (SAELens
    writes ``{checkpoint_path}/{run id}/{n_samples}``), if one holds a trainer state."""
    from sae_lens.constants import TRAINER_STATE_FILENAME

    best: tuple[int, Path] | None = None
    for state in directory.glob(f"*/*/{TRAINER_STATE_FILENAME}"):
        name = state.parent.name.removeprefix("final_")
        if name.isdigit() and (best is None or int(name) > best[0]):
            best = (int(name), state.parent)
    return None if best is None else best[1]


def train_step(
    plan: ReproducePlan, kind: str, output_dir: Path, model: _LazyModel
) -> dict[str, Any]:
    """Train and save one SAE; returns the step's record."""
    cfg = build_runner_config(plan, kind, output_dir)
    checkpoint = latest_checkpoint(output_dir / "checkpoints" / kind)
    if checkpoint is not None:
        logger.info("resuming %s training from %s", kind, checkpoint)
        cfg.resume_from_checkpoint = str(checkpoint)
    if plan.world_size > 1:
        try:
            from polysae_lens.distributed.runner import train_distributed
        except ImportError as e:
            raise PlanError(
                "reproduce was started with torchrun (WORLD_SIZE > 1), but this version of "
                "polysae-lens has no data-parallel training (polysae_lens.distributed): run it "
                "as one process."
            ) from e
        train_distributed(cfg)
    else:
        from polysae_lens.cli import run_train

        run_train(cfg, override_model=model.get())
    return {
        "architecture": cfg.sae.architecture(),
        "path": str(Path("saes") / kind),
        "training_tokens": plan.tokens,
        "steps": plan.n_steps,
        "resumed_from": str(checkpoint) if checkpoint is not None else None,
    }


def load_sae(output_dir: Path, kind: str, device: str) -> Any:
    from sae_lens import SAE

    import polysae_lens  # noqa: F401

    sae = SAE.load_from_disk(str(output_dir / "saes" / kind), device=device)
    sae.eval()
    return sae


def recon_step(
    plan: ReproducePlan, kind: str, output_dir: Path, model: _LazyModel
) -> dict[str, Any]:
    """SAELens's ``run_evals`` on one saved SAE; writes ``evals/recon_{kind}.json``."""
    from sae_lens import ActivationsStore
    from sae_lens.evals import EvalConfig, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler

    sae = load_sae(output_dir, kind, plan.device)
    lm = model.get()
    store = ActivationsStore.from_config(lm, build_runner_config(plan, kind, None))
    eval_config = EvalConfig(
        batch_size_prompts=plan.setting.store_batch_size_prompts,
        n_eval_reconstruction_batches=plan.eval_batches,
        compute_ce_loss=True,
        n_eval_sparsity_variance_batches=plan.eval_batches,
        compute_variance_metrics=True,
        compute_sparsity_metrics=True,
    )
    metrics, _ = run_evals(sae, store, lm, ActivationScaler(), eval_config)
    flat: dict[str, float] = {}
    for group in metrics.values():
        flat.update({k: float(v) for k, v in group.items() if isinstance(v, (int, float))})
    values = {key: flat[key] for key in RECON_KEYS if key in flat}
    values["ce_loss_increase"] = flat["ce_loss_with_sae"] - flat["ce_loss_without_sae"]
    values["tokens"] = float(flat.get("total_tokens_eval_reconstruction", 0))
    atomic_write_json(output_dir / "evals" / f"recon_{kind}.json", values)
    return {"file": f"evals/recon_{kind}.json"}


def probing_config(plan: ReproducePlan, entry: str) -> Any:
    from polysae_lens.evals import ProbingEvalConfig

    return ProbingEvalConfig(
        datasets=(entry,),
        n_train=plan.n_train,
        n_test=plan.n_test,
        protocol=plan.protocol,
        context_size=plan.setting.context_size,
        k_values=plan.k_values,
        seed=PROBE_SEED,
        cache_dir=plan.cache_dir,
        progress=False,
    )


def probe_step(
    plan: ReproducePlan, entry: str, name: str, output_dir: Path, model: _LazyModel
) -> dict[str, Any]:
    """Probing F1 and Wasserstein distances of both SAEs on one dataset; writes
    ``evals/probe_{name}.json`` (each SAE's ``EvalResults.to_dict()``)."""
    from polysae_lens.evals import ProbingSuite

    suite = ProbingSuite(
        model.get(),
        plan.setting.hook_name,
        probing_config(plan, entry),
        prepend_bos=plan.setting.prepend_bos,
    )
    report = {
        kind: suite.evaluate(load_sae(output_dir, kind, plan.device)).to_dict()
        for kind in SAE_KINDS
    }
    atomic_write_json(output_dir / "evals" / f"probe_{name}.json", report)
    return {"file": f"evals/probe_{name}.json", "collections": suite.n_collections}


def load_eval_results(output_dir: Path, plan: ReproducePlan, kind: str) -> EvalResults:
    """One SAE's results over every dataset, rebuilt from the per-dataset files."""
    from polysae_lens.evals import EvalResults, ProbeScore, TaskResult

    tasks = []
    groups: dict[str, str] = {}
    for name in plan.dataset_names:
        data = json.loads((output_dir / "evals" / f"probe_{name}.json").read_text())[kind]
        groups.update(data["dataset_groups"])
        for task in data["tasks"]:
            probing = task["probing"]
            sae_probes, model_probes = {}, {}
            for key, f1 in probing.items():
                if key.startswith("f1_"):
                    probe = key.removeprefix("f1_")
                    sae_probes[probe] = ProbeScore(f1, probing[f"accuracy_{probe}"])
                elif key.startswith("model_f1_"):
                    probe = key.removeprefix("model_f1_")
                    model_probes[probe] = ProbeScore(f1, probing[f"model_accuracy_{probe}"])
            w = task["wasserstein"]
            tasks.append(
                TaskResult(
                    dataset=task["dataset"],
                    positive_class=task["class"],
                    n_train=task["n_train"],
                    n_test=task["n_test"],
                    sae_probes=sae_probes,
                    model_probes=model_probes,
                    wasserstein=w["mean"],
                    wasserstein_standardized=w["mean_standardized"],
                    latent_std=w["mean_latent_std"],
                    unconverged_probes=task["unconverged_probes"],
                )
            )
    return EvalResults(tasks=tuple(tasks), k_values=tuple(plan.k_values), dataset_groups=groups)


def assemble_results(
    plan: ReproducePlan, state: ReproduceState, output_dir: Path
) -> dict[str, Any]:
    """The ``results.json`` document of a finished run."""
    from polysae_lens.reproduce.table import PAPER_REFERENCE

    saes: dict[str, Any] = {}
    for kind in SAE_KINDS:
        evaluation = load_eval_results(output_dir, plan, kind)
        recon = json.loads((output_dir / "evals" / f"recon_{kind}.json").read_text())
        probing = evaluation.probing_metrics()
        wasserstein = evaluation.wasserstein_metrics()
        summary = {f"f1_k{k}": probing[f"probing/mean_f1_k{k}"] for k in plan.k_values}
        summary["wasserstein_median"] = wasserstein["wasserstein/median"]
        summary["wasserstein_mean"] = wasserstein["wasserstein/mean"]
        summary.update({k: recon[k] for k in ("explained_variance", "mse", "ce_loss_increase")})
        saes[kind] = {
            **state.steps[f"train/{kind}"],
            "summary": summary,
            "reconstruction": recon,
            "metrics": {**probing, **wasserstein},
            "datasets": evaluation.datasets,
        }
    seconds = {
        step: record.get("seconds", 0.0) for step, record in state.steps.items() if step != "report"
    }
    total = sum(seconds.values())
    on_gpu = str(plan.device).startswith("cuda")
    return {
        "plan": plan.to_dict(),
        "recipe": plan.recipe,
        "saes": saes,
        "paper": PAPER_REFERENCE,
        "time": {
            "device": plan.device,
            "world_size": plan.world_size,
            "seconds_per_step": seconds,
            "total_seconds": total,
            # Each process holds one device for the whole step.
            "gpu_seconds": total * plan.world_size if on_gpu else None,
        },
        "versions": {n: _version(n) for n in ("polysae-lens", "sae-lens", "torch")},
    }


# ---- the run -------------------------------------------------------------------


@dataclass
class RunOutcome:
    results: dict[str, Any] | None
    """``results.json``'s content (None on ranks other than 0)."""
    steps_run: list[str]
    """Steps this call ran (the rest were done before)."""


def run_reproduce(
    plan: ReproducePlan,
    output_dir: str | Path,
    state: ReproduceState,
    *,
    model: Any = None,
    after_step: Callable[[str], None] | None = None,
) -> RunOutcome:
    """Run every unfinished step of ``plan`` in ``output_dir``, recording each in
    ``state`` (saved after each step). ``model``: an already-loaded model to use
    instead of loading the setting's (tests, notebooks). ``after_step`` is called
    with each finished step id."""
    from polysae_lens.reproduce.table import write_report

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    lazy = _LazyModel(plan, model)
    is_main = rank() == 0
    if is_main:
        state.save(out)
    ran: list[str] = []
    entries = dict(zip(plan.dataset_names, plan.datasets, strict=True))
    for step in plan_steps(plan):
        if state.is_done(step):
            continue
        family, _, name = step.partition("/")
        if family != "train" and not is_main:
            break  # rank 0 evaluates; the others are done after training
        logger.info("reproduce step %s", step)
        with timed(plan.device) as clock:
            if family == "train":
                record = train_step(plan, name, out, lazy)
            elif family == "recon":
                record = recon_step(plan, name, out, lazy)
            elif family == "probe":
                record = probe_step(plan, entries[name], name, out, lazy)
            else:
                write_report(assemble_results(plan, state, out), out)
                record = {}
        record.update(seconds=clock["seconds"], device=plan.device, world_size=plan.world_size)
        state.mark_done(step, **record)
        if is_main:
            state.save(out)
        ran.append(step)
        logger.info("reproduce step %s done in %.1f s", step, clock["seconds"])
        if after_step is not None:
            after_step(step)
    results: dict[str, Any] | None = None
    if is_main:
        results = json.loads((out / "results.json").read_text())
    return RunOutcome(results=results, steps_run=ran)


# ---- dry run: time per step --------------------------------------------------------


def measure_step_seconds(plan: ReproducePlan, n_steps: int, model: Any = None) -> dict[str, float]:
    """Seconds per optimizer step of each SAE, from a short real training run
    (the same runner, model and data, nothing saved): the median gap between
    consecutive optimizer steps after the first (which includes start-up).

    The gaps include generating activations with the model, amortised over
    SAELens's buffer only as far as ``n_steps`` reaches.
    """
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from polysae_lens.cli import run_train

    if n_steps < 2:
        raise PlanError(f"--measure-steps {n_steps} is too few: pass 2 or more (or 0 to skip).")
    lm = _LazyModel(plan, model).get()
    sync = _synchronizer(plan.device)
    seconds: dict[str, float] = {}
    for kind in SAE_KINDS:
        stamps: list[float] = []

        def stamp(optimizer: Any, args: Any, kwargs: Any, stamps: list[float] = stamps) -> None:
            sync()
            stamps.append(time.perf_counter())

        cfg = build_runner_config(
            plan, kind, None, training_tokens=(n_steps + 1) * plan.setting.batch_size_tokens
        )
        handle = register_optimizer_step_post_hook(stamp)
        try:
            with torch.random.fork_rng(devices=[]):
                run_train(cfg, override_model=lm)
        finally:
            handle.remove()
        gaps = [b - a for a, b in itertools.pairwise(stamps)]
        seconds[kind] = statistics.median(gaps) if gaps else float("nan")
    return seconds


def with_device(plan: ReproducePlan, device: str) -> ReproducePlan:
    return replace(plan, device=device)


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
