"""Linear-Llama: a Llama decoder whose mixers are linear attention (L) or softmax attention (A).

    h = embed(tokens)
    for each block:  h = h + mixer(RMSNorm(h));  h = h + SwiGLU(RMSNorm(h))
    logits = head(RMSNorm(h))

The model sees only this rank's part of the sequence; `set_sequence_parallel` tells the
mixers how the sequence is split (LASP-2 for linear layers, positions for RoPE).
Embedding, blocks, final norm and head are separate attributes (blocks in a ModuleDict
keyed by global layer index) so that a pipeline stage can drop what it does not own.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import linear_attention
from models.config import ModelConfig
from parallel.context import SINGLE, SequenceParallel
from parallel.lasp2 import lasp2_linear_attention


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class SwiGLU(nn.Module):
    """down(silu(x W_gate) ⊙ x W_up)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def retnet_log_decay(n_heads: int) -> torch.Tensor:
    """λ_h = log(1 − 2^(−5−h)): per-head constant log decay (RetNet slopes)."""
    return torch.log1p(-torch.pow(2.0, -5.0 - torch.arange(n_heads, dtype=torch.float64))).float()


class LinearAttention(nn.Module):
    """Linear attention with per-head decay and an optional data-dependent gate (DESIGN §2)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.chunk_size = cfg.n_heads, cfg.head_dim, cfg.chunk_size
        self.q = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.k = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.v = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.o = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.g = nn.Linear(cfg.dim, cfg.n_heads, bias=False) if cfg.gate else None
        self.out_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        log_decay = retnet_log_decay(cfg.n_heads) if cfg.decay == "retnet" else None
        self.register_buffer("log_decay", log_decay, persistent=False)
        self.sp = SINGLE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = (proj(x).view(B, T, self.n_heads, self.head_dim) for proj in (self.q, self.k, self.v))
        gate = F.logsigmoid(self.g(x).float()) / 16 if self.g is not None else None
        if self.sp.world > 1:
            o = lasp2_linear_attention(q, k, v, log_decay=self.log_decay, gate=gate, group=self.sp.group,
                                       layout=self.sp.layout, chunk_size=self.chunk_size)
        else:
            o, _ = linear_attention(q, k, v, log_decay=self.log_decay, gate=gate, chunk_size=self.chunk_size)
        return self.o(self.out_norm(o).reshape(B, T, -1))


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding of x [B, T, H, D] at global `positions` [T] (rotate-half form)."""
    half = x.shape[-1] // 2
    freqs = theta ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions.to(torch.float32)[:, None] * freqs  # [T, D/2]
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class SoftmaxAttention(nn.Module):
    """Causal grouped-query attention with RoPE at global positions."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.rope_theta = cfg.rope_theta
        self.q = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.sp = SINGLE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k(x).view(B, T, self.kv_heads, self.head_dim)
        v = self.v(x).view(B, T, self.kv_heads, self.head_dim)
        pos = self.sp.positions(T, device=x.device)
        q, k = apply_rope(q, pos, self.rope_theta), apply_rope(k, pos, self.rope_theta)
        if self.sp.world > 1:
            o = sp_softmax_attention(q, k, v, self.sp)
        else:
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                enable_gqa=self.kv_heads != self.n_heads,
            ).transpose(1, 2)
        return self.o(o.reshape(B, T, -1))


def sp_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    try:
        from parallel.attention import sp_attention
    except ImportError as e:
        raise NotImplementedError(
            "softmax layers ('A') cannot run with sp > 1 yet; use a pure linear layout (model.layout=L) or sp=1"
        ) from e
    return sp_attention(q, k, v, method=sp.attention, group=sp.group, layout=sp.layout, causal=True)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, kind: str):
        super().__init__()
        self.kind = kind
        self.mixer_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mixer = LinearAttention(cfg) if kind == "L" else SoftmaxAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.dim, cfg.ffn_dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.mixer(self.mixer_norm(h))
        return h + self.mlp(self.mlp_norm(h))


class LinearLlama(nn.Module):
    """tokens [B, T_local] → logits [B, T_local, vocab]. Missing parts (None) pass their input on."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): Block(cfg, kind) for i, kind in enumerate(cfg.layer_kinds())})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; residual-output projections scaled by 1/√(2·n_layers)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("mixer.o.weight", "mlp.down.weight")):
                p.normal_(0.0, std / math.sqrt(2 * self.cfg.n_layers))
            else:
                p.normal_(0.0, std)

    def set_sequence_parallel(self, sp: SequenceParallel) -> None:
        """Run every mixer under the sequence-parallel split `sp`."""
        for block in self.layers.values():
            block.mixer.sp = sp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) if self.embed is not None else x
        for block in self.layers.values():
            h = block(h)
        if self.norm is not None:
            h = self.norm(h)
        return self.head(h) if self.head is not None else h


def num_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied weights once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Σ cross-entropy over the local tokens (fp32); divide by the global token count for the mean."""
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), reduction="sum")
