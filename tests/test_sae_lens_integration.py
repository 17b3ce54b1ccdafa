"""PolySAEs inside SAELens's language-model and synthetic-data tooling, offline.

- ``HookedSAETransformer``: splicing a PolySAE into a tiny transformer
  (``add_sae``, ``run_with_cache_with_saes``), with and without the error term.
- ``sae_lens.evals.run_evals`` on a tiny model and an in-memory text dataset.
- ``sae_lens.synthetic.eval_sae_on_synthetic_data`` with a 16-dim feature dictionary.

Every SAE is tested both as an inference SAE (saved with ``save_inference_model``
and reloaded with ``SAE.load_from_disk``) and as a training SAE in eval mode.
"""

from __future__ import annotations

import math
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from sae_lens import SAE, ActivationsStore, HookedSAETransformer
from sae_lens.evals import EvalConfig, get_eval_everything_config, run_evals
from sae_lens.synthetic import (
    ActivationGenerator,
    FeatureDictionary,
    eval_sae_on_synthetic_data,
    mean_correlation_coefficient,
    orthogonal_initializer,
)
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.util import get_special_token_ids

import polysae_lens

from .conftest import D_IN, D_SAE, K, make_training_sae
from .lm_fixtures import (
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    TEXTS,
    TOKENIZER_NAME,
    UNK_TOKEN,
    make_tiny_model,
    make_tiny_sae_transformer,
    make_tokenizer,
)

HOOK = "blocks.0.hook_resid_post"
CONTEXT_SIZE = 16
EVAL_BATCH_PROMPTS = 4
SAE_HOOKS = (
    "hook_sae_input",
    "hook_sae_acts_pre",
    "hook_sae_acts_post",
    "hook_sae_recons",
    "hook_sae_output",
)
KINDS = ("inference", "training")

# The in-memory dataset is raw text on purpose (it exercises the tokenizer).
pytestmark = pytest.mark.filterwarnings("ignore:Dataset is not tokenized:UserWarning")


# ---- fixtures and helpers ----------------------------------------------------


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any test that tries to open a network connection."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def text_dataset() -> Dataset:
    return Dataset.from_dict({"text": TEXTS})


@pytest.fixture(scope="module")
def feature_dict() -> FeatureDictionary:
    return FeatureDictionary(
        num_features=32,
        hidden_dim=D_IN,
        seed=0,
        initializer=orthogonal_initializer(num_steps=100),
    )


def _training_sae(arch: str) -> Any:
    sae = make_training_sae(arch)
    sae.cfg.metadata.hook_name = HOOK
    sae.cfg.metadata.prepend_bos = True
    sae.cfg.metadata.context_size = CONTEXT_SIZE
    return sae


def make_sae(arch: str, kind: str, tmp_path: Path) -> SAE[Any]:
    """A tiny PolySAE on ``HOOK``: reloaded inference SAE, or training SAE in eval mode."""
    training_sae = _training_sae(arch)
    if kind == "training":
        return training_sae.eval()
    training_sae.save_inference_model(tmp_path / arch)
    sae = SAE.load_from_disk(tmp_path / arch)
    assert polysae_lens.is_poly_sae(sae)
    assert sae.cfg.metadata.hook_name == HOOK
    return sae


@pytest.fixture
def tokens() -> torch.Tensor:
    model = make_tiny_model()
    return model.to_tokens(TEXTS[:4])


def _assert_finite(value: float, name: str) -> None:
    assert isinstance(value, float), f"{name} is {type(value).__name__}, not float"
    assert math.isfinite(value), f"{name} = {value} is not finite"


# ---- the offline fixtures themselves ------------------------------------------


def test_tokenizer_is_local_and_round_trips() -> None:
    tok = make_tokenizer()
    assert tok.name_or_path == TOKENIZER_NAME
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        BOS_TOKEN,
        EOS_TOKEN,
        PAD_TOKEN,
        UNK_TOKEN,
    )
    assert len(set(get_special_token_ids(tok))) == 3  # BOS, EOS, PAD
    text = "A brand-new sentence, never seen: 42!"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id  # add_bos_token
    assert tok.unk_token_id not in ids  # byte-level: no unknowns
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert make_tokenizer().get_vocab() == tok.get_vocab()  # deterministic training


def test_tiny_models_share_weights_and_tokenize_offline() -> None:
    model = make_tiny_model()
    sae_model = make_tiny_sae_transformer()
    assert isinstance(sae_model, HookedSAETransformer)
    assert model.cfg.d_model == D_IN
    assert model.cfg.d_vocab == len(model.tokenizer)
    toks = model.to_tokens("The cat sat on the mat.")
    assert toks.ndim == 2 and toks[0, 0].item() == model.tokenizer.bos_token_id
    assert (toks[0, 1:] != model.tokenizer.bos_token_id).all()  # BOS prepended once
    assert model.to_string(toks[0, 1:]) == "The cat sat on the mat."
    torch.testing.assert_close(sae_model.to_tokens(TEXTS[:3]), model.to_tokens(TEXTS[:3]))
    with torch.no_grad():
        torch.testing.assert_close(sae_model(toks), model(toks), rtol=0, atol=0)
    # a different seed gives a different model
    other = make_tiny_model(seed=1)
    assert not torch.equal(other.W_E, model.W_E)


# ---- HookedSAETransformer ---------------------------------------------------


@torch.no_grad()
def test_add_sae_splices_the_polysae_into_the_model(
    arch: str, kind: str, tmp_path: Path, tokens: torch.Tensor
) -> None:
    model = make_tiny_sae_transformer()
    sae = make_sae(arch, kind, tmp_path)
    clean_logits, clean_cache = model.run_with_cache(tokens)
    resid = clean_cache[HOOK]

    model.add_sae(sae, use_error_term=False)
    assert model.acts_to_saes == {HOOK: sae}
    try:
        logits, cache = model.run_with_cache(tokens)
    finally:
        model.reset_saes()

    for name in SAE_HOOKS:
        assert f"{HOOK}.{name}" in cache, f"{HOOK}.{name} missing from the cache"
    torch.testing.assert_close(cache[f"{HOOK}.hook_sae_input"], resid)
    acts = cache[f"{HOOK}.hook_sae_acts_post"]
    assert acts.shape == (*tokens.shape, D_SAE)
    assert (acts >= 0).all()
    torch.testing.assert_close(acts, sae.encode(resid))
    # the reconstruction is the polynomial decoder's, not a linear one
    recons = cache[f"{HOOK}.hook_sae_recons"]
    torch.testing.assert_close(recons, sae.decode(acts))
    linear_recons = acts @ sae.W_dec + sae.b_dec
    assert (recons - linear_recons).abs().max() > 1e-4
    torch.testing.assert_close(cache[f"{HOOK}.hook_sae_output"], recons)
    if arch == "poly":
        l0 = (acts != 0).sum(-1)
        assert (l0 <= K).all() and l0.max() == K
    assert (logits - clean_logits).abs().max() > 1e-2

    # reset_saes restores the clean model
    assert model.acts_to_saes == {}
    torch.testing.assert_close(model(tokens), clean_logits, rtol=0, atol=0)


@torch.no_grad()
def test_run_with_cache_with_saes_error_term(
    arch: str, kind: str, tmp_path: Path, tokens: torch.Tensor
) -> None:
    model = make_tiny_sae_transformer()
    sae = make_sae(arch, kind, tmp_path)
    clean_logits = model(tokens)

    logits, cache = model.run_with_cache_with_saes(tokens, saes=[sae], use_error_term=True)
    assert f"{HOOK}.hook_sae_error" in cache
    for name in SAE_HOOKS:
        assert f"{HOOK}.{name}" in cache
    torch.testing.assert_close(logits, clean_logits, rtol=1e-5, atol=1e-5)
    sae_in = cache[f"{HOOK}.hook_sae_input"]
    torch.testing.assert_close(cache[f"{HOOK}.hook_sae_output"], sae_in, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        cache[f"{HOOK}.hook_sae_error"], sae_in - cache[f"{HOOK}.hook_sae_recons"]
    )
    assert model.acts_to_saes == {}  # removed again after the run

    logits_no_error, cache = model.run_with_cache_with_saes(
        tokens, saes=[sae], use_error_term=False
    )
    assert f"{HOOK}.hook_sae_error" not in cache
    assert (logits_no_error - clean_logits).abs().max() > 1e-2
    torch.testing.assert_close(
        cache[f"{HOOK}.hook_sae_output"], sae(cache[f"{HOOK}.hook_sae_input"])
    )


@torch.no_grad()
def test_inference_sae_matches_training_sae_in_the_model(
    arch: str, tmp_path: Path, tokens: torch.Tensor
) -> None:
    """The saved model (BatchTopK/Matryoshka as JumpReLU) behaves as the training SAE in eval."""
    model = make_tiny_sae_transformer()
    training_sae = make_sae(arch, "training", tmp_path)
    inference_sae = make_sae(arch, "inference", tmp_path)
    assert type(inference_sae) is not type(training_sae)
    out = {}
    for kind, sae in (("training", training_sae), ("inference", inference_sae)):
        logits, cache = model.run_with_cache_with_saes(tokens, saes=[sae], use_error_term=False)
        out[kind] = (logits, cache[f"{HOOK}.hook_sae_acts_post"])
    torch.testing.assert_close(out["inference"][1], out["training"][1])
    torch.testing.assert_close(out["inference"][0], out["training"][0])


# ---- run_evals ----------------------------------------------------------------


def _activation_store(model: Any, sae: SAE[Any], dataset: Dataset) -> ActivationsStore:
    return ActivationsStore.from_sae(
        model,
        sae,
        dataset=dataset,
        context_size=CONTEXT_SIZE,
        streaming=False,
        store_batch_size_prompts=EVAL_BATCH_PROMPTS,
        n_batches_in_buffer=2,
        train_batch_size_tokens=64,
        total_tokens=len(TEXTS),
    )


def test_run_evals_on_tiny_model(
    arch: str, kind: str, tmp_path: Path, text_dataset: Dataset
) -> None:
    model = make_tiny_model()
    sae = make_sae(arch, kind, tmp_path)
    store = _activation_store(model, sae, text_dataset)
    eval_config = get_eval_everything_config(
        batch_size_prompts=EVAL_BATCH_PROMPTS,
        n_eval_reconstruction_batches=2,
        n_eval_sparsity_variance_batches=2,
    )
    metrics, feature_metrics = run_evals(sae, store, model, ActivationScaler(), eval_config)

    for group, names in {
        "model_behavior_preservation": ("kl_div_score", "kl_div_with_sae", "kl_div_with_ablation"),
        "model_performance_preservation": (
            "ce_loss_score",
            "ce_loss_with_sae",
            "ce_loss_without_sae",
            "ce_loss_with_ablation",
        ),
        "reconstruction_quality": ("explained_variance", "mse", "cossim"),
        "shrinkage": ("l2_norm_in", "l2_norm_out", "l2_ratio"),
        "sparsity": ("l0", "l1"),
    }.items():
        for name in names:
            _assert_finite(metrics[group][name], f"{group}/{name}")
    assert metrics["model_behavior_preservation"]["kl_div_with_sae"] > 0
    assert metrics["reconstruction_quality"]["mse"] > 0
    assert -1 <= metrics["reconstruction_quality"]["cossim"] <= 1
    l0 = metrics["sparsity"]["l0"]
    assert 0 < l0 <= D_SAE
    if arch == "poly":
        assert l0 == pytest.approx(K)
    assert metrics["token_stats"]["total_tokens_eval_sparsity_variance"] == (
        CONTEXT_SIZE * 2 * EVAL_BATCH_PROMPTS
    )

    # per-latent densities over the same tokens add up to the mean L0
    density = torch.tensor(feature_metrics["feature_density"])
    assert density.shape == (D_SAE,)
    assert density.sum().item() == pytest.approx(l0, rel=1e-4)

    # the weight-based metrics read W_dec, i.e. PolySAE's first-order decoder U @ C1
    with torch.no_grad():
        W_dec = sae.U @ sae.C1
        expected_cos = torch.nn.functional.cosine_similarity(sae.W_enc.T, W_dec, dim=-1)
        expected_enc_norm = sae.W_enc.norm(dim=0)
    cos = torch.tensor(feature_metrics["encoder_decoder_cosine_sim"])
    torch.testing.assert_close(cos, expected_cos, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(feature_metrics["encoder_norm"]), expected_enc_norm)
    if arch == "poly_gated":  # gate and magnitude biases, no b_enc
        assert "encoder_bias" not in feature_metrics
    else:
        torch.testing.assert_close(torch.tensor(feature_metrics["encoder_bias"]), sae.b_enc)


@torch.no_grad()
def test_run_evals_variance_metrics_use_the_polynomial_decoder(
    arch: str, tmp_path: Path, text_dataset: Dataset
) -> None:
    """run_evals's MSE equals the one computed with PolySAE's own forward pass."""
    model = make_tiny_model()
    sae = make_sae(arch, "inference", tmp_path)
    eval_config = EvalConfig(
        batch_size_prompts=EVAL_BATCH_PROMPTS,
        n_eval_sparsity_variance_batches=1,
        compute_variance_metrics=True,
        compute_sparsity_metrics=True,
    )
    metrics, _ = run_evals(
        sae, _activation_store(model, sae, text_dataset), model, ActivationScaler(), eval_config
    )

    # the same batch, from a fresh store over the same data
    batch = _activation_store(model, sae, text_dataset).get_batch_tokens(EVAL_BATCH_PROMPTS)
    _, cache = model.run_with_cache(batch, names_filter=[HOOK], prepend_bos=False)
    x = cache[HOOK]
    keep = ~torch.isin(batch, torch.tensor(get_special_token_ids(model.tokenizer)))
    assert keep.any() and not keep.all()
    x_hat = sae(x)
    mse = (x - x_hat).pow(2).sum(-1)[keep].mean().item()
    l0 = (sae.encode(x) != 0).sum(-1)[keep].float().mean().item()
    assert metrics["reconstruction_quality"]["mse"] == pytest.approx(mse, rel=1e-4)
    assert metrics["sparsity"]["l0"] == pytest.approx(l0, rel=1e-6)
    linear_mse = (x - (sae.encode(x) @ sae.W_dec + sae.b_dec)).pow(2).sum(-1)[keep].mean()
    assert linear_mse.item() != pytest.approx(mse, rel=1e-3)


# ---- synthetic data -------------------------------------------------------------


def _generator() -> ActivationGenerator:
    return ActivationGenerator(
        num_features=32,
        firing_probabilities=0.1,
        std_firing_magnitudes=0.1,
        mean_firing_magnitudes=1.0,
    )


@torch.no_grad()
def test_eval_sae_on_synthetic_data(
    arch: str, kind: str, tmp_path: Path, feature_dict: FeatureDictionary
) -> None:
    sae = make_sae(arch, kind, tmp_path)
    generator = _generator()
    n_samples, batch_size = 512, 128
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        result = eval_sae_on_synthetic_data(
            sae, feature_dict, generator, num_samples=n_samples, batch_size=batch_size
        )
        # the same samples again, to recompute metrics with PolySAE's forward pass
        torch.manual_seed(0)
        hidden = torch.cat([feature_dict(generator.sample(batch_size)) for _ in range(4)])

    for name, value in result.to_log_dict().items():
        assert math.isfinite(value), f"{name} = {value} is not finite"
    assert not sae.training
    assert 0.0 <= result.mcc <= 1.0
    assert 0.0 < result.uniqueness <= 1.0
    assert 0 <= result.dead_latents < D_SAE
    assert result.true_l0 == pytest.approx(32 * 0.1, abs=0.5)
    assert 0.0 <= result.classification.accuracy <= 1.0
    if arch == "poly":
        assert result.sae_l0 == pytest.approx(K)

    # MCC is computed on W_dec = U @ C1
    expected_mcc = mean_correlation_coefficient(sae.U @ sae.C1, feature_dict.feature_vectors)
    assert result.mcc == pytest.approx(expected_mcc, rel=1e-6)

    # explained variance and L0 come from the polynomial reconstruction
    acts = sae.encode(hidden)
    x_hat = sae.decode(acts)
    centred = hidden - hidden.mean(0)
    expected_ev = 1 - (hidden - x_hat).pow(2).sum() / centred.pow(2).sum()
    assert result.explained_variance == pytest.approx(expected_ev.item(), rel=1e-4, abs=1e-5)
    assert result.sae_l0 == pytest.approx((acts != 0).sum(-1).float().mean().item())


@torch.no_grad()
def test_synthetic_mcc_is_one_for_a_planted_first_order_decoder(
    arch: str, feature_dict: FeatureDictionary
) -> None:
    """A PolySAE whose U @ C1 rows contain the true features scores MCC = 1."""
    n_features = 12  # <= R1 = 12 and <= d_in
    planted = FeatureDictionary(num_features=n_features, hidden_dim=D_IN, seed=1, initializer=None)
    sae = make_training_sae(arch)
    rows = torch.randperm(D_SAE, generator=torch.Generator().manual_seed(0))[:n_features]
    U = torch.zeros_like(sae.U)
    U[rows, torch.arange(n_features)] = 1.0  # orthonormal columns
    sae.U.copy_(U)
    sae.C1.copy_(2.5 * planted.feature_vectors)
    assert polysae_lens.orthogonality_error(sae.U) < 1e-6

    generator = ActivationGenerator(num_features=n_features, firing_probabilities=0.2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        planted_result = eval_sae_on_synthetic_data(sae, planted, generator, num_samples=256)
    assert planted_result.mcc == pytest.approx(1.0, abs=1e-5)

    # a random PolySAE against an unrelated dictionary is far from that
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        random_result = eval_sae_on_synthetic_data(
            make_training_sae(arch), feature_dict, _generator(), num_samples=256
        )
    assert random_result.mcc < 0.9
