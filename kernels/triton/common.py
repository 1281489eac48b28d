"""Shared pieces of the chunked kernels: tile configuration, jit helpers, launch planning and the gate cumsum.

Kernels work on one head (b, h) of contiguous [B, T, H, D] tensors at a time (program index i_bh = b·H + h).
Log decays are kept in log2 units, so kernels exponentiate with exp2. The chunk-local cumulative decay of token i
(`g` in the kernels: the package docstring's G_i in log2 units),

    Σ_{τ ≤ i in its chunk} log2 a_τ = log2 e · Σ_{τ ≤ i in its chunk} (λ_h + gate_{τ,h}),

is formed in-kernel as (i + 1)·λ_h·log2 e under a constant decay and read from the [B·H, T] cumsum that
`_gate_cumsum_kernel` writes under a per-token gate. `Plan` fixes C (a power of two in [16, 128]), the NC
chunks, NCS chunks per segment, NS segments and the padded head dims of one call.

Module switches (set them on this module, they are read at call time): DEFAULT_CONFIG, the config of a call
that passes none; POISON_OUTPUTS, NaN-filled outputs (tests: unwritten elements show).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
_LOG2E: tl.constexpr = tl.constexpr(LOG2E)  # the same constant inside jit functions


@dataclass(frozen=True)
class TritonConfig:
    """Tile and launch parameters (tuned for H100/H200 at K = V = 128; any valid values work).

    seg_chunks: chunks per segment (L = seg_chunks · C tokens); bwd_chunk: chunk length of the
    backward kernels if smaller than C (0: same; fewer registers per program); fwd_bv: V-block of the output
    kernel; dq_bk: K-block of the dq kernel; dkdv_split: compute dk and dv in two launches
    (tiles [bk, V] and [K, bv]) instead of one with the full [K, V] state; state_bk/state_bv:
    tile of the segment-state kernel; chunk: chunk length C overriding the caller's chunk_size (0: keep it);
    tail_chunks: chunks between the exact tails ⟨S, dS⟩ at which the d log a suffix sums restart (rounded up to
    a power of two).
    """

    seg_chunks: int = 64
    bwd_chunk: int = 0
    fwd_bv: int = 64
    fwd_warps: int = 4
    dq_bk: int = 64
    dq_warps: int = 4
    dkdv_split: bool = True
    dkdv_bk: int = 64
    dkdv_bv: int = 64
    dkdv_warps: int = 4
    state_bk: int = 128
    state_bv: int = 128
    state_warps: int = 4
    num_stages: int = 2
    chunk: int = 0
    tail_chunks: int = 8


DEFAULT_CONFIG = TritonConfig()
#: Allocate every output with NaN instead of leaving it uninitialised (tests: unwritten elements show).
POISON_OUTPUTS = os.environ.get("LONGTRAIN_TRITON_POISON", "0") == "1"


def with_config(**kw) -> TritonConfig:
    """DEFAULT_CONFIG with some fields replaced (benchmarks and tests)."""
    return replace(DEFAULT_CONFIG, **kw)


def resolve_config(config: TritonConfig | None) -> TritonConfig:
    """The config of a call: `config`, or DEFAULT_CONFIG as it is at call time."""
    return config or DEFAULT_CONFIG


# ----------------------------------------------------------------------------------------------------
# jit helpers and the gate cumsum
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _chunk_decay(G, lam2, t0, T, offs_c, C: tl.constexpr, DECAY: tl.constexpr):
    """Chunk-local inclusive cumulative log2-decay g [C] (padding clamped to g_last) and g_last.

    DECAY: 0 none, 1 constant per head (g_i = (i+1)·λ₂), 2 per token (G holds the cumsum row).
    """
    n_valid = tl.minimum(T - t0, C)
    if DECAY == 2:
        g = tl.load(G + t0 + offs_c, mask=offs_c < n_valid, other=0.0)
        g_last = tl.load(G + t0 + n_valid - 1)
        g = tl.where(offs_c < n_valid, g, g_last)
    else:
        g = (tl.minimum(offs_c, n_valid - 1) + 1).to(tl.float32) * lam2
        g_last = n_valid.to(tl.float32) * lam2
    return g, g_last


@triton.jit
def _head_start(i_bh, T, H, D):
    """Offset of head (b, h) = divmod(i_bh, H) in a contiguous [B, T, H, D] tensor."""
    return (i_bh // H) * T * H * D + (i_bh % H) * D


@triton.jit
def _head_log2_decay(lam_ptr, i_bh, H, DECAY: tl.constexpr):
    """λ_h in log2 units under constant decay (DECAY 1); 0 otherwise."""
    lam2 = 0.0
    if DECAY == 1:
        lam2 = tl.load(lam_ptr + i_bh % H).to(tl.float32) * _LOG2E
    return lam2


@triton.jit
def _load_segment_state(buf, i_bh, i_s, NS, KV, tile, mask, BA: tl.constexpr, BB: tl.constexpr, LOAD: tl.constexpr):
    """Tile [BA, BB] of segment i_s's state in a [B·H, NS, K, V] fp32 buffer, or zeros if not LOAD."""
    if LOAD:
        S = tl.load(buf + (i_bh * NS + i_s) * KV + tile, mask=mask, other=0.0)
    else:
        S = tl.zeros([BA, BB], dtype=tl.float32)
    return S


@triton.jit
def _gate_cumsum_kernel(gate, lam_ptr, G, chunk_tot, T, H, NCP, C: tl.constexpr, HP: tl.constexpr):
    """One chunk of one batch row, all heads: G[b·H + h, t] = Σ_{τ ≤ t in the chunk} log2 a_τ with
    log a = gate + λ_h, and the chunk's total (G at its last token) into chunk_tot [B·H, NCP]."""
    i_c = tl.program_id(0)
    i_b = tl.program_id(1).to(tl.int64)
    offs_c = tl.arange(0, C)
    offs_h = tl.arange(0, HP)
    rows = i_c * C + offs_c
    mh = offs_h < H
    m = (rows < T)[:, None] & mh[None, :]
    x = tl.load(gate + (i_b * T + rows)[:, None] * H + offs_h[None, :], mask=m, other=0.0).to(tl.float32)
    x = tl.where(m, x + tl.load(lam_ptr + offs_h, mask=mh, other=0.0)[None, :], 0.0)
    g = tl.cumsum(x * _LOG2E, 0)
    tl.store(G + (i_b * H + offs_h)[None, :] * T + rows[:, None], g, mask=m)
    # padded rows add exact zeros, so the last row holds G at the chunk's last token
    tl.store(chunk_tot + (i_b * H + offs_h) * NCP + i_c, tl.sum(tl.where(offs_c[:, None] == C - 1, g, 0.0), 0),
             mask=mh)


# ----------------------------------------------------------------------------------------------------
# host side: allocation, planning, decay cumsums
# ----------------------------------------------------------------------------------------------------


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _arg(x: torch.Tensor | None, stand_in: torch.Tensor) -> torch.Tensor:
    """x, or a stand-in pointer for an optional tensor that the kernel's constexpr flags leave unread.

    A real tensor (never None) keeps every launch's signature, hence its compiled code, the same."""
    return x if x is not None else stand_in


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def _chunk_size(chunk_size: int) -> int:
    """Triton tiles need a power of two ≥ 16; the result does not depend on C, so round into [16, 128]."""
    return min(128, _pow2(chunk_size))


@dataclass
class Plan:
    """Sizes of one call: C chunk length, NC chunks, NCS chunks per segment, NS segments, Kp/Vp head dims padded
    to powers of two, the decay kind, the dot precision ("ieee" for fp32 inputs, else "tf32") and scale."""

    B: int
    T: int
    H: int
    K: int
    V: int
    C: int
    NC: int
    NCS: int
    NS: int
    Kp: int
    Vp: int
    decay: int  # 0 none, 1 per-head constant, 2 per token
    prec: str
    cfg: TritonConfig
    scale: float = 1.0


def _make_plan(q: torch.Tensor, v: torch.Tensor, decay: int, chunk_size: int, cfg: TritonConfig) -> Plan:
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = _chunk_size(cfg.chunk or chunk_size)
    NC = -(-T // C)
    NCS = max(1, cfg.seg_chunks)
    NS = -(-NC // NCS)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    return Plan(B, T, H, K, V, C, NC, NCS, NS, _pow2(K), _pow2(V), decay, prec, cfg)


def _log_decay_cumsum(p: Plan, lam: torch.Tensor, gate: torch.Tensor | None, device) -> tuple:
    """(G [B·H, T] chunk-local inclusive cumsum of log2 a, or a dummy; segment totals [B·H, NS] in log2).

    lam: λ [H] fp32 (`_lam_arg`)."""
    B, T, H, C, NC, NCS, NS = p.B, p.T, p.H, p.C, p.NC, p.NCS, p.NS
    if p.decay == 0:
        dummy = torch.zeros(1, dtype=torch.float32, device=device)
        return dummy, torch.zeros(B * H, NS, dtype=torch.float32, device=device)
    if p.decay == 1:
        # tokens per segment, built on the device (a setitem from a Python number would sync the stream)
        counts = (T - torch.arange(NS, device=device, dtype=torch.float32) * (NCS * C)).clamp(max=NCS * C)
        seg = (lam.view(1, H, 1) * LOG2E * counts.view(1, 1, NS)).expand(B, H, NS)
        return torch.zeros(1, dtype=torch.float32, device=device), seg.reshape(B * H, NS).contiguous()
    G = _empty((B * H, T), torch.float32, device)
    chunk_tot = torch.zeros(B * H, NS * NCS, dtype=torch.float32, device=device)  # chunks past the end: 0
    _gate_cumsum_kernel[(NC, B)](
        gate.detach().contiguous(), lam, G, chunk_tot, T, H, NS * NCS, C=C, HP=triton.next_power_of_2(H),
        num_warps=4)
    return G, chunk_tot.view(B * H, NS, NCS).sum(-1)


def _lam_arg(log_decay: torch.Tensor | None, H: int, device) -> torch.Tensor:
    """λ [H] fp32 (zeros without a per-head decay)."""
    if log_decay is None:
        return torch.zeros(H, dtype=torch.float32, device=device)
    return log_decay.detach().float().contiguous()


def setup(ctx, q: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor | None, gate: torch.Tensor | None,
          scale: float, chunk_size: int, cfg: TritonConfig) -> tuple[Plan, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plan, λ argument and log-decay cumsums of one call; records on ctx (an autograd Function's context whose
    inputs 3 and 4 are log_decay and gate) the dtypes the decay gradients take (None where none is needed)."""
    decay = 2 if gate is not None else (1 if log_decay is not None else 0)
    p = replace(_make_plan(q, v, decay, chunk_size, cfg), scale=scale)
    ctx.gate_dtype = gate.dtype if ctx.needs_input_grad[4] else None
    ctx.lam_dtype = log_decay.dtype if ctx.needs_input_grad[3] else None
    lam = _lam_arg(log_decay, p.H, q.device)
    G, seg_log2 = _log_decay_cumsum(p, lam, gate, q.device)
    return p, lam, G, seg_log2


def checked_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   scale: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Checked, contiguous q, k, v in q's dtype and the resolved scale."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    if T < 1:
        raise ValueError("the sequence is empty (T = 0)")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"triton backend supports fp16/bf16/fp32 inputs, got {q.dtype}")
    if K > 256 or V > 256:
        raise ValueError(f"head dims up to 256 are supported, got K={K}, V={V}")
    scale = K**-0.5 if scale is None else float(scale)
    return q.contiguous(), k.to(q.dtype).contiguous(), v.to(q.dtype).contiguous(), scale
