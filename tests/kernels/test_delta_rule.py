"""Gated delta rule (kernels/delta_rule/): the chunked PyTorch form and the Triton kernels against the float64
step-by-step recurrence.

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set before triton is imported) at
small sizes with NaN-poisoned outputs. The 13 cases marked ``gpu`` (`test_gpu_matches_chunked`, `pytest -m gpu`) run
8K-16K tokens (bf16 at the model's 16 heads of 128, fp16 with the chunk-32 configs, fp32; every config; B = 1 and
2; T not a multiple of the chunk; with and without gate and initial state) against the float64 chunked reference on
the GPU: outputs, final state and every input gradient, NaN-poisoned outputs too. Intended time: about 60 s on one
H200, nearly all of it Triton compiling (the GPU section's comment counts the compiles).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from helpers import kernel_err  # noqa: E402

import kernels.triton.common as triton_common  # noqa: E402  (the POISON_OUTPUTS switch the kernels share)
from kernels.delta_rule import (  # noqa: E402
    delta_rule,
    delta_rule_chunked,
    delta_rule_recurrent,
    delta_rule_summary,
    gated_delta_rule,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _err(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    """‖a − b‖ / (‖b‖ + floor·√n) in float64; NaN anywhere gives inf."""
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / (b.norm() + floor * b.numel() ** 0.5)).item()


def _inputs(B, T, H, K, V, *, decay=True, gate=True, init=True, dtype=torch.float32, device=DEVICE, seed=0,
            gen_device="cpu"):
    """Keys L2-normalized (as the layer makes them), β in (0, 1), gates as Gated DeltaNet's −A·softplus(·); drawn
    on gen_device (the GPU cases draw their 10⁸ numbers there)."""
    g = torch.Generator(device=gen_device).manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=gen_device)

    x = {"q": rnd(B, T, H, K), "k": F.normalize(rnd(B, T, H, K), dim=-1), "v": rnd(B, T, H, V),
         "beta": torch.sigmoid(rnd(B, T, H))}
    if decay:
        x["log_decay"] = torch.log1p(-torch.exp2(-3.0 - torch.arange(H, dtype=torch.float32, device=gen_device)))
    if gate:
        x["gate"] = -F.softplus(rnd(B, T, H) - 2.0)
    if init:
        x["initial_state"] = rnd(B, H, K, V) * 0.5
    fp32 = ("log_decay", "initial_state") if dtype != torch.float64 else ()  # the state and λ stay fp32
    return {n: t.to(device, torch.float32 if n in fp32 else dtype) for n, t in x.items()}


def _run(fn, x: dict, do: torch.Tensor | None, dfinal: torch.Tensor | None, fixed=(), **kw):
    """Outputs and the gradients of ⟨o, do⟩ + ⟨final, dfinal⟩ with respect to every input in x but `fixed`."""
    leaves = {n: t.detach().clone().requires_grad_(n not in fixed) for n, t in x.items()}
    o, final = fn(leaves["q"], leaves["k"], leaves["v"], leaves["beta"], log_decay=leaves.get("log_decay"),
                  gate=leaves.get("gate"), initial_state=leaves.get("initial_state"),
                  output_final_state=dfinal is not None, **kw)
    loss = 0.0
    if do is not None:
        loss = loss + (o.to(do.dtype) * do).sum()
    if dfinal is not None:
        loss = loss + (final.to(dfinal.dtype) * dfinal).sum()
    wanted = {n: t for n, t in leaves.items() if t.requires_grad}
    grads = torch.autograd.grad(loss, list(wanted.values()), allow_unused=True)
    return o, final, {n: torch.zeros_like(t) if gr is None else gr for (n, t), gr in zip(wanted.items(), grads)}


def _cotangents(x: dict, final: bool, seed: int, gen_device="cpu"):
    B, T, H, K = x["k"].shape
    gen = torch.Generator(device=gen_device).manual_seed(seed)
    kw = dict(generator=gen, dtype=torch.float64, device=gen_device)
    do = torch.randn(B, T, H, x["v"].shape[-1], **kw)
    df = torch.randn(B, H, K, x["v"].shape[-1], **kw) if final else None
    return do.to(x["q"].device), None if df is None else df.to(x["q"].device)


def _compare(fn, x: dict, tol: float, final: bool = True, seed: int = 1, ref=delta_rule_recurrent, **kw) -> dict:
    do, df = _cotangents(x, final, seed)
    o, fs, grads = _run(fn, x, do, df, **kw)
    o_r, fs_r, grads_r = _run(ref, {n: t.double() for n, t in x.items()}, do, df)
    assert o.shape == o_r.shape and o.dtype == x["q"].dtype
    errs = {"o": _err(o, o_r)}
    if final:
        assert fs.dtype == torch.float32 or x["q"].dtype == torch.float64
        errs["final"] = _err(fs, fs_r)
    # decay gradients are exactly 0 on a first token without initial state: floor the norm at 1 per element
    errs.update({f"d{n}": _err(grads[n], grads_r[n], floor=1.0) for n in grads})
    if "log_decay" in grads and "gate" in grads_r:
        # dλ_h = Σ_{b,t} d log a_{b,t,h} sums the per-token gradients (the gate's) with cancellation (Σ|terms| is
        # often 10–30 × |dλ|): measure its error against the size of the terms it sums, as fp32 can give it
        terms = grads_r["gate"].abs().sum((0, 1))
        errs["dlog_decay"] = ((grads["log_decay"].double() - grads_r["log_decay"]).norm() / terms.norm()).item()
    bad = {n: e for n, e in errs.items() if not e <= tol}
    assert not bad, f"errors above {tol}: {bad} (all: {errs})"
    return errs


# ------------------------------------------------------------------------------------ PyTorch references

CASES = [(T, True, True, True) for T in (1, 7, 64, 100, 257)]  # (T, decay, gate, initial state)
CASES += [(100, False, False, False), (100, True, False, True), (100, False, True, False)]


@pytest.mark.parametrize("T,decay,gate,init", CASES)
def test_chunked_matches_recurrence(T: int, decay: bool, gate: bool, init: bool) -> None:
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        x = _inputs(2, T, 2, 8, 12, decay=decay, gate=gate, init=init, dtype=dtype, device="cpu", seed=T)
        _compare(delta_rule_chunked, x, tol, chunk_size=16)


def test_summary_is_the_affine_map() -> None:
    """(P, M) of a sequence maps any entering state to the leaving one; P = Π a_t (I − β_t k_tᵀ k_t)."""
    x = _inputs(2, 45, 2, 8, 12, dtype=torch.float64, device="cpu", seed=5)
    P, M = delta_rule_summary(x["k"], x["v"], x["beta"], log_decay=x["log_decay"], gate=x["gate"], chunk_size=16)
    _, final = delta_rule_recurrent(x["q"], x["k"], x["v"], x["beta"], log_decay=x["log_decay"], gate=x["gate"],
                                    initial_state=x["initial_state"].double(), output_final_state=True)
    assert _err(P @ x["initial_state"].double() + M, final) < 1e-12
    Pr = torch.eye(8, dtype=torch.float64).expand(2, 2, 8, 8)
    loga = x["log_decay"].double() + x["gate"]
    for t in range(45):
        k = x["k"][:, t]
        step = torch.eye(8, dtype=torch.float64) - x["beta"][:, t, :, None, None] * k.unsqueeze(-1) * k.unsqueeze(-2)
        Pr = loga[:, t].exp()[..., None, None] * step @ Pr
    assert _err(P, Pr) < 1e-12


def test_dispatch_defaults_and_errors() -> None:
    q = torch.randn(1, 70, 2, 16, dtype=torch.bfloat16)
    beta = torch.rand(1, 70, 2)
    o, s = gated_delta_rule(q, F.normalize(q.float(), dim=-1).bfloat16(), q, beta)
    assert o.dtype == torch.bfloat16 and s is None
    _, s = delta_rule(q, q, q, beta, output_final_state=True, backend="torch")
    assert s.dtype == torch.float32 and s.shape == (1, 2, 16, 16)
    with pytest.raises(ValueError, match=r"beta must be \[B, T, H\]"):
        delta_rule(q, q, q, beta[:, :5])
    with pytest.raises(ValueError, match="backend"):
        delta_rule(q, q, q, beta, backend="cuda")


# ------------------------------------------------------------------------------------ Triton (interpreter on CPU)

triton = pytest.importorskip("triton")

from kernels.delta_rule.triton import FUSED, delta_rule_triton, with_config  # noqa: E402

# The fused paths (FUSED: outputs from the forward sweep, one gradient kernel): two-chunk segments (segment maps,
# scans) with column blocks of 16 and 3 persistent gradient programs; and one segment with whole-V tiles. *_KB: the
# K-blocked gradient kernel (grad_block_k 16: two K blocks at K = 24 or 32)
SEGMENTED = with_config(seg_chunks=2, sweep_bv=16, grad_bv=16, scan_bn=16, grad_programs=3, **FUSED)
WHOLE = with_config(seg_chunks=64, sweep_bv=64, grad_bv=64, **FUSED)
SEGMENTED_KB = with_config(seg_chunks=2, sweep_bv=16, grad_bv=16, scan_bn=16, grad_programs=3, grad_block_k=16,
                           **FUSED)
WHOLE_KB = with_config(seg_chunks=64, sweep_bv=64, grad_bv=64, grad_block_k=16, **FUSED)
# *_SPLIT (the default paths): outputs from the chunk-parallel kernel (out_split), the gradient in two kernels
# (grad_split) and dU's chunk-local share before the backward sweeps (bwd_split)
# (with `_grad_wy_kernel`; *_WY2: `_grad_wy2_kernel`, the default)
SEGMENTED_SPLIT = with_config(seg_chunks=2, sweep_bv=16, grad_bv=16, scan_bn=16, grad_programs=3, grad_block_k=16,
                              grad_split=True, out_split=True, bwd_split=True, out_bv=16, wy_kernel=1)
WHOLE_SPLIT = with_config(seg_chunks=64, sweep_bv=64, grad_bv=64, grad_split=True, out_split=True, bwd_split=True,
                          wy_kernel=1)
SEGMENTED_WY2 = replace(SEGMENTED_SPLIT, wy_kernel=2)  # the split path with `_grad_wy2_kernel`
GRAD_CONFIGS = {"grad": SEGMENTED, "grad-kb": SEGMENTED_KB, "split": SEGMENTED_SPLIT, "split-wy2": SEGMENTED_WY2}
GRAD_PATHS = pytest.mark.parametrize("path", list(GRAD_CONFIGS))


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Allocate every kernel output as NaN so unwritten elements fail the comparisons."""
    monkeypatch.setattr(triton_common, "POISON_OUTPUTS", True)


@pytest.mark.parametrize("T,cfg", [(1, SEGMENTED), (7, WHOLE), (64, SEGMENTED), (100, SEGMENTED), (257, WHOLE),
                                   (7, WHOLE_KB), (100, SEGMENTED_KB), (7, WHOLE_SPLIT), (100, SEGMENTED_SPLIT),
                                   (7, replace(WHOLE_SPLIT, wy_kernel=2)), (100, SEGMENTED_WY2)],
                         ids=["1-seg", "7-whole", "64-seg", "100-seg", "257-whole", "7-whole-kb", "100-seg-kb",
                              "7-whole-split", "100-seg-split", "7-whole-wy2", "100-seg-wy2"])
def test_triton_matches_recurrence(T, cfg):
    """Outputs, final state, gradients of q, k, v, β, gate, λ and the initial state; tails shorter than a chunk."""
    x = _inputs(1, T, 1 if T > 200 else 2, 16, 32, seed=T)
    _compare(delta_rule_triton, x, 1e-5, chunk_size=16, config=cfg)


@GRAD_PATHS
@pytest.mark.parametrize("decay,gate,init,final", [(False, False, False, False), (True, False, False, True),
                                                    (False, True, True, False)], ids=["plain", "decay", "gate"])
def test_triton_decay_kinds(decay, gate, init, final, path):
    """No decay, a constant per-head decay, a per-token gate; with and without initial and final states."""
    x = _inputs(2, 45, 1, 16, 16, decay=decay, gate=gate, init=init, seed=3)
    _compare(delta_rule_triton, x, 1e-5, final=final, chunk_size=16, config=GRAD_CONFIGS[path])


@GRAD_PATHS
@pytest.mark.parametrize("K,V,C", [(32, 16, 32), (24, 40, 16)], ids=["K>V,C32", "odd-dims"])
def test_triton_head_dims_and_chunks(K, V, C, path):
    """K ≠ V, head dims that are not powers of two (masked tiles), and chunks of 32."""
    x = _inputs(1, 50, 1, K, V, seed=4)
    _compare(delta_rule_triton, x, 1e-5, chunk_size=C, config=GRAD_CONFIGS[path])


@pytest.fixture
def _bounds_checked(monkeypatch):
    """Under the interpreter, every load and store that a kernel issues (its unmasked lanes) must fall inside one
    of the tensors passed to that launch: one that does not fails the launch before it touches memory. Yields
    {"accesses": the number of lanes checked}."""
    np = pytest.importorskip("numpy")
    interp = pytest.importorskip("triton.runtime.interpreter")
    builder, executor = interp.InterpreterBuilder, interp.GridExecutor
    seen = {"accesses": 0}
    launch = {"ranges": [], "kernel": None}
    load, store, call = builder.create_masked_load, builder.create_masked_store, executor.__call__

    def check(kind, ptrs, mask):
        if not launch["ranges"]:
            return
        p = ptrs.data.astype(np.uint64)
        p = p[np.broadcast_to(mask.data, p.shape)]
        inside = np.zeros(p.shape, dtype=bool)
        for lo, hi in launch["ranges"]:
            inside |= (p >= lo) & (p < hi)
        seen["accesses"] += p.size
        if not inside.all():
            raise AssertionError(f"{launch['kernel']}: {kind} of {int((~inside).sum())} lanes outside its tensors")

    def checked_load(self, ptrs, mask, other, *a):
        check("load", ptrs, mask)
        return load(self, ptrs, mask, other, *a)

    def checked_store(self, ptrs, value, mask, *a):
        check("store", ptrs, mask)
        return store(self, ptrs, value, mask, *a)

    def checked_call(self, *args, **kw):
        tensors = [t for t in (*args, *kw.values()) if isinstance(t, torch.Tensor)]
        launch["ranges"] = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors]
        launch["kernel"] = self.fn.__name__
        try:
            return call(self, *args, **kw)
        finally:
            launch["ranges"] = []

    monkeypatch.setattr(builder, "create_masked_load", checked_load)
    monkeypatch.setattr(builder, "create_masked_store", checked_store)
    monkeypatch.setattr(executor, "__call__", checked_call)
    yield seen


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the interpreter's addresses")
def test_triton_kb32_chunk64_accesses_in_bounds(_bounds_checked):
    """The tiles of the GPU case that died on an H200 (bf16-grad-kb32: chunk 64, K and V in blocks of 32) with a
    tail chunk and fewer gradient programs than chunks: every load and store of every kernel stays inside its
    tensors, and the results are exact."""
    x = _inputs(1, 112, 2, 64, 64, seed=13)
    cfg = with_config(grad_block_k=32, grad_bv=32, grad_programs=3, **FUSED)
    _compare(delta_rule_triton, x, 1e-5, chunk_size=64, config=cfg)
    assert _bounds_checked["accesses"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the interpreter's addresses")
@pytest.mark.parametrize("wy_kernel", [1, 2], ids=["wy1", "wy2"])
@pytest.mark.parametrize("wy16", [False, True], ids=["fp32", "fp16-wy16"])
def test_triton_split_kernels_access_in_bounds(_bounds_checked, wy16, wy_kernel):
    """The split paths at chunk 64 with two K and V blocks of 32, a tail chunk and fewer gradient programs than
    chunks: every load and store stays inside its tensors (the per-program scratch included), results exact (fp32)
    or within fp16's tolerance (fp16 with wy_16bit: Tᵀ and the scratch in fp16); both WY kernels
    (DeltaConfig.wy_kernel)."""
    x = _inputs(1, 112, 2, 64, 64, seed=14, dtype=torch.float16 if wy16 else torch.float32)
    cfg = with_config(grad_split=True, grad_block_k=32, grad_bv=32, grad_programs=3, out_split=True, out_bv=32,
                      bwd_split=True, seg_chunks=1, wy_16bit=wy16, wy_kernel=wy_kernel)
    if wy16:
        _compare(delta_rule_triton, x, 5e-3, chunk_size=64, config=cfg, ref=delta_rule_chunked)
    else:
        _compare(delta_rule_triton, x, 1e-5, chunk_size=64, config=cfg)
    assert _bounds_checked["accesses"] > 0


@pytest.mark.parametrize("passes", [1, 3])
def test_triton_solve_passes(passes):
    """DeltaConfig.solve_passes = 1 (the default) and 3 run (the interpreter computes every dot in fp32, so this
    checks the plumbing; their accuracy on the GPU is in `delta_rule.py`'s error column and the GPU cases); other
    values are refused in one line."""
    x = _inputs(1, 40, 1, 16, 16, dtype=torch.float16, seed=15)
    _compare(delta_rule_triton, x, 5e-3, chunk_size=16, config=with_config(solve_passes=passes),
             ref=delta_rule_chunked)
    with pytest.raises(ValueError, match=r"solve_passes=2: use 3 \(tf32x3\) or 1"):
        _run(delta_rule_triton, x, None, None, chunk_size=16, config=with_config(solve_passes=2))


@pytest.mark.parametrize("C,block", [(32, 16), (64, 16), (64, 32)], ids=["C32-b16", "C64-b16", "C64-b32"])
def test_triton_solve_block(C, block):
    """DeltaConfig.solve_block: T's diagonal blocks inverted first (batched), then the doubling over whole tiles —
    outputs, final state and every gradient as the recurrence's, with a tail chunk and keys that repeat (T's
    entries grow there)."""
    x = _inputs(1, C + 24, 2, 32, 16, seed=16 + C + block)
    x["k"][:, 8:16] = x["k"][:, :8].clone()  # repeated keys: (I + A)⁻¹ far from I
    _compare(delta_rule_triton, x, 1e-5, chunk_size=C, config=with_config(solve_block=block))


WINDOWED = {  # windows of two one-chunk segments (the last window of a row one segment, its chunk a tail)
    "split": with_config(window_tokens=32, seg_chunks=1, sweep_bv=16, grad_bv=16, out_bv=16, grad_programs=3),
    "fused": with_config(window_tokens=32, seg_chunks=1, sweep_bv=16, grad_bv=16, grad_programs=3, **FUSED),
    "kb": with_config(window_tokens=32, seg_chunks=1, sweep_bv=16, grad_bv=16, grad_programs=3, grad_block_k=16,
                      **FUSED),
}


@pytest.mark.parametrize("path", list(WINDOWED))
@pytest.mark.parametrize("init,final", [(True, True), (False, False)], ids=["states", "no-states"])
def test_triton_windows_match_recurrence(path, init, final):
    """DeltaConfig.window_tokens: the per-chunk stages window by window (one batch row and whole segments at a
    time, B = 2, T = 77: three windows per row, the last a 13-token tail chunk): outputs, final state and every
    gradient as the recurrence's."""
    from kernels.delta_rule.triton.common import make_plan
    from kernels.delta_rule.triton.function import windows

    x = _inputs(2, 77, 2, 16, 16, init=init, seed=17)
    _compare(delta_rule_triton, x, 1e-5, final=final, chunk_size=16, config=WINDOWED[path])
    p = make_plan(x["q"], x["v"], 2, 0.25, WINDOWED[path], 16)
    assert [(w.b, w.s0, w.s1, w.t0, w.t1) for w in windows(p)] == [
        (b, s, min(s + 2, 5), 16 * s, min(16 * s + 32, 77)) for b in (0, 1) for s in (0, 2, 4)]


@pytest.mark.parametrize("window", [64, 0], ids=["windows", "whole-call"])
def test_triton_window_transients(window, monkeypatch):
    """With window_tokens no per-chunk buffer spans the call ([B·H, NC, …]: only a window's [H, ≤ 4, …]) and the
    only [B, T, …] buffers are the forward's W, u and o and the gradients dq, dk, dv; the whole-call control has
    both kinds (B = 2, T = 77, chunks of 16, segments of 2 chunks, windows of 2 segments)."""
    from kernels.delta_rule.triton import backward, forward, function

    shapes = []
    for mod in (backward, forward, function):
        def record(shape, dtype, device, real=mod._empty):
            shapes.append(tuple(shape))
            return real(shape, dtype, device)
        monkeypatch.setattr(mod, "_empty", record)
    x = _inputs(2, 77, 2, 32, 16, seed=18)
    cfg = with_config(window_tokens=window, seg_chunks=2, sweep_bv=16, grad_bv=16, out_bv=16, grad_programs=3)
    do, df = _cotangents(x, True, 5)
    _run(delta_rule_triton, x, do, df, chunk_size=16, config=cfg)
    per_chunk = [s for s in shapes if len(s) == 4 and s[2] != 2 and s[1] == 5]  # [B·H, NC = 5, K or C, V or C]
    per_token = [s for s in shapes if len(s) == 4 and s[:3] == (2, 77, 2)]
    if window:
        assert not per_chunk and len(per_token) == 6, (per_chunk, per_token)
    else:
        assert per_chunk and len(per_token) > 6, (per_chunk, per_token)


def test_triton_window_segments():
    """window_tokens sizes segments so that one window of one row has about target_programs (h, segment)
    programs (at least 16 chunks each); no windows when one would hold the whole call."""
    from kernels.delta_rule.triton.common import make_plan
    from kernels.delta_rule.triton.function import windows

    q = torch.empty(1, 1 << 20, 16, 128, device="meta")
    p = make_plan(q, q, 2, 1.0, with_config(window_tokens=65536), 64)
    assert (p.NCS, p.NS, len(windows(p))) == (64, 256, 16)
    p = make_plan(q[:, :65536], q[:, :65536], 2, 1.0, with_config(window_tokens=65536), 64)
    assert windows(p) is None


def test_triton_kb_config_check():
    """K blocks under 64 at chunk 64 are refused on sm_90 (an illegal memory access in Triton's code there), in one
    line naming the fix; K blocks of 64, chunk 32, other GPUs and the interpreter are not."""
    from kernels.delta_rule.triton.common import check_config

    for gk, C, Kp in ((32, 64, 128), (16, 64, 128), (64, 64, 32)):
        with pytest.raises(ValueError, match="use grad_block_k=64 .* or 0, or chunk_size ≤ 32"):
            check_config(with_config(grad_block_k=gk), C, Kp, (9, 0))
    for gk, C, Kp, arch in ((0, 64, 128, (9, 0)), (64, 64, 128, (9, 0)), (32, 32, 128, (9, 0)),
                            (32, 64, 128, (8, 0)), (32, 64, 128, None)):
        check_config(with_config(grad_block_k=gk), C, Kp, arch)
    with pytest.raises(ValueError, match=r"wy_kernel=3: use 1 \(_grad_wy_kernel\) or 2"):
        check_config(with_config(wy_kernel=3), 64, 128, None)


def test_wy_kernel_auto_takes_the_second_kernel_for_bf16_inputs_only():
    from kernels.delta_rule.triton.backward import wy_kernel

    for dtype, want in ((torch.bfloat16, 2), (torch.float16, 1), (torch.float32, 1)):
        q = torch.empty(1, 8, 1, 16, dtype=dtype, device="meta")
        assert wy_kernel(with_config(), q) == want, dtype
        assert wy_kernel(with_config(wy_kernel=1), q) == 1 and wy_kernel(with_config(wy_kernel=2), q) == 2


def test_triton_final_state_gradient_only():
    """A loss on the final state alone: no gradient arrives on o."""
    x = _inputs(1, 40, 2, 16, 16, seed=6)
    _, df = _cotangents(x, True, 7)
    _, fs, grads = _run(delta_rule_triton, x, None, df, chunk_size=16, config=SEGMENTED)
    _, fs_r, grads_r = _run(delta_rule_recurrent, {n: t.double() for n, t in x.items()}, None, df)
    assert _err(fs, fs_r) < 1e-5
    for n in grads:
        assert _err(grads[n], grads_r[n], floor=1.0) < 1e-5, n


@GRAD_PATHS
def test_triton_half_precision(path):
    """fp16 inputs (bf16 dots do not run in the interpreter), fp32 state: errors at the input precision."""
    x = _inputs(1, 80, 2, 16, 16, dtype=torch.float16, seed=8)
    errs = _compare(delta_rule_triton, x, 5e-3, chunk_size=16, config=GRAD_CONFIGS[path],
                    ref=delta_rule_chunked)
    assert errs["o"] > 0


WY16_PATHS = {"split": SEGMENTED_SPLIT, "split-wy2": SEGMENTED_WY2, "grad-kb": SEGMENTED_KB}  # the kernels that
# read the backward's Tᵀ
GRADS = ("dq", "dk", "dv", "dbeta", "dgate", "dlog_decay", "dinitial_state")


@pytest.mark.parametrize("path", list(WY16_PATHS))
def test_triton_wy_16bit(path):
    """DeltaConfig.wy_16bit on `_grad_wy_kernel` (split) and `_grad_kb_kernel` (grad-kb): fp32 inputs give the fp32
    path's results bit for bit; fp16 inputs (bf16 dots do not run in the interpreter) take the 16-bit path (dk
    differs from the flag's off result) and every gradient stays within fp16's tolerance of the float64 chunked
    reference."""
    off = replace(WY16_PATHS[path], wy_16bit=False)
    on = replace(off, wy_16bit=True)
    x = _inputs(1, 80, 2, 16, 16, seed=19)
    do, df = _cotangents(x, True, 20)
    o0, f0, g0 = _run(delta_rule_triton, x, do, df, chunk_size=16, config=off)
    o1, f1, g1 = _run(delta_rule_triton, x, do, df, chunk_size=16, config=on)
    assert torch.equal(o0, o1) and torch.equal(f0, f1)
    assert set(g0) == set(g1) == set(x)
    for n in g0:
        assert torch.equal(g0[n], g1[n]), f"fp32 d{n} changed with wy_16bit"
    x = _inputs(1, 80, 2, 16, 16, dtype=torch.float16, seed=8)
    do, df = _cotangents(x, True, 1)
    _, _, g_off = _run(delta_rule_triton, x, do, df, chunk_size=16, config=off)
    _, _, g_on = _run(delta_rule_triton, x, do, df, chunk_size=16, config=on)
    assert not torch.equal(g_on["k"], g_off["k"]), "wy_16bit did not change the fp16 path"
    errs = _compare(delta_rule_triton, x, 5e-3, chunk_size=16, config=on, ref=delta_rule_chunked)
    assert errs["o"] > 0
    for n in GRADS:
        assert errs[n] <= 5e-3, f"{n}: {errs[n]:.2e} (all: {errs})"


def test_triton_wy_16bit_buffer():
    """`t_buffer`: Tᵀ in the input dtype only with wy_16bit and 16-bit inputs, fp32 otherwise; none for the fused
    `_grad_kernel`."""
    from kernels.delta_rule.triton.backward import t_buffer
    from kernels.delta_rule.triton.common import make_plan

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        q = torch.empty(2, 100, 2, 16, dtype=dtype, device="meta")
        for flag in (False, True):
            for cfg in (with_config(wy_16bit=flag), with_config(wy_16bit=flag, grad_block_k=16, **FUSED)):
                tt = t_buffer(make_plan(q, q, 2, 1.0, cfg, 16), q)
                want = dtype if flag and dtype != torch.float32 else torch.float32
                assert tt.shape == (4, 7, 16, 16) and tt.dtype == want, (dtype, flag, tt.dtype)
        assert t_buffer(make_plan(q, q, 2, 1.0, with_config(wy_16bit=True, **FUSED), 16), q) is None


def test_triton_dispatch_and_fixed_inputs():
    """delta_rule(backend="triton") equals backend="torch"; inputs without grad get none, the others do."""
    x = _inputs(1, 33, 2, 16, 16, seed=9)
    do, _ = _cotangents(x, False, 1)
    o, fs, grads = _run(delta_rule, x, do, None, fixed=("k", "beta", "log_decay", "initial_state"),
                        backend="triton", chunk_size=16)
    o_t, _, grads_t = _run(delta_rule, x, do, None, fixed=("k", "beta", "log_decay", "initial_state"),
                           backend="torch", chunk_size=16)
    assert fs is None and _err(o, o_t) < 1e-5
    assert set(grads) == {"q", "v", "gate"} and all(_err(grads[n], grads_t[n]) < 1e-5 for n in grads)


def test_triton_saves_segment_states_only():
    """Forward keeps the inputs, the gate cumsum and, per segment, S_in and P (fp32): nothing per chunk or token."""
    B, T, H, K, V = 1, 200, 2, 16, 16
    x = _inputs(B, T, H, K, V, seed=10)
    leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        delta_rule_triton(*(leaves[n] for n in ("q", "k", "v", "beta")), log_decay=leaves["log_decay"],
                          gate=leaves["gate"], initial_state=leaves["initial_state"], output_final_state=True,
                          chunk_size=16, config=with_config(seg_chunks=4))
    n_seg = -(-T // (16 * 4))
    budget = B * T * H * (2 * K + V + 2) + B * H * T + H + B * H * n_seg * K * (K + V)
    assert sum(saved) <= budget, (sum(saved), budget)


class _ChainExchange:
    """Rows 0…n−1 of a batch of one are consecutive shards of one sequence: LASP-2's exchange in one process."""

    def forward(self, P, M, initial=None):
        S, entering = (torch.zeros_like(M[0]) if initial is None else initial), []
        for j in range(M.shape[0]):
            entering.append(S)
            S = P[j] @ S + M[j]
        self.P, self.has_initial = P, initial is not None
        return torch.stack(entering), S

    def backward(self, d_local, d_final=None):
        x, leaving = (torch.zeros_like(d_local[0]) if d_final is None else d_final), [None] * d_local.shape[0]
        for j in range(d_local.shape[0] - 1, -1, -1):
            leaving[j] = x
            x = d_local[j] + self.P[j].transpose(-1, -2) @ x
        return torch.stack(leaving), (x if self.has_initial else None)


def test_triton_sharded_rows_chain_into_the_whole_sequence():
    """The kernels' sharded form (parallel.lasp2_delta_triton: row maps (P, M), the exchange, entering-state
    gradients): 3 rows of one sequence chained by the exchange equal the whole sequence, every gradient too."""
    from parallel.lasp2_delta_triton import delta_rule_triton_sharded

    n, T = 3, 96
    x = _inputs(1, T, 2, 16, 16, seed=12)
    rows = lambda t: t.reshape(n, T // n, *t.shape[2:])  # noqa: E731

    def sharded(q, k, v, beta, log_decay, gate, initial_state, output_final_state):
        o, final = delta_rule_triton_sharded(rows(q), rows(k), rows(v), rows(beta), _ChainExchange(), n,
                                             log_decay=log_decay, gate=rows(gate), initial_state=initial_state,
                                             chunk_size=16, config=with_config(seg_chunks=1, sweep_bv=16))
        return o.reshape(1, T, *o.shape[2:]), final

    _compare(sharded, x, 1e-5)


# ------------------------------------------------------------------------------------ GPU
#
# Each case: Triton against the float64 chunked reference on the GPU (a Python loop of T/64 chunk steps, vectorized
# inside a chunk: about a second at 2 × 16K tokens, backward included); the step-by-step recurrence is the oracle of
# the small cases above only. Nearly all of a case's time is Triton compiling its kernels (prep, 4 sweep modes, 2 scans,
# 2 backward sweeps, the gradient kernel: 1–17 s each on one core, the bf16 chunk-64 gradient kernel the slowest). A
# compiled kernel is reused only under the same constexprs (dtype, K, V, chunk, config tiles, decay kind, flags) and
# the same integer specialization of T, H, NC, NCS, NS (Triton's "= 1" and "divisible by 16" classes), so the cases
# are picked to share: T = 8176 (a multiple of 16, not of 32 or 64: a partial last chunk) falls in the classes of
# 16384; the bf16 configs recompile only the kernels they change; fp16 carries the chunk-32 configs and fp32 runs
# chunk 16 (its default chunk-64 gradient kernel alone takes about 140 s to compile). 46 distinct compiles, about
# 100 s on one core (counted offline for sm_90: bf16-16K 11 kernels, 39 s; short-segments 7, 8 s; one-segment 3, 4 s;
# grad-kb32 2, 13 s, now grad-kb64: not counted; bf16-wy32 2, `_prep_kernel` storing an fp32 Tᵀ and `_grad_wy_kernel`
# on it: not counted; bf16-wy1 1, `_grad_wy_kernel`: not counted; fp16 10 + 2, 23 s; fp32 11, 12 s; bf16-tail
# none); `_gpu_warmup` runs them in parallel processes through Triton's on-disk cache, so the file's GPU cases take
# about 60 s on one H200 (the bf16-16K process, about 45 s, then 1–2 s per case), about 115 s if the warm-up cannot
# run.

BF16 = dict(H=16, K=128, V=128, dtype="bfloat16")  # the model's layer: 16 heads of 128
GPU_CASES = {  # B, T, H, K, V, dtype, DeltaConfig fields, gate, initial state; always λ, a final state, every gradient
    "bf16-16K": dict(B=2, T=16384, **BF16),  # default config (split paths): 32 chunks per segment, 8 segments
    "bf16-tail": dict(B=1, T=8176, **BF16),  # default config: 16 × 8 segments, the last chunk 48 tokens long
    "bf16-short-segments": dict(B=1, T=8176, cfg=dict(seg_chunks=12), **BF16),  # 11 segments, the last one 8 chunks
    "bf16-one-segment": dict(B=1, T=8176, cfg=dict(seg_chunks=100000), **BF16),  # no segment maps, no scans
    # K blocks of 32 at chunk 64 (grad_block_k=32) are refused on sm_90: an illegal memory access there
    # (`check_config`); its tiles are checked under the interpreter (test_triton_kb32_chunk64_accesses_in_bounds)
    "bf16-grad-kb64": dict(B=1, T=8176, cfg=dict(grad_block_k=64, grad_bv=32, **FUSED), **BF16),
    # T's diagonal 16-blocks inverted first (DeltaConfig.solve_block)
    "bf16-solve16": dict(B=1, T=8176, cfg=dict(solve_block=16), **BF16),
    # two windows of 4 segments (DeltaConfig.window_tokens)
    "bf16-windows": dict(B=1, T=8176, cfg=dict(window_tokens=4096), **BF16),
    # the fused paths with the tf32x3 solve (the default before the split paths were timed)
    "bf16-fused": dict(B=1, T=8176, cfg=dict(solve_passes=3, **FUSED), **BF16),
    # DeltaConfig.wy_16bit off (the default since the seventeenth session: Tᵀ in bf16, the WY backward's products on
    # bf16 operands): Tᵀ in fp32 and those products on tf32
    "bf16-wy32": dict(B=1, T=16384, cfg=dict(wy_16bit=False), **BF16),
    # DeltaConfig.wy_kernel = 1: `_grad_wy_kernel` (persistent, a per-program scratch) for the WY gradient (the
    # default for bf16 inputs since the seventeenth session: `_grad_wy2_kernel`, one program per chunk, no scratch)
    "bf16-wy1": dict(B=1, T=16384, cfg=dict(wy_kernel=1), **BF16),
    # fp16, K ≠ V, T odd, a per-head decay without gate, no initial state
    "fp16-chunk32": dict(B=2, T=9001, H=4, K=128, V=64, dtype="float16", gate=False, init=False, cfg=dict(chunk=32)),
    "fp16-grad-kb64-chunk32": dict(B=2, T=9001, H=4, K=128, V=64, dtype="float16", gate=False, init=False,
                                   cfg=dict(chunk=32, grad_block_k=64, **FUSED)),
    "fp32-chunk16": dict(B=1, T=12289, H=4, K=64, V=128, dtype="float32", cfg=dict(chunk=16)),
}
GPU_TOL = {"bfloat16": 1e-2, "float16": 1e-2, "float32": 1e-4}


def _gpu_triton_call(case: str) -> tuple:
    """(inputs, do, dfinal, o, final, gradients) of a GPU case's Triton call; also what `_gpu_warmup` runs."""
    c = GPU_CASES[case]
    x = _inputs(c["B"], c["T"], c["H"], c["K"], c["V"], gate=c.get("gate", True), init=c.get("init", True),
                dtype=getattr(torch, c["dtype"]), device="cuda", seed=c["T"], gen_device="cuda")
    do, df = _cotangents(x, True, c["T"] + 1, gen_device="cuda")
    o, fs, grads = _run(delta_rule_triton, x, do.to(x["q"].dtype), df, config=with_config(**c.get("cfg", {})))
    return x, do, df, o, fs, grads


@pytest.fixture(scope="module")
def _gpu_warmup(request):
    """One process per selected GPU case runs that case's Triton call once, filling Triton's on-disk kernel cache:
    the compiles run side by side instead of one after another. Best effort: a case whose process failed or is still
    running after 5 minutes compiles its kernels in the test, as without this fixture."""
    cases = [it.callspec.params["case"] for it in request.session.items
             if it.originalname == "test_gpu_matches_chunked" and hasattr(it, "callspec")]
    here = Path(__file__).resolve().parent
    path = [str(here.parents[1]), str(here.parent), str(here)]  # the project root, tests/ (helpers), this folder
    code = "import sys; sys.path[:0] = sys.argv[2:]; import test_delta_rule as t; t._gpu_triton_call(sys.argv[1])"
    procs, deadline = {}, time.monotonic() + 300
    try:
        for c in dict.fromkeys(cases):
            procs[c] = subprocess.Popen([sys.executable, "-c", code, c, *path], cwd=path[0],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        yield {c: (p, deadline) for c, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


@gpu
@needs_cuda
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_gpu_matches_chunked(case, _gpu_warmup):
    """Outputs, final state and the gradients of q, k, v, β, gate, λ and the initial state (NaN-poisoned outputs)
    against the float64 chunked reference, each within the dtype's tolerance. dλ = Σ_{b,t} d log a_t cancels, so its
    error is measured against Σ|d log a_t| (the sum's condition; a zero gate in the reference gives d log a_t where
    the case has none)."""
    proc, deadline = _gpu_warmup.get(case, (None, 0.0))
    if proc is not None:  # every warm-up shares one deadline: 5 minutes after they started, not per test
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
    c, tol = GPU_CASES[case], GPU_TOL[GPU_CASES[case]["dtype"]]
    x, do, df, o, fs, grads = _gpu_triton_call(case)
    xr = {n: t.double() for n, t in x.items()}
    xr.setdefault("gate", torch.zeros(x["beta"].shape, dtype=torch.float64, device="cuda"))
    o_r, fs_r, grads_r = _run(delta_rule_chunked, xr, do, df)
    assert o.dtype == x["q"].dtype and fs.dtype == torch.float32, (o.dtype, fs.dtype)
    assert set(grads) == set(x), f"gradients of {sorted(grads)}, inputs {sorted(x)}"
    errs = {"o": kernel_err(o, o_r), "final": kernel_err(fs, fs_r)}
    errs |= {f"d{n}": kernel_err(grads[n], grads_r[n]) for n in grads if n != "log_decay"}
    cond = grads_r["gate"].abs().sum((0, 1)).norm().item()
    dlam = grads["log_decay"].double()
    dlam_err = (dlam - grads_r["log_decay"]).norm().item() / cond
    errs["dlog_decay"] = dlam_err if dlam.isfinite().all() else float("inf")
    shape = ", ".join(f"{n}={c[n]}" for n in "BTHKV")
    summary = f"{case} ({shape}, {c['dtype']}): " + " ".join(f"{n}={e:.1e}" for n, e in errs.items())
    print(summary)
    for name, err in errs.items():
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}; {summary}"
