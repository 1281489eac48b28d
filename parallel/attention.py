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

Backward of a block uses the *final* o and l (flash-attention style): with P = exp(S − l),
D_i = Σ_d dO_id O_id:  dV = Pᵀ dO,  dS = P ⊙ (dO Vᵀ − D),  dQ = scale · dS K,  dK = scale · dSᵀ Q,
so block gradients simply add up. On CUDA (fp16 / bf16) blocks run the flash kernel through
`aten._scaled_dot_product_flash_attention` (which returns l); elsewhere an fp32 PyTorch path.

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
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from kernels.reference import state_dtype
from parallel.comm import all_gather_async, group_rank_world, reduce_scatter_async
from parallel.context import SOFTMAX_METHODS
from parallel.layout import num_shards, shard_ids, shard_owners, shard_positions

Job = tuple[slice, slice, bool]  # (query range, key range, causal) in local / key-buffer coordinates


# ---------------------------------------------------------------------------------------------
# block attention with log-sum-exp
# ---------------------------------------------------------------------------------------------

def _use_flash(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256


_FLASH_GQA: dict[str, bool] = {}  # does the flash op take fewer kv heads than query heads? (probed once)


def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=2)


def _flash_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool):
    groups = q.shape[2] // k.shape[2]
    if groups > 1 and not _FLASH_GQA.get("ok", True):
        k, v = _expand_kv(k, groups), _expand_kv(v, groups)
    try:
        res = torch.ops.aten._scaled_dot_product_flash_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal, False, scale=scale)
    except RuntimeError as e:
        if groups == 1 or "ok" in _FLASH_GQA or isinstance(e, torch.OutOfMemoryError):
            raise
        _FLASH_GQA["ok"] = False
        return _flash_fwd(q, k, v, scale, causal)
    if groups > 1:
        _FLASH_GQA.setdefault("ok", True)
    out, lse = res[0], res[1]
    return out.transpose(1, 2), lse, res[2:4] + res[6:8]


def _flash_bwd(dout, q, k, v, out, lse, scale, causal, aux):
    groups = q.shape[2] // k.shape[2]
    expand = groups > 1 and not _FLASH_GQA.get("ok", True)
    ke, ve = (_expand_kv(k, groups), _expand_kv(v, groups)) if expand else (k, v)
    # cu-seqlens and rng state exactly as the forward returned them: None (undefined) without varlen input;
    # any defined stand-in would make the kernel take the varlen path ("batch size must be positive")
    cum_q, cum_k, seed, offset = aux
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout.transpose(1, 2), q.transpose(1, 2), ke.transpose(1, 2), ve.transpose(1, 2), out.transpose(1, 2),
        lse.contiguous(), cum_q, cum_k, q.shape[1], k.shape[1], 0.0, causal, seed, offset, scale=scale)
    dq, dk, dv = dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
    if expand:
        B, T, _, D = dk.shape
        dk = dk.reshape(B, T, k.shape[2], groups, D).sum(3)
        dv = dv.reshape(B, T, k.shape[2], groups, D).sum(3)
    return dq, dk, dv


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """scale · q kᵀ per kv head and group, [B, Hkv, G, Tq, Tk] in the accumulation dtype; −inf above the diagonal."""
    B, Tq, Hq, D = q.shape
    Hkv = k.shape[2]
    acc = state_dtype(q)
    s = torch.einsum("bqhgd,bkhd->bhgqk", q.to(acc).view(B, Tq, Hkv, Hq // Hkv, D), k.to(acc)) * scale
    if causal:
        if Tq != k.shape[1]:
            raise ValueError("a causal block must be square (the diagonal block of one shard range)")
        s = s.masked_fill(torch.ones(Tq, Tq, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return s


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool):
    """(o, l, aux) of one block: o [B, Tq, Hq, D], l = logsumexp_k(scale · q·k) [B, Hq, Tq] (fp32 / fp64).

    `causal` masks key j > query i within the block (square blocks only). `aux` carries what the
    flash backward needs besides o and l.
    """
    if _use_flash(q):
        return _flash_fwd(q, k, v, scale, causal)
    B, Tq, Hq, D = q.shape
    s = _scores(q, k, scale, causal)
    lse = s.logsumexp(-1)  # [B, Hkv, G, Tq]
    o = torch.einsum("bhgqk,bkhd->bqhgd", (s - lse.unsqueeze(-1)).exp(), v.to(s.dtype))
    return o.reshape(B, Tq, Hq, D), lse.reshape(B, Hq, Tq), None


def block_attention_backward(dout, q, k, v, out, lse, scale: float, causal: bool, aux=None):
    """(dq, dk, dv) of one block given the FINAL output `out` and log-sum-exp `lse` of its query rows."""
    if _use_flash(q):
        return _flash_bwd(dout, q, k, v, out, lse, scale, causal, aux)
    B, Tq, Hq, D = q.shape
    Hkv, G = k.shape[2], Hq // k.shape[2]
    s = _scores(q, k, scale, causal)
    acc = s.dtype
    p = (s - lse.to(acc).view(B, Hkv, G, Tq, 1)).exp()
    do = dout.to(acc).view(B, Tq, Hkv, G, D)
    delta = (do * out.to(acc).view(B, Tq, Hkv, G, D)).sum(-1).permute(0, 2, 3, 1)  # [B, Hkv, G, Tq]
    dv = torch.einsum("bhgqk,bqhgd->bkhd", p, do)
    ds = p * (torch.einsum("bqhgd,bkhd->bhgqk", do, v.to(acc)) - delta.unsqueeze(-1))
    dq = torch.einsum("bhgqk,bkhd->bqhgd", ds, k.to(acc)).reshape(B, Tq, Hq, D) * scale
    dk = torch.einsum("bhgqk,bqhgd->bkhd", ds, q.to(acc).view(B, Tq, Hkv, G, D)) * scale
    return dq, dk, dv


class _Accumulator:
    """Running (o, l) of every local query row, merged block by block in fp32: l = log(e^{l}+e^{l_b})."""

    def __init__(self, q: torch.Tensor):
        B, T, Hq, D = q.shape
        acc = state_dtype(q)
        self.out = torch.zeros(B, T, Hq, D, dtype=acc, device=q.device)
        self.lse = torch.full((B, Hq, T), float("-inf"), dtype=acc, device=q.device)
        self.empty = torch.ones(T, dtype=torch.bool)  # rows with no block yet (host-side bookkeeping)
        self.aux = None

    def add(self, rows: slice, o: torch.Tensor, lse: torch.Tensor, aux) -> None:
        self.aux = self.aux if self.aux is not None else aux
        if bool(self.empty[rows].all()):
            self.out[:, rows] = o
            self.lse[:, :, rows] = lse
        else:
            old = self.lse[:, :, rows]
            new = torch.logaddexp(old, lse)
            w_old = (old - new).exp().transpose(1, 2).unsqueeze(-1)
            w_new = (lse - new).exp().transpose(1, 2).unsqueeze(-1)
            self.out[:, rows] = w_old * self.out[:, rows] + w_new * o.to(self.out.dtype)
            self.lse[:, :, rows] = new
        self.empty[rows] = False


# ---------------------------------------------------------------------------------------------
# which blocks a rank computes
# ---------------------------------------------------------------------------------------------

def _ranges(ids: list[int]) -> list[tuple[int, int]]:
    """Sorted integers → maximal runs [start, stop)."""
    runs: list[tuple[int, int]] = []
    for i in ids:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def _remote_jobs(q_ids: list[int], key_pos: dict[int, int], size: int, causal: bool) -> list[Job]:
    """Blocks of the local queries (shards q_ids, stored in that order) against the key shards in
    `key_pos` (global shard id → its index in the key buffer), none of which a query shard equals:
    shard b is visible to shard a when b < a (or always when not causal). Runs of adjacent key shards
    become one block, and adjacent query shards that see the same key run share it."""
    per_query = []
    for a in q_ids:
        seen = sorted(key_pos[b] for b in key_pos if b < a or not causal)
        per_query.append(_ranges(seen))
    jobs: list[Job] = []
    for i, runs in enumerate(per_query):
        for run in runs:
            if i > 0 and run in per_query[i - 1]:
                continue  # merged into the job started by an earlier query shard
            j = i
            while j + 1 < len(per_query) and run in per_query[j + 1]:
                j += 1
            jobs.append((slice(i * size, (j + 1) * size), slice(run[0] * size, run[1] * size), False))
    return jobs


def _local_job(n_local: int, size: int, causal: bool) -> Job:
    """The local queries against the local keys: the shards a rank owns are stored in increasing
    global order (contiguous: one; zigzag: r < 2P−1−r), so 'causal in local order' is 'causal by position'."""
    return (slice(0, n_local * size), slice(0, n_local * size), causal)


def _run_jobs(acc: _Accumulator, jobs: list[Job], q, k, v, scale: float) -> None:
    for rows, cols, causal in jobs:
        o, lse, aux = block_attention(q[:, rows], k[:, cols], v[:, cols], scale, causal)
        acc.add(rows, o, lse, aux)


def _run_jobs_backward(jobs: list[Job], dout, q, k, v, out, lse, scale: float, aux,
                       dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> None:
    """Add the gradients of `jobs` into dq (local rows) and dk, dv (key-buffer rows)."""
    for rows, cols, causal in jobs:
        gq, gk, gv = block_attention_backward(dout[:, rows], q[:, rows], k[:, cols], v[:, cols], out[:, rows],
                                              lse[:, :, rows], scale, causal, aux)
        dq[:, rows] += gq
        dk[:, cols] += gk
        dv[:, cols] += gv


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
# allgather (LASP-2H)
# ---------------------------------------------------------------------------------------------

class _AllGatherAttention(torch.autograd.Function):
    """All-gather packed (K, V) fwd, reduce-scatter packed (dK, dV) bwd, attention in between."""

    @staticmethod
    def forward(ctx, q, k, v, group, layout: str, scale: float, causal: bool):
        rank, world = group_rank_world(group)
        ids = shard_ids(rank, world, layout)
        n_local = len(ids)
        B, T_local, Hkv, D = k.shape
        size = T_local // n_local
        gathered, work = all_gather_async(torch.stack([k, v]), group)  # [P, 2, B, T_local, Hkv, D]
        acc = _Accumulator(q)
        local = [_local_job(n_local, size, causal)]
        _run_jobs(acc, local, q, k, v, scale)  # overlaps the all-gather
        work.wait()
        # remote shards in global order, as one key buffer [2, B, n_remote·size, Hkv, D]
        owner = [(r, j, c) for c, (r, j) in sorted(shard_owners(world, layout).items()) if r != rank]
        g = gathered.view(world, 2, B, n_local, size, Hkv, D)
        remote_kv = torch.stack([g[r, :, :, j] for r, j, _ in owner], dim=2).flatten(2, 3)
        del gathered, g
        remote = _remote_jobs(ids, {c: i for i, (_, _, c) in enumerate(owner)}, size, causal)
        _run_jobs(acc, remote, q, remote_kv[0], remote_kv[1], scale)
        out = acc.out.to(q.dtype)
        ctx.save_for_backward(q, k, v, remote_kv, out, acc.lse)
        ctx.meta = (group, rank, world, layout, scale, local, remote, owner, size, acc.aux)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, remote_kv, out, lse = ctx.saved_tensors
        group, rank, world, layout, scale, local, remote, owner, size, aux = ctx.meta
        dout = dout.contiguous()
        acc = lse.dtype
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        d_remote = torch.zeros(remote_kv.shape, dtype=acc, device=q.device)
        _run_jobs_backward(remote, dout, q, remote_kv[0], remote_kv[1], out, lse, scale, aux,
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
        _run_jobs_backward(local, dout, q, k, v, out, lse, scale, aux, dq, dk, dv)  # overlaps it
        work.wait()
        dk += mine[0]
        dv += mine[1]
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


# ---------------------------------------------------------------------------------------------
# ring
# ---------------------------------------------------------------------------------------------

def _ring_step_jobs(rank: int, world: int, layout: str, step: int, size: int, causal: bool) -> list[Job]:
    """Blocks at ring step `step`, when this rank holds the (K, V) of rank (rank − step) mod P."""
    ids = shard_ids(rank, world, layout)
    if step == 0:
        return [_local_job(len(ids), size, causal)]
    src = shard_ids((rank - step) % world, world, layout)
    return _remote_jobs(ids, {c: i for i, c in enumerate(src)}, size, causal)


class _RingAttention(torch.autograd.Function):
    """(K, V) move r → r+1 each step, overlapped with the block on hand; bwd sends (dK, dV) along too."""

    @staticmethod
    def forward(ctx, q, k, v, group, layout: str, scale: float, causal: bool):
        rank, world = group_rank_world(group)
        size = k.shape[1] // len(shard_ids(rank, world, layout))
        acc = _Accumulator(q)
        kv = torch.stack([k, v])
        for step in range(world):
            works = []
            if step < world - 1:
                (nxt,), works = _ring_exchange([kv], group)
            _run_jobs(acc, _ring_step_jobs(rank, world, layout, step, size, causal), q, kv[0], kv[1], scale)
            _wait(works)
            if step < world - 1:
                kv = nxt
        out = acc.out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, acc.lse)
        ctx.meta = (group, rank, world, layout, scale, causal, size, acc.aux)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group, rank, world, layout, scale, causal, size, aux = ctx.meta
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
            _run_jobs_backward(_ring_step_jobs(rank, world, layout, step, size, causal), dout, q, kv[0], kv[1],
                               out, lse, scale, aux, dq, block[0], block[1])
            _wait(works)
            if step > 0:
                block += recvs[-1]
            dkv = block
            if step < world - 1:
                kv = recvs[0]
        (home,), works = _ring_exchange([dkv], group)  # after P hops the gradient of our own block comes back
        _wait(works)
        return dq.to(q.dtype), home[0].to(k.dtype), home[1].to(v.dtype), None, None, None, None


# ---------------------------------------------------------------------------------------------
# ulysses (DeepSpeed DistributedAttention)
# ---------------------------------------------------------------------------------------------

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

    def __init__(self, world: int, layout: str, scale: float, causal: bool):
        super().__init__()
        self.world, self.layout, self.scale, self.causal = world, layout, scale, causal

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.layout == "contiguous" or not self.causal:  # shard order is global order / order is moot
            return _dense_attention(q, k, v, self.scale, self.causal)
        T = q.shape[1]
        pos = torch.cat([shard_positions(T, r, self.world, self.layout, device=q.device)
                         for r in range(self.world)])  # global position of the i-th arriving token
        to_global = torch.argsort(pos)
        q, k, v = (x.index_select(1, to_global) for x in (q, k, v))
        return _dense_attention(q, k, v, self.scale, self.causal).index_select(1, pos)


def _dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """Plain (global-order) attention through SDPA on [B, T, H, D]; flash only on CUDA half precision."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    groups = q.shape[2] // k.shape[2]
    if not _use_flash(q):
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=scale,
                                              enable_gqa=groups > 1).transpose(1, 2)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # never fall back to the O(T²)-memory math kernel
        if groups > 1 and _FLASH_GQA.get("ok", True):
            try:
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=scale,
                                                      enable_gqa=True).transpose(1, 2)
            except RuntimeError as e:
                if isinstance(e, torch.OutOfMemoryError):
                    raise
                _FLASH_GQA["ok"] = False
        kt, vt = _expand_kv(k, groups).transpose(1, 2), _expand_kv(v, groups).transpose(1, 2)
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=scale).transpose(1, 2)


def _ulysses(q, k, v, group, layout: str, scale: float, causal: bool) -> torch.Tensor:
    _, world = group_rank_world(group)
    Hkv = k.shape[2]
    if Hkv % world:
        valid = [p for p in range(2, Hkv + 1) if Hkv % p == 0]
        raise ValueError(f"ulysses splits the {Hkv} kv heads over sp={world}; use sp in {valid} "
                         f"(divisors of the kv heads) or parallel.sp_attention=ring|allgather")
    _init_deepspeed_comm()
    from deepspeed.sequence.layer import DistributedAttention

    attn = DistributedAttention(_GlobalOrderAttention(world, layout, scale, causal),
                                group if group is not None else dist.group.WORLD, scatter_idx=2, gather_idx=1)
    return attn(q, k, v, 0)  # batch_dim_idx=0: [B, T, H, D]


# ---------------------------------------------------------------------------------------------
# public entry point
# ---------------------------------------------------------------------------------------------

def sp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, method: str,
                 group: dist.ProcessGroup | None = None, layout: str = "zigzag", causal: bool = True,
                 scale: float | None = None) -> torch.Tensor:
    """Softmax attention over a sequence split across the ranks of `group`.

    q: [B, T_local, Hq, D]; k, v: [B, T_local, Hkv, D] with Hq a multiple of Hkv — this rank's part
    as produced by `parallel.layout.shard_sequence(x, rank, world, layout)`. Returns this rank's
    output [B, T_local, Hq, D], equal to the matching slice of (causal, by global position)
    attention on the whole sequence, o_i = Σ_j softmax_j(scale·q_i·k_j) v_j with scale = D^−½
    by default; gradients of q, k, v likewise. `method`: "allgather", "ring" or "ulysses".
    """
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
        return _dense_attention(q, k, v, scale, causal)
    n_local = num_shards(world, layout) // world
    if q.shape[1] % n_local:
        raise ValueError(f"local sequence of {q.shape[1]} tokens does not hold {n_local} equal {layout} shards; "
                         f"use a sequence length divisible by {num_shards(world, layout)}")
    if method == "ulysses":
        return _ulysses(q, k, v, group, layout, scale, causal)
    fn = _RingAttention if method == "ring" else _AllGatherAttention
    return fn.apply(q, k, v, group, layout, scale, causal)
