"""Training-step and inference cost of PolySAE against SAELens's TopK SAE.

In one process, interleaving the contenders round by round, this times

- a full training step through SAELens's own ``SAETrainer.step`` (forward,
  backward, grad-norm clip, Adam step, the PolySAE retraction, sparsity stats);
- inference ``decode(encode(x))`` under ``torch.no_grad()``;
- the encoder pre-activations alone, ``addmm(b_enc, x, W_enc)`` (the floor no
  SAE can beat; ``x @ W_enc + b_enc``, one more pass over the [batch, d_sae]
  result, is printed beside it);
- the PolySAE step's largest parts on their own: the top-k selection, one
  Cholesky-QR retraction of U and one fused Adam step over the PolySAE's
  parameters (each also part of the PolySAE training step);

for (a) SAELens's ``TopKTrainingSAE`` (``rescale_acts_by_decoder_norm=False``,
the paper's setting), (b) PolySAE (sparse kernels, Cholesky-QR retraction every
step), (c) PolySAE with the dense path, and reports medians and ratios to (a).
Peak memory is the peak resident set size (VmHWM, which starts afresh at exec)
of a fresh subprocess that builds one contender and runs a few training steps,
minus its size before building it. ``poly_every4`` retracts every 4th step;
``poly_previous`` is PolySAE with the defaults before issue 13's fourth pass
(``polysae_lens.config.PREVIOUS_TRAINING_DEFAULTS``: no gauge step, U's step unscaled).
``topk_auxk`` and ``poly_auxk`` are TopK and PolySAE steps with AuxK running:
before each step 1% of the latents are marked silent for longer than the dead
window (the trainer's count for TopK, PolySAE's own ``aux_dead_window`` count
for PolySAE), as in a run with dead latents.

    python benchmarks/training_step.py            # GPT-2 small shape and a small shape
    python benchmarks/training_step.py --quick    # tiny shapes, a smoke run
    python benchmarks/training_step.py --autocast --shapes small   # bf16 autocast
    python benchmarks/training_step.py --shapes gpt2 --widths 4096 16384 65536 --ks 32 64 128
    python benchmarks/training_step.py --shapes gpt2 --contended busy   # slowdowns
    python benchmarks/training_step.py --shapes gpt2 --contenders topk poly poly_previous

EleutherAI's sparsify (``SparseCoder``: fvu + AuxK, Adam) is timed beside them
when it is importable (``pip install eai-sparsify``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from sae_lens import SAETrainer, TopKSAE, TopKSAEConfig

from polysae_lens import PolyTopKSAE, PolyTopKSAEConfig
from polysae_lens.config import PREVIOUS_TRAINING_DEFAULTS
from polysae_lens.sparse import select_topk
from polysae_lens.stiefel import cholesky_qr_retract_

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (
    CONTENTION_KINDS,
    SHAPES,
    Shape,
    contention,
    make_trainer,
    median_times,
    poly_topk_training_sae,
    sparsify_fns,
    topk_training_sae,
)

CONTENDERS = (
    "topk",
    "poly",
    "poly_every4",
    "poly_previous",
    "poly_dense",
    "topk_auxk",
    "poly_auxk",
)
REQUIRED = ("topk", "poly")
"""Contenders every timing needs (the ratios' base and the parts' source)."""
AUXK_SHARE = 0.01
"""Share of latents the ``*_auxk`` contenders mark dead before each step."""


def build(contender: str, shape: Shape, training: bool, autocast: bool = False) -> Any:
    torch.manual_seed(0)
    contender = contender.removesuffix("_auxk")
    if contender == "topk":
        if training:
            return topk_training_sae(shape)
        return TopKSAE(TopKSAEConfig(d_in=shape.d_in, d_sae=shape.d_sae, k=shape.k))
    fields: dict[str, Any] = {}
    if training and contender == "poly_every4":
        fields["stiefel_every_n_steps"] = 4
    if training and contender == "poly_previous":
        fields.update(PREVIOUS_TRAINING_DEFAULTS)
    sae = (
        poly_topk_training_sae(shape, **fields)
        if training
        else PolyTopKSAE(
            PolyTopKSAEConfig(d_in=shape.d_in, d_sae=shape.d_sae, k=shape.k, poly_ranks=shape.ranks)
        )
    )
    sae.sparse_kernels = contender != "poly_dense"
    return sae


def time_shape(
    shape: Shape, repeats: int, autocast: bool, contenders: tuple[str, ...] = CONTENDERS
) -> dict[str, float]:
    """Medians of every measure at one shape (keys as printed by :func:`report`);
    sparsify's ``train/sparsify`` and ``infer/sparsify`` too when it is installed."""
    gen = torch.Generator().manual_seed(1)
    batch = torch.randn(shape.batch, shape.d_in, generator=gen)
    trainers = {c: make_trainer(build(c, shape, True), shape, autocast) for c in contenders}
    inference = {
        c: build(c, shape, False)
        for c in contenders
        if c not in ("poly_every4", "poly_previous", "topk_auxk", "poly_auxk")
    }
    W_enc, b_enc = inference["topk"].W_enc.detach(), inference["topk"].b_enc.detach()
    poly = trainers["poly"].sae
    with torch.no_grad():
        hidden_pre = torch.addmm(poly.b_enc, batch, poly.W_enc)
    U = poly.U.detach().clone()
    adam = torch.optim.Adam([p.detach().clone() for p in poly.parameters()], lr=3e-4, fused=True)
    for param in adam.param_groups[0]["params"]:
        param.grad = torch.randn_like(param)

    def encode_floor() -> None:
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            torch.addmm(b_enc, batch, W_enc)

    def encode_unfused() -> None:
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            batch @ W_enc + b_enc

    def infer(sae: Any) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                sae.decode(sae.encode(batch))

        return run

    fns: dict[str, Callable[[], Any]] = {"floor": encode_floor, "floor_unfused": encode_unfused}
    fns |= {
        "part/selection": lambda: select_topk(hidden_pre, shape.k),
        "part/retraction": lambda: cholesky_qr_retract_(U),
        "part/adam": lambda: adam.step(),
    }
    dead = torch.randperm(shape.d_sae, generator=gen)[: max(1, int(AUXK_SHARE * shape.d_sae))]
    fns |= {
        f"train/{c}": (
            with_dead_latents(t, dead, batch)
            if c.endswith("_auxk")
            else (lambda t=t: t.step(batch))
        )
        for c, t in trainers.items()
    }
    if not autocast:
        fns |= {f"infer/{c}": infer(sae) for c, sae in inference.items()}
    sparsify = sparsify_fns(shape.d_in, shape.d_sae, shape.k, batch, autocast)
    if sparsify is not None:
        fns |= sparsify if not autocast else {"train/sparsify": sparsify["train/sparsify"]}
    return median_times(fns, repeats)


def time_steps_alone(
    shape: Shape, repeats: int, autocast: bool, contenders: tuple[str, ...]
) -> dict[str, float]:
    """Median training-step seconds of the PolySAE ``contenders`` round-robin among
    themselves only: no TopK step, whose larger working set evicts the caches, runs
    between them (as in a loop that trains one PolySAE)."""
    gen = torch.Generator().manual_seed(1)
    batch = torch.randn(shape.batch, shape.d_in, generator=gen)
    polys = [c for c in contenders if c.startswith("poly") and not c.endswith("_auxk")]
    trainers = {c: make_trainer(build(c, shape, True), shape, autocast) for c in polys}
    return median_times({c: (lambda t=t: t.step(batch)) for c, t in trainers.items()}, repeats)


def with_dead_latents(
    trainer: SAETrainer[Any, Any], dead: torch.Tensor, batch: torch.Tensor
) -> Callable[[], None]:
    """A training step with ``dead`` marked silent past the dead window, so
    AuxK runs: in the trainer's count (TopK) or PolySAE's own (``aux_dead_window``)."""
    own = getattr(trainer.sae, "steps_since_fired", None)

    def step() -> None:
        with torch.no_grad():
            if own is not None:
                own[dead] = 10**6
            else:
                trainer.n_forward_passes_since_fired[dead] = 10**6
        trainer.step(batch)

    return step


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_rss_kb() -> int:
    """This process's peak resident set size (Linux VmHWM; ru_maxrss would
    carry over the parent's peak across fork and exec)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("VmHWM not found in /proc/self/status (Linux only)")


def peak_memory_mb(contender: str, shape: Shape, steps: int = 3) -> float:
    """Peak RSS growth of a fresh process that trains one contender for a few steps."""
    code = (
        "import sys, json, torch\n"
        "sys.path.insert(0, 'benchmarks')\n"
        "import training_step as b\n"
        "base = b.peak_rss_kb()\n"
        f"shape = b.SHAPES[{shape.name!r}]\n"
        f"t = b.make_trainer(b.build({contender!r}, shape, True), shape, False)\n"
        "x = torch.randn(shape.batch, shape.d_in)\n"
        f"for _ in range({steps}): t.step(x)\n"
        "print(json.dumps((b.peak_rss_kb() - base) / 1024))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1]))


def report(shape: Shape, times: dict[str, float], memory: dict[str, float] | None) -> None:
    print(
        f"\n## shape {shape.name}: d_in {shape.d_in}, d_sae {shape.d_sae}, k {shape.k}, "
        f"batch {shape.batch}, ranks {shape.ranks}"
    )
    print(f"{'measure':<22}{'median s':>12}{'/ topk':>10}{'/ floor':>10}")
    floor = times["floor"]
    print(f"{'encoder addmm (floor)':<22}{floor:>12.4f}{'':>10}{1.0:>10.2f}")
    rows = [("floor_unfused", "encoder mm + bias")]
    rows += [(f"part/{part}", f"poly part: {part}") for part in ("selection", "retraction", "adam")]
    for key, label in rows:
        print(f"{label:<22}{times[key]:>12.4f}{'':>10}{times[key] / floor:>10.2f}")
    for kind in ("train", "infer"):
        base = times.get(f"{kind}/topk")
        for c in (*CONTENDERS, "sparsify"):
            key = f"{kind}/{c}"
            if key in times and base is not None:
                t = times[key]
                print(f"{key:<22}{t:>12.4f}{t / base:>10.2f}{t / floor:>10.2f}")
    if memory:
        print(f"{'peak memory (MB)':<22}" + "".join(f"  {c}: {m:.0f}" for c, m in memory.items()))
        if memory["topk"] > 0:
            ratios = "".join(f"  {c}: {m / memory['topk']:.2f}" for c, m in memory.items())
            print(f"{'memory / topk':<22}{ratios}")


SWEEP_CONTENDERS = ("topk", "poly")
"""Contenders of the width and k sweeps (with sparsify when installed)."""
SWEEP_MEASURES = (
    "floor",
    "part/selection",
    "part/retraction",
    "part/adam",
    "train/topk",
    "train/poly",
    "train/sparsify",
    "infer/topk",
    "infer/poly",
    "infer/sparsify",
)


def sweep_shapes(base: Shape, widths: list[int], ks: list[int]) -> list[tuple[str, Shape]]:
    """(axis, shape): ``base`` with each width (its k) and with each k (its width)."""
    shapes = [("d_sae", replace(base, name=f"{base.name}-F{w}", d_sae=w)) for w in widths]
    shapes += [("k", replace(base, name=f"{base.name}-k{k}", k=k)) for k in ks]
    return shapes


def growth_exponent(sizes: list[float], seconds: list[float]) -> float:
    """Least-squares slope of log(seconds) against log(size): time ~ size^slope."""
    x = torch.tensor(sizes, dtype=torch.float64).log()
    y = torch.tensor(seconds, dtype=torch.float64).log()
    x = x - x.mean()
    return float((x * (y - y.mean())).sum() / (x * x).sum())


def report_sweep(axis: str, shapes: list[Shape], times: list[dict[str, float]]) -> None:
    """One row per measure: median seconds at each size and the growth exponent."""
    sizes = [float(getattr(shape, axis)) for shape in shapes]
    print(f"\n## sweep over {axis} (others as {shapes[0].name.split('-')[0]}): seconds, growth")
    header = "".join(f"{f'{axis}={int(v)}':>13}" for v in sizes)
    print(f"{'measure':<18}{header}{'exponent':>10}")
    for key in SWEEP_MEASURES:
        if all(key in t for t in times):
            values = [t[key] for t in times]
            cells = "".join(f"{v:>13.4f}" for v in values)
            print(f"{key:<18}{cells}{growth_exponent(sizes, values):>10.2f}")


def report_slowdown(
    shape: Shape, quiet: dict[str, float], busy: dict[str, float], kind: str
) -> None:
    print(f"\n## shape {shape.name}: slowdown beside a competing process ({kind})")
    print(f"{'measure':<22}{'quiet s':>10}{'contended s':>13}{'slowdown':>10}")
    for key, t in quiet.items():
        if key in busy:
            print(f"{key:<22}{t:>10.4f}{busy[key]:>13.4f}{busy[key] / t:>9.2f}x")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shape, few repeats")
    parser.add_argument(
        "--shapes",
        nargs="+",
        choices=sorted(SHAPES),
        default=["gpt2", "small"],
        help="shapes to measure (default: gpt2 small)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--autocast", action="store_true", help="bf16 autocast training steps")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument(
        "--widths",
        nargs="+",
        type=int,
        default=[],
        help="also sweep d_sae over these widths at the first shape's d_in, k, batch "
        "(e.g. 4096 16384 65536) and print each measure's growth exponent",
    )
    parser.add_argument(
        "--ks", nargs="+", type=int, default=[], help="also sweep k over these values"
    )
    parser.add_argument(
        "--contended",
        choices=CONTENTION_KINDS,
        default=None,
        help="time each shape again beside a competing process; print every slowdown",
    )
    parser.add_argument(
        "--contenders",
        nargs="+",
        choices=CONTENDERS,
        default=list(CONTENDERS),
        help=f"training-step contenders to time ({', '.join(REQUIRED)} always are)",
    )
    parser.add_argument(
        "--steps-alone",
        action="store_true",
        help="also time the PolySAE training steps among themselves only (no TopK step "
        "between them to evict the caches), with ratios to the first",
    )
    parser.add_argument(
        "--sweep-only",
        action="store_true",
        help="only the --widths/--ks sweeps (around the first of --shapes)",
    )
    args = parser.parse_args(argv)
    contenders = tuple(dict.fromkeys([*REQUIRED, *args.contenders]))
    shapes = [SHAPES["tiny"]] if args.quick else [SHAPES[name] for name in args.shapes]
    repeats = 2 if args.quick else args.repeats
    print(
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{cpu_model()} ({os.cpu_count()} logical CPUs), autocast={args.autocast}"
    )
    for shape in [] if args.sweep_only else shapes:
        times = time_shape(shape, repeats, args.autocast, contenders)
        memory = None
        if not args.no_memory and not args.autocast:
            memory = {c: peak_memory_mb(c, shape) for c in ("topk", "poly")}
        report(shape, times, memory)
        if args.steps_alone:
            alone = time_steps_alone(shape, repeats, args.autocast, contenders)
            first = next(iter(alone.values()))
            print("training steps alone: " + ", ".join(
                f"{c} {t:.4f} s ({t / first:.3f})" for c, t in alone.items()
            ))  # fmt: skip
        if args.contended:
            with contention(args.contended):
                busy = time_shape(shape, repeats, args.autocast, contenders)
            report_slowdown(shape, times, busy, args.contended)
    swept = sweep_shapes(shapes[0], args.widths, args.ks)
    for axis in ("d_sae", "k"):
        axis_shapes = [shape for a, shape in swept if a == axis]
        if axis_shapes:
            axis_times = [
                time_shape(shape, repeats, args.autocast, SWEEP_CONTENDERS) for shape in axis_shapes
            ]
            report_sweep(axis, axis_shapes, axis_times)


if __name__ == "__main__":
    main()
