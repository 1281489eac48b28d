"""Cross-entropy of one chunk of logits, with the gradient written over the logits (the inner step of
kernels/linear_cross_entropy.py).

For logits z_i ∈ R^V (row i of [n, V]) and target t_i (rows with t_i = ignore_index are skipped):

    loss_i = logsumexp(z_i) − z_i[t_i],          logsumexp(z) = m + log Σ_v exp(z_v − m),   m = max_v z_v
    ∂loss_i/∂z_i = softmax(z_i) − e_{t_i},       softmax(z)_v = exp(z_v − m) / Σ_u exp(z_u − m)

(0 for ignored rows). Subtracting the row max keeps every exp ≤ 1, so no logit range overflows.

`chunk_cross_entropy_` runs the Triton kernel (kernels/cross_entropy/triton_ce.py: reads the logits in their own
dtype, one or two passes, writes the gradient in that dtype) on CUDA tensors and the PyTorch reference
(kernels/cross_entropy/reference.py: ≈ 8 eager passes in fp32/fp64) otherwise.
"""

from __future__ import annotations

import torch

from kernels.cross_entropy.reference import chunk_cross_entropy_reference_

__all__ = ["chunk_cross_entropy_", "chunk_cross_entropy_reference_", "triton_dtype"]

BACKENDS = ("auto", "triton", "torch")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_dtype(dtype: torch.dtype) -> bool:
    """Whether the Triton backend takes logits of this dtype."""
    return dtype in TRITON_DTYPES


def _check(logits: torch.Tensor, targets: torch.Tensor, backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown; use one of {BACKENDS}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be [n, V]; got {tuple(logits.shape)} (flatten the leading dimensions)")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point; got {logits.dtype}")
    n, V = logits.shape
    if targets.shape != (n,):
        raise ValueError(f"targets must be [n] = [{n}] (one per logits row); got {tuple(targets.shape)}")
    if targets.dtype != torch.int64:
        raise TypeError(f"targets must be int64; got {targets.dtype} (pass targets.long())")
    if targets.device != logits.device:
        raise ValueError(f"targets are on {targets.device}, logits on {logits.device}; move them to one device")
    if V == 0 and n > 0:
        raise ValueError("the vocabulary is empty (V = 0); logits need at least one column")


def chunk_cross_entropy_(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, grad: bool = True, backend: str = "auto",
) -> torch.Tensor:
    """Σ_i [logsumexp(z_i) − z_i[t_i]] over the rows whose target is not ignore_index, as a 0-dim tensor (fp64 for
    fp64 logits, else fp32).

    logits: [n, V] (fp16/bf16/fp32/fp64), consumed: with grad=True overwritten in place by ∂loss/∂logits =
    softmax − onehot in their own dtype (rows of ignored targets 0); with grad=False their contents afterwards are
    unspecified (the Triton kernel leaves them unchanged, the reference leaves fp32/fp64 logits holding
    exp(z − max)). targets: [n] int64 in [0, V) or ignore_index (a valid target outside [0, V) gives a NaN loss on
    Triton, an error on the reference).
    backend: "triton", "torch" (the reference) or "auto" (Triton for CUDA logits of fp16/bf16/fp32).
    """
    _check(logits, targets, backend)
    if backend == "auto":
        backend = "triton" if logits.is_cuda and triton_dtype(logits.dtype) else "torch"
    if backend == "torch":
        return chunk_cross_entropy_reference_(logits, targets, ignore_index, grad)
    if not triton_dtype(logits.dtype):
        raise TypeError(f"the triton backend takes fp16/bf16/fp32 logits; got {logits.dtype} (use backend='torch')")
    from kernels.cross_entropy.triton_ce import chunk_cross_entropy_triton_

    return chunk_cross_entropy_triton_(logits, targets, ignore_index, grad)
