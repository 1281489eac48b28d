"""Gated RMSNorm: the Mamba-2 mixer's output stage (skip term, SiLU gate, RMSNorm) fused.

For y, x [..., H, P] (the scan's output and input), D [H], the gate z [..., H·P] and a weight w [H·P], over rows of
width H·P (y's last two dims flattened), with σ = sigmoid(z), s = z σ = silu(z) and rstd = 1 / sqrt(mean(u²) + eps):

    g  = y + D_h x,    u = g ⊙ s,    û = u · rstd,    out = û ⊙ w
    du = rstd · (w ⊙ dout − û · mean(û ⊙ w ⊙ dout)),    dg = du ⊙ s
    dy = dg,    dx = D_h dg,    dz = du ⊙ g ⊙ σ (1 + z (1 − σ))
    dw = Σ_rows dout ⊙ û,    dD_h = Σ_rows Σ_{p ∈ head h} dg ⊙ x

computed in fp32; out in y's dtype, each gradient in its input's dtype. The skip term is there when x and D are
given. `gated_rms_norm` runs the Triton kernels (kernels/gated_norm/triton_gated_norm.py: one pass over y, x, z
forward, one over y, x, z, dout backward) on CUDA tensors and the PyTorch reference (kernels/gated_norm/reference.py)
otherwise; both are differentiable in y, z, weight, x and D.
"""

from __future__ import annotations

import math

import torch

from kernels.gated_norm.reference import gated_rms_norm_reference

__all__ = ["gated_rms_norm", "gated_rms_norm_reference"]

BACKENDS = ("auto", "triton", "torch")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(y, z, weight, eps, x, D, backend) -> None:
    """One-line ValueErrors / TypeErrors for every argument."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown; use one of {BACKENDS}")
    named = {"y": y, "z": z, "weight": weight, "x": x, "D": D}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor) and not (name in ("x", "D") and t is None):
            kind = "a tensor or None" if name in ("x", "D") else "a tensor"
            raise TypeError(f"{name} must be {kind}; got {type(t).__name__}")
    if (x is None) != (D is None):
        raise ValueError("pass both x and D for the skip term y + D·x, or neither")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number ≥ 0; got {eps!r}")
    if y.dim() < 2 or y.shape[-2] * y.shape[-1] == 0:
        raise ValueError(f"y must be [..., H, P] with H, P ≥ 1; got {tuple(y.shape)}")
    lead, (H, P) = tuple(y.shape[:-2]), y.shape[-2:]
    if tuple(z.shape) != (*lead, H * P):
        raise ValueError(f"z must be [..., H·P] = {[*lead, H * P]} (y's leading dims, then H·P); got {tuple(z.shape)}")
    if tuple(weight.shape) != (H * P,):
        raise ValueError(f"weight must be [H·P] = [{H * P}]; got {tuple(weight.shape)}")
    if x is not None and x.shape != y.shape:
        raise ValueError(f"x must be shaped like y, {tuple(y.shape)}; got {tuple(x.shape)}")
    if D is not None and tuple(D.shape) != (H,):
        raise ValueError(f"D must be [H] = [{H}] (one skip weight per head); got {tuple(D.shape)}")
    for name in ("y", "z", "x"):
        if named[name] is not None and not named[name].is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor; got {named[name].dtype}")
    for name in ("weight", "D"):
        if named[name] is not None and named[name].dtype not in (torch.float32, y.dtype):
            raise TypeError(f"{name} must be fp32 or y's dtype ({y.dtype}); got {named[name].dtype}")
    for name, t in named.items():
        if t is not None and t.device != y.device:
            raise ValueError(f"{name} must be on y's device ({y.device}); got {t.device}")


def gated_rms_norm(
    y: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    x: torch.Tensor | None = None,
    D: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """out [..., H·P] (y's dtype) = RMSNorm((y + D_h x) ⊙ silu(z)) ⊙ weight over rows of width H·P, in fp32.

    y: [..., H, P]; z: [..., H·P] with y's leading dims (a column slice with unit last-dim stride is read in place);
    x: like y, and D: [H], both or neither (the skip term); weight: [H·P]; weight and D fp32 or y's dtype (their
    gradients come back in their dtypes); eps ≥ 0.
    backend: "triton", "torch" (the reference) or "auto" (Triton for CUDA tensors of fp16/bf16/fp32).
    """
    _check(y, z, weight, eps, x, D, backend)
    inputs = [t for t in (y, z, x) if t is not None]
    if backend == "auto":
        backend = "triton" if y.is_cuda and all(t.dtype in TRITON_DTYPES for t in inputs) else "torch"
    if backend == "torch":
        return gated_rms_norm_reference(y, z, weight, eps, x, D)
    for t in inputs:
        if t.dtype not in TRITON_DTYPES:
            raise TypeError(f"the triton backend takes fp16/bf16/fp32 inputs; got {t.dtype} (use backend='torch')")
    from kernels.gated_norm.triton_gated_norm import gated_rms_norm_triton

    return gated_rms_norm_triton(y, z, weight, float(eps), x, D)
