"""`longtrain sweep`: every point its own job, failures as rows, a resumable Parquet table; `report` on it."""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from launch import sweep
from launch.cli import main
from runtime.errors import ConfigError

GRID = Path(__file__).parents[2] / "configs" / "sweeps" / "tiny-cpu.toml"


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """The 6-point tiny grid (one point invalid), run once for the module: 3 points of 1 rank, 2 of 2 ranks."""
    out = tmp_path_factory.mktemp("sweep")
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # 2 shared cores: a one-rank point must not spin a second thread
    try:
        lines: list[str] = []
        rows = sweep.run_sweep(str(GRID), out=str(out), echo=lines.append)
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = old
    return out, rows, lines


def test_six_points_five_ok_one_failed(swept) -> None:
    out, rows, lines = swept
    table = pq.read_table(out / "sweep.parquet").to_pylist()
    assert [r["id"] for r in table] == [r["id"] for r in rows] and len(table) == 6
    assert sorted(r["status"] for r in table) == ["failed"] + ["ok"] * 5, [(r["status"], r["cause"]) for r in table]
    (bad,) = [r for r in table if r["status"] == "failed"]
    assert (bad["parallel.dp"], bad["parallel.pp"], bad["parallel.sp"], bad["train.seq_len"], bad["exit_code"]) == \
        (1, 1, 2, 66, 2)
    assert "does not split into 4 equal zigzag shards" in bad["cause"] and "\n" not in bad["cause"]
    assert len({r["id"] for r in table}) == 6
    for r in (r for r in table if r["status"] == "ok"):
        assert r["world"] == r["parallel.sp"] == len(r["peak_mem_per_rank"])
        assert r["peak_mem_gib"] == max(r["peak_mem_per_rank"]) > 0 and r["mem_kind"] == "rss"
        metrics = pq.read_table(out / "points" / r["id"] / "metrics.parquet").to_pylist()
        assert [m["step"] for m in metrics] == [1, 2, 3]  # warm-up 1 + 2 timed steps, one row each
        step = statistics.median(m["step_time_s"] for m in metrics[1:])  # the warm-up step is not timed
        assert r["step_time_s"] == pytest.approx(step) and r["timed_steps"] == 2
        assert r["tokens_per_s"] == pytest.approx(2 * r["train.seq_len"] / step)
        assert r["tokens_per_s_per_gpu"] == pytest.approx(r["tokens_per_s"] / r["world"])
        assert r["device"].startswith("cpu") and "torch" in r["versions"] and r["wall_s"] > 0
        # the measured split: medians of rank 0's per-step communication and bubble; compute is the rest
        assert r["comm_s"] == pytest.approx(statistics.median(m["comm_s"] for m in metrics[1:]))
        assert r["bubble_s"] == 0 and 0 < r["compute_s"] <= r["step_time_s"]  # one stage: nothing to wait for
        assert (r["comm_s"] > 0) == (r["parallel.sp"] > 1)  # LASP-2's all-gathers
        # the host's speed beside each timed step (run.speed_anchor: rank 0, the others at a barrier), its median
        assert all(m["anchor_s"] > 0 for m in metrics) and r["anchor_s"] == pytest.approx(
            statistics.median(m["anchor_s"] for m in metrics[1:]))
    assert any("[6/6]" in line for line in lines) and "5 ok, 1 not ok" in lines[-1]


def test_rerun_skips_every_point(swept, capsys) -> None:
    out, _, _ = swept
    before = (out / "sweep.parquet").read_bytes()
    start = time.monotonic()
    assert main(["sweep", str(GRID), "--out", str(out)]) == 0
    assert time.monotonic() - start < 10  # no point's process started
    assert "6 points, 6 done before, 0 to run" in capsys.readouterr().out
    assert (out / "sweep.parquet").read_bytes() == before


def test_report_of_the_sweep(swept, capsys) -> None:
    from launch.report import figure_scaling

    out, _, _ = swept
    assert main(["report", str(out)]) == 0
    capsys.readouterr()
    for name in ("scaling", "memory", "mfu"):
        data = (out / f"{name}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    rows = pq.read_table(out / "sweep.parquet").to_pylist()
    measured = {(r["world"], r["tokens_per_s_per_gpu"]) for r in rows if r["status"] == "ok"}
    fig = figure_scaling(rows)
    plotted = {(x, y) for ax in fig.axes for line in ax.lines if line.get_gid() == "measured"
               for x, y in zip(line.get_xdata(), line.get_ydata())}
    assert plotted and plotted <= measured  # the weak series: 32 and 64 tokens per GPU over 1 and 2 GPUs
    report = (out / "report.md").read_text()
    assert report.count("| ok |") == 5 and "does not split into 4 equal zigzag shards" in report


def test_failures_are_classified_and_timeouts_killed(tmp_path) -> None:
    assert sweep._cause("noise\nlongtrain: error: rank 0: OutOfMemoryError: CUDA out of memory.\n") == \
        "rank 0: OutOfMemoryError: CUDA out of memory."
    assert sweep.classify(1, "rank 0: OutOfMemoryError: CUDA out of memory.") == "oom"
    assert sweep.classify(2, "this job needs about 300 GiB per GPU (…)") == "oom"
    assert sweep.classify(1, "rank 1 died (signal SIGKILL)") == "failed"
    start = time.monotonic()
    code, _, _, _ = sweep._run_process([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "p", 1.0)
    assert code is None and time.monotonic() - start < 30


def test_grid_mistakes_are_one_line(tmp_path) -> None:
    bad = tmp_path / "g.toml"
    bad.write_text('[[zip]]\n"parallel.sp" = [1, 2]\n"train.seq_len" = [64]\n')
    with pytest.raises(ConfigError, match="lists of one length"):
        sweep.load_grid(bad)
    bad.write_text('[axes]\n"train.seq_len" = 64\n')
    with pytest.raises(ConfigError, match="must be a non-empty list"):
        sweep.load_grid(bad)
    bad.write_text('[sweep]\nlauncher = "slurm"\n')
    with pytest.raises(ConfigError, match="launcher='slurm' is unknown"):
        sweep.load_grid(bad)


def test_negative_timeout_is_refused_before_any_point(tmp_path) -> None:
    with pytest.raises(ConfigError, match="negative; pass --timeout"):
        sweep.run_sweep(GRID, out=tmp_path / "s", timeout_s=-3, echo=lambda line: None)
    assert not (tmp_path / "s").exists()


def test_commands_per_launcher(tmp_path) -> None:
    """ray: one Ray Train job per point; torchrun: one process on one node, one command per node beyond."""
    grid = sweep.load_grid(GRID)
    point = sweep.resolve(sweep.expand(grid)[1], grid, "ray")
    (ray_cmd,) = sweep.command(point, grid, tmp_path, "ray", "auto", 1.0)
    assert ray_cmd[2:5] == ["launch.cli", "ray", "--num-workers"] and "--address" in ray_cmd
    point.nodes = 2
    per_node = sweep.command(point, grid, tmp_path, "torchrun", "head:29500", 0.0)
    assert len(per_node) == 2 and [c[c.index("--node-rank") + 1] for c in per_node] == ["0", "1"]


def test_the_speed_reference_has_the_points_ranks_per_node() -> None:
    """A point's host-speed reference is the calibrated anchor with as many ranks on a node: anchor_ms for one,
    shared_anchor_ms for two (calibrate's probes); none for other counts or a profile without anchors (GPUs)."""
    import dataclasses
    import math

    from runtime.plan import load_hardware

    cpu = dataclasses.replace(load_hardware("h200"), anchor_ms=2.5, shared_anchor_ms=3.5)
    assert sweep.reference_anchor_ms(cpu, 1) == 2.5 and sweep.reference_anchor_ms(cpu, 2) == 3.5
    assert math.isnan(sweep.reference_anchor_ms(cpu, 4))
    assert math.isnan(sweep.reference_anchor_ms(load_hardware("h200"), 1))
