"""`longtrain report`: the plotted numbers are the table's, the PNGs are real images, the summary compares
predicted with measured."""

from __future__ import annotations

import math

import numpy as np
import pytest

from launch import report
from launch.cli import main
from launch.sweep import write_rows

COMMON = {"model.preset": "125m", "model.layout": "L", "parallel.remat": "always", "parallel.microbatches": 1,
          "train.batch_size": 1, "launcher": "local", "device_mem_gib": 80.0, "mem_kind": "cuda",
          "device": "8 × NVIDIA H100 80GB HBM3", "versions": "torch 2.11", "warmup_steps": 2}


def row(i: int, world: int, pp: int, sp: int, seq: int, per_gpu: float, mem: float, mfu: float, status="ok",
        **extra) -> dict:
    r = {**COMMON, "id": f"p{i}", "index": i, "status": status, "cause": "", "world": world, "parallel.dp": 1,
         "parallel.pp": pp, "parallel.sp": sp, "train.seq_len": seq, "tokens_per_step": seq}
    if status == "ok":
        r.update(tokens_per_s=per_gpu * world, tokens_per_s_per_gpu=per_gpu, peak_mem_gib=mem, mfu=mfu,
                 step_time_s=seq / (per_gpu * world))
    return {**r, **extra}


ROWS = [
    row(0, 1, 1, 1, 4096, 1000.0, 10.0, 0.30, pred_peak_mem_gib=10.5, pred_step_time_s=4.096 * 1.2),
    row(1, 2, 1, 2, 4096, 900.0, 6.0, 0.27),
    row(2, 4, 1, 4, 4096, 700.0, 4.0, 0.21),
    row(3, 2, 1, 2, 8192, 950.0, 11.0, 0.285),
    row(4, 4, 1, 4, 16384, 880.0, 12.0, 0.264),
    row(5, 4, 2, 2, 4096, 600.0, 5.0, 0.18),  # the same problem as 0-2, a slower split at 4 GPUs
    row(6, 1, 1, 1, 16384, 0.0, 0.0, 0.0, status="oom", cause="rank 0: OutOfMemoryError: CUDA out of memory."),
    row(7, 2, 1, 2, 66, 0.0, 0.0, 0.0, status="failed", cause="train.seq_len=66 does not split into 4 shards"),
]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    write_rows(out / "sweep.parquet", ROWS)
    return out, report.write_report(out)


def lines_of(fig, gid: str) -> list[list[tuple[float, float]]]:
    return [list(zip(line.get_xdata(), line.get_ydata())) for ax in fig.axes for line in ax.lines
            if line.get_gid() == gid]


def test_pngs_are_real_images(written) -> None:
    import matplotlib.image

    out, paths = written
    assert [p.name for p in paths] == ["scaling.png", "memory.png", "throughput.png", "mfu.png", "report.md"]
    for p in paths[:4]:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
        pixels = matplotlib.image.imread(p)
        assert pixels.shape[0] >= 600 and pixels.shape[1] >= 900 and pixels[..., :3].std() > 0.05


def test_scaling_plot_shows_the_table(written) -> None:
    rows = report.load_rows(written[0])
    fig = report.figure_scaling(rows)
    strong, weak = fig.axes[0], fig.axes[1]
    assert lines_of(fig, "measured") == [[(1, 1000.0), (2, 900.0), (4, 700.0)], [(1, 1000.0), (2, 950.0), (4, 880.0)]]
    assert lines_of(fig, "ideal") == [[(1, 1000.0), (2, 1000.0), (4, 1000.0)], [(1, 1000.0)] * 1 +
                                      [(2, 1000.0), (4, 1000.0)]]
    assert [t.get_text() for t in strong.texts] == ["100%\n1×1×1", "90%\n1×1×2", "70%\n1×1×4"]
    assert [t.get_text().split("\n")[0] for t in weak.texts] == ["100%", "95%", "88%"]
    assert strong.get_xscale() == "log" and "tokens/s" in strong.get_ylabel() and "GPUs" in strong.get_xlabel()


def test_memory_plot_shows_the_table(written) -> None:
    rows = report.load_rows(written[0])
    fig = report.figure_memory(rows)
    measured = sorted(p for line in lines_of(fig, "measured") for p in line)
    want = sorted((r["train.seq_len"], r["peak_mem_gib"]) for r in ROWS if r["status"] == "ok")
    assert measured == want
    assert lines_of(fig, "predicted") == [[(4096, 10.5)]]
    assert lines_of(fig, "oom") == [[(16384, 80.0)]]
    (ax,) = [a for a in fig.axes]
    assert ax.get_xscale() == "log" and "GiB" in ax.get_ylabel() and "tokens" in ax.get_xlabel()


def test_throughput_plot_shows_the_table(written) -> None:
    rows = report.load_rows(written[0])
    fig = report.figure_throughput(rows)
    measured = sorted(p for line in lines_of(fig, "measured") for p in line)
    assert measured == sorted((r["train.seq_len"], r["tokens_per_s_per_gpu"]) for r in ROWS if r["status"] == "ok")
    assert lines_of(fig, "predicted") == []  # no row recorded pred_tokens_per_s
    with_pred = [{**r, "pred_tokens_per_s": 1800.0} if r["id"] == "p1" else r for r in rows]
    assert lines_of(report.figure_throughput(with_pred), "predicted") == [[(4096, 900.0)]]  # per GPU: 2 ranks


def test_replan_predicts_each_row_from_its_command(tmp_path) -> None:
    """`--replan GPU`: today's plan for the job each ok row's command describes, in place of the recorded one."""
    from runtime.config import load_config
    from runtime.plan import load_hardware, plan_job

    sets = ["model.preset=1b", "parallel.pp=1", "parallel.sp=1", "train.batch_size=1", "train.seq_len=131072"]
    rows = [row(0, 1, 1, 1, 131072, 80000.0, 100.0, 0.48, pred_step_time_s=9.9, pred_peak_mem_gib=9.9,
                command="python -m launch.cli train --nproc 1 --overwrite --set " + " ".join(sets)),
            row(1, 1, 1, 1, 4096, 0.0, 0.0, 0.0, status="oom", command="python -m launch.cli train --set x=1")]
    write_rows(tmp_path / "sweep.parquet", rows)
    report.write_report(tmp_path, replan_gpu="h200")
    want = plan_job(load_config(None, sets), 1, load_hardware("h200"))
    text = (tmp_path / "report.md").read_text()
    assert f"{1e3 * want.step_s:.1f} (" in text and f"{want.peak_gib:.2f} (" in text and "9.90" not in text
    assert "recomputed with the current plan on `h200`" in text
    with pytest.raises(report.ConfigError, match="^--replan 'h999' is neither a hardware file"):
        report.write_report(tmp_path, replan_gpu="h999")


def test_mfu_plot_shows_the_table(written) -> None:
    rows = report.load_rows(written[0])
    fig = report.figure_mfu(rows)
    cells = np.asarray(fig.axes[0].images[0].get_array(), dtype=float)
    want = np.array([[30.0, 28.5, 26.4], [math.nan, 18.0, math.nan]])  # pp 1, 2 × sp 1, 2, 4: best MFU in %
    np.testing.assert_allclose(cells, want)
    cpu = [{**r, "mfu": math.nan} for r in rows]
    quantity, _, _, grid = report.mfu_grid(cpu)
    assert quantity == "tokens_per_s_per_gpu" and grid[0][0] == 1000.0


def test_markdown_summary(written) -> None:
    text = (written[0] / "report.md").read_text()
    assert "![scaling](scaling.png)" in text and text.count("\n| p") == len(ROWS)
    assert "| p6 | oom |" in text and "CUDA out of memory" in text and "| 1,000 | 1,000 | 30.0 |" in text
    assert "10.50 (+5 %)" in text and "(+20 %)" in text
    assert "peak memory within 10%: 1 of 1 points; step time within 15%: 0 of 1 points" in text
    assert "strong scaling, preset=125m, seq_len=4096: 1 GPUs 1,000 (100%)" in text and "4 GPUs 700 (70%)" in text


def test_measured_split_beside_the_predicted(tmp_path) -> None:
    split = dict(compute_s=0.030, comm_s=0.012, bubble_s=0.004, pred_compute_s=0.028, pred_comm_s=0.010,
                 pred_bubble_s=0.005, mem_kind="rss", device="cpu (x86_64, 2 cores)")
    rows = [row(0, 2, 2, 1, 64, 1000.0, 0.4, math.nan, **split), row(1, 1, 1, 1, 64, 2000.0, 0.4, math.nan)]
    write_rows(tmp_path / "sweep.parquet", rows)
    report.write_report(tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "## Where the step went (ms, measured / predicted)" in text
    assert "| p0 | 1×2×1 | 64 | 30.0 / 28.0 | 12.0 / 10.0 | 4.0 / 5.0 |" in text
    assert "| p1 | 1×1×1 | 64 |" not in text  # no measured split (a CUDA run): not in that table


def test_predicted_at_the_hosts_measured_speed(tmp_path) -> None:
    """A CPU point whose host ran 1.25× slower beside its steps (its anchor_s over the profile's anchor_ms) is also
    compared at that speed: the prediction × 1.25; rows without both anchors (GPU profiles) are not."""
    cpu = dict(mem_kind="rss", device="cpu (x86_64, 2 cores)", pred_peak_mem_gib=0.4)
    rows = [row(0, 1, 1, 1, 64, 3200.0, 0.4, math.nan, pred_step_time_s=0.016, anchor_s=0.005, pred_anchor_s=0.004,
                **cpu),  # measured 20 ms, predicted 16 ms (-20 %); at 1.25× slower: 20 ms
            row(1, 1, 1, 1, 128, 3200.0, 0.4, math.nan, pred_step_time_s=0.050, anchor_s=0.004, pred_anchor_s=0.004,
                **cpu),  # measured 40 ms, predicted 50 (+25 %), at the same speed still +25 %
            row(2, 1, 1, 1, 256, 3200.0, 0.4, math.nan, pred_step_time_s=0.080, anchor_s=math.nan,
                pred_anchor_s=0.004, **cpu)]  # measured 80 ms: no anchor beside it
    assert report.host_speed(rows[0]) == pytest.approx(1.25) and math.isnan(report.host_speed(rows[2]))
    write_rows(tmp_path / "sweep.parquet", rows)
    report.write_report(tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "| 16.0 (-20 %) | 20.0 (+0 %) ×1.25 |" in text and "| 50.0 (+25 %) | 50.0 (+25 %) ×1.00 |" in text
    assert "| 80.0 (+0 %) | — |" in text
    assert "step time within 15%: 1 of 3 points" in text
    assert "(its anchor_s over the profile's anchor for its ranks per node): step time within 15%: 1 of 2 points." \
        in text


def test_report_of_a_missing_sweep_is_one_line(tmp_path, capsys) -> None:
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "sweep.parquet' does not exist" in err and err.count("\n") == 1
