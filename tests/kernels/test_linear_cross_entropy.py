"""Chunked linear cross-entropy (kernels/linear_cross_entropy.py) against F.cross_entropy(F.linear(h, W))."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from kernels.linear_cross_entropy import linear_argmax_hits, linear_cross_entropy

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 (the plain difference where b is 0)."""
    a, b = a.detach().double(), b.detach().double()
    den = b.norm().item()
    return (a - b).norm().item() / den if den > 0 else (a - b).norm().item()


def _inputs(N, V, d, *, dtype=torch.float32, ignored=0.25, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g, dtype=torch.float64).to(device, dtype)
    w = (torch.randn(V, d, generator=g, dtype=torch.float64) / d**0.5).to(device, dtype)
    t = torch.randint(0, V, (N,), generator=g)
    t[torch.rand(N, generator=g) < ignored] = -100
    return h, w, t.to(device)


def _plain(h, w, t):
    return F.cross_entropy(F.linear(h, w).float() if h.dtype != torch.float64 else F.linear(h, w), t, reduction="sum")


def _loss_and_grads(fn, h, w, t, scale=1.0, **kw):
    hl, wl = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fn(hl, wl, t, **kw)
    (loss * scale).backward()
    return loss, hl.grad, wl.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "f64"])
@pytest.mark.parametrize("N,chunk,ignored", [(53, 16, 0.25), (40, 64, 0.25), (37, 1, 0.0), (24, 7, 1.0)],
                         ids=["ragged-chunks", "one-chunk", "chunk-1", "all-ignored"])
def test_matches_plain_cross_entropy(dtype, N, chunk, ignored):
    h, w, t = _inputs(N, 96, 24, dtype=dtype, ignored=ignored)
    loss, dh, dw = _loss_and_grads(linear_cross_entropy, h, w, t, scale=0.5, chunk_tokens=chunk)
    loss_r, dh_r, dw_r = _loss_and_grads(_plain, h, w, t, scale=0.5)
    assert loss.dim() == 0 and loss.dtype == loss_r.dtype and _err(loss, loss_r) < TOL[dtype]
    assert dh.dtype == dtype and _err(dh, dh_r) < TOL[dtype]
    assert dw.dtype == dtype and _err(dw, dw_r) < TOL[dtype]


def test_batched_shapes_and_custom_ignore_index():
    h, w, t = _inputs(30, 50, 16, ignored=0.0)
    t[::4] = 7
    loss = linear_cross_entropy(h.view(2, 15, 16), w, t.view(2, 15), ignore_index=7, chunk_tokens=8)
    keep = t != 7
    assert _err(loss, F.cross_entropy(h[keep] @ w.t(), t[keep], reduction="sum")) < 1e-5


def test_no_tokens():
    h, w, t = _inputs(0, 32, 8)
    loss, dh, dw = _loss_and_grads(linear_cross_entropy, h, w, t)
    assert loss.item() == 0.0 and dh.shape == (0, 8)
    assert not dw.any()


def test_tied_weight_gradients_accumulate():
    """The head tied to an embedding: the weight's gradient sums the embedding's and the loss's shares."""
    V, d, N = 40, 12, 33
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(V, d, generator=g)
    tokens, targets = torch.randint(0, V, (N,), generator=g), torch.randint(0, V, (N,), generator=g)
    proj = torch.randn(d, d, generator=g) / d**0.5

    def grads(loss_fn):
        w = emb.clone().requires_grad_()
        h = torch.tanh(F.embedding(tokens, w) @ proj)
        loss_fn(h, w, targets).backward()
        return w.grad

    dw = grads(lambda h, w, t: linear_cross_entropy(h, w, t, chunk_tokens=10))
    assert _err(dw, grads(_plain)) < 1e-5


def test_frozen_inputs_get_no_gradient():
    h, w, t = _inputs(20, 30, 8)
    hl = h.clone().requires_grad_()
    linear_cross_entropy(hl, w, t, chunk_tokens=6).backward()
    wl = w.clone().requires_grad_()
    linear_cross_entropy(h, wl, t, chunk_tokens=6).backward()
    assert _err(hl.grad, _loss_and_grads(_plain, h, w, t)[1]) < 1e-5
    assert _err(wl.grad, _loss_and_grads(_plain, h, w, t)[2]) < 1e-5
    assert linear_cross_entropy(h, w, t).grad_fn is None


def test_cuda_autocast_leaves_cpu_precision():
    """Inside torch.autocast("cuda") CPU fp32 inputs still compute in fp32 (and float64 in float64)."""
    h, w, t = _inputs(25, 30, 8, dtype=torch.float64)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.cuda.is_available()):
        loss32 = linear_cross_entropy(h.float(), w.float(), t, chunk_tokens=8)
        loss64 = linear_cross_entropy(h, w, t, chunk_tokens=8)
    assert loss32.dtype == torch.float32 and _err(loss32, _plain(h.float(), w.float(), t)) < 1e-5
    assert loss64.dtype == torch.float64 and _err(loss64, _plain(h, w, t)) < 1e-12


def test_cpu_autocast_runs_the_matmuls_in_bf16():
    h, w, t = _inputs(40, 64, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, dh, dw = _loss_and_grads(linear_cross_entropy, h, w, t, chunk_tokens=16)
        loss_r, dh_r, dw_r = _loss_and_grads(_plain, h, w, t)
    assert loss.dtype == torch.float32 and _err(loss, loss_r) < 1e-3
    assert dh.dtype == torch.float32 and _err(dh, dh_r) < 2e-2
    assert dw.dtype == torch.float32 and _err(dw, dw_r) < 2e-2


@pytest.mark.parametrize("chunk", [7, 100])
def test_argmax_hits(chunk):
    h, w, t = _inputs(60, 20, 8, ignored=0.3)
    t[:10] = F.linear(h[:10], w).argmax(-1)  # some hits for sure
    hits, count = linear_argmax_hits(h, w, t, chunk_tokens=chunk)
    asked = t != -100
    assert hits.item() == (F.linear(h, w).argmax(-1)[asked] == t[asked]).sum().item() and hits.item() >= 10
    assert count.item() == asked.sum().item()


class _LargestAllocation(TorchDispatchMode):
    """Records the largest element count of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.largest = max(self.largest, o.numel())
        return out


def test_no_tensor_of_all_logits():
    """N·V = 16× a chunk's logits: nothing allocated beyond one chunk of logits (the plain path allocates N·V),
    nothing of N·V saved."""
    N, V, d, chunk = 256, 1000, 8, 16
    h, w, t = _inputs(N, V, d)
    hl, wl = h.clone().requires_grad_(), w.clone().requires_grad_()
    saved = []
    with _LargestAllocation() as mode, torch.autograd.graph.saved_tensors_hooks(
            lambda x: saved.append(x.numel()) or x, lambda x: x):
        loss = linear_cross_entropy(hl, wl, t, chunk_tokens=chunk)
        loss.backward()
    with _LargestAllocation() as plain:
        _plain(h, w, t)
    assert mode.largest <= chunk * V < N * V <= plain.largest
    assert max(saved) <= max(N * d, V * d) and sum(saved) <= N * d + V * d
    assert _err(wl.grad, _loss_and_grads(_plain, h, w, t)[2]) < 1e-5


@pytest.mark.parametrize("bad", [dict(w=torch.zeros(5, 7)), dict(t=torch.zeros(4, dtype=torch.long)),
                                 dict(chunk_tokens=0)], ids=["d", "targets", "chunk"])
def test_bad_arguments(bad):
    args = dict(h=torch.zeros(3, 8), w=torch.zeros(5, 8), t=torch.zeros(3, dtype=torch.long))
    chunk = bad.pop("chunk_tokens", None)
    args |= bad
    with pytest.raises(ValueError):
        linear_cross_entropy(args["h"], args["w"], args["t"], chunk_tokens=chunk)


# ------------------------------------------------------------------------------------ GPU

@gpu
@needs_cuda
def test_gpu_autocast_bf16_and_peak_memory():
    """Under bf16 autocast at N = 65536, V = 32000, d = 2048: the loss matches the plain fp32-logits path, the
    gradients match its bf16 gradients, and the peak stays near one 8192-token chunk of logits."""
    N, V, d = 65536, 32000, 2048
    h, w, t = _inputs(N, V, d, ignored=0.1, device="cuda", seed=2)
    h = h.bfloat16()  # the head's input under autocast

    def run(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = _loss_and_grads(fn, h, w, t)
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - base

    (loss, dh, dw), peak = run(linear_cross_entropy)
    (loss_r, dh_r, dw_r), peak_r = run(_plain)
    assert loss.dtype == torch.float32 and _err(loss, loss_r) < 1e-3
    assert dh.dtype == torch.bfloat16 and _err(dh, dh_r) < 2e-2
    assert dw.dtype == torch.float32 and _err(dw, dw_r) < 2e-2
    assert peak < 4 * 2**30 and peak < peak_r / 4, (peak / 2**30, peak_r / 2**30)
