"""Gated delta rule in plain PyTorch (DESIGN §12): the step-by-step recurrence and the chunked WY / UT form.

Per batch row b and head h, with row vectors q_t, k_t ∈ R^K, v_t ∈ R^V, β_t ∈ (0, 1) and
log a_t = λ_h + g_{t,h} ≤ 0:

    S_t = a_t (I − β_t k_tᵀ k_t) S_{t−1} + β_t k_tᵀ v_t        S ∈ R^{K×V},  S_{−1} = S_init (default 0)
    o_t = scale · q_t S_t

`delta_rule_recurrent` runs it token by token (the test oracle; float64 inputs keep a float64 state).

**Chunked form** (`delta_rule_chunked`, the CPU path). Write the update as S_t = a_t S_{t−1} + k_tᵀ U_t with
the "new value" U_t = β_t (v_t − k_t · a_t S_{t−1}). Inside a chunk of C tokens entering with state S, let
G_i = Σ_{τ ≤ i} log a_τ (inclusive, chunk-local), Γ_i = e^{G_i}, γ = Γ_last, and D_ij = [i ≥ j] e^{G_i − G_j}.
Then a_t S_{t−1} = Γ_t S + Σ_{j<t} e^{G_t − G_j} k_jᵀ U_j, so the U_t solve one unit lower-triangular system

    (I + A) U = diag(β) V − diag(β Γ) K S,      A_ij = [i > j] β_i e^{G_i − G_j} (k_i·k_j)

and with the UT transform T = (I + A)⁻¹ (one triangular solve per chunk, independent of S):

    W = T diag(β Γ) K,   u = T diag(β) V,   U = u − W S                       (WY representation)
    O     = scale · [ diag(Γ) Q S + (Q Kᵀ ⊙ D) U ]
    S_out = γ S + (diag(γ/Γ) K)ᵀ U

Every exponent is a difference G_i − G_j with i ≥ j, or G itself (≤ 0). The map S ↦ S_out is affine,
S_out = P S + M with P = γ I − (diag(γ/Γ) K)ᵀ W and M = (diag(γ/Γ) K)ᵀ u; composed over a shard it is the
summary (P_c, M_c) that LASP-2 exchanges (`delta_rule_summary`). Both functions are plain autograd code,
differentiable in every input, a gradient on the final state included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.reference import log_decay_per_token, state_dtype

__all__ = ["delta_rule_recurrent", "delta_rule_chunked", "delta_rule_summary"]


def delta_rule_recurrent(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *,
    log_decay: torch.Tensor | None = None, gate: torch.Tensor | None = None, scale: float | None = None,
    initial_state: torch.Tensor | None = None, output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token gated delta rule; O(T) Python steps — for tests only."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    acc = state_dtype(q)
    loga = log_decay_per_token(B, T, H, log_decay, gate, acc, q.device)
    S = torch.zeros(B, H, K, V, dtype=acc, device=q.device) if initial_state is None else initial_state.to(acc)
    outs = []
    for t in range(T):
        qt, kt, vt, bt = q[:, t].to(acc), k[:, t].to(acc), v[:, t].to(acc), beta[:, t].to(acc)[..., None]
        if loga is not None:
            S = S * loga[:, t].exp()[..., None, None]
        kS = torch.einsum("bhk,bhkv->bhv", kt, S)
        S = S + kt.unsqueeze(-1) * (bt * (vt - kS)).unsqueeze(-2)
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", qt, S))
    o = torch.stack(outs, dim=1).to(q.dtype)
    return o, (S if output_final_state else None)


class _Chunks:
    """Per-chunk factors of the chunked form, [B, H, N, C, ·] in the accumulation dtype (padding: k = v = β = 0,
    log a = 0, which leaves the state unchanged)."""

    def __init__(self, k, v, beta, log_decay, gate, chunk_size: int):
        B, T, H, K = k.shape
        C = chunk_size
        self.acc = acc = state_dtype(k)
        self.n, self.pad, self.shape = -(-T // C), -(-T // C) * C - T, (B, T, H)
        self.k, vc = self.chunks(k), self.chunks(v)
        b = self.chunks(beta.unsqueeze(-1)).squeeze(-1)  # [B, H, N, C]
        loga = log_decay_per_token(B, T, H, log_decay, gate, acc, k.device)
        G = self.chunks(loga.unsqueeze(-1)).squeeze(-1).cumsum(-1) if loga is not None else \
            torch.zeros_like(b)
        causal = torch.ones(C, C, dtype=torch.bool, device=k.device).tril()
        self.D = (G.unsqueeze(-1) - G.unsqueeze(-2)).masked_fill(~causal, float("-inf")).exp()  # [i ≥ j] e^{Gi−Gj}
        self.Gam = G.exp()  # Γ_i
        self.gam = self.Gam[..., -1]  # γ = Γ_last [B, H, N]
        self.k_out = self.k * (G[..., -1:] - G).exp().unsqueeze(-1)  # diag(γ/Γ) K
        A = (b.unsqueeze(-1) * (self.k @ self.k.transpose(-1, -2)) * self.D).tril(-1)
        rhs = torch.cat([self.k * (b * self.Gam).unsqueeze(-1), vc * b.unsqueeze(-1)], dim=-1)
        eye = torch.eye(C, dtype=acc, device=k.device)
        Wu = torch.linalg.solve_triangular(A + eye, rhs, upper=False, unitriangular=True)
        self.W, self.u = Wu[..., :K], Wu[..., K:]

    def chunks(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, H, D] → [B, H, N, C, D]
        B, T, H = self.shape
        x = F.pad(x.to(self.acc), (0, 0, 0, 0, 0, self.pad))
        return x.view(B, self.n, -1, H, x.shape[-1]).permute(0, 3, 1, 2, 4)


def delta_rule_chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *,
    log_decay: torch.Tensor | None = None, gate: torch.Tensor | None = None, scale: float | None = None,
    initial_state: torch.Tensor | None = None, output_final_state: bool = False, chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked gated delta rule (WY / UT form) in PyTorch; any T ≥ 1 (the tail chunk is zero-padded)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    c = _Chunks(k, v, beta, log_decay, gate, chunk_size)
    qc = c.chunks(q) * scale
    scores = (qc @ c.k.transpose(-1, -2)) * c.D  # [B, H, N, C, C]
    q_in = qc * c.Gam.unsqueeze(-1)
    S = torch.zeros(B, H, K, V, dtype=c.acc, device=q.device) if initial_state is None else initial_state.to(c.acc)
    outs = []
    for n in range(c.n):
        U = c.u[:, :, n] - c.W[:, :, n] @ S
        outs.append(q_in[:, :, n] @ S + scores[:, :, n] @ U)
        S = c.gam[:, :, n, None, None] * S + c.k_out[:, :, n].transpose(-1, -2) @ U
    o = torch.stack(outs, dim=2).permute(0, 2, 3, 1, 4).reshape(B, c.n * chunk_size, H, V)[:, :T]
    return o.to(q.dtype).contiguous(), (S if output_final_state else None)


def delta_rule_summary(
    k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *, log_decay: torch.Tensor | None = None,
    gate: torch.Tensor | None = None, chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine map of the whole sequence, S_final = P S_init + M: (P [B, H, K, K], M [B, H, K, V]) in the
    accumulation dtype. P = Π_t a_t (I − β_t k_tᵀ k_t) (latest first), M the final state from a zero start."""
    B, T, H, K = k.shape
    c = _Chunks(k, v, beta, log_decay, gate, chunk_size)
    P = torch.eye(K, dtype=c.acc, device=k.device).expand(B, H, K, K)
    M = torch.zeros(B, H, K, v.shape[-1], dtype=c.acc, device=k.device)
    for n in range(c.n):
        kt, W, g = c.k_out[:, :, n].transpose(-1, -2), c.W[:, :, n], c.gam[:, :, n, None, None]
        P = g * P - kt @ (W @ P)
        M = g * M + kt @ (c.u[:, :, n] - W @ M)
    return P, M
