"""RMSNorm over the last dim in plain PyTorch: the oracle for the Triton kernels.

For rows x ∈ R^D and a weight w [D]:    y = x / sqrt(mean(x²) + eps) ⊙ w,   fp32 math, y in x's dtype.
"""

from __future__ import annotations

import torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """y [..., D] in x's dtype; x: [..., D], weight: [D]. Differentiable in both (autograd of the fp32 math).

    Agrees with ``F.rms_norm(x, (D,), weight.to(x.dtype), eps)`` to fp32 rounding for fp32 inputs; for bf16/fp16
    inputs this keeps the weight in fp32 and rounds once, at the end.
    """
    xf = x.float()
    rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    return (xf * rstd * weight.float()).to(x.dtype)
