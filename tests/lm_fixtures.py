"""Offline language-model helpers for tests: a tokenizer and a tiny transformer.

Nothing here touches the network. The tokenizer is a byte-level BPE trained on
:data:`TEXTS` with the ``tokenizers`` library and wrapped in
``PreTrainedTokenizerFast``; it sets ``name_or_path`` and ``add_bos_token=True``
because TransformerLens's ``set_tokenizer`` otherwise reloads the tokenizer with
``AutoTokenizer.from_pretrained(name_or_path, add_bos_token=True)``, which would
try to download it.

Typical use::

    model = make_tiny_sae_transformer()
    tokens = model.to_tokens(TEXTS[:4])  # [4, seq], BOS first
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import datasets
import pytest
import torch
from sae_lens import (
    HookedSAETransformer,
    LanguageModelSAERunnerConfig,
    LanguageModelSAETrainingRunner,
    LoggingConfig,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import PreTrainedTokenizerFast

from polysae_lens import PolyTopKTrainingSAEConfig

from .conftest import D_SAE

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
UNK_TOKEN = "<|unk|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, UNK_TOKEN)
"""The special tokens, in id order: BOS is id 0, EOS 1, PAD 2, UNK 3."""

TOKENIZER_NAME = "polysae-lens-offline-tiny-bpe"
"""``name_or_path`` of :func:`make_tokenizer`'s tokenizer (not a hub id)."""

BPE_VOCAB_SIZE = 384
"""Upper bound on the BPE vocabulary (256 bytes + 4 special tokens + merges)."""

N_CTX = 32
"""Context length of :func:`make_tiny_model` (longer inputs are truncated)."""

TEXTS: list[str] = [
    "The cat sat quietly on the warm mat.",
    "A small dog ran across the green park.",
    "Rain fell on the roof all night long.",
    "She poured hot tea into a blue cup.",
    "The old bridge creaked under the heavy cart.",
    "Children laughed while they played in the snow.",
    "He read the letter twice before answering.",
    "The river winds slowly through the valley.",
    "Bright stars filled the clear winter sky.",
    "My neighbour grows tomatoes in her garden.",
    "The train left the station five minutes late.",
    "A gentle breeze moved the tall grass.",
    "We painted the fence white last summer.",
    "The baker sells fresh bread every morning.",
    "Birds sang loudly in the early spring light.",
    "The library closes at eight on Fridays.",
    "He fixed the broken chair with some glue.",
    "The soup smelled of garlic and fresh herbs.",
    "A red kite floated high above the beach.",
    "They walked home together after the concert.",
    "The teacher wrote a long sum on the board.",
    "Leaves turn orange and gold in the autumn.",
    "The ship sailed north towards the icy sea.",
    "She found an old coin in the sand.",
    "The clock in the hall stopped at noon.",
    "Fresh snow covered the quiet mountain road.",
    "He plays the piano every evening after dinner.",
    "The market was busy on Saturday morning.",
    "A black cat slept beside the fireplace.",
    "The farmer counted his sheep before sunset.",
    "We shared a large pizza with our friends.",
    "The museum shows paintings from many countries.",
    "A bee landed softly on the yellow flower.",
    "The children built a castle of sand.",
    "Thunder rolled across the dark hills.",
    "She planted a small apple tree near the wall.",
    "The lamp cast long shadows on the floor.",
    "Our bus was crowded with tired travellers.",
    "The fox crept silently through the forest.",
    "He wrote his name at the top of the page.",
]
"""A small corpus of short English sentences (40), used to train the tokenizer
and as the text dataset of activation-store tests."""


def make_tokenizer(vocab_size: int = BPE_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A fresh byte-level BPE tokenizer trained on :data:`TEXTS`, built offline.

    Byte-level, so any text encodes without unknown tokens and decodes back
    exactly. ``add_bos_token=True`` makes ``encode`` prepend BOS, so
    TransformerLens uses it as is instead of reloading it by name.
    """
    backend = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TEXTS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        add_bos_token=True,
        name_or_path=TOKENIZER_NAME,
        model_max_length=N_CTX,
        padding_side="right",
    )


def tiny_model_config(
    d_model: int = 16,
    d_vocab: int | None = None,
    n_layers: int = 2,
    n_heads: int = 2,
    n_ctx: int = N_CTX,
) -> HookedTransformerConfig:
    """The config of :func:`make_tiny_model` (``d_vocab`` defaults to the tokenizer's).

    ``seed`` is left unset on purpose: HookedTransformerConfig would reseed the
    global torch, numpy and ``random`` generators; :func:`make_tiny_model`
    seeds a forked generator instead.
    """
    if d_model % n_heads:
        raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}.")
    if d_vocab is None:
        d_vocab = len(make_tokenizer())
    return HookedTransformerConfig(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        d_head=d_model // n_heads,
        d_mlp=4 * d_model,
        d_vocab=d_vocab,
        n_ctx=n_ctx,
        act_fn="gelu",
        normalization_type="LN",
        device="cpu",
        dtype=torch.float32,
    )


def _build(
    cls: type[HookedTransformer],
    d_model: int,
    tokenizer: PreTrainedTokenizerFast | None,
    seed: int,
) -> HookedTransformer:
    tokenizer = make_tokenizer() if tokenizer is None else tokenizer
    cfg = tiny_model_config(d_model=d_model, d_vocab=len(tokenizer))
    # Initialise from a fixed seed without moving the caller's global RNG state.
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="HookedTransformer is deprecated")
        torch.manual_seed(seed)
        model = cls(cfg, tokenizer=tokenizer)
    model.eval()
    return model


def make_tiny_model(
    d_model: int = 16,
    tokenizer: PreTrainedTokenizerFast | None = None,
    seed: int = 0,
) -> HookedTransformer:
    """A randomly initialised 2-layer, 2-head ``HookedTransformer`` with a tokenizer.

    The same ``seed`` gives the same weights, and the same weights as
    :func:`make_tiny_sae_transformer`. The model is in eval mode on CPU.
    """
    return _build(HookedTransformer, d_model, tokenizer, seed)


def make_tiny_sae_transformer(
    d_model: int = 16,
    tokenizer: PreTrainedTokenizerFast | None = None,
    seed: int = 0,
) -> HookedSAETransformer:
    """:func:`make_tiny_model` as a SAELens ``HookedSAETransformer`` (same weights)."""
    model = _build(HookedSAETransformer, d_model, tokenizer, seed)
    assert isinstance(model, HookedSAETransformer)
    return model


def save_tiny_hf_model(directory: str | Path, seed: int = 0) -> Path:
    """Save a tiny randomly initialised GPT-2 (HuggingFace ``transformers``) and the
    offline tokenizer to ``directory``: a local model that ``--model_class_name
    AutoModelForCausalLM --model_name DIR`` loads without the network. Its
    residual hooks are ``transformer.h.{0,1}`` (width 16), its context
    :data:`N_CTX` tokens."""
    from transformers import GPT2Config, GPT2LMHeadModel

    directory = Path(directory)
    tokenizer = make_tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=N_CTX,
        n_embd=16,
        n_layer=2,
        n_head=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_text_dataset(directory: str | Path, texts: list[str] | None = None) -> Path:
    """``directory/train.jsonl`` with one ``{"text": ...}`` row per text (default
    :data:`TEXTS`): a local dataset for ``--dataset_path DIR``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rows = texts if texts is not None else TEXTS
    (directory / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    return directory


HOOK = "blocks.0.hook_resid_post"
"""The hook the tests read and train on (the tiny model's first residual stream)."""

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
}
"""Environment that keeps the hub, datasets, transformers and wandb offline."""

SMALL_CORPUS_WARNINGS = [
    pytest.mark.filterwarnings("ignore:The training dataset contains fewer samples:UserWarning"),
    pytest.mark.filterwarnings("ignore:All samples in the training dataset have been exhausted"),
    pytest.mark.filterwarnings("ignore:Dataset is not tokenized:UserWarning"),
]
"""``pytestmark`` of modules that train on :data:`TEXTS`: expected on a
40-sentence in-memory corpus, SAELens warns about reusing it."""

RUNNER_BATCH_TOKENS = 32
"""Training batch of :func:`make_runner`'s runners, in tokens."""


def make_runner(
    runner_class: type[LanguageModelSAETrainingRunner],
    *,
    steps: int,
    log_to_wandb: bool,
    checkpoint_path: Path | None,
    log_every: int = 4,
    eval_every: int = 2,
    prefetch: bool = False,
) -> LanguageModelSAETrainingRunner:
    """A ``runner_class`` training a tiny PolySAE on :data:`TEXTS` through
    :func:`make_tiny_model` for ``steps`` steps of :data:`RUNNER_BATCH_TOKENS`
    tokens; nothing is saved unless ``checkpoint_path`` is given."""
    cfg = LanguageModelSAERunnerConfig(
        sae=PolyTopKTrainingSAEConfig(d_in=16, d_sae=D_SAE, k=4, poly_ranks=(12, 5, 3)),
        model_name="tiny-offline",
        hook_name=HOOK,
        dataset_path="in-memory",
        is_dataset_tokenized=False,
        streaming=False,
        context_size=16,
        training_tokens=steps * RUNNER_BATCH_TOKENS,
        train_batch_size_tokens=RUNNER_BATCH_TOKENS,
        store_batch_size_prompts=2,
        n_batches_in_buffer=4,
        lr=1e-2,
        lr_end=1e-2,
        logger=LoggingConfig(
            log_to_wandb=log_to_wandb,
            wandb_log_frequency=log_every,
            eval_every_n_wandb_logs=eval_every,
        ),
        n_eval_batches=1,
        eval_batch_size_prompts=2,
        prefetch_llm_batches=prefetch,
        output_path=None,
        checkpoint_path=None if checkpoint_path is None else str(checkpoint_path),
        verbose=False,
    )
    torch.manual_seed(0)
    return runner_class(
        cfg,
        override_model=make_tiny_model(),
        override_dataset=datasets.Dataset.from_dict({"text": TEXTS}),
    )
