"""The softmax-attention kernel choice (issue 24): auto | cudnn | flash | math behind one block entry.

CPU: the fused kernels run as stand-ins — the installed torch's own schema and meta kernel check every
call (argument names and types, what the op returns), an fp64 computation gives the values, and the
stand-in asserts what the real kernels rely on (statistics shape and layout, max_q / max_k, dO laid out
like O). With the capability probes patched to say "CUDA half", the dispatch, the one-time log line,
the run-time fallback, the grouped-query probe, other schemas, every sp method (allgather, ring,
ulysses; both layouts) and the model's softmax mixer are checked against single-process attention.
GPU (`-m gpu`, skipped here): cuDNN against flash in bf16, forward and backward, through LSE merges
and in the model mixer.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from helpers import model_step, rel_err, run_distributed, seeded_model_and_batch

import parallel.attention.backends as backends
from models import preset
from parallel.attention import block_attention, block_attention_backward, choose_backend, dense_attention, sp_attention
from parallel.attention.block import Accumulator
from parallel.layout import shard_sequence
from runtime.config import load_config
from runtime.errors import ConfigError

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ---------------------------------------------------------------------------------------------
# CPU stand-ins of the fused ops
# ---------------------------------------------------------------------------------------------

def _meta(x):
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta") if isinstance(x, torch.Tensor) else x


def _bind(schema, args, kwargs) -> dict:
    """name → value of a call, as the op's schema binds it (defaults filled); unknown names fail like the op."""
    names = [a.name for a in schema.arguments]
    unknown = set(kwargs) - set(names)
    assert not unknown, f"{schema.name} has no arguments {unknown}"
    bound = dict(zip(names, args))
    for a in schema.arguments[len(args):]:
        if a.name in kwargs:
            bound[a.name] = kwargs[a.name]
        else:
            assert a.has_default_value(), f"{schema.name}: argument {a.name} missing"
            bound[a.name] = a.default_value
    return bound


def _scores(q, k, scale, causal):
    s = q @ k.transpose(-1, -2) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    return s


class FakeOp:
    """A fused attention op on the CPU: validated by the installed op's meta kernel, computed in fp64."""

    def __init__(self, backend: str, which: str, schema=None, gqa: bool = True, fail: bool = False):
        self.real = getattr(torch.ops.aten, backends._OP_NAMES[backend, which]).default
        self._schema = schema if schema is not None else self.real._schema
        self.backend, self.which, self.gqa, self.fail, self.calls = backend, which, gqa, fail, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.fail:
            raise RuntimeError(f"{self.backend}: no execution plan for this graph (stand-in)")
        b = _bind(self._schema, args, kwargs)
        if b["key"].shape[1] != b["query"].shape[1] and not self.gqa:
            raise RuntimeError("stand-in refuses fewer kv heads than query heads")
        if self._schema is self.real._schema:  # the real op's own checks and result shapes
            meta = self.real(*map(_meta, args), **{n: _meta(x) for n, x in kwargs.items()})
        else:
            meta = None
        q, k, v = (b[n].double() for n in ("query", "key", "value"))
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        scale = b["scale"] if b["scale"] is not None else q.shape[-1] ** -0.5
        s = _scores(q, k, scale, b["is_causal"])
        if self.which == "forward":
            lse = s.logsumexp(-1)
            values = {"output": (s - lse[..., None]).exp() @ v, "logsumexp": lse}
            shapes = {"output": q.shape, "logsumexp": (*lse.shape, 1) if self.backend == "cudnn" else lse.shape}
            return self._results(meta, values, shapes, b["query"].dtype)
        B, H, Tq, _ = q.shape
        lse, out, dout = b["logsumexp"], b["out"].double(), b["grad_out"].double()
        want = (B, H, Tq, 1) if self.backend == "cudnn" else (B, H, Tq)
        assert tuple(lse.shape) == want and lse.is_contiguous() and lse.dtype == torch.float32, lse.shape
        assert b["max_q"] == Tq and b["max_k"] == k.shape[2], (b["max_q"], b["max_k"], Tq, k.shape)
        if self.backend == "cudnn":  # its backward graph is cached by q, k, v: O and dO in the forward's layout
            assert b["grad_out"].stride() == b["out"].stride(), (b["grad_out"].stride(), b["out"].stride())
            assert b["attn_bias"] is None and b["cum_seq_q"] is None
        p = (s - lse.double().reshape(B, H, Tq, 1)).exp()
        dv = p.transpose(-1, -2) @ dout
        ds = p * (dout @ v.transpose(-1, -2) - (dout * out).sum(-1, keepdim=True))
        dq, dk = ds @ k * scale, ds.transpose(-1, -2) @ q * scale
        dk, dv = (x.unflatten(1, (H // groups, groups)).sum(2) for x in (dk, dv))
        grads = [dq, dk, dv]
        if meta is None:
            return tuple(g.to(b["query"].dtype) for g in grads)
        return tuple(torch.empty_strided(m.shape, m.stride(), dtype=m.dtype).copy_(g) for m, g in zip(meta, grads))

    def _results(self, meta, values, shapes, dtype):
        """What the op returns: the real op's meta results filled in, or (another schema) built by name."""
        out = []
        for i, name in enumerate(r.name for r in self._schema.returns):
            m = meta[i] if meta is not None else None
            if name in values:
                like = m if m is not None else torch.empty(shapes[name], dtype=dtype if name == "output" else
                                                           torch.float32)
                out.append(torch.empty_strided(like.shape, like.stride(), dtype=like.dtype)
                           .copy_(values[name].reshape(like.shape)))
            elif meta is not None:
                out.append(torch.zeros(m.shape, dtype=torch.long) if isinstance(m, torch.Tensor) else m)
            else:
                out.append(0 if name.startswith("max") else torch.zeros((), dtype=torch.long))
        return tuple(out)


def install_fakes(setattr_, **options) -> dict:
    """Pretend CUDA half tensors that both fused kernels take; their ops are CPU stand-ins. Fresh process state."""
    fakes = {(b, w): FakeOp(b, w, **options.get(b, {})) for b in ("cudnn", "flash") for w in ("forward", "backward")}
    setattr_(backends, "_op", lambda backend, which: fakes[backend, which])
    setattr_(backends, "_device_problem", lambda q: "")
    setattr_(backends, "_cudnn_check", lambda q, k, causal: "")
    for name in ("_REFUSED", "_GQA", "_LAST"):
        setattr_(backends, name, {})
    setattr_(backends, "_LOGGED", set())
    return fakes


@pytest.fixture
def fakes(monkeypatch):
    return install_fakes(monkeypatch.setattr)


def _qkv(B=2, T=24, hq=4, hkv=2, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, h, D, generator=g, requires_grad=True) for h in (hq, hkv, hkv)]


def _reference(q, k, v, causal=True):
    t = (x.transpose(1, 2) for x in (q, k, v))
    return F.scaled_dot_product_attention(*t, is_causal=causal, enable_gqa=q.shape[2] != k.shape[2]).transpose(1, 2)


def _grads(out, inputs, w):
    return torch.autograd.grad((out * w).sum(), inputs)


# ---------------------------------------------------------------------------------------------
# configuration and the CPU default
# ---------------------------------------------------------------------------------------------

def test_bad_attention_backend_is_one_line_error() -> None:
    fix = "is unknown; use auto, cudnn, flash or math$"
    with pytest.raises(ValueError, match=r"^model.attention_backend='fast' " + fix):
        preset("tiny", attention_backend="fast")
    with pytest.raises(ConfigError, match=r"^model.attention_backend='cuda' " + fix):
        load_config(None, ["model.attention_backend=cuda"]).validate(1)
    assert load_config(None, ["model.attention_backend=flash"]).model.attention_backend == "flash"
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"model.attention_backend='x' is unknown"):
        sp_attention(q, k, v, method="ring", backend="x")


def test_cpu_default_is_math_logged_once_and_unchanged(monkeypatch, capsys) -> None:
    monkeypatch.setattr(backends, "_LOGGED", set())
    q, k, v = _qkv()
    for _ in range(3):
        assert torch.equal(dense_attention(q, k, v, None, True), _reference(q, k, v))  # SDPA as before, bitwise
    out = capsys.readouterr().out
    assert out.count("longtrain: attention backend:") == 1, out
    assert out.startswith("longtrain: attention backend: math (auto; not cudnn or flash: cpu tensors; cpu float32"), out
    for fused in ("cudnn", "flash"):  # explicit fused kernels where they cannot run: one line naming the fix
        with pytest.raises(ValueError, match=rf"^model.attention_backend={fused} cannot run here \(cpu tensors\); "
                                             r"use model.attention_backend=auto$"):
            dense_attention(q, k, v, None, True, fused)
    assert backends.explicit_backend_problem("cudnn", torch.device("cpu"), torch.float32, 4, 2, 16) == "cpu tensors"
    assert backends.explicit_backend_problem("auto", torch.device("cpu"), torch.float32, 4, 2, 16) == ""


def _trainer_refuses(rank: int, world: int) -> None:
    from runtime.mesh import build_mesh
    from runtime.trainer import Trainer

    cfg = load_config(None, ["model.layout=LA", "model.attention_backend=cudnn", "parallel.pp=1", "parallel.sp=1",
                             "train.seq_len=32", "train.batch_size=2", "parallel.microbatches=1"])
    with pytest.raises(ConfigError, match=r"^model.attention_backend=cudnn cannot run the softmax layers on this cpu "
                                          r"\(cpu tensors\); use model.attention_backend=auto$"):
        Trainer(cfg, build_mesh(pp=1, sp=1))


def test_trainer_refuses_an_explicit_backend_that_cannot_run() -> None:
    run_distributed(_trainer_refuses, 1)


# ---------------------------------------------------------------------------------------------
# dispatch with stand-ins of the fused ops
# ---------------------------------------------------------------------------------------------

def test_auto_takes_cudnn_and_logs_once(fakes, capsys) -> None:
    q, k, v = _qkv()
    w = torch.randn(q.shape, generator=torch.Generator().manual_seed(5))
    ref = _reference(q, k, v)
    ref_grads = _grads(ref, (q, k, v), w)
    for _ in range(2):
        out = dense_attention(q, k, v, None, True)
        assert rel_err(out, ref) < 1e-6
        for got, want in zip(_grads(out, (q, k, v), w), ref_grads):
            assert rel_err(got, want) < 1e-6
    assert fakes["cudnn", "forward"].calls == 2 and fakes["cudnn", "backward"].calls == 2
    assert fakes["flash", "forward"].calls == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["longtrain: attention backend: cudnn (auto; cpu float32, 4 q / 2 kv heads, head dim 16, "
                     f"torch {torch.__version__})"], lines
    assert choose_backend(q, k, True, "flash") == "flash" and choose_backend(q, k, True, "math") == "math"
    assert len(capsys.readouterr().out.splitlines()) == 2  # each new (setting, choice) once


@pytest.mark.parametrize("kernels", [("cudnn", "cudnn"), ("flash", "flash"), ("cudnn", "math"), ("cudnn", "flash")])
def test_backward_through_lse_merge(fakes, kernels) -> None:
    """Rows [S, 2S) of causal attention over 2S keys as two merged blocks — earlier keys (full) and the diagonal
    (causal) — each block on its own kernel; forward and backward through the fp32 merge equal one SDPA."""
    q, k, v = _qkv(T=32)
    S = 16
    w = torch.randn(2, S, 4, 16, generator=torch.Generator().manual_seed(3))
    ref = _reference(q, k, v)[:, S:]
    ref_grads = _grads(ref, (q, k, v), w)
    qd, kd, vd = (x.detach() for x in (q, k, v))
    acc = Accumulator(qd[:, S:])
    jobs = [(slice(0, S), slice(0, S), False, kernels[0]), (slice(0, S), slice(S, 2 * S), True, kernels[1])]
    for rows, cols, causal, kernel in jobs:
        acc.add(rows, *block_attention(qd[:, S:], kd[:, cols], vd[:, cols], 0.25, causal, kernel))
    assert set(acc.aux) == set(kernels)
    out = acc.out.to(q.dtype)
    assert rel_err(out, ref) < 1e-6
    dq, dk, dv = torch.zeros_like(qd), torch.zeros_like(kd), torch.zeros_like(vd)
    for _, cols, causal, kernel in jobs:
        gq, gk, gv = block_attention_backward(w, qd[:, S:], kd[:, cols], vd[:, cols], out, acc.lse, 0.25, causal,
                                              acc.aux, kernel)
        dq[:, S:] += gq
        dk[:, cols] += gk
        dv[:, cols] += gv
    for name, got, want in zip("qkv", (dq, dk, dv), ref_grads):
        assert rel_err(got, want) < 1e-5, (kernels, name)


def test_a_fused_kernel_that_fails_falls_back_once(monkeypatch, capsys) -> None:
    fakes = install_fakes(monkeypatch.setattr, cudnn={"fail": True})
    q, k, v = _qkv()
    ref = _reference(q, k, v)
    for _ in range(2):
        assert rel_err(dense_attention(q, k, v, None, True), ref) < 1e-6
    # cuDNN tried on the first call only (twice: the grouped-query probe retries with repeated kv heads)
    assert fakes["cudnn", "forward"].calls == 2 and fakes["flash", "forward"].calls == 2
    out = capsys.readouterr().out
    assert out.count("longtrain: attention backend: cudnn failed (RuntimeError: cudnn: no execution plan") == 1, out
    assert "longtrain: attention backend: flash (auto; not cudnn: it failed earlier in this process" in out, out
    with pytest.raises(ValueError, match="model.attention_backend=cudnn cannot run here \\(it failed earlier"):
        dense_attention(q, k, v, None, True, "cudnn")
    monkeypatch.setattr(backends, "_REFUSED", {})
    with pytest.raises(RuntimeError, match="no execution plan"):  # an explicit choice never falls back
        dense_attention(q, k, v, None, True, "cudnn")


def test_kv_heads_repeated_where_the_op_refuses_gqa(monkeypatch) -> None:
    fakes = install_fakes(monkeypatch.setattr, cudnn={"gqa": False})
    q, k, v = _qkv()
    w = torch.randn(q.shape)
    out = dense_attention(q, k, v, None, True, "cudnn")
    ref = _reference(q, k, v)
    assert rel_err(out, ref) < 1e-6 and backends._GQA == {"cudnn": False}
    for got, want in zip(_grads(out, (q, k, v), w), _grads(ref, (q, k, v), w)):
        assert rel_err(got, want) < 1e-6
    assert fakes["cudnn", "forward"].calls == 2  # the probe, then repeated kv heads


def test_other_schemas(monkeypatch) -> None:
    """A torch whose cuDNN op lacks attn_bias / compute_log_sumexp (2.4's) takes the same call; one that needs an
    argument we do not know makes cuDNN unavailable (auto → flash) instead of failing."""
    old = torch._C.parse_schema(
        "aten::_scaled_dot_product_cudnn_attention(Tensor query, Tensor key, Tensor value, float dropout_p=0.0, "
        "bool is_causal=False, bool return_debug_mask=False, *, float? scale=None) -> (Tensor output, "
        "Tensor logsumexp, Tensor cum_seq_q, Tensor cum_seq_k, SymInt max_q, SymInt max_k, Tensor philox_seed, "
        "Tensor philox_offset, Tensor debug_attn_mask)")
    fakes = install_fakes(monkeypatch.setattr, cudnn={"schema": old})
    fakes["cudnn", "backward"] = FakeOp("cudnn", "backward")
    q, k, v = _qkv()
    assert rel_err(dense_attention(q, k, v, None, True, "cudnn"), _reference(q, k, v)) < 1e-6
    new = torch._C.parse_schema(str(old).replace("Tensor value,", "Tensor value, int window,"))
    install_fakes(monkeypatch.setattr, cudnn={"schema": new})
    assert re.search(r"needs unknown arguments \['window'\]", backends.cudnn_problem(q, k, True))
    assert choose_backend(q, k, True) == "flash"


# ---------------------------------------------------------------------------------------------
# every sp method and the model's mixer on the stand-ins
# ---------------------------------------------------------------------------------------------

def _check_methods(rank: int, world: int, backend: str) -> None:
    import pytest as _pytest

    patch = _pytest.MonkeyPatch()
    fakes = install_fakes(patch.setattr)
    B, T, D = 2, 8 * world * 2, 16
    for i, (method, layout, (hq, hkv), causal) in enumerate(
            [(m, lay, h, True) for m in ("allgather", "ring", "ulysses") for lay in ("contiguous", "zigzag")
             for h in ((4, 4), (8, 2))] + [(m, "zigzag", (8, 2), False) for m in ("allgather", "ring")]):
        g = torch.Generator().manual_seed(200 + i)
        q, k, v = (torch.randn(B, T, h, D, generator=g, requires_grad=True) for h in (hq, hkv, hkv))
        w = torch.randn(B, T, hq, D, generator=g)
        ref = _reference(q, k, v, causal)
        ref_grads = _grads(ref, (q, k, v), w)
        local = [shard_sequence(x.detach(), rank, world, layout).requires_grad_() for x in (q, k, v)]
        out = sp_attention(*local, method=method, layout=layout, causal=causal, backend=backend)
        what = (backend, method, layout, hq, hkv, causal)
        assert rel_err(out, shard_sequence(ref.detach(), rank, world, layout)) < 1e-5, what
        grads = _grads(out, local, shard_sequence(w, rank, world, layout))
        for name, got, want in zip("qkv", grads, ref_grads):
            assert rel_err(got, shard_sequence(want, rank, world, layout)) < 1e-5, (*what, name)
    kernel = "cudnn" if backend == "auto" else backend
    assert fakes[kernel, "forward"].calls > 0 and fakes[kernel, "backward"].calls > 0
    assert sum(f.calls for (b, _), f in fakes.items() if b != kernel) == 0
    patch.undo()
    import torch.distributed as dist

    dist.barrier()


@pytest.mark.parametrize("backend", ["auto", "flash"])
def test_sp_methods_on_fused_stand_ins(backend: str) -> None:
    run_distributed(_check_methods, 2, backend)


def test_model_mixer_goes_through_the_entry(monkeypatch, capsys) -> None:
    """sp = 1: the softmax mixer runs the chosen kernel (cuDNN stand-in) and equals the CPU default (SDPA)."""
    cfg = preset("tiny", layout="LA", n_heads=8, n_kv_heads=4, gate=True)
    model, tokens, targets = seeded_model_and_batch(cfg, 1)
    monkeypatch.setattr(backends, "_LOGGED", set())
    ref_loss, ref_grads = model_step(model, tokens, targets, targets.numel())
    assert "math (auto" in capsys.readouterr().out
    fakes = install_fakes(monkeypatch.setattr)
    loss, grads = model_step(model, tokens, targets, targets.numel())
    assert fakes["cudnn", "forward"].calls == 2 and fakes["cudnn", "backward"].calls == 2  # two A layers
    assert abs(loss - ref_loss) / ref_loss < 1e-6
    for name, grad in grads.items():
        assert rel_err(grad, ref_grads[name]) < 1e-5, name
    assert "longtrain: attention backend: cudnn (auto;" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# GPU: cuDNN against flash (bf16)
# ---------------------------------------------------------------------------------------------

def _bf16_qkv(T: int, hq: int = 32, hkv: int = 8, D: int = 128, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(1, T, h, D, device="cuda", dtype=torch.bfloat16, generator=g) for h in (hq, hkv, hkv, hq)]


@gpu
@needs_cuda
@pytest.mark.parametrize("T", [1000, 4096, 32768])
def test_gpu_cudnn_matches_flash(T: int) -> None:
    q, k, v, w = _bf16_qkv(T)
    problem = backends.cudnn_problem(q, k, True)
    if problem and T % 128:
        pytest.skip(f"this torch / cuDNN does not take T={T}: {problem}")
    assert choose_backend(q, k, True) == "cudnn", problem  # the default where cuDNN runs
    res = {}
    for backend in ("cudnn", "flash"):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = dense_attention(*leaves, None, True, backend)
        res[backend] = [out.detach(), *torch.autograd.grad(out, leaves, w)]
    for name, a, b in zip(("o", "dq", "dk", "dv"), res["cudnn"], res["flash"]):
        assert rel_err(a.float(), b.float()) < 1e-2, (T, name)
    if T <= 4096:  # both against fp32 attention
        ref = [x.float().requires_grad_() for x in (q, k, v)]
        o = _reference(*ref)
        want = [o.detach(), *torch.autograd.grad(o, ref, w.float())]
        for name, a, b in zip(("o", "dq", "dk", "dv"), res["cudnn"], want):
            assert rel_err(a.float(), b) < 1e-2, (T, name)


@gpu
@needs_cuda
@pytest.mark.parametrize("kernels", [("cudnn", "cudnn"), ("flash", "flash"), ("cudnn", "flash"), ("flash", "cudnn")])
def test_gpu_lse_merges(kernels) -> None:
    """Rows [S, 2S) over 2S keys as two merged blocks (earlier keys, the causal diagonal), each on its kernel:
    forward and backward through the fp32 merge against fp32 attention, bf16 tolerance."""
    S = 4096
    q, k, v, w = _bf16_qkv(2 * S, seed=1)
    ref = [x.float().requires_grad_() for x in (q, k, v)]
    o = _reference(*ref)[:, S:]
    want = [o.detach(), *torch.autograd.grad(o, ref, w[:, S:].float())]
    acc = Accumulator(q[:, S:])
    jobs = [(slice(0, S), False, kernels[0]), (slice(S, 2 * S), True, kernels[1])]
    for cols, causal, kernel in jobs:
        acc.add(slice(0, S), *block_attention(q[:, S:], k[:, cols], v[:, cols], 128 ** -0.5, causal, kernel))
    out = acc.out.to(q.dtype)
    dq, dk, dv = (torch.zeros(x.shape, device="cuda") for x in (q, k, v))
    for cols, causal, kernel in jobs:
        gq, gk, gv = block_attention_backward(w[:, S:], q[:, S:], k[:, cols], v[:, cols], out, acc.lse, 128 ** -0.5,
                                              causal, acc.aux, kernel)
        dq[:, S:] += gq
        dk[:, cols] += gk
        dv[:, cols] += gv
    for name, a, b in zip(("o", "dq", "dk", "dv"), (out, dq, dk, dv), want):
        assert rel_err(a.float(), b) < 1e-2, (kernels, name)


@gpu
@needs_cuda
def test_gpu_model_mixer_cudnn_matches_flash() -> None:
    from models.llama import SoftmaxAttention

    x = torch.randn(1, 8192, 2048, device="cuda", generator=torch.Generator(device="cuda").manual_seed(2))
    res = {}
    for backend in ("cudnn", "flash"):
        torch.manual_seed(0)
        layer = SoftmaxAttention(preset("1b", attention_backend=backend)).cuda()
        xb = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = layer(xb)
        out.float().square().mean().backward()
        res[backend] = [out.detach().float(), xb.grad, *(p.grad for p in layer.parameters())]
    for i, (a, b) in enumerate(zip(res["cudnn"], res["flash"])):
        assert rel_err(a, b) < 2e-2, i
