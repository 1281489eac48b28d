"""Token-wise work in tiles equals the whole-sequence computation: outputs and every gradient."""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err

from models import LinearLlama, preset
from parallel.tiling import tiled, tiled_residual


@pytest.mark.parametrize("T,tile", [(40, 16), (40, 7), (40, 40), (5, 2)])
def test_tiled_block_equals_the_plain_block(T: int, tile: int) -> None:
    torch.manual_seed(0)
    model = LinearLlama(preset("tiny", layout="L", gate=True)).double()
    block = model.layers["0"]
    h = torch.randn(2, T, model.cfg.dim, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, T, model.cfg.dim, dtype=torch.float64)

    def run(t: int):
        block.zero_grad()
        h.grad = None
        block.mlp_tile = t
        out = block(h)
        (out * w).sum().backward()
        return out.detach(), h.grad.clone(), {n: p.grad.clone() for n, p in block.named_parameters()}

    ref_out, ref_dh, ref_grads = run(0)
    out, dh, grads = run(tile)
    assert rel_err(out, ref_out) < 1e-12
    assert rel_err(dh, ref_dh) < 1e-12
    for name, want in ref_grads.items():
        assert rel_err(grads[name], want) < 1e-12, name


def test_tiles_keep_only_the_input() -> None:
    """Forward saves the input alone, not the O(T) internals of the token-wise part."""
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.SiLU(), torch.nn.Linear(64, 8))
    x = torch.randn(1, 100, 8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        tiled(mlp, x, 10, mlp.parameters())
    assert saved == [x.numel()]


def test_bf16_autocast_stores_bf16_layer_inputs() -> None:
    """Under bf16 autocast the residual stream, and so every checkpointed layer input, is bf16."""
    torch.manual_seed(0)
    model = LinearLlama(preset("tiny", layout="L"))
    x = torch.randint(0, model.cfg.vocab_size, (2, 32))
    dtypes = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 3 and t.shape[:2] == x.shape:  # activations [B, T, d], not parameters
            dtypes.append(t.dtype)
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x, checkpoint_layers=True, logits=False)
    assert out.dtype == torch.bfloat16
    layer_inputs = dtypes[: model.cfg.n_layers]  # the checkpoint of each block saves its input, in order
    assert len(layer_inputs) == model.cfg.n_layers and all(d == torch.bfloat16 for d in layer_inputs), dtypes
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(x, logits=False)
    ref = model(x, logits=False)
    assert rel_err(plain.float(), ref) < 5e-2  # bf16 rounding of the stream


def _mlp_tokens(model: LinearLlama) -> dict[str, list[int]]:
    """Tokens each SwiGLU hidden layer (gate/up GEMM) and down projection of `model` computes, in order."""
    seen: dict[str, list[int]] = {"hidden": [], "down": []}
    for block in model.layers.values():
        mlp = block.mlp
        mlp.hidden = lambda x, f=mlp.hidden: seen["hidden"].append(x.shape[1]) or f(x)
        mlp.down.register_forward_hook(lambda mod, args, out: seen["down"].append(args[0].shape[1]))
    return seen


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_a_recomputed_tiled_block_equals_the_plain_block(policy: str) -> None:
    """Re-materialized blocks with a tiled MLP give the plain model's loss and gradients. Under full
    re-materialization the MLP's hidden layer runs forward twice per token (the step's forward and the tiled
    backward) and its down projection once, as in an untiled block: the block's recompute skips the MLP (one probe
    token per block instead) and the tiled backward skips the down projection; selective re-materialization
    replays every forward operation, so three and two times."""
    torch.manual_seed(0)
    model = LinearLlama(preset("tiny", layout="LA", gate=True)).double()
    x = torch.randint(0, model.cfg.vocab_size, (2, 40))

    def run(tile: int, checkpoint_layers: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        model.remat_policy = policy
        for block in model.layers.values():
            block.mlp_tile = tile
        loss = model(x, checkpoint_layers=checkpoint_layers).logsumexp(-1).mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref_grads = run(0, False)
    seen = _mlp_tokens(model)
    loss, grads = run(16, True)
    assert rel_err(loss, ref_loss) < 1e-12
    assert grads.keys() == ref_grads.keys()
    for name, want in ref_grads.items():
        assert rel_err(grads[name], want) < 1e-12, name
    layers = model.cfg.n_layers
    T = x.shape[1]
    hidden, down = (2 * T + 1, T + 1) if policy == "full" else (3 * T, 2 * T)
    assert sum(seen["hidden"]) == layers * hidden, seen
    assert sum(seen["down"]) == layers * down, seen


def test_tiles_outside_a_region_end_run_in_the_recompute() -> None:
    """A `tiled` call (no ends_region) inside a re-materialized region computes its output in the recompute too
    (something after it may use it): three forwards of fn per token."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.SiLU(), torch.nn.Linear(32, 8)).double()
    seen: list[int] = []
    mlp.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[1]))
    x = torch.randn(1, 30, 8, dtype=torch.float64, requires_grad=True)

    def region(h: torch.Tensor) -> torch.Tensor:
        return tiled(mlp, h, 10, mlp.parameters()).tanh()  # the tanh uses the tiled output

    ref = torch.autograd.grad(mlp(x).tanh().sum(), x)[0]
    seen.clear()
    got = torch.autograd.grad(checkpoint(region, x, use_reentrant=False).sum(), x)[0]
    assert rel_err(got, ref) < 1e-12
    assert sum(seen) == 3 * x.shape[1]


def test_tiled_residual_refuses_a_biased_projection() -> None:
    proj = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="bias-free"):
        tiled_residual(torch.nn.Identity(), proj, torch.randn(1, 8, 4), 2, [])
