"""Backward: dq, dk/dv and d log a (derivation and rounding analysis: the package docstring, `kernels.triton`).

Per chunk, with G the chunk-local cumulative log decay and S_in / dS_out the state entering / gradient leaving it:

    dq_i = scale [ Σ_{j ≤ i} e^{G_i − G_j} (do_i·v_j) k_j + e^{G_i} do_i S_inᵀ ]
    dk_j = scale Σ_{i ≥ j} e^{G_i − G_j} (do_i·v_j) q_i + e^{G_last − G_j} v_j dS_outᵀ
    dv_j = scale Σ_{i ≥ j} e^{G_i − G_j} (q_i·k_j) do_i + e^{G_last − G_j} k_j dS_out
    d log a_t = Σ_{τ ≥ t, τ in t's tail block b} (q_τ·dq_τ − k_τ·dk_τ) + ⟨dS_out(b), S_out(b)⟩

`chunk_backward` runs, after the reverse segment scan (`segment.scan_segments`): `_bwd_dq_kernel` (per segment,
forward over chunks carrying S), `_bwd_dkdv_kernel` (per segment, backward over chunks carrying dS; one
launch, or a dk and a dv launch when `TritonConfig.dkdv_split`), and, when a decay gradient is needed,
`_dloga_kernel` (the float64 suffix sums of the last line).

Module switch: DG_MODE, the (hilo, exact) arithmetic of the decay gradients (experiments; None chooses).
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch
import triton
import triton.language as tl

from kernels.triton.common import Plan, _arg, _chunk_decay, _empty, _head_log2_decay, _head_start, _load_segment_state
from kernels.triton.segment import scan_segments, segment_states

#: (hilo, exact) override of the decay-gradient arithmetic (experiments); None chooses automatically.
DG_MODE: tuple[bool, bool] | None = None


@triton.jit
def _after(x, y, HINT: tl.constexpr):
    """x, made to depend on y for the compiler only (an identity when HINT; x itself otherwise).

    Triton pipelines (loads a stage ahead) only the loads that feed a dot operand; a tile read only by
    element-wise code waits for global memory every chunk. Tying a dot operand to a value computed from
    such a tile puts its load into the pipeline. PTX, so HINT is off in the interpreter."""
    if HINT:
        x = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r,r", [x, y], dtype=tl.float32, is_pure=True, pack=1)
    return x


@triton.jit
def _chunk_weights(G, lam2, t0, T, offs_c, scale, C: tl.constexpr, DECAY: tl.constexpr, TRANS: tl.constexpr):
    """Decay factors of one chunk (log2 units), padded rows zeroed.

    Returns D [C, C] = [i ≥ j]·e^{G_i − G_j}·scale (query i = row; the transpose if TRANS),
    wq = e^{G_i}·scale, wk = e^{G_last − G_j} and e^{G_last}.
    """
    mt = (t0 + offs_c) < T
    if TRANS:
        causal = offs_c[None, :] >= offs_c[:, None]
    else:
        causal = offs_c[:, None] >= offs_c[None, :]
    if DECAY == 0:
        D = tl.where(causal, scale, 0.0)
        wq = tl.where(mt, scale, 0.0)
        wk = tl.where(mt, 1.0, 0.0)
        decay_last = 1.0
    else:
        g, g_last = _chunk_decay(G, lam2, t0, T, offs_c, C, DECAY)
        if TRANS:
            D = tl.where(causal, tl.exp2(g[None, :] - g[:, None]) * scale, 0.0)
        else:
            D = tl.where(causal, tl.exp2(g[:, None] - g[None, :]) * scale, 0.0)
        wq = tl.where(mt, tl.exp2(g) * scale, 0.0)
        wk = tl.where(mt, tl.exp2(g_last - g), 0.0)
        decay_last = tl.exp2(g_last)
    return D, wq, wk, decay_last


@triton.jit
def _bwd_dq_kernel(
    q, k, v, do, G, lam_ptr, s_in, dq, dgq, s_tail, T, H, NC, NCS, NS, NT, TCS, TOFF, scale,
    K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DECAY: tl.constexpr, LOAD_S: tl.constexpr, NEED_DG: tl.constexpr, HILO: tl.constexpr,
    EXACT: tl.constexpr, PREC: tl.constexpr,
):
    """dq[:, Kblk] of one segment, carrying S[Kblk, :] forward.

    dq = (dO Vᵀ ⊙ D) K + (dO ⊙ wq) Sᵀ. With NEED_DG it also writes this K-block's share of
    ∂L/∂Γ_i: Σ_j M_ij − Σ_l M_li + q_i·((dO ⊙ wq)_i Sᵀ), M = (Q Kᵀ) ⊙ (dO Vᵀ) ⊙ D in fp32, where
    (dO ⊙ wq) is the same bf16 operand the dS recurrence uses and S enters as S_hi + S_lo (HILO), so
    the chunk sums telescope exactly into ⟨S_in, dS_in⟩ − ⟨S_out, dS_out⟩ (no long-range cancellation).
    NEED_DG also stores S_out (fp32) after the last chunk of every tail block into s_tail (see `_tail_share`).
    """
    i_kb = tl.program_id(0)
    i_s = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    offs_c = tl.arange(0, C)
    offs_k = i_kb * BK + tl.arange(0, BK)
    offs_v = tl.arange(0, BV)
    mk = offs_k < K
    mv = offs_v < V
    q += _head_start(i_bh, T, H, K)
    k += _head_start(i_bh, T, H, K)
    dq += _head_start(i_bh, T, H, K)
    v += _head_start(i_bh, T, H, V)
    do += _head_start(i_bh, T, H, V)
    G += i_bh * T
    lam2 = _head_log2_decay(lam_ptr, i_bh, H, DECAY)
    # the state is carried transposed, St = S[Kblk, :]ᵀ [BV, BK], so no register tile is transposed
    st_tile = offs_v[:, None] + offs_k[None, :] * V
    st_mask = mv[:, None] & mk[None, :]
    St = _load_segment_state(s_in, i_bh, i_s, NS, K * V, st_tile, st_mask, BV, BK, LOAD_S)
    c0 = i_s * NCS
    n = tl.minimum(NCS, NC - c0)
    for i in range(0, n):
        t0 = (c0 + i) * C
        rows = t0 + offs_c
        mt = rows < T
        r64 = rows.to(tl.int64)
        mqk = mt[:, None] & mk[None, :]
        mvv = mt[:, None] & mv[None, :]
        bk = tl.load(k + r64[:, None] * (H * K) + offs_k[None, :], mask=mqk, other=0.0)
        bv = tl.load(v + r64[:, None] * (H * V) + offs_v[None, :], mask=mvv, other=0.0)
        bdo = tl.load(do + r64[:, None] * (H * V) + offs_v[None, :], mask=mvv, other=0.0)
        D, wq, wk, decay_last = _chunk_weights(G, lam2, t0, T, offs_c, scale, C, DECAY, False)
        dPD = tl.dot(bdo, tl.trans(bv), input_precision=PREC) * D
        do_s = (bdo * wq[:, None]).to(bdo.dtype)
        St_hi = St.to(bdo.dtype)
        acc = tl.dot(do_s, St_hi, input_precision=PREC)
        if HILO:
            acc = tl.dot(do_s, (St - St_hi.to(tl.float32)).to(bdo.dtype), acc, input_precision=PREC)
        if NEED_DG:
            bq = tl.load(q + r64[:, None] * (H * K) + offs_k[None, :], mask=mqk, other=0.0)
            if EXACT:  # intra-chunk share in fp32: Σ_j M_ij − Σ_l M_li, M = (Q Kᵀ) ⊙ dPD
                M = tl.dot(bq, tl.trans(bk), input_precision=PREC) * dPD
                dg = tl.sum(acc * bq.to(tl.float32), 1) + tl.sum(M, 1) - tl.sum(M, 0)
        acc = tl.dot(dPD.to(bk.dtype), bk, acc, input_precision=PREC)
        if NEED_DG:
            if not EXACT:
                dg = tl.sum(acc * bq.to(tl.float32), 1)
            tl.store(dgq + (i_kb * tl.num_programs(2) + i_bh) * T + rows, dg, mask=mt)
        tl.store(dq + r64[:, None] * (H * K) + offs_k[None, :], acc.to(dq.dtype.element_ty), mask=mqk)
        St = tl.dot(tl.trans((bv * wk[:, None]).to(bv.dtype)), bk, St * decay_last, input_precision=PREC)
        if NEED_DG:
            c = c0 + i
            ends, blk = _tail_block(c, TCS, TOFF, NC)
            if ends:
                tl.store(s_tail + (i_bh * NT + blk) * (K * V) + st_tile, St, mask=st_mask)


@triton.jit
def _tail_block(c, TCS, TOFF, NC):
    """(whether chunk c ends its tail block, the block's index). Chunk c is in block (c + TOFF) // TCS;
    TOFF makes the last chunk a block of its own, so the large rounding errors of a final-state gradient
    stay inside it."""
    return ((c + TOFF + 1) % TCS == 0) | (c == NC - 1), (c + TOFF) // TCS


@triton.jit
def _tail_share(s_tail, tails, dS, c, i_t, i_bh, n_bh, NT, TCS, TOFF, NC, KV, tile, mask):
    """With dS = dS_out(c): if chunk c ends a tail block, store this tile's share of ⟨S_out(c), dS_out(c)⟩."""
    ends, blk = _tail_block(c, TCS, TOFF, NC)
    if ends:
        S = tl.load(s_tail + (i_bh * NT + blk) * KV + tile, mask=mask, other=0.0)
        tl.store(tails + (i_t * n_bh + i_bh) * NT + blk, tl.sum(tl.sum(S * dS, 1), 0))


@triton.jit
def _bwd_dkdv_kernel(
    q, k, v, do, G, lam_ptr, ds_out, dk, dv, dgk, ds0, s_tail, tails, T, H, NC, NCS, NS, NT, TCS, TOFF, scale,
    K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DECAY: tl.constexpr, LOAD_S: tl.constexpr, DO_DK: tl.constexpr, DO_DV: tl.constexpr,
    NEED_DG: tl.constexpr, HILO: tl.constexpr, EXACT: tl.constexpr, STORE_DS0: tl.constexpr,
    TAILS: tl.constexpr, HINT: tl.constexpr, PREC: tl.constexpr,
):
    """dk (needs BV ≥ V) and/or dv (needs BK ≥ K) of one segment, carrying dS[Kblk, Vblk] backward.

    dk = (dO Vᵀ ⊙ D)ᵀ Q + (V ⊙ wk) dSᵀ,  dv = (Q Kᵀ ⊙ D)ᵀ dO + (K dS) ⊙ wk,
    dS ← e^{G_last} dS + Qᵀ (dO ⊙ wq). With NEED_DG (dk only) it writes k_j·((V ⊙ wk)_j dSᵀ), the
    inter-chunk share of −∂L/∂Γ_j, with the bf16 operand of the S recurrence and dS = dS_hi + dS_lo. With
    TAILS it writes this tile's share of the exact tail ⟨S_out, dS_out⟩ after every tail block (S_out from s_tail).
    """
    i_t = tl.program_id(0)
    i_s = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    n_vb = tl.cdiv(V, BV)
    i_kb = i_t // n_vb
    i_vb = i_t % n_vb
    offs_c = tl.arange(0, C)
    offs_k = i_kb * BK + tl.arange(0, BK)
    offs_v = i_vb * BV + tl.arange(0, BV)
    mk = offs_k < K
    mv = offs_v < V
    q += _head_start(i_bh, T, H, K)
    k += _head_start(i_bh, T, H, K)
    dk += _head_start(i_bh, T, H, K)
    v += _head_start(i_bh, T, H, V)
    do += _head_start(i_bh, T, H, V)
    dv += _head_start(i_bh, T, H, V)
    G += i_bh * T
    lam2 = _head_log2_decay(lam_ptr, i_bh, H, DECAY)
    st_tile = offs_k[:, None] * V + offs_v[None, :]
    st_mask = mk[:, None] & mv[None, :]
    dS = _load_segment_state(ds_out, i_bh, i_s, NS, K * V, st_tile, st_mask, BK, BV, LOAD_S)
    c0 = i_s * NCS
    n = tl.minimum(NCS, NC - c0)
    n_bh = tl.num_programs(2)
    if TAILS:
        _tail_share(s_tail, tails, dS, c0 + n - 1, i_t, i_bh, n_bh, NT, TCS, TOFF, NC, K * V, st_tile, st_mask)
    for i in range(0, n):
        c = c0 + n - 1 - i
        t0 = c * C
        rows = t0 + offs_c
        mt = rows < T
        r64 = rows.to(tl.int64)
        mqk = mt[:, None] & mk[None, :]
        mvv = mt[:, None] & mv[None, :]
        bq = tl.load(q + r64[:, None] * (H * K) + offs_k[None, :], mask=mqk, other=0.0)
        bk = tl.load(k + r64[:, None] * (H * K) + offs_k[None, :], mask=mqk, other=0.0)
        bv = tl.load(v + r64[:, None] * (H * V) + offs_v[None, :], mask=mvv, other=0.0)
        bdo = tl.load(do + r64[:, None] * (H * V) + offs_v[None, :], mask=mvv, other=0.0)
        Dt, wq, wk, decay_last = _chunk_weights(G, lam2, t0, T, offs_c, scale, C, DECAY, True)
        dS_hi = dS.to(bq.dtype)
        if DO_DV:
            At = tl.dot(bk, tl.trans(bq), input_precision=PREC) * Dt
            acc_v = tl.dot(bk, dS_hi, input_precision=PREC) * wk[:, None]
            acc_v = tl.dot(At.to(bdo.dtype), bdo, acc_v, input_precision=PREC)
            tl.store(dv + r64[:, None] * (H * V) + offs_v[None, :], acc_v.to(dv.dtype.element_ty), mask=mvv)
        if DO_DK:
            # the inter-chunk product first: in this order the compiler keeps fewer tiles live (no spills
            # under constant decay, 3 % faster)
            v_s = (bv * wk[:, None]).to(bv.dtype)
            acc_k = tl.dot(v_s, tl.trans(dS_hi), input_precision=PREC)
            dPt = tl.dot(bv, tl.trans(bdo), input_precision=PREC) * Dt
            if HILO:
                acc_k = tl.dot(v_s, tl.trans((dS - dS_hi.to(tl.float32)).to(bv.dtype)), acc_k,
                               input_precision=PREC)
            if NEED_DG:
                if EXACT:  # inter-chunk share only; the intra share is written by the dq kernel
                    dg = tl.sum(acc_k * bk.to(tl.float32), 1)
            acc_k = tl.dot(dPt.to(bq.dtype), bq, acc_k, input_precision=PREC)
            if NEED_DG:
                if not EXACT:
                    dg = tl.sum(acc_k * bk.to(tl.float32), 1)
                tl.store(dgk + (i_kb * n_bh + i_bh) * T + rows, dg, mask=mt)
            tl.store(dk + r64[:, None] * (H * K) + offs_k[None, :], acc_k.to(dk.dtype.element_ty), mask=mqk)
            if NEED_DG:  # k is read only by dg: pipeline its load (`_after`)
                wq = _after(wq, dg, HINT)
        dS = tl.dot(tl.trans(bq), (bdo * wq[:, None]).to(bdo.dtype), dS * decay_last, input_precision=PREC)
        if TAILS:
            if i < n - 1:  # dS is now dS_out(c − 1)
                _tail_share(s_tail, tails, dS, c - 1, i_t, i_bh, n_bh, NT, TCS, TOFF, NC, K * V, st_tile,
                            st_mask)
    if STORE_DS0:
        if i_s == 0:
            tl.store(ds0 + i_bh * K * V + st_tile, dS, mask=st_mask)


@triton.jit
def _dloga_kernel(
    dgq, dgk, tails, shift, dgate, dlam_part, T, H, NT, TOFF,
    NQ: tl.constexpr, NK: tl.constexpr, NTL: tl.constexpr, L: tl.constexpr, TCS: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    STORE_GATE: tl.constexpr, STORE_LAM: tl.constexpr,
):
    """d log a of tail block i (L tokens from chunk i·TCS − TOFF) in float64: the suffix sum of ∂L/∂Γ
    (dq-kernel shares minus dk-kernel shares) plus the block's exact tail and a per-row shift. Writes
    d gate in [B, T, H] and/or the block's sum (for dλ)."""
    i_t = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    n_bh = tl.num_programs(1)
    rows = i_t * L - TOFF * (L // TCS) + tl.arange(0, L)
    m = (rows >= 0) & (rows < T)
    x = tl.zeros([L], dtype=tl.float64)
    for j in tl.static_range(NQ):
        x += tl.load(dgq + (j * n_bh + i_bh) * T + rows, mask=m, other=0.0).to(tl.float64)
    for j in tl.static_range(NK):
        x -= tl.load(dgk + (j * n_bh + i_bh) * T + rows, mask=m, other=0.0).to(tl.float64)
    tail = tl.zeros([1], dtype=tl.float64)
    for j in tl.static_range(NTL):
        tail += tl.load(tails + (j * n_bh + i_bh) * NT + i_t + tl.arange(0, 1)).to(tl.float64)
    if HAS_SHIFT:
        tail += tl.load(shift + i_bh + tl.arange(0, 1)).to(tl.float64)
    d = tl.cumsum(x, 0, reverse=True) + tail
    if STORE_GATE:
        tl.store(dgate + ((i_bh // H) * T + rows) * H + i_bh % H, d.to(dgate.dtype.element_ty), mask=m)
    if STORE_LAM:
        tl.store(dlam_part + i_bh * NT + i_t, tl.sum(tl.where(m, d, 0.0), 0))


def _pipeline_hints(device: torch.device) -> bool:
    """Whether `_after` may emit its PTX (NVIDIA GPUs, not the interpreter)."""
    return device.type == "cuda" and torch.version.hip is None and os.environ.get("TRITON_INTERPRET", "0") != "1"


def _rechunk(p: Plan, G: torch.Tensor, Cb: int) -> tuple[Plan, torch.Tensor]:
    """The plan and chunk-local cumsum for chunks of Cb | C (segments, hence boundary states, unchanged)."""
    r = p.C // Cb
    pb = replace(p, C=Cb, NC=-(-p.T // Cb), NCS=p.NCS * r)
    if p.decay == 2:
        BH = G.shape[0]
        g = torch.nn.functional.pad(G, (0, p.NC * p.C - p.T)).view(BH, p.NC, r, Cb)
        off = torch.nn.functional.pad(g[..., :-1, -1:], (0, 0, 1, 0))  # cumsum at the end of the previous sub-chunk
        G = (g - off).view(BH, p.NC * p.C)[:, : p.T].contiguous()
    return pb, G


def chunk_backward(
    p: Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, G: torch.Tensor, lam: torch.Tensor,
    seg_log2: torch.Tensor, s_in: torch.Tensor | None, dht: torch.Tensor | None, *,
    gate_dtype: torch.dtype | None = None, lam_dtype: torch.dtype | None = None, need_ds0: bool = False,
    d_raw: torch.Tensor | None = None, dloga_shift: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Backward launches; returns dq, dk, dv, d gate [B, T, H] in gate_dtype (if given), dλ [H] in lam_dtype
    (if given) and dS_init (if need_ds0).

    s_in: the forward's boundary states; dht: fp32 gradient of the final state [B, H, K, V], contiguous, or None;
    d_raw: the raw segment states of (q, do) when already computed (consumed: scanned in place);
    dloga_shift: [B·H] float64 added to every d log a of a row.
    """
    # tail blocks: d log a restarts its suffix sums every tail_tokens from the exact ⟨S_out, dS_out⟩ there
    tail_tokens = triton.next_power_of_2(max(1, p.cfg.tail_chunks)) * p.C
    if 0 < p.cfg.bwd_chunk < p.C and p.C % p.cfg.bwd_chunk == 0:
        p, G = _rechunk(p, G, p.cfg.bwd_chunk)
    B, T, H, K, V, C, NC, NCS, NS = p.B, p.T, p.H, p.K, p.V, p.C, p.NC, p.NCS, p.NS
    cfg, dev, scale = p.cfg, q.device, p.scale
    f32 = torch.float32
    TCS = tail_tokens // C
    TOFF = (TCS - (NC - 1) % TCS) % TCS  # the last chunk starts a tail block
    NT = (NC - 1 + TOFF) // TCS + 1
    need_dlam = lam_dtype is not None
    need_dg = need_dlam or gate_dtype is not None
    ds_out = None
    if NS > 1:
        ds_out = d_raw if d_raw is not None else segment_states(p, q, do, G, lam, qdo=True)
        scan_segments(p, ds_out, seg_log2, dht.reshape(B * H, K, V) if dht is not None else None, reverse=True)
    elif dht is not None:
        ds_out = dht.reshape(B * H, 1, K, V)

    dq = _empty((B, T, H, K), q.dtype, dev)
    dk = _empty((B, T, H, K), q.dtype, dev)
    dv = _empty((B, T, H, V), q.dtype, dev)
    ds0 = _empty((B, H, K, V), f32, dev) if need_ds0 else None
    dummy = dq  # the stand-in pointer of optional arguments a launch does not read (`_arg`)

    s_tail = _empty((B * H, NT, K, V), f32, dev) if need_dg else None
    # the hi+lo state split keeps dλ (a sum over all T tokens) accurate; d gate (suffix sums over one tail block)
    # does not need it: 2.2× faster dq kernel
    hilo, exact = need_dlam and p.prec != "ieee", need_dlam
    if DG_MODE is not None:
        hilo, exact = DG_MODE
    bkq = min(p.Kp, cfg.dq_bk)
    n_kq = triton.cdiv(K, bkq)
    dgq = _empty((n_kq, B * H, T), f32, dev) if need_dg else None
    _bwd_dq_kernel[(n_kq, NS, B * H)](
        q, k, v, do, G, lam, _arg(s_in, dummy), dq, _arg(dgq, dummy), _arg(s_tail, dummy), T, H, NC, NCS, NS, NT,
        TCS, TOFF, scale, K=K, V=V, C=C, BK=bkq, BV=p.Vp, DECAY=p.decay, LOAD_S=s_in is not None, NEED_DG=need_dg,
        HILO=hilo, EXACT=exact, PREC=p.prec, num_warps=cfg.dq_warps, num_stages=cfg.num_stages)

    consts = dict(T=T, H=H, NC=NC, NCS=NCS, NS=NS, NT=NT, TCS=TCS, TOFF=TOFF, scale=scale, K=K, V=V, C=C, DECAY=p.decay,
                  LOAD_S=ds_out is not None, NEED_DG=need_dg, HILO=hilo, EXACT=exact, HINT=_pipeline_hints(dev),
                  PREC=p.prec, num_warps=cfg.dkdv_warps, num_stages=cfg.num_stages)
    ptrs = dict(q=q, k=k, v=v, do=do, G=G, lam_ptr=lam, ds_out=_arg(ds_out, dummy), dk=dk, dv=dv, ds0=_arg(ds0, dummy),
                s_tail=_arg(s_tail, dummy))
    n_kk = triton.cdiv(K, min(p.Kp, cfg.dkdv_bk)) if cfg.dkdv_split else 1
    bvv = min(p.Vp, cfg.dkdv_bv) if cfg.dkdv_split else p.Vp
    n_vv = triton.cdiv(V, bvv)  # tiles of the launch that forms the tails (the dv launch when split)
    dgk = _empty((n_kk, B * H, T), f32, dev) if need_dg else None
    tails = _empty((n_vv, B * H, NT), f32, dev) if need_dg else None
    dgk_arg, tails_arg = _arg(dgk, dummy), _arg(tails, dummy)  # dgk, tails are None exactly when not need_dg
    if cfg.dkdv_split:
        _bwd_dkdv_kernel[(n_kk, NS, B * H)](
            **ptrs, dgk=dgk_arg, tails=dummy, BK=min(p.Kp, cfg.dkdv_bk), BV=p.Vp, DO_DK=True, DO_DV=False,
            STORE_DS0=False, TAILS=False, **consts)
        _bwd_dkdv_kernel[(n_vv, NS, B * H)](
            **ptrs, dgk=dummy, tails=tails_arg, BK=p.Kp, BV=bvv, DO_DK=False, DO_DV=True, STORE_DS0=need_ds0,
            TAILS=need_dg, **{**consts, "NEED_DG": False, "HILO": False, "EXACT": False})
    else:
        _bwd_dkdv_kernel[(1, NS, B * H)](
            **ptrs, dgk=dgk_arg, tails=tails_arg, BK=p.Kp, BV=p.Vp, DO_DK=True, DO_DV=True, STORE_DS0=need_ds0,
            TAILS=need_dg, **consts)

    dgate = dlam = None
    if need_dg:
        dgate = _empty((B, T, H), gate_dtype, dev) if gate_dtype is not None else None
        dlam_part = _empty((B * H, NT), torch.float64, dev) if need_dlam else None
        _dloga_kernel[(NT, B * H)](
            dgq, dgk, tails, _arg(dloga_shift, dgq), _arg(dgate, dgq), _arg(dlam_part, dgq), T, H, NT, TOFF,
            NQ=n_kq, NK=n_kk, NTL=n_vv, L=TCS * C, TCS=TCS,
            HAS_SHIFT=dloga_shift is not None, STORE_GATE=dgate is not None, STORE_LAM=need_dlam, num_warps=4)
        if need_dlam:
            dlam = dlam_part.view(B, H, NT).sum((0, 2)).to(lam_dtype)
    return dq, dk, dv, dgate, dlam, ds0
