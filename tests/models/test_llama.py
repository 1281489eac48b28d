"""Linear-Llama: preset sizes, and the sequence-parallel model equals the single-process model."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from helpers import model_step, run_distributed, seeded_model_and_batch

from models import LinearLlama, num_parameters, preset
from parallel.context import SequenceParallel
from parallel.layout import shard_sequence
from runtime.errors import ConfigError
from runtime.mesh import build_mesh, resolve_dims


@pytest.mark.parametrize("name,target", [("125m", 125e6), ("400m", 400e6), ("1b", 1e9), ("3b", 3e9), ("8b", 8e9)])
def test_preset_sizes(name: str, target: float) -> None:
    with torch.device("meta"):
        n = num_parameters(LinearLlama(preset(name)))
    assert abs(n - target) / target < 0.10, n


def test_bad_model_config() -> None:
    with pytest.raises(ValueError, match="unknown layer letters"):
        preset("tiny", layout="LXA")
    with pytest.raises(ValueError, match="use one of"):
        preset("nope")


def test_resolve_dims() -> None:
    assert resolve_dims(8, None, 2, 2) == (2, 2, 2)
    with pytest.raises(ConfigError, match="launch 8 processes or set parallel.dp=1"):
        resolve_dims(4, 2, 2, 2)
    with pytest.raises(ConfigError, match="does not divide"):
        resolve_dims(6, None, 2, 2)


def _check_sp_model(rank: int, world: int) -> None:
    mesh = build_mesh(pp=1, sp=world)
    assert mesh.size("sp") == world and mesh.size("dp") == 1 and mesh.coord("sp") == rank
    cfg = preset("tiny", layout="L", gate=True)
    model, tokens, targets = seeded_model_and_batch(cfg, world)
    ref_loss, ref_grads = model_step(model, tokens, targets, targets.numel())
    for layout in ("contiguous", "zigzag"):
        model.set_sequence_parallel(SequenceParallel(mesh.group("sp"), layout))
        loss, grads = model_step(model, shard_sequence(tokens, rank, world, layout),
                            shard_sequence(targets, rank, world, layout), targets.numel())
        dist.all_reduce(loss, group=mesh.group("sp"))
        assert abs(loss - ref_loss) / ref_loss < 1e-6, (layout, loss, ref_loss)
        for name, grad in grads.items():
            dist.all_reduce(grad, group=mesh.group("sp"))  # gradients are summed over sp
            err = ((grad - ref_grads[name]).norm() / ref_grads[name].norm()).item()
            assert err < 1e-5, (layout, name, err)


@pytest.mark.parametrize("sp", [2, 4])
def test_sp_model_matches_single_process(sp: int) -> None:
    run_distributed(_check_sp_model, sp)
