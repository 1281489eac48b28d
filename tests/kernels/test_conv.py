"""Triton causal short convolution (kernels/conv) against the cat + conv1d + SiLU reference.

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set before triton is
imported) at small sizes and small tiles; tests marked ``gpu`` run the model's size in bf16. Every test of a
gradient runs on both backward kernels (the ``bwd`` fixture: scratch and direct).
"""

from __future__ import annotations

import dataclasses
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

import kernels.conv.triton_conv as tc  # noqa: E402
from kernels.conv import short_conv, short_conv_reference  # noqa: E402

# an overflow inside the interpreter means a kernel read memory it should have masked
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# tiles small enough that the interpreter sees several T- and D-blocks; SMALL: each backward program walks
# a row's every T-block; PER_BLOCK: one T-block per program (many dW partial sums)
SMALL = tc.ConvConfig(fwd_block_t=16, fwd_block_d=16, bwd_block_t=8, bwd_block_d=16, bwd_programs=1,
                      bwd_direct_block_t=8, bwd_direct_block_d=16, bwd_direct_warps=4)
PER_BLOCK = tc.ConvConfig(fwd_block_t=8, fwd_block_d=8, bwd_block_t=8, bwd_block_d=8, bwd_programs=1 << 20,
                          bwd_direct_block_t=8, bwd_direct_block_d=8, bwd_direct_warps=4)


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.setattr(tc, "CONFIG", SMALL)


@pytest.fixture(params=[False, True], ids=["bwd-scratch", "bwd-direct"])
def bwd(request, monkeypatch, _small_tiles):
    """The backward kernel under test (CONFIG.bwd_direct, on top of the tiles set so far): False the scratch
    kernel, True the direct one. A test that sets its own config passes it through `_with_bwd`."""
    monkeypatch.setattr(tc, "CONFIG", dataclasses.replace(tc.CONFIG, bwd_direct=request.param))
    return request.param


def _with_bwd(cfg: tc.ConvConfig, direct: bool) -> tc.ConvConfig:
    return dataclasses.replace(cfg, bwd_direct=direct)


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 (0 for two empty or zero tensors); NaN anywhere gives inf."""
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    den = b.norm().item()
    return (a - b).norm().item() / den if den > 0 else (a - b).norm().item()


def _inputs(B, T, D, w, *, halo, dtype=torch.float32, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=g).to(device, dtype)
    weight = (torch.rand(D, 1, w, generator=g) * 2 - 1).to(device) / w**0.5
    h = torch.randn(B, w - 1, D, generator=g).to(device, dtype) if halo else None
    dy = torch.randn(B, T, D, generator=g).to(device, dtype)
    return x, weight, h, dy


def _run(fn, x, weight, halo, dy, **kw):
    """y and the gradients of ⟨y, dy⟩ w.r.t. x, weight and halo (None without a halo)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, weight, halo)]
    y = fn(*leaves, **kw)
    grads = torch.autograd.grad((y.double() * dy.double()).sum(), [t for t in leaves if t is not None])
    return y, *grads, *([None] if halo is None else [])


# ------------------------------------------------------------------------------------ CPU / interpreter

SHAPES = [  # (B, T, D, w): several blocks with a ragged tail, T = 1, T < w − 1, w = 1, w = 8
    (2, 29, 18, 4),
    (1, 1, 5, 4),
    (2, 2, 12, 4),
    (1, 5, 8, 8),
    (1, 19, 16, 1),
    (2, 24, 9, 3),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-T{}-D{}-w{}".format(*s))
@pytest.mark.parametrize("halo", [False, True], ids=["zeros", "halo"])
@pytest.mark.parametrize("activation", ["silu", None], ids=["silu", "linear"])
def test_matches_reference(shape, halo, activation, bwd):
    x, weight, h, dy = _inputs(*shape, halo=halo)
    y, dx, dw, dh = _run(short_conv, x, weight, h, dy, activation=activation, backend="triton")
    y_r, dx_r, dw_r, dh_r = _run(short_conv_reference, x, weight, h, dy, activation=activation)
    assert y.dtype == x.dtype and _err(y, y_r) < 1e-5
    assert _err(dx, dx_r) < 1e-5
    assert dw.shape == weight.shape and _err(dw, dw_r) < 1e-5
    assert dh is dh_r or _err(dh, dh_r) < 1e-5


@pytest.mark.parametrize("shape", [(1, 29, 12, 4), (1, 6, 8, 8)], ids=["ragged", "T<w-1"])
def test_one_block_per_backward_program(shape, monkeypatch, bwd):
    """Every backward program owns one T-block: dW is a sum of many partials, d halo comes from chunk 0 only."""
    monkeypatch.setattr(tc, "CONFIG", _with_bwd(PER_BLOCK, bwd))
    x, weight, h, dy = _inputs(*shape, halo=True, seed=1)
    _, dx, dw, dh = _run(short_conv, x, weight, h, dy, backend="triton")
    _, dx_r, dw_r, dh_r = _run(short_conv_reference, x, weight, h, dy)
    assert _err(dx, dx_r) < 1e-5
    assert _err(dw, dw_r) < 1e-5
    assert _err(dh, dh_r) < 1e-5


def test_short_blocks_several_per_chunk(monkeypatch, bwd):
    """T-blocks of 4 rows (< w − 1 = 5), 3 per chunk over 2 chunks (the last ragged): the first chunk has 2 blocks
    that read the halo (the direct kernel's halo loop) before one that does not; the second reads no halo."""
    cfg = dataclasses.replace(PER_BLOCK, bwd_block_t=4, bwd_direct_block_t=4, bwd_programs=2)
    monkeypatch.setattr(tc, "CONFIG", _with_bwd(cfg, bwd))
    x, weight, h, dy = _inputs(1, 17, 8, 6, halo=True, seed=6)
    _, dx, dw, dh = _run(short_conv, x, weight, h, dy, backend="triton")
    _, dx_r, dw_r, dh_r = _run(short_conv_reference, x, weight, h, dy)
    assert _err(dx, dx_r) < 1e-5
    assert _err(dw, dw_r) < 1e-5
    assert _err(dh, dh_r) < 1e-5


@pytest.mark.parametrize("block_t", [2, 4], ids=["BT2", "BT4"])
def test_forward_blocks_that_start_inside_the_halo(block_t, monkeypatch):
    """Forward T-blocks of 2 or 4 rows with w = 6: the first blocks (t0 < w − 1 = 5) pick each row from x or the
    halo, the later ones read x only; the output equals the reference's on every row."""
    monkeypatch.setattr(tc, "CONFIG", dataclasses.replace(PER_BLOCK, fwd_block_t=block_t))
    x, weight, h, _ = _inputs(1, 13, 8, 6, halo=True, seed=7)
    y = short_conv(x, weight, h, backend="triton")
    assert _err(y, short_conv_reference(x, weight, h)) < 1e-5


def test_strided_input_and_flat_weight(bwd):
    """x a channel slice of a wider tensor (row stride ≠ D) and weight given as [D, w]."""
    x, weight, h, dy = _inputs(1, 21, 16, 4, halo=True, seed=2)
    wide = torch.randn(1, 21, 40, device=DEVICE)
    wide[..., 8:24] = x
    xs = wide.clone().requires_grad_()
    w2 = weight.reshape(16, 4).clone().requires_grad_()
    y = short_conv(xs[..., 8:24], w2, h, backend="triton")
    (y * dy).sum().backward()
    y_r, dx_r, dw_r, _ = _run(short_conv_reference, x, weight, h, dy)
    assert _err(y, y_r) < 1e-5
    assert _err(xs.grad[..., 8:24], dx_r) < 1e-5 and not xs.grad[..., :8].any() and not xs.grad[..., 24:].any()
    assert w2.grad.shape == (16, 4) and _err(w2.grad, dw_r.reshape(16, 4)) < 1e-5


def test_half_inputs_fp32_weight(bwd):
    """fp16 x and halo with an fp32 weight: outputs and dx, d halo in fp16, dW in fp32, fp32 accuracy inside."""
    x, weight, h, dy = _inputs(1, 30, 16, 4, halo=True, dtype=torch.float16, seed=3)
    y, dx, dw, dh = _run(short_conv, x, weight, h, dy, backend="triton")
    y_r, dx_r, dw_r, dh_r = _run(short_conv_reference, x.float(), weight, h.float(), dy.float())
    assert y.dtype == torch.float16 and _err(y, y_r) < 2e-3
    assert dx.dtype == torch.float16 and _err(dx, dx_r) < 2e-3
    assert dw.dtype == torch.float32 and _err(dw, dw_r) < 1e-5
    assert dh.dtype == torch.float16 and _err(dh, dh_r) < 2e-3


def test_auto_backend_on_cpu_is_the_reference():
    x, weight, h, _ = _inputs(1, 9, 4, 4, halo=True, device="cpu")
    assert torch.equal(short_conv(x, weight, h), short_conv_reference(x, weight, h))


@pytest.mark.parametrize("bad", [
    dict(x=torch.zeros(4, 8)), dict(x=torch.zeros(1, 0, 8)), dict(weight=torch.zeros(7, 4)),
    dict(weight=torch.zeros(8, 2, 4)), dict(weight=torch.zeros(8, 9)), dict(halo=torch.zeros(1, 2, 8)),
    dict(activation="gelu"), dict(backend="cuda"),
], ids=["x-2d", "empty", "weight-D", "weight-3d", "w>8", "halo", "activation", "backend"])
def test_bad_arguments(bad):
    args = dict(x=torch.zeros(1, 5, 8), weight=torch.zeros(8, 1, 4), halo=None, activation="silu", backend="torch")
    with pytest.raises(ValueError):
        short_conv(**(args | bad))


# ------------------------------------------------------------------------------------ GPU

@gpu
@needs_cuda
@pytest.mark.parametrize("halo", [False, True], ids=["zeros", "halo"])
def test_gpu_model_size_bf16(halo, bwd):
    """bf16 at the model's size (T = 65536, D = 3·2048, w = 4) against the fp32 reference on the same inputs."""
    x, weight, h, dy = _inputs(1, 65536, 6144, 4, halo=halo, dtype=torch.bfloat16, device="cuda", seed=4)
    y, dx, dw, dh = _run(short_conv, x, weight, h, dy)
    y_r, dx_r, dw_r, dh_r = _run(short_conv_reference, x.float(), weight, None if h is None else h.float(), dy)
    assert y.dtype == torch.bfloat16 and _err(y, y_r) < 1e-2
    assert _err(dx, dx_r) < 1e-2
    assert _err(dw, dw_r) < 1e-4
    assert dh is dh_r or _err(dh, dh_r) < 1e-2


@gpu
@needs_cuda
def test_gpu_fp32_matches_reference(bwd):
    x, weight, h, dy = _inputs(3, 4099, 200, 4, halo=True, device="cuda", seed=5)
    y, dx, dw, dh = _run(short_conv, x, weight, h, dy)
    y_r, dx_r, dw_r, dh_r = _run(short_conv_reference, x.double(), weight.double(), h.double(), dy)
    assert _err(y, y_r) < 1e-6
    assert _err(dx, dx_r) < 1e-6
    assert _err(dw, dw_r) < 1e-5
    assert _err(dh, dh_r) < 1e-6
