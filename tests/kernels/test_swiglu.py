"""Triton SwiGLU (kernels/swiglu) against the chunk + SiLU + multiply reference.

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set by tests/helpers.py) at small
sizes and small tiles; tests marked ``gpu`` run the `1b` preset's width in bf16.
"""

from __future__ import annotations

import pytest
import torch
from helpers import KERNEL_DEVICE as DEVICE
from helpers import kernel_err as _err
from helpers import needs_cuda

triton = pytest.importorskip("triton")

import kernels.swiglu.triton_swiglu as ts  # noqa: E402
from kernels.swiglu import swiglu, swiglu_reference  # noqa: E402

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")
gpu = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    """Tiles small enough that the interpreter sees several row and column blocks, and partial ones."""
    if DEVICE == "cpu":
        monkeypatch.setattr(ts, "CONFIG", ts.SwiGLUConfig(block_rows=4, block_cols=16, warps=1))


def _run(fn, z: torch.Tensor, dh: torch.Tensor):
    """h and the gradient of ⟨h, dh⟩ w.r.t. z."""
    z = z.detach().requires_grad_(True)
    h = fn(z)
    h.backward(dh)
    return h, z.grad


def _inputs(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(*shape, generator=g) * 3).to(DEVICE, dtype)  # ±9: σ saturates at both ends
    dh = torch.randn(*shape[:-1], shape[-1] // 2, generator=g).to(DEVICE, dtype)
    return z, dh


def partial_backend(backend: str):
    """swiglu on one backend."""
    return lambda z: swiglu(z, backend=backend)


@pytest.mark.parametrize("shape", [(2, 37, 2 * 40), (9, 2 * 16), (1, 3, 5, 2 * 7)], ids=["3d-ragged", "2d", "4d"])
def test_triton_matches_reference_fp32(shape):
    z, dh = _inputs(shape)
    h, dz = _run(partial_backend("triton"), z, dh)
    h_ref, dz_ref = _run(swiglu_reference, z, dh)
    assert _err(h, h_ref) < 1e-6
    assert _err(dz, dz_ref) < 1e-6


def test_strided_rows_are_read_in_place():
    """A column slice of a wider projection (row stride > 2F) gives the same values as its contiguous copy."""
    wide, dh = _inputs((2, 11, 2 * 24 + 8))
    z = wide[..., 8:]
    dh = dh[..., : z.shape[-1] // 2].contiguous()
    h, dz = _run(partial_backend("triton"), z, dh)
    h_ref, dz_ref = _run(swiglu_reference, z.contiguous(), dh)
    assert _err(h, h_ref) < 1e-6
    assert _err(dz, dz_ref) < 1e-6


def test_bf16_against_fp32_reference():
    z, dh = _inputs((2, 19, 2 * 40), torch.bfloat16)
    h, dz = _run(partial_backend("triton"), z, dh)
    h_ref, dz_ref = _run(swiglu_reference, z.float(), dh.float())
    assert h.dtype == torch.bfloat16 and dz.dtype == torch.bfloat16
    assert _err(h, h_ref) < 1e-2
    assert _err(dz, dz_ref) < 1e-2


def test_no_tokens():
    z, dh = _inputs((1, 0, 2 * 8))
    h, dz = _run(partial_backend("triton"), z, dh)
    assert h.shape == (1, 0, 8) and dz.shape == z.shape


def test_auto_uses_reference_off_cuda_and_checks_inputs():
    z, _ = _inputs((3, 2 * 5), torch.float64)
    assert torch.equal(swiglu(z), swiglu_reference(z))
    with pytest.raises(ValueError, match="2F"):
        swiglu(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="backend"):
        swiglu(z, backend="cuda")
    with pytest.raises(TypeError, match="fp16/bf16/fp32"):
        swiglu(z, backend="triton")


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_model_swiglu_under_recomputation_matches_plain_reference(policy):
    """The model's SwiGLU on the kernels, re-materialized as the model does it (full, or selective: the gate/up
    GEMM kept, the kernel re-run), equals the reference path without recomputation: output, d x, d weights."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    from models.llama import SwiGLU, _keep_widening_matmuls

    torch.manual_seed(0)
    ours, plain = SwiGLU(16, 24, backend="triton").to(DEVICE), SwiGLU(16, 24, backend="torch").to(DEVICE)
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(2, 13, 16, device=DEVICE)
    dy = torch.randn(2, 13, 16, device=DEVICE)
    kw = {} if policy == "full" else {"context_fn": partial(create_selective_checkpoint_contexts,
                                                            _keep_widening_matmuls)}
    results = []
    for module, recompute in ((ours, True), (plain, False)):
        xi = x.clone().requires_grad_(True)
        y = checkpoint(module, xi, use_reentrant=False, **kw) if recompute else module(xi)
        y.backward(dy)
        results.append((y, xi.grad, *(p.grad for p in module.parameters())))
    for got, want in zip(*results):
        assert _err(got, want) < 1e-6


@gpu
@needs_cuda
@pytest.mark.parametrize("tokens", [131072, 4096 * 8 + 3])
def test_gpu_1b_width_bf16(tokens):
    z, dh = _inputs((1, tokens, 2 * 6144), torch.bfloat16)
    h, dz = _run(partial_backend("triton"), z, dh)
    h_ref, dz_ref = _run(swiglu_reference, z.float(), dh.float())
    assert _err(h, h_ref) < 5e-3
    assert _err(dz, dz_ref) < 5e-3
