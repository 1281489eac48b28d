"""Fused projection weights built once per step: the same numbers as a cat per use, fewer builds."""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import CountingTorch

import models.fused_weights as fused_weights
from kernels.linear_cross_entropy import linear_cross_entropy
from models import LinearLlama, preset
from models.fused_weights import fused_weight, is_reused_weight, reuse_fused_weights
from parallel.streaming import streaming_step


@pytest.fixture
def builds(monkeypatch) -> CountingTorch:
    counting = CountingTorch()
    monkeypatch.setattr(fused_weights, "torch", counting)
    return counting


def _params() -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(n, 8, generator=g)) for n in (8, 8, 3)]


def test_outside_a_context_it_is_a_fresh_cat() -> None:
    params = _params()
    first, second = fused_weight(params), fused_weight(params)
    assert first is not second
    assert torch.equal(first, torch.cat(params))


def test_inside_a_context_one_weight_in_the_autocast_dtype() -> None:
    params = _params()
    with torch.autocast("cpu", dtype=torch.bfloat16), reuse_fused_weights():
        first, second = fused_weight(params), fused_weight(params)
        with torch.no_grad():
            detached = fused_weight(params)
    assert first is second
    assert torch.equal(first, torch.cat(params).to(torch.bfloat16))  # bitwise the cast of the cat
    assert not detached.requires_grad
    assert detached.data_ptr() == first.data_ptr()


def test_a_weight_first_built_under_no_grad_still_has_its_graph() -> None:
    params = _params()
    with reuse_fused_weights():
        with torch.no_grad():
            fused_weight(params)
        weight = fused_weight(params)
    assert weight.requires_grad
    weight.sum().backward()
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in params)


def test_an_in_place_update_rebuilds_the_weight(builds) -> None:
    params = _params()
    with reuse_fused_weights():
        before = fused_weight(params)
        with torch.no_grad():
            params[1].add_(1.0)
        after = fused_weight(params)
    assert builds.cats == 2
    assert torch.equal(after, torch.cat(params).detach())
    assert not torch.equal(before, after)


def test_disabled_context_builds_per_use(builds) -> None:
    params = _params()
    with reuse_fused_weights(enabled=False):
        fused_weight(params)
        fused_weight(params)
    assert builds.cats == 2


def test_the_offloader_sees_reused_weights_and_their_views() -> None:
    params = _params()
    assert not is_reused_weight(fused_weight(params))
    with reuse_fused_weights():
        weight = fused_weight(params)
        assert is_reused_weight(weight)
        assert is_reused_weight(weight.t())
        assert not is_reused_weight(weight * 2)
    assert not is_reused_weight(weight)


def _model(mlp_tile: int = 0) -> LinearLlama:
    model = LinearLlama(preset("tiny", layout="L", gate=True))
    model.reset_parameters(3)
    for block in model.layers.values():
        block.mlp_tile = mlp_tile
    return model


def _step(model: LinearLlama, reuse: bool, window: int, checkpoint_layers: bool, bf16: bool):
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, model.cfg.vocab_size, (2, 17), generator=g)
    x, y = data[:, :-1], data[:, 1:]

    def loss_fn(h, targets):
        return linear_cross_entropy(h, model.head.weight, targets, chunk_tokens=7) / y.numel()

    model.zero_grad(set_to_none=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with autocast, reuse_fused_weights(enabled=reuse):
        loss = streaming_step(model, x, y, window, loss_fn, checkpoint_layers, {"logits": False})
    return loss, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("window,checkpoint_layers,policy,mlp_tile,bf16", [
    (4, False, "full", 0, False), (4, True, "selective", 0, False), (16, True, "full", 0, False),
    (4, False, "full", 3, False), (4, True, "selective", 0, True)])
def test_a_streamed_step_is_bitwise_the_same(window, checkpoint_layers, policy, mlp_tile, bf16, builds) -> None:
    """Every pass of every window (carry pass, forward, re-materialization, tiles) shares one weight each, and
    loss and gradients are those of a cat per use to the last bit."""
    model = _model(mlp_tile)
    model.remat_policy = policy
    want_loss, want = _step(model, False, window, checkpoint_layers, bf16)
    builds.cats = 0
    loss, grads = _step(model, True, window, checkpoint_layers, bf16)
    assert builds.cats == 2 * model.cfg.n_layers  # q/k/v/gate and gate/up, once per layer
    assert torch.equal(loss, want_loss)
    for name, g in want.items():
        assert torch.equal(grads[name], g), name
