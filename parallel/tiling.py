"""Token-wise work in sequence tiles (DESIGN §9): only one tile's internals are ever alive.

`tiled(fn, x, tile)` computes fn over tiles of x along the sequence (dim 1) for a token-wise fn (norms,
projections, SwiGLU, residual adds: token t's output depends on token t's input only). Forward keeps
only x; backward recomputes each tile with autograd and back-propagates it at once, so a layer's peak
internals are O(tile) instead of O(T). Exact: the result and every gradient equal fn(x)'s. The cost is
one more forward of fn (ALST's TiledMLP).

`tiled_residual(fn, proj, x, …)` — x + proj(fn(x)), a block's MLP with its residual — does not recompute proj
in backward (d fn = d out · W needs no proj output), which leaves one more forward of the MLP's widening GEMMs
only. Inside a re-materialized region (torch.utils.checkpoint) `tiled_residual(..., ends_region=True)` — its output
is the region's output, which the recompute in backward discards — skips the computation in that recompute: the
region's recompute only has to restore x (what this tile pass saves), and the tiled backward recomputes fn per tile
anyway. So a re-materialized block with a tiled MLP runs the MLP's widening GEMMs forward twice and its down
projection once, as the plain re-materialized block does, with O(tile) internals.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn


class _Tiled(torch.autograd.Function):
    """fn over tiles of x; with `proj` (a bias-free nn.Linear whose weight is params[0]): x + proj(fn(x))."""

    @staticmethod
    def forward(ctx, fn: Callable, proj: nn.Linear | None, tile: int, ends_region: bool, x: torch.Tensor,
                *params: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        ctx.fn, ctx.proj, ctx.tile, ctx.params = fn, proj, tile, params
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.save_for_backward(x)
        whole = fn if proj is None else (lambda part: part + proj(fn(part)))
        with torch.no_grad():
            if ends_region and recomputing():  # the recompute wants x only: an output of the right shape will do
                probe = whole(x[:, :1])
                return probe.new_empty((x.shape[0], x.shape[1], *probe.shape[2:]))
            return torch.cat([whole(part) for part in x.split(tile, dim=1)], dim=1)

    @staticmethod
    def backward(ctx, d_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        device, enabled, dtype = ctx.autocast
        proj = ctx.proj
        by_autograd = list(ctx.params[1:] if proj is not None else ctx.params)  # proj's weight: by hand, below
        wanted = [p for p in by_autograd if p.requires_grad]
        d_params = [torch.zeros_like(p) for p in wanted]
        d_proj = torch.zeros_like(proj.weight) if proj is not None and proj.weight.requires_grad else None
        d_x = torch.empty_like(x) if ctx.needs_input_grad[4] else None
        for start in range(0, x.shape[1], ctx.tile):
            part = x[:, start : start + ctx.tile].detach().requires_grad_(d_x is not None)
            d_tile = d_out[:, start : start + ctx.tile]
            with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
                out = ctx.fn(part)
            if proj is not None:  # out = fn(part); the tile's result, part + out Wᵀ, need not be formed
                with torch.autocast(device, dtype=dtype, enabled=enabled):  # autograd's linear, in autocast's dtype
                    if d_proj is not None:  # dW = d_tileᵀ out
                        d_proj += torch.mm(d_tile.reshape(-1, d_tile.shape[-1]).t(),
                                           out.detach().reshape(-1, out.shape[-1])).to(d_proj.dtype)
                    d_tile, residual = torch.matmul(d_tile, proj.weight.detach()), d_tile  # d out = d_tile W
            inputs = ([part] if d_x is not None else []) + wanted
            grads = torch.autograd.grad(out, inputs, d_tile.to(out.dtype), allow_unused=True)
            if d_x is not None:
                d_x[:, start : start + ctx.tile] = grads[0] if proj is None else grads[0] + residual
                grads = grads[1:]
            for acc, g in zip(d_params, grads):
                if g is not None:
                    acc += g
        it = iter(d_params)
        d_rest = [next(it) if p.requires_grad else None for p in by_autograd]
        return (None, None, None, None, d_x, *([d_proj] if proj is not None else []), *d_rest)


_replay = threading.local()


def recomputing() -> bool:
    """Whether this forward code runs inside a backward pass — the recompute of a re-materialized region (the
    autograd engine has a graph task only while it executes a backward) — outside `replaying_recompute`."""
    return torch._C._current_graph_task_id() != -1 and not getattr(_replay, "on", False)


@contextmanager
def replaying_recompute() -> Iterator[None]:
    """Inside, tiled calls compute fn in a recompute too: for a recompute that must replay the forward's operations
    one for one (selective re-materialization's cache is keyed by the order of the operations)."""
    before = getattr(_replay, "on", False)
    _replay.on = True
    try:
        yield
    finally:
        _replay.on = before


def tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int,
          params: Iterable[nn.Parameter]) -> torch.Tensor:
    """fn(x) computed `tile` tokens at a time; `params` are fn's parameters (their gradients accumulate)."""
    if tile <= 0 or x.shape[1] <= tile:
        return fn(x)
    return _Tiled.apply(fn, None, tile, False, x, *params)


def tiled_residual(fn: Callable[[torch.Tensor], torch.Tensor], proj: nn.Linear, x: torch.Tensor, tile: int,
                   params: Iterable[nn.Parameter], ends_region: bool = False) -> torch.Tensor:
    """x + proj(fn(x)) computed `tile` tokens at a time (proj: a bias-free linear map, as a SwiGLU's down
    projection; `params`: fn's parameters). As `tiled`, except that backward does not recompute proj: per tile it
    recomputes h = fn(x) only and takes d h = d y W, dW += d yᵀ h and d x = d y + (d h through fn) — proj's
    forward is the one GEMM a tile's backward does not need. `ends_region`: nothing after this call inside a
    re-materialized region uses its output (the region's recompute skips it; see the module docstring)."""
    if proj.bias is not None:
        raise ValueError("tiled_residual's proj must be bias-free (nn.Linear(..., bias=False))")
    if tile <= 0 or x.shape[1] <= tile:
        return x + proj(fn(x))
    return _Tiled.apply(fn, proj, tile, ends_region, x, proj.weight, *params)
