"""benchmarks/delta_rule.py's `--kernels` table: device kernels grouped by name, host events left out."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

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
