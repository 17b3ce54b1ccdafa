"""The 2-D process mesh of a latent-sharded run: data parallel x latent shards.

``world_size = dp * shards`` ranks form torch's ``DeviceMesh`` of shape
``(dp, shards)`` with dimension names ``("dp", "shard")``; rank ``r`` sits at
``(r // shards, r % shards)``. The ranks of one row (a *shard group*, consecutive
ranks) together hold one copy of the SAE, each its slice of the latents, and
see the same batch; the ranks of one column (a *dp group*) hold the same slice
in different replicas and average their gradients. With ``shards == world_size``
there is one replica (pure latent sharding); with ``shards == 1`` every rank
holds the whole SAE (data parallelism through the sharded code path).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MESH_DIM_NAMES = ("dp", "shard")
"""Names of the mesh's dimensions: data-parallel replicas, latent shards."""


@dataclass(frozen=True)
class LatentMesh:
    """This rank's place in the ``(dp, shard)`` mesh and the two groups it talks in."""

    dp_size: int
    """Number of replicas (ranks per dp group)."""
    shards: int
    """Latent shards per replica (ranks per shard group)."""
    dp_rank: int
    """This rank's replica, in ``[0, dp_size)``."""
    shard_rank: int
    """This rank's latent slice, in ``[0, shards)``."""
    dp_group: Any
    """Process group of the ranks holding the same slice (gradient averaging,
    dead-latent statistics)."""
    shard_group: Any
    """Process group of the ranks of this replica (TopK candidates, ``a = z U``,
    the Gram matrix, gathering the SAE)."""
    device_mesh: Any = None
    """The torch ``DeviceMesh`` the groups come from (``None`` when built from groups)."""

    @property
    def world_size(self) -> int:
        """``dp_size * shards``."""
        return self.dp_size * self.shards

    @property
    def is_main(self) -> bool:
        """Replica 0, slice 0: global rank 0, the rank that logs and saves."""
        return self.dp_rank == 0 and self.shard_rank == 0

    def describe(self) -> str:
        """One line for the start-up report."""
        return (
            f"latent-sharded run: mesh (dp={self.dp_size}, shard={self.shards}), "
            f"replica {self.dp_rank}, latent slice {self.shard_rank} of {self.shards}"
        )


def mesh_shape(world_size: int, shards: int) -> tuple[int, int]:
    """``(dp, shards)`` for ``world_size`` ranks; raises ``ValueError`` naming the
    fix if ``shards`` does not divide ``world_size``."""
    if shards < 1:
        raise ValueError(f"shard_latents={shards} must be at least 1.")
    if world_size % shards:
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise ValueError(
            f"shard_latents={shards} does not divide the world size {world_size}: "
            f"the ranks form a (data-parallel x shard) grid; use one of {divisors}."
        )
    return world_size // shards, shards


def init_latent_mesh(shards: int, device_type: str = "cpu") -> LatentMesh:
    """The ``(dp, shard)`` mesh over every rank of the initialised default
    process group (collective: every rank must call it, with the same ``shards``)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    world_size, rank = dist.get_world_size(), dist.get_rank()
    shape = mesh_shape(world_size, shards)
    device_mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIM_NAMES)
    return LatentMesh(
        dp_size=shape[0],
        shards=shape[1],
        dp_rank=rank // shards,
        shard_rank=rank % shards,
        dp_group=device_mesh.get_group("dp"),
        shard_group=device_mesh.get_group("shard"),
        device_mesh=device_mesh,
    )
