"""Segment states and the scan over segments: the first stage of the forward and of the backward.

Chunks are grouped into segments of L = NCS·C tokens. With Γ_{s,t} the log decay accumulated inside
segment s up to token t (inclusive), `_seg_state_kernel` forms from a zero start, in parallel over segments,

    M_s = Σ_{j∈s} e^{Γ_{s,last} − Γ_{s,j}} k_jᵀ v_j        (k, v: the state the segment adds)
    D_s = scale Σ_{i∈s} e^{Γ_{s,i}} q_iᵀ do_i              (q, do: what its outputs send to its entering state)

and `_seg_scan_kernel`, one parallel associative scan over segments, turns them in place into boundary states

    S_in(0) = S_init,          S_in(s+1)   = A_s S_in(s) + M_s        (forward)
    dS_out(NS−1) = dS_final,   dS_out(s−1) = A_s dS_out(s) + D_s      (reverse)

with A_s = exp(Σ_{t∈s} log a_t), the segment totals of `common._log_decay_cumsum` (log2 units).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.common import Plan, _arg, _chunk_decay, _empty, _head_log2_decay, _head_start


@triton.jit
def _seg_state_kernel(
    a_ptr, b_ptr, G, lam_ptr, out, T, H, NC, NCS, NS, scale,
    DA: tl.constexpr, DB: tl.constexpr, C: tl.constexpr, BA: tl.constexpr, BB: tl.constexpr,
    DECAY: tl.constexpr, QDO: tl.constexpr, PREC: tl.constexpr,
):
    """Segment-local state, zero start, tile [BA, BB] of the [DA, DB] matrix.

    QDO=False (k, v): M = e^{g_last} M + (k ⊙ e^{g_last − g})ᵀ v over the segment's chunks.
    QDO=True (q, do): D = Σ_i scale e^{Γ_i} q_iᵀ do_i with Γ the segment-local cumulative decay.
    """
    i_t = tl.program_id(0)
    i_s = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    n_bb = tl.cdiv(DB, BB)
    i_a = i_t // n_bb
    i_bb = i_t % n_bb
    offs_c = tl.arange(0, C)
    offs_a = i_a * BA + tl.arange(0, BA)
    offs_b = i_bb * BB + tl.arange(0, BB)
    ma = offs_a < DA
    mb = offs_b < DB
    a_ptr += _head_start(i_bh, T, H, DA)
    b_ptr += _head_start(i_bh, T, H, DB)
    G += i_bh * T
    lam2 = _head_log2_decay(lam_ptr, i_bh, H, DECAY)
    acc = tl.zeros([BA, BB], dtype=tl.float32)
    off = tl.full([1], 0.0, dtype=tl.float32)
    c0 = i_s * NCS
    n = tl.minimum(NCS, NC - c0)
    for i in range(0, n):
        t0 = (c0 + i) * C
        rows = t0 + offs_c
        mt = rows < T
        r64 = rows.to(tl.int64)
        ba = tl.load(a_ptr + r64[:, None] * (H * DA) + offs_a[None, :], mask=mt[:, None] & ma[None, :], other=0.0)
        bb = tl.load(b_ptr + r64[:, None] * (H * DB) + offs_b[None, :], mask=mt[:, None] & mb[None, :], other=0.0)
        if DECAY == 0:
            if QDO:
                bb = (bb * scale).to(ba.dtype)
            acc = tl.dot(tl.trans(ba), bb, acc, input_precision=PREC)
        else:
            g, g_last = _chunk_decay(G, lam2, t0, T, offs_c, C, DECAY)
            if QDO:
                w = tl.exp2(g + off) * scale
                off += g_last
                acc = tl.dot(tl.trans(ba), (bb * w[:, None]).to(bb.dtype), acc, input_precision=PREC)
            else:
                w = tl.where(mt, tl.exp2(g_last - g), 0.0)
                acc = tl.dot(tl.trans(ba), (bb * w[:, None]).to(bb.dtype), acc * tl.exp2(g_last),
                             input_precision=PREC)
    out += (i_bh * NS + i_s) * DA * DB
    tl.store(out + offs_a[:, None] * DB + offs_b[None, :], acc, mask=ma[:, None] & mb[None, :])


@triton.jit
def _lin_combine(a1, x1, a2, x2):
    """(log2 decay, state) pairs: applying step 1 then step 2."""
    return a1 + a2, x1 * tl.exp2(a2) + x2


@triton.jit
def _seg_scan_kernel(
    buf, seg_log2, init, NS, KV, NSP: tl.constexpr, E: tl.constexpr, REVERSE: tl.constexpr, HAS_INIT: tl.constexpr,
):
    """In-place scan over segments of E state elements, as one parallel associative scan.

    Forward: buf[s] ← S_in(s) where S_in(0) = init, S_in(s+1) = A_s S_in(s) + M_s (buf[s] held M_s).
    Reverse: buf[s] ← dS_out(s) where dS_out(NS−1) = init, dS_out(s−1) = A_s dS_out(s) + D_s.
    """
    i_e = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    offs_r = tl.arange(0, NSP)  # position in scan order
    offs_e = i_e * E + tl.arange(0, E)
    mr = offs_r < NS
    me = offs_e < KV
    if REVERSE:
        seg = NS - 1 - offs_r
    else:
        seg = offs_r
    m = mr[:, None] & me[None, :]
    x = tl.load(buf + (i_bh * NS + seg[:, None]) * KV + offs_e[None, :], mask=m, other=0.0)
    la = tl.load(seg_log2 + i_bh * NS + seg, mask=mr, other=0.0)
    cla, y = tl.associative_scan((tl.broadcast_to(la[:, None], [NSP, E]), x), 0, _lin_combine)
    if HAS_INIT:
        s0 = tl.load(init + i_bh * KV + offs_e, mask=me, other=0.0)
        y += tl.exp2(cla) * s0[None, :]
    else:
        s0 = tl.zeros([E], dtype=tl.float32)
    if REVERSE:
        nxt = seg - 1
        first = NS - 1
    else:
        nxt = seg + 1
        first = 0
    mn = (mr & (offs_r < NS - 1))[:, None] & me[None, :]
    tl.store(buf + (i_bh * NS + nxt[:, None]) * KV + offs_e[None, :], y, mask=mn)
    tl.store(buf + (i_bh * NS + first) * KV + offs_e, s0, mask=me)


def _scan_tile(NS: int) -> tuple[int, int, int]:
    """(padded segment count, state elements per program, warps) of the segment scan."""
    nsp = triton.next_power_of_2(NS)
    e = max(4, min(256, 4096 // nsp))
    return nsp, e, 8 if nsp * e >= 4096 else 4


def segment_states(p: Plan, a: torch.Tensor, b: torch.Tensor, G: torch.Tensor, lam: torch.Tensor,
                   qdo: bool) -> torch.Tensor:
    """Raw segment-local states [B·H, NS, K, V] fp32: M_s from (k, v), or D_s from (q, do) if qdo."""
    B, T, H, K, V, C, NC, NCS, NS = p.B, p.T, p.H, p.K, p.V, p.C, p.NC, p.NCS, p.NS
    cfg = p.cfg
    buf = _empty((B * H, NS, K, V), torch.float32, a.device)
    bk, bv = min(p.Kp, cfg.state_bk), min(p.Vp, cfg.state_bv)
    grid = (triton.cdiv(K, bk) * triton.cdiv(V, bv), NS, B * H)
    _seg_state_kernel[grid](
        a, b, G, lam, buf, T, H, NC, NCS, NS, p.scale if qdo else 1.0, DA=K, DB=V, C=C, BA=bk, BB=bv,
        DECAY=p.decay, QDO=qdo, PREC=p.prec, num_warps=cfg.state_warps, num_stages=cfg.num_stages)
    return buf


def scan_segments(p: Plan, buf: torch.Tensor, seg_log2: torch.Tensor, init: torch.Tensor | None,
                  reverse: bool) -> None:
    """Scan raw segment states buf [B·H, NS, K, V] (fp32) in place into boundary states: S_in(s) forward,
    dS_out(s) if reverse. init: S_init (forward) or dS_final (reverse), fp32 [B·H, K, V] data; None: zeros."""
    nsp, e, warps = _scan_tile(p.NS)
    _seg_scan_kernel[(triton.cdiv(p.K * p.V, e), p.B * p.H)](
        buf, seg_log2, _arg(init, buf), p.NS, p.K * p.V, NSP=nsp, E=e, REVERSE=reverse, HAS_INIT=init is not None,
        num_warps=warps)
