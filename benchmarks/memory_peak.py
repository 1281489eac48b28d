"""What is alive at a step's memory peak, by the source line that allocated it (CUDA caching allocator's trace).

    python benchmarks/train_step.py ... --memory DIR      # one more step per longtrain row → DIR/VARIANT_T.md

`record_step(step, path)` runs `step()` with PyTorch's allocator history on (Python stacks), replays the trace —
+size at each `alloc`, −size at each free — to the moment the allocated bytes peak, and writes the allocations
alive then, summed by the first frame in this project (else the innermost frame), largest first. Memory that was
allocated before the step (weights, optimizer state) is the baseline row. `live_at_peak` is the replay alone.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

PROJECT = str(Path(__file__).resolve().parents[1])
MIB = 2.0**20


def _site(frames: list[dict]) -> str:
    """The allocating line: the innermost frame inside the project (not its benchmarks), else the innermost one."""
    for f in frames:
        name = f.get("filename", "")
        if name.startswith(PROJECT) and "/benchmarks/" not in name:
            return f"{Path(name).relative_to(PROJECT)}:{f.get('line')} ({f.get('name')})"
    if frames:
        return f"{frames[0].get('filename')}:{frames[0].get('line')} ({frames[0].get('name')})"
    return "(no stack)"


def live_at_peak(trace: list[dict]) -> tuple[int, dict[str, tuple[int, int]]]:
    """(peak bytes above the trace's start, {site: (bytes, blocks)} alive at that peak) of an allocator trace."""
    frees = {"free_completed"} if any(e.get("action") == "free_completed" for e in trace) else {"free_requested"}
    live: dict[int, tuple[int, str]] = {}
    now = peak = 0
    at_peak: dict[int, tuple[int, str]] = {}
    for e in trace:
        action, addr, size = e.get("action"), e.get("addr"), int(e.get("size", 0))
        if action == "alloc":
            live[addr] = (size, _site(e.get("frames") or []))
            now += size
            if now > peak:
                peak, at_peak = now, dict(live)
        elif action in frees and addr in live:
            now -= live.pop(addr)[0]
    sites: dict[str, tuple[int, int]] = {}
    for size, site in at_peak.values():
        total, n = sites.get(site, (0, 0))
        sites[site] = (total + size, n + 1)
    return peak, sites


def render(baseline: int, peak: int, sites: dict[str, tuple[int, int]], top: int = 25) -> str:
    rows = sorted(sites.items(), key=lambda kv: -kv[1][0])
    lines = [f"peak {(baseline + peak) / 2**30:.2f} GiB = {baseline / 2**30:.2f} GiB before the step + "
             f"{peak / 2**30:.2f} GiB allocated during it, alive at the peak by allocating line:", "",
             "| allocated at | MiB | blocks |", "|---|---|---|"]
    lines += [f"| `{site}` | {b / MIB:,.1f} | {n} |" for site, (b, n) in rows[:top]]
    if len(rows) > top:
        rest = rows[top:]
        lines.append(f"| {len(rest)} more lines | {sum(b for _, (b, _) in rest) / MIB:,.1f} | "
                     f"{sum(n for _, (_, n) in rest)} |")
    return "\n".join(lines) + "\n"


def record_step(step: Callable[[], object], path: Path, max_entries: int = 2_000_000) -> None:
    """step() with the CUDA allocator's history on; the table of what is alive at its peak → path."""
    import torch

    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=max_entries, stacks="python")
    try:
        step()
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    device = torch.cuda.current_device()
    peak, sites = live_at_peak(snapshot["device_traces"][device])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(baseline, peak, sites))
