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
import torch.distributed as dist
import torch.nn as nn

from parallel.comm import recv_tensor, send_tensor


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
    `forward_window(x, carries, checkpoint_layers, carry_only=False, **forward_kwargs)` and
    `zero_carries(B, device)`; the forward pass over windows 0 … W−2 only wants their carries (`carry_only`)."""
    kwargs = forward_kwargs or {}
    xs, ys = inputs.split(window, dim=1), targets.split(window, dim=1)
    entering = [module.zero_carries(inputs.shape[0], inputs.device)]
    with torch.no_grad():
        for x in xs[:-1]:
            _, leaving = module.forward_window(x, entering[-1], carry_only=True, **kwargs)
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


def pipelined_streaming_step(module: nn.Module, inputs: torch.Tensor | None, targets: torch.Tensor | None,
                             window: int, n_windows: int, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                             stage: int, stages: int, group: dist.ProcessGroup | None, device: torch.device,
                             checkpoint_layers: bool = False, forward_kwargs: dict | None = None) -> torch.Tensor:
    """`streaming_step` over pipeline stages: the windows are the micro-batches (TeraPipe). Forward: every
    stage runs windows 0 … W−1 in order without autograd, carrying its layers' state from window to window,
    keeping each window's stage input and entering carries, and sends its output to the next stage; while
    stage s works on window w, stage s+1 works on window w−1. Backward: windows W−1 … 0 in reverse: the
    last stage recomputes the window from its stored input and carries and back-propagates the window's
    loss; every other stage receives the gradient of its output, recomputes, back-propagates, and sends the
    gradient of its input back. Returns Σ of the windows' losses on the last stage (0 elsewhere). The last
    stage's forward keeps only the carries (`carry_only`): its outputs are recomputed in backward."""
    kwargs = forward_kwargs or {}
    first, last = stage == 0, stage == stages - 1
    xs = list(inputs.split(window, dim=1)) if first else [None] * n_windows
    ys = list(targets.split(window, dim=1)) if last else [None] * n_windows
    entering, stage_inputs = [], []
    carries = None
    with torch.no_grad():
        for w in range(n_windows):
            x = xs[w] if first else recv_tensor(stage - 1, group, device)
            if carries is None:
                carries = module.zero_carries(x.shape[0], device)
            entering.append(carries)
            stage_inputs.append(x)
            out, carries = module.forward_window(x, carries, carry_only=last, **kwargs)  # last: output unused
            if not last:
                send_tensor(out, stage + 1, group)
    total = torch.zeros((), device=device)
    d_leaving: list[torch.Tensor] | None = None
    for w in range(n_windows - 1, -1, -1):
        carried = _leaves(entering[w])
        x = stage_inputs[w] if first else stage_inputs[w].detach().requires_grad_()
        out, leaving = module.forward_window(x, carried, checkpoint_layers, **kwargs)
        if last:
            loss = loss_fn(out, ys[w])
            outputs, grads = [loss], [torch.ones_like(loss)]
            total = total + loss.detach()
        else:
            outputs, grads = [out], [recv_tensor(stage + 1, group, device).to(out.dtype)]
        if d_leaving is not None:
            pairs = [(t, g) for t, g in zip(_tensors(leaving), d_leaving) if t.requires_grad]
            outputs += [t for t, _ in pairs]
            grads += [g for _, g in pairs]
        torch.autograd.backward(outputs, grads)
        d_leaving = [t.grad if t.grad is not None else torch.zeros_like(t) for t in _tensors(carried)]
        if not first:
            send_tensor(x.grad if x.grad is not None else torch.zeros_like(x), stage - 1, group)
        entering[w] = stage_inputs[w] = None
    return total


@torch.no_grad()
def pipelined_streaming_forward(module: nn.Module, inputs: torch.Tensor | None, window: int, n_windows: int,
                                stage: int, stages: int, group: dist.ProcessGroup | None, device: torch.device,
                                forward_kwargs: dict | None = None) -> torch.Tensor | None:
    """Forward only (evaluation) of a streamed sequence over pipeline stages; the last stage gets the
    windows' outputs concatenated, the others None."""
    first, last = stage == 0, stage == stages - 1
    xs = list(inputs.split(window, dim=1)) if first else [None] * n_windows
    carries, outs = None, []
    for w in range(n_windows):
        x = xs[w] if first else recv_tensor(stage - 1, group, device)
        if carries is None:
            carries = module.zero_carries(x.shape[0], device)
        out, carries = module.forward_window(x, carries, **(forward_kwargs or {}))
        if last:
            outs.append(out)
        else:
            send_tensor(out, stage + 1, group)
    return torch.cat(outs, dim=1) if last else None
