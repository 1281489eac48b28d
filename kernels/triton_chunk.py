"""Triton chunked linear attention with decay and gates: forward and backward (DESIGN §2).

Per (b, h), with row vectors q_t, k_t ∈ R^K, v_t ∈ R^V and log a_t = λ_h + g_{t,h} ≤ 0:

    S_t = a_t S_{t-1} + k_tᵀ v_t,        o_t = scale · q_t S_t.

**Chunks.** Tokens are cut into chunks of C. Inside a chunk G_i = Σ_{τ ≤ i} log a_τ (inclusive, fp32,
kept in log2 units so kernels use exp2; only differences of G, or G itself which is ≤ 0, are
exponentiated):

    o_i   = scale · [ Σ_{j ≤ i} e^{G_i − G_j} (q_i·k_j) v_j + e^{G_i} q_i S_in ]
    S_out = e^{G_last} S_in + Σ_j e^{G_last − G_j} k_jᵀ v_j

**Segments.** Chunks are grouped into segments of L = NCS·C tokens; only segment-boundary states
are stored (fp32 [B, H, NS, K, V], NS = ⌈T/L⌉ — 1/NCS of what per-chunk states would take, 1/64 by default):

1. ``_seg_state_kernel`` (parallel over segments): local state M_s = Σ_{j∈s} e^{Γ_s,last − Γ_s,j} k_jᵀ v_j.
2. ``_seg_scan_kernel`` (one parallel associative scan over segments, in place):
   S_in(s+1) = A_s S_in(s) + M_s, A_s = exp(Σ_{t∈s} log a_t).
3. ``_fwd_kernel`` (parallel over segments × V-blocks): loops over the segment's chunks carrying
   S in registers and writes o; the last segment writes the final state.

**Backward** (dS_t = ∂L/∂S_t; dS_out(s) = gradient of the state leaving segment s):

    dS_in  = e^{G_last} dS_out + scale Σ_i e^{G_i} q_iᵀ do_i
    dq_i   = scale [ Σ_{j ≤ i} e^{G_i − G_j} (do_i·v_j) k_j + e^{G_i} do_i S_inᵀ ]
    dk_j   = scale Σ_{i ≥ j} e^{G_i − G_j} (do_i·v_j) q_i + e^{G_last − G_j} v_j dS_outᵀ
    dv_j   = scale Σ_{i ≥ j} e^{G_i − G_j} (q_i·k_j) do_i + e^{G_last − G_j} k_j dS_out

1. ``_seg_state_kernel`` (q/do mode): D_s = scale Σ_{i∈s} e^{Γ_s,i} q_iᵀ do_i; reverse in-place scan
   dS_out(s−1) = A_s dS_out(s) + D_s from dS_out(NS−1) = dS_final.
2. ``_bwd_dq_kernel``: per segment, forward over chunks carrying S (from the saved S_in(s)).
3. ``_bwd_dkdv_kernel``: per segment, backward over chunks carrying dS; segment 0 ends with
   dS_init = dS_in(0).

No per-chunk state of the sequence is ever stored; the only whole-sequence tensors besides
inputs and gradients are the two [B, H, NS, K, V] boundary-state buffers (and, when a decay gradient
is needed, one state per tail block below: 1/8 of per-chunk states).

**Decay gradients.** With Γ_t the global cumulative log decay, o_t depends on +Γ_t through q_t and
every use of k_t v_t depends on −Γ_t, so ∂L/∂Γ_t = q_t·dq_t − k_t·dk_t (+ ⟨dS_final, S_final⟩ at the
last token), and ∂L/∂(log a_t) = Σ_{τ ≥ t} ∂L/∂Γ_τ. Scaling the state that leaves token t scales
everything after it, so the whole tail of that sum is one inner product, Σ_{τ > t} ∂L/∂Γ_τ =
⟨dS_t, S_t⟩. The suffix sums therefore restart at the end of every *tail block* b of TCS chunks
(`TritonConfig.tail_chunks`, 512 tokens by default), from the exact fp32 value there:

    d log a_t = Σ_{τ ≥ t, τ ∈ b} (q_τ·dq_τ − k_τ·dk_τ) + ⟨dS_out(b), S_out(b)⟩,
    dλ_h = Σ_{b,t} d log a_t,   dg_{t,h} = d log a_t.

The dq kernel stores S_out(b) (it carries S forward), the dk/dv kernel forms ⟨dS_out(b), S_out(b)⟩ when
its backward sweep reaches the block's end (the dv launch when dk and dv are split: it has registers to
spare), and ``_dloga_kernel`` takes the suffix sums in float64 and writes d gate in [B, T, H]. Blocks are
aligned so that the last chunk is a block of its own: a gradient arriving on the final state is large,
and its rounding errors stay inside that chunk.
Without the restarts the per-token terms would cancel over the whole segment: each chunk's inter-chunk
share carries a bf16 rounding of S (in dq) and dS (in dk), and those errors add up like a random walk
(d gate error ∝ √block length: 3.4e-3 at 128 tokens, 5.2e-3 at 512, 6.6e-3 at 1024, > 1e-2 at 4096).

dλ sums all T of them (it cancels 50-150× more), so there the terms must be *consistent* with the state
recurrences, not merely accurate: per chunk Σ_i q_i·dq_i^inter − Σ_j k_j·dk_j^inter must telescope
into ⟨S_in, dS_in⟩ − ⟨S_out, dS_out⟩. The recurrences use the bf16 operands (dO ⊙ wq) and (V ⊙ wk);
the inter-chunk terms therefore use the same operands and the fp32 state split as S = S_hi + S_lo
(two bf16 dots, "HILO") whenever dλ is required, and the intra-chunk share is taken from the fp32
products M = (Q Kᵀ) ⊙ (dO Vᵀ) ⊙ D ("EXACT"). Without this, bf16 rounding of S makes dλ wrong by O(1)
at T = 1000. d gate alone (λ fixed, as in the models) skips both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

__all__ = ["linear_attention_triton", "linear_attention_triton_sharded", "ShardExchange", "TritonConfig"]

LOG2E = 1.4426950408889634
_LOG2E: tl.constexpr = tl.constexpr(LOG2E)  # the same constant inside jit functions


@dataclass(frozen=True)
class TritonConfig:
    """Tile and launch parameters (tuned for H100/H200 at K = V = 128; any valid values work).

    seg_chunks: chunks per segment (L = seg_chunks · C tokens); bwd_chunk: chunk length of the
    backward kernels if smaller than C (0: same; fewer registers per program); fwd_bv: V-block of the output
    kernel; dq_bk: K-block of the dq kernel; dkdv_split: compute dk and dv in two launches
    (tiles [bk, V] and [K, bv]) instead of one with the full [K, V] state; state_bk/state_bv:
    tile of the segment-state kernel; chunk: chunk length C overriding the caller's chunk_size (0: keep it);
    tail_chunks: chunks between the exact tails ⟨S, dS⟩ at which the d log a suffix sums restart (rounded up to
    a power of two).
    """

    seg_chunks: int = 64
    bwd_chunk: int = 0
    fwd_bv: int = 64
    fwd_warps: int = 4
    dq_bk: int = 64
    dq_warps: int = 4
    dkdv_split: bool = True
    dkdv_bk: int = 64
    dkdv_bv: int = 64
    dkdv_warps: int = 4
    state_bk: int = 128
    state_bv: int = 128
    state_warps: int = 4
    num_stages: int = 2
    chunk: int = 0
    tail_chunks: int = 8


DEFAULT_CONFIG = TritonConfig()
#: Allocate every output with NaN instead of leaving it uninitialised (tests: unwritten elements show).
POISON_OUTPUTS = os.environ.get("LONGTRAIN_TRITON_POISON", "0") == "1"
#: (hilo, exact) override of the decay-gradient arithmetic (experiments); None chooses automatically.
DG_MODE: tuple[bool, bool] | None = None


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _chunk_decay(G, lam2, t0, T, offs_c, C: tl.constexpr, DECAY: tl.constexpr):
    """Chunk-local inclusive cumulative log2-decay g [C] (padding clamped to g_last) and g_last.

    DECAY: 0 none, 1 constant per head (g_i = (i+1)·λ₂), 2 per token (G holds the cumsum row).
    """
    n_valid = tl.minimum(T - t0, C)
    if DECAY == 2:
        g = tl.load(G + t0 + offs_c, mask=offs_c < n_valid, other=0.0)
        g_last = tl.load(G + t0 + n_valid - 1)
        g = tl.where(offs_c < n_valid, g, g_last)
    else:
        g = (tl.minimum(offs_c, n_valid - 1) + 1).to(tl.float32) * lam2
        g_last = n_valid.to(tl.float32) * lam2
    return g, g_last


@triton.jit
def _head_start(i_bh, T, H, D):
    """Offset of head (b, h) = divmod(i_bh, H) in a contiguous [B, T, H, D] tensor."""
    return (i_bh // H) * T * H * D + (i_bh % H) * D


@triton.jit
def _head_log2_decay(lam_ptr, i_bh, H, DECAY: tl.constexpr):
    """λ_h in log2 units under constant decay (DECAY 1); 0 otherwise."""
    lam2 = 0.0
    if DECAY == 1:
        lam2 = tl.load(lam_ptr + i_bh % H).to(tl.float32) * _LOG2E
    return lam2


@triton.jit
def _load_segment_state(buf, i_bh, i_s, NS, KV, tile, mask, BA: tl.constexpr, BB: tl.constexpr, LOAD: tl.constexpr):
    """Tile [BA, BB] of segment i_s's state in a [B·H, NS, K, V] fp32 buffer, or zeros if not LOAD."""
    if LOAD:
        S = tl.load(buf + (i_bh * NS + i_s) * KV + tile, mask=mask, other=0.0)
    else:
        S = tl.zeros([BA, BB], dtype=tl.float32)
    return S


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


@triton.jit
def _gate_cumsum_kernel(gate, lam_ptr, G, chunk_tot, T, H, NCP, C: tl.constexpr, HP: tl.constexpr):
    """One chunk of one batch row, all heads: G[b·H + h, t] = Σ_{τ ≤ t in the chunk} log2 a_τ with
    log a = gate + λ_h, and the chunk's total (G at its last token) into chunk_tot [B·H, NCP]."""
    i_c = tl.program_id(0)
    i_b = tl.program_id(1).to(tl.int64)
    offs_c = tl.arange(0, C)
    offs_h = tl.arange(0, HP)
    rows = i_c * C + offs_c
    mh = offs_h < H
    m = (rows < T)[:, None] & mh[None, :]
    x = tl.load(gate + (i_b * T + rows)[:, None] * H + offs_h[None, :], mask=m, other=0.0).to(tl.float32)
    x = tl.where(m, x + tl.load(lam_ptr + offs_h, mask=mh, other=0.0)[None, :], 0.0)
    g = tl.cumsum(x * _LOG2E, 0)
    tl.store(G + (i_b * H + offs_h)[None, :] * T + rows[:, None], g, mask=m)
    # padded rows add exact zeros, so the last row holds G at the chunk's last token
    tl.store(chunk_tot + (i_b * H + offs_h) * NCP + i_c, tl.sum(tl.where(offs_c[:, None] == C - 1, g, 0.0), 0),
             mask=mh)


# ----------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _pipeline_hints(device: torch.device) -> bool:
    """Whether `_after` may emit its PTX (NVIDIA GPUs, not the interpreter)."""
    return device.type == "cuda" and torch.version.hip is None and os.environ.get("TRITON_INTERPRET", "0") != "1"


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def _scan_tile(NS: int) -> tuple[int, int, int]:
    """(padded segment count, state elements per program, warps) of the segment scan."""
    nsp = triton.next_power_of_2(NS)
    e = max(4, min(256, 4096 // nsp))
    return nsp, e, 8 if nsp * e >= 4096 else 4


def _chunk_size(chunk_size: int) -> int:
    """Triton tiles need a power of two ≥ 16; the result does not depend on C, so round into [16, 128]."""
    return min(128, _pow2(chunk_size))


@dataclass
class _Plan:
    B: int
    T: int
    H: int
    K: int
    V: int
    C: int
    NC: int
    NCS: int
    NS: int
    Kp: int
    Vp: int
    decay: int  # 0 none, 1 per-head constant, 2 per token
    prec: str
    cfg: TritonConfig
    scale: float = 1.0


def _make_plan(q: torch.Tensor, v: torch.Tensor, decay: int, chunk_size: int, cfg: TritonConfig) -> _Plan:
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = _chunk_size(cfg.chunk or chunk_size)
    NC = -(-T // C)
    NCS = max(1, cfg.seg_chunks)
    NS = -(-NC // NCS)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    return _Plan(B, T, H, K, V, C, NC, NCS, NS, _pow2(K), _pow2(V), decay, prec, cfg)


def _log_decay_cumsum(p: _Plan, lam: torch.Tensor, gate: torch.Tensor | None, device) -> tuple:
    """(G [B·H, T] chunk-local inclusive cumsum of log2 a, or a dummy; segment totals [B·H, NS] in log2).

    lam: λ [H] fp32 (`_lam_arg`)."""
    B, T, H, C, NC, NCS, NS = p.B, p.T, p.H, p.C, p.NC, p.NCS, p.NS
    if p.decay == 0:
        dummy = torch.zeros(1, dtype=torch.float32, device=device)
        return dummy, torch.zeros(B * H, NS, dtype=torch.float32, device=device)
    if p.decay == 1:
        # tokens per segment, built on the device (a setitem from a Python number would sync the stream)
        counts = (T - torch.arange(NS, device=device, dtype=torch.float32) * (NCS * C)).clamp(max=NCS * C)
        seg = (lam.view(1, H, 1) * LOG2E * counts.view(1, 1, NS)).expand(B, H, NS)
        return torch.zeros(1, dtype=torch.float32, device=device), seg.reshape(B * H, NS).contiguous()
    G = _empty((B * H, T), torch.float32, device)
    chunk_tot = torch.zeros(B * H, NS * NCS, dtype=torch.float32, device=device)  # chunks past the end: 0
    _gate_cumsum_kernel[(NC, B)](
        gate.detach().contiguous(), lam, G, chunk_tot, T, H, NS * NCS, C=C, HP=triton.next_power_of_2(H),
        num_warps=4)
    return G, chunk_tot.view(B * H, NS, NCS).sum(-1)


def _lam_arg(log_decay: torch.Tensor | None, H: int, device) -> torch.Tensor:
    """λ [H] fp32 (zeros without a per-head decay)."""
    if log_decay is None:
        return torch.zeros(H, dtype=torch.float32, device=device)
    return log_decay.detach().float().contiguous()


def _segment_states(p: _Plan, a, b, G, lam, qdo: bool) -> torch.Tensor:
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


def _forward(p: _Plan, q, k, v, G, lam, seg_log2, initial_state, need_final: bool, m_raw=None):
    """Forward launches; returns (o, final_state or None, S_in boundary states [B·H, NS, K, V] or None).

    m_raw: the raw segment states of (k, v) when already computed (consumed: scanned in place).
    """
    B, T, H, K, V, C, NC, NCS, NS = p.B, p.T, p.H, p.K, p.V, p.C, p.NC, p.NCS, p.NS
    cfg, dev = p.cfg, q.device
    scale = p.scale
    s_in = None
    if NS > 1:
        s_in = m_raw if m_raw is not None else _segment_states(p, k, v, G, lam, qdo=False)
        nsp, e, warps = _scan_tile(NS)
        init = initial_state if initial_state is not None else s_in
        _seg_scan_kernel[(triton.cdiv(K * V, e), B * H)](
            s_in, seg_log2, init, NS, K * V, NSP=nsp, E=e, REVERSE=False, HAS_INIT=initial_state is not None,
            num_warps=warps)
    elif initial_state is not None:
        s_in = initial_state.reshape(B * H, 1, K, V)
    o = _empty((B, T, H, V), q.dtype, dev)
    final = _empty((B, H, K, V), torch.float32, dev) if need_final else None
    bv = min(p.Vp, cfg.fwd_bv)
    grid = (triton.cdiv(V, bv), NS, B * H)
    _fwd_kernel[grid](
        q, k, v, G, lam, s_in if s_in is not None else o, o, final if final is not None else o,
        T, H, NC, NCS, NS, scale, K=K, V=V, C=C, BK=p.Kp, BV=bv, DECAY=p.decay,
        LOAD_S=s_in is not None, STORE_FIN=need_final, PREC=p.prec,
        num_warps=cfg.fwd_warps, num_stages=cfg.num_stages)
    return o, final, s_in


def _rechunk(p: _Plan, G: torch.Tensor, Cb: int) -> tuple[_Plan, torch.Tensor]:
    """The plan and chunk-local cumsum for chunks of Cb | C (segments, hence boundary states, unchanged)."""
    r = p.C // Cb
    pb = replace(p, C=Cb, NC=-(-p.T // Cb), NCS=p.NCS * r)
    if p.decay == 2:
        BH = G.shape[0]
        g = torch.nn.functional.pad(G, (0, p.NC * p.C - p.T)).view(BH, p.NC, r, Cb)
        off = torch.nn.functional.pad(g[..., :-1, -1:], (0, 0, 1, 0))  # cumsum at the end of the previous sub-chunk
        G = (g - off).view(BH, p.NC * p.C)[:, : p.T].contiguous()
    return pb, G


def _backward(p: _Plan, q, k, v, do, G, lam, seg_log2, s_in, dht, *, gate_dtype=None, lam_dtype=None,
              need_ds0: bool = False, d_raw=None, dloga_shift=None):
    """Backward launches; returns dq, dk, dv, d gate [B, T, H] in gate_dtype (if given), dλ [H] in lam_dtype
    (if given) and dS_init (if need_ds0).

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
        ds_out = d_raw if d_raw is not None else _segment_states(p, q, do, G, lam, qdo=True)
        nsp, e, warps = _scan_tile(NS)
        init = dht.reshape(B * H, K, V) if dht is not None else ds_out
        _seg_scan_kernel[(triton.cdiv(K * V, e), B * H)](
            ds_out, seg_log2, init, NS, K * V, NSP=nsp, E=e, REVERSE=True, HAS_INIT=dht is not None,
            num_warps=warps)
    elif dht is not None:
        ds_out = dht.reshape(B * H, 1, K, V)

    dq = _empty((B, T, H, K), q.dtype, dev)
    dk = _empty((B, T, H, K), q.dtype, dev)
    dv = _empty((B, T, H, V), q.dtype, dev)
    ds0 = _empty((B, H, K, V), f32, dev) if need_ds0 else None
    dummy = dq

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
        q, k, v, do, G, lam, s_in if s_in is not None else dummy, dq, dgq if dgq is not None else dummy,
        s_tail if s_tail is not None else dummy, T, H, NC, NCS, NS, NT, TCS, TOFF, scale, K=K, V=V, C=C, BK=bkq,
        BV=p.Vp, DECAY=p.decay, LOAD_S=s_in is not None, NEED_DG=need_dg, HILO=hilo, EXACT=exact, PREC=p.prec,
        num_warps=cfg.dq_warps, num_stages=cfg.num_stages)

    common = dict(T=T, H=H, NC=NC, NCS=NCS, NS=NS, NT=NT, TCS=TCS, TOFF=TOFF, scale=scale, K=K, V=V, C=C, DECAY=p.decay,
                  LOAD_S=ds_out is not None, NEED_DG=need_dg, HILO=hilo, EXACT=exact, HINT=_pipeline_hints(dev),
                  PREC=p.prec, num_warps=cfg.dkdv_warps, num_stages=cfg.num_stages)
    ptrs = dict(q=q, k=k, v=v, do=do, G=G, lam_ptr=lam, ds_out=ds_out if ds_out is not None else dummy,
                dk=dk, dv=dv, ds0=ds0 if ds0 is not None else dummy, s_tail=s_tail if s_tail is not None else dummy)
    n_kk = triton.cdiv(K, min(p.Kp, cfg.dkdv_bk)) if cfg.dkdv_split else 1
    bvv = min(p.Vp, cfg.dkdv_bv) if cfg.dkdv_split else p.Vp
    n_vv = triton.cdiv(V, bvv)  # tiles of the launch that forms the tails (the dv launch when split)
    dgk = _empty((n_kk, B * H, T), f32, dev) if need_dg else None
    tails = _empty((n_vv, B * H, NT), f32, dev) if need_dg else None
    dgk_arg, tails_arg = (dgk, tails) if need_dg else (dummy, dummy)
    if cfg.dkdv_split:
        _bwd_dkdv_kernel[(n_kk, NS, B * H)](
            **ptrs, dgk=dgk_arg, tails=dummy, BK=min(p.Kp, cfg.dkdv_bk), BV=p.Vp, DO_DK=True, DO_DV=False,
            STORE_DS0=False, TAILS=False, **common)
        _bwd_dkdv_kernel[(n_vv, NS, B * H)](
            **ptrs, dgk=dummy, tails=tails_arg, BK=p.Kp, BV=bvv, DO_DK=False, DO_DV=True, STORE_DS0=need_ds0,
            TAILS=need_dg, **{**common, "NEED_DG": False, "HILO": False, "EXACT": False})
    else:
        _bwd_dkdv_kernel[(1, NS, B * H)](
            **ptrs, dgk=dgk_arg, tails=tails_arg, BK=p.Kp, BV=p.Vp, DO_DK=True, DO_DV=True, STORE_DS0=need_ds0,
            TAILS=need_dg, **common)

    dgate = dlam = None
    if need_dg:
        dgate = _empty((B, T, H), gate_dtype, dev) if gate_dtype is not None else None
        dlam_part = _empty((B * H, NT), torch.float64, dev) if need_dlam else None
        _dloga_kernel[(NT, B * H)](
            dgq, dgk, tails, dloga_shift if dloga_shift is not None else dgq, dgate if dgate is not None else dgq,
            dlam_part if dlam_part is not None else dgq, T, H, NT, TOFF, NQ=n_kq, NK=n_kk, NTL=n_vv, L=TCS * C, TCS=TCS,
            HAS_SHIFT=dloga_shift is not None, STORE_GATE=dgate is not None, STORE_LAM=need_dlam, num_warps=4)
        if need_dlam:
            dlam = dlam_part.view(B, H, NT).sum((0, 2)).to(lam_dtype)
    return dq, dk, dv, dgate, dlam, ds0


def _setup(ctx, q, v, log_decay, gate, scale: float, chunk_size: int, cfg: TritonConfig):
    """Plan, λ argument and log-decay cumsums of one call; records the dtypes the decay gradients take
    (None where no gradient is needed)."""
    decay = 2 if gate is not None else (1 if log_decay is not None else 0)
    p = replace(_make_plan(q, v, decay, chunk_size, cfg), scale=scale)
    ctx.gate_dtype = gate.dtype if ctx.needs_input_grad[4] else None
    ctx.lam_dtype = log_decay.dtype if ctx.needs_input_grad[3] else None
    lam = _lam_arg(log_decay, p.H, q.device)
    G, seg_log2 = _log_decay_cumsum(p, lam, gate, q.device)
    return p, lam, G, seg_log2


def _checked_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None):
    """Checked, contiguous q, k, v in q's dtype and the resolved scale."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    if T < 1:
        raise ValueError("the sequence is empty (T = 0)")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"triton backend supports fp16/bf16/fp32 inputs, got {q.dtype}")
    if K > 256 or V > 256:
        raise ValueError(f"head dims up to 256 are supported, got K={K}, V={V}")
    scale = K**-0.5 if scale is None else float(scale)
    return q.contiguous(), k.to(q.dtype).contiguous(), v.to(q.dtype).contiguous(), scale


class _LinearAttentionTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, gate, initial_state, scale, output_final_state, chunk_size, cfg):
        p, lam, G, seg_log2 = _setup(ctx, q, v, log_decay, gate, scale, chunk_size, cfg)
        init = initial_state.detach().float().contiguous() if initial_state is not None else None
        o, final, s_in = _forward(p, q, k, v, G, lam, seg_log2, init, output_final_state)
        ctx.plan = p
        ctx.has_init = initial_state is not None
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, G, lam, seg_log2, s_in)
        return o, final

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, G, lam, seg_log2, s_in = ctx.saved_tensors
        p: _Plan = ctx.plan
        need_ds0 = ctx.has_init and ctx.needs_input_grad[5]
        if do is None:
            do = torch.zeros(p.B, p.T, p.H, p.V, dtype=q.dtype, device=q.device)
        do = do.to(q.dtype).contiguous()
        if dht is not None:
            dht = dht.float().contiguous()
        dq, dk, dv, dgate, dlam, ds0 = _backward(p, q, k, v, do, G, lam, seg_log2, s_in, dht, gate_dtype=ctx.gate_dtype,
                                                 lam_dtype=ctx.lam_dtype, need_ds0=need_ds0)
        return dq, dk, dv, dlam, dgate, ds0, None, None, None, None


def _segment_weights(seg_log2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Products of the segment decays strictly before and strictly after each segment ([B·H, NS], fp32),
    and each row's total log decay (natural log, [B·H]); one fp64 cumsum."""
    x = seg_log2.double()
    inc = x.cumsum(-1)
    total = inc[:, -1:]
    return torch.exp2(inc - x).float(), torch.exp2(total - inc).float(), (total[:, 0] / LOG2E).float()


class ShardExchange:
    """The collective of a sequence-sharded call (LASP-2): see `linear_attention_triton_sharded`."""

    def forward(self, M: torch.Tensor, log_A: torch.Tensor) -> torch.Tensor:
        """Local states M [B, H, K, V] and total log decays log A [B, H] of this rank's rows → entering states."""
        raise NotImplementedError

    def backward(self, d_entering: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradient of the entering states → (dM, d log A) of this rank's rows."""
        raise NotImplementedError


class _ShardedTriton(torch.autograd.Function):
    """o = attention(q, k, v; S_0 = exchange(M, log A)) with M, log A the zero-start state and decay of each row.

    Forward: raw segment states M_s (one pass over k, v) → M = Σ_s (Π_{s'>s} A_s') M_s → exchange →
    scan with S_0 → outputs: the kernel's own passes plus one read of the [B·H, NS, K, V] buffer.
    Backward: raw D_s (q, do) → dS_0 = Σ_s (Π_{s'<s} A_s') D_s → exchange backward → dM enters as the
    gradient of the final state F = A·S_0 + M; the S_0-path of F is taken out of d log a again.
    """

    @staticmethod
    def forward(ctx, q, k, v, log_decay, gate, scale, chunk_size, cfg, exchange):
        p, lam, G, seg_log2 = _setup(ctx, q, v, log_decay, gate, scale, chunk_size, cfg)
        m_raw = _segment_states(p, k, v, G, lam, qdo=False)
        w_before, w_after, log_A = _segment_weights(seg_log2)
        M = torch.einsum("rs,rse->re", w_after, m_raw.view(p.B * p.H, p.NS, -1))
        log_A = log_A.view(p.B, p.H)
        S0 = exchange.forward(M.view(p.B, p.H, p.K, p.V), log_A).float().contiguous()
        o, _, s_in = _forward(p, q, k, v, G, lam, seg_log2, S0, False, m_raw=m_raw)
        ctx.plan, ctx.exchange = p, exchange
        ctx.save_for_backward(q, k, v, G, lam, seg_log2, s_in, S0, log_A, w_before)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, G, lam, seg_log2, s_in, S0, log_A, w_before = ctx.saved_tensors
        p: _Plan = ctx.plan
        do = do.to(q.dtype).contiguous()
        d_raw = _segment_states(p, q, do, G, lam, qdo=True)
        dS0 = torch.einsum("rs,rse->re", w_before, d_raw.view(p.B * p.H, p.NS, -1))
        dM, dlog_A = ctx.exchange.backward(dS0.view(p.B, p.H, p.K, p.V))
        dM = dM.float().contiguous()
        # F = A·S_0 + M: the kernel's d log a holds ⟨dM, A·S_0⟩ per token, which M does not depend on
        s0_path = (dM.double() * S0.double()).sum((-1, -2)) * log_A.double().exp()
        shift = (dlog_A.double() - s0_path).reshape(-1).contiguous()
        dq, dk, dv, dgate, dlam, _ = _backward(p, q, k, v, do, G, lam, seg_log2, s_in, dM, gate_dtype=ctx.gate_dtype,
                                               lam_dtype=ctx.lam_dtype, d_raw=d_raw, dloga_shift=shift)
        return dq, dk, dv, dlam, dgate, None, None, None, None


def linear_attention_triton_sharded(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, exchange: ShardExchange, *,
    log_decay: torch.Tensor | None = None, gate: torch.Tensor | None = None, scale: float | None = None,
    chunk_size: int = 64, config: TritonConfig | None = None,
) -> torch.Tensor:
    """Linear attention whose rows start from states that depend on every row's local state (LASP-2).

    Each batch row b is a sequence shard; its entering state is exchange.forward(M, log A)[b], where
    M[b] is the row's final state from a zero start and log A[b] its total log decay. The kernels
    compute M in their segment-state pass, so the shard needs no separate correction GEMM:
    o_i = scale · q_i S_i with S starting at the entering state. Differentiable like
    `linear_attention_triton`; exchange.backward receives ∂L/∂S_0 and returns (∂L/∂M, ∂L/∂log A).
    """
    q, k, v, scale = _checked_inputs(q, k, v, scale)
    return _ShardedTriton.apply(q, k, v, log_decay, gate, scale, chunk_size, config or DEFAULT_CONFIG, exchange)


def linear_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
    log_decay: torch.Tensor | None = None, gate: torch.Tensor | None = None, scale: float | None = None,
    initial_state: torch.Tensor | None = None, output_final_state: bool = False, chunk_size: int = 64,
    config: TritonConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal linear attention with per-head decay λ_h and per-token gate g, Triton kernels (DESIGN §2).

    q, k: [B, T, H, K]; v: [B, T, H, V]; log_decay: [H] ≤ 0; gate: [B, T, H] ≤ 0;
    initial_state: [B, H, K, V] (fp32). Returns (o [B, T, H, V] in q's dtype, final_state fp32 or None).
    Differentiable in q, k, v, log_decay, gate and initial_state (a gradient on final_state is used).
    chunk_size is rounded to a power of two in [16, 128] (the result does not depend on it).
    """
    q, k, v, scale = _checked_inputs(q, k, v, scale)
    if initial_state is not None:
        initial_state = initial_state.float()
    o, final = _LinearAttentionTriton.apply(
        q, k, v, log_decay, gate, initial_state, scale, bool(output_final_state), chunk_size,
        config or DEFAULT_CONFIG)
    return o, (final if output_final_state else None)


def with_config(**kw) -> TritonConfig:
    """DEFAULT_CONFIG with some fields replaced (benchmarks and tests)."""
    return replace(DEFAULT_CONFIG, **kw)

