"""One prepared GPU run: the CUDA path checked against the CPU, then timed.

Part 1 (checks, small shapes) runs each kernel on the device and on the CPU
from the same weights and inputs and prints the largest relative difference:

- the sparse training step of every TopK-style PolySAE (loss, output and every
  parameter gradient; float64 so that no near-tie changes a selection);
- inference ``decode(encode(x))`` and ``decode``'s gradient at every latent;
- the Cholesky-QR retraction in float32 against Householder QR on the CPU;
- several ``SAETrainer`` steps in float32 with torch's fused Adam (parameters
  against the CPU run, U orthonormal within 1e-5 after every step);
- a bf16-autocast training step (its loss against float32's).

Part 2 (timings) runs SAELens's ``TopKTrainingSAE``, PolySAE (package defaults;
``polysae_previous``: training only, with the defaults before issue 13's fourth
pass, no gauge step and U's step unscaled) and, if it is installed, EleutherAI's
sparsify (``SparseCoder``, its Triton kernels on a GPU) at the GPT-2 shape and
at 65k latents, in float32 and under bf16 autocast, contenders interleaved, and
prints training and inference tokens/s, peak device memory and ratios to
SAELens's TopK; ``--profile N`` adds torch.profiler's table of N PolySAE steps.

    python benchmarks/gpu_suite.py                       # on a CUDA machine (< 5 min)
    python benchmarks/gpu_suite.py --skip-checks --shapes gpt2 --profile 5
    python benchmarks/gpu_suite.py --device cpu --quick  # the CPU fallback (a smoke run)

Without a CUDA device it says so and runs both parts on the CPU (``--quick``:
tiny shapes), so the script itself stays tested where no GPU is.
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from sae_lens import SAETrainer
from sae_lens.saes.sae import TrainStepInput

import polysae_lens
from polysae_lens import orthogonality_error, qr_retract
from polysae_lens.config import PREVIOUS_TRAINING_DEFAULTS
from polysae_lens.stiefel import cholesky_qr_retract_

sys.path.insert(0, str(Path(__file__).resolve().parent))
import training_step
from _common import sparsify_fns, topk_training_sae
from training_step import Shape

TIMING_SHAPES = {
    "gpt2": Shape("gpt2", 768, 16384, 64, 4096, (768, 64, 64)),
    "wide": Shape("wide", 768, 65536, 64, 4096, (768, 64, 64)),
    "tiny": Shape("tiny", 32, 256, 8, 128, (32, 8, 8)),
}
CHECK_SHAPE = Shape("check", 48, 512, 8, 64, (48, 8, 8))


class Check(NamedTuple):
    """One device-against-CPU comparison."""

    name: str
    """What was compared."""
    error: float
    """Largest relative difference (or the quantity named in ``name``)."""
    limit: float
    """The largest value that passes."""

    @property
    def ok(self) -> bool:
        return self.error <= self.limit


# ---- part 1: checks ------------------------------------------------------------


def poly_training_sae(arch: str, shape: Shape, dtype: str = "float32", **fields: Any) -> Any:
    """An order-3 PolySAE of ``arch`` at ``shape``, package defaults but for ``fields``."""
    cfg: dict[str, Any] = {
        "architecture": arch,
        "d_in": shape.d_in,
        "d_sae": shape.d_sae,
        "k": shape.k,
        "poly_order": 3,
        "poly_ranks": list(shape.ranks),
        "dtype": dtype,
    }
    cfg |= fields
    if arch == "poly_matryoshka":
        cfg["matryoshka_widths"] = [shape.d_sae // 4, shape.d_sae]
    torch.manual_seed(0)
    return polysae_lens.sae.TRAINING_CLASSES[arch][0].from_dict(cfg)  # type: ignore[attr-defined]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def on_device(sae: Any, device: str) -> Any:
    twin = copy.deepcopy(sae).to(device)
    twin.cfg.device = device
    return twin


def check_training_steps(device: str) -> list[Check]:
    checks = []
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(CHECK_SHAPE.batch, CHECK_SHAPE.d_in, generator=gen, dtype=torch.float64)
    dead = torch.rand(CHECK_SHAPE.d_sae, generator=gen) < 0.3
    for arch in ("poly", "poly_batchtopk", "poly_matryoshka"):
        cpu_sae = poly_training_sae(arch, CHECK_SHAPE, "float64")
        dev_sae = on_device(cpu_sae, device)
        outputs = []
        for sae, inputs in ((cpu_sae, (x, dead)), (dev_sae, (x.to(device), dead.to(device)))):
            step = TrainStepInput(
                sae_in=inputs[0],
                coefficients={},
                dead_neuron_mask=inputs[1],
                n_training_steps=0,
                is_logging_step=False,
            )
            out = sae.training_forward_pass(step)
            out.loss.backward()
            outputs.append(out)
        checks.append(
            Check(f"{arch} step loss", relative_error(outputs[1].loss, outputs[0].loss), 1e-9)
        )
        checks.append(
            Check(
                f"{arch} step output", relative_error(outputs[1].sae_out, outputs[0].sae_out), 1e-9
            )
        )
        worst = max(
            relative_error(p_dev.grad, p_cpu.grad)
            for p_cpu, p_dev in zip(cpu_sae.parameters(), dev_sae.parameters(), strict=True)
            if p_cpu.grad is not None
        )
        checks.append(Check(f"{arch} step gradients (worst)", worst, 1e-8))
    return checks


def check_inference(device: str) -> list[Check]:
    training = poly_training_sae("poly", CHECK_SHAPE, "float64")
    cfg = polysae_lens.PolyTopKSAEConfig(
        d_in=CHECK_SHAPE.d_in,
        d_sae=CHECK_SHAPE.d_sae,
        k=CHECK_SHAPE.k,
        poly_ranks=CHECK_SHAPE.ranks,
        dtype="float64",
    )
    cpu_sae = polysae_lens.PolyTopKSAE(cfg)
    cpu_sae.load_state_dict(training.state_dict())
    dev_sae = on_device(cpu_sae, device)
    x = torch.randn(CHECK_SHAPE.batch, CHECK_SHAPE.d_in, dtype=torch.float64)
    with torch.no_grad():
        want = cpu_sae(x)
        got = dev_sae(x.to(device))
    z = cpu_sae.encode(x).detach().requires_grad_()
    z_dev = z.detach().to(device).requires_grad_()
    weight = torch.randn(CHECK_SHAPE.batch, CHECK_SHAPE.d_in, dtype=torch.float64)
    (grad,) = torch.autograd.grad((cpu_sae.decode(z) * weight).sum(), z)
    (grad_dev,) = torch.autograd.grad((dev_sae.decode(z_dev) * weight.to(device)).sum(), z_dev)
    return [
        Check("inference decode(encode(x))", relative_error(got, want), 1e-9),
        Check("decode gradient, every latent", relative_error(grad_dev, grad), 1e-9),
    ]


def check_retraction(device: str) -> list[Check]:
    gen = torch.Generator().manual_seed(2)
    Q = qr_retract(torch.randn(4096, 256, generator=gen))
    U = Q + 1e-3 * torch.randn(4096, 256, generator=gen)  # one optimizer step away
    want = qr_retract(U)  # Householder QR on the CPU
    got = cholesky_qr_retract_(U.to(device).contiguous())
    return [
        Check("Cholesky-QR retraction vs CPU Householder", relative_error(got, want), 1e-5),
        Check("retracted U: max |U^T U - I|", float(orthogonality_error(got)), 1e-5),
    ]


def check_trainer_steps(device: str, steps: int = 5) -> list[Check]:
    """float32 steps through SAETrainer (fused Adam, retraction) on both devices."""
    gen = torch.Generator().manual_seed(3)
    batches = [
        torch.randn(CHECK_SHAPE.batch, CHECK_SHAPE.d_in, generator=gen) for _ in range(steps)
    ]
    cpu_sae = poly_training_sae("poly", CHECK_SHAPE)
    dev_sae = on_device(cpu_sae, device)
    worst_orth = 0.0
    for sae, dev in ((cpu_sae, "cpu"), (dev_sae, device)):
        trainer = make_trainer(sae, CHECK_SHAPE, dev, autocast=False)
        for batch in batches:
            trainer.step(batch.to(dev))
            worst_orth = max(worst_orth, float(orthogonality_error(sae.U)))
    worst = max(
        relative_error(p_dev, p_cpu)
        for p_cpu, p_dev in zip(cpu_sae.parameters(), dev_sae.parameters(), strict=True)
    )
    return [
        Check(f"{steps} SAETrainer steps (fused Adam): parameters", worst, 1e-4),
        Check("max |U^T U - I| after every step", worst_orth, 1e-5),
    ]


def check_autocast(device: str) -> list[Check]:
    sae = on_device(poly_training_sae("poly", CHECK_SHAPE), device)
    x = torch.randn(CHECK_SHAPE.batch, CHECK_SHAPE.d_in, device=device)
    losses = []
    for enabled in (False, True):
        step = TrainStepInput(
            sae_in=x,
            coefficients={},
            dead_neuron_mask=None,
            n_training_steps=0,
            is_logging_step=False,
        )
        with torch.autocast(torch.device(device).type, torch.bfloat16, enabled=enabled):
            losses.append(sae.training_forward_pass(step).loss.float())
    return [Check("bf16 autocast step loss vs float32", relative_error(losses[1], losses[0]), 0.05)]


def run_checks(device: str) -> list[Check]:
    checks: list[Check] = []
    for part in (
        check_training_steps,
        check_inference,
        check_retraction,
        check_trainer_steps,
        check_autocast,
    ):
        checks.extend(part(device))
    return checks


# ---- part 2: timings -------------------------------------------------------------


def make_trainer(sae: Any, shape: Shape, device: str, autocast: bool) -> SAETrainer[Any, Any]:
    return training_step.make_trainer(sae, shape, autocast, device=device)


class Timer:
    """Seconds per call: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: str) -> None:
        self.cuda = torch.device(device).type == "cuda"

    def __call__(self, fn: Callable[[], Any]) -> float:
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return begin.elapsed_time(end) / 1000


def time_shape(
    shape: Shape, device: str, autocast: bool, repeats: int, profile: int = 0
) -> dict[str, float]:
    """Median seconds of each contender's training step and inference (and peak
    device memory on a GPU); ``profile`` > 0 also prints a profile of that many
    PolySAE training steps. ``polysae_previous`` is PolySAE with the defaults before
    issue 13's fourth pass (no gauge step, U's step unscaled)."""
    dev_type = torch.device(device).type
    gen = torch.Generator().manual_seed(1)
    batch = torch.randn(shape.batch, shape.d_in, generator=gen).to(device)
    topk = topk_training_sae(shape, device)
    poly = on_device(poly_training_sae("poly", shape), device)
    trainers = {"saelens_topk": make_trainer(topk, shape, device, autocast)}
    trainers["polysae"] = make_trainer(poly, shape, device, autocast)
    previous = poly_training_sae("poly", shape, **PREVIOUS_TRAINING_DEFAULTS)
    trainers["polysae_previous"] = make_trainer(
        on_device(previous, device), shape, device, autocast
    )
    fns: dict[str, Callable[[], Any]] = {
        f"train/{name}": (lambda t=t: t.step(batch)) for name, t in trainers.items()
    }

    def infer(sae: Any) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad(), torch.autocast(dev_type, torch.bfloat16, enabled=autocast):
                sae.decode(sae.encode(batch))

        return run

    fns["infer/saelens_topk"] = infer(topk.eval())
    fns["infer/polysae"] = infer(poly.eval())
    topk.train()
    poly.train()
    sparsify = sparsify_fns(shape.d_in, shape.d_sae, shape.k, batch, autocast)
    if sparsify is not None:
        fns |= sparsify

    # two warm-up calls each: kernel compilation, the allocator
    times = training_step.median_times(fns, repeats, timer=Timer(device), warmup=2)
    if torch.device(device).type == "cuda":
        times |= peak_memory(shape, device, autocast)
    if profile:
        print_profile(trainers["polysae"], batch, device, autocast, profile)
    return times


def print_profile(
    trainer: SAETrainer[Any, Any], batch: torch.Tensor, device: str, autocast: bool, steps: int
) -> None:
    """torch.profiler's table of ``steps`` training steps, by time on the device."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    cuda = torch.device(device).type == "cuda"
    if cuda:
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            trainer.step(batch)
        if cuda:
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(f"\n### profile: {steps} PolySAE training steps, autocast={autocast}")
    print(prof.key_averages().table(sort_by=sort, row_limit=18, max_name_column_width=48))


def peak_memory(shape: Shape, device: str, autocast: bool) -> dict[str, float]:
    """Peak device memory (GB) of three training steps of each SAELens-trainer contender."""
    peaks = {}
    for name in ("saelens_topk", "polysae"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        if name == "polysae":
            sae: Any = on_device(poly_training_sae("poly", shape), device)
        else:
            sae = topk_training_sae(shape, device)
        trainer = make_trainer(sae, shape, device, autocast)
        batch = torch.randn(shape.batch, shape.d_in, device=device)
        for _ in range(3):
            trainer.step(batch)
        torch.cuda.synchronize()
        peaks[f"memory/{name}"] = torch.cuda.max_memory_allocated(device) / 1e9
        del trainer, sae
    return peaks


def report_timings(shape: Shape, autocast: bool, times: dict[str, float]) -> None:
    precision = "bf16 autocast" if autocast else "float32"
    print(
        f"\n## {shape.name}: d_in {shape.d_in}, d_sae {shape.d_sae}, k {shape.k}, "
        f"batch {shape.batch}, {precision}"
    )
    print(f"{'measure':<22}{'median ms':>11}{'tokens/s':>14}{'/ topk':>9}{'/ sparsify':>12}")
    for kind in ("train", "infer"):
        base = times[f"{kind}/saelens_topk"]
        peer = times.get(f"{kind}/sparsify")
        for name in ("saelens_topk", "polysae", "polysae_previous", "sparsify"):
            key = f"{kind}/{name}"
            if key not in times:
                continue
            t = times[key]
            vs_peer = f"{t / peer:>12.2f}" if peer else f"{'-':>12}"
            print(f"{key:<22}{1000 * t:>11.2f}{shape.batch / t:>14,.0f}{t / base:>9.2f}{vs_peer}")
    for name in ("saelens_topk", "polysae"):
        key = f"memory/{name}"
        if key in times:
            print(f"{'peak GB ' + name:<22}{times[key]:>11.2f}")


def describe(device: str) -> str:
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", default=None, help="cuda device (default: cuda if available, else cpu)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny timing shape, few repeats")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--shapes", nargs="+", choices=sorted(TIMING_SHAPES), default=["gpt2", "wide"]
    )
    parser.add_argument("--skip-timings", action="store_true")
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="STEPS",
        help="also print torch.profiler's table of this many PolySAE training steps per timing",
    )
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {device}: torch {torch.__version__} sees no CUDA device")
    print(f"# torch {torch.__version__} on {describe(device)}")
    if torch.device(device).type != "cuda":
        print(
            "# no CUDA device: the checks compare the CPU with itself (a smoke run of this "
            "script) and the timings are CPU timings"
        )

    checks = [] if args.skip_checks else run_checks(device)
    if checks:
        print(f"\n## checks: {device} against the CPU reference")
    for check in checks:
        status = "ok  " if check.ok else "FAIL"
        print(f"{status} {check.name:<48} {check.error:.2e} (limit {check.limit:.0e})")
    failed = [check for check in checks if not check.ok]

    if not args.skip_timings:
        shapes = [TIMING_SHAPES["tiny"]] if args.quick else [TIMING_SHAPES[s] for s in args.shapes]
        repeats = 2 if args.quick else args.repeats
        for shape in shapes:
            for autocast in (False, True):
                times = time_shape(shape, device, autocast, repeats, args.profile)
                report_timings(shape, autocast, times)
    if failed:
        print(f"\n{len(failed)} check(s) failed: {', '.join(c.name for c in failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
