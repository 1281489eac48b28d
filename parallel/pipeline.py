"""GPipe pipeline parallelism (DESIGN §5): balanced stages, fill–drain micro-batches, re-materialization.

A step splits the batch into M micro-batches; every stage runs all M forwards, then all M
backwards. With P stages the idle (bubble) fraction is (P−1)/(M+P−1). Stage-to-stage
send/recv goes over the pp group, i.e. between ranks with equal (dp, sp) coordinates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule

from parallel.comm import recv_tensor, send_tensor
from parallel.streaming import (
    pipelined_streaming_forward,
    pipelined_streaming_step,
    streaming_forward,
    streaming_step,
)

REMAT_MODES = ("never", "except_last", "always")
REMAT_POLICIES = ("auto", "full", "selective")  # what a re-materialized layer keeps (LinearLlama._checkpointed;
# auto: runtime.memory.resolve_remat_policy)


def partition(costs: Sequence[float], n_stages: int) -> list[tuple[int, int]]:
    """Cut items with `costs` (in order) into `n_stages` contiguous non-empty [start, end) ranges
    that minimise the largest stage cost (exact dynamic programme, O(P·L²))."""
    n = len(costs)
    if not 1 <= n_stages <= n:
        raise ValueError(f"cannot cut {n} layers into {n_stages} pipeline stages; use 1 ≤ pp ≤ {n}")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    # best[s][i]: smallest max-cost cutting the first i items into s stages; cut[s][i]: start of the last stage
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, n_stages + 1):
        for i in range(s, n + 1):
            for j in range(s - 1, i):
                cost = max(best[s - 1][j], prefix[i] - prefix[j])
                if cost < best[s][i]:
                    best[s][i], cut[s][i] = cost, j
    ranges, end = [], n
    for s in range(n_stages, 0, -1):
        start = cut[s][end]
        ranges.append((start, end))
        end = start
    return ranges[::-1]


def recompute_plan(mode: str, microbatches: int) -> list[bool]:
    """Which of a step's M micro-batches keep only each layer's input and recompute the layer in backward.

    "always": every micro-batch; "except_last": all but the last (its backward follows at once, so its
    activations are needed right away — torchgpipe's `checkpoint_stop = M − 1`); "never": none.
    """
    if mode not in REMAT_MODES:
        raise ValueError(f"unknown re-materialization mode {mode!r}; use one of {REMAT_MODES}")
    return [mode == "always" or (mode == "except_last" and i < microbatches - 1) for i in range(microbatches)]


class _Recomputed(nn.Module):
    """The stage module as the schedule sees it: forward `i` of a training step runs the wrapped model
    with `checkpoint_layers=plan[i]`. GPipe sets the plan before each step; fill–drain runs exactly
    the M forwards of the plan, in order. Forwards without autograd (evaluation) and the schedule's
    shape inference on meta tensors do not consume the plan.

    Streamed windows (`parallel.streaming`) call `forward_window`, which also goes through `forward` (so a
    sharding root's hooks run); the carries travel beside the call, not as its inputs, so that such a root
    does not take them for inputs whose gradient ends its backward."""

    def __init__(self, module: nn.Module, forward_kwargs: dict):
        super().__init__()
        self.module, self.forward_kwargs = module, forward_kwargs
        self.plan: list[bool] | None = None  # None: outside a training step
        self.inferring = False  # the schedule's shape/metadata inference forward is running
        self._window: tuple[dict, bool, bool] | None = None  # (entering carries, checkpoint_layers, carry_only)

    def forward(self, x: torch.Tensor):
        if self._window is not None:
            (carries, checkpoint_layers, carry_only), self._window = self._window, None
            return self.module.forward_window(x, carries, checkpoint_layers, carry_only=carry_only,
                                              **self.forward_kwargs)
        training = torch.is_grad_enabled() and not x.is_meta and not self.inferring and self.plan is not None
        if training and not self.plan:
            raise RuntimeError("the pipeline schedule ran more micro-batch forwards than GPipe planned")
        checkpoint_layers = self.plan.pop(0) if training else False
        return self.module(x, checkpoint_layers=checkpoint_layers, **self.forward_kwargs)

    def forward_window(self, x: torch.Tensor, carries: dict, checkpoint_layers: bool = False,
                       carry_only: bool = False):
        """The wrapped model's `forward_window` (with `carry_only`: → (None, leaving carries)), through `forward`."""
        self._window = (carries, checkpoint_layers, carry_only)
        return self(x)

    def zero_carries(self, batch: int, device: torch.device) -> dict:
        return self.module.zero_carries(batch, device)


class GPipe:
    """Runs one pipeline stage: `step` = fill–drain forward/backward of M micro-batches.

    The loss of micro-batch i is `loss_fn(output_i, target_i) / loss_divisor` on the last stage;
    gradients accumulate unscaled, so a step's gradient is that of Σ_i loss_i. `remat` decides per
    micro-batch whether the stage recomputes its layers in backward (`recompute_plan`); the module
    must take `forward(x, checkpoint_layers: bool, **forward_kwargs)`. With one stage this is plain
    gradient accumulation over micro-batches. With `window`, each micro-batch streams through the model in
    windows of that many tokens (`parallel.streaming`); over several stages the windows are the pipeline's
    micro-batches (TeraPipe) and `local_tokens` (tokens per sequence on this rank) fixes their number.
    """

    def __init__(self, module: nn.Module, *, stage_index: int, num_stages: int, group: dist.ProcessGroup | None,
                 device: torch.device, microbatches: int, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 remat: str = "never", window: int = 0, local_tokens: int = 0, forward_kwargs: dict | None = None,
                 wrap: Callable[[nn.Module], nn.Module] | None = None):
        if window and num_stages > 1 and not local_tokens:
            raise ValueError("streaming windows over pipeline stages need local_tokens (the tokens per sequence)")
        self.module, self.stage_index, self.num_stages = module, stage_index, num_stages
        self.window, self.forward_kwargs = window, dict(forward_kwargs or {})
        self.n_windows = -(-local_tokens // window) if window and local_tokens else 0
        self.group, self.device, self.microbatches, self.loss_fn = group, device, microbatches, loss_fn
        self.plan = recompute_plan(remat, microbatches)
        self._divisor: torch.Tensor | float = 1.0
        # every forward goes through the stage module; `wrap` may shard it (FSDP2: it becomes the root whose
        # hooks gather and reduce the stage's parameters, the module the pipeline schedule recognises)
        self._stage_module = _Recomputed(module, self.forward_kwargs)
        if wrap is not None:
            self._stage_module = wrap(self._stage_module)
        self.sharded = isinstance(self._stage_module, FSDPModule)
        if window and num_stages > 1 and self.sharded:
            raise ValueError("streaming windows over pipeline stages do not run with sharded model state; use "
                             "parallel.shard=none or one stage")
        self.schedule = None
        if num_stages > 1 and not window:
            from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

            stage = PipelineStage(self._stage_module, stage_index, num_stages, device, group=group)
            for name in ("_forward_metadata_inference", "_shape_inference"):  # torch 2.13 / 2.11 names
                if hasattr(stage, name):
                    setattr(stage, name, self._outside_plan(getattr(stage, name)))
            self.schedule = ScheduleGPipe(stage, n_microbatches=microbatches, loss_fn=self._scaled_loss,
                                          scale_grads=False)

    def _outside_plan(self, infer: Callable) -> Callable:
        """The schedule's one-time inference of stage shapes runs the module on real tensors (torch 2.13):
        it must not take a micro-batch's place in the re-materialization plan."""

        def run(*args, **kwargs):
            self._stage_module.inferring = True
            try:
                return infer(*args, **kwargs)
            finally:
                self._stage_module.inferring = False

        return run

    def _scaled_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(output, target) / self._divisor

    @property
    def is_first(self) -> bool:
        return self.stage_index == 0

    @property
    def is_last(self) -> bool:
        return self.stage_index == self.num_stages - 1

    def step(self, inputs: torch.Tensor | None, targets: torch.Tensor | None,
             loss_divisor: torch.Tensor | float = 1.0) -> torch.Tensor:
        """Forward and backward of one batch; returns Σ micro-batch losses on the last stage (0 elsewhere)."""
        self._divisor = loss_divisor
        if self.window and self.num_stages > 1:  # windows are the pipeline's micro-batches
            losses = []
            for i, recompute in enumerate(self.plan):
                x = inputs.chunk(self.microbatches)[i] if self.is_first else None
                y = targets.chunk(self.microbatches)[i] if self.is_last else None
                losses.append(pipelined_streaming_step(
                    self.module, x, y, self.window, self.n_windows, self._scaled_loss, self.stage_index,
                    self.num_stages, self.group, self.device, recompute, self.forward_kwargs))
            return torch.stack(losses).sum()
        if self.schedule is None:
            losses = []
            last = self.microbatches - 1
            for i, (x, y, recompute) in enumerate(zip(inputs.chunk(self.microbatches),
                                                      targets.chunk(self.microbatches), self.plan)):
                if self.window:  # windows run backward last to first: window 0 of the last micro-batch ends the step
                    hook = partial(self._last_window, i == last) if self.sharded else None
                    losses.append(streaming_step(self._stage_module, x, y, self.window, self._scaled_loss, recompute,
                                                 before_backward=hook))
                    continue
                if self.sharded:
                    self._last_backward(i == last)
                self._stage_module.plan = [recompute]
                try:
                    loss = self._scaled_loss(self._stage_module(x), y)
                finally:
                    self._stage_module.plan = None
                loss.backward()
                losses.append(loss.detach())
            return torch.stack(losses).sum()
        self._stage_module.plan = list(self.plan)
        losses: list[torch.Tensor] = []
        try:
            if self.is_first:
                self.schedule.step(inputs)
            elif self.is_last:
                self.schedule.step(target=targets, losses=losses)
            else:
                self.schedule.step()
            left = len(self._stage_module.plan)
        finally:
            self._stage_module.plan = None
        if left:
            raise RuntimeError(f"the schedule ran {len(self.plan) - left} of {len(self.plan)} micro-batch forwards")
        return torch.stack(losses).sum() if losses else torch.zeros((), device=self.device)

    def _last_backward(self, last: bool) -> None:
        """Sharded stage: as the pipeline schedule does, gradients accumulate unsharded and parameters stay
        gathered until the step's last backward, which reduce-scatters once."""
        self._stage_module.set_is_last_backward(last)
        self._stage_module.set_reshard_after_backward(last)
        self._stage_module.set_requires_gradient_sync(last)

    def _last_window(self, last_microbatch: bool, first_window: bool) -> None:
        self._last_backward(last_microbatch and first_window)

    @torch.no_grad()
    def forward(self, inputs: torch.Tensor | None) -> torch.Tensor | None:
        """Forward only (evaluation), no micro-batching: the last stage gets the output, others None."""
        if self.window and self.num_stages > 1:
            return pipelined_streaming_forward(self.module, inputs, self.window, self.n_windows, self.stage_index,
                                               self.num_stages, self.group, self.device, self.forward_kwargs)
        if self.window:
            return streaming_forward(self._stage_module, inputs, self.window)
        h = inputs if self.is_first else recv_tensor(self.stage_index - 1, self.group, self.device)
        h = self._stage_module(h)
        if self.is_last:
            return h
        send_tensor(h, self.stage_index + 1, self.group)
        return None
