"""Causal depthwise short convolution with fused SiLU (the ShortConv of the linear-attention layers).

    y_t = act(Σ_{i<w} W[:, i] ⊙ x_{t−(w−1)+i}),    x_{−(w−1)} … x_{−1} = halo (zeros without one)

`short_conv` runs the Triton kernels (kernels/conv/triton_conv.py) on CUDA tensors and the PyTorch
reference (kernels/conv/reference.py) otherwise; both are differentiable in x, weight and halo.
"""

from __future__ import annotations

import torch

from kernels.conv.reference import short_conv_reference

__all__ = ["short_conv", "short_conv_reference"]

BACKENDS = ("auto", "triton", "torch")
ACTIVATIONS = ("silu", None)
MAX_WIDTH = 8


def _check(x: torch.Tensor, weight: torch.Tensor, halo: torch.Tensor | None, activation, backend) -> int:
    """The width w, after checking every shape; one-line ValueErrors."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown; use one of {BACKENDS}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is unknown; use one of {ACTIVATIONS}")
    if x.dim() != 3:
        raise ValueError(f"x must be [B, T, D]; got {tuple(x.shape)}")
    B, T, D = x.shape
    if T < 1:
        raise ValueError("the sequence is empty (T = 0); pass at least one token")
    if not (weight.dim() == 2 or (weight.dim() == 3 and weight.shape[1] == 1)) or weight.shape[0] != D:
        raise ValueError(f"weight must be [D, w] or [D, 1, w] with D = {D}; got {tuple(weight.shape)}")
    w = weight.shape[-1]
    if not 1 <= w <= MAX_WIDTH:
        raise ValueError(f"the width w must be in 1..{MAX_WIDTH}; got {w}")
    if halo is not None and tuple(halo.shape) != (B, w - 1, D):
        raise ValueError(f"halo must be [B, w−1, D] = [{B}, {w - 1}, {D}]; got {tuple(halo.shape)}")
    return w


def short_conv(
    x: torch.Tensor, weight: torch.Tensor, halo: torch.Tensor | None = None, activation: str | None = "silu",
    backend: str = "auto",
) -> torch.Tensor:
    """y [B, T, D] (x's dtype) = act(causal depthwise conv of x with W, the halo before x).

    x: [B, T, D]; weight: [D, w] or [D, 1, w], 1 ≤ w ≤ 8; halo: [B, w−1, D], the w−1 tokens before this
    shard (None: zeros, the sequence start); activation: "silu" or None.
    backend: "triton", "torch" (the reference: cat + conv1d) or "auto" (Triton for CUDA tensors up to fp32).
    """
    w = _check(x, weight, halo, activation, backend)
    if backend == "auto":
        backend = "triton" if x.is_cuda and x.dtype != torch.float64 else "torch"
    if backend == "torch":
        return short_conv_reference(x, weight, halo, activation)
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"the triton backend takes fp16/bf16/fp32 inputs; got {x.dtype}")
    from kernels.conv.triton_conv import short_conv_triton

    return short_conv_triton(x, weight.reshape(weight.shape[0], w), halo, activation)
