"""Gated DeltaNet mixer, layout letter `D` (Yang, Kautz & Hatamizadeh 2024; DESIGN §12), on the delta-rule kernels.

Per head h (head width d_h, state d_h × d_h), from the block input x:

    q, k, v = silu(ShortConv(x W_q, x W_k, x W_v)),   q ← q/√(‖q‖² + ε), k likewise   (per head, ε = 1e-6)
    β_t = σ(x_t W_β),   log a_t = −exp(A_log_h) · softplus(x_t W_a + b_a)   (Mamba-2's gate: λ = 0, g = log a)
    S_t = a_t (I − β_t k_tᵀ k_t) S_{t−1} + β_t k_tᵀ v_t,     o_t = d_h^{−1/2} q_t S_t
    out = W_o · (RMSNorm(o) ⊙ silu(x W_g))                   (per-head norm, output gate)

A_log and b_a start as Mamba-2's A and Δ bias (`models.mamba2.ssm_initial_values`). The recurrence runs on
`kernels.delta_rule` (Triton on CUDA), under sp on LASP-2 for affine recurrences (`parallel.lasp2_delta`), and
streams window by window with the carry (S, conv tail), as the other recurrent layers do.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.delta_rule import delta_rule
from kernels.norm import rms_norm
from models.config import ModelConfig
from parallel.context import SINGLE
from parallel.lasp2_delta import lasp2_delta_rule


def l2_normalize(x: torch.Tensor, backend: str = "auto", eps: float = 1e-6) -> torch.Tensor:
    """x / √(‖x‖² + eps) over the last dim D, in x's dtype (fla's l2norm). On CUDA (backend auto or triton) it is
    `kernels.norm`'s Triton RMSNorm with the constant weight D^{−1/2} and eps/D — x / √(mean(x²) + eps/D) · D^{−1/2}
    — one read and one write each way, with only x and a per-row rstd kept for backward; elsewhere (and for
    float64) the same in max(x's dtype, fp32)."""
    D = x.shape[-1]
    if backend == "triton" or (backend == "auto" and x.is_cuda and x.dtype != torch.float64):
        weight = torch.full((D,), D**-0.5, device=x.device, dtype=torch.float32)
        return rms_norm(x, weight, eps / D, "triton")
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    return (wide * torch.rsqrt(wide.square().sum(-1, keepdim=True) + eps)).to(x.dtype)


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        from models.llama import RMSNorm, ShortConv

        super().__init__()
        self.heads, self.head_dim, self.width = cfg.n_heads, cfg.head_dim, cfg.n_heads * cfg.head_dim
        self.chunk_size, self.backend, self.split = cfg.chunk_size, cfg.backend, cfg.delta_split
        self.delta_window = cfg.delta_window  # the kernels' window_tokens at sp = 1 (model.delta_window)
        # q | k | v | output gate | β | a in one GEMM
        self.in_proj = nn.Linear(cfg.dim, 4 * self.width + 2 * self.heads, bias=False)
        self.conv = ShortConv(3 * self.width, cfg.short_conv, cfg.backend) if cfg.short_conv > 1 else None
        self.A_log = nn.Parameter(torch.empty(self.heads))
        self.dt_bias = nn.Parameter(torch.empty(self.heads))
        self.out_norm = RMSNorm(self.head_dim, cfg.norm_eps, cfg.backend)
        self.o = nn.Linear(self.width, cfg.dim, bias=False)
        self.sp = SINGLE

    def forward(self, x: torch.Tensor, carry: tuple | None = None, output: bool = True):
        """x [B, T, d] → [B, T, d]; with `carry` (S, conv tail) → (output, carry leaving the window).
        `output=False` (with a carry): → (None, carry), skipping the output norm, gate and projection."""
        if not output and carry is None:
            raise ValueError("output=False needs a carry: only the carry leaving the window is returned")
        B, T, _ = x.shape
        H, Dh, W = self.heads, self.head_dim, self.width
        qkv, g_out, b, a = self.in_proj(x).split([3 * W, W, H, H], dim=-1)
        state, halo = carry if carry is not None else (None, None)
        tail = None
        if self.conv is not None:  # q, k, v come out of the convolution as three contiguous tensors
            if halo is not None:
                parts, tail = self.conv(qkv, self.sp, halo.to(qkv.dtype), split=[W] * 3)
            else:
                parts = self.conv(qkv, self.sp, split=[W] * 3)
        else:
            parts = F.silu(qkv).split(W, dim=-1)
        q, k, v = (t.reshape(B, T, H, Dh) for t in parts)
        q, k = l2_normalize(q, self.backend), l2_normalize(k, self.backend)
        ft = torch.promote_types(x.dtype, torch.float32)  # gates in fp32 at least
        beta = torch.sigmoid(b.to(ft))
        gate = -torch.exp(self.A_log.to(ft)) * F.softplus(a.to(ft) + self.dt_bias.to(ft))
        kw = dict(gate=gate, chunk_size=self.chunk_size, backend=self.backend, initial_state=state,
                  output_final_state=carry is not None, split=self.split)
        if self.sp.world > 1:
            o = lasp2_delta_rule(q, k, v, beta, group=self.sp.group, layout=self.sp.layout, **kw)
            if carry is not None:
                o, state = o
        else:
            o, state = delta_rule(q, k, v, beta, window_tokens=self.delta_window, **kw)
        if not output:
            return None, (state, tail)
        o = self.out_norm(o) * F.silu(g_out.reshape(B, T, H, Dh)).to(o.dtype)
        out = self.o(o.reshape(B, T, W))
        return out if carry is None else (out, (state, tail))

    def zero_carry(self, batch: int, device: torch.device) -> tuple:
        """The carry entering the first window: a zero state and a zero conv tail."""
        state = torch.zeros(batch, self.heads, self.head_dim, self.head_dim, device=device, dtype=torch.float32)
        tail = None if self.conv is None else torch.zeros(batch, self.conv.width - 1, 3 * self.width, device=device,
                                                          dtype=self.in_proj.weight.dtype)
        return state, tail
