"""Forward outputs: per segment and V-block, carry S through the segment's chunks (DESIGN §2).

For each chunk, with G the chunk-local inclusive cumulative log decay (exp2 of log2 units in the kernel) and
S the state entering the chunk:

    O     = scale · [ (Q Kᵀ ⊙ D) V + (e^{G} ⊙ Q) S ],     D_ij = [i ≥ j] e^{G_i − G_j}
    S_out = e^{G_last} S + (e^{G_last − G} ⊙ K)ᵀ V

A segment starts from its boundary state S_in(s) (`segment.scan_segments`); the last one writes the final state.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.common import Plan, _arg, _chunk_decay, _empty, _head_log2_decay, _head_start, _load_segment_state
from kernels.triton.segment import scan_segments, segment_states


@triton.jit
def _fwd_kernel(
    q, k, v, G, lam_ptr, s_in, o, s_fin, T, H, NC, NCS, NS, scale,
    K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DECAY: tl.constexpr, LOAD_S: tl.constexpr, STORE_FIN: tl.constexpr, PREC: tl.constexpr,
):
    """Outputs of one segment and V-block: carry S[:, Vblk] through the segment's chunks."""
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
    v += _head_start(i_bh, T, H, V)
    o += _head_start(i_bh, T, H, V)
    G += i_bh * T
    lam2 = _head_log2_decay(lam_ptr, i_bh, H, DECAY)
    st_tile = offs_k[:, None] * V + offs_v[None, :]
    st_mask = mk[:, None] & mv[None, :]
    S = _load_segment_state(s_in, i_bh, i_s, NS, K * V, st_tile, st_mask, BK, BV, LOAD_S)
    causal = offs_c[:, None] >= offs_c[None, :]
    c0 = i_s * NCS
    n = tl.minimum(NCS, NC - c0)
    for i in range(0, n):
        t0 = (c0 + i) * C
        rows = t0 + offs_c
        mt = rows < T
        r64 = rows.to(tl.int64)
        bq = tl.load(q + r64[:, None] * (H * K) + offs_k[None, :], mask=mt[:, None] & mk[None, :], other=0.0)
        bk = tl.load(k + r64[:, None] * (H * K) + offs_k[None, :], mask=mt[:, None] & mk[None, :], other=0.0)
        bv = tl.load(v + r64[:, None] * (H * V) + offs_v[None, :], mask=mt[:, None] & mv[None, :], other=0.0)
        A = tl.dot(bq, tl.trans(bk), input_precision=PREC)
        if DECAY == 0:
            A = tl.where(causal, A * scale, 0.0)
            acc = tl.dot(bq, S.to(bq.dtype), input_precision=PREC) * scale
            acc = tl.dot(A.to(bv.dtype), bv, acc, input_precision=PREC)
            S = tl.dot(tl.trans(bk), bv, S, input_precision=PREC)
        else:
            g, g_last = _chunk_decay(G, lam2, t0, T, offs_c, C, DECAY)
            A = tl.where(causal, A * tl.exp2(g[:, None] - g[None, :]) * scale, 0.0)
            acc = tl.dot(bq, S.to(bq.dtype), input_precision=PREC) * (tl.exp2(g) * scale)[:, None]
            acc = tl.dot(A.to(bv.dtype), bv, acc, input_precision=PREC)
            wk = tl.where(mt, tl.exp2(g_last - g), 0.0)
            S = tl.dot(tl.trans(bk), (bv * wk[:, None]).to(bv.dtype), S * tl.exp2(g_last), input_precision=PREC)
        tl.store(o + r64[:, None] * (H * V) + offs_v[None, :], acc.to(o.dtype.element_ty),
                 mask=mt[:, None] & mv[None, :])
    if STORE_FIN:
        if i_s == NS - 1:
            tl.store(s_fin + i_bh * K * V + st_tile, S, mask=st_mask)


def chunk_forward(p: Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, G: torch.Tensor, lam: torch.Tensor,
                  seg_log2: torch.Tensor, initial_state: torch.Tensor | None, need_final: bool,
                  m_raw: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Forward launches; returns (o, final_state or None, S_in boundary states [B·H, NS, K, V] or None).

    initial_state: fp32 [B, H, K, V], contiguous, or None; m_raw: the raw segment states of (k, v) when already
    computed (consumed: scanned in place).
    """
    B, T, H, K, V, C, NC, NCS, NS = p.B, p.T, p.H, p.K, p.V, p.C, p.NC, p.NCS, p.NS
    cfg, dev = p.cfg, q.device
    scale = p.scale
    s_in = None
    if NS > 1:
        s_in = m_raw if m_raw is not None else segment_states(p, k, v, G, lam, qdo=False)
        scan_segments(p, s_in, seg_log2, initial_state, reverse=False)
    elif initial_state is not None:
        s_in = initial_state.reshape(B * H, 1, K, V)
    o = _empty((B, T, H, V), q.dtype, dev)
    final = _empty((B, H, K, V), torch.float32, dev) if need_final else None
    bv = min(p.Vp, cfg.fwd_bv)
    grid = (triton.cdiv(V, bv), NS, B * H)
    _fwd_kernel[grid](
        q, k, v, G, lam, _arg(s_in, o), o, _arg(final, o),
        T, H, NC, NCS, NS, scale, K=K, V=V, C=C, BK=p.Kp, BV=bv, DECAY=p.decay,
        LOAD_S=s_in is not None, STORE_FIN=need_final, PREC=p.prec,
        num_warps=cfg.fwd_warps, num_stages=cfg.num_stages)
    return o, final, s_in
