"""Sharded zarr checkpoints (DESIGN §7): save, load and resume, with a commit protocol.

    <run.dir>/checkpoints/step_00000100/          a zarr group of uncompressed arrays
        model/<parameter name>                    the whole parameter, one array
        optim/<parameter name>/{exp_avg, exp_avg_sq, step}      its AdamW state
        rng/rank_<r>/{torch, cuda, numpy_key, python_state}     every rank its own RNG states (runtime/rng_state.py)
        attrs: step, config, data cursor, world layout, optimizer   written by rank 0
        COMMITTED                                 written last by rank 0, after a barrier: every
                                                  array's path, digest, shape and dtype

Replicated state (parallel.shard=none) is written by the (dp=0, sp=0) rank of the owning pp stage, one
chunk per array (dim-0 chunks of 64 MiB for larger ones, each with its digest). Sharded state (FSDP2
DTensors, dim-0 shards over the stage's dp × sp ranks) keeps the same arrays, chunked on dim 0 as the
shards are: that rank creates the array, then every rank of the stage writes the chunk of its own rows
and reports the chunk's digest (nothing is gathered to one rank). A reader takes the rows of its own
shard — whatever sharding, or none, wrote them — so a checkpoint resumes at any (dp, pp, sp, shard). No
two processes ever write one chunk object; a checkpoint without its marker is ignored on resume. Saving
(synchronous, or with the write in a background thread) is runtime/checkpoint_writer.py's; a load reads
its arrays in parallel threads. Parameter names are global (the pipeline keeps global layer indices), so
a checkpoint does not depend on which stage wrote which array (a tied head missing from a one-stage
checkpoint is read from the embedding).

Resume, export and `longtrain verify` check what they read (runtime/integrity.py: presence, digests,
allow-listed metadata) before anything is modified or written; nothing read is unpickled, except by
`_legacy_rng_state`, for checkpoints of the old format, reached only under --trust-checkpoint.
"""

from __future__ import annotations

import contextlib
import random
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from parallel.sharding import is_sharded, local, local_rows
from runtime.checkpoint_writer import save_checkpoint
from runtime.errors import ConfigError
from runtime.host_copy import copy_tensor
from runtime.integrity import (
    MARKER,
    UntrustedCheckpoint,
    Verified,
    array_digest,
    array_meta,
    checkpoint_error,
    one_line,
    parallel_map,
    read_marker,
    read_verified,
    refuse_untrusted,
    required_optimizer_state,
    root_attrs,
    verify_checkpoint,
)
from runtime.rng_state import RNG_KEYS, RNG_REQUIRED, parse_rng_state, set_rng_state

__all__ = ["MARKER", "UntrustedCheckpoint", "Verified", "array_digest", "check_resume", "checkpoint_dir",
           "export_safetensors", "list_checkpoints", "load_checkpoint", "resolve_resume", "save_checkpoint",
           "verify_checkpoint", "verify_path"]

READ_THREADS = 16  # arrays read, verified and (optimizer state) moved to the device at a time, per rank
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


def resolve_resume(resume: str | None, run_dir: str | Path, warn: bool = True, *,
                   trust: bool = False) -> Path | None:
    """`auto` → newest committed checkpoint of run_dir that verifies (None if there is none; each
    newer one that fails is skipped with a warning line on stderr); a path → that checkpoint
    (verified when it is loaded)."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir, warn=warn)
        for path in reversed(found):
            try:
                verify_checkpoint(path, trust=trust)
                return path
            except UntrustedCheckpoint:
                raise
            except ConfigError as e:
                if warn:
                    print(f"longtrain: warning: skipped checkpoint {path}: {e}", file=sys.stderr, flush=True)
        if found:
            raise ConfigError(f"none of the {len(found)} committed checkpoints of {run_dir} verifies; "
                              f"start a new run.dir or repair the newest one")
        return None
    path = Path(resume)
    if not path.exists():
        raise ConfigError(f"checkpoint {resume!r} does not exist; pass a step_* folder or --resume auto")
    if not (path / MARKER).exists():
        raise ConfigError(f"checkpoint {resume!r} has no commit marker (it was never completed); pick an older one")
    return path


# -- the model shape -----------------------------------------------------------------------------
def _model_shape(config: dict) -> dict:
    keys = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "layout", "gate", "short_conv",
            "tie_embeddings", "decay")
    return {k: config["model"].get(k) for k in keys}


def _check_shape(path: Path, saved_config: dict, config: dict) -> None:
    saved, wanted = _model_shape(saved_config), _model_shape(config)
    if saved != wanted:
        diff = {k: (saved[k], wanted[k]) for k in saved if saved[k] != wanted[k]}
        raise ConfigError(f"checkpoint {path} is of another model shape {diff} (saved, configured); "
                          f"resume with the matching model.* settings or start a new run.dir")


# -- writing: runtime/checkpoint_writer.py ----------------------------------------------------------
def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


# -- reading -----------------------------------------------------------------------------------
def check_resume(resume: str | None, run_dir: str | Path, config: dict, *, trust: bool = False) -> Path | None:
    """Before processes start: the checkpoint a run would resume from, verified in full, refused
    (one line) when it is damaged, untrusted, or holds another model shape."""
    path = resolve_resume(resume, run_dir, trust=trust)  # `auto` verified it already
    if path is not None:
        attrs = verify_checkpoint(path, trust=trust).attrs if resume != "auto" else root_attrs(path)
        _check_shape(path, attrs["config"], config)
    return path


def load_checkpoint(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    config: dict, trust: bool = False) -> dict:
    """Restore this rank's parameters, optimizer state and RNG; returns the checkpoint's attrs.

    Everything this rank reads is checked first (presence, digests against the marker, shapes, RNG
    fields); only then is anything modified. A checkpoint of another model shape, a damaged one, or an
    old-format one without `trust` is refused with a one-line ConfigError."""
    path = Path(path)
    fail = lambda what: checkpoint_error(path, what)
    marker = read_marker(path)
    refuse_untrusted(path, marker, trust)
    attrs = root_attrs(path)
    _check_shape(path, attrs["config"], config)
    if marker["legacy"]:
        return _load_legacy(path, attrs, model, optimizer)
    listed = marker["arrays"]
    rank, world = _rank_world()
    required = required_optimizer_state(attrs, optimizer)

    def read(name: str, rows: tuple[int, int] | None = None, shape: list[int] | None = None):
        if name not in listed:
            raise fail(f"array {name} is missing (not listed in {MARKER})")
        meta = array_meta(path / name / "zarr.json", fail)
        if shape is not None and meta["shape"] != shape:
            what = f"optimizer state {name}" if name.startswith("optim/") else f"parameter {name[len('model/'):]}"
            raise fail(f"{what} has shape {meta['shape']}, the model {shape}")
        return read_verified(path, name, meta, listed[name], rows), meta.get("attributes", {})

    tied = config["model"].get("tie_embeddings")
    wanted: dict[tuple, tuple] = {}  # what to read: (parameter, optimizer key or None) → read()'s arguments
    for name, p in model.named_parameters():
        # a one-stage checkpoint holds a tied head only as the embedding
        source = "embed.weight" if name == "head.weight" and tied and "model/head.weight" not in listed else name
        rows = local_rows(p) if is_sharded(p) else None  # this rank's shard: only its rows are read
        wanted[name, None] = (f"model/{source}", rows, list(p.shape))
        keys = sorted({n.rsplit("/", 1)[1] for n in listed if n.startswith(f"optim/{source}/")} | set(required))
        for key in keys:
            wanted[name, key] = (f"optim/{source}/{key}", *((None, None) if key == "step" else (rows, list(p.shape))))
    rng = None
    prefix = f"rng/rank_{rank}"
    if attrs["world_size"] == world:
        for k in RNG_KEYS:
            if k in RNG_REQUIRED or f"{prefix}/{k}" in listed:
                wanted[prefix, k] = (f"{prefix}/{k}",)
    parameters = dict(model.named_parameters())
    on_device = any(optimizer.defaults.get(k) for k in ("fused", "capturable"))

    def read_one(item: tuple[tuple, tuple]):
        """Read and verify one array; optimizer state becomes its tensor here, in the reader threads (the
        host-to-device copies overlap the other threads' reads; nothing the model holds is modified)."""
        (name, key), args = item
        data, attrs = read(*args)
        if key is None or name == prefix:
            return data, attrs
        p = parameters[name]
        if key == "step":  # AdamW keeps it on the parameter's device when fused or capturable, as its own loader
            return torch.from_numpy(data).to(p.device if on_device else "cpu", torch.float32), attrs
        return _state_like(p, data), attrs

    read_all = dict(zip(wanted, parallel_map(read_one, wanted.items(), threads=READ_THREADS)))  # in threads
    params = {name: data for (name, key), (data, _) in read_all.items() if key is None}
    states = {name: {} for name in params}
    for (name, key), (data, _) in read_all.items():
        if key is not None and name != prefix:
            states[name][key] = data
    if attrs["world_size"] == world:
        parts = {k: v for (name, k), v in read_all.items() if name == prefix}
        rng = parse_rng_state({k: v[0] for k, v in parts.items()}, {k: v[1] for k, v in parts.items()},
                              lambda what: fail(f"{prefix}: {what}"))
    # all verified: now modify
    with torch.no_grad():
        for name, p in model.named_parameters():
            copy_tensor(local(p), torch.from_numpy(params[name]))
    for name, p in model.named_parameters():
        if states[name]:
            optimizer.state[p] = states[name]
    if rng is not None:
        set_rng_state(rng)
    return attrs


def _state_like(p: torch.Tensor, value: np.ndarray) -> torch.Tensor:
    """Optimizer state for parameter `p` from this rank's rows `value`: sharded as `p` is (its dtype), else
    a tensor on p's device in the stored dtype."""
    if not is_sharded(p):
        return torch.from_numpy(value).to(p.device)
    state = torch.zeros_like(p)
    copy_tensor(local(state), torch.from_numpy(value))
    return state


def _load_legacy(path: Path, attrs: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The old loader, for an old-format checkpoint the user trusts (--trust-checkpoint)."""
    import zarr

    root = zarr.open_group(str(path), mode="r")
    rows = {name: slice(*local_rows(p)) if is_sharded(p) else slice(None) for name, p in model.named_parameters()}
    with torch.no_grad():
        for name, p in model.named_parameters():
            local(p).copy_(torch.from_numpy(root["model"][name][rows[name]]))
        state_by_param = {}
        for name, p in model.named_parameters():
            if name not in root["optim"]:
                continue
            group = root["optim"][name]
            state_by_param[p] = {key: torch.from_numpy(np.asarray(group[key][...])) if key == "step"
                                 else _state_like(p, np.asarray(group[key][rows[name]])) for key in group.array_keys()}
    for p, state in state_by_param.items():
        if "step" in state:
            state["step"] = state["step"].to(torch.float32)
        optimizer.state[p] = state
    rank, world = _rank_world()
    if f"rank_{rank}" in root["rng"] and attrs.get("world_size") == world:
        _legacy_rng_state(bytes(root["rng"][f"rank_{rank}"][...]))
    return attrs


def _legacy_rng_state(blob: bytes) -> None:
    """Old-format checkpoints only, and only under --trust-checkpoint: their RNG states are a pickle.
    This is the one place in longtrain that unpickles; it is reached only when the user vouches for
    the file, because unpickling runs whatever code the file names."""
    import pickle

    state = pickle.loads(blob)
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def export_safetensors(path: str | Path, output: str | Path, *, trust: bool = False) -> int:
    """Consolidated weights of a committed checkpoint → one safetensors file; returns the tensor count.
    A tied head is stored once, as embed.weight (the Hugging Face convention). The whole checkpoint
    is verified first: a damaged one writes nothing."""
    from safetensors.numpy import save_file

    path, output = Path(path), Path(output)
    if not (path / MARKER).exists():
        raise ConfigError(f"{str(path)!r} is not a committed checkpoint (no {MARKER} marker); pass a step_* folder")
    if not path.is_dir():
        raise ConfigError(f"{str(path)!r} is not a checkpoint folder")
    if output.is_dir():
        raise ConfigError(f"--output {output} is a folder; pass a file path such as {output / 'model.safetensors'}")
    blocker = next((p for p in output.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ConfigError(f"cannot write --output {output}: {blocker} is a file, not a folder; pass another path")
    checked = verify_checkpoint(path, trust=trust, keep=lambda name: name.startswith("model/"))
    tied = checked.attrs["config"]["model"].get("tie_embeddings", False)
    tensors = {name[len("model/"):]: np.ascontiguousarray(data) for name, data in sorted(checked.kept.items())
               if not (tied and name == "model/head.weight")}
    tmp = output.with_name(output.name + ".partial")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp), metadata={"format": "pt", "source": str(path)})
        tmp.replace(output)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if not isinstance(e, Exception):
            raise
        raise ConfigError(f"cannot write --output {output} ({one_line(e)}); "
                          f"pass a path in a writable folder") from None
    return len(tensors)


# -- `longtrain verify` ------------------------------------------------------------------------
def verify_path(path: str | Path, *, trust: bool = False) -> tuple[str, Verified]:
    """("checkpoint" | "token store", what was verified) for `longtrain verify PATH`."""
    from runtime.data import verify_token_store  # here: runtime.data imports pyarrow, which launchers need not

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{str(path)!r} does not exist; pass a checkpoint (a step_* folder) or a token store")
    if (p / MARKER).exists():
        return "checkpoint", verify_checkpoint(p, trust=trust)
    if (p / "tokens").is_dir():
        return "token store", verify_token_store(p)
    if _NAME.match(p.name) or (p / "rng").is_dir():
        raise ConfigError(f"checkpoint {path} has no commit marker (it was never completed); pick an older one")
    raise ConfigError(f"{str(path)!r} is neither a committed checkpoint (no {MARKER}) nor a token store "
                      f"(no tokens array)")
