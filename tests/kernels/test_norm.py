"""Triton RMSNorm (kernels/norm) against the fp32 PyTorch reference: outputs and both gradients.

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set by tests/helpers.py) at small
sizes and small tiles; tests marked ``gpu`` run the model's sizes in bf16.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: E402
from helpers import KERNEL_DEVICE as DEVICE
from helpers import kernel_err as _err
from helpers import needs_cuda

triton = pytest.importorskip("triton")

import kernels.norm.triton_norm as tn  # noqa: E402
from kernels.norm import rms_norm, rms_norm_reference  # noqa: E402

# an overflow inside the interpreter means a kernel read memory it should have masked
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")
gpu = pytest.mark.gpu

# tiles small enough that the interpreter sees several row blocks (BR = 128 // next_pow2(D) rows) and three
# backward programs (three dw partials); WIDE: rows wider than 16 loop over 16-column chunks
SMALL = tn.NormConfig(fwd_tile=128, bwd_tile=128, max_block_d=64, cpu_bwd_programs=3)
WIDE = tn.NormConfig(fwd_tile=32, bwd_tile=32, max_block_d=16, cpu_bwd_programs=3)


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.setattr(tn, "CONFIG", SMALL)


def _inputs(shape, *, dtype=torch.float32, wdtype=torch.float32, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3).to(device, dtype)
    weight = (torch.rand(shape[-1], generator=g) + 0.5).to(device, wdtype)
    dy = torch.randn(shape, generator=g).to(device, dtype)
    return x, weight, dy


def _run(fn, x, weight, dy, **kw):
    """y and the gradients of ⟨y, dy⟩ w.r.t. x and weight."""
    xl, wl = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    y = fn(xl, wl, **kw)
    return y, *torch.autograd.grad((y.double() * dy.double()).sum(), [xl, wl])


# ------------------------------------------------------------------------------------ CPU / interpreter

SHAPES = [  # D a power of two or not, rows not a multiple of the block, 2-D / 3-D / 4-D, one row, D = 3
    (2, 37, 16),
    (39, 48),
    (3, 5, 64),
    (1, 7, 3, 12),
    (1, 24),
    (5, 3),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape):
    x, weight, dy = _inputs(shape)
    y, dx, dw = _run(rms_norm, x, weight, dy, backend="triton")
    y_r, dx_r, dw_r = _run(rms_norm_reference, x, weight, dy)
    assert y.shape == x.shape and y.dtype == x.dtype and _err(y, y_r) < 1e-5
    assert dx.shape == x.shape and _err(dx, dx_r) < 1e-5
    assert dw.shape == weight.shape and _err(dw, dw_r) < 1e-5


@pytest.mark.parametrize("shape", [(2, 7, 48), (11, 40)], ids=["D48", "D40-ragged-chunk"])
def test_wide_rows_loop_over_chunks(shape, monkeypatch):
    """Rows wider than max_block_d: two passes over column chunks, dw added to each program's partial in place."""
    monkeypatch.setattr(tn, "CONFIG", WIDE)
    x, weight, dy = _inputs(shape, seed=1)
    y, dx, dw = _run(rms_norm, x, weight, dy, backend="triton")
    y_r, dx_r, dw_r = _run(rms_norm_reference, x, weight, dy)
    assert _err(y, y_r) < 1e-5
    assert _err(dx, dx_r) < 1e-5
    assert _err(dw, dw_r) < 1e-5


def test_reference_matches_torch_rms_norm():
    x, weight, _ = _inputs((3, 9, 48), device="cpu", seed=2)
    assert _err(rms_norm_reference(x, weight, 1e-5), F.rms_norm(x, (48,), weight, 1e-5)) < 1e-6


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16], ids=["w-fp32", "w-bf16"])
def test_bf16_inputs(wdtype):
    """bf16 x with an fp32 or bf16 weight: y and dx in bf16, dw in weight's dtype, against the fp32 reference.

    The interpreter rounds fp32 → bf16 toward zero (≈ 3.3e-3 here; the GPU rounds to nearest, ≈ 1.7e-3)."""
    x, weight, dy = _inputs((2, 37, 64), dtype=torch.bfloat16, wdtype=wdtype, seed=3)
    y, dx, dw = _run(rms_norm, x, weight, dy, backend="triton")
    y_r, dx_r, dw_r = _run(rms_norm_reference, x.float(), weight.float(), dy.float())
    assert y.dtype == torch.bfloat16 and _err(y, y_r) < 5e-3
    assert dx.dtype == torch.bfloat16 and _err(dx, dx_r) < 5e-3
    assert dw.dtype == wdtype and _err(dw, dw_r) < (1e-5 if wdtype == torch.float32 else 5e-3)


def test_strided_input_frozen_weight_and_expanded_grad():
    """x a column slice of a wider tensor (row stride ≠ D), a weight without grad, dy all ones (stride 0)."""
    x, weight, _ = _inputs((2, 13, 16), seed=4)
    wide = torch.randn(2, 13, 40, device=DEVICE)
    wide[..., 8:24] = x
    xs = wide.clone().requires_grad_()
    y = rms_norm(xs[..., 8:24], weight, backend="triton")
    y.sum().backward()
    y_r, dx_r, _ = _run(rms_norm_reference, x, weight, torch.ones_like(x))
    assert _err(y, y_r) < 1e-5
    assert _err(xs.grad[..., 8:24], dx_r) < 1e-5 and not xs.grad[..., :8].any() and not xs.grad[..., 24:].any()


def test_transposed_input_is_copied():
    x, weight, dy = _inputs((16, 10), seed=5)
    xt = x.t().contiguous().t()  # same values, column stride 10
    y, dx, dw = _run(rms_norm, xt, weight, dy, backend="triton")
    y_r, dx_r, dw_r = _run(rms_norm_reference, x, weight, dy)
    assert _err(y, y_r) < 1e-5
    assert _err(dx, dx_r) < 1e-5
    assert _err(dw, dw_r) < 1e-5


def test_no_rows():
    x, weight, dy = _inputs((0, 16))
    y, dx, dw = _run(rms_norm, x, weight, dy, backend="triton")
    assert y.shape == dx.shape == (0, 16) and dw.shape == (16,) and not dw.any()


def test_auto_backend_on_cpu_is_the_reference():
    x, weight, _ = _inputs((3, 16), device="cpu")
    assert torch.equal(rms_norm(x, weight), rms_norm_reference(x, weight))


@pytest.mark.parametrize(
    "bad, exc",
    [
        (dict(backend="cuda"), ValueError),
        (dict(x=[1.0, 2.0]), TypeError),
        (dict(eps=-1.0), ValueError),
        (dict(weight=torch.ones(2, 8)), ValueError),
        (dict(weight=torch.ones(0)), ValueError),
        (dict(x=torch.ones(3, 7)), ValueError),
        (dict(x=torch.tensor(1.0)), ValueError),
        (dict(x=torch.ones(3, 8, dtype=torch.int32)), TypeError),
        (dict(weight=torch.ones(8, dtype=torch.float16)), TypeError),
        (
            dict(x=torch.ones(3, 8, dtype=torch.float64), weight=torch.ones(8, dtype=torch.float64), backend="triton"),
            TypeError,
        ),
    ],
    ids=["backend", "x-list", "eps", "weight-2d", "weight-empty", "D", "x-0d", "x-int", "weight-fp16", "triton-fp64"],
)
def test_bad_arguments(bad, exc):
    args = dict(x=torch.ones(3, 8), weight=torch.ones(8), eps=1e-6, backend="torch")
    with pytest.raises(exc) as info:
        rms_norm(**(args | bad))
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------ GPU


def test_model_norm_under_recomputation_matches_pytorch_norm():
    """The model's RMSNorm on the kernels, re-materialized as the model does it, equals the PyTorch norm without
    recomputation: output, d x, d weight."""
    from torch.utils.checkpoint import checkpoint

    from models.llama import RMSNorm

    ours, plain = RMSNorm(24, backend="triton").to(DEVICE), RMSNorm(24, backend="torch").to(DEVICE)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        plain.weight.copy_(ours.weight)
    x, dy = torch.randn(2, 7, 24, device=DEVICE), torch.randn(2, 7, 24, device=DEVICE)
    results = []
    for module, recompute in ((ours, True), (plain, False)):
        xi = x.clone().requires_grad_(True)
        y = checkpoint(module, xi, use_reentrant=False) if recompute else module(xi)
        y.backward(dy)
        results.append((y, xi.grad, module.weight.grad))
    (y, dx, dw), (y_ref, dx_ref, dw_ref) = results
    assert _err(y, y_ref) < 1e-5
    assert _err(dx, dx_ref) < 1e-5
    assert _err(dw, dw_ref) < 1e-5


@gpu
@needs_cuda
@pytest.mark.parametrize(
    "shape, wdtype",
    [((131072, 2048), torch.float32), ((1, 65536, 16, 128), torch.bfloat16)],
    ids=["block-norm", "head-norm"],
)
def test_gpu_model_sizes_bf16(shape, wdtype):
    """bf16 x at the model's sizes against the fp32 reference on the same inputs."""
    x, weight, dy = _inputs(shape, dtype=torch.bfloat16, wdtype=wdtype, device="cuda", seed=6)
    y, dx, dw = _run(rms_norm, x, weight, dy)
    y_r, dx_r, dw_r = _run(rms_norm_reference, x.float(), weight.float(), dy.float())
    assert y.dtype == torch.bfloat16 and _err(y, y_r) < 5e-3
    assert dx.dtype == torch.bfloat16 and _err(dx, dx_r) < 5e-3
    assert dw.dtype == wdtype and _err(dw, dw_r) < (1e-4 if wdtype == torch.float32 else 5e-3)


@gpu
@needs_cuda
@pytest.mark.parametrize("D", [2048, 200, 12288], ids=["D2048", "D200", "D12288-chunks"])
def test_gpu_fp32_matches_reference(D):
    x, weight, dy = _inputs((4099, D), device="cuda", seed=7)
    y, dx, dw = _run(rms_norm, x, weight, dy)
    y_r, dx_r, dw_r = _run(rms_norm_reference, x.double(), weight.double(), dy.double())
    assert _err(y, y_r) < 1e-6
    assert _err(dx, dx_r) < 1e-6
    assert _err(dw, dw_r) < 1e-5
