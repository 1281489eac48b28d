"""LASP-2 equals single-process linear attention: outputs and every input gradient."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import rel_err, run_distributed

from kernels import linear_attention
from parallel.lasp2 import lasp2_linear_attention
from parallel.layout import shard_sequence, unshard_sequence

CASES = [(layout, decay, gate) for layout in ("contiguous", "zigzag")
         for decay in (False, True) for gate in (False, True)]


def _inputs(seed: int, decay: bool, gate: bool, T: int):
    g = torch.Generator().manual_seed(seed)
    B, H, K, V = 2, 3, 8, 12
    q, k, v = (torch.randn(B, T, H, d, generator=g) for d in (K, K, V))
    log_decay = -torch.rand(H, generator=g) * 0.3 if decay else None
    gates = F.logsigmoid(torch.randn(B, T, H, generator=g) + 2.0) if gate else None
    w = torch.randn(B, T, H, V, generator=g)
    return q, k, v, log_decay, gates, w


def _check_lasp2(rank: int, world: int, T: int, backend: str = "auto", tol: float = 1e-5) -> None:
    for i, (layout, decay, gate) in enumerate(CASES):
        q, k, v, ld, g, w = _inputs(100 + i, decay, gate, T)
        leaves = [t.requires_grad_() for t in (q, k, v, ld, g) if t is not None]
        ref, _ = linear_attention(q, k, v, log_decay=ld, gate=g, chunk_size=16)
        ref_grads = torch.autograd.grad((ref * w).sum(), leaves)

        def local(x, layout=layout):
            return shard_sequence(x.detach(), rank, world, layout).requires_grad_()

        ql, kl, vl = local(q), local(k), local(v)
        gl = local(g) if g is not None else None
        ldl = ld.detach().clone().requires_grad_() if ld is not None else None
        out = lasp2_linear_attention(ql, kl, vl, log_decay=ldl, gate=gl, chunk_size=16, layout=layout,
                                     backend=backend)
        assert rel_err(out, shard_sequence(ref.detach(), rank, world, layout)) < tol, (layout, decay, gate)
        wl = shard_sequence(w, rank, world, layout)
        local_leaves = [t for t in (ql, kl, vl, ldl, gl) if t is not None]
        grads = list(torch.autograd.grad((out * wl).sum(), local_leaves))
        names = [n for n, t in zip("q k v log_decay gate".split(), (ql, kl, vl, ldl, gl)) if t is not None]
        for name, got, want in zip(names, grads, ref_grads):
            if name == "log_decay":  # replicated parameter: its gradient is the sum over ranks
                dist.all_reduce(got)
            else:
                want = shard_sequence(want, rank, world, layout)
            assert rel_err(got, want) < tol, (name, layout, decay, gate, rel_err(got, want))
        # the pieces reassemble into the whole sequence
        parts = [torch.empty_like(out) for _ in range(world)]
        dist.all_gather(parts, out.detach().contiguous())
        assert rel_err(unshard_sequence(parts, layout), ref.detach()) < tol


@pytest.mark.parametrize("sp", [2, 4])
def test_lasp2_matches_single_process(sp: int) -> None:
    run_distributed(_check_lasp2, sp, 8 * sp * 5)  # shards of 40 / 20 tokens: tail chunks of 16 included


def test_layout_roundtrip() -> None:
    x = torch.arange(2 * 48).view(2, 48)
    for world in (1, 2, 3, 4):
        for layout in ("contiguous", "zigzag"):
            parts = [shard_sequence(x, r, world, layout) for r in range(world)]
            assert torch.equal(unshard_sequence(parts, layout), x)
    assert shard_sequence(torch.arange(8), 0, 2, "zigzag", dim=0).tolist() == [0, 1, 6, 7]
    with pytest.raises(ValueError, match="divisible by 8"):
        shard_sequence(torch.zeros(2, 36), 0, 4, "zigzag")
