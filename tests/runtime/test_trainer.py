"""The Trainer's step is transparent: pipelined / sequence-parallel / data-parallel steps equal the
single-process step, and the loss curve of a split run equals the one-process curve."""

from __future__ import annotations

import math

import pyarrow.parquet as pq
import pytest
import torch
from helpers import CountingTorch, run_distributed, scratch_dir
from torch.distributed.tensor import DTensor

import models.fused_weights as fused_weights
from models import LinearLlama, token_loss_sum
from runtime.config import load_config
from runtime.mesh import build_mesh
from runtime.synthetic import IGNORE, SyntheticTask
from runtime.trainer import Trainer, train


def _cfg(dp: int, pp: int, sp: int, microbatches: int, remat: str = "never", layout: str = "zigzag",
         extra: tuple[str, ...] = ()):
    return load_config(None, [
        f"parallel.dp={dp}", f"parallel.pp={pp}", f"parallel.sp={sp}", f"parallel.microbatches={microbatches}",
        f"parallel.remat={remat}", f"parallel.layout={layout}", "model.gate=true", "train.batch_size=8",
        "train.seq_len=32", "data.num_pairs=4", *extra,
    ])


def _check_step(rank: int, world: int, dp: int, pp: int, sp: int, microbatches: int, remats: list[str],
                layout: str = "zigzag", extra: tuple[str, ...] = ()) -> None:
    for remat in remats:
        cfg = _cfg(dp, pp, sp, microbatches, remat, layout, extra)
        mesh = build_mesh(dp, pp, sp)
        trainer = Trainer(cfg, mesh)
        # the single-process reference on the whole global batch
        ref = LinearLlama(cfg.model)
        ref.reset_parameters(cfg.train.seed)
        task = SyntheticTask("mqar", cfg.model.vocab_size, cfg.train.seq_len, cfg.train.seed, cfg.data.num_pairs)
        x, y = task.rows(0, range(cfg.train.batch_size))
        ref_loss = token_loss_sum(ref(x), y) / (y != IGNORE).sum()
        ref_loss.backward()
        ref_grads = dict(ref.named_parameters())

        loss = trainer.forward_backward(*trainer.data.batch(0))
        assert abs(loss.item() - ref_loss.item()) / ref_loss.item() < 1e-5, (remat, loss, ref_loss)
        names = []
        for name, p in trainer.model.named_parameters():
            key = "embed.weight" if name == "head.weight" and cfg.model.tie_embeddings else name
            want = ref_grads[key].grad
            grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad  # sharded: gathered (collective)
            err = ((grad - want).norm() / want.norm()).item()
            assert err < 1e-5, (remat, name, err)
            names.append(name)
        assert names, "every stage owns parameters"


@pytest.mark.parametrize("dp,pp,sp,microbatches", [(1, 2, 1, 4), (1, 2, 2, 2), (2, 1, 2, 2)])
def test_parallel_step_equals_single_process(dp: int, pp: int, sp: int, microbatches: int) -> None:
    remats = ["never", "except_last", "always"] if (dp, pp, sp) == (1, 2, 1) else ["never"]
    run_distributed(_check_step, dp * pp * sp, dp, pp, sp, microbatches, remats)


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_sharded_step_with_tiled_mlp_equals_single_process(policy: str) -> None:
    """parallel.shard=full (FSDP2 over dp 2) with re-materialized blocks whose MLP runs in tiles (the block's
    recompute skipping it, the tiled backward forming the down projection's gradient itself) equals the
    single-process step: loss and every gradient."""
    extra = ("parallel.shard=full", "train.mlp_tile=8", f"parallel.remat_policy={policy}")
    run_distributed(_check_step, 2, 2, 1, 1, 1, ["always"], "zigzag", extra)


@pytest.mark.parametrize("dp,pp,sp,layout,seq_len,window", [
    (1, 1, 1, "zigzag", 48, 20), (1, 1, 2, "zigzag", 64, 16), (1, 1, 2, "contiguous", 64, 32),
    (1, 1, 4, "zigzag", 64, 32), (2, 1, 2, "zigzag", 64, 32), (1, 2, 1, "zigzag", 48, 20), (1, 2, 2, "zigzag", 64, 16),
])
def test_streaming_windows_equal_the_whole_sequence_step(dp: int, pp: int, sp: int, layout: str, seq_len: int,
                                                         window: int) -> None:
    """Windows under sp (window-major shards, LASP-2 from the carried state, the conv tail carried by the
    halo exchange) and over pipeline stages (windows as micro-batches) equal the single-process
    whole-sequence step: loss and every gradient."""
    extra = (f"train.seq_len={seq_len}", f"train.window={window}")
    run_distributed(_check_step, dp * pp * sp, dp, pp, sp, 2, ["never", "always"], layout, extra)


def _train(rank: int, world: int, overrides: list[str]) -> None:
    train(load_config(None, overrides))


def test_loss_curve_pp2_sp2_equals_single_process() -> None:
    # float64 so that the comparison sees the parallel algorithm, not fp32 rounding amplified by Adam
    common = ["train.dtype=float64", "train.steps=20", "train.batch_size=8", "train.seq_len=32", "data.num_pairs=4",
              "run.log_every=1", "run.progress=false", "run.tensorboard=false", "train.eval_batches=1"]
    single, split = scratch_dir(), scratch_dir()
    run_distributed(_train, 1, common + ["parallel.pp=1", "parallel.sp=1", "parallel.microbatches=1",
                                         f"run.dir={single}"])
    run_distributed(_train, 4, common + ["parallel.pp=2", "parallel.sp=2", "parallel.microbatches=2",
                                         f"run.dir={split}", "run.speed_anchor=true"])
    a = pq.read_table(f"{single}/metrics.parquet").to_pydict()
    b = pq.read_table(f"{split}/metrics.parquet").to_pydict()
    assert a["step"] == b["step"] == list(range(1, 21))
    # the host's speed beside each step (rank 0's anchor, the others at a barrier) changes nothing in the training
    assert all(math.isnan(x) for x in a["anchor_s"]) and all(x > 0 for x in b["anchor_s"])
    for la, lb in zip(a["loss"], b["loss"]):
        assert abs(la - lb) < 1e-5 * max(1.0, abs(la)), (a["loss"], b["loss"])
    assert torch.tensor(a["loss"])[-5:].mean() < torch.tensor(a["loss"])[:5].mean()  # it learns something


def _check_time_balance(rank: int, world: int) -> None:
    import torch.distributed as dist

    from runtime.parallelize import stage_ranges

    cfg = load_config(None, ["parallel.pp=2", "parallel.sp=1", "parallel.balance=time", "model.layout=LA",
                             "train.batch_size=8", "train.seq_len=32"])
    ranges = stage_ranges(cfg, build_mesh(1, 2, 1))
    gathered = [None, None]
    dist.all_gather_object(gathered, ranges)
    assert gathered[0] == gathered[1]  # every rank cuts the model the same way
    assert ranges[0][0] == 0 and ranges[-1][1] == cfg.model.n_layers and ranges[0][1] == ranges[1][0]


def test_balance_by_measured_time_is_consistent() -> None:
    run_distributed(_check_time_balance, 2)


def _check_offload(rank: int, world: int) -> None:
    common = ["parallel.dp=1", "parallel.pp=1", "parallel.sp=1", "parallel.microbatches=1", "parallel.remat=always",
              "train.batch_size=4", "train.seq_len=32", "model.gate=true"]
    results = []
    for extra in ([], ["parallel.offload=true", "train.mlp_tile=8"]):
        trainer = Trainer(load_config(None, [*common, *extra]), build_mesh(1, 1, 1))
        loss = trainer.forward_backward(*trainer.data.batch(0))
        results.append((loss, {n: p.grad.clone() for n, p in trainer.model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)  # offload moves bytes, tiles split rows: the same numbers
    for name, g in grads_a.items():
        assert torch.allclose(g, grads_b[name], rtol=1e-5, atol=1e-7), name


def test_offload_and_tiles_change_no_result() -> None:
    run_distributed(_check_offload, 1)


@pytest.mark.parametrize("shard,window,microbatches,remat,once", [
    ("none", 4, 2, "never", True), ("none", 0, 2, "always", True), ("none", 0, 1, "never", True),
    ("none", 0, 1, "always", False), ("full", 4, 2, "never", False)])
def test_a_step_builds_each_fused_weight_once(shard, window, microbatches, remat, once, monkeypatch) -> None:
    """q/k/v/gate and gate/up are built once per layer and step where the step runs blocks several times with their
    weights live anyway (streamed windows, micro-batches, no recomputation), per use where a kept copy would only
    cost memory (one recomputed micro-batch) and under parallel.shard (FSDP2 owns the weights)."""
    cfg = load_config(None, ["parallel.pp=1", "parallel.sp=1", f"parallel.microbatches={microbatches}",
                             f"parallel.remat={remat}", "model.layout=L", "model.gate=true", "train.batch_size=4",
                             "train.seq_len=16", f"train.window={window}", "data.num_pairs=2",
                             f"parallel.shard={shard}", f"parallel.offload_optimizer={str(shard == 'full').lower()}"])
    trainer = Trainer(cfg, build_mesh(1, 1, 1))
    counting = CountingTorch()
    monkeypatch.setattr(fused_weights, "torch", counting)
    trainer.forward_backward(*trainer.data.batch(0))
    n = cfg.model.n_layers
    if once:
        uses = 2 * n
    elif window:  # micro-batches × (4 windows with gradients, both weights + the carry pass over 3, no last MLP)
        uses = microbatches * (4 * 2 * n + 3 * (2 * n - 1))
    else:  # the forward and the recomputation in backward
        uses = microbatches * 2 * 2 * n
    assert counting.cats == uses
