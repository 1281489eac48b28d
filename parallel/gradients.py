"""Gradient synchronisation over the mesh and the global gradient norm (DESIGN §6).

Parameters are replicated over dp and sp. Each rank's loss share is already divided by the
global token count, so the step's gradient is the SUM over sp and dp of the ranks' gradients.
With pp > 1 and tied embeddings, the first stage's embedding and the last stage's head are
copies of one weight: their gradients are summed over the pair, and the norm counts it once.

Under sharded model state (FSDP2, parallel.sharding) the sum over sp and dp is the reduce-scatter FSDP
runs itself; gradients are then DTensors and everything here works on their local shards: the tied
copies are sharded alike on both stages, so summing the local shards over the pair sums the weight.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from parallel.sharding import local


def all_reduce_flat(tensors: Sequence[torch.Tensor], group: dist.ProcessGroup | None,
                    op: dist.ReduceOp = dist.ReduceOp.SUM) -> None:
    """In-place all-reduce of many tensors as one flat buffer (one collective)."""
    if not tensors:
        return
    flat = _flatten_dense_tensors(list(tensors))
    dist.all_reduce(flat, op=op, group=group)
    for t, reduced in zip(tensors, _unflatten_dense_tensors(flat, list(tensors))):
        t.copy_(reduced)


def sync_gradients(params: Iterable[torch.nn.Parameter], replica_groups: Sequence[dist.ProcessGroup],
                   tied: torch.nn.Parameter | None = None, tied_group: dist.ProcessGroup | None = None,
                   device: torch.device | None = None) -> None:
    """Σ of every gradient over each group in `replica_groups` (sp, dp), then of the tied copy over its pair
    (through `device`, the collectives' device, when the gradient lives elsewhere: CPU-offloaded shards)."""
    grads = [local(p.grad) for p in params if p.grad is not None]
    for group in replica_groups:
        all_reduce_flat(grads, group)
    if tied is not None and tied_group is not None and tied.grad is not None:
        grad = local(tied.grad)
        buffer = grad if device is None or grad.device == device else grad.to(device)
        dist.all_reduce(buffer, group=tied_group)
        if buffer is not grad:
            grad.copy_(buffer)


def global_grad_norm(params: Iterable[torch.nn.Parameter], stage_group: dist.ProcessGroup | None,
                     exclude: torch.nn.Parameter | None = None, device: torch.device | None = None,
                     shard_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """‖g‖₂ over all pipeline stages (`stage_group`, None for one stage), `exclude` (a tied copy) left out;
    with sharded gradients, the squares of the local shards are also summed over `shard_group`.
    One fp32 tensor on the device: no host sync."""
    grads = [local(p.grad) for p in params if p.grad is not None and p is not exclude]
    grads = [g for g in grads if g.numel()]  # a shard may hold no rows
    if grads:
        sq = torch.stack(torch._foreach_norm(grads)).float().pow(2).sum()
        sq = sq if device is None else sq.to(device)  # CPU-offloaded shards: the collectives run on the device
    else:
        sq = torch.zeros((), device=device)
    if shard_group is not None:
        dist.all_reduce(sq, group=shard_group)
    if stage_group is not None:
        dist.all_reduce(sq, group=stage_group)
    return sq.sqrt()


def clip_gradients_(params: Iterable[torch.nn.Parameter], norm: torch.Tensor, max_norm: float) -> None:
    """Scale every gradient by min(1, max_norm / ‖g‖) on the device (no host sync)."""
    grads = [local(p.grad) for p in params if p.grad is not None]
    if grads and max_norm > 0:
        torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0).to(grads[0].device, grads[0].dtype))
