"""Triton kernels for the Mamba-2 scan's inputs: Δ, the log-gate and v = Δ·x in one pass, and the group broadcast.

Rows are (token, head) pairs of x viewed as [R = B·T·H, P]; dt is read through its own token stride (it is a
column slice of the in_projection's output). With Δ = softplus(dt + b_h), A_h = −exp(A_log_h):

**Forward** (``_ssd_inputs_fwd_kernel``, a program per block of BR rows): v = Δ·x in x's dtype, the log-gate
A_h·Δ in fp32 [R].
**Backward** (``_ssd_inputs_bwd_kernel``): with dv and the log-gate's gradient dg,

    dx = Δ·dv,   dΔ = Σ_p dv ⊙ x + A_h·dg,   d(dt) = dΔ · σ(dt + b_h)

d(dt) is written in fp32 [R]; torch sums it over tokens for b's gradient and forms A_log's, Σ_t dg·A_h·Δ, from
the small [B, T, H] tensors. Only x and dt are kept for backward (Δ is recomputed: one exp and one log per row).

**Group broadcast** (``_expand_groups_kernel``): B, C [.., G, N] → [.., H, N], each program loading a block of
tokens of one group once and storing it to the group's H / G heads (the strided copy torch makes of an expanded
view is not vectorised: 2.5 ms where this is one read and H/G writes at bandwidth). Its backward is torch's sum
over a group's heads.

Row offsets are int64 (B·T·H·P passes 2^31 at 1M tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["SsdConfig", "CONFIG", "ssd_inputs_triton", "expand_groups_triton", "broadcast_groups"]


@dataclass(frozen=True)
class SsdConfig:
    """Elements per tile (BR = tile // next_pow2(P) rows of a program), warps, and the tokens per broadcast tile."""

    tile: int = 4096
    warps: int = 4
    expand_tokens: int = 32
    expand_warps: int = 4


CONFIG = SsdConfig()


@triton.jit
def _softplus(x):
    """log(1 + eᕽ), the form torch uses above 20 (x itself)."""
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def _ssd_inputs_fwd_kernel(x, dt, bias, a_log, v, gate, R, H, P, s_dt,
                           BR: tl.constexpr, BP: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BP)
    mr = rows < R
    h = rows % H
    raw = tl.load(dt + (rows // H) * s_dt + h, mask=mr, other=0.0).to(tl.float32)
    delta = _softplus(raw + tl.load(bias + h, mask=mr, other=0.0).to(tl.float32))
    a = -tl.exp(tl.load(a_log + h, mask=mr, other=0.0).to(tl.float32))
    tl.store(gate + rows, a * delta, mask=mr)
    m = mr[:, None] & (cols < P)[None, :]
    offs = rows[:, None] * P + cols[None, :]
    xv = tl.load(x + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(v + offs, (xv * delta[:, None]).to(v.dtype.element_ty), mask=m)


@triton.jit
def _ssd_inputs_bwd_kernel(x, dt, bias, a_log, dv, dgate, dx, ddt, R, H, P, s_dt,
                           BR: tl.constexpr, BP: tl.constexpr, HAS_DV: tl.constexpr, HAS_DG: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BP)
    mr = rows < R
    h = rows % H
    pre = (tl.load(dt + (rows // H) * s_dt + h, mask=mr, other=0.0).to(tl.float32)
           + tl.load(bias + h, mask=mr, other=0.0).to(tl.float32))
    delta = _softplus(pre)
    d_delta = tl.zeros([BR], dtype=tl.float32)
    if HAS_DV:
        m = mr[:, None] & (cols < P)[None, :]
        offs = rows[:, None] * P + cols[None, :]
        g = tl.load(dv + offs, mask=m, other=0.0).to(tl.float32)
        xv = tl.load(x + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(dx + offs, (g * delta[:, None]).to(dx.dtype.element_ty), mask=m)
        d_delta += tl.sum(g * xv, axis=1)
    if HAS_DG:
        a = -tl.exp(tl.load(a_log + h, mask=mr, other=0.0).to(tl.float32))
        d_delta += a * tl.load(dgate + rows, mask=mr, other=0.0).to(tl.float32)
    tl.store(ddt + rows, d_delta * tl.sigmoid(pre), mask=mr)


@triton.jit
def _expand_groups_kernel(b, out, T, G, HPG, N, s_bt, BT: tl.constexpr, BN: tl.constexpr):
    """Tokens [t0, t0 + BT) of group g (program (token block, g)) stored to the group's HPG heads."""
    toks = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    g = tl.program_id(1)
    cols = tl.arange(0, BN)
    m = (toks < T)[:, None] & (cols < N)[None, :]
    tile = tl.load(b + toks[:, None] * s_bt + g * N + cols[None, :], mask=m, other=0.0)
    H = G * HPG
    base = out + toks[:, None] * (H * N) + cols[None, :]
    for j in range(0, HPG):
        tl.store(base + (g * HPG + j) * N, tile, mask=m)


def _rows_per_block(P: int, cfg: SsdConfig) -> tuple[int, int]:
    BP = triton.next_power_of_2(P)
    return max(1, cfg.tile // BP), BP


class _SsdInputsTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, dt_bias, A_log):
        cfg = CONFIG
        H, P = x.shape[-2:]
        R = x.numel() // P
        xc = x.contiguous()
        dt2 = dt.reshape(-1, H)
        if dt2.stride(-1) != 1:
            dt2 = dt2.contiguous()
        bias, a_log = dt_bias.contiguous(), A_log.contiguous()
        v = torch.empty_like(xc)
        gate = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
        BR, BP = _rows_per_block(P, cfg)
        if R:
            _ssd_inputs_fwd_kernel[(triton.cdiv(R, BR),)](xc, dt2, bias, a_log, v, gate, R, H, P, dt2.stride(0),
                                                          BR=BR, BP=BP, num_warps=cfg.warps)
        ctx.save_for_backward(xc, dt2, bias, a_log)
        ctx.dt_shape, ctx.dt_dtype = dt.shape, dt.dtype
        ctx.set_materialize_grads(False)
        return v, gate

    @staticmethod
    def backward(ctx, dv, dgate):
        xc, dt2, bias, a_log = ctx.saved_tensors
        cfg = CONFIG
        H, P = xc.shape[-2:]
        R = xc.numel() // P
        dv = dv.contiguous() if dv is not None else None
        dgate = dgate.float().contiguous() if dgate is not None else None
        dx = torch.empty_like(xc) if dv is not None else None
        ddt = torch.empty(R, dtype=torch.float32, device=xc.device)
        BR, BP = _rows_per_block(P, cfg)
        if R:
            _ssd_inputs_bwd_kernel[(triton.cdiv(R, BR),)](
                xc, dt2, bias, a_log, dv if dv is not None else xc, dgate if dgate is not None else ddt,
                dx if dx is not None else xc, ddt, R, H, P, dt2.stride(0),
                BR=BR, BP=BP, HAS_DV=dv is not None, HAS_DG=dgate is not None, num_warps=cfg.warps)
        ddt = ddt.view(-1, H)
        d_bias = ddt.sum(0).to(bias.dtype)
        if dgate is not None:  # log a = A·Δ: ∂/∂A_log = A·Δ
            delta = torch.nn.functional.softplus(dt2.float() + bias.float())
            d_alog = (dgate.view(-1, H) * delta).sum(0) * -torch.exp(a_log.float())
        else:
            d_alog = torch.zeros_like(a_log, dtype=torch.float32)
        return dx, ddt.view(ctx.dt_shape).to(ctx.dt_dtype), d_bias, d_alog.to(a_log.dtype)


def ssd_inputs_triton(x: torch.Tensor, dt: torch.Tensor, dt_bias: torch.Tensor,
                      A_log: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(v = Δ·x in x's dtype, log-gate A·Δ fp32); x [.., H, P], dt [.., H] (unit last stride kept as a view)."""
    return _SsdInputsTriton.apply(x, dt, dt_bias, A_log)


def broadcast_groups(b: torch.Tensor, heads: int) -> torch.Tensor:
    """b [.., G, N] → a new contiguous [.., heads, N], head h a copy of group h // (heads / G) (no autograd)."""
    cfg = CONFIG
    *lead, G, N = b.shape
    b2 = b.reshape(-1, G * N) if b.stride(-1) == 1 and b.stride(-2) == N else b.contiguous().view(-1, G * N)
    if b2.stride(-1) != 1:
        b2 = b2.contiguous()
    T = b2.shape[0]
    out = torch.empty(*lead, heads, N, dtype=b.dtype, device=b.device)
    if T:
        BT = cfg.expand_tokens
        _expand_groups_kernel[(triton.cdiv(T, BT), G)](b2, out, T, G, heads // G, N, b2.stride(0), BT=BT,
                                                       BN=triton.next_power_of_2(N), num_warps=cfg.expand_warps)
    return out


class _ExpandGroupsTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, b, heads):
        ctx.shape = b.shape
        return broadcast_groups(b, heads)

    @staticmethod
    def backward(ctx, d_out):
        *lead, G, N = ctx.shape
        return d_out.reshape(*lead, G, -1, N).sum(-2, dtype=torch.float32).to(d_out.dtype), None


def expand_groups_triton(b: torch.Tensor, heads: int) -> torch.Tensor:
    """b [.., G, N] → [.., heads, N] (contiguous), head h reading group h // (heads / G)."""
    return _ExpandGroupsTriton.apply(b, heads)
