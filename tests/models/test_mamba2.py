"""Mamba-2 (M) layers: the mixer equals the SSD recurrence step by step; LASP-2 and streaming windows apply."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import check_pipeline_model, check_sp_model, check_streaming, rel_err, run_distributed

from models import LinearLlama, preset

SMALL = dict(ssm_head_dim=16, ssm_state=8, ssm_groups=2, gate=True)


def _recurrence(mixer, u: torch.Tensor) -> torch.Tensor:
    """Mamba-2 from its definition, one token at a time (float64)."""
    Bsz, T, _ = u.shape
    H, P, N, G = mixer.heads, mixer.head_dim, mixer.state, mixer.groups
    z, xbc, dt = mixer.in_proj(u).split([mixer.inner, mixer.inner + 2 * G * N, H], dim=-1)
    w = mixer.conv.weight[:, 0]  # [channels, width]: y_t = silu(Σ_i w_i x_{t−width+1+i})
    padded = torch.cat([xbc.new_zeros(Bsz, w.shape[1] - 1, xbc.shape[-1]), xbc], dim=1)
    xbc = F.silu(torch.stack([(padded[:, t : t + w.shape[1]] * w.t()).sum(1) for t in range(T)], dim=1))
    x, b, c = xbc.split([mixer.inner, G * N, G * N], dim=-1)
    x = x.reshape(Bsz, T, H, P)
    b, c = b.reshape(Bsz, T, G, N), c.reshape(Bsz, T, G, N)
    delta = F.softplus(dt + mixer.dt_bias)
    A = -torch.exp(mixer.A_log)
    S = [u.new_zeros(Bsz, N, P) for _ in range(H)]  # per head, replaced each step (autograd sees no in-place)
    ys = []
    for t in range(T):
        for h in range(H):
            g = h // (H // G)
            S[h] = torch.exp(delta[:, t, h] * A[h])[:, None, None] * S[h] + \
                delta[:, t, h, None, None] * b[:, t, g, :, None] * x[:, t, h, None, :]
        ys.append(torch.einsum("bhn,bhnp->bhp", c[:, t].repeat_interleave(H // G, dim=1), torch.stack(S, 1)))
    y = torch.stack(ys, dim=1) + x * mixer.D[:, None]
    return mixer.out_proj(mixer.norm(y.reshape(Bsz, T, -1) * F.silu(z)))


def test_mixer_equals_the_recurrence() -> None:
    torch.manual_seed(0)
    model = LinearLlama(preset("tiny", layout="M", **SMALL)).double()
    model.reset_parameters(1)
    mixer = model.layers["0"].mixer
    u = torch.randn(2, 37, model.cfg.dim, dtype=torch.float64)
    assert rel_err(mixer(u), _recurrence(mixer, u)) < 1e-10


def test_mixer_gradients_equal_the_recurrence() -> None:
    """Every gradient of the mixer (its input, Δ's bias, A, D, the projections, the conv) against autograd
    through the step-by-step recurrence: Δ scales v in the mixer (kernels.ssd_inputs) and k in the reference."""
    torch.manual_seed(0)
    model = LinearLlama(preset("tiny", layout="M", **SMALL)).double()
    model.reset_parameters(1)
    mixer = model.layers["0"].mixer
    u = torch.randn(2, 23, model.cfg.dim, dtype=torch.float64, requires_grad=True)
    cotangent = torch.randn(2, 23, model.cfg.dim, dtype=torch.float64)
    inputs = [u, *mixer.parameters()]
    got = torch.autograd.grad((mixer(u) * cotangent).sum(), inputs)
    want = torch.autograd.grad((_recurrence(mixer, u) * cotangent).sum(), inputs)
    names = ["u", *(name for name, _ in mixer.named_parameters())]
    for name, g, w in zip(names, got, want, strict=True):
        assert rel_err(g, w) < 1e-6, name


def test_mixer_on_the_triton_kernels_equals_the_recurrence() -> None:
    """backend=triton (the interpreter on CPU, fp32): ssd_inputs, expand_groups, the gated norm and the scan's
    kernels inside the mixer; its output and every gradient against the float64 recurrence."""
    pytest.importorskip("triton")
    torch.manual_seed(0)
    model = LinearLlama(preset("tiny", layout="M", backend="triton", **SMALL))
    model.reset_parameters(1)
    mixer = model.layers["0"].mixer
    reference = LinearLlama(preset("tiny", layout="M", **SMALL))
    reference.load_state_dict(model.state_dict())
    reference = reference.double().layers["0"].mixer
    u = torch.randn(1, 21, model.cfg.dim)
    cotangent = torch.randn(1, 21, model.cfg.dim)
    got_u, want_u = u.clone().requires_grad_(), u.double().requires_grad_()
    out, want = mixer(got_u), _recurrence(reference, want_u)
    assert rel_err(out, want) < 1e-4
    got = torch.autograd.grad((out * cotangent).sum(), [got_u, *mixer.parameters()])
    wanted = torch.autograd.grad((want * cotangent.double()).sum(), [want_u, *reference.parameters()])
    names = ["u", *(name for name, _ in mixer.named_parameters())]
    for name, g, w in zip(names, got, wanted, strict=True):
        assert rel_err(g, w) < 1e-4, name


def _check_sp(rank: int, world: int, layout: str) -> None:
    check_sp_model(rank, world, preset("tiny", layout=layout, **SMALL))


@pytest.mark.parametrize("layout,sp", [("MMMA", 2), ("MMMA", 4), ("MLMA", 2)])
def test_mamba2_layers_under_sequence_parallelism(layout: str, sp: int) -> None:
    run_distributed(_check_sp, sp, layout)


def _check_pipeline(rank: int, world: int) -> None:
    check_pipeline_model(rank, world, ["model.layout=MMMA", *(f"model.{k}={v}" for k, v in SMALL.items())])


def test_mamba2_layers_over_pipeline_stages() -> None:
    """pp 2 × 2 micro-batches of a tiny MMMA model through the Trainer equal the single-process step."""
    run_distributed(_check_pipeline, 2)


def test_mamba2_streams_window_by_window() -> None:
    torch.manual_seed(0)
    # d A_log is a cancelling suffix sum: 5e-8 of float64 rounding
    check_streaming(LinearLlama(preset("tiny", layout="ML", **SMALL)).double(), 16, 1e-6)


def test_preset_size() -> None:
    from models import num_parameters

    with torch.device("meta"):
        n = num_parameters(LinearLlama(preset("mamba2-1b")))
    assert abs(n - 1e9) / 1e9 < 0.10, n
