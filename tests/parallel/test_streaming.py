"""Streaming windows (DESIGN §9): a step that runs the sequence window by window equals the whole-sequence step."""

from __future__ import annotations

import pytest
import torch

from kernels.linear_cross_entropy import linear_cross_entropy
from models import LinearLlama, preset
from parallel.pipeline import _Recomputed
from parallel.streaming import streaming_step


def _model(**overrides) -> LinearLlama:
    torch.manual_seed(0)
    model = LinearLlama(preset("tiny", layout="L", gate=True, **overrides)).double()
    model.reset_parameters(3)
    return model.double()


def _batch(model: LinearLlama, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, model.cfg.vocab_size, (2, T + 1), generator=g)
    return data[:, :-1], data[:, 1:]


def _loss_fn(model: LinearLlama, n_tokens: int):
    return lambda h, y: linear_cross_entropy(h, model.head.weight, y, chunk_tokens=7) / n_tokens


def _grads(model: LinearLlama) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _whole(model: LinearLlama, x, y) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    loss = _loss_fn(model, y.numel())(model(x, logits=False), y)
    loss.backward()
    return loss.detach(), _grads(model)


@pytest.mark.parametrize("T,window,checkpoint_layers", [(40, 16, False), (40, 16, True), (13, 2, False),
                                                         (24, 24, False), (12, 1, False)])
def test_streaming_step_equals_whole_sequence(T: int, window: int, checkpoint_layers: bool) -> None:
    model = _model()
    x, y = _batch(model, T)
    ref_loss, ref_grads = _whole(model, x, y)
    model.zero_grad()
    loss = streaming_step(model, x, y, window, _loss_fn(model, y.numel()), checkpoint_layers, {"logits": False})
    assert abs(loss - ref_loss) / ref_loss < 1e-10
    grads = _grads(model)
    assert grads.keys() == ref_grads.keys()
    for name, want in ref_grads.items():
        err = ((grads[name] - want).norm() / want.norm()).item()
        assert err < 1e-9, (name, err)


def test_dropping_the_carried_state_changes_the_result(monkeypatch) -> None:
    model = _model()
    x, y = _batch(model, 40)
    ref_loss, _ = _whole(model, x, y)
    zero = model.zero_carries
    original = LinearLlama.forward_window

    def forgetful(self, x, carries, *args, **kwargs):  # every window starts from zero state
        return original(self, x, zero(x.shape[0], x.device), *args, **kwargs)

    monkeypatch.setattr(LinearLlama, "forward_window", forgetful)
    model.zero_grad()
    loss = streaming_step(model, x, y, 16, _loss_fn(model, y.numel()), False, {"logits": False})
    assert abs(loss - ref_loss) / ref_loss > 1e-6


def test_softmax_layers_do_not_stream() -> None:
    model = LinearLlama(preset("tiny", layout="LA"))
    with pytest.raises(ValueError, match="recurrent layers only"):
        model.zero_carries(1, torch.device("cpu"))


CARRY_LAYOUTS = {"LL": dict(layout="LL", gate=True, short_conv=4),
                 "MM": dict(layout="MM", ssm_head_dim=16, ssm_state=8, ssm_groups=2, gate=True),
                 "DD": dict(layout="DD")}


def _fp32_model(name: str) -> LinearLlama:
    model = LinearLlama(preset("tiny", n_layers=2, **CARRY_LAYOUTS[name]))
    model.reset_parameters(5)
    return model


def _carry_tensors(carries: dict) -> list[torch.Tensor | None]:
    return [t for key in sorted(carries) for t in carries[key]]


@pytest.mark.parametrize("name", sorted(CARRY_LAYOUTS))
def test_carry_only_window_gives_the_same_carries(name: str) -> None:
    """`carry_only=True` returns no output and carries bitwise equal to the full window's (from nonzero carries)."""
    model = _fp32_model(name)
    x = torch.randint(0, model.cfg.vocab_size, (2, 2, 21), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _, entering = model.forward_window(x[0], model.zero_carries(2, x.device))
        out, want = model.forward_window(x[1], entering)
        none, got = model.forward_window(x[1], entering, carry_only=True)
        wrapped, via_stage = _Recomputed(model, {"logits": False}).forward_window(x[1], entering, carry_only=True)
    assert out is not None and none is None and wrapped is None
    assert got.keys() == want.keys() == via_stage.keys()
    for a, b, c in zip(_carry_tensors(got), _carry_tensors(want), _carry_tensors(via_stage)):
        assert (a is None) == (b is None) == (c is None)
        if a is not None:
            assert torch.equal(a, b) and torch.equal(c, b)
    assert sum(t is not None for t in _carry_tensors(got)) == 4  # a state and a conv tail per layer


def test_carry_only_skips_the_last_blocks_mlp_and_the_head() -> None:
    """The last block's MLP, output projection and the head do not run; the block itself is still called
    through its hooks (FSDP2 unshards a block's parameters in its forward pre-hook)."""
    model = _fp32_model("LL")
    calls = {"block": 0, "mlp": 0, "o": 0, "head": 0}
    last = model.layers[str(model.cfg.n_layers - 1)]
    for name, module in (("block", last), ("mlp", last.mlp), ("o", last.mixer.o), ("head", model.head)):
        module.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    x = torch.randint(0, model.cfg.vocab_size, (1, 9))
    with torch.no_grad():
        model.forward_window(x, model.zero_carries(1, x.device), carry_only=True)
        assert calls == {"block": 1, "mlp": 0, "o": 0, "head": 0}
        model.forward_window(x, model.zero_carries(1, x.device))
    assert calls == {"block": 2, "mlp": 1, "o": 1, "head": 1}


@pytest.mark.parametrize("name", sorted(CARRY_LAYOUTS))
def test_mixer_without_output_needs_a_carry(name: str) -> None:
    mixer = _fp32_model(name).layers["0"].mixer
    with pytest.raises(ValueError, match="needs a carry"):
        mixer(torch.zeros(1, 4, 64), output=False)  # tiny: dim 64


def test_streaming_step_runs_the_last_mlp_only_in_backward() -> None:
    """The no-grad carry pass over windows 0 … W−2 skips the last block's MLP: it runs once per window (backward)."""
    model = _model()
    calls = []
    model.layers[str(model.cfg.n_layers - 1)].mlp.register_forward_hook(lambda *_: calls.append(1))
    x, y = _batch(model, 40)
    streaming_step(model, x, y, 16, _loss_fn(model, y.numel()), False, {"logits": False})
    assert len(calls) == 3
