"""Collective helpers that work on both gloo (CPU tests) and nccl: the one home of the gloo fallbacks.

all-gather: x_r on every rank r → [x_0, …, x_{P−1}] stacked on a new leading dim; reduce-scatter, its adjoint:
x_r [P, ...] on every rank r → Σ_r x_r[rank] on each rank. gloo has neither `all_gather_into_tensor` nor
`reduce_scatter_tensor`: a list all-gather and an all-reduce (each rank keeping its row) stand in. The `_async`
forms return (output, work); the output is valid once the work is waited on.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _all_gather(x: torch.Tensor, group: dist.ProcessGroup | None,
                async_op: bool) -> tuple[torch.Tensor, dist.Work | None]:
    out = torch.empty((dist.get_world_size(group), *x.shape), dtype=x.dtype, device=x.device)
    if dist.get_backend(group) == "gloo":
        work = dist.all_gather(list(out.unbind(0)), x.contiguous(), group=group, async_op=async_op)
    else:
        work = dist.all_gather_into_tensor(out, x.contiguous(), group=group, async_op=async_op)
    return out, work


def _reduce_scatter(x: torch.Tensor, group: dist.ProcessGroup | None,
                    async_op: bool) -> tuple[torch.Tensor, dist.Work | None]:
    if dist.get_backend(group) == "gloo":  # gloo has no reduce-scatter: all-reduce and keep our row
        x = x.contiguous().clone()
        work = dist.all_reduce(x, group=group, async_op=async_op)
        return x[dist.get_rank(group)], work
    out = torch.empty(x.shape[1:], dtype=x.dtype, device=x.device)
    work = dist.reduce_scatter_tensor(out, x.contiguous(), group=group, async_op=async_op)
    return out, work


def all_gather_tensor(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Stack of every rank's `x` along a new leading dim: [P, *x.shape]."""
    return _all_gather(x, group, async_op=False)[0]


def all_gather_async(x: torch.Tensor, group: dist.ProcessGroup | None) -> tuple[torch.Tensor, dist.Work]:
    """`all_gather_tensor` started asynchronously: (the output, filled once the work is waited on; the work)."""
    return _all_gather(x, group, async_op=True)


def reduce_scatter_tensor(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum over ranks of x [P, ...], this rank keeping its row: the adjoint of `all_gather_tensor`."""
    return _reduce_scatter(x, group, async_op=False)[0]


def reduce_scatter_async(x: torch.Tensor, group: dist.ProcessGroup | None) -> tuple[torch.Tensor, dist.Work]:
    """`reduce_scatter_tensor` started asynchronously: (this rank's row once the work is waited on, the work)."""
    return _reduce_scatter(x, group, async_op=True)


def group_rank_world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank in group, group size); (0, 1) when torch.distributed is not initialized."""
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32]


def send_tensor(x: torch.Tensor, dst_stage: int, group: dist.ProcessGroup | None) -> None:
    """Send x (any shape and dtype of _DTYPES) to rank `dst_stage` of `group`: a header, then the data."""
    header = torch.tensor([_DTYPES.index(x.dtype), x.dim(), *x.shape], dtype=torch.int64, device=x.device)
    header = torch.nn.functional.pad(header, (0, 8 - header.numel()))
    dst = dst_stage if group is None else dist.get_global_rank(group, dst_stage)
    dist.send(header, dst, group=group)
    dist.send(x.contiguous(), dst, group=group)


def recv_tensor(src_stage: int, group: dist.ProcessGroup | None, device: torch.device) -> torch.Tensor:
    """Receive what `send_tensor` sent from rank `src_stage` of `group`."""
    src = src_stage if group is None else dist.get_global_rank(group, src_stage)
    header = torch.zeros(8, dtype=torch.int64, device=device)
    dist.recv(header, src, group=group)
    dtype, ndim = _DTYPES[int(header[0])], int(header[1])
    x = torch.empty([int(s) for s in header[2 : 2 + ndim]], dtype=dtype, device=device)
    dist.recv(x, src, group=group)
    return x
