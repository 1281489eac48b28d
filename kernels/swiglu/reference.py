"""SwiGLU's elementwise part in plain PyTorch: the oracle for the Triton kernels.

For the fused projection z = [g | u] (its last dim 2F: the gate's F columns, then the up projection's F),

    h = silu(g) ⊙ u = g σ(g) ⊙ u.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """h [..., F] = silu(g) ⊙ u for gate_up = [g | u] [..., 2F], in gate_up's dtype (the model's original math)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
