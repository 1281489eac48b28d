"""How a sequence is cut into sequence-parallel shards (DESIGN §3).

The sequence is cut into N equal shards in global order c = 0 … N−1.
- "contiguous": N = P, rank r owns shard r.
- "zigzag":     N = 2P, rank r owns shards r and 2P−1−r (in that order), which balances
  causal attention work: every rank gets one early and one late shard.
"""

from __future__ import annotations

import torch

LAYOUTS = ("contiguous", "zigzag")


def num_shards(world: int, layout: str) -> int:
    """Number of equal shards the sequence is cut into."""
    check_layout(layout)
    return world if layout == "contiguous" else 2 * world


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown sequence layout {layout!r}; use one of {LAYOUTS}")


def shard_ids(rank: int, world: int, layout: str) -> list[int]:
    """Global indices of the shards `rank` owns, in the order they are stored locally."""
    check_layout(layout)
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside the group of size {world}")
    return [rank] if layout == "contiguous" else [rank, 2 * world - 1 - rank]


def shard_owners(world: int, layout: str) -> dict[int, tuple[int, int]]:
    """Global shard c → (owning rank r, its local index j): the inverse of `shard_ids`."""
    return {c: (r, j) for r in range(world) for j, c in enumerate(shard_ids(r, world, layout))}


def check_divisible(seq_len: int, world: int, layout: str) -> None:
    n = num_shards(world, layout)
    if seq_len % n:
        raise ValueError(
            f"sequence length {seq_len} does not split into {n} equal {layout} shards for sp={world}; "
            f"use a sequence length divisible by {n}"
        )


def shard_sequence(x: torch.Tensor, rank: int, world: int, layout: str = "contiguous", dim: int = 1) -> torch.Tensor:
    """The part of the full sequence `x` (sequence along `dim`) that `rank` owns."""
    if world == 1:
        return x
    check_divisible(x.shape[dim], world, layout)
    pieces = x.chunk(num_shards(world, layout), dim=dim)
    return torch.cat([pieces[c] for c in shard_ids(rank, world, layout)], dim=dim)


def unshard_sequence(parts: list[torch.Tensor], layout: str = "contiguous", dim: int = 1) -> torch.Tensor:
    """Inverse of `shard_sequence`: the full sequence from every rank's part (parts[r] from rank r)."""
    world = len(parts)
    if world == 1:
        return parts[0]
    n_local = num_shards(world, layout) // world
    shards: dict[int, torch.Tensor] = {}
    for rank, part in enumerate(parts):
        for c, piece in zip(shard_ids(rank, world, layout), part.chunk(n_local, dim=dim)):
            shards[c] = piece
    return torch.cat([shards[c] for c in range(len(shards))], dim=dim)


def shard_positions(seq_len: int, rank: int, world: int, layout: str = "contiguous",
                    device: torch.device | str | None = None) -> torch.Tensor:
    """Global positions [T_local] of the tokens `rank` owns (for RoPE and causal masks)."""
    return shard_sequence(torch.arange(seq_len, device=device), rank, world, layout, dim=0)


def stack_local_shards(x: torch.Tensor, n_local: int) -> torch.Tensor:
    """[B, n·Ts, ...] (a rank's shards side by side) → [n·B, Ts, ...] (one shard per batch row)."""
    return torch.cat(x.chunk(n_local, dim=1), dim=0) if n_local > 1 else x


def unstack_local_shards(x: torch.Tensor, n_local: int) -> torch.Tensor:
    """Inverse of `stack_local_shards`."""
    return torch.cat(x.chunk(n_local, dim=0), dim=1) if n_local > 1 else x


def shard_windows(x: torch.Tensor, rank: int, world: int, layout: str, window: int, dim: int = 1) -> torch.Tensor:
    """Window-major sharding for sequences that stream through the model (DESIGN §9): x is cut into
    consecutive windows of `window` tokens along `dim`, each window is sharded over the ranks as a
    sequence of its own, and this rank's pieces are concatenated window after window."""
    if world == 1:
        return x
    return torch.cat([shard_sequence(w, rank, world, layout, dim) for w in x.split(window, dim=dim)], dim=dim)


def local_ranges(seq_len: int, rank: int, world: int, layout: str, window: int = 0) -> list[tuple[int, int]]:
    """The [start, end) token ranges of a sequence that `rank` holds, in local order (window-major when
    `window` > 0): what `shard_sequence` / `shard_windows` select, for readers that fetch ranges."""
    window = window or seq_len
    ranges = []
    for w0 in range(0, seq_len, window):
        n = min(window, seq_len - w0)
        size = n // num_shards(world, layout)
        ranges += [(w0 + c * size, w0 + (c + 1) * size) for c in shard_ids(rank, world, layout)]
    return ranges
