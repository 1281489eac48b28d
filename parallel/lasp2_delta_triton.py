"""The Triton path of LASP-2 for affine recurrences (DESIGN §12): the sharded gated delta rule from the kernels'
stage functions (`kernels.delta_rule.triton`).

Each batch row is a shard (rows b-major: row b·n + j is local shard j of batch row b). Forward: the UT transform,
every segment's map (P_s, M_s), composed into the row's (P_c, M_c) → the exchange's all-gather and prefix → the
segment scan from S_in(c) → outputs. Backward: each segment's Δ_s (its outputs' gradient at its entering state)
composed into the row's dS_in^loc(c) = Σ_s (P_0ᵀ … P_{s−1}ᵀ) Δ_s → the exchange's all-gather and suffix →
dS_out(c) → the reverse segment scan from it → the chunk sweeps and gradients, as on one device.
"""

from __future__ import annotations

import torch

from kernels.delta_rule.triton import (
    DeltaConfig,
    backward_pass,
    boundary_states,
    decay_grads,
    entering_grad,
    row_summary,
    segment_summaries,
    setup,
)
from kernels.delta_rule.triton.backward import DELTA, bwd_sweep
from kernels.delta_rule.triton.forward import outputs, prepare
from kernels.delta_rule.triton.function import restore_context, save_context
from kernels.triton.common import checked_inputs

__all__ = ["delta_rule_triton_sharded"]


def _shard_major(x: torch.Tensor, n: int) -> torch.Tensor:  # [B·n, ...] (b-major) → [n, B, ...]
    return x.reshape(-1, n, *x.shape[1:]).transpose(0, 1).contiguous()


def _row_major(x: torch.Tensor) -> torch.Tensor:  # [n, B, ...] → [B·n, ...]
    return x.transpose(0, 1).reshape(-1, *x.shape[2:]).contiguous()


class _ShardedDeltaTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, log_decay, gate, initial, scale, chunk, cfg, exchange, n_local):
        p, lam, G = setup(q, v, log_decay, gate, scale, chunk, cfg)
        w, u = prepare(p, k, v, beta, G, lam)
        P, M = segment_summaries(p, k, w, u, G, lam)
        Pc, Mc = row_summary(p, P, M)
        S0, final = exchange.forward(_shard_major(Pc, n_local), _shard_major(Mc, n_local), initial)
        s_in = boundary_states(p, P, M, _row_major(S0), False)
        del M
        o, _ = outputs(p, q, k, w, u, G, lam, s_in)
        ctx.exchange, ctx.n_local = exchange, n_local
        save_context(ctx, p, log_decay, gate, q, k, v, beta, G, lam, s_in, P)
        return o, final

    @staticmethod
    def backward(ctx, do, d_final):
        p, (q, k, v, beta, G, lam, s_in, P), do, w, u, tt, du_loc = restore_context(ctx, do)
        delta = bwd_sweep(p, DELTA, q, k, w, do, G, lam, None, du_loc=du_loc)
        d_local = entering_grad(p, P, delta)
        d_out, d_initial = ctx.exchange.backward(_shard_major(d_local, ctx.n_local), d_final)
        ds_out = boundary_states(p, P, delta, _row_major(d_out), True)
        del delta
        need_dg = ctx.gate_dtype is not None or ctx.lam_dtype is not None
        dq, dk, dv, dbeta, dloga, _ = backward_pass(p, q, k, v, beta, G, lam, w, u, s_in, do, ds_out, False, need_dg,
                                                    tt, du_loc)
        dgate, dlam = decay_grads(p, dloga, ctx.gate_dtype, ctx.lam_dtype)
        return dq, dk, dv, dbeta, dlam, dgate, d_initial, None, None, None, None, None


def delta_rule_triton_sharded(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, exchange, n_local: int, *,
    log_decay: torch.Tensor | None = None, gate: torch.Tensor | None = None, scale: float | None = None,
    chunk_size: int | None = None, config: DeltaConfig | None = None, initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule on rows that are sequence shards (rows b-major, n_local shards per batch row), each
    starting from the state `exchange` (`parallel.lasp2_delta.AffineExchange`) gives it from every shard's map.
    Returns (o, the state after the whole sequence); differentiable like `delta_rule_triton`."""
    q, k, v, scale = checked_inputs(q, k, v, scale)
    init = None if initial_state is None else initial_state.float()
    return _ShardedDeltaTriton.apply(q, k, v, beta.contiguous(), log_decay, gate, init, scale, chunk_size, config,
                                     exchange, n_local)
