"""The help of ``polysae-lens train``.

``--help`` is written here without importing SAELens, TransformerLens or torch
(loading them takes several seconds): the plugin's description, the PolySAE
fields (read from :mod:`polysae_lens.config`'s source, so they never go stale)
and the SAELens flags a first run needs. ``--help-all`` is SAELens's own
generated help of every flag, corrected where it is wrong for PolySAEs
(:func:`corrected_sae_lens_help`).
"""

from __future__ import annotations

import ast
import contextlib
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PROG = "polysae-lens train"
DEFAULT_ARCHITECTURE = "poly"
POLY_ARCHITECTURES = ("poly", "poly_batchtopk", "poly_matryoshka", "poly_jumprelu", "poly_gated")
"""``polysae_lens.sae.ARCHITECTURES``, spelt out so that help needs no import
(a test keeps the two equal)."""

# The config classes whose fields are the PolySAE flags, in help order.
_POLY_FIELD_CLASSES = ("PolyDecoderFields", "_PolyTrainingDefaults")

DESCRIPTION = (
    "Train a PolySAE (or any SAELens architecture) on a language model's activations "
    "with SAELens's LanguageModelSAETrainingRunner. Takes every flag of SAELens's "
    "training CLI plus the PolySAE fields below. --architecture defaults to "
    f"{DEFAULT_ARCHITECTURE!r} (TopK PolySAE); PolySAE architectures: "
    f"{', '.join(POLY_ARCHITECTURES)}; SAELens's own (topk, batchtopk, jumprelu, ...) "
    "train linear baselines with the same flags. rescale_acts_by_decoder_norm must stay "
    "False for PolySAEs."
)

# (flags, help) of the SAELens flags a first run needs; `--help-all` has the rest.
SAE_LENS_FLAGS: dict[str, list[tuple[str, str]]] = {
    "model and data": [
        ("--model_name NAME", "TransformerLens model name, or a local HF model directory"),
        (
            "--model_class_name CLASS",
            "HookedTransformer (default) or AutoModelForCausalLM (any HF causal LM)",
        ),
        ("--hook_name HOOK", "hook point to train on, e.g. blocks.8.hook_resid_post"),
        ("--dataset_path PATH", "HF hub dataset id or a local dataset directory"),
        ("--is_dataset_tokenized BOOL", "False for a text dataset"),
        ("--streaming BOOL", "stream the dataset"),
        ("--context_size N", "tokens per sequence (at most the model's n_ctx)"),
    ],
    "SAE": [
        ("--architecture, --sae ARCH", f"default {DEFAULT_ARCHITECTURE!r}"),
        ("--d_in N", "width of the hook's activations (must match the model)"),
        ("--d_sae N", "number of latents"),
        ("-k, --k N", "active latents per token (TopK family)"),
    ],
    "training": [
        ("--training_tokens N", "tokens to train on"),
        ("--train_batch_size_tokens N", "tokens per optimizer step"),
        ("--lr LR", "Adam learning rate"),
        ("--seed N", "seeds torch before the SAE is built (unlike SAELens's CLI)"),
        ("--device DEVICE", "cpu, cuda, ..."),
        ("--dtype DTYPE", "float32, bfloat16, ..."),
    ],
    "output": [
        ("--output_path DIR", "where the trained inference SAE is saved (must be empty)"),
        ("--checkpoint_path DIR", "where checkpoints go"),
        ("--n_checkpoints N", "checkpoints during training"),
        ("--resume_from_checkpoint DIR", "continue a run from a checkpoint directory"),
    ],
    "logging": [
        ("--log_to_wandb BOOL", "log to Weights & Biases (needs `wandb login`)"),
        ("--wandb_project NAME", "wandb project"),
    ],
}


def quick_help() -> str:
    """``train --help``: built from text and :mod:`polysae_lens.config`'s source only."""
    lines = [
        f"usage: {PROG} [--architecture ARCH] [--FLAG VALUE ...]",
        "",
        textwrap.fill(DESCRIPTION, width=80),
        "",
        f"PolySAE fields (defaults in brackets; from {_config_path().name}):",
    ]
    for flag, default, text in poly_fields():
        lines.extend(_option(f"--{flag} [{default}]", text))
    lines += ["", "Plugin flags:"]
    lines.extend(_option("--overwrite", "allow a non-empty --output_path (else an error)"))
    lines.extend(
        _option(
            "--shard_latents S",
            "under torchrun: split the TopK PolySAE's latents over S ranks "
            "(N ranks = N/S data-parallel copies x S shards)",
        )
    )
    for group, flags in SAE_LENS_FLAGS.items():
        lines += ["", f"SAELens flags, {group}:"]
        for flag, text in flags:
            lines.extend(_option(flag, text))
    lines += [
        "",
        f"'{PROG} --help-all' (or '--architecture ARCH --help-all') lists every flag of",
        "SAELens's training CLI for that architecture, with its default (it loads SAELens).",
    ]
    return "\n".join(lines) + "\n"


def poly_fields() -> list[tuple[str, str, str]]:
    """(name, default, one-line help) of every PolySAE config field, read from the
    ``Args:`` sections and field defaults in :mod:`polysae_lens.config`'s source."""
    tree = ast.parse(_config_path().read_text(encoding="utf-8"))
    fields = []
    for node in tree.body:
        if not (isinstance(node, ast.ClassDef) and node.name in _POLY_FIELD_CLASSES):
            continue
        docs = _args_section(ast.get_docstring(node) or "")
        for item in node.body:
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                name = item.target.id
                default = ast.unparse(item.value) if item.value is not None else ""
                fields.append((name, default, docs.get(name, "")))
    return fields


def _args_section(docstring: str) -> dict[str, str]:
    """``name: text`` entries of a Google-style ``Args:`` section (continuations joined)."""
    entries: dict[str, str] = {}
    in_args, current = False, None
    for line in docstring.splitlines():
        if line.strip() == "Args:":
            in_args = True
        elif in_args and line.startswith("    ") and not line.startswith("        "):
            name, _, text = line.strip().partition(":")
            current = name
            entries[current] = text.strip()
        elif in_args and current and line.startswith("        "):
            entries[current] += " " + line.strip()
        elif in_args and line.strip():
            in_args = False
    return entries


def _option(flag: str, text: str) -> list[str]:
    if len(flag) > 28:
        return [
            f"  {flag}",
            *textwrap.wrap(text, 80, initial_indent=" " * 32, subsequent_indent=" " * 32),
        ]
    wrapped = textwrap.wrap(text, 80 - 32) or [""]
    return [f"  {flag:<30}{wrapped[0]}", *(" " * 32 + w for w in wrapped[1:])]


def _config_path() -> Path:
    return Path(__file__).with_name("config.py")


# ---- --help-all -----------------------------------------------------------------

_RESCALE_HELP = (
    "Rank TopK latents by decoder-norm-scaled activations. Must be False for PolySAEs "
    "(rejected if True): their first-order decoder rows share parameters."
)


@contextlib.contextmanager
def corrected_sae_lens_help(architecture: str) -> Iterator[None]:
    """While active, SAELens's generated help (simple_parsing) starts with the
    plugin's description, names the architecture actually used as the default
    (SAELens's parser says 'standard') and does not recommend
    ``rescale_acts_by_decoder_norm`` for PolySAEs."""
    import simple_parsing

    original = simple_parsing.ArgumentParser.format_help

    def format_help(self: Any) -> str:
        self.description = textwrap.fill(DESCRIPTION, width=80)
        for group in self._action_groups:
            if group.title and group.title.startswith("CommandLineRunnerConfig"):
                group.description = None  # a one-line repr of every default
        for action in self._actions:
            if "--architecture" in action.option_strings:
                action.default = architecture
            if (
                "--rescale_acts_by_decoder_norm" in action.option_strings
                and architecture in POLY_ARCHITECTURES
            ):
                action.help = _RESCALE_HELP
        return original(self)

    simple_parsing.ArgumentParser.format_help = format_help  # type: ignore[method-assign]
    try:
        yield
    finally:
        simple_parsing.ArgumentParser.format_help = original  # type: ignore[method-assign]
