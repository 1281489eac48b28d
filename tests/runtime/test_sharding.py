"""Sharded model state (parallel.shard, DESIGN §10): FSDP2 over the dp × sp ranks of each stage is transparent —
ten optimizer steps equal the single-process run — and its checkpoints reshard on resume."""

from __future__ import annotations

import pytest
import torch
from helpers import run_distributed, run_trainings
from torch.distributed.tensor import DTensor

from models import LinearLlama, token_loss_sum
from parallel.gradients import clip_gradients_, global_grad_norm
from runtime.config import load_config
from runtime.mesh import build_mesh
from runtime.sources import build_data_source
from runtime.synthetic import IGNORE
from runtime.trainer import Trainer, learning_rate


def _cfg(dp: int, pp: int, sp: int, shard: str, steps: int, extra: tuple[str, ...] = ()):
    """`shard` is a parallel.shard value, "+offload" adds parallel.offload_optimizer, "+window" streaming windows."""
    shard, *options = shard.split("+")
    extra = (*extra, *(["train.window=16"] if "window" in options else []))
    return load_config(None, [
        f"parallel.dp={dp}", f"parallel.pp={pp}", f"parallel.sp={sp}", f"parallel.shard={shard}",
        f"parallel.offload_optimizer={'offload' in options}",
        "parallel.microbatches=2", "model.gate=true", "train.batch_size=8", "train.seq_len=32", "data.num_pairs=4",
        "train.dtype=float64", f"train.steps={steps}", "train.warmup_steps=3", *extra,
    ])


def _reference_steps(cfg, steps: int):
    """The single-process run: (loss, {name: parameter}) after each of `steps` AdamW steps on the global batch."""
    t = cfg.train
    model = LinearLlama(cfg.model)
    model.reset_parameters(t.seed)
    model.to(torch.float64)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=learning_rate(cfg, 0), betas=(t.beta1, t.beta2), eps=1e-8)
    data = build_data_source(cfg, 0, 1, 0, 1)
    for step in range(steps):
        x, y = data.batch(step)
        loss = token_loss_sum(model(x), y) / (y != IGNORE).sum()
        loss.backward()
        clip_gradients_(params, global_grad_norm(params, None), t.grad_clip)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        yield loss.item(), dict(model.named_parameters())


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t  # collective for a DTensor


def _counting_reduce_scatters():
    """Wrap torch.distributed's reduce-scatter entry points (FSDP2 calls one of them per group reduction)."""
    import torch.distributed as dist

    calls = []

    def counting(inner):
        def counted(*args, **kwargs):
            calls.append(1)
            return inner(*args, **kwargs)
        return counted

    for name in ("reduce_scatter_single", "reduce_scatter_tensor"):
        if hasattr(dist, name):
            setattr(dist, name, counting(getattr(dist, name)))
    return calls


def _check_steps(rank: int, world: int, dp: int, pp: int, sp: int, runs: list[tuple[str, int]]) -> None:
    reduce_scatters = _counting_reduce_scatters()
    for shard, steps in runs:
        cfg = _cfg(dp, pp, sp, shard, steps)
        trainer = Trainer(cfg, build_mesh(dp, pp, sp))
        assert trainer.sharded and all(isinstance(p, DTensor) for p in trainer.model.parameters())
        for step, (ref_loss, ref_params) in enumerate(_reference_steps(cfg, steps)):
            reduce_scatters.clear()
            result = trainer.step(step)
            # one reduce-scatter per FSDP group (each block, the root) per step, not per micro-batch
            assert step == 0 or len(reduce_scatters) == len(trainer.model.layers) + 1, len(reduce_scatters)
            assert abs(result.loss - ref_loss) / ref_loss < 1e-6, (shard, step, result.loss, ref_loss)
            for name, p in trainer.model.named_parameters():
                key = "embed.weight" if name == "head.weight" else name
                want = ref_params[key].detach()
                err = ((_whole(p).detach() - want).norm() / want.norm()).item()
                assert err < 1e-6, (shard, step, name, err)
        state = trainer.optimizer.state[trainer.model.layers[next(iter(trainer.model.layers))].mlp.up.weight]
        assert isinstance(state["exp_avg"], DTensor)  # AdamW state is sharded too
        local = state["exp_avg"].to_local()
        assert local.numel() * dp * sp == state["exp_avg"].numel()


def test_dp2_sp2_sharded_steps_equal_single_process() -> None:
    """shard=full and shard=optimizer over dp 2 × sp 2: six and four steps (loss and every parameter) equal the
    single-process run in float64; so do a few with the sharded state offloaded (on CPU: the plumbing) and a
    few streaming each sequence in windows (train.window) through the sharded stage."""
    run_distributed(_check_steps, 4, 2, 1, 2, [("full", 6), ("optimizer", 4), ("full+offload", 2),
                                               ("full+window", 2)])


def test_pp2_dp2_sharded_steps_equal_single_process() -> None:
    """shard=full composed with GPipe (2 stages × 2 micro-batches): one reduce-scatter per step after the
    schedule's last backward, the tied embedding/head pair summed over its sharded copies."""
    run_distributed(_check_steps, 4, 2, 2, 1, [("full", 4)])


# -- checkpoints -----------------------------------------------------------------------------------------
def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every parameter and AdamW tensor of this rank's stage, whole (collective under sharding)."""
    out = {}
    for name, p in trainer.model.named_parameters():
        out[name] = _whole(p).detach().clone()
        for key, value in sorted(trainer.optimizer.state[p].items()):
            out[f"{name}/{key}"] = _whole(value).detach().clone()
    return out


def _check_round_trip(rank: int, world: int, root: str) -> None:
    """Sharded checkpoints hold exactly the sharded state; they load into replicated and differently sharded
    trainers, and a replicated checkpoint loads into a sharded trainer, all exactly."""
    import torch.distributed as dist
    import zarr

    from runtime.checkpoint import verify_checkpoint

    def trainer(shard: str, dp: int = 2, sp: int = 2) -> Trainer:
        return Trainer(_cfg(dp, 1, sp, shard, 10, ("train.dtype=float32",)), build_mesh(dp, 1, sp))

    full = trainer("full")
    for step in range(2):
        full.step(step)
    full.save(f"{root}/full", 2)
    want = _state(full)
    if rank == 0:
        verify_checkpoint(f"{root}/full")
        up = zarr.open_array(f"{root}/full/model/layers.0.mlp.up.weight", mode="r")
        assert up.chunks == (32, 64) and up.shape == (128, 64)  # one dim-0 chunk per rank, each rank wrote its own
    for shard in ("none", "full"):  # optimizer shards exactly as full does
        other = trainer(shard)
        assert other.restore(f"{root}/full") == 2
        got = _state(other)
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), (shard, key)
    none = trainer("none")
    none.restore(f"{root}/full")
    none.step(2)
    none.save(f"{root}/none", 3)
    want = _state(none)
    again = trainer("full")
    again.restore(f"{root}/none")
    got = _state(again)
    assert all(torch.equal(got[key], want[key]) for key in want)
    dist.barrier()


def test_sharded_checkpoint_round_trip(tmp_path) -> None:
    run_distributed(_check_round_trip, 4, str(tmp_path))


def _train(rank: int, world: int, overrides: list[str]) -> None:
    from runtime.trainer import train

    train(load_config(None, overrides))


def _job(run_dir, sp: int, steps: int, extra: list[str] = (), pp: int = 1) -> list[str]:
    return [f"parallel.pp={pp}", f"parallel.sp={sp}", "parallel.microbatches=1", "parallel.shard=full",
            "model.gate=true", "train.batch_size=8", "train.seq_len=32", "data.num_pairs=4", f"train.steps={steps}",
            "run.checkpoint_every=2", "run.keep=5", "run.log_every=1", "run.progress=false", "run.tensorboard=false",
            "train.eval_batches=0", f"run.dir={run_dir}", *extra]


def _run(run_dir, world: int, sp: int, steps: int, extra: list[str] = (), pp: int = 1) -> None:
    run_distributed(_train, world, _job(run_dir, sp, steps, extra, pp))


def _losses(run_dir) -> list[float]:
    import pyarrow.parquet as pq

    return pq.read_table(f"{run_dir}/metrics.parquet").to_pydict()["loss"]


def test_sharded_checkpoint_resumes_at_other_world_sizes(tmp_path) -> None:
    """Saved at world 4 (dp 2 × sp 2, shard=full, every rank writing its own chunks): resumed at world 4 the
    run continues bitwise; at world 2 (sp 2), at world 1 and on two pipeline stages (pp 2 × dp 2, the last
    stage's tied head read from the embedding) the next step's loss is the same up to fp32 rounding; export
    writes the consolidated weights; a missing or changed chunk is refused."""
    import shutil

    import numpy as np
    import zarr
    from safetensors.numpy import load_file

    from launch.cli import main
    from runtime.checkpoint import verify_checkpoint
    from runtime.errors import ConfigError

    straight = tmp_path / "w4"
    _run(straight, 4, 2, 3)
    ckpt = straight / "checkpoints/step_00000002"
    reference = _losses(straight)[2]
    again, pipelined = tmp_path / "w4-resumed", tmp_path / "w4-pp2"
    run_trainings(4, [_job(again, 2, 3, [f"run.resume={ckpt}"]),  # one process start-up for both
                      _job(pipelined, 1, 3, [f"run.resume={ckpt}", "train.eval_batches=1"], pp=2)])
    assert _losses(again) == [reference]
    a = zarr.open_group(str(straight / "checkpoints/step_00000003"), mode="r")["model"]
    b = zarr.open_group(str(again / "checkpoints/step_00000003"), mode="r")["model"]
    assert all(np.array_equal(a[name][...], b[name][...]) for name in a.array_keys())
    for world, sp in ((2, 2), (1, 1)):
        _run(tmp_path / f"w{world}-pp1", world, sp, 3, [f"run.resume={ckpt}", "train.eval_batches=1"])
    for resumed in (tmp_path / "w2-pp1", tmp_path / "w1-pp1", pipelined):
        (loss,) = _losses(resumed)
        assert abs(loss - reference) / reference < 1e-5, (resumed.name, loss, reference)

    assert main(["export", str(ckpt), "--output", str(tmp_path / "m.safetensors")]) == 0
    weights = load_file(str(tmp_path / "m.safetensors"))
    model = zarr.open_group(str(ckpt), mode="r")["model"]
    assert "head.weight" not in weights and len(weights) == len(list(model.array_keys()))
    assert all(np.array_equal(value, model[name][...]) for name, value in weights.items())

    missing = tmp_path / "missing"
    shutil.copytree(ckpt, missing)
    (missing / "optim/layers.1.mlp.up.weight/exp_avg/c/2/0").unlink()  # rank 2's rows
    with pytest.raises(ConfigError, match="exp_avg is missing its chunk c/2/0"):
        verify_checkpoint(missing)
    arr = zarr.open_array(str(ckpt / "model/embed.weight"), mode="r+")
    arr[16, 0] = arr[16, 0] + 1.0  # rows 16..31: rank 1's chunk
    with pytest.raises(ConfigError, match="embed.weight does not match its digest.*chunk c/1/0"):
        verify_checkpoint(ckpt)


def _state_bytes(trainer: Trainer) -> int:
    """Bytes of the parameters, their gradients and the optimizer state this rank holds (local shards)."""
    local = lambda t: t.to_local() if isinstance(t, DTensor) else t  # noqa: E731
    tensors = list(trainer.model.parameters())
    tensors += [p.grad for p in trainer.model.parameters() if p.grad is not None]
    tensors += [v for st in trainer.optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    return sum(local(t).numel() * t.element_size() for t in tensors)


def _check_world_one(rank: int, world: int) -> None:
    held = {}
    for shard in ("none", "full", "optimizer"):
        trainer = Trainer(_cfg(1, 1, 1, shard, 1), build_mesh(1, 1, 1))
        trainer.step(0)
        assert not trainer.sharded and not any(isinstance(p, DTensor) for p in trainer.model.parameters())
        held[shard] = _state_bytes(trainer)
    assert held["full"] == held["optimizer"] == held["none"] > 0, held


def test_shard_at_world_one_holds_what_the_unsharded_run_holds() -> None:
    """One rank per stage: parallel.shard=full (or optimizer) builds the plain model — no FSDP wrapper, no
    gathered copies — and after a step holds the same parameter, gradient and optimizer bytes as shard=none."""
    run_distributed(_check_world_one, 1)


@pytest.mark.parametrize(("world", "sp", "cuda", "window", "offload", "want"), [
    (4, 2, True, 0, False, "full"),   # dp 2 × sp 2 on GPUs: sharded by default
    (2, 2, True, 0, False, "full"),   # sp alone is a sharding axis
    (1, 1, True, 0, False, "none"),   # one rank per stage: nothing to shard
    (1, 1, True, 0, True, "full"),    # ... unless the optimizer state is offloaded (world 1, CPU AdamW)
    (4, 2, False, 0, False, "none"),  # CPU: replicated unless asked
    (4, 1, True, 8, False, "none"),   # windows streamed over 2 stages do not shard yet (pp 2 × dp 2)
])
def test_auto_shard_resolves_per_job(world, sp, cuda, window, offload, want) -> None:
    pp = 2 if window else 1
    cfg = load_config(None, [f"parallel.pp={pp}", f"parallel.sp={sp}", "parallel.microbatches=2",
                             "train.batch_size=8", "train.seq_len=32", f"train.window={window}",
                             f"parallel.offload_optimizer={offload}"])
    assert cfg.parallel.shard == "auto"
    cfg.validate(world, cuda=cuda)
    assert cfg.parallel.shard == want


def test_plan_reads_auto_as_the_gpu_job_would() -> None:
    from runtime.plan import load_hardware, plan_job

    cfg = load_config(None, ["parallel.pp=1", "parallel.sp=4", "train.batch_size=2", "train.seq_len=64"])
    hw = load_hardware("h200")
    assert plan_job(cfg, 8, hw).peak_gib == plan_job(cfg, 8, hw, shard="full").peak_gib
    assert plan_job(cfg, 8, hw).peak_gib < plan_job(cfg, 8, hw, shard="none").peak_gib


def test_sharded_job_from_the_command_line_and_torchrun(tmp_path) -> None:
    """`longtrain train --nproc 2` and torchrun run the same shard=full job (sp 2) to the same losses and the
    same checkpoint, every rank writing its own chunks."""
    import os
    import subprocess
    import sys

    import numpy as np
    import zarr

    job = ["parallel.pp=1", "parallel.sp=2", "parallel.shard=full", "model.gate=true", "train.batch_size=4",
           "train.seq_len=32", "train.steps=3", "run.checkpoint_every=3", "run.progress=false",
           "run.tensorboard=false", "run.log_every=1", "train.eval_batches=0"]
    commands = {"local": ["-m", "launch.cli", "train", "--nproc", "2", "--set", *job],
                "torchrun": ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                             "launch.train", "--set", *job]}
    for name, argv in commands.items():
        proc = subprocess.run([sys.executable, *argv, f"run.dir={tmp_path / name}"], capture_output=True,
                              text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, (name, proc.stderr[-3000:])
    assert _losses(tmp_path / "local") == _losses(tmp_path / "torchrun")
    a, b = (zarr.open_group(str(tmp_path / name / "checkpoints/step_00000003"), mode="r") for name in commands)
    embed = a["model/embed.weight"]
    assert embed.chunks[0] == embed.shape[0] // 2  # one dim-0 chunk per rank: each rank wrote its own
    for group in ("model", "optim"):
        arrays = dict(a[group].arrays()) if group == "model" else \
            {f"{p}/{n}": arr for p, g in a[group].groups() for n, arr in g.arrays()}
        assert arrays and all(np.array_equal(arr[...], b[f"{group}/{n}"][...]) for n, arr in arrays.items())
