"""Speed of ``polysae_lens.evals.wasserstein_per_latent`` against a per-latent scipy loop.

The setting of issue 4: 16384 latents x 8000 samples (two balanced classes of
4000), 10% of the entries nonzero (SAE latents are mostly zero), float32.

The scipy baseline is the loop one would write by hand, favoured as much as
possible: each class's columns are pre-split into contiguous per-latent rows
outside the timed region, so only ``scipy.stats.wasserstein_distance`` calls are
timed. A full scipy pass over 16384 latents takes minutes, so it is timed on a
subset of latents and its per-latent cost extrapolated linearly (every latent
costs about the same: same sample count, same density); the output says so. The
two results are compared on that subset.

    python benchmarks/wasserstein.py            # the full setting (~1 min on 2 cores)
    python benchmarks/wasserstein.py --quick    # smoke run (seconds)
    python benchmarks/wasserstein.py --device cuda

``--threads`` sets torch's CPU threads (default 1, like the single-threaded scipy
loop: a per-core comparison that is also stable when other processes share the
CPU; OpenMP spin-waits make multi-threaded timings erratic on a busy machine).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-latents", type=int, default=16384)
    parser.add_argument("--n-samples", type=int, default=8000)
    parser.add_argument("--density", type=float, default=0.1, help="fraction of nonzero entries")
    parser.add_argument("--repeats", type=int, default=5, help="timed torch runs (median)")
    parser.add_argument(
        "--scipy-latents", type=int, default=512, help="latents timed in the scipy loop"
    )
    parser.add_argument("--scipy-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    args = parser.parse_args()
    if args.quick:
        args.n_latents, args.n_samples, args.repeats = 2048, 2000, 2
        args.scipy_latents, args.scipy_repeats = 128, 1
    torch.set_num_threads(args.threads)

    latents, labels = make_latents(
        args.n_samples, args.n_latents, args.density, args.seed, args.device
    )
    n_pos = int(labels.sum())
    subset = min(args.scipy_latents, args.n_latents)
    torch_times = time_torch(latents, labels, args.repeats)
    scipy_times, scipy_w1 = time_scipy(latents, labels, subset, args.scipy_repeats)
    ours = wasserstein_per_latent(latents, labels)[:subset].cpu().numpy()
    rel_diff = np.max(np.abs(ours - scipy_w1) / np.maximum(np.abs(scipy_w1), 1e-300))

    torch_median = statistics.median(torch_times)
    scipy_per_latent = statistics.median(scipy_times) / subset
    scipy_total = scipy_per_latent * args.n_latents
    nonzero = float((latents != 0).float().mean())
    threads = f", torch threads {torch.get_num_threads()}" if args.device == "cpu" else ""
    print(
        f"W1 per latent: {args.n_latents} latents x {args.n_samples} samples "
        f"({n_pos} / {args.n_samples - n_pos}), {nonzero:.1%} nonzero, float32, "
        f"{args.device}{threads}"
    )
    rows = [
        (
            f"polysae_lens wasserstein_per_latent (median of {args.repeats})",
            torch_median,
            torch_median / args.n_latents,
        ),
        (
            f"scipy loop, extrapolated from {subset} latents (median of {args.scipy_repeats})",
            scipy_total,
            scipy_per_latent,
        ),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'implementation':<{width}}  {'time (s)':>9}  {'per latent (us)':>15}")
    for name, seconds, per_latent in rows:
        print(f"{name:<{width}}  {seconds:>9.3f}  {per_latent * 1e6:>15.1f}")
    print(f"speed-up: {scipy_total / torch_median:.1f}x")
    print(f"max relative difference from scipy on the {subset} timed latents: {rel_diff:.1e}")


if __name__ == "__main__":
    main()
