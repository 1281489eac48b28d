"""Shared pieces of the delta-rule kernels: configuration, launch planning and the per-chunk jit helpers.

Kernels work on one head (b, h) of contiguous [B, T, H, D] tensors (program index i_bh = b·H + h) and keep log
decays in log2 units (exp2), as the linear-attention kernels do; the chunk-local cumulative log decay g
(`kernels.triton.common._chunk_decay`) and the gate cumsum are theirs. Per chunk of C tokens (log2 units):

    D_ij = [i ≥ j] 2^{g_i − g_j},    A_ij = [i > j] β_i D_ij (k_i·k_j),    T = (I + A)⁻¹

`_unit_lower_inverse` forms T by block forward substitution in log2 C doubling steps of two [C, C] dots: exact,
every product of bounded blocks (a Neumann or repeated-squaring series would pass through powers of A whose
entries grow like binomials when keys repeat).
Module switch: DEFAULT_CONFIG, the config of a call that passes none.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from kernels.triton.common import Plan, _lam_arg, _log_decay_cumsum, _pow2


@dataclass(frozen=True)
class DeltaConfig:
    """Tile and launch parameters (any valid values give the same result up to rounding).

    chunk: C (a power of two in [16, 64]); seg_chunks: chunks per segment, 0 = enough segments for about
    `target_programs` (b, h, segment) programs; prep_bn: column block of W and u; sweep_bv: V-block (state
    columns) of the chunk sweeps; grad_bv: V-block of the gradient kernel's loops; grad_programs: its persistent
    programs (each walks chunks and owns a [C, C] scratch); grad_block_k: 0 = `_grad_kernel` (all of K at once,
    T solved again), > 0 = `_grad_kb_kernel` in K blocks of that width (a power of two ≥ 16; Tᵀ from the
    backward's `_prep_kernel` through a transient [B·H, NC, C, C] buffer, fp32 unless wy_16bit; K blocks under 64
    at chunk 64 are refused on sm_90, see `check_config`); scan_bn: column block of the segment scans.
    solve_passes: tf32 products per dot of the UT transform's inverse for 16-bit inputs, 1 (default; sm_90: 250
    registers and no spill in `_prep_kernel` at chunk 64; H200: 1.2–1.4× faster forward+backward than 3, the same
    error against the fp32 reference, benchmarks/RESULTS.md) or 3 (tf32x3: 624 bytes spilled); fp32 inputs always
    solve in IEEE fp32.
    solve_block: 16 (default) or 32 = `_prep_kernel` inverts T's diagonal blocks of that size first, batched
    (`_unit_lower_inverse_blocked`), then doubles over whole tiles from there (two of five steps on whole tiles at
    chunk 64); 0 = every doubling step over whole [C, C] tiles (log2 C steps of two C³ products). With prep_warps=4
    (184 → 158 registers: two programs per SM) the H200 ran a bf16 forward+backward 1.24× (16×4K) and 1.20× (1×128K)
    faster than solve_block 0 with 8 warps, the same error.
    out_split: outputs from a chunk-parallel kernel (`_out_kernel`, V-blocks of out_bv) after a sweep that only
    carries the state and writes every chunk's entering state and U (a [B·H, NC, K, V] transient in the forward);
    off: the sweep computes the outputs as it goes (no per-chunk transient). grad_split: the gradient in two
    kernels (`_grad_qk_kernel`: dq, dk's state and attention shares, dW; `_grad_wy_kernel`: through T — dv, dβ,
    the rest of dk), K in blocks of grad_block_k (0: 64), Tᵀ from the backward's `_prep_kernel`; each holds a few
    [C, C] and [C, BK] tiles, where `_grad_kernel` holds all of them at once. bwd_split: the chunk-local share
    of dU, scale (Q Kᵀ ⊙ D)ᵀ dO, from a chunk-parallel kernel (`_du_local_kernel`, a [B, T, H, V] transient) before
    the backward sweeps, which then skip two of their five products per chunk. The three split switches are on by
    default (H200, bf16: 1.5–1.9× faster forward+backward than all three off, the fused path); `fused_config()`
    turns them off. window_tokens: 0 = every stage over the whole [B, T] call; > 0 = the stages whose transients
    are per chunk (the out_split forward's states, the backward's W, u, Tᵀ, chunk states, dS, U, dU) run on one
    batch row and about window_tokens tokens (whole segments) at a time, segments sized so that one window still
    has about target_programs (h, segment) programs: those transients shrink from the call's size to a window's
    (peak memory at long T), at the cost of one more UT transform and dU local share per window in the backward.
    wy_16bit: for 16-bit inputs, the backward's `_prep_kernel` hands every chunk's Tᵀ to the gradient kernel in the
    input dtype (the transient [B·H, NC, C, C] buffer halves; T rounded to 16 bits, as the forward's W = T diag(βΓ) K
    and u = T diag(β) V already use it), and the products through T that ran on fp32 operands (tf32) there,
    Tᵀ dW and the chain dAᵀ = −T dTᵀ T (its intermediate rounded to 16 bits), run on 16-bit operands with fp32
    accumulation (`_grad_wy_kernel` with grad_split, `_grad_kb_kernel` with grad_block_k > 0), as
    flash-linear-attention's WY backward does: twice the tensor-core rate of tf32 and half the operand registers
    (on by default: H200, bf16, the same error against the fp32 reference, forward+backward 1.06× faster at 1×128K
    and 1.07× at 16×4K, benchmarks/RESULTS.md, seventeenth session). Off: Tᵀ in fp32 and those products on tf32.
    fp32 inputs keep the fp32 path either way;
    `_grad_kernel` (grad_block_k 0 without grad_split) solves its T in registers and ignores the field.
    wy_kernel (grad_split only): the second gradient kernel, 0 (default, auto) = 2 for bf16 inputs and 1 for fp16
    and fp32 ones (`backward.wy_kernel`), 1 = `_grad_wy_kernel` (persistent,
    grad_programs programs of split_warps warps, R + Rᵀ through a per-program global scratch, K Kᵀ formed for dβ and
    ∂L/∂G) or 2 = `_grad_wy2_kernel`: the same quantities, one program of wy_warps warps per (chunk, b·h) as
    flash-linear-attention's WY backward, no scratch (Rᵀ K as the transpose of Kᵀ R, a product that feeds only the
    store), Tᵀ read once, the dβ and ∂L/∂G shares from the [C, BK] products instead of a K Kᵀ product. wy_warps,
    wy_block, wy_stages: `_grad_wy2_kernel`'s num_warps, its K and V blocks (a power of two ≥ 16, at most K and V
    padded) and num_stages. ptxas for sm_90, bf16, K = V = 128, chunk 64, no spill anywhere: `_grad_wy_kernel` 244
    registers at 8 warps (one program per SM); `_grad_wy2_kernel` 252 at 4 warps, blocks of 64 (two programs per SM),
    128 at 8 warps, blocks of 32 (two per SM), 166 at 4 warps, blocks of 32, one stage (three per SM). H200, bf16, H 16,
    K = V 128 (benchmarks/RESULTS.md, seventeenth session): `_grad_wy2_kernel` 2.35 ms at 1×128K where
    `_grad_wy_kernel` took ≈ 4.2; forward+backward 21.95 → 19.95 ms (1×128K) and 8.91 → 7.88 ms (16×4K), the same
    error; at 8 warps 21.71 / 8.78. Blocks of 32 at chunk 64 are the tiles with which `_grad_kb_kernel` dies on sm_90
    (`check_config`), not refused here but untried on a GPU.
    """

    chunk: int = 64
    seg_chunks: int = 0
    target_programs: int = 256
    prep_bn: int = 64
    prep_warps: int = 4
    sweep_bv: int = 64
    sweep_warps: int = 8
    grad_bv: int = 64
    grad_warps: int = 8
    grad_programs: int = 1024
    grad_block_k: int = 0
    scan_bn: int = 32
    scan_warps: int = 8
    num_stages: int = 2
    solve_passes: int = 1
    solve_block: int = 16
    out_split: bool = True
    out_bv: int = 64
    out_warps: int = 4
    grad_split: bool = True
    bwd_split: bool = True
    split_warps: int = 8
    window_tokens: int = 0
    wy_16bit: bool = True
    wy_kernel: int = 0
    wy_warps: int = 4
    wy_block: int = 64
    wy_stages: int = 2


DEFAULT_CONFIG = DeltaConfig()


def with_config(**kw) -> DeltaConfig:
    """DEFAULT_CONFIG with some fields replaced (benchmarks and tests)."""
    return replace(DEFAULT_CONFIG, **kw)


FUSED = dict(out_split=False, grad_split=False, bwd_split=False)  # the fused sweeps and gradient kernel


def fused_config() -> DeltaConfig:
    """DEFAULT_CONFIG at call time with the split paths off: outputs from the forward sweep, dU's local share inside
    the backward sweeps and every gradient from one kernel (`_grad_kernel`, or `_grad_kb_kernel`)."""
    return with_config(**FUSED)


@triton.jit
def _tok_tile(ptr, i_bh, T, H, D: tl.constexpr, t0, c0, BR: tl.constexpr, BC: tl.constexpr):
    """(pointers, mask) of rows [t0, t0 + BR) and columns [c0, c0 + BC) of head i_bh = b·H + h (int64) of a
    contiguous [B, T, H, D] tensor: the head's and the rows' offset is one int64 scalar, the tile's offsets int32."""
    r = tl.arange(0, BR)
    c = c0 + tl.arange(0, BC)
    base = ptr + ((i_bh // H) * T + t0) * (H * D) + (i_bh % H) * D
    return base + r[:, None] * (H * D) + c[None, :], ((t0 + r) < T)[:, None] & (c < D)[None, :]


@triton.jit
def _state_tile(ptr, index, K: tl.constexpr, N: tl.constexpr, n0, BK: tl.constexpr, BN: tl.constexpr):
    """(pointers, mask) of rows [0, BK) and columns [n0, n0 + BN) of the [K, N] matrix number `index` (int64)."""
    r = tl.arange(0, BK)
    c = n0 + tl.arange(0, BN)
    return ptr + index * (K * N) + r[:, None] * N + c[None, :], (r < K)[:, None] & (c < N)[None, :]


@triton.jit
def _load_tok(ptr, i_bh, T, H, D: tl.constexpr, t0, c0, BR: tl.constexpr, BC: tl.constexpr):
    """The `_tok_tile` tile, loaded (zeros outside the tensor)."""
    p, m = _tok_tile(ptr, i_bh, T, H, D, t0, c0, BR, BC)
    return tl.load(p, mask=m, other=0.0)


@triton.jit
def _load_state(ptr, index, K: tl.constexpr, N: tl.constexpr, n0, BK: tl.constexpr, BN: tl.constexpr):
    """The `_state_tile` tile, loaded (zeros outside the matrix)."""
    p, m = _state_tile(ptr, index, K, N, n0, BK, BN)
    return tl.load(p, mask=m, other=0.0)


@triton.jit
def _state_rows(ptr, index, K: tl.constexpr, N: tl.constexpr, k0, n0, BK: tl.constexpr, BN: tl.constexpr):
    """(pointers, mask) of rows [k0, k0 + BK) and columns [n0, n0 + BN) of the [K, N] matrix number `index`."""
    r = k0 + tl.arange(0, BK)
    c = n0 + tl.arange(0, BN)
    return ptr + index * (K * N) + r[:, None] * N + c[None, :], (r < K)[:, None] & (c < N)[None, :]


@triton.jit
def _load_state_rows(ptr, index, K: tl.constexpr, N: tl.constexpr, k0, n0, BK: tl.constexpr, BN: tl.constexpr):
    """The `_state_rows` tile, loaded (zeros outside the matrix)."""
    p, m = _state_rows(ptr, index, K, N, k0, n0, BK, BN)
    return tl.load(p, mask=m, other=0.0)


@triton.jit
def _decay_matrix(g, offs_c, STRICT: tl.constexpr):
    """[i ≥ j] 2^{g_i − g_j} ([i > j] if STRICT); the masked exponent is −inf, so nothing overflows."""
    if STRICT:
        m = offs_c[:, None] > offs_c[None, :]
    else:
        m = offs_c[:, None] >= offs_c[None, :]
    return tl.exp2(tl.where(m, g[:, None] - g[None, :], float("-inf")))


@triton.jit
def _unit_lower_inverse(A, C: tl.constexpr, LOG2C: tl.constexpr, PREC: tl.constexpr):
    """(I + A)⁻¹ of a strictly lower [C, C] fp32 tile by block doubling: with T_s the inverse of the block-diagonal
    part of I + A in blocks of s, T_2s = T_s − T_s A_s T_s, A_s the (2, 1) sub-blocks of A's 2s-blocks — each step
    is exact block forward substitution ([[T11, 0], [−T22 A21 T11, T22]]), so every product is of bounded blocks."""
    offs = tl.arange(0, C)
    lower = offs[:, None] > offs[None, :]
    pairs = lower & (offs[:, None] // 2 == offs[None, :] // 2)
    Tm = tl.where(offs[:, None] == offs[None, :], 1.0, 0.0) - tl.where(pairs, A, 0.0)  # blocks of 2: I − A21
    return _doubling_steps(Tm, A, C, 1, LOG2C, PREC)


@triton.jit
def _doubling_steps(Tm, A, C: tl.constexpr, FIRST: tl.constexpr, LOG2C: tl.constexpr, PREC: tl.constexpr):
    """The doubling steps FIRST … LOG2C − 1 on whole [C, C] tiles: Tm, the inverse of I + A's block diagonal in
    blocks of 2^FIRST, becomes (I + A)⁻¹ (`_unit_lower_inverse`)."""
    offs = tl.arange(0, C)
    lower = offs[:, None] > offs[None, :]
    for lvl in tl.static_range(FIRST, LOG2C):
        s = 1 << lvl
        block = offs // (2 * s)
        off = lower & (block[:, None] == block[None, :]) & (offs[:, None] // s != offs[None, :] // s)
        Tm = Tm - tl.dot(tl.dot(Tm, tl.where(off, A, 0.0), input_precision=PREC), Tm, input_precision=PREC)
    return Tm


@triton.jit
def _unit_lower_inverse_blocked(A, C: tl.constexpr, LOG2C: tl.constexpr, BS: tl.constexpr, LOG2BS: tl.constexpr,
                                PREC: tl.constexpr):
    """`_unit_lower_inverse` with the diagonal [BS, BS] blocks inverted first, all C/BS of them in one batched
    [C/BS, BS, BS] product chain (the doubling steps below BS, on BS³ instead of C³ products each), then the block
    diagonal laid out as a [C, C] tile for the doubling steps from BS up. Same steps, same result up to rounding."""
    NB: tl.constexpr = C // BS
    offs = tl.arange(0, BS)
    blk = tl.arange(0, NB)
    same = blk[:, None, None, None] == blk[None, None, :, None]  # [NB, 1, NB, 1]
    Ab = tl.sum(tl.where(same, tl.reshape(A, [NB, BS, NB, BS]), 0.0), axis=2)  # the diagonal blocks [NB, BS, BS]
    lower = offs[:, None] > offs[None, :]
    pairs = lower & (offs[:, None] // 2 == offs[None, :] // 2)
    Tb = tl.where(offs[:, None] == offs[None, :], 1.0, 0.0)[None, :, :] - tl.where(pairs[None, :, :], Ab, 0.0)
    for lvl in tl.static_range(1, LOG2BS):
        s = 1 << lvl
        block = offs // (2 * s)
        off = lower & (block[:, None] == block[None, :]) & (offs[:, None] // s != offs[None, :] // s)
        Tb = Tb - tl.dot(tl.dot(Tb, tl.where(off[None, :, :], Ab, 0.0), input_precision=PREC), Tb,
                         input_precision=PREC)
    Tm = tl.reshape(tl.where(same, Tb[:, :, None, :], 0.0), [C, C])
    return _doubling_steps(Tm, A, C, LOG2BS, LOG2C, PREC)


@triton.jit
def _ut_transform(bk, b, g, offs_c, C: tl.constexpr, LOG2C: tl.constexpr, DECAY: tl.constexpr,
                  PREC: tl.constexpr, SOLVE: tl.constexpr, SOLVE_BLOCK: tl.constexpr, LOG2SB: tl.constexpr):
    """(T, A, D, K Kᵀ) of one chunk: k [C, BK] (padded rows 0), β [C] fp32 (padded 0), g its log2 decay; SOLVE is
    the precision of the inverse's dots (`solve_precision`); SOLVE_BLOCK > 0: `_unit_lower_inverse_blocked` with
    diagonal blocks of that size (a power of two, 16 ≤ SOLVE_BLOCK < C; LOG2SB its log2)."""
    kk = tl.dot(bk, tl.trans(bk), input_precision=PREC)
    if DECAY == 0:
        D = tl.where(offs_c[:, None] >= offs_c[None, :], 1.0, 0.0)
    else:
        D = _decay_matrix(g, offs_c, False)
    A = tl.where(offs_c[:, None] > offs_c[None, :], b[:, None] * kk * D, 0.0)
    if SOLVE_BLOCK > 0:
        Tm = _unit_lower_inverse_blocked(A, C, LOG2C, SOLVE_BLOCK, LOG2SB, SOLVE)
    else:
        Tm = _unit_lower_inverse(A, C, LOG2C, SOLVE)
    return Tm, A, D, kk


def solve_precision(prec: str, cfg: DeltaConfig) -> str:
    """The inverse's dot precision: IEEE for fp32 inputs; else tf32x3 (three tf32 products per dot: T's entries
    grow to O(C), and one tf32 pass keeps 10 bits of them) or, with cfg.solve_passes = 1, one tf32 pass."""
    if prec == "ieee":
        return "ieee"
    return "tf32x3" if cfg.solve_passes == 3 else "tf32"


def solve_block(cfg: DeltaConfig, C: int) -> int:
    """The diagonal blocks `_prep_kernel` inverts first (cfg.solve_block rounded to a power of two ≥ 16), or 0 for
    the doubling over whole [C, C] tiles (solve_block 0, or blocks as large as the chunk)."""
    if cfg.solve_block <= 0:
        return 0
    sb = max(16, _pow2(cfg.solve_block))
    return sb if sb < C else 0


def _chunk_size(chunk: int) -> int:
    """A power of two in [16, 64] (tiles need ≥ 16; the [C, C] solve grows as C²)."""
    return min(64, _pow2(chunk))


def check_config(cfg: DeltaConfig, C: int, Kp: int, arch: tuple[int, int] | None) -> None:
    """Refuse, in one line naming the fix, a config whose kernels are known to fail where they would run (C: the
    chunk, Kp: K padded, arch: the CUDA device's compute capability, None off CUDA).

    `_grad_kb_kernel` with K blocks under 64 at chunk 64 dies on sm_90 with an illegal memory access (H200, Triton
    3.6: `bf16-grad-kb32`, K blocks of 32, grad_bv 32). Not an index bug: every load and store of the kernel is in
    bounds (test_delta_rule.py checks each one under the interpreter at those tiles), so most likely Triton's sm_90
    code for those tiles (upstream reports: Hopper wgmma shared-memory reads out of bounds in chunk-64 kernels with K
    blocks of 32, from Triton 3.6; not confirmed on the GPU). K blocks of 64 at chunk 32 pass there. Elsewhere
    (interpreter, meta tensors, other GPUs) nothing is refused."""
    if cfg.solve_passes not in (1, 3):
        raise ValueError(f"DeltaConfig solve_passes={cfg.solve_passes}: use 3 (tf32x3) or 1 (one tf32 pass)")
    if cfg.wy_kernel not in (0, 1, 2):
        raise ValueError(f"DeltaConfig wy_kernel={cfg.wy_kernel}: use 1 (_grad_wy_kernel) or 2 (_grad_wy2_kernel), "
                         "or 0 (auto: 2 for bf16 inputs, 1 otherwise)")
    if cfg.grad_block_k <= 0 or C < 64 or arch is None or arch[0] != 9:
        return
    bk = min(Kp, _pow2(cfg.grad_block_k))
    if bk < 64:
        raise ValueError(f"DeltaConfig grad_block_k={cfg.grad_block_k} (K blocks of {bk}) at chunk {C}: "
                         f"_grad_kb_kernel hits an illegal memory access on sm_90 (Triton's code, not its "
                         f"indexing): use grad_block_k=64 (K ≥ 64) or 0, or chunk_size ≤ 32")


def make_plan(q: torch.Tensor, v: torch.Tensor, decay: int, scale: float, cfg: DeltaConfig,
              chunk_size: int | None = None) -> Plan:
    """The sizes of one call (the linear-attention kernels' `Plan`; cfg is a DeltaConfig here); refuses a config
    that `check_config` knows to fail on q's device."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = _chunk_size(chunk_size or cfg.chunk)
    check_config(cfg, C, _pow2(K), torch.cuda.get_device_capability(q.device) if q.is_cuda else None)
    NC = -(-T // C)
    if cfg.seg_chunks > 0:
        NCS = cfg.seg_chunks
    elif cfg.window_tokens > 0:  # about target_programs (h, segment) programs within one window of one row
        want = -(-cfg.target_programs // H)
        NCS = max(16, -(-min(NC, max(1, cfg.window_tokens // C)) // want))
    else:  # one segment when the heads alone fill the device; otherwise about target_programs programs
        want = -(-cfg.target_programs // (B * H))
        NCS = max(16, -(-NC // want))
    NCS = min(NCS, NC)
    NS = -(-NC // NCS)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    return Plan(B, T, H, K, V, C, NC, NCS, NS, _pow2(K), _pow2(V), decay, prec, cfg, scale)


def decay_inputs(p: Plan, log_decay: torch.Tensor | None, gate: torch.Tensor | None, device) -> tuple:
    """(λ [H] fp32, G [B·H, T] chunk-local inclusive cumsum of log2 a, or a dummy when there is no gate)."""
    lam = _lam_arg(log_decay, p.H, device)
    G, _ = _log_decay_cumsum(p, lam, gate, device)
    return lam, G


def state_dtype(x: torch.Tensor) -> torch.dtype:
    """Dtype of the per-token and per-chunk intermediates (W, u, U, dU, chunk states): x's when 16-bit, else fp32."""
    return x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float32
