"""Timing shared by the multi-process benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist


def fenced_ms(fn: Callable[[], object], cuda: bool) -> float:
    """Milliseconds of one fn() started after a barrier (when a process group exists): CUDA events on the GPU,
    the wall clock on CPU."""
    if dist.is_initialized():
        dist.barrier()
    if not cuda:  # CPU dry run of a script (gloo)
        start = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - start)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)
