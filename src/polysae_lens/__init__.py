"""polysae-lens: PolySAE (arXiv 2602.01322) as a SAELens plugin.

Importing this package registers the PolySAE architectures ``"poly"`` (TopK),
``"poly_batchtopk"``, ``"poly_matryoshka"``, ``"poly_jumprelu"`` and
``"poly_gated"`` with SAELens's registries; that registration is its only
import-time side effect.
"""

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
    "DecoderTerms",
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
    "decoder_terms",
    "fork_disk_loader",
    "fork_huggingface_loader",
    "is_poly_sae",
    "orthogonality_error",
    "poly_decode",
    "poly_decode_reference",
    "qr_retract",
    "register_architectures",
]
