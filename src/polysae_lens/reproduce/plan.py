"""The plan of a ``reproduce`` run, its resume state and its cost estimates.

Pure functions and small dataclasses; no torch or SAELens import.

The plan is a fixed list of steps (:func:`plan_steps`): train the PolySAE, train
its linear counterpart, measure each one's reconstruction, then one probing /
Wasserstein step per dataset (both SAEs on the same cached model activations),
then the report. ``reproduce_state.json`` in the output directory records the
plan and every finished step, written atomically, so an interrupted run
continues with the first unfinished step.
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from polysae_lens.reproduce.settings import Setting, SettingError, sparsifier

__all__ = [
    "STATE_FILENAME",
    "Estimates",
    "ReproducePlan",
    "ReproduceState",
    "estimate",
    "format_bytes",
    "format_plan",
    "plan_steps",
    "sae_param_count",
]

STATE_FILENAME = "reproduce_state.json"
STATE_FORMAT = "polysae-lens-reproduce/1"
SAE_KINDS = ("poly", "linear")
"""The two SAEs of a run: the PolySAE and its linear counterpart."""
OUTPUT_NAMES = (
    STATE_FILENAME,
    "saes",
    "checkpoints",
    "evals",
    "results.json",
    "table.md",
    "plots",
)
"""What a run writes into its output directory (``--overwrite`` removes these only)."""


class PlanError(SettingError):
    """Flags that cannot make a run; the message names the value and the fix."""


@dataclass(frozen=True)
class ReproducePlan:
    """Everything that decides a run's numbers (and a few things that do not)."""

    setting: Setting
    """Model, hook, data and SAE shape (:mod:`polysae_lens.reproduce.settings`)."""
    sparsifier: str = "topk"
    """``topk``, ``batchtopk`` or ``matryoshka`` (both SAEs use it)."""
    paper_settings: bool = False
    """True: the authors' recipe (``config.PAPER_TRAINING_SETTINGS``:
    ``init_preset="authors"``, ``c1_lr_scale=1.0``, ``u_lr_scale=1.0``,
    ``gauge_lr_scale=0``, and SAELens's AuxK: ``aux_dead_window=0``,
    ``aux_k="d_in/2"``, ``aux_outside_interactions=False``; no subspace fit);
    False: the package's PolySAE training defaults. Everything else is the
    paper's in both (lr, batch, no rescaling, AuxK coefficient 1)."""
    training_tokens: int | None = None
    """Tokens per SAE; ``None``: the setting's (the paper's budget)."""
    seed: int = 42
    """Seed of both SAEs' initialisation and of the data order."""
    datasets: tuple[str, ...] = ()
    """Probing datasets (paper names or local files); empty: the paper's eight."""
    n_train: int = 4000
    """Train texts per probing task (paper: 4000)."""
    n_test: int = 1000
    """Test texts per probing task (paper: 1000)."""
    protocol: str = "saebench"
    """Probing protocol (``ProbingEvalConfig.protocol``; the paper's: saebench)."""
    k_values: tuple[int, ...] = (1, 2, 5)
    """Latents per sparse probe (paper: 1, 2, 5)."""
    eval_batches: int = 10
    """Prompt batches of the reconstruction / CE-loss evaluation (SAELens
    ``n_eval_reconstruction_batches``)."""
    # Not part of the fingerprint: they change where or how fast, not the numbers.
    device: str = "cpu"
    n_checkpoints: int = 4
    """Training checkpoints per SAE (an interrupted training resumes from the last)."""
    cache_dir: str | None = None
    """Memory-map the probing activation cache here (default: RAM)."""
    world_size: int = 1
    """Processes training data-parallel (torchrun); 1 otherwise."""

    NOT_FINGERPRINTED = ("device", "n_checkpoints", "cache_dir", "world_size")

    def __post_init__(self) -> None:
        sparsifier(self.sparsifier)  # raises with the allowed names
        tokens = self.tokens
        batch = self.setting.batch_size_tokens
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise PlanError(f"--tokens {tokens!r} is not allowed: pass a positive integer.")
        # An explicit budget must fill whole batches. The paper's own budgets
        # (300M, 500M) do not; SAELens then runs ceil(tokens / batch) steps.
        if self.training_tokens is not None and tokens % batch:
            lower, upper = tokens // batch * batch, (tokens // batch + 1) * batch
            hint = f"{lower} or {upper}" if lower else f"{upper}"
            raise PlanError(
                f"--tokens {tokens} is not a multiple of the batch of {batch} tokens: pass "
                f"{hint} (or change --batch-size)."
            )
        for name, minimum in (("n_train", 2), ("n_test", 2)):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < minimum
                or value % 2
            ):
                flag = "--" + name.replace("_", "-")
                raise PlanError(
                    f"{flag} {value!r} is not allowed: pass an even integer >= {minimum} "
                    "(tasks are balanced: half positives, half negatives)."
                )
        if self.eval_batches < 1:
            raise PlanError(f"--eval-batches {self.eval_batches} is not allowed: pass 1 or more.")
        if self.n_checkpoints < 0:
            raise PlanError(f"--checkpoints {self.n_checkpoints} is not allowed: pass 0 or more.")
        names = self.dataset_names
        if len(set(names)) != len(names):
            raise PlanError(f"--datasets {list(self.datasets)} names a dataset twice: {names}.")

    @property
    def tokens(self) -> int:
        return (
            self.training_tokens
            if self.training_tokens is not None
            else self.setting.training_tokens
        )

    @property
    def n_steps(self) -> int:
        """Optimizer steps per SAE (SAELens steps until the budget is reached)."""
        return -(-self.tokens // self.setting.batch_size_tokens)

    @property
    def dataset_names(self) -> list[str]:
        """Metric names of the datasets (a file's stem, a hub id's last part)."""
        return [dataset_name(entry) for entry in self.datasets]

    @property
    def recipe(self) -> str:
        return "paper" if self.paper_settings else "package"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["datasets"] = list(self.datasets)
        data["k_values"] = list(self.k_values)
        data["training_tokens"] = self.tokens
        return data

    def fingerprint(self) -> dict[str, Any]:
        """The fields that decide the numbers: a resumed run must match them."""
        data = self.to_dict()
        for name in self.NOT_FINGERPRINTED:
            data.pop(name)
        return data


def dataset_name(entry: str) -> str:
    """The name a dataset entry has in metric keys (as ``ProbingEvalConfig`` names it)."""
    path = Path(entry)
    if path.suffix.lower() in (".csv", ".tsv", ".jsonl", ".json", ".parquet"):
        return path.stem
    return entry.rsplit("/", 1)[-1]


def plan_steps(plan: ReproducePlan) -> list[str]:
    """The step ids of ``plan``, in run order."""
    steps = [f"train/{kind}" for kind in SAE_KINDS]
    steps += [f"recon/{kind}" for kind in SAE_KINDS]
    steps += [f"probe/{name}" for name in plan.dataset_names]
    steps.append("report")
    return steps


# ---- state ---------------------------------------------------------------------


@dataclass
class ReproduceState:
    """The resume state: the plan's fingerprint and each finished step's record."""

    fingerprint: dict[str, Any]
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Step id -> {"status": "done", "seconds": ..., "device": ..., ...}."""
    created: str = ""

    def is_done(self, step: str) -> bool:
        return self.steps.get(step, {}).get("status") == "done"

    def mark_done(self, step: str, **record: Any) -> None:
        self.steps[step] = {"status": "done", "finished": _now(), **record}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "created": self.created,
            "fingerprint": self.fingerprint,
            "steps": self.steps,
        }

    def save(self, directory: Path) -> None:
        atomic_write_json(directory / STATE_FILENAME, self.to_dict())

    @classmethod
    def load(cls, directory: Path) -> ReproduceState | None:
        """The state in ``directory``, or None if it holds none."""
        path = directory / STATE_FILENAME
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        if data.get("format") != STATE_FORMAT:
            raise PlanError(
                f"{path} has format {data.get('format')!r}, not {STATE_FORMAT!r}: it was "
                "written by another version; pass --overwrite to start again."
            )
        return cls(fingerprint=data["fingerprint"], steps=data["steps"], created=data["created"])


def open_state(
    plan: ReproducePlan, directory: Path, *, resume: bool, overwrite: bool
) -> ReproduceState:
    """The state to run ``plan`` in ``directory`` with, after the output-directory checks.

    - no directory, or an empty one: a fresh state (``resume`` then fails: nothing
      to resume);
    - a reproduce run with the same fingerprint: its state (resumed);
    - a reproduce run of another plan: an error listing the differences, unless
      ``overwrite`` (its outputs are removed);
    - a non-empty directory that is not a reproduce run: an error, unless
      ``overwrite`` (nothing of it is removed; the run writes beside it).
    """
    fresh = ReproduceState(fingerprint=plan.fingerprint(), created=_now())
    if directory.exists() and not directory.is_dir():
        raise PlanError(f"--output-dir {str(directory)!r} is a file: pass a directory.")
    existing = ReproduceState.load(directory) if directory.is_dir() else None
    if existing is None:
        non_empty = directory.is_dir() and any(directory.iterdir())
        if resume:
            raise PlanError(
                f"--resume: {str(directory)!r} holds no reproduce run ({STATE_FILENAME} is "
                "missing): leave out --resume to start one."
            )
        if non_empty and not overwrite:
            raise PlanError(
                f"--output-dir {str(directory)!r} is not empty and is not a reproduce run: "
                "pass an empty or new directory, or --overwrite to write into it anyway."
            )
        return fresh
    if existing.fingerprint == plan.fingerprint():
        if overwrite:
            remove_outputs(directory)
            return fresh
        return existing
    if overwrite:
        remove_outputs(directory)
        return fresh
    differences = diff_fingerprints(existing.fingerprint, plan.fingerprint())
    raise PlanError(
        f"--output-dir {str(directory)!r} holds a reproduce run of another plan ("
        + "; ".join(differences)
        + "): repeat its flags to resume it, pass --overwrite to discard it, or choose "
        "another --output-dir."
    )


def diff_fingerprints(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``name: old -> new`` for each differing field (settings field by field)."""
    out = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{name}.{d}" for d in diff_fingerprints(a, b)]
        elif a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


def remove_outputs(directory: Path) -> None:
    """Remove what a run wrote (:data:`OUTPUT_NAMES`), nothing else."""
    import shutil

    for name in OUTPUT_NAMES:
        path = directory / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, allow_nan=True) + "\n")


def atomic_write_text(path: Path, text: str) -> None:
    """Write through a temporary file in the same directory and rename it: an
    interruption leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---- estimates -----------------------------------------------------------------

_FLOAT32 = 4
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_LATENT_COPIES = 6
"""[batch, d_sae] float32 tensors alive in a training step (pre-activations, codes,
their gradients, the top-k selection, AuxK): a rough count, for the estimate."""
ASSUMED_CLASSES = 5
"""Classes assumed for a dataset whose class count is unknown before loading."""


def sae_param_count(kind: str, setting: Setting) -> int:
    """Parameters of the run's PolySAE (``kind="poly"``: W_enc, b_enc, b_dec, U, C1,
    C2, C3, lambda2, lambda3) or linear SAE (``"linear"``: W_enc, W_dec, b_enc, b_dec)."""
    d_in, d_sae = setting.d_in, setting.d_sae
    r1, r2, r3 = setting.ranks
    shared = d_in * d_sae + d_sae + d_in  # W_enc, b_enc, b_dec
    if kind == "poly":
        return shared + d_sae * r1 + (r1 + r2 + r3) * d_in + 2
    if kind == "linear":
        return shared + d_sae * d_in
    raise ValueError(f"kind={kind!r} must be one of {SAE_KINDS}.")


@dataclass(frozen=True)
class Estimates:
    """Memory and disk a run needs, in bytes (estimates, stated with their parts)."""

    params: dict[str, int]
    """SAE kind -> parameter count."""
    train_memory: dict[str, int]
    """SAE kind -> peak accelerator memory of its training (model + SAE + Adam +
    one batch of latents + the activation buffer)."""
    eval_memory: int
    """Peak memory of a probing step (model + the largest dataset's activation cache
    + its pooled latents)."""
    disk: int
    """Saved SAEs, training checkpoints and result files (plus the activation cache
    if it is memory-mapped to disk)."""
    parts: dict[str, int]
    """The named terms above, for the printed breakdown."""


def estimate(plan: ReproducePlan, classes_per_dataset: Mapping[str, int | None]) -> Estimates:
    """Memory and disk for ``plan`` (float32 SAEs, as the paper trains them).

    ``classes_per_dataset``: dataset name -> number of classes (None: unknown,
    :data:`ASSUMED_CLASSES` assumed). A dataset of C classes caches at most
    ``C * (n_train + n_test) / 2`` texts of ``context_size`` tokens.
    """
    s = plan.setting
    model_bytes = (s.model_params or 0) * _DTYPE_BYTES.get(s.model_dtype, 4)
    params = {kind: sae_param_count(kind, s) for kind in SAE_KINDS}
    latents = _LATENT_COPIES * s.batch_size_tokens * s.d_sae * _FLOAT32
    # SAELens's mixing buffer: n_batches_in_buffer * context_size tokens, held
    # twice while it is refilled.
    buffer = 2 * s.n_batches_in_buffer * s.context_size * s.d_in * _FLOAT32
    train_memory = {
        kind: model_bytes + 4 * n * _FLOAT32 + latents + buffer  # weights, grads, Adam m, v
        for kind, n in params.items()
    }
    per_class = (plan.n_train + plan.n_test) // 2
    texts = {
        name: (classes or ASSUMED_CLASSES) * per_class
        for name, classes in classes_per_dataset.items()
    }
    largest = max(texts.values(), default=0)
    cache = largest * s.context_size * s.d_in * _FLOAT32
    pooled = largest * s.d_sae * _FLOAT32
    eval_memory = (
        model_bytes + max(params.values()) * _FLOAT32 + (0 if plan.cache_dir else cache) + pooled
    )
    saved = sum(params.values()) * _FLOAT32
    checkpoints = plan.n_checkpoints * 3 * sum(params.values()) * _FLOAT32  # weights + Adam
    disk = saved + checkpoints + (cache if plan.cache_dir else 0)
    parts = {
        "model weights": model_bytes,
        "latents of one batch": latents,
        "activation buffer": buffer,
        "probing activation cache (largest dataset)": cache,
        "pooled latents (largest dataset)": pooled,
        "saved SAEs": saved,
        "training checkpoints": checkpoints,
    }
    return Estimates(params, train_memory, eval_memory, disk, parts)


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def format_plan(
    plan: ReproducePlan,
    estimates: Estimates,
    step_seconds: Mapping[str, float] | None = None,
    done: Sequence[str] = (),
) -> str:
    """The dry run's text: settings, steps, memory, disk and (if measured) time."""
    s = plan.setting
    sp = sparsifier(plan.sparsifier)
    lines = [
        f"reproduce plan: {s.name} ({s.model_name}, {s.hook_name}), sparsifier {plan.sparsifier}",
        f"  SAEs: PolySAE ({sp.poly_architecture}) and linear ({sp.linear_architecture}); "
        f"d_in {s.d_in}, d_sae {s.d_sae}, k {s.k}, ranks {s.ranks}",
        f"  training: {plan.tokens:,} tokens per SAE = {plan.n_steps:,} steps of "
        f"{s.batch_size_tokens} tokens, context {s.context_size}, lr {s.lr}, seed {plan.seed}, "
        f"recipe: {'paper (--paper-settings)' if plan.paper_settings else 'package defaults'}",
        f"  data: {s.dataset_path}; device {plan.device}"
        + (f", {plan.world_size} processes" if plan.world_size > 1 else ""),
        f"  probing: {len(plan.dataset_names)} dataset(s) {', '.join(plan.dataset_names)}; "
        f"{plan.n_train} train / {plan.n_test} test texts per task, protocol {plan.protocol}, "
        f"k {list(plan.k_values)}",
        "  steps:",
    ]
    for step in plan_steps(plan):
        lines.append(f"    [{'x' if step in done else ' '}] {step}")
    lines.append("  memory (estimate):")
    for kind in SAE_KINDS:
        lines.append(
            f"    training {kind}: {format_bytes(estimates.train_memory[kind])} "
            f"({estimates.params[kind]:,} SAE parameters, with gradients and Adam state)"
        )
    lines.append(f"    probing step: {format_bytes(estimates.eval_memory)}")
    lines.append(f"  disk (estimate): {format_bytes(estimates.disk)}")
    for name, value in estimates.parts.items():
        lines.append(f"    {name}: {format_bytes(value)}")
    if step_seconds:
        lines.append("  time (measured on the first steps here):")
        total = 0.0
        for kind, seconds in step_seconds.items():
            total += seconds * plan.n_steps
            lines.append(
                f"    {kind}: {seconds * 1000:.1f} ms per step -> "
                f"{format_duration(seconds * plan.n_steps)} for {plan.n_steps:,} steps"
            )
        lines.append(
            f"    training both SAEs: about {format_duration(total)} (evaluation not included)"
        )
    else:
        lines.append("  time: not measured (--measure-steps 0)")
    return "\n".join(lines)
