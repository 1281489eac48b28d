"""zarr checkpoints: exact resume (pp = 2 × sp = 2 and one process), commit marker, refusals, export."""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import zarr
from helpers import one_line_error, run_many, run_overrides, run_training

from launch.cli import main
from runtime.config import load_config


def _params(ckpt) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(ckpt), mode="r")["model"]
    return {name: arr[...] for name, arr in g.arrays()}


def _losses(run_dir) -> list[float]:
    return pq.read_table(f"{run_dir}/metrics.parquet").to_pydict()["loss"]


@pytest.mark.parametrize("world", [1, 4])
def test_resume_is_exact(world: int, store: str, tmp_path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    every = 10 if world == 1 else 3  # world 4 (pp 2 × sp 2) costs ~10× a step: fewer of them
    steps, every_step = [f"run.checkpoint_every={every}"], f"step_{2 * every:08d}"
    run_many(world, store, [(straight, 2 * every, steps), (resumed, every, steps)])  # one process start-up
    assert [p.name for p in sorted((resumed / "checkpoints").iterdir())] == [f"step_{every:08d}"]
    run_training(world, store, resumed, 2 * every, [*steps, "run.resume=auto"])
    assert _losses(straight) == _losses(resumed)  # the metrics file continues from the resumed step
    a, b = _params(straight / "checkpoints" / every_step), _params(resumed / "checkpoints" / every_step)
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        assert np.array_equal(a[name], b[name]), name  # bitwise
    opt = zarr.open_group(str(resumed / "checkpoints" / every_step), mode="r")["optim"]
    assert len(list(opt.group_keys())) == len(a)  # optimizer state of every parameter


def test_uncommitted_checkpoint_is_skipped(store: str, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    run_training(1, store, run, 20)
    final = _params(run / "checkpoints/step_00000020")
    (run / "checkpoints/step_00000020/COMMITTED").unlink()  # as if killed before the marker
    with pytest.warns(UserWarning, match="no commit marker"):
        from runtime.checkpoint import resolve_resume

        assert resolve_resume("auto", run).name == "step_00000010"
    run_training(1, store, run, 20, ["run.resume=auto"])
    again = _params(run / "checkpoints/step_00000020")
    assert all(np.array_equal(final[n], again[n]) for n in final)


def test_refusals_are_one_line_and_write_nothing(store: str, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    run_training(1, store, run, 10)
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
    run_training(1, store, run, 10)
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


# -- integrity (issue 15): a damaged checkpoint is refused in one line, nothing is written --------------
@pytest.fixture(scope="module")
def committed_run(store: str, tmp_path_factory):
    """A finished run with checkpoints at steps 10 and 20 (one process); tests corrupt copies of it."""
    run = tmp_path_factory.mktemp("committed") / "run"
    run_training(1, store, run, 20)
    return run


def _copy(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def _snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _edit_json(file, edit) -> None:
    data = json.loads(file.read_text())
    edit(data)
    file.write_text(json.dumps(data))


def _truncate(file) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def _drop_from_marker(ckpt, name: str) -> None:
    shutil.rmtree(ckpt / name)
    _edit_json(ckpt / "COMMITTED", lambda m: m["arrays"].pop(name))


def _change_a_value(ckpt) -> None:
    arr = zarr.open_array(str(ckpt / "model/embed.weight"), mode="r+")
    arr[0, 0] = arr[0, 0] + 1.0  # decodes fine, digest differs


EMBED = "model/embed.weight"
CORRUPTIONS = {  # name: (how, words the one-line error must hold)
    "missing chunk": (lambda c: (c / EMBED / "c/0/0").unlink(), [EMBED, "missing its chunk"]),
    "truncated chunk": (lambda c: _truncate(c / EMBED / "c/0/0"), [EMBED, "cannot be decoded"]),
    "changed bytes": (_change_a_value, [EMBED, "does not match its digest"]),
    "missing optimizer array": (lambda c: shutil.rmtree(c / "optim/embed.weight/exp_avg"),
                                ["optim/embed.weight/exp_avg", "missing"]),
    "optimizer array missing from the marker too": (
        lambda c: _drop_from_marker(c, "optim/embed.weight/exp_avg_sq"),
        ["optimizer state exp_avg_sq of parameter embed.weight is missing"]),
    "parameter missing from the marker too": (lambda c: _drop_from_marker(c, "model/norm.weight"),
                                              ["parameter norm.weight is missing"]),
    "truncated array zarr.json": (lambda c: _truncate(c / EMBED / "zarr.json"),
                                  [f"{EMBED}/zarr.json is not valid JSON"]),
    "truncated group zarr.json": (lambda c: _truncate(c / "zarr.json"), ["step_00000020/zarr.json is not valid JSON"]),
    "missing config attribute": (lambda c: _edit_json(c / "zarr.json", lambda m: m["attributes"].pop("config")),
                                 ["has no config attribute"]),
    "bad config attribute": (lambda c: _edit_json(c / "zarr.json", lambda m: m["attributes"].update(config=[1])),
                             ["config attribute has no model section"]),
    "truncated marker": (lambda c: _truncate(c / "COMMITTED"), ["COMMITTED is not valid JSON"]),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_damaged_checkpoint_is_refused(case: str, committed_run, store: str, tmp_path, capsys) -> None:
    from models import LinearLlama
    from runtime.checkpoint import load_checkpoint
    from runtime.errors import ConfigError

    run = _copy(committed_run, tmp_path)
    ckpt = run / "checkpoints/step_00000020"
    how, needles = CORRUPTIONS[case]
    how(ckpt)
    before = _snapshot(run)
    output = tmp_path / "export" / "m.safetensors"
    common = ["--nproc", "1", "--set", *run_overrides(1, store, run, 30)]
    for argv in (["train", "--resume", str(ckpt), *common], ["export", str(ckpt), "--output", str(output)],
                 ["verify", str(ckpt)]):
        assert main(argv) == 2, argv
        one_line_error(capsys, *needles)
    assert _snapshot(run) == before  # metrics and checkpoints untouched
    assert not output.parent.exists()
    # the trainer's own load path refuses before it modifies anything
    cfg = load_config(None, run_overrides(1, store, run, 30))
    model = LinearLlama(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError) as refused:
        load_checkpoint(ckpt, model=model, optimizer=optimizer, config=cfg.to_dict())
    assert "\n" not in str(refused.value)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items()) and not optimizer.state


def test_resume_auto_skips_a_damaged_newest_checkpoint(committed_run, store: str, tmp_path, capsys) -> None:
    from runtime.checkpoint import check_resume
    from runtime.errors import ConfigError

    run = _copy(committed_run, tmp_path)
    newest = run / "checkpoints/step_00000020"
    final = _params(newest)
    _truncate(newest / EMBED / "c/0/0")
    cfg = load_config(None, run_overrides(1, store, run, 20)).to_dict()
    assert check_resume("auto", run, cfg).name == "step_00000010"
    err = capsys.readouterr().err
    assert err.startswith(f"longtrain: warning: skipped checkpoint {newest}: ") and err.count("\n") == 1, err
    assert "cannot be decoded" in err
    run_training(1, store, run, 20, ["run.resume=auto"])  # the trainer takes step 10 too and writes step 20 again
    again = _params(newest)
    assert final.keys() == again.keys() and all(np.array_equal(final[n], again[n]) for n in final)
    for ckpt in (run / "checkpoints").iterdir():
        (ckpt / EMBED / "c/0/0").unlink()
    with pytest.raises(ConfigError, match="none of the 2 committed checkpoints"):
        check_resume("auto", run, cfg)
    assert capsys.readouterr().err.count("longtrain: warning: skipped checkpoint") == 2


def _bump_next_token(store) -> None:
    arr = zarr.open_array(str(store / "next_token"), mode="r+")
    arr[5, 0] = (arr[5, 0] + 1) % 256


def test_verify_command(committed_run, store: str, tmp_path, capsys) -> None:
    ckpt = committed_run / "checkpoints/step_00000010"
    assert main(["verify", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert re.fullmatch(rf"longtrain: {re.escape(str(ckpt))} ok \(\d+ arrays, \d+\.\d MiB verified\)\n", out), out
    assert main(["verify", store]) == 0
    out = capsys.readouterr().out
    assert re.fullmatch(rf"longtrain: {re.escape(store)} ok \(2 arrays, \d+\.\d MiB verified\)\n", out), out
    bad = {
        "missing chunk": (lambda s: (s / "tokens/c/3/1").unlink(), "tokens is missing its chunk c/3/1"),
        "truncated chunk": (lambda s: _truncate(s / "tokens/c/3/1"), "chunk c/3/1 is truncated or damaged"),
        "row count": (lambda s: _edit_json(s / "zarr.json", lambda m: m["attributes"].update(sequences=9)),
                      "is not sequences × seq_len"),
        "next token": (_bump_next_token, "next_token of rows 0-"),
        "format": (lambda s: _edit_json(s / "zarr.json", lambda m: m["attributes"].update(format="x")),
                   "format attribute"),
    }
    for i, (how, needle) in enumerate(bad.values()):
        copy = tmp_path / f"s{i}.zarr"
        shutil.copytree(store, copy)
        how(copy)
        assert main(["verify", str(copy)]) == 2
        one_line_error(capsys, needle, "re-create it with `longtrain prepare-data`")
    run = _copy(committed_run, tmp_path)
    extra, stray = run / "checkpoints/step_00000010", run / "checkpoints/step_00000020"
    shutil.copytree(extra / EMBED, extra / "model/extra")
    shutil.copytree(stray / "rng/rank_0/torch", stray / "rng/rank_5/torch")  # listed, as a forger would
    _edit_json(stray / "COMMITTED", lambda m: m["arrays"].update({"rng/rank_5/torch": m["arrays"]["rng/rank_0/torch"]}))
    for path, needle in ((tmp_path / "nope", "does not exist"), (tmp_path, "neither a committed checkpoint"),
                         (extra, "array model/extra is not listed in COMMITTED"),
                         (stray, "rng/rank_5/torch is not an RNG state of this checkpoint's 1 ranks")):
        assert main(["verify", str(path)]) == 2
        one_line_error(capsys, needle)


def test_export_output_errors_are_one_line(committed_run, tmp_path, capsys, monkeypatch) -> None:
    import safetensors.numpy

    ckpt = str(committed_run / "checkpoints/step_00000010")
    (tmp_path / "file").write_text("x")
    cases = [(tmp_path / "file" / "m.safetensors", "is a file, not a folder"), (tmp_path, "is a folder")]
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "ro").mkdir(mode=0o500)
        cases.append((tmp_path / "ro" / "m.safetensors", "cannot write --output"))
    for output, needle in cases:
        assert main(["export", ckpt, "--output", str(output)]) == 2
        one_line_error(capsys, needle)

    def fail_midway(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", fail_midway)
    output = tmp_path / "out" / "m.safetensors"
    assert main(["export", ckpt, "--output", str(output)]) == 2
    one_line_error(capsys, "No space left on device")
    assert list(output.parent.iterdir()) == []  # the .partial is gone
