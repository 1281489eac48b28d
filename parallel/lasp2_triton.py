"""The Triton path of LASP-2 (DESIGN §3): sequence-sharded linear attention from the kernels' stage functions.

Each batch row is a shard whose entering state S_0 depends on every row's zero-start final state M and total
log decay log A through a `ShardExchange` (`parallel.lasp2._KernelExchange`: the all-gather, the prefix in
global shard order, and the reduce-scatter of its backward). Per row, with M_s, D_s the raw segment states of
(k, v) and of (q, do) and A_s the segment decays,

    M = Σ_s (Π_{s'>s} A_s') M_s,    log A = Σ_s log A_s,    dS_0 = Σ_s (Π_{s'<s} A_s') D_s,

so the outputs are computed once, from S_0 (no correction GEMM). dM enters the kernels' backward as the gradient
of the final state F = A·S_0 + M, whose d log a then holds ⟨dM, A·S_0⟩ at every token, a path M does not have:
it is taken out again, with d log A added, as a per-row shift of d log a.
"""

from __future__ import annotations

import torch

from kernels.triton import (
    LOG2E,
    Plan,
    TritonConfig,
    checked_inputs,
    chunk_backward,
    chunk_forward,
    resolve_config,
    segment_states,
    setup,
)

__all__ = ["ShardExchange", "linear_attention_triton_sharded"]


def _segment_weights(seg_log2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Products of the segment decays strictly before and strictly after each segment ([B·H, NS], fp32),
    and each row's total log decay (natural log, [B·H]); one fp64 cumsum."""
    x = seg_log2.double()
    inc = x.cumsum(-1)
    total = inc[:, -1:]
    return torch.exp2(inc - x).float(), torch.exp2(total - inc).float(), (total[:, 0] / LOG2E).float()


class ShardExchange:
    """The collective of a sequence-sharded call (LASP-2): see `linear_attention_triton_sharded`."""

    def forward(self, M: torch.Tensor, log_A: torch.Tensor, initial: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Local states M [B, H, K, V] and total log decays log A [B, H] of this rank's rows, and the state
        entering the whole sequence → (entering states of the rows, the state after the whole sequence)."""
        raise NotImplementedError

    def backward(self, d_entering: torch.Tensor, d_final: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Gradients of the entering states and of the final state → (dM, d log A, d initial)."""
        raise NotImplementedError


class _ShardedTriton(torch.autograd.Function):
    """o = attention(q, k, v; S_0 = exchange(M, log A)) with M, log A the zero-start state and decay of each row.

    Forward: raw segment states M_s (one pass over k, v) → M = Σ_s (Π_{s'>s} A_s') M_s → exchange →
    scan with S_0 → outputs: the kernel's own passes plus one read of the [B·H, NS, K, V] buffer.
    Backward: raw D_s (q, do) → dS_0 = Σ_s (Π_{s'<s} A_s') D_s → exchange backward → dM enters as the
    gradient of the final state F = A·S_0 + M; the S_0-path of F is taken out of d log a again.
    """

    @staticmethod
    def forward(ctx, q, k, v, log_decay, gate, initial, scale, chunk_size, cfg, exchange):
        p, lam, G, seg_log2 = setup(ctx, q, v, log_decay, gate, scale, chunk_size, cfg)
        m_raw = segment_states(p, k, v, G, lam, qdo=False)
        w_before, w_after, log_A = _segment_weights(seg_log2)
        M = torch.einsum("rs,rse->re", w_after, m_raw.view(p.B * p.H, p.NS, -1))
        log_A = log_A.view(p.B, p.H)
        S0, final = exchange.forward(M.view(p.B, p.H, p.K, p.V), log_A, initial)
        S0 = S0.float().contiguous()
        o, _, s_in = chunk_forward(p, q, k, v, G, lam, seg_log2, S0, False, m_raw=m_raw)
        ctx.plan, ctx.exchange = p, exchange
        ctx.save_for_backward(q, k, v, G, lam, seg_log2, s_in, S0, log_A, w_before)
        ctx.set_materialize_grads(False)
        return o, final

    @staticmethod
    def backward(ctx, do, d_final):
        q, k, v, G, lam, seg_log2, s_in, S0, log_A, w_before = ctx.saved_tensors
        p: Plan = ctx.plan
        do = torch.zeros(p.B, p.T, p.H, p.V, dtype=q.dtype, device=q.device) if do is None else do
        do = do.to(q.dtype).contiguous()
        d_raw = segment_states(p, q, do, G, lam, qdo=True)
        dS0 = torch.einsum("rs,rse->re", w_before, d_raw.view(p.B * p.H, p.NS, -1))
        dM, dlog_A, d_initial = ctx.exchange.backward(dS0.view(p.B, p.H, p.K, p.V), d_final)
        dM = dM.float().contiguous()
        # F = A·S_0 + M: the kernel's d log a holds ⟨dM, A·S_0⟩ per token, which M does not depend on
        s0_path = (dM.double() * S0.double()).sum((-1, -2)) * log_A.double().exp()
        shift = (dlog_A.double() - s0_path).reshape(-1).contiguous()
        dq, dk, dv, dgate, dlam, _ = chunk_backward(p, q, k, v, do, G, lam, seg_log2, s_in, dM,
                                                    gate_dtype=ctx.gate_dtype, lam_dtype=ctx.lam_dtype, d_raw=d_raw,
                                                    dloga_shift=shift)
        return dq, dk, dv, dlam, dgate, d_initial, None, None, None, None


def linear_attention_triton_sharded(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, exchange: ShardExchange, *,
    log_decay: torch.Tensor | None = None, gate: torch.Tensor | None = None, scale: float | None = None,
    chunk_size: int = 64, config: TritonConfig | None = None, initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear attention whose rows start from states that depend on every row's local state (LASP-2).

    Each batch row b is a sequence shard; its entering state is exchange.forward(M, log A)[b], where
    M[b] is the row's final state from a zero start and log A[b] its total log decay. The kernels
    compute M in their segment-state pass, so the shard needs no separate correction GEMM:
    o_i = scale · q_i S_i with S starting at the entering state. Differentiable like
    `linear_attention_triton`; exchange.backward receives ∂L/∂S_0 (and ∂L/∂final) and returns
    (∂L/∂M, ∂L/∂log A, ∂L/∂initial). Returns (o, the state after the whole sequence, from `initial_state`).
    """
    q, k, v, scale = checked_inputs(q, k, v, scale)
    init = None if initial_state is None else initial_state.float()
    return _ShardedTriton.apply(q, k, v, log_decay, gate, init, scale, chunk_size, resolve_config(config), exchange)
