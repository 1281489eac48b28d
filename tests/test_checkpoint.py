"""zarr checkpoints: exact resume (pp = 2 × sp = 2 and one process), commit marker, refusals, export."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr
from _dist import run_distributed

from launch.cli import main
from runtime.config import load_config
from runtime.data import prepare_data
from runtime.trainer import train


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    docs = [" ".join(f"w{(i * j) % 97}" for j in range(30)) for i in range(400)]
    pq.write_table(pa.table({"text": docs}), root / "d.parquet")
    prepare_data(str(root / "d.parquet"), str(root / "s.zarr"), seq_len=32, chunk_len=8)
    return str(root / "s.zarr")


def _train(rank: int, world: int, overrides: list[str]) -> None:
    train(load_config(None, overrides))


def _run(world: int, store: str, run_dir, steps: int, extra: list[str] = ()) -> None:
    dims = ["parallel.pp=2", "parallel.sp=2"] if world == 4 else ["parallel.pp=1", "parallel.sp=1"]
    overrides = [*dims, "parallel.microbatches=2", f"data.source=zarr:{store}", "model.vocab_size=257",
                 "train.seq_len=32", "train.batch_size=8", f"train.steps={steps}", "run.checkpoint_every=10",
                 "run.keep=5", "run.log_every=1", "run.progress=false", "run.tensorboard=false",
                 "train.eval_batches=1", f"run.dir={run_dir}", *extra]
    run_distributed(_train, world, overrides)


def _params(ckpt) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(ckpt), mode="r")["model"]
    return {name: arr[...] for name, arr in g.arrays()}


def _losses(run_dir) -> list[float]:
    return pq.read_table(f"{run_dir}/metrics.parquet").to_pydict()["loss"]


@pytest.mark.parametrize("world", [1, 4])
def test_resume_is_exact(world: int, store: str, tmp_path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _run(world, store, straight, 20)
    _run(world, store, resumed, 10)
    assert [p.name for p in sorted((resumed / "checkpoints").iterdir())] == ["step_00000010"]
    _run(world, store, resumed, 20, ["run.resume=auto"])
    assert _losses(straight) == _losses(resumed)  # the metrics file continues from the resumed step
    a, b = _params(straight / "checkpoints/step_00000020"), _params(resumed / "checkpoints/step_00000020")
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        assert np.array_equal(a[name], b[name]), name  # bitwise
    opt = zarr.open_group(str(resumed / "checkpoints/step_00000020"), mode="r")["optim"]
    assert len(list(opt.group_keys())) == len(a)  # optimizer state of every parameter


def test_uncommitted_checkpoint_is_skipped(store: str, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    _run(1, store, run, 20)
    final = _params(run / "checkpoints/step_00000020")
    (run / "checkpoints/step_00000020/COMMITTED").unlink()  # as if killed before the marker
    with pytest.warns(UserWarning, match="no commit marker"):
        from runtime.checkpoint import resolve_resume

        assert resolve_resume("auto", run).name == "step_00000010"
    _run(1, store, run, 20, ["run.resume=auto"])
    again = _params(run / "checkpoints/step_00000020")
    assert all(np.array_equal(final[n], again[n]) for n in final)


def test_refusals_are_one_line_and_write_nothing(store: str, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    _run(1, store, run, 10)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    common = ["train", "--nproc", "1", "--set", "parallel.pp=1", "parallel.sp=1", "model.vocab_size=257",
              f"data.source=zarr:{store}", "train.seq_len=32", f"run.dir={run}"]
    cases = [
        (["--resume", "auto", "--set", "model.dim=128"], "another model shape"),
        (["--resume", str(run / "nope")], "does not exist"),
        (["--set", "train.seq_len=64"], "set train.seq_len=32"),
        (["--set", "model.vocab_size=64"], "set model.vocab_size=257"),
        (["--set", f"data.source=zarr:{tmp_path / 'missing.zarr'}"], "does not exist"),
    ]
    for args, message in cases:
        assert main([*common, *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_export_safetensors(store: str, tmp_path) -> None:
    from safetensors.numpy import load_file

    run = tmp_path / "run"
    _run(1, store, run, 10)
    ckpt = run / "checkpoints/step_00000010"
    assert main(["export", str(ckpt), "--output", str(tmp_path / "m.safetensors")]) == 0
    weights = load_file(str(tmp_path / "m.safetensors"))
    params = _params(ckpt)
    assert "head.weight" not in weights  # tied: stored once as embed.weight
    for name, value in weights.items():
        assert np.array_equal(value, params[name])
    shutil.rmtree(ckpt / "rng")
    (ckpt / "COMMITTED").unlink()
    assert main(["export", str(ckpt), "--output", str(tmp_path / "x.safetensors")]) == 2
