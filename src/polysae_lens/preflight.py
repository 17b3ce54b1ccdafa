"""Checks that run before the expensive part of a command.

A mistake found after the model is loaded or after hours of training costs a
user those hours, so the commands check what they can first: paths and
settings before anything is loaded (:func:`check_paths`), and the loaded model
against the configuration before training starts (:func:`check_model`). Each
failure is a :class:`PreflightError` whose message names the bad value and the
fix; the command line prints it as one line. One check can only run during
training: a batch of NaN or infinite activations (:func:`check_finite_input`,
called by every PolySAE's training step).
"""

from __future__ import annotations

import importlib.util
import logging
import netrc
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sae_lens.config import LanguageModelSAERunnerConfig
    from transformer_lens.hook_points import HookedRootModule

logger = logging.getLogger(__name__)


class PreflightError(ValueError):
    """Input that cannot work; the message names the problem and the fix."""


class NonFiniteInputError(ValueError):
    """A training batch holds NaN or infinite activations."""


def check_finite_input(sae_in: Any) -> None:
    """Raise :class:`NonFiniteInputError` if the activation batch ``sae_in`` holds
    NaN or inf. Without it, NaN input surfaces one step later as a failed
    retraction of U and then a NaN SAE."""
    import torch

    # One sum and a sync per step (the retraction syncs every step anyway). The
    # sum is finite only if every value is: inf and NaN carry through IEEE
    # addition in any order. isfinite's own passes (about 15 times the sum's
    # time on the CPU) run only where the sum is not finite, which finite
    # values can also give by overflowing.
    if bool(torch.isfinite(sae_in.sum())) or bool(torch.isfinite(sae_in).all()):
        return
    n_nan = int(torch.isnan(sae_in).sum())
    n_inf = int(torch.isinf(sae_in).sum())
    raise NonFiniteInputError(
        f"a training batch of input activations contains NaN or inf ({n_nan} NaN and "
        f"{n_inf} inf of {sae_in.numel()} values), so the SAE cannot train on it: check "
        "the model's dtype (float16 overflows; try --dtype float32 or bfloat16), the "
        "hook and the dataset."
    )


def check_model(cfg: LanguageModelSAERunnerConfig[Any], model: HookedRootModule) -> None:
    """The loaded model has ``cfg.hook_name``, takes ``cfg.context_size`` tokens and
    its hook is ``cfg.sae.d_in`` wide. One forward pass over a few tokens."""
    import torch

    hook = cfg.hook_name
    hooks = list(getattr(model, "hook_dict", {}))
    if hook not in hooks:
        near = [h for h in hooks if h.rsplit(".", 1)[-1] == hook.rsplit(".", 1)[-1]][:3]
        examples = near or hooks[:3]
        raise PreflightError(
            f"--hook_name {hook!r} is not a hook of model {cfg.model_name!r}: use one of its "
            f"{len(hooks)} hook names, e.g. {', '.join(examples)}."
        )
    n_ctx = model_context_length(model)
    if n_ctx is not None and cfg.context_size > n_ctx:
        raise PreflightError(
            f"--context_size {cfg.context_size} is longer than model {cfg.model_name!r}'s "
            f"context of {n_ctx} tokens: pass --context_size {n_ctx} or less."
        )
    parameter = next(iter(model.parameters()), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    tokens = torch.zeros((1, min(4, n_ctx or 4)), dtype=torch.long, device=device)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[hook])
    acts = cache[hook]
    # The activation store flattens heads unless one head is selected.
    width = acts.shape[-1] if cfg.hook_head_index is not None else acts[0, 0].numel()
    if width != cfg.sae.d_in:
        raise PreflightError(
            f"--d_in {cfg.sae.d_in} does not match the width of {hook!r} in model "
            f"{cfg.model_name!r}, which is {width}: pass --d_in {width}."
        )


def model_context_length(model: Any) -> int | None:
    """The longest input ``model`` takes, if it says (TransformerLens ``cfg.n_ctx``
    or a HuggingFace config's ``max_position_embeddings`` / ``n_positions``)."""
    n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", None)
    if isinstance(n_ctx, int):
        return n_ctx
    hf_config = getattr(getattr(model, "model", None), "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(hf_config, name, None)
        if isinstance(value, int):
            return value
    return None


def check_threads(threads: int | None, default: str) -> None:
    """``--threads`` is a positive count; ``default`` says what leaving it out gives."""
    if threads is not None and threads < 1:
        raise PreflightError(
            f"--threads {threads} is not allowed: pass a number of CPU threads >= 1, or "
            f"leave it out for {default}."
        )


def check_output_dir(path: str | None, flag: str, *, must_be_empty: bool) -> None:
    """``path`` can become an output directory: not a file, writable, and (with
    ``must_be_empty``) empty unless the user passed ``--overwrite``."""
    if path is None:
        return
    target = Path(path)
    if target.is_file():
        raise PreflightError(f"{flag} {path} is a file: pass a directory (it is created).")
    if must_be_empty and target.is_dir() and any(target.iterdir()):
        raise PreflightError(
            f"{flag} {path} is not empty: pass another directory, or --overwrite to "
            "replace what it holds."
        )
    _check_writable(target, flag)


def check_output_file(path: str | None, flag: str) -> None:
    """``path`` can be written as a file: not a directory, its folder writable."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise PreflightError(
            f"{flag} {path} is a directory: pass a file name, e.g. {target / 'results.json'}."
        )
    _check_writable(target.parent, flag)


def _check_writable(target: Path, flag: str) -> None:
    existing = next((p for p in (target, *target.parents) if p.exists()), None)
    if existing is not None and not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
        raise PreflightError(
            f"{flag} {target}: {existing} is not a writable directory; pass a path you can write."
        )


def check_wandb(log_to_wandb: bool) -> None:
    """Logging to wandb needs credentials (or an offline/disabled mode); find out
    now rather than after the model is loaded."""
    if not log_to_wandb:
        return
    if importlib.util.find_spec("wandb") is None:
        raise PreflightError(
            "--log_to_wandb True needs wandb: pip install wandb, or pass --log_to_wandb False."
        )
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return
    if os.environ.get("WANDB_API_KEY"):
        return
    try:
        hosts = netrc.netrc().hosts
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        hosts = {}
    if any("wandb" in host for host in hosts):
        return
    raise PreflightError(
        "--log_to_wandb True but no wandb credentials were found: run `wandb login` (or set "
        "WANDB_API_KEY), set WANDB_MODE=offline to log to ./wandb and sync later, or pass "
        "--log_to_wandb False."
    )
