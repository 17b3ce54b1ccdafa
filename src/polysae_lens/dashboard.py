"""Feature dashboards for PolySAEs with sae-dashboard (the ``dashboard`` extra).

sae-dashboard (PyPI ``sae-dashboard``) builds feature-centric HTML dashboards
and Neuronpedia JSON for SAELens SAEs, assuming a linear decoder: it calls
``fold_W_dec_norm()`` on the SAE, reads ``W_dec`` for the logit tables and, for
encoders other than TopK, temporarily replaces ``W_enc``, ``W_dec`` and the
sparsifier's parameters by slices of themselves, choosing which by the
architecture name from a fixed list. A PolySAE's ``W_dec`` is a read-only
property and its architecture names are not on that list, so a JumpReLU or
gated PolySAE fails inside sae-dashboard (a TopK one happens to work).

:func:`to_dashboard_sae` therefore exports a PolySAE to a SAELens SAE of the
stock class of its sparsifier (:class:`DashboardTopKSAE`,
:class:`DashboardJumpReLUSAE`, :class:`DashboardGatedSAE`, subclasses of
``TopKSAE``, ``JumpReLUSAE`` and ``GatedSAE`` with the stock configs and
architecture names) that holds the PolySAE's encoder parameters unchanged, so
its ``encode`` is bit-identical to the PolySAE's, and the first-order decoder
``U @ C1`` as a real ``W_dec`` parameter. Its ``fold_W_dec_norm`` is a no-op,
as the PolySAE's is, so the dashboard shows the PolySAE's own latent values.

What the dashboard shows, per feature: activations, top examples and the
activation histogram are exact. The logit tables and logit histogram use
``W_dec``, i.e. only the decoder's linear (first-order) part: the pairwise and
triple terms, which depend on which other latents are active, are not in them.

:func:`to_dashboard_sae` needs only SAELens. :func:`dashboard_data`,
:func:`write_feature_dashboard`, :func:`neuronpedia_json` and
:func:`write_neuronpedia_json` need sae-dashboard (``pip install
"polysae-lens[dashboard]"``; see the README for a CPU-only machine).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from sae_lens import SAE, TrainingSAE
from sae_lens.saes.gated_sae import GatedSAE, GatedSAEConfig
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.saes.sae import SAEConfig
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
from torch import Tensor
from transformer_lens import HookedTransformer

from polysae_lens.sae import (
    ARCHITECTURES,
    PolyGatedSAE,
    PolyJumpReLUSAE,
    PolyTopKSAE,
    is_poly_sae,
)

if TYPE_CHECKING:
    from sae_dashboard.sae_vis_data import SaeVisData
    from sae_lens.saes.sae import SAE as _Base
else:
    _Base = object

logger = logging.getLogger(__name__)

POLY_ONLY_PARAMS = ("U", "C1", "C2", "C3", "lambda2", "lambda3")
"""PolySAE state-dict entries that have no counterpart in a stock SAELens SAE."""

INSTALL_HINT = (
    'pip install "polysae-lens[dashboard]" (on a CPU-only machine see the README, '
    'section "Feature dashboards")'
)


class DashboardExport(_Base):
    """Behaviour shared by the dashboard exports of PolySAEs.

    ``source_architecture`` records the PolySAE architecture the export was made from.
    """

    source_architecture: str = ""

    def fold_W_dec_norm(self) -> None:
        """A no-op, as for the PolySAE the export was made from.

        sae-dashboard calls this unconditionally. Folding would rescale each
        latent by the norm of its first-order decoder row, so the dashboard
        would no longer show the PolySAE's latent values (and SAELens's TopK
        SAE raises here); leaving the weights alone keeps them exact.
        """
        logger.info(
            "fold_W_dec_norm is a no-op for a dashboard export of %s: latents are unchanged.",
            self.source_architecture,
        )


class DashboardTopKSAE(DashboardExport, TopKSAE):
    """Dashboard export of a TopK PolySAE (``"poly"``); architecture ``"topk"``."""


class DashboardJumpReLUSAE(DashboardExport, JumpReLUSAE):
    """Dashboard export of a JumpReLU PolySAE (``"poly_jumprelu"``, and BatchTopK or
    Matryoshka PolySAEs in their inference form); architecture ``"jumprelu"``."""


class DashboardGatedSAE(DashboardExport, GatedSAE):
    """Dashboard export of a gated PolySAE (``"poly_gated"``); architecture ``"gated"``."""


_EXPORTS: tuple[tuple[type[SAE[Any]], type[DashboardExport], type[SAEConfig]], ...] = (
    (PolyTopKSAE, DashboardTopKSAE, TopKSAEConfig),
    (PolyJumpReLUSAE, DashboardJumpReLUSAE, JumpReLUSAEConfig),
    (PolyGatedSAE, DashboardGatedSAE, GatedSAEConfig),
)
"""Inference PolySAE class -> (export class, stock SAELens config class)."""


# ---- export -----------------------------------------------------------------


def inference_form(sae: SAE[Any]) -> SAE[Any]:
    """``sae`` as the inference PolySAE it is saved as (itself if it already is one).

    A training PolySAE goes through ``save_inference_model`` and
    ``SAE.load_from_disk``, the path SAELens users take: BatchTopK and Matryoshka
    PolySAEs become ``poly_jumprelu`` SAEs that apply their learned threshold.
    """
    if not isinstance(sae, TrainingSAE):
        return sae
    with tempfile.TemporaryDirectory(prefix="polysae-dashboard-") as tmp:
        sae.save_inference_model(tmp)
        return SAE.load_from_disk(tmp, device=str(sae.device))


def _export_classes(inference: SAE[Any]) -> tuple[type[DashboardExport], type[SAEConfig]]:
    """The export class and stock config class for an inference PolySAE."""
    for poly_cls, export_cls, cfg_cls in _EXPORTS:
        if isinstance(inference, poly_cls):
            return export_cls, cfg_cls
    raise TypeError(  # pragma: no cover - every inference PolySAE class is in _EXPORTS
        f"No dashboard export for {type(inference).__qualname__}; expected one of "
        f"{', '.join(cls.__qualname__ for cls, _, _ in _EXPORTS)}."
    )


@torch.no_grad()
def to_dashboard_sae(sae: SAE[Any]) -> DashboardExport:
    """Export a PolySAE to a stock-architecture SAELens SAE for sae-dashboard.

    The export's encoder parameters (``W_enc``, ``b_dec`` and the sparsifier's:
    ``b_enc``, ``threshold``, or ``b_gate``/``r_mag``/``b_mag``) are copies of
    the PolySAE's and its config keeps every encoder setting, so
    ``export.encode(x)`` equals ``sae.encode(x)`` bit for bit (for a training
    PolySAE: its inference form's, see :func:`inference_form`). Its ``W_dec``
    is the first-order decoder ``U @ C1`` [d_sae, d_in]; its ``decode`` is
    therefore only the linear part of the PolySAE's decoder.

    Args:
        sae: any PolySAE, inference or training, of any architecture in
            :data:`polysae_lens.ARCHITECTURES`. It is not modified.

    Returns:
        A :class:`DashboardTopKSAE`, :class:`DashboardJumpReLUSAE` or
        :class:`DashboardGatedSAE` on the PolySAE's device, with its dtype.

    Raises:
        TypeError: if ``sae`` is not a PolySAE.
    """
    if not is_poly_sae(sae):
        raise TypeError(
            f"to_dashboard_sae expects a PolySAE (architectures {', '.join(ARCHITECTURES)}); "
            f"got {type(sae).__module__}.{type(sae).__qualname__}. A stock SAELens SAE "
            "needs no export: pass it to sae-dashboard as it is."
        )
    source_architecture = sae.cfg.architecture()
    inference = inference_form(sae)
    export_cls, cfg_cls = _export_classes(inference)
    cfg_dict = inference.cfg.to_dict()
    cfg_dict["architecture"] = cfg_cls.architecture()
    cfg = cfg_cls.from_dict(cfg_dict)  # drops the poly_* fields
    export = export_cls(cfg)  # type: ignore[call-arg]
    state = {
        name: value.detach().clone()
        for name, value in inference.state_dict().items()
        if name not in POLY_ONLY_PARAMS
    }
    state["W_dec"] = inference.W_dec.detach().clone()
    export.load_state_dict(state, strict=True)
    export.to(inference.device)
    export.source_architecture = source_architecture
    export.train(False)
    return export


# ---- sae-dashboard ------------------------------------------------------------


def _require_sae_dashboard() -> None:
    try:
        import sae_dashboard  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"Feature dashboards need sae-dashboard, which is not installed: {INSTALL_HINT}."
        ) from err


def _as_export(sae: SAE[Any]) -> DashboardExport:
    if isinstance(sae, DashboardExport):
        return sae
    return to_dashboard_sae(sae)


def _feature_list(features: Iterable[int], d_sae: int) -> list[int]:
    feature_list = [int(f) for f in features]
    if not feature_list:
        raise ValueError("features is empty: pass at least one latent index.")
    bad = [f for f in feature_list if not 0 <= f < d_sae]
    if bad:
        raise ValueError(f"Feature indices {bad} are out of range: allowed 0 <= index < {d_sae}.")
    return feature_list


def _hook_name(export: DashboardExport, hook_name: str | None) -> str:
    name = hook_name if hook_name is not None else export.cfg.metadata.hook_name
    if not name:
        raise ValueError(
            "The SAE's cfg.metadata.hook_name is not set: pass hook_name, the "
            "TransformerLens hook the SAE reads (e.g. 'blocks.0.hook_resid_post')."
        )
    return str(name)


def dashboard_data(
    sae: SAE[Any],
    model: HookedTransformer,
    tokens_BS: Tensor,
    features: Iterable[int],
    *,
    hook_name: str | None = None,
    minibatch_size_tokens: int = 64,
    minibatch_size_features: int = 256,
    seed: int = 0,
    layout: Any = None,
) -> SaeVisData:
    """Compute sae-dashboard's feature data for latents ``features`` of a PolySAE.

    Args:
        sae: a PolySAE (converted with :func:`to_dashboard_sae`, so it is not
            modified) or an export made by it.
        model: the TransformerLens model the SAE reads (a ``HookedTransformer`` or
            ``HookedSAETransformer``).
        tokens_BS: token ids [batch, seq] to collect activations on.
        features: latent indices, each in ``[0, d_sae)``.
        hook_name: the hook the SAE reads; defaults to ``sae.cfg.metadata.hook_name``.
        minibatch_size_tokens: sequences per forward pass.
        minibatch_size_features: features per pass over the tokens.
        seed: sae-dashboard's seed (quantile sampling).
        layout: an ``sae_dashboard.layout.SaeVisLayoutConfig``; None uses
            sae-dashboard's default feature-centric layout.

    Returns:
        sae-dashboard's ``SaeVisData``.
    """
    _require_sae_dashboard()
    from sae_dashboard.sae_vis_data import SaeVisConfig
    from sae_dashboard.sae_vis_runner import SaeVisRunner

    export = _as_export(sae)
    if tokens_BS.ndim != 2:
        raise ValueError(
            f"tokens_BS must be token ids of shape [batch, seq]; got shape {tuple(tokens_BS.shape)}."
        )
    options: dict[str, Any] = {
        "hook_point": _hook_name(export, hook_name),
        "features": _feature_list(features, export.cfg.d_sae),
        "minibatch_size_tokens": minibatch_size_tokens,
        "minibatch_size_features": minibatch_size_features,
        "device": str(export.device),
        "dtype": str(export.dtype).removeprefix("torch."),
        "seed": seed,
        "verbose": False,
    }
    if layout is not None:
        options["feature_centric_layout"] = layout
    logger.info(
        "Computing dashboard data for %d feature(s) of a %s SAE at %s.",
        len(options["features"]),
        export.source_architecture,
        options["hook_point"],
    )
    return SaeVisRunner(SaeVisConfig(**options)).run(
        encoder=export,  # type: ignore[arg-type]
        model=model,  # type: ignore[arg-type]
        tokens=tokens_BS,
    )


def write_feature_dashboard(
    sae: SAE[Any],
    model: HookedTransformer,
    tokens_BS: Tensor,
    features: Iterable[int],
    path: str | Path,
    **options: Any,
) -> Path:
    """Write sae-dashboard's feature-centric HTML dashboard for a PolySAE.

    One HTML file with a feature selector; ``options`` are those of
    :func:`dashboard_data`. The page loads d3 and plotly from their CDNs, as
    every sae-dashboard page does. Returns the path written.
    """
    _require_sae_dashboard()
    from sae_dashboard.data_writing_fns import save_feature_centric_vis

    data = dashboard_data(sae, model, tokens_BS, features, **options)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_feature_centric_vis(sae_vis_data=data, filename=path)
    logger.info("Wrote a feature dashboard to %s.", path)
    return path


def neuronpedia_layout(n_quantiles: int = 5) -> Any:
    """The layout sae-dashboard's Neuronpedia runner uses, for :func:`neuronpedia_json`."""
    _require_sae_dashboard()
    from sae_dashboard.components_config import (
        ActsHistogramConfig,
        Column,
        FeatureTablesConfig,
        LogitsHistogramConfig,
        LogitsTableConfig,
        SequencesConfig,
    )
    from sae_dashboard.layout import SaeVisLayoutConfig

    sequences = SequencesConfig(
        stack_mode="stack-all",
        buffer=None,  # type: ignore[arg-type]
        compute_buffer=True,
        n_quantiles=n_quantiles,
        top_acts_group_size=20,
        quantile_group_size=5,
    )
    return SaeVisLayoutConfig(
        columns=[
            Column(
                sequences,
                ActsHistogramConfig(),
                LogitsHistogramConfig(),
                LogitsTableConfig(),
                FeatureTablesConfig(n_rows=3),
            )
        ]
    )


def neuronpedia_vocab(model: HookedTransformer) -> dict[int, str]:
    """Token id -> token string as Neuronpedia's JSON expects it.

    The tokenizer's own token strings, with the characters sae-dashboard
    escapes for HTML replaced as it does; ids past the tokenizer's vocabulary,
    up to ``model.cfg.d_vocab``, map to sae-dashboard's out-of-range token.
    """
    _require_sae_dashboard()
    from sae_dashboard.sae_vis_data import OUT_OF_RANGE_TOKEN
    from sae_dashboard.utils_fns import HTML_ANOMALIES

    if model.tokenizer is None:
        raise ValueError("The model has no tokenizer: Neuronpedia JSON needs token strings.")
    vocab: dict[int, str] = {}
    for token, token_id in model.tokenizer.get_vocab().items():
        for raw, escaped in HTML_ANOMALIES.items():
            token = token.replace(raw, escaped)
        vocab[int(token_id)] = token
    for token_id in range(model.cfg.d_vocab):
        vocab.setdefault(token_id, OUT_OF_RANGE_TOKEN)
    return vocab


def neuronpedia_json(
    sae: SAE[Any],
    model: HookedTransformer,
    tokens_BS: Tensor,
    features: Iterable[int],
    *,
    sae_set: str,
    model_id: str | None = None,
    layer: int | None = None,
    dataset: str = "",
    sae_id_suffix: str | None = None,
    n_quantiles: int = 5,
    **options: Any,
) -> str:
    """One Neuronpedia batch (JSON text) for latents ``features`` of a PolySAE.

    The same JSON sae-dashboard's ``NeuronpediaRunner`` writes per batch, made
    from :func:`dashboard_data` with :func:`neuronpedia_layout` and
    sae-dashboard's ``NeuronpediaConverter``, for a model and tokens you supply
    (the runner itself downloads both).

    Args:
        sae, model, tokens_BS, features: as for :func:`dashboard_data`.
        sae_set: the Neuronpedia SAE set name.
        model_id: the model's Neuronpedia id; defaults to ``sae.cfg.metadata.model_name``.
        layer: the layer; defaults to the number in the SAE's hook name.
        dataset: the dataset the tokens come from (recorded per feature).
        sae_id_suffix: Neuronpedia's optional SAE id suffix.
        n_quantiles: activation quantile groups per feature.
        options: further :func:`dashboard_data` options.
    """
    _require_sae_dashboard()
    from sae_dashboard.neuronpedia.neuronpedia_converter import NeuronpediaConverter
    from sae_dashboard.neuronpedia.neuronpedia_runner_config import NeuronpediaRunnerConfig

    if "layout" in options:
        raise ValueError("neuronpedia_json uses neuronpedia_layout(); do not pass layout.")
    export = _as_export(sae)
    hook = _hook_name(export, options.pop("hook_name", None))
    data = dashboard_data(
        export,
        model,
        tokens_BS,
        features,
        hook_name=hook,
        layout=neuronpedia_layout(n_quantiles),
        **options,
    )
    if model_id is None:
        model_id = export.cfg.metadata.model_name
    if layer is None:
        layer = _layer_of(hook)
    np_cfg = NeuronpediaRunnerConfig(
        sae_set=sae_set,
        sae_path="",
        outputs_dir="",
        np_sae_id_suffix=sae_id_suffix,
        huggingface_dataset_path=dataset,
        n_prompts_total=int(tokens_BS.shape[0]),
        n_tokens_in_prompt=int(tokens_BS.shape[1]),
        n_quantiles=n_quantiles,
        model_id=model_id,
        layer=layer,
    )
    return NeuronpediaConverter.convert_to_np_json(model, data, np_cfg, neuronpedia_vocab(model))


def write_neuronpedia_json(
    sae: SAE[Any],
    model: HookedTransformer,
    tokens_BS: Tensor,
    features: Iterable[int],
    path: str | Path,
    **options: Any,
) -> Path:
    """Write :func:`neuronpedia_json` to ``path`` (``options`` as for it); returns the path."""
    text = neuronpedia_json(sae, model, tokens_BS, features, **options)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    logger.info("Wrote Neuronpedia JSON to %s.", path)
    return path


def _layer_of(hook_name: str) -> int | None:
    """The block number in a TransformerLens hook name (``blocks.8.hook_...`` -> 8)."""
    parts = hook_name.split(".")
    if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit():
        return int(parts[1])
    return None


__all__ = [
    "DashboardExport",
    "DashboardGatedSAE",
    "DashboardJumpReLUSAE",
    "DashboardTopKSAE",
    "dashboard_data",
    "inference_form",
    "neuronpedia_json",
    "neuronpedia_layout",
    "neuronpedia_vocab",
    "to_dashboard_sae",
    "write_feature_dashboard",
    "write_neuronpedia_json",
]
