"""kernels.linear_attention (chunked PyTorch) vs the step-by-step float64 recurrence."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err

from kernels import linear_attention, linear_attention_recurrent

FLAGS = list(itertools.product([False, True], repeat=3))  # (decay, gate, initial_state)


def _case(T: int, decay: bool, gate: bool, init: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed + T)
    B, H, K, V = 2, 2, 8, 12
    q, k, v = (torch.randn(B, T, H, d, generator=g, dtype=torch.float64) for d in (K, K, V))
    inputs = dict(
        q=q, k=k, v=v,
        log_decay=-torch.rand(H, generator=g, dtype=torch.float64) * 0.2 if decay else None,
        gate=F.logsigmoid(torch.randn(B, T, H, generator=g, dtype=torch.float64) + 1) if gate else None,
        initial_state=torch.randn(B, H, K, V, generator=g, dtype=torch.float64) if init else None,
    )
    w_o = torch.randn(B, T, H, V, generator=g, dtype=torch.float64)
    w_s = torch.randn(B, H, K, V, generator=g, dtype=torch.float64)
    return inputs, w_o, w_s


def _run(fn, inputs: dict, w_o, w_s, dtype: torch.dtype, **kw):
    leaves = {n: t.detach().to(dtype).requires_grad_() for n, t in inputs.items() if t is not None}
    o, s = fn(**{**dict.fromkeys(inputs), **leaves}, output_final_state=True, **kw)
    loss = (o.double() * w_o).sum() + (s.double() * w_s).sum()  # a gradient arrives on the final state too
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return o.double(), s.double(), dict(zip(leaves, (g.double() for g in grads)))


@pytest.mark.parametrize("T", [1, 7, 64, 100, 257])
@pytest.mark.parametrize("decay,gate,init", FLAGS)
def test_chunked_matches_recurrence(T: int, decay: bool, gate: bool, init: bool) -> None:
    inputs, w_o, w_s = _case(T, decay, gate, init)
    ref_o, ref_s, ref_g = _run(linear_attention_recurrent, inputs, w_o, w_s, torch.float64)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        o, s, g = _run(linear_attention, inputs, w_o, w_s, dtype, chunk_size=16, backend="torch")
        assert rel_err(o, ref_o, floor=1.0) < tol and rel_err(s, ref_s, floor=1.0) < tol, dtype
        assert set(g) == set(ref_g)
        for name in g:
            err = rel_err(g[name], ref_g[name], floor=1.0)
            assert err < tol, (dtype, name, err)


def test_defaults_and_dtypes() -> None:
    q, k, v = (torch.randn(1, 70, 2, 16, dtype=torch.bfloat16) for _ in range(3))
    o, s = linear_attention(q, k, v)
    assert o.dtype == torch.bfloat16 and s is None
    _, s = linear_attention(q, k, v, output_final_state=True)
    assert s.dtype == torch.float32 and s.shape == (1, 2, 16, 16)


def test_bad_shapes_are_named() -> None:
    q = torch.randn(1, 5, 2, 4)
    with pytest.raises(ValueError, match=r"v must be \[B, T, H, V\]"):
        linear_attention(q, q, torch.randn(1, 4, 2, 4))
    with pytest.raises(ValueError, match=r"gate must be \[B, T, H\]"):
        linear_attention(q, q, q, gate=torch.zeros(1, 5))
    with pytest.raises(ValueError, match="backend"):
        linear_attention(q, q, q, backend="cuda")
