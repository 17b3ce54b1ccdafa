"""Dashboard exports of PolySAEs, and sae-dashboard's HTML and Neuronpedia JSON for them.

The export tests need only SAELens. The sae-dashboard tests are skipped when the
``dashboard`` extra is not installed, unless POLYSAE_REQUIRE_DASHBOARD=1 (set by
``make test-dashboard``, which CI runs), in which case its absence is a failure.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import SAE
from sae_lens.saes.gated_sae import GatedSAE
from sae_lens.saes.jumprelu_sae import JumpReLUSAE
from sae_lens.saes.topk_sae import TopKSAE
from transformer_lens import HookedTransformer

import polysae_lens
from polysae_lens.dashboard import (
    DashboardExport,
    inference_form,
    neuronpedia_json,
    to_dashboard_sae,
    write_feature_dashboard,
    write_neuronpedia_json,
)

from .conftest import D_IN, D_SAE, activations, make_training_sae

# sae-dashboard's eindex dependency indexes with lists, which torch deprecates
pytestmark = pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")

HOOK = "blocks.0.hook_resid_post"
STOCK = {"poly": TopKSAE, "poly_jumprelu": JumpReLUSAE, "poly_gated": GatedSAE}
INFERENCE_ARCH = {
    "poly": "poly",
    "poly_batchtopk": "poly_jumprelu",
    "poly_matryoshka": "poly_jumprelu",
    "poly_jumprelu": "poly_jumprelu",
    "poly_gated": "poly_gated",
}
REQUIRE_DASHBOARD = os.environ.get("POLYSAE_REQUIRE_DASHBOARD") == "1"


def inference_sae(arch: str, tmp_path: Path) -> SAE[Any]:
    """A tiny PolySAE of ``arch`` in its inference form, reading :data:`HOOK`."""
    sae = make_training_sae(arch)
    sae.cfg.metadata.hook_name = HOOK
    sae.cfg.metadata.model_name = "tiny-offline"
    sae.save_inference_model(tmp_path / arch)
    return SAE.load_from_disk(tmp_path / arch)


def state_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ---- the export (SAELens only) ------------------------------------------------


def test_export_encodes_bit_identically(arch: str, tmp_path: Path) -> None:
    sae = inference_sae(arch, tmp_path)
    before = state_copy(sae)
    export = to_dashboard_sae(sae)

    stock = STOCK[INFERENCE_ARCH[arch]]
    assert isinstance(export, stock) and isinstance(export, DashboardExport)
    assert export.cfg.architecture() == stock.__name__.removesuffix("SAE").lower()
    assert export.source_architecture == INFERENCE_ARCH[arch]
    x = activations(64) * 3.0
    z = sae.encode(x)
    assert (z != 0).any()
    assert torch.equal(export.encode(x), z)
    x_BSD = x.reshape(4, 16, D_IN)  # dashboards encode [batch, seq, d_in]
    assert torch.equal(export.encode(x_BSD), sae.encode(x_BSD))
    assert torch.equal(export.W_dec, sae.W_dec)  # U @ C1
    assert export.W_dec.shape == (D_SAE, D_IN)
    assert export.cfg.metadata.hook_name == HOOK
    # sae-dashboard folds unconditionally: the export's fold must keep latents exact
    export.fold_W_dec_norm()
    assert torch.equal(export.encode(x), z)
    # the PolySAE itself is untouched
    after = state_copy(sae)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_export_of_a_training_polysae_matches_its_inference_form(arch: str) -> None:
    sae = make_training_sae(arch)
    export = to_dashboard_sae(sae)
    reference = inference_form(sae)
    assert reference.cfg.architecture() == INFERENCE_ARCH[arch]
    assert export.source_architecture == arch
    x = activations(64) * 3.0
    assert torch.equal(export.encode(x), reference.encode(x))
    if arch in ("poly", "poly_jumprelu", "poly_gated"):
        assert torch.equal(export.encode(x), sae.eval().encode(x))


def test_export_decode_is_the_first_order_decoder(tmp_path: Path) -> None:
    sae = inference_sae("poly_jumprelu", tmp_path)
    export = to_dashboard_sae(sae)
    z = sae.encode(activations(16) * 3.0)
    first_order = polysae_lens.decoder_terms(z, sae.decoder_weights).linear
    torch.testing.assert_close(export.decode(z), first_order + sae.b_dec)


def test_export_refuses_a_stock_sae() -> None:
    stock = SAE.from_dict({"architecture": "jumprelu", "d_in": D_IN, "d_sae": D_SAE})
    with pytest.raises(TypeError, match=r"expects a PolySAE .*got sae_lens"):
        to_dashboard_sae(stock)


# ---- sae-dashboard --------------------------------------------------------------


def test_dashboard_extra_is_installed_where_required() -> None:
    if not REQUIRE_DASHBOARD:
        pytest.skip("POLYSAE_REQUIRE_DASHBOARD is not 1")
    import sae_dashboard  # noqa: F401
    import transformers  # noqa: F401


def test_without_the_extra_the_error_says_how_to_install(tmp_path: Path) -> None:
    if importlib.util.find_spec("sae_dashboard") is not None:
        pytest.skip("sae-dashboard is installed")
    sae = inference_sae("poly", tmp_path)
    with pytest.raises(ImportError, match=r"pip install \"polysae-lens\[dashboard\]\""):
        write_feature_dashboard(
            sae, None, torch.zeros(1, 4, dtype=torch.long), [0], tmp_path / "x.html"
        )  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def sae_dashboard() -> Any:
    if REQUIRE_DASHBOARD:
        import sae_dashboard

        return sae_dashboard
    return pytest.importorskip("sae_dashboard")


@pytest.fixture(scope="module")
def lm(sae_dashboard: Any) -> tuple[HookedTransformer, torch.Tensor]:
    """The tiny offline model (d_model 16 = the SAEs' d_in) and tokens [16, seq]."""
    from .lm_fixtures import TEXTS, make_tiny_sae_transformer

    model = make_tiny_sae_transformer(d_model=D_IN)
    return model, model.to_tokens(TEXTS[:16])


def reference_acts(sae: SAE[Any], model: HookedTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """The PolySAE's own latents [batch, seq, d_sae] on ``tokens``."""
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=HOOK)
        return sae.encode(cache[HOOK])


def active_features(acts_BSF: torch.Tensor, n: int = 3) -> list[int]:
    counts_F = (acts_BSF > 0).flatten(0, 1).sum(0)
    return counts_F.argsort(descending=True)[:n].tolist()


@pytest.mark.parametrize("arch", polysae_lens.ARCHITECTURES)
def test_feature_dashboard_html_for_every_variant(
    arch: str, lm: tuple[HookedTransformer, torch.Tensor], tmp_path: Path
) -> None:
    from polysae_lens.dashboard import dashboard_data

    model, tokens = lm
    sae = inference_sae(arch, tmp_path)
    acts_BSF = reference_acts(sae, model, tokens)
    features = active_features(acts_BSF)
    before = state_copy(sae)

    data = dashboard_data(sae, model, tokens, features, minibatch_size_tokens=8)
    assert sorted(data.feature_data_dict) == sorted(features)
    export = data.encoder
    logits_FV = export.W_dec[features] @ model.W_U
    for i, feature in enumerate(features):
        feature_data = data.feature_data_dict[feature]
        acts_N = acts_BSF[..., feature].flatten()
        # the PolySAE's largest latent value and its density over every token (folding
        # by the first-order decoder norms, ~0.7 here, would change the maximum)
        top_group = feature_data.sequence_data.seq_group_data[0]
        assert top_group.title.endswith(f"MAX = {acts_N.max().item():.3f}")
        density = 100 * (acts_N > 0).float().mean().item()
        assert feature_data.acts_histogram_data.title.endswith(f"DENSITY = {density:.3f}%")
        # every example shown is a PolySAE latent value (rounded to 4 decimals)
        shown = torch.tensor([v for seq in top_group.seq_data for v in seq.feat_acts])
        assert (shown > 0).any()
        assert ((shown[:, None] - acts_N[None, :]).abs().min(dim=1).values < 1e-4).all()
        # the logit table is the first-order decoder's direct effect
        top = feature_data.logits_table_data
        expected = logits_FV[i].topk(len(top.top_logits))
        assert top.top_token_ids == expected.indices.tolist()
        assert top.top_logits == pytest.approx(expected.values.tolist(), rel=1e-5, abs=1e-6)
    after = state_copy(sae)
    assert all(torch.equal(before[k], after[k]) for k in before)

    path = write_feature_dashboard(
        sae, model, tokens, features, tmp_path / f"{arch}.html", minibatch_size_tokens=8
    )
    html = path.read_text()
    assert "dropdown-container" in html and "DASHBOARD_DATA" in html
    for feature in features:
        assert f'"{feature}": {{"featureTablesData"' in html


def test_training_matryoshka_sae_dashboard(
    lm: tuple[HookedTransformer, torch.Tensor], tmp_path: Path
) -> None:
    """A Matryoshka training SAE goes straight in: it is converted to inference first."""
    model, tokens = lm
    sae = make_training_sae("poly_matryoshka")
    sae.cfg.metadata.hook_name = HOOK
    reference = inference_form(sae)
    acts_BSF = reference_acts(reference, model, tokens)
    features = active_features(acts_BSF, 2)
    path = write_feature_dashboard(
        sae, model, tokens, features, tmp_path / "m.html", minibatch_size_tokens=8
    )
    assert "DASHBOARD_DATA" in path.read_text()


def test_neuronpedia_json_is_valid(
    lm: tuple[HookedTransformer, torch.Tensor], tmp_path: Path
) -> None:
    model, tokens = lm
    sae = inference_sae("poly_gated", tmp_path)
    acts_BSF = reference_acts(sae, model, tokens)
    features = active_features(acts_BSF, 2)

    path = write_neuronpedia_json(
        sae,
        model,
        tokens,
        features,
        tmp_path / "batch-0.json",
        sae_set="polysae-test",
        dataset="offline-texts",
        minibatch_size_tokens=8,
    )
    batch = json.loads(path.read_text())
    assert batch["model_id"] == "tiny-offline"
    assert batch["layer"] == 0
    assert batch["sae_set"] == "polysae-test"
    assert [f["feature_index"] for f in batch["features"]] == features
    for record in batch["features"]:
        feature = record["feature_index"]
        assert record["dataset"] == "offline-texts"
        assert record["activations"], "every active feature has example activations"
        top = max(max(a["values"]) for a in record["activations"])
        assert top == pytest.approx(acts_BSF[..., feature].max().item(), abs=1e-3)
        assert len(record["pos_str"]) == len(record["pos_values"]) > 0
    # the text function returns the same JSON
    again = neuronpedia_json(
        sae,
        model,
        tokens,
        features,
        sae_set="polysae-test",
        dataset="offline-texts",
        minibatch_size_tokens=8,
    )
    assert json.loads(again) == batch


def test_dashboard_rejects_bad_features(
    lm: tuple[HookedTransformer, torch.Tensor], tmp_path: Path
) -> None:
    from polysae_lens.dashboard import dashboard_data

    model, tokens = lm
    sae = inference_sae("poly", tmp_path)
    with pytest.raises(ValueError, match=r"\[48\] are out of range: allowed 0 <= index < 48"):
        dashboard_data(sae, model, tokens, [0, D_SAE])
    with pytest.raises(ValueError, match="features is empty"):
        dashboard_data(sae, model, tokens, [])
    sae.cfg.metadata.hook_name = None  # type: ignore[assignment]
    with pytest.raises(ValueError, match="pass hook_name"):
        dashboard_data(sae, model, tokens, [0])
