"""Streamed collection of model activations for a list of texts, and mean-pooled
SAE latents computed from them.

The model is run once per text (in batches); only the activations of each text's
non-special tokens are kept, flat: :class:`TokenActivations` holds a [T, D] tensor
(T = all kept tokens) and offsets, in RAM or memory-mapped from a file. Pooling
the SAE latents then needs no model call: token batches are encoded and averaged
per text, so at most [sae_batch_size_tokens, d_sae] dense latents exist at once,
never [n_texts, seq_len, d_sae].

"Special" tokens are SAELens's (``sae_lens.util.get_special_token_ids``: BOS, EOS,
PAD, SEP), the same tokens ``exclude_special_tokens`` drops in training; with
``prepend_bos=None`` (SAEBench's tokenization) they are SAEBench's: every token
whose id is the tokenizer's BOS, EOS or PAD id.

Tokenization (``prepend_bos``): ``True`` puts the tokenizer's BOS first and adds
none of its own special tokens (SAELens's training tokenization); ``False`` adds
no special token; ``None`` uses the tokenizer's own call, ``tokenizer(text,
truncation=True, max_length=context_size)``, as SAEBench does. That call adds
whatever the tokenizer adds: GPT-2's adds no BOS under transformers 4.x (the
version the paper's SAEBench runs used), so there the first real token sits at
position 0 and is pooled; Pythia's adds a BOS, which is then excluded.

Shape suffixes: N texts, T kept tokens, B texts in a batch, S sequence positions,
D model dimension at the hook (d_in), F SAE latents.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sae_lens.util import extract_stop_at_layer_from_tlens_hook_name, get_special_token_ids
from torch import Tensor
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

__all__ = [
    "TokenActivations",
    "collect_token_activations",
    "excluded_token_ids",
    "pool_sae_latents",
    "tokenize_texts",
]

_CHARS_PER_TOKEN_BOUND = 64
"""Texts are cut to ``64 * context_size`` characters before tokenizing (a long code
file would otherwise be tokenized in full). Tokens are far shorter than 64
characters on average, so the first ``context_size`` tokens are unchanged."""


@dataclass
class TokenActivations:
    """Model activations of the non-special tokens of N texts, stored flat."""

    acts_TD: Tensor
    """[T, D] activations of every kept token, text after text (CPU; may be
    memory-mapped from a file)."""
    offsets: Tensor
    """[N + 1] int64: text i owns rows ``offsets[i]:offsets[i + 1]``."""
    pooled_ND: Tensor
    """[N, D] float32 mean of each text's activations (the model-reference inputs)."""
    token_shape: tuple[int, ...]
    """Shape of one token's activation at the hook, e.g. ``(D,)`` or
    ``(n_heads, d_head)`` for ``hook_z``; ``acts_TD`` rows are these, flattened."""
    path: Path | None = None
    """File backing ``acts_TD``, if memory-mapped."""

    @property
    def n_texts(self) -> int:
        return self.offsets.numel() - 1

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])


def tokenize_texts(
    tokenizer: Any, texts: Sequence[str], *, context_size: int, prepend_bos: bool | None
) -> list[list[int]]:
    """Token ids of each text, at most ``context_size`` in all.

    ``prepend_bos=True``: BOS, then the text's tokens; ``False``: the text's tokens
    only. In both the tokenizer's own special tokens are not added
    (``add_special_tokens=False``), so BOS appears exactly once whatever the
    tokenizer's defaults. ``None``: the tokenizer's own call with truncation
    (SAEBench's tokenization; see the module docstring).
    """
    if tokenizer is None:
        raise ValueError("the model has no tokenizer: activation collection needs one.")
    cut = [text[: _CHARS_PER_TOKEN_BOUND * context_size] for text in texts]
    if prepend_bos is None:
        own = tokenizer(cut, truncation=True, max_length=context_size)["input_ids"]
        return [list(ids) for ids in own]
    bos: list[int] = []
    if prepend_bos:
        if tokenizer.bos_token_id is None:
            raise ValueError(
                "prepend_bos=True but the tokenizer has no BOS token; set prepend_bos=False."
            )
        bos = [int(tokenizer.bos_token_id)]
    budget = context_size - len(bos)
    encoded = tokenizer(cut, add_special_tokens=False)["input_ids"]
    return [bos + list(ids[:budget]) for ids in encoded]


def excluded_token_ids(tokenizer: Any, *, saebench: bool) -> set[int]:
    """Token ids never pooled: SAEBench's (BOS, EOS, PAD ids) or SAELens's special
    tokens (BOS, EOS, PAD, SEP, decoder start)."""
    if not saebench:
        return set(get_special_token_ids(tokenizer))
    ids = (
        getattr(tokenizer, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id")
    )
    return {int(i) for i in ids if i is not None}


@torch.no_grad()
def collect_token_activations(
    model: Any,
    texts: Sequence[str],
    *,
    hook_name: str,
    context_size: int,
    prepend_bos: bool | None = True,
    hook_head_index: int | None = None,
    batch_size: int = 32,
    model_kwargs: dict[str, Any] | None = None,
    cache_dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    desc: str = "Collecting activations",
    on_batch: Callable[[], None] | None = None,
) -> TokenActivations:
    """Run ``model`` over ``texts`` and keep the activations of non-special tokens.

    Args:
        model: a TransformerLens ``HookedRootModule`` with a tokenizer (as used by
            SAELens: ``run_with_cache(tokens, names_filter, stop_at_layer, ...)``).
        texts: the texts, in the order of the returned rows.
        hook_name: hook point of the activations (the SAE's ``hook_name``).
        context_size: tokens per text, special tokens included; longer texts are
            truncated.
        prepend_bos: ``True``: prepend the tokenizer's BOS token; ``False``: no
            special token; ``None``: the tokenizer's own call decides (SAEBench's
            tokenization, pooling every token but BOS, EOS and PAD ids).
        hook_head_index: keep only this head of a per-head hook (as SAELens does).
        batch_size: texts per forward pass. Texts are batched by length, padded
            on the right; causal attention makes that exact for the kept tokens.
        model_kwargs: extra keyword arguments of ``run_with_cache``.
        cache_dtype: dtype of the stored activations (pooled ones are float32).
        cache_dir: store the activations in a memory-mapped file in this
            directory (deleted with the returned object) instead of RAM.
        progress: show a tqdm progress bar.
        on_batch: called after every forward pass (instrumentation).

    Raises:
        ValueError: no texts, a text with no non-special token, a context larger
            than the model's.
    """
    if not texts:
        raise ValueError("no texts to collect activations for (empty dataset).")
    tokenizer = getattr(model, "tokenizer", None)
    n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", None)
    if isinstance(n_ctx, int) and context_size > n_ctx:
        raise ValueError(
            f"context_size={context_size} is larger than the model's context n_ctx={n_ctx}; "
            f"use context_size <= {n_ctx}."
        )
    token_ids = tokenize_texts(tokenizer, texts, context_size=context_size, prepend_bos=prepend_bos)
    special = excluded_token_ids(tokenizer, saebench=prepend_bos is None)
    kept_N = torch.tensor([sum(t not in special for t in ids) for ids in token_ids])
    if bool((kept_N == 0).any()):
        i = int((kept_N == 0).nonzero()[0, 0])
        raise ValueError(
            f"text {i} ({texts[i][:60]!r}) has no non-special token to pool over: "
            "remove empty texts."
        )
    offsets = torch.zeros(len(texts) + 1, dtype=torch.int64)
    torch.cumsum(kept_N, 0, out=offsets[1:])
    n_tokens = int(offsets[-1])

    # Padding sits after each text's last token: causal attention keeps it from
    # affecting kept tokens, so any id works when the tokenizer has no PAD.
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = 0 if pad_id is None else int(pad_id)
    special_ids = torch.tensor(sorted(special), dtype=torch.long)
    device = _model_device(model)
    stop_at_layer = extract_stop_at_layer_from_tlens_hook_name(hook_name)
    left_padding_tokenizer = getattr(tokenizer, "padding_side", "right") == "left"
    # Longest first: similar lengths share a batch (little padding), and the
    # first batch shows early whether the largest one fits in memory.
    order = sorted(range(len(texts)), key=lambda i: -len(token_ids[i]))

    acts_TD: Tensor | None = None
    pooled_ND: Tensor | None = None
    token_shape: tuple[int, ...] = ()
    path: Path | None = None
    bar = tqdm(total=len(texts), desc=desc, unit="text", disable=not progress, leave=False)
    try:
        for b0 in range(0, len(order), batch_size):
            batch = order[b0 : b0 + batch_size]
            width = max(len(token_ids[i]) for i in batch)
            tokens_BS = torch.full((len(batch), width), pad_id, dtype=torch.long)
            for row, i in enumerate(batch):
                tokens_BS[row, : len(token_ids[i])] = torch.tensor(token_ids[i])
            real_BS = (
                torch.arange(width)[None, :]
                < torch.tensor([len(token_ids[i]) for i in batch])[:, None]
            )
            keep_BS = real_BS & ~torch.isin(tokens_BS, special_ids)

            kwargs = dict(model_kwargs or {})
            if left_padding_tokenizer:
                # TransformerLens would infer a left-padding mask, and with PAD == BOS
                # take the leading BOS for padding: give it the real (right) padding.
                kwargs["attention_mask"] = real_BS.to(device)
            _, cache = model.run_with_cache(
                tokens_BS.to(device),
                names_filter=[hook_name],
                stop_at_layer=stop_at_layer,
                prepend_bos=False,
                **kwargs,
            )
            if on_batch is not None:
                on_batch()
            hook_acts = cache[hook_name]
            if hook_head_index is not None:
                hook_acts = hook_acts[:, :, hook_head_index]
            if acts_TD is None:
                token_shape = tuple(hook_acts.shape[2:])
                d_flat = math.prod(token_shape)
                acts_TD, path = _allocate(n_tokens, d_flat, cache_dtype, cache_dir)
                pooled_ND = torch.zeros(len(texts), d_flat, dtype=torch.float32)
            assert pooled_ND is not None
            kept_KD = hook_acts.reshape(len(batch), width, -1)[keep_BS.to(hook_acts.device)]
            kept_KD = kept_KD.float().cpu()
            # Rows of kept_KD are text after text (row-major mask order); send each
            # text's rows to its slot in the flat store.
            batch_idx = torch.tensor(batch)
            lengths = kept_N[batch_idx]
            starts = offsets[batch_idx]
            segment = torch.repeat_interleave(torch.arange(len(batch)), lengths)
            within = torch.arange(kept_KD.shape[0]) - (torch.cumsum(lengths, 0) - lengths)[segment]
            acts_TD.index_copy_(0, starts[segment] + within, kept_KD.to(cache_dtype))
            sums_BD = torch.zeros(len(batch), kept_KD.shape[1]).index_add_(0, segment, kept_KD)
            pooled_ND[batch_idx] = sums_BD / lengths[:, None]
            bar.update(len(batch))
    finally:
        bar.close()
    assert acts_TD is not None and pooled_ND is not None
    if not bool(torch.isfinite(pooled_ND).all()):
        raise ValueError(
            f"the model's activations at {hook_name!r} contain NaN or inf; check the model "
            "and its dtype."
        )
    result = TokenActivations(
        acts_TD=acts_TD, offsets=offsets, pooled_ND=pooled_ND, token_shape=token_shape, path=path
    )
    if path is not None:
        weakref.finalize(result, _remove, path)
    return result


@torch.no_grad()
def pool_sae_latents(
    sae: Any,
    activations: TokenActivations,
    *,
    activation_scaler: Callable[[Tensor], Tensor] | None = None,
    batch_size_tokens: int = 4096,
    text_index: Tensor | None = None,
    device: torch.device | str = "cpu",
    latent_major: bool = False,
    progress: bool = False,
) -> Tensor:
    """Mean over each text's tokens of the SAE latents: [N, F] float32.

    Args:
        sae: any SAELens SAE (its ``encode`` is used, in its current mode).
        activations: from :func:`collect_token_activations`.
        activation_scaler: applied to the activations before encoding (SAETrainer's
            ``ActivationScaler`` during training; ``None`` for a saved SAE, whose
            normalisation is folded in).
        batch_size_tokens: tokens encoded at once (a text is never split, so a
            batch can exceed it by up to one text).
        text_index: only these texts, in this order (default: all).
        device: where the result is stored.
        latent_major: return [F, N] (contiguous) instead: the layout the
            Wasserstein computation reads without a transposed copy.
        progress: show a tqdm progress bar.
    """
    offsets = activations.offsets
    texts = torch.arange(activations.n_texts) if text_index is None else text_index.cpu()
    sae_device = sae.device if hasattr(sae, "device") else torch.device("cpu")
    dtype = getattr(sae, "dtype", torch.float32)
    reshape = bool(getattr(sae, "hook_z_reshaping_mode", False))
    pooled: Tensor | None = None
    lengths_N = (offsets[1:] - offsets[:-1])[texts]
    ends_N = torch.cumsum(lengths_N, 0)  # token count up to and including each text
    bar = tqdm(total=len(texts), desc="Encoding", unit="text", disable=not progress, leave=False)
    try:
        start = 0
        while start < len(texts):
            # As many whole texts as fit in the token budget (at least one).
            before = int(ends_N[start - 1]) if start else 0
            stop = int(torch.searchsorted(ends_N, before + batch_size_tokens, right=True))
            stop = max(stop, start + 1)
            n = stop - start
            lengths = lengths_N[start:stop]
            if text_index is None:
                # Consecutive texts own one consecutive block of rows.
                x_TD = activations.acts_TD[int(offsets[start]) : int(offsets[stop])]
            else:
                segment_T = torch.repeat_interleave(torch.arange(n), lengths)
                first_row = offsets[texts[start:stop]] - (ends_N[start:stop] - lengths - before)
                rows = first_row[segment_T] + torch.arange(int(lengths.sum()))
                x_TD = activations.acts_TD.index_select(0, rows)
            x_TD = x_TD.to(device=sae_device, dtype=dtype)
            if activation_scaler is not None:
                x_TD = activation_scaler(x_TD)
            if reshape:
                x_TD = x_TD.reshape(-1, *activations.token_shape)
            z_TF = sae.encode(x_TD).float()
            segment = torch.repeat_interleave(
                torch.arange(n, device=z_TF.device), lengths.to(z_TF.device)
            )
            sums_nF = torch.zeros(n, z_TF.shape[-1], device=z_TF.device).index_add_(
                0, segment, z_TF
            )
            means_nF = (sums_nF / lengths[:, None].to(z_TF.device)).to(device)
            if pooled is None:
                shape = (
                    (z_TF.shape[-1], len(texts)) if latent_major else (len(texts), z_TF.shape[-1])
                )
                pooled = torch.empty(shape, dtype=torch.float32, device=device)
            if latent_major:
                pooled[:, start:stop] = means_nF.T
            else:
                pooled[start:stop] = means_nF
            start = stop
            bar.update(n)
    finally:
        bar.close()
    assert pooled is not None
    return pooled


def _allocate(
    n_tokens: int, d_flat: int, dtype: torch.dtype, cache_dir: str | os.PathLike[str] | None
) -> tuple[Tensor, Path | None]:
    n_bytes = n_tokens * d_flat * torch.tensor([], dtype=dtype).element_size()
    logger.info(
        "caching %d tokens x %d dims of activations (%.2f GB, %s) %s",
        n_tokens,
        d_flat,
        n_bytes / 1e9,
        str(dtype).removeprefix("torch."),
        f"in {cache_dir}" if cache_dir is not None else "in RAM",
    )
    if cache_dir is None:
        ram = _physical_memory()
        if ram is not None and n_bytes > ram / 4:
            logger.warning(
                "the activation cache needs %.1f GB of RAM (%.0f%% of this machine's): set "
                "cache_dir (memory-mapped file), cache_dtype='bfloat16' or fewer texts.",
                n_bytes / 1e9,
                100 * n_bytes / ram,
            )
        return torch.empty(n_tokens, d_flat, dtype=dtype), None
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="polysae-acts-", suffix=".bin", dir=cache_dir)
    os.close(fd)
    # shared=True writes through to the file: pages leave RAM under pressure.
    mapped = torch.from_file(name, shared=True, size=n_tokens * d_flat, dtype=dtype)
    return mapped.view(n_tokens, d_flat), Path(name)


def _physical_memory() -> int | None:
    """Bytes of RAM (POSIX), or None where unknown."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _model_device(model: Any) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")
