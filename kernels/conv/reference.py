"""Causal depthwise short convolution in plain PyTorch: the oracle for the Triton kernels.

For x [B, T, D], weight W [D, w] and the w−1 tokens before the shard (the halo; zeros at the
sequence start), in conv1d's cross-correlation convention:

    z_t = Σ_{i<w} W[:, i] ⊙ x_{t−(w−1)+i},    x_{−(w−1)} … x_{−1} = halo,    y_t = act(z_t).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def short_conv_reference(
    x: torch.Tensor, weight: torch.Tensor, halo: torch.Tensor | None = None, activation: str | None = "silu"
) -> torch.Tensor:
    """y [B, T, D] = act(conv1d(cat[halo, x], W, groups=D)) in x's dtype (the model's original math).

    x: [B, T, D]; weight: [D, w] or [D, 1, w]; halo: [B, w−1, D] or None (zeros); activation: "silu" or None.
    """
    B, T, D = x.shape
    w = weight.shape[-1]
    if halo is None:
        halo = x.new_zeros(B, w - 1, D)
    xp = torch.cat([halo.to(x.dtype), x], dim=1).transpose(1, 2)
    y = F.conv1d(xp, weight.reshape(D, 1, w).to(x.dtype), groups=D).transpose(1, 2)
    return F.silu(y) if activation == "silu" else y
