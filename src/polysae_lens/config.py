"""Configuration dataclasses for every PolySAE variant.

Each config is a SAELens config of the matching sparsifier plus the PolySAE
decoder fields of :class:`PolyDecoderFields`. The field names are a public
contract: they are the keys of ``cfg.json``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAEConfig
from sae_lens.saes.gated_sae import GatedSAEConfig, GatedTrainingSAEConfig
from sae_lens.saes.jumprelu_sae import JumpReLUSAEConfig, JumpReLUTrainingSAEConfig
from sae_lens.saes.matryoshka_batchtopk_sae import (
    MatryoshkaBatchTopKTrainingSAEConfig,
)
from sae_lens.saes.sae import SAEConfig
from sae_lens.saes.topk_sae import TopKSAEConfig, TopKTrainingSAEConfig
from typing_extensions import override

from polysae_lens.auxk import AUX_K_RULES
from polysae_lens.stiefel import C1_RATIO_RULE, RETRACTIONS

POLY_ORDERS = (1, 2, 3)
STIEFEL_METHODS = tuple(RETRACTIONS)
C1_INITS = ("orthogonal", "kaiming")
INIT_PRESETS = ("package", "authors")
AUTHORS_DECODER_INIT_NORM = 0.1
"""SAELens 6.22's default ``decoder_init_norm``, which the authors' runs used."""
PAPER_TRAINING_SETTINGS: dict[str, Any] = {
    "init_preset": "authors",
    "c1_lr_scale": 1.0,
    "u_lr_scale": 1.0,
    "gauge_lr_scale": 0.0,
    "aux_dead_window": 0,
    "aux_k": "d_in/2",
    "aux_outside_interactions": False,
    "subspace_fit_step": None,
}
"""Training fields that turn the package's PolySAE training into the paper's (the
authors' code): its initialisation, one learning rate, no gauge step, SAELens's
AuxK."""
PREVIOUS_TRAINING_DEFAULTS: dict[str, Any] = {
    "c1_lr_scale": C1_RATIO_RULE,
    "gauge_lr_scale": 0.0,
    "u_lr_scale": 1.0,
    "aux_k": "d_in/2",
    "aux_outside_interactions": False,
    "subspace_fit_step": None,
}
"""The package's training defaults before the gauge step, U's step scale, the
AuxK changes, C1's sqrt(d_sae / R1) step and the subspace fit became defaults
(issue 13, fourth, seventh, ninth and tenth passes): the demo and
``benchmarks/inclass.py`` train them beside the current defaults."""
DEFAULT_INTERACTION_RANK = 64  # R2 = R3 = 64 for GPT-2 small (paper Sec. 5.1)


@dataclass
class PolyDecoderFields:
    """The PolySAE decoder fields shared by every variant's config.

    A mixin: it is always combined with a SAELens config that provides
    ``d_in`` and ``d_sae``. (The Args section feeds the CLI's ``--help``.)

    Args:
        poly_order: 1 (linear), 2 (+ pairwise) or 3 (+ triple interactions).
        poly_ranks: R1 R2 R3; default (min(d_in, d_sae), min(64, R1), min(64, R1)).
        lambda2_init: initial quadratic scale lambda2 (paper: -0.5).
        lambda3_init: initial cubic scale lambda3 (paper: 0.5).
    """

    poly_order: int = 3
    """Highest power of the decoder: 1 (linear), 2 (+ pairwise) or 3 (+ triples)."""
    poly_ranks: tuple[int, int, int] | None = None
    """(R1, R2, R3): rank of the shared projection U and of the quadratic and
    cubic terms. ``None`` means (R1, min(64, R1), min(64, R1)) with R1 =
    min(d_in, d_sae): the paper's GPT-2 setting whenever d_sae >= d_in. Bounds: 1 <= R2, R3 <= R1 <= min(d_in, d_sae). R1 <= d_sae
    because U [d_sae, R1] has orthonormal columns; R1 <= d_in because a larger
    R1 only adds redundant rank to the linear term."""
    lambda2_init: float = -0.5
    """Initial value of the learned quadratic scale lambda2 (paper: -0.5)."""
    lambda3_init: float = 0.5
    """Initial value of the learned cubic scale lambda3 (paper: +0.5)."""

    if TYPE_CHECKING:  # provided by the SAELens config this mixin is combined with

        @property
        def d_in(self) -> int: ...

        @property
        def d_sae(self) -> int: ...

    def __post_init__(self) -> None:
        self._validate_dims()
        self._validate_poly_fields()
        self._validate_k()
        super().__post_init__()  # type: ignore[misc]

    def _validate_dims(self) -> None:
        # Checked first: a cfg.json with "d_in": "768" would otherwise fail with a
        # TypeError deep inside the rank arithmetic.
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(
                    f"{name}={value!r} ({type(value).__name__}) must be a positive integer: "
                    f'write it as a JSON integer in cfg.json (e.g. "{name}": 768) or pass '
                    f"--{name} N."
                )

    @property
    def ranks(self) -> tuple[int, int, int]:
        """The resolved (R1, R2, R3)."""
        assert self.poly_ranks is not None  # resolved in __post_init__
        return self.poly_ranks

    def _validate_poly_fields(self) -> None:
        if self.poly_order not in POLY_ORDERS or isinstance(self.poly_order, bool):
            raise ValueError(
                f"poly_order={self.poly_order!r} is not allowed: use 1 (linear), "
                "2 (linear + pairwise) or 3 (linear + pairwise + triple)."
            )
        if self.poly_ranks is None:
            # R1 <= d_sae too, so a narrow SAE (d_sae < d_in) gets valid defaults.
            r1 = min(self.d_in, self.d_sae)
            rank = min(DEFAULT_INTERACTION_RANK, r1)
            self.poly_ranks = (r1, rank, rank)
        ranks = tuple(self.poly_ranks)
        if len(ranks) != 3 or not all(
            isinstance(r, int) and not isinstance(r, bool) for r in ranks
        ):
            raise ValueError(f"poly_ranks={self.poly_ranks!r} must be three integers (R1, R2, R3).")
        r1, r2, r3 = ranks
        if min(ranks) < 1:
            raise ValueError(f"poly_ranks={ranks} must be positive: every rank must be >= 1.")
        if r1 > min(self.d_in, self.d_sae):
            raise ValueError(
                f"poly_ranks[0] (R1)={r1} must be <= min(d_in, d_sae)="
                f"{min(self.d_in, self.d_sae)}: U [d_sae, R1] needs orthonormal "
                "columns and the linear term has rank at most d_in."
            )
        if r2 > r1 or r3 > r1:
            raise ValueError(
                f"poly_ranks={ranks}: R2 and R3 must be <= R1={r1}, since the "
                "interaction terms use the first R2 / R3 columns of U."
            )
        self.poly_ranks = (r1, r2, r3)
        for name in ("lambda2_init", "lambda3_init"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name}={value!r} must be a finite number.")

    def _validate_k(self) -> None:
        k: Any = getattr(self, "k", None)
        if k is None:
            return
        if not isinstance(k, (int, float)) or isinstance(k, bool) or not k > 0:
            raise ValueError(f"k={k!r} must be a positive number of active latents.")
        if k > self.d_sae and k == _field_default(type(self), "k"):
            raise ValueError(
                f"k is missing (or left at SAELens's default k={k}), which is larger than "
                f"d_sae={self.d_sae}. "
                "Set k, the number of active latents per token, to at most d_sae "
                '(command line: -k N; cfg.json: "k": N).'
            )
        if k > self.d_sae:
            raise ValueError(
                f"k={k} is larger than d_sae={self.d_sae}: at most d_sae latents can be active."
            )


@dataclass
class _NoDecoderNormRescale:
    """Rejects ``rescale_acts_by_decoder_norm=True`` for the TopK family.

    With an orthonormal U the first-order decoder rows ``U[i] @ C1`` share
    parameters, so ranking latents by their norms couples the selection to every
    other latent; the paper trains without it (Sec. 5.1). We reject it rather
    than save a model whose latent selection differs from training's.
    """

    rescale_acts_by_decoder_norm: bool = False
    """Must be False for PolySAEs (the paper's setting)."""

    def __post_init__(self) -> None:
        if self.rescale_acts_by_decoder_norm:
            raise ValueError(
                "rescale_acts_by_decoder_norm=True is not supported for PolySAEs: "
                "set rescale_acts_by_decoder_norm=False (the paper's setting)."
            )
        super().__post_init__()  # type: ignore[misc]


@dataclass
class _PolyTrainingDefaults:
    """Training-only fields shared by the training configs.

    Args:
        init_preset: "package" (default) or "authors" (the authors' code's init).
        decoder_init_norm: package preset: scale C1 so the mean row norm of U @ C1 is
            this; authors preset: the norm of W_enc's columns (None: 0.1).
        c1_init: "orthogonal" (default; sqrt(2) x orthonormal rows) or "kaiming".
        c1_lr_scale: factor on C1's optimizer step; default sqrt(d_sae / R1), 1.0 = paper.
        u_lr_scale: factor on U's optimizer step; default sqrt(R1 / d_sae), 1.0 = paper.
        gauge_lr_scale: learning rate of the gauge step turning U's basis (0 = off, paper).
        aux_dead_window: AuxK also takes latents silent for this many steps (0: trainer's only).
        aux_k: dead latents per row in AuxK: "k" (default, the SAE's k), "d_in/2" (paper), or N.
        aux_outside_interactions: AuxK ignores the interaction terms' output subspace (paper: False).
        stiefel_every_n_steps: retract U after every n-th optimizer step (0: never).
        stiefel_method: "cholesky_qr" (default) or "qr"; both give the same Q.
        stiefel_project_moments: also project Adam's first moment onto the tangent space.
        fused_adam: run the Adam optimizer that updates this SAE with torch's fused kernel.
        subspace_fit_step: fit the interaction subspace to data after this step (0 or None: never).
        subspace_fit_rows: rows the fit collects (default: twice its features, 8192 to 131072).
        subspace_fit_outputs: residual components the fit regresses (default min(d_in, 2 R2)).
        subspace_fit_iterations: conjugate-gradient iterations of the fit (default 50).
    """

    init_preset: str = "package"
    """Which initial weights to draw (:mod:`polysae_lens.init`). Both draw U
    orthonormal (QR of a Gaussian), zero biases and the lambda inits.
    ``"package"`` (default; trains faster, README "Training dynamics"): C1 per
    ``c1_init``, C2 and C3 Kaiming-uniform in their [R, d_in] storage
    (fan_in = d_in), and W_enc tied to the first-order decoder, ``(U @ C1)^T``
    (the package's choice, as SAELens ties W_enc to W_dec^T). ``"authors"``: the
    distribution of the authors' research fork (SAELens 6.22): C1, C2 and C3
    Kaiming-uniform as [d_in, R] tensors (fan_in = R, so C2 is sqrt(d_in / R2)
    times larger), and W_enc not tied to the decoder but the transpose of a
    random placeholder decoder whose rows have norm ``decoder_init_norm``. It
    sets ``c1_init="kaiming"`` and, if ``decoder_init_norm`` is None, 0.1 (SAELens
    6.22's default). ``c1_lr_scale`` stays separate: 1.0 is the paper's."""
    decoder_init_norm: float | None = None
    """With ``init_preset="package"``: if set, C1 is scaled at init so the mean
    row norm of the first-order decoder ``U @ C1`` equals this value; ``None``
    (default) leaves C1 as ``c1_init`` draws it. With ``init_preset="authors"``:
    the norm of each column of W_enc (SAELens's meaning: the norm of each row of
    the placeholder decoder W_enc is the transpose of)."""
    c1_init: str = "orthogonal"
    """Initialisation of C1 under ``init_preset="package"``: ``"orthogonal"``
    (default; sqrt(2) times a matrix with orthonormal rows: the Frobenius norm
    of Kaiming's init with condition number 1, so the first-order decoder
    U @ C1 starts well conditioned) or ``"kaiming"`` (Kaiming-uniform in C1's
    [R1, d_in] storage). ``init_preset="authors"`` sets it to ``"kaiming"``."""
    c1_lr_scale: float | str | None = None
    """Factor applied to C1's optimizer step (for Adam, exactly its learning rate
    relative to the other parameters). ``None`` (default) means sqrt(d_sae / R1).
    With U on the Stiefel manifold only C1's R1 x d_in entries can reshape the
    decoder's spectrum, and ``||U @ C1|| = ||C1||``: C1's entries are about
    sqrt(d_sae / R1) times a free decoder's, so this factor moves the
    first-order decoder, relative to its size, as fast as Adam moves a linear
    SAE's. The earlier default, d_sae / R1 (``"d_sae/R1"`` keeps it), moves it
    sqrt(d_sae / R1) times faster than that, and at width 8 R1 held the MSE 6-9%
    above TopK's on linear data at a constant lr (``docs/inclass-plateau.md``,
    ninth pass). 1.0 is the paper's single learning rate."""
    u_lr_scale: float | None = None
    """Factor applied to U's optimizer step (for Adam, exactly its learning rate
    relative to the other parameters). ``None`` (default) means sqrt(R1 / d_sae),
    the root-mean-square norm of U's rows: Adam moves every entry by about the
    learning rate, so an unscaled step moves a row of U (norm ~ sqrt(R1 / d_sae))
    sqrt(d_sae / R1) times faster, relative to its size, than a unit-norm row of
    a free decoder. So fast a decoder row keeps fitting whatever its latent fires
    on, and losing latents never go silent for AuxK to revive
    (``docs/inclass-plateau.md``, fourth pass). 1.0 is the paper's single
    learning rate."""
    gauge_lr_scale: float = 1.0
    """Learning rate, relative to the optimizer's, of the gauge step: after each
    optimizer step, U and C1 turn along ``U -> U Q, C1 -> Q^T C1`` (which leaves
    U @ C1 unchanged) by an Adam step of their own on the loss's gradient along
    that orbit (:func:`polysae_lens.stiefel.gauge_adam_step`). It lets the
    interaction terms choose which directions of U they square, which U's own
    Adam step does only very slowly (``docs/inclass-plateau.md``). Only at
    order >= 2. 1 (default) is U's learning rate; 0 turns it off (the paper's
    model and update)."""
    aux_dead_window: int = 100
    """TopK, BatchTopK and Matryoshka PolySAEs: the AuxK loss also treats as
    dead every latent that fired in none of the last ``aux_dead_window``
    training steps, counted by the SAE itself (``steps_since_fired``,
    :mod:`polysae_lens.dead_latents`), besides those the trainer's
    ``dead_feature_window`` (SAELens default 1000) names. PolySAE's losing
    latents keep firing now and then instead of dying, so the trainer's window
    alone never hands them to AuxK (``docs/inclass-plateau.md``). 0 keeps the
    trainer's mask only (SAELens's and the paper's behaviour)."""
    aux_k: int | str = "k"
    """TopK, BatchTopK and Matryoshka PolySAEs: how many dead latents decode the
    residual on each row in the AuxK loss (:mod:`polysae_lens.auxk`). ``"k"``
    (default): the SAE's own k, so the dead latents compete for the residual as
    the live ones compete for the input; ``"d_in/2"``: SAELens's and the
    paper's d_in // 2, which, with fewer dead latents than that, makes every
    dead latent active on every row (a dense regression of the residual); or a
    positive integer."""
    aux_outside_interactions: bool = True
    """TopK, BatchTopK and Matryoshka PolySAEs of order >= 2: AuxK compares its
    reconstruction with the residual only outside the output subspace of the
    interaction terms (the row space of C2, and of C3 at order 3), so dead
    latents are not revived as linear stand-ins for interactions the
    polynomial has not learned yet (:mod:`polysae_lens.auxk`;
    ``docs/inclass-plateau.md``, seventh pass). Where those rows span all of
    d_in (R2 + R3 >= d_in) the comparison is in all of d_in. False: SAELens's
    and the paper's AuxK."""
    stiefel_every_n_steps: int = 1
    """Retract U onto the Stiefel manifold after every n-th optimizer step. The
    paper retracts after every step (1, the default); 0 disables the retraction
    (for ablations only: U then drifts from orthonormality)."""
    stiefel_method: str = "cholesky_qr"
    """How the QR retraction's Q factor is computed: ``"cholesky_qr"`` (default;
    from the Cholesky factor of U^T U, several times faster at GPT-2 scale) or
    ``"qr"`` (Householder QR). Both give the same Q (diag(R) > 0)."""
    stiefel_project_moments: bool = False
    """Also project Adam's first moment of U onto the tangent space at the
    retracted point. Off by default (the paper's plain retraction)."""
    fused_adam: bool = True
    """Switch the ``torch.optim.Adam`` / ``AdamW`` that updates this SAE (such as
    SAETrainer's) to torch's fused kernel on its first step: the same update up
    to float rounding, one pass over each parameter instead of a dozen (several
    times faster on CPU). Optimizers built with ``foreach`` or ``fused`` set
    explicitly, or holding parameters the fused kernel does not support, are
    left alone. False keeps the optimizer exactly as it was built."""
    subspace_fit_step: int | None = 1500
    """Order >= 2: after this many optimizer steps, fit the interaction terms'
    subspace to the data once (:mod:`polysae_lens.subspace_fit`): regress the
    linear term's residual on quadratic forms of ``a = z @ U``, turn U's basis
    (``U -> U Q``, ``C1 -> Q^T C1``: the first-order decoder is unchanged) so its
    first R2 columns are the directions those forms use, and refit C2 (and C3).
    Gradient training alone can leave a quadratic channel aimed at nothing for
    the whole run (``docs/inclass-plateau.md``, tenth pass). The rows come from
    the training batches of the steps just before this one. 1500 is the step the
    in-class benchmark measured (of 3000; not tuned). None or 0 turns it
    off (the paper's training; on the command line ``--subspace_fit_step 0``)."""
    subspace_fit_rows: int | None = None
    """Rows of training activations the subspace fit uses. None (default): twice
    its regression's features (R1 (R1 + 1) / 2 products of ``a``'s coordinates
    plus R1 + 1), at least 8192 and at most 131,072 (0.8 GB of float32 rows at
    R1 = d_in = 768, where the 296,065 features outnumber them; a CG iteration then
    costs about 4e13 floating-point operations: lower this or
    ``subspace_fit_iterations`` to fit at that shape on a CPU)."""
    subspace_fit_outputs: int | None = None
    """J, the residual's principal components whose quadratic forms the subspace
    fit estimates (the interaction terms' outputs lie among them). None
    (default): min(d_in, 2 R2)."""
    subspace_fit_iterations: int = 50
    """Conjugate-gradient iterations of the subspace fit's regression
    (:func:`polysae_lens.subspace_fit.quadratic_forms`), each one pass over its
    rows costing O(rows J R1^2)."""

    def __post_init__(self) -> None:
        n = self.stiefel_every_n_steps
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(
                f"stiefel_every_n_steps={n!r} must be an integer >= 1 (or 0 to "
                "disable the retraction)."
            )
        if not isinstance(self.fused_adam, bool):
            raise ValueError(f"fused_adam={self.fused_adam!r} must be True or False.")
        if not isinstance(self.aux_outside_interactions, bool):
            raise ValueError(
                f"aux_outside_interactions={self.aux_outside_interactions!r} must be True or False."
            )
        aux_k = self.aux_k
        if aux_k not in AUX_K_RULES and (
            not isinstance(aux_k, int) or isinstance(aux_k, bool) or aux_k < 1
        ):
            raise ValueError(
                f"aux_k={aux_k!r} is not allowed: use one of {list(AUX_K_RULES)} or a positive "
                "integer (dead latents per row in the AuxK loss)."
            )
        if self.init_preset not in INIT_PRESETS:
            raise ValueError(
                f"init_preset={self.init_preset!r} is not allowed: use one of {list(INIT_PRESETS)}."
            )
        if self.c1_init not in C1_INITS:
            raise ValueError(
                f"c1_init={self.c1_init!r} is not allowed: use one of {list(C1_INITS)}."
            )
        if self.init_preset == "authors":
            # The preset is the whole init: record what it draws in cfg.json.
            self.c1_init = "kaiming"
            if self.decoder_init_norm is None:
                self.decoder_init_norm = AUTHORS_DECODER_INIT_NORM
        # (field, what None means, the named rules it also takes)
        for name, default, rules in (
            ("c1_lr_scale", f"sqrt(d_sae / R1) (or {C1_RATIO_RULE!r})", (C1_RATIO_RULE,)),
            ("u_lr_scale", "sqrt(R1 / d_sae)", ()),
        ):
            scale = getattr(self, name)
            if (
                scale is not None
                and scale not in rules
                and (
                    not isinstance(scale, (int, float))
                    or isinstance(scale, bool)
                    or not math.isfinite(scale)
                    or scale <= 0
                )
            ):
                raise ValueError(
                    f"{name}={scale!r} must be a positive finite number, or None for {default}."
                )
        gauge = self.gauge_lr_scale
        if (
            not isinstance(gauge, (int, float))
            or isinstance(gauge, bool)
            or not math.isfinite(gauge)
            or gauge < 0
        ):
            raise ValueError(
                f"gauge_lr_scale={gauge!r} must be a finite number >= 0 (0 turns the gauge "
                "step off)."
            )
        window = self.aux_dead_window
        if not isinstance(window, int) or isinstance(window, bool) or window < 0:
            raise ValueError(
                f"aux_dead_window={window!r} must be an integer >= 0 (steps without firing "
                "before AuxK treats a latent as dead; 0 keeps only the trainer's "
                "dead_feature_window)."
            )
        if self.stiefel_method not in STIEFEL_METHODS:
            raise ValueError(
                f"stiefel_method={self.stiefel_method!r} is not allowed: use one of "
                f"{list(STIEFEL_METHODS)}."
            )
        self._validate_subspace_fit()
        super().__post_init__()  # type: ignore[misc]

    def _validate_subspace_fit(self) -> None:
        step = self.subspace_fit_step
        if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
            raise ValueError(
                f"subspace_fit_step={step!r} must be an integer >= 1, or 0 or None for no "
                "subspace fit."
            )
        for name, none_means in (
            ("subspace_fit_rows", "the default row count"),
            ("subspace_fit_outputs", "min(d_in, 2 R2)"),
            ("subspace_fit_iterations", None),
        ):
            value = getattr(self, name)
            if value is None and none_means is not None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                allowed = f", or None for {none_means}" if none_means else ""
                raise ValueError(f"{name}={value!r} must be a positive integer{allowed}.")
        ranks = getattr(self, "poly_ranks", None)
        if ranks is None or not self.subspace_fit_step:
            return
        d_in = getattr(self, "d_in", None)
        J = self.subspace_fit_outputs
        if J is not None and isinstance(d_in, int) and d_in < J:
            raise ValueError(
                f"subspace_fit_outputs={J} exceeds d_in={d_in}: the residual has d_in "
                f"principal components; use at most {d_in}, or None for min(d_in, 2 R2)."
            )
        R1, R2, R3 = ranks
        needed = R2 + R3 + R1 + 1  # the refit of C2 and C3 (at most)
        rows = self.subspace_fit_rows
        if rows is not None and rows < needed:
            raise ValueError(
                f"subspace_fit_rows={rows} is too few: the refit of C2 and C3 alone has "
                f"{needed} features (R2 + R3 + R1 + 1); use at least {needed}, better "
                "2 R1 (R1 + 3) / 2, or None for the default."
            )


@dataclass
class _PerRowK:
    """TopK selects exactly ``k`` latents per row, so ``k`` must be an integer."""

    def __post_init__(self) -> None:
        fields = vars(self)  # k comes from the SAELens TopK config
        k = fields["k"]
        if isinstance(k, float) and k.is_integer():
            k = fields["k"] = int(k)
        if not isinstance(k, int):
            raise ValueError(
                f"k={k!r} must be an integer for TopK (per-row) selection; use "
                "architecture 'poly_batchtopk' for a batch-average k."
            )
        super().__post_init__()  # type: ignore[misc]


# ---- inference configs -----------------------------------------------------


@dataclass
class PolyTopKSAEConfig(PolyDecoderFields, _PerRowK, _NoDecoderNormRescale, TopKSAEConfig):
    """Inference PolySAE with a per-row TopK encoder (architecture ``"poly"``)."""

    @override
    @classmethod
    def architecture(cls) -> str:
        return "poly"


@dataclass
class PolyJumpReLUSAEConfig(PolyDecoderFields, JumpReLUSAEConfig):
    """Inference PolySAE with a JumpReLU encoder (``"poly_jumprelu"``).

    BatchTopK and Matryoshka PolySAEs are saved in this form.
    """

    @override
    @classmethod
    def architecture(cls) -> str:
        return "poly_jumprelu"


@dataclass
class PolyGatedSAEConfig(PolyDecoderFields, GatedSAEConfig):
    """Inference PolySAE with a gated encoder (``"poly_gated"``)."""

    @override
    @classmethod
    def architecture(cls) -> str:
        return "poly_gated"


# ---- training configs ------------------------------------------------------


@dataclass
class PolyTopKTrainingSAEConfig(
    PolyDecoderFields,
    _PolyTrainingDefaults,
    _PerRowK,
    _NoDecoderNormRescale,
    TopKTrainingSAEConfig,
):
    """Training config of the paper's main setting: TopK PolySAE (``"poly"``)."""

    @override
    @classmethod
    def architecture(cls) -> str:
        return "poly"


@dataclass
class PolyBatchTopKTrainingSAEConfig(
    PolyDecoderFields,
    _PolyTrainingDefaults,
    _NoDecoderNormRescale,
    BatchTopKTrainingSAEConfig,
):
    """BatchTopK PolySAE (``"poly_batchtopk"``); saved as ``"poly_jumprelu"``."""

    @override
    @classmethod
    def architecture(cls) -> str:
        return "poly_batchtopk"

    @override
    def get_inference_config_class(self) -> type[SAEConfig]:
        return PolyJumpReLUSAEConfig


@dataclass
class PolyMatryoshkaTrainingSAEConfig(
    PolyBatchTopKTrainingSAEConfig, MatryoshkaBatchTopKTrainingSAEConfig
):
    """Matryoshka-BatchTopK PolySAE (``"poly_matryoshka"``).

    Every level decodes through the polynomial decoder; saved as ``"poly_jumprelu"``.
    """

    @override
    @classmethod
    def architecture(cls) -> str:
        return "poly_matryoshka"


@dataclass
class PolyJumpReLUTrainingSAEConfig(
    PolyDecoderFields, _PolyTrainingDefaults, JumpReLUTrainingSAEConfig
):
    """JumpReLU PolySAE (``"poly_jumprelu"``); not covered by the paper."""

    @override
    @classmethod
    def architecture(cls) -> str:
        return "poly_jumprelu"


@dataclass
class PolyGatedTrainingSAEConfig(PolyDecoderFields, _PolyTrainingDefaults, GatedTrainingSAEConfig):
    """Gated PolySAE (``"poly_gated"``); not covered by the paper."""

    @override
    @classmethod
    def architecture(cls) -> str:
        return "poly_gated"


PolyConfig = (
    PolyTopKSAEConfig
    | PolyJumpReLUSAEConfig
    | PolyGatedSAEConfig
    | PolyTopKTrainingSAEConfig
    | PolyBatchTopKTrainingSAEConfig
    | PolyJumpReLUTrainingSAEConfig
    | PolyGatedTrainingSAEConfig
)
"""Any PolySAE config."""


def _field_default(cls: type, name: str) -> Any:
    """The dataclass default of field ``name`` of ``cls`` (None if it has none)."""
    for f in fields(cls):
        if f.name == name:
            return f.default
    return None
