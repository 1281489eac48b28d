"""Ulysses attention (DESIGN §4): DeepSpeed's `DistributedAttention` all-to-all ([T/P, H] → [T, H/P]),
local attention (the block entry's `dense_attention`, so `model.attention_backend` applies), all-to-all
back. The gathered sequence is in shard order, so the local attention permutes it to global order, runs
causal attention and permutes back. Needs the kv heads divisible by sp.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from parallel.attention.block import dense_attention
from parallel.comm import group_rank_world
from parallel.layout import shard_positions


def _init_deepspeed_comm() -> None:
    """Let deepspeed.comm reuse the torch.distributed group that already exists."""
    import deepspeed.comm as ds_comm

    if ds_comm.is_initialized():
        return
    backend = dist.get_backend()
    if backend == "gloo":
        # DeepSpeed's CPU backend would JIT-compile a shared-memory all-reduce (tens of seconds) that
        # the all-to-all never uses; its op registry is a module dict meant to be edited.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    ds_comm.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


class _GlobalOrderAttention(nn.Module):
    """Local attention after the all-to-all: the sequence arrives in shard order [rank 0's part, rank 1's, …];
    permute to global order, attend (causal by position), permute back."""

    def __init__(self, world: int, layout: str, scale: float, causal: bool, backend: str = "auto"):
        super().__init__()
        self.world, self.layout, self.scale, self.causal, self.backend = world, layout, scale, causal, backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.layout == "contiguous" or not self.causal:  # shard order is global order / order is moot
            return dense_attention(q, k, v, self.scale, self.causal, self.backend)
        T = q.shape[1]
        pos = torch.cat([shard_positions(T, r, self.world, self.layout, device=q.device)
                         for r in range(self.world)])  # global position of the i-th arriving token
        to_global = torch.argsort(pos)
        q, k, v = (x.index_select(1, to_global) for x in (q, k, v))
        return dense_attention(q, k, v, self.scale, self.causal, self.backend).index_select(1, pos)


def ulysses_attention(q, k, v, group, layout: str, scale: float, causal: bool, backend: str = "auto") -> torch.Tensor:
    _, world = group_rank_world(group)
    Hkv = k.shape[2]
    if Hkv % world:
        valid = [p for p in range(2, Hkv + 1) if Hkv % p == 0]
        raise ValueError(f"ulysses splits the {Hkv} kv heads over sp={world}; use sp in {valid} "
                         f"(divisors of the kv heads) or parallel.sp_attention=ring|allgather")
    _init_deepspeed_comm()
    from deepspeed.sequence.layer import DistributedAttention

    attn = DistributedAttention(_GlobalOrderAttention(world, layout, scale, causal, backend),
                                group if group is not None else dist.group.WORLD, scatter_idx=2, gather_idx=1)
    return attn(q, k, v, 0)  # batch_dim_idx=0: [B, T, H, D]
