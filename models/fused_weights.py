"""Fused projection weights, built once per training step.

A block runs q/k/v/gate and SwiGLU's gate/up as one GEMM each on W = cat(W_1, …, W_n), which under bf16
autocast is cast as well: 14 bytes per parameter moved (fp32 cat, then the cast) every time the block runs.
A step runs each block several times — the forward, re-materialization, every micro-batch, and with streaming
windows (DESIGN §9) the carry pass and each window's forward — so that traffic grows with the number of passes
(the fp32 cat of a `1b` model is 0.6 G parameters: ≈ 5 ms per window at 1M tokens in 64K windows).

Inside `reuse_fused_weights()` the first use builds cat(W_i.to(c)) (c: the autocast dtype, else the
parameters' own) with its autograd graph, and later uses get the same tensor: the values are bitwise those of
cast(cat(W_i)), and the gradient of every use flows through the one CatBackward → ToCopyBackward chain — which
saves no tensors, so each window's backward may run through it again — into W_i.grad as before. A parameter
changed in place (its version counter moved) rebuilds its entry. Only for plain parameters: FSDP2 swaps
sharded and gathered tensors around each forward and owns their gradients, so a sharded stage must not enter
the context (the Trainer does not).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

import torch

_local = threading.local()  # .cache: {(ids…, dtype): (versions, weight)} while a context is open, else absent


@contextlib.contextmanager
def reuse_fused_weights(enabled: bool = True) -> Iterator[None]:
    """Within: `fused_weight` builds each fused weight once and reuses it (nested contexts share the outer's)."""
    if not enabled or getattr(_local, "cache", None) is not None:
        yield
        return
    _local.cache = {}
    try:
        yield
    finally:
        _local.cache = None


def _compute_dtype(p: torch.Tensor) -> torch.dtype:
    device = p.device.type
    if device in ("cuda", "cpu") and p.is_floating_point() and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return p.dtype


def fused_weight(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """cat(params) along dim 0 for one GEMM; inside `reuse_fused_weights()`, already cast to the compute dtype and
    built once per context (a detached view of it where grad mode is off)."""
    cache = getattr(_local, "cache", None)
    if cache is None:
        return torch.cat(list(params))  # autocast casts it at the GEMM
    dtype = _compute_dtype(params[0])
    key = (*(id(p) for p in params), dtype)
    versions = tuple(p._version for p in params)
    hit = cache.get(key)
    if hit is None or hit[0] != versions:
        with torch.enable_grad():  # with its graph even when first used under no_grad (a streaming carry pass)
            weight = torch.cat([p.to(dtype) for p in params])
        hit = cache[key] = (versions, weight)
    return hit[1] if torch.is_grad_enabled() else hit[1].detach()


def is_reused_weight(t: torch.Tensor | None) -> bool:
    """Whether `t` (or the tensor it is a view of) is a fused weight the open context keeps for the whole step
    (an activation offloader gains nothing by moving it)."""
    cache = getattr(_local, "cache", None)
    if not cache or t is None:
        return False
    held = {id(weight) for _, weight in cache.values()}
    return id(t) in held or (t._base is not None and id(t._base) in held)
