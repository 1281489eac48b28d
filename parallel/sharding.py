"""Sharded model state (DESIGN §10): which rows of a parameter this rank holds, and its local tensors.

FSDP2 (`fully_shard`) keeps each parameter of a stage as a DTensor sharded on dim 0 over a 1-D mesh of
the stage's dp × sp ranks, `torch.chunk` style: with n rows over W ranks, rank k holds rows
[k·c, min((k+1)·c, n)) where c = ⌈n / W⌉ (trailing ranks may hold none). Checkpoints use the same
rows as their zarr chunks, so each rank writes whole chunks of its own.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Shard


def is_sharded(t: torch.Tensor | None) -> bool:
    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: a DTensor's local shard (a view that in-place updates write through), else t."""
    return t.to_local() if isinstance(t, DTensor) else t


def shard_chunk(rows: int, world: int) -> int:
    """Rows per shard of a dim-0 sharding of `rows` rows over `world` ranks (at least 1)."""
    return max(1, -(-rows // world))


def shard_rows(rows: int, world: int, index: int) -> tuple[int, int]:
    """[start, stop) rows held by shard `index` of `world`."""
    chunk = shard_chunk(rows, world)
    start = min(index * chunk, rows)
    return start, min(start + chunk, rows)


def sharding_of(t: DTensor) -> tuple[int, int]:
    """(index of this rank, number of shards) of a DTensor sharded on dim 0 over a 1-D mesh."""
    mesh = t.device_mesh
    if mesh.ndim != 1 or tuple(t.placements) != (Shard(0),):
        raise ValueError(f"expected a dim-0 sharding over a 1-D mesh, got {t.placements} over {mesh}")
    return mesh.get_local_rank(), mesh.size()


def local_rows(t: DTensor) -> tuple[int, int]:
    """[start, stop) rows of the whole tensor that this rank's shard of `t` holds."""
    index, world = sharding_of(t)
    start, stop = shard_rows(t.shape[0], world, index)
    held = t.to_local().shape[0] if t.dim() else 0
    if held != stop - start:
        raise RuntimeError(f"shard {index} of {world} holds {held} rows, expected rows [{start}, {stop})")
    return start, stop
