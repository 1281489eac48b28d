"""`longtrain plan`'s cost model: its state accounting equals what the model allocates, it reproduces the measured
H200 steps, and the command prints the breakdown, the search and the scaling table."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from launch.cli import main
from models import PRESETS, LinearLlama
from parallel.pipeline import partition
from runtime import plan
from runtime.config import load_config
from runtime.errors import ConfigError
from runtime.memory import SHARD_MODES, stage_state
from runtime.parallelize import layer_costs_by_params

# benchmarks/RESULTS.md, 2026-12-01: the 1b preset with gate, batch 1, remat always (seq, window, tokens/s, GiB)
H200_STEPS = [
    (131072, 0, 50311, 44.5), (32768, 0, 50670, 20.9), (1048576, 65536, 40217, 32.4), (131072, 65536, 43455, 32.2)]
BASE = ["model.gate=true", "parallel.pp=1", "parallel.sp=1", "parallel.microbatches=1", "parallel.remat=always",
        "train.batch_size=1"]


def allocated(cfg, pp: int) -> list[tuple[int, int, int]]:
    """(parameter, gradient, AdamW state) bytes of every stage, built as runtime.parallelize builds it, with a
    gradient on every parameter and one optimizer step taken (on meta: sizes without memory)."""
    out = []
    for stage, (start, end) in enumerate(partition(layer_costs_by_params(cfg.model), pp)):
        with torch.device("meta"):
            model = LinearLlama(cfg.model)
        model.keep_stage(range(start, end), first=stage == 0, last=stage == pp - 1)
        model.to_empty(device="meta")
        model.tie_weights()
        model.to(getattr(torch, cfg.train.dtype))
        params = list(model.parameters())
        for p in params:
            p.grad = torch.zeros_like(p)
        opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2]},
                                 {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}])
        opt.step()
        out.append((sum(p.nbytes for p in params), sum(p.grad.nbytes for p in params),
                    sum(t.nbytes for s in opt.state.values() for t in s.values())))
    return out


@pytest.mark.parametrize("shard", SHARD_MODES)
@pytest.mark.parametrize("pp", [1, 2])
@pytest.mark.parametrize("name", list(PRESETS))
def test_state_accounting_equals_allocated_tensors(name: str, pp: int, shard: str) -> None:
    cfg = load_config(None, [f"model.preset={name}"])
    expected = allocated(cfg, pp)
    got = [(s.params, s.grads, s.optimizer) for s in stage_state(cfg, pp, shard)]
    assert got == expected
    p = plan.plan_job(load_config(None, [f"model.preset={name}", f"parallel.pp={pp}", "parallel.sp=1",
                                         "parallel.microbatches=1", "train.batch_size=2"]), pp * 2,
                      plan.load_hardware("h200"), shard)
    busiest = max(expected, key=sum)
    assert [round(p.memory[k] * plan.GIB) for k in ("parameters", "gradients", "optimizer")] == list(busiest)


def test_float64_and_a_real_trainer_allocate_what_the_plan_counts() -> None:
    """The tiny preset's real Trainer (a world of one, float64) after one backward and optimizer step."""
    from runtime.mesh import build_mesh
    from runtime.trainer import Trainer

    cfg = load_config(None, ["parallel.pp=1", "parallel.sp=1", "parallel.microbatches=1", "train.batch_size=2",
                             "train.dtype=float64"])
    assert not dist.is_initialized()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared CPU cores: more threads only wait for each other
    trainer = Trainer(cfg, build_mesh(1, 1, 1))
    try:
        trainer.forward_backward(*trainer.data.batch(0))
        params = list({id(p): p for p in trainer.model.parameters()}.values())
        grads = sum(p.grad.nbytes for p in params)
        trainer.optimizer.step()
        state = sum(t.nbytes for s in trainer.optimizer.state.values() for t in s.values())
        (want,) = stage_state(cfg, 1)
        assert (sum(p.nbytes for p in params), grads, state) == (want.params, want.grads, want.optimizer)
    finally:
        trainer.close()
        dist.destroy_process_group()
        torch.set_num_threads(threads)


def test_unknown_shard_mode_is_refused() -> None:
    with pytest.raises(ConfigError, match="is not modelled by the plan yet"):
        stage_state(load_config(), 1, "zero3")


@pytest.mark.parametrize("seq_len,window,tokens_per_s,peak_gib", H200_STEPS)
def test_plan_matches_measured_h200_steps(seq_len: int, window: int, tokens_per_s: float, peak_gib: float) -> None:
    cfg = load_config(None, ["model.preset=1b", *BASE, f"train.seq_len={seq_len}", f"train.window={window}"])
    p = plan.plan_job(cfg, 1, plan.load_hardware("h200"))
    assert abs(p.peak_gib - peak_gib) / peak_gib < 0.10
    assert abs(p.step_s - seq_len / tokens_per_s) / (seq_len / tokens_per_s) < 0.15
    assert p.compute["gemm"] > p.compute["linear_attention"] and p.comm_s < 1e-3 and p.bubble_s == 0


def test_terms_follow_the_split() -> None:
    """Pipeline: a bubble of (P−1)/M; sequence parallelism: LASP-2 traffic independent of seq_len; more nodes:
    slower links."""
    hw = plan.load_hardware("h200")
    cfg = load_config(None, ["model.preset=1b", "parallel.pp=2", "parallel.sp=4", "parallel.microbatches=8",
                             "train.batch_size=16", "train.seq_len=65536"])
    p = plan.plan_job(cfg, 8, hw)
    stage = p.step_s - p.bubble_s - p.comm["gradient_sync"] - p.comm["small_collectives"] - p.compute["optimizer"]
    assert p.bubble_s == pytest.approx(stage / 8)
    longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seq_len=4 * 65536))
    assert plan.plan_job(longer, 8, hw).comm["lasp2"] == pytest.approx(p.comm["lasp2"])
    wide = plan.plan_job(cfg, 8, plan.load_hardware("h200", gpus_per_node=2))  # sp = 4 over two nodes
    assert wide.comm["lasp2"] > p.comm["lasp2"]


def test_plan_command(capsys) -> None:
    config = str(Path(__file__).parents[2] / "configs" / "1b.toml")
    args = ["plan", "--config", config, "--gpus", "16", "--gpu", "h100", "--set", "train.seq_len=262144"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "parallel.shard=optimizer|full, DESIGN §10, run but are not modelled" in out
    assert "pipeline bubble" in out and "lasp2" in out
    assert main([*args, "--search", "--top", "3", "--scaling", "--inter-node-gbit", "400"]) == 0
    out = capsys.readouterr().out
    ranked = [float(line.split()[9].replace(",", "")) for line in out.splitlines()
              if line[:4].strip().isdigit() and " none " in line]
    assert len(ranked) == 3 and ranked == sorted(ranked, reverse=True)
    assert "1024" in out and "communication above 10%" in out


def test_plan_errors_are_one_line(capsys) -> None:
    assert main(["plan", "--gpus", "4", "--gpu", "tpu9"]) == 2
    assert "neither a hardware file nor one of ['a100', 'h100', 'h200']" in capsys.readouterr().err
    assert main(["plan", "--gpus", "3"]) == 2
    assert "launch a multiple of 4" in capsys.readouterr().err
