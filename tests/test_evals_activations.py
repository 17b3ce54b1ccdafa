"""Streamed activation collection and mean-pooled SAE latents on a tiny model,
checked against a direct per-text computation."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens.util import get_special_token_ids

from polysae_lens.evals import collect_token_activations, pool_sae_latents

from .conftest import make_training_sae
from .lm_fixtures import BOS_TOKEN, TEXTS, make_tiny_model, make_tokenizer

HOOK = "blocks.0.hook_resid_post"
CONTEXT = 12


@pytest.fixture(scope="module")
def model() -> Any:
    return make_tiny_model()


@pytest.fixture(scope="module")
def sae() -> Any:
    return make_training_sae("poly").eval()


def collect(model: Any, texts: list[str], **kwargs: Any):
    kwargs = {"hook_name": HOOK, "context_size": CONTEXT, "progress": False, **kwargs}
    return collect_token_activations(model, texts, **kwargs)


@torch.no_grad()
def direct(model: Any, sae: Any, text: str, hook: str = HOOK) -> tuple[torch.Tensor, torch.Tensor]:
    """One text alone, no padding: (mean raw activation, mean SAE latents) over its
    non-special tokens."""
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"][: CONTEXT - 1]
    tokens = torch.tensor([[model.tokenizer.bos_token_id, *ids]])
    _, cache = model.run_with_cache(tokens, names_filter=[hook])
    acts = cache[hook][0]
    keep = ~torch.isin(tokens[0], torch.tensor(get_special_token_ids(model.tokenizer)))
    acts = acts[keep].reshape(int(keep.sum()), -1)
    latents = sae.encode(acts) if sae is not None else acts
    return acts.mean(0), latents.mean(0)


@torch.no_grad()
def test_pooled_latents_match_a_direct_computation(model: Any, sae: Any) -> None:
    texts = [*TEXTS[:9], "A much longer text that will certainly be cut at the context limit."]
    activations = collect(model, texts, batch_size=4)
    pooled_NF = pool_sae_latents(sae, activations, batch_size_tokens=20)
    assert pooled_NF.shape == (len(texts), sae.cfg.d_sae)
    for i, text in enumerate(texts):
        raw, latents = direct(model, sae, text)
        torch.testing.assert_close(activations.pooled_ND[i], raw, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pooled_NF[i], latents, rtol=1e-5, atol=1e-6)
    # BOS excluded and truncation to CONTEXT tokens (BOS included) respected
    lengths = (activations.offsets[1:] - activations.offsets[:-1]).tolist()
    assert lengths[-1] == CONTEXT - 1
    assert activations.n_tokens == sum(lengths) == activations.acts_TD.shape[0]


@torch.no_grad()
def test_batching_changes_nothing(model: Any, sae: Any) -> None:
    texts = TEXTS[:11]
    one = collect(model, texts, batch_size=1)
    many = collect(model, texts, batch_size=7)
    torch.testing.assert_close(many.acts_TD, one.acts_TD, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(many.offsets, one.offsets)
    by_text = pool_sae_latents(sae, one, batch_size_tokens=1)
    by_block = pool_sae_latents(sae, one, batch_size_tokens=10_000)
    torch.testing.assert_close(by_block, by_text)
    subset = torch.tensor([7, 2, 5])
    torch.testing.assert_close(
        pool_sae_latents(sae, one, text_index=subset, batch_size_tokens=15), by_text[subset]
    )


@torch.no_grad()
def test_encoding_is_streamed_in_bounded_batches(
    model: Any, sae: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    activations = collect(model, TEXTS[:20])
    sizes: list[int] = []
    encode = sae.encode

    def recording_encode(x: torch.Tensor) -> torch.Tensor:
        sizes.append(x.shape[0])
        return encode(x)

    monkeypatch.setattr(sae, "encode", recording_encode)
    pool_sae_latents(sae, activations, batch_size_tokens=24)
    assert sum(sizes) == activations.n_tokens
    assert len(sizes) > 5
    # whole texts only: a batch exceeds the budget by less than one text
    assert max(sizes) < 24 + CONTEXT


@torch.no_grad()
def test_memory_mapped_cache(model: Any, sae: Any, tmp_path: Path) -> None:
    texts = TEXTS[:6]
    in_ram = collect(model, texts)
    mapped = collect(model, texts, cache_dir=tmp_path / "cache")
    assert mapped.path is not None and mapped.path.parent == tmp_path / "cache"
    assert mapped.path.stat().st_size == in_ram.acts_TD.numel() * 4
    torch.testing.assert_close(mapped.acts_TD, in_ram.acts_TD)
    torch.testing.assert_close(pool_sae_latents(sae, mapped), pool_sae_latents(sae, in_ram))
    half = collect(model, texts, cache_dtype=torch.float16)
    assert half.acts_TD.dtype == torch.float16
    torch.testing.assert_close(half.pooled_ND, in_ram.pooled_ND)  # pooled from float32
    path = mapped.path
    del mapped
    gc.collect()
    assert not path.exists()


@torch.no_grad()
def test_per_head_hooks(model: Any) -> None:
    hook = "blocks.0.attn.hook_z"  # [batch, pos, n_heads=2, d_head=8]
    texts = TEXTS[:3]
    heads = collect(model, texts, hook_name=hook)
    assert heads.token_shape == (2, 8) and heads.acts_TD.shape[1] == 16
    one_head = collect(model, texts, hook_name=hook, hook_head_index=1)
    assert one_head.token_shape == (8,)
    torch.testing.assert_close(one_head.acts_TD, heads.acts_TD[:, 8:])
    raw, _ = direct(model, None, texts[0], hook=hook)
    torch.testing.assert_close(heads.pooled_ND[0], raw, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_left_padding_tokenizer_whose_pad_is_bos(model: Any) -> None:
    """TransformerLens infers a left-padding mask from such a tokenizer and would
    take the leading BOS (== PAD) for padding; the collection must not change."""
    tokenizer = make_tokenizer()
    tokenizer.pad_token = BOS_TOKEN
    other = make_tiny_model(tokenizer=tokenizer)
    other.tokenizer.padding_side = "left"
    assert other.tokenizer.pad_token_id == other.tokenizer.bos_token_id
    texts = TEXTS[:7]
    expected = collect(model, texts, batch_size=3)
    got = collect(other, texts, batch_size=3)
    torch.testing.assert_close(got.acts_TD, expected.acts_TD, rtol=1e-5, atol=1e-6)


def test_bad_input_is_named(model: Any) -> None:
    with pytest.raises(ValueError, match="empty dataset"):
        collect(model, [])
    with pytest.raises(ValueError, match="context_size=64 is larger than the model's context"):
        collect(model, TEXTS[:2], context_size=64)
    with pytest.raises(ValueError, match=r"text 1 .* has no non-special token"):
        collect(model, [TEXTS[0], BOS_TOKEN])
