"""Synthetic tasks: deterministic rows, the targets each task scores, and a zipf loss that falls."""

from __future__ import annotations

import math

import pytest
import torch

from models import LinearLlama, preset
from runtime.errors import ConfigError
from runtime.synthetic import IGNORE, SyntheticTask, zipf_entropy, zipf_probabilities


@pytest.mark.parametrize("kind", ["mqar", "passkey", "zipf"])
def test_rows_are_a_function_of_seed_step_row(kind: str) -> None:
    task = SyntheticTask(kind, 64, 128, seed=3)
    x, y = task.rows(5, range(2, 4))
    assert x.shape == y.shape == (2, 128) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x, task.rows(5, range(2, 4))[0]) and torch.equal(y, task.rows(5, range(2, 4))[1])
    assert torch.equal(x[1], task.rows(5, range(3, 4))[0][0])  # a row does not depend on its neighbours
    assert not torch.equal(x, task.rows(6, range(2, 4))[0])
    assert int(x.min()) >= 0 and int(x.max()) < 64


def test_zipf_targets_are_every_next_token() -> None:
    task = SyntheticTask("zipf", 64, 128, seed=0)
    full = task.rows(0, range(1))
    x, y = full[0][0], full[1][0]
    assert (y != IGNORE).all()
    assert torch.equal(y[:-1], x[1:])


def test_zipf_law_is_the_same_at_every_step() -> None:
    """Token frequencies over many steps follow one law (the run's seed fixes which token has which rank)."""
    V = 32
    task = SyntheticTask("zipf", V, 4096, seed=1)
    counts = torch.bincount(torch.cat([task.rows(s, range(1))[0].flatten() for s in range(8)]), minlength=V)
    freq = counts.double() / counts.sum()
    want = torch.empty(V, dtype=torch.float64)
    want[task.zipf_tokens] = zipf_probabilities(V)
    assert (freq - want).abs().max() < 0.01
    other = SyntheticTask("zipf", V, 4096, seed=2)
    assert not torch.equal(task.zipf_tokens, other.zipf_tokens)
    assert 0 < zipf_entropy(V) < math.log(V)


def test_zipf_loss_falls_towards_its_entropy() -> None:
    """A tiny model trained 30 steps on zipf rows: the loss falls from ≈ ln V by at least a third of the way
    to the law's entropy (what MQAR with one sequence per step cannot show in so few steps)."""
    torch.manual_seed(0)
    cfg = preset("tiny")
    model = LinearLlama(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    task = SyntheticTask("zipf", cfg.vocab_size, 64, seed=0)
    losses = []
    for step in range(30):
        x, y = task.rows(step, range(4))
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=IGNORE)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    floor = zipf_entropy(cfg.vocab_size)
    assert last < first - (first - floor) / 3, (first, last, floor)


def test_unknown_task_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="synthetic:zipf"):
        SyntheticTask("nope", 64, 128, seed=0)
