"""The autograd Function and the public entry `linear_attention_triton` (DESIGN §2's contract on CUDA)."""

from __future__ import annotations

import torch

from kernels.triton.backward import chunk_backward
from kernels.triton.common import Plan, TritonConfig, checked_inputs, resolve_config, setup
from kernels.triton.forward import chunk_forward


def _to_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """q or k of G groups [B, T, G, K] as [B, T, heads, K] (head h reads group h // (heads / G)); x itself when
    G = heads."""
    if x.shape[2] == heads:
        return x
    from kernels.ssd_inputs.triton_ssd_inputs import broadcast_groups

    return broadcast_groups(x, heads)


def _group_sum(d: torch.Tensor, groups: int) -> torch.Tensor:
    """A per-head gradient [B, T, H, K] summed over each group's H / groups heads (fp32 sums); d when groups = H."""
    B, T, H, K = d.shape
    if groups == H:
        return d
    return d.view(B, T, groups, H // groups, K).sum(3, dtype=torch.float32).to(d.dtype)


class _LinearAttentionTriton(torch.autograd.Function):
    """(o, final state) of q, k, v, λ, gate and S_init; saves the inputs, the gate cumsum and S_in per segment.
    q and k may be shared by groups of heads ([B, T, G, K], v's H a multiple of G): they are broadcast to the heads
    for the kernels in forward and again in backward, only the grouped pair is kept, and dq, dk are summed over
    each group's heads."""

    @staticmethod
    def forward(ctx, q, k, v, log_decay, gate, initial_state, scale, output_final_state, chunk_size, cfg):
        heads = v.shape[2]
        qh, kh = _to_heads(q, heads), _to_heads(k, heads)
        p, lam, G, seg_log2 = setup(ctx, qh, v, log_decay, gate, scale, chunk_size, cfg)
        init = initial_state.detach().float().contiguous() if initial_state is not None else None
        o, final, s_in = chunk_forward(p, qh, kh, v, G, lam, seg_log2, init, output_final_state)
        ctx.plan = p
        ctx.has_init = initial_state is not None
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, G, lam, seg_log2, s_in)
        return o, final

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, G, lam, seg_log2, s_in = ctx.saved_tensors
        p: Plan = ctx.plan
        need_ds0 = ctx.has_init and ctx.needs_input_grad[5]
        if do is None:
            do = torch.zeros(p.B, p.T, p.H, p.V, dtype=q.dtype, device=q.device)
        do = do.to(q.dtype).contiguous()
        if dht is not None:
            dht = dht.float().contiguous()
        dq, dk, dv, dgate, dlam, ds0 = chunk_backward(p, _to_heads(q, p.H), _to_heads(k, p.H), v, do, G, lam,
                                                      seg_log2, s_in, dht, gate_dtype=ctx.gate_dtype,
                                                      lam_dtype=ctx.lam_dtype, need_ds0=need_ds0)
        groups = q.shape[2]
        return _group_sum(dq, groups), _group_sum(dk, groups), dv, dlam, dgate, ds0, None, None, None, None


def linear_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
    log_decay: torch.Tensor | None = None, gate: torch.Tensor | None = None, scale: float | None = None,
    initial_state: torch.Tensor | None = None, output_final_state: bool = False, chunk_size: int = 64,
    config: TritonConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal linear attention with per-head decay λ_h and per-token gate g, Triton kernels (DESIGN §2).

    q, k: [B, T, H, K], or [B, T, G, K] shared by groups of H / G heads; v: [B, T, H, V]; log_decay: [H] ≤ 0;
    gate: [B, T, H] ≤ 0; initial_state: [B, H, K, V] (fp32).
    Returns (o [B, T, H, V] in q's dtype, final_state fp32 or None).
    Differentiable in q, k, v, log_decay, gate and initial_state (a gradient on final_state is used).
    chunk_size is rounded to a power of two in [16, 128] (the result does not depend on it).
    """
    q, k, v, scale = checked_inputs(q, k, v, scale)
    if initial_state is not None:
        initial_state = initial_state.float()
    o, final = _LinearAttentionTriton.apply(
        q, k, v, log_decay, gate, initial_state, scale, bool(output_final_state), chunk_size,
        resolve_config(config))
    return o, (final if output_final_state else None)
