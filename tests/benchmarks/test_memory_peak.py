"""benchmarks/memory_peak.py: the allocator trace replayed to its peak, what is alive there by allocating line."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import memory_peak  # noqa: E402

ROOT = memory_peak.PROJECT


def _frame(rel: str, line: int, name: str) -> dict:
    return {"filename": f"{ROOT}/{rel}", "line": line, "name": name}


TORCH = {"filename": "/site-packages/torch/nn/functional.py", "line": 10, "name": "linear"}


def test_live_at_peak_counts_what_is_alive_at_the_highest_point():
    a, b = [TORCH, _frame("models/mamba2.py", 73, "forward")], [_frame("models/llama.py", 66, "forward")]
    trace = [dict(action="alloc", addr=1, size=100, frames=a), dict(action="alloc", addr=2, size=50, frames=b),
             dict(action="free_requested", addr=1, size=100), dict(action="free_completed", addr=1, size=100),
             dict(action="alloc", addr=3, size=30, frames=a),  # 80 < 150: not a new peak
             dict(action="alloc", addr=4, size=200, frames=a)]  # 50 + 30 + 200 = 280: the peak
    peak, sites = memory_peak.live_at_peak(trace)
    assert peak == 280
    assert sites == {"models/mamba2.py:73 (forward)": (230, 2), "models/llama.py:66 (forward)": (50, 1)}


def test_sites_outside_the_project_and_free_requested_traces():
    trace = [dict(action="alloc", addr=1, size=10, frames=[TORCH]), dict(action="free_requested", addr=1, size=10),
             dict(action="alloc", addr=2, size=4, frames=[])]
    peak, sites = memory_peak.live_at_peak(trace)
    assert peak == 10 and sites == {"/site-packages/torch/nn/functional.py:10 (linear)": (10, 1)}


def test_render_orders_by_size_and_sums_the_rest():
    text = memory_peak.render(2**30, 2**30, {"x.py:1 (f)": (3 * 2**20, 2), "y.py:2 (g)": (2**20, 1),
                                             "z.py:3 (h)": (2**19, 1)}, top=2)
    assert text.startswith("peak 2.00 GiB = 1.00 GiB before the step + 1.00 GiB")
    assert text.index("x.py:1") < text.index("y.py:2")
    assert "| 1 more lines | 0.5 | 1 |" in text
