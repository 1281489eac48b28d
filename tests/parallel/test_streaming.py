"""Streaming windows (DESIGN §9): a step that runs the sequence window by window equals the whole-sequence step."""

from __future__ import annotations

import pytest
import torch

from kernels.linear_cross_entropy import linear_cross_entropy
from models import LinearLlama, preset
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
