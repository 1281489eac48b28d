"""Softmax attention under sequence parallelism equals single-process causal attention (issue 5).

Each method (allgather, ring, ulysses), contiguous and zigzag, full and grouped-query heads:
outputs and dq, dk, dv against SDPA on the whole sequence; the hybrid model's loss and every
parameter gradient at sp = 2, 4 against sp = 1; and the CLI job training a hybrid model with sp = 2.
"""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import model_step, rel_err, run_distributed, scratch_dir, seeded_model_and_batch

from launch.cli import main
from models import preset
from parallel.attention import _ring_step_jobs, sp_attention
from parallel.context import SequenceParallel
from parallel.layout import shard_ids, shard_sequence, unshard_sequence
from runtime.config import load_config
from runtime.mesh import build_mesh
from runtime.trainer import train

METHODS = ("allgather", "ring", "ulysses")
LAYOUTS = ("contiguous", "zigzag")


def _reference(q, k, v, causal: bool) -> torch.Tensor:
    t = (x.transpose(1, 2) for x in (q, k, v))
    return F.scaled_dot_product_attention(*t, is_causal=causal, enable_gqa=q.shape[2] != k.shape[2]).transpose(1, 2)


def _check_attention(rank: int, world: int) -> None:
    heads = [(4, 4), (8, 2) if world == 2 else (8, 4)]  # (Hq, Hkv): full and grouped-query
    cases = [(m, lay, h, True) for m in METHODS for lay in LAYOUTS for h in heads]
    cases += [(m, "zigzag", heads[1], False) for m in METHODS]  # not causal: every key visible
    B, T, D = 2, 8 * world * 3, 16  # zigzag shards of 12 / 6 tokens
    for i, (method, layout, (hq, hkv), causal) in enumerate(cases):
        g = torch.Generator().manual_seed(100 + i)
        q = torch.randn(B, T, hq, D, generator=g, requires_grad=True)
        k = torch.randn(B, T, hkv, D, generator=g, requires_grad=True)
        v = torch.randn(B, T, hkv, D, generator=g, requires_grad=True)
        w = torch.randn(B, T, hq, D, generator=g)
        ref = _reference(q, k, v, causal)
        ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))

        def local(x, layout=layout):
            return shard_sequence(x.detach(), rank, world, layout).requires_grad_()

        ql, kl, vl = local(q), local(k), local(v)
        out = sp_attention(ql, kl, vl, method=method, layout=layout, causal=causal)
        what = (method, layout, hq, hkv, causal)
        assert out.shape == ql.shape and out.dtype == ql.dtype, what
        assert rel_err(out, shard_sequence(ref.detach(), rank, world, layout)) < 1e-5, what
        grads = torch.autograd.grad((out * shard_sequence(w, rank, world, layout)).sum(), (ql, kl, vl))
        for name, got, want in zip("qkv", grads, ref_grads):
            err = rel_err(got, shard_sequence(want, rank, world, layout))
            assert err < 1e-5, (*what, "d" + name, err)
        parts = [torch.empty_like(out) for _ in range(world)]
        dist.all_gather(parts, out.detach().contiguous())
        assert rel_err(unshard_sequence(parts, layout), ref.detach()) < 1e-5, what
    if world == 4:  # 2 kv heads cannot be split over 4 ranks
        x, kv = torch.zeros(1, 8, 4, 8), torch.zeros(1, 8, 2, 8)
        with pytest.raises(ValueError, match=r"use sp in \[2\]"):
            sp_attention(x, kv, kv, method="ulysses")
    dist.barrier()  # no rank tears the group down while a peer still finishes its last collective


@pytest.mark.parametrize("sp", [2, 4])
def test_sp_attention_matches_single_process(sp: int) -> None:
    run_distributed(_check_attention, sp)


def test_ring_work_is_balanced_under_zigzag() -> None:
    """Zigzag: after the local causal block, every step is one (size × 2·size) block on every rank."""
    size = 5
    for world in (2, 3, 4):
        for rank in range(world):
            (rows, cols, causal), = _ring_step_jobs(rank, world, "zigzag", 0, size, True)
            assert causal and rows == cols == slice(0, 2 * size)
            for step in range(1, world):
                jobs = _ring_step_jobs(rank, world, "zigzag", step, size, True)
                work = sum((r.stop - r.start) * (c.stop - c.start) for r, c, _ in jobs)
                assert len(jobs) == 1 and work == 2 * size * size and not jobs[0][2], (world, rank, step, jobs)
        # contiguous: rank 0 sees only itself, the last rank everything
        assert all(not _ring_step_jobs(0, world, "contiguous", s, size, True) for s in range(1, world))
        assert all(_ring_step_jobs(world - 1, world, "contiguous", s, size, True) for s in range(1, world))


def test_single_rank_and_errors() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 12, 4, 8, generator=g), torch.randn(2, 12, 2, 8, generator=g), torch.randn(2, 12, 2, 8)
    for method in METHODS:
        assert rel_err(sp_attention(q, k, v, method=method), _reference(q, k, v, True)) < 1e-6
    with pytest.raises(ValueError, match="unknown sp attention method"):
        sp_attention(q, k, v, method="tree")
    with pytest.raises(ValueError, match="not a multiple of kv heads"):
        sp_attention(q, torch.randn(2, 12, 3, 8), torch.randn(2, 12, 3, 8), method="ring")


def _check_hybrid_model(rank: int, world: int) -> None:
    mesh = build_mesh(pp=1, sp=world)
    cfg = preset("tiny", layout="LA", n_heads=8, n_kv_heads=4, gate=True)  # L A L A, grouped-query
    model, tokens, targets = seeded_model_and_batch(cfg, world)
    ref_loss, ref_grads = model_step(model, tokens, targets, targets.numel())
    group = mesh.group("sp")
    for method in METHODS:
        for layout in LAYOUTS:
            model.set_sequence_parallel(SequenceParallel(group, layout, method))
            loss, grads = model_step(model, shard_sequence(tokens, rank, world, layout),
                                shard_sequence(targets, rank, world, layout), targets.numel())
            dist.all_reduce(loss, group=group)
            assert abs(loss - ref_loss) / ref_loss < 1e-6, (method, layout, loss, ref_loss)
            for name, grad in grads.items():
                dist.all_reduce(grad, group=group)  # parameters are replicated over sp: gradients summed
                err = rel_err(grad, ref_grads[name])
                assert err < 1e-5, (method, layout, name, err)
    assert len(shard_ids(rank, world, "zigzag")) == 2
    dist.barrier()  # no rank tears the group down while a peer still finishes its last collective


@pytest.mark.parametrize("sp", [2, 4])
def test_hybrid_model_matches_single_process(sp: int) -> None:
    run_distributed(_check_hybrid_model, sp)


def _train(rank: int, world: int, overrides: list[str]) -> None:
    train(load_config(None, overrides))


def test_cli_trains_hybrid_model_with_sp() -> None:
    """`longtrain train --nproc 2` with a hybrid layout, sp = 2, ring attention: the loss curve of sp = 1."""
    common = ["model.layout=LA", "train.dtype=float64", "train.steps=4", "train.batch_size=4", "train.seq_len=32",
              "parallel.pp=1", "parallel.microbatches=1", "run.log_every=1", "run.progress=false",
              "run.tensorboard=false", "train.eval_batches=1"]
    single, split = scratch_dir(), scratch_dir()
    run_distributed(_train, 1, common + ["parallel.sp=1", f"run.dir={single}"])
    assert main(["train", "--nproc", "2", "--set", *common, "parallel.sp=2", "parallel.layout=zigzag",
                 "parallel.sp_attention=ring", f"run.dir={split}"]) == 0
    a = pq.read_table(f"{single}/metrics.parquet").to_pydict()
    b = pq.read_table(f"{split}/metrics.parquet").to_pydict()
    assert a["step"] == b["step"] == [1, 2, 3, 4]
    for la, lb in zip(a["loss"], b["loss"]):
        assert abs(la - lb) < 1e-8 * max(1.0, abs(la)), (a["loss"], b["loss"])
