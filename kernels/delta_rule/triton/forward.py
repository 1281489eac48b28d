"""Forward stages: the UT transform per chunk, the chunk sweeps and the scan over segments.

Per chunk (log2 decays g, Γ = 2^g, γ = Γ_last, K̃ = diag(γ/Γ) K; `common` for D, A, T):

    W = T diag(βΓ) K,   u = T diag(β) V                            (`_prep_kernel`, parallel over chunks)
    U = u − W S,   O = scale [diag(Γ) Q S + (Q Kᵀ ⊙ D) U],   S ← γ S + K̃ᵀ U        (`_sweep_kernel`)

`_sweep_kernel` walks the chunks of one segment for one column block of the state, in one of four modes:
OUT (outputs from the segment's entering state; the last segment writes the final state), STATES (the state
entering every chunk and U, for the backward), SUM_M (the segment's M from a zero start: the same sweep without
outputs) and SUM_P (its P: the sweep on the columns of I with u = 0, i.e. S ← γ S − K̃ᵀ W S).
`_scan_kernel` chains segments: S_in(s+1) = P_s S_in(s) + M_s forward, dS_out(s−1) = P_sᵀ dS_out(s) + Δ_s
in reverse, in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.delta_rule.triton.common import (
    _decay_matrix,
    _load_state_rows,
    _load_tok,
    _tok_tile,
    _ut_transform,
    solve_block,
    solve_precision,
    state_dtype,
)
from kernels.triton.common import Plan, _arg, _chunk_decay, _empty, _head_log2_decay, _head_start

OUT, STATES, SUM_M, SUM_P = 0, 1, 2, 3


@triton.jit
def _prep_kernel(k, v, beta, G, lam_ptr, w_out, u_out, t_out, T, H,
                 K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, LOG2C: tl.constexpr, BK: tl.constexpr,
                 BN: tl.constexpr, DECAY: tl.constexpr, PREC: tl.constexpr, STORE_T: tl.constexpr,
                 SOLVE: tl.constexpr, SOLVE_BLOCK: tl.constexpr, LOG2SB: tl.constexpr):
    """W and u of one chunk, in column blocks of BN (rows past T are written nowhere; their inputs load as 0);
    STORE_T: also Tᵀ (whole [C, C] tile, in t_out's dtype) into t_out [B·H, NC, C, C]; SOLVE_BLOCK (> 0): the
    inverse's diagonal blocks first (`_unit_lower_inverse_blocked`)."""
    i_c = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    offs_c = tl.arange(0, C)
    offs_k = tl.arange(0, BK)
    t0 = i_c * C
    rows = t0 + offs_c
    mt = rows < T
    r64 = rows.to(tl.int64)
    k += _head_start(i_bh, T, H, K)
    w_out += _head_start(i_bh, T, H, K)
    v += _head_start(i_bh, T, H, V)
    u_out += _head_start(i_bh, T, H, V)
    beta += _head_start(i_bh, T, H, 1)
    G += i_bh * T
    lam2 = _head_log2_decay(lam_ptr, i_bh, H, DECAY)
    bk = tl.load(k + r64[:, None] * (H * K) + offs_k[None, :], mask=mt[:, None] & (offs_k < K)[None, :], other=0.0)
    b = tl.load(beta + r64 * H, mask=mt, other=0.0).to(tl.float32)
    g, g_last = _chunk_decay(G, lam2, t0, T, offs_c, C, DECAY)
    Tm, A, D, kk = _ut_transform(bk, b, g, offs_c, C, LOG2C, DECAY, PREC, SOLVE, SOLVE_BLOCK, LOG2SB)
    if STORE_T:
        t_out += (i_bh * tl.num_programs(0) + i_c) * (C * C)
        tl.store(t_out + offs_c[None, :] * C + offs_c[:, None], Tm)
    Tc = Tm.to(bk.dtype)
    if DECAY == 0:
        bg = b
    else:
        bg = b * tl.exp2(g)
    for j in range(0, tl.cdiv(K, BN)):  # W = T diag(βΓ) K
        offs_n = j * BN + tl.arange(0, BN)
        ptrs = r64[:, None] * (H * K) + offs_n[None, :]
        m = mt[:, None] & (offs_n < K)[None, :]
        x = tl.load(k + ptrs, mask=m, other=0.0)
        W = tl.dot(Tc, (x * bg[:, None]).to(x.dtype), input_precision=PREC)
        tl.store(w_out + ptrs, W.to(w_out.dtype.element_ty), mask=m)
    for j in range(0, tl.cdiv(V, BN)):  # u = T diag(β) V
        offs_n = j * BN + tl.arange(0, BN)
        ptrs = r64[:, None] * (H * V) + offs_n[None, :]
        m = mt[:, None] & (offs_n < V)[None, :]
        x = tl.load(v + ptrs, mask=m, other=0.0)
        U = tl.dot(Tc, (x * b[:, None]).to(x.dtype), input_precision=PREC)
        tl.store(u_out + ptrs, U.to(u_out.dtype.element_ty), mask=m)


@triton.jit
def _sweep_kernel(q, k, w, u, G, lam_ptr, s_in, o, h_out, un_out, s_out, T, H, NC, NCS, NS, scale,
                  K: tl.constexpr, V: tl.constexpr, N: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                  BN: tl.constexpr, DECAY: tl.constexpr, MODE: tl.constexpr, LOAD_S: tl.constexpr,
                  STORE_FIN: tl.constexpr, PREC: tl.constexpr):
    """One segment, columns [i_n·BN, (i_n+1)·BN) of the [K, N] state (N = V, or K in mode SUM_P)."""
    i_n = tl.program_id(0)
    i_s = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    offs_c = tl.arange(0, C)
    offs_k = tl.arange(0, BK)
    offs_n = i_n * BN + tl.arange(0, BN)
    mk = offs_k < K
    mn = offs_n < N
    q += _head_start(i_bh, T, H, K)
    k += _head_start(i_bh, T, H, K)
    w += _head_start(i_bh, T, H, K)
    u += _head_start(i_bh, T, H, V)
    o += _head_start(i_bh, T, H, V)
    un_out += _head_start(i_bh, T, H, V)
    G += i_bh * T
    lam2 = _head_log2_decay(lam_ptr, i_bh, H, DECAY)
    tile = offs_k[:, None] * N + offs_n[None, :]
    tmask = mk[:, None] & mn[None, :]
    if MODE == 3:
        S = tl.where(tmask & (offs_k[:, None] == offs_n[None, :]), 1.0, 0.0)
    elif LOAD_S:
        S = tl.load(s_in + (i_bh * NS + i_s) * (K * N) + tile, mask=tmask, other=0.0)
    else:
        S = tl.zeros([BK, BN], dtype=tl.float32)
    c0 = i_s * NCS
    n = tl.minimum(NCS, NC - c0)
    for i in range(0, n):
        t0 = (c0 + i) * C
        rows = t0 + offs_c
        mt = rows < T
        r64 = rows.to(tl.int64)
        mck = mt[:, None] & mk[None, :]
        mcn = mt[:, None] & mn[None, :]
        bk = tl.load(k + r64[:, None] * (H * K) + offs_k[None, :], mask=mck, other=0.0)
        bw = tl.load(w + r64[:, None] * (H * K) + offs_k[None, :], mask=mck, other=0.0)
        g, g_last = _chunk_decay(G, lam2, t0, T, offs_c, C, DECAY)
        if MODE == 1:
            tl.store(h_out + ((i_bh * NC + c0 + i) * K) * N + tile, S.to(h_out.dtype.element_ty), mask=tmask)
        Un = -tl.dot(bw, S.to(bw.dtype), input_precision=PREC)
        if MODE != 3:
            Un += tl.load(u + r64[:, None] * (H * V) + offs_n[None, :], mask=mcn, other=0.0).to(tl.float32)
        if MODE == 1:
            tl.store(un_out + r64[:, None] * (H * V) + offs_n[None, :], Un.to(un_out.dtype.element_ty), mask=mcn)
        if MODE == 0:
            bq = tl.load(q + r64[:, None] * (H * K) + offs_k[None, :], mask=mck, other=0.0)
            A = tl.dot(bq, tl.trans(bk), input_precision=PREC)
            if DECAY == 0:
                A = tl.where(offs_c[:, None] >= offs_c[None, :], A * scale, 0.0)
                acc = tl.dot(bq, S.to(bq.dtype), input_precision=PREC) * scale
            else:
                A = A * _decay_matrix(g, offs_c, False) * scale
                acc = tl.dot(bq, S.to(bq.dtype), input_precision=PREC) * (tl.exp2(g) * scale)[:, None]
            acc = tl.dot(A.to(bq.dtype), Un.to(bq.dtype), acc, input_precision=PREC)
            tl.store(o + r64[:, None] * (H * V) + offs_n[None, :], acc.to(o.dtype.element_ty), mask=mcn)
        if DECAY == 0:
            S = tl.dot(tl.trans(bk), Un.to(bk.dtype), S, input_precision=PREC)
        else:
            wk = tl.where(mt, tl.exp2(g_last - g), 0.0)
            S = tl.dot(tl.trans((bk * wk[:, None]).to(bk.dtype)), Un.to(bk.dtype), S * tl.exp2(g_last),
                       input_precision=PREC)
    if MODE >= 2:
        tl.store(s_out + (i_bh * NS + i_s) * (K * N) + tile, S, mask=tmask)
    if STORE_FIN:
        if i_s == NS - 1:
            tl.store(s_out + i_bh * (K * N) + tile, S, mask=tmask)


@triton.jit
def _scan_kernel(P, X, out, init, NS, K: tl.constexpr, N: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
                 REVERSE: tl.constexpr, HAS_INIT: tl.constexpr, PREC: tl.constexpr):
    """Columns [i_n·BN, …) of the boundary states, sequentially over segments in fp32; PREC: IEEE dots for fp32
    inputs, tf32x3 for 16-bit ones (sm_90: IEEE's FMA dot spills about 7 KB per thread here, tf32x3 none).

    Forward: out[s] = S_in(s), S_in(0) = init, S_in(s+1) = P_s S_in(s) + X_s (X = M).
    Reverse: out[s] = dS_out(s), dS_out(NS−1) = init, dS_out(s−1) = P_sᵀ dS_out(s) + X_s (X = Δ)."""
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    offs_k = tl.arange(0, BK)
    offs_n = i_n * BN + tl.arange(0, BN)
    mk = offs_k < K
    tile = offs_k[:, None] * N + offs_n[None, :]
    tmask = mk[:, None] & (offs_n < N)[None, :]
    ptile = offs_k[:, None] * K + offs_k[None, :]
    pmask = mk[:, None] & mk[None, :]
    if HAS_INIT:
        S = tl.load(init + i_bh * (K * N) + tile, mask=tmask, other=0.0)
    else:
        S = tl.zeros([BK, BN], dtype=tl.float32)
    for i in range(0, NS):
        if REVERSE:
            s = NS - 1 - i
        else:
            s = i
        tl.store(out + (i_bh * NS + s) * (K * N) + tile, S, mask=tmask)
        Ps = tl.load(P + (i_bh * NS + s) * (K * K) + ptile, mask=pmask, other=0.0)
        if REVERSE:
            Ps = tl.trans(Ps)
        Xs = tl.load(X + (i_bh * NS + s) * (K * N) + tile, mask=tmask, other=0.0)
        S = tl.dot(Ps, S, Xs, input_precision=PREC)


@triton.jit
def _out_kernel(q, k, un, h, G, lam_ptr, o, T, H, NC, scale, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                BK: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr, PREC: tl.constexpr):
    """O = scale [diag(Γ) Q S + (Q Kᵀ ⊙ D) U] of one chunk and columns [i_v·BV, …) from its entering state S (h) and
    U (un), both written by the STATES sweep; K in blocks of BK (out_split)."""
    i_v = tl.program_id(0)
    i_c = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    offs_c = tl.arange(0, C)
    t0 = i_c * C
    v0 = i_v * BV
    lam2 = _head_log2_decay(lam_ptr, i_bh, H, DECAY)
    st = i_bh * NC + i_c
    A = tl.zeros([C, C], dtype=tl.float32)
    acc = tl.zeros([C, BV], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        bq = _load_tok(q, i_bh, T, H, K, t0, i_k * BK, C, BK)
        bk = _load_tok(k, i_bh, T, H, K, t0, i_k * BK, C, BK)
        bh = _load_state_rows(h, st, K, V, i_k * BK, v0, BK, BV)
        A = tl.dot(bq, tl.trans(bk), A, input_precision=PREC)
        acc = tl.dot(bq, bh.to(bq.dtype), acc, input_precision=PREC)
    g, g_last = _chunk_decay(G + i_bh * T, lam2, t0, T, offs_c, C, DECAY)
    if DECAY == 0:
        A = tl.where(offs_c[:, None] >= offs_c[None, :], A * scale, 0.0)
        acc = acc * scale
    else:
        A = A * _decay_matrix(g, offs_c, False) * scale
        acc = acc * (tl.exp2(g) * scale)[:, None]
    bu = _load_tok(un, i_bh, T, H, V, t0, v0, C, BV)
    acc = tl.dot(A.to(bu.dtype), bu, acc, input_precision=PREC)
    p, m = _tok_tile(o, i_bh, T, H, V, t0, v0, C, BV)
    tl.store(p, acc.to(o.dtype.element_ty), mask=m)


def prepare(p: Plan, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, G: torch.Tensor,
            lam: torch.Tensor, t_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """W [B, T, H, K] and u [B, T, H, V] of every chunk (the UT transform), in `state_dtype(k)`; with t_out
    ([B·H, NC, C, C], `backward.t_buffer`), every chunk's Tᵀ too."""
    dt = state_dtype(k)
    w = _empty(tuple(k.shape), dt, k.device)
    u = _empty(tuple(v.shape), dt, k.device)
    sb = solve_block(p.cfg, p.C)
    _prep_kernel[(p.NC, p.B * p.H)](
        k, v, beta, G, lam, w, u, _arg(t_out, w), p.T, p.H, K=p.K, V=p.V, C=p.C, LOG2C=p.C.bit_length() - 1,
        BK=p.Kp, BN=min(p.Kp, p.Vp, p.cfg.prep_bn), DECAY=p.decay, PREC=p.prec, STORE_T=t_out is not None,
        SOLVE=solve_precision(p.prec, p.cfg), SOLVE_BLOCK=sb, LOG2SB=max(sb, 1).bit_length() - 1,
        num_warps=p.cfg.prep_warps)
    return w, u


def sweep(p: Plan, mode: int, q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, u: torch.Tensor, G: torch.Tensor,
          lam: torch.Tensor, s_in: torch.Tensor | None = None, need_final: bool = False) -> tuple:
    """One launch of `_sweep_kernel` over every (column block, segment, head).

    OUT → (o, final state or None); STATES → (chunk-entering states [B·H, NC, K, V], U [B, T, H, V]);
    SUM_M / SUM_P → the segments' M [B·H, NS, K, V] / P [B·H, NS, K, K] (fp32). s_in: boundary states
    [B·H, NS, K, V] fp32 (OUT, STATES) or None (zero start)."""
    B, H, K, V, NS = p.B, p.H, p.K, p.V, p.NS
    dev, cfg = q.device, p.cfg
    N = K if mode == SUM_P else V
    bn = min(_pow2_cols(N), cfg.sweep_bv)
    o = h = un = s_out = None
    if mode == OUT:
        o = _empty((B, p.T, H, V), q.dtype, dev)
        s_out = _empty((B, H, K, V), torch.float32, dev) if need_final else None
    elif mode == STATES:
        h = _empty((B * H, p.NC, K, V), state_dtype(q), dev)
        un = _empty((B, p.T, H, V), state_dtype(q), dev)
        s_out = _empty((B, H, K, V), torch.float32, dev) if need_final else None
    else:
        s_out = _empty((B * H, NS, K, N), torch.float32, dev)
    stand_in = w
    _sweep_kernel[(triton.cdiv(N, bn), NS, B * H)](
        q, k, w, u, G, lam, _arg(s_in, stand_in), _arg(o, stand_in), _arg(h, stand_in), _arg(un, stand_in),
        _arg(s_out, stand_in), p.T, H, p.NC, p.NCS, NS, p.scale, K=K, V=V, N=N, C=p.C, BK=p.Kp, BN=bn,
        DECAY=p.decay, MODE=mode, LOAD_S=s_in is not None, STORE_FIN=mode <= STATES and need_final, PREC=p.prec,
        num_warps=cfg.sweep_warps, num_stages=cfg.num_stages)
    if mode == OUT:
        return o, s_out
    if mode == STATES:
        return (h, un, s_out) if need_final else (h, un)
    return s_out


def outputs(p: Plan, q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, u: torch.Tensor, G: torch.Tensor,
            lam: torch.Tensor, s_in: torch.Tensor | None, need_final: bool = False) -> tuple:
    """(o, final state or None) from the segments' entering states: the OUT sweep, or with cfg.out_split the
    STATES sweep (every chunk's entering state and U) and the chunk-parallel `_out_kernel`."""
    if not p.cfg.out_split:
        return sweep(p, OUT, q, k, w, u, G, lam, s_in, need_final)
    h, un, final = sweep(p, STATES, q, k, w, u, G, lam, s_in, True)
    bv = min(p.Vp, p.cfg.out_bv)
    o = _empty((p.B, p.T, p.H, p.V), q.dtype, q.device)
    _out_kernel[(triton.cdiv(p.V, bv), p.NC, p.B * p.H)](
        q, k, un, h, G, lam, o, p.T, p.H, p.NC, p.scale, K=p.K, V=p.V, C=p.C, BK=min(p.Kp, 64), BV=bv,
        DECAY=p.decay, PREC=p.prec, num_warps=p.cfg.out_warps, num_stages=p.cfg.num_stages)
    return o, (final if need_final else None)


def scan(p: Plan, P: torch.Tensor, X: torch.Tensor, init: torch.Tensor | None, reverse: bool) -> torch.Tensor:
    """Boundary states [B·H, NS, K, V] fp32 from the segments' P [B·H, NS, K, K] and X [B·H, NS, K, V]:
    S_in(s) forward from init = S_init, dS_out(s) in reverse from init = dS_final (None: zeros)."""
    bn = min(_pow2_cols(p.V), p.cfg.scan_bn)
    out = _empty((p.B * p.H, p.NS, p.K, p.V), torch.float32, X.device)
    _scan_kernel[(triton.cdiv(p.V, bn), p.B * p.H)](
        P, X, out, _arg(init, X), p.NS, K=p.K, N=p.V, BK=p.Kp, BN=bn, REVERSE=reverse, HAS_INIT=init is not None,
        PREC="ieee" if p.prec == "ieee" else "tf32x3", num_warps=p.cfg.scan_warps)
    return out


def _pow2_cols(n: int) -> int:
    return max(16, triton.next_power_of_2(n))
