"""polysae-lens: PolySAE (arXiv 2602.01322) as a SAELens plugin.

Importing this package registers the PolySAE architectures ``"poly"`` (TopK),
``"poly_batchtopk"``, ``"poly_matryoshka"``, ``"poly_jumprelu"`` and
``"poly_gated"`` with SAELens's registries; that registration is its only
import-time side effect.
"""

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
