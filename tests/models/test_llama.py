"""Linear-Llama: preset sizes, and the sequence-parallel model equals the single-process model."""

from __future__ import annotations

import pytest
import torch
from helpers import check_sp_model, run_distributed
from torch.utils._python_dispatch import TorchDispatchMode

from models import LinearLlama, num_parameters, preset
from runtime.errors import ConfigError
from runtime.mesh import resolve_dims


@pytest.mark.parametrize("name,target", [("125m", 125e6), ("400m", 400e6), ("1b", 1e9), ("3b", 3e9), ("8b", 8e9)])
def test_preset_sizes(name: str, target: float) -> None:
    with torch.device("meta"):
        n = num_parameters(LinearLlama(preset(name)))
    assert abs(n - target) / target < 0.10, n


def test_bad_model_config() -> None:
    with pytest.raises(ValueError, match="unknown layer letters"):
        preset("tiny", layout="LXA")
    with pytest.raises(ValueError, match="use one of"):
        preset("nope")


def test_resolve_dims() -> None:
    assert resolve_dims(8, None, 2, 2) == (2, 2, 2)
    with pytest.raises(ConfigError, match="launch 8 processes or set parallel.dp=1"):
        resolve_dims(4, 2, 2, 2)
    with pytest.raises(ConfigError, match="does not divide"):
        resolve_dims(6, None, 2, 2)


def _check_sp_model(rank: int, world: int) -> None:
    check_sp_model(rank, world, preset("tiny", layout="L", gate=True))


@pytest.mark.parametrize("sp", [2, 4])
def test_sp_model_matches_single_process(sp: int) -> None:
    run_distributed(_check_sp_model, sp)


class _CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.mm = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.mm += func is torch.ops.aten.mm.default
        return func(*args, **(kwargs or {}))


def _loss_and_grads(model: LinearLlama, tokens: torch.Tensor, checkpoint_layers: bool, policy: str):
    """(loss, gradients, matmuls run by the backward) of one step."""
    model.remat_policy = policy
    model.zero_grad(set_to_none=True)
    loss = model(tokens, checkpoint_layers=checkpoint_layers).float().square().mean()
    with _CountMatmuls() as count:
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, count.mm


@pytest.mark.parametrize("layout", ["LA"])
def test_selective_remat_equals_full_remat(layout: str) -> None:
    """parallel.remat_policy=selective keeps the widening matmuls' outputs and recomputes the rest: the same
    loss and gradients, bit for bit, as the full recompute and as no recompute (fp32, CPU)."""
    torch.manual_seed(0)
    model = LinearLlama(preset("tiny", layout=layout, gate=True)).double()
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 48))
    plain = _loss_and_grads(model, tokens, False, "full")
    matmuls = {}
    for policy in ("full", "selective"):
        loss, grads, matmuls[policy] = _loss_and_grads(model, tokens, True, policy)
        assert torch.equal(loss, plain[0]), policy
        for name, g in grads.items():
            assert torch.equal(g, plain[1][name]), (policy, name)
    # SwiGLU's gate/up in every block, and the input projection of a linear or Mamba-2 mixer (a softmax
    # mixer's q/k/v do not widen the stream)
    widening = sum(1 + (block.kind in "LM") for block in model.layers.values())
    assert matmuls["full"] - matmuls["selective"] == widening, matmuls


def test_selective_remat_keeps_only_widening_matmuls() -> None:
    """What the selective policy saves: the q/k/v/gate and gate/up products, not the square output projection."""
    from torch.utils.checkpoint import CheckpointPolicy

    from models.llama import _keep_widening_matmuls

    mm = torch.ops.aten.mm.default
    wide, square = torch.empty(4, 8), torch.empty(8, 24)
    assert _keep_widening_matmuls(None, mm, wide, square) == CheckpointPolicy.MUST_SAVE
    assert _keep_widening_matmuls(None, mm, torch.empty(4, 24), torch.empty(24, 8)) == CheckpointPolicy.PREFER_RECOMPUTE
    assert _keep_widening_matmuls(None, torch.ops.aten.mul.Tensor, wide, wide) == CheckpointPolicy.PREFER_RECOMPUTE


def test_short_conv_split_gives_the_parts_of_the_whole() -> None:
    """ShortConv(split=[...]) equals the whole convolution cut into parts — outputs, carried tail and every
    gradient — each part its own tensor (on the Triton kernel a contiguous one: tests/kernels/test_conv.py),
    so q, k and v reach the attention kernels without a copy; its backward joins the parts in one cat."""
    from models.llama import ShortConv
    from parallel.context import SINGLE

    g = torch.Generator().manual_seed(3)
    conv = ShortConv(12, 4, "torch").double()
    conv.weight.data = torch.randn(12, 1, 4, generator=g, dtype=torch.float64)
    x = torch.randn(2, 9, 12, generator=g, dtype=torch.float64, requires_grad=True)
    halo = torch.randn(2, 3, 12, generator=g, dtype=torch.float64)
    whole, tail = conv(x, SINGLE, halo)
    w = torch.randn_like(whole)
    want = torch.autograd.grad((whole * w).sum(), [x, conv.weight])
    parts, tail_split = conv(x, SINGLE, halo, split=[4, 6, 2])
    for part, ref in zip(parts, whole.split([4, 6, 2], dim=-1)):
        assert torch.allclose(part, ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(tail_split, tail)
    loss = sum((p * c).sum() for p, c in zip(parts, w.split([4, 6, 2], dim=-1)))
    got = torch.autograd.grad(loss, [x, conv.weight])
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    nodes = {type(f).__name__ for f in _walk(parts[0].grad_fn)}
    assert any(n.startswith("SplitWithSizesBackward") for n in nodes)  # one cat of the parts' gradients
    assert not any(n.startswith("SliceBackward") for n in nodes), nodes  # a slice would zero-fill all of x


def _walk(fn, depth: int = 8) -> list:
    """The autograd nodes within `depth` steps of fn."""
    out, frontier = [], [(fn, 0)]
    while frontier:
        f, d = frontier.pop()
        if f is not None and d <= depth:
            out.append(f)
            frontier += [(n, d + 1) for n, _ in f.next_functions]
    return out
