"""Speed of ``polysae_lens.evals.wasserstein_per_latent`` against a per-latent scipy loop.

By default a size sweep (issue 16): latents x samples from 1024 x 1000 up to
issue 4's setting, 16384 x 8000 (two balanced classes), 10% of the entries
nonzero (SAE latents are mostly zero), float32, one row per size.

Ours is timed twice: on the [samples, latents] tensor an SAE's encoder returns
(the time includes the one transposing copy the function makes, a memory-bound
pass that is about 40% of the total at 16384 x 8000 on the development VM) and
on the same values already latent-major (``x_FN.T``, which it reads without a
copy, as the scipy loop reads pre-split rows).

The scipy baseline is the loop one would write by hand, favoured as much as
possible: each class's columns are pre-split into contiguous per-latent rows
outside the timed region, so only ``scipy.stats.wasserstein_distance`` calls are
timed. A full scipy pass over 16384 latents takes minutes, so it is timed on a
subset of latents and its per-latent cost extrapolated linearly (every latent
costs about the same: same sample count, same density); the output says so. The
two results are compared on that subset.

    python benchmarks/wasserstein.py                     # the sweep (~1 min on 2 cores)
    python benchmarks/wasserstein.py --sizes 16384x8000  # one size
    python benchmarks/wasserstein.py --contended busy    # also beside a busy core
    python benchmarks/wasserstein.py --quick             # smoke run (seconds)
    python benchmarks/wasserstein.py --device cuda

``--threads`` sets torch's CPU threads (default 1, like the single-threaded scipy
loop: a per-core comparison that is also stable when other processes share the
CPU; OpenMP spin-waits make multi-threaded timings erratic on a busy machine).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import NamedTuple

import numpy as np
import torch
from _common import CONTENTION_KINDS, contention
from scipy.stats import wasserstein_distance

from polysae_lens.evals import wasserstein_per_latent


def make_latents(
    n_samples: int, n_latents: int, density: float, seed: int, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse non-negative latents; a third of the latents fire more (and larger)
    on class 1, so the distances are not all alike."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.zeros(n_samples, dtype=torch.long)
    labels[: n_samples // 2] = 1
    labels = labels[torch.randperm(n_samples, generator=gen)]
    fires = torch.rand(n_samples, n_latents, generator=gen) < density
    values = torch.empty(n_samples, n_latents).exponential_(1.0, generator=gen)
    shifted = torch.rand(n_latents, generator=gen) < 1 / 3
    values += (labels[:, None].float() * shifted[None, :].float()) * 0.5
    latents = (values * fires).to(device)
    return latents, labels.to(device)


def time_torch(latents: torch.Tensor, labels: torch.Tensor, repeats: int) -> list[float]:
    wasserstein_per_latent(latents, labels)  # warm-up (allocator, lazy init)
    times = []
    for _ in range(repeats):
        if latents.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        wasserstein_per_latent(latents, labels)
        if latents.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def time_scipy(
    latents: torch.Tensor, labels: torch.Tensor, n_latents: int, repeats: int
) -> tuple[list[float], np.ndarray]:
    x = latents[:, :n_latents].double().cpu().numpy()
    pos = labels.bool().cpu().numpy()
    rows_pos = np.ascontiguousarray(x[pos].T)
    rows_neg = np.ascontiguousarray(x[~pos].T)
    times = []
    result = np.empty(n_latents)
    for _ in range(repeats):
        start = time.perf_counter()
        for f in range(n_latents):
            result[f] = wasserstein_distance(rows_pos[f], rows_neg[f])
        times.append(time.perf_counter() - start)
    return times, result


SWEEP = ((1024, 1000), (4096, 1000), (1024, 8000), (4096, 4000), (16384, 1000), (16384, 8000))
"""(latents, samples) of the default sweep."""


class Row(NamedTuple):
    """One size's timings (seconds, medians)."""

    n_latents: int
    n_samples: int
    ours: float
    """``wasserstein_per_latent`` over every latent of the [samples, latents] tensor
    (includes the one latent-major copy it makes)."""
    ours_latent_major: float
    """The same on a latent-major input (``x_FN.T``: no copy)."""
    scipy: float
    """The scipy loop over every latent (extrapolated from ``scipy_latents``)."""
    scipy_latents: int
    rel_diff: float
    """Max relative difference from scipy on the timed latents."""


def measure(n_latents: int, n_samples: int, args: argparse.Namespace) -> Row:
    latents, labels = make_latents(n_samples, n_latents, args.density, args.seed, args.device)
    subset = min(args.scipy_latents, n_latents)
    torch_times = time_torch(latents, labels, args.repeats)
    latent_major = latents.T.contiguous().T
    major_times = time_torch(latent_major, labels, args.repeats)
    del latent_major
    scipy_times, scipy_w1 = time_scipy(latents, labels, subset, args.scipy_repeats)
    ours = wasserstein_per_latent(latents, labels)[:subset].cpu().numpy()
    rel_diff = np.max(np.abs(ours - scipy_w1) / np.maximum(np.abs(scipy_w1), 1e-300))
    scipy_total = statistics.median(scipy_times) / subset * n_latents
    return Row(
        n_latents,
        n_samples,
        statistics.median(torch_times),
        statistics.median(major_times),
        scipy_total,
        subset,
        float(rel_diff),
    )


def parse_size(text: str) -> tuple[int, int]:
    try:
        latents, samples = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"size {text!r} is not LATENTSxSAMPLES, e.g. 16384x8000"
        ) from None
    if latents < 1 or samples < 2:
        raise argparse.ArgumentTypeError(f"size {text!r}: need >= 1 latent and >= 2 samples")
    return latents, samples


def print_rows(rows: list[Row], title: str) -> None:
    print(f"\n{title}")
    print(
        f"{'latents x samples':>18}  {'ours (s)':>9}  {'scipy (s)':>10}  {'speed-up':>8}  "
        f"{'ours/latent (us)':>16}  {'latent-major (s)':>16}  {'speed-up':>8}  "
        f"{'max rel diff':>12}"
    )
    for r in rows:
        print(
            f"{f'{r.n_latents} x {r.n_samples}':>18}  {r.ours:>9.3f}  {r.scipy:>10.3f}  "
            f"{r.scipy / r.ours:>7.1f}x  {r.ours / r.n_latents * 1e6:>16.1f}  "
            f"{r.ours_latent_major:>16.3f}  {r.scipy / r.ours_latent_major:>7.1f}x  "
            f"{r.rel_diff:>12.1e}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        nargs="+",
        type=parse_size,
        default=None,
        help="LATENTSxSAMPLES sizes (default: the sweep "
        + ", ".join(f"{f}x{n}" for f, n in SWEEP)
        + ")",
    )
    parser.add_argument("--density", type=float, default=0.1, help="fraction of nonzero entries")
    parser.add_argument("--repeats", type=int, default=5, help="timed torch runs (median)")
    parser.add_argument(
        "--scipy-latents", type=int, default=512, help="latents timed in the scipy loop"
    )
    parser.add_argument("--scipy-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--contended",
        choices=CONTENTION_KINDS,
        default=None,
        help="also time everything beside a competing process and print each side's slowdown",
    )
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    args = parser.parse_args(argv)
    sizes = args.sizes or list(SWEEP)
    if args.quick:
        sizes, args.repeats = [(256, 500), (512, 1000)], 2
        args.scipy_latents, args.scipy_repeats = 64, 1
    torch.set_num_threads(args.threads)
    threads = f", torch threads {torch.get_num_threads()}" if args.device == "cpu" else ""
    print(
        f"# W1 per latent, {args.density:.0%} nonzero, balanced classes, float32, "
        f"{args.device}{threads}; scipy: scipy.stats.wasserstein_distance per latent, "
        f"timed on <= {args.scipy_latents} latents and extrapolated"
    )
    quiet = [measure(f, n, args) for f, n in sizes]
    print_rows(quiet, "quiet")
    if args.contended:
        with contention(args.contended):
            busy = [measure(f, n, args) for f, n in sizes]
        print_rows(busy, f"beside a competing process ({args.contended})")
        print(f"\n{'latents x samples':>18}  {'ours slowdown':>13}  {'scipy slowdown':>14}")
        for q, b in zip(quiet, busy, strict=True):
            print(
                f"{f'{q.n_latents} x {q.n_samples}':>18}  {b.ours / q.ours:>12.2f}x  "
                f"{b.scipy / q.scipy:>13.2f}x"
            )


if __name__ == "__main__":
    main()
