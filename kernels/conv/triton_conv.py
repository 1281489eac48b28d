"""Triton causal short convolution with fused SiLU: forward and backward.

Per channel d, with w taps, the halo x_{−(w−1)} … x_{−1} (zeros without one) and z the pre-activation:

    z_t = Σ_{i<w} W_i x_{t−(w−1)+i},        y_t = silu(z_t) = z_t σ(z_t)   (or y_t = z_t)

**Forward** (``_conv_fwd_kernel``, grid T-blocks × D-blocks × B): each tap is one shifted [BT, BD] load, read
from x, or from the halo for negative positions (no concatenated copy); fp32 sums, y in x's dtype. Only the
blocks that start before w − 1 carry halo code (one load per tap whose row pointer is picked from x or the
halo): with a halo, as in every streamed window, sm_90 needs 182 registers at 64 × 128 / 4 warps and no spill,
where a halo branch in every tap load needed 255 and spilled 416 B (not yet timed on a GPU).

**Backward**, with dz_t = dy_t σ(z_t)(1 + z_t(1 − σ(z_t))) and z recomputed from x (never saved):

    dx_s    = Σ_{k<w} W_{w−1−k} dz_{s+k}                (s ≥ 0; the same sum at s < 0 is d halo)
    dW_i    = Σ_{b,t} dz_t x_{t−(w−1)+i}

Register tiles cannot be shifted; the two backward kernels differ in how dx gets dz at w shifted row sets.
Both walk, per program, a chunk of consecutive T-blocks (grid chunks × D-blocks × B, chunks sized to reach
``bwd_programs``), keep one [BT, BD] fp32 dW accumulator per tap, summed over rows once at the end (no
per-block cross-warp reductions), and write per-program partials ([B·chunks, w, D] fp32) summed afterwards;
the program that owns a row's first chunk also computes the w−1 halo rows of dx, d halo.

- ``_conv_bwd_kernel`` (scratch, ``ConvConfig.bwd_direct=False``): per T-block it computes dz for the block's
  BT rows and the w−1 rows after it, stores them to a small per-program scratch tile (global memory,
  L1/L2-resident) and reads dx's w shifted windows back, with two block barriers per block. On the 1B model's
  step (T = 131072, D = 6144, bf16) it takes ≈ 6.3 ms a call, ≈ 770 GB/s for the ≈ 4.8 GB it must move: ~5× off
  the roofline.
- ``_conv_bwd_direct_kernel`` (direct, the default): no scratch, no barriers. For a block's
  rows s it computes dz_{s+k} for each k < w straight from shifted loads of x and dy (z_{s+k} from w shifted x
  tiles, zeros past T, the halo for negative rows), dx_s = Σ_k W_{w−1−k} dz_{s+k}, and the dW terms from
  k = 0's dz with the rows' own x shifts; d halo is the same sum at s = −(w−1) … −1. The shifted reloads
  hit L1/L2, so HBM traffic stays x and dy read and dx written once, at the price of w× the SiLU-derivative
  work and ~w² + 2w tile loads from L1 per block (w = 4: 24). Blocks that read the halo run in a loop of
  their own. H200, bf16, D = 6144 (`benchmarks/short_conv.py --bwd both`): 1.27 vs the scratch kernel's 1.90 ms
  at T = 32768, 4.84 vs 7.43 ms at T = 131072 (≈ 1.0 TB/s: still bound by the w× recomputed SiLU derivative
  and the L1 reloads, not by HBM).

H200, bf16, D = 6144, w = 4 (fwd / fwd+bwd): 1.75 / 9.3 ms at T = 131072 (cat + conv1d + SiLU: 15.2 / 45.0),
13.9 / 74 ms at T = 1048576 (189 / 654); tiles from a sweep there (scratch bwd: 16 × 128, 4 warps, 1024
programs). The direct kernel's tiles (32 × 64, 8 warps: no spills on sm_90 for w ≤ 4) are not swept yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["ConvConfig", "CONFIG", "short_conv_triton", "short_conv_fwd", "short_conv_bwd"]


@dataclass(frozen=True)
class ConvConfig:
    """Tile sizes: tokens per forward / backward block, channels per block, and the number of backward
    programs aimed at (the backward's chunks of T-blocks are sized to reach it). bwd_direct picks the backward
    kernel (False: the scratch kernel with the bwd_block_* tiles; True: the direct kernel with the
    bwd_direct_* tiles); both size their chunks by bwd_programs."""

    fwd_block_t: int = 64
    fwd_block_d: int = 128
    bwd_block_t: int = 16
    bwd_block_d: int = 128
    bwd_programs: int = 1024
    fwd_warps: int = 4
    bwd_warps: int = 4
    bwd_direct: bool = True  # backward on _conv_bwd_direct_kernel (no scratch, no barriers): 1.5× the scratch one
    bwd_direct_block_t: int = 32
    bwd_direct_block_d: int = 64
    bwd_direct_warps: int = 8


CONFIG = ConvConfig()


@triton.jit
def _rows(x, h, t0, r, offs_d, mask_d, T, sx_t, sh_t, W: tl.constexpr, HAS_HALO: tl.constexpr):
    """fp32 tile of the input rows t = t0 + r (t0 a scalar, r = 0 … n−1): x_t for 0 ≤ t < T, the halo row
    t + W − 1 for 1 − W ≤ t < 0 (read only by a block that starts before 0), else 0. The int64 part of the address
    is the scalar; the tile offsets are int32 and the same for every tap. HAS_HALO: False (0) no halo; True (1)
    a second, masked load from the halo under a branch on t0 < 0; 2 one load whose per-row pointer is picked
    from x or the halo (no branch: far fewer registers where many shifted tiles are in flight, as in the
    direct backward; only for blocks near the start, t0 < W − 1: the halo offsets are int32)."""
    t = t0 + r
    if HAS_HALO == 2:
        xp = x + t0.to(tl.int64) * sx_t + (r[:, None] * sx_t + offs_d[None, :])
        hp = h + (t0 + W - 1) * sh_t + (r[:, None] * sh_t + offs_d[None, :])
        mask = ((t >= 1 - W) & (t < T))[:, None] & mask_d[None, :]
        return tl.load(tl.where((t >= 0)[:, None], xp, hp), mask=mask, other=0.0).to(tl.float32)
    mask = ((t >= 0) & (t < T))[:, None] & mask_d[None, :]
    v = tl.load(x + t0.to(tl.int64) * sx_t + (r[:, None] * sx_t + offs_d[None, :]), mask=mask, other=0.0)
    v = v.to(tl.float32)
    if HAS_HALO:
        if t0 < 0:
            mask = ((t < 0) & (t >= 1 - W))[:, None] & mask_d[None, :]
            hv = tl.load(h + (t0 + W - 1) * sh_t + (r[:, None] * sh_t + offs_d[None, :]), mask=mask, other=0.0)
            v += hv.to(tl.float32)
    return v


@triton.jit
def _preact(x, h, w, t0, r, offs_d, mask_d, T, sx_t, sh_t,
            BT: tl.constexpr, BD: tl.constexpr, W: tl.constexpr, HAS_HALO: tl.constexpr):
    """z_t = Σ_i W_i x_{t−(W−1)+i} as fp32 [BT, BD] for the rows t = t0 + r."""
    z = tl.zeros([BT, BD], dtype=tl.float32)
    for i in tl.static_range(W):
        wi = tl.load(w + offs_d * W + i, mask=mask_d, other=0.0).to(tl.float32)
        z += wi[None, :] * _rows(x, h, t0 - (W - 1) + i, r, offs_d, mask_d, T, sx_t, sh_t, W, HAS_HALO)
    return z


@triton.jit
def _conv_fwd_kernel(x, h, w, y, T, D, sx_b, sx_t, sh_b, sh_t, sy_b, sy_t,
                W: tl.constexpr, HAS_HALO: tl.constexpr, SILU: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    i_t, i_d, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    t0, r = i_t * BT, tl.arange(0, BT)
    offs_d = i_d * BD + tl.arange(0, BD)
    mask_d = offs_d < D
    x += i_b * sx_b
    h += i_b * sh_b
    if HAS_HALO:  # only blocks with t0 < W − 1 read the halo: they pick each row's pointer (mode 2), the rest none
        if t0 < W - 1:
            z = _preact(x, h, w, t0, r, offs_d, mask_d, T, sx_t, sh_t, BT, BD, W, 2)
        else:
            z = _preact(x, h, w, t0, r, offs_d, mask_d, T, sx_t, sh_t, BT, BD, W, False)
    else:
        z = _preact(x, h, w, t0, r, offs_d, mask_d, T, sx_t, sh_t, BT, BD, W, False)
    if SILU:
        z = z * tl.sigmoid(z)
    ptrs = y + i_b * sy_b + t0.to(tl.int64) * sy_t + (r[:, None] * sy_t + offs_d[None, :])
    tl.store(ptrs, z.to(y.dtype.element_ty), mask=(t0 + r < T)[:, None] & mask_d[None, :])


@triton.jit
def _dz(x, h, w, dy, t0, r, offs_d, mask_d, T, sx_t, sh_t, sdy_t,
        BT: tl.constexpr, BD: tl.constexpr, W: tl.constexpr, HAS_HALO: tl.constexpr, SILU: tl.constexpr):
    """dz_t = dy_t silu'(z_t) (or dy_t) as fp32 [BT, BD] for the rows t = t0 + r; 0 outside 0 ≤ t < T."""
    t = t0 + r
    mask = ((t >= 0) & (t < T))[:, None] & mask_d[None, :]
    dz = tl.load(dy + t0.to(tl.int64) * sdy_t + (r[:, None] * sdy_t + offs_d[None, :]), mask=mask, other=0.0)
    dz = dz.to(tl.float32)
    if SILU:
        z = _preact(x, h, w, t0, r, offs_d, mask_d, T, sx_t, sh_t, BT, BD, W, HAS_HALO)
        sig = tl.sigmoid(z)
        dz = dz * sig * (1.0 + z * (1.0 - sig))
    return dz


@triton.jit
def _dw_tap(acc, dz, x, h, t0, r, offs_d, mask_d, T, sx_t, sh_t, I: tl.constexpr, W: tl.constexpr,
            HAS_HALO: tl.constexpr):
    """acc + dz ⊙ x_{t−(W−1)+I} for the rows t = t0 + r: tap I's dW terms, summed over the rows at the end."""
    if I < W:
        acc += dz * _rows(x, h, t0 - (W - 1) + I, r, offs_d, mask_d, T, sx_t, sh_t, W, HAS_HALO)
    return acc


@triton.jit
def _dw_store(dw_part, acc, offs_d, mask_d, I: tl.constexpr, W: tl.constexpr):
    if I < W:
        tl.store(dw_part + offs_d, tl.sum(acc, axis=0), mask=mask_d)


@triton.jit
def _dw_store_taps(dw_part, D, a0, a1, a2, a3, a4, a5, a6, a7, offs_d, mask_d, W: tl.constexpr):
    """This program's dW partial row of every tap i < W: the row sums of its accumulators a_i."""
    _dw_store(dw_part, a0, offs_d, mask_d, 0, W)
    _dw_store(dw_part + D, a1, offs_d, mask_d, 1, W)
    _dw_store(dw_part + 2 * D, a2, offs_d, mask_d, 2, W)
    _dw_store(dw_part + 3 * D, a3, offs_d, mask_d, 3, W)
    _dw_store(dw_part + 4 * D, a4, offs_d, mask_d, 4, W)
    _dw_store(dw_part + 5 * D, a5, offs_d, mask_d, 5, W)
    _dw_store(dw_part + 6 * D, a6, offs_d, mask_d, 6, W)
    _dw_store(dw_part + 7 * D, a7, offs_d, mask_d, 7, W)


@triton.jit
def _dw_taps_store_dx(a0, a1, a2, a3, a4, a5, a6, a7, acc, dz, x, h, dx, t0, r, offs_d, mask_d, T, sx_t, sh_t,
                      sdx_t, W: tl.constexpr, HAS_HALO: tl.constexpr):
    """A T-block's end in both backward kernels: its dW terms added to the tap tiles a_i, its dx (acc) stored."""
    a0 = _dw_tap(a0, dz, x, h, t0, r, offs_d, mask_d, T, sx_t, sh_t, 0, W, HAS_HALO)
    a1 = _dw_tap(a1, dz, x, h, t0, r, offs_d, mask_d, T, sx_t, sh_t, 1, W, HAS_HALO)
    a2 = _dw_tap(a2, dz, x, h, t0, r, offs_d, mask_d, T, sx_t, sh_t, 2, W, HAS_HALO)
    a3 = _dw_tap(a3, dz, x, h, t0, r, offs_d, mask_d, T, sx_t, sh_t, 3, W, HAS_HALO)
    a4 = _dw_tap(a4, dz, x, h, t0, r, offs_d, mask_d, T, sx_t, sh_t, 4, W, HAS_HALO)
    a5 = _dw_tap(a5, dz, x, h, t0, r, offs_d, mask_d, T, sx_t, sh_t, 5, W, HAS_HALO)
    a6 = _dw_tap(a6, dz, x, h, t0, r, offs_d, mask_d, T, sx_t, sh_t, 6, W, HAS_HALO)
    a7 = _dw_tap(a7, dz, x, h, t0, r, offs_d, mask_d, T, sx_t, sh_t, 7, W, HAS_HALO)
    ptrs = dx + t0.to(tl.int64) * sdx_t + (r[:, None] * sdx_t + offs_d[None, :])
    tl.store(ptrs, acc.to(dx.dtype.element_ty), mask=(t0 + r < T)[:, None] & mask_d[None, :])
    return a0, a1, a2, a3, a4, a5, a6, a7


@triton.jit
def _conv_bwd_kernel(x, h, w, dy, dx, dh, dw_part, scratch, T, D, n_blocks, chunk_blocks,
                sx_b, sx_t, sh_b, sh_t, sdy_b, sdy_t, sdx_b, sdx_t, sdh_b, sdh_t,
                W: tl.constexpr, HP: tl.constexpr, HAS_HALO: tl.constexpr, SILU: tl.constexpr,
                BT: tl.constexpr, BD: tl.constexpr):
    i_c, i_d, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    offs_d = i_d * BD + tl.arange(0, BD)
    mask_d = offs_d < D
    x += i_b * sx_b
    h += i_b * sh_b
    dy += i_b * sdy_b
    dx += i_b * sdx_b
    # this program's scratch tile: dz of the block's BT rows, then of the HP rows after it
    cols = tl.arange(0, BD)
    scratch += ((i_b * tl.num_programs(0) + i_c) * tl.num_programs(1) + i_d) * ((BT + HP) * BD)
    # dW_i partial sums, one [BT, BD] tile per tap (summed over rows once, after the loop)
    a0 = tl.zeros([BT, BD], dtype=tl.float32)
    a1, a2, a3, a4, a5, a6, a7 = a0, a0, a0, a0, a0, a0, a0
    r, rt = tl.arange(0, BT), tl.arange(0, HP)
    first = i_c * chunk_blocks
    for j in range(first, tl.minimum(first + chunk_blocks, n_blocks)):
        t0 = j * BT
        dz = _dz(x, h, w, dy, t0, r, offs_d, mask_d, T, sx_t, sh_t, sdy_t, BT, BD, W, HAS_HALO, SILU)
        dz_next = _dz(x, h, w, dy, t0 + BT, rt, offs_d, mask_d, T, sx_t, sh_t, sdy_t, HP, BD, W, HAS_HALO, SILU)
        tl.debug_barrier()  # the previous block's reads of the scratch tile are done
        tl.store(scratch + r[:, None] * BD + cols[None, :], dz)
        tl.store(scratch + (BT + rt)[:, None] * BD + cols[None, :], dz_next)
        tl.debug_barrier()  # ... and this block's writes are visible to every thread
        acc = tl.zeros([BT, BD], dtype=tl.float32)
        for k in tl.static_range(W):  # dx_s = Σ_k W_{W−1−k} dz_{s+k}: shifted reads of the scratch tile
            wk = tl.load(w + offs_d * W + (W - 1 - k), mask=mask_d, other=0.0).to(tl.float32)
            acc += wk[None, :] * tl.load(scratch + (r + k)[:, None] * BD + cols[None, :])
        a0, a1, a2, a3, a4, a5, a6, a7 = _dw_taps_store_dx(a0, a1, a2, a3, a4, a5, a6, a7, acc, dz, x, h, dx, t0, r,
                                                           offs_d, mask_d, T, sx_t, sh_t, sdx_t, W, HAS_HALO)
    if HAS_HALO:
        if i_c == 0:  # d halo_s = Σ_k W_{W−1−k} dz_{s+k} for s = −(W−1) … −1: dz recomputed at each shift
            s0 = tl.full([], 1 - W, tl.int32)
            acc = tl.zeros([HP, BD], dtype=tl.float32)
            for k in tl.static_range(W):
                wk = tl.load(w + offs_d * W + (W - 1 - k), mask=mask_d, other=0.0).to(tl.float32)
                acc += wk[None, :] * _dz(x, h, w, dy, s0 + k, rt, offs_d, mask_d, T, sx_t, sh_t, sdy_t,
                                         HP, BD, W, HAS_HALO, SILU)
            ptrs = dh + i_b * sdh_b + rt[:, None] * sdh_t + offs_d[None, :]
            tl.store(ptrs, acc.to(dh.dtype.element_ty), mask=(rt < W - 1)[:, None] & mask_d[None, :])
    dw_part += (i_b * tl.num_programs(0) + i_c) * W * D
    _dw_store_taps(dw_part, D, a0, a1, a2, a3, a4, a5, a6, a7, offs_d, mask_d, W)


@triton.jit
def _dx_rows(x, h, w, dy, s0, r, offs_d, mask_d, T, sx_t, sh_t, sdy_t,
             BT: tl.constexpr, BD: tl.constexpr, W: tl.constexpr, HAS_HALO: tl.constexpr, SILU: tl.constexpr):
    """(Σ_k W_{W−1−k} dz_{s+k}, dz_s) as fp32 [BT, BD] for the rows s = s0 + r: dx_s (d halo_s for s < 0) and the
    unshifted dz for dW. Each shift's dz is recomputed from shifted loads of x and dy (L1/L2 hits), not shifted
    in registers."""
    wk = tl.load(w + offs_d * W + (W - 1), mask=mask_d, other=0.0).to(tl.float32)
    dz = _dz(x, h, w, dy, s0, r, offs_d, mask_d, T, sx_t, sh_t, sdy_t, BT, BD, W, HAS_HALO, SILU)
    acc = wk[None, :] * dz
    for k in tl.static_range(1, W):
        wk = tl.load(w + offs_d * W + (W - 1 - k), mask=mask_d, other=0.0).to(tl.float32)
        acc += wk[None, :] * _dz(x, h, w, dy, s0 + k, r, offs_d, mask_d, T, sx_t, sh_t, sdy_t,
                                 BT, BD, W, HAS_HALO, SILU)
    return acc, dz


@triton.jit
def _direct_block(a0, a1, a2, a3, a4, a5, a6, a7, x, h, w, dy, dx, t0, r, offs_d, mask_d, T, sx_t, sh_t, sdy_t,
                  sdx_t, BT: tl.constexpr, BD: tl.constexpr, W: tl.constexpr, HAS_HALO: tl.constexpr,
                  SILU: tl.constexpr):
    """One T-block of the direct backward: dx for the rows t0 + r, stored, and the dW tiles a_i updated."""
    acc, dz = _dx_rows(x, h, w, dy, t0, r, offs_d, mask_d, T, sx_t, sh_t, sdy_t, BT, BD, W, HAS_HALO, SILU)
    return _dw_taps_store_dx(a0, a1, a2, a3, a4, a5, a6, a7, acc, dz, x, h, dx, t0, r, offs_d, mask_d, T, sx_t,
                             sh_t, sdx_t, W, HAS_HALO)


@triton.jit
def _conv_bwd_direct_kernel(x, h, w, dy, dx, dh, dw_part, T, D, n_blocks, chunk_blocks,
                            sx_b, sx_t, sh_b, sh_t, sdy_b, sdy_t, sdx_b, sdx_t, sdh_b, sdh_t,
                            W: tl.constexpr, HP: tl.constexpr, HAS_HALO: tl.constexpr, SILU: tl.constexpr,
                            BT: tl.constexpr, BD: tl.constexpr):
    """The backward without scratch or barriers: dz at the W shifted row sets straight from x and dy (see
    _dx_rows); the grid, chunks, dW partials and d halo as in _conv_bwd_kernel. The T-blocks that read the halo
    (t0 < W − 1: one, or more where BT < W − 1) run in a loop of their own that picks each row's pointer from x
    or the halo; the main loop has no halo code (sm_90, w = 4, 32 × 64, 8 warps: 168 registers, where halo
    branches in every shifted load took ~250)."""
    i_c, i_d, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    offs_d = i_d * BD + tl.arange(0, BD)
    mask_d = offs_d < D
    x += i_b * sx_b
    h += i_b * sh_b
    dy += i_b * sdy_b
    dx += i_b * sdx_b
    # dW_i partial sums, one [BT, BD] tile per tap (summed over rows once, after the loops)
    a0 = tl.zeros([BT, BD], dtype=tl.float32)
    a1, a2, a3, a4, a5, a6, a7 = a0, a0, a0, a0, a0, a0, a0
    r = tl.arange(0, BT)
    first = i_c * chunk_blocks
    last = tl.minimum(first + chunk_blocks, n_blocks)
    n_halo = 0
    if HAS_HALO:
        n_halo = (W - 1 + BT - 1) // BT  # T-blocks with t0 < W − 1
        for j in range(first, tl.minimum(last, n_halo)):
            t0 = j * BT
            a0, a1, a2, a3, a4, a5, a6, a7 = _direct_block(
                a0, a1, a2, a3, a4, a5, a6, a7, x, h, w, dy, dx, t0, r, offs_d, mask_d, T, sx_t, sh_t, sdy_t,
                sdx_t, BT, BD, W, 2, SILU)
    for j in range(tl.maximum(first, n_halo), last):
        t0 = j * BT
        a0, a1, a2, a3, a4, a5, a6, a7 = _direct_block(
            a0, a1, a2, a3, a4, a5, a6, a7, x, h, w, dy, dx, t0, r, offs_d, mask_d, T, sx_t, sh_t, sdy_t,
            sdx_t, BT, BD, W, False, SILU)
    if HAS_HALO:
        if i_c == 0:  # d halo: the same sum at s = −(W−1) … −1
            rt = tl.arange(0, HP)
            s0 = tl.full([], 1 - W, tl.int32)
            acc, _ = _dx_rows(x, h, w, dy, s0, rt, offs_d, mask_d, T, sx_t, sh_t, sdy_t, HP, BD, W, 2, SILU)
            ptrs = dh + i_b * sdh_b + rt[:, None] * sdh_t + offs_d[None, :]
            tl.store(ptrs, acc.to(dh.dtype.element_ty), mask=(rt < W - 1)[:, None] & mask_d[None, :])
    dw_part += (i_b * tl.num_programs(0) + i_c) * W * D
    _dw_store_taps(dw_part, D, a0, a1, a2, a3, a4, a5, a6, a7, offs_d, mask_d, W)


def _block_d(D: int, block_d: int) -> int:
    return min(block_d, triton.next_power_of_2(D))


def _halo_args(halo: torch.Tensor | None, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """The halo pointer and its strides (x as a never-read stand-in without one)."""
    if halo is None:
        return x, 0, 0
    return halo, halo.stride(0), halo.stride(1)


def _launch_args(x: torch.Tensor, weight: torch.Tensor, halo: torch.Tensor | None, cfg: ConvConfig | None):
    """(config, B, T, D, w, whether a halo is read, halo pointer and strides) shared by both launchers."""
    B, T, D = x.shape
    W = weight.shape[1]
    has_halo = halo is not None and W > 1
    return (cfg or CONFIG, B, T, D, W, has_halo, *_halo_args(halo if has_halo else None, x))


def short_conv_fwd(x: torch.Tensor, weight: torch.Tensor, halo: torch.Tensor | None, silu: bool,
                   cfg: ConvConfig | None = None) -> torch.Tensor:
    """y [B, T, D] in x's dtype. x: [B, T, D] (channels contiguous); weight: [D, w] contiguous; halo: [B, w−1, D]."""
    cfg, B, T, D, W, has_halo, h, sh_b, sh_t = _launch_args(x, weight, halo, cfg)
    y = torch.empty(B, T, D, dtype=x.dtype, device=x.device)
    BT, BD = cfg.fwd_block_t, _block_d(D, cfg.fwd_block_d)
    grid = (triton.cdiv(T, BT), triton.cdiv(D, BD), B)
    _conv_fwd_kernel[grid](x, h, weight, y, T, D, x.stride(0), x.stride(1), sh_b, sh_t, y.stride(0), y.stride(1),
                      W=W, HAS_HALO=has_halo, SILU=silu, BT=BT, BD=BD, num_warps=cfg.fwd_warps)
    return y


def short_conv_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, halo: torch.Tensor | None, silu: bool,
                   cfg: ConvConfig | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dx in x's dtype, dW [D, w] in weight's dtype, d halo in halo's dtype or None) for the gradient dy of y."""
    cfg, B, T, D, W, has_halo, h, sh_b, sh_t = _launch_args(x, weight, halo, cfg)
    dx = torch.empty(B, T, D, dtype=x.dtype, device=x.device)
    dh = torch.empty(halo.shape, dtype=halo.dtype, device=x.device) if has_halo else None
    dh_arg, sdh_b, sdh_t = _halo_args(dh, x)
    if cfg.bwd_direct:
        BT, BD, warps = cfg.bwd_direct_block_t, _block_d(D, cfg.bwd_direct_block_d), cfg.bwd_direct_warps
    else:
        BT, BD, warps = cfg.bwd_block_t, _block_d(D, cfg.bwd_block_d), cfg.bwd_warps
    n_d, n_blocks = triton.cdiv(D, BD), triton.cdiv(T, BT)
    n_chunks = min(n_blocks, max(1, triton.cdiv(cfg.bwd_programs, B * n_d)))
    chunk_blocks = triton.cdiv(n_blocks, n_chunks)
    n_chunks = triton.cdiv(n_blocks, chunk_blocks)
    HP = triton.next_power_of_2(max(W - 1, 1))
    dw_part = torch.empty(B * n_chunks, W, D, dtype=torch.float32, device=x.device)
    strides = (x.stride(0), x.stride(1), sh_b, sh_t, dy.stride(0), dy.stride(1), dx.stride(0), dx.stride(1),
               sdh_b, sdh_t)
    if cfg.bwd_direct:
        _conv_bwd_direct_kernel[(n_chunks, n_d, B)](
            x, h, weight, dy, dx, dh_arg, dw_part, T, D, n_blocks, chunk_blocks, *strides,
            W=W, HP=HP, HAS_HALO=has_halo, SILU=silu, BT=BT, BD=BD, num_warps=warps,
        )
    else:
        scratch = torch.empty(B * n_chunks * n_d, BT + HP, BD, dtype=torch.float32, device=x.device)
        _conv_bwd_kernel[(n_chunks, n_d, B)](
            x, h, weight, dy, dx, dh_arg, dw_part, scratch, T, D, n_blocks, chunk_blocks, *strides,
            W=W, HP=HP, HAS_HALO=has_halo, SILU=silu, BT=BT, BD=BD, num_warps=warps,
        )
    dw = dw_part.sum(0).t().to(weight.dtype)
    if halo is not None and not has_halo:  # w = 1: the halo is empty
        dh = torch.zeros_like(halo)
    return dx, dw, dh


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """t itself when its last dim is contiguous (the kernels take the other strides), else a copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


class _ShortConvTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, halo, silu):
        x, halo = _rows_contiguous(x), None if halo is None else _rows_contiguous(halo)
        weight = weight.contiguous()
        ctx.save_for_backward(x, weight, halo)
        ctx.silu = silu
        return short_conv_fwd(x, weight, halo, silu)

    @staticmethod
    def backward(ctx, dy):
        x, weight, halo = ctx.saved_tensors
        dx, dw, dh = short_conv_bwd(_rows_contiguous(dy), x, weight, halo, ctx.silu)
        need = ctx.needs_input_grad
        return dx if need[0] else None, dw if need[1] else None, dh if need[2] else None, None


def short_conv_triton(x: torch.Tensor, weight: torch.Tensor, halo: torch.Tensor | None = None,
                      activation: str | None = "silu") -> torch.Tensor:
    """Differentiable y = act(causal depthwise conv(x; halo)) on the Triton kernels; weight [D, w] (checked by
    the caller: kernels.conv.short_conv)."""
    return _ShortConvTriton.apply(x, weight, halo, activation == "silu")
