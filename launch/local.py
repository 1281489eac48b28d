"""Local processes: `longtrain train --nproc N` (gloo on CPU, nccl on CUDA)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def configure_threads(procs_per_node: int) -> None:
    """CPU ranks share the node's cores (the same rule under every launcher, so runs compare bitwise)."""
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, procs_per_node)))


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    configure_threads(world)
    try:
        fn(*args)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn: Callable, nproc: int, *args) -> None:
    """Run fn(*args) in `nproc` local processes that form one process group."""
    mp.spawn(_worker, args=(nproc, _free_port(), fn, args), nprocs=nproc, join=True)
