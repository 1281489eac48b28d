"""RMSNorm over the last dim (the block norms at D = 2048 and the per-head attention output norm at 128).

With x̂ = x / rms, rms = sqrt(mean(x²) + eps) per row, and a weight w [D]:

    y  = x / sqrt(mean(x²) + eps) ⊙ w = x̂ ⊙ w
    dx = (w ⊙ dy − x̂ · mean(x̂ ⊙ w ⊙ dy)) / rms,        dw = Σ_rows dy ⊙ x̂

computed in fp32; y and dx in x's dtype, dw in weight's dtype (fp32 or x's dtype). `rms_norm` runs the Triton
kernels (kernels/norm/triton_norm.py) on CUDA tensors and the PyTorch reference (kernels/norm/reference.py)
otherwise; both are differentiable in x and weight.
"""

from __future__ import annotations

import math

import torch

from kernels.norm.reference import rms_norm_reference

__all__ = ["rms_norm", "rms_norm_reference"]

BACKENDS = ("auto", "triton", "torch")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(x, weight, eps, backend) -> None:
    """One-line ValueErrors / TypeErrors for every argument."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown; use one of {BACKENDS}")
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"x and weight must be tensors; got {type(x).__name__} and {type(weight).__name__}")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number ≥ 0; got {eps!r}")
    if weight.dim() != 1 or weight.shape[0] == 0:
        raise ValueError(f"weight must be [D] with D ≥ 1; got {tuple(weight.shape)}")
    D = weight.shape[0]
    if x.dim() == 0 or x.shape[-1] != D:
        raise ValueError(f"x must be [..., D] with D = {D} (weight's length); got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor; got {x.dtype}")
    if weight.dtype not in (torch.float32, x.dtype):
        raise TypeError(f"weight must be fp32 or x's dtype ({x.dtype}); got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"x and weight must be on one device; got {x.device} and {weight.device}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, backend: str = "auto") -> torch.Tensor:
    """y [..., D] (x's dtype) = x / sqrt(mean(x²) + eps) ⊙ weight over the last dim, in fp32.

    x: [..., D], any leading dims (a unit last-dim stride is used in place, other layouts are copied);
    weight: [D], fp32 or x's dtype (its gradient comes back in its dtype); eps ≥ 0.
    backend: "triton", "torch" (the reference) or "auto" (Triton for CUDA tensors of fp16/bf16/fp32).
    """
    _check(x, weight, eps, backend)
    if backend == "auto":
        backend = "triton" if x.is_cuda and x.dtype in TRITON_DTYPES else "torch"
    if backend == "torch":
        return rms_norm_reference(x, weight, eps)
    if x.dtype not in TRITON_DTYPES:
        raise TypeError(f"the triton backend takes fp16/bf16/fp32 inputs; got {x.dtype}")
    from kernels.norm.triton_norm import rms_norm_triton

    return rms_norm_triton(x, weight, float(eps))
