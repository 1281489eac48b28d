"""LASP-2 for affine recurrences (DESIGN §12): the sequence-parallel gated delta rule.

Over a shard c the map from entering to leaving state is affine, S_out = P_c S_in + M_c, with
P_c = Π_{t∈c, latest first} a_t (I − β_t k_tᵀ k_t) (K×K) and M_c the shard's final state from a zero start.

- Forward: each rank computes (P_c, M_c) of its shards; ONE all-gather of the packed [P_c | M_c]
  (H·K·(K+V) fp32 per shard and batch row); fp32 prefix in global shard order,
  S_in(0) = S_init, S_in(c+1) = P_c S_in(c) + M_c; each shard's chunked forward starts from S_in(c).
- Backward: each rank's shards send dS_in^loc(c), the gradient their own outputs give their entering state;
  ONE all-gather of those (with each rank's share of the final state's gradient); fp32 suffix in global order,
  dS_in(N) = dS_final, dS_in(c) = dS_in^loc(c) + P_cᵀ dS_in(c+1); the shard's backward then takes
  dS_out(c) = dS_in(c+1) as the gradient of its leaving state, which gives its inputs' gradients through
  P_c and M_c exactly.

The initial and final states are replicated over the group (the same values on every rank): each rank's copy of
the final state carries its own share of the gradient (the shares are summed in the backward all-gather), and each
rank's copy of the initial state receives the part of dS_init that comes from its own outputs and its own share,
so the shares sum to the total, as in `parallel.lasp2`. Any shard→rank layout works (the prefix and suffix run in
global order), any batch size. The exchange is one object (`AffineExchange`) called from one autograd Function per
backend, whose backward runs the collective on every rank.

PyTorch backend: the shard maps come from `delta_rule_summary` under autograd, the exchange is an autograd
Function whose backward returns dM_c = dS_out(c) and dP_c = dS_out(c) S_in(c)ᵀ, and `delta_rule_chunked` runs each
shard from S_in(c). Triton backend: `parallel.lasp2_delta_triton` (the kernels' own segment maps and sweeps).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from kernels.api import resolve_backend
from kernels.delta_rule import check_beta, delta_rule, delta_rule_chunked, delta_rule_summary, fused_config
from kernels.reference import state_dtype
from parallel.comm import all_gather_tensor, group_rank_world
from parallel.layout import num_shards, shard_ids, shard_owners, stack_local_shards, unstack_local_shards


def _prefix_step(P: torch.Tensor, S: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """The state leaving a shard: P S + M (batched over [B, H])."""
    return P @ S + M


class AffineExchange:
    """The collectives of one sharded call. Tensors are shard-major: [n_local, B, H, K, ·], in the shard order of
    `parallel.layout.shard_ids`."""

    def __init__(self, group, layout: str):
        self.group, self.layout = group, layout
        self.rank, self.world = group_rank_world(group)
        self.owner = shard_owners(self.world, layout)
        self.mine = shard_ids(self.rank, self.world, layout)

    def forward(self, P: torch.Tensor, M: torch.Tensor, initial: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's shard maps and S_init → (states entering this rank's shards, the state after the sequence)."""
        n, B, H, K, V = M.shape
        acc = torch.float64 if M.dtype == torch.float64 else torch.float32
        packed = torch.cat([P.reshape(n, B, H, K * K), M.reshape(n, B, H, K * V)], dim=-1).to(acc)
        gathered = all_gather_tensor(packed, self.group)  # [P, n, B, H, K·(K+V)]
        S = M.new_zeros(B, H, K, V, dtype=acc) if initial is None else initial.to(acc)
        entering, self.P = {}, []
        for c in range(num_shards(self.world, self.layout)):
            entering[c] = S
            piece = gathered[self.owner[c]]
            Pc = piece[..., : K * K].view(B, H, K, K)
            self.P.append(Pc)
            S = _prefix_step(Pc, S, piece[..., K * K :].view(B, H, K, V))
        self.has_initial = initial is not None
        return torch.stack([entering[c] for c in self.mine]), S

    def backward(self, d_local: torch.Tensor, d_final: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """dS_in^loc of this rank's shards and its share of d final → (dS_out of its shards, its share of
        d S_init, or None without an initial state). Every rank enters the all-gather."""
        n, B, H, K, V = d_local.shape
        acc = self.P[0].dtype
        share = d_local.new_zeros(B, H, K, V, dtype=acc) if d_final is None else d_final.to(acc)
        packed = torch.cat([d_local.to(acc), share.unsqueeze(0)])  # [n + 1, B, H, K, V]
        gathered = all_gather_tensor(packed, self.group)
        x = gathered[:, n].sum(0)  # the final state's gradient, all shares
        own = share
        leaving = {}
        for c in range(len(self.P) - 1, -1, -1):
            leaving[c] = x
            r, j = self.owner[c]
            x = gathered[r, j] + self.P[c].transpose(-1, -2) @ x
            if self.has_initial:  # the part of dS_init from this rank's outputs and share
                own = self.P[c].transpose(-1, -2) @ own + (d_local[j].to(acc) if r == self.rank else 0)
        self.P = []
        return torch.stack([leaving[c] for c in self.mine]), (own if self.has_initial else None)


class _ExchangeFn(torch.autograd.Function):
    """(P, M) of local shards and S_init → (S_in of local shards, final state); backward: dM = dS_out,
    dP = dS_out S_inᵀ, d S_init (this rank's share)."""

    @staticmethod
    def forward(ctx, P, M, initial, exchange: AffineExchange):
        entering, final = exchange.forward(P, M, initial)
        ctx.exchange = exchange
        ctx.save_for_backward(entering)
        ctx.set_materialize_grads(False)
        return entering, final

    @staticmethod
    def backward(ctx, d_entering, d_final):
        (entering,) = ctx.saved_tensors
        if d_entering is None:
            d_entering = torch.zeros_like(entering)
        d_out, d_initial = ctx.exchange.backward(d_entering, d_final)
        dP = d_out @ entering.transpose(-1, -2)
        return dP, d_out, d_initial, None


def lasp2_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *,
    log_decay: torch.Tensor | None = None, gate: torch.Tensor | None = None, scale: float | None = None,
    group: dist.ProcessGroup | None = None, layout: str = "contiguous", chunk_size: int = 64,
    backend: str = "auto", initial_state: torch.Tensor | None = None, output_final_state: bool = False,
    split: bool = True,
):
    """The gated delta rule over a sequence split across the ranks of `group` (DESIGN §12).

    q, k: [B, T_local, H, K]; v: [B, T_local, H, V]; beta, gate: [B, T_local, H] — this rank's part as produced by
    `parallel.layout.shard_sequence(x, rank, world, layout)`; log_decay: [H]. Returns this rank's output
    [B, T_local, H, V] (and, with `output_final_state`, the state after the whole sequence, the same on every
    rank), equal to the matching slices of `kernels.delta_rule.delta_rule` on the whole sequence; gradients
    likewise (a replicated log_decay or initial_state receives this rank's share: sum it over the group). split:
    the Triton path's chunk-parallel split kernels (default; False: the fused ones, `kernels.delta_rule.delta_rule`).
    """
    rank, world = group_rank_world(group)
    check_beta(q, beta)
    if world == 1:
        o, final = delta_rule(q, k, v, beta, log_decay=log_decay, gate=gate, scale=scale, chunk_size=chunk_size,
                              backend=backend, initial_state=initial_state, output_final_state=output_final_state,
                              split=split)
        return (o, final) if output_final_state else o
    n_local = num_shards(world, layout) // world
    B, T_local, H, K = q.shape
    V = v.shape[-1]
    if T_local % n_local:
        raise ValueError(f"local sequence of {T_local} tokens does not hold {n_local} equal {layout} shards")
    scale = K**-0.5 if scale is None else scale
    exchange = AffineExchange(group, layout)
    if resolve_backend(q, backend) == "triton":
        from parallel.lasp2_delta_triton import delta_rule_triton_sharded

        Ts = T_local // n_local
        rows = lambda x: x.reshape(B * n_local, Ts, *x.shape[2:])  # noqa: E731  (rows b-major: views, no copies)
        o, final = delta_rule_triton_sharded(
            rows(q), rows(k), rows(v), rows(beta), exchange, n_local, log_decay=log_decay,
            gate=rows(gate) if gate is not None else None, scale=scale, chunk_size=chunk_size,
            initial_state=initial_state, config=None if split else fused_config())
        o = o.view(B, T_local, H, V)
        return (o, final) if output_final_state else o

    qs, ks, vs, bs = (stack_local_shards(t, n_local) for t in (q, k, v, beta))  # rows shard-major
    gs = stack_local_shards(gate, n_local) if gate is not None else None
    P, M = delta_rule_summary(ks, vs, bs, log_decay=log_decay, gate=gs, chunk_size=chunk_size)
    init = None if initial_state is None else initial_state.to(state_dtype(q))
    S_in, final = _ExchangeFn.apply(P.view(n_local, B, H, K, K), M.view(n_local, B, H, K, V), init, exchange)
    o, _ = delta_rule_chunked(qs, ks, vs, bs, log_decay=log_decay, gate=gs, scale=scale, chunk_size=chunk_size,
                              initial_state=S_in.reshape(n_local * B, H, K, V))
    o = unstack_local_shards(o, n_local)
    return (o, final) if output_final_state else o
