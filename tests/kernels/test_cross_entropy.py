"""Triton chunk cross-entropy (kernels/cross_entropy) against the eager reference, and linear_cross_entropy's
Triton path against its reference path.

Without CUDA the kernel runs under the Triton interpreter (TRITON_INTERPRET=1, set by tests/helpers.py) at
small sizes and small tiles; tests marked ``gpu`` run a chunk of the model's size ([8192, 32000]) in bf16.
"""

from __future__ import annotations

import pytest
import torch
from helpers import KERNEL_DEVICE as DEVICE
from helpers import kernel_err as _err
from helpers import needs_cuda

triton = pytest.importorskip("triton")

import kernels.cross_entropy.triton_ce as tc  # noqa: E402
from kernels.cross_entropy import chunk_cross_entropy_, chunk_cross_entropy_reference_  # noqa: E402
from kernels.linear_cross_entropy import linear_cross_entropy  # noqa: E402

# an overflow inside the interpreter means a kernel computed on values it should have masked
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")
gpu = pytest.mark.gpu

# LOOP: rows walked in 16-wide tiles (pass 1 online, pass 2 re-reads); ONE_TILE: each row one register tile
LOOP = tc.CEConfig(block_v=16, warps=1, row_max=0, row_warps=1)
ONE_TILE = tc.CEConfig(block_v=16, warps=1, row_max=1024, row_warps=1)
PATHS = {"loop": LOOP, "one-tile": ONE_TILE}


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.setattr(tc, "CONFIG", LOOP)


@pytest.fixture(params=list(PATHS))
def path(request, monkeypatch):
    monkeypatch.setattr(tc, "CONFIG", PATHS[request.param])
    return request.param


def _logits(n, V, *, scale=3.0, dtype=torch.float32, ignored=0.25, ignore_index=-100, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, V, generator=g) * scale).to(device, dtype)
    t = torch.randint(0, V, (n,), generator=g)
    t[torch.rand(n, generator=g) < ignored] = ignore_index
    return z, t.to(device)


def _ref(z, t, ignore_index=-100):
    """The reference's (loss, gradient) on an fp32 copy of z."""
    g = z.float().clone()
    return chunk_cross_entropy_reference_(g, t, ignore_index, True), g


def _triton(z, t, ignore_index=-100, grad=True):
    g = z.clone()
    return chunk_cross_entropy_(g, t, ignore_index, grad, backend="triton"), g


# ------------------------------------------------------------------------------------ CPU / interpreter

SHAPES = [(7, 48), (9, 37), (5, 16), (4, 5), (3, 1)]  # several tiles, a ragged tail, one tile, V < tile, V = 1


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "n{}-V{}".format(*s))
def test_matches_reference(shape, path):
    z, t = _logits(*shape, seed=shape[1])
    loss, g = _triton(z, t)
    loss_r, g_r = _ref(z, t)
    assert loss.dim() == 0 and loss.dtype == torch.float32 and _err(loss, loss_r) < 1e-5
    assert g.dtype == z.dtype and _err(g, g_r) < 1e-5


@pytest.mark.parametrize("ignore_index", [-100, 7], ids=["-100", "in-vocab-7"])
def test_ignored_rows_are_zero(ignore_index, path):
    """Ignored rows give 0 loss and an all-zero gradient row, also when ignore_index is a real column."""
    z, t = _logits(12, 40, ignored=0.4, ignore_index=ignore_index, seed=1)
    t[0] = ignore_index
    loss, g = _triton(z, t, ignore_index)
    loss_r, g_r = _ref(z, t, ignore_index)
    keep = t != ignore_index
    assert _err(loss, loss_r) < 1e-5
    assert _err(g, g_r) < 1e-5 and not g[~keep].any() and g[keep].any()


def test_all_rows_ignored(path):
    z, t = _logits(6, 33, ignored=1.0, seed=2)
    loss, g = _triton(z, t)
    assert loss.item() == 0.0 and not g.any()


def test_no_grad_leaves_logits_and_a_correct_loss(path):
    z, t = _logits(8, 37, seed=3)
    loss, g = _triton(z, t, grad=False)
    assert _err(loss, _ref(z, t)[0]) < 1e-5 and torch.equal(g, z)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_logits_against_fp32_reference(dtype, path):
    """Half logits: the loss is computed in fp32 from the same (rounded) values, the gradient rounded once."""
    z, t = _logits(10, 45, dtype=dtype, seed=4)
    loss, g = _triton(z, t)
    loss_r, g_r = _ref(z, t)
    assert loss.dtype == torch.float32 and _err(loss, loss_r) < 1e-6
    assert g.dtype == dtype and _err(g, g_r) < (1e-2 if dtype == torch.bfloat16 else 2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_extreme_logits(dtype, path):
    """Logits of ±1e4 (exp overflows without the max subtraction): finite and matching the reference."""
    z, t = _logits(6, 37, scale=5e3, dtype=dtype, ignored=0.0, seed=5)
    z[0], z[1], z[2, ::2] = 1e4, -1e4, -1e4
    loss, g = _triton(z.clamp(-1e4, 1e4), t)
    loss_r, g_r = _ref(z.clamp(-1e4, 1e4), t)
    assert torch.isfinite(loss) and _err(loss, loss_r) < 1e-5
    assert _err(g, g_r) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_strided_logits_in_place():
    """Logits a column slice of a wider tensor (row stride > V) and a transposed view: written in place, the
    columns around the slice untouched."""
    z, t = _logits(9, 21, seed=6)
    wide = torch.randn(9, 40, device=DEVICE)
    wide[:, 5:26] = z
    before = wide.clone()
    loss = chunk_cross_entropy_(wide[:, 5:26], t, -100, True, backend="triton")
    loss_r, g_r = _ref(z, t)
    assert _err(loss, loss_r) < 1e-5
    assert _err(wide[:, 5:26], g_r) < 1e-5 and torch.equal(wide[:, :5], before[:, :5])
    zt = z.t().contiguous().t()  # column stride 9
    chunk_cross_entropy_(zt, t, -100, True, backend="triton")
    assert _err(zt, g_r) < 1e-5


def test_out_of_range_target_gives_nan():
    z, t = _logits(4, 10, ignored=0.0, seed=7)
    t[2] = 10
    assert torch.isnan(chunk_cross_entropy_(z.clone(), t, -100, True, backend="triton"))


def test_empty_chunk():
    loss = chunk_cross_entropy_(torch.zeros(0, 8, device=DEVICE), torch.zeros(0, dtype=torch.long, device=DEVICE),
                                backend="triton")
    assert loss.item() == 0.0


def test_auto_backend_on_cpu_is_the_reference():
    z, t = _logits(5, 12, device="cpu", seed=8)
    a, b = z.clone(), z.clone()
    assert torch.equal(chunk_cross_entropy_(a, t), chunk_cross_entropy_reference_(b, t, -100, True))
    assert torch.equal(a, b)


@pytest.mark.parametrize("bad,exc", [
    (dict(logits=torch.zeros(6)), ValueError), (dict(logits=torch.zeros(2, 3, 4)), ValueError),
    (dict(logits=torch.zeros(3, 0)), ValueError), (dict(logits=torch.zeros(3, 4, dtype=torch.long)), TypeError),
    (dict(targets=torch.zeros(4, dtype=torch.long)), ValueError), (dict(targets=torch.zeros(3, 1).long()), ValueError),
    (dict(targets=torch.zeros(3, dtype=torch.int32)), TypeError), (dict(backend="cuda"), ValueError),
    (dict(logits=torch.zeros(3, 4, dtype=torch.float64), backend="triton"), TypeError),
], ids=["1d", "3d", "V=0", "int-logits", "targets-n", "targets-2d", "targets-int32", "backend", "f64-triton"])
def test_bad_arguments(bad, exc):
    args = dict(logits=torch.zeros(3, 4), targets=torch.zeros(3, dtype=torch.long), backend="torch")
    with pytest.raises(exc):
        chunk_cross_entropy_(**(args | bad))


# ------------------------------------------------------------------------------------ linear_cross_entropy

def _lce(backend, h, w, t, **kw):
    hl, wl = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = linear_cross_entropy(hl, wl, t, backend=backend, **kw)
    (loss * 0.5).backward()
    return loss, hl.grad, wl.grad


def _lce_inputs(N, V, d, *, ignored=0.25, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g).to(DEVICE, dtype)
    w = (torch.randn(V, d, generator=g) / d**0.5).to(DEVICE, dtype)
    t = torch.randint(0, V, (N,), generator=g)
    t[torch.rand(N, generator=g) < ignored] = -100
    return h, w, t.to(DEVICE)


@pytest.mark.parametrize("N,V,chunk,ignored", [(53, 96, 16, 0.25), (20, 37, 64, 0.0), (12, 30, 5, 1.0)],
                         ids=["ragged-chunks", "one-chunk", "all-ignored"])
def test_linear_cross_entropy_triton_matches_torch(N, V, chunk, ignored):
    h, w, t = _lce_inputs(N, V, 24, ignored=ignored, seed=N)
    loss, dh, dw = _lce("triton", h, w, t, chunk_tokens=chunk)
    loss_r, dh_r, dw_r = _lce("torch", h, w, t, chunk_tokens=chunk)
    assert loss.dtype == torch.float32 and _err(loss, loss_r) < 1e-5
    assert dh.dtype == torch.float32 and _err(dh, dh_r) < 1e-5
    assert dw.dtype == torch.float32 and _err(dw, dw_r) < 1e-5


def test_linear_cross_entropy_bf16_autocast_triton_matches_torch():
    """Under bf16 autocast the Triton path keeps the bf16 logits and writes the bf16 gradient over them; the
    reference path casts to fp32 and back: the same numbers up to bf16 rounding."""
    h, w, t = _lce_inputs(40, 64, 16, seed=9)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss, dh, dw = _lce("triton", h, w, t, chunk_tokens=16)
        loss_r, dh_r, dw_r = _lce("torch", h, w, t, chunk_tokens=16)
    assert loss.dtype == torch.float32 and _err(loss, loss_r) < 1e-5
    assert dh.dtype == torch.float32 and _err(dh, dh_r) < 1e-2
    assert dw.dtype == torch.float32 and _err(dw, dw_r) < 1e-2


@pytest.mark.parametrize("backend,exc", [("cuda", ValueError), ("triton", TypeError)], ids=["unknown", "f64"])
def test_linear_cross_entropy_bad_backend(backend, exc):
    h, w, t = _lce_inputs(4, 6, 3)
    with pytest.raises(exc):
        linear_cross_entropy(h.double(), w.double(), t, backend=backend)


# ------------------------------------------------------------------------------------ GPU

@gpu
@needs_cuda
@pytest.mark.parametrize("cfg", [tc.CEConfig(), tc.CEConfig(row_max=32768, row_warps=16)], ids=["loop", "one-tile"])
def test_gpu_model_chunk_bf16(cfg, monkeypatch):
    """A chunk at the model's size ([8192, 32000] bf16, as the GEMM writes it) against the fp32 reference on the
    same values."""
    monkeypatch.setattr(tc, "CONFIG", cfg)
    z, t = _logits(8192, 32000, dtype=torch.bfloat16, ignored=0.1, device="cuda", seed=10)
    loss, g = _triton(z, t)
    loss_r, g_r = _ref(z, t)
    assert loss.dtype == torch.float32 and _err(loss, loss_r) < 1e-5
    assert g.dtype == torch.bfloat16 and _err(g, g_r) < 1e-2


@gpu
@needs_cuda
def test_gpu_fp32_matches_reference():
    z, t = _logits(1000, 32003, device="cuda", seed=11)
    loss, g = _triton(z, t)
    loss_r, g_r = _ref(z, t)
    assert _err(loss, loss_r) < 1e-5
    assert _err(g, g_r) < 1e-5
