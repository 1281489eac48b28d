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


def do_bench_ms(fn: Callable[[], object], warmup: int = 25, rep: int = 100) -> float:
    """`triton.testing.do_bench` median in ms (warm-up, L2 cleared before every run, launches queued ahead)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def peak_fwd_fb(fwd: Callable[[], object], fb: Callable[[], object], res: dict,
                bench: Callable[[Callable[[], object]], float]) -> None:
    """res["peak"] = GiB of one fb() from an emptied allocator; res["fwd"], res["fb"] = bench of each."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fb()
    torch.cuda.synchronize()
    res["peak"] = torch.cuda.max_memory_allocated() / 2**30
    res["fwd"], res["fb"] = bench(fwd), bench(fb)
