"""Token-wise work in sequence tiles (DESIGN §9): only one tile's internals are ever alive.

`tiled(fn, x, tile)` computes fn over tiles of x along the sequence (dim 1) for a token-wise fn (norms,
projections, SwiGLU, residual adds: token t's output depends on token t's input only). Forward keeps
only x; backward recomputes each tile with autograd and back-propagates it at once, so a layer's peak
internals are O(tile) instead of O(T). Exact: the result and every gradient equal fn(x)'s. The cost is
one more forward of fn (ALST's TiledMLP).

Inside a re-materialized region (torch.utils.checkpoint) `tiled(..., ends_region=True)` — fn's output is the
region's output, which the recompute in backward discards — skips fn in that recompute: the region's recompute only
has to restore x (what this tile pass saves), and the tiled backward recomputes fn per tile anyway. So a
re-materialized block with a tiled MLP runs the MLP forward twice, as the plain re-materialized block does, with
O(tile) internals.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn


class _Tiled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn: Callable, tile: int, ends_region: bool, x: torch.Tensor, *params: torch.Tensor
                ) -> torch.Tensor:
        device = x.device.type
        ctx.fn, ctx.tile, ctx.params = fn, tile, params
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.save_for_backward(x)
        with torch.no_grad():
            if ends_region and recomputing():  # the recompute wants x only: an output of the right shape will do
                probe = fn(x[:, :1])
                return probe.new_empty((x.shape[0], x.shape[1], *probe.shape[2:]))
            return torch.cat([fn(part) for part in x.split(tile, dim=1)], dim=1)

    @staticmethod
    def backward(ctx, d_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        device, enabled, dtype = ctx.autocast
        wanted = [p for p in ctx.params if p.requires_grad]
        d_params = [torch.zeros_like(p) for p in wanted]
        d_x = torch.empty_like(x) if ctx.needs_input_grad[3] else None
        for start in range(0, x.shape[1], ctx.tile):
            part = x[:, start : start + ctx.tile].detach().requires_grad_(d_x is not None)
            with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
                out = ctx.fn(part)
            inputs = ([part] if d_x is not None else []) + wanted
            grads = torch.autograd.grad(out, inputs, d_out[:, start : start + ctx.tile], allow_unused=True)
            if d_x is not None:
                d_x[:, start : start + ctx.tile] = grads[0]
                grads = grads[1:]
            for acc, g in zip(d_params, grads):
                if g is not None:
                    acc += g
        it = iter(d_params)
        return (None, None, None, d_x, *[next(it) if p.requires_grad else None for p in ctx.params])


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
          params: Iterable[nn.Parameter], ends_region: bool = False) -> torch.Tensor:
    """fn(x) computed `tile` tokens at a time; `params` are fn's parameters (their gradients accumulate).
    `ends_region`: nothing after this call inside a re-materialized region uses its output (the region's recompute
    skips fn; see the module docstring)."""
    if tile <= 0 or x.shape[1] <= tile:
        return fn(x)
    return _Tiled.apply(fn, tile, ends_region, x, *params)
