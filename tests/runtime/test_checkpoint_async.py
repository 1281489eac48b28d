"""Asynchronous checkpoints (issue 25): the background write equals the synchronous one byte for byte, a
second save waits for the first, a failed or killed write is never loaded, resume stays bitwise, and two
gloo ranks commit together (runtime/checkpoint_writer.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import zarr
from helpers import run_distributed

import runtime.checkpoint_writer as writer
import runtime.zarr_files as files
from launch.cli import main
from runtime.checkpoint import MARKER, check_resume, list_checkpoints, load_checkpoint, verify_checkpoint, verify_path
from runtime.checkpoint_writer import CheckpointWriter
from runtime.config import load_config
from runtime.errors import ConfigError, TrainingError

ROOT = Path(__file__).resolve().parents[2]
TINY = ["parallel.pp=1", "parallel.sp=1", "train.steps=4", "train.batch_size=4", "train.seq_len=32",
        "run.progress=false", "run.tensorboard=false", "run.log_every=1", "train.eval_batches=1",
        "run.checkpoint_every=2", "run.keep=5", "run.checkpoint_async=true"]


def _state(seed: int = 0):
    """A tiny model after one AdamW step, its optimizer and config."""
    from models import LinearLlama

    cfg = load_config(None, ["model.vocab_size=257"])
    torch.manual_seed(seed)
    model = LinearLlama(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, 257, (2, 16))).sum().backward()
    optimizer.step()
    return model, optimizer, cfg.to_dict()


def _save(w: CheckpointWriter, path: Path, step: int, model, optimizer, config, keep=None) -> None:
    w.save(path, step=step, model=model, optimizer=optimizer, config=config, cursor={"step": step},
           writes_params=True, keep=keep)


def _files(ckpt: Path, under: tuple[str, ...] = ("",)) -> dict[str, bytes]:
    return {str(p.relative_to(ckpt)): p.read_bytes() for p in sorted(ckpt.rglob("*"))
            if p.is_file() and str(p.relative_to(ckpt)).startswith(under)}


def test_async_save_equals_sync_save(tmp_path, monkeypatch) -> None:
    """Every file (chunks, metadata, marker) of a background save is the synchronous save's, also for arrays
    chunked on dim 0; the snapshot is taken when `save` returns (later updates do not reach it) and loads back."""
    monkeypatch.setattr(writer, "CHUNK_BYTES", 16384)  # the 257 × 64 embedding in 5 chunks
    model, optimizer, config = _state()
    want = {k: v.clone() for k, v in model.state_dict().items()}
    sync, background = tmp_path / "sync/step_00000001", tmp_path / "async/step_00000001"
    _save(CheckpointWriter(background=False), sync, 1, model, optimizer, config)
    w = CheckpointWriter(background=True)
    _save(w, background, 1, model, optimizer, config)
    with torch.no_grad():  # training goes on while the background write runs
        for p in model.parameters():
            p.add_(1.0)
    w.wait()
    a, b = _files(sync), _files(background)
    assert a.keys() == b.keys() and MARKER in a
    assert [name for name in a if a[name] != b[name]] == []
    embed = zarr.open_array(str(background / "model/embed.weight"), mode="r")
    assert embed.chunks == (64, 64) and len(json.loads(a[MARKER])["arrays"]["model/embed.weight"]["chunks"]) == 5
    assert verify_checkpoint(background).arrays == len(json.loads(a[MARKER])["arrays"])
    load_checkpoint(background, model=model, optimizer=optimizer, config=config)
    assert all(torch.equal(want[k], v) for k, v in model.state_dict().items())
    metrics = w.take_metrics()
    assert metrics["checkpoint_block_s"] > 0 and metrics["checkpoint_write_s"] > 0
    assert w.take_metrics() == {"checkpoint_block_s": 0.0, "checkpoint_write_s": 0.0}


def test_prepared_buffer_is_the_one_the_first_save_fills(tmp_path) -> None:
    """`prepare` reserves the snapshot buffer in a thread; the first save copies into that same allocation (its
    layout is the save's) and writes what a synchronous save writes."""
    model, optimizer, config = _state()
    w = CheckpointWriter(background=True)
    w.prepare(model=model, optimizer=optimizer, writes_params=True)
    w.wait()
    slab = w._buffer.slab
    assert slab is not None and slab.numel() >= sum(p.numel() * 4 * 3 for p in model.parameters())
    _save(w, tmp_path / "async/step_00000001", 1, model, optimizer, config)
    w.wait()
    assert w._buffer.slab is slab
    _save(CheckpointWriter(background=False), tmp_path / "sync/step_00000001", 1, model, optimizer, config)
    a, b = _files(tmp_path / "sync/step_00000001"), _files(tmp_path / "async/step_00000001")
    assert [name for name in a if a[name] != b.get(name)] == []
    sync_only = CheckpointWriter(background=False)
    sync_only.prepare(model=model, optimizer=optimizer, writes_params=True)  # nothing to reserve
    assert sync_only._buffer is None


def test_array_metadata_is_what_zarr_writes(tmp_path) -> None:
    for dtype, shape, chunks in (("float32", (10, 4), (4, 4)), ("uint8", (7,), (7,)), ("uint32", (3,), (3,)),
                                 ("float64", (), ()), ("int64", (2, 3), (2, 3)), ("bool", (5,), (5,))):
        ours = tmp_path / f"ours_{dtype}"
        files.write_array_meta(ours, shape, np.dtype(dtype), chunks, {"digest": "x"})
        zarr.create_array(store=str(tmp_path / dtype), shape=shape, dtype=dtype, chunks=chunks, compressors=None,
                          fill_value=0, attributes={"digest": "x"})
        assert json.loads((ours / "zarr.json").read_text()) == json.loads((tmp_path / dtype / "zarr.json").read_text())


def test_second_save_waits_for_the_first_and_both_commit_in_order(tmp_path, monkeypatch) -> None:
    gate, order, write, commit = threading.Event(), [], files.write_chunk, writer._commit

    def gated(file, data):  # the first save's writes wait for the gate
        if "step_00000001" in str(file):
            assert gate.wait(30)
        write(file, data)

    monkeypatch.setattr(files, "write_chunk", gated)
    monkeypatch.setattr(writer, "_commit", lambda save, *args: (commit(save, *args), order.append(save.step)))
    model, optimizer, config = _state()
    ckpts = tmp_path / "run/checkpoints"
    w = CheckpointWriter(background=True)
    start = time.perf_counter()
    _save(w, ckpts / "step_00000001", 1, model, optimizer, config, keep=5)
    assert time.perf_counter() - start < 5 and not (ckpts / "step_00000001" / MARKER).exists()
    second = threading.Thread(target=_save, args=(w, ckpts / "step_00000002", 2, model, optimizer, config, 5))
    second.start()
    second.join(0.5)
    assert second.is_alive() and not (ckpts / "step_00000002").exists()  # waiting for the first
    gate.set()
    second.join(30)
    w.wait()
    assert order == [1, 2]
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000001", "step_00000002"]
    assert w.take_metrics()["checkpoint_block_s"] >= 0.5  # the second save's wait counts as blocking


def test_failed_background_write_is_raised_and_not_committed(tmp_path, monkeypatch, capsys) -> None:
    def full_disk(file, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "write_chunk", full_disk)
    model, optimizer, config = _state()
    w = CheckpointWriter(background=True)
    _save(w, tmp_path / "run/checkpoints/step_00000001", 1, model, optimizer, config)
    with pytest.raises(TrainingError, match="writing the arrays failed on rank 0: OSError.*No space left") as e:
        w.wait()
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run/checkpoints/step_00000001" / MARKER).exists()
    _save(w, tmp_path / "run/checkpoints/step_00000002", 2, model, optimizer, config)
    w.close()  # at teardown the failure is a warning line
    assert capsys.readouterr().err.startswith("longtrain: warning: TrainingError: checkpoint")


KILLED = """
import pathlib, sys, time
import runtime.zarr_files as files
write = files.write_chunk
def stalled(file, data):  # the step-4 write never ends: the process is killed meanwhile
    if "step_00000004" in str(file):
        pathlib.Path(sys.argv[1]).touch()
        time.sleep(600)
    write(file, data)
files.write_chunk = stalled
from launch.cli import main
sys.exit(main(["train", "--nproc", "1", "--set", *sys.argv[2:]]))
"""


def _losses(run) -> list[float]:
    return pq.read_table(run / "metrics.parquet").to_pydict()["loss"]


def test_kill_during_background_write_then_resume_is_exact(tmp_path, capsys) -> None:
    """kill -9 while the background thread writes step 4: step 4 is never loaded, step 2 (written in the
    background too) is intact and `--resume auto` takes it; the resumed run ends bitwise as an uninterrupted one."""
    straight, killed, ready = tmp_path / "straight", tmp_path / "killed", tmp_path / "ready"
    assert main(["train", "--nproc", "1", "--set", *TINY, f"run.dir={straight}"]) == 0
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(ready), *TINY, f"run.dir={killed}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), proc.stderr.read() if proc.poll() is not None else "no background write started"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    step4 = killed / "checkpoints/step_00000004"
    assert step4.is_dir() and not (step4 / MARKER).exists()
    cfg = load_config(None, [*TINY, f"run.dir={killed}"]).to_dict()
    with pytest.warns(UserWarning, match="no commit marker"):
        assert [p.name for p in list_checkpoints(killed)] == ["step_00000002"]
        assert check_resume("auto", killed, cfg).name == "step_00000002"
    with pytest.raises(ConfigError, match="no commit marker"):
        verify_path(step4)
    capsys.readouterr()
    with pytest.warns(UserWarning, match="no commit marker"):  # the launcher's warning about step 4
        assert main(["train", "--nproc", "1", "--resume", "auto", "--set", *TINY, f"run.dir={killed}"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert _losses(killed) == _losses(straight)
    # bitwise (numpy's and Python's global generators are not seeded: two fresh runs hold different states)
    a, b = (_files(run / "checkpoints/step_00000004", ("model", "optim", "rng/rank_0/torch"))
            for run in (straight, killed))
    assert a.keys() == b.keys() and [n for n in a if a[n] != b[n]] == []


def _two_ranks(rank: int, world: int, root: str) -> None:
    from runtime.trainer import train

    common = ["parallel.pp=1", "parallel.sp=2", "parallel.microbatches=1", "parallel.shard=full", "model.gate=true",
              "train.batch_size=8", "train.seq_len=32", "train.steps=4", "run.checkpoint_every=2", "run.keep=5",
              "run.log_every=1", "run.progress=false", "run.tensorboard=false", "train.eval_batches=0"]
    train(load_config(None, [*common, "run.checkpoint_async=false", f"run.dir={root}/sync"]))
    summary = train(load_config(None, [*common, "run.checkpoint_async=true", f"run.dir={root}/async"]))
    assert summary["checkpoint_write_s"] > 0
    train(load_config(None, [*common, "run.checkpoint_async=true", f"run.dir={root}/resumed",
                             f"run.resume={root}/async/checkpoints/step_00000002"]))


def test_two_gloo_ranks_commit_async_saves(tmp_path) -> None:
    """Two ranks, sharded state (each rank writes its own chunk of every array): the background saves commit
    with both ranks' digests, equal the synchronous saves byte for byte, and resume bitwise."""
    run_distributed(_two_ranks, 2, str(tmp_path))
    for step in ("step_00000002", "step_00000004"):
        sync, background = (tmp_path / run / "checkpoints" / step for run in ("sync", "async"))
        marker = json.loads((background / MARKER).read_text())
        assert len(marker["arrays"]["model/embed.weight"]["chunks"]) == 2  # one per rank
        assert verify_checkpoint(background).arrays == len(marker["arrays"])
        a, b = (_files(c, ("model", "optim", "rng")) for c in (sync, background))
        assert a.keys() == b.keys() and [n for n in a if a[n] != b[n]] == []
    a, b = (_files(tmp_path / run / "checkpoints/step_00000004", ("model", "optim")) for run in ("async", "resumed"))
    assert a.keys() == b.keys() and [n for n in a if a[n] != b[n]] == []
    rows = pq.read_table(tmp_path / "async/metrics.parquet").to_pydict()
    assert rows["checkpoint_block_s"][1] > 0 and rows["checkpoint_block_s"][0] == 0.0
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "async")[2:]
