"""Backward stages: the reverse chunk sweep (dS, dU) and the chunk-parallel gradient kernel.

Per chunk, with S / dS_out the state entering / gradient leaving it (notation of `forward`):

    dU    = scale (Q Kᵀ ⊙ D)ᵀ dO + K̃ dS_out
    dS_in = scale (diag(Γ) Q)ᵀ dO + γ dS_out − Wᵀ dU                                   (`_bwd_sweep_kernel`)

and, from the chunk's S, dS_out, U, dU (`_grad_kernel`, parallel over chunks; persistent programs, each with a
[C, C] scratch through which the transposes of T, dP ⊙ D and R go), with dP = dO Uᵀ:

    dQ = scale [diag(Γ) dO Sᵀ + (dP ⊙ D) K]
    dK = scale (dP ⊙ D)ᵀ Q + diag(γ/Γ) U dS_outᵀ + diag(βΓ) Tᵀ dW + R K + Rᵀ K,     dW = −dU Sᵀ
    dV = diag(β) Tᵀ dU
    dT = dW (diag(βΓ) K)ᵀ + dU (diag(β) V)ᵀ,   dA = −Tᵀ dT Tᵀ (strictly lower),   R = dA ⊙ D ⊙ β 1ᵀ
    dβ_i = Γ_i k_i·(Tᵀ dW)_i + v_i·(Tᵀ dU)_i + Σ_j dA_ij D_ij (k_i·k_j)

The decay gradient: with ∂L/∂G_i the derivative by the chunk-local cumulative log decay (every factor above is
e^{±G}: the inter-chunk output q_i·dq_i^inter, the intra-chunk M = scale (Q Kᵀ) ⊙ dP ⊙ D as Σ_j M_ij − Σ_l M_li,
the state's K̃ as −n_j with n_j = k_j·dK̃_j, the W operand β_iΓ_i k_i·(Tᵀ dW)_i, A as Σ_j (dA ⊙ A)_ij − Σ_l (dA ⊙ A)_li,
and, at the chunk's last token, γ⟨S, dS_out⟩ + Σ_j n_j), d log a_t = Σ_{i ≥ t in its chunk} ∂L/∂G_i: every path
to later chunks goes through S_out, so the suffix sums stay inside one chunk.

`_grad_kernel` holds all of K: the [C, K] fp32 accumulators and the T it solves again spill at chunk 64. The opt-in
`_grad_kb_kernel` (DeltaConfig.grad_block_k > 0) computes the same quantities with K in blocks: Tᵀ comes from the
backward's `_prep_kernel` (a transient [B·H, NC, C, C] buffer, `t_buffer`: fp32, or the 16-bit input dtype under
DeltaConfig.wy_16bit, which also puts the products through T on 16-bit operands); a V pass accumulates only [C, C]
tiles, dP and dTᵀ = (diag(β) V − diag(βΓ) K S) dUᵀ (dT's W share without ever holding dW), and writes dV; then
dAᵀ = −T dTᵀ T,
Rᵀ, dP ⊙ D (to a per-program [2, C, C] scratch, read back in both orientations), K Kᵀ, Q Kᵀ and the [C, C] shares
of dβ and ∂L/∂G (transposed forms: no `tl.trans` of a dot's result, see `_transposed`); then per block of K
columns a V pass for dO Sᵀ, U dS_outᵀ, dU Sᵀ on [C, BK] and that block of dQ, dK and its shares of dβ
(Γ_i k_i·(Tᵀ dW)_i) and ∂L/∂G.

The split path (DeltaConfig.grad_split) runs `_grad_qk_kernel`, then one of two WY kernels (DeltaConfig.wy_kernel):
`_grad_wy_kernel` (persistent, a per-program scratch) or `_grad_wy2_kernel` (one program per chunk, no scratch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.delta_rule.triton.common import (
    _decay_matrix,
    _load_state,
    _load_state_rows,
    _load_tok,
    _tok_tile,
    _ut_transform,
    solve_precision,
    state_dtype,
)
from kernels.triton.common import Plan, _arg, _chunk_decay, _empty, _head_log2_decay, _head_start, _pow2

DELTA, FULL = 0, 1


@triton.jit
def _du_local_kernel(q, k, do, G, lam_ptr, du_loc, T, H, scale, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                     BK: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr, PREC: tl.constexpr):
    """The chunk-local share of dU, scale (Q Kᵀ ⊙ D)ᵀ dO, of one chunk and columns [i_v·BV, …) (bwd_split): the
    backward sweeps then add only K̃ dS_out, one product fewer in their sequential chain."""
    i_v = tl.program_id(0)
    i_c = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    offs_c = tl.arange(0, C)
    t0 = i_c * C
    At = tl.zeros([C, C], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        bk = _load_tok(k, i_bh, T, H, K, t0, i_k * BK, C, BK)
        bq = _load_tok(q, i_bh, T, H, K, t0, i_k * BK, C, BK)
        At = tl.dot(bk, tl.trans(bq), At, input_precision=PREC)  # [j, i] = k_j·q_i
    g, g_last = _chunk_decay(G + i_bh * T, _head_log2_decay(lam_ptr, i_bh, H, DECAY), t0, T, offs_c, C, DECAY)
    At = At * _transposed_decay(g, offs_c, DECAY) * scale
    bdo = _load_tok(do, i_bh, T, H, V, t0, i_v * BV, C, BV)
    dU = tl.dot(At.to(bdo.dtype), bdo, input_precision=PREC)
    p, m = _tok_tile(du_loc, i_bh, T, H, V, t0, i_v * BV, C, BV)
    tl.store(p, dU.to(du_loc.dtype.element_ty), mask=m)


@triton.jit
def _bwd_sweep_kernel(q, k, w, do, G, lam_ptr, ds_in, dh_out, du_out, ds_end, du_loc, T, H, NC, NCS, NS, scale,
                      K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      DECAY: tl.constexpr, MODE: tl.constexpr, LOAD_S: tl.constexpr, STORE_DS0: tl.constexpr,
                      LOCAL: tl.constexpr, PREC: tl.constexpr):
    """One segment, columns [i_v·BV, …) of dS, backward over its chunks.

    DELTA: from dS_out = 0, stores the segment's Δ_s (the gradient reaching its entering state) in ds_end.
    FULL: from dS_out(s) (ds_in), stores every chunk's dS_out and dU; segment 0 stores dS_init in ds_end.
    LOCAL: the chunk-local share of dU, scale (Q Kᵀ ⊙ D)ᵀ dO, is read from du_loc (`_du_local_kernel`, bwd_split)
    instead of computed in the sweep."""
    i_v = tl.program_id(0)
    i_s = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    offs_c = tl.arange(0, C)
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mk = offs_k < K
    mv = offs_v < V
    q += _head_start(i_bh, T, H, K)
    k += _head_start(i_bh, T, H, K)
    w += _head_start(i_bh, T, H, K)
    do += _head_start(i_bh, T, H, V)
    du_out += _head_start(i_bh, T, H, V)
    du_loc += _head_start(i_bh, T, H, V)
    G += i_bh * T
    lam2 = _head_log2_decay(lam_ptr, i_bh, H, DECAY)
    tile = offs_k[:, None] * V + offs_v[None, :]
    tmask = mk[:, None] & mv[None, :]
    if LOAD_S:
        dS = tl.load(ds_in + (i_bh * NS + i_s) * (K * V) + tile, mask=tmask, other=0.0)
    else:
        dS = tl.zeros([BK, BV], dtype=tl.float32)
    c0 = i_s * NCS
    n = tl.minimum(NCS, NC - c0)
    for i in range(0, n):
        c = c0 + n - 1 - i
        t0 = c * C
        rows = t0 + offs_c
        mt = rows < T
        r64 = rows.to(tl.int64)
        mck = mt[:, None] & mk[None, :]
        mcv = mt[:, None] & mv[None, :]
        bq = tl.load(q + r64[:, None] * (H * K) + offs_k[None, :], mask=mck, other=0.0)
        bk = tl.load(k + r64[:, None] * (H * K) + offs_k[None, :], mask=mck, other=0.0)
        bw = tl.load(w + r64[:, None] * (H * K) + offs_k[None, :], mask=mck, other=0.0)
        bdo = tl.load(do + r64[:, None] * (H * V) + offs_v[None, :], mask=mcv, other=0.0)
        if MODE == 1:
            tl.store(dh_out + ((i_bh * NC + c) * K) * V + tile, dS.to(dh_out.dtype.element_ty), mask=tmask)
        if LOCAL:
            dU = tl.load(du_loc + r64[:, None] * (H * V) + offs_v[None, :], mask=mcv, other=0.0).to(tl.float32)
        else:
            dU = tl.zeros([C, BV], dtype=tl.float32)
        g, g_last = _chunk_decay(G, lam2, t0, T, offs_c, C, DECAY)
        if DECAY == 0:
            dU = tl.dot(bk, dS.to(bk.dtype), dU, input_precision=PREC)
            qs = (bq * scale).to(bq.dtype)
            decay_last = 1.0
        else:
            wk = tl.where(mt, tl.exp2(g_last - g), 0.0)
            dU = tl.dot((bk * wk[:, None]).to(bk.dtype), dS.to(bk.dtype), dU, input_precision=PREC)
            qs = (bq * (tl.exp2(g) * scale)[:, None]).to(bq.dtype)
            decay_last = tl.exp2(g_last)
        if not LOCAL:
            At = tl.dot(bk, tl.trans(bq), input_precision=PREC) * _transposed_decay(g, offs_c, DECAY) * scale
            dU = tl.dot(At.to(bdo.dtype), bdo, dU, input_precision=PREC)  # At[j, i] = scale k_j·q_i D_ij
        if MODE == 1:
            tl.store(du_out + r64[:, None] * (H * V) + offs_v[None, :], dU.to(du_out.dtype.element_ty), mask=mcv)
        dS = tl.dot(tl.trans(qs), bdo, dS * decay_last, input_precision=PREC)
        dS = dS - tl.dot(tl.trans(bw), dU.to(bw.dtype), input_precision=PREC)
    if MODE == 0:
        tl.store(ds_end + (i_bh * NS + i_s) * (K * V) + tile, dS, mask=tmask)
    if STORE_DS0:
        if i_s == 0:
            tl.store(ds_end + i_bh * (K * V) + tile, dS, mask=tmask)


@triton.jit
def _transposed(scratch, x, C: tl.constexpr):
    """xᵀ of a [C, C] tile through this program's scratch in global memory (L1/L2-resident; xᵀ comes back in the
    scratch's dtype). Never `tl.trans`
    of a dot's result feeding another dot: Triton 3.4–3.7.0 miscompiles that on Hopper (fla issue #640)."""
    offs = tl.arange(0, C)
    tl.debug_barrier()  # every thread is done with the previous use of the scratch
    tl.store(scratch + offs[:, None] * C + offs[None, :], x)
    tl.debug_barrier()
    return tl.load(scratch + offs[None, :] * C + offs[:, None])


@triton.jit
def _grad_tile(tile, NC, T, H, C: tl.constexpr, offs_c, beta, lam_ptr, DECAY: tl.constexpr):
    """Where a gradient kernel's tile is: (b·h, first token, its rows, their mask, the head's offset in a [B, T, H]
    tensor, the head's log2 decay, β of the rows)."""
    i_bh = (tile // NC).to(tl.int64)
    t0 = (tile % NC) * C
    rows = t0 + offs_c
    mt = rows < T
    hb = _head_start(i_bh, T, H, 1)
    lam2 = _head_log2_decay(lam_ptr, i_bh, H, DECAY)
    b = tl.load(beta + hb + rows.to(tl.int64) * H, mask=mt, other=0.0).to(tl.float32)
    return i_bh, t0, rows, mt, hb, lam2, b


@triton.jit
def _chunk_scales(G, lam2, i_bh, t0, T, offs_c, mt, C: tl.constexpr, DECAY: tl.constexpr):
    """(g, Γ, γ/Γ, γ) of a gradient kernel's chunk: its log2 decays and the row scales (0 on rows past T)."""
    g, g_last = _chunk_decay(G + i_bh * T, lam2, t0, T, offs_c, C, DECAY)
    if DECAY == 0:
        return g, tl.where(mt, 1.0, 0.0), tl.where(mt, 1.0, 0.0), 1.0
    return g, tl.where(mt, tl.exp2(g), 0.0), tl.where(mt, tl.exp2(g_last - g), 0.0), tl.exp2(g_last)


@triton.jit
def _grad_kernel(q, k, v, beta, G, lam_ptr, do, un, du, h, dh, dq, dk, dv, dbeta, dloga, scratch, T, H, NC, n_tiles,
                 scale, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, LOG2C: tl.constexpr, BK: tl.constexpr,
                 BV: tl.constexpr, DECAY: tl.constexpr, NEED_DG: tl.constexpr, PREC: tl.constexpr,
                 SOLVE: tl.constexpr):
    """dq, dk, dv, dβ and d log a of chunks pid, pid + P, … (persistent: the scratch is per program). All of K; V in
    blocks of BV: one pass for the products with dO, U, dU, S, dS_out, one for dV = diag(β) Tᵀ dU."""
    offs_c = tl.arange(0, C)
    scratch += tl.program_id(0).to(tl.int64) * (C * C)
    for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        i_bh, t0, rows, mt, hb, lam2, b = _grad_tile(tile, NC, T, H, C, offs_c, beta, lam_ptr, DECAY)
        dP = tl.zeros([C, C], dtype=tl.float32)
        dTv = tl.zeros([C, C], dtype=tl.float32)
        dQi = tl.zeros([C, BK], dtype=tl.float32)
        dKs = tl.zeros([C, BK], dtype=tl.float32)
        dWm = tl.zeros([C, BK], dtype=tl.float32)
        sds = tl.zeros([BK], dtype=tl.float32)
        st = i_bh * NC + tile % NC
        for i_v in range(0, tl.cdiv(V, BV)):
            v0 = i_v * BV
            bdo = _load_tok(do, i_bh, T, H, V, t0, v0, C, BV)
            bu = _load_tok(un, i_bh, T, H, V, t0, v0, C, BV)
            bdu = _load_tok(du, i_bh, T, H, V, t0, v0, C, BV)
            bv = _load_tok(v, i_bh, T, H, V, t0, v0, C, BV)
            bh = _load_state(h, st, K, V, v0, BK, BV)
            bdh = _load_state(dh, st, K, V, v0, BK, BV)
            dP = tl.dot(bdo, tl.trans(bu.to(bdo.dtype)), dP, input_precision=PREC)
            dQi = tl.dot(bdo, tl.trans(bh.to(bdo.dtype)), dQi, input_precision=PREC)
            dKs = tl.dot(bu, tl.trans(bdh), dKs, input_precision=PREC)
            dWm = tl.dot(bdu, tl.trans(bh), dWm, input_precision=PREC)
            dTv = tl.dot(bdu, tl.trans((bv * b[:, None]).to(bdu.dtype)), dTv, input_precision=PREC)
            if NEED_DG:
                sds += tl.sum(bh.to(tl.float32) * bdh.to(tl.float32), 1)
        bq = _load_tok(q, i_bh, T, H, K, t0, 0, C, BK)
        bk = _load_tok(k, i_bh, T, H, K, t0, 0, C, BK)
        g, g_last = _chunk_decay(G + i_bh * T, lam2, t0, T, offs_c, C, DECAY)
        Tm, A, D, kk = _ut_transform(bk, b, g, offs_c, C, LOG2C, DECAY, PREC, SOLVE, 0, 0)
        Tt = _transposed(scratch, Tm, C)
        if DECAY == 0:
            Gam = tl.where(mt, 1.0, 0.0)
            kg = Gam
            gamma = 1.0
        else:
            Gam = tl.where(mt, tl.exp2(g), 0.0)
            kg = tl.where(mt, tl.exp2(g_last - g), 0.0)
            gamma = tl.exp2(g_last)
        bg = b * Gam
        # dq, and the shares of d log a that need q (then q is dead)
        dPD = dP * D * scale
        dq_inter = dQi * (Gam * scale)[:, None]
        gq = dq_inter + tl.dot(dPD.to(bk.dtype), bk, input_precision=PREC)
        pk, mk = _tok_tile(dq, i_bh, T, H, K, t0, 0, C, BK)
        tl.store(pk, gq.to(dq.dtype.element_ty), mask=mk)
        if NEED_DG:
            M = tl.dot(bq, tl.trans(bk), input_precision=PREC) * dPD
            dg = tl.sum(bq.to(tl.float32) * dq_inter, 1) + tl.sum(M, 1) - tl.sum(M, 0)
        gk = tl.dot(_transposed(scratch, dPD, C).to(bq.dtype), bq, input_precision=PREC)
        # the state's K̃ = diag(γ/Γ) K, then W = T diag(βΓ) K
        dKs = dKs * kg[:, None]
        gk += dKs
        dW = -dWm
        dBk = tl.dot(Tt, dW, input_precision=PREC)
        kdBk = tl.sum(dBk * bk.to(tl.float32), 1)
        gk += dBk * bg[:, None]
        dT = tl.dot(dW, tl.trans(bk.to(tl.float32) * bg[:, None]), dTv, input_precision=PREC)
        # A = (β_i D_ij k_i·k_j)_{i>j} through T = (I + A)⁻¹
        dA = -tl.dot(tl.dot(Tt, dT, input_precision=PREC), Tt, input_precision=PREC)
        dA = tl.where(offs_c[:, None] > offs_c[None, :], dA, 0.0)
        Y = dA * kk * D  # dβ_i's share Σ_j Y_ij; (dA ⊙ A) = Y ⊙ β 1ᵀ
        db = Gam * kdBk + tl.sum(Y, 1)
        R = dA * D * b[:, None]
        gk = tl.dot(R.to(bk.dtype), bk, gk, input_precision=PREC)
        gk = tl.dot(_transposed(scratch, R, C).to(bk.dtype), bk, gk, input_precision=PREC)
        pk, mk = _tok_tile(dk, i_bh, T, H, K, t0, 0, C, BK)
        tl.store(pk, gk.to(dk.dtype.element_ty), mask=mk)
        if NEED_DG:
            E = Y * b[:, None]
            nj = tl.sum(bk.to(tl.float32) * dKs, 1)
            dg += tl.sum(E, 1) - tl.sum(E, 0) + bg * kdBk - nj
            n_valid = tl.minimum(T - t0, C)
            dg += tl.where(offs_c == n_valid - 1, gamma * tl.sum(sds, 0) + tl.sum(nj, 0), 0.0)
            dg = tl.where(mt, dg, 0.0)
            tl.store(dloga + i_bh * T + rows, tl.cumsum(dg, 0, reverse=True), mask=mt)
        Tc = Tt.to(dv.dtype.element_ty)
        for i_v in range(0, tl.cdiv(V, BV)):  # dV = diag(β) Tᵀ dU, and dβ's share v·(Tᵀ dU)
            v0 = i_v * BV
            bdu = _load_tok(du, i_bh, T, H, V, t0, v0, C, BV)
            bv = _load_tok(v, i_bh, T, H, V, t0, v0, C, BV)
            dBv = tl.dot(Tc, bdu.to(Tc.dtype), input_precision=PREC)
            pv, mv = _tok_tile(dv, i_bh, T, H, V, t0, v0, C, BV)
            tl.store(pv, (dBv * b[:, None]).to(dv.dtype.element_ty), mask=mv)
            db += tl.sum(dBv * bv.to(tl.float32), 1)
        tl.store(dbeta + hb + rows.to(tl.int64) * H, db.to(dbeta.dtype.element_ty), mask=mt)


@triton.jit
def _state_products(do, un, du, h, dh, i_bh, st, T, H, K: tl.constexpr, V: tl.constexpr, t0, k0, C: tl.constexpr,
                    BK: tl.constexpr, BV: tl.constexpr, NEED_DG: tl.constexpr, PREC: tl.constexpr):
    """Rows [k0, k0 + BK) of the state's side of a chunk's gradient, summed over V in blocks of BV: (dO Sᵀ, U dS_outᵀ,
    dU Sᵀ) as [C, BK] fp32 and Σ_v S ⊙ dS_out per row [BK] (zeros unless NEED_DG)."""
    dQi = tl.zeros([C, BK], dtype=tl.float32)
    dKs = tl.zeros([C, BK], dtype=tl.float32)
    dWm = tl.zeros([C, BK], dtype=tl.float32)
    sds = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        v0 = i_v * BV
        bdo = _load_tok(do, i_bh, T, H, V, t0, v0, C, BV)
        bu = _load_tok(un, i_bh, T, H, V, t0, v0, C, BV)
        bdu = _load_tok(du, i_bh, T, H, V, t0, v0, C, BV)
        bh = _load_state_rows(h, st, K, V, k0, v0, BK, BV)
        bdh = _load_state_rows(dh, st, K, V, k0, v0, BK, BV)
        dQi = tl.dot(bdo, tl.trans(bh.to(bdo.dtype)), dQi, input_precision=PREC)
        dKs = tl.dot(bu, tl.trans(bdh), dKs, input_precision=PREC)
        dWm = tl.dot(bdu, tl.trans(bh), dWm, input_precision=PREC)
        if NEED_DG:
            sds += tl.sum(bh.to(tl.float32) * bdh.to(tl.float32), 1)
    return dQi, dKs, dWm, sds


@triton.jit
def _dv_block(dv, Tc, bdu, bv, b, i_bh, T, H, V: tl.constexpr, t0, v0, C: tl.constexpr, BV: tl.constexpr,
              PREC: tl.constexpr):
    """Stores dV = diag(β) Tᵀ dU on columns [v0, v0 + BV) (Tc: Tᵀ in dv's dtype); returns dβ's share v·(Tᵀ dU)."""
    dBv = tl.dot(Tc, bdu.to(Tc.dtype), input_precision=PREC)
    pv, mv = _tok_tile(dv, i_bh, T, H, V, t0, v0, C, BV)
    tl.store(pv, (dBv * b[:, None]).to(dv.dtype.element_ty), mask=mv)
    return tl.sum(dBv * bv.to(tl.float32), 1)


@triton.jit
def _dA_transposed(tb, dTt, C: tl.constexpr, PREC: tl.constexpr):
    """dAᵀ = −T dTᵀ T of dA = −Tᵀ dT Tᵀ, with T read from the chunk's stored Tᵀ at tb: both products with operands in
    the buffer's dtype and fp32 accumulation (fp32: tf32 or IEEE dots by PREC; 16-bit, `t_buffer` under
    DeltaConfig.wy_16bit: dTᵀ and the intermediate T dTᵀ rounded to it, as flash-linear-attention's WY backward)."""
    offs = tl.arange(0, C)
    Tn = tl.load(tb + offs[None, :] * C + offs[:, None])
    X = tl.dot(Tn, dTt.to(Tn.dtype), input_precision=PREC)
    return -tl.dot(X.to(Tn.dtype), Tn, input_precision=PREC)


@triton.jit
def _grad_kb_kernel(q, k, v, beta, G, lam_ptr, do, un, du, h, dh, tt, dq, dk, dv, dbeta, dloga, scratch, T, H, NC,
                    n_tiles, scale, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                    BV: tl.constexpr, DECAY: tl.constexpr, NEED_DG: tl.constexpr, PREC: tl.constexpr):
    """`_grad_kernel`'s results with K in blocks of BK and Tᵀ read from tt (persistent; a [2, C, C] fp32 scratch per
    program holds dP ⊙ D and Rᵀ, read back in both orientations). Per chunk: a V loop with [C, C] accumulators only
    (dP, dTᵀ = (diag(β) V − diag(βΓ) K S) dUᵀ) that also writes dV; dAᵀ = −T dTᵀ T (dA's transpose: no `tl.trans`
    of a dot's result, see `_transposed`), Rᵀ, K Kᵀ, Q Kᵀ over K blocks and the per-row sums; then per K block a
    V loop for dO Sᵀ, U dS_outᵀ, dU Sᵀ on [C, BK] and that block of dq, dk."""
    offs_c = tl.arange(0, C)
    cc = offs_c[:, None] * C + offs_c[None, :]
    cct = offs_c[None, :] * C + offs_c[:, None]
    scratch += tl.program_id(0).to(tl.int64) * (2 * C * C)
    for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        i_bh, t0, rows, mt, hb, lam2, b = _grad_tile(tile, NC, T, H, C, offs_c, beta, lam_ptr, DECAY)
        g, Gam, kg, gamma = _chunk_scales(G, lam2, i_bh, t0, T, offs_c, mt, C, DECAY)
        bg = b * Gam
        st = i_bh * NC + tile % NC
        tb = tt + st * (C * C)
        # pass 1: [C, C] accumulators; dV = diag(β) Tᵀ dU and dβ's share v·(Tᵀ dU) on the way
        dP = tl.zeros([C, C], dtype=tl.float32)
        dTt = tl.zeros([C, C], dtype=tl.float32)
        db = tl.zeros([C], dtype=tl.float32)
        Tc = tl.load(tb + cc).to(dv.dtype.element_ty)
        for i_v in range(0, tl.cdiv(V, BV)):
            v0 = i_v * BV
            bdo = _load_tok(do, i_bh, T, H, V, t0, v0, C, BV)
            bu = _load_tok(un, i_bh, T, H, V, t0, v0, C, BV)
            bdu = _load_tok(du, i_bh, T, H, V, t0, v0, C, BV)
            bv = _load_tok(v, i_bh, T, H, V, t0, v0, C, BV)
            dP = tl.dot(bdo, tl.trans(bu.to(bdo.dtype)), dP, input_precision=PREC)
            KS = tl.zeros([C, BV], dtype=tl.float32)  # diag(βΓ) K S, S's rows in blocks of BK
            for i_k in range(0, tl.cdiv(K, BK)):
                bk = _load_tok(k, i_bh, T, H, K, t0, i_k * BK, C, BK)
                bh = _load_state_rows(h, st, K, V, i_k * BK, v0, BK, BV)
                KS = tl.dot((bk * bg[:, None]).to(bh.dtype), bh, KS, input_precision=PREC)
            # dTᵀ of dT = dW (diag(βΓ) K)ᵀ + dU (diag(β) V)ᵀ with dW = −dU Sᵀ
            dTt = tl.dot((bv * b[:, None] - KS).to(bdu.dtype), tl.trans(bdu), dTt, input_precision=PREC)
            db += _dv_block(dv, Tc, bdu, bv, b, i_bh, T, H, V, t0, v0, C, BV, PREC)
        dAt = _dA_transposed(tb, dTt, C, PREC)
        if DECAY == 0:
            dPD = tl.where(offs_c[:, None] >= offs_c[None, :], dP * scale, 0.0)
            dADt = tl.where(offs_c[:, None] < offs_c[None, :], dAt, 0.0)
        else:
            dPD = dP * _decay_matrix(g, offs_c, False) * scale
            # (dA ⊙ D)ᵀ, dA strictly lower
            dADt = dAt * tl.exp2(tl.where(offs_c[:, None] < offs_c[None, :], g[None, :] - g[:, None], float("-inf")))
        tl.debug_barrier()  # every thread is done with the previous chunk's scratch
        tl.store(scratch + cc, dPD)
        tl.store(scratch + C * C + cc, dADt * b[None, :])  # Rᵀ
        tl.debug_barrier()
        kk = tl.zeros([C, C], dtype=tl.float32)
        qk = tl.zeros([C, C], dtype=tl.float32)
        for i_k in range(0, tl.cdiv(K, BK)):
            bk = _load_tok(k, i_bh, T, H, K, t0, i_k * BK, C, BK)
            kk = tl.dot(bk, tl.trans(bk), kk, input_precision=PREC)
            if NEED_DG:
                pk, mk = _tok_tile(q, i_bh, T, H, K, t0, i_k * BK, C, BK)
                qk = tl.dot(tl.load(pk, mask=mk, other=0.0), tl.trans(bk), qk, input_precision=PREC)
        Yt = dADt * kk  # Yᵀ: dβ_i's share Σ_j Y_ij; (dA ⊙ A) = Y ⊙ β 1ᵀ
        db += tl.sum(Yt, 0)
        dg = tl.zeros([C], dtype=tl.float32)
        if NEED_DG:
            M = qk * dPD
            Et = Yt * b[None, :]
            dg += tl.sum(M, 1) - tl.sum(M, 0) + tl.sum(Et, 0) - tl.sum(Et, 1)
        # pass 2: dq, dk per block of K columns
        kdBk = tl.zeros([C], dtype=tl.float32)
        nj = tl.zeros([C], dtype=tl.float32)
        sds = tl.zeros([BK], dtype=tl.float32)
        for i_k in range(0, tl.cdiv(K, BK)):
            k0 = i_k * BK
            dQi, dKs, dWm, sds_k = _state_products(do, un, du, h, dh, i_bh, st, T, H, K, V, t0, k0, C, BK, BV,
                                                   NEED_DG, PREC)
            sds += sds_k
            bk = _load_tok(k, i_bh, T, H, K, t0, k0, C, BK)
            bq = _load_tok(q, i_bh, T, H, K, t0, k0, C, BK)
            dq_inter = dQi * (Gam * scale)[:, None]
            gq = tl.dot(tl.load(scratch + cc).to(bk.dtype), bk, dq_inter, input_precision=PREC)
            pq, mq = _tok_tile(dq, i_bh, T, H, K, t0, k0, C, BK)
            tl.store(pq, gq.to(dq.dtype.element_ty), mask=mq)
            if NEED_DG:
                dg += tl.sum(bq.to(tl.float32) * dq_inter, 1)
            dKs = dKs * kg[:, None]  # the state's K̃ = diag(γ/Γ) K
            nj += tl.sum(bk.to(tl.float32) * dKs, 1)
            Tt = tl.load(tb + cc)  # Tᵀ, fp32 or (wy_16bit) 16-bit: dW rounded to that dtype
            dBk = -tl.dot(Tt, dWm.to(Tt.dtype), input_precision=PREC)  # Tᵀ dW, W = T diag(βΓ) K
            kdBk += tl.sum(dBk * bk.to(tl.float32), 1)
            gk = dKs + dBk * bg[:, None]
            gk = tl.dot(tl.load(scratch + cct).to(bq.dtype), bq, gk, input_precision=PREC)
            Rs = tl.load(scratch + C * C + cc) + tl.load(scratch + C * C + cct)  # Rᵀ + R
            gk = tl.dot(Rs.to(bk.dtype), bk, gk, input_precision=PREC)
            pk, mk = _tok_tile(dk, i_bh, T, H, K, t0, k0, C, BK)
            tl.store(pk, gk.to(dk.dtype.element_ty), mask=mk)
        db += Gam * kdBk
        tl.store(dbeta + hb + rows.to(tl.int64) * H, db.to(dbeta.dtype.element_ty), mask=mt)
        if NEED_DG:
            dg += bg * kdBk - nj
            n_valid = tl.minimum(T - t0, C)
            dg += tl.where(offs_c == n_valid - 1, gamma * tl.sum(sds, 0) + tl.sum(nj, 0), 0.0)
            dg = tl.where(mt, dg, 0.0)
            tl.store(dloga + i_bh * T + rows, tl.cumsum(dg, 0, reverse=True), mask=mt)


@triton.jit
def _transposed_decay(g, offs_c, DECAY: tl.constexpr):
    """Dᵀ: [i ≤ j] 2^{g_j − g_i} (the masked exponent is −inf)."""
    if DECAY == 0:
        return tl.where(offs_c[:, None] <= offs_c[None, :], 1.0, 0.0)
    return tl.exp2(tl.where(offs_c[:, None] <= offs_c[None, :], g[None, :] - g[:, None], float("-inf")))


@triton.jit
def _grad_qk_kernel(q, k, beta, G, lam_ptr, do, un, h, dh, du, dq, dk, dw, dg_out, T, H, NC, n_tiles, scale,
                    K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    DECAY: tl.constexpr, NEED_DG: tl.constexpr, PREC: tl.constexpr):
    """The split gradient's first kernel, chunks pid, pid + P, … (grad_split): everything that needs no T.

    dq = scale [diag(Γ) dO Sᵀ + (dP ⊙ D) K] (final); into dk: scale (dP ⊙ D)ᵀ Q + diag(γ/Γ) U dS_outᵀ (the
    second kernel adds the rest); into dw: dW = −dU Sᵀ; into dg_out: the shares of ∂L/∂G_i computed here (not yet
    summed over the chunk). dP and dPᵀ are both accumulated from dO and U (no transpose of a computed tile)."""
    offs_c = tl.arange(0, C)
    for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        i_bh, t0, rows, mt, hb, lam2, b = _grad_tile(tile, NC, T, H, C, offs_c, beta, lam_ptr, DECAY)
        g, Gam, kg, gamma = _chunk_scales(G, lam2, i_bh, t0, T, offs_c, mt, C, DECAY)
        if DECAY == 0:
            D = tl.where(offs_c[:, None] >= offs_c[None, :], 1.0, 0.0)
        else:
            D = _decay_matrix(g, offs_c, False)
        st = i_bh * NC + tile % NC
        dP = tl.zeros([C, C], dtype=tl.float32)
        dPt = tl.zeros([C, C], dtype=tl.float32)
        for i_v in range(0, tl.cdiv(V, BV)):
            bdo = _load_tok(do, i_bh, T, H, V, t0, i_v * BV, C, BV)
            bu = _load_tok(un, i_bh, T, H, V, t0, i_v * BV, C, BV).to(bdo.dtype)
            dP = tl.dot(bdo, tl.trans(bu), dP, input_precision=PREC)
            dPt = tl.dot(bu, tl.trans(bdo), dPt, input_precision=PREC)
        dPD = dP * D * scale
        dPDt = dPt * _transposed_decay(g, offs_c, DECAY) * scale
        qk = tl.zeros([C, C], dtype=tl.float32)
        dg = tl.zeros([C], dtype=tl.float32)
        nj = tl.zeros([C], dtype=tl.float32)
        sds = 0.0
        for i_k in range(0, tl.cdiv(K, BK)):
            k0 = i_k * BK
            dQi, dKs, dWm, sds_k = _state_products(do, un, du, h, dh, i_bh, st, T, H, K, V, t0, k0, C, BK, BV,
                                                   NEED_DG, PREC)
            sds += tl.sum(sds_k, 0)
            bk = _load_tok(k, i_bh, T, H, K, t0, k0, C, BK)
            bq = _load_tok(q, i_bh, T, H, K, t0, k0, C, BK)
            dq_inter = dQi * (Gam * scale)[:, None]
            gq = tl.dot(dPD.to(bk.dtype), bk, dq_inter, input_precision=PREC)
            pq, mq = _tok_tile(dq, i_bh, T, H, K, t0, k0, C, BK)
            tl.store(pq, gq.to(dq.dtype.element_ty), mask=mq)
            dKs = dKs * kg[:, None]  # the state's K̃ = diag(γ/Γ) K
            gk = tl.dot(dPDt.to(bq.dtype), bq, dKs, input_precision=PREC)
            pk, mk = _tok_tile(dk, i_bh, T, H, K, t0, k0, C, BK)
            tl.store(pk, gk.to(dk.dtype.element_ty), mask=mk)
            pw, mw = _tok_tile(dw, i_bh, T, H, K, t0, k0, C, BK)
            tl.store(pw, (-dWm).to(dw.dtype.element_ty), mask=mw)
            if NEED_DG:
                dg += tl.sum(bq.to(tl.float32) * dq_inter, 1)
                nj += tl.sum(bk.to(tl.float32) * dKs, 1)
                qk = tl.dot(bq, tl.trans(bk), qk, input_precision=PREC)
        if NEED_DG:
            M = qk * dPD
            dg += tl.sum(M, 1) - tl.sum(M, 0) - nj
            n_valid = tl.minimum(T - t0, C)
            dg += tl.where(offs_c == n_valid - 1, gamma * sds + tl.sum(nj, 0), 0.0)
            tl.store(dg_out + i_bh * T + rows, dg, mask=mt)


@triton.jit
def _grad_wy_kernel(k, v, beta, G, lam_ptr, du, dw, tt, dk, dv, dbeta, dloga, scratch, T, H, NC, n_tiles,
                    K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    DECAY: tl.constexpr, NEED_DG: tl.constexpr, PREC: tl.constexpr):
    """The split gradient's second kernel: everything through T = (I + A)⁻¹ (Tᵀ from tt), chunks pid, pid + P, ….

    dTᵀ = (diag(βΓ) K) dWᵀ + (diag(β) V) dUᵀ, dAᵀ = −T dTᵀ T (one product chain, in transposed form: no
    transpose of a computed tile feeds a dot), Rᵀ = (dA ⊙ D ⊙ β 1ᵀ)ᵀ and R + Rᵀ through the program's [C, C] scratch
    (in dk's dtype: Rᵀ strictly upper and R strictly lower never overlap, so rounding Rᵀ before the transpose gives
    the R + Rᵀ that the product with K rounds to anyway, with half the scratch traffic);
    dv = diag(β) Tᵀ dU, dβ, dk += diag(βΓ) Tᵀ dW + (R + Rᵀ) K (dk holds the first kernel's share), and d log a =
    the reverse cumsum of both kernels' ∂L/∂G shares (dloga holds the first's). The products through T (Tᵀ dW, the
    chain) take their operands in tt's dtype (fp32, or 16-bit under DeltaConfig.wy_16bit), every accumulator and the
    dβ, ∂L/∂G sums fp32."""
    offs_c = tl.arange(0, C)
    cc = offs_c[:, None] * C + offs_c[None, :]
    upper = offs_c[:, None] < offs_c[None, :]
    scratch += tl.program_id(0).to(tl.int64) * (C * C)
    for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        i_bh, t0, rows, mt, hb, lam2, b = _grad_tile(tile, NC, T, H, C, offs_c, beta, lam_ptr, DECAY)
        g, Gam, kg, gamma = _chunk_scales(G, lam2, i_bh, t0, T, offs_c, mt, C, DECAY)
        bg = b * Gam
        tb = tt + (i_bh * NC + tile % NC) * (C * C)
        dTt = tl.zeros([C, C], dtype=tl.float32)
        for i_k in range(0, tl.cdiv(K, BK)):  # the operands in dw's dtype, as dU's below
            bk = _load_tok(k, i_bh, T, H, K, t0, i_k * BK, C, BK)
            bdw = _load_tok(dw, i_bh, T, H, K, t0, i_k * BK, C, BK)
            dTt = tl.dot((bk.to(tl.float32) * bg[:, None]).to(bdw.dtype), tl.trans(bdw), dTt, input_precision=PREC)
        db = tl.zeros([C], dtype=tl.float32)
        Tc = tl.load(tb + cc).to(dv.dtype.element_ty)  # Tᵀ
        for i_v in range(0, tl.cdiv(V, BV)):  # dV = diag(β) Tᵀ dU, and dβ's share v·(Tᵀ dU)
            v0 = i_v * BV
            bdu = _load_tok(du, i_bh, T, H, V, t0, v0, C, BV)
            bv = _load_tok(v, i_bh, T, H, V, t0, v0, C, BV)
            dTt = tl.dot((bv.to(tl.float32) * b[:, None]).to(bdu.dtype), tl.trans(bdu), dTt, input_precision=PREC)
            db += _dv_block(dv, Tc, bdu, bv, b, i_bh, T, H, V, t0, v0, C, BV, PREC)
        dAt = _dA_transposed(tb, dTt, C, PREC)
        dADt = tl.where(upper, dAt * _transposed_decay(g, offs_c, DECAY), 0.0)
        Rt = (dADt * b[None, :]).to(dk.dtype.element_ty)
        Rs = tl.where(upper, Rt, _transposed(scratch, Rt, C))  # R + Rᵀ (disjoint supports)
        Tt = tl.load(tb + cc)  # Tᵀ in tt's dtype
        kk = tl.zeros([C, C], dtype=tl.float32)
        kdBk = tl.zeros([C], dtype=tl.float32)
        for i_k in range(0, tl.cdiv(K, BK)):
            k0 = i_k * BK
            bk = _load_tok(k, i_bh, T, H, K, t0, k0, C, BK)
            bdw = _load_tok(dw, i_bh, T, H, K, t0, k0, C, BK).to(Tt.dtype)
            pk, mk = _tok_tile(dk, i_bh, T, H, K, t0, k0, C, BK)
            dBk = tl.dot(Tt, bdw, input_precision=PREC)  # Tᵀ dW
            kdBk += tl.sum(dBk * bk.to(tl.float32), 1)
            gk = tl.load(pk, mask=mk, other=0.0).to(tl.float32) + dBk * bg[:, None]
            gk = tl.dot(Rs, bk.to(Rs.dtype), gk, input_precision=PREC)
            tl.store(pk, gk.to(dk.dtype.element_ty), mask=mk)
            kk = tl.dot(bk, tl.trans(bk), kk, input_precision=PREC)
        Yt = dADt * kk  # Yᵀ: dβ_i's share Σ_j Y_ij; (dA ⊙ A) = Y ⊙ β 1ᵀ (K Kᵀ is symmetric)
        db += tl.sum(Yt, 0) + Gam * kdBk
        tl.store(dbeta + hb + rows.to(tl.int64) * H, db.to(dbeta.dtype.element_ty), mask=mt)
        if NEED_DG:
            Et = Yt * b[None, :]
            dg = tl.load(dloga + i_bh * T + rows, mask=mt, other=0.0)
            dg += tl.sum(Et, 0) - tl.sum(Et, 1) + bg * kdBk
            dg = tl.where(mt, dg, 0.0)
            tl.store(dloga + i_bh * T + rows, tl.cumsum(dg, 0, reverse=True), mask=mt)


@triton.jit
def _grad_wy2_kernel(k, v, beta, G, lam_ptr, du, dw, tt, dk, dv, dbeta, dloga, T, H, NC, K: tl.constexpr,
                     V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr,
                     NEED_DG: tl.constexpr, PREC: tl.constexpr):
    """`_grad_wy_kernel`'s results (DeltaConfig.wy_kernel = 2), one program per chunk: grid (NC, B·H), no scratch.

    dT = dW (diag(βΓ) K)ᵀ + dU (diag(β) V)ᵀ and dA = −Tᵀ dT Tᵀ in dA's own orientation (Tᵀ, read once, is every
    product's operand; dT and the chain's intermediate in tt's dtype, as `_dA_transposed`), Rn = dA ⊙ D (strictly
    lower, rounded to k's dtype) and R = diag(β) Rn. Per K block: Q = diag(Γ) Tᵀ dW + Rn K (one accumulator) and
    P = Rᵀ K = (Kᵀ diag(β) Rn)ᵀ, a product whose transpose feeds only the store, never another dot (`_transposed`);
    dk += diag(β) Q + P. K Kᵀ is never formed: dβ_i's shares Γ_i k_i·(Tᵀ dW)_i + Σ_j Rn_ij k_i·k_j are q_i = k_i·Q_i,
    and ∂L/∂G's Σ_j (dA ⊙ A)_ij − Σ_l (dA ⊙ A)_li + β_iΓ_i k_i·(Tᵀ dW)_i is (β_i k_i)·Q_i − k_i·P_i, β_i k_i rounded
    as P's operand (so the A terms still cancel in the chunk's sum, as they do from one [C, C] tile)."""
    offs_c = tl.arange(0, C)
    tile = tl.program_id(1) * NC + tl.program_id(0)
    i_bh, t0, rows, mt, hb, lam2, b = _grad_tile(tile, NC, T, H, C, offs_c, beta, lam_ptr, DECAY)
    g, Gam, kg, gamma = _chunk_scales(G, lam2, i_bh, t0, T, offs_c, mt, C, DECAY)
    bg = b * Gam
    Tt = tl.load(tt + (i_bh * NC + tile % NC) * (C * C) + offs_c[:, None] * C + offs_c[None, :])  # Tᵀ
    dT = tl.zeros([C, C], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):  # the operands in dw's dtype, as dU's below
        bk = _load_tok(k, i_bh, T, H, K, t0, i_k * BK, C, BK)
        bdw = _load_tok(dw, i_bh, T, H, K, t0, i_k * BK, C, BK)
        dT = tl.dot(bdw, tl.trans((bk.to(tl.float32) * bg[:, None]).to(bdw.dtype)), dT, input_precision=PREC)
    db = tl.zeros([C], dtype=tl.float32)
    Tc = Tt.to(dv.dtype.element_ty)
    for i_v in range(0, tl.cdiv(V, BV)):  # dV = diag(β) Tᵀ dU, and dβ's share v·(Tᵀ dU)
        v0 = i_v * BV
        bdu = _load_tok(du, i_bh, T, H, V, t0, v0, C, BV)
        bv = _load_tok(v, i_bh, T, H, V, t0, v0, C, BV)
        dT = tl.dot(bdu, tl.trans((bv.to(tl.float32) * b[:, None]).to(bdu.dtype)), dT, input_precision=PREC)
        db += _dv_block(dv, Tc, bdu, bv, b, i_bh, T, H, V, t0, v0, C, BV, PREC)
    X = tl.dot(Tt, dT.to(Tt.dtype), input_precision=PREC)
    dA = -tl.dot(X.to(Tt.dtype), Tt, input_precision=PREC)
    if DECAY == 0:
        Rn = tl.where(offs_c[:, None] > offs_c[None, :], dA, 0.0)
    else:
        Rn = dA * _decay_matrix(g, offs_c, True)
    Rn = Rn.to(k.dtype.element_ty)
    qs = tl.zeros([C], dtype=tl.float32)
    qbs = tl.zeros([C], dtype=tl.float32)
    ps = tl.zeros([C], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        k0 = i_k * BK
        bk = _load_tok(k, i_bh, T, H, K, t0, k0, C, BK)
        bdw = _load_tok(dw, i_bh, T, H, K, t0, k0, C, BK).to(Tt.dtype)
        kf = bk.to(tl.float32)
        kb = (kf * b[:, None]).to(bk.dtype)
        Q = tl.dot(Tt, bdw, input_precision=PREC) * Gam[:, None]  # diag(Γ) Tᵀ dW
        Q = tl.dot(Rn, bk, Q, input_precision=PREC)
        P = tl.trans(tl.dot(tl.trans(kb), Rn, input_precision=PREC))  # Rᵀ K
        qs += tl.sum(Q * kf, 1)
        if NEED_DG:  # Σ_j Rn_ij kb_i·k_j and Σ_l Rn_li kb_l·k_i: the same rounded operands, so they cancel in Σ_i
            qbs += tl.sum(Q * kb.to(tl.float32), 1)
            ps += tl.sum(P * kf, 1)
        pk, mk = _tok_tile(dk, i_bh, T, H, K, t0, k0, C, BK)
        gk = tl.load(pk, mask=mk, other=0.0).to(tl.float32) + Q * b[:, None] + P
        tl.store(pk, gk.to(dk.dtype.element_ty), mask=mk)
    db += qs
    tl.store(dbeta + hb + rows.to(tl.int64) * H, db.to(dbeta.dtype.element_ty), mask=mt)
    if NEED_DG:
        dg = tl.load(dloga + i_bh * T + rows, mask=mt, other=0.0)
        dg = tl.where(mt, dg + qbs - ps, 0.0)
        tl.store(dloga + i_bh * T + rows, tl.cumsum(dg, 0, reverse=True), mask=mt)


def local_du(p: Plan, q: torch.Tensor, k: torch.Tensor, do: torch.Tensor, G: torch.Tensor,
             lam: torch.Tensor) -> torch.Tensor | None:
    """With cfg.bwd_split, every chunk's local share of dU [B, T, H, V] (in `state_dtype(q)`) for both backward
    sweeps; None otherwise (the sweeps compute it)."""
    if not p.cfg.bwd_split:
        return None
    bv = min(p.Vp, p.cfg.out_bv)
    du = _empty((p.B, p.T, p.H, p.V), state_dtype(q), q.device)
    _du_local_kernel[(triton.cdiv(p.V, bv), p.NC, p.B * p.H)](
        q, k, do, G, lam, du, p.T, p.H, p.scale, K=p.K, V=p.V, C=p.C, BK=min(p.Kp, 64), BV=bv, DECAY=p.decay,
        PREC=p.prec, num_warps=p.cfg.out_warps, num_stages=p.cfg.num_stages)
    return du


def bwd_sweep(p: Plan, mode: int, q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, do: torch.Tensor,
              G: torch.Tensor, lam: torch.Tensor, ds_out: torch.Tensor | None, need_ds0: bool = False,
              du_loc: torch.Tensor | None = None) -> tuple:
    """DELTA → Δ [B·H, NS, K, V] fp32 (ds_out ignored); FULL → (dS_out of every chunk [B·H, NC, K, V],
    dU [B, T, H, V], dS_init [B·H, K, V] fp32 or None) from the segments' dS_out [B·H, NS, K, V] (None: zeros).
    du_loc: `local_du`'s buffer or None; FULL overwrites it with dU."""
    B, H, K, V, NS = p.B, p.H, p.K, p.V, p.NS
    dev, cfg = q.device, p.cfg
    bv = min(p.Vp, cfg.sweep_bv)
    dh = du = None
    if mode == DELTA:
        end = _empty((B * H, NS, K, V), torch.float32, dev)
    else:
        dh = _empty((B * H, p.NC, K, V), state_dtype(q), dev)
        du = du_loc if du_loc is not None else _empty((B, p.T, H, V), state_dtype(q), dev)
        end = _empty((B * H, K, V), torch.float32, dev) if need_ds0 else None
    stand_in = w
    _bwd_sweep_kernel[(triton.cdiv(V, bv), NS, B * H)](
        q, k, w, do, G, lam, _arg(ds_out if mode == FULL else None, stand_in), _arg(dh, stand_in),
        _arg(du, stand_in), _arg(end, stand_in), _arg(du_loc, stand_in), p.T, H, p.NC, p.NCS, NS, p.scale, K=K, V=V,
        C=p.C, BK=p.Kp, BV=bv, DECAY=p.decay, MODE=mode, LOAD_S=mode == FULL and ds_out is not None,
        STORE_DS0=mode == FULL and need_ds0, LOCAL=du_loc is not None, PREC=p.prec, num_warps=cfg.sweep_warps,
        num_stages=cfg.num_stages)
    return end if mode == DELTA else (dh, du, end)


def t_buffer(p: Plan, like: torch.Tensor) -> torch.Tensor | None:
    """The transient [B·H, NC, C, C] buffer through which the backward's `_prep_kernel` hands every chunk's Tᵀ to
    `_grad_kb_kernel` or `_grad_wy_kernel` (None for `_grad_kernel`: grad_block_k 0, no grad_split). fp32 by
    default: Tᵀ enters dA = −Tᵀ dT Tᵀ and Tᵀ dW as `_grad_kernel`'s solved fp32 T does. With cfg.wy_16bit and 16-bit
    inputs, like's dtype (`state_dtype`): half the memory, T's entries (up to O(C)) rounded to 16 bits as the forward's
    W and u already use them, and those products on 16-bit operands (flash-linear-attention's choice)."""
    if p.cfg.grad_block_k <= 0 and not p.cfg.grad_split:
        return None
    dtype = state_dtype(like) if p.cfg.wy_16bit else torch.float32
    return _empty((p.B * p.H, p.NC, p.C, p.C), dtype, like.device)


def wy_kernel(cfg, q: torch.Tensor) -> int:
    """The split path's WY gradient kernel for inputs like q: cfg.wy_kernel, or with 0 (auto) `_grad_wy2_kernel` (2)
    for bf16 inputs and `_grad_wy_kernel` (1) for fp16 and fp32 ones (`_grad_wy2_kernel` was timed and GPU-tested in
    bf16 only; `_grad_wy_kernel` ran every dtype's GPU cases in earlier sessions)."""
    if cfg.wy_kernel:
        return cfg.wy_kernel
    return 2 if q.dtype == torch.bfloat16 else 1


def chunk_grads(p: Plan, q, k, v, beta, G, lam, do, un, du, h, dh, need_dg: bool,
                tt: torch.Tensor | None = None) -> tuple:
    """(dq, dk, dv, dβ, d log a [B·H, T] fp32 or None) from the chunk states and the sweeps' U, dU; tt: every
    chunk's Tᵀ (`t_buffer`, filled by `forward.prepare`), needed when cfg.grad_block_k > 0 or cfg.grad_split."""
    B, T, H, K, V = p.B, p.T, p.H, p.K, p.V
    dev, cfg = q.device, p.cfg
    dq = _empty((B, T, H, K), q.dtype, dev)
    dk = _empty((B, T, H, K), q.dtype, dev)
    dv = _empty((B, T, H, V), q.dtype, dev)
    dbeta = _empty((B, T, H), beta.dtype, dev)
    dloga = _empty((B * H, T), torch.float32, dev) if need_dg else None
    n_tiles = p.NC * B * H
    n_prog = min(n_tiles, max(1, cfg.grad_programs))
    bv = min(p.Vp, cfg.grad_bv)
    if cfg.grad_split:
        if tt is None:
            raise ValueError("grad_split needs every chunk's Tᵀ (t_buffer, filled by forward.prepare)")
        dw = _empty((B, T, H, K), state_dtype(q), dev)
        dg = _empty((B * H, T), torch.float32, dev) if need_dg else None
        bk = min(p.Kp, _pow2(cfg.grad_block_k or 64))
        common = dict(K=K, V=V, C=p.C, BK=bk, BV=bv, DECAY=p.decay, NEED_DG=need_dg, PREC=p.prec,
                      num_warps=cfg.split_warps, num_stages=cfg.num_stages)
        _grad_qk_kernel[(n_prog,)](q, k, beta, G, lam, do, un, h, dh, du, dq, dk, dw, _arg(dg, dq), T, H, p.NC,
                                   n_tiles, p.scale, **common)
        if wy_kernel(cfg, q) == 2:
            _grad_wy2_kernel[(p.NC, B * H)](k, v, beta, G, lam, du, dw, tt, dk, dv, dbeta, _arg(dg, dq), T, H, p.NC,
                                            **{**common, "num_warps": cfg.wy_warps, "num_stages": cfg.wy_stages,
                                               "BK": min(p.Kp, max(16, _pow2(cfg.wy_block))),
                                               "BV": min(p.Vp, max(16, _pow2(cfg.wy_block)))})
            return dq, dk, dv, dbeta, dg
        scratch = torch.empty(n_prog, p.C, p.C, dtype=dk.dtype, device=dev)  # Rᵀ, rounded as R + Rᵀ is anyway
        _grad_wy_kernel[(n_prog,)](k, v, beta, G, lam, du, dw, tt, dk, dv, dbeta, _arg(dg, dq), scratch, T, H, p.NC,
                                   n_tiles, **common)
        return dq, dk, dv, dbeta, dg
    if cfg.grad_block_k > 0:
        if tt is None:
            raise ValueError("grad_block_k > 0 needs every chunk's Tᵀ (t_buffer, filled by forward.prepare)")
        scratch = torch.empty(n_prog, 2, p.C, p.C, dtype=torch.float32, device=dev)
        _grad_kb_kernel[(n_prog,)](
            q, k, v, beta, G, lam, do, un, du, h, dh, tt, dq, dk, dv, dbeta, _arg(dloga, dq), scratch, T, H, p.NC,
            n_tiles, p.scale, K=K, V=V, C=p.C, BK=min(p.Kp, _pow2(cfg.grad_block_k)), BV=bv, DECAY=p.decay,
            NEED_DG=need_dg, PREC=p.prec, num_warps=cfg.grad_warps, num_stages=cfg.num_stages)
        return dq, dk, dv, dbeta, dloga
    scratch = torch.empty(n_prog, p.C, p.C, dtype=torch.float32, device=dev)
    _grad_kernel[(n_prog,)](
        q, k, v, beta, G, lam, do, un, du, h, dh, dq, dk, dv, dbeta, _arg(dloga, dq), scratch, T, H, p.NC, n_tiles,
        p.scale, K=K, V=V, C=p.C, LOG2C=p.C.bit_length() - 1, BK=p.Kp, BV=bv, DECAY=p.decay,
        NEED_DG=need_dg, PREC=p.prec, SOLVE=solve_precision(p.prec, p.cfg), num_warps=cfg.grad_warps,
        num_stages=cfg.num_stages)
    return dq, dk, dv, dbeta, dloga
