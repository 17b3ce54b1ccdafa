"""The paper's four training settings and the sparsifiers it compares.

Values come from the reference notes of this repository
(``polysae-paper-summary.md`` and ``method-notes.md``: "Paper training setting"
and "Ranks used in the paper"). Where the notes leave a choice open, the field's
docstring says it is ours. Nothing here imports torch or SAELens: ``reproduce
--help`` and bad-flag errors stay instant.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

__all__ = [
    "PAPER_SETTINGS",
    "SPARSIFIERS",
    "Setting",
    "Sparsifier",
    "load_setting_file",
    "paper_setting",
]


class SettingError(ValueError):
    """A setting name or setting file that cannot be used; the message names the fix."""


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SettingError(f"{name}={value!r} must be a positive integer.")


@dataclass(frozen=True)
class Setting:
    """One model / layer / data setting of the paper's Table 1 (or a custom one)."""

    name: str
    """Key used on the command line (``--model NAME``) and in the table."""
    model_name: str
    """Model to load (SAELens ``load_model``: a TransformerLens name or a
    HuggingFace id / local directory with ``model_class_name``)."""
    hook_name: str
    """Hook the SAEs read and write (the paper: resid_post of one layer)."""
    d_in: int
    """Width of the hook's activations (the model's d_model)."""
    training_tokens: int
    """Tokens each SAE trains on (paper: 300M for GPT-2, 500M for the others)."""
    dataset_path: str
    """Training text (hub id or local path). GPT-2: OpenWebText pre-tokenized for
    GPT-2 (as in ``examples/train_gpt2_paper.py``). The notes say "pile /
    openwebtext" for the larger models without pairing them: the Pile for the
    Pythia models (trained on it) and OpenWebText for Gemma is our choice."""
    is_dataset_tokenized: bool = False
    """Whether ``dataset_path`` holds token ids already."""
    interaction_rank: int = 64
    """R2 = R3 (paper: 64 for GPT-2 small, 128 for the larger models); R1 = d_in."""
    d_sae: int = 16384
    """Dictionary width (paper: 16384)."""
    k: int = 64
    """Active latents per token (paper: 64)."""
    context_size: int = 128
    """Tokens per training sequence (paper: 128)."""
    batch_size_tokens: int = 4096
    """Tokens per optimizer step (paper: 4096)."""
    lr: float = 3e-4
    """Adam learning rate, constant (paper: 3e-4)."""
    model_class_name: str = "HookedTransformer"
    """SAELens model class: ``HookedTransformer`` or ``AutoModelForCausalLM``."""
    prepend_bos: bool = True
    """Prepend BOS to each training sequence (SAELens's default)."""
    store_batch_size_prompts: int = 32
    """Sequences per model forward pass while generating activations."""
    n_batches_in_buffer: int = 256
    """SAELens's activation buffer in sequences per prompt batch; it must hold at
    least one training batch (256 x 128 tokens: 8 batches of 4096)."""
    model_params: int | None = None
    """The model's parameter count, for the memory / disk estimate only."""
    model_dtype: str = "float32"
    """dtype the model runs in (the paper's runs: float32)."""

    def __post_init__(self) -> None:
        for name in ("d_in", "training_tokens", "interaction_rank", "d_sae", "k"):
            _positive_int(f"{self.name}.{name}", getattr(self, name))
        for name in ("context_size", "batch_size_tokens"):
            _positive_int(f"{self.name}.{name}", getattr(self, name))
        for name in ("store_batch_size_prompts", "n_batches_in_buffer"):
            _positive_int(f"{self.name}.{name}", getattr(self, name))
        if self.k > self.d_sae:
            raise SettingError(
                f"setting {self.name!r}: k={self.k} is larger than d_sae={self.d_sae}."
            )
        if self.interaction_rank > self.d_in:
            raise SettingError(
                f"setting {self.name!r}: interaction_rank={self.interaction_rank} must be <= "
                f"d_in={self.d_in} (R2, R3 <= R1 = d_in)."
            )

    @property
    def ranks(self) -> tuple[int, int, int]:
        """(R1, R2, R3) = (d_in, interaction_rank, interaction_rank)."""
        return (self.d_in, self.interaction_rank, self.interaction_rank)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Sparsifier:
    """A sparsifier and the SAELens architectures of its PolySAE and linear SAE."""

    name: str
    """``--sparsifier`` value."""
    poly_architecture: str
    """The PolySAE's registered training architecture."""
    linear_architecture: str
    """The linear counterpart's (SAELens's own) training architecture."""


SPARSIFIERS: dict[str, Sparsifier] = {
    s.name: s
    for s in (
        Sparsifier("topk", "poly", "topk"),
        Sparsifier("batchtopk", "poly_batchtopk", "batchtopk"),
        Sparsifier("matryoshka", "poly_matryoshka", "matryoshka_batchtopk"),
    )
}
"""The paper's three sparsifiers (TopK, BatchTopK, Matryoshka-BatchTopK)."""


PAPER_SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        Setting(
            name="gpt2",
            model_name="gpt2",
            hook_name="blocks.8.hook_resid_post",
            d_in=768,
            training_tokens=300_000_000,
            dataset_path="apollo-research/Skylion007-openwebtext-tokenizer-gpt2",
            is_dataset_tokenized=True,
            interaction_rank=64,
            model_params=124_439_808,
        ),
        Setting(
            name="pythia-410m",
            model_name="pythia-410m",
            hook_name="blocks.15.hook_resid_post",
            d_in=1024,
            training_tokens=500_000_000,
            dataset_path="monology/pile-uncopyrighted",
            interaction_rank=128,
            model_params=405_334_016,
        ),
        Setting(
            name="pythia-1.4b",
            model_name="pythia-1.4b",
            hook_name="blocks.12.hook_resid_post",
            d_in=2048,
            training_tokens=500_000_000,
            dataset_path="monology/pile-uncopyrighted",
            interaction_rank=128,
            model_params=1_414_647_808,
        ),
        Setting(
            name="gemma-2-2b",
            model_name="gemma-2-2b",
            hook_name="blocks.12.hook_resid_post",
            d_in=2304,
            training_tokens=500_000_000,
            dataset_path="Skylion007/openwebtext",
            interaction_rank=128,
            model_params=2_614_341_888,
        ),
    )
}
"""The paper's settings by ``--model`` name (GPT-2 small L8, Pythia-410M L15,
Pythia-1.4B L12, Gemma-2-2B L12; width 16384, k 64, batch 4096, context 128)."""


def paper_setting(name: str) -> Setting:
    """The paper setting called ``name``; raises :class:`SettingError` naming the
    allowed names otherwise."""
    try:
        return PAPER_SETTINGS[name]
    except KeyError:
        raise SettingError(
            f"--model {name!r} is not one of the paper's settings: use one of "
            f"{', '.join(PAPER_SETTINGS)}, or describe another model in a JSON file and pass "
            "--setting-file FILE (fields: see polysae_lens.reproduce.settings.Setting)."
        ) from None


def sparsifier(name: str) -> Sparsifier:
    try:
        return SPARSIFIERS[name]
    except KeyError:
        raise SettingError(
            f"--sparsifier {name!r} is not allowed: use one of {', '.join(SPARSIFIERS)}."
        ) from None


def load_setting_file(path: str | Path) -> Setting:
    """A custom :class:`Setting` from a JSON object with its field names."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SettingError(f"--setting-file {str(path)!r} does not exist.") from None
    except json.JSONDecodeError as e:
        raise SettingError(f"--setting-file {str(path)!r} is not valid JSON: {e}.") from None
    if not isinstance(data, dict):
        raise SettingError(
            f"--setting-file {str(path)!r} must hold a JSON object of Setting fields."
        )
    known = {f.name for f in fields(Setting)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SettingError(
            f"--setting-file {str(path)!r}: unknown field(s) {unknown}; allowed: {sorted(known)}."
        )
    required = [f.name for f in fields(Setting) if f.default is MISSING]
    missing = [name for name in required if name not in data]
    if missing:
        raise SettingError(f"--setting-file {str(path)!r}: missing field(s) {missing}.")
    try:
        return Setting(**data)
    except TypeError as e:
        raise SettingError(f"--setting-file {str(path)!r}: {e}.") from None
