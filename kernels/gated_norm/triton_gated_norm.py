"""Triton gated RMSNorm, the Mamba-2 mixer's output stage: forward and backward, one kernel each.

For N rows of width Dw = H·P: y and x (the scan's output and input, [N, Dw] views of [..., H, P]), the gate z (an
[N, Dw] view with unit column stride and any row stride: a column slice of the in_proj output), D [H], w [Dw],
σ = sigmoid(z), s = z σ = silu(z), and per row rstd = 1 / sqrt(mean(u²) + eps):

    g  = y + D_h x,    u = g ⊙ s,    û = u · rstd,    out = û ⊙ w
    du = rstd · (w ⊙ dout − û · mean(û ⊙ w ⊙ dout)),    dg = du ⊙ s
    dy = dg,    dx = D_h dg,    dz = du ⊙ g ⊙ σ (1 + z (1 − σ))
    dw = Σ_rows dout ⊙ û,    dD_h = Σ_rows Σ_{p ∈ head h} dg ⊙ x

**Tiles.** A tile is BR rows × BH·BP slots: slot = j·BP + q holds column p = p0 + q of head h = h0 + j (memory column
h·P + p), BP = next_pow2(P), so a head's slots are contiguous and a per-head sum is a reshape to [BH, BP] and a sum
over its columns; D is gathered per slot. Slots past H or P are masked (P not a power of two pads each head). Rows of
next_pow2(H)·BP ≤ ``fwd_max_block_d`` / ``bwd_max_block_d`` slots are one tile; wider rows loop over chunks of BH
heads, and over chunks of BP columns inside a head when one head alone is wider than the limit.

**Forward** (``_gated_norm_fwd_kernel``, grid over blocks of BR rows): each program reads its rows of y, x, z once
(wide rows twice: Σu², then normalise), computes in fp32 and writes out in y's dtype and rstd (fp32 [N]). Backward
keeps y, x, z (the inputs) and rstd only: σ(z), g and u are recomputed.

**Backward** (``_gated_norm_bwd_kernel``, a fixed number of programs, each walking a contiguous range of row blocks):
per block dy, dx, dz (new contiguous [N, Dw] tensors), with dout ⊙ û and dg ⊙ x added to [BR, BD] fp32
accumulators reduced once, after the loop, into this program's rows of the partials dw [programs, Dw] and
dD [programs, H] (fp32, summed by torch afterwards). Wide rows take two passes over their chunks
(mean(û ⊙ w ⊙ dout), then the gradients) and add each chunk's dw and dD terms to the program's partial rows in place.

Row offsets are int64 scalars (N · Dw passes 2^31 at 256K tokens × 8192); the tile offsets stay int32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.norm.triton_norm import _n_programs  # backward programs: per SM on CUDA, cfg.cpu_bwd_programs else

__all__ = ["GatedNormConfig", "CONFIG", "gated_rms_norm_triton", "gated_rms_norm_fwd", "gated_rms_norm_bwd"]


@dataclass(frozen=True)
class GatedNormConfig:
    """Tile sizes: slots per forward / backward tile (BR = max(1, tile // BD) rows of BD = BH·BP slots), the widest
    row kept as one tile forward / backward (wider rows loop over chunks of the widest power of two within it),
    warps per tile (doubled for each doubling of a one-row tile past ``*_tile``, up to 16), and the number of
    backward programs: per SM on CUDA, in total elsewhere (the interpreter).

    The backward holds ~10 live [BR, BD] fp32 tensors, so its rows are chunked at 4096 slots (a one-off H200 timing
    while writing it, bf16, 16K rows, not in RESULTS.md: one 8192-slot tile at 16 warps spilled and ran at about a
    fifth of the bandwidth of two 4096-slot chunks); the forward keeps 8192-slot rows whole."""

    fwd_tile: int = 4096
    bwd_tile: int = 4096
    fwd_max_block_d: int = 8192
    bwd_max_block_d: int = 4096
    fwd_warps: int = 8
    bwd_warps: int = 16
    bwd_programs_per_sm: int = 2
    cpu_bwd_programs: int = 4


CONFIG = GatedNormConfig()


@triton.jit
def _slots(h0, p0, H, P, BH: tl.constexpr, BP: tl.constexpr):
    """A chunk's BH·BP slots (head h0 + slot // BP, column p0 + slot % BP of it): (memory columns, heads, mask)."""
    slot = tl.arange(0, BH * BP)
    head = h0 + slot // BP
    p = p0 + slot % BP
    return head * P + p, head, (head < H) & (p < P)


@triton.jit
def _gate(y, x, z, D, base, r, mask_r, cols, heads, mask_d, sy, sx, sz, HAS_SKIP: tl.constexpr):
    """A tile of rows base + r at columns cols, in fp32: (mask, x, D per slot, z, σ(z), g = y + D_h x, u = g z σ(z));
    x and D are 0 without the skip term."""
    mask = mask_r[:, None] & mask_d[None, :]
    g = tl.load(y + base * sy + (r[:, None] * sy + cols[None, :]), mask=mask, other=0.0).to(tl.float32)
    if HAS_SKIP:
        xv = tl.load(x + base * sx + (r[:, None] * sx + cols[None, :]), mask=mask, other=0.0).to(tl.float32)
        dv = tl.load(D + heads, mask=mask_d, other=0.0).to(tl.float32)
        g += dv[None, :] * xv
    else:
        xv = tl.zeros_like(g)
        dv = tl.zeros_like(cols).to(tl.float32)
    zv = tl.load(z + base * sz + (r[:, None] * sz + cols[None, :]), mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(zv)
    return mask, xv, dv, zv, sig, g, g * zv * sig


@triton.jit
def _gated_norm_fwd_kernel(
    y,
    x,
    z,
    D,
    w,
    out,
    rstd,
    N,
    Dw,
    H,
    P,
    sy,
    sx,
    sz,
    eps,
    BR: tl.constexpr,
    BH: tl.constexpr,
    BP: tl.constexpr,
    ONE_TILE: tl.constexpr,
    HAS_SKIP: tl.constexpr,
):
    r0 = tl.program_id(0) * BR
    r = tl.arange(0, BR)
    mask_r = r0 + r < N
    base = r0.to(tl.int64)
    if ONE_TILE:
        cols, heads, mask_d = _slots(0, 0, H, P, BH, BP)
        mask, xv, dv, zv, sig, g, u = _gate(y, x, z, D, base, r, mask_r, cols, heads, mask_d, sy, sx, sz, HAS_SKIP)
        rs = tl.rsqrt(tl.sum(u * u, axis=1) / Dw + eps)
        wv = tl.load(w + cols, mask=mask_d, other=0.0).to(tl.float32)
        ov = u * rs[:, None] * wv[None, :]
        tl.store(out + base * Dw + (r[:, None] * Dw + cols[None, :]), ov.to(out.dtype.element_ty), mask=mask)
    else:
        ss = tl.zeros([BR, BH * BP], dtype=tl.float32)
        for h0 in range(0, H, BH):
            for p0 in range(0, P, BP):
                cols, heads, mask_d = _slots(h0, p0, H, P, BH, BP)
                mask, xv, dv, zv, sig, g, u = _gate(
                    y, x, z, D, base, r, mask_r, cols, heads, mask_d, sy, sx, sz, HAS_SKIP
                )
                ss += u * u
        rs = tl.rsqrt(tl.sum(ss, axis=1) / Dw + eps)
        for h0 in range(0, H, BH):
            for p0 in range(0, P, BP):
                cols, heads, mask_d = _slots(h0, p0, H, P, BH, BP)
                mask, xv, dv, zv, sig, g, u = _gate(
                    y, x, z, D, base, r, mask_r, cols, heads, mask_d, sy, sx, sz, HAS_SKIP
                )
                wv = tl.load(w + cols, mask=mask_d, other=0.0).to(tl.float32)
                ov = u * rs[:, None] * wv[None, :]
                tl.store(out + base * Dw + (r[:, None] * Dw + cols[None, :]), ov.to(out.dtype.element_ty), mask=mask)
    tl.store(rstd + r0 + r, rs, mask=mask_r)


@triton.jit
def _input_grads(
    dy,
    dx,
    dz,
    base,
    r,
    cols,
    mask,
    Dw,
    du,
    dv,
    zv,
    sig,
    g,
    WRITE_DY: tl.constexpr,
    WRITE_DX: tl.constexpr,
    WRITE_DZ: tl.constexpr,
):
    """Stores a tile's dy = dg, dx = D_h dg and dz = du ⊙ g ⊙ σ (1 + z (1 − σ)) (rows of Dw, unit column stride);
    returns dg = du ⊙ z σ."""
    dg = du * zv * sig
    offs = base * Dw + (r[:, None] * Dw + cols[None, :])
    if WRITE_DY:
        tl.store(dy + offs, dg.to(dy.dtype.element_ty), mask=mask)
    if WRITE_DX:
        tl.store(dx + offs, (dv[None, :] * dg).to(dx.dtype.element_ty), mask=mask)
    if WRITE_DZ:
        dzv = du * g * sig * (1.0 + zv * (1.0 - sig))
        tl.store(dz + offs, dzv.to(dz.dtype.element_ty), mask=mask)
    return dg


@triton.jit
def _head_sums(v, BH: tl.constexpr, BP: tl.constexpr):
    """[BH·BP] slot values → [BH] sums over each head's BP slots."""
    return tl.sum(tl.reshape(v, (BH, BP)), axis=1)


@triton.jit
def _gated_norm_bwd_kernel(
    y,
    x,
    z,
    D,
    w,
    dout,
    rstd,
    dy,
    dx,
    dz,
    dw_part,
    dD_part,
    N,
    Dw,
    H,
    P,
    sy,
    sx,
    sz,
    sdo,
    n_blocks,
    chunk_blocks,
    BR: tl.constexpr,
    BH: tl.constexpr,
    BP: tl.constexpr,
    ONE_TILE: tl.constexpr,
    HAS_SKIP: tl.constexpr,
    WRITE_DY: tl.constexpr,
    WRITE_DX: tl.constexpr,
    WRITE_DZ: tl.constexpr,
    HAS_DW: tl.constexpr,
    HAS_DD: tl.constexpr,
):
    pid = tl.program_id(0)
    r = tl.arange(0, BR)
    first = pid * chunk_blocks
    last = tl.minimum(first + chunk_blocks, n_blocks)
    dw_part += pid.to(tl.int64) * Dw
    dD_part += pid.to(tl.int64) * H
    if ONE_TILE:
        cols, heads, mask_d = _slots(0, 0, H, P, BH, BP)
        wv = tl.load(w + cols, mask=mask_d, other=0.0).to(tl.float32)
        acc_w = tl.zeros([BR, BH * BP], dtype=tl.float32)
        acc_d = tl.zeros([BR, BH * BP], dtype=tl.float32)
        for j in range(first, last):
            r0 = j * BR
            mask_r = r0 + r < N
            base = r0.to(tl.int64)
            mask, xv, dv, zv, sig, g, u = _gate(y, x, z, D, base, r, mask_r, cols, heads, mask_d, sy, sx, sz, HAS_SKIP)
            do = tl.load(dout + base * sdo + (r[:, None] * sdo + cols[None, :]), mask=mask, other=0.0).to(tl.float32)
            rs = tl.load(rstd + r0 + r, mask=mask_r, other=0.0)
            uhat = u * rs[:, None]
            wdo = wv[None, :] * do
            c = tl.sum(uhat * wdo, axis=1) / Dw
            du = (wdo - uhat * c[:, None]) * rs[:, None]
            dg = _input_grads(dy, dx, dz, base, r, cols, mask, Dw, du, dv, zv, sig, g, WRITE_DY, WRITE_DX, WRITE_DZ)
            if HAS_DW:
                acc_w += do * uhat
            if HAS_DD:
                acc_d += dg * xv
        if HAS_DW:
            tl.store(dw_part + cols, tl.sum(acc_w, axis=0), mask=mask_d)
        if HAS_DD:
            hs = tl.arange(0, BH)
            tl.store(dD_part + hs, _head_sums(tl.sum(acc_d, axis=0), BH, BP), mask=hs < H)
    else:  # wide rows: the partials hold zeros and each chunk's terms are added to them in place
        for j in range(first, last):
            r0 = j * BR
            mask_r = r0 + r < N
            base = r0.to(tl.int64)
            rs = tl.load(rstd + r0 + r, mask=mask_r, other=0.0)
            dot = tl.zeros([BR, BH * BP], dtype=tl.float32)
            for h0 in range(0, H, BH):
                for p0 in range(0, P, BP):
                    cols, heads, mask_d = _slots(h0, p0, H, P, BH, BP)
                    mask, xv, dv, zv, sig, g, u = _gate(
                        y, x, z, D, base, r, mask_r, cols, heads, mask_d, sy, sx, sz, HAS_SKIP
                    )
                    do = tl.load(dout + base * sdo + (r[:, None] * sdo + cols[None, :]), mask=mask, other=0.0)
                    wv = tl.load(w + cols, mask=mask_d, other=0.0).to(tl.float32)
                    dot += u * wv[None, :] * do.to(tl.float32)
            c = tl.sum(dot, axis=1) * rs / Dw  # mean(û ⊙ w ⊙ dout)
            for h0 in range(0, H, BH):
                for p0 in range(0, P, BP):
                    cols, heads, mask_d = _slots(h0, p0, H, P, BH, BP)
                    mask, xv, dv, zv, sig, g, u = _gate(
                        y, x, z, D, base, r, mask_r, cols, heads, mask_d, sy, sx, sz, HAS_SKIP
                    )
                    do = tl.load(dout + base * sdo + (r[:, None] * sdo + cols[None, :]), mask=mask, other=0.0)
                    do = do.to(tl.float32)
                    wv = tl.load(w + cols, mask=mask_d, other=0.0).to(tl.float32)
                    uhat = u * rs[:, None]
                    du = (wv[None, :] * do - uhat * c[:, None]) * rs[:, None]
                    dg = _input_grads(
                        dy, dx, dz, base, r, cols, mask, Dw, du, dv, zv, sig, g, WRITE_DY, WRITE_DX, WRITE_DZ
                    )
                    # other threads may hold these partials: the barrier orders their last store first
                    if HAS_DW:
                        tl.debug_barrier()
                        pw = tl.load(dw_part + cols, mask=mask_d, other=0.0)
                        tl.store(dw_part + cols, pw + tl.sum(do * uhat, axis=0), mask=mask_d)
                    if HAS_DD:
                        tl.debug_barrier()
                        hs = h0 + tl.arange(0, BH)
                        pd = tl.load(dD_part + hs, mask=hs < H, other=0.0)
                        tl.store(dD_part + hs, pd + _head_sums(tl.sum(dg * xv, axis=0), BH, BP), mask=hs < H)


def _tiles(N: int, H: int, P: int, tile: int, warps: int, max_block_d: int) -> tuple[int, int, int, bool, int]:
    """(rows per block BR, heads per tile BH, columns of a head per tile BP, whether one tile spans the row, warps)."""
    BH, BP = triton.next_power_of_2(H), triton.next_power_of_2(P)
    one_tile = BH * BP <= max_block_d
    if not one_tile:
        widest = 1 << (max(1, max_block_d).bit_length() - 1)  # the widest power of two within max_block_d
        BP = min(BP, widest)
        BH = widest // BP
    BD = BH * BP
    warps = min(max(warps, 16), warps * max(1, BD // tile))
    return max(1, min(tile // BD, triton.next_power_of_2(N))), BH, BP, one_tile, warps


def gated_rms_norm_fwd(
    y: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    heads: int,
    x: torch.Tensor | None = None,
    D: torch.Tensor | None = None,
    cfg: GatedNormConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [N, Dw] in y's dtype, rstd [N] fp32). y, z, x: [N, Dw] with unit column stride (any row strides), Dw =
    heads · P; weight: [Dw] and D: [heads], contiguous; x and D both or neither."""
    cfg = cfg or CONFIG
    N, Dw = y.shape
    out = torch.empty(N, Dw, dtype=y.dtype, device=y.device)
    rstd = torch.empty(N, dtype=torch.float32, device=y.device)
    if N == 0:
        return out, rstd
    P = Dw // heads
    BR, BH, BP, one_tile, warps = _tiles(N, heads, P, cfg.fwd_tile, cfg.fwd_warps, cfg.fwd_max_block_d)
    has_skip = x is not None
    x_arg, D_arg = (x, D) if has_skip else (y, weight)  # placeholders the kernel does not read
    _gated_norm_fwd_kernel[(triton.cdiv(N, BR),)](
        y,
        x_arg,
        z,
        D_arg,
        weight,
        out,
        rstd,
        N,
        Dw,
        heads,
        P,
        y.stride(0),
        x_arg.stride(0),
        z.stride(0),
        eps,
        BR=BR,
        BH=BH,
        BP=BP,
        ONE_TILE=one_tile,
        HAS_SKIP=has_skip,
        num_warps=warps,
    )
    return out, rstd


def gated_rms_norm_bwd(
    dout: torch.Tensor,
    y: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    heads: int,
    x: torch.Tensor | None = None,
    D: torch.Tensor | None = None,
    *,
    need_dy: bool = True,
    need_dz: bool = True,
    need_dw: bool = True,
    need_dx: bool = True,
    need_dD: bool = True,
    cfg: GatedNormConfig | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """(dy, dz, dw, dx, dD) for the gradient dout [N, Dw] (unit column stride) of out: dy, dz, dx new contiguous
    [N, Dw] in y's / z's / x's dtype, dw and dD in weight's / D's dtype; None where not asked for (dx and dD without
    the skip term)."""
    cfg = cfg or CONFIG
    N, Dw = y.shape
    has_skip = x is not None
    need_dx, need_dD = need_dx and has_skip, need_dD and has_skip

    def rows_like(t: torch.Tensor, need: bool) -> torch.Tensor | None:
        return torch.empty(N, Dw, dtype=t.dtype, device=t.device) if need else None

    dy, dz, dx = rows_like(y, need_dy), rows_like(z, need_dz), rows_like(x, need_dx) if has_skip else None
    if N == 0:
        dw = torch.zeros_like(weight) if need_dw else None
        return dy, dz, dw, dx, torch.zeros_like(D) if need_dD else None
    P = Dw // heads
    BR, BH, BP, one_tile, warps = _tiles(N, heads, P, cfg.bwd_tile, cfg.bwd_warps, cfg.bwd_max_block_d)
    n_blocks = triton.cdiv(N, BR)
    chunk_blocks = triton.cdiv(n_blocks, min(n_blocks, max(1, _n_programs(y.device, cfg))))
    n_programs = triton.cdiv(n_blocks, chunk_blocks)
    alloc = torch.empty if one_tile else torch.zeros
    dw_part = alloc(n_programs if need_dw else 1, Dw, dtype=torch.float32, device=y.device)
    dD_part = alloc(n_programs if need_dD else 1, heads, dtype=torch.float32, device=y.device)
    x_arg, D_arg = (x, D) if has_skip else (y, weight)  # placeholders the kernel does not read
    _gated_norm_bwd_kernel[(n_programs,)](
        y,
        x_arg,
        z,
        D_arg,
        weight,
        dout,
        rstd,
        dy if need_dy else dout,
        dx if need_dx else dout,
        dz if need_dz else dout,
        dw_part,
        dD_part,
        N,
        Dw,
        heads,
        P,
        y.stride(0),
        x_arg.stride(0),
        z.stride(0),
        dout.stride(0),
        n_blocks,
        chunk_blocks,
        BR=BR,
        BH=BH,
        BP=BP,
        ONE_TILE=one_tile,
        HAS_SKIP=has_skip,
        WRITE_DY=need_dy,
        WRITE_DX=need_dx,
        WRITE_DZ=need_dz,
        HAS_DW=need_dw,
        HAS_DD=need_dD,
        num_warps=warps,
    )
    dw = dw_part.sum(0).to(weight.dtype) if need_dw else None
    dD = dD_part.sum(0).to(D.dtype) if need_dD else None
    return dy, dz, dw, dx, dD


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """t as [N, width] rows with unit column stride: a view when the layout allows one, else a copy."""
    t = t.reshape(-1, width)
    return t if t.stride(-1) == 1 or t.shape[0] == 0 else t.contiguous()


class _GatedRMSNormTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, z, weight, eps, x, D):
        heads, width = y.shape[-2], y.shape[-2] * y.shape[-1]
        y2, z2 = _rows(y, width), _rows(z, width)
        x2 = _rows(x, width) if x is not None else None
        weight, D = weight.contiguous(), D.contiguous() if D is not None else None
        out, rstd = gated_rms_norm_fwd(y2, z2, weight, eps, heads, x2, D)
        ctx.save_for_backward(y2, z2, weight, rstd, x2, D)
        ctx.shapes = heads, y.shape, z.shape
        return out.view(z.shape)

    @staticmethod
    def backward(ctx, dout):
        y2, z2, weight, rstd, x2, D = ctx.saved_tensors
        heads, y_shape, z_shape = ctx.shapes
        need_y, need_z, need_w, _, need_x, need_D = ctx.needs_input_grad
        dy, dz, dw, dx, dD = gated_rms_norm_bwd(
            _rows(dout, z_shape[-1]), y2, z2, weight, rstd, heads, x2, D,
            need_dy=need_y, need_dz=need_z, need_dw=need_w, need_dx=need_x, need_dD=need_D,
        )  # fmt: skip
        dy = dy.view(y_shape) if dy is not None else None
        dx = dx.view(y_shape) if dx is not None else None
        return dy, dz.view(z_shape) if dz is not None else None, dw, None, dx, dD


def gated_rms_norm_triton(
    y: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    x: torch.Tensor | None = None,
    D: torch.Tensor | None = None,
) -> torch.Tensor:
    """Differentiable out = RMSNorm((y + D_h x) ⊙ silu(z)) ⊙ weight on the Triton kernels (arguments checked by the
    caller: kernels.gated_norm.gated_rms_norm)."""
    return _GatedRMSNormTriton.apply(y, z, weight, eps, x, D)
