"""Halo exchange: the last tokens of the shard before each of this rank's shards (global order).

A causal short convolution of width w over a sharded sequence needs, for each shard c, the
last w−1 tokens of shard c−1 (for c = 0: zeros, or the previous window's tail when the sequence streams
through the model window by window). One all-gather of every shard's tail — a
[B, w−1, D] tensor per shard, independent of sequence length — forward; its adjoint, a
reduce-scatter, backward. As in LASP-2 the exchange is one autograd Function, so every rank
enters the backward collective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from parallel.comm import all_gather_tensor, group_rank_world, reduce_scatter_tensor
from parallel.layout import num_shards, shard_ids, shard_owners


class _HaloExchange(torch.autograd.Function):
    """tails [n_local, B, w, D] of local shards (and the tokens before the whole sequence, `first`) →
    (halos of local shards, the tail of the sequence's last shard); all-gather forward, reduce-scatter
    backward. `first` and the last tail are replicated over the group, like LASP-2's initial and final
    states: each rank's copy carries its own share of the gradient, summed by the reduce-scatter."""

    @staticmethod
    def forward(ctx, tails: torch.Tensor, first: torch.Tensor | None, group, layout: str):
        rank, world = group_rank_world(group)
        gathered = all_gather_tensor(tails, group)  # [P, n_local, B, w, D]
        owner = shard_owners(world, layout)
        halos = torch.zeros_like(tails)
        for j, c in enumerate(shard_ids(rank, world, layout)):
            if c > 0:
                halos[j] = gathered[owner[c - 1]]
            elif first is not None:
                halos[j] = first
        ctx.meta = (group, layout, rank, world, gathered.shape, first is not None)
        ctx.set_materialize_grads(False)
        return halos, gathered[owner[num_shards(world, layout) - 1]].clone()

    @staticmethod
    def backward(ctx, d_halos: torch.Tensor | None, d_last: torch.Tensor | None):
        group, layout, rank, world, shape, has_first = ctx.meta
        owner = shard_owners(world, layout)
        d_gathered = torch.zeros(shape, dtype=(d_halos if d_halos is not None else d_last).dtype,
                                 device=(d_halos if d_halos is not None else d_last).device)
        d_first = None
        if d_halos is not None:
            for j, c in enumerate(shard_ids(rank, world, layout)):
                if c > 0:
                    d_gathered[owner[c - 1]] += d_halos[j]
                elif has_first:
                    d_first = d_halos[j].clone()
        if d_last is not None:
            d_gathered[owner[num_shards(world, layout) - 1]] += d_last
        if has_first and d_first is None:
            d_first = torch.zeros(shape[2:], dtype=d_gathered.dtype, device=d_gathered.device)
        return reduce_scatter_tensor(d_gathered, group), d_first, None, None


def previous_tokens(x: torch.Tensor, width: int, group: dist.ProcessGroup | None, layout: str,
                    first: torch.Tensor | None = None, return_last: bool = False):
    """For x [n_local·B, Ts, D] (this rank's shards stacked on the batch dim, as in LASP-2), the
    `width` tokens that precede each shard in the global sequence: [n_local·B, width, D]. Before the
    first shard come `first` [B, width, D] (the previous window's tail when a sequence streams) or zeros.
    With `return_last`, also the last `width` tokens of the whole sequence ([B, width, D], every rank)."""
    rank, world = group_rank_world(group)
    n_local = len(shard_ids(rank, world, layout))
    if x.shape[1] < width:
        raise ValueError(f"shards of {x.shape[1]} tokens are shorter than the convolution halo of {width}; "
                         "use a longer sequence or fewer sp ranks")
    tails = x[:, -width:].reshape(n_local, -1, width, x.shape[-1])
    halos, last = _HaloExchange.apply(tails, first, group, layout)
    halos = halos.reshape(-1, width, x.shape[-1])
    return (halos, last) if return_last else halos
