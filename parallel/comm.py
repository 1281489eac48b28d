"""Collective helpers that work on both gloo (CPU tests) and nccl."""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_gather_tensor(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Stack of every rank's `x` along a new leading dim: [P, *x.shape]."""
    world = dist.get_world_size(group)
    out = torch.empty((world, *x.shape), dtype=x.dtype, device=x.device)
    if dist.get_backend(group) == "gloo":
        dist.all_gather(list(out.unbind(0)), x.contiguous(), group=group)
    else:
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def reduce_scatter_tensor(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum over ranks of x [P, ...], this rank keeping its row: the adjoint of `all_gather_tensor`."""
    rank = dist.get_rank(group)
    if dist.get_backend(group) == "gloo":  # gloo has no reduce-scatter: all-reduce and keep our row
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x[rank]
    out = torch.empty(x.shape[1:], dtype=x.dtype, device=x.device)
    dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
    return out


def group_rank_world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank in group, group size); (0, 1) when torch.distributed is not initialized."""
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)
