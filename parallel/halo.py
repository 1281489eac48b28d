"""Halo exchange: the last tokens of the shard before each of this rank's shards (global order).

A causal short convolution of width w over a sharded sequence needs, for each shard c, the
last w−1 tokens of shard c−1 (zeros for c = 0). One all-gather of every shard's tail — a
[B, w−1, D] tensor per shard, independent of sequence length — forward; its adjoint, a
reduce-scatter, backward. As in LASP-2 the exchange is one autograd Function, so every rank
enters the backward collective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from parallel.comm import all_gather_tensor, group_rank_world, reduce_scatter_tensor
from parallel.layout import shard_ids, shard_owners


class _HaloExchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tails: torch.Tensor, group, layout: str) -> torch.Tensor:
        rank, world = group_rank_world(group)
        gathered = all_gather_tensor(tails, group)  # [P, n_local, B, w, D]
        owner = shard_owners(world, layout)
        halos = torch.zeros_like(tails)
        for j, c in enumerate(shard_ids(rank, world, layout)):
            if c > 0:
                halos[j] = gathered[owner[c - 1]]
        ctx.meta = (group, layout, rank, world, gathered.shape)
        return halos

    @staticmethod
    def backward(ctx, d_halos: torch.Tensor):
        group, layout, rank, world, shape = ctx.meta
        owner = shard_owners(world, layout)
        d_gathered = d_halos.new_zeros(shape)
        for j, c in enumerate(shard_ids(rank, world, layout)):
            if c > 0:
                d_gathered[owner[c - 1]] += d_halos[j]
        return reduce_scatter_tensor(d_gathered, group), None, None


def previous_tokens(x: torch.Tensor, width: int, group: dist.ProcessGroup | None, layout: str) -> torch.Tensor:
    """For x [n_local·B, Ts, D] (this rank's shards stacked on the batch dim, as in LASP-2), the
    `width` tokens that precede each shard in the global sequence: [n_local·B, width, D]."""
    rank, world = group_rank_world(group)
    n_local = len(shard_ids(rank, world, layout))
    if x.shape[1] < width:
        raise ValueError(f"shards of {x.shape[1]} tokens are shorter than the convolution halo of {width}; "
                         "use a longer sequence or fewer sp ranks")
    tails = x[:, -width:].reshape(n_local, -1, width, x.shape[-1])
    return _HaloExchange.apply(tails, group, layout).reshape(-1, width, x.shape[-1])
