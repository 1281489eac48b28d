"""`longtrain calibrate` writes a hardware file that `plan --gpu FILE` reads."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
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
        if isinstance(value, bool):
            assert value is False, f.name  # a CPU: no bf16 autocast
            continue
        # a fit's intercept (0 within the noise), and what a CPU does not have: ≥ 0
        zero_ok = ("step_overhead_ms", "chunk_overhead_ms", "attention_cudnn_tflops", "host_link_gbps",
                   "host_optimizer_ns", "window_overhead_ms", "peer_wait_factor")
        least = 0 if f.name in zero_ok else 1e-12
        assert (value != "") if isinstance(value, str) else (math.isfinite(value) and value >= least), f.name
    # on a CPU the collectives are measured between two local gloo processes, and the host overheads of a
    # Trainer step (Python and op dispatch) and the process's own memory are measured too
    assert hw.name == "cpu" and hw.inter_node_gbps == 25.0 and "collectives from" not in hw.source
    assert 0.05 < hw.process_gib < 8 and hw.layer_overhead_ms > 0.01
    # and the same probe as two ranks at once: the factor on the host terms of ranks sharing the cores
    assert hw.shared_host_factor >= 1.0 and "shared_host_factor = " in out.read_text()
    capsys.readouterr()
    assert main(["plan", "--gpus", "4", "--gpu", str(out)]) == 0
    assert "longtrain calibrate on cpu" in capsys.readouterr().out


def test_unwritable_out_is_refused_before_measuring(tmp_path, capsys) -> None:
    assert main(["calibrate", "--quick", "--out", str(tmp_path / "missing" / "cpu.toml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("longtrain: error: --out") and "create the folder" in err and "\n" not in err


def test_existing_out_is_kept_without_overwrite(tmp_path, capsys) -> None:
    """An earlier calibration is refused in one line before measuring, left as it was; --overwrite replaces it."""
    out = tmp_path / "cpu.toml"
    out.write_text("# an earlier calibration\n")
    assert main(["calibrate", "--quick", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("longtrain: error: --out") and "--overwrite" in err and "\n" not in err
    assert out.read_text() == "# an earlier calibration\n"
    assert main(["calibrate", "--quick", "--out", str(out), "--overwrite"]) == 0
    assert out.read_text().startswith("# written by `longtrain calibrate`")
    assert not out.with_name("cpu.toml.tmp").exists()


def test_host_fit_recovers_the_plans_host_constants(monkeypatch) -> None:
    """measure_host_overheads fits in the plan's own units: probe steps (and their time inside collectives) that
    the plan itself predicts (per layer and micro-batch, per chunk, step, two ranks × shared_host_factor, their
    waits for each other × peer_wait_factor) give back the constants that made them."""
    from launch import calibrate
    from runtime.plan import plan_job

    hw = dataclasses.replace(load_hardware("h200"), gemm_tflops=0.1, copy_gbps=30.0, gpus_per_node=2,
                             autocast_bf16=False, latency_us=500.0, intra_node_gbps=0.4)
    truth = dataclasses.replace(hw, layer_overhead_ms=3.0, chunk_overhead_ms=0.25, step_overhead_ms=4.0,
                                shared_host_factor=2.0, peer_wait_factor=0.5)

    def probe(ranks: int, reps: int) -> dict:
        plans = {n: plan_job(calibrate._probe_config(n, ranks), ranks, truth) for n in calibrate.HOST_PROBES}
        comm = {n: p.comm_s if ranks > 1 else 0.0 for n, p in plans.items()}
        return {**{n: p.step_s for n, p in plans.items()}, "comm": comm, "rss_gib": 0.4}

    monkeypatch.setattr(calibrate, "_probe", probe)
    fitted = calibrate.measure_host_overheads(hw, reps=1)
    assert fitted["layer_overhead_ms"] == pytest.approx(3.0) and fitted["step_overhead_ms"] == pytest.approx(4.0)
    assert fitted["chunk_overhead_ms"] == pytest.approx(0.25)
    assert fitted["shared_host_factor"] == pytest.approx(2.0) and fitted["process_gib"] == 0.4
    assert fitted["peer_wait_factor"] == pytest.approx(0.5)


def test_host_fit_takes_the_median_of_the_shared_probes_launches(monkeypatch) -> None:
    """The several-rank probe runs three times and the median launch is fitted: one launch 3× slower (the ranks'
    waits on a shared VM) leaves the constants as they were; anchor_ms is the one-rank probe's anchor."""
    from launch import calibrate
    from runtime.plan import plan_job

    hw = dataclasses.replace(load_hardware("h200"), gemm_tflops=0.1, copy_gbps=30.0, gpus_per_node=2,
                             autocast_bf16=False, latency_us=500.0, intra_node_gbps=0.4)
    truth = dataclasses.replace(hw, layer_overhead_ms=3.0, chunk_overhead_ms=0.25, step_overhead_ms=4.0,
                                shared_host_factor=2.0, peer_wait_factor=0.5)
    slower, launched = iter([1.0, 3.0, 1.0]), []

    def probe(ranks: int, reps: int) -> dict:
        k = 1.0 if ranks == 1 else next(slower)
        launched.append(ranks)
        plans = {n: plan_job(calibrate._probe_config(n, ranks), ranks, truth) for n in calibrate.HOST_PROBES}
        comm = {n: k * p.comm_s if ranks > 1 else 0.0 for n, p in plans.items()}
        return {**{n: k * p.step_s for n, p in plans.items()}, "comm": comm, "rss_gib": 0.4, "anchor_s": 0.002 * k}

    monkeypatch.setattr(calibrate, "_probe", probe)
    fitted = calibrate.measure_host_overheads(hw, reps=1, launches=3)
    assert launched == [1, 2, 2, 2]
    assert fitted["layer_overhead_ms"] == pytest.approx(3.0) and fitted["shared_host_factor"] == pytest.approx(2.0)
    assert fitted["peer_wait_factor"] == pytest.approx(0.5) and fitted["anchor_ms"] == pytest.approx(2.0)
    assert fitted["shared_anchor_ms"] == pytest.approx(2.0)  # the median launch's


def test_a_failed_shared_probe_keeps_the_one_rank_constants(monkeypatch, capsys) -> None:
    """The two-rank probe failing (a port taken, a rank crashing) leaves shared_host_factor at 1 with the reason,
    the one-rank constants measured; the launcher's --resume hint, which calibrate has not, is dropped."""
    from launch import calibrate
    from launch.local import RankFailed

    def spawn(fn, ranks, out, reps, log_dir):
        if ranks > 1:
            raise RankFailed("rank 1: DistNetworkError: EADDRINUSE (traceback: x), then rerun with --resume auto")
        Path(out).write_text(json.dumps({"2": 0.02, "6": 0.05, "6x128": 0.07, "rss_gib": 0.3}))

    monkeypatch.setattr("launch.local.spawn", spawn)
    fitted = calibrate.measure_host_overheads(load_hardware("h200"), reps=1)
    assert fitted["shared_host_factor"] == 1.0 and fitted["layer_overhead_ms"] > 0
    assert "EADDRINUSE" in fitted["note"] and "--resume" not in fitted["note"]
    assert "rerun `longtrain calibrate`" in fitted["note"]
    assert "left at 1 (not modelled)" in capsys.readouterr().err
