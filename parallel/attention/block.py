"""Block attention with log-sum-exp, the fp32 accumulator and the plan of blocks (DESIGN §4).

A block is one (query range, key range) pair of the score matrix: `block_attention` returns its
output o_b and log-sum-exp l_b; `Accumulator` merges blocks of the same query rows in fp32
(fp64 for fp64 inputs) by l = log(e^{l1} + e^{l2}), o = e^{l1−l} o1 + e^{l2−l} o2.

Backward of a block uses the *final* o and l (flash-attention style): with P = exp(S − l),
D_i = Σ_d dO_id O_id:  dV = Pᵀ dO,  dS = P ⊙ (dO Vᵀ − D),  dQ = scale · dS K,  dK = scale · dSᵀ Q,
so block gradients simply add up. On CUDA (fp16 / bf16) blocks run the flash kernel through
`aten._scaled_dot_product_flash_attention` (which returns l); elsewhere an fp32 PyTorch path.

Also here: the jobs (blocks) a rank computes for its local and remote key shards, running them
forward and backward, and `dense_attention`, plain global-order attention through SDPA (a world
of one, Ulysses' local step), which shares the flash kernel's grouped-query probe.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.reference import state_dtype

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


class Accumulator:
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


def remote_jobs(q_ids: list[int], key_pos: dict[int, int], size: int, causal: bool) -> list[Job]:
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


def local_job(n_local: int, size: int, causal: bool) -> Job:
    """The local queries against the local keys: the shards a rank owns are stored in increasing
    global order (contiguous: one; zigzag: r < 2P−1−r), so 'causal in local order' is 'causal by position'."""
    return (slice(0, n_local * size), slice(0, n_local * size), causal)


def run_jobs(acc: Accumulator, jobs: list[Job], q, k, v, scale: float) -> None:
    for rows, cols, causal in jobs:
        o, lse, aux = block_attention(q[:, rows], k[:, cols], v[:, cols], scale, causal)
        acc.add(rows, o, lse, aux)


def run_jobs_backward(jobs: list[Job], dout, q, k, v, out, lse, scale: float, aux,
                       dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> None:
    """Add the gradients of `jobs` into dq (local rows) and dk, dv (key-buffer rows)."""
    for rows, cols, causal in jobs:
        gq, gk, gv = block_attention_backward(dout[:, rows], q[:, rows], k[:, cols], v[:, cols], out[:, rows],
                                              lse[:, :, rows], scale, causal, aux)
        dq[:, rows] += gq
        dk[:, cols] += gk
        dv[:, cols] += gv


# ---------------------------------------------------------------------------------------------
# plain attention (a world of one; Ulysses after its all-to-all)
# ---------------------------------------------------------------------------------------------

def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
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
