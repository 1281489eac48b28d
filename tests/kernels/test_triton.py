"""Triton chunked linear attention (kernels/triton/) against the float64 references.

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set before triton
is imported) at small sizes against the step-by-step recurrence; tests marked ``gpu`` compare
long sequences (up to 64K tokens) with the float64 chunked reference.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

import kernels.triton.common as triton_common  # noqa: E402  (module switches DEFAULT_CONFIG, POISON_OUTPUTS)
from kernels import linear_attention  # noqa: E402
from kernels.reference import linear_attention_chunked, linear_attention_recurrent  # noqa: E402
from kernels.triton import linear_attention_triton, with_config  # noqa: E402
from parallel.lasp2_triton import ShardExchange, linear_attention_triton_sharded  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Small tiles and 2-chunk segments exercise the segment scans, with a d log a tail after every chunk; the
# second keeps one segment and the fused dk/dv kernel, with tails every 2 chunks.
SEGMENTED = with_config(seg_chunks=2, fwd_bv=16, dq_bk=16, dkdv_split=True, dkdv_bk=16, dkdv_bv=16,
                        state_bk=16, state_bv=16, tail_chunks=1)
FUSED = with_config(seg_chunks=16, dkdv_split=False, tail_chunks=2)
# forward chunks of 32, backward chunks of 16 (the backward re-chunks the gate cumsum); tails span segments
RECHUNKED = with_config(seg_chunks=2, bwd_chunk=16, tail_chunks=8)


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Allocate every kernel output as NaN so unwritten elements fail the comparisons."""
    monkeypatch.setattr(triton_common, "POISON_OUTPUTS", True)


def _err(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    """‖a − b‖ / (‖b‖ + floor·√n) in float64; NaN anywhere gives inf."""
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / (b.norm() + floor * b.numel() ** 0.5)).item()


def _inputs(B, T, H, K, V, *, decay, gate, init, dtype=torch.float32, device=DEVICE, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(device)

    x = {"q": rnd(B, T, H, K).to(dtype), "k": rnd(B, T, H, K).to(dtype), "v": rnd(B, T, H, V).to(dtype)}
    if decay:
        x["log_decay"] = torch.log1p(-torch.exp2(-2.0 - torch.arange(H, dtype=torch.float32))).to(device)
    if gate:
        x["gate"] = (torch.nn.functional.logsigmoid(rnd(B, T, H) + 2.0) / 4).to(dtype)
    if init:
        x["initial_state"] = rnd(B, H, K, V, s=0.5)
    return x


def _run(fn, x: dict, do: torch.Tensor | None, dfinal: torch.Tensor | None, fixed_log_decay=None, **kw):
    """Outputs and gradients of ⟨o, do⟩ + ⟨final, dfinal⟩ w.r.t. every input in x (fixed_log_decay: no grad)."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in x.items()}
    lam = fixed_log_decay if fixed_log_decay is not None else leaves.get("log_decay")
    o, final = fn(leaves["q"], leaves["k"], leaves["v"], log_decay=lam,
                  gate=leaves.get("gate"), initial_state=leaves.get("initial_state"),
                  output_final_state=dfinal is not None, **kw)
    loss = 0.0
    if do is not None:
        loss = loss + (o.to(do.dtype) * do).sum()
    if dfinal is not None:
        loss = loss + (final.to(dfinal.dtype) * dfinal).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves.values(), grads)]
    return o, final, dict(zip(leaves, grads))


def _compare_to_recurrence(B, T, H, K, V, C, cfg, decay, gate, init, final, tol=1e-4, seed=0):
    x = _inputs(B, T, H, K, V, decay=decay, gate=gate, init=init, seed=seed)
    do = torch.randn(B, T, H, V, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE)
    df = torch.randn(B, H, K, V, generator=torch.Generator().manual_seed(seed + 2)).to(DEVICE) if final else None
    o, fs, grads = _run(linear_attention_triton, x, do, df, chunk_size=C, config=cfg)
    x64 = {n: t.double() for n, t in x.items()}
    o_r, fs_r, grads_r = _run(linear_attention_recurrent, x64, do.double(),
                              df.double() if df is not None else None)
    assert o.shape == (B, T, H, V) and o.dtype == x["q"].dtype
    errs = {"o": _err(o, o_r)}
    if final:
        assert fs.dtype == torch.float32 and fs.shape == (B, H, K, V)
        errs["final"] = _err(fs, fs_r)
    # decay gradients can be exactly 0 (the first token with no initial state): floor the norm at 1/element
    errs.update({f"d{n}": _err(grads[n], grads_r[n], floor=1.0) for n in grads})
    bad = {n: e for n, e in errs.items() if not e <= tol}
    assert not bad, f"errors above {tol}: {bad} (all: {errs})"


# ------------------------------------------------------------------------------------ CPU / interpreter

CASES = [  # (decay, gate, initial state, final state + its gradient)
    (False, False, False, False),
    (True, False, True, True),
    (False, True, False, True),
    (True, True, True, True),
]


@pytest.mark.parametrize("T", [1, 7, 16, 33, 50])
@pytest.mark.parametrize("case", CASES, ids=["plain", "decay+init", "gate+final", "all"])
@pytest.mark.parametrize("cfg", [SEGMENTED, FUSED], ids=["segmented", "fused"])
def test_matches_recurrence(T, case, cfg):
    _compare_to_recurrence(2, T, 2, 16, 32, 16, cfg, *case)


@pytest.mark.parametrize("K,V,C,cfg", [(32, 16, 16, SEGMENTED), (16, 16, 32, SEGMENTED), (24, 40, 16, SEGMENTED),
                                       (16, 32, 32, RECHUNKED)], ids=["K>V", "C>tail", "odd-dims", "rechunked"])
def test_head_dims_and_chunk_sizes(K, V, C, cfg):
    """K ≠ V, a chunk larger than the sequence tail, head dims that are not powers of two, and a
    backward that uses shorter chunks than the forward."""
    _compare_to_recurrence(1, 77 if cfg is RECHUNKED else 37, 3, K, V, C, cfg, True, True, True, True, seed=3)


def test_half_precision_decay_gradients():
    """fp16 inputs (bf16 dots do not run in the interpreter): the decay gradients must stay at the
    input precision; they are sums over the sequence and amplify inconsistent rounding."""
    B, T, H, K, V = 1, 300, 2, 32, 32
    x = _inputs(B, T, H, K, V, decay=True, gate=True, init=True, dtype=torch.float16, seed=11)
    do = torch.randn(B, T, H, V, generator=torch.Generator().manual_seed(12)).to(DEVICE, torch.float16)
    df = torch.randn(B, H, K, V, generator=torch.Generator().manual_seed(13)).to(DEVICE)
    o, fs, grads = _run(linear_attention_triton, x, do, df, chunk_size=16, config=SEGMENTED)
    x64 = {n: t.double() for n, t in x.items()}
    o_r, fs_r, grads_r = _run(linear_attention_chunked, x64, do.double(), df.double(), chunk_size=16)
    errs = {"o": _err(o, o_r), "final": _err(fs, fs_r)} | {f"d{n}": _err(grads[n], grads_r[n]) for n in grads}
    assert max(errs.values()) < 2e-3, errs


def test_final_state_gradient_only():
    """A loss on the final state alone (no gradient arrives on o)."""
    x = _inputs(1, 40, 2, 16, 16, decay=True, gate=True, init=True)
    df = torch.randn(1, 2, 16, 16, device=DEVICE)
    _, fs, grads = _run(linear_attention_triton, x, None, df, chunk_size=16, config=SEGMENTED)
    _, fs_r, grads_r = _run(linear_attention_recurrent, {n: t.double() for n, t in x.items()}, None, df.double())
    assert _err(fs, fs_r) < 1e-5
    for n in grads:
        assert _err(grads[n], grads_r[n], floor=1.0) < 1e-4, n


def test_public_dispatch_and_no_grad_inputs():
    """kernels.linear_attention(backend="triton") equals the torch backend; constant inputs get no grad."""
    x = _inputs(2, 45, 2, 16, 16, decay=True, gate=True, init=True)
    q = x["q"].clone().requires_grad_()
    o, fs = linear_attention(q, x["k"], x["v"], log_decay=x["log_decay"], gate=x["gate"],
                             initial_state=x["initial_state"], output_final_state=True, chunk_size=16,
                             backend="triton")
    o_t, fs_t = linear_attention(x["q"], x["k"], x["v"], log_decay=x["log_decay"], gate=x["gate"],
                                 initial_state=x["initial_state"], output_final_state=True, chunk_size=16,
                                 backend="torch")
    assert _err(o, o_t) < 1e-5 and _err(fs, fs_t) < 1e-5
    (o.sum() + fs.sum()).backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("groups,heads", [(1, 4), (2, 6)], ids=["G1-H4", "G2-H6"])
def test_grouped_q_k_match_per_head_copies(groups, heads):
    """q and k shared by groups of heads ([B, T, G, K], Mamba-2's C and B): outputs, the final state and every
    gradient (dq, dk summed over each group's heads) equal the float64 recurrence on per-head copies, through the
    public op on both backends."""
    x = _inputs(2, 37, heads, 16, 16, decay=True, gate=True, init=True, seed=21)
    gen = torch.Generator().manual_seed(22)
    x["q"] = torch.randn(2, 37, groups, 16, generator=gen).to(DEVICE)
    x["k"] = torch.randn(2, 37, groups, 16, generator=gen).to(DEVICE)
    do = torch.randn(2, 37, heads, 16, generator=gen).to(DEVICE)
    df = torch.randn(2, heads, 16, 16, generator=gen).to(DEVICE)

    def per_head(q, k, v, **kw):  # the reference: explicit copies, head h of group h // (heads / groups)
        rep = heads // groups
        return linear_attention_recurrent(q.repeat_interleave(rep, 2), k.repeat_interleave(rep, 2), v, **kw)

    o_r, fs_r, grads_r = _run(per_head, {n: t.double() for n, t in x.items()}, do.double(), df.double())
    for backend in ("triton", "torch"):
        o, fs, grads = _run(linear_attention, x, do, df, chunk_size=16, backend=backend)
        assert _err(o, o_r) < 1e-5, backend
        assert _err(fs, fs_r) < 1e-5, backend
        for n in grads:
            assert grads[n].shape == x[n].shape and _err(grads[n], grads_r[n], floor=1.0) < 1e-4, (backend, n)


def test_grouped_q_k_keep_only_the_groups():
    """With q, k of one group for 4 heads, backward keeps [B, T, 1, K] q and k, not the 4-head copies."""
    x = _inputs(1, 40, 4, 16, 16, decay=False, gate=True, init=False)
    q, k = x["q"][:, :, :1].clone().requires_grad_(), x["k"][:, :, :1].clone().requires_grad_()
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        linear_attention_triton(q, k, x["v"], gate=x["gate"], chunk_size=16, config=SEGMENTED)
    assert (1, 40, 1, 16) in shapes and (1, 40, 4, 16) == tuple(x["v"].shape)
    assert shapes.count((1, 40, 4, 16)) == 1  # v alone


def test_grouped_heads_must_divide():
    x = _inputs(1, 8, 3, 16, 16, decay=False, gate=False, init=False)
    with pytest.raises(ValueError, match="H a multiple of q and k's 2 heads") as info:
        linear_attention(x["q"][:, :, :2], x["k"][:, :, :2], x["v"], backend="torch")
    assert "\n" not in str(info.value)


def test_saved_memory_is_boundary_states_only():
    """Forward keeps inputs, the gate cumsum and one fp32 state per segment — no per-chunk states."""
    B, T, H, K, V, C = 1, 200, 2, 16, 16, 16
    cfg = with_config(seg_chunks=4)
    x = _inputs(B, T, H, K, V, decay=True, gate=True, init=True)
    leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        linear_attention_triton(leaves["q"], leaves["k"], leaves["v"], log_decay=leaves["log_decay"],
                                gate=leaves["gate"], initial_state=leaves["initial_state"],
                                output_final_state=True, chunk_size=C, config=cfg)
    n_seg = -(-T // (C * 4))
    budget = 2 * B * T * H * K + B * T * H * V + B * H * T + B * H * (n_seg + 1) * K * V + 2 * B * H * n_seg + H
    assert sum(saved) <= budget, (sum(saved), budget)


# ------------------------------------------------------------------------------------ GPU

def _compare_to_chunked(B, T, H, K, V, dtype, tol, seed=0, lam_grad=True):
    """Everything against the fp64 chunked reference; lam_grad=False: λ fixed (as in the models)."""
    x = _inputs(B, T, H, K, V, decay=True, gate=True, init=True, dtype=dtype, device="cuda", seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    do = torch.randn(B, T, H, V, generator=gen).to("cuda", dtype)
    df = torch.randn(B, H, K, V, generator=gen).cuda()
    lam = x.pop("log_decay")
    if lam_grad:
        x["log_decay"] = lam
    o, fs, grads = _run(linear_attention_triton, x, do, df, fixed_log_decay=None if lam_grad else lam)
    x64 = {n: t.double() for n, t in x.items()}
    o_r, fs_r, grads_r = _run(linear_attention_chunked, x64, do.double(), df.double(),
                              fixed_log_decay=None if lam_grad else lam.double(), chunk_size=64)
    errs = {"o": _err(o, o_r), "final": _err(fs, fs_r)}
    errs.update({f"d{n}": _err(grads[n], grads_r[n]) for n in grads})
    raw_dlam = errs.get("dlog_decay", 0.0)
    if lam_grad:
        # dλ_h = Σ_{b,t} d log a_t cancels 50-150× here, so its error is measured against Σ|d log a_t|
        # (the condition of that sum); the raw relative error is printed too
        cond = grads_r["gate"].abs().sum((0, 1)).norm().item()
        errs["dlog_decay"] = (grads["log_decay"].double() - grads_r["log_decay"]).norm().item() / cond
    print(f"T={T} K={K} V={V} {dtype} λ grad {lam_grad}: " + " ".join(f"{n}={e:.1e}" for n, e in errs.items())
          + f" (dlog_decay raw {raw_dlam:.1e})")
    bad = {n: e for n, e in errs.items() if not e <= tol}
    assert not bad, f"errors above {tol}: {bad}"


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype,tol,T", [(torch.bfloat16, 1e-2, T) for T in (1, 1000, 4096 + 37, 16384, 65536)]
                         + [(torch.float32, 1e-4, T) for T in (1000, 16384)])
def test_gpu_long_sequences(T, dtype, tol):
    _compare_to_chunked(1, T, 2, 128, 128, dtype, tol)


@gpu
@needs_cuda
@pytest.mark.parametrize("T,seed", [(1000, 11), (1000, 12), (1000, 13), (4096 + 37, 11), (16384, 11), (65536, 11)])
def test_gpu_gate_gradient_fixed_decay(T, seed):
    """λ fixed, gate learned (the models' case): d gate without the hi/lo state split stays within 1e-2.
    At T = 1000 the final-state gradient's chunk dominates (seed 12 gave 2.5e-2 before the tail blocks)."""
    _compare_to_chunked(1, T, 2, 128, 128, torch.bfloat16, 1e-2, seed=seed, lam_grad=False)


@gpu
@needs_cuda
@pytest.mark.parametrize("cfg", [with_config(bwd_chunk=32, seg_chunks=8), with_config(dkdv_split=False)],
                         ids=["bwd32", "fused"])
def test_gpu_configs(cfg, monkeypatch):
    monkeypatch.setattr(triton_common, "DEFAULT_CONFIG", cfg)
    _compare_to_chunked(1, 20000, 2, 128, 128, torch.bfloat16, 1e-2, seed=9)


@gpu
@needs_cuda
@pytest.mark.parametrize("K,V", [(64, 128), (128, 64), (64, 64)])
def test_gpu_head_dims(K, V):
    _compare_to_chunked(2, 9000, 2, K, V, torch.bfloat16, 1e-2, seed=5)


@gpu
@needs_cuda
def test_gpu_fp16():
    _compare_to_chunked(2, 5000, 2, 64, 128, torch.float16, 1e-2, seed=7)


def _lasp2_triton(rank: int, world: int, T: int) -> None:
    from helpers import LASP2_BRANCH_CASES, check_lasp2

    triton_common.DEFAULT_CONFIG = SEGMENTED  # 2-chunk segments: shards of 40 tokens hold two segments
    triton_common.POISON_OUTPUTS = not torch.cuda.is_available()
    check_lasp2(rank, world, T, backend="triton", tol=1e-4, cases=None if world > 2 else LASP2_BRANCH_CASES)


@pytest.mark.parametrize("sp", [2, pytest.param(4, marks=pytest.mark.slow)])  # sp 4: minutes in the interpreter
def test_lasp2_fused_kernels(sp):
    """LASP-2 on the Triton kernels (shard states from the kernels' segment pass, no correction GEMM)
    equals single-process attention: outputs and every gradient, both layouts, decay and gate (at sp 2 the
    four cases that turn each on and off — every kernel branch — in CI; at sp 4, slow, all ten)."""
    from helpers import run_distributed

    run_distributed(_lasp2_triton, sp, 8 * sp * 10)


class _ChainExchange(ShardExchange):
    """Rows 0…n−1 of a batch of one are consecutive shards of one sequence (LASP-2 in one process)."""

    def forward(self, M, log_A, initial=None):
        with torch.enable_grad():
            self.inputs = (M.detach().requires_grad_(), log_A.detach().requires_grad_())
            S, entering = torch.zeros_like(M[0]), []
            for j in range(M.shape[0]):
                entering.append(S)
                S = self.inputs[1][j].exp()[..., None, None] * S + self.inputs[0][j]
            self.entering = torch.stack(entering)
        return self.entering.detach(), S.detach()

    def backward(self, d_entering, d_final=None):
        return (*torch.autograd.grad(self.entering, self.inputs, d_entering), None)


@gpu
@needs_cuda
def test_gpu_sharded_matches_whole_sequence():
    """64K tokens cut into 4 rows of 16K, chained by the exchange, equal the whole sequence (bf16)."""
    n, T, H = 4, 65536, 2
    x = _inputs(1, T, H, 128, 128, decay=True, gate=True, init=False, dtype=torch.bfloat16, device="cuda", seed=3)
    do = torch.randn(1, T, H, 128, generator=torch.Generator().manual_seed(4)).to("cuda", torch.bfloat16)
    leaves = {name: t.detach().clone().requires_grad_() for name, t in x.items()}
    rows = lambda t: t.reshape(n, T // n, *t.shape[2:])  # noqa: E731
    o, _ = linear_attention_triton_sharded(rows(leaves["q"]), rows(leaves["k"]), rows(leaves["v"]),
                                           _ChainExchange(), log_decay=leaves["log_decay"], gate=rows(leaves["gate"]))
    grads = torch.autograd.grad((o.float() * rows(do).float()).sum(), list(leaves.values()))
    x64 = {name: t.double() for name, t in x.items()}
    o_r, _, grads_r = _run(linear_attention_chunked, x64, do.double(), None, chunk_size=64)
    errs = {"o": _err(o.reshape(o_r.shape), o_r)}
    errs.update({f"d{name}": _err(g, grads_r[name]) for name, g in zip(leaves, grads)})
    cond = grads_r["gate"].abs().sum((0, 1)).norm().item()  # dλ cancels: measured against Σ|d log a|
    errs["dlog_decay"] = (grads[3].double() - grads_r["log_decay"]).norm().item() / cond
    print(" ".join(f"{name}={e:.1e}" for name, e in errs.items()))
    assert all(e <= 1e-2 for e in errs.values()), errs
