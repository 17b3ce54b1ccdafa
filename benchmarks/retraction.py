"""Cost and effect of the Stiefel retraction.

1. Time of one retraction of U [16384, 768] (the GPT-2 small shape): Householder
   QR against Cholesky-QR (the same Q factor), medians over repeats; and how
   orthonormal one Cholesky-QR pass leaves U as cond(U^T U) grows (why one pass
   is enough near the manifold).
2. Training effect of retracting every n steps: a TopK PolySAE trained by
   SAELens's ``SAETrainer`` on ``sae_lens.synthetic`` activations with
   ``stiefel_every_n_steps`` in {1, 4, 16} (and Householder QR at n = 1), the
   same seed and data: final MSE on held-out samples, the largest
   max |U^T U - I| seen before any retraction, and time per step.

3. With ``--blocking``: one CholeskyQR pass with the products split into
   row chunks x column blocks of other sizes, quiet and beside a competing
   process (a busy loop; a 2-thread torch job), because many short
   multi-threaded products stall when another process holds a core.

    python benchmarks/retraction.py           # about 3 minutes on 2 cores
    python benchmarks/retraction.py --quick
    python benchmarks/retraction.py --blocking --d-sae 16384 65536   # about 4 minutes
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import time
from typing import Any

import torch
from _common import CONTENTION_KINDS, contention, quiet_fit
from sae_lens import SAETrainer
from sae_lens.config import SAETrainerConfig
from sae_lens.synthetic import ActivationGenerator, FeatureDictionary

from polysae_lens import PolyTopKTrainingSAE, PolyTopKTrainingSAEConfig, orthogonality_error
from polysae_lens.stiefel import (
    RETRACTIONS,
    cholesky_qr_pass_,
    cholesky_qr_retract,
    qr_retract,
)


def time_retractions(d_sae: int, rank: int, repeats: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    U = qr_retract(torch.randn(d_sae, rank, generator=gen))
    U = U + 1e-3 * torch.randn(d_sae, rank, generator=gen)  # one optimizer step away
    times: dict[str, list[float]] = {name: [] for name in RETRACTIONS}
    for _ in range(repeats):
        for name, retract in RETRACTIONS.items():
            U_copy = U.clone()
            start = time.perf_counter()
            retract(U_copy)
            times[name].append(time.perf_counter() - start)
    q_chol, q_house = cholesky_qr_retract(U), qr_retract(U)
    print(f"max |Q_cholesky - Q_householder| = {(q_chol - q_house).abs().max().item():.2e}")
    return {name: statistics.median(values) for name, values in times.items()}


def one_pass_accuracy(d_sae: int, rank: int) -> list[tuple[float, float, float, float]]:
    """Orthogonality of ONE CholeskyQR pass, and its distance to Householder's Q,
    for U with cond(U^T U) from 1 to 900 (singular values spread log-uniformly):
    rows of (cond(U^T U), max |Q^T Q - I| for one pass and for Householder QR,
    max |Q - Q_householder|)."""
    gen = torch.Generator().manual_seed(1)
    Q0 = qr_retract(torch.randn(d_sae, rank, generator=gen))
    V = qr_retract(torch.randn(rank, rank, generator=gen))
    rows = []
    for gram_condition in (1.0, 4.0, 100.0, 900.0):
        singular_values = torch.logspace(0, 0.5 * math.log10(gram_condition), rank)
        U = (Q0 * singular_values) @ V.T
        Q = U.clone()
        assert cholesky_qr_pass_(Q)
        householder = qr_retract(U)
        error = (Q - householder).abs().max().item()
        rows.append(
            (
                gram_condition,
                orthogonality_error(Q).item(),
                orthogonality_error(householder).item(),
                error,
            )
        )
    return rows


def train_variant(every_n: int, method: str, steps: int, d_in: int, d_sae: int) -> dict[str, Any]:
    features = FeatureDictionary(4 * d_in, d_in, seed=0)
    generator = ActivationGenerator(4 * d_in, firing_probabilities=0.03)

    def batches(record: list[float], sae: Any) -> Any:
        torch.manual_seed(1)
        while True:
            record.append(orthogonality_error(sae.U).item())
            yield features(generator.sample(512))

    torch.manual_seed(0)
    cfg = PolyTopKTrainingSAEConfig(
        d_in=d_in, d_sae=d_sae, k=8, stiefel_every_n_steps=every_n, stiefel_method=method
    )
    sae = PolyTopKTrainingSAE(cfg)
    record: list[float] = []
    trainer = SAETrainer(
        cfg=SAETrainerConfig(
            total_training_samples=steps * 512, train_batch_size_samples=512, lr=3e-4, lr_end=3e-4
        ),
        sae=sae,
        data_provider=batches(record, sae),
    )
    start = time.perf_counter()
    quiet_fit(trainer)
    seconds = time.perf_counter() - start
    torch.manual_seed(2)
    held_out = features(generator.sample(4096))
    with torch.no_grad():
        sae.eval()
        mse = (sae(held_out) - held_out).pow(2).sum(-1).mean().item()
    return {
        "mse": mse,
        "max_orth_error": max(record),
        "ms_per_step": 1000 * seconds / steps,
    }


BLOCKINGS = [(rows, cols) for rows in (2048, 8192, None) for cols in (128, 256, 768)]
"""(row chunk, column block) of ``--blocking``; None rows: one chunk of all rows."""


def time_blockings(d_sae: int, rank: int, repeats: int) -> dict[str, dict[str, float]]:
    """Median seconds of one CholeskyQR pass per blocking: quiet, then beside
    each kind of competing process."""
    gen = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(d_sae, rank, generator=gen))[0]
    U += 1e-3 * torch.randn(d_sae, rank, generator=gen)  # one optimizer step away
    fns = {
        f"rows {rows or d_sae} / cols {cols}": functools.partial(
            cholesky_qr_pass_, U.clone(), block=cols, row_chunk=rows or d_sae
        )
        for rows, cols in BLOCKINGS
    }
    out: dict[str, dict[str, float]] = {}
    for kind in (None, *CONTENTION_KINDS):
        with contention(kind):
            out[kind or "quiet"] = median_seconds(fns, repeats)
    return out


def median_seconds(fns: dict[str, Any], repeats: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in samples.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--blocking", action="store_true", help="only the blocking table (3.)")
    parser.add_argument("--d-sae", type=int, nargs="+", default=[16384], help="for --blocking")
    args = parser.parse_args(argv)
    if args.blocking:
        repeats = 2 if args.quick else 5
        for d_sae in [256] if args.quick else args.d_sae:
            rank = 32 if args.quick else 768
            table = time_blockings(d_sae, rank, repeats)
            print(f"\n## one CholeskyQR pass of U [{d_sae}, {rank}]: median s (slowdown)")
            kinds = list(table)
            print(f"{'blocking':<24}" + "".join(f"{k:>20}" for k in kinds))
            for name, quiet in table["quiet"].items():
                cells = "".join(
                    f"{table[k][name]:>12.3f} ({table[k][name] / quiet:>4.2f}x)" for k in kinds
                )
                print(f"{name:<24}{cells}")
        return
    shape = (1024, 64) if args.quick else (16384, 768)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"\n## one retraction of U {list(shape)} (median of {2 if args.quick else 5})")
    for name, seconds in time_retractions(*shape, repeats=2 if args.quick else 5).items():
        print(f"{name:<14}{seconds:>10.3f} s")
    print(f"\n## one CholeskyQR pass on U {list(shape)} (a second runs above cond 3)")
    print(f"{'cond(U^T U)':>12}{'orth err':>12}{'Householder':>14}{'|Q - Q_H|':>12}")
    for condition, orth_error, householder_error, q_error in one_pass_accuracy(*shape):
        print(f"{condition:>12.0f}{orth_error:>12.2e}{householder_error:>14.2e}{q_error:>12.2e}")
    steps, d_in, d_sae = (200, 16, 128) if args.quick else (3000, 64, 1024)
    print(f"\n## training: d_in {d_in}, d_sae {d_sae}, k 8, {steps} steps of 512, lr 3e-4")
    print(f"{'variant':<22}{'held-out MSE':>14}{'max orth err':>14}{'ms/step':>10}")
    variants = [(1, "cholesky_qr"), (1, "qr"), (4, "cholesky_qr"), (16, "cholesky_qr")]
    for every_n, method in variants:
        row = train_variant(every_n, method, steps, d_in, d_sae)
        name = f"every {every_n}, {method}"
        print(
            f"{name:<22}{row['mse']:>14.5f}{row['max_orth_error']:>14.2e}{row['ms_per_step']:>10.2f}"
        )


if __name__ == "__main__":
    main()
