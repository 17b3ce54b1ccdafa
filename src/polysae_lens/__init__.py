"""polysae-lens: PolySAE (arXiv 2602.01322) as a SAELens plugin.

Importing this package registers the PolySAE architectures ``"poly"`` (TopK),
``"poly_batchtopk"``, ``"poly_matryoshka"``, ``"poly_jumprelu"`` and
``"poly_gated"`` with SAELens's registries; that registration is its only
import-time side effect. It happens as soon as SAELens is imported: at once if
it already is, else right after whatever imports it next (a post-import hook),
so ``import polysae_lens`` itself stays cheap (``polysae-lens --help`` does not
load SAELens, TransformerLens or torch). The names below load their modules on
first use.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from polysae_lens.analysis import (
        CooccurrenceStats,
        Correlation,
        InteractingPairs,
        cooccurrence_stats,
        covariance_vs_cooccurrence,
        generate_steered,
        interaction_direction,
        interaction_strength,
        interaction_vs_cooccurrence,
        steering_vector,
        top_interacting_pairs,
        top_partners,
        triple_direction,
    )
    from polysae_lens.config import (
        PolyBatchTopKTrainingSAEConfig,
        PolyDecoderFields,
        PolyGatedSAEConfig,
        PolyGatedTrainingSAEConfig,
        PolyJumpReLUSAEConfig,
        PolyJumpReLUTrainingSAEConfig,
        PolyMatryoshkaTrainingSAEConfig,
        PolyTopKSAEConfig,
        PolyTopKTrainingSAEConfig,
    )
    from polysae_lens.convert import (
        convert_fork_checkpoint,
        fork_disk_loader,
        fork_huggingface_loader,
    )
    from polysae_lens.dashboard import (
        to_dashboard_sae,
        write_feature_dashboard,
        write_neuronpedia_json,
    )
    from polysae_lens.interaction_view import (
        InteractionView,
        interaction_view_data,
        render_interaction_view,
        write_interaction_view,
    )
    from polysae_lens.polynomial import (
        DecoderTerms,
        PolyDecoderWeights,
        decoder_terms,
        poly_decode,
        poly_decode_reference,
    )
    from polysae_lens.sae import (
        ARCHITECTURES,
        PolyBatchTopKTrainingSAE,
        PolyDecoderMixin,
        PolyGatedSAE,
        PolyGatedTrainingSAE,
        PolyJumpReLUSAE,
        PolyJumpReLUTrainingSAE,
        PolyMatryoshkaTrainingSAE,
        PolyTopKSAE,
        PolyTopKTrainingSAE,
        is_poly_sae,
        register_architectures,
    )
    from polysae_lens.stiefel import attach_stiefel_retraction, orthogonality_error, qr_retract

_EXPORTS: dict[str, str] = {
    "CooccurrenceStats": "polysae_lens.analysis",
    "Correlation": "polysae_lens.analysis",
    "InteractingPairs": "polysae_lens.analysis",
    "cooccurrence_stats": "polysae_lens.analysis",
    "covariance_vs_cooccurrence": "polysae_lens.analysis",
    "generate_steered": "polysae_lens.analysis",
    "interaction_direction": "polysae_lens.analysis",
    "interaction_strength": "polysae_lens.analysis",
    "interaction_vs_cooccurrence": "polysae_lens.analysis",
    "steering_vector": "polysae_lens.analysis",
    "top_interacting_pairs": "polysae_lens.analysis",
    "top_partners": "polysae_lens.analysis",
    "triple_direction": "polysae_lens.analysis",
    "PolyBatchTopKTrainingSAEConfig": "polysae_lens.config",
    "PolyDecoderFields": "polysae_lens.config",
    "PolyGatedSAEConfig": "polysae_lens.config",
    "PolyGatedTrainingSAEConfig": "polysae_lens.config",
    "PolyJumpReLUSAEConfig": "polysae_lens.config",
    "PolyJumpReLUTrainingSAEConfig": "polysae_lens.config",
    "PolyMatryoshkaTrainingSAEConfig": "polysae_lens.config",
    "PolyTopKSAEConfig": "polysae_lens.config",
    "PolyTopKTrainingSAEConfig": "polysae_lens.config",
    "convert_fork_checkpoint": "polysae_lens.convert",
    "fork_disk_loader": "polysae_lens.convert",
    "fork_huggingface_loader": "polysae_lens.convert",
    "to_dashboard_sae": "polysae_lens.dashboard",
    "write_feature_dashboard": "polysae_lens.dashboard",
    "write_neuronpedia_json": "polysae_lens.dashboard",
    "InteractionView": "polysae_lens.interaction_view",
    "interaction_view_data": "polysae_lens.interaction_view",
    "render_interaction_view": "polysae_lens.interaction_view",
    "write_interaction_view": "polysae_lens.interaction_view",
    "DecoderTerms": "polysae_lens.polynomial",
    "PolyDecoderWeights": "polysae_lens.polynomial",
    "decoder_terms": "polysae_lens.polynomial",
    "poly_decode": "polysae_lens.polynomial",
    "poly_decode_reference": "polysae_lens.polynomial",
    "ARCHITECTURES": "polysae_lens.sae",
    "PolyBatchTopKTrainingSAE": "polysae_lens.sae",
    "PolyDecoderMixin": "polysae_lens.sae",
    "PolyGatedSAE": "polysae_lens.sae",
    "PolyGatedTrainingSAE": "polysae_lens.sae",
    "PolyJumpReLUSAE": "polysae_lens.sae",
    "PolyJumpReLUTrainingSAE": "polysae_lens.sae",
    "PolyMatryoshkaTrainingSAE": "polysae_lens.sae",
    "PolyTopKSAE": "polysae_lens.sae",
    "PolyTopKTrainingSAE": "polysae_lens.sae",
    "is_poly_sae": "polysae_lens.sae",
    "register_architectures": "polysae_lens.sae",
    "attach_stiefel_retraction": "polysae_lens.stiefel",
    "orthogonality_error": "polysae_lens.stiefel",
    "qr_retract": "polysae_lens.stiefel",
}
"""Public name -> the module that defines it (imported on first access)."""

# A reload re-runs this file: drop the names cached from the previous run.
for _name in _EXPORTS:
    globals().pop(_name, None)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        if name.startswith("_") or importlib.util.find_spec(f"{__name__}.{name}") is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        return importlib.import_module(f"{__name__}.{name}")  # a submodule
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


class _RegisterAfterSAELens(importlib.abc.MetaPathFinder):
    """Imports :mod:`polysae_lens.sae` (which registers the architectures) once
    ``sae_lens`` has finished importing and no module of this package is part-way
    through its own import; removes itself then.

    The second condition matters when a submodule that ``sae.py`` imports is what
    loads SAELens (``import polysae_lens.config`` in a fresh interpreter):
    importing ``sae.py`` from inside it would find it half-initialised. So until
    the registration, this also wraps the loaders of the package's submodules,
    counting those whose code is running, and registers when the count is 0.
    """

    def __init__(self) -> None:
        self._finding = False
        self._running = 0  # package submodules whose code is running
        self._sae_lens_loaded = False

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        own = fullname.startswith(f"{__name__}.")
        if self._finding or not (own or fullname == "sae_lens"):
            return None
        self._finding = True  # the real spec, from the finders after this one
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._finding = False
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: ModuleType) -> None:
            self._running += own
            try:
                exec_module(module)
            finally:
                self._running -= own
            self._sae_lens_loaded |= not own
            if self._sae_lens_loaded and not self._running:
                if self in sys.meta_path:
                    sys.meta_path.remove(self)
                importlib.import_module("polysae_lens.sae")

        spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


def _register_with_sae_lens() -> None:
    if "sae_lens" in sys.modules:
        importlib.import_module("polysae_lens.sae")
    # One hook, even across reloads of this module (each reload makes a new class).
    elif not any(type(f).__name__ == _RegisterAfterSAELens.__name__ for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterSAELens())


_register_with_sae_lens()

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES",
    "CooccurrenceStats",
    "Correlation",
    "DecoderTerms",
    "InteractingPairs",
    "InteractionView",
    "PolyBatchTopKTrainingSAE",
    "PolyBatchTopKTrainingSAEConfig",
    "PolyDecoderFields",
    "PolyDecoderMixin",
    "PolyDecoderWeights",
    "PolyGatedSAE",
    "PolyGatedSAEConfig",
    "PolyGatedTrainingSAE",
    "PolyGatedTrainingSAEConfig",
    "PolyJumpReLUSAE",
    "PolyJumpReLUSAEConfig",
    "PolyJumpReLUTrainingSAE",
    "PolyJumpReLUTrainingSAEConfig",
    "PolyMatryoshkaTrainingSAE",
    "PolyMatryoshkaTrainingSAEConfig",
    "PolyTopKSAE",
    "PolyTopKSAEConfig",
    "PolyTopKTrainingSAE",
    "PolyTopKTrainingSAEConfig",
    "attach_stiefel_retraction",
    "convert_fork_checkpoint",
    "cooccurrence_stats",
    "covariance_vs_cooccurrence",
    "decoder_terms",
    "fork_disk_loader",
    "fork_huggingface_loader",
    "generate_steered",
    "interaction_direction",
    "interaction_strength",
    "interaction_view_data",
    "interaction_vs_cooccurrence",
    "is_poly_sae",
    "orthogonality_error",
    "poly_decode",
    "poly_decode_reference",
    "qr_retract",
    "register_architectures",
    "render_interaction_view",
    "steering_vector",
    "to_dashboard_sae",
    "top_interacting_pairs",
    "top_partners",
    "triple_direction",
    "write_feature_dashboard",
    "write_interaction_view",
    "write_neuronpedia_json",
]
