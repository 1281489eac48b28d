"""The measured split of a step: host time inside torch.distributed's calls, by kind (issue 19's compute /
communication / bubble columns).

While a `CommClock` is entered, every blocking call of torch.distributed's collectives (all-gather, all-reduce,
reduce-scatter, all-to-all, broadcast, barrier) adds its wall time to `collective_s`, and every point-to-point
send / recv — the pipeline's activations and gradients between stages: blocking calls, and the waits of
`torch.distributed.pipelining`'s schedules on their isend / irecv — to `p2p_s`. Where collectives block
the host (gloo on a CPU) that is the step's exposed communication: the transfer plus the wait for the slowest
peer; a pipeline stage's time in recv is its bubble (waiting for the previous stage) plus the transfer.
Asynchronous calls (`async_op=True`) count their issue time only, except the waits of `parallel.comm`'s own
`*_async` helpers, which `timed_wait` adds. On CUDA (nccl) collectives are queued on streams and return before
the work is done, so host timers would measure nothing: the Trainer clocks CPU jobs only.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable

import torch.distributed as dist

COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_gather_object", "all_reduce", "reduce_scatter",
               "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "broadcast", "barrier")
POINT_TO_POINT = ("send", "recv")
SCHEDULES = "torch.distributed.pipelining.schedules"  # its `_wait_batch_p2p`: every wait of a schedule's P2P ops

_ACTIVE: CommClock | None = None


class CommClock:
    """Seconds spent inside torch.distributed calls while entered (one clock at a time in a process)."""

    def __init__(self) -> None:
        self.collective_s = 0.0
        self.p2p_s = 0.0
        self._saved: list[tuple[object, str, Callable]] = []

    def __enter__(self) -> CommClock:
        global _ACTIVE
        if _ACTIVE is not None:
            raise RuntimeError("a CommClock is already running in this process")
        targets = [(dist, name, "collective_s") for name in COLLECTIVES]
        targets += [(dist, name, "p2p_s") for name in POINT_TO_POINT]
        schedules = sys.modules.get(SCHEDULES)  # imported by parallel.pipeline when a job has stages
        if schedules is not None:
            targets.append((schedules, "_wait_batch_p2p", "p2p_s"))
        for owner, name, kind in targets:
            fn = getattr(owner, name, None)
            if fn is not None:
                self._saved.append((owner, name, fn))
                setattr(owner, name, self._timed(fn, kind))
        _ACTIVE = self
        return self

    def __exit__(self, *exc) -> None:
        global _ACTIVE
        for owner, name, fn in self._saved:
            setattr(owner, name, fn)
        self._saved.clear()
        _ACTIVE = None

    def _timed(self, fn: Callable, kind: str) -> Callable:
        @functools.wraps(fn)
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                setattr(self, kind, getattr(self, kind) + time.perf_counter() - start)
        return call

    def take(self) -> tuple[float, float]:
        """(collective seconds, point-to-point seconds) since the last take; resets both."""
        out = (self.collective_s, self.p2p_s)
        self.collective_s = self.p2p_s = 0.0
        return out


def timed_wait(work: dist.Work | None) -> None:
    """work.wait(), its time added to the running clock's collective seconds (if one is running)."""
    if work is None:
        return
    start = time.perf_counter()
    work.wait()
    if _ACTIVE is not None:
        _ACTIVE.collective_s += time.perf_counter() - start
