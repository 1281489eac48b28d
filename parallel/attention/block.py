"""Block attention with log-sum-exp, the fp32 accumulator and the plan of blocks (DESIGN §4).

A block is one (query range, key range) pair of the score matrix: `block_attention` returns its
output o_b and log-sum-exp l_b; `Accumulator` merges blocks of the same query rows in fp32
(fp64 for fp64 inputs) by l = log(e^{l1} + e^{l2}), o = e^{l1−l} o1 + e^{l2−l} o2.

Backward of a block uses the *final* o and l (flash-attention style): with P = exp(S − l),
D_i = Σ_d dO_id O_id:  dV = Pᵀ dO,  dS = P ⊙ (dO Vᵀ − D),  dQ = scale · dS K,  dK = scale · dSᵀ Q,
so block gradients simply add up. The kernel of a block is `backend` (`model.attention_backend`):
cuDNN, flash or an fp32 PyTorch path, chosen per block by `backends.choose_backend` — "auto" takes
cuDNN where it runs, else flash, else math (see `parallel/attention/backends.py`).

Also here: the jobs (blocks) a rank computes for its local and remote key shards, running them
forward and backward, and `dense_attention`, plain global-order attention (a world of one, the
single-GPU softmax mixer, Ulysses' local step) through the same entry.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.reference import state_dtype
from parallel.attention.backends import check_backend, choose_backend, kernel_backward, kernel_forward, refuse

Job = tuple[slice, slice, bool]  # (query range, key range, causal) in local / key-buffer coordinates


# ---------------------------------------------------------------------------------------------
# block attention with log-sum-exp: the one entry every method uses
# ---------------------------------------------------------------------------------------------

def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
                    backend: str = "auto"):
    """(o, l, aux) of one block: o [B, Tq, Hq, D], l = logsumexp_k(scale · q·k) [B, Hq, Tq] (fp32 / fp64).

    `causal` masks key j > query i within the block (square blocks only). `aux` ({kernel: extras})
    carries what the kernel's backward needs besides o and l; `backend`: auto | cudnn | flash | math.
    """
    while True:
        name = choose_backend(q, k, causal, backend)
        try:
            o, lse, extras = kernel_forward(name, q, k, v, scale, causal)
        except RuntimeError as e:
            refuse(name, backend, e)  # re-raises unless auto can take the next backend
            continue
        return o, lse, {name: extras}


def block_attention_backward(dout, q, k, v, out, lse, scale: float, causal: bool, aux=None, backend: str = "auto"):
    """(dq, dk, dv) of one block given the FINAL output `out` and log-sum-exp `lse` of its query rows
    (after every block of those rows was merged) and the gradient `dout` of that merged output."""
    while True:
        name = choose_backend(q, k, causal, backend)
        try:
            return kernel_backward(name, dout, q, k, v, out, lse, scale, causal, (aux or {}).get(name))
        except RuntimeError as e:
            refuse(name, backend, e)


class Accumulator:
    """Running (o, l) of every local query row, merged block by block in fp32: l = log(e^{l}+e^{l_b})."""

    def __init__(self, q: torch.Tensor):
        B, T, Hq, D = q.shape
        acc = state_dtype(q)
        self.out = torch.zeros(B, T, Hq, D, dtype=acc, device=q.device)
        self.lse = torch.full((B, Hq, T), float("-inf"), dtype=acc, device=q.device)
        self.empty = torch.ones(T, dtype=torch.bool)  # rows with no block yet (host-side bookkeeping)
        self.aux: dict = {}  # kernel → the extras of its first block (the same for every block: no dropout)

    def add(self, rows: slice, o: torch.Tensor, lse: torch.Tensor, aux: dict) -> None:
        for name, extras in aux.items():
            self.aux.setdefault(name, extras)
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


def run_jobs(acc: Accumulator, jobs: list[Job], q, k, v, scale: float, backend: str) -> None:
    for rows, cols, causal in jobs:
        o, lse, aux = block_attention(q[:, rows], k[:, cols], v[:, cols], scale, causal, backend)
        acc.add(rows, o, lse, aux)


def run_jobs_backward(jobs: list[Job], dout, q, k, v, out, lse, scale: float, aux, backend: str,
                       dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> None:
    """Add the gradients of `jobs` into dq (local rows) and dk, dv (key-buffer rows)."""
    for rows, cols, causal in jobs:
        gq, gk, gv = block_attention_backward(dout[:, rows], q[:, rows], k[:, cols], v[:, cols], out[:, rows],
                                              lse[:, :, rows], scale, causal, aux, backend)
        dq[:, rows] += gq
        dk[:, cols] += gk
        dv[:, cols] += gv


# ---------------------------------------------------------------------------------------------
# plain attention (a world of one, the single-GPU mixer; Ulysses after its all-to-all)
# ---------------------------------------------------------------------------------------------

class _WholeBlock(torch.autograd.Function):
    """The whole sequence as one block of `block_attention` (its l kept for the backward)."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float, causal: bool, backend: str):
        o, lse, aux = block_attention(q, k, v, scale, causal, backend)
        o = o.to(q.dtype)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.meta = (scale, causal, backend, aux)
        return o

    @staticmethod
    def backward(ctx, dout):
        q, k, v, o, lse = ctx.saved_tensors
        scale, causal, backend, aux = ctx.meta
        dq, dk, dv = block_attention_backward(dout.contiguous(), q, k, v, o, lse, scale, causal, aux, backend)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, causal: bool,
                    backend: str = "auto") -> torch.Tensor:
    """Plain (global-order) attention on [B, T, H, D] through the block entry: cuDNN or flash as one block;
    math → torch SDPA (memory-efficient or math kernel on CUDA; on the CPU whatever SDPA picks, as before).
    `scale` None: D^−½ as SDPA computes it."""
    check_backend(backend)
    if choose_backend(q, k, causal, backend) != "math":
        return _WholeBlock.apply(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale, causal, backend)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = q.shape[2] != k.shape[2]
    if not q.is_cuda:
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=scale, enable_gqa=gqa).transpose(1, 2)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=scale, enable_gqa=gqa).transpose(1, 2)
