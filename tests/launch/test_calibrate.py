"""`longtrain calibrate` writes a hardware file that `plan --gpu FILE` reads."""

from __future__ import annotations

import dataclasses
import math

import torch

from launch.cli import main
from runtime.plan import Hardware, load_hardware


def test_calibrate_writes_a_profile_plan_reads(tmp_path, capsys) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared CPU cores
    try:
        out = tmp_path / "cpu.toml"
        assert main(["calibrate", "--quick", "--out", str(out), "--inter-node-gbit", "200"]) == 0
    finally:
        torch.set_num_threads(threads)
    hw = load_hardware(str(out))
    for f in dataclasses.fields(Hardware):
        value = getattr(hw, f.name)
        assert (value != "") if isinstance(value, str) else (math.isfinite(value) and value > 0), f.name
    assert hw.name == "cpu" and hw.inter_node_gbps == 25.0 and "collectives from h200" in hw.source
    capsys.readouterr()
    assert main(["plan", "--gpus", "4", "--gpu", str(out)]) == 0
    assert "longtrain calibrate on cpu" in capsys.readouterr().out
