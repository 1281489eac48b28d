"""SwiGLU's elementwise part, h = silu(g) ⊙ u, on the fused gate/up projection z = [g | u].

    forward:   h = g σ(g) u
    backward:  dg = dh u σ(g) (1 + g (1 − σ(g))),    du = dh g σ(g)      (written into one [..., 2F] dz)

`swiglu` runs the Triton kernels (kernels/swiglu/triton_swiglu.py) on CUDA tensors and the PyTorch reference
(kernels/swiglu/reference.py: chunk, SiLU, multiply) otherwise. The kernels read z once and write h once
(forward), read z and dh once and write dz once (backward): the eager path makes ≈ 2× the memory passes,
with strided (non-vectorized) reads of the two halves and a cat of their gradients.
"""

from __future__ import annotations

import torch

from kernels.swiglu.reference import swiglu_reference

__all__ = ["swiglu", "swiglu_reference"]

BACKENDS = ("auto", "triton", "torch")


def swiglu(gate_up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """h [..., F] = silu(g) ⊙ u for gate_up = [g | u] [..., 2F], in gate_up's dtype; differentiable.

    backend: "triton", "torch" (the reference) or "auto" (Triton for CUDA tensors of fp16/bf16/fp32).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown; use one of {BACKENDS}")
    if gate_up.dim() < 1 or gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up must be [..., 2F] (the gate's F columns, then up's F); got {tuple(gate_up.shape)}")
    if backend == "auto":
        backend = "triton" if gate_up.is_cuda and gate_up.dtype != torch.float64 else "torch"
    if backend == "torch":
        return swiglu_reference(gate_up)
    if gate_up.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"the triton backend takes fp16/bf16/fp32 inputs; got {gate_up.dtype}")
    from kernels.swiglu.triton_swiglu import swiglu_triton

    return swiglu_triton(gate_up)
