"""benchmarks/delta_rule.py: its `--kernels` table (device kernels grouped by name, host events left out) and its
`--configs` parsing."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import delta_rule  # noqa: E402


@dataclass
class _Event:
    name: str
    device_type: str
    self_device_time_total: float  # µs, as torch.profiler reports it


def test_kernel_times_group_device_kernels_by_name():
    events = [_Event("_prep_kernel", "DeviceType.CUDA", 1500.0), _Event("_sweep_kernel", "DeviceType.CUDA", 400.0),
              _Event("_prep_kernel", "DeviceType.CUDA", 500.0), _Event("aten::mm", "DeviceType.CPU", 9000.0)]
    assert delta_rule.kernel_times(events) == [("_prep_kernel", 2, 2.0), ("_sweep_kernel", 1, 0.4)]


def test_render_kernels_lists_the_longest_and_sums_the_rest():
    rows = [("a", 1, 6.0), ("b", 2, 3.0), ("c", 4, 1.0)]
    text = delta_rule.render_kernels("1×64K", {"ours (default)": rows}, top=2)
    assert "1×64K, ours (default): 10.00 ms of kernels" in text
    assert "| `a` | 1 | 6.000 | 60.0 % |" in text
    assert "| 1 more | 4 | 1.000 | 10.0 % |" in text


def test_configs_take_flags_and_integers():
    cfgs = delta_rule.parse_configs("default:;split:out_split=1,grad_split=true,bwd_split=0,grad_warps=4")
    assert cfgs["default"] == delta_rule.DEFAULT_CONFIG
    split = cfgs["split"]
    assert (split.out_split, split.grad_split, split.bwd_split, split.grad_warps) == (True, True, False, 4)


@pytest.mark.parametrize("spec,needle", [("x:nosuch=1", "unknown DeltaConfig field 'nosuch'"),
                                         ("x:out_split=yes", "out_split='yes' is not 0/1"),
                                         ("x:grad_warps=four", "grad_warps='four' is not an integer"),
                                         ("x:grad_warps", "grad_warps='' is not an integer")])
def test_configs_refuse_bad_values_in_one_line(spec, needle):
    with pytest.raises(SystemExit, match=needle):
        delta_rule.parse_configs(spec)
