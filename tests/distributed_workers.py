"""Rank processes for the data-parallel tests (importable by spawned workers).

A *scenario* is an SAE architecture trained for :data:`STEPS` steps on
deterministic synthetic global batches. :func:`train_reference` trains it with
a plain single-process ``SAETrainer`` on the global batches (no distributed
code); :func:`rank_main` is one rank of the same run with
``DistributedSAETrainer``, fed rank ``r``'s contiguous slice of each global
batch, recording a hash of every parameter and buffer before each step and
after the last one.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import torch
from sae_lens import TrainingSAE
from sae_lens.config import SAETrainerConfig

import polysae_lens  # noqa: F401  (registers the PolySAE architectures)

D_IN = 16
D_SAE = 48
STEPS = 50
GLOBAL_BATCH = 32
WORLD_SIZE = 2

SCENARIOS: dict[str, dict[str, Any]] = {
    "poly": {"architecture": "poly", "k": 4, "poly_ranks": [12, 5, 3]},
    # the subspace fit after step 20, on the rows of steps 11-20 (all ranks' rows)
    "poly_fit": {
        "architecture": "poly",
        "k": 4,
        "poly_ranks": [12, 5, 3],
        "subspace_fit_step": 20,
        "subspace_fit_rows": 320,
    },
    "topk": {"architecture": "topk", "k": 4},
    "batchtopk": {"architecture": "batchtopk", "k": 4},
    "poly_batchtopk": {"architecture": "poly_batchtopk", "k": 4, "poly_ranks": [12, 5, 3]},
    "poly_jumprelu": {"architecture": "poly_jumprelu", "poly_ranks": [12, 5, 3]},
    "jumprelu": {"architecture": "jumprelu"},
    "standard": {"architecture": "standard"},
    "gated": {"architecture": "gated"},
    "matryoshka_batchtopk": {
        "architecture": "matryoshka_batchtopk",
        "k": 4,
        "matryoshka_widths": [16, 32, D_SAE],
    },
}
"""Scenario name -> SAE config overrides."""

EXACT_SCENARIOS = ("poly", "poly_fit", "topk", "poly_jumprelu", "jumprelu", "standard", "gated")
"""Scenarios whose data-parallel run equals the single-process run (the
BatchTopK family selects per rank, so those only match across ranks)."""
AUXK_SCENARIOS = ("poly", "topk")
"""Scenarios whose dead-latent mask feeds a loss (AuxK) within the run."""


def make_sae(name: str) -> TrainingSAE[Any]:
    torch.manual_seed(0)
    cfg = {"d_in": D_IN, "d_sae": D_SAE, **SCENARIOS[name]}
    return TrainingSAE.from_dict(cfg)


def trainer_cfg() -> SAETrainerConfig:
    # a short dead-latent window so AuxK and the dead mask matter within 50 steps,
    # and a sparsity window that resets the firing counts on the way
    return SAETrainerConfig(
        total_training_samples=STEPS * GLOBAL_BATCH,
        train_batch_size_samples=GLOBAL_BATCH,
        lr=3e-3,
        lr_end=3e-3,
        dead_feature_window=4,
        feature_sampling_window=20,
        device="cpu",
    )


def global_batch(step: int) -> torch.Tensor:
    """Sparse combinations of a fixed dictionary plus noise, [GLOBAL_BATCH, D_IN]."""
    dictionary = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(1234))
    gen = torch.Generator().manual_seed(step)
    codes = torch.rand(GLOBAL_BATCH, 64, generator=gen)
    codes = torch.where(codes > 0.93, codes, torch.zeros_like(codes))
    return codes @ dictionary + 0.05 * torch.randn(GLOBAL_BATCH, D_IN, generator=gen)


def state_hash(sae: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in [*sae.named_parameters(), *sae.named_buffers()]:
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class _Batches:
    def __init__(self, sae: torch.nn.Module, rank: int | None) -> None:
        self.sae, self.rank, self.step = sae, rank, 0
        self.hashes: list[str] = []

    def __iter__(self) -> _Batches:
        return self

    def __next__(self) -> torch.Tensor:
        self.hashes.append(state_hash(self.sae))
        batch = global_batch(self.step)
        self.step += 1
        if self.rank is None:
            return batch
        local = GLOBAL_BATCH // WORLD_SIZE
        return batch[self.rank * local : (self.rank + 1) * local]


def train_reference(name: str) -> dict[str, Any]:
    """The plain single-process run on the global batches."""
    from sae_lens.training.sae_trainer import SAETrainer

    sae = make_sae(name)
    trainer = SAETrainer(cfg=trainer_cfg(), sae=sae, data_provider=_Batches(sae, None))
    trainer.fit()
    return _result(trainer, [])


def _result(trainer: Any, hashes: list[str]) -> dict[str, Any]:
    sae = trainer.sae
    return {
        "state": {k: v.detach().clone() for k, v in sae.state_dict().items()},
        "hashes": [*hashes, state_hash(sae)],
        "act_freq_scores": trainer.act_freq_scores.clone(),
        "since_fired": trainer.n_forward_passes_since_fired.clone(),
        "n_training_samples": trainer.n_training_samples,
        "l0": sae.cfg.metadata.l0,
        "dead": sae.cfg.metadata.num_dead_features,
    }


def rank_main(rank: int, out_dir: str, scenarios: list[str], fail_rank: int | None) -> None:
    """One rank: train every scenario data-parallel, save the results.

    A rank that fails exits at once with status 1 after printing its traceback:
    after gloo's process group is aborted, interpreter shutdown sometimes waits
    forever on a thread torch.distributed left behind (2 runs in 6 here, a
    thread with no Python frame). torchrun kills such a worker; this harness
    has no launcher, and what the tests check is that every rank *fails*
    promptly, not how the interpreter then shuts down.
    """
    try:
        _rank_main(rank, out_dir, scenarios, fail_rank)
    except BaseException:
        import sys
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)


def _rank_main(rank: int, out_dir: str, scenarios: list[str], fail_rank: int | None) -> None:
    torch.set_num_threads(1)
    from polysae_lens.distributed import DistributedConfig, DistributedSAETrainer
    from polysae_lens.distributed.process_group import fail_fast, init_process_group

    config = DistributedConfig(
        backend="gloo",
        init_method=f"file://{Path(out_dir) / 'rendezvous'}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout_s=60,
    )
    context = init_process_group(config, "cpu")
    with fail_fast(context):
        results = {}
        for name in scenarios:
            sae = make_sae(name)
            data = _Batches(sae, rank)
            if fail_rank == rank:
                data = _FailingBatches(data, after=3, mark=Path(out_dir) / "failed_at")  # type: ignore[assignment]
            trainer = DistributedSAETrainer(
                cfg=trainer_cfg(), sae=sae, data_provider=data, context=context
            )
            trainer.fit()
            hashes = data.hashes if isinstance(data, _Batches) else data.inner.hashes
            results[name] = _result(trainer, hashes)
        results["extras"] = _extras(rank)
        results["interrupt"] = _interrupt_run(rank, out_dir, context, signal_rank=1)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")


THRESHOLD_CASES = {
    # name: (rank 0's selected activations, rank 1's)
    "both": ([0.0, 0.5, 0.2], [0.3, 0.0]),
    "one": ([0.0, 0.0], [0.7, 0.4]),
    "none": ([0.0], [0.0, 0.0]),
}
NORM_BATCHES = 3


def norm_batches(rank: int | None) -> Any:
    """Global (rank None) or local batches for the normalisation estimates."""
    for step in range(NORM_BATCHES):
        batch = 3.0 * global_batch(100 + step) + 1.0
        if rank is None:
            yield batch
        else:
            local = GLOBAL_BATCH // WORLD_SIZE
            yield batch[rank * local : (rank + 1) * local]


def _extras(rank: int) -> dict[str, Any]:
    """The BatchTopK threshold rule and the normalisation estimates, on known inputs."""
    from polysae_lens.distributed.stats import (
        DistributedActivationScaler,
        global_topk_threshold_update,
    )

    thresholds = {}
    for case, per_rank in THRESHOLD_CASES.items():
        sae = make_sae("batchtopk")
        sae.topk_threshold.fill_(1.0)
        with global_topk_threshold_update(sae):
            sae.update_topk_threshold(torch.tensor(per_rank[rank]))
        thresholds[case] = sae.topk_threshold.item()
        assert "update_topk_threshold" not in sae.__dict__  # restored
    scaler = DistributedActivationScaler()
    scaler.estimate_scaling_factor(D_IN, norm_batches(rank), NORM_BATCHES)
    whitening = DistributedActivationScaler()
    whitening.estimate_whitening(D_IN, norm_batches(rank), NORM_BATCHES)
    assert whitening.whitening is not None
    from sae_lens.config import LanguageModelSAERunnerConfig, LoggingConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

    from polysae_lens.distributed.runner import _agreed_across_ranks

    def runner_cfg(lr: float) -> Any:
        return LanguageModelSAERunnerConfig(
            sae=TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4),
            checkpoint_path="checkpoints",  # SAELens appends a random id per rank
            lr=lr,
            verbose=False,
            logger=LoggingConfig(log_to_wandb=False),
        )

    agreed_checkpoint_path = _agreed_across_ranks(runner_cfg(1e-3)).checkpoint_path
    try:
        _agreed_across_ranks(runner_cfg(1e-3 * (rank + 1)))
        mismatch = ""
    except ValueError as e:
        mismatch = str(e)
    return {
        "agreed_checkpoint_path": agreed_checkpoint_path,
        "mismatch": mismatch,
        "thresholds": thresholds,
        "scaling_factor": scaler.scaling_factor,
        "whitening_matrix": whitening.whitening.matrix,
    }


class _FailingBatches:
    """Raises at step ``after``, first writing the time (``time.time()``) to ``mark``."""

    def __init__(self, inner: _Batches, after: int, mark: Path | None = None) -> None:
        self.inner, self.after, self.mark = inner, after, mark

    def __iter__(self) -> _FailingBatches:
        return self

    def __next__(self) -> torch.Tensor:
        if self.inner.step == self.after:
            if self.mark is not None:
                self.mark.write_text(repr(time.time()))
            raise RuntimeError(f"injected failure on rank {self.inner.rank}")
        return next(self.inner)


def torchrun_main() -> None:
    """Entry point under torchrun: ``python -m tests.distributed_workers OUT FAIL_RANK``."""
    import sys

    out_dir, fail_rank = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    from polysae_lens.distributed import DistributedConfig, DistributedSAETrainer
    from polysae_lens.distributed.process_group import fail_fast, init_process_group

    context = init_process_group(DistributedConfig(backend="gloo", timeout_s=120), "cpu")
    with fail_fast(context):
        sae = make_sae("topk")
        data: Any = _Batches(sae, context.rank)
        if context.rank == fail_rank:
            data = _FailingBatches(data, after=3)
        DistributedSAETrainer(cfg=trainer_cfg(), sae=sae, data_provider=data, context=context).fit()
    Path(out_dir, f"done{os.environ['RANK']}").touch()


if __name__ == "__main__":
    torchrun_main()


class _SignallingBatches(_Batches):
    """Rank ``rank``'s batches; sends itself SIGINT when step ``at`` is fetched."""

    def __init__(self, sae: torch.nn.Module, rank: int, at: int | None) -> None:
        super().__init__(sae, rank)
        self.at = at

    def __next__(self) -> torch.Tensor:
        if self.step == self.at:
            import signal

            os.kill(os.getpid(), signal.SIGINT)
        return super().__next__()


def _interrupt_run(rank: int, out_dir: str, context: Any, signal_rank: int) -> dict[str, Any]:
    """A run in which rank ``signal_rank`` gets SIGINT at step 3, stopped through
    the runner's interruption handling; what each rank saw."""
    import dataclasses
    import signal
    import types

    from polysae_lens.checkpointing import TrainingInterrupted
    from polysae_lens.distributed import DistributedSAETrainer
    from polysae_lens.distributed.runner import DistributedTrainingRunner

    checkpoints = str(Path(out_dir) / "checkpoints")
    sae = make_sae("poly")
    data = _SignallingBatches(sae, rank, at=3 if rank == signal_rank else None)
    cfg = dataclasses.replace(trainer_cfg(), checkpoint_path=checkpoints)
    trainer = DistributedSAETrainer(cfg=cfg, sae=sae, data_provider=data, context=context)
    # the runner's method needs only these two attributes of the runner
    runner = types.SimpleNamespace(
        cfg=types.SimpleNamespace(checkpoint_path=checkpoints), context=context
    )
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        DistributedTrainingRunner.run_trainer_with_interruption_handling(runner, trainer)  # type: ignore[arg-type]
    except TrainingInterrupted as e:
        return {
            "signum": int(e.signum),
            "n_samples": e.n_samples,
            "checkpoint": str(e.checkpoint),
            "hash": state_hash(sae),
        }
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    return {}
