"""Data-parallel training (polysae_lens.distributed) with 2 gloo ranks on CPU.

The rank processes live in :mod:`tests.distributed_workers`. One spawn trains
every scenario (the imports dominate a spawn's cost); the tests below read its
results. The reference for "equals single-process training" is a plain
``SAETrainer`` run on the same global batches, with no distributed code.
"""

from __future__ import annotations

import itertools
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens.training.activation_scaler import ActivationScaler

from polysae_lens.distributed import DistributedConfig, local_batch_size
from polysae_lens.distributed.data import shard_activations_store, shard_dataset

from . import distributed_workers as workers
from .compare import relative_error
from .spawn import spawn_ranks, torchrun_train

REPO = Path(__file__).resolve().parents[1]
SPAWN_TIMEOUT_S = 120
FAILURE_BOUND_S = 30


def _spawn(
    out_dir: Path, scenarios: list[str], fail_rank: int | None
) -> tuple[list[Any], list[float]]:
    """Both ranks as spawned processes, and their exit times."""
    return spawn_ranks(
        workers.rank_main,
        lambda rank: (rank, str(out_dir), scenarios, fail_rank),
        workers.WORLD_SIZE,
        SPAWN_TIMEOUT_S,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out_dir = tmp_path_factory.mktemp("dp")
    procs, _ = _spawn(out_dir, list(workers.SCENARIOS), fail_rank=None)
    assert [p.exitcode for p in procs] == [0, 0]
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(workers.WORLD_SIZE)]


@pytest.mark.parametrize("name", workers.EXACT_SCENARIOS)
def test_data_parallel_equals_single_process(runs: list[dict[str, Any]], name: str) -> None:
    ref = workers.train_reference(name)
    initial = workers.make_sae(name).state_dict()
    dp = runs[0][name]
    errors = {key: relative_error(dp["state"][key], value) for key, value in ref["state"].items()}
    # the subspace fit's solve amplifies the float32 rounding of its rows (the
    # ranks' forward passes round differently from one pass over the global batch)
    tolerance = 1e-4 if name == "poly_fit" else 1e-5
    assert max(errors.values()) < tolerance, errors
    # the run did move the SAE (the comparison above is not vacuous)
    assert relative_error(initial["W_enc"], ref["state"]["W_enc"]) > 1e-2
    # global token count and dead-latent statistics, exactly
    assert dp["n_training_samples"] == ref["n_training_samples"] == workers.STEPS * 32
    assert torch.equal(dp["since_fired"], ref["since_fired"])
    assert torch.equal(dp["act_freq_scores"], ref["act_freq_scores"])
    assert (dp["l0"], dp["dead"]) == (ref["l0"], ref["dead"])
    if name in workers.AUXK_SCENARIOS:
        assert ref["dead"] > 0  # AuxK and the dead mask were exercised


@pytest.mark.parametrize("name", list(workers.SCENARIOS))
def test_ranks_hold_identical_parameters_after_every_step(
    runs: list[dict[str, Any]], name: str
) -> None:
    hashes = [run[name]["hashes"] for run in runs]
    assert len(hashes[0]) == workers.STEPS + 1  # before step 0, after each step
    assert hashes[0] == hashes[1]
    assert len(set(hashes[0])) == len(hashes[0])  # every step changed the SAE
    assert torch.equal(runs[0][name]["since_fired"], runs[1][name]["since_fired"])


def test_the_subspace_fit_scenario_differs_from_training_without_it() -> None:
    # "poly_fit" is "poly" with the fit after step 20: had the fit not run (or run
    # on one rank's rows only), the equality tests above would not tell
    with_fit = workers.train_reference("poly_fit")["state"]
    without = workers.train_reference("poly")["state"]
    for key in ("U", "C2", "C3"):
        assert relative_error(with_fit[key], without[key]) > 1e-2, key


def test_batchtopk_threshold_uses_the_minimum_over_ranks(runs: list[dict[str, Any]]) -> None:
    lr = workers.make_sae("batchtopk").cfg.topk_threshold_lr
    expected = {"both": (1 - lr) + lr * 0.2, "one": (1 - lr) + lr * 0.4, "none": 1.0}
    for run in runs:
        assert run["extras"]["thresholds"] == pytest.approx(expected, rel=1e-7)
    # trained thresholds moved and are identical on both ranks (covered by the
    # hashes, which include buffers)
    for name in ("batchtopk", "poly_batchtopk", "matryoshka_batchtopk"):
        assert runs[0][name]["state"]["topk_threshold"].item() > 0


def test_normalisation_estimates_use_the_global_batches(runs: list[dict[str, Any]]) -> None:
    single = ActivationScaler()
    single.estimate_scaling_factor(workers.D_IN, workers.norm_batches(None), workers.NORM_BATCHES)
    single.estimate_whitening(workers.D_IN, workers.norm_batches(None), workers.NORM_BATCHES)
    assert single.scaling_factor is not None and single.whitening is not None
    for run in runs:
        extras = run["extras"]
        # float32 sums of norms in another order: equal up to rounding
        assert extras["scaling_factor"] == pytest.approx(single.scaling_factor, rel=1e-6)
        assert torch.equal(extras["whitening_matrix"], single.whitening.matrix)


def test_ranks_agree_on_the_run_settings(runs: list[dict[str, Any]]) -> None:
    paths = [run["extras"]["agreed_checkpoint_path"] for run in runs]
    assert paths[0] == paths[1] and paths[0].startswith("checkpoints/")
    for run in runs:  # started with different learning rates: refused on every rank
        mismatch = run["extras"]["mismatch"]
        assert "rank 1 was started with other settings than rank 0 (" in mismatch
        assert ", lr, " in mismatch and "launch every rank with the same flags" in mismatch


def test_only_rank_0_logs_and_evaluates() -> None:
    from polysae_lens.distributed import DistributedContext, DistributedSAETrainer

    cfg = workers.trainer_cfg()
    cfg.logger.log_to_wandb = True
    for rank in (0, 1):
        context = DistributedContext(
            "gloo", rank, 2, rank, torch.device("cpu"), DistributedConfig()
        )
        trainer = DistributedSAETrainer(
            cfg=cfg,
            sae=workers.make_sae("topk"),
            data_provider=iter([]),
            context=context,
            evaluator=lambda *args: {},
        )
        assert trainer.cfg.logger.log_to_wandb is (rank == 0)
        assert (trainer.evaluator is not None) is (rank == 0)
        assert trainer.local_batch_size == workers.GLOBAL_BATCH // 2


def test_a_failing_rank_ends_the_job(tmp_path: Path) -> None:
    """Rank 1 raises at its 4th step; rank 0, waiting in an all-reduce, must
    fail too (no launcher kills it here), both well within the bound after
    the failure (measured from it, so a slow start-up does not count)."""
    procs, exits = _spawn(tmp_path, ["topk"], fail_rank=1)
    assert all(p.exitcode not in (0, None) for p in procs), [p.exitcode for p in procs]
    failed_at = float((tmp_path / "failed_at").read_text())
    assert max(exits) - failed_at < FAILURE_BOUND_S
    assert not list(tmp_path.glob("rank*.pt"))


# ---- configuration errors ---------------------------------------------------------


def test_batch_size_must_split_over_ranks() -> None:
    assert local_batch_size(4096, 4) == 1024
    with pytest.raises(ValueError, match=r"train_batch_size_tokens=30 .* world size 4.*28 or 32"):
        local_batch_size(30, 4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backend": "mpi"}, "backend='mpi'"),
        ({"timeout_s": 0}, "timeout_s=0"),
        ({"init_method": "tcp://h:1"}, "needs rank and world_size"),
    ],
)
def test_distributed_config_validates(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DistributedConfig(**kwargs)


def test_shards_are_disjoint_and_cover_the_dataset() -> None:
    from datasets import Dataset

    data = Dataset.from_dict({"i": list(range(10))})
    shards = [list(shard_dataset(data, r, 3)["i"]) for r in range(3)]
    assert sorted(itertools.chain(*shards)) == list(range(10))
    assert all(set(a).isdisjoint(b) for a in shards for b in shards if a is not b)
    streamed = [
        [row["i"] for row in shard_dataset(data.to_iterable_dataset(num_shards=2), r, 2)]
        for r in range(2)
    ]
    assert sorted(itertools.chain(*streamed)) == list(range(10)) and not set(streamed[0]) & set(
        streamed[1]
    )


# ---- the CLI under torchrun ---------------------------------------------------------


def _tiny_hf_model(directory: Path) -> None:
    """A 1-layer GPT-2 and the offline tokenizer, saved as a local HF model."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from .lm_fixtures import make_tokenizer

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=32, n_embd=16, n_layer=1, n_head=2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def test_cli_trains_under_torchrun(tmp_path: Path) -> None:
    from .lm_fixtures import TEXTS

    model_dir, data_dir = tmp_path / "model", tmp_path / "texts"
    _tiny_hf_model(model_dir)
    data_dir.mkdir()
    (data_dir / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    args = [
        "--model_class_name", "AutoModelForCausalLM", "--model_name", str(model_dir),
        "--hook_name", "transformer.h.0", "--dataset_path", str(data_dir),
        "--d_in", "16", "--d_sae", "48", "-k", "4", "--poly_ranks", "12", "5", "3",
        "--context_size", "16", "--training_tokens", "640",
        "--train_batch_size_tokens", "32", "--store_batch_size_prompts", "2",
        "--n_batches_in_buffer", "4", "--lr", "1e-2", "--log_to_wandb", "False",
        "--n_checkpoints", "1", "--checkpoint_path", str(tmp_path / "checkpoints"),
    ]  # fmt: skip

    def train(*extra: str) -> subprocess.CompletedProcess[str]:
        return torchrun_train([*args, *extra], cwd=tmp_path)

    result = train("--output_path", str(tmp_path / "output"))
    log = result.stderr
    for rank in (0, 1):
        assert f"world size 2, rank {rank} (local rank {rank})" in log
    assert "backend gloo" in log and "16 of 32 tokens per step" in log
    assert log.count("data-parallel run finished on 2 ranks") == 1
    summaries = [line for line in result.stdout.splitlines() if line.startswith("trained ")]
    assert len(summaries) == 1 and "tokens=640" in summaries[0]
    saved = json.loads((tmp_path / "output" / "cfg.json").read_text())
    assert saved["architecture"] == "poly"
    # one checkpoint directory for both ranks, each rank's data position in it
    (run_dir,) = (tmp_path / "checkpoints").iterdir()
    (checkpoint,) = run_dir.iterdir()
    assert (checkpoint / "activations_store_state.safetensors").exists()
    assert (checkpoint / "activations_store_state.rank1.safetensors").exists()
    assert (checkpoint / "trainer_state.pt").exists()

    resumed = train(
        "--resume_from_checkpoint", str(checkpoint), "--output_path", str(tmp_path / "resumed")
    )
    for rank in (0, 1):
        assert f"rank {rank} resuming from checkpoint {checkpoint}" in resumed.stderr
    assert "has no data position" not in resumed.stderr
    assert resumed.stderr.count("data-parallel run finished on 2 ranks") == 1


def test_cli_rejects_a_batch_that_does_not_split(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from polysae_lens import cli

    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    args = ["train", "--d_in", "16", "--d_sae", "48", "-k", "4", "--log_to_wandb", "False"]
    args += ["--train_batch_size_tokens", "32"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "train_batch_size_tokens=32" in err and "world size 3" in err


# ---- each rank's activations store ----------------------------------------------------


def _store(**kwargs: Any) -> Any:
    from sae_lens.training.activations_store import ActivationsStore

    from .lm_fixtures import make_tiny_model

    defaults: dict[str, Any] = {
        "model": make_tiny_model(),
        "dataset": None,
        "streaming": False,
        "hook_name": "blocks.0.hook_resid_post",
        "hook_head_index": None,
        "context_size": 8,
        "d_in": 16,
        "n_batches_in_buffer": 2,
        "total_training_tokens": 10_000,
        "store_batch_size_prompts": 2,
        "train_batch_size_tokens": 32,
        "prepend_bos": True,
        "normalize_activations": "none",
        "device": torch.device("cpu"),
        "dtype": "float32",
    }
    return ActivationsStore(**{**defaults, **kwargs})


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_each_rank_reads_its_own_rows_in_local_batches() -> None:
    from datasets import Dataset

    from .lm_fixtures import TEXTS

    rows = Dataset.from_dict({"text": TEXTS})
    stores = [_store(dataset=rows) for _ in range(2)]
    for rank, store in enumerate(stores):
        shard_activations_store(store, rank, 2, global_batch_tokens=32)
        assert next(store).shape == (16, 16)
    texts = [set(store.dataset["text"]) for store in stores]
    assert texts[0].isdisjoint(texts[1]) and texts[0] | texts[1] == set(TEXTS)
    # sharding after the first batch would silently mix data: refused
    with pytest.raises(RuntimeError, match="already produced batches"):
        shard_activations_store(stores[0], 0, 2, global_batch_tokens=32)


@pytest.mark.filterwarnings("ignore:All samples in the training dataset have been exhausted")
def test_cached_activations_are_sharded(tmp_path: Path) -> None:
    from datasets import Array2D, Dataset, Features

    hook = "blocks.0.hook_resid_post"
    # row i holds the value i everywhere, so a batch tells which rows it came from
    acts = [[[float(i)] * 16 for _ in range(8)] for i in range(8)]
    features = Features({hook: Array2D(shape=(8, 16), dtype="float32")})
    Dataset.from_dict({hook: acts}, features=features).save_to_disk(tmp_path / "cache")
    stores = [_store(cached_activations_path=str(tmp_path / "cache")) for _ in range(2)]
    seen = []
    for rank, store in enumerate(stores):
        shard_activations_store(store, rank, 2, global_batch_tokens=32)
        assert len(store.cached_activation_dataset) == 4
        seen.append({int(v) for _ in range(4) for v in next(store)[:, 0].tolist()})
    assert seen == [{0, 1, 2, 3}, {4, 5, 6, 7}]


# ---- the benchmark ---------------------------------------------------------------------


def test_benchmark_prints_its_table(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sae_lens.training.sae_trainer as sae_trainer_module

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import distributed as bench  # benchmarks/distributed.py

    # what the benchmark changes in this process is put back afterwards
    monkeypatch.setattr(sae_trainer_module, "tqdm", sae_trainer_module.tqdm)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--quick", "--architectures", "topk", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    table = [row for row in rows if row and row[0] == "topk"]
    assert [row[1:3] for row in table] == [["1", "-"], ["2", "gloo"]]
    assert all(float(row[3]) > 0 for row in table)  # tokens/s
    assert table[1][5].endswith("%")  # communication share


def test_each_rank_keeps_its_pipeline_on_its_own_gpu() -> None:
    """(Runs without a GPU: only the configuration is rewritten.)"""
    from sae_lens.config import LanguageModelSAERunnerConfig, LoggingConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

    from polysae_lens.distributed import DistributedContext
    from polysae_lens.distributed.runner import _on_rank_device

    cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=16, d_sae=48, k=4),
        device="cuda",
        act_store_device="cpu",
        verbose=False,
        logger=LoggingConfig(log_to_wandb=False),
    )
    context = DistributedContext("nccl", 3, 4, 1, torch.device("cuda", 1), DistributedConfig())
    placed = _on_rank_device(cfg, context)
    assert (placed.device, placed.llm_device, placed.act_store_device) == (
        "cuda:1",
        "cuda:1",
        "cpu",
    )
    assert cfg.device == "cuda"  # the caller's config is left alone


def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step(
    runs: list[dict[str, Any]],
) -> None:
    import signal

    outcomes = [run["interrupt"] for run in runs]
    # SIGINT reached rank 1 while it fetched step 3's batch: both ranks finish
    # that step, then stop with the same state and one checkpoint
    assert [o["n_samples"] for o in outcomes] == [4 * workers.GLOBAL_BATCH] * 2
    assert outcomes[0]["hash"] == outcomes[1]["hash"]
    assert [o["signum"] for o in outcomes] == [signal.SIGTERM, signal.SIGINT]
    checkpoint = Path(outcomes[0]["checkpoint"])
    assert outcomes[1]["checkpoint"] == str(checkpoint)
    assert checkpoint.name == str(4 * workers.GLOBAL_BATCH)
    assert (checkpoint / "trainer_state.pt").exists()
