"""benchmarks/short_conv.py on the CPU: its config overrides and its pre-timing check, with and without a halo."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from helpers import KERNEL_DEVICE

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import short_conv  # noqa: E402

pytest.importorskip("triton")
from kernels.conv import triton_conv  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_config(monkeypatch):
    monkeypatch.setattr(triton_conv, "CONFIG", triton_conv.CONFIG)


def test_set_changes_the_config_of_the_triton_rows():
    short_conv.configure(["fwd_warps=8", "fwd_block_t=32"])
    assert triton_conv.CONFIG.fwd_warps == 8
    assert triton_conv.CONFIG.fwd_block_t == 32


@pytest.mark.parametrize("pair", ["nosuch=1", "fwd_warps=", "fwd_warps=eight", "fwd_warps=0", "fwd_block_t=24",
                                  "bwd_direct=true"])
def test_a_bad_set_is_one_line(pair, capsys):
    with pytest.raises(SystemExit) as e:
        short_conv.configure([pair])
    assert str(e.value).startswith("short_conv benchmark: --set") and "\n" not in str(e.value)


@pytest.mark.parametrize("halo", [True, False], ids=["halo", "no-halo"])
def test_check_before_timing_is_small_with_and_without_halo(halo):
    short_conv.configure(["fwd_block_t=8", "fwd_block_d=8", "bwd_direct_block_t=8", "bwd_direct_block_d=8",
                          "bwd_direct_warps=4", "bwd_programs=4"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 21, 12, generator=g).to(KERNEL_DEVICE).requires_grad_()
    weight = (torch.rand(12, 1, 4, generator=g) - 0.5).to(KERNEL_DEVICE).requires_grad_()
    h = torch.randn(1, 3, 12, generator=g).to(KERNEL_DEVICE).requires_grad_() if halo else None
    dy = torch.randn(1, 21, 12, generator=g).to(KERNEL_DEVICE)
    assert short_conv._check(x, weight, h, dy) < 1e-5
