"""PyTorch reference of the chunk cross-entropy (kernels/cross_entropy): the eager passes over [n, V] logits."""

from __future__ import annotations

import torch

__all__ = ["chunk_cross_entropy_reference_"]


def _chunk_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, grad: bool) -> torch.Tensor:
    """Σ of the rows' losses from fp32/fp64 logits [n, V], which are consumed: they hold exp(z − max) afterwards,
    or with grad ∂loss/∂logits = softmax − onehot (rows of ignored targets 0)."""
    valid = targets != ignore_index
    tgt = torch.where(valid, targets, 0)[:, None]
    picked = logits.gather(1, tgt).squeeze(1)
    m = logits.amax(1, keepdim=True)
    p = logits.sub_(m).exp_()
    s = p.sum(1, keepdim=True)
    loss = torch.where(valid, (s.log() + m).squeeze(1) - picked, 0.0).sum()
    if grad:
        p.div_(s).scatter_add_(1, tgt, torch.full_like(s, -1.0)).mul_(valid[:, None])
    return loss


def chunk_cross_entropy_reference_(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                                   grad: bool) -> torch.Tensor:
    """Σ_i [logsumexp(z_i) − z_i[t_i]] over the rows whose target is not ignore_index (0-dim, fp64 for fp64 logits,
    else fp32); with grad the logits [n, V] become softmax − onehot in place (ignored rows 0).

    fp32/fp64 logits are worked on in place (with grad=False they are left holding exp(z − max_i z)); fp16/bf16
    logits are computed on in an fp32 copy, the gradient written back rounded (with grad=False left unchanged).
    """
    if logits.dtype in (torch.float32, torch.float64):
        return _chunk_loss(logits, targets, ignore_index, grad)
    z = logits.float()
    loss = _chunk_loss(z, targets, ignore_index, grad)
    if grad:
        logits.copy_(z)
    return loss
