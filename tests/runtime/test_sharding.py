"""Sharded model state (parallel.shard, DESIGN §10): FSDP2 over the dp × sp ranks of each stage is transparent —
ten optimizer steps equal the single-process run — and its checkpoints reshard on resume."""

from __future__ import annotations

import torch
from helpers import run_distributed
from torch.distributed.tensor import DTensor

from models import LinearLlama, token_loss_sum
from parallel.gradients import clip_gradients_, global_grad_norm
from runtime.config import load_config
from runtime.mesh import build_mesh
from runtime.sources import build_data_source
from runtime.synthetic import IGNORE
from runtime.trainer import Trainer, learning_rate


def _cfg(dp: int, pp: int, sp: int, shard: str, steps: int, extra: tuple[str, ...] = ()):
    return load_config(None, [
        f"parallel.dp={dp}", f"parallel.pp={pp}", f"parallel.sp={sp}", f"parallel.shard={shard}",
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


def _check_steps(rank: int, world: int, dp: int, pp: int, sp: int, shards: list[str], steps: int) -> None:
    for shard in shards:
        cfg = _cfg(dp, pp, sp, shard, steps)
        trainer = Trainer(cfg, build_mesh(dp, pp, sp))
        assert trainer.sharded and all(isinstance(p, DTensor) for p in trainer.model.parameters())
        for step, (ref_loss, ref_params) in enumerate(_reference_steps(cfg, steps)):
            result = trainer.step(step)
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
    """shard=full and shard=optimizer over dp 2 × sp 2: ten steps (loss and every parameter) equal the
    single-process run in float64."""
    run_distributed(_check_steps, 4, 2, 1, 2, ["full", "optimizer"], 10)


def test_pp2_dp2_sharded_steps_equal_single_process() -> None:
    """shard=full composed with GPipe (2 stages × 2 micro-batches): one reduce-scatter per step after the
    schedule's last backward, the tied embedding/head pair summed over its sharded copies."""
    run_distributed(_check_steps, 4, 2, 2, 1, ["full"], 4)
