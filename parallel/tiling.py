"""Token-wise work in sequence tiles (DESIGN §9): only one tile's internals are ever alive.

`tiled(fn, x, tile)` computes fn over tiles of x along the sequence (dim 1) for a token-wise fn (norms,
projections, SwiGLU, residual adds: token t's output depends on token t's input only). Forward keeps
only x; backward recomputes each tile with autograd and back-propagates it at once, so a layer's peak
internals are O(tile) instead of O(T). Exact: the result and every gradient equal fn(x)'s. The cost is
one more forward of fn (ALST's TiledMLP).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn as nn


class _Tiled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn: Callable, tile: int, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        ctx.fn, ctx.tile, ctx.params = fn, tile, params
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.save_for_backward(x)
        with torch.no_grad():
            return torch.cat([fn(part) for part in x.split(tile, dim=1)], dim=1)

    @staticmethod
    def backward(ctx, d_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        device, enabled, dtype = ctx.autocast
        wanted = [p for p in ctx.params if p.requires_grad]
        d_params = [torch.zeros_like(p) for p in wanted]
        d_x = torch.empty_like(x) if ctx.needs_input_grad[2] else None
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
        return (None, None, d_x, *[next(it) if p.requires_grad else None for p in ctx.params])


def tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int,
          params: Iterable[nn.Parameter]) -> torch.Tensor:
    """fn(x) computed `tile` tokens at a time; `params` are fn's parameters (their gradients accumulate)."""
    if tile <= 0 or x.shape[1] <= tile:
        return fn(x)
    return _Tiled.apply(fn, tile, x, *params)
