"""The command line: bad configurations end in one line on stderr, exit status 2, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from launch.cli import main

BAD = {
    "unknown key": (["--set", "train.lrr=1"], "unknown config key train.lrr"),
    "unknown section": (["--set", "trian.lr=1"], "unknown config section"),
    "wrong type": (["--set", "train.steps=many"], "train.steps='many' is not a valid int"),
    "world size": (["--nproc", "3"], "launch a multiple of 4 processes"),
    "dp mismatch": (["--nproc", "4", "--set", "parallel.dp=2"], "launch 8 processes or set parallel.dp=1"),
    "pp > layers": (["--set", "parallel.pp=5"], "use pp ≤ 4"),
    "seq_len": (["--set", "train.seq_len=66"], "use a multiple of 4"),
    "microbatches < 1": (["--set", "parallel.microbatches=0"], "parallel.microbatches=0 must be ≥ 1"),
    "microbatches divide": (["--set", "parallel.microbatches=3"], "use a divisor of 16"),
    "preset": (["--set", "model.preset=7b"], "model.preset='7b' is unknown"),
    "layer letter": (["--set", "model.layout=LLX"], "unknown layer letters ['X']"),
    "lr": (["--set", "train.lr=0"], "train.lr=0.0 must be positive"),
    "steps": (["--set", "train.steps=-3"], "train.steps=-3 must be a positive integer"),
    "config file": (["--config", "nope.toml"], "config file 'nope.toml' does not exist"),
    "override form": (["--set", "train.lr"], "is not of the form section.key=value"),
    "shard mode": (["--set", "parallel.shard=zero3"], "parallel.shard='zero3' is unknown"),
    "offload unsharded": (["--set", "parallel.offload_optimizer=true", "parallel.shard=none"],
                          "set parallel.shard=optimizer"),
    "delta window < 0": (["--set", "model.delta_window=-3"], "model.delta_window=-3 must be an integer ≥ 0"),
    "delta window under sp": (["--set", "model.layout=DDDA", "model.delta_window=1024"],
                              "set model.delta_window=0"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_is_one_line(case: str, capsys) -> None:
    args, message = BAD[case]
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("module", ["launch.cli", "launch.train"])
def test_no_traceback_from_the_process(module: str) -> None:
    argv = ["train", "--set", "train.lr=-1"] if module == "launch.cli" else ["--set", "train.lr=-1"]
    proc = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    want = "longtrain: error: train.lr=-1.0 must be positive and finite, e.g. train.lr=3e-4"
    assert proc.stderr.strip() == want, proc.stderr


def test_presets_command(capsys) -> None:
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "125m" in out and "1b" in out and "at world 8" in out
    assert main(["presets", "--world", "16", "--pp", "2"]) == 0
    line = next(row for row in capsys.readouterr().out.splitlines() if row.split()[0] == "8b")
    none, optimizer, full = (float(x) for x in line.split("state/GPU")[1].replace("GiB", "").split("|"))
    assert 55 < none < 65 and full < optimizer < none / 3 and full < 1.3 * none / 8  # 16 B/param over 8 ranks
    assert main(["presets", "--world", "3", "--pp", "2"]) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for jobs without a GPU")
@pytest.mark.parametrize("nproc", [1, 4])
def test_triton_backend_without_a_gpu_is_one_line(nproc: int, monkeypatch, capsys) -> None:
    """model.backend=triton on a CPU without Triton's interpreter: refused before the first step, in one line that
    points at no traceback (a configuration error raised inside the ranks, one rank or several)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    mesh = ["parallel.pp=1", "parallel.sp=1"] if nproc == 1 else []
    assert main(["train", "--nproc", str(nproc), "--set", *mesh, "model.backend=triton"]) == 2
    err = capsys.readouterr().err
    assert "model.backend=triton needs a CUDA device" in err and "TRITON_INTERPRET=1" in err, err
    assert err.count("\n") == 1 and "traceback" not in err, err


@pytest.mark.parametrize("name,world", [("tiny", 4), ("125m", 8), ("400m", 8), ("1b", 8), ("1m-tokens", 8), ("8b", 8)])
def test_shipped_configs_validate(name: str, world: int) -> None:
    from pathlib import Path

    from runtime.config import load_config

    load_config(Path(__file__).parents[2] / "configs" / f"{name}.toml").validate(world)


def test_cli_trains_mamba2_and_gdn_layers_over_pp_and_sp() -> None:
    """`longtrain train --nproc 4` of a tiny M, D and A model over pp = 2 × sp = 2 (zigzag): the loss curve of
    one process."""
    import pyarrow.parquet as pq
    from helpers import run_trainings, scratch_dir

    common = ["model.layout=MDMA", "model.ssm_head_dim=16", "model.ssm_state=8", "train.dtype=float64",
              "train.steps=3", "train.batch_size=4", "train.seq_len=32", "parallel.microbatches=2",
              "run.log_every=1", "run.progress=false", "run.tensorboard=false", "train.eval_batches=1"]
    single, split = scratch_dir(), scratch_dir()
    run_trainings(1, [common + ["parallel.pp=1", "parallel.sp=1", f"run.dir={single}"]])
    assert main(["train", "--nproc", "4", "--set", *common, "parallel.pp=2", "parallel.sp=2", "parallel.layout=zigzag",
                 f"run.dir={split}"]) == 0
    a = pq.read_table(f"{single}/metrics.parquet").to_pydict()
    b = pq.read_table(f"{split}/metrics.parquet").to_pydict()
    assert a["step"] == b["step"] == [1, 2, 3]
    for la, lb in zip(a["loss"], b["loss"], strict=True):
        assert abs(la - lb) < 1e-8 * max(1.0, abs(la)), (a["loss"], b["loss"])
