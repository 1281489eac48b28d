"""Streaming windows (DESIGN §9): a sequence runs through the whole model one window at a time.

Each linear layer carries (S, conv tail) from window w to window w+1. Forward runs the windows in
order without autograd and keeps only the carries entering each window (W·L·B·H·K·V fp32). Backward
runs the windows in reverse: window w is recomputed with autograd from its stored entering carries,
and its loss is back-propagated together with the gradients that window w+1 sent to its leaving
carries; the gradients that arrive at its entering carries go to window w−1. Parameter gradients
accumulate. Activation memory is one window's, whatever T is; the cost is one extra forward (the same
as full re-materialization); the result equals the whole-sequence step.

Under sequence parallelism the windows are global and window-major: each window is sharded over the sp
ranks on its own (`parallel.layout.shard_windows`), LASP-2 runs inside each window from the carried
state, and the state and conv tail leaving a window — the same on every rank — are the next window's
carry; `window` here counts this rank's tokens of a window.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn


def _tensors(carries: dict) -> list[torch.Tensor]:
    return [t for key in sorted(carries) for t in carries[key] if t is not None]


def _leaves(carries: dict) -> dict:
    """Detached copies that collect the gradient arriving at a window's entering carries."""
    return {key: tuple(None if t is None else t.detach().requires_grad_() for t in carry)
            for key, carry in carries.items()}


def streaming_step(module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, window: int,
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], checkpoint_layers: bool = False,
                   forward_kwargs: dict | None = None,
                   before_backward: Callable[[bool], None] | None = None) -> torch.Tensor:
    """Forward and backward of one micro-batch [B, T] in windows of `window` tokens (the last may be
    shorter); returns Σ over windows of loss_fn(output_w, targets_w). `module` provides
    `forward_window(x, carries, checkpoint_layers, **forward_kwargs)` and `zero_carries(B, device)`."""
    kwargs = forward_kwargs or {}
    xs, ys = inputs.split(window, dim=1), targets.split(window, dim=1)
    entering = [module.zero_carries(inputs.shape[0], inputs.device)]
    with torch.no_grad():
        for x in xs[:-1]:
            _, leaving = module.forward_window(x, entering[-1], **kwargs)
            entering.append(leaving)
    total = None
    d_leaving: list[torch.Tensor] | None = None
    for w in range(len(xs) - 1, -1, -1):
        carries = _leaves(entering[w])
        out, leaving = module.forward_window(xs[w], carries, checkpoint_layers, **kwargs)
        loss = loss_fn(out, ys[w])
        outputs, grads = [loss], [torch.ones_like(loss)]
        if d_leaving is not None:
            pairs = [(t, g) for t, g in zip(_tensors(leaving), d_leaving) if t.requires_grad]
            outputs += [t for t, _ in pairs]
            grads += [g for _, g in pairs]
        if before_backward is not None:  # told whether this is the micro-batch's last backward (window 0)
            before_backward(w == 0)
        torch.autograd.backward(outputs, grads)
        d_leaving = [t.grad if t.grad is not None else torch.zeros_like(t) for t in _tensors(carries)]
        entering[w] = None  # free what this window no longer needs
        total = loss.detach() if total is None else total + loss.detach()
    return total


@torch.no_grad()
def streaming_forward(module: nn.Module, inputs: torch.Tensor, window: int, forward_kwargs: dict | None = None
                      ) -> torch.Tensor:
    """Forward only (evaluation) of a streamed sequence: the windows' outputs, concatenated in local order."""
    carries = module.zero_carries(inputs.shape[0], inputs.device)
    outs = []
    for x in inputs.split(window, dim=1):
        out, carries = module.forward_window(x, carries, **(forward_kwargs or {}))
        outs.append(out)
    return torch.cat(outs, dim=1)
