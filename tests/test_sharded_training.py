"""Latent-sharded training through SAETrainer, the runner and the CLI, on
``(dp, shard)`` meshes of gloo ranks on CPU.

Two spawns: 2 ranks (meshes 1x2 and 2x1, a resume, then the entry points on a
tiny language model) and 4 ranks (mesh 2x2); the workers are in
:mod:`tests.sharded_training_workers`. The reference is a plain single-process
``SAETrainer`` on the same global batches (float64), with no sharding code.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from . import sharded_training_workers as workers
from .compare import relative_error
from .lm_fixtures import SMALL_CORPUS_WARNINGS
from .spawn import run_ranks, torchrun_train

pytestmark = SMALL_CORPUS_WARNINGS

SPAWN_TIMEOUT_S = 240
SHARDED = {"W_enc": 1, "b_enc": 0, "U": 0}
"""Sharded parameter -> its latent dimension."""


def _spawn(out_dir: Path, world_size: int, names: list[str]) -> list[dict[str, Any]]:
    return run_ranks(
        workers.mesh_main,
        lambda rank: (rank, world_size, str(out_dir), names),
        world_size,
        SPAWN_TIMEOUT_S,
        out_dir,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Per scenario, what each rank recorded (rank order)."""
    two = _spawn(tmp_path_factory.mktemp("mesh2"), 2, ["1x2", "2x1"])
    four = _spawn(tmp_path_factory.mktemp("mesh4"), 4, ["2x2"])
    out = {name: [run[name] for run in two] for name in ("1x2", "2x1")}
    out["2x2"] = [run["2x2"] for run in four]
    out["runner"] = [run["runner"] for run in two]
    return out


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    return workers.train_reference()


def test_the_reference_run_fits_its_subspace_once(caplog: pytest.LogCaptureFixture) -> None:
    # the sharded runs equal this run (below), so they fitted the same way
    with caplog.at_level(logging.INFO, logger="polysae_lens.subspace_fit"):
        workers.train_reference()
    fits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Subspace fit")]
    assert len(fits) == 1 and f"on {5 * workers.GLOBAL_BATCH} rows" in fits[0]


@pytest.mark.parametrize("name", list(workers.MESHES))
def test_sharded_training_equals_single_process(
    runs: dict[str, list[dict[str, Any]]], reference: dict[str, Any], name: str
) -> None:
    dp, shards = workers.MESHES[name]
    ranks = runs[name]
    assert [r["mesh"] for r in ranks] == [(i // shards, i % shards) for i in range(dp * shards)]
    # the first step's applied gradients (averaged over replicas, clipped by the
    # global norm) are the single-process ones, float64
    ref_grads = reference["grads"]
    clipped_norm = torch.sqrt(sum(g.pow(2).sum() for g in ref_grads.values()))
    assert clipped_norm.item() == pytest.approx(1.0, rel=1e-5)  # clipping was active
    for run in ranks:
        start, stop, _ = run["bounds"]
        assert set(run["grads"]) == set(ref_grads)
        for key, ref in ref_grads.items():
            if key in SHARDED:
                ref = ref.narrow(SHARDED[key], start, stop - start)
            assert torch.allclose(run["grads"][key], ref, rtol=1e-10, atol=1e-13), key
    # the whole run: the gathered SAE, the dead-latent statistics, the token count
    initial = workers.make_sae().state_dict()
    gathered = ranks[0]["gathered"]
    assert all(r["gathered"] is None for r in ranks[1:])
    assert set(gathered) == set(reference["state"])
    for key, value in reference["state"].items():
        assert relative_error(gathered[key], value) < 1e-5, key
        assert relative_error(initial[key], value) > 1e-3, key  # it trained
    replica0 = ranks[:shards]
    assert torch.equal(torch.cat([r["dead"] for r in replica0]), reference["dead"])
    # AuxK and the dead mask were exercised: latents were dead during the run
    dead_counts = zip(*(r["dead_counts"] for r in replica0), strict=True)
    assert max(sum(counts) for counts in dead_counts) > 0
    assert torch.equal(
        torch.cat([r["act_freq_scores"] for r in replica0]), reference["act_freq_scores"]
    )
    assert {r["n_training_samples"] for r in ranks} == {workers.STEPS * workers.GLOBAL_BATCH}
    assert ranks[0]["num_dead"] == int(reference["dead"].sum())
    # the logged step metrics describe the whole SAE (L0: the replica's batch,
    # which is the global batch when dp = 1)
    ref_log = reference["log"]
    for run in ranks:
        assert run["log"]["sparsity/dead_features"] == ref_log["sparsity/dead_features"]
        assert run["log"]["sparsity/mean_passes_since_fired"] == pytest.approx(
            ref_log["sparsity/mean_passes_since_fired"], rel=1e-6
        )  # SAELens's mean is float32
        if dp == 1:
            assert run["log"]["metrics/l0"] == pytest.approx(ref_log["metrics/l0"], rel=1e-12)


@pytest.mark.parametrize("name", list(workers.MESHES))
def test_replicas_are_bitwise_identical(runs: dict[str, list[dict[str, Any]]], name: str) -> None:
    dp, shards = workers.MESHES[name]
    ranks = runs[name]
    for shard_rank in range(shards):
        same_slice = [r["hashes"] for r in ranks if r["mesh"][1] == shard_rank]
        assert len(same_slice) == dp and len(same_slice[0]) == workers.STEPS + 1
        assert all(h == same_slice[0] for h in same_slice)
        assert len(set(same_slice[0])) == len(same_slice[0])  # every step changed it
    # the replicated parameters are identical on every rank, across slices too
    assert len({r["replicated_hash"] for r in ranks}) == 1


@pytest.mark.parametrize("name", ["1x2", "2x2"])
def test_U_is_orthonormal_over_the_union_of_the_slices(
    runs: dict[str, list[dict[str, Any]]], name: str
) -> None:
    U = runs[name][0]["gathered"]["U"]
    eye = torch.eye(U.shape[1], dtype=U.dtype)
    assert (U.T @ U - eye).abs().max() < 1e-5
    top = U[:13]  # one slice's rows alone are not orthonormal
    assert (top.T @ top - eye).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["1x2", "2x2"])
def test_checkpoint_is_an_ordinary_polysae(
    runs: dict[str, list[dict[str, Any]]], name: str
) -> None:
    from sae_lens import SAE, TrainingSAE

    from polysae_lens.sae import PolyTopKSAE, PolyTopKTrainingSAE

    ranks = runs[name]
    saved = Path(ranks[0]["saved"])
    gathered = ranks[0]["gathered"]
    inference = SAE.load_from_disk(saved, "cpu")
    training = TrainingSAE.load_from_disk(saved, "cpu")
    assert isinstance(inference, PolyTopKSAE) and isinstance(training, PolyTopKTrainingSAE)
    assert inference.cfg.d_sae == workers.D_SAE
    for key, value in gathered.items():
        assert torch.equal(training.state_dict()[key], value), key
        if key != "steps_since_fired":  # AuxK's count is training state
            assert torch.equal(inference.state_dict()[key], value), key
    assert "steps_since_fired" in gathered and "steps_since_fired" not in inference.state_dict()
    shards = workers.MESHES[name][1]
    assert sorted(p.name for p in saved.glob("trainer_state.shard*")) == [
        f"trainer_state.shard{r}of{shards}.pt" for r in range(shards)
    ]
    assert training.cfg.metadata.num_dead_features == ranks[0]["num_dead"]


def test_resume_re_shards_the_checkpoint_and_continues_exactly(
    runs: dict[str, list[dict[str, Any]]],
) -> None:
    ranks = runs["1x2"]
    resumed = ranks[0]["resumed"]
    checkpoint = Path(resumed["checkpoint"])
    assert 0 < int(checkpoint.name) < workers.STEPS * workers.GLOBAL_BATCH  # mid-run
    for key, value in ranks[0]["gathered"].items():
        assert torch.allclose(resumed["state"][key], value, rtol=1e-12, atol=1e-14), key
    for run in ranks:  # written with 2 shards, read as 3: refused, naming the count
        refusal = run["resumed"]["refusal"]
        assert "trainer_state.shard" in refusal and "shard_latents=3" in refusal
        assert "found: ['trainer_state.shard0of2.pt', 'trainer_state.shard1of2.pt']" in refusal


def test_entry_point_trains_sharded_like_data_parallel(
    runs: dict[str, list[dict[str, Any]]],
) -> None:
    """train_sharded (mesh 1x2, the data-parallel path's activation source) and
    train_distributed (2 data-parallel ranks) on the same config train the same SAE."""
    import json

    main, other = runs["runner"]
    assert other["sharded"] is None and other["resumed"] is None
    sharded, reference = main["sharded"], main["reference"]
    assert set(sharded) == set(reference)
    for key, value in reference.items():
        assert relative_error(sharded[key], value) < 1e-5, key
    checkpoint = Path(main["checkpoint"])
    output = checkpoint.parents[2] / "runner_output"
    assert json.loads((output / "cfg.json").read_text())["architecture"] == "poly"
    assert (checkpoint / "activations_store_state.rank1.safetensors").exists()
    assert (checkpoint / "trainer_state.shard1of2.pt").exists()
    # resumed from the mid-run checkpoint (re-sharded): trained on from there
    resumed = main["resumed"]
    from safetensors.torch import load_file

    at_checkpoint = load_file(checkpoint / "sae_weights.safetensors")
    assert relative_error(at_checkpoint["W_enc"], resumed["W_enc"]) > 1e-4
    # and ended nearer the uninterrupted run's SAE than the checkpoint was (not
    # equal: the language-model path's data order after a resume is not
    # bit-identical; the trainer-level resume above is exact)
    for key, value in sharded.items():
        if value.is_floating_point():  # not AuxK's counts
            assert relative_error(resumed[key], value) < relative_error(
                at_checkpoint[key], value
            ), key


# ---- refusals, before anything loads --------------------------------------------------


def _cfg(**sae_overrides: Any) -> Any:
    from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig

    from polysae_lens import PolyTopKTrainingSAEConfig

    sae = {"d_in": 16, "d_sae": 48, "k": 4, "poly_ranks": (12, 5, 3), **sae_overrides}
    return LanguageModelSAERunnerConfig(
        sae=PolyTopKTrainingSAEConfig(**sae),
        train_batch_size_tokens=32,
        verbose=False,
        logger=LoggingConfig(log_to_wandb=False),
    )


@pytest.mark.parametrize(
    ("world_size", "shards", "overrides", "message"),
    [
        (4, 3, {}, r"shard_latents=3 does not divide the world size 4.*\[1, 2, 4\]"),
        (3, 3, {}, r"train_batch_size_tokens=32 .* world size 3"),
        (16, 16, {}, r"d_sae=48 over world_size=16 .*at least k \* world_size = 64"),
        (2, 2, {"stiefel_every_n_steps": 2}, r"stiefel_every_n_steps=2 is not supported"),
        (2, 2, {"normalize_activations": "expected_average_only_in"}, "normalize_activations"),
    ],
)
def test_check_sharding_refuses_with_the_fix(
    world_size: int, shards: int, overrides: dict[str, Any], message: str
) -> None:
    from polysae_lens.distributed.sharded_runner import check_sharding

    with pytest.raises(ValueError, match=message):
        check_sharding(_cfg(**overrides), world_size, shards)


def test_check_sharding_refuses_other_architectures_and_compile() -> None:
    from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

    from polysae_lens.distributed.sharded_runner import check_sharding

    cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=16, d_sae=48, k=4),
        verbose=False,
        logger=LoggingConfig(log_to_wandb=False),
    )
    with pytest.raises(ValueError, match=r"architecture 'poly' .* not 'topk'"):
        check_sharding(cfg, 2, 2)
    compiled = _cfg()
    compiled.compile_sae = True
    with pytest.raises(ValueError, match="compile_sae=True is not supported"):
        check_sharding(compiled, 2, 2)
    check_sharding(_cfg(), 4, 2)  # a valid 2x2 mesh passes


@pytest.mark.parametrize(
    ("env", "flags", "message"),
    [
        ({}, ["--shard_latents", "2"], "torchrun --nproc-per-node N"),
        ({"WORLD_SIZE": "2"}, ["--shard-latents=3"], "does not divide the world size 2"),
        ({"WORLD_SIZE": "2"}, ["--shard_latents", "2", "--architecture", "topk"], "not 'topk'"),
        ({"WORLD_SIZE": "2"}, ["--shard_latents", "two"], "not a whole number of shards"),
        (
            {"WORLD_SIZE": "2"},
            ["--shard_latents", "2", "--stiefel_every_n_steps", "2"],
            "set stiefel_every_n_steps=1",
        ),
    ],
)
def test_cli_refuses_before_loading_anything(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    env: dict[str, str],
    flags: list[str],
    message: str,
) -> None:
    from polysae_lens import cli

    monkeypatch.chdir(tmp_path)  # SAELens's default --output_path is ./output
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(
        "polysae_lens.distributed.sharded_runner.train_sharded",
        lambda *a, **k: pytest.fail("training started"),
    )
    args = ["train", "--d_in", "16", "--d_sae", "48", "-k", "4", "--log_to_wandb", "False"]
    args += ["--train_batch_size_tokens", "32", *flags]
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err


# ---- the CLI under torchrun ------------------------------------------------------------


def test_cli_trains_latent_sharded_under_torchrun(tmp_path: Path) -> None:
    import json
    import subprocess

    from sae_lens import SAE

    from .lm_fixtures import save_tiny_hf_model, write_text_dataset

    model_dir = save_tiny_hf_model(tmp_path / "model")
    data_dir = write_text_dataset(tmp_path / "texts")
    args = [
        "--model_class_name", "AutoModelForCausalLM", "--model_name", str(model_dir),
        "--hook_name", "transformer.h.0", "--dataset_path", str(data_dir),
        "--d_in", "16", "--d_sae", "48", "-k", "4", "--poly_ranks", "12", "5", "3",
        "--context_size", "16", "--training_tokens", "320",
        "--train_batch_size_tokens", "32", "--store_batch_size_prompts", "2",
        "--n_batches_in_buffer", "4", "--lr", "1e-2", "--log_to_wandb", "False",
        "--n_checkpoints", "1", "--checkpoint_path", str(tmp_path / "checkpoints"),
        "--shard_latents", "2",
    ]  # fmt: skip

    def train(*extra: str) -> subprocess.CompletedProcess[str]:
        return torchrun_train([*args, *extra], cwd=tmp_path)

    result = train("--output_path", str(tmp_path / "output"))
    for rank in (0, 1):
        assert f"mesh (dp=1, shard=2), replica 0, latent slice {rank} of 2" in result.stderr
        assert f"world size 2, rank {rank} (local rank {rank})" in result.stderr
    assert result.stderr.count("latent-sharded run finished on 2 ranks") == 1
    summaries = [line for line in result.stdout.splitlines() if line.startswith("trained ")]
    assert len(summaries) == 1 and "d_sae=48" in summaries[0]
    saved = SAE.load_from_disk(tmp_path / "output", "cpu")  # the whole SAE, ordinary format
    assert saved.cfg.d_sae == 48 and json.loads((tmp_path / "output" / "cfg.json").read_text())
    U = saved.U.detach()
    assert (U.T @ U - torch.eye(U.shape[1])).abs().max() < 1e-5
    (run_dir,) = (tmp_path / "checkpoints").iterdir()
    (checkpoint,) = run_dir.iterdir()
    resumed = train(
        "--resume_from_checkpoint", str(checkpoint), "--output_path", str(tmp_path / "resumed")
    )
    for rank in (0, 1):
        assert f"rank {rank} resuming from checkpoint {checkpoint}" in resumed.stderr
    assert "has no data position" not in resumed.stderr
    assert SAE.load_from_disk(tmp_path / "resumed", "cpu").cfg.d_sae == 48
