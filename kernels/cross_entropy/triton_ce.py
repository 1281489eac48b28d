"""Triton chunk cross-entropy: per-row loss and, in place, ∂loss/∂logits = softmax − onehot.

One program per row i of the logits z [n, V] (any dtype the GEMM wrote: bf16/fp16/fp32; fp32 arithmetic inside),
target t = t_i:

    pass 1:  m, s with  m = max_v z_v,  s = Σ_v exp(z_v − m)       (online over BLOCK_V tiles:
             m' = max(m, max(tile)),  s' = s·exp(m − m') + Σ exp(tile − m'))
             loss_i = m + log s − z_t                              (0 for t = ignore_index)
    pass 2:  z_v ← exp(z_v − m)/s − [v = t]   in z's dtype          (only with grad; 0 for ignored rows)

z_t is read with one scalar load before the row is overwritten. Rows of ignored targets read nothing (pass 1's
loop is empty, pass 2 only writes zeros). A valid target outside [0, V) gives a NaN loss (never an
out-of-bounds read). Row offsets are int64 (n·V passes 2^31 from 67109 rows at V = 32000, or at larger vocabularies);
offsets within a row int32.
Per-row losses go to an fp32 [n] buffer that torch sums.

When V ≤ ``CONFIG.row_max`` the whole row is one register tile of next_pow2(V): it is read once and written
once. Otherwise it is read twice (the second read often from L2) and written once: for bf16 at 8192 × 32000
that is ≈ 1.5 GB of traffic per chunk instead of the eager path's ≈ 10 passes over an fp32 copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["CEConfig", "CONFIG", "chunk_cross_entropy_triton_"]


@dataclass(frozen=True)
class CEConfig:
    """block_v: logits per tile of the two-pass loop, with ``warps`` warps per row; row_max: the largest V kept
    as one register tile (read once; 0: always loop), with ``row_warps`` warps. Tiles are powers of two."""

    block_v: int = 4096
    warps: int = 8
    row_max: int = 8192
    row_warps: int = 8

    def __post_init__(self):
        if self.block_v < 1 or self.block_v & (self.block_v - 1):
            raise ValueError(f"block_v must be a power of two; got {self.block_v}")


CONFIG = CEConfig()


@triton.jit
def _ce_kernel(z, targets, loss, V, s_row, ignore_index,
               GRAD: tl.constexpr, ONE_TILE: tl.constexpr, BV: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z += row * s_row
    t = tl.load(targets + row)
    valid = t != ignore_index
    t_hit = tl.where(valid, t, -1)  # the column that gets −1 (none for an ignored row)
    picked = tl.load(z + t, mask=valid & (t >= 0) & (t < V), other=float("nan")).to(tl.float32)
    v_end = tl.where(valid, V, 0)  # the columns read: none for an ignored row
    offs = tl.arange(0, BV)
    if ONE_TILE:
        x = tl.load(z + offs, mask=offs < v_end, other=float("-inf")).to(tl.float32)
        m = tl.where(valid, tl.max(x, axis=0), 0.0)
        e = tl.exp(x - m)
        s = tl.where(valid, tl.sum(e, axis=0), 1.0)
        if GRAD:
            g = e * (1.0 / s)
            g = tl.where(offs == t_hit, g - 1.0, g)
            tl.store(z + offs, g.to(z.dtype.element_ty), mask=offs < V)
    else:
        m = tl.full([], float("-inf"), tl.float32)
        s = tl.zeros([], tl.float32)
        for v0 in range(0, v_end, BV):
            cols = v0 + offs
            x = tl.load(z + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        m = tl.where(valid, m, 0.0)
        s = tl.where(valid, s, 1.0)
        if GRAD:
            inv = 1.0 / s
            for v0 in range(0, V, BV):
                cols = v0 + offs
                x = tl.load(z + cols, mask=cols < v_end, other=float("-inf")).to(tl.float32)
                g = tl.exp(x - m) * inv
                g = tl.where(cols == t_hit, g - 1.0, g)
                tl.store(z + cols, g.to(z.dtype.element_ty), mask=cols < V)
    tl.store(loss + row, tl.where(valid, m + tl.log(s) - picked, 0.0))


def chunk_cross_entropy_triton_(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                                grad: bool) -> torch.Tensor:
    """0-dim fp32 Σ of the rows' losses; with grad the logits [n, V] become softmax − onehot in place, in their
    dtype; without grad they are left unchanged. Inputs are checked by the caller (kernels.cross_entropy)."""
    n, V = logits.shape
    rows = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return rows.sum()
    cfg = CONFIG
    z = logits if logits.stride(1) == 1 else logits.contiguous()
    one = V <= cfg.row_max
    BV = triton.next_power_of_2(V) if one else cfg.block_v
    _ce_kernel[(n,)](z, targets.contiguous(), rows, V, z.stride(0), ignore_index,
                     GRAD=grad, ONE_TILE=one, BV=BV, num_warps=cfg.row_warps if one else cfg.warps)
    if grad and z is not logits:
        logits.copy_(z)
    return rows.sum()
