"""Pure-PyTorch linear attention with decay and gates (DESIGN §2).

Per batch row b and head h, with row vectors q_t, k_t ∈ R^K, v_t ∈ R^V:

    S_t = a_t · S_{t-1} + k_tᵀ v_t,      o_t = scale · q_t S_t,      log a_t = λ_h + g_{t,h} ≤ 0

`linear_attention_recurrent` runs that recurrence step by step (the test oracle);
`linear_attention_chunked` is the chunked form (the CPU path):

    o_i   = scale · [ Σ_{j ≤ i} exp(G_i − G_j)(q_i·k_j) v_j + exp(G_i) q_i S_in ]
    S_out = exp(G_last) S_in + Σ_j exp(G_last − G_j) k_jᵀ v_j

with G the inclusive cumulative log decay inside a chunk. Only differences of G are
exponentiated (G ≤ 0, so exp(G_i) ≤ 1 and exp(G_i − G_j) ≤ 1 for j ≤ i). Both are plain
autograd code: differentiable in every input, including a gradient on the final state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["log_decay_per_token", "linear_attention_recurrent", "linear_attention_chunked"]


def state_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs (reference runs), float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def log_decay_per_token(
    batch: int, seq_len: int, heads: int, log_decay: torch.Tensor | None, gate: torch.Tensor | None,
    dtype: torch.dtype, device: torch.device,
) -> torch.Tensor | None:
    """log a_{t,h} = λ_h + g_{t,h} as a [B, T, H] tensor, or None when there is no decay at all."""
    if log_decay is None and gate is None:
        return None
    out = torch.zeros(batch, seq_len, heads, dtype=dtype, device=device)
    if log_decay is not None:
        out = out + log_decay.to(dtype).view(1, 1, heads)
    if gate is not None:
        out = out + gate.to(dtype)
    return out


def linear_attention_recurrent(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
    log_decay: torch.Tensor | None = None, gate: torch.Tensor | None = None, scale: float | None = None,
    initial_state: torch.Tensor | None = None, output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token recurrence; O(T) Python steps — for tests only."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    acc = state_dtype(q)
    loga = log_decay_per_token(B, T, H, log_decay, gate, acc, q.device)
    S = (torch.zeros(B, H, K, V, dtype=acc, device=q.device) if initial_state is None
         else initial_state.to(acc))
    outs = []
    for t in range(T):
        qt, kt, vt = q[:, t].to(acc), k[:, t].to(acc), v[:, t].to(acc)  # [B, H, K|V]
        if loga is not None:
            S = S * loga[:, t].exp()[..., None, None]
        S = S + kt.unsqueeze(-1) * vt.unsqueeze(-2)
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", qt, S))
    o = torch.stack(outs, dim=1).to(q.dtype)
    return o, (S if output_final_state else None)


def linear_attention_chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
    log_decay: torch.Tensor | None = None, gate: torch.Tensor | None = None, scale: float | None = None,
    initial_state: torch.Tensor | None = None, output_final_state: bool = False, chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked linear attention in PyTorch; any T ≥ 1 (the tail chunk is zero-padded).

    Padding is harmless: padded tokens have k = v = 0 and log a = 0, so they leave the
    state unchanged and their outputs are dropped.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    scale = K**-0.5 if scale is None else scale
    acc = state_dtype(q)
    loga = log_decay_per_token(B, T, H, log_decay, gate, acc, q.device)
    n_chunks = -(-T // C)
    pad = n_chunks * C - T

    def chunks(x: torch.Tensor) -> torch.Tensor:  # [B, T, H, D] -> [B, H, N, C, D]
        x = F.pad(x.to(acc), (0, 0, 0, 0, 0, pad))
        return x.view(B, n_chunks, C, H, -1).permute(0, 3, 1, 2, 4)

    qc, kc, vc = chunks(q) * scale, chunks(k), chunks(v)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    scores = qc @ kc.transpose(-1, -2)  # [B, H, N, C, C]
    if loga is None:
        scores = scores.masked_fill(~causal, 0.0)
    else:
        G = chunks(loga.unsqueeze(-1)).squeeze(-1).cumsum(-1)  # [B, H, N, C]
        diff = (G.unsqueeze(-1) - G.unsqueeze(-2)).masked_fill(~causal, float("-inf"))
        scores = scores * diff.exp()
        q_decay = G.exp().unsqueeze(-1)  # exp(G_i): decay from chunk start to i
        k_decay = (G[..., -1:] - G).exp().unsqueeze(-1)  # exp(G_last - G_j)
        chunk_decay = G[..., -1].exp()  # exp(G_last) [B, H, N]
    o_intra = scores @ vc  # [B, H, N, C, V]

    S = (torch.zeros(B, H, K, V, dtype=acc, device=q.device) if initial_state is None
         else initial_state.to(acc))
    o_inter = []
    for n in range(n_chunks):
        qn, kn, vn = qc[:, :, n], kc[:, :, n], vc[:, :, n]
        if loga is None:
            o_inter.append(qn @ S)
            S = S + kn.transpose(-1, -2) @ vn
        else:
            o_inter.append((qn * q_decay[:, :, n]) @ S)
            S = chunk_decay[:, :, n, None, None] * S + (kn * k_decay[:, :, n]).transpose(-1, -2) @ vn
    o = o_intra + torch.stack(o_inter, dim=2)
    o = o.permute(0, 2, 3, 1, 4).reshape(B, n_chunks * C, H, V)[:, :T]
    return o.to(q.dtype).contiguous(), (S if output_final_state else None)
