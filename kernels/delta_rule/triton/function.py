"""The stage functions of a call, the autograd Function and the public entry `delta_rule_triton`.

Forward: UT transform (W, u) → if the sequence has several segments, each segment's affine map (P_s, M_s) and the
scan S_in(s+1) = P_s S_in(s) + M_s → outputs, every segment starting from S_in(s). Saved for backward: the inputs,
the gate cumsum and, per segment, S_in(s) and P_s (fp32) — no per-chunk or per-token intermediate.
Backward: W, u again (and every chunk's Tᵀ when DeltaConfig.grad_block_k > 0 or grad_split) → each segment's
Δ_s (the gradient its outputs send to its entering state) and the reverse scan dS_out(s−1) = P_sᵀ dS_out(s) + Δ_s →
the states entering every chunk and U (forward sweep) → dS_out of every chunk and dU (reverse sweep) → the
chunk-parallel gradient kernel (two with grad_split). With DeltaConfig.out_split the forward's outputs come from
the STATES sweep's per-chunk states through a chunk-parallel kernel (`forward.outputs`). The per-chunk states of
the backward (and the per-chunk Tᵀ) are its only transients of state size. With DeltaConfig.window_tokens the
stages with per-chunk transients run window by window (`Window`: one batch row, whole segments), each from its
segments' boundary states, so those transients are a window's size.
"""

from __future__ import annotations

import dataclasses

import torch

from kernels.delta_rule.triton import backward as bwd
from kernels.delta_rule.triton import forward as fwd
from kernels.delta_rule.triton.common import DeltaConfig, decay_inputs, make_plan
from kernels.triton.common import Plan, _empty, checked_inputs


def setup(q, v, log_decay, gate, scale: float, chunk: int | None, cfg: DeltaConfig | None):
    """(plan, λ [H] fp32, gate cumsum) of one call."""
    from kernels.delta_rule.triton import common

    decay = 2 if gate is not None else (1 if log_decay is not None else 0)
    p = make_plan(q, v, decay, scale, cfg or common.DEFAULT_CONFIG, chunk)
    lam, G = decay_inputs(p, log_decay, gate, q.device)
    return p, lam, G


def segment_summaries(p: Plan, k, w, u, G, lam) -> tuple[torch.Tensor, torch.Tensor]:
    """(P_s [B·H, NS, K, K], M_s [B·H, NS, K, V]) of every segment, fp32."""
    return fwd.sweep(p, fwd.SUM_P, k, k, w, u, G, lam), fwd.sweep(p, fwd.SUM_M, k, k, w, u, G, lam)


def row_summary(p: Plan, P: torch.Tensor, M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The segments' maps composed into the whole row's (P [B, H, K, K], M [B, H, K, V]), fp32."""
    Pt, Mt = P[:, 0], M[:, 0]
    for s in range(1, p.NS):
        Pt, Mt = P[:, s] @ Pt, torch.baddbmm(M[:, s], P[:, s], Mt)
    return Pt.view(p.B, p.H, p.K, p.K), Mt.view(p.B, p.H, p.K, p.V)


def entering_grad(p: Plan, P: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Σ_s (P_0ᵀ … P_{s−1}ᵀ) Δ_s: what the row's outputs send to its entering state ([B, H, K, V], fp32)."""
    x = delta[:, p.NS - 1]
    for s in range(p.NS - 2, -1, -1):
        x = torch.baddbmm(delta[:, s], P[:, s].transpose(1, 2), x)
    return x.view(p.B, p.H, p.K, p.V)


def boundary_states(p: Plan, P, X, init: torch.Tensor | None, reverse: bool) -> torch.Tensor | None:
    """S_in(s) (or dS_out(s) if reverse) of every segment from init (S_init / dS_final, [B, H, K, V] or None)."""
    if init is not None:
        init = init.detach().float().reshape(p.B * p.H, p.K, p.V).contiguous()
    if p.NS > 1:
        return fwd.scan(p, P, X, init, reverse)
    return None if init is None else init.view(p.B * p.H, 1, p.K, p.V)


def backward_pass(p: Plan, q, k, v, beta, G, lam, w, u, s_in, do, ds_out, need_ds0: bool, need_dg: bool,
                  tt: torch.Tensor | None = None, du_loc: torch.Tensor | None = None):
    """(dq, dk, dv, dβ, d log a [B·H, T] or None, dS_init [B·H, K, V] or None) given the segments' entering states
    and leaving gradients (tt: every chunk's Tᵀ from `restore_context`, for grad_block_k > 0 or grad_split)."""
    h, un = fwd.sweep(p, fwd.STATES, q, k, w, u, G, lam, s_in)
    dh, du, ds0 = bwd.bwd_sweep(p, bwd.FULL, q, k, w, do, G, lam, ds_out, need_ds0, du_loc)
    dq, dk, dv, dbeta, dloga = bwd.chunk_grads(p, q, k, v, beta, G, lam, do, un, du, h, dh, need_dg, tt)
    return dq, dk, dv, dbeta, dloga, ds0


@dataclasses.dataclass(frozen=True)
class Window:
    """Segments [s0, s1) of batch row b: tokens [t0, t1), and the plan of a call on just that part (B = 1)."""

    p: Plan
    b: int
    s0: int
    s1: int
    t0: int
    t1: int

    def tok(self, x: torch.Tensor) -> torch.Tensor:
        """The window's rows of a [B, T, …] tensor (a contiguous view)."""
        return x[self.b:self.b + 1, self.t0:self.t1]

    def gate(self, G: torch.Tensor, full: Plan) -> torch.Tensor:
        """Its part of the gate cumsum G [B·H, T] (chunk-local, so a slice at chunk starts is exact); a dummy as is."""
        if G.numel() != full.B * full.H * full.T:
            return G
        return G.view(full.B, full.H, full.T)[self.b, :, self.t0:self.t1].contiguous()

    def seg(self, x: torch.Tensor, full: Plan) -> torch.Tensor:
        """Its segments of a per-segment [B·H, NS, …] tensor, as [H, s1 − s0, …]."""
        return x.view(full.B, full.H, full.NS, *x.shape[2:])[self.b, :, self.s0:self.s1].contiguous()

    def put_seg(self, dst: torch.Tensor, x: torch.Tensor, full: Plan) -> None:
        dst.view(full.B, full.H, full.NS, *dst.shape[2:])[self.b, :, self.s0:self.s1] = x

    def put_tok(self, dst: torch.Tensor, x: torch.Tensor) -> None:
        dst[self.b:self.b + 1, self.t0:self.t1] = x


def windows(p: Plan) -> list[Window] | None:
    """The windows of a call under DeltaConfig.window_tokens (None: off, or one window would be the whole call)."""
    if p.cfg.window_tokens <= 0 or p.NS <= 1:
        return None
    per = max(1, p.cfg.window_tokens // p.C // p.NCS)  # segments per window
    if per >= p.NS and p.B == 1:
        return None
    out = []
    for b in range(p.B):
        for s0 in range(0, p.NS, per):
            s1 = min(s0 + per, p.NS)
            c0, c1 = s0 * p.NCS, min(s1 * p.NCS, p.NC)
            t0, t1 = c0 * p.C, min(c1 * p.C, p.T)
            wp = dataclasses.replace(p, B=1, T=t1 - t0, NC=c1 - c0, NS=s1 - s0)
            out.append(Window(wp, b, s0, s1, t0, t1))
    return out


def windowed_outputs(p: Plan, wins: list[Window], q, k, w, u, G, lam, s_in, need_final: bool) -> tuple:
    """`forward.outputs` window by window: (o, final state or None)."""
    o = _empty((p.B, p.T, p.H, p.V), q.dtype, q.device)
    final = _empty((p.B, p.H, p.K, p.V), torch.float32, q.device) if need_final else None
    for x in wins:
        last = x.s1 == p.NS
        o_w, f_w = fwd.outputs(x.p, x.tok(q), x.tok(k), x.tok(w), x.tok(u), x.gate(G, p), lam, x.seg(s_in, p),
                               need_final and last)
        x.put_tok(o, o_w)
        if f_w is not None:
            final[x.b] = f_w[0]
    return o, final


def windowed_backward(p: Plan, wins: list[Window], q, k, v, beta, G, lam, s_in, P, do, dfinal, need_ds0: bool,
                      need_dg: bool) -> tuple:
    """The backward window by window: each window's Δ (its own W, u and dU local share), the reverse scan over all
    segments, then per window W, u, Tᵀ and dU's local share again and `backward_pass`; (dq, dk, dv, dβ, d log a
    [B·H, T] or None, dS_init [B·H, K, V] or None)."""
    dev = q.device
    delta = _empty((p.B * p.H, p.NS, p.K, p.V), torch.float32, dev)
    for x in wins:
        Gw = x.gate(G, p)
        w, u = fwd.prepare(x.p, x.tok(k), x.tok(v), x.tok(beta), Gw, lam)
        du_loc = bwd.local_du(x.p, x.tok(q), x.tok(k), x.tok(do), Gw, lam)
        x.put_seg(delta, bwd.bwd_sweep(x.p, bwd.DELTA, x.tok(q), x.tok(k), w, x.tok(do), Gw, lam, None,
                                       du_loc=du_loc), p)
        del w, u, du_loc
    ds_out = boundary_states(p, P, delta, dfinal, True)
    del delta
    dq, dk = (_empty((p.B, p.T, p.H, p.K), q.dtype, dev) for _ in range(2))
    dv = _empty((p.B, p.T, p.H, p.V), q.dtype, dev)
    dbeta = _empty((p.B, p.T, p.H), beta.dtype, dev)
    dloga = _empty((p.B * p.H, p.T), torch.float32, dev) if need_dg else None
    ds0 = _empty((p.B * p.H, p.K, p.V), torch.float32, dev) if need_ds0 else None
    for x in wins:
        Gw = x.gate(G, p)
        tt = bwd.t_buffer(x.p, q)
        w, u = fwd.prepare(x.p, x.tok(k), x.tok(v), x.tok(beta), Gw, lam, tt)
        du_loc = bwd.local_du(x.p, x.tok(q), x.tok(k), x.tok(do), Gw, lam)
        g = backward_pass(x.p, x.tok(q), x.tok(k), x.tok(v), x.tok(beta), Gw, lam, w, u, x.seg(s_in, p),
                          x.tok(do), x.seg(ds_out, p), need_ds0 and x.s0 == 0, need_dg, tt, du_loc)
        for dst, part in zip((dq, dk, dv, dbeta), g[:4]):
            x.put_tok(dst, part)
        if need_dg:
            dloga.view(p.B, p.H, p.T)[x.b, :, x.t0:x.t1] = g[4]
        if g[5] is not None:
            ds0.view(p.B, p.H, p.K, p.V)[x.b] = g[5]
    return dq, dk, dv, dbeta, dloga, ds0


def decay_grads(p: Plan, dloga: torch.Tensor | None, gate_dtype, lam_dtype) -> tuple:
    """(d gate [B, T, H] in gate_dtype or None, dλ [H] in lam_dtype or None) from d log a [B·H, T]."""
    if dloga is None:
        return None, None
    x = dloga.view(p.B, p.H, p.T)
    dgate = x.transpose(1, 2).to(gate_dtype).contiguous() if gate_dtype is not None else None
    dlam = x.double().sum((0, 2)).to(lam_dtype) if lam_dtype is not None else None
    return dgate, dlam


def save_context(ctx, p: Plan, log_decay, gate, *tensors) -> None:
    """Record on an autograd Function's context (inputs 4 and 5: log_decay, gate) the plan, the dtypes the decay
    gradients take (None where none is needed) and the tensors the backward needs (q, k, v, β, G, λ, S_in, P)."""
    ctx.plan = p
    ctx.gate_dtype = gate.dtype if ctx.needs_input_grad[5] else None
    ctx.lam_dtype = log_decay.dtype if ctx.needs_input_grad[4] else None
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*tensors)


def saved_context(ctx, do: torch.Tensor | None) -> tuple:
    """(plan, the saved tensors, do in q's dtype (zeros if None))."""
    saved = ctx.saved_tensors
    q = saved[0]
    p: Plan = ctx.plan
    do = torch.zeros(p.B, p.T, p.H, p.V, dtype=q.dtype, device=q.device) if do is None else do
    return p, saved, do.to(q.dtype).contiguous()


def restore_context(ctx, do: torch.Tensor | None) -> tuple:
    """(plan, the saved tensors, do in q's dtype (zeros if None), W, u recomputed, every chunk's Tᵀ from the same
    UT transform when cfg.grad_block_k > 0 or cfg.grad_split, else None, and with cfg.bwd_split dU's chunk-local
    share for both backward sweeps, else None)."""
    p, saved, do = saved_context(ctx, do)
    q, k, v, beta, G, lam = saved[:6]
    tt = bwd.t_buffer(p, q)
    w, u = fwd.prepare(p, k, v, beta, G, lam, tt)
    return p, saved, do, w, u, tt, bwd.local_du(p, q, k, do, G, lam)


class _DeltaRuleTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, log_decay, gate, initial_state, scale, output_final_state, chunk, cfg):
        p, lam, G = setup(q, v, log_decay, gate, scale, chunk, cfg)
        w, u = fwd.prepare(p, k, v, beta, G, lam)
        P = None
        if p.NS > 1:
            P, M = segment_summaries(p, k, w, u, G, lam)
            s_in = boundary_states(p, P, M, initial_state, False)
            del M
        else:
            s_in = boundary_states(p, None, None, initial_state, False)
        wins = windows(p)
        if wins is not None and p.cfg.out_split:  # the OUT sweep has no per-chunk transient: no windows for it
            o, final = windowed_outputs(p, wins, q, k, w, u, G, lam, s_in, output_final_state)
        else:
            o, final = fwd.outputs(p, q, k, w, u, G, lam, s_in, output_final_state)
        del w, u
        ctx.has_init = initial_state is not None
        save_context(ctx, p, log_decay, gate, q, k, v, beta, G, lam, s_in, P)
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        need_ds0 = ctx.has_init and ctx.needs_input_grad[6]
        need_dg = ctx.gate_dtype is not None or ctx.lam_dtype is not None
        wins = windows(ctx.plan)
        if wins is not None:
            p, (q, k, v, beta, G, lam, s_in, P), do = saved_context(ctx, do)
            dq, dk, dv, dbeta, dloga, ds0 = windowed_backward(p, wins, q, k, v, beta, G, lam, s_in, P, do, dfinal,
                                                              need_ds0, need_dg)
        else:
            p, (q, k, v, beta, G, lam, s_in, P), do, w, u, tt, du_loc = restore_context(ctx, do)
            delta = bwd.bwd_sweep(p, bwd.DELTA, q, k, w, do, G, lam, None, du_loc=du_loc) if p.NS > 1 else None
            ds_out = boundary_states(p, P, delta, dfinal, True)
            del delta
            dq, dk, dv, dbeta, dloga, ds0 = backward_pass(p, q, k, v, beta, G, lam, w, u, s_in, do, ds_out,
                                                          need_ds0, need_dg, tt, du_loc)
        dgate, dlam = decay_grads(p, dloga, ctx.gate_dtype, ctx.lam_dtype)
        if ds0 is not None:
            ds0 = ds0.view(p.B, p.H, p.K, p.V)
        return dq, dk, dv, dbeta, dlam, dgate, ds0, None, None, None, None


def delta_rule_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *,
    log_decay: torch.Tensor | None = None, gate: torch.Tensor | None = None, scale: float | None = None,
    initial_state: torch.Tensor | None = None, output_final_state: bool = False, chunk_size: int | None = None,
    config: DeltaConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gated delta rule on the Triton kernels (DESIGN §12's contract; `kernels.delta_rule.delta_rule`).

    q, k: [B, T, H, K]; v: [B, T, H, V]; beta: [B, T, H]; log_decay: [H]; gate: [B, T, H]; initial_state:
    [B, H, K, V]. Returns (o in q's dtype, final state fp32 or None). chunk_size (default: the config's 64) is
    rounded to a power of two in [16, 64]; the result does not depend on it beyond rounding.
    """
    q, k, v, scale = checked_inputs(q, k, v, scale)
    beta = beta.contiguous()
    if initial_state is not None:
        initial_state = initial_state.float()
    o, final = _DeltaRuleTriton.apply(q, k, v, beta, log_decay, gate, initial_state, scale,
                                      bool(output_final_state), chunk_size, config)
    return o, (final if output_final_state else None)
