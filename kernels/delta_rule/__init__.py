"""Gated delta rule (Gated DeltaNet's recurrence, DESIGN §12): chunked Triton kernels and PyTorch references.

    S_t = a_t (I − β_t k_tᵀ k_t) S_{t−1} + β_t k_tᵀ v_t,    o_t = scale · q_t S_t,    log a_t = λ_h + g_{t,h} ≤ 0

`delta_rule` (alias `gated_delta_rule`) runs the Triton kernels (kernels/delta_rule/triton/) on CUDA tensors and
the chunked PyTorch form (kernels/delta_rule/reference.py) otherwise; `delta_rule_recurrent` is the
step-by-step oracle and `delta_rule_summary` the affine map (P, M) of a whole sequence (LASP-2's shard summary).
"""

from __future__ import annotations

import torch

from kernels.api import _check, resolve_backend
from kernels.delta_rule.reference import delta_rule_chunked, delta_rule_recurrent, delta_rule_summary

__all__ = ["delta_rule", "gated_delta_rule", "delta_rule_chunked", "delta_rule_recurrent", "delta_rule_summary",
           "fused_config"]


def check_beta(q: torch.Tensor, beta: torch.Tensor) -> None:
    if beta.shape != q.shape[:3]:
        raise ValueError(f"beta must be [B, T, H] = {list(q.shape[:3])}; got {tuple(beta.shape)}")


def delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *,
    log_decay: torch.Tensor | None = None, gate: torch.Tensor | None = None, scale: float | None = None,
    initial_state: torch.Tensor | None = None, output_final_state: bool = False,
    chunk_size: int = 64, backend: str = "auto", split: bool = True, window_tokens: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal gated delta rule with per-head decay λ_h and per-token gate g (DESIGN §12).

    q, k: [B, T, H, K] (k used as given: the layer L2-normalizes it); v: [B, T, H, V]; beta: [B, T, H] in (0, 1);
    log_decay: [H] ≤ 0; gate: [B, T, H] ≤ 0; initial_state / final_state: [B, H, K, V] float32 (float64 for
    float64 inputs). Returns (o [B, T, H, V] in q's dtype, final_state or None); scale defaults to K^-1/2.
    Differentiable in q, k, v, beta, gate, log_decay and initial_state; a gradient on final_state is used.
    backend: "triton" (CUDA), "torch" (chunked PyTorch) or "auto" (Triton for CUDA tensors up to fp32).
    split: on the Triton path, the chunk-parallel split kernels (DeltaConfig's out_split, grad_split and bwd_split,
    the default); False runs the fused sweeps and gradient kernel (`fused_config`; same results up to rounding).
    window_tokens > 0: on the Triton path, the stages with per-chunk transients run one batch row and about this
    many tokens at a time (DeltaConfig.window_tokens: less memory, more time, the same results). Both are ignored by
    the PyTorch path.
    """
    _check(q, k, v, log_decay, gate, initial_state, chunk_size, backend)
    check_beta(q, beta)
    _check_window(window_tokens)
    kw = dict(log_decay=log_decay, gate=gate, scale=scale, initial_state=initial_state,
              output_final_state=output_final_state)
    if resolve_backend(q, backend) == "triton":
        from kernels.delta_rule.triton import delta_rule_triton

        return delta_rule_triton(q, k, v, beta, chunk_size=chunk_size, config=triton_config(split, window_tokens),
                                 **kw)
    return delta_rule_chunked(q, k, v, beta, chunk_size=chunk_size, **kw)


def _check_window(window_tokens) -> None:
    if isinstance(window_tokens, bool) or not isinstance(window_tokens, int) or window_tokens < 0:
        raise ValueError(f"window_tokens={window_tokens!r} must be an integer ≥ 0 (0: whole calls)")


def triton_config(split: bool = True, window_tokens: int = 0):
    """The Triton kernels' DeltaConfig for a call: None (DEFAULT_CONFIG at call time) unless the split paths are off
    (`fused_config`) or window_tokens > 0."""
    _check_window(window_tokens)
    if split and not window_tokens:
        return None
    from kernels.delta_rule.triton.common import FUSED, with_config

    return with_config(**({} if split else FUSED), window_tokens=window_tokens)


def fused_config():
    """The Triton kernels' DeltaConfig at call time with the split paths off (outputs from the forward sweep, every
    gradient from one kernel: `kernels.delta_rule.triton.common.fused_config`)."""
    from kernels.delta_rule.triton import common

    return common.fused_config()


gated_delta_rule = delta_rule
