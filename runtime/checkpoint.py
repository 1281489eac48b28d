"""Sharded zarr checkpoints (DESIGN §7) with a commit marker and exact resume.

    <run.dir>/checkpoints/step_00000100/          a zarr group
        model/<parameter name>                    written by the (dp=0, sp=0) rank of the owning pp stage
        optim/<parameter name>/{exp_avg, exp_avg_sq, step}      likewise
        rng/rank_<r>                              every rank its own RNG states
        attrs: step, config, data cursor, world layout      written by rank 0
        COMMITTED                                 written last by rank 0, after a barrier

No two processes ever write one array (one chunk object); a checkpoint without its marker is
ignored on resume. Parameter names are global (the pipeline keeps global layer indices), so
a checkpoint does not depend on which stage wrote which array.
"""

from __future__ import annotations

import json
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from runtime.errors import ConfigError

MARKER = "COMMITTED"
_NAME = re.compile(r"^step_(\d+)$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path, warn: bool = True) -> list[Path]:
    """Committed checkpoints of a run, oldest first; uncommitted ones are skipped with a warning."""
    root = checkpoint_dir(run_dir)
    found = []
    for path in sorted(root.glob("step_*")) if root.exists() else []:
        if not _NAME.match(path.name):
            continue
        if (path / MARKER).exists():
            found.append(path)
        elif warn:
            warnings.warn(f"ignoring checkpoint {path}: it has no commit marker (the run stopped while writing it)",
                          stacklevel=2)
    return found


def resolve_resume(resume: str | None, run_dir: str | Path, warn: bool = True) -> Path | None:
    """`auto` → newest committed checkpoint of run_dir (None if there is none); a path → that checkpoint."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir, warn=warn)
        return found[-1] if found else None
    path = Path(resume)
    if not path.exists():
        raise ConfigError(f"checkpoint {resume!r} does not exist; pass a step_* folder or --resume auto")
    if not (path / MARKER).exists():
        raise ConfigError(f"checkpoint {resume!r} has no commit marker (it was never completed); pick an older one")
    return path


def _rng_state() -> bytes:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return pickle.dumps(state)


def _set_rng_state(blob: bytes) -> None:
    state = pickle.loads(blob)
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_array(group, name: str, t: torch.Tensor) -> None:
    data = t.detach().cpu()
    if data.dtype == torch.bfloat16:
        data = data.float()
    arr = group.create_array(name, shape=tuple(data.shape), dtype=data.numpy().dtype, chunks=tuple(data.shape))
    arr[...] = data.numpy()


def save_checkpoint(path: Path, *, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    config: dict, cursor: dict, writes_params: bool, keep: int | None = None) -> None:
    """Collective: every rank calls it. Rank 0 creates the group and commits; see module docstring."""
    import zarr

    rank = dist.get_rank()
    tmp_marker = path / MARKER
    if rank == 0:
        if path.exists():  # a leftover without marker from a crashed attempt at this step
            shutil.rmtree(path)
        root = zarr.open_group(str(path), mode="w")
        for sub in ("model", "optim", "rng"):
            root.create_group(sub)
    dist.barrier()
    root = zarr.open_group(str(path), mode="r+")
    if writes_params:
        names = {id(p): n for n, p in model.named_parameters()}
        for name, p in model.named_parameters():
            _write_array(root["model"], name, p)
        for p, state in optimizer.state.items():
            sub = root["optim"].create_group(names[id(p)])
            for key, value in state.items():
                _write_array(sub, key, value if torch.is_tensor(value) else torch.tensor(value))
    blob = np.frombuffer(_rng_state(), dtype=np.uint8)
    arr = root["rng"].create_array(f"rank_{rank}", shape=blob.shape, dtype=np.uint8, chunks=blob.shape)
    arr[...] = blob
    dist.barrier()
    if rank == 0:
        root.attrs.update({"step": step, "config": json.loads(json.dumps(config)), "cursor": cursor,
                           "world_size": dist.get_world_size()})
        tmp_marker.write_text(json.dumps({"step": step}))
        if keep:
            for old in list_checkpoints(path.parent.parent, warn=False)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def _model_shape(config: dict) -> dict:
    keys = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "layout", "gate", "short_conv",
            "tie_embeddings", "decay")
    return {k: config["model"].get(k) for k in keys}


def check_resume(resume: str | None, run_dir: str | Path, config: dict) -> Path | None:
    """Before processes start: the checkpoint a run would resume from, refused (one line) when it
    holds another model shape."""
    path = resolve_resume(resume, run_dir)
    if path is not None:
        import zarr

        _check_shape(path, dict(zarr.open_group(str(path), mode="r").attrs)["config"], config)
    return path


def _check_shape(path: Path, saved_config: dict, config: dict) -> None:
    saved, wanted = _model_shape(saved_config), _model_shape(config)
    if saved != wanted:
        diff = {k: (saved[k], wanted[k]) for k in saved if saved[k] != wanted[k]}
        raise ConfigError(f"checkpoint {path} is of another model shape {diff} (saved, configured); "
                          f"resume with the matching model.* settings or start a new run.dir")


def load_checkpoint(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    config: dict) -> dict:
    """Restore this rank's parameters, optimizer state and RNG; returns the checkpoint's attrs.
    A checkpoint of another model shape is refused with a one-line ConfigError."""
    import zarr

    root = zarr.open_group(str(path), mode="r")
    attrs = dict(root.attrs)
    _check_shape(path, attrs["config"], config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.from_numpy(root["model"][name][...]))
        state_by_param = {}
        for name, p in model.named_parameters():
            group = root["optim"][name] if name in root["optim"] else None
            if group is None:
                continue
            state_by_param[p] = {
                key: torch.from_numpy(np.asarray(group[key][...])).to(
                    p.device if key != "step" else torch.device("cpu"))
                for key in group.array_keys()
            }
    for p, state in state_by_param.items():
        if "step" in state:
            state["step"] = state["step"].to(torch.float32)
        optimizer.state[p] = state
    rank = dist.get_rank()
    rng = root["rng"]
    if f"rank_{rank}" in rng and attrs.get("world_size") == dist.get_world_size():
        _set_rng_state(bytes(rng[f"rank_{rank}"][...]))
    return attrs


def export_safetensors(path: str | Path, output: str | Path) -> int:
    """Consolidated weights of a committed checkpoint → one safetensors file; returns the tensor count.
    A tied head is stored once, as embed.weight (the Hugging Face convention)."""
    import zarr
    from safetensors.numpy import save_file

    path = Path(path)
    if not (path / MARKER).exists():
        raise ConfigError(f"{str(path)!r} is not a committed checkpoint (no {MARKER} marker); pass a step_* folder")
    root = zarr.open_group(str(path), mode="r")
    tied = dict(root.attrs)["config"]["model"].get("tie_embeddings", False)
    tensors = {}
    for name, arr in root["model"].arrays():
        if tied and name == "head.weight":
            continue
        tensors[name] = np.ascontiguousarray(arr[...])
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".partial")
    save_file(tensors, str(tmp), metadata={"format": "pt", "source": str(path)})
    tmp.replace(output)
    return len(tensors)
