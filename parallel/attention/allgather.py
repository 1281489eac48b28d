"""All-gather KV attention (LASP-2H, DESIGN §4): ONE all-gather of the packed (K, V) — overlapped
with the local causal block — then the remote blocks each query shard may see; backward: ONE
reduce-scatter of the packed (dK, dV), overlapped with the local block's backward. One autograd
Function, so every rank enters both collectives. Memory holds the full K, V.
"""

from __future__ import annotations

import torch

from parallel.attention.block import Accumulator, local_job, remote_jobs, run_jobs, run_jobs_backward
from parallel.comm import all_gather_async, group_rank_world, reduce_scatter_async
from parallel.comm_clock import timed_wait
from parallel.layout import shard_ids, shard_owners


class AllGatherAttention(torch.autograd.Function):
    """All-gather packed (K, V) fwd, reduce-scatter packed (dK, dV) bwd, attention in between."""

    @staticmethod
    def forward(ctx, q, k, v, group, layout: str, scale: float, causal: bool, backend: str = "auto"):
        rank, world = group_rank_world(group)
        ids = shard_ids(rank, world, layout)
        n_local = len(ids)
        B, T_local, Hkv, D = k.shape
        size = T_local // n_local
        gathered, work = all_gather_async(torch.stack([k, v]), group)  # [P, 2, B, T_local, Hkv, D]
        acc = Accumulator(q)
        local = [local_job(n_local, size, causal)]
        run_jobs(acc, local, q, k, v, scale, backend)  # overlaps the all-gather
        timed_wait(work)
        # remote shards in global order, as one key buffer [2, B, n_remote·size, Hkv, D]
        owner = [(r, j, c) for c, (r, j) in sorted(shard_owners(world, layout).items()) if r != rank]
        g = gathered.view(world, 2, B, n_local, size, Hkv, D)
        remote_kv = torch.stack([g[r, :, :, j] for r, j, _ in owner], dim=2).flatten(2, 3)
        del gathered, g
        remote = remote_jobs(ids, {c: i for i, (_, _, c) in enumerate(owner)}, size, causal)
        run_jobs(acc, remote, q, remote_kv[0], remote_kv[1], scale, backend)
        out = acc.out.to(q.dtype)
        ctx.save_for_backward(q, k, v, remote_kv, out, acc.lse)
        ctx.meta = (group, rank, world, layout, scale, local, remote, owner, size, acc.aux, backend)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, remote_kv, out, lse = ctx.saved_tensors
        group, rank, world, layout, scale, local, remote, owner, size, aux, backend = ctx.meta
        dout = dout.contiguous()
        acc = lse.dtype
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        d_remote = torch.zeros(remote_kv.shape, dtype=acc, device=q.device)
        run_jobs_backward(remote, dout, q, remote_kv[0], remote_kv[1], out, lse, scale, aux, backend,
                           dq, d_remote[0], d_remote[1])
        # back into all-gather layout [P, 2, B, T_local, Hkv, D] (our own row zero), then reduce-scatter
        B, _, Hkv, D = k.shape
        n_local = k.shape[1] // size
        send = torch.zeros((world, 2, B, n_local, size, Hkv, D), dtype=acc, device=q.device)
        d_remote = d_remote.unflatten(2, (len(owner), size))
        for i, (r, j, _) in enumerate(owner):
            send[r, :, :, j] = d_remote[:, :, i]
        mine, work = reduce_scatter_async(send.flatten(3, 4), group)  # every rank enters this collective
        dk = torch.zeros(k.shape, dtype=acc, device=q.device)
        dv = torch.zeros(v.shape, dtype=acc, device=q.device)
        run_jobs_backward(local, dout, q, k, v, out, lse, scale, aux, backend, dq, dk, dv)  # overlaps it
        timed_wait(work)
        dk += mine[0]
        dv += mine[1]
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None
