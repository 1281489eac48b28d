"""Triton gated RMSNorm (kernels/gated_norm) against the float64 PyTorch reference: the output and the gradients of
y, z, weight, x and D.

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set by tests/helpers.py) at small
sizes and small tiles; tests marked ``gpu`` run the Mamba-2 mixer's sizes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: E402
from helpers import KERNEL_DEVICE as DEVICE
from helpers import kernel_err as _err
from helpers import needs_cuda

triton = pytest.importorskip("triton")

import kernels.gated_norm.triton_gated_norm as tg  # noqa: E402
from kernels.gated_norm import gated_rms_norm, gated_rms_norm_reference  # noqa: E402

# an overflow inside the interpreter means a kernel read memory it should have masked
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")
gpu = pytest.mark.gpu

# tiles small enough that the interpreter sees several row blocks (BR = 128 // BD rows of BD = next_pow2(H) ·
# next_pow2(P) slots) and three backward programs (three dw / dD partials); WIDE: rows of more than 16 slots loop
# over chunks of 16 (whole heads, or 16 columns of one head when P > 16); BWD_WIDE: one forward tile, backward chunks
# (the defaults' split at 8192 slots)
SMALL = tg.GatedNormConfig(fwd_tile=128, bwd_tile=128, fwd_max_block_d=64, bwd_max_block_d=64, cpu_bwd_programs=3)
WIDE = tg.GatedNormConfig(fwd_tile=32, bwd_tile=32, fwd_max_block_d=16, bwd_max_block_d=16, cpu_bwd_programs=3)
BWD_WIDE = tg.GatedNormConfig(fwd_tile=128, bwd_tile=32, fwd_max_block_d=64, bwd_max_block_d=16, cpu_bwd_programs=3)
EPS = 1e-5
LEFT, RIGHT = 3, 5  # z is columns LEFT : LEFT + H·P of a wider tensor, as a column slice of in_proj's output


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.setattr(tg, "CONFIG", SMALL)


def _inputs(shape, *, dtype=torch.float32, pdtype=torch.float32, device=DEVICE, seed=0):
    """({y, x: [*shape], D: [H], z_wide: [..., LEFT + H·P + RIGHT], weight: [H·P]}, dout [..., H·P]); y, x, z_wide in
    `dtype`, D and weight in `pdtype`."""
    g = torch.Generator().manual_seed(seed)
    *lead, H, P = shape
    Dw = H * P
    inputs = {
        "y": torch.randn(shape, generator=g).to(device, dtype),
        "x": torch.randn(shape, generator=g).to(device, dtype),
        "D": (torch.rand(H, generator=g) * 2).to(device, pdtype),
        "z_wide": (torch.randn(*lead, LEFT + Dw + RIGHT, generator=g) * 2).to(device, dtype),
        "weight": (torch.rand(Dw, generator=g) + 0.5).to(device, pdtype),
    }
    return inputs, torch.randn(*lead, Dw, generator=g).to(device, dtype)


def _run(fn, inputs, dout, skip=True, eps=EPS, **kw):
    """{out, and dy, dx, dD, dz, dweight: the gradients of ⟨out, dout⟩}, z the strided column slice of z_wide; x and
    D (the skip term) only with `skip`. dout None: the gradients of out.sum() (an expanded ones, stride 0)."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items() if skip or n not in ("x", "D")}
    Dw = leaves["weight"].shape[0]
    z = leaves["z_wide"][..., LEFT : LEFT + Dw]
    out = fn(leaves["y"], z, leaves["weight"], eps, x=leaves.get("x"), D=leaves.get("D"), **kw)
    loss = out.sum() if dout is None else (out.double() * dout.double()).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    result = {"out": out, **{f"d{n}": g for n, g in zip(leaves, grads)}}
    dz_wide = result.pop("dz_wide")
    result["dz"] = dz_wide[..., LEFT : LEFT + Dw]
    result["dz outside the slice"] = torch.cat([dz_wide[..., :LEFT], dz_wide[..., LEFT + Dw :]], -1)
    return result


def _double(inputs):
    return {n: t.double() for n, t in inputs.items()}


def _assert_close(got, want, tol, tol_params=None):
    """One assert per tensor, named: relative error < tol (tol_params for dweight and dD); the gradient outside z's
    slice exactly zero; each tensor in its input's dtype."""
    assert got.keys() == want.keys()
    for name in want:
        if name == "dz outside the slice":
            assert not got[name].any(), name
            continue
        limit = tol_params if tol_params is not None and name in ("dweight", "dD") else tol
        assert got[name].shape == want[name].shape and _err(got[name], want[name]) < limit, (
            name,
            _err(got[name], want[name]),
        )


def _check_dtypes(got, inputs):
    dtype_of = {"out": inputs["y"].dtype, "dz": inputs["z_wide"].dtype, "dweight": inputs["weight"].dtype}
    dtype_of |= {"dy": inputs["y"].dtype, "dx": inputs["x"].dtype, "dD": inputs["D"].dtype}
    for name, dtype in dtype_of.items():
        if name in got:
            assert got[name].dtype == dtype, (name, got[name].dtype, dtype)


# ------------------------------------------------------------------------------------ CPU / interpreter

SHAPES = [  # [..., H, P]: H·P a power of two or not, P not one, rows not a multiple of the block, 1-D leading dims
    (2, 37, 3, 8),
    (1, 29, 4, 6),
    (3, 5, 2, 16),
    (45, 5, 3),
    (6, 1, 3),
]


@pytest.mark.parametrize("skip", [True, False], ids=["skip", "no-skip"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, skip):
    inputs, dout = _inputs(shape)
    got = _run(gated_rms_norm, inputs, dout, skip, backend="triton")
    _check_dtypes(got, inputs)
    _assert_close(got, _run(gated_rms_norm_reference, _double(inputs), dout, skip), 1e-5)


@pytest.mark.parametrize(
    "shape, cfg",
    [((2, 7, 3, 8), WIDE), ((11, 5, 6), WIDE), ((2, 5, 2, 24), WIDE), ((2, 7, 3, 8), BWD_WIDE)],
    ids=["heads", "ragged-heads", "P24", "bwd-only"],
)
def test_wide_rows_loop_over_chunks(shape, cfg, monkeypatch):
    """Rows wider than max_block_d: two passes over chunks of whole heads (P ≤ 16) or of 16 columns inside a head
    (P = 24: a full and a ragged chunk per head); dw and dD added to each program's partials in place."""
    monkeypatch.setattr(tg, "CONFIG", cfg)
    *lead, H, P = shape
    assert not tg._tiles(lead[0], H, P, cfg.bwd_tile, cfg.bwd_warps, cfg.bwd_max_block_d)[3]  # chunked backward
    fwd_one_tile = tg._tiles(lead[0], H, P, cfg.fwd_tile, cfg.fwd_warps, cfg.fwd_max_block_d)[3]
    assert fwd_one_tile == (cfg is BWD_WIDE)
    inputs, dout = _inputs(shape, seed=1)
    got = _run(gated_rms_norm, inputs, dout, backend="triton")
    _assert_close(got, _run(gated_rms_norm_reference, _double(inputs), dout), 1e-5)


@pytest.mark.parametrize("skip", [True, False], ids=["skip", "no-skip"])
def test_reference_matches_eager_mixer_output(skip):
    """The reference equals the mixer's eager ops in fp32: y + x·D, ⊙ silu(z), torch's RMSNorm."""
    inputs, _ = _inputs((3, 9, 4, 12), device="cpu", seed=2)
    y, x, D, weight = inputs["y"], inputs["x"], inputs["D"], inputs["weight"]
    z = inputs["z_wide"][..., LEFT : LEFT + 48]
    g = y + x * D[:, None] if skip else y
    want = F.rms_norm(g.reshape(3, 9, 48) * F.silu(z), (48,), weight, EPS)
    got = gated_rms_norm_reference(y, z, weight, EPS, x=x if skip else None, D=D if skip else None)
    assert _err(got, want) < 1e-6


@pytest.mark.parametrize("pdtype", [torch.float32, torch.bfloat16], ids=["params-fp32", "params-bf16"])
def test_bf16_inputs(pdtype):
    """bf16 y, x, z with fp32 or bf16 weight and D: out, dy, dx, dz in bf16, dw and dD in the parameters' dtype,
    against the float64 reference on the same values.

    The interpreter rounds fp32 → bf16 toward zero (≈ 3.3e-3; the GPU rounds to nearest, ≈ 1.7e-3)."""
    inputs, dout = _inputs((2, 37, 4, 16), dtype=torch.bfloat16, pdtype=pdtype, seed=3)
    got = _run(gated_rms_norm, inputs, dout, backend="triton")
    _check_dtypes(got, inputs)
    tol_params = 1e-5 if pdtype == torch.float32 else 5e-3
    _assert_close(got, _run(gated_rms_norm_reference, _double(inputs), dout), 5e-3, tol_params)


@pytest.mark.parametrize("trainable", [("z_wide",), ("weight", "D"), ("y", "x"), ("x",)])
def test_gradients_of_some_inputs(trainable):
    """Only the inputs that need a gradient get one (the others are frozen); those equal the reference's."""
    inputs, dout = _inputs((2, 11, 3, 8), seed=4)
    grads = []
    for fn, tensors, kw in (
        (gated_rms_norm, inputs, {"backend": "triton"}),
        (gated_rms_norm_reference, _double(inputs), {}),
    ):
        t = {n: v.detach().clone().requires_grad_(n in trainable) for n, v in tensors.items()}
        out = fn(t["y"], t["z_wide"][..., LEFT : LEFT + 24], t["weight"], EPS, x=t["x"], D=t["D"], **kw)
        grads.append(torch.autograd.grad((out.double() * dout.double()).sum(), [t[n] for n in trainable]))
    for name, got, want in zip(trainable, *grads):
        assert _err(got, want) < 1e-5, name


def test_copied_layouts_and_expanded_grad():
    """y and x in a transposed layout (copied to rows), the gradient of out.sum() (ones, stride 0, copied): same as
    contiguous ones."""
    inputs, _ = _inputs((2, 13, 3, 8), seed=5)
    want = _run(gated_rms_norm_reference, _double(inputs), torch.ones(2, 13, 24, device=DEVICE))
    transposed = dict(inputs)
    for name in ("y", "x"):
        transposed[name] = inputs[name].transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, P stride H
    got = _run(gated_rms_norm, transposed, None, backend="triton")
    _assert_close(got, want, 1e-5)


def test_one_column_rows():
    """H = P = 1: û = u / sqrt(u² + eps) per row (eps large: at eps ≪ u², du ∝ 1 − û² cancels in fp32)."""
    inputs, dout = _inputs((9, 1, 1), seed=8)
    got = _run(gated_rms_norm, inputs, dout, eps=1.0, backend="triton")
    _assert_close(got, _run(gated_rms_norm_reference, _double(inputs), dout, eps=1.0), 1e-5)


def test_no_rows():
    inputs, dout = _inputs((0, 3, 8))
    got = _run(gated_rms_norm, inputs, dout, backend="triton")
    assert got["out"].shape == (0, 24) and got["dy"].shape == got["dx"].shape == (0, 3, 8)
    assert got["dz"].shape == (0, 24) and not got["dweight"].any() and not got["dD"].any()


def test_auto_backend_on_cpu_is_the_reference():
    inputs, _ = _inputs((3, 2, 8), device="cpu")
    args = (inputs["y"], inputs["z_wide"][..., :16], inputs["weight"], EPS)
    kw = dict(x=inputs["x"], D=inputs["D"])
    assert torch.equal(gated_rms_norm(*args, **kw), gated_rms_norm_reference(*args, **kw))


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.ones(shape, dtype=dtype, device=device)


@pytest.mark.parametrize(
    "bad, exc, fix",
    [
        (dict(backend="cuda"), ValueError, "use one of"),
        (dict(y=[[1.0]]), TypeError, "must be a tensor"),
        (dict(x=[1.0]), TypeError, "a tensor or None"),
        (dict(D=None), ValueError, "pass both x and D"),
        (dict(eps=-1.0), ValueError, "eps must be"),
        (dict(eps=float("nan")), ValueError, "eps must be"),
        (dict(y=_t(8)), ValueError, "[..., H, P]"),
        (dict(y=_t(3, 0, 4)), ValueError, "H, P ≥ 1"),
        (dict(z=_t(3, 7)), ValueError, "[3, 8]"),
        (dict(z=_t(4, 8)), ValueError, "y's leading dims"),
        (dict(weight=_t(2, 4)), ValueError, "weight must be [H·P] = [8]"),
        (dict(x=_t(3, 4, 2)), ValueError, "shaped like y"),
        (dict(D=_t(4)), ValueError, "D must be [H] = [2]"),
        (dict(y=_t(3, 2, 4, dtype=torch.int32)), TypeError, "floating-point"),
        (dict(z=_t(3, 8, dtype=torch.int64)), TypeError, "floating-point"),
        (dict(weight=_t(8, dtype=torch.float16)), TypeError, "fp32 or y's dtype"),
        (dict(D=_t(2, dtype=torch.bfloat16)), TypeError, "fp32 or y's dtype"),
        (dict(weight=_t(8, device="meta")), ValueError, "y's device"),
        (
            dict(y=_t(3, 2, 4, dtype=torch.float64), z=_t(3, 8, dtype=torch.float64), backend="triton"),
            TypeError,
            "backend='torch'",
        ),
    ],
    ids=[
        "backend",
        "y-list",
        "x-list",
        "x-without-D",
        "eps",
        "eps-nan",
        "y-1d",
        "y-empty-row",
        "z-width",
        "z-lead",
        "weight-2d",
        "x-shape",
        "D-shape",
        "y-int",
        "z-int",
        "weight-fp16",
        "D-bf16",
        "device",
        "triton-fp64",
    ],
)
def test_bad_arguments(bad, exc, fix):
    args = dict(y=_t(3, 2, 4), z=_t(3, 8), weight=_t(8), eps=1e-6, x=_t(3, 2, 4), D=_t(2), backend="torch")
    with pytest.raises(exc) as info:
        gated_rms_norm(**(args | bad))
    assert "\n" not in str(info.value) and fix in str(info.value)


# ------------------------------------------------------------------------------------ GPU


@gpu
@needs_cuda
def test_gpu_mixer_size_bf16():
    """The 1B Mamba-2 mixer's output stage (B = 1, T = 4096, H = 64, P = 64) in bf16, z a slice of in_proj's output,
    fp32 D and weight, against the float64 reference on the same values."""
    inputs, dout = _inputs((1, 4096, 64, 64), dtype=torch.bfloat16, device="cuda", seed=6)
    got = _run(gated_rms_norm, inputs, dout)
    _check_dtypes(got, inputs)
    _assert_close(got, _run(gated_rms_norm_reference, _double(inputs), dout), 5e-3, 1e-4)


@gpu
@needs_cuda
@pytest.mark.parametrize(
    "shape",
    [(4099, 64, 64), (1029, 128, 64), (515, 256, 64), (2051, 24, 48), (77, 1, 12000)],
    ids=["Dw4096", "Dw8192", "Dw16384-chunks", "Dw1152-P48", "P12000-chunks"],
)
def test_gpu_fp32_matches_reference(shape):
    inputs, dout = _inputs(shape, device="cuda", seed=7)
    got = _run(gated_rms_norm, inputs, dout)
    _assert_close(got, _run(gated_rms_norm_reference, _double(inputs), dout), 1e-6, 1e-5)
