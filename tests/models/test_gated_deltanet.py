"""Gated DeltaNet (D) layers: the mixer equals its definition step by step; a tiny DDDA model under sequence
parallelism (LASP-2 for affine recurrences) and over pipeline stages equals the single-process step; D layers
stream window by window; the gdn-1b preset has about 1B parameters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import check_pipeline_model, check_sp_model, check_streaming, rel_err, run_distributed

from models import LinearLlama, preset

TINY = dict(layout="DDDA", gate=False)


def _definition(mixer, x: torch.Tensor) -> torch.Tensor:
    """Gated DeltaNet from the paper's equations, one token at a time (float64)."""
    B, T, _ = x.shape
    H, Dh, W = mixer.heads, mixer.head_dim, mixer.width
    qkv, g_out, b, a = mixer.in_proj(x).split([3 * W, W, H, H], dim=-1)
    w = mixer.conv.weight[:, 0]  # [channels, width]: y_t = silu(Σ_i w_i x_{t−width+1+i})
    padded = torch.cat([qkv.new_zeros(B, w.shape[1] - 1, qkv.shape[-1]), qkv], dim=1)
    qkv = F.silu(torch.stack([(padded[:, t : t + w.shape[1]] * w.t()).sum(1) for t in range(T)], dim=1))
    q, k, v = (t.reshape(B, T, H, Dh) for t in qkv.split(W, dim=-1))
    q, k = (t / torch.sqrt((t * t).sum(-1, keepdim=True) + 1e-6) for t in (q, k))
    beta = torch.sigmoid(b)
    alpha = torch.exp(-torch.exp(mixer.A_log) * F.softplus(a + mixer.dt_bias))  # a_t ∈ (0, 1)
    S = x.new_zeros(B, H, Dh, Dh)
    eye = torch.eye(Dh, dtype=x.dtype)
    outs = []
    for t in range(T):
        kt = k[:, t]
        decay = alpha[:, t, :, None, None] * (eye - beta[:, t, :, None, None] * kt[..., :, None] * kt[..., None, :])
        S = decay @ S + beta[:, t, :, None, None] * kt[..., :, None] * v[:, t, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S) * Dh**-0.5)
    o = torch.stack(outs, dim=1)
    o = mixer.out_norm(o) * F.silu(g_out.reshape(B, T, H, Dh))
    return mixer.o(o.reshape(B, T, W))


def test_mixer_equals_the_definition() -> None:
    torch.manual_seed(0)
    model = LinearLlama(preset("tiny", layout="D")).double()
    model.reset_parameters(1)
    mixer = model.layers["0"].mixer
    x = torch.randn(2, 37, model.cfg.dim, dtype=torch.float64)
    assert rel_err(mixer(x), _definition(mixer, x)) < 1e-10


@pytest.mark.parametrize("split", [False, True], ids=["fused", "split"])
def test_mixer_on_the_triton_kernels(split: bool) -> None:
    """model.backend=triton (the interpreter on a CPU), with and without model.delta_split: the mixer's output and
    its input and parameter gradients equal the PyTorch path's (fp32)."""
    pytest.importorskip("triton")
    for got, want in zip(_mixer_step("triton", delta_split=split), _mixer_step("torch"), strict=True):
        assert rel_err(got, want) < 1e-5


def _mixer_step(backend: str, **overrides) -> list[torch.Tensor]:
    """A tiny D mixer's output and its input and parameter gradients (fp32, fixed seeds) on `backend`."""
    torch.manual_seed(0)
    model = LinearLlama(preset("tiny", layout="D", backend=backend, **overrides))
    model.reset_parameters(1)
    mixer = model.layers["0"].mixer
    x = torch.randn(2, 37, model.cfg.dim, generator=torch.Generator().manual_seed(2), requires_grad=True)
    y = mixer(x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(3)))
    return [y, x.grad, *(p.grad for p in mixer.parameters())]


def test_delta_window_runs_the_kernels_window_by_window(monkeypatch) -> None:
    """model.delta_window reaches the Triton kernels as DeltaConfig.window_tokens (the interpreter on a CPU; one-chunk
    segments so that 37 tokens make windows): the mixer's output and gradients equal the PyTorch path's."""
    pytest.importorskip("triton")
    import kernels.delta_rule.triton.common as common
    import kernels.delta_rule.triton.function as function

    monkeypatch.setattr(common, "DEFAULT_CONFIG", common.with_config(seg_chunks=1, sweep_bv=16, grad_bv=16, out_bv=16,
                                                                     grad_programs=3))
    used = []
    monkeypatch.setattr(function, "windows", lambda p, f=function.windows: used.append(f(p)) or used[-1])
    got = _mixer_step("triton", delta_window=32)
    assert used and all(w is not None and len(w) == 4 for w in used)  # 2 rows × 2 windows, forward and backward
    for g, want in zip(got, _mixer_step("torch"), strict=True):
        assert rel_err(g, want) < 1e-5


L2_CASES = [("cpu", torch.float32, 32), ("cpu", torch.bfloat16, 32),
            pytest.param("cuda", torch.bfloat16, 128, marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device,dtype,dim", L2_CASES)
def test_l2_normalize_on_the_norm_kernel(device: str, dtype: torch.dtype, dim: int) -> None:
    """q and k's L2 norm through kernels.norm's Triton RMSNorm (constant weight D^-1/2, eps/D; the interpreter on
    a CPU, gdn-1b's head width on a GPU) equals x / sqrt(‖x‖² + eps) in float64: the output and the input
    gradient."""
    pytest.importorskip("triton")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from models.gated_deltanet import l2_normalize

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 3, dim, generator=g) * torch.rand(2, 9, 3, 1, generator=g)
    x = x.to(device=device, dtype=dtype).requires_grad_()
    dy = torch.randn(x.shape, generator=g).to(device=device, dtype=dtype)
    y = l2_normalize(x, "triton")
    (dx,) = torch.autograd.grad(y, x, dy)
    x64 = x.detach().double().requires_grad_()
    y64 = x64 / torch.sqrt((x64 * x64).sum(-1, keepdim=True) + 1e-6)
    (dx64,) = torch.autograd.grad(y64, x64, dy.double())
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert y.dtype == dtype and rel_err(y, y64) < tol
    assert dx.dtype == dtype and rel_err(dx, dx64) < tol


def _check_sp(rank: int, world: int) -> None:
    check_sp_model(rank, world, preset("tiny", **TINY))


@pytest.mark.parametrize("sp", [2, 4])
def test_gdn_layers_under_sequence_parallelism(sp: int) -> None:
    run_distributed(_check_sp, sp)


def _check_pipeline(rank: int, world: int) -> None:
    check_pipeline_model(rank, world, ["model.layout=DDDA"])


def test_gdn_layers_over_pipeline_stages() -> None:
    run_distributed(_check_pipeline, 2)


def test_gdn_streams_window_by_window() -> None:
    """Windows carry (S, conv tail) of every D layer: the windowed step equals the whole-sequence step."""
    torch.manual_seed(0)
    model = LinearLlama(preset("tiny", layout="DL")).double()
    model.reset_parameters(2)
    check_streaming(model.double(), 16, 1e-8)


def test_preset_size() -> None:
    from models import num_parameters

    with torch.device("meta"):
        model = LinearLlama(preset("gdn-1b"))
    assert model.cfg.layer_kinds() == "DDDA" * 4
    n = num_parameters(model)
    assert abs(n - 1e9) / 1e9 < 0.10, n
