"""PolySAE classes for SAELens, one per sparsifier, and their registration.

Every class is the SAELens class of its sparsifier with the linear decoder
swapped for the polynomial decoder of :mod:`polysae_lens.polynomial`. The
shared behaviour lives in two mixins that override only SAELens's seams
(``initialize_weights``, ``decode``, the folds, ``process_state_dict_for_*``
and the auxiliary losses); the encoders, activation functions and training
loops are SAELens's own.

There is no dense decoder parameter: ``W_dec`` is a read-only property equal to
the first-order decoder ``U @ C1`` [d_sae, d_in], so tools that read ``W_dec``
see the real linear part of the decoder.

Shape suffixes follow :mod:`polysae_lens.polynomial` (B batch, F d_sae, D d_in,
R rank).
"""

from __future__ import annotations

import logging
from collections.abc import Generator
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE
from sae_lens.saes.gated_sae import GatedSAE, GatedTrainingSAE
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUTrainingSAE
from sae_lens.saes.matryoshka_batchtopk_sae import MatryoshkaBatchTopKTrainingSAE
from sae_lens.saes.sae import SAE, TrainingSAE, TrainStepInput, TrainStepOutput
from sae_lens.saes.topk_sae import (
    TopK,
    TopKSAE,
    TopKTrainingSAE,
)
from torch import Tensor, nn
from typing_extensions import override

from polysae_lens.auxk import aux_settings, auxk_loss, decode_top_dead_dense
from polysae_lens.config import (
    PolyBatchTopKTrainingSAEConfig,
    PolyConfig,
    PolyGatedSAEConfig,
    PolyGatedTrainingSAEConfig,
    PolyJumpReLUSAEConfig,
    PolyJumpReLUTrainingSAEConfig,
    PolyMatryoshkaTrainingSAEConfig,
    PolyTopKSAEConfig,
    PolyTopKTrainingSAEConfig,
)
from polysae_lens.dead_latents import BUFFER as FIRE_COUNTER
from polysae_lens.dead_latents import count_step_, register_counter, with_dead_mask
from polysae_lens.init import initial_weights
from polysae_lens.polynomial import (
    PolyDecoderWeights,
    decoder_terms,
    first_order_decoder,
    poly_decode,
    project,
    terms_from_projection,
)
from polysae_lens.preflight import check_finite_input
from polysae_lens.sparse import (
    SparseCode,
    code_from_positions,
    code_from_rows,
    code_if_sparse,
    gather_preacts,
    needs_exact_autograd,
    project_sparse,
    select_batch_topk,
    select_topk,
    topk_activation,
)
from polysae_lens.stiefel import orthogonality_error, track_for_retraction
from polysae_lens.subspace_fit import collect_fit_rows

logger = logging.getLogger(__name__)

SPARSE_DENSITY = 0.125
"""Codes with at most this fraction of nonzeros are decoded with the sparse kernels."""


class _Selection(NamedTuple):
    """The code :meth:`PolyTopKSAE.encode` made inside :meth:`forward`, and each
    row's selected latents (ascending), for the decode that follows it."""

    acts_BF: Tensor
    cols_BK: Tensor


class EncoderInput(NamedTuple):
    """The encoder's input in the sparse step: ``sae_in`` and, when it is a
    constant minus ``b_dec``, that shift (``sae_in`` is then detached)."""

    sae_in_BD: Tensor
    shift_D: Tensor | None


if TYPE_CHECKING:
    from sae_lens.saes.sae import SAE as _Base
else:
    _Base = object


class PolyDecoderMixin(_Base):
    """The polynomial decoder, shared by every PolySAE class (inference and training).

    Parameters (a public contract): ``W_enc`` [d_in, d_sae], ``b_dec`` [d_in],
    ``U`` [d_sae, R1], ``C1`` [R1, d_in], ``C2`` [R2, d_in] (order >= 2),
    ``C3`` [R3, d_in] (order 3), 0-dim ``lambda2`` (order >= 2) and ``lambda3``
    (order 3), plus the sparsifier's own (``b_enc``, ``threshold``, ...).

    Being built registers the module for the automatic Stiefel retraction
    (:mod:`polysae_lens.stiefel`): any optimizer that updates its U, such as
    SAETrainer's Adam, retracts U after each of its steps.
    """

    cfg: PolyConfig  # type: ignore[assignment]
    U: nn.Parameter
    C1: nn.Parameter

    sparsifier_params: ClassVar[tuple[str, ...]] = ("b_enc",)
    """Zero-initialised [d_sae] parameters the sparsifier needs besides W_enc."""

    sparse_kernels: bool = True
    """Use the sparse-aware kernels of :mod:`polysae_lens.sparse` where they apply.
    Exact (the tests compare both paths); set to False on an instance to force
    the dense path, e.g. to compare speed."""

    # ---- weights ---------------------------------------------------------

    @override
    def initialize_weights(self) -> None:
        cfg = self.cfg
        factory: dict[str, Any] = {"dtype": self.dtype, "device": self.device}
        # The weights of cfg.init_preset (polysae_lens.init); inference configs
        # have no init fields and take the package's (the weights get loaded).
        weights = initial_weights(
            cfg.d_in,
            cfg.d_sae,
            cfg.ranks,
            cfg.poly_order,
            init_preset=getattr(cfg, "init_preset", "package"),
            c1_init=getattr(cfg, "c1_init", "orthogonal"),
            decoder_init_norm=getattr(cfg, "decoder_init_norm", None),
            dtype=self.dtype,
            device=self.device,
        )
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, **factory))
        self.U = nn.Parameter(weights.U_FR)
        self.C1 = nn.Parameter(weights.C1_RD)
        if weights.C2_SD is not None:
            self.C2 = nn.Parameter(weights.C2_SD)
            self.lambda2 = nn.Parameter(torch.tensor(float(cfg.lambda2_init), **factory))
        if weights.C3_TD is not None:
            self.C3 = nn.Parameter(weights.C3_TD)
            self.lambda3 = nn.Parameter(torch.tensor(float(cfg.lambda3_init), **factory))
        self.W_enc = nn.Parameter(weights.W_enc_DF)
        for name in self.sparsifier_params:
            setattr(self, name, nn.Parameter(torch.zeros(cfg.d_sae, **factory)))
        track_for_retraction(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # copy.deepcopy and unpickling rebuild the module without __init__, so
        # the copy registers itself here; otherwise training it would silently
        # never retract its U
        super().__setstate__(state)
        track_for_retraction(self)

    @property
    def decoder_weights(self) -> PolyDecoderWeights:
        """The decoder parameters, as the pure functions of ``polynomial`` take them."""
        order = self.cfg.poly_order
        return PolyDecoderWeights(
            U_FR=self.U,
            C1_RD=self.C1,
            C2_SD=self.C2 if order >= 2 else None,
            C3_TD=self.C3 if order >= 3 else None,
            lambda2=self.lambda2 if order >= 2 else None,
            lambda3=self.lambda3 if order >= 3 else None,
        )

    @property  # type: ignore[override]
    def W_dec(self) -> Tensor:
        """The first-order decoder ``U @ C1`` [d_sae, d_in] (read-only, differentiable)."""
        return first_order_decoder(self.decoder_weights)

    # ---- forward ---------------------------------------------------------

    @override
    def process_sae_in(self, sae_in: Tensor) -> Tensor:
        width = sae_in.shape[-1]
        if self.hook_z_reshaping_mode and sae_in.ndim >= 2:
            width = sae_in.shape[-2] * sae_in.shape[-1]
        if width != self.cfg.d_in:
            raise ValueError(
                f"Input has last dimension {width} but this SAE has d_in="
                f"{self.cfg.d_in}: pass activations of shape [..., {self.cfg.d_in}]."
            )
        return super().process_sae_in(sae_in)

    @override
    def decode(self, feature_acts: Tensor) -> Tensor:
        sae_out = self._decode_without_bias(feature_acts) + self.b_dec
        sae_out = self.hook_sae_recons(sae_out)
        sae_out = self.run_time_activation_norm_fn_out(sae_out)
        return self.reshape_fn_out(sae_out, self.d_head)

    def _decode_without_bias(self, feature_acts: Tensor) -> Tensor:
        if feature_acts.shape[-1] != self.cfg.d_sae:
            raise ValueError(
                f"Latents have last dimension {feature_acts.shape[-1]} but this SAE "
                f"has d_sae={self.cfg.d_sae}."
            )
        return terms_from_projection(self._project(feature_acts), self.decoder_weights).total()

    def _project(self, feature_acts: Tensor) -> Tensor:
        """``z @ U``, from the active rows of U when the code is sparse enough.

        The sparse kernels differentiate only through the code's nonzeros, so a
        code that needs gradients (or runs under a ``torch.func`` transform or
        forward-mode AD) takes the dense product, whose autograd is exactly the
        formula's at every entry, zeros included.
        """
        selection, self._forward_selection = self._forward_selection, None
        if not self.sparse_kernels or feature_acts.is_sparse or needs_exact_autograd(feature_acts):
            return project(feature_acts, self.U)
        if selection is not None and selection.acts_BF is feature_acts:
            z_2d = feature_acts.reshape(-1, feature_acts.shape[-1])
            selected = code_from_rows(
                selection.cols_BK, z_2d.gather(1, selection.cols_BK), z_2d.shape[-1]
            )
            return project_sparse(selected._replace(batch_shape=feature_acts.shape[:-1]), self.U)
        if _may_be_sparse(feature_acts):
            code = code_if_sparse(feature_acts, max_density=SPARSE_DENSITY)
            if code is not None:
                return project_sparse(code, self.U)
        return project(feature_acts, self.U)

    _forward_selection: _Selection | None = None
    _in_forward: bool = False

    @override
    def forward(self, x: Tensor) -> Tensor:
        """SAELens's forward. Inside it (only), decoding the code that
        :meth:`encode` just made may reuse the encoder's selection instead of
        searching the code for its nonzeros: SAELens's forward hands encode's
        output straight to decode, and when ``hook_sae_acts_post`` has no hooks
        no code runs in between that could change the code (a write through
        ``.data`` or ``.numpy()`` would be invisible to a version counter)."""
        if self._in_forward:
            return super().forward(x)
        self._in_forward = True
        try:
            return super().forward(x)
        finally:
            self._in_forward = False
            self._forward_selection = None

    def _offer_selection(self, acts_BF: Tensor, cols_BK: Tensor) -> None:
        """Let the decode that follows in :meth:`forward` reuse this selection
        (see there); nothing is kept outside forward or when a hook could edit
        the code. Latents in ascending order, as a search for the nonzeros finds
        them: the decode then sums in the same order, bit for bit."""
        if self._in_forward and not _hooked(self.hook_sae_acts_post):
            self._forward_selection = _Selection(acts_BF, cols_BK.sort(dim=-1).values)

    # ---- folds -----------------------------------------------------------

    @override
    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        # The SAE was trained on x * s: scaling W_enc by s and b_dec by 1/s keeps
        # every pre-activation (so every threshold) unchanged; dividing the C's by
        # s maps the reconstruction back to the unscaled space.
        self.W_enc.mul_(scaling_factor)
        self.b_dec.div_(scaling_factor)
        for C in self._C_params():
            C.div_(scaling_factor)
        self.cfg.normalize_activations = "none"

    @override
    @torch.no_grad()
    def fold_activation_whitening(
        self, mean: Tensor, whitening_matrix: Tensor, unwhitening_matrix: Tensor
    ) -> None:
        """Fold ``z = (x - mean) @ M`` and ``x = z @ M^-1 + mean`` into the weights.

        As in SAELens: W_enc <- M @ W_enc and b_dec <- b_dec @ M^-1 + mean; the
        polynomial decoder is linear in each C, so each C <- C @ M^-1.
        """
        dtype = torch.promote_types(self.W_enc.dtype, whitening_matrix.dtype)
        mean = mean.to(self.W_enc.device, dtype)
        M = whitening_matrix.to(self.W_enc.device, dtype)
        M_inv = unwhitening_matrix.to(self.W_enc.device, dtype)
        self.W_enc.copy_(M @ self.W_enc.to(dtype))
        if not self.cfg.apply_b_dec_to_input:
            self._shift_encoder_biases(mean @ self.W_enc.to(dtype))
        for C in self._C_params():
            C.copy_(C.to(dtype) @ M_inv)
        self.b_dec.copy_(self.b_dec.to(dtype) @ M_inv + mean)
        self.cfg.normalize_activations = "none"

    def _shift_encoder_biases(self, shift_F: Tensor) -> None:
        """Subtract ``mean @ W_enc`` from the encoder biases (whitening fold)."""
        self.b_enc.sub_(shift_F.to(self.b_enc.dtype))

    @override
    def fold_W_dec_norm(self) -> None:
        """A documented no-op for PolySAEs.

        Normalising the rows of ``U @ C1`` would rescale rows of U and break its
        orthonormality, and for TopK it would change which latents are selected.
        Dashboards call this unconditionally, so it must not raise: it leaves every
        weight, and so every output, unchanged.
        """
        logger.info(
            "fold_W_dec_norm is a no-op for PolySAE (%s): outputs are unchanged.",
            self.cfg.architecture(),
        )

    @override
    def fold_and_get_W_dec_norm(self) -> Tensor:
        raise NotImplementedError(
            "PolySAE has no dense W_dec to normalise; fold_W_dec_norm() is a no-op "
            "for PolySAEs and W_dec (= U @ C1) norms are available from get_W_dec_norm()."
        )

    def _C_params(self) -> list[nn.Parameter]:
        weights = self.decoder_weights
        return [C for C in (weights.C1_RD, weights.C2_SD, weights.C3_TD) if C is not None]  # type: ignore[misc]

    # ---- loading ---------------------------------------------------------

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        # torch's load_state_dict too: weights without AuxK's count (gathered
        # sharded checkpoints, inference files) load into a training SAE with
        # every count at 0, and training weights into an inference SAE
        _adapt_fire_counter(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args)  # type: ignore[misc]

    @override
    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        super().process_state_dict_for_loading(state_dict)
        _adapt_fire_counter(self, state_dict)
        _check_state_dict(self, state_dict)


class PolyTrainingMixin(PolyDecoderMixin):
    """Training behaviour shared by every PolySAE training class."""

    keeps_fire_counter: ClassVar[bool] = False
    """Whether the class keeps ``steps_since_fired`` for its AuxK loss
    (:mod:`polysae_lens.dead_latents`): the TopK family."""

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()
        if self.keeps_fire_counter:
            register_counter(self, self.cfg.d_sae, self.device)

    @override
    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        super().process_state_dict_for_saving_inference(state_dict)
        state_dict.pop(FIRE_COUNTER, None)  # training state, as Adam's

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        check_finite_input(step_input.sae_in)
        counter_F = getattr(self, FIRE_COUNTER, None)  # registered when keeps_fire_counter
        if counter_F is not None:
            step_input = with_dead_mask(step_input, counter_F, self.cfg.aux_dead_window)
        if self.sparse_kernels and self._sparse_step_supported() and not _has_hooks(self):
            output = self._sparse_training_forward_pass(step_input)
        else:
            output = super().training_forward_pass(step_input)
        if counter_F is not None:
            count_step_(counter_F, output.feature_acts)
        collect_fit_rows(self, step_input.sae_in, output.feature_acts, step_input.n_training_steps)
        if step_input.is_logging_step:
            output.metrics.update(self.decoder_metrics(output.feature_acts))
        return output

    # ---- the sparse training step (TopK-style sparsifiers) ---------------
    #
    # The same losses as SAELens's dense step, but after the encoder matmul only
    # the selected (row, latent) pairs are touched: the decoder gathers their rows
    # of U and the encoder gradient reaches only their pre-activations.

    def _sparse_step_supported(self) -> bool:
        return False

    def _select_active(self, hidden_pre_BF: Tensor) -> tuple[Tensor, Tensor]:
        """(rows, cols) of the latents the sparsifier keeps, grouped by row."""
        raise NotImplementedError

    def _sparse_training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        encoder_input = self._encoder_input(step_input.sae_in)
        with torch.no_grad():
            hidden_pre_BF = _encoder_preacts(
                encoder_input.sae_in_BD, self.W_enc, self.b_enc, exact=False
            )
        rows_N, cols_N = self._select_active(hidden_pre_BF)
        code = self._active_code(encoder_input, hidden_pre_BF, rows_N, cols_N, relu=True)
        sae_out_BD = self._decode_code(code) + self.b_dec
        sae_out_BD = self.run_time_activation_norm_fn_out(sae_out_BD)
        losses = {"mse_loss": self.mse_loss_fn(sae_out_BD, step_input.sae_in).sum(-1).mean()}
        losses.update(
            self._sparse_extra_losses(step_input, encoder_input, hidden_pre_BF, code, sae_out_BD)
        )
        output = TrainStepOutput(
            sae_in=step_input.sae_in,
            sae_out=sae_out_BD,
            feature_acts=code.to_coo(),
            hidden_pre=hidden_pre_BF,
            loss=torch.stack(list(losses.values())).sum(),
            losses=losses,
        )
        self._after_sparse_step(output, code)
        return output

    def _encoder_input(self, x: Tensor) -> EncoderInput:
        """``process_sae_in(x)``. When that is SAELens's ``x' - b_dec`` of a
        constant input, it is detached and ``b_dec`` returned as the shift, so the
        encoder's backward gives b_dec its gradient from [D, d_sae] work instead
        of a [B, D] input gradient (see :func:`gather_preacts`)."""
        if x.requires_grad or type(self).process_sae_in is not PolyDecoderMixin.process_sae_in:
            return EncoderInput(self.process_sae_in(x), None)
        with torch.no_grad():
            sae_in_BD = self.process_sae_in(x)
        return EncoderInput(sae_in_BD, self.b_dec if self.cfg.apply_b_dec_to_input else None)

    def _active_code(
        self,
        encoder_input: EncoderInput,
        hidden_pre_BF: Tensor,
        rows_N: Tensor,
        cols_N: Tensor,
        relu: bool,
    ) -> SparseCode:
        code = code_from_positions(rows_N, cols_N, hidden_pre_BF.new_empty(0), hidden_pre_BF.shape)
        # one latent-major layout for both the encoder's and U's gradients
        code = code.with_latent_major()
        sae_in_BD, shift_D = encoder_input
        pre_N = gather_preacts(sae_in_BD, self.W_enc, self.b_enc, hidden_pre_BF, code, shift_D)
        return code.with_vals(pre_N.relu() if relu else pre_N)

    def _decode_code(self, code: SparseCode, weights: PolyDecoderWeights | None = None) -> Tensor:
        weights = weights or self.decoder_weights
        return terms_from_projection(project_sparse(code, weights.U_FR), weights).total()

    def _sparse_extra_losses(
        self,
        step_input: TrainStepInput,
        encoder_input: EncoderInput,
        hidden_pre_BF: Tensor,
        code: SparseCode,
        sae_out_BD: Tensor,
    ) -> dict[str, Tensor]:
        """The AuxK loss, as :meth:`calculate_topk_aux_loss` computes it densely."""
        dead_mask_F = step_input.dead_neuron_mask

        def decode_top_dead(k_aux: int) -> Tensor:
            assert dead_mask_F is not None
            masked_BF = torch.where(dead_mask_F[None], hidden_pre_BF, -torch.inf)
            rows_N, cols_N = select_topk(masked_BF, k_aux)
            aux = self._active_code(encoder_input, hidden_pre_BF, rows_N, cols_N, relu=False)
            return self._decode_code(aux)

        loss = auxk_loss(
            residual_BD=(step_input.sae_in - sae_out_BD).detach(),
            dead_mask_F=dead_mask_F,
            settings=aux_settings(self.cfg, self.decoder_weights),
            decode_top_dead=decode_top_dead,
            normalize_activations=self.cfg.normalize_activations,
        )
        return {"auxiliary_reconstruction_loss": self.cfg.aux_loss_coefficient * loss}  # type: ignore[union-attr]

    def _after_sparse_step(self, output: TrainStepOutput, code: SparseCode) -> None:
        """Sparsifier bookkeeping after a sparse step (e.g. BatchTopK's threshold)."""

    @torch.no_grad()
    def decoder_metrics(self, feature_acts: Tensor) -> dict[str, float]:
        """lambda2, lambda3, max |U^T U - I| and the mean L2 norm of each decoder
        term's contribution on ``feature_acts``; logged as ``metrics/poly/...``."""
        weights = self.decoder_weights
        terms = decoder_terms(feature_acts.detach(), weights)
        metrics = {
            "poly/orthogonality_error": orthogonality_error(self.U).item(),
            "poly/linear_norm": terms.linear.float().norm(dim=-1).mean().item(),
        }
        for name, term in (("quadratic", terms.quadratic), ("cubic", terms.cubic)):
            if term is not None:
                metrics[f"poly/{name}_norm"] = term.float().norm(dim=-1).mean().item()
        for name, scale in (("lambda2", weights.lambda2), ("lambda3", weights.lambda3)):
            if scale is not None:
                metrics[f"poly/{name}"] = scale.item()
        return metrics

    def calculate_topk_aux_loss(
        self,
        sae_in: Tensor,
        sae_out: Tensor,
        hidden_pre: Tensor,
        dead_neuron_mask: Tensor | None,
    ) -> Tensor:
        """AuxK loss through the polynomial decoder: the top dead latents
        reconstruct the residual, with the config's ``aux_k`` and
        ``aux_outside_interactions`` (:mod:`polysae_lens.auxk`; the paper's Sec. 5.1
        is coefficient 1, k_aux = d_in / 2, all of d_in)."""
        if dead_neuron_mask is None:
            return sae_out.new_tensor(0.0)
        loss = auxk_loss(
            residual_BD=(sae_in - sae_out).detach(),
            dead_mask_F=dead_neuron_mask,
            settings=aux_settings(self.cfg, self.decoder_weights),
            decode_top_dead=partial(
                decode_top_dead_dense, hidden_pre, dead_neuron_mask, self._decode_without_bias
            ),
            normalize_activations=self.cfg.normalize_activations,
        )
        return self.cfg.aux_loss_coefficient * loss  # type: ignore[union-attr]


# ---- TopK ------------------------------------------------------------------


class PolyTopKSAE(PolyDecoderMixin, TopKSAE):
    """Inference PolySAE with a per-row TopK encoder (``"poly"``)."""

    cfg: PolyTopKSAEConfig  # type: ignore[assignment]

    @override
    def encode(self, x: Tensor) -> Tensor:
        """SAELens's TopK encoder with the faster selection of
        :func:`polysae_lens.sparse.topk_indices`: the same activations, ties
        aside (hooks run as in SAELens)."""
        activation = self.activation_fn
        if (
            not self.sparse_kernels
            or not isinstance(activation, TopK)
            or activation.use_sparse_activations
            or activation._forward_hooks
            or activation._forward_pre_hooks
        ):
            return super().encode(x)
        sae_in = self.process_sae_in(x)
        hidden_pre = _encoder_preacts(sae_in, self.W_enc, self.b_enc)
        selected = topk_activation(self.hook_sae_acts_pre(hidden_pre), activation.k)
        acts = self.hook_sae_acts_post(selected.acts_BF)
        self._offer_selection(acts, selected.cols_BK)
        return acts


class PolyTopKTrainingSAE(PolyTrainingMixin, TopKTrainingSAE):
    """TopK PolySAE for training (``"poly"``), the paper's main setting."""

    cfg: PolyTopKTrainingSAEConfig  # type: ignore[assignment]
    keeps_fire_counter = True

    @override
    def _sparse_step_supported(self) -> bool:
        return True

    @override
    def _select_active(self, hidden_pre_BF: Tensor) -> tuple[Tensor, Tensor]:
        return select_topk(hidden_pre_BF, self.cfg.k)


# ---- JumpReLU --------------------------------------------------------------


class PolyJumpReLUSAE(PolyDecoderMixin, JumpReLUSAE):
    """Inference PolySAE with a JumpReLU encoder (``"poly_jumprelu"``).

    BatchTopK and Matryoshka PolySAEs are saved in this form; loading one of their
    training checkpoints converts its scalar ``topk_threshold`` into ``threshold``.
    """

    cfg: PolyJumpReLUSAEConfig  # type: ignore[assignment]
    sparsifier_params = ("b_enc", "threshold")

    @override
    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        if "topk_threshold" in state_dict and "threshold" not in state_dict:
            state_dict["threshold"] = _batchtopk_threshold(
                state_dict.pop("topk_threshold"), state_dict["b_enc"]
            )
        super().process_state_dict_for_loading(state_dict)


class PolyJumpReLUTrainingSAE(PolyTrainingMixin, JumpReLUTrainingSAE):
    """JumpReLU PolySAE for training (``"poly_jumprelu"``)."""

    cfg: PolyJumpReLUTrainingSAEConfig  # type: ignore[assignment]
    # the threshold is created by JumpReLUTrainingSAE.__init__ (kept in float32)


# ---- BatchTopK and Matryoshka ----------------------------------------------


class PolyBatchTopKTrainingSAE(PolyTrainingMixin, BatchTopKTrainingSAE):
    """BatchTopK PolySAE for training (``"poly_batchtopk"``).

    In training mode it keeps k latents per row on average over the batch; in
    eval mode it applies the learned threshold, exactly as the ``poly_jumprelu``
    model it is saved as.
    """

    cfg: PolyBatchTopKTrainingSAEConfig  # type: ignore[assignment]
    keeps_fire_counter = True

    @override
    def _sparse_step_supported(self) -> bool:
        return True

    @override
    def _select_active(self, hidden_pre_BF: Tensor) -> tuple[Tensor, Tensor]:
        return select_batch_topk(hidden_pre_BF, self.cfg.k)

    @override
    def _after_sparse_step(self, output: TrainStepOutput, code: SparseCode) -> None:
        # the threshold tracks the smallest kept activation, as SAELens's does
        self.update_topk_threshold(code.vals_N.detach())
        output.metrics["topk_threshold"] = self.topk_threshold

    @override
    def encode_with_hidden_pre(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.training:
            return super().encode_with_hidden_pre(x)
        sae_in = self.process_sae_in(x)
        hidden_pre = self.hook_sae_acts_pre(sae_in @ self.W_enc + self.b_enc)
        threshold_F = _batchtopk_threshold(self.topk_threshold, self.b_enc)
        mask = (hidden_pre > threshold_F).to(hidden_pre.dtype)
        return self.hook_sae_acts_post(hidden_pre.relu() * mask), hidden_pre


class PolyMatryoshkaTrainingSAE(PolyBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAE):
    """Matryoshka-BatchTopK PolySAE for training (``"poly_matryoshka"``).

    Level ``w`` reconstructs from latents ``[0, w)`` through the full polynomial
    decoder: ``b_dec + P(z[:, :w] @ U[:w])``. The projection is linear, so it is
    accumulated level by level and only the polynomial is re-applied.
    """

    cfg: PolyMatryoshkaTrainingSAEConfig  # type: ignore[assignment]

    @override
    def _sparse_step_supported(self) -> bool:
        return not self.cfg.use_matryoshka_aux_loss

    @override
    def _sparse_extra_losses(
        self,
        step_input: TrainStepInput,
        encoder_input: EncoderInput,
        hidden_pre_BF: Tensor,
        code: SparseCode,
        sae_out_BD: Tensor,
    ) -> dict[str, Tensor]:
        losses = super()._sparse_extra_losses(
            step_input, encoder_input, hidden_pre_BF, code, sae_out_BD
        )
        for width in self.cfg.matryoshka_widths[:-1]:
            level = code.with_vals(code.vals_N * (code.cols_N < width))
            level_out = self.run_time_activation_norm_fn_out(self._decode_code(level) + self.b_dec)
            losses[f"inner_mse_loss_{width}"] = (
                self.mse_loss_fn(level_out, step_input.sae_in).sum(dim=-1).mean()
            )
        return losses

    @override
    def _iterable_decode(
        self, feature_acts: Tensor, include_outer_loss: bool = False
    ) -> Generator[tuple[int, Tensor], None, None]:
        widths = self.cfg.matryoshka_widths
        if not include_outer_loss:
            widths = widths[:-1]
        weights = self.decoder_weights
        a_BR = torch.zeros(
            (*feature_acts.shape[:-1], weights.U_FR.shape[1]),
            dtype=feature_acts.dtype,
            device=feature_acts.device,
        )
        start = 0
        for width in widths:
            a_BR = a_BR + project(feature_acts[..., start:width], weights.U_FR[start:width])
            level_out = terms_from_projection(a_BR, weights).total() + self.b_dec
            start = width
            yield width, self.run_time_activation_norm_fn_out(level_out)

    @override
    def calculate_matryoshka_aux_loss(
        self,
        sae_in: Tensor,
        sae_out: Tensor,
        feature_acts: Tensor,
        hidden_pre: Tensor,
        dead_neuron_mask: Tensor | None,
    ) -> Tensor:
        """Per level, that level's dead latents reconstruct the level's residual."""
        if dead_neuron_mask is None or not bool(dead_neuron_mask.any()):
            return sae_out.new_tensor(0.0)
        weights = self.decoder_weights
        settings = aux_settings(self.cfg, weights)
        losses = []
        start = 0
        for width, level_out in self._iterable_decode(feature_acts, include_outer_loss=True):
            level_dead = dead_neuron_mask[start:width]
            losses.append(
                auxk_loss(
                    residual_BD=(sae_in - level_out).detach(),
                    dead_mask_F=level_dead,
                    settings=settings,
                    decode_top_dead=partial(
                        decode_top_dead_dense,
                        hidden_pre[..., start:width],
                        level_dead,
                        partial(
                            poly_decode, weights=weights._replace(U_FR=weights.U_FR[start:width])
                        ),
                    ),
                    normalize_activations=self.cfg.normalize_activations,
                )
            )
            start = width
        return self.cfg.aux_loss_coefficient * torch.stack(losses).sum()


# ---- Gated -----------------------------------------------------------------


class _GatedBiases(PolyDecoderMixin):
    """Gated encoders have gate and magnitude biases instead of b_enc."""

    sparsifier_params = ("b_gate", "r_mag", "b_mag")

    @override
    def _shift_encoder_biases(self, shift_F: Tensor) -> None:
        # the magnitude path uses W_enc * exp(r_mag), so its shift scales too
        self.b_gate.sub_(shift_F.to(self.b_gate.dtype))
        self.b_mag.sub_((shift_F * self.r_mag.exp()).to(self.b_mag.dtype))


class PolyGatedSAE(_GatedBiases, GatedSAE):
    """Inference PolySAE with a gated encoder (``"poly_gated"``)."""

    cfg: PolyGatedSAEConfig  # type: ignore[assignment]


class PolyGatedTrainingSAE(_GatedBiases, PolyTrainingMixin, GatedTrainingSAE):
    """Gated PolySAE for training (``"poly_gated"``)."""

    cfg: PolyGatedTrainingSAEConfig  # type: ignore[assignment]

    @override
    def calculate_aux_loss(
        self,
        step_input: TrainStepInput,
        feature_acts: Tensor,
        hidden_pre: Tensor,
        sae_out: Tensor,
    ) -> dict[str, Tensor]:
        """Gated SAE losses (Rajamanoharan et al. 2024) with the polynomial decoder:
        an L1 penalty on the gate weighted by first-order decoder norms, and the
        gate path's own reconstruction."""
        sae_in_centered = step_input.sae_in - self.b_dec * self.cfg.apply_b_dec_to_input
        gate_acts_BF = torch.relu(sae_in_centered @ self.W_enc + self.b_gate)
        l1_loss = step_input.coefficients["l1"] * (
            (gate_acts_BF * self.W_dec.norm(dim=1)).sum(dim=-1).mean()
        )
        via_gate_BD = self._decode_without_bias(gate_acts_BF) + self.b_dec
        aux_recon_loss = (via_gate_BD - step_input.sae_in).pow(2).sum(dim=-1).mean()
        return {"l1_loss": l1_loss, "auxiliary_reconstruction_loss": aux_recon_loss}


# ---- helpers ---------------------------------------------------------------


def _batchtopk_threshold(topk_threshold: Tensor, b_enc_F: Tensor) -> Tensor:
    """The per-latent threshold a BatchTopK SAE is saved with (SAELens's formula)."""
    return torch.ones_like(b_enc_F) * topk_threshold.item()


def _encoder_preacts(
    sae_in_BD: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor, exact: bool = True
) -> Tensor:
    """``sae_in @ W_enc + b_enc``.

    ``exact``: the same values as SAELens's encoders compute (the inference
    encode, whose outputs stay bit-identical to SAELens's), with the bias added
    in place when that keeps the result's dtype (not under autocast, where a bf16
    product plus a float32 bias is float32). Otherwise (the training step) the
    bias is fused into the product with ``addmm``: equal up to float rounding,
    and one pass fewer over the [B, d_sae] result (about 10% of the encoder
    matmul at the GPT-2 shape). Under autocast that product, bias included, is in
    the autocast dtype (the step selects latents from it and reads their values
    from it, rounded to bf16 as the product already is), instead of a bf16
    product plus a separate float32 bias pass that doubles the tensor's size.
    """
    autocast = torch.is_autocast_enabled(sae_in_BD.device.type)
    if not exact and (autocast or sae_in_BD.dtype == W_enc_DF.dtype == b_enc_F.dtype):
        return torch.addmm(b_enc_F, sae_in_BD, W_enc_DF)
    pre_BF = sae_in_BD @ W_enc_DF
    if pre_BF.dtype != torch.promote_types(pre_BF.dtype, b_enc_F.dtype):
        return pre_BF + b_enc_F
    return pre_BF.add_(b_enc_F)


DENSITY_SAMPLE_ROWS = 64
"""Rows of a dense code whose density decides whether to look for its nonzeros."""


def _may_be_sparse(z: Tensor) -> bool:
    """Whether a sample of the code's rows is sparse enough for the sparse decode.

    Finding the nonzeros of a code that turns out dense costs about as much as
    the dense product, so clearly dense codes skip it; the sample's bound is
    twice the real one because a few rows can be denser than the whole, and
    :func:`code_if_sparse` then checks the whole code.
    """
    if z.numel() == 0:
        return False
    sample = z.reshape(-1, z.shape[-1])[:DENSITY_SAMPLE_ROWS]
    return int(torch.count_nonzero(sample)) <= 2 * SPARSE_DENSITY * sample.numel()


def _has_hooks(sae: nn.Module) -> bool:
    """Whether any HookPoint of the SAE has hooks (the sparse step skips them)."""
    return any(_hooked(h) for h in getattr(sae, "hook_dict", {}).values())


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)


def _adapt_fire_counter(module: nn.Module, state_dict: Any, prefix: str = "") -> None:
    """Checkpoints without ``steps_since_fired`` (inference files, files from
    before it existed, converted or gathered weights) load into a training SAE
    with every count at 0; training checkpoints load into inference SAEs without it."""
    key = prefix + FIRE_COUNTER
    counter = getattr(module, FIRE_COUNTER, None)
    if isinstance(counter, Tensor):
        if key not in state_dict:
            # on the CPU: the module may still be on the meta device
            state_dict[key] = torch.zeros(counter.shape, dtype=counter.dtype)
        elif state_dict[key].dtype != counter.dtype:
            # loaders that cast every tensor to the SAE's dtype: counts stay integers
            state_dict[key] = state_dict[key].round().to(counter.dtype)
    else:
        state_dict.pop(key, None)


def _check_state_dict(module: nn.Module, state_dict: dict[str, Any]) -> None:
    """Raise, before anything is copied, if keys or shapes do not match."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    extra = sorted(set(state_dict) - set(expected))
    if missing or extra:
        raise ValueError(
            f"PolySAE checkpoint does not match {type(module).__name__}: "
            f"missing keys {missing}, unexpected keys {extra}. Check that cfg.json's "
            "architecture and poly_order match the weights."
        )
    for key, tensor in expected.items():
        if tuple(state_dict[key].shape) != tuple(tensor.shape):
            raise ValueError(
                f"PolySAE checkpoint key {key!r} has shape "
                f"{tuple(state_dict[key].shape)} but the config implies "
                f"{tuple(tensor.shape)}: check d_in, d_sae and poly_ranks in cfg.json."
            )


# ---- registration ----------------------------------------------------------

INFERENCE_CLASSES: dict[str, tuple[type[SAE[Any]], type[Any]]] = {
    "poly": (PolyTopKSAE, PolyTopKSAEConfig),
    "poly_jumprelu": (PolyJumpReLUSAE, PolyJumpReLUSAEConfig),
    "poly_gated": (PolyGatedSAE, PolyGatedSAEConfig),
    # BatchTopK and Matryoshka are used as JumpReLU models (as in SAELens); these
    # entries let SAE.load_from_disk read their training checkpoints too.
    "poly_batchtopk": (PolyJumpReLUSAE, PolyJumpReLUSAEConfig),
    "poly_matryoshka": (PolyJumpReLUSAE, PolyJumpReLUSAEConfig),
}
"""Architecture name -> (inference class, config class)."""

TRAINING_CLASSES: dict[str, tuple[type[TrainingSAE[Any]], type[Any]]] = {
    "poly": (PolyTopKTrainingSAE, PolyTopKTrainingSAEConfig),
    "poly_batchtopk": (PolyBatchTopKTrainingSAE, PolyBatchTopKTrainingSAEConfig),
    "poly_matryoshka": (PolyMatryoshkaTrainingSAE, PolyMatryoshkaTrainingSAEConfig),
    "poly_jumprelu": (PolyJumpReLUTrainingSAE, PolyJumpReLUTrainingSAEConfig),
    "poly_gated": (PolyGatedTrainingSAE, PolyGatedTrainingSAEConfig),
}
"""Architecture name -> (training class, config class)."""

ARCHITECTURES = tuple(TRAINING_CLASSES)
"""Every PolySAE architecture name."""


def register_architectures() -> None:
    """Register every PolySAE variant with both SAELens registries.

    Idempotent: an entry that already holds a PolySAE class (from an earlier
    import or a reload of this module) is replaced; an entry that holds another
    package's class is a conflict and raises.
    """
    for registry, classes in (
        (SAE_CLASS_REGISTRY, INFERENCE_CLASSES),
        (SAE_TRAINING_CLASS_REGISTRY, TRAINING_CLASSES),
    ):
        for name, entry in classes.items():
            current = registry.get(name)
            if current is not None and current[0].__module__ != __name__:
                raise ValueError(
                    f"SAELens architecture {name!r} is already registered by "
                    f"{current[0].__module__}.{current[0].__qualname__}; polysae-lens "
                    "cannot register its PolySAE class under the same name."
                )
            registry[name] = entry  # type: ignore[assignment]


def is_poly_sae(sae: nn.Module) -> bool:
    """Whether ``sae`` is a PolySAE (any variant, inference or training)."""
    return isinstance(sae, PolyDecoderMixin)


# The module's only import-time side effect.
register_architectures()
