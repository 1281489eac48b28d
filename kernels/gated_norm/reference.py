"""The Mamba-2 mixer's output stage in plain PyTorch: the oracle for the Triton kernels.

For y, x [..., H, P] (the scan's output and its input), a per-head skip weight D [H], the gate z [..., H·P] and a
weight w [H·P], with rows of width H·P (y's last two dims flattened):

    g   = y + D_h · x                                  (the skip term only when x and D are given)
    u   = g ⊙ silu(z)
    out = u / sqrt(mean(u²) + eps) ⊙ w

in fp32 (float64 when any input is float64), out in y's dtype.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def gated_rms_norm_reference(
    y: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    x: torch.Tensor | None = None,
    D: torch.Tensor | None = None,
) -> torch.Tensor:
    """out [..., H·P] in y's dtype; y: [..., H, P], z: [..., H·P], weight: [H·P], x: like y or None, D: [H] or None.

    Differentiable in every tensor (autograd of the fp32 / float64 math).
    """
    if (x is None) != (D is None):
        raise ValueError("pass both x and D for the skip term y + D·x, or neither")
    tensors = [t for t in (y, z, weight, x, D) if t is not None]
    wide = functools.reduce(torch.promote_types, [t.dtype for t in tensors], torch.float32)
    g = y.to(wide)
    if x is not None:
        g = g + D.to(wide)[:, None] * x.to(wide)
    u = g.flatten(-2) * F.silu(z.to(wide))
    rstd = torch.rsqrt(u.square().mean(-1, keepdim=True) + eps)
    return (u * rstd * weight.to(wide)).to(y.dtype)
