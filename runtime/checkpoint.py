"""Sharded zarr checkpoints (DESIGN §7) with a commit marker, content digests and exact resume.

    <run.dir>/checkpoints/step_00000100/          a zarr group
        model/<parameter name>                    written by the (dp=0, sp=0) rank of the owning pp stage
        optim/<parameter name>/{exp_avg, exp_avg_sq, step}      likewise
        rng/rank_<r>/{torch, cuda, numpy_key, python_state}     every rank its own RNG states
        attrs: step, config, data cursor, world layout, optimizer   written by rank 0
        COMMITTED                                 written last by rank 0, after a barrier: every
                                                  array's path, digest, shape and dtype

No two processes ever write one array (one chunk object); a checkpoint without its marker is
ignored on resume. Parameter names are global (the pipeline keeps global layer indices), so
a checkpoint does not depend on which stage wrote which array.

Security (issue 23): nothing read from a checkpoint is ever unpickled or evaluated. RNG states are
plain integer arrays with typed JSON attributes, rebuilt field by field after validation; array
metadata is checked against an allow-list of dtypes and codecs before zarr decodes a chunk. The
only exception is `_legacy_rng_state`, for checkpoints of the old format, reached only when the
user passes --trust-checkpoint.

Integrity (issue 15): every array carries a blake2b digest of its dtype, shape and little-endian
bytes; the marker lists them all. Resume, export and `longtrain verify` check presence (zarr reads
an absent chunk as zeros) and digests of what they read before anything is modified or written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import random
import re
import shutil
import struct
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from runtime.errors import ConfigError

MARKER = "COMMITTED"
FORMAT = "longtrain-checkpoint-v2"
_NAME = re.compile(r"^step_(\d+)$")
_PART = re.compile(r"^[A-Za-z0-9_.\-]+$")
_FIX = "use an older checkpoint (--resume PATH, or auto) or delete this one"
_DTYPES = frozenset({"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                     "float16", "float32", "float64"})
_CODECS = frozenset({"bytes", "zstd", "blosc", "gzip", "crc32c", "transpose"})
# state an optimizer keeps for every parameter once it has stepped (a missing array is refused)
_OPTIMIZER_STATE = {"AdamW": ("exp_avg", "exp_avg_sq", "step"), "Adam": ("exp_avg", "exp_avg_sq", "step")}
_RNG_REQUIRED = ("torch", "numpy_key", "python_state")
_MT_WORDS = 624  # Mersenne Twister state words (numpy's legacy generator and Python's random)


class UntrustedCheckpoint(ConfigError):
    """An old-format checkpoint (pickled RNG state) loaded without --trust-checkpoint."""


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


# -- reading safely ----------------------------------------------------------------------------
def _bad(path: Path, what: str) -> ConfigError:
    return ConfigError(f"checkpoint {path}: {what}; {_FIX}")


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


def _json(file: Path, fail) -> dict:
    """A JSON object from `file`; `fail(what)` builds the error for a missing, unreadable or bad one."""
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise fail(f"{file} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise fail(f"{file} is not valid JSON (half-written? {_one_line(e)})") from None
    if not isinstance(value, dict):
        raise fail(f"{file} does not hold a JSON object")
    return value


def _is_int(x) -> bool:
    return type(x) is int


def _array_meta(file: Path, fail) -> dict:
    """An array's zarr.json, refused unless it is a plain numeric zarr v3 array with allowed codecs
    (so zarr never runs a codec that could deserialize objects)."""
    meta = _json(file, fail)
    shape, codecs = meta.get("shape"), meta.get("codecs")
    chunks = _field(meta, "chunk_grid", "configuration", "chunk_shape")
    ok = (meta.get("zarr_format") == 3 and meta.get("node_type") == "array"
          and meta.get("data_type") in _DTYPES
          and isinstance(shape, list) and all(_is_int(s) and s >= 0 for s in shape)
          and _field(meta, "chunk_grid", "name") == "regular"
          and isinstance(chunks, list) and len(chunks) == len(shape) and all(_is_int(c) and c >= 1 for c in chunks)
          and _field(meta, "chunk_key_encoding", "name") == "default"
          and _field(meta, "chunk_key_encoding", "configuration", "separator") in (None, "/", ".")
          and isinstance(codecs, list) and bool(codecs)
          and all(isinstance(c, dict) and c.get("name") in _CODECS for c in codecs)
          and not meta.get("storage_transformers")
          and isinstance(meta.get("attributes", {}), dict))
    if not ok:
        raise fail(f"{file} is not a plain numeric zarr array with allowed codecs ({sorted(_CODECS)})")
    return meta


def _field(d, *keys):
    """d[k1][k2]… or None where a level is missing or not an object."""
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _chunk_keys(meta: dict):
    """Every chunk file an array must have (zarr v3 default key encoding)."""
    chunks = meta["chunk_grid"]["configuration"]["chunk_shape"]
    sep = _field(meta, "chunk_key_encoding", "configuration", "separator") or "/"
    grid = [-(-s // c) for s, c in zip(meta["shape"], chunks)]
    for coords in itertools.product(*(range(n) for n in grid)):
        yield sep.join(("c", *map(str, coords)))


def _check_chunks(folder: Path, meta: dict, fail, name: str) -> None:
    """Every chunk file exists; a Blosc chunk's header also matches its file size and the chunk size
    (Blosc decodes a truncated buffer into garbage without an error)."""
    blosc = meta["codecs"][-1]["name"] == "blosc"
    chunk_bytes = int(np.prod(meta["chunk_grid"]["configuration"]["chunk_shape"])) * \
        np.dtype(meta["data_type"]).itemsize
    for key in _chunk_keys(meta):
        file = folder / key
        if not blosc:
            if not file.is_file():
                raise fail(f"array {name} is missing its chunk {key} (zarr would read it as zeros)")
            continue
        try:
            with open(file, "rb") as f:
                head, size = f.read(16), os.fstat(f.fileno()).st_size
        except OSError:
            raise fail(f"array {name} is missing its chunk {key} (zarr would read it as zeros)") from None
        if len(head) < 16 or struct.unpack_from("<II", head, 8)[1] != size or \
                struct.unpack_from("<I", head, 4)[0] != chunk_bytes:
            raise fail(f"array {name}: chunk {key} is truncated or damaged ({size} bytes on disk, not what its "
                       f"Blosc header says)")


def _read_array(folder: Path, meta: dict, fail, name: str, sel=Ellipsis) -> np.ndarray:
    """Decode an array (or a slice of it) whose metadata `_array_meta` accepted."""
    import zarr

    try:
        data = np.asarray(zarr.open_array(str(folder), mode="r")[sel])
    except Exception as e:  # a truncated or corrupt chunk: zstd/blosc errors, short reads
        raise fail(f"array {name} cannot be decoded ({_one_line(e)})") from None
    if data.dtype.name != meta["data_type"]:
        raise fail(f"array {name} decoded as {data.dtype.name}, not {meta['data_type']}")
    return data


def array_digest(data: np.ndarray) -> str:
    """blake2b (hex) of an array's dtype, shape and little-endian bytes."""
    data = np.ascontiguousarray(data)
    little = data.astype(data.dtype.newbyteorder("<"), copy=False)
    h = hashlib.blake2b(digest_size=32)
    h.update(f"{data.dtype.name}{list(data.shape)}".encode())
    h.update(little.reshape(-1).view(np.uint8))
    return h.hexdigest()


def _attrs_digest(attrs: dict) -> str:
    return hashlib.blake2b(json.dumps(attrs, sort_keys=True, separators=(",", ":")).encode(),
                           digest_size=32).hexdigest()


# -- marker, attributes, configuration ---------------------------------------------------------
def _read_marker(path: Path) -> dict:
    """The commit marker; {"legacy": True, ...} for the old format (no array list)."""
    fail = lambda what: _bad(path, what)
    if not (path / MARKER).exists():
        raise ConfigError(f"{str(path)!r} is not a committed checkpoint (no {MARKER} marker); pass a step_* folder")
    marker = _json(path / MARKER, fail)
    if "arrays" not in marker:
        if not _is_int(marker.get("step")):
            raise fail(f"{path / MARKER} has no step")
        return {**marker, "legacy": True}
    arrays = marker["arrays"]
    if marker.get("format") != FORMAT or not isinstance(arrays, dict) or not _is_int(marker.get("step")):
        raise fail(f"{path / MARKER} is not a {FORMAT} marker")
    for name, entry in arrays.items():
        parts = name.split("/")
        if not all(_PART.match(p) and p not in (".", "..") for p in parts) or parts[0] not in ("model", "optim",
                                                                                              "rng"):
            raise fail(f"{path / MARKER} lists an invalid array path {name!r}")
        if not (isinstance(entry, dict) and isinstance(entry.get("digest"), str) and entry.get("dtype") in _DTYPES
                and isinstance(entry.get("shape"), list) and all(_is_int(s) for s in entry["shape"])):
            raise fail(f"{path / MARKER} has a malformed entry for {name}")
    return {**marker, "legacy": False}


def _model_config(path: Path, config) -> object:
    """The checkpoint's model configuration, validated (a ModelConfig)."""
    from models.config import ModelConfig

    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise _bad(path, "its config attribute has no model section")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    values = {k: v for k, v in config["model"].items() if k in known}
    if not all(v is None or isinstance(v, (bool, int, float, str)) for v in values.values()):
        raise _bad(path, "its config attribute's model section holds non-scalar values")
    try:
        cfg = ModelConfig(**values)
        cfg.validate()
    except Exception as e:
        raise _bad(path, f"its config attribute is not a valid model configuration ({_one_line(e)})") from None
    return cfg


def _root_attrs(path: Path) -> dict:
    """The group's attributes, read as JSON and checked: step, config (with a valid model), world size."""
    fail = lambda what: _bad(path, what)
    meta = _json(path / "zarr.json", fail)
    if meta.get("node_type") != "group" or not isinstance(meta.get("attributes"), dict):
        raise fail(f"{path / 'zarr.json'} is not a zarr group with attributes")
    attrs = meta["attributes"]
    if "config" not in attrs:
        raise fail(f"{path / 'zarr.json'} has no config attribute (the group's metadata is incomplete)")
    _model_config(path, attrs["config"])
    if not _is_int(attrs.get("step")) or not _is_int(attrs.get("world_size")) or attrs["world_size"] < 1:
        raise fail(f"{path / 'zarr.json'} lacks an integer step or world_size attribute")
    if not isinstance(attrs.get("cursor", {}), dict):
        raise fail(f"{path / 'zarr.json'} has a cursor attribute that is not an object")
    return attrs


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


def _refuse_untrusted(path: Path, marker: dict, trust: bool) -> None:
    if marker["legacy"] and not trust:
        raise UntrustedCheckpoint(
            f"checkpoint {path} is of the old format, whose RNG states are Python pickles that can run code when "
            f"loaded; only if you wrote it yourself, pass --trust-checkpoint (then re-save it in the new format)")


# -- RNG states without pickle ----------------------------------------------------------------
def _rng_arrays() -> dict[str, tuple[np.ndarray, dict]]:
    """This process's RNG states as {name: (integer array, typed attributes)}."""
    out = {"torch": (torch.get_rng_state().numpy().copy(), {})}
    if torch.cuda.is_available():
        out["cuda"] = (torch.cuda.get_rng_state().numpy().copy(), {})
    algorithm, key, pos, has_gauss, cached = np.random.get_state()
    out["numpy_key"] = (np.asarray(key, dtype=np.uint32), {"algorithm": str(algorithm), "pos": int(pos),
                                                           "has_gauss": int(has_gauss),
                                                           "cached_gaussian": float(cached)})
    version, internal, gauss_next = random.getstate()
    out["python_state"] = (np.asarray(internal, dtype=np.uint32),
                           {"version": int(version), "gauss_next": None if gauss_next is None else float(gauss_next)})
    return out


@dataclass
class _RngState:
    torch: torch.Tensor
    numpy: tuple
    python: tuple
    cuda: torch.Tensor | None = None


def _rng_state(arrays: dict[str, np.ndarray], attrs: dict[str, dict], fail) -> _RngState:
    """Typed reconstruction of one rank's RNG states; anything unexpected is refused."""
    def need(ok: bool, name: str, what: str) -> None:
        if not ok:
            raise fail(f"RNG state {name} is invalid ({what})")

    t = arrays["torch"]
    need(t.dtype == np.uint8 and t.shape == tuple(torch.get_rng_state().shape), "torch",
         f"{t.dtype}{list(t.shape)}, expected uint8{list(torch.get_rng_state().shape)}")
    key, k = arrays["numpy_key"], attrs["numpy_key"]
    need(key.dtype == np.uint32 and key.shape == (_MT_WORDS,), "numpy_key", f"{key.dtype}{list(key.shape)}")
    need(k.get("algorithm") == "MT19937" and _is_int(k.get("pos")) and 0 <= k["pos"] <= _MT_WORDS
         and k.get("has_gauss") in (0, 1) and _is_int(k.get("has_gauss"))
         and type(k.get("cached_gaussian")) is float and np.isfinite(k["cached_gaussian"]),
         "numpy_key", "attributes algorithm/pos/has_gauss/cached_gaussian")
    py, p = arrays["python_state"], attrs["python_state"]
    need(py.dtype == np.uint32 and py.shape == (_MT_WORDS + 1,) and int(py[-1]) <= _MT_WORDS, "python_state",
         f"{py.dtype}{list(py.shape)}")
    gauss = p.get("gauss_next")
    need(p.get("version") == 3 and _is_int(p.get("version"))
         and (gauss is None or (type(gauss) is float and np.isfinite(gauss))),
         "python_state", "attributes version/gauss_next")
    cuda = None
    if "cuda" in arrays:
        c = arrays["cuda"]
        need(c.dtype == np.uint8 and c.ndim == 1, "cuda", f"{c.dtype}{list(c.shape)}")
        if torch.cuda.is_available():
            need(c.shape == tuple(torch.cuda.get_rng_state().shape), "cuda", f"{list(c.shape)} bytes")
        cuda = torch.from_numpy(c.copy())
    return _RngState(
        torch=torch.from_numpy(t.copy()),
        numpy=("MT19937", key.copy(), k["pos"], k["has_gauss"], k["cached_gaussian"]),
        python=(3, tuple(int(x) for x in py), gauss),
        cuda=cuda,
    )


def _set_rng_state(state: _RngState) -> None:
    torch.set_rng_state(state.torch)
    np.random.set_state(state.numpy)
    random.setstate(state.python)
    if state.cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state.cuda)


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


# -- writing -------------------------------------------------------------------------------------
def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _numpy(t) -> np.ndarray:
    data = (t if torch.is_tensor(t) else torch.tensor(t)).detach().cpu()
    if data.dtype == torch.bfloat16:
        data = data.float()
    return data.numpy()


def _write_array(group, name: str, data: np.ndarray, attrs: dict | None = None) -> dict:
    """One array, one chunk (always written, even when it equals the fill value); returns its marker entry."""
    entry = {"digest": array_digest(data), "shape": list(data.shape), "dtype": data.dtype.name}
    arr = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=tuple(max(1, s) for s in data.shape),
                             attributes={**(attrs or {}), "digest": entry["digest"]},
                             config={"write_empty_chunks": True})
    arr[...] = data
    return entry


def save_checkpoint(path: Path, *, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    config: dict, cursor: dict, writes_params: bool, keep: int | None = None) -> None:
    """Collective: every rank calls it. Rank 0 creates the group and commits; see module docstring."""
    import zarr

    path = Path(path)
    rank, world = _rank_world()
    if rank == 0:
        if path.exists():  # a leftover without marker from a crashed attempt at this step
            shutil.rmtree(path)
        root = zarr.open_group(str(path), mode="w")
        for sub in ("model", "optim", "rng"):
            root.create_group(sub)
    _barrier()
    root = zarr.open_group(str(path), mode="r+")
    entries: dict[str, dict] = {}
    if writes_params:
        names = {id(p): n for n, p in model.named_parameters()}
        for name, p in model.named_parameters():
            entries[f"model/{name}"] = _write_array(root["model"], name, _numpy(p))
        for p, state in optimizer.state.items():
            sub = root["optim"].create_group(names[id(p)])
            for key, value in state.items():
                entries[f"optim/{names[id(p)]}/{key}"] = _write_array(sub, key, _numpy(value))
    rng = root["rng"].create_group(f"rank_{rank}")
    for key, (data, attrs) in _rng_arrays().items():
        entries[f"rng/rank_{rank}/{key}"] = _write_array(rng, key, data, attrs)
    _barrier()
    # every rank's digests to rank 0, as JSON text between our own live processes
    gathered = [json.dumps(entries)]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, json.dumps(entries))
    if rank == 0:
        root.attrs.update({"step": step, "config": json.loads(json.dumps(config)), "cursor": cursor,
                           "world_size": world, "optimizer": type(optimizer).__name__})
        written = json.loads((path / "zarr.json").read_text())["attributes"]
        arrays = {}
        for text in gathered:
            arrays.update(json.loads(text))
        marker = {"format": FORMAT, "step": step, "world_size": world, "attributes_digest": _attrs_digest(written),
                  "arrays": dict(sorted(arrays.items()))}
        tmp = path / f"{MARKER}.partial"
        tmp.write_text(json.dumps(marker, indent=0))
        os.replace(tmp, path / MARKER)
        if keep:
            for old in list_checkpoints(path.parent.parent, warn=False)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()


# -- verification --------------------------------------------------------------------------------
@dataclass
class Verified:
    """What a verification read: array count, raw bytes, the arrays asked to keep, the attributes."""

    arrays: int = 0
    nbytes: int = 0
    kept: dict[str, np.ndarray] = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)
    legacy: bool = False


def _array_nodes(path: Path, fail) -> dict[str, dict]:
    """{relative path: metadata} of every array under a zarr group folder (every zarr.json parsed)."""
    nodes = {}
    for folder, dirs, files in os.walk(path):
        dirs.sort()
        if "zarr.json" not in files:
            continue
        here = Path(folder)
        meta = _json(here / "zarr.json", fail)
        if meta.get("node_type") == "array":
            nodes[here.relative_to(path).as_posix()] = _array_meta(here / "zarr.json", fail)
            dirs[:] = []  # chunk folders
        elif meta.get("node_type") != "group":
            raise fail(f"{here / 'zarr.json'} is neither a zarr group nor an array")
    return nodes


def _read_verified(path: Path, name: str, meta: dict, entry: dict | None) -> np.ndarray:
    """An array checked against its marker entry: metadata, presence of its chunks, digest of its bytes."""
    fail = lambda what: _bad(path, what)
    if entry is not None and (meta["shape"] != entry["shape"] or meta["data_type"] != entry["dtype"]
                              or meta.get("attributes", {}).get("digest") != entry["digest"]):
        raise fail(f"array {name} has another shape, dtype or digest than {MARKER} lists")
    _check_chunks(path / name, meta, fail, name)
    data = _read_array(path / name, meta, fail, name)
    if entry is not None and array_digest(data) != entry["digest"]:
        raise fail(f"array {name} does not match its digest in {MARKER} (its bytes changed)")
    return data


def _required_optimizer_state(attrs: dict, optimizer: torch.optim.Optimizer | None = None) -> tuple[str, ...]:
    name = type(optimizer).__name__ if optimizer is not None else attrs.get("optimizer", "AdamW")
    return _OPTIMIZER_STATE.get(name, ()) if attrs["step"] > 0 else ()


def verify_checkpoint(path: str | Path, *, trust: bool = False, keep=lambda name: False) -> Verified:
    """Check a whole checkpoint without a model: marker, attributes and config, presence of every
    parameter (of the configured model), optimizer state and RNG state, and every array's chunks
    and digest. Returns counts and the arrays for which `keep(name)`; a failure is a one-line ConfigError."""
    path = Path(path)
    fail = lambda what: _bad(path, what)
    marker = _read_marker(path)
    _refuse_untrusted(path, marker, trust)
    attrs = _root_attrs(path)
    nodes = _array_nodes(path, fail)
    listed = marker.get("arrays", {})
    if not marker["legacy"]:
        for name in listed:
            if name not in nodes:
                raise fail(f"array {name} listed in {MARKER} is missing")
        for name in nodes:
            if name not in listed:
                raise fail(f"array {name} is not listed in {MARKER}")
        if marker["step"] != attrs["step"] or marker.get("world_size") != attrs["world_size"]:
            raise fail(f"{MARKER} and zarr.json disagree on step or world size")
        if marker.get("attributes_digest") != _attrs_digest(attrs):
            raise fail(f"the attributes in {path / 'zarr.json'} do not match their digest in {MARKER}")
    from models import LinearLlama

    with torch.device("meta"):
        expected = {n: list(p.shape) for n, p in LinearLlama(_model_config(path, attrs["config"])).named_parameters()}
    state_keys = _required_optimizer_state(attrs)
    for name, shape in expected.items():
        meta = nodes.get(f"model/{name}")
        if meta is None:
            raise fail(f"parameter {name} is missing (no array model/{name})")
        if meta["shape"] != shape:
            raise fail(f"parameter {name} has shape {meta['shape']}, the configured model {shape}")
    for name in (n[len("model/"):] for n in nodes if n.startswith("model/")):
        for key in state_keys:
            if f"optim/{name}/{key}" not in nodes:
                raise fail(f"optimizer state {key} of parameter {name} is missing (no array optim/{name}/{key})")
    for r in range(attrs["world_size"]):
        if marker["legacy"]:
            if f"rng/rank_{r}" not in nodes:
                raise fail(f"the RNG state of rank {r} is missing")
            continue
        for k in _RNG_REQUIRED:
            if f"rng/rank_{r}/{k}" not in nodes:
                raise fail(f"RNG state rng/rank_{r}/{k} is missing")
    rng_names = {f"rng/rank_{r}/{k}" for r in range(attrs["world_size"]) for k in (*_RNG_REQUIRED, "cuda")}
    for name in nodes:
        if name.startswith("rng/") and name not in rng_names and not marker["legacy"]:
            raise fail(f"array {name} is not an RNG state of this checkpoint's {attrs['world_size']} ranks")
    result = Verified(attrs=attrs, legacy=marker["legacy"])
    rng: dict[str, dict[str, tuple[np.ndarray, dict]]] = {}
    for name, meta in sorted(nodes.items()):
        data = _read_verified(path, name, meta, listed.get(name) if not marker["legacy"] else None)
        result.arrays += 1
        result.nbytes += data.nbytes
        if keep(name):
            result.kept[name] = data
        if name.startswith("rng/") and not marker["legacy"]:
            rank_dir, key = name.rsplit("/", 1)
            rng.setdefault(rank_dir, {})[key] = (data, meta.get("attributes", {}))
    for rank_dir, parts in rng.items():
        _rng_state({k: v[0] for k, v in parts.items()}, {k: v[1] for k, v in parts.items()},
                   lambda what, d=rank_dir: fail(f"{d}: {what}"))
    return result


def check_resume(resume: str | None, run_dir: str | Path, config: dict, *, trust: bool = False) -> Path | None:
    """Before processes start: the checkpoint a run would resume from, verified in full, refused
    (one line) when it is damaged, untrusted, or holds another model shape."""
    path = resolve_resume(resume, run_dir, trust=trust)  # `auto` verified it already
    if path is not None:
        attrs = verify_checkpoint(path, trust=trust).attrs if resume != "auto" else _root_attrs(path)
        _check_shape(path, attrs["config"], config)
    return path


def load_checkpoint(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    config: dict, trust: bool = False) -> dict:
    """Restore this rank's parameters, optimizer state and RNG; returns the checkpoint's attrs.

    Everything this rank reads is checked first (presence, digests against the marker, shapes, RNG
    fields); only then is anything modified. A checkpoint of another model shape, a damaged one, or an
    old-format one without `trust` is refused with a one-line ConfigError."""
    path = Path(path)
    fail = lambda what: _bad(path, what)
    marker = _read_marker(path)
    _refuse_untrusted(path, marker, trust)
    attrs = _root_attrs(path)
    _check_shape(path, attrs["config"], config)
    if marker["legacy"]:
        return _load_legacy(path, attrs, model, optimizer)
    listed = marker["arrays"]
    rank, world = _rank_world()
    required = _required_optimizer_state(attrs, optimizer)

    def read(name: str) -> tuple[np.ndarray, dict]:
        if name not in listed:
            raise fail(f"array {name} is missing (not listed in {MARKER})")
        meta = _array_meta(path / name / "zarr.json", fail)
        return _read_verified(path, name, meta, listed[name]), meta.get("attributes", {})

    params, states = {}, {}
    for name, p in model.named_parameters():
        params[name] = read(f"model/{name}")[0]
        if list(params[name].shape) != list(p.shape):
            raise fail(f"parameter {name} has shape {list(params[name].shape)}, the model {list(p.shape)}")
        keys = sorted({n.rsplit("/", 1)[1] for n in listed if n.startswith(f"optim/{name}/")} | set(required))
        states[name] = {key: read(f"optim/{name}/{key}")[0] for key in keys}
        for key, value in states[name].items():
            if key != "step" and value.shape != params[name].shape:
                raise fail(f"optimizer state {key} of {name} has shape {list(value.shape)}, not {list(p.shape)}")
    rng_state = None
    if attrs["world_size"] == world:
        prefix = f"rng/rank_{rank}"
        parts = {k: read(f"{prefix}/{k}") for k in (*_RNG_REQUIRED, "cuda")
                 if k in _RNG_REQUIRED or f"{prefix}/{k}" in listed}
        rng_state = _rng_state({k: v[0] for k, v in parts.items()}, {k: v[1] for k, v in parts.items()},
                               lambda what: fail(f"{prefix}: {what}"))
    # all verified: now modify
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.from_numpy(params[name]))
    for name, p in model.named_parameters():
        if states[name]:
            optimizer.state[p] = {key: torch.from_numpy(value).to(torch.float32) if key == "step"
                                  else torch.from_numpy(value).to(p.device) for key, value in states[name].items()}
    if rng_state is not None:
        _set_rng_state(rng_state)
    return attrs


def _load_legacy(path: Path, attrs: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The old loader, for an old-format checkpoint the user trusts (--trust-checkpoint)."""
    import zarr

    root = zarr.open_group(str(path), mode="r")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.from_numpy(root["model"][name][...]))
        state_by_param = {}
        for name, p in model.named_parameters():
            if name not in root["optim"]:
                continue
            group = root["optim"][name]
            state_by_param[p] = {key: torch.from_numpy(np.asarray(group[key][...])).to(
                p.device if key != "step" else torch.device("cpu")) for key in group.array_keys()}
    for p, state in state_by_param.items():
        if "step" in state:
            state["step"] = state["step"].to(torch.float32)
        optimizer.state[p] = state
    rank, world = _rank_world()
    if f"rank_{rank}" in root["rng"] and attrs.get("world_size") == world:
        _legacy_rng_state(bytes(root["rng"][f"rank_{rank}"][...]))
    return attrs


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
        raise ConfigError(f"cannot write --output {output} ({_one_line(e)}); "
                          f"pass a path in a writable folder") from None
    return len(tensors)


# -- `longtrain verify` ------------------------------------------------------------------------
def verify_token_store(path: str | Path) -> Verified:
    """A token store (runtime/data.py): attributes consistent, every chunk of `tokens` and `next_token`
    present and decodable, token ids in the vocabulary, `next_token` equal to the token that follows each
    chunk. Reads the whole store once, a block of rows at a time."""
    from runtime.data import STORE_FORMAT

    path = Path(path)
    fail = lambda what: ConfigError(f"token store {path}: {what}; re-create it with `longtrain prepare-data`")
    meta = _json(path / "zarr.json", fail)
    attrs = meta.get("attributes")
    if meta.get("node_type") != "group" or not isinstance(attrs, dict) or attrs.get("format") != STORE_FORMAT:
        raise fail(f"{path / 'zarr.json'} is not a group with format attribute {STORE_FORMAT!r}")
    for key in ("vocab_size", "eos_id", "seq_len", "chunk_len", "sequences", "tokens", "dropped_tokens"):
        if not _is_int(attrs.get(key)) or attrs[key] < 0:
            raise fail(f"attribute {key} is missing or not a non-negative integer")
    seq_len, chunk_len, rows, vocab = attrs["seq_len"], attrs["chunk_len"], attrs["sequences"], attrs["vocab_size"]
    if seq_len < 2 or chunk_len < 1 or seq_len % chunk_len or vocab < 1 or attrs["eos_id"] >= vocab:
        raise fail(f"attributes seq_len={seq_len}, chunk_len={chunk_len}, vocab_size={vocab}, "
                   f"eos_id={attrs['eos_id']} are inconsistent")
    if attrs["tokens"] - attrs["dropped_tokens"] != rows * seq_len:
        raise fail(f"attributes tokens - dropped_tokens = {attrs['tokens'] - attrs['dropped_tokens']} is not "
                   f"sequences × seq_len = {rows * seq_len}")
    n_chunks = seq_len // chunk_len
    arrays = {"tokens": ([rows, seq_len], [1, chunk_len]), "next_token": ([rows, n_chunks], None)}
    metas = {}
    for name, (shape, chunks) in arrays.items():
        metas[name] = m = _array_meta(path / name / "zarr.json", fail)
        got = m["chunk_grid"]["configuration"]["chunk_shape"]
        if m["data_type"] != "int32" or m["shape"] != shape or (chunks is not None and got != chunks):
            raise fail(f"array {name} is {m['data_type']}{m['shape']} in chunks {got}; the attributes say "
                       f"int32{shape}" + (f" in chunks {chunks}" if chunks else ""))
        _check_chunks(path / name, m, fail, name)
    result = Verified(arrays=2, attrs=attrs)
    block = max(1, (1 << 22) // seq_len)
    before = None  # next_token of the previous block's last row: the first token of this block
    for lo in range(0, rows, block):
        hi = min(rows, lo + block)
        where = f"rows {lo}-{hi - 1}"
        x = _read_array(path / "tokens", metas["tokens"], fail, f"tokens ({where})", np.s_[lo:hi])
        f = _read_array(path / "next_token", metas["next_token"], fail, f"next_token ({where})", np.s_[lo:hi])
        if min(x.min(), f.min()) < 0 or max(x.max(), f.max()) >= vocab:
            raise fail(f"{where} hold token ids outside [0, {vocab})")
        if not (np.array_equal(f[:, :-1], x[:, chunk_len::chunk_len]) and np.array_equal(f[:-1, -1], x[1:, 0])
                and (before is None or before == x[0, 0])):
            raise fail(f"next_token of {where} does not match the tokens that follow each chunk")
        before = f[-1, -1]
        result.nbytes += x.nbytes + f.nbytes
    return result


def verify_path(path: str | Path, *, trust: bool = False) -> tuple[str, Verified]:
    """("checkpoint" | "token store", what was verified) for `longtrain verify PATH`."""
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
