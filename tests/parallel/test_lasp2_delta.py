"""LASP-2 for affine recurrences (parallel.lasp2_delta): the sequence-parallel gated delta rule equals the
single-process recurrence — outputs, final state and every input gradient, contiguous and zigzag, with initial
and final states — and dropping P_c from the prefix is caught."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # the Triton case runs in the interpreter (set before triton is imported)
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from helpers import rel_err, run_distributed  # noqa: E402

CASES = [("contiguous", True, True, True), ("zigzag", True, True, True), ("zigzag", False, False, False),
         ("contiguous", False, True, False)]  # (layout, λ, gate, initial state)


def _inputs(seed: int, T: int, decay: bool, gate: bool, init: bool):
    g = torch.Generator().manual_seed(seed)
    B, H, K, V = 2, 2, 8, 12
    x = {"q": torch.randn(B, T, H, K, generator=g), "k": F.normalize(torch.randn(B, T, H, K, generator=g), dim=-1),
         "v": torch.randn(B, T, H, V, generator=g), "beta": torch.sigmoid(torch.randn(B, T, H, generator=g))}
    if decay:
        x["log_decay"] = -torch.rand(H, generator=g) * 0.2
    if gate:
        x["gate"] = -F.softplus(torch.randn(B, T, H, generator=g) - 2.0)
    if init:
        x["initial_state"] = torch.randn(B, H, K, V, generator=g)
    w = torch.randn(B, T, H, V, generator=g, dtype=torch.float64)
    wf = torch.randn(B, H, K, V, generator=g, dtype=torch.float64)
    return x, w, wf


def _check(rank: int, world: int, T: int, drop_p: bool = False, backend: str = "torch", cases=CASES,
           tol: float = 1e-5) -> None:
    import torch.distributed as dist

    import parallel.lasp2_delta as ld
    from kernels.delta_rule import delta_rule_recurrent
    from parallel.lasp2 import lasp2_delta_rule
    from parallel.layout import shard_sequence

    if drop_p:  # the prefix without P_c: S_in(c+1) = S_in(c) + M_c
        ld._prefix_step = lambda P, S, M: S + M
    worst = 0.0
    for i, (layout, decay, gate, init) in enumerate(cases):
        x, w, wf = _inputs(10 + i, T, decay, gate, init)
        ref = {n: t.double().requires_grad_() for n, t in x.items()}
        o_r, f_r = delta_rule_recurrent(ref["q"], ref["k"], ref["v"], ref["beta"], log_decay=ref.get("log_decay"),
                                        gate=ref.get("gate"), initial_state=ref.get("initial_state"),
                                        output_final_state=True)
        grads_r = torch.autograd.grad((o_r * w).sum() + (f_r * wf).sum(), list(ref.values()))
        loc = {n: (t if n in ("log_decay", "initial_state") else shard_sequence(t, rank, world, layout))
               .detach().clone().requires_grad_() for n, t in x.items()}
        o, final = lasp2_delta_rule(loc["q"], loc["k"], loc["v"], loc["beta"], log_decay=loc.get("log_decay"),
                                    gate=loc.get("gate"), initial_state=loc.get("initial_state"), group=None,
                                    layout=layout, chunk_size=8 if backend == "torch" else 16, backend=backend,
                                    output_final_state=True)
        # the final state is replicated: each rank's copy carries a 1/world share of its loss term
        loss = (o.double() * shard_sequence(w, rank, world, layout)).sum() + (final.double() * wf).sum() / world
        grads = torch.autograd.grad(loss, list(loc.values()))
        errs = {"o": rel_err(o.double(), shard_sequence(o_r.detach(), rank, world, layout)),
                "final": rel_err(final.double(), f_r.detach())}
        for (name, got), want in zip(zip(loc, grads), grads_r):
            if name in ("log_decay", "initial_state"):  # replicated: the gradient is the sum over ranks
                dist.all_reduce(got)
            else:
                want = shard_sequence(want, rank, world, layout)
            errs[f"d{name}"] = rel_err(got.double(), want)
        worst = max(worst, *errs.values())
        if not drop_p:
            assert max(errs.values()) < tol, (layout, decay, gate, init, errs)
    if drop_p:
        assert worst > 1e-2, worst


@pytest.mark.parametrize("sp", [2, 4])
def test_lasp2_delta_matches_single_process(sp: int) -> None:
    run_distributed(_check, sp, 4 * sp * 5)  # shards of 20 / 10 tokens: tail chunks of 8 included


def test_dropping_p_from_the_prefix_is_caught() -> None:
    run_distributed(_check, 2, 24, True, "torch", CASES[:1])


def _check_triton(rank: int, world: int, split: bool) -> None:
    import kernels.triton.common as triton_common
    from kernels.delta_rule.triton import common

    triton_common.POISON_OUTPUTS = not torch.cuda.is_available()
    common.DEFAULT_CONFIG = common.with_config(seg_chunks=1, sweep_bv=16,  # two segments per shard
                                               out_split=split, grad_split=split, bwd_split=split, out_bv=16)
    _check(rank, world, 64, backend="triton", cases=CASES[1:2])


@pytest.mark.parametrize("split", [False, True], ids=["fused", "split"])
def test_lasp2_delta_on_the_triton_kernels(split: bool) -> None:
    """The kernels' sharded path (parallel.lasp2_delta_triton): zigzag, two batch rows, λ, gate, initial state;
    outputs and gradients from the sweeps (fused) or with the chunk-parallel kernels (out_split, grad_split,
    bwd_split)."""
    pytest.importorskip("triton")
    run_distributed(_check_triton, 2, split)
