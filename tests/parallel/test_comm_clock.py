"""parallel.comm_clock: host time inside torch.distributed's calls, by kind, and the Trainer's measured split of a
CPU step into communication and pipeline bubble."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from helpers import run_distributed

from parallel.comm_clock import CommClock
from runtime.config import load_config
from runtime.mesh import build_mesh
from runtime.trainer import Trainer

DELAY = 0.3


def _check_clock(rank: int, world: int) -> None:
    original = dist.all_reduce
    with CommClock() as clock:
        if rank == 1:
            time.sleep(DELAY)  # rank 0 waits for rank 1 in the all-reduce, and in recv
        dist.all_reduce(torch.ones(4))
        if rank == 1:
            time.sleep(DELAY)
            dist.send(torch.ones(4), 0)
        else:
            dist.recv(torch.empty(4), 1)
        with pytest.raises(RuntimeError, match="already running"):
            CommClock().__enter__()
    collective, p2p = clock.take()
    assert dist.all_reduce is original and clock.take() == (0.0, 0.0)
    if rank == 0:
        assert collective >= 0.8 * DELAY and p2p >= 0.8 * DELAY, (collective, p2p)
    else:
        assert collective < 0.8 * DELAY, collective


def test_clock_times_the_waits_by_kind() -> None:
    run_distributed(_check_clock, 2)


def _check_trainer(rank: int, world: int) -> None:
    base = ["model.preset=tiny", "train.batch_size=2", "train.seq_len=32", "parallel.microbatches=2"]
    for pp, sp in ((2, 1), (1, 2)):
        trainer = Trainer(load_config(None, [*base, f"parallel.pp={pp}", f"parallel.sp={sp}"]), build_mesh(1, pp, sp))
        for step in range(2):
            res = trainer.step(step)
        trainer.close()
        assert 0 <= res.comm_s < res.seconds and 0 <= res.bubble_s < res.seconds, (pp, sp, res)
        if pp == 2:
            assert res.bubble_s > 0  # a stage waits for the other's activations or gradients
        else:
            assert res.comm_s > 0 and res.bubble_s == 0  # LASP-2's all-gathers; no stages


def test_trainer_splits_a_cpu_step() -> None:
    """Over two stages the step has a bubble; over two sequence shards, communication and no bubble."""
    run_distributed(_check_trainer, 2)
