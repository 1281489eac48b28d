"""LASP-2: sequence parallelism for linear attention (DESIGN §3).

Each rank runs the kernel on the shards it owns with a zero initial state, giving a local
output o^loc, the shard's local state M_c and its total log decay log A_c. ONE all-gather of
the packed (M_c, log A_c) — B·H·K·V + B·H floats per shard, independent of sequence length —
gives every rank all shard states, from which it forms, in fp32 and in global shard order,

    S_in(0) = 0,   S_in(c+1) = A_c · S_in(c) + M_c,

and corrects its outputs: o_i = o^loc_i + scale · exp(G_i) q_i S_in(c), G_i the inclusive
cumulative log decay from the shard's start. On the Triton backend the correction is not a separate
GEMM: the kernels' own segment-state pass yields M_c, and the outputs are computed once, starting
from S_in(c) (`parallel.lasp2_triton.linear_attention_triton_sharded`; a rank's shards are rows of a
view, no copies). The exchange is one autograd Function whose
backward (a reduce-scatter of the gradients of the gathered tensor) runs on every rank, so
no rank can skip the collective; any shard→rank assignment (contiguous, zigzag) works.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from kernels import linear_attention
from kernels.api import resolve_backend
from kernels.reference import log_decay_per_token, state_dtype
from parallel.comm import all_gather_tensor, group_rank_world, reduce_scatter_tensor
from parallel.lasp2_delta import lasp2_delta_rule  # noqa: F401  (DESIGN §12: LASP-2 for affine recurrences)
from parallel.layout import num_shards, shard_ids, shard_owners, stack_local_shards, unstack_local_shards


def _prefix_states(gathered: torch.Tensor, world: int, layout: str, wanted: list[int], k_dim: int, v_dim: int,
                   initial: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """States entering the shards `wanted`, and the state after the last shard, from gathered
    [P, n_local, B, H, K·V + 1] and the state entering shard 0 (`initial`, zeros when None)."""
    owner = shard_owners(world, layout)
    B, H = gathered.shape[2:4]
    S = gathered.new_zeros(B, H, k_dim, v_dim) if initial is None else initial.to(gathered.dtype)
    entering: dict[int, torch.Tensor] = {}
    for c in range(num_shards(world, layout)):
        entering[c] = S
        r, j = owner[c]
        packed = gathered[r, j]
        M, log_A = packed[..., :-1].view(B, H, k_dim, v_dim), packed[..., -1]
        S = log_A.exp()[..., None, None] * S + M
    return torch.stack([entering[c] for c in wanted]), S


def _exchange_forward(M: torch.Tensor, log_A: torch.Tensor, group, layout: str, initial: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(M [n, B, H, K, V], log A [n, B, H]) of local shards → (states entering them, final state, the gathered pack)."""
    n_local, B, H, K, V = M.shape
    rank, world = group_rank_world(group)
    packed = torch.cat([M.reshape(n_local, B, H, K * V), log_A.unsqueeze(-1).to(M.dtype)], dim=-1)
    gathered = all_gather_tensor(packed, group)  # [P, n_local, B, H, K·V + 1]
    entering, final = _prefix_states(gathered, world, layout, shard_ids(rank, world, layout), K, V, initial)
    return entering, final, gathered


def _exchange_backward(gathered: torch.Tensor, d_entering: torch.Tensor, d_final: torch.Tensor | None, group,
                       layout: str, K: int, V: int, initial: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of the entering states and of this rank's copy of the final state → (dM, d log A) of local
    shards and this rank's share of d initial; every rank enters the reduce-scatter.

    The initial and final states are replicated over the group (each rank holds the same values): each
    rank's copy receives only the gradient of that rank's outputs, and the reduce-scatter of the gathered
    gradients sums the shares, so the total derivative is exact."""
    rank, world = group_rank_world(group)
    with torch.enable_grad():
        g = gathered.detach().requires_grad_()
        s0 = None if initial is None else initial.detach().to(g.dtype).requires_grad_()
        entering, final = _prefix_states(g, world, layout, shard_ids(rank, world, layout), K, V, s0)
        outputs, grads = [entering], [d_entering.to(g.dtype)]
        if d_final is not None:
            outputs.append(final)
            grads.append(d_final.to(g.dtype))
        inputs = [g] if s0 is None else [g, s0]
        wired = [(o, d) for o, d in zip(outputs, grads) if o.requires_grad]
        found = torch.autograd.grad([o for o, _ in wired], inputs, [d for _, d in wired], allow_unused=True) \
            if wired else [None] * len(inputs)
    d_gathered = found[0] if found[0] is not None else torch.zeros_like(gathered)
    d_initial = None
    if s0 is not None:
        d_initial = found[1] if found[1] is not None else torch.zeros_like(s0)
    d_packed = reduce_scatter_tensor(d_gathered, group)
    n_local, B, H = d_packed.shape[:3]
    return d_packed[..., :-1].reshape(n_local, B, H, K, V), d_packed[..., -1], d_initial


class _ShardStateExchange(torch.autograd.Function):
    """(M, log A) of local shards and the initial state → (states entering local shards, final state);
    all-gather forward, reduce-scatter backward."""

    @staticmethod
    def forward(ctx, M: torch.Tensor, log_A: torch.Tensor, initial: torch.Tensor | None, group, layout: str):
        entering, final, gathered = _exchange_forward(M, log_A, group, layout, initial)
        ctx.save_for_backward(gathered, initial)
        ctx.meta = (group, layout, M.shape[-2], M.shape[-1])
        ctx.set_materialize_grads(False)
        return entering, final

    @staticmethod
    def backward(ctx, d_entering: torch.Tensor | None, d_final: torch.Tensor | None):
        group, layout, K, V = ctx.meta
        gathered, initial = ctx.saved_tensors
        if d_entering is None:
            n_local, B, H = gathered.shape[1:4]
            d_entering = gathered.new_zeros(n_local, B, H, K, V)
        dM, dlog_A, d_initial = _exchange_backward(gathered, d_entering, d_final, group, layout, K, V, initial)
        return dM, dlog_A, d_initial, None, None


class _KernelExchange:
    """LASP-2 exchange for the Triton kernels, whose batch rows are (b, local shard j) in b-major order.

    Implements `parallel.lasp2_triton.ShardExchange` by duck typing, so that this module imports without Triton."""

    def __init__(self, group, layout: str, n_local: int):
        self.group, self.layout, self.n = group, layout, n_local

    def _to_shard_major(self, x: torch.Tensor) -> torch.Tensor:  # [B·n, ...] → [n, B, ...]
        return x.reshape(-1, self.n, *x.shape[1:]).transpose(0, 1).contiguous()

    def _to_row_major(self, x: torch.Tensor) -> torch.Tensor:  # [n, B, ...] → [B·n, ...]
        return x.transpose(0, 1).reshape(-1, *x.shape[2:]).contiguous()

    def forward(self, M: torch.Tensor, log_A: torch.Tensor, initial: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        entering, final, self.gathered = _exchange_forward(self._to_shard_major(M), self._to_shard_major(log_A),
                                                           self.group, self.layout, initial)
        self.initial = initial
        return self._to_row_major(entering), final

    def backward(self, d_entering: torch.Tensor, d_final: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        K, V = d_entering.shape[-2:]
        dM, dlog_A, d_initial = _exchange_backward(self.gathered, self._to_shard_major(d_entering), d_final,
                                                   self.group, self.layout, K, V, self.initial)
        self.gathered = self.initial = None
        return self._to_row_major(dM), self._to_row_major(dlog_A), d_initial


def lasp2_linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
    log_decay: torch.Tensor | None = None, gate: torch.Tensor | None = None, scale: float | None = None,
    group: dist.ProcessGroup | None = None, layout: str = "contiguous",
    chunk_size: int = 64, backend: str = "auto",
    initial_state: torch.Tensor | None = None, output_final_state: bool = False,
):
    """Linear attention over a sequence split across the ranks of `group`.

    q, k: [B, T_local, H, K]; v: [B, T_local, H, V]; gate: [B, T_local, H] — this rank's part as
    produced by `parallel.layout.shard_sequence(x, rank, world, layout)`. log_decay: [H].
    Returns this rank's output [B, T_local, H, V], equal to the matching slice of
    `kernels.linear_attention` on the whole sequence; gradients likewise (a replicated
    `log_decay` receives this rank's share: sum it over the group, as for any parameter).

    initial_state [B, H, K, V] (the state entering the whole sequence, the same on every rank) and, with
    `output_final_state`, the state after the whole sequence (returned as `(o, final_state)`, the same on
    every rank) make consecutive windows of one sequence chain exactly (DESIGN §9). Both are replicated:
    each rank's copy carries the gradient of that rank's outputs only, and the exchange's reduce-scatter
    sums the shares.
    """
    rank, world = group_rank_world(group)
    if world == 1:
        o, final = linear_attention(q, k, v, log_decay=log_decay, gate=gate, scale=scale, chunk_size=chunk_size,
                                    backend=backend, initial_state=initial_state,
                                    output_final_state=output_final_state)
        return (o, final) if output_final_state else o
    n_local = num_shards(world, layout) // world
    B, T_local, H, K = q.shape
    V = v.shape[-1]
    if T_local % n_local:
        raise ValueError(f"local sequence of {T_local} tokens does not hold {n_local} equal {layout} shards")
    scale = K**-0.5 if scale is None else scale
    if resolve_backend(q, backend) == "triton":
        # rows (b, j) in b-major order are views of the local tensors: no copies; the kernels compute the
        # shard states in their own segment pass and start each row from its entering state
        from parallel.lasp2_triton import linear_attention_triton_sharded

        Ts = T_local // n_local
        rows = lambda x: x.reshape(B * n_local, Ts, *x.shape[2:])  # noqa: E731
        o, final = linear_attention_triton_sharded(
            rows(q), rows(k), rows(v), _KernelExchange(group, layout, n_local), log_decay=log_decay,
            gate=rows(gate) if gate is not None else None, scale=scale, chunk_size=chunk_size,
            initial_state=initial_state)
        o = o.view(B, T_local, H, V)
        return (o, final) if output_final_state else o

    qs, ks, vs = (stack_local_shards(t, n_local) for t in (q, k, v))
    gs = stack_local_shards(gate, n_local) if gate is not None else None
    o_local, M = linear_attention(qs, ks, vs, log_decay=log_decay, gate=gs, scale=scale,
                                  output_final_state=True, chunk_size=chunk_size, backend=backend)
    acc = state_dtype(q)
    Ts = T_local // n_local
    if gs is None and log_decay is None:
        G, log_A = None, M.new_zeros(n_local * B, H)
    elif gs is None:  # constant decay: G_t = λ·(t+1) in closed form, no scan
        G = torch.arange(1, Ts + 1, device=q.device, dtype=acc)[None, :, None] * log_decay.to(acc)
        log_A = (Ts * log_decay.to(acc)).expand(n_local * B, H)
    else:  # inclusive scan of log a along the sequence, run over a contiguous last dim (fast on GPU)
        log_a = log_decay_per_token(n_local * B, Ts, H, log_decay, gs, acc, q.device)
        G = log_a.transpose(1, 2).contiguous().cumsum(-1).transpose(1, 2)  # [n·B, Ts, H]
        log_A = G[:, -1]
    init = None if initial_state is None else initial_state.to(M.dtype)
    S_in, final = _ShardStateExchange.apply(
        M.reshape(n_local, B, H, K, V), log_A.reshape(n_local, B, H), init, group, layout,
    )
    S_in = S_in.reshape(n_local * B, H, K, V)
    # correction scale · exp(G_i) q_i S_in: in the inputs' dtype when that is bf16/fp16 (tensor cores,
    # fp32 accumulation inside the GEMM), else in fp32 / fp64
    low = q.dtype in (torch.bfloat16, torch.float16)
    cdt = q.dtype if low else acc
    q_in = qs.to(cdt) if G is None else qs.to(cdt) * G.exp().to(cdt).unsqueeze(-1)
    corr = torch.matmul(q_in.transpose(1, 2), S_in.to(cdt)).transpose(1, 2)  # [n·B, Ts, H, V]
    o = unstack_local_shards(o_local + (scale * corr).to(o_local.dtype), n_local)
    return (o, final) if output_final_state else o
