"""GPipe on its own: the pipelined step equals the plain step, and re-materialization follows the plan."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from helpers import rel_err, run_distributed
from torch.utils.checkpoint import checkpoint

from parallel.pipeline import GPipe, partition, recompute_plan


class Counted(nn.Module):
    """Two linear layers with tanh; counts how often each layer's forward runs."""

    def __init__(self, dim: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleList(nn.Linear(dim, dim, dtype=torch.float64) for _ in range(2))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
        self.calls = 0

    def _layer(self, i: int, h: torch.Tensor) -> torch.Tensor:
        self.calls += not h.is_meta  # the schedule's shape inference runs on meta tensors
        return torch.tanh(self.layers[i](h))

    def forward(self, x: torch.Tensor, checkpoint_layers: bool = False) -> torch.Tensor:
        for i in range(len(self.layers)):
            h = checkpoint(self._layer, i, x, use_reentrant=False) if checkpoint_layers else self._layer(i, x)
            x = h
        return x


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).sum()


@pytest.mark.parametrize("remat,extra", [("never", 0), ("except_last", 2), ("always", 3)])
def test_one_stage_recomputes_the_planned_microbatches(remat: str, extra: int) -> None:
    model = Counted(4, 0)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    pipe = GPipe(model, stage_index=0, num_stages=1, group=None, device=torch.device("cpu"), microbatches=3,
                 loss_fn=_loss, remat=remat)
    loss = pipe.step(x, y, loss_divisor=2.0)
    assert model.calls == 2 * 3 + 2 * extra  # forward of every micro-batch, plus the recomputed layers
    ref = Counted(4, 0)
    ref_loss = _loss(ref(x), y) / 2.0
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 1e-12
    for p, q in zip(model.parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) < 1e-12


def _check_two_stages(rank: int, world: int, remat: str) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(4, 4, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    stages = [Counted(4, 0), Counted(4, 1)]
    pipe = GPipe(stages[rank], stage_index=rank, num_stages=2, group=None, device=torch.device("cpu"),
                 microbatches=2, loss_fn=_loss, remat=remat)
    inputs, targets = (x if rank == 0 else None), (y if rank == 1 else None)
    pipe.step(inputs, targets, loss_divisor=4.0)  # the first step also infers the stages' shapes
    stages[rank].zero_grad()
    stages[rank].calls = 0
    loss = pipe.step(inputs, targets, loss_divisor=4.0)
    recomputed = sum(recompute_plan(remat, 2))
    assert stages[rank].calls == 2 * 2 + 2 * recomputed, (rank, stages[rank].calls, recomputed)
    ref = [Counted(4, 0), Counted(4, 1)]
    ref_loss = _loss(ref[1](ref[0](x)), y) / 4.0
    ref_loss.backward()
    if rank == 1:
        assert abs(loss.item() - ref_loss.item()) < 1e-12
    for p, q in zip(stages[rank].parameters(), ref[rank].parameters()):
        assert rel_err(p.grad, q.grad) < 1e-12


@pytest.mark.parametrize("remat", ["never", "except_last", "always"])
def test_two_stages_equal_the_plain_step(remat: str) -> None:
    run_distributed(_check_two_stages, 2, remat)


def test_windows_over_stages_need_the_sequence_length() -> None:
    with pytest.raises(ValueError, match="local_tokens"):
        GPipe(Counted(4, 0), stage_index=0, num_stages=2, group=None, device=torch.device("cpu"), microbatches=1,
              loss_fn=_loss, window=8)


def test_partition_balances_contiguous_ranges() -> None:
    assert partition([1, 1, 1, 1], 2) == [(0, 2), (2, 4)]
    assert partition([5, 1, 1, 1, 1, 1], 2) == [(0, 1), (1, 6)]
    assert partition([1, 2, 3], 3) == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(ValueError, match="pp ≤ 3"):
        partition([1, 2, 3], 4)


def test_except_last_recomputes_all_but_last_microbatch() -> None:
    assert recompute_plan("except_last", 3) == [True, True, False]
    assert recompute_plan("always", 2) == [True, True]
    assert recompute_plan("never", 2) == [False, False]
