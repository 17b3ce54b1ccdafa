"""Each rank's share of the data: a disjoint shard of the dataset (or of the
cached activations) and 1/N of every step's tokens.

Shards come from the datasets library's own :func:`datasets.distributed.split_dataset_by_node`:
a map-style dataset is cut into N contiguous blocks of rows; a streamed
dataset gives each rank whole files when its number of shards (files) is a
multiple of N, and otherwise every N-th example (each rank then reads, and
skips, the whole stream).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sae_lens.training.activations_store import ActivationsStore

logger = logging.getLogger(__name__)


def local_batch_size(global_batch_tokens: int, world_size: int) -> int:
    """Tokens per rank and step; raises if ``global_batch_tokens`` (SAELens's
    ``train_batch_size_tokens``, tokens per optimizer step) does not split evenly."""
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be at least 1.")
    if global_batch_tokens % world_size:
        lower = global_batch_tokens - global_batch_tokens % world_size
        raise ValueError(
            f"train_batch_size_tokens={global_batch_tokens} (tokens per optimizer step, "
            f"summed over ranks) is not divisible by the world size {world_size}; use a "
            f"multiple of {world_size}, e.g. {lower or world_size} or {lower + world_size}."
        )
    return global_batch_tokens // world_size


def shard_dataset(dataset: Any, rank: int, world_size: int) -> Any:
    """This rank's shard of a map-style or streamed datasets ``Dataset``."""
    from datasets.distributed import split_dataset_by_node

    return split_dataset_by_node(dataset, rank=rank, world_size=world_size)


def shard_activations_store(
    store: ActivationsStore, rank: int, world_size: int, global_batch_tokens: int
) -> None:
    """Make ``store`` (built by SAELens for the whole dataset, not yet read)
    read only this rank's shard and yield ``global_batch_tokens / world_size``
    tokens per batch.

    Covers the store's text/token dataset and its cached activations. Must run
    before the first batch: the store reads both lazily.
    """
    if store._dataloader is not None:
        raise RuntimeError(
            "the activations store has already produced batches; shard it right after it is built."
        )
    store.train_batch_size_tokens = local_batch_size(global_batch_tokens, world_size)
    if store.dataset is not None:
        store.dataset = shard_dataset(store.dataset, rank, world_size)
        # The token generator reads ``store.dataset`` when first advanced; a
        # fresh one makes that explicit rather than relying on it.
        store.iterable_sequences = store._iterate_tokenized_sequences()
    if store.cached_activation_dataset is not None:
        cached = store.cached_activation_dataset
        store.cached_activation_dataset = shard_dataset(cached, rank, world_size)
        n_rows = len(store.cached_activation_dataset)
        if n_rows < store.store_batch_size_prompts:
            raise ValueError(
                f"rank {rank}'s shard of the cached activations has {n_rows} rows, fewer "
                f"than store_batch_size_prompts={store.store_batch_size_prompts}; cache "
                f"at least {store.store_batch_size_prompts * world_size} sequences or "
                "use fewer ranks."
            )
