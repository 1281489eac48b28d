"""Nothing lost, nothing hangs, every failure is one line: run-folder protection, timeouts, non-finite
guards, errors inside ranks, deterministic rank exit, prepare-data safety (from the command line)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr

from launch.cli import main

TINY = ["parallel.pp=1", "parallel.sp=1", "train.steps=4", "train.batch_size=4", "train.seq_len=32",
        "run.progress=false", "run.tensorboard=false", "run.log_every=1", "train.eval_batches=1"]
TWO_RANKS = ["parallel.pp=1", "parallel.sp=2", "train.batch_size=4", "train.seq_len=32", "run.progress=false",
             "run.tensorboard=false"]


def _cli(*argv: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_fresh_run_into_an_old_run_is_refused(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", "--nproc", "1", "--set", *TINY, f"run.dir={run}", "run.checkpoint_every=2"]) == 0
    rows = pq.read_table(run / "metrics.parquet").num_rows
    capsys.readouterr()
    assert main(["train", "--nproc", "1", "--set", *TINY, f"run.dir={run}"]) == 2
    err = _one_line(capsys.readouterr().err)
    assert "already holds a run" in err and "--resume auto" in err and "--overwrite" in err
    assert pq.read_table(run / "metrics.parquet").num_rows == rows  # nothing lost
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    # a finished run resumed: complete, nothing written
    before = (run / "metrics.parquet").stat().st_mtime_ns
    assert main(["train", "--nproc", "1", "--resume", "auto", "--set", *TINY, f"run.dir={run}"]) == 0
    assert "is complete" in capsys.readouterr().out
    assert (run / "metrics.parquet").stat().st_mtime_ns == before
    # --overwrite starts afresh
    assert main(["train", "--nproc", "1", "--overwrite", "--set", *TINY, f"run.dir={run}",
                 "train.steps=2"]) == 0
    assert pq.read_table(run / "metrics.parquet").num_rows == 2
    assert not (run / "checkpoints").exists()


def test_unwritable_run_dir_is_one_line(tmp_path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["train", "--nproc", "1", "--set", *TINY, f"run.dir={blocker}/run"]) == 2
    assert "cannot be written" in _one_line(capsys.readouterr().err)


def test_non_finite_loss_stops_with_one_line_and_no_bad_checkpoint(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    code = main(["train", "--nproc", "1", "--set", *TINY, "train.steps=20", "train.lr=1e30", "train.warmup_steps=1",
                 "train.grad_clip=0", f"run.dir={run}", "run.checkpoint_every=1", "run.keep=50"])
    assert code == 1
    err = _one_line(capsys.readouterr().err)
    assert "non-finite" in err and "train.lr" in err
    for ckpt in (run / "checkpoints").glob("step_*"):
        params = zarr.open_group(str(ckpt), mode="r")["model"]
        assert all(np.isfinite(arr[...]).all() for _, arr in params.arrays()), ckpt


def test_skip_nonfinite_counts_skipped_steps(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", "--nproc", "1", "--set", *TINY, "train.steps=6", "train.lr=1e30", "train.warmup_steps=1",
                 "train.grad_clip=0", "train.skip_nonfinite=100", f"run.dir={run}"]) == 0
    skipped = pq.read_table(run / "metrics.parquet").to_pydict()["skipped_steps"]
    assert skipped[-1] > 0 and skipped == sorted(skipped)


def test_no_evaluation_prints_no_accuracy(tmp_path, capsys) -> None:
    assert main(["train", "--nproc", "1", "--set", *TINY, "train.eval_batches=0", f"run.dir={tmp_path}/r"]) == 0
    assert "accuracy" not in capsys.readouterr().out


def test_error_inside_a_rank_is_one_line_with_its_log(tmp_path) -> None:
    run = tmp_path / "run"
    proc = _cli("train", "--nproc", "2", "--set", *TWO_RANKS, "train.steps=6", f"run.dir={run}",
                env={"LONGTRAIN_FAIL_AT_STEP": "2", "LONGTRAIN_FAIL_MODE": "raise"})
    assert proc.returncode == 1
    err = _one_line(proc.stderr)
    assert "rank 1: RuntimeError: injected failure on rank 1 before step 2" in err
    assert "Traceback" in (run / "logs" / "rank_1.log").read_text()


def test_dead_rank_is_named(tmp_path) -> None:
    proc = _cli("train", "--nproc", "2", "--set", *TWO_RANKS, "train.steps=6", f"run.dir={tmp_path}/run",
                env={"LONGTRAIN_FAIL_AT_STEP": "2"})
    assert proc.returncode == 1
    assert "rank 1 died" in _one_line(proc.stderr)


def _wait_for_training(proc: subprocess.Popen, run: Path, limit_s: float = 120) -> None:
    """Until the first metrics row exists (every rank is in the training loop)."""
    deadline = time.monotonic() + limit_s
    while not (run / "metrics.parquet").exists():
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.5)


def test_stopped_rank_ends_the_job_within_the_timeout(tmp_path) -> None:
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "launch.cli", "train", "--nproc", "2", "--set", *TWO_RANKS,
                             "train.steps=100000", "run.log_every=1", "parallel.timeout_s=10", f"run.dir={run}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_training(proc, run)
        children = subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "spawn_main"], capture_output=True,
                                  text=True).stdout.split()
        assert len(children) == 2, children
        os.kill(int(children[-1]), signal.SIGSTOP)  # the rank spawned last: rank 1
        stopped = time.monotonic()
        out, err = proc.communicate(timeout=120)
        assert time.monotonic() - stopped < 10 + 60
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    assert "rank(s) 1 stopped answering" in _one_line(err)


@pytest.mark.stress
def test_finished_runs_always_exit_zero(tmp_path) -> None:
    """Consecutive `longtrain train --nproc 2` runs all exit 0 (a gloo teardown abort once failed ≈ 2 %).
    CI runs LONGTRAIN_STRESS_RUNS (default 2: one two-rank, one in-process run; the exit-path mechanism itself is
    test_a_process_that_ran_a_rank_skips_finalization); run 200 by hand: LONGTRAIN_STRESS_RUNS=200 pytest -m stress."""
    runs = int(os.environ.get("LONGTRAIN_STRESS_RUNS", 2))
    for i in range(runs):
        nproc = 2 - i % 2  # one rank in-process too: its teardown once aborted a finished sweep point
        proc = _cli("train", "--nproc", str(nproc), "--set", "model.preset=tiny", "train.seed=9", "train.steps=6",
                    "run.log_every=1", "parallel.pp=1", f"parallel.sp={nproc}", "run.progress=false",
                    f"run.dir={tmp_path}/run{i}")
        assert proc.returncode == 0, (i, proc.returncode, proc.stderr[-2000:])


EXIT_PROBE = """
import atexit, sys
from launch.local import exit_process, run_rank
from runtime.mesh import init_distributed
atexit.register(print, "interpreter finalization ran")
if sys.argv[1] == "rank":
    run_rank(init_distributed, (), 0, sys.argv[2])
exit_process(3)
"""


@pytest.mark.parametrize("ran_a_rank", [True, False])
def test_a_process_that_ran_a_rank_skips_finalization(tmp_path, ran_a_rank) -> None:
    """After a rank closed its gloo group in this process, the CLI ends with os._exit (gloo's thread
    destructors cannot abort it); without one it exits normally. Both keep the exit code."""
    proc = subprocess.run([sys.executable, "-c", EXIT_PROBE, "rank" if ran_a_rank else "none", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert ("interpreter finalization ran" in proc.stdout) is not ran_a_rank


def _corpus(root: Path) -> Path:
    folder = root / "corpus"
    folder.mkdir()
    pq.write_table(pa.table({"text": ["hello world " * 40] * 20}), folder / "a.parquet")
    return folder


def test_prepare_data_never_replaces_its_input(tmp_path, capsys) -> None:
    folder = _corpus(tmp_path)
    before = sorted(p.name for p in folder.iterdir())
    for output in (folder, folder / "store.zarr", tmp_path):
        code = main(["prepare-data", "--input", str(folder), "--output", str(output), "--seq-len", "16",
                     "--overwrite"])
        assert code == 2
        assert "overlaps the input" in _one_line(capsys.readouterr().err)
    assert sorted(p.name for p in folder.iterdir()) == before


def test_failed_prepare_data_leaves_no_partial(tmp_path, capsys) -> None:
    folder = _corpus(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.parquet").write_text("not parquet")
    code = main(["prepare-data", "--input", str(bad), "--output", str(tmp_path / "s.zarr"), "--seq-len", "16"])
    assert code in (1, 2)
    _one_line(capsys.readouterr().err)
    code = main(["prepare-data", "--input", str(folder), "--output", str(tmp_path / "s.zarr"),
                 "--seq-len", "100000"])  # fewer tokens than one row
    assert code == 2
    assert not list(tmp_path.glob("*.partial"))


def _killed_while_writing(rank: int, world: int, overrides: list[str], kill_at_step: int) -> None:
    """Rank 0 dies (no cleanup, as under kill -9) halfway through writing the checkpoint of `kill_at_step`."""
    import runtime.zarr_files as files
    from runtime.config import load_config
    from runtime.trainer import train

    write, written, lock = files.write_chunk, [0], threading.Lock()

    def dying_write(file, data):  # called by the writer threads, one chunk file each
        if rank == 0 and f"step_{kill_at_step:08d}" in str(file):
            with lock:
                written[0] += 1
                if written[0] == 3:
                    os._exit(9)
        return write(file, data)

    files.write_chunk = dying_write
    train(load_config(None, overrides))


def _train_rank(rank: int, world: int, overrides: list[str]) -> None:
    from runtime.config import load_config
    from runtime.trainer import train

    train(load_config(None, overrides))


def test_kill_during_checkpoint_write_loses_nothing(tmp_path) -> None:
    """A rank killed while writing a checkpoint: that checkpoint is never loaded, the previous one resumes,
    and the run ends exactly as one that never stopped."""
    from helpers import run_distributed

    common = [*TWO_RANKS, "train.steps=6", "run.checkpoint_every=2", "run.keep=5", "run.log_every=1"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    run_distributed(_train_rank, 2, [*common, f"run.dir={straight}"])
    with pytest.raises(Exception):  # noqa: B017 — the spawn harness reports the killed rank
        run_distributed(_killed_while_writing, 2, [*common, f"run.dir={broken}"], 4)
    step4 = broken / "checkpoints" / "step_00000004"
    assert step4.exists() and not (step4 / "COMMITTED").exists()
    run_distributed(_train_rank, 2, [*common, f"run.dir={broken}", "run.resume=auto"])
    a = pq.read_table(straight / "metrics.parquet").to_pydict()["loss"]
    b = pq.read_table(broken / "metrics.parquet").to_pydict()["loss"]
    assert a == b and len(a) == 6


@pytest.mark.slow
def test_stopped_rank_under_torchrun_ends_the_job(tmp_path) -> None:
    """Under torchrun every rank reports for itself: the rank that waited names the cause in one line."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "launch.train", "--set", *TWO_RANKS, "train.steps=100000", "run.log_every=1",
                             "parallel.timeout_s=15", f"run.dir={run}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_training(proc, run)
        agent = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        ranks = [pid for a in agent for pid in
                 subprocess.run(["pgrep", "-P", a], capture_output=True, text=True).stdout.split()] or agent
        os.kill(int(sorted(ranks, key=int)[-1]), signal.SIGSTOP)
        stopped = time.monotonic()
        out, err = proc.communicate(timeout=180)
        assert time.monotonic() - stopped < 15 + 120
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    ours = [line for line in err.splitlines() if line.startswith("longtrain: error:")]
    assert ours and "a peer rank stopped answering" in ours[0], err[-3000:]
