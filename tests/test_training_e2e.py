"""End-to-end PolySAE training through SAELens's stock runners, offline.

Every run uses the tiny 2-layer HookedTransformer and the local BPE tokenizer of
:mod:`tests.lm_fixtures` (or SAELens's synthetic data), an in-memory dataset and
a few hundred to a few thousand training tokens. Each training test checks that
the reconstruction loss falls, that the learned lambdas leave their initial
values (-0.5, 0.5) and that U ends orthonormal.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import wandb
from datasets import Dataset
from sae_lens import (
    SAE,
    LanguageModelSAERunnerConfig,
    LanguageModelSAETrainingRunner,
    LoggingConfig,
    MultiSAETrainingRunner,
    MultiSAETrainingRunnerConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
    TrainingSAE,
)
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
from sae_lens.synthetic import SyntheticModelConfig, SyntheticSAERunner, SyntheticSAERunnerConfig
from sae_lens.training.activations_store import ActivationsStore
from transformer_lens import HookedTransformer

from polysae_lens import (
    PolyTopKSAE,
    PolyTopKTrainingSAE,
    PolyTopKTrainingSAEConfig,
    orthogonality_error,
)

from .lm_fixtures import HOOK, OFFLINE_ENV, SMALL_CORPUS_WARNINGS, TEXTS, make_tiny_model

pytestmark = [*SMALL_CORPUS_WARNINGS, pytest.mark.usefixtures("restore_signal_handlers")]

D_IN = 16  # d_model of the tiny transformer
D_SAE = 48
K = 4
RANKS = (12, 5, 3)
CONTEXT = 16
PROMPTS_PER_LLM_BATCH = 2
BATCH_TOKENS = CONTEXT * PROMPTS_PER_LLM_BATCH  # an LLM batch holds exactly one training batch
LR = 1e-2
LAMBDA_INITS = {"lambda2": -0.5, "lambda3": 0.5}
POLY_METRICS = (
    "metrics/poly/lambda2",
    "metrics/poly/lambda3",
    "metrics/poly/orthogonality_error",
    "metrics/poly/linear_norm",
    "metrics/poly/quadratic_norm",
    "metrics/poly/cubic_norm",
)
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_gpt2_paper.py"

# ---- helpers -------------------------------------------------------------------


class StepRecorder:
    """Wraps ``sae.training_forward_pass`` to record each step's MSE loss and
    input batch (what SAELens's trainers feed the SAE)."""

    def __init__(self, sae: TrainingSAE[Any]) -> None:
        self.mse: list[float] = []
        self.inputs: list[torch.Tensor] = []
        inner = sae.training_forward_pass

        def recorded(step_input: TrainStepInput) -> TrainStepOutput:
            output = inner(step_input)
            self.mse.append(output.losses["mse_loss"].item())
            self.inputs.append(step_input.sae_in.detach().clone())
            return output

        sae.training_forward_pass = recorded  # type: ignore[method-assign]


def assert_loss_falls(mse: list[float], factor: float = 0.5) -> None:
    first, last = sum(mse[:3]) / 3, sum(mse[-3:]) / 3
    assert last < factor * first, f"MSE did not fall enough: first {first:.4g}, last {last:.4g}"


def assert_poly_trained(sae: TrainingSAE[Any], mse: list[float]) -> None:
    assert isinstance(sae, PolyTopKTrainingSAE)
    assert_loss_falls(mse)
    for name, init in LAMBDA_INITS.items():
        value = getattr(sae, name).item()
        assert math.isfinite(value)
        assert abs(value - init) > 1e-3, f"{name} stayed at its initial value {init}"
    assert orthogonality_error(sae.U).item() <= 1e-5


def poly_cfg(**overrides: Any) -> PolyTopKTrainingSAEConfig:
    return PolyTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, poly_ranks=RANKS, **overrides)


def runner_cfg(
    tmp_path: Path, steps: int, sae: Any = None, **overrides: Any
) -> LanguageModelSAERunnerConfig[Any]:
    """A tiny, offline LanguageModelSAERunnerConfig (model and dataset come as
    runner overrides; their names here are labels only)."""
    fields: dict[str, Any] = {
        "model_name": "tiny-offline",
        "hook_name": HOOK,
        "dataset_path": "in-memory",
        "is_dataset_tokenized": False,
        "streaming": False,
        "context_size": CONTEXT,
        "training_tokens": steps * BATCH_TOKENS,
        "train_batch_size_tokens": BATCH_TOKENS,
        "store_batch_size_prompts": PROMPTS_PER_LLM_BATCH,
        "n_batches_in_buffer": 4,
        "lr": LR,
        "lr_end": LR,
        "logger": LoggingConfig(log_to_wandb=False),
        "output_path": str(tmp_path / "output"),
        "checkpoint_path": str(tmp_path / "checkpoints"),
        "verbose": False,
    }
    fields.update(overrides)
    return LanguageModelSAERunnerConfig(sae=poly_cfg() if sae is None else sae, **fields)


def text_dataset() -> Dataset:
    return Dataset.from_dict({"text": TEXTS})


def token_dataset(model: HookedTransformer, repeats: int = 3) -> Dataset:
    """Pre-tokenized rows of exactly CONTEXT tokens (the texts, concatenated)."""
    tokens = torch.cat([model.to_tokens(t, prepend_bos=False)[0] for t in TEXTS * repeats])
    n_rows = len(tokens) // CONTEXT
    rows = tokens[: n_rows * CONTEXT].view(n_rows, CONTEXT)
    return Dataset.from_dict({"tokens": rows.tolist()})


def hook_activations(model: HookedTransformer, n_texts: int = 8) -> torch.Tensor:
    tokens = model.to_tokens(TEXTS[-n_texts:])
    _, cache = model.run_with_cache(tokens, names_filter=[HOOK])
    return cache[HOOK].reshape(-1, D_IN)


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in OFFLINE_ENV.items():
        monkeypatch.setenv(name, value)


# ---- (a) language-model runner, save and reload ---------------------------------


def test_lm_runner_trains_saves_and_reloads(tmp_path: Path) -> None:
    model = make_tiny_model()
    cfg = runner_cfg(tmp_path, steps=60)
    torch.manual_seed(0)
    runner = LanguageModelSAETrainingRunner(
        cfg, override_model=model, override_dataset=text_dataset()
    )
    record = StepRecorder(runner.sae)
    sae = runner.run()

    assert len(record.mse) == 60
    assert_poly_trained(sae, record.mse)

    output = tmp_path / "output"
    saved_cfg = json.loads((output / "cfg.json").read_text())
    assert saved_cfg["architecture"] == "poly"
    assert tuple(saved_cfg["poly_ranks"]) == RANKS
    loaded = SAE.load_from_disk(output)
    assert type(loaded) is PolyTopKSAE
    assert loaded.cfg.metadata.hook_name == HOOK
    trained = sae.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, trained[name]), name

    x = hook_activations(model)
    sae.eval()
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), sae.encode(x))
        assert torch.equal(loaded(x), sae(x))
        again = SAE.load_from_disk(output)
        assert torch.equal(again(x), loaded(x))


# ---- (b) synthetic-data runner --------------------------------------------------


def test_synthetic_runner_trains_a_poly_sae(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = SyntheticSAERunnerConfig(
        synthetic_model=SyntheticModelConfig(num_features=32, hidden_dim=D_IN, seed=0),
        sae=poly_cfg(),
        training_samples=150 * 64,
        batch_size=64,
        lr=LR,
        lr_end=LR,
        eval_samples=1024,
        output_path=str(tmp_path / "synthetic"),
        checkpoint_path=None,
        logger=LoggingConfig(log_to_wandb=False),
    )
    runner = SyntheticSAERunner(cfg)
    assert isinstance(runner.sae, PolyTopKTrainingSAE)
    record = StepRecorder(runner.sae)
    result = runner.run()

    assert len(record.mse) == 150
    assert_poly_trained(result.sae, record.mse)
    assert result.final_eval is not None
    assert 0.0 < result.final_eval.mcc <= 1.0
    loaded = SAE.load_from_disk(tmp_path / "synthetic")
    assert type(loaded) is PolyTopKSAE
    x = result.synthetic_model.sample(32)
    result.sae.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), result.sae(x))


# ---- (c) a PolySAE and a stock TopK SAE on one activation stream -----------------


def test_multi_sae_runner_trains_poly_and_topk_together(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = MultiSAETrainingRunnerConfig(
        saes={"poly": poly_cfg(), "topk": TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K)},
        hook_names=HOOK,
        model_name="tiny-offline",
        dataset_path="in-memory",
        streaming=False,
        context_size=CONTEXT,
        training_tokens=60 * BATCH_TOKENS,
        train_batch_size_tokens=BATCH_TOKENS,
        store_batch_size_prompts=PROMPTS_PER_LLM_BATCH,
        n_batches_in_buffer=4,
        lr=LR,
        lr_end=LR,
        logger=LoggingConfig(log_to_wandb=False),
        output_path=str(tmp_path / "multi"),
        checkpoint_path=None,
    )
    runner = MultiSAETrainingRunner(
        cfg, override_model=make_tiny_model(), override_dataset=text_dataset()
    )
    records = {name: StepRecorder(sae) for name, sae in runner.saes.items()}
    saes = runner.run()

    assert isinstance(saes["topk"], TopKTrainingSAE)
    assert not isinstance(saes["topk"], PolyTopKTrainingSAE)
    assert_poly_trained(saes["poly"], records["poly"].mse)
    assert_loss_falls(records["topk"].mse)
    # one activation stream: both SAEs saw the same batch at every step
    assert len(records["poly"].inputs) == len(records["topk"].inputs) == 60
    for poly_in, topk_in in zip(records["poly"].inputs, records["topk"].inputs, strict=True):
        assert torch.equal(poly_in, topk_in)
    assert type(SAE.load_from_disk(tmp_path / "multi" / "poly")) is PolyTopKSAE


# ---- (d) resume from a checkpoint ----------------------------------------------


class SimulatedCrash(RuntimeError):
    """Stands for the process dying (OOM, node failure) after a checkpoint."""


def crash_on_batch(monkeypatch: pytest.MonkeyPatch, batch_number: int) -> None:
    """Make the activation store raise before handing out batch ``batch_number``
    (1-based), i.e. at the start of a training step, with nothing half-done."""
    real_next = ActivationsStore.__next__
    calls = {"n": 0}

    def next_or_crash(self: ActivationsStore) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == batch_number:
            raise SimulatedCrash(f"simulated crash before batch {batch_number}")
        return real_next(self)

    monkeypatch.setattr(ActivationsStore, "__next__", next_or_crash)


@pytest.mark.parametrize("every_n", [1, 2])
def test_resume_from_checkpoint_is_bit_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, every_n: int
) -> None:
    """A run that dies after its checkpoint and is resumed with
    ``resume_from_checkpoint`` ends with exactly the weights of an uninterrupted
    run, even when seeded differently.

    sae-lens 6.54.12 checkpoints the SAE, Adam (including ``state["step"]``,
    which counts the Stiefel ``every_n`` schedule), the LR and coefficient
    schedulers, the dead-latent statistics and the dataset position in rows. It
    does not checkpoint the activations waiting in the mixing buffer nor torch's
    RNG (the buffer's ``randperm``), and it counts whole rows only. So resume is
    bit-exact only with a pre-tokenized dataset, ``activations_mixing_fraction=0``
    and a mixing buffer of exactly one LLM batch, as here.
    """
    model = make_tiny_model()
    dataset = token_dataset(model)
    steps = 12  # checkpoint after 7 steps (n_training_samples > half the total)

    def cfg(tag: str, **overrides: Any) -> LanguageModelSAERunnerConfig[Any]:
        return runner_cfg(
            tmp_path / tag,
            steps,
            sae=poly_cfg(stiefel_every_n_steps=every_n),
            is_dataset_tokenized=True,
            activations_mixing_fraction=0.0,
            n_batches_in_buffer=PROMPTS_PER_LLM_BATCH,  # buffer = one LLM batch
            n_checkpoints=1,
            output_path=None,
            **overrides,
        )

    def run(run_cfg: LanguageModelSAERunnerConfig[Any], seed: int) -> TrainingSAE[Any]:
        torch.manual_seed(seed)
        runner = LanguageModelSAETrainingRunner(
            run_cfg, override_model=model, override_dataset=dataset
        )
        return runner.run()

    uninterrupted = run(cfg("full"), seed=0)

    crashed_cfg = cfg("crashed")
    with monkeypatch.context() as patch:
        crash_on_batch(patch, batch_number=10)
        with pytest.raises(SimulatedCrash):
            run(crashed_cfg, seed=0)
    assert crashed_cfg.checkpoint_path is not None
    checkpoints = sorted(Path(crashed_cfg.checkpoint_path).iterdir())
    assert [c.name for c in checkpoints] == [str(7 * BATCH_TOKENS)]
    checkpoint = checkpoints[0]
    saved_U = SAE.load_from_disk(checkpoint).U  # the checkpoint is loadable on its own
    # with every_n = 2 the checkpoint (after step 7) holds an unretracted U
    assert (orthogonality_error(saved_U).item() > 1e-6) == (every_n == 2)

    # a different seed: every weight must come from the checkpoint
    resumed = run(cfg("resumed", resume_from_checkpoint=str(checkpoint)), seed=123)

    expected = uninterrupted.state_dict()
    for name, tensor in resumed.state_dict().items():
        assert torch.equal(tensor, expected[name]), f"{name} differs after resume"
    assert orthogonality_error(resumed.U).item() <= 1e-5


# ---- (e) logged metrics and the progress bar -----------------------------------


def test_poly_metrics_are_logged_at_the_wandb_cadence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    logged: list[tuple[int | None, dict[str, Any]]] = []
    inits: list[dict[str, Any]] = []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: inits.append(kwargs))
    monkeypatch.setattr(wandb, "finish", lambda *args, **kwargs: None)
    monkeypatch.setattr(
        wandb, "log", lambda data, step=None, **kwargs: logged.append((step, dict(data)))
    )
    steps, every = 100, 25
    cfg = runner_cfg(
        tmp_path,
        steps,
        logger=LoggingConfig(
            log_to_wandb=True, wandb_log_frequency=every, eval_every_n_wandb_logs=4
        ),
        n_eval_batches=1,
        eval_batch_size_prompts=2,
        output_path=None,
    )
    torch.manual_seed(0)
    runner = LanguageModelSAETrainingRunner(
        cfg, override_model=make_tiny_model(), override_dataset=text_dataset()
    )
    sae = runner.run()

    assert len(inits) == 1
    assert inits[0]["config"]["sae"]["architecture"] == "poly"
    train_logs = {step: data for step, data in logged if "losses/mse_loss" in data}
    expected_steps = list(range(every - 1, steps, every))  # 24, 49, 74, 99
    assert sorted(train_logs) == expected_steps
    poly_steps = sorted(step for step, data in logged if any(k in data for k in POLY_METRICS))
    assert poly_steps == expected_steps
    for step in expected_steps:
        data = train_logs[step]
        assert set(POLY_METRICS) <= set(data), sorted(data)
        assert all(math.isfinite(data[key]) for key in POLY_METRICS)
        assert data["metrics/poly/orthogonality_error"] <= 1e-5
        assert data["metrics/poly/linear_norm"] > 0
    first, last = train_logs[expected_steps[0]], train_logs[expected_steps[-1]]
    assert last["metrics/poly/lambda2"] != first["metrics/poly/lambda2"]
    assert last["metrics/poly/lambda3"] != first["metrics/poly/lambda3"]
    assert last["metrics/poly/lambda2"] == pytest.approx(sae.lambda2.item(), abs=0.05)
    # the stock evaluator ran once (step 99) with the PolySAE spliced into the model
    eval_logs = [
        data
        for step, data in logged
        if step == steps - 1 and "model_performance_preservation" in data
    ]
    assert len(eval_logs) == 1
    assert math.isfinite(eval_logs[0]["model_performance_preservation"]["ce_loss_with_sae"])
    assert eval_logs[0]["reconstruction_quality"]["explained_variance"] > 0

    # SAELens's tqdm bar: its description is refreshed every 100 steps
    err = capsys.readouterr().err
    assert "Training SAE" in err
    assert f"{steps}| mse_loss:" in err


# ---- (f) the GPT-2 paper example ------------------------------------------------


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_gpt2_paper", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_config_has_the_paper_settings() -> None:
    cfg = load_example().build_config()
    sae = cfg.sae
    assert isinstance(sae, PolyTopKTrainingSAEConfig)
    assert (sae.d_in, sae.d_sae, sae.k, sae.poly_order) == (768, 16384, 64, 3)
    assert sae.poly_ranks == (768, 64, 64)
    assert (sae.lambda2_init, sae.lambda3_init) == (-0.5, 0.5)
    assert sae.aux_loss_coefficient == 1.0
    assert sae.rescale_acts_by_decoder_norm is False
    assert sae.normalize_activations == "none"
    assert sae.dtype == cfg.dtype == "float32"
    assert (cfg.model_name, cfg.hook_name) == ("gpt2", "blocks.8.hook_resid_post")
    assert "openwebtext" in cfg.dataset_path
    assert (cfg.lr, cfg.lr_end, cfg.lr_scheduler_name) == (3e-4, 3e-4, "constant")
    assert (cfg.adam_beta1, cfg.adam_beta2) == (0.9, 0.999)
    assert (cfg.train_batch_size_tokens, cfg.context_size) == (4096, 128)
    assert cfg.training_tokens == 300_000_000
    # sae-lens 6.54's mixing buffer (n_batches_in_buffer * context tokens) must
    # hold a training batch, or the first batch raises
    assert cfg.n_batches_in_buffer * cfg.context_size >= cfg.train_batch_size_tokens
    with pytest.raises(TypeError, match="unknown field"):
        load_example().build_config(not_a_field=1)


def test_example_trains_on_the_tiny_model(tmp_path: Path) -> None:
    example = load_example()
    model = make_tiny_model()
    cfg = example.build_config(
        d_in=D_IN,
        d_sae=D_SAE,
        k=K,
        poly_ranks=RANKS,
        device="cpu",
        model_name="tiny-offline",
        hook_name=HOOK,
        dataset_path="in-memory",
        is_dataset_tokenized=False,
        streaming=False,
        context_size=CONTEXT,
        training_tokens=60 * BATCH_TOKENS,
        train_batch_size_tokens=BATCH_TOKENS,
        store_batch_size_prompts=PROMPTS_PER_LLM_BATCH,
        n_batches_in_buffer=4,
        lr=LR,
        n_checkpoints=0,
        log_to_wandb=False,
        checkpoint_path=str(tmp_path / "checkpoints"),
        output_path=str(tmp_path / "example"),
    )
    assert (cfg.device, cfg.sae.device, cfg.lr_end) == ("cpu", "cpu", LR)
    records: list[StepRecorder] = []
    real_init = LanguageModelSAETrainingRunner.__init__

    def init_and_record(self: LanguageModelSAETrainingRunner, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        records.append(StepRecorder(self.sae))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LanguageModelSAETrainingRunner, "__init__", init_and_record)
        sae = example.train(cfg, override_model=model, override_dataset=text_dataset())

    assert_poly_trained(sae, records[0].mse)
    loaded = SAE.load_from_disk(tmp_path / "example")
    assert type(loaded) is PolyTopKSAE
    assert loaded.cfg.metadata.hook_name == HOOK
