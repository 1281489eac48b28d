"""Mamba-2 (SSD) mixer, layout letter `M` (DESIGN §12), on the linear-attention kernels and LASP-2.

Per head h (state width N, head width P), with x, z, B, C, Δ projected from the block input u:

    S_t = exp(Δ_t A_h) S_{t−1} + (Δ_t B_t)ᵀ x_t          S ∈ R^{N×P},  A_h = −exp(a_h) < 0
    y_t = C_t S_t + D_h x_t,                              Δ_t = softplus(u_t W_Δ + b_Δ)
    out = W_o · RMSNorm(y ⊙ silu(z))

which is DESIGN §2 with q = C, k = B, v = Δ·x ((Δ_t B_t)ᵀ x_t = B_tᵀ (Δ_t x_t)), per-token log-gate Δ_t A_h ≤ 0
(λ = 0) and scale 1, so the chunked kernels, LASP-2 under sp and streaming windows apply unchanged. x, B, C pass
through the causal short convolution (with SiLU) first; B and C are shared by the heads of a group:
`kernels.linear_attention` takes them per group and keeps only those for backward (under sp,
`kernels.ssd_inputs.expand_groups` broadcasts them for LASP-2). Δ scales v rather than k: v is [B, T, H, P] where k is
[B, T, H, N] (N = 2P in the presets); `kernels.ssd_inputs.ssd_inputs` forms Δ, the log-gate and Δ·x in one pass
and keeps only x and the raw Δ projection for backward (x is kept for D·x anyway); `kernels.gated_norm` forms
the output's RMSNorm((y + D·x) ⊙ silu(z)) in one pass each way.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from kernels import linear_attention
from kernels.gated_norm import gated_rms_norm
from kernels.ssd_inputs import expand_groups, ssd_inputs
from models.config import ModelConfig
from parallel.context import SINGLE
from parallel.lasp2 import lasp2_linear_attention


class Mamba2(nn.Module):
    def __init__(self, cfg: ModelConfig):
        from models.llama import RMSNorm, ShortConv

        super().__init__()
        self.inner, self.state, self.groups = cfg.ssm_expand * cfg.dim, cfg.ssm_state, cfg.ssm_groups
        self.heads, self.head_dim = self.inner // cfg.ssm_head_dim, cfg.ssm_head_dim
        self.chunk_size, self.backend = cfg.chunk_size, cfg.backend
        conv_channels = self.inner + 2 * self.groups * self.state
        self.in_proj = nn.Linear(cfg.dim, self.inner + conv_channels + self.heads, bias=False)  # z | x B C | Δ
        self.conv = ShortConv(conv_channels, cfg.short_conv, cfg.backend) if cfg.short_conv > 1 else None
        self.A_log = nn.Parameter(torch.empty(self.heads))
        self.dt_bias = nn.Parameter(torch.empty(self.heads))
        self.D = nn.Parameter(torch.empty(self.heads))
        self.norm = RMSNorm(self.inner, cfg.norm_eps, cfg.backend)
        self.out_proj = nn.Linear(self.inner, cfg.dim, bias=False)
        self.sp = SINGLE

    @torch.no_grad()
    def reset_ssm_parameters(self, gen: torch.Generator) -> None:
        """Mamba-2's initialisation of A_log, dt_bias and D (`ssm_initial_values`)."""
        for name, value in ssm_initial_values(self.heads, gen, self.A_log.device).items():
            getattr(self, name).copy_(value)

    def forward(self, u: torch.Tensor, carry: tuple | None = None, output: bool = True):
        """u [B, T, d] → [B, T, d]; with `carry` (S, conv tail) → (output, carry leaving the window).
        `output=False` (with a carry): → (None, carry), skipping D·x, the z gate, the norm and out_proj."""
        if not output and carry is None:
            raise ValueError("output=False needs a carry: only the carry leaving the window is returned")
        Bsz, T, _ = u.shape
        H, P, N, G = self.heads, self.head_dim, self.state, self.groups
        z, xbc, dt = self.in_proj(u).split([self.inner, self.inner + 2 * G * N, H], dim=-1)
        state, halo = carry if carry is not None else (None, None)
        tail, split = None, [self.inner, G * N, G * N]
        if self.conv is not None:  # x, B, C come out of the convolution as three contiguous tensors
            if halo is not None:
                (x, b, c), tail = self.conv(xbc, self.sp, halo.to(xbc.dtype), split=split)
            else:
                x, b, c = self.conv(xbc, self.sp, split=split)
        else:
            x, b, c = xbc.split(split, dim=-1)
        x = x.reshape(Bsz, T, H, P)
        v, gate = ssd_inputs(x, dt, self.dt_bias, self.A_log, self.backend)  # Δ·x; log a_t = Δ_t A_h ≤ 0 (fp32)
        k, q = b.reshape(Bsz, T, G, N).to(x.dtype), c.reshape(Bsz, T, G, N).to(x.dtype)  # shared by groups
        if self.sp.world > 1:  # LASP-2 takes per-head q, k
            q, k = expand_groups(q, H, self.backend), expand_groups(k, H, self.backend)
            y = lasp2_linear_attention(q, k, v, gate=gate, scale=1.0, group=self.sp.group, layout=self.sp.layout,
                                       chunk_size=self.chunk_size, backend=self.backend, initial_state=state,
                                       output_final_state=carry is not None)
            if carry is not None:
                y, state = y
        else:  # the kernels broadcast the groups themselves and keep only [B, T, G, N] for backward
            y, state = linear_attention(q, k, v, gate=gate, scale=1.0, chunk_size=self.chunk_size,
                                        backend=self.backend, initial_state=state,
                                        output_final_state=carry is not None)
        if not output:
            return None, (state, tail)
        # RMSNorm((y + D·x) ⊙ silu(z)) in one pass each way (the norm module holds its weight and eps)
        out = self.out_proj(gated_rms_norm(y, z, self.norm.weight, self.norm.eps, x=x, D=self.D, backend=self.backend))
        return out if carry is None else (out, (state, tail))

    def zero_carry(self, batch: int, device: torch.device) -> tuple:
        state = torch.zeros(batch, self.heads, self.state, self.head_dim, device=device, dtype=torch.float32)
        tail = None if self.conv is None else torch.zeros(
            batch, self.conv.width - 1, self.inner + 2 * self.groups * self.state, device=device,
            dtype=self.in_proj.weight.dtype)
        return state, tail


def ssm_initial_values(heads: int, gen: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """A_h uniform in [1, 16] (stored as log), Δ's bias so that softplus(b) is log-uniform in [1e-3, 0.1],
    D = 1 — Mamba-2's initialisation, drawn in this order from `gen`."""
    a_log = torch.empty(heads, device=device).uniform_(1, 16, generator=gen).log()
    dt = torch.exp(torch.empty(heads, device=device).uniform_(math.log(1e-3), math.log(0.1), generator=gen))
    return {"A_log": a_log, "dt_bias": dt + torch.log(-torch.expm1(-dt)), "D": torch.ones(heads, device=device)}
