"""Cross-entropy of a linear head without materializing the logits (DESIGN §9).

For hidden states h_n ∈ R^d, head W ∈ R^{V×d} and targets y_n (ignore_index skipped):

    loss = Σ_n [lse(ℓ_n) − ℓ_{n,y_n}],      ℓ_n = W h_n,      lse(ℓ) = log Σ_v e^{ℓ_v}
    ∂loss/∂ℓ_n = softmax(ℓ_n) − onehot(y_n)   (0 for ignored rows)
    ∂loss/∂h_n = (∂loss/∂ℓ_n) W,              ∂loss/∂W = Σ_n (∂loss/∂ℓ_n)ᵀ h_n

The forward walks token chunks: per chunk it forms ℓ, the chunk's loss and both gradients, and drops ℓ; only
[chunk, V] lives at a time. On the Triton path (CUDA, compute dtype fp16/bf16/fp32) ℓ stays in the GEMM's
dtype and one kernel turns it into ∂loss/∂ℓ in place (kernels/cross_entropy); on the reference path (CPU,
float64, backend="torch") ℓ is cast to fp32 (float64) for the eager softmax and its gradient cast back.
d hidden and d W (accumulated in fp32) are kept for the backward, which scales them by the incoming gradient.
The compute dtype is the autocast dtype when autocast is on for the tensors' device (bf16 matmuls on GPU), else
the promoted input dtype (fp32 stays fp32, float64 stays float64; float64 is never autocast).
"""

from __future__ import annotations

import torch

from kernels.cross_entropy import chunk_cross_entropy_, chunk_cross_entropy_reference_, triton_dtype

__all__ = ["linear_cross_entropy", "linear_argmax_hits"]

LOGITS_BUDGET = 1 << 28  # logits per chunk: 2^28 values = 1 GiB in fp32 (512 MiB in bf16)
BACKENDS = ("auto", "triton", "torch")


def _chunk_tokens(chunk_tokens: int | None, V: int) -> int:
    """The given chunk length, or as many tokens as keep a chunk's fp32 logits within 1 GiB (8192 at V = 32000)."""
    if chunk_tokens is not None:
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be ≥ 1; got {chunk_tokens}")
        return chunk_tokens
    n = max(1, LOGITS_BUDGET // V)
    return n - n % 256 if n >= 256 else n


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for the inputs' device and neither is float64, else the promoted one."""
    dev = hidden.device.type
    if torch.float64 not in (hidden.dtype, weight.dtype) and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _flat(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [..., d] → [N, d] and targets [...] → [N], after checking the shapes."""
    if weight.dim() != 2 or hidden.shape[-1:] != weight.shape[1:]:
        raise ValueError(f"hidden [..., d] and weight [V, d] disagree: {tuple(hidden.shape)}, {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets must be [...] = {tuple(hidden.shape[:-1])} (hidden's); got {tuple(targets.shape)}")
    return hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with acc's precision: half-precision CUDA products accumulate into fp32 directly."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc += (a @ b).to(acc.dtype)


def _fused(backend: str, device: torch.device, cdt: torch.dtype) -> bool:
    """Whether the chunks run the Triton cross-entropy on logits in the compute dtype (else the reference on fp32
    or float64 logits)."""
    if backend == "auto":
        return device.type == "cuda" and triton_dtype(cdt)
    if backend == "triton" and not triton_dtype(cdt):
        raise TypeError(f"the triton backend computes in fp16/bf16/fp32; got {cdt} (use backend='torch')")
    return backend == "triton"


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk, need_dh, need_dw, fused):
        N, V = hidden.shape[0], weight.shape[0]
        cdt = _compute_dtype(hidden, weight)
        acc = torch.float64 if cdt == torch.float64 else torch.float32
        grad = need_dh or need_dw
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(cdt), weight.to(cdt)
            loss = torch.zeros((), dtype=acc, device=hidden.device)
            dh = torch.empty(N, hidden.shape[1], dtype=hidden.dtype, device=hidden.device) if need_dh else None
            dw = torch.zeros(V, weight.shape[1], dtype=acc, device=weight.device) if need_dw else None
            for i in range(0, N, chunk):
                hc = h[i:i + chunk]
                if fused:  # the GEMM's logits become ∂loss/∂logits in place, in cdt
                    g = hc @ w.t()
                    loss += chunk_cross_entropy_(g, targets[i:i + chunk], ignore_index, grad, backend="triton")
                else:
                    logits = (hc @ w.t()).to(acc)
                    loss += chunk_cross_entropy_reference_(logits, targets[i:i + chunk], ignore_index, grad)
                    g = logits.to(cdt) if grad else None
                    del logits
                if grad:
                    if need_dh:
                        dh[i:i + chunk] = g @ w
                    if need_dw:
                        _addmm_fp32(dw, g.t(), hc)
        ctx.save_for_backward(dh, None if dw is None else dw.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dw = ctx.saved_tensors
        dh = None if dh is None else dh * grad_loss.to(dh.dtype)
        dw = None if dw is None else dw * grad_loss.to(dw.dtype)
        return dh, dw, None, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100,
    chunk_tokens: int | None = None, backend: str = "auto",
) -> torch.Tensor:
    """Σ_n cross-entropy(W h_n, y_n) over the non-ignored tokens, as a 0-dim fp32 tensor (float64 for float64
    inputs), differentiable in hidden and weight; no [N, V] tensor outlives one chunk.

    hidden: [N, d] (or [..., d]); weight: [V, d] (the head, possibly tied to the embedding); targets: [N] (or [...])
    int64; chunk_tokens: tokens per chunk (None: 2^28 / V rounded down to a multiple of 256 — 8192 at V = 32000).
    backend: the chunks' cross-entropy — "triton" (kernels/cross_entropy: on logits in the compute dtype, the
    gradient written over them), "torch" (the reference, on fp32/float64 logits) or "auto" (Triton for CUDA
    inputs computing in fp16/bf16/fp32).
    Divide by the global count of valid tokens for the mean.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown; use one of {BACKENDS}")
    h, t = _flat(hidden, weight, targets)
    chunk = _chunk_tokens(chunk_tokens, weight.shape[0])
    fused = _fused(backend, h.device, _compute_dtype(h, weight))
    grad = torch.is_grad_enabled()
    need_dh, need_dw = grad and hidden.requires_grad, grad and weight.requires_grad
    return _LinearCrossEntropy.apply(h, weight, t, ignore_index, chunk, need_dh, need_dw, fused)


@torch.no_grad()
def linear_argmax_hits(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100,
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hits, count): how many non-ignored tokens have argmax_v (W h_n)_v == y_n, and how many there are
    (0-dim int64 tensors on hidden's device, no host sync). Logits in the compute dtype, one chunk at a time."""
    h, t = _flat(hidden, weight, targets)
    chunk = _chunk_tokens(chunk_tokens, weight.shape[0])
    cdt = _compute_dtype(h, weight)
    valid = t != ignore_index
    hits = torch.zeros((), dtype=torch.int64, device=h.device)
    with torch.autocast(h.device.type, enabled=False):
        w = weight.to(cdt)
        for i in range(0, h.shape[0], chunk):
            pred = (h[i:i + chunk].to(cdt) @ w.t()).argmax(-1)
            hits += ((pred == t[i:i + chunk]) & valid[i:i + chunk]).sum()
    return hits, valid.sum()
