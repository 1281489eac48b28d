"""Triton SwiGLU: h = silu(g) ⊙ u on the fused projection z = [g | u], forward and backward.

Both kernels tile [N, F] (N tokens, F the hidden width) into [BR, BC] blocks, one per program; a block's g
and u are two contiguous loads from the same rows of z (columns c and F + c), computed in fp32:

    forward:   h = g σ(g) u
    backward:  dg = dh u σ(g) (1 + g (1 − σ(g))),    du = dh g σ(g)

The backward writes dg and du into one [N, 2F] gradient: the fused projection's own, with no cat. Nothing
is saved but z (the projection's output, which backward needs anyway); σ(g) is recomputed. HBM traffic:
forward reads 2F and writes F per token, backward reads 3F and writes 2F.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["SwiGLUConfig", "CONFIG", "swiglu_triton", "swiglu_fwd", "swiglu_bwd"]


@dataclass(frozen=True)
class SwiGLUConfig:
    """Tile of one program: rows (tokens) × columns (hidden units), and its warps."""

    block_rows: int = 4
    block_cols: int = 1024
    warps: int = 4


CONFIG = SwiGLUConfig()


@triton.jit
def _gate_up_tile(z, N, F, s_z, BR: tl.constexpr, BC: tl.constexpr):
    """This program's [BR, BC] tile: (int64 rows [BR, 1], columns, mask, g and u in fp32)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    mask = (rows < N)[:, None] & (cols < F)[None, :]
    rows = rows.to(tl.int64)[:, None]
    zp = z + rows * s_z + cols[None, :]
    g = tl.load(zp, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(zp + F, mask=mask, other=0.0).to(tl.float32)
    return rows, cols, mask, g, u


@triton.jit
def _swiglu_fwd_kernel(z, h, N, F, s_z, s_h, BR: tl.constexpr, BC: tl.constexpr):
    rows, cols, mask, g, u = _gate_up_tile(z, N, F, s_z, BR, BC)
    out = g * tl.sigmoid(g) * u
    tl.store(h + rows * s_h + cols[None, :], out.to(h.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(z, dh, dz, N, F, s_z, s_dh, s_dz, BR: tl.constexpr, BC: tl.constexpr):
    rows, cols, mask, g, u = _gate_up_tile(z, N, F, s_z, BR, BC)
    d = tl.load(dh + rows * s_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    dg = d * u * sig * (1.0 + g * (1.0 - sig))
    dzp = dz + rows * s_dz + cols[None, :]
    tl.store(dzp, dg.to(dz.dtype.element_ty), mask=mask)
    tl.store(dzp + F, (d * silu).to(dz.dtype.element_ty), mask=mask)


def _grid(N: int, F: int) -> tuple[int, int]:
    return triton.cdiv(N, CONFIG.block_rows), triton.cdiv(F, CONFIG.block_cols)


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """t as [N, width] rows with unit column stride (a view where possible)."""
    t = t.reshape(-1, width)
    return t if t.stride(1) == 1 or t.shape[0] == 0 else t.contiguous()


def swiglu_fwd(z: torch.Tensor) -> torch.Tensor:
    """h [N, F] from z = [g | u] [N, 2F] (unit column stride)."""
    N, F = z.shape[0], z.shape[1] // 2
    h = torch.empty(N, F, device=z.device, dtype=z.dtype)
    if N and F:
        _swiglu_fwd_kernel[_grid(N, F)](z, h, N, F, z.stride(0), h.stride(0), BR=CONFIG.block_rows,
                                 BC=CONFIG.block_cols, num_warps=CONFIG.warps)
    return h


def swiglu_bwd(z: torch.Tensor, dh: torch.Tensor) -> torch.Tensor:
    """dz = [dg | du] [N, 2F] from z [N, 2F] and dh [N, F] (both with unit column stride)."""
    N, F = dh.shape
    dz = torch.empty(N, 2 * F, device=z.device, dtype=z.dtype)
    if N and F:
        _swiglu_bwd_kernel[_grid(N, F)](z, dh, dz, N, F, z.stride(0), dh.stride(0), dz.stride(0),
                                 BR=CONFIG.block_rows, BC=CONFIG.block_cols, num_warps=CONFIG.warps)
    return dz


class _SwiGLUTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        width = gate_up.shape[-1]
        z = _rows(gate_up, width)
        ctx.save_for_backward(z)
        ctx.shape = gate_up.shape
        return swiglu_fwd(z).view(*gate_up.shape[:-1], width // 2)

    @staticmethod
    def backward(ctx, dh: torch.Tensor) -> torch.Tensor:
        (z,) = ctx.saved_tensors
        return swiglu_bwd(z, _rows(dh, z.shape[1] // 2)).view(ctx.shape)


def swiglu_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """Differentiable h = silu(g) ⊙ u for gate_up = [g | u] [..., 2F] on the Triton kernels (checked by the
    caller: kernels.swiglu.swiglu)."""
    return _SwiGLUTriton.apply(gate_up)
