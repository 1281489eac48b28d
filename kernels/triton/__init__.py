"""Triton chunked linear attention with decay and gates: forward and backward (DESIGN §2).

Per (b, h), with row vectors q_t, k_t ∈ R^K, v_t ∈ R^V and log a_t = λ_h + g_{t,h} ≤ 0:

    S_t = a_t S_{t-1} + k_tᵀ v_t,        o_t = scale · q_t S_t.

**Chunks.** Tokens are cut into chunks of C. Inside a chunk G_i = Σ_{τ ≤ i} log a_τ (inclusive, fp32,
kept in log2 units so kernels use exp2; only differences of G, or G itself which is ≤ 0, are
exponentiated):

    o_i   = scale · [ Σ_{j ≤ i} e^{G_i − G_j} (q_i·k_j) v_j + e^{G_i} q_i S_in ]
    S_out = e^{G_last} S_in + Σ_j e^{G_last − G_j} k_jᵀ v_j

**Segments.** Chunks are grouped into segments of L = NCS·C tokens; only segment-boundary states
are stored (fp32 [B, H, NS, K, V], NS = ⌈T/L⌉ — 1/NCS of what per-chunk states would take, 1/64 by default):

1. ``_seg_state_kernel`` (parallel over segments): local state M_s = Σ_{j∈s} e^{Γ_s,last − Γ_s,j} k_jᵀ v_j.
2. ``_seg_scan_kernel`` (one parallel associative scan over segments, in place):
   S_in(s+1) = A_s S_in(s) + M_s, A_s = exp(Σ_{t∈s} log a_t).
3. ``_fwd_kernel`` (parallel over segments × V-blocks): loops over the segment's chunks carrying
   S in registers and writes o; the last segment writes the final state.

**Backward** (dS_t = ∂L/∂S_t; dS_out(s) = gradient of the state leaving segment s):

    dS_in  = e^{G_last} dS_out + scale Σ_i e^{G_i} q_iᵀ do_i
    dq_i   = scale [ Σ_{j ≤ i} e^{G_i − G_j} (do_i·v_j) k_j + e^{G_i} do_i S_inᵀ ]
    dk_j   = scale Σ_{i ≥ j} e^{G_i − G_j} (do_i·v_j) q_i + e^{G_last − G_j} v_j dS_outᵀ
    dv_j   = scale Σ_{i ≥ j} e^{G_i − G_j} (q_i·k_j) do_i + e^{G_last − G_j} k_j dS_out

1. ``_seg_state_kernel`` (q/do mode): D_s = scale Σ_{i∈s} e^{Γ_s,i} q_iᵀ do_i; reverse in-place scan
   dS_out(s−1) = A_s dS_out(s) + D_s from dS_out(NS−1) = dS_final.
2. ``_bwd_dq_kernel``: per segment, forward over chunks carrying S (from the saved S_in(s)).
3. ``_bwd_dkdv_kernel``: per segment, backward over chunks carrying dS; segment 0 ends with
   dS_init = dS_in(0).

No per-chunk state of the sequence is ever stored; the only whole-sequence tensors besides
inputs and gradients are the two [B, H, NS, K, V] boundary-state buffers (and, when a decay gradient
is needed, one state per tail block below: 1/8 of per-chunk states).

**Decay gradients.** With Γ_t the global cumulative log decay, o_t depends on +Γ_t through q_t and
every use of k_t v_t depends on −Γ_t, so ∂L/∂Γ_t = q_t·dq_t − k_t·dk_t (+ ⟨dS_final, S_final⟩ at the
last token), and ∂L/∂(log a_t) = Σ_{τ ≥ t} ∂L/∂Γ_τ. Scaling the state that leaves token t scales
everything after it, so the whole tail of that sum is one inner product, Σ_{τ > t} ∂L/∂Γ_τ =
⟨dS_t, S_t⟩. The suffix sums therefore restart at the end of every *tail block* b of TCS chunks
(`TritonConfig.tail_chunks`, 512 tokens by default), from the exact fp32 value there:

    d log a_t = Σ_{τ ≥ t, τ ∈ b} (q_τ·dq_τ − k_τ·dk_τ) + ⟨dS_out(b), S_out(b)⟩,
    dλ_h = Σ_{b,t} d log a_t,   dg_{t,h} = d log a_t.

The dq kernel stores S_out(b) (it carries S forward), the dk/dv kernel forms ⟨dS_out(b), S_out(b)⟩ when
its backward sweep reaches the block's end (the dv launch when dk and dv are split: it has registers to
spare), and ``_dloga_kernel`` takes the suffix sums in float64 and writes d gate in [B, T, H]. Blocks are
aligned so that the last chunk is a block of its own: a gradient arriving on the final state is large,
and its rounding errors stay inside that chunk.
Without the restarts the per-token terms would cancel over the whole segment: each chunk's inter-chunk
share carries a bf16 rounding of S (in dq) and dS (in dk), and those errors add up like a random walk
(d gate error ∝ √block length: 3.4e-3 at 128 tokens, 5.2e-3 at 512, 6.6e-3 at 1024, > 1e-2 at 4096).

dλ sums all T of them (it cancels 50-150× more), so there the terms must be *consistent* with the state
recurrences, not merely accurate: per chunk Σ_i q_i·dq_i^inter − Σ_j k_j·dk_j^inter must telescope
into ⟨S_in, dS_in⟩ − ⟨S_out, dS_out⟩. The recurrences use the bf16 operands (dO ⊙ wq) and (V ⊙ wk);
the inter-chunk terms therefore use the same operands and the fp32 state split as S = S_hi + S_lo
(two bf16 dots, "HILO") whenever dλ is required, and the intra-chunk share is taken from the fp32
products M = (Q Kᵀ) ⊙ (dO Vᵀ) ⊙ D ("EXACT"). Without this, bf16 rounding of S makes dλ wrong by O(1)
at T = 1000. d gate alone (λ fixed, as in the models) skips both.

**Modules**, one per stage: ``common`` (TritonConfig, shared jit helpers, launch planning, gate cumsum),
``segment`` (segment states and scans), ``forward`` (outputs), ``backward`` (dq, dk/dv, d log a) and
``function`` (the autograd Function and `linear_attention_triton`). The stage functions exported here are
what the sequence-sharded form (LASP-2, `parallel.lasp2_triton`) is built from; kernels know nothing of sharding.
"""

from kernels.triton.backward import chunk_backward
from kernels.triton.common import (
    DEFAULT_CONFIG,
    LOG2E,
    Plan,
    TritonConfig,
    checked_inputs,
    resolve_config,
    setup,
    with_config,
)
from kernels.triton.forward import chunk_forward
from kernels.triton.function import linear_attention_triton
from kernels.triton.segment import scan_segments, segment_states

__all__ = [
    "DEFAULT_CONFIG", "LOG2E", "Plan", "TritonConfig", "checked_inputs", "chunk_backward", "chunk_forward",
    "linear_attention_triton", "resolve_config", "scan_segments", "segment_states", "setup", "with_config",
]
