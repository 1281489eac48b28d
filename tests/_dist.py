"""Spawn a gloo process group on CPU and run a function on every rank."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    except BaseException:
        traceback.print_exc()  # every rank's own error, not only the first one spawn reports
        raise
    finally:
        dist.destroy_process_group()
    # A rank that passed leaves without interpreter finalization: gloo worker threads that still hold
    # tensors can abort it there ("terminate called without an active exception", SIGABRT), which
    # spawn would report as a failure of a test whose checks all passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn: Callable, world: int, *args) -> None:
    """Run fn(rank, world, *args) in `world` spawned gloo processes; any rank's failure fails the test."""
    mp.spawn(_entry, args=(world, _free_port(), fn, args), nprocs=world, join=True)


def scratch_dir() -> str:
    return tempfile.mkdtemp(prefix="longtrain-test-")


def model_step(model: torch.nn.Module, tokens: torch.Tensor, targets: torch.Tensor, n_tokens: int):
    """(loss, {parameter name: gradient}) of one step of the mean token loss over n_tokens."""
    from models import token_loss_sum

    model.zero_grad()
    loss = token_loss_sum(model(tokens), targets) / n_tokens
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def seeded_model_and_batch(cfg, world: int):
    """A model seeded as every rank seeds it, and a batch of 2 sequences splittable over `world` zigzag ranks."""
    from models import LinearLlama

    torch.manual_seed(0)
    model = LinearLlama(cfg)
    data = torch.randint(0, cfg.vocab_size, (2, 8 * world * 3 + 1), generator=torch.Generator().manual_seed(1))
    return model, data[:, :-1], data[:, 1:]
