"""Issue 23: resuming, exporting or verifying a checkpoint never runs code from it.

The exploit is a pickle whose __reduce__ runs a shell command, planted where the old format kept
each rank's RNG states (rng/rank_0) in a real committed checkpoint.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from helpers import one_line_error, run_overrides, run_training

from launch.cli import main
from models import LinearLlama
from runtime.checkpoint import check_resume, load_checkpoint, save_checkpoint
from runtime.config import load_config
from runtime.errors import ConfigError

ROOT = Path(__file__).parents[2]


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def committed(store: str, tmp_path_factory) -> Path:  # noqa: F811
    run = tmp_path_factory.mktemp("secure") / "run"
    run_training(1, store, run, 10)
    return run


def _plant_rng_pickle(ckpt: Path, blob: bytes) -> None:
    """rng/rank_0 as the old format had it: a uint8 array of pickle bytes."""
    shutil.rmtree(ckpt / "rng/rank_0")
    data = np.frombuffer(blob, dtype=np.uint8)
    arr = zarr.open_group(str(ckpt / "rng"), mode="r+").create_array("rank_0", shape=data.shape, dtype=np.uint8,
                                                                     chunks=data.shape)
    arr[...] = data


def _marker(ckpt: Path, edit) -> None:
    marker = json.loads((ckpt / "COMMITTED").read_text())
    (ckpt / "COMMITTED").write_text(json.dumps(edit(marker)))


def _forge_listing(marker: dict, ckpt: Path) -> dict:
    """A forger who also rewrites the marker so it lists the planted array with its true digest."""
    from runtime.checkpoint import array_digest

    arrays = {k: v for k, v in marker["arrays"].items() if not k.startswith("rng/rank_0/")}
    data = zarr.open_array(str(ckpt / "rng/rank_0"), mode="r")[...]
    arrays["rng/rank_0"] = {"digest": array_digest(data), "shape": list(data.shape), "dtype": "uint8"}
    return {**marker, "arrays": arrays}


VARIANTS = {
    # marker as written: the planted array replaces the listed RNG arrays
    "marker untouched": lambda marker, ckpt: marker,
    # marker of the old format: refused unless the user vouches for the file
    "old-format marker": lambda marker, ckpt: {"step": marker["step"]},
    # marker forged to list the planted array (digest and all)
    "forged marker": _forge_listing,
}


def test_the_payload_is_live(tmp_path) -> None:
    """The planted bytes would run the command if anything unpickled them."""
    canary = tmp_path / "canary"
    pickle.loads(pickle.dumps(_Exploit(canary)))
    assert canary.exists()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_crafted_pickle_never_runs(variant: str, committed: Path, store: str, tmp_path, capsys) -> None:  # noqa: F811
    pwned = tmp_path / "PWNED"
    run = tmp_path / "run"
    shutil.copytree(committed, run)
    ckpt = run / "checkpoints/step_00000010"
    _plant_rng_pickle(ckpt, pickle.dumps(_Exploit(pwned)))
    _marker(ckpt, lambda m: VARIANTS[variant](m, ckpt))
    old = variant == "old-format marker"
    needle = "--trust-checkpoint" if old else "step_00000010"
    output = tmp_path / "out" / "m.safetensors"
    train = ["train", "--nproc", "1", "--set", *run_overrides(1, store, run, 20)]
    for argv in ([*train, "--resume", str(ckpt)], ["export", str(ckpt), "--output", str(output)],
                 ["verify", str(ckpt)]):
        assert main(argv) == 2, argv
        one_line_error(capsys, needle)
    assert main([*train, "--resume", "auto"]) == 2
    err = capsys.readouterr().err.splitlines()
    if old:  # an old-format checkpoint is not skipped for an older one: the user must decide
        assert len(err) == 1 and "--trust-checkpoint" in err[0], err
    else:
        assert err[0].startswith(f"longtrain: warning: skipped checkpoint {ckpt}: ") and len(err) == 2, err
        assert err[1].startswith("longtrain: error: none of the 1 committed checkpoints")
    assert not output.exists() and not output.parent.exists()
    cfg = load_config(None, run_overrides(1, store, run, 20))
    model = LinearLlama(cfg.model)
    # the trainer's load path; a new-format marker is never unpickled, even when the user trusts the file
    for trust in (False,) if old else (False, True):
        with pytest.raises(ConfigError) as refused:
            load_checkpoint(ckpt, model=model, optimizer=torch.optim.AdamW(model.parameters()),
                            config=cfg.to_dict(), trust=trust)
        assert "\n" not in str(refused.value) and needle in str(refused.value)
    assert not pwned.exists()


def test_old_checkpoint_loads_only_when_trusted(committed: Path, store: str, tmp_path, capsys) -> None:  # noqa: F811
    run = tmp_path / "run"
    shutil.copytree(committed, run)
    ckpt = run / "checkpoints/step_00000010"
    torch.manual_seed(5)
    np.random.seed(6)
    random.seed(7)
    saved = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    expected = (torch.rand(4), np.random.rand(4), random.random())
    _plant_rng_pickle(ckpt, pickle.dumps(saved))  # exactly what the old save wrote
    _marker(ckpt, lambda m: {"step": m["step"]})
    cfg = load_config(None, run_overrides(1, store, run, 20))
    for argv in (["export", str(ckpt), "--output", str(tmp_path / "m.safetensors")], ["verify", str(ckpt)]):
        assert main(argv) == 2
        one_line_error(capsys, "old format", "--trust-checkpoint")
        assert main([*argv, "--trust-checkpoint"]) == 0
    assert (tmp_path / "m.safetensors").exists()
    with pytest.raises(ConfigError, match="--trust-checkpoint"):
        check_resume(str(ckpt), run, cfg.to_dict())
    assert check_resume(str(ckpt), run, cfg.to_dict(), trust=True) == ckpt
    model = LinearLlama(cfg.model)
    load_checkpoint(ckpt, model=model, optimizer=torch.optim.AdamW(model.parameters()), config=cfg.to_dict(),
                    trust=True)
    assert torch.equal(torch.rand(4), expected[0]) and np.array_equal(np.random.rand(4), expected[1])
    assert random.random() == expected[2]


# -- RNG states without pickle ----------------------------------------------------------------------
def _draws() -> tuple:
    out = (torch.rand(5), torch.randn(3), np.random.rand(5), np.random.standard_normal(3), random.random(),
           random.gauss(0.0, 1.0), random.getrandbits(64))
    if torch.cuda.is_available():
        out += (torch.rand(5, device="cuda").cpu(),)
    return out


def _same(a: tuple, b: tuple) -> bool:
    return all(torch.equal(x, y) if torch.is_tensor(x) else np.array_equal(x, y) for x, y in zip(a, b))


def _tiny_checkpoint(tmp_path) -> tuple[Path, dict, tuple]:
    """A checkpoint saved in this process after odd numbers of gaussian draws (cached values on both
    numpy's and Python's generators); returns it, the config and the draws that followed the save."""
    cfg = load_config(None, ["model.vocab_size=257"])
    torch.manual_seed(1)
    model = LinearLlama(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, 257, (2, 16))).sum().backward()
    optimizer.step()
    np.random.seed(2)
    np.random.standard_normal()  # leaves has_gauss = 1
    random.seed(3)
    random.gauss(0.0, 1.0)  # leaves gauss_next set
    path = tmp_path / "run/checkpoints/step_00000001"
    save_checkpoint(path, step=1, model=model, optimizer=optimizer, config=cfg.to_dict(), cursor={"step": 1},
                    writes_params=True)
    return path, cfg.to_dict(), _draws()


def _loader(path: Path, config: dict):
    """load_checkpoint of a fresh model, built now (its initialisation draws from the global RNG)."""
    from models import ModelConfig

    model = LinearLlama(ModelConfig(**config["model"]))
    optimizer = torch.optim.AdamW(model.parameters())
    return lambda: load_checkpoint(path, model=model, optimizer=optimizer, config=config)


def test_rng_round_trip_is_exact(tmp_path) -> None:
    path, config, after_save = _tiny_checkpoint(tmp_path)
    groups = zarr.open_group(str(path / "rng/rank_0"), mode="r")
    assert {name: arr.dtype for name, arr in groups.arrays()} == {
        "torch": np.uint8, "numpy_key": np.uint32, "python_state": np.uint32,
        **({"cuda": np.uint8} if torch.cuda.is_available() else {})}
    load = _loader(path, config)
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    load()
    assert _same(_draws(), after_save)


def _set_attr(name: str, **values):
    def edit(path: Path) -> None:
        zarr.open_array(str(path / "rng/rank_0" / name), mode="r+").attrs.update(values)
    return edit


def _replace_array(name: str, data: np.ndarray):
    def edit(path: Path) -> None:
        from runtime.zarr_files import write_array

        shutil.rmtree(path / "rng/rank_0" / name)
        entry = write_array(path / "rng/rank_0" / name, data)
        _marker(path, lambda m: {**m, "arrays": {**m["arrays"], f"rng/rank_0/{name}": entry}})
    return edit


BAD_RNG = {  # consistent marker and digests: only the typed reconstruction can refuse these
    "numpy pos": (_set_attr("numpy_key", pos=625), "numpy_key"),
    "numpy algorithm": (_set_attr("numpy_key", algorithm="PCG64"), "numpy_key"),
    "numpy gauss type": (_set_attr("numpy_key", cached_gaussian="0.5"), "numpy_key"),
    "python version": (_set_attr("python_state", version=2), "python_state"),
    "python gauss": (_set_attr("python_state", gauss_next=[1]), "python_state"),
    "python index": (_replace_array("python_state", np.full(625, 700, np.uint32)), "python_state"),
    "torch size": (_replace_array("torch", np.zeros(16, np.uint8)), "torch"),
    "torch dtype": (_replace_array("torch", np.zeros(5056, np.int16)), "torch"),
}


@pytest.mark.parametrize("case", list(BAD_RNG))
def test_invalid_rng_state_is_refused(case: str, tmp_path) -> None:
    path, config, _ = _tiny_checkpoint(tmp_path)
    edit, name = BAD_RNG[case]
    edit(path)
    load = _loader(path, config)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    with pytest.raises(ConfigError, match=f"RNG state {name} is invalid") as refused:
        load()
    assert "\n" not in str(refused.value)
    after = (torch.get_rng_state(), np.random.get_state()[1], random.getstate())
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]


# -- nothing in the packages deserializes code ---------------------------------------------------------
PACKAGES = ("kernels", "parallel", "models", "runtime", "launch")
ALLOWED = {("runtime/checkpoint.py", "_legacy_rng_state")}  # the --trust-checkpoint legacy path
UNPICKLERS = ("pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib")


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _unsafe(node: ast.AST) -> str | None:
    if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNPICKLERS:
        return f"from {node.module} import"
    if not isinstance(node, ast.Call):
        return None
    name = _dotted(node.func)
    keywords = {k.arg: k.value for k in node.keywords}
    if name.split(".")[0] in UNPICKLERS and name.split(".")[-1] in ("load", "loads", "Unpickler", "open"):
        return name
    if name in ("eval", "exec", "builtins.eval", "builtins.exec"):
        return name
    if name == "torch.load" and not (isinstance(keywords.get("weights_only"), ast.Constant)
                                     and keywords["weights_only"].value is True):
        return "torch.load without weights_only=True"
    if "allow_pickle" in keywords and not (isinstance(keywords["allow_pickle"], ast.Constant)
                                           and keywords["allow_pickle"].value is False):
        return "allow_pickle=True"
    return None


def _function_at(tree: ast.AST, line: int) -> str | None:
    """The innermost function whose source spans `line`."""
    spans = [(n.lineno, n.end_lineno, n.name) for n in ast.walk(tree)
             if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.lineno <= line <= n.end_lineno]
    return max(spans)[2] if spans else None


def unsafe_calls(source: str) -> list[tuple[int, str, str | None]]:
    """(line, what, enclosing function) of every construct that can deserialize or run code: calls found
    in the syntax tree, and the plain-text patterns `pickle.load` and `allow_pickle=True` (comments too)."""
    tree = ast.parse(source)
    found = {(n.lineno, _unsafe(n)) for n in ast.walk(tree) if _unsafe(n)}
    for number, text in enumerate(source.splitlines(), 1):
        found |= {(number, p) for p in ("pickle.load", "allow_pickle=True") if p in text}
    return sorted((line, what, _function_at(tree, line)) for line, what in found)


def test_the_scanner_finds_each_pattern() -> None:
    source = ("import pickle, torch, numpy as np\nfrom pickle import loads\n"
              "def f(b):\n    return pickle.loads(b)\n"
              "torch.load('x')\ntorch.load('x', weights_only=False)\nnp.load('x', allow_pickle=True)\neval('1')\n"
              "torch.load('x', weights_only=True)\nnp.load('x')\nmodel.eval()\nast.literal_eval('1')\n")
    hits = {(line, fn) for line, _, fn in unsafe_calls(source)}
    assert hits == {(2, None), (4, "f"), (5, None), (6, None), (7, None), (8, None)}, hits


def test_no_package_deserializes_code() -> None:
    bad = []
    for package in PACKAGES:
        for file in sorted((ROOT / package).rglob("*.py")):
            rel = file.relative_to(ROOT).as_posix()
            bad += [f"{rel}:{line}: {what}" for line, what, fn in unsafe_calls(file.read_text())
                    if (rel, fn) not in ALLOWED]
    assert not bad, "code-deserializing calls outside the trusted legacy path:\n" + "\n".join(bad)
