"""Triton RMSNorm over the last dim: forward and backward.

For rows x ∈ R^D (N rows of a contiguous-last-dim [N, D] view), weight w [D], rstd = 1 / sqrt(mean(x²) + eps)
and x̂ = x · rstd:

    y  = x̂ ⊙ w
    dx = (w ⊙ dy − x̂ · mean(x̂ ⊙ w ⊙ dy)) · rstd,        dw = Σ_rows dy ⊙ x̂

**Forward** (``_rms_norm_fwd_kernel``, grid over blocks of BR rows): each program loads its BR × D tile once (D
padded to the next power of two and masked), reduces the rows in fp32 and writes y in x's dtype and rstd (fp32 [N],
saved for the backward with x; y is not kept). Rows wider than ``max_block_d`` are walked in chunks of that width:
one pass for Σx², one to normalise (x read twice).

**Backward** (``_rms_norm_bwd_kernel``, a fixed number of programs, each walking a contiguous range of row blocks):
per block, dx from x, dy and the saved rstd, and dy ⊙ x̂ added to a [BR, BD] fp32 accumulator that is reduced over
its rows once, after the loop, into this program's dw partial (fp32 [programs, D], summed by torch afterwards). Wide
rows take two passes over their chunks (mean(x̂ ⊙ w ⊙ dy), then dx) and add each chunk's dw terms to the program's
own partial row in place.

Row offsets are int64 scalars (N · D passes 2^31 at 1M tokens × 2048); the tile offsets stay int32.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["NormConfig", "CONFIG", "rms_norm_triton", "rms_norm_fwd", "rms_norm_bwd"]


@dataclass(frozen=True)
class NormConfig:
    """Tile sizes: elements per forward / backward tile (BR = max(1, tile // BD) rows of BD = next_pow2(D)
    columns), the widest row kept as one tile (wider rows loop over chunks of that width), warps per tile (doubled
    for each doubling of a one-row tile past ``*_tile``, up to 16, to keep registers in bounds), and the number of
    backward programs: per SM on CUDA, in total elsewhere (the interpreter)."""

    fwd_tile: int = 4096
    bwd_tile: int = 4096
    max_block_d: int = 8192
    fwd_warps: int = 8
    bwd_warps: int = 8
    bwd_programs_per_sm: int = 4
    cpu_bwd_programs: int = 4


CONFIG = NormConfig()


@triton.jit
def _rms_norm_fwd_kernel(x, w, y, rstd, N, D, sx, sy, eps, BR: tl.constexpr, BD: tl.constexpr, ONE_TILE: tl.constexpr):
    r0 = tl.program_id(0) * BR
    r = tl.arange(0, BR)
    cols = tl.arange(0, BD)
    mask_r = r0 + r < N
    x += r0.to(tl.int64) * sx
    y += r0.to(tl.int64) * sy
    if ONE_TILE:
        mask_d = cols < D
        mask = mask_r[:, None] & mask_d[None, :]
        xv = tl.load(x + (r[:, None] * sx + cols[None, :]), mask=mask, other=0.0).to(tl.float32)
        rs = tl.rsqrt(tl.sum(xv * xv, axis=1) / D + eps)
        wv = tl.load(w + cols, mask=mask_d, other=0.0).to(tl.float32)
        yv = xv * rs[:, None] * wv[None, :]
        tl.store(y + (r[:, None] * sy + cols[None, :]), yv.to(y.dtype.element_ty), mask=mask)
    else:
        ss = tl.zeros([BR, BD], dtype=tl.float32)
        for k in range(0, D, BD):
            offs = k + cols
            mask = mask_r[:, None] & (offs < D)[None, :]
            xv = tl.load(x + (r[:, None] * sx + offs[None, :]), mask=mask, other=0.0).to(tl.float32)
            ss += xv * xv
        rs = tl.rsqrt(tl.sum(ss, axis=1) / D + eps)
        for k in range(0, D, BD):
            offs = k + cols
            mask_d = offs < D
            mask = mask_r[:, None] & mask_d[None, :]
            xv = tl.load(x + (r[:, None] * sx + offs[None, :]), mask=mask, other=0.0).to(tl.float32)
            wv = tl.load(w + offs, mask=mask_d, other=0.0).to(tl.float32)
            yv = xv * rs[:, None] * wv[None, :]
            tl.store(y + (r[:, None] * sy + offs[None, :]), yv.to(y.dtype.element_ty), mask=mask)
    tl.store(rstd + r0 + r, rs, mask=mask_r)


@triton.jit
def _wide_chunk(x, dy, w, base, r, k, cols, mask_r, D, sx, sdy):
    """Columns k + cols of a wide-row block: (their offsets, the [BR, BD] mask, x, dy and w there in fp32)."""
    offs = k + cols
    mask_d = offs < D
    mask = mask_r[:, None] & mask_d[None, :]
    xv = tl.load(x + base * sx + (r[:, None] * sx + offs[None, :]), mask=mask, other=0.0).to(tl.float32)
    g = tl.load(dy + base * sdy + (r[:, None] * sdy + offs[None, :]), mask=mask, other=0.0).to(tl.float32)
    wv = tl.load(w + offs, mask=mask_d, other=0.0).to(tl.float32)
    return offs, mask, xv, g, wv


@triton.jit
def _rms_norm_bwd_kernel(
    x,
    w,
    dy,
    rstd,
    dx,
    dw_part,
    N,
    D,
    sx,
    sdy,
    sdx,
    n_blocks,
    chunk_blocks,
    BR: tl.constexpr,
    BD: tl.constexpr,
    ONE_TILE: tl.constexpr,
    HAS_DW: tl.constexpr,
):
    pid = tl.program_id(0)
    r = tl.arange(0, BR)
    cols = tl.arange(0, BD)
    first = pid * chunk_blocks
    last = tl.minimum(first + chunk_blocks, n_blocks)
    dw_part += pid.to(tl.int64) * D
    if ONE_TILE:
        mask_d = cols < D
        wv = tl.load(w + cols, mask=mask_d, other=0.0).to(tl.float32)
        acc = tl.zeros([BR, BD], dtype=tl.float32)
        for j in range(first, last):
            r0 = j * BR
            mask_r = r0 + r < N
            mask = mask_r[:, None] & mask_d[None, :]
            base = r0.to(tl.int64)
            xv = tl.load(x + base * sx + (r[:, None] * sx + cols[None, :]), mask=mask, other=0.0).to(tl.float32)
            g = tl.load(dy + base * sdy + (r[:, None] * sdy + cols[None, :]), mask=mask, other=0.0).to(tl.float32)
            rs = tl.load(rstd + r0 + r, mask=mask_r, other=0.0)
            xhat = xv * rs[:, None]
            wg = g * wv[None, :]
            c = tl.sum(xhat * wg, axis=1) / D
            dxv = (wg - xhat * c[:, None]) * rs[:, None]
            tl.store(dx + base * sdx + (r[:, None] * sdx + cols[None, :]), dxv.to(dx.dtype.element_ty), mask=mask)
            if HAS_DW:
                acc += g * xhat
        if HAS_DW:
            tl.store(dw_part + cols, tl.sum(acc, axis=0), mask=mask_d)
    else:  # wide rows: dw_part holds zeros and each chunk's terms are added to it in place
        for j in range(first, last):
            r0 = j * BR
            mask_r = r0 + r < N
            base = r0.to(tl.int64)
            rs = tl.load(rstd + r0 + r, mask=mask_r, other=0.0)
            dot = tl.zeros([BR, BD], dtype=tl.float32)
            for k in range(0, D, BD):
                offs, mask, xv, g, wv = _wide_chunk(x, dy, w, base, r, k, cols, mask_r, D, sx, sdy)
                dot += xv * g * wv[None, :]
            c = tl.sum(dot, axis=1) * rs / D
            for k in range(0, D, BD):
                offs, mask, xv, g, wv = _wide_chunk(x, dy, w, base, r, k, cols, mask_r, D, sx, sdy)
                xhat = xv * rs[:, None]
                dxv = (g * wv[None, :] - xhat * c[:, None]) * rs[:, None]
                ptrs = dx + base * sdx + (r[:, None] * sdx + offs[None, :])
                tl.store(ptrs, dxv.to(dx.dtype.element_ty), mask=mask)
                if HAS_DW:  # other threads may hold these columns: the barrier orders their last store first
                    tl.debug_barrier()
                    p = tl.load(dw_part + offs, mask=offs < D, other=0.0)
                    tl.store(dw_part + offs, p + tl.sum(g * xhat, axis=0), mask=offs < D)


def _tiles(N: int, D: int, tile: int, warps: int, cfg: NormConfig) -> tuple[int, int, bool, int]:
    """(rows per block BR, columns per tile BD, whether one tile spans the row, warps)."""
    BD = triton.next_power_of_2(D)
    one_tile = BD <= cfg.max_block_d
    if not one_tile:
        BD = triton.next_power_of_2(cfg.max_block_d)
    warps = min(max(warps, 16), warps * max(1, BD // tile))
    return max(1, min(tile // BD, triton.next_power_of_2(N))) if one_tile else 1, BD, one_tile, warps


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _n_programs(device: torch.device, cfg: NormConfig) -> int:
    if device.type == "cuda":
        return cfg.bwd_programs_per_sm * _sm_count(device.index if device.index is not None else 0)
    return cfg.cpu_bwd_programs


def rms_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor, eps: float, cfg: NormConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [N, D] in x's dtype, rstd [N] fp32). x: [N, D] with unit column stride; weight: [D] contiguous."""
    cfg = cfg or CONFIG
    N, D = x.shape
    y = torch.empty(N, D, dtype=x.dtype, device=x.device)
    rstd = torch.empty(N, dtype=torch.float32, device=x.device)
    if N == 0:
        return y, rstd
    BR, BD, one_tile, warps = _tiles(N, D, cfg.fwd_tile, cfg.fwd_warps, cfg)
    _rms_norm_fwd_kernel[(triton.cdiv(N, BR),)](
        x,
        weight,
        y,
        rstd,
        N,
        D,
        x.stride(0),
        y.stride(0),
        eps,
        BR=BR,
        BD=BD,
        ONE_TILE=one_tile,
        num_warps=warps,
    )
    return y, rstd


def rms_norm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    need_dw: bool = True,
    cfg: NormConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dx [N, D] in x's dtype, dw [D] in weight's dtype or None) for the gradient dy [N, D] of y."""
    cfg = cfg or CONFIG
    N, D = x.shape
    dx = torch.empty(N, D, dtype=x.dtype, device=x.device)
    if N == 0:
        return dx, torch.zeros_like(weight) if need_dw else None
    BR, BD, one_tile, warps = _tiles(N, D, cfg.bwd_tile, cfg.bwd_warps, cfg)
    n_blocks = triton.cdiv(N, BR)
    chunk_blocks = triton.cdiv(n_blocks, min(n_blocks, max(1, _n_programs(x.device, cfg))))
    n_programs = triton.cdiv(n_blocks, chunk_blocks)
    alloc = torch.empty if one_tile else torch.zeros
    dw_part = alloc(n_programs if need_dw else 1, D, dtype=torch.float32, device=x.device)
    _rms_norm_bwd_kernel[(n_programs,)](
        x,
        weight,
        dy,
        rstd,
        dx,
        dw_part,
        N,
        D,
        x.stride(0),
        dy.stride(0),
        dx.stride(0),
        n_blocks,
        chunk_blocks,
        BR=BR,
        BD=BD,
        ONE_TILE=one_tile,
        HAS_DW=need_dw,
        num_warps=warps,
    )
    return dx, dw_part.sum(0).to(weight.dtype) if need_dw else None


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as [N, D] rows with unit column stride: a view when the layout allows one, else a copy."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


class _RMSNormTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x2, weight = _rows(x), weight.contiguous()
        y, rstd = rms_norm_fwd(x2, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_bwd(_rows(dy), x2, weight, rstd, need_dw=ctx.needs_input_grad[1])
        return dx.view(ctx.shape) if ctx.needs_input_grad[0] else None, dw, None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Differentiable y = x / sqrt(mean(x²) + eps) ⊙ weight over the last dim on the Triton kernels (arguments
    checked by the caller: kernels.norm.rms_norm)."""
    return _RMSNormTriton.apply(x, weight, eps)
