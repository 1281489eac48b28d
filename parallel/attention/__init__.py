"""Softmax attention under sequence parallelism (DESIGN §4): all-gather KV, zigzag ring, Ulysses.

Every method takes this rank's part of q, k, v as `parallel.layout.shard_sequence` cuts it
(contiguous: shard r; zigzag: shards r and 2P−1−r) and returns this rank's part of

    o_i = Σ_{j visible from i} softmax_j(scale · q_i·k_j) v_j,    j visible ⇔ pos(j) ≤ pos(i) (causal),

with positions global, so both layouts give the single-process result. Grouped-query heads:
query head h reads kv head h // (Hq/Hkv).

Blocks of the score matrix are computed one (query range, key range) pair at a time, each
returning its output o_b and log-sum-exp l_b = log Σ_j exp(scale · q·k_j); partial results merge
in fp32 (fp64 for fp64 inputs) by

    l = log(e^{l1} + e^{l2}),   o = e^{l1−l} o1 + e^{l2−l} o2.

- "allgather" (LASP-2H): ONE all-gather of the packed (K, V) — overlapped with the local
  causal block — then the remote blocks each query shard may see; backward: ONE reduce-scatter
  of the packed (dK, dV). One autograd Function, so every rank enters both collectives.
- "ring": (K, V) travel r → r+1 by `batch_isend_irecv`, overlapped with the block on hand;
  under zigzag every step after the first is exactly half a block for every rank (all local
  queries × the earlier remote shard, or the later local query shard × both remote shards).
  Backward: (K, V) travel again with an accumulating (dK, dV) that arrives home after P hops.
- "ulysses": DeepSpeed's `DistributedAttention` all-to-all ([T/P, H] → [T, H/P]); the gathered
  sequence is in shard order, so the local attention permutes it to global order, runs causal
  attention and permutes back.

Communication per layer, N tokens, P ranks, KV width H_kv = h_kv·d: ring and allgather move
≈ 2N·H_kv·(P−1)/P forward (ring overlaps it, allgather overlaps only the local block);
Ulysses moves ≈ (N/P)(2H_q + 2H_kv) per rank.

Every block, and the whole-sequence attention of a world of one and of Ulysses, runs on the kernel
`backend` names (`model.attention_backend`): "auto" (default) takes cuDNN where it runs, else flash,
else an fp32 PyTorch path; "cudnn" | "flash" | "math" force one (`backends`).

Modules: `backends` (the cuDNN, flash and math kernels; which one runs, logged once), `block` (block
attention with log-sum-exp; the fp32 accumulator; which blocks a rank computes; plain attention),
`allgather`, `ring`, `ulysses` (one method each); this package holds the public entry point `sp_attention`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from parallel.attention.allgather import AllGatherAttention
from parallel.attention.backends import check_backend, choose_backend
from parallel.attention.block import Job, block_attention, block_attention_backward, dense_attention
from parallel.attention.ring import RingAttention
from parallel.attention.ring import _ring_step_jobs as _ring_step_jobs  # imported by tests/parallel
from parallel.attention.ulysses import ulysses_attention
from parallel.comm import group_rank_world
from parallel.context import SOFTMAX_METHODS
from parallel.layout import num_shards

__all__ = ["Job", "block_attention", "block_attention_backward", "choose_backend", "dense_attention", "sp_attention"]

_dense_attention = dense_attention  # the name benchmarks/sp_attention.py imports


def sp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, method: str,
                 group: dist.ProcessGroup | None = None, layout: str = "zigzag", causal: bool = True,
                 scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Softmax attention over a sequence split across the ranks of `group`.

    q: [B, T_local, Hq, D]; k, v: [B, T_local, Hkv, D] with Hq a multiple of Hkv — this rank's part
    as produced by `parallel.layout.shard_sequence(x, rank, world, layout)`. Returns this rank's
    output [B, T_local, Hq, D], equal to the matching slice of (causal, by global position)
    attention on the whole sequence, o_i = Σ_j softmax_j(scale·q_i·k_j) v_j with scale = D^−½
    by default; gradients of q, k, v likewise. `method`: "allgather", "ring" or "ulysses";
    `backend`: the block kernel, auto | cudnn | flash | math (`model.attention_backend`).
    """
    check_backend(backend)
    if method not in SOFTMAX_METHODS:
        raise ValueError(f"unknown sp attention method {method!r}; use one of {SOFTMAX_METHODS}")
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"expected q [B, T, Hq, D] and k, v [B, T, Hkv, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} are not a multiple of kv heads {k.shape[2]}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    rank, world = group_rank_world(group)
    if world == 1:
        return dense_attention(q, k, v, scale, causal, backend)
    n_local = num_shards(world, layout) // world
    if q.shape[1] % n_local:
        raise ValueError(f"local sequence of {q.shape[1]} tokens does not hold {n_local} equal {layout} shards; "
                         f"use a sequence length divisible by {num_shards(world, layout)}")
    if method == "ulysses":
        return ulysses_attention(q, k, v, group, layout, scale, causal, backend)
    fn = RingAttention if method == "ring" else AllGatherAttention
    return fn.apply(q, k, v, group, layout, scale, causal, backend)
