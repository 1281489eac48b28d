"""Zigzag ring attention (DESIGN §4): (K, V) travel r → r+1 by `batch_isend_irecv`, overlapped with
the block on hand; under zigzag every step after the first is exactly half a block for every rank
(all local queries × the earlier remote shard, or the later local query shard × both remote shards).
Backward: (K, V) travel again with an accumulating (dK, dV) that arrives home after P hops.
Memory holds two blocks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from parallel.attention.block import Accumulator, Job, local_job, remote_jobs, run_jobs, run_jobs_backward
from parallel.comm import group_rank_world
from parallel.layout import shard_ids

# ---------------------------------------------------------------------------------------------
# ring P2P (all-gather / reduce-scatter: parallel.comm)
# ---------------------------------------------------------------------------------------------

def _ring_exchange(sends: list[torch.Tensor], group) -> tuple[list[torch.Tensor], list[dist.Work]]:
    """Start sending each tensor to the next rank of the ring and receiving its like from the previous one."""
    rank, world = group_rank_world(group)
    nxt = dist.get_global_rank(group, (rank + 1) % world) if group is not None else (rank + 1) % world
    prv = dist.get_global_rank(group, (rank - 1) % world) if group is not None else (rank - 1) % world
    recvs = [torch.empty_like(t) for t in sends]
    ops = [dist.P2POp(dist.isend, t.contiguous(), nxt, group) for t in sends]
    ops += [dist.P2POp(dist.irecv, t, prv, group) for t in recvs]
    return recvs, dist.batch_isend_irecv(ops)


def _wait(works) -> None:
    for w in works:
        w.wait()


# ---------------------------------------------------------------------------------------------
# ring attention
# ---------------------------------------------------------------------------------------------

def _ring_step_jobs(rank: int, world: int, layout: str, step: int, size: int, causal: bool) -> list[Job]:
    """Blocks at ring step `step`, when this rank holds the (K, V) of rank (rank − step) mod P."""
    ids = shard_ids(rank, world, layout)
    if step == 0:
        return [local_job(len(ids), size, causal)]
    src = shard_ids((rank - step) % world, world, layout)
    return remote_jobs(ids, {c: i for i, c in enumerate(src)}, size, causal)


class RingAttention(torch.autograd.Function):
    """(K, V) move r → r+1 each step, overlapped with the block on hand; bwd sends (dK, dV) along too."""

    @staticmethod
    def forward(ctx, q, k, v, group, layout: str, scale: float, causal: bool, backend: str = "auto"):
        rank, world = group_rank_world(group)
        size = k.shape[1] // len(shard_ids(rank, world, layout))
        acc = Accumulator(q)
        kv = torch.stack([k, v])
        for step in range(world):
            works = []
            if step < world - 1:
                (nxt,), works = _ring_exchange([kv], group)
            run_jobs(acc, _ring_step_jobs(rank, world, layout, step, size, causal), q, kv[0], kv[1], scale, backend)
            _wait(works)
            if step < world - 1:
                kv = nxt
        out = acc.out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, acc.lse)
        ctx.meta = (group, rank, world, layout, scale, causal, size, acc.aux, backend)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group, rank, world, layout, scale, causal, size, aux, backend = ctx.meta
        dout = dout.contiguous()
        acc = lse.dtype
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        kv = torch.stack([k, v])
        dkv = None  # (dK, dV) of the block on hand, summed over the ranks it has visited so far
        for step in range(world):
            sends = [kv] if step < world - 1 else []
            if step > 0:
                sends.append(dkv)  # the previous block's gradient moves on with it
            recvs, works = _ring_exchange(sends, group)
            block = torch.zeros(kv.shape, dtype=acc, device=q.device)
            run_jobs_backward(_ring_step_jobs(rank, world, layout, step, size, causal), dout, q, kv[0], kv[1],
                               out, lse, scale, aux, backend, dq, block[0], block[1])
            _wait(works)
            if step > 0:
                block += recvs[-1]
            dkv = block
            if step < world - 1:
                kv = recvs[0]
        (home,), works = _ring_exchange([dkv], group)  # after P hops the gradient of our own block comes back
        _wait(works)
        return dq.to(q.dtype), home[0].to(k.dtype), home[1].to(v.dtype), None, None, None, None, None
