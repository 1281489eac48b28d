"""`longtrain plan`'s cost model: its state accounting equals what the model allocates, it reproduces the measured
H200 steps, and the command prints the breakdown, the search and the scaling table."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import run_distributed

from launch.cli import main
from models import PRESETS, LinearLlama
from parallel.pipeline import partition
from runtime import plan
from runtime.config import load_config
from runtime.errors import ConfigError
from runtime.memory import SHARD_MODES, resolve_remat_policy, stage_state
from runtime.parallelize import layer_costs_by_params

# benchmarks/RESULTS.md, one H200: the 1b preset with gate, batch 1, remat always, and each row's settings
# (extra overrides, tokens per sequence, tokens/s, peak GiB). The tenth session's rows (2026-12-02, on the Triton
# SwiGLU / RMSNorm / cross-entropy, policy auto: the default) are those the plan's constants are fitted to.
OLD = ["parallel.remat_policy=full"]  # rows that ran before `auto` (the default) existed
H200_STEPS = [
    ([], 32768, 80796, 33.2), ([], 131072, 83913, 100.0), (["train.batch_size=32"], 4096, 84667, 100.0),
    (["train.window=16384"], 131072, 53235, 17.5),
    (["train.window=16384", "parallel.remat=never"], 1048576, 62652, 39.5),
    (["train.window=32768", "parallel.remat=never"], 1048576, 66473, 60.4),
    (["train.window=32768", "parallel.remat=never"], 4194304, 66392, 62.0),
    (["train.window=65536"], 32768, 70938, 17.67), (["train.window=65536"], 131072, 62873, 25.71),
    (["train.window=65536"], 1048576, 57430, 25.95), (["model.preset=3b"], 131072, 22573, 73.3),
] + [  # the eighteenth session's (2026-12-03): 1M in 64K windows without recomputation (h200-long.toml, re-run;
    # the same step ran 11 % faster, 78,229 tokens/s, on the machine of an earlier call that day), and the hybrid
    # at 128K under selective recomputation (issue 21's part single; predicted 9 % large, near the goal)
    (["train.window=65536", "parallel.remat=never"], 1048576, 69745, 102.72),
    (["model.layout=LLLA", "parallel.remat_policy=selective"], 131072, 34056, 92.91),
] + [  # the ninth session's, on eager elementwise work (now predicted 5–11 % faster than they ran); its
    # synchronous activation-offload row went when the offloader moved to a side stream (the offloaded rows are
    # gdn-1b's and mamba2-1b's, OTHER_PRESETS)
    ([*OLD, "model.layout=LLLA"], 131072, 29856, 33.5),
    ([*OLD, "model.layout=LLLA", "model.attention_backend=flash"], 131072, 21823, 33.5),
    ([*OLD, "model.preset=3b", "parallel.shard=full", "parallel.offload_optimizer=true"], 131072, 9806, 41.4)]
BASE = ["model.gate=true", "parallel.pp=1", "parallel.sp=1", "parallel.microbatches=1", "parallel.remat=always",
        "train.batch_size=1"]


def fsdp_local(p: torch.Tensor, replicas: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s shard of `p` as FSDP2's fully_shard cuts it: torch.chunk on dim 0 (⌈rows / N⌉ rows each; the
    trailing ranks get fewer or, past the last chunk, none)."""
    chunks = p.detach().chunk(replicas, dim=0)
    return chunks[rank] if rank < len(chunks) else p.detach().new_empty((0, *p.shape[1:]))


def stage_parameters(cfg, pp: int) -> list[list[torch.Tensor]]:
    """Every stage's parameters, built as runtime.parallelize builds them (on meta: sizes without memory)."""
    out = []
    for stage, (start, end) in enumerate(partition(layer_costs_by_params(cfg.model), pp)):
        with torch.device("meta"):
            model = LinearLlama(cfg.model)
        model.keep_stage(range(start, end), first=stage == 0, last=stage == pp - 1)
        model.to_empty(device="meta")
        model.tie_weights()
        model.to(getattr(torch, cfg.train.dtype))
        out.append(list(model.parameters()))
    return out


def allocated(stages: list[list[torch.Tensor]], replicas: int = 1) -> list[tuple[int, int, int]]:
    """(parameter, gradient, AdamW state) bytes of every stage on rank 0 of `replicas` dim-0 shards, with a
    gradient on every parameter and one optimizer step taken."""
    out = []
    for whole in stages:
        params = [torch.nn.Parameter(fsdp_local(p, replicas, 0)) for p in whole] if replicas > 1 else whole
        for p in params:
            p.grad = torch.zeros_like(p)
        opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2]},
                                 {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], foreach=True)
        opt.step()
        out.append((sum(p.nbytes for p in params), sum(p.grad.nbytes for p in params),
                    sum(t.nbytes for s in opt.state.values() for t in s.values())))
    return out


@pytest.mark.parametrize("pp", [1, 2])
@pytest.mark.parametrize("name", list(PRESETS))
def test_state_accounting_equals_allocated_tensors(name: str, pp: int) -> None:
    """Every shard mode at N = dp·sp ∈ {1, 2, 8} (N = 1: nothing is sharded): rank 0's dim-0 shards, the largest."""
    cfg = load_config(None, [f"model.preset={name}"])
    stages = stage_parameters(cfg, pp)
    expected = {n: allocated(stages, n) for n in (1, 2, 8)}  # optimizer and full hold the same state
    for n in (2, 8):  # no other rank holds more (sizes only)
        for params in stages:
            held = [sum(fsdp_local(p, n, rank).numel() for p in params) for rank in range(n)]
            assert max(held) == held[0]
    for shard in SHARD_MODES:
        for replicas in [1] if shard == "none" else [1, 2, 8]:
            got = [(s.params, s.grads, s.optimizer) for s in stage_state(cfg, pp, shard, replicas)]
            assert got == expected[replicas], (shard, replicas)
            p = plan.plan_job(load_config(None, [f"model.preset={name}", f"parallel.pp={pp}", "parallel.sp=1",
                                                 f"parallel.dp={replicas}", f"parallel.shard={shard}",
                                                 "parallel.microbatches=1", "train.batch_size=8"]),
                              pp * replicas, plan.load_hardware("h200"))
            busiest = max(expected[replicas], key=sum)
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


def _check_sharded_state(rank: int, world: int) -> None:
    from torch.distributed.tensor import DTensor

    from runtime.mesh import build_mesh
    from runtime.trainer import Trainer

    cfg = load_config(None, [f"parallel.dp={world}", "parallel.pp=1", "parallel.sp=1", "parallel.shard=full",
                             "parallel.microbatches=1", "train.batch_size=2", "train.seq_len=32", "data.num_pairs=4"])
    trainer = Trainer(cfg, build_mesh(world, 1, 1))
    try:
        trainer.forward_backward(*trainer.data.batch(0))
        params = list({id(p): p for p in trainer.model.parameters()}.values())
        assert all(isinstance(p, DTensor) for p in params)
        grads = sum(p.grad.to_local().nbytes for p in params)
        trainer.optimizer.step()
        state = sum((t.to_local() if isinstance(t, DTensor) else t).nbytes
                    for s in trainer.optimizer.state.values() for t in s.values())
        (want,) = stage_state(cfg, 1, "full", world)
        got = (sum(p.to_local().nbytes for p in params), grads, state)
        if rank == 0:  # rank 0 holds the most
            assert got == (want.params, want.grads, want.optimizer), (got, want)
        else:
            assert sum(got) <= want.total
    finally:
        trainer.close()


def test_fully_sharded_trainer_allocates_what_the_plan_counts() -> None:
    """FSDP2 over two gloo ranks (the tiny preset, parallel.shard=full): rank 0's local parameter, gradient and
    AdamW bytes after one backward and optimizer step equal stage_state's prediction."""
    run_distributed(_check_sharded_state, 2)


def test_unknown_shard_mode_is_refused() -> None:
    with pytest.raises(ConfigError, match="is not modelled by the plan"):
        stage_state(load_config(), 1, "zero3")


@pytest.mark.parametrize("extra,seq_len,tokens_per_s,peak_gib", H200_STEPS)
def test_plan_matches_measured_h200_steps(extra: list[str], seq_len: int, tokens_per_s: float,
                                          peak_gib: float) -> None:
    """The issue's goals on every measured one-H200 step: memory within 10 %, step time within 15 %."""
    cfg = load_config(None, ["model.preset=1b", *BASE, f"train.seq_len={seq_len}", *extra])
    p = plan.plan_job(cfg, 1, plan.load_hardware("h200"))
    measured_s = cfg.train.batch_size * seq_len / tokens_per_s
    assert abs(p.peak_gib - peak_gib) / peak_gib < 0.10
    assert abs(p.step_s - measured_s) / measured_s < 0.15
    assert p.bubble_s == 0 and p.comm["small_collectives"] < 1e-3


# benchmarks/RESULTS.md, sixteenth session, one H200 (1 warm-up + 2 timed steps): the other presets' steps as
# (overrides, seq_len, peak GiB, step ms) — gdn-1b with q and k's L2 norms on the Triton norm kernel (commits
# 542e9bd, 25981a8, 02d27a8), mamba2-1b on kernels.ssd_inputs and kernels.gated_norm (02d27a8). runtime.plan's
# KIND_ELEMENTWISE was fitted to the two full-recomputation rows at 128K; the others are checked against a model
# they did not shape.
OTHER_PRESETS = [
    (["model.preset=gdn-1b", "model.layout=D", "parallel.remat_policy=full"], 131072, 35.8, 2317.8),
    (["model.preset=gdn-1b", "model.layout=D", "parallel.remat_policy=selective"], 131072, 110.9, 2036.4),
    (["model.preset=gdn-1b", "model.layout=D", "train.window=65536"], 131072, 28.5, 2614.2),
    (["model.preset=gdn-1b", "model.layout=D", "train.window=32768"], 131072, 22.7, 2779.1),
    (["model.preset=gdn-1b", "model.layout=D", "parallel.remat_policy=full", "parallel.offload=true"], 131072, 31.9,
     2354.6),
    (["model.preset=gdn-1b", "model.layout=D", "parallel.remat_policy=full", "parallel.offload=true",
      "train.mlp_tile=16384"], 131072, 28.9, 2403.1),
    (["model.preset=gdn-1b", "model.layout=D", "parallel.remat_policy=full", "parallel.offload=true",
      "train.mlp_tile=16384", "model.delta_window=65536"], 131072, 28.0, 2457.4),
    (["model.preset=1b", "parallel.remat_policy=full", "train.mlp_tile=16384"], 131072, 26.4, 1858.4),
    (["model.preset=mamba2-1b", "train.window=65536"], 131072, 29.4, 2439.1),
    (["model.preset=mamba2-1b", "parallel.remat_policy=full", "parallel.offload=true"], 131072, 33.9, 2187.9),
]


@pytest.mark.parametrize("extra,seq_len,peak_gib,step_ms", OTHER_PRESETS)
def test_plan_of_delta_and_mamba2_blocks(extra: list[str], seq_len: int, peak_gib: float, step_ms: float) -> None:
    """Gated DeltaNet and Mamba-2 blocks keep more internals per token than a linear-attention block
    (`runtime.memory.KIND_INTERNALS`, measured on the CPU), move more elementwise bytes (KIND_ELEMENTWISE) and D's
    kernels cost DELTA_COST linear layers (measured on an H200): the issue's goals, memory within 10 %, step time
    within 15 %."""
    cfg = load_config(None, [*BASE, f"train.seq_len={seq_len}", *extra])
    p = plan.plan_job(cfg, 1, plan.load_hardware("h200"))
    assert abs(p.peak_gib - peak_gib) / peak_gib < 0.10
    assert abs(1e3 * p.step_s - step_ms) / step_ms < 0.15


def test_terms_follow_the_split() -> None:
    """Pipeline: a bubble of (P−1)/M; sequence parallelism: LASP-2 traffic independent of seq_len; more nodes:
    slower links."""
    hw = plan.load_hardware("h200")
    cfg = load_config(None, ["model.preset=1b", "parallel.pp=2", "parallel.sp=4", "parallel.microbatches=8",
                             "train.batch_size=16", "train.seq_len=65536"])
    p = plan.plan_job(cfg, 8, hw)
    stage = (p.step_s - p.bubble_s - p.comm["gradient_sync"] - p.comm["small_collectives"] - p.compute["optimizer"]
             - p.compute["step_overhead"])
    assert p.bubble_s == pytest.approx(stage / 8)
    longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seq_len=4 * 65536))
    assert plan.plan_job(longer, 8, hw).comm["lasp2"] == pytest.approx(p.comm["lasp2"])
    wide = plan.plan_job(cfg, 8, plan.load_hardware("h200", gpus_per_node=2))  # sp = 4 over two nodes
    assert wide.comm["lasp2"] > p.comm["lasp2"]


def test_recurrent_layers_are_timed_by_their_own_geometry() -> None:
    """Mamba-2 (M) layers run the chunked kernels with inner/P heads of K = N, V = P and a per-token decay (no
    softmax attention); under sp their LASP-2 state is heads · (N·P + 1) floats and their halo x, B, C."""
    hw = plan.load_hardware("h200")
    common = ["model.preset=1b", "model.gate=true", "train.batch_size=4", "train.seq_len=32768",
              "parallel.microbatches=1", "parallel.pp=1"]
    one = {k: plan.plan_job(load_config(None, [*common, f"model.layout={k}", "parallel.sp=1"]), 1, hw) for k in "LM"}
    assert one["M"].compute["softmax_attention"] == 0.0
    m = one["M"].cfg.model
    heads = m.ssm_expand * m.dim // m.ssm_head_dim
    ratio = heads * m.ssm_state * m.ssm_head_dim / (m.n_heads * m.head_dim**2)
    assert one["M"].compute["linear_attention"] == pytest.approx(ratio * one["L"].compute["linear_attention"])
    four = {k: plan.plan_job(load_config(None, [*common, f"model.layout={k}", "parallel.sp=4"]), 4, hw) for k in "LM"}
    state = {"L": m.n_heads * m.head_dim * (m.head_dim + 1), "M": heads * (m.ssm_state * m.ssm_head_dim + 1)}
    ratio = four["M"].memory["transient_lasp2_states"] / four["L"].memory["transient_lasp2_states"]
    assert ratio == pytest.approx(state["M"] / state["L"])


def test_host_overheads_add_per_layer_pass_and_step() -> None:
    """A calibrated CPU's host terms: layer_overhead per layer and micro-batch, × (3 + r)/3 with recomputation,
    step_overhead once, process_gib on the peak; the shipped GPU profiles have none."""
    h200 = plan.load_hardware("h200")
    assert (h200.layer_overhead_ms, h200.step_overhead_ms, h200.process_gib) == (0.0, 0.0, 0.0)
    host = dataclasses.replace(h200, layer_overhead_ms=2.0, step_overhead_ms=5.0, process_gib=0.5)
    cfg = load_config(None, ["model.preset=1b", *BASE, "parallel.microbatches=2", "train.batch_size=2",
                             "train.seq_len=4096"])
    bare, with_host = plan.plan_job(cfg, 1, h200), plan.plan_job(cfg, 1, host)
    assert with_host.compute["host_overhead"] == pytest.approx(16 * 2 * (3 + 1) / 3 * 2e-3)  # remat always: r = 1
    assert with_host.step_s - bare.step_s == pytest.approx(16 * 2 * 4 / 3 * 2e-3 + 5e-3)
    assert with_host.peak_gib - bare.peak_gib == pytest.approx(0.5) and with_host.memory["process"] == 0.5



def test_lasp2_collectives_run_in_every_window() -> None:
    """A streamed sequence runs LASP-2's all-gathers (and the conv halos) once per window and pass: its state
    traffic is the unstreamed step's × the windows × (2 + r with the rebuilt forwards) / (2 + r)."""
    def job(window: int):
        cfg = load_config(None, ["model.preset=1b", *BASE, "model.layout=L", "parallel.sp=2", "parallel.remat=never",
                                 "train.batch_size=1", "train.seq_len=65536", f"train.window={window}"])
        return cfg, plan.plan_job(cfg, 2, plan.load_hardware("h200"))

    (plain_cfg, plain), (streamed_cfg, streamed) = job(0), job(16384)
    scale = 4 * (2 + plan.recompute_passes(streamed_cfg)) / (2 + plan.recompute_passes(plain_cfg))
    assert streamed.comm["lasp2"] == pytest.approx(plain.comm["lasp2"] * scale)
    assert streamed.comm["halo"] == pytest.approx(plain.comm["halo"] * scale)


def test_chunk_overhead_is_per_chunk_of_each_recurrent_layer() -> None:
    """chunk_overhead_ms: per chunk of a recurrent layer's local sequence and micro-batch (the CPU path loops over
    chunks), × (3 + r)/3 like the per-layer term; softmax layers have none, and sp shortens the local sequence."""
    host = dataclasses.replace(plan.load_hardware("h200"), chunk_overhead_ms=1.0)

    def chunk_term(*sets: str) -> float:
        cfg = load_config(None, ["model.preset=1b", *BASE, "parallel.microbatches=1", "train.batch_size=1",
                                 "train.seq_len=4096", *sets])
        return plan.plan_job(cfg, cfg.world_size(), host).compute["host_overhead"]

    chunks = 4096 // 64  # the 1b preset's chunk_size
    assert chunk_term("model.layout=L") == pytest.approx(16 * chunks * (3 + 1) / 3 * 1e-3)  # remat always: r = 1
    assert chunk_term("model.layout=LLLA") == pytest.approx(12 * chunks * 4 / 3 * 1e-3)  # 12 of 16 recurrent
    assert chunk_term("model.layout=L", "parallel.remat=never") == pytest.approx(16 * chunks * 1e-3)
    assert chunk_term("model.layout=L", "parallel.sp=2") == pytest.approx(16 * chunks / 2 * 4 / 3 * 1e-3)


def test_shared_host_factor_scales_host_terms_of_ranks_sharing_a_node() -> None:
    """shared_host_factor (a calibrated CPU: two probe ranks at once) multiplies the host terms of a job whose
    ranks share a node's cores, and nothing else; one rank, and the shipped profiles (1.0), are unchanged."""
    assert all(plan.load_hardware(n).shared_host_factor == 1.0 for n in ("h200", "h100", "a100"))
    cpu = dataclasses.replace(plan.load_hardware("h200"), layer_overhead_ms=2.0, step_overhead_ms=5.0,
                              gpus_per_node=2, autocast_bf16=False)
    shared = dataclasses.replace(cpu, shared_host_factor=2.5)
    tiny = ["model.preset=tiny", "parallel.pp=1", "parallel.microbatches=1", "train.batch_size=2",
            "train.seq_len=64"]
    two = load_config(None, [*tiny, "parallel.sp=2"])
    base, scaled = plan.plan_job(two, 2, cpu), plan.plan_job(two, 2, shared)
    assert scaled.compute["host_overhead"] == pytest.approx(2.5 * base.compute["host_overhead"])
    assert base.compute["host_overhead"] == pytest.approx(4 * 2e-3)  # 4 layers, one micro-batch, no recompute
    assert scaled.compute["step_overhead"] == pytest.approx(2.5 * 5e-3)
    assert scaled.step_s - base.step_s == pytest.approx(1.5 * (4 * 2e-3 + 5e-3))
    assert scaled.comm == base.comm and scaled.peak_gib == base.peak_gib
    one = load_config(None, [*tiny, "parallel.sp=1"])
    assert plan.plan_job(one, 1, shared).step_s == pytest.approx(plan.plan_job(one, 1, cpu).step_s)
    spread = dataclasses.replace(shared, gpus_per_node=1)  # one rank per node: no cores shared
    assert plan.plan_job(two, 2, spread).compute["host_overhead"] == pytest.approx(base.compute["host_overhead"])


def test_peer_wait_is_communication_of_ranks_sharing_a_node() -> None:
    """peer_wait_factor (calibrate: the two-rank probe's time inside collectives beyond the plan's) adds that
    factor × the one-rank per-layer host time as communication, only where ranks share a node's cores."""
    assert all(plan.load_hardware(n).peer_wait_factor == 0.0 for n in ("h200", "h100", "a100"))
    cpu = dataclasses.replace(plan.load_hardware("h200"), layer_overhead_ms=2.0, step_overhead_ms=5.0,
                              gpus_per_node=2, autocast_bf16=False, shared_host_factor=2.5)
    waiting = dataclasses.replace(cpu, peer_wait_factor=0.75)
    two = load_config(None, ["model.preset=tiny", "parallel.pp=1", "parallel.microbatches=1", "train.batch_size=2",
                             "train.seq_len=64", "parallel.sp=2"])
    base, waited = plan.plan_job(two, 2, cpu), plan.plan_job(two, 2, waiting)
    assert "peer_wait" not in base.comm and waited.comm["peer_wait"] == pytest.approx(0.75 * 4 * 2e-3)
    assert waited.compute == base.compute and waited.step_s - base.step_s == pytest.approx(0.75 * 4 * 2e-3)
    spread = dataclasses.replace(waiting, gpus_per_node=1)
    assert "peer_wait" not in plan.plan_job(two, 2, spread).comm


def test_auto_remat_policy_keeps_selective_where_it_fits() -> None:
    """parallel.remat_policy=auto: selective where the estimate with it (+ its margin) fits the GPU — the 1b at
    128K on an H200 (101.5 GiB measured), not on an 80 GB H100 — full with windows, without remat, on a CPU."""
    cfg = load_config(None, ["model.preset=1b", *BASE, "train.seq_len=131072"])
    assert cfg.parallel.remat_policy == "auto"
    assert resolve_remat_policy(cfg, 1, 139.8) == "selective" and resolve_remat_policy(cfg, 1, 79.6) == "full"
    assert resolve_remat_policy(cfg, 1, None) == "full"
    for extra in (["train.window=16384"], ["parallel.remat=never"], ["parallel.remat_policy=full"]):
        assert resolve_remat_policy(load_config(None, ["model.preset=1b", *BASE, "train.seq_len=131072", *extra]),
                                    1, 139.8) == "full"
    h200, h100 = plan.plan_job(cfg, 1, plan.load_hardware("h200")), plan.plan_job(cfg, 1, plan.load_hardware("h100"))
    assert h200.cfg.parallel.remat_policy == "selective" and h200.peak_gib > 90
    assert h100.cfg.parallel.remat_policy == "full" and h100.peak_gib < 40


def test_auto_remat_policy_is_full_for_mamba2_blocks() -> None:
    """Stacks with Mamba-2 blocks resolve auto to full (their selective peak is not modelled: mamba2-1b at 128K ran
    out of an H200's memory), even where the estimate would fit; an explicit selective stays."""
    for layout in ("M", "MMMA"):
        cfg = load_config(None, ["model.preset=mamba2-1b", f"model.layout={layout}", *BASE, "train.seq_len=32768"])
        assert resolve_remat_policy(cfg, 1, 139.8) == "full"
    cfg = load_config(None, ["model.preset=mamba2-1b", *BASE, "train.seq_len=32768", "parallel.remat_policy=selective"])
    assert resolve_remat_policy(cfg, 1, 139.8) == "selective"
    gdn = load_config(None, ["model.preset=gdn-1b", *BASE, "train.seq_len=32768"])
    assert resolve_remat_policy(gdn, 1, 139.8) == "selective"


def test_plan_command(capsys) -> None:
    config = str(Path(__file__).parents[2] / "configs" / "1b.toml")
    args = ["plan", "--config", config, "--gpus", "16", "--gpu", "h100", "--set", "train.seq_len=262144"]
    assert main([*args, "--set", "parallel.shard=none"]) == 0
    out = capsys.readouterr().out
    assert "shard none: parameters, gradients and AdamW state replicated" in out
    assert "pipeline bubble" in out and "lasp2" in out and "fsdp allgather" not in out
    assert main(args) == 0  # the default, parallel.shard=auto: full on GPUs with dp·sp > 1
    out = capsys.readouterr().out
    assert "shard full: rank 0's dim-0 shards" in out and "fsdp allgather" in out and "gathered parameters" in out
    assert main([*args, "--search", "--top", "30", "--scaling", "--inter-node-gbit", "400"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line[:4].strip().isdigit() and len(line.split()) == 14]
    ranked = [float(r[10].replace(",", "")) for r in rows]
    assert len(ranked) == 30 and ranked == sorted(ranked, reverse=True)
    assert {r[9] for r in rows} == set(SHARD_MODES)
    assert {r[7] for r in rows} <= {"0", str(plan.SEARCH_MLP_TILE)}  # train.mlp_tile: off, or the tile tried
    assert "1024" in out and "communication above 10%" in out


def test_plan_errors_are_one_line(capsys, tmp_path) -> None:
    assert main(["plan", "--gpus", "4", "--gpu", "tpu9"]) == 2
    assert "neither a hardware file nor one of ['a100', 'h100', 'h200']" in capsys.readouterr().err
    quoted = tmp_path / "quoted.toml"  # a number written as a string
    quoted.write_text((plan.HARDWARE_DIR / "h200.toml").read_text().replace("copy_gbps = 4200.0", 'copy_gbps = "4200"'))
    assert main(["plan", "--gpus", "4", "--gpu", str(quoted)]) == 2
    assert "copy_gbps = '4200' is not a float; write it as in configs/hardware/h200.toml" in capsys.readouterr().err
    below = tmp_path / "below.toml"  # a factor < 1 would make ranks that share cores faster
    below.write_text((plan.HARDWARE_DIR / "h200.toml").read_text() + "shared_host_factor = 0.5\n")
    assert main(["plan", "--gpus", "4", "--gpu", str(below)]) == 2
    assert "shared_host_factor = 0.5 is below 1; 1 means not modelled" in capsys.readouterr().err
    negative = tmp_path / "negative.toml"
    negative.write_text((plan.HARDWARE_DIR / "h200.toml").read_text() + "peer_wait_factor = -0.2\n")
    assert main(["plan", "--gpus", "4", "--gpu", str(negative)]) == 2
    assert "peer_wait_factor = -0.2 is negative; 0 means not modelled" in capsys.readouterr().err
    negative.write_text((plan.HARDWARE_DIR / "h200.toml").read_text() + "anchor_ms = -3\n")
    assert main(["plan", "--gpus", "4", "--gpu", str(negative)]) == 2
    assert "anchor_ms = -3 is negative; 0 means not measured" in capsys.readouterr().err
    assert main(["plan", "--gpus", "3"]) == 2
    assert "launch a multiple of 4" in capsys.readouterr().err


def test_search_names_a_bad_value_it_does_not_vary() -> None:
    """A field the search keeps as given (train.mlp_tile here) with a bad value: the one-line refusal, not an empty
    ranking."""
    cfg = load_config(None, ["model.preset=gdn-1b"])
    cfg.train.mlp_tile = -5
    with pytest.raises(ConfigError, match="must be ≥ 0"):
        plan.search(cfg, 1, plan.load_hardware("h200"))
