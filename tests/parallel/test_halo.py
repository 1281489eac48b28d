"""Halo exchange: each shard receives the w tokens before it in global order; backward returns their gradients."""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err, run_distributed

from parallel.halo import previous_tokens
from parallel.layout import num_shards, shard_ids, shard_sequence, stack_local_shards


def _check_halo(rank: int, world: int, layout: str, width: int) -> None:
    torch.manual_seed(0)
    B, T, D = 2, 8 * num_shards(world, layout), 3
    full = torch.randn(B, T, D, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(len(shard_ids(rank, world, layout)) * B, width, D, dtype=torch.float64)
    local = shard_sequence(full, rank, world, layout)
    n_local = len(shard_ids(rank, world, layout))
    halos = previous_tokens(stack_local_shards(local, n_local), width, None, layout)
    Ts = T // num_shards(world, layout)
    for j, c in enumerate(shard_ids(rank, world, layout)):
        want = full[:, c * Ts - width : c * Ts] if c > 0 else torch.zeros(B, width, D, dtype=torch.float64)
        assert torch.equal(halos[j * B : (j + 1) * B], want), (rank, c)
    (halos * weight).sum().backward()
    # reference: d/dfull of Σ_rank Σ_shard halo·weight — every rank's weights, gathered
    gathered = [torch.zeros_like(weight) for _ in range(world)]
    torch.distributed.all_gather(gathered, weight)
    grad = torch.zeros_like(full)
    for r in range(world):
        for j, c in enumerate(shard_ids(r, world, layout)):
            if c > 0:
                grad[:, c * Ts - width : c * Ts] += gathered[r][j * B : (j + 1) * B]
    mine = torch.zeros_like(full)
    mine += full.grad  # this rank's share reaches only the tokens it owns
    torch.distributed.all_reduce(mine)
    assert rel_err(mine, grad) < 1e-12


@pytest.mark.parametrize("world,layout", [(2, "contiguous"), (2, "zigzag"), (4, "zigzag")])
def test_halo_equals_the_tokens_before_each_shard(world: int, layout: str) -> None:
    run_distributed(_check_halo, world, layout, 3)


def test_shards_shorter_than_the_halo_are_refused() -> None:
    with pytest.raises(ValueError, match="shorter than the convolution halo"):
        previous_tokens(torch.zeros(1, 2, 4), 3, None, "contiguous")
