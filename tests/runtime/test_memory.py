"""The pre-launch memory estimate: within its stated margin of measured H200 steps, and a refusal that names the fix."""

from __future__ import annotations

import types

import pytest
import torch

from models import LinearLlama, num_parameters
from runtime import memory
from runtime.config import load_config
from runtime.errors import ConfigError

BASE = ["model.preset=1b", "model.gate=true", "parallel.pp=1", "parallel.sp=1", "parallel.microbatches=1",
        "parallel.remat=always", "train.batch_size=1"]


@pytest.mark.parametrize("seq_len,window,policy,measured_gib", [
    (32768, 0, "full", 17.9), (131072, 0, "full", 34.0), (32768, 0, "selective", 33.8),
    (131072, 0, "selective", 101.5), (262144, 65536, "full", 26.5), (4194304, 65536, "full", 27.5),
    (131072, 16384, "full", 18.3)])
def test_estimate_matches_measured_steps(seq_len: int, window: int, policy: str, measured_gib: float) -> None:
    """Peaks measured by benchmarks/train_step.py on one H200 (benchmarks/RESULTS.md, 2026-12-01 / 02)."""
    cfg = load_config(None, [*BASE, f"train.seq_len={seq_len}", f"train.window={window}",
                             f"parallel.remat_policy={policy}"])
    with torch.device("meta"):
        model = LinearLlama(cfg.model)
    n, block = num_parameters(model), max(num_parameters(b) for b in model.layers.values())
    est = memory.estimate_memory(cfg, n, 1, 1, 1, block, n - sum(num_parameters(b) for b in model.layers.values()))
    assert abs(est.total_gib - measured_gib) / measured_gib < 0.10 < memory.MARGIN


@pytest.mark.parametrize("window,measured_gib", [(16384, 39.5), (32768, 60.4)])
def test_estimate_matches_measured_windows_without_recomputation(window: int, measured_gib: float) -> None:
    """1M tokens in windows without re-materialization (tenth session, one H200): every layer's saved internals
    of one window (NEVER_STORED) are what grows with the window."""
    cfg = load_config(None, [*BASE, "train.seq_len=1048576", f"train.window={window}", "parallel.remat=never"])
    with torch.device("meta"):
        model = LinearLlama(cfg.model)
    n, block = num_parameters(model), max(num_parameters(b) for b in model.layers.values())
    est = memory.estimate_memory(cfg, n, 1, 1, 1, block, n - sum(num_parameters(b) for b in model.layers.values()))
    assert abs(est.total_gib - measured_gib) / measured_gib < 0.10


def test_except_last_keeps_the_last_micro_batch_whole() -> None:
    """parallel.remat=except_last re-materializes all micro-batches but the last (parallel.pipeline.recompute_plan):
    with one micro-batch it stores what remat=never stores; with M of them, 1/M of never's internals plus the
    other micro-batches' layer inputs."""
    def stored(remat: str, microbatches: int) -> float:
        cfg = load_config(None, [*BASE, "train.seq_len=32768", "train.batch_size=4", f"parallel.remat={remat}",
                                 f"parallel.microbatches={microbatches}", "parallel.remat_policy=full"])
        return memory.activation_bytes(cfg, 1, 1, 1)["stored"]

    assert stored("except_last", 1) == stored("never", 1)
    for M in (2, 4):
        want = stored("never", M) / M + stored("always", M) * (M - 1) / M
        assert stored("except_last", M) == pytest.approx(want)


def test_windows_keep_memory_flat() -> None:
    with torch.device("meta"):
        n = num_parameters(LinearLlama(load_config(None, BASE).model))
    est = [memory.estimate_memory(load_config(None, [*BASE, f"train.seq_len={T}", "train.window=65536"]), n, 1, 1, 1)
           for T in (1 << 20, 1 << 22)]
    assert est[1].total_gib < 1.2 * est[0].total_gib


def test_a_window_is_sharded_over_the_sp_ranks() -> None:
    """train.window is global, each window sharded over the sp ranks (the Trainer runs window // sp per rank): a
    rank of sp = 2 streaming 2 × 512-token windows holds what one rank streaming 512-token windows of half the
    sequence holds, and its MLP tiles cut a call only when they are shorter than its window's shard."""
    def cfg(sp: int, seq_len: int, window: int, tile: int = 0):
        return load_config(None, [*BASE, "model.layout=L", f"parallel.sp={sp}", f"train.seq_len={seq_len}",
                                  f"train.window={window}", f"train.mlp_tile={tile}"])

    assert memory.activation_bytes(cfg(2, 4096, 1024), 1, 1, 2) == memory.activation_bytes(cfg(1, 2048, 512), 1, 1, 1)
    assert memory.rank_window(cfg(2, 4096, 1024), 2) == 512 and memory.rank_window(cfg(2, 4096, 0), 2) == 2048
    assert not memory.mlp_tiled(cfg(2, 4096, 1024, tile=768), 2) and memory.mlp_tiled(cfg(1, 4096, 1024, tile=768), 1)


def test_a_job_that_cannot_fit_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=80 << 30))
    cfg = load_config(None, [*BASE, "train.seq_len=1048576"])
    with pytest.raises(ConfigError, match="train.window.*run.skip_memory_check=true"):
        memory.check_fits(cfg, 1)
    assert memory.check_fits(load_config(None, [*BASE, "train.seq_len=1048576", "train.window=65536"]), 1)
    assert memory.check_fits(load_config(None, [*BASE, "train.seq_len=1048576", "run.skip_memory_check=true"]),
                             1) is None


def test_sharded_state_per_gpu() -> None:
    """parallel.shard over N = dp·sp ranks: 16/N bytes per parameter plus the gathered working copies;
    several micro-batches accumulate the stage's gradients unsharded (4 bytes per parameter)."""
    n, block, root = 7.9e9, 2.4e8, 1.3e8
    assert memory.state_bytes(n, 8, "none") == memory.state_bytes(n, 1, "full") == 16 * n
    full = memory.state_bytes(n, 8, "full", block, root)
    assert 16 * n / 8 < full < 1.2 * 16 * n / 8
    assert full < memory.state_bytes(n, 8, "optimizer", block, root) < 16 * n / 3
    assert memory.state_bytes(n, 8, "full", block, root, microbatches=4) > full + 3.5 * n


@pytest.mark.parametrize("shard,microbatches", [("optimizer", 1), ("full", 1), ("full", 2)])
def test_plan_state_agrees_with_state_bytes(shard: str, microbatches: int) -> None:
    """`longtrain plan`'s sharded state (rank 0's shards, the gathered bf16 copies, the gradients before their
    reduce-scatter) is `state_bytes`' estimate up to the chunk padding."""
    from runtime import plan

    cfg = load_config(None, ["model.preset=1b", "parallel.pp=1", "parallel.sp=1", "parallel.dp=8",
                             f"parallel.shard={shard}", f"parallel.microbatches={microbatches}", "train.batch_size=16"])
    p = plan.plan_job(cfg, 8, plan.load_hardware("h200"))
    with torch.device("meta"):
        model = LinearLlama(cfg.model)
    n = num_parameters(model)
    block = max(num_parameters(b) for b in model.layers.values())
    root = n - sum(num_parameters(b) for b in model.layers.values())
    want = memory.state_bytes(n, 8, shard, block, root, microbatches) / 2**30
    got = sum(p.memory[k] for k in ("parameters", "gradients", "optimizer", "gathered_parameters",
                                     "unsharded_gradients"))
    assert got == pytest.approx(want, rel=1e-3)
    assert p.comm["fsdp_allgather"] > 0 and "gradient_buffer" not in {k for k, v in p.memory.items() if v}
