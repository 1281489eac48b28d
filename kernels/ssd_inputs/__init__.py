"""The Mamba-2 scan's inputs (DESIGN §12): Δ, the log-gate and v = Δ·x in one pass, and B, C broadcast to heads.

Per token t and head h (x: [.., H, P], dt: [.., H], b_h the Δ bias, A_h = −exp(A_log_h)):

    Δ_t = softplus(dt_t + b_h),   log a_t = A_h Δ_t,   v_t = Δ_t x_t
    dx = Δ·dv,   d(dt) = (Σ_p dv ⊙ x + A_h·d log a) · σ(dt + b_h),
    db_h = Σ_t d(dt),   dA_log_h = Σ_t d log a · A_h Δ_t

`ssd_inputs` returns (v in x's dtype, log a in fp32); `expand_groups` broadcasts B or C [.., G, N] to [.., H, N].
Both run Triton kernels (kernels/ssd_inputs/triton_ssd_inputs.py) on CUDA tensors of fp16/bf16/fp32 and the
PyTorch reference (kernels/ssd_inputs/reference.py) otherwise; both are differentiable.
"""

from __future__ import annotations

import torch

from kernels.ssd_inputs.reference import expand_groups_reference, ssd_inputs_reference

__all__ = ["ssd_inputs", "expand_groups", "ssd_inputs_reference", "expand_groups_reference"]

BACKENDS = ("auto", "triton", "torch")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _backend(t: torch.Tensor, backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown; use one of {BACKENDS}")
    if backend == "auto":
        return "triton" if t.is_cuda and t.dtype in TRITON_DTYPES else "torch"
    if backend == "triton" and t.dtype not in TRITON_DTYPES:
        raise TypeError(f"the triton backend takes fp16/bf16/fp32 inputs; got {t.dtype}")
    return backend


def ssd_inputs(x: torch.Tensor, dt: torch.Tensor, dt_bias: torch.Tensor, A_log: torch.Tensor,
               backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(v = Δ·x [.., H, P] in x's dtype, log-gate A·Δ [.., H] fp32 — wider for float64) with Δ = softplus(dt + b).

    x: [.., H, P] floating point; dt: [.., H] (x's leading dims; a column slice with unit last stride is read in
    place); dt_bias, A_log: [H]. backend: "triton", "torch" (the reference) or "auto" (Triton on CUDA)."""
    for name, t in (("x", x), ("dt", dt), ("dt_bias", dt_bias), ("A_log", A_log)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor; got {getattr(t, 'dtype', type(t).__name__)}")
    if x.dim() < 2 or dt.shape != x.shape[:-1]:
        raise ValueError(f"x must be [.., H, P] and dt [.., H] with the same leading dims; got x {tuple(x.shape)}, "
                         f"dt {tuple(dt.shape)}")
    H = x.shape[-2]
    if dt_bias.shape != (H,) or A_log.shape != (H,):
        raise ValueError(f"dt_bias and A_log must be [H] = [{H}]; got {tuple(dt_bias.shape)} and {tuple(A_log.shape)}")
    if len({t.device for t in (x, dt, dt_bias, A_log)}) != 1:
        raise ValueError("x, dt, dt_bias and A_log must be on one device")
    if _backend(x, backend) == "torch":
        return ssd_inputs_reference(x, dt, dt_bias, A_log)
    from kernels.ssd_inputs.triton_ssd_inputs import ssd_inputs_triton

    return ssd_inputs_triton(x, dt, dt_bias, A_log)


def expand_groups(b: torch.Tensor, heads: int, backend: str = "auto") -> torch.Tensor:
    """b [.., G, N] → [.., heads, N] contiguous, head h reading group h // (heads / G); heads a multiple of G."""
    if not isinstance(b, torch.Tensor) or b.dim() < 2:
        raise ValueError(f"b must be a [.., G, N] tensor; got {getattr(b, 'shape', type(b).__name__)}")
    G = b.shape[-2]
    if not isinstance(heads, int) or heads < 1 or heads % G:
        raise ValueError(f"heads must be a positive multiple of the groups G = {G}; got {heads!r}")
    if _backend(b, backend) == "torch":
        return expand_groups_reference(b, heads)
    from kernels.ssd_inputs.triton_ssd_inputs import expand_groups_triton

    return expand_groups_triton(b, heads)
