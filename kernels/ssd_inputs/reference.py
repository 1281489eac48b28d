"""The Mamba-2 scan's inputs in plain PyTorch: the oracle for the Triton kernels.

Per token t and head h, with dt the raw Δ projection, b_h the Δ bias and A_h = −exp(A_log_h):

    Δ_t = softplus(dt_t + b_h),   log a_t = A_h Δ_t,   v_t = Δ_t x_t          (fp32 math, v in x's dtype)

and the group broadcast of B and C: [.., G, N] → [.., H, N], head h reading group h // (H / G).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ssd_inputs_reference(x: torch.Tensor, dt: torch.Tensor, dt_bias: torch.Tensor,
                         A_log: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(v [.., H, P] in x's dtype, log-gate [.., H] in max(fp32, x's dtype)); x: [.., H, P], dt: [.., H].
    Differentiable in x, dt, dt_bias and A_log (autograd of the wide math)."""
    wide = torch.promote_types(x.dtype, torch.float32)
    delta = F.softplus(dt.to(wide) + dt_bias.to(wide))
    gate = -torch.exp(A_log.to(wide)) * delta
    return (x.to(wide) * delta[..., None]).to(x.dtype), gate


def expand_groups_reference(b: torch.Tensor, heads: int) -> torch.Tensor:
    """b [.., G, N] → [.., heads, N] (contiguous), head h = group h // (heads / G); the gradient sums a group's
    heads."""
    *lead, G, N = b.shape
    return b.unsqueeze(-2).expand(*lead, G, heads // G, N).reshape(*lead, heads, N)
