"""The Mamba-2 scan's inputs (kernels/ssd_inputs) against the float64 reference: v, the log-gate and the
gradients of x, dt, dt_bias and A_log; the group broadcast of B and C and its gradient.

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set by tests/helpers.py) at small
sizes and small tiles; the test marked ``gpu`` runs mamba2-1b's head shape in bf16.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import KERNEL_DEVICE as DEVICE
from helpers import kernel_err as _err
from helpers import needs_cuda

triton = pytest.importorskip("triton")

import kernels.ssd_inputs.triton_ssd_inputs as ts  # noqa: E402
from kernels.ssd_inputs import expand_groups, expand_groups_reference, ssd_inputs, ssd_inputs_reference  # noqa: E402

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")
gpu = pytest.mark.gpu

SMALL = ts.SsdConfig(tile=64, expand_tokens=4)  # several row blocks and a ragged last one at these sizes


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.setattr(ts, "CONFIG", SMALL)


def _inputs(B, T, H, P, *, dtype=torch.float32, device=DEVICE, seed=0, extra=5):
    """x [B, T, H, P]; dt a column slice of a wider projection (row stride H + extra); the parameters; dv, dgate."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, P, generator=g).to(device, dtype)
    proj = (torch.randn(B, T, H + extra, generator=g) * 3).to(device, dtype)  # raw Δ over softplus' whole range
    dt_bias = (torch.rand(H, generator=g) - 0.5).to(device)
    A_log = torch.rand(H, generator=g).to(device)
    dv = torch.randn(B, T, H, P, generator=g).to(device, dtype)
    dgate = torch.randn(B, T, H, generator=g).to(device)
    return x, proj, dt_bias, A_log, dv, dgate


def _run(fn, x, proj, dt_bias, A_log, dv, dgate, H, **kw):
    """v, the log-gate, and the gradients of ⟨v, dv⟩ + ⟨gate, dgate⟩ w.r.t. x, the projection, dt_bias, A_log."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, proj, dt_bias, A_log)]
    xl, pl, bl, al = leaves
    v, gate = fn(xl, pl[..., 2:2 + H], bl, al, **kw)
    loss = (v.double() * dv.double()).sum() + (gate.double() * dgate.double()).sum()
    return (v, gate, *torch.autograd.grad(loss, leaves))


NAMES = ("v", "gate", "dx", "d_proj", "d_dt_bias", "dA_log")


@pytest.mark.parametrize("shape", [(2, 13, 4, 16), (1, 9, 3, 12), (1, 1, 1, 8), (3, 5, 6, 64)],
                         ids=lambda s: "x".join(map(str, s)))
def test_ssd_inputs_match_reference(shape):
    B, T, H, P = shape
    args = _inputs(B, T, H, P, seed=sum(shape))
    got = _run(ssd_inputs, *args, H, backend="triton")
    ref = _run(ssd_inputs_reference, *(a.double() for a in args), H)
    for name, a, r in zip(NAMES, got, ref):
        assert a.shape == r.shape and _err(a, r) < 1e-5, name


def test_ssd_inputs_types():
    x, proj, dt_bias, A_log, *_ = _inputs(1, 7, 2, 8)
    v, gate = ssd_inputs(x.bfloat16(), proj[..., 2:4].bfloat16(), dt_bias, A_log, backend="triton")
    assert v.dtype == torch.bfloat16 and gate.dtype == torch.float32


def test_ssd_inputs_bf16():
    """bf16 x and dt: v, dx, d(dt) in bf16 (rounded once), the parameters' gradients in fp32."""
    args = _inputs(2, 11, 4, 32, dtype=torch.bfloat16, seed=3)
    got = _run(ssd_inputs, *args, 4, backend="triton")
    ref = _run(ssd_inputs_reference, *(a.double() for a in args), 4)
    for name, a, r in zip(NAMES, got, ref):
        assert _err(a, r) < 1e-2, name
    assert got[0].dtype == got[2].dtype == got[3].dtype == torch.bfloat16
    assert got[4].dtype == got[5].dtype == torch.float32


def test_ssd_inputs_only_v_or_only_gate_used():
    """A gradient for one output only (the other None in backward)."""
    x, proj, dt_bias, A_log, dv, dgate = _inputs(1, 6, 2, 8, seed=4)
    for use in ("v", "gate"):
        leaves = [t.detach().clone().requires_grad_() for t in (x, proj, dt_bias, A_log)]
        ref_leaves = [t.detach().double().clone().requires_grad_() for t in (x, proj, dt_bias, A_log)]
        grads = []
        for fn, (xl, pl, bl, al), kw in ((ssd_inputs, leaves, {"backend": "triton"}),
                                         (ssd_inputs_reference, ref_leaves, {})):
            v, gate = fn(xl, pl[..., 2:4], bl, al, **kw)
            loss = (v.double() * dv.double()).sum() if use == "v" else (gate.double() * dgate.double()).sum()
            grads.append(torch.autograd.grad(loss, [xl, pl, bl, al], allow_unused=True))
        for a, r, leaf in zip(*grads, ref_leaves):  # an unused input's gradient is None or zeros
            a = torch.zeros_like(leaf) if a is None else a
            r = torch.zeros_like(leaf) if r is None else r
            assert _err(a, r) < 1e-5, use


def test_reference_is_mamba2s_formula():
    x, proj, dt_bias, A_log, *_ = _inputs(2, 5, 3, 4, device="cpu", seed=5)
    dt = proj[..., :3]
    v, gate = ssd_inputs_reference(x, dt, dt_bias, A_log)
    delta = F.softplus(dt + dt_bias)
    assert _err(gate, -torch.exp(A_log) * delta) < 1e-6
    assert _err(v, x * delta[..., None]) < 1e-6


@pytest.mark.parametrize("G, H", [(1, 4), (2, 6), (3, 3)])
def test_expand_groups_matches_reference(G, H):
    g = torch.Generator().manual_seed(G * 10 + H)
    b = torch.randn(2, 9, G, 12, generator=g).to(DEVICE)
    d_out = torch.randn(2, 9, H, 12, generator=g).to(DEVICE)
    got_b = b.clone().requires_grad_()
    ref_b = b.double().clone().requires_grad_()
    out = expand_groups(got_b, H, backend="triton")
    ref = expand_groups_reference(ref_b, H)
    (out.double() * d_out.double()).sum().backward()
    (ref * d_out.double()).sum().backward()
    assert out.shape == (2, 9, H, 12) and out.is_contiguous() and _err(out, ref) < 1e-7
    assert _err(got_b.grad, ref_b.grad) < 1e-6


def test_expand_groups_of_a_slice():
    """B as a column slice of the conv's output (row stride wider than G·N) is copied correctly."""
    wide = torch.randn(3, 7, 40, device=DEVICE)
    b = wide[..., 8:24].unflatten(-1, (2, 8))
    assert _err(expand_groups(b, 4, backend="triton"), expand_groups_reference(b, 4)) == 0


def test_expand_groups_reference_head_to_group():
    b = torch.arange(2 * 3, dtype=torch.float32).reshape(1, 1, 2, 3)
    out = expand_groups_reference(b, 4)
    assert torch.equal(out[0, 0, 1], b[0, 0, 0]) and torch.equal(out[0, 0, 2], b[0, 0, 1])


@pytest.mark.parametrize("call, match", [
    (lambda x, dt, b, a: ssd_inputs(x, dt[..., :1], b, a), "same leading dims"),
    (lambda x, dt, b, a: ssd_inputs(x, dt, b[:1], a), r"must be \[H\]"),
    (lambda x, dt, b, a: ssd_inputs(x, dt, b, a, backend="cuda"), "unknown"),
    (lambda x, dt, b, a: ssd_inputs(x.long(), dt, b, a), "floating-point"),
    (lambda x, dt, b, a: ssd_inputs(x.double(), dt.double(), b, a, backend="triton"), "fp16/bf16/fp32"),
    (lambda x, dt, b, a: expand_groups(x, 3), "multiple of the groups"),
])
def test_bad_arguments_are_one_line(call, match):
    x, proj, dt_bias, A_log, *_ = _inputs(1, 4, 2, 8, device="cpu")
    with pytest.raises((ValueError, TypeError), match=match) as info:
        call(x, proj[..., :2], dt_bias, A_log)
    assert "\n" not in str(info.value)


@gpu
@needs_cuda
def test_gpu_mamba2_1b_heads_bf16():
    """mamba2-1b's shape (64 heads of 64, N 128, one group) at 4K tokens in bf16, against float64."""
    args = _inputs(1, 4096, 64, 64, dtype=torch.bfloat16, seed=7, extra=4096)
    got = _run(ssd_inputs, *args, 64)
    ref = _run(ssd_inputs_reference, *(a.double() for a in args), 64)
    for name, a, r in zip(NAMES, got, ref):
        assert _err(a, r) < 1e-2, name
    b = torch.randn(1, 4096, 1, 128, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(expand_groups(b, 64), expand_groups_reference(b, 64))
