"""Linear-Llama: preset sizes, and the sequence-parallel model equals the single-process model."""

from __future__ import annotations

import pytest
import torch
from helpers import check_sp_model, run_distributed

from models import LinearLlama, num_parameters, preset
from runtime.errors import ConfigError
from runtime.mesh import resolve_dims


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
    check_sp_model(rank, world, preset("tiny", layout="L", gate=True))


@pytest.mark.parametrize("sp", [2, 4])
def test_sp_model_matches_single_process(sp: int) -> None:
    run_distributed(_check_sp_model, sp)
