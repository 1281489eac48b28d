"""`longtrain ray`: Ray Train runs the same job as local processes, and survives a dying worker (the job's
model state sharded over its two sp ranks, parallel.shard=full: each worker writes and reads its own shards)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr
from helpers import run_distributed

from runtime.config import load_config
from runtime.trainer import train

JOB = ["parallel.pp=1", "parallel.sp=2", "parallel.microbatches=2", "parallel.shard=full", "train.steps=8",
       "train.batch_size=8", "train.seq_len=32", "run.checkpoint_every=4", "run.keep=5", "run.log_every=1",
       "run.report_every=4", "run.progress=false", "run.tensorboard=false", "train.eval_batches=1"]


def _train(rank: int, world: int, overrides: list[str]) -> None:
    train(load_config(None, overrides))


def _ray(run_dir, *extra: str, env: dict | None = None, job_extra: list[str] = ()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "launch.cli", "ray", "--num-workers", "2", *extra, "--set", *JOB, *job_extra,
           f"run.dir={run_dir}"]
    full_env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=full_env)


def _losses(run_dir) -> list[float]:
    return pq.read_table(f"{run_dir}/metrics.parquet").to_pydict()["loss"]


def _final(run_dir) -> dict[str, np.ndarray]:
    g = zarr.open_group(f"{run_dir}/checkpoints/step_00000008", mode="r")["model"]
    return {name: arr[...] for name, arr in g.arrays()}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("local") / "run"
    run_distributed(_train, 2, [*JOB, f"run.dir={run_dir}"])
    return run_dir


def test_ray_equals_local_processes_through_a_worker_death(local_run, tmp_path) -> None:
    """One Ray job whose worker dies before step 6 (Ray restarts the group from the step-4 checkpoint) ends
    step for step and bitwise where the local processes' uninterrupted run ends: the Ray path equals the local
    one, and the restart loses nothing. (One Ray start-up: an uninterrupted Ray run would add ≈ 55 s of CI.)"""
    run = tmp_path / "ray"
    proc = _ray(run, "--max-failures", "1", env={"LONGTRAIN_FAIL_AT_STEP": "6"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Ray job finished at step 8" in proc.stdout
    assert (run / ".failure_injected").exists()  # a worker did die, before step 6
    a, b = _final(local_run), _final(run)
    assert all(np.array_equal(a[n], b[n]) for n in a)  # bitwise equal to the uninterrupted run
    assert _losses(run) == _losses(local_run)


def test_no_restarts_left_is_one_line(tmp_path) -> None:
    proc = _ray(tmp_path / "ray", "--max-failures", "0", env={"LONGTRAIN_FAIL_AT_STEP": "2"})
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("longtrain: error: the Ray job failed after 0 restart(s)"), proc.stderr[-2000:]
    assert "raise --max-failures" in last


@pytest.mark.slow
def test_hung_worker_is_a_failure_ray_restarts_from(local_run, tmp_path) -> None:
    """A worker that stops answering (SIGSTOP) makes its peers' collectives time out (parallel.timeout_s); Ray
    restarts the group from the last checkpoint and the run ends exactly as an uninterrupted one."""
    run = tmp_path / "ray"
    proc = _ray(run, "--max-failures", "1", env={"LONGTRAIN_FAIL_AT_STEP": "6", "LONGTRAIN_FAIL_MODE": "stop"},
                job_extra=["parallel.timeout_s=20"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / ".failure_injected").exists()
    assert _losses(run) == _losses(local_run)
