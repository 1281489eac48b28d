"""Checkpoint integrity (DESIGN §7, issues 15 and 23): is a checkpoint on disk complete, unaltered and
safe to decode?

Owns the commit marker's contents, the content digests and the reading of untrusted zarr files:

    COMMITTED   {"format": FORMAT, "step", "world_size", "attributes_digest",
                 "arrays": {path: {"digest", "shape", "dtype"}}}   every array of the checkpoint

- An array's digest is a blake2b of its dtype, shape and little-endian bytes; the group's attributes
  have one too. Presence is checked chunk by chunk (zarr reads an absent chunk as zeros).
- A sharded array (sharded model state: each rank wrote its own dim-0 chunk, no rank held the whole)
  is listed with the digest of every chunk's data, {"chunks": {"c/k/0": digest, ...}}, and as its
  "digest" a digest of that chunk list; a reader checks the chunks it reads.
- Nothing read is ever unpickled or evaluated: JSON is parsed as data, and an array's metadata must
  pass an allow-list of dtypes and codecs before zarr decodes a chunk.
- `verify_checkpoint` checks a whole checkpoint without a model; the loader (runtime/checkpoint.py)
  checks what one rank reads with `read_verified`. The token store's check (runtime/data.py) uses the
  same readers.

Failures are one-line ConfigErrors built by a `fail(what)` callback, so each caller names its file and fix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
import struct
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from runtime.errors import ConfigError
from runtime.rng_state import RNG_KEYS, RNG_REQUIRED, parse_rng_state

MARKER = "COMMITTED"
FORMAT = "longtrain-checkpoint-v2"
_PART = re.compile(r"^[A-Za-z0-9_.\-]+$")
_CHUNK_KEY = re.compile(r"^c(/[0-9]+)+$")
_FIX = "use an older checkpoint (--resume PATH, or auto) or delete this one"
_DTYPES = frozenset({"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                     "float16", "float32", "float64"})
_CODECS = frozenset({"bytes", "zstd", "blosc", "gzip", "crc32c", "transpose"})
# state an optimizer keeps for every parameter once it has stepped (a missing array is refused)
_OPTIMIZER_STATE = {"AdamW": ("exp_avg", "exp_avg_sq", "step"), "Adam": ("exp_avg", "exp_avg_sq", "step")}

Fail = Callable[[str], Exception]  # builds the one-line error for "what is wrong"


class UntrustedCheckpoint(ConfigError):
    """An old-format checkpoint (pickled RNG state) loaded without --trust-checkpoint."""


def checkpoint_error(path: Path, what: str) -> ConfigError:
    """The one-line refusal of a damaged checkpoint, naming the fix."""
    return ConfigError(f"checkpoint {path}: {what}; {_FIX}")


def one_line(e: BaseException) -> str:
    """An exception as a short single line: its type and the first line of its message."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


def is_int(x) -> bool:
    """A JSON integer (bool excluded)."""
    return type(x) is int


# -- reading untrusted zarr files ----------------------------------------------------------------
def read_json(file: Path, fail: Fail) -> dict:
    """A JSON object from `file`; `fail(what)` builds the error for a missing, unreadable or bad one."""
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise fail(f"{file} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise fail(f"{file} is not valid JSON (half-written? {one_line(e)})") from None
    if not isinstance(value, dict):
        raise fail(f"{file} does not hold a JSON object")
    return value


def _field(d, *keys):
    """d[k1][k2]… or None where a level is missing or not an object."""
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def array_meta(file: Path, fail: Fail) -> dict:
    """An array's zarr.json, refused unless it is a plain numeric zarr v3 array with allowed codecs
    (so zarr never runs a codec that could deserialize objects)."""
    meta = read_json(file, fail)
    shape, codecs = meta.get("shape"), meta.get("codecs")
    chunks = _field(meta, "chunk_grid", "configuration", "chunk_shape")
    ok = (meta.get("zarr_format") == 3 and meta.get("node_type") == "array"
          and meta.get("data_type") in _DTYPES
          and isinstance(shape, list) and all(is_int(s) and s >= 0 for s in shape)
          and _field(meta, "chunk_grid", "name") == "regular"
          and isinstance(chunks, list) and len(chunks) == len(shape) and all(is_int(c) and c >= 1 for c in chunks)
          and _field(meta, "chunk_key_encoding", "name") == "default"
          and _field(meta, "chunk_key_encoding", "configuration", "separator") in (None, "/", ".")
          and isinstance(codecs, list) and bool(codecs)
          and all(isinstance(c, dict) and c.get("name") in _CODECS for c in codecs)
          and not meta.get("storage_transformers")
          and isinstance(meta.get("attributes", {}), dict))
    if not ok:
        raise fail(f"{file} is not a plain numeric zarr array with allowed codecs ({sorted(_CODECS)})")
    return meta


def _chunk_keys(meta: dict) -> Iterator[str]:
    """Every chunk file an array must have (zarr v3 default key encoding)."""
    chunks = meta["chunk_grid"]["configuration"]["chunk_shape"]
    sep = _field(meta, "chunk_key_encoding", "configuration", "separator") or "/"
    grid = [-(-s // c) for s, c in zip(meta["shape"], chunks)]
    for coords in itertools.product(*(range(n) for n in grid)):
        yield sep.join(("c", *map(str, coords)))


def check_chunks(folder: Path, meta: dict, fail: Fail, name: str, keys=None) -> None:
    """Every chunk file (or those of `keys`) exists; a Blosc chunk's header also matches its file size and the
    chunk size (Blosc decodes a truncated buffer into garbage without an error)."""
    blosc = meta["codecs"][-1]["name"] == "blosc"
    chunk_bytes = int(np.prod(meta["chunk_grid"]["configuration"]["chunk_shape"])) * \
        np.dtype(meta["data_type"]).itemsize
    for key in _chunk_keys(meta) if keys is None else keys:
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


def _raw(meta: dict, sel) -> bool:
    """Whether the chunks are the plain little-endian bytes of an array chunked on dim 0 only (what the
    checkpoint writer writes), and `sel` all of it or a slice of dim 0: then they are read from their files."""
    codecs, shape = meta["codecs"], meta["shape"]
    chunks = meta["chunk_grid"]["configuration"]["chunk_shape"]
    return (sys.byteorder == "little" and len(codecs) == 1 and codecs[0]["name"] == "bytes"
            and _field(codecs[0], "configuration", "endian") in (None, "little")
            and len(shape) >= 1 and list(chunks[1:]) == list(shape[1:])
            and (sel is Ellipsis or isinstance(sel, slice) and sel.step is None))


def _read_raw(folder: Path, meta: dict, sel) -> np.ndarray:
    """Rows `sel` of an array `_raw` accepted, read into one array straight from its chunk files (no copies)."""
    shape, dtype = meta["shape"], np.dtype(meta["data_type"])
    c, n = meta["chunk_grid"]["configuration"]["chunk_shape"][0], shape[0]
    start, stop, _ = (slice(None) if sel is Ellipsis else sel).indices(n)
    out = np.empty((max(0, stop - start), *shape[1:]), dtype=dtype)
    row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    sep = _field(meta, "chunk_key_encoding", "configuration", "separator") or "/"
    view = memoryview(out.reshape(-1).view(np.uint8))
    for j in range(start // c, -(-stop // c)):
        lo, hi = max(start, j * c), min(stop, (j + 1) * c)
        key = sep.join(("c", str(j), *("0" * (len(shape) - 1))))
        with open(folder / key, "rb", buffering=0) as f:
            if os.fstat(f.fileno()).st_size != c * row:
                raise ValueError(f"chunk {key} holds {os.fstat(f.fileno()).st_size} bytes, not {c * row}")
            f.seek((lo - j * c) * row)
            part = view[(lo - start) * row:(hi - start) * row]
            while part:
                got = f.readinto(part)
                if not got:
                    raise ValueError(f"chunk {key} ends early")
                part = part[got:]
    return out


def read_array(folder: Path, meta: dict, fail: Fail, name: str, sel=Ellipsis) -> np.ndarray:
    """Decode an array (or a slice of it) whose metadata `array_meta` accepted."""
    import zarr

    try:
        data = _read_raw(folder, meta, sel) if _raw(meta, sel) else np.asarray(zarr.open_array(str(folder),
                                                                                               mode="r")[sel])
    except Exception as e:  # a truncated or corrupt chunk: zstd/blosc errors, short reads
        raise fail(f"array {name} cannot be decoded ({one_line(e)})") from None
    if data.dtype.name != meta["data_type"]:
        raise fail(f"array {name} decoded as {data.dtype.name}, not {meta['data_type']}")
    return data


def parallel_map(fn: Callable, items, threads: int = 8) -> list:
    """[fn(x) for x in items] in `threads` threads (reads wait on the disk, zarr and hashlib release the GIL),
    in order; the first failure in that order is raised."""
    items = list(items)
    if len(items) < 2 or threads < 2:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(min(threads, len(items)), thread_name_prefix="longtrain-ckpt-read") as pool:
        return list(pool.map(fn, items))


# -- digests and the marker ----------------------------------------------------------------------
def array_digest(data: np.ndarray) -> str:
    """blake2b (hex) of an array's dtype, shape and little-endian bytes."""
    data = np.ascontiguousarray(data)
    little = data.astype(data.dtype.newbyteorder("<"), copy=False)
    h = hashlib.blake2b(digest_size=32)
    h.update(f"{data.dtype.name}{list(data.shape)}".encode())
    h.update(little.reshape(-1).view(np.uint8))
    return h.hexdigest()


def attrs_digest(attrs: dict) -> str:
    """blake2b (hex) of a group's attributes as canonical JSON."""
    return hashlib.blake2b(json.dumps(attrs, sort_keys=True, separators=(",", ":")).encode(),
                           digest_size=32).hexdigest()


def marker_entry(data: np.ndarray) -> dict:
    """What the marker lists for one array: its digest, shape and dtype."""
    return {"digest": array_digest(data), "shape": list(data.shape), "dtype": data.dtype.name}


def chunk_key(index: int, ndim: int) -> str:
    """The zarr v3 key of the `index`-th dim-0 chunk of an array chunked on dim 0 only."""
    return "/".join(("c", str(index), *("0" * (ndim - 1))))


def chunks_digest(chunks: dict[str, str]) -> str:
    """The digest of a sharded array: blake2b of its chunks' digests, in key order."""
    return hashlib.blake2b(json.dumps(sorted(chunks.items())).encode(), digest_size=32).hexdigest()


def sharded_entry(shape: list[int], dtype: str, chunks: dict[str, str]) -> dict:
    """The marker entry of an array written chunk by chunk by several ranks (each chunk's digest)."""
    return {"digest": chunks_digest(chunks), "shape": list(shape), "dtype": dtype,
            "chunks": dict(sorted(chunks.items()))}


def marker_contents(step: int, world_size: int, attrs: dict, arrays: dict[str, dict]) -> dict:
    """The commit marker of a checkpoint whose group attributes are `attrs` (as written) and whose
    arrays are {path: marker_entry}."""
    return {"format": FORMAT, "step": step, "world_size": world_size, "attributes_digest": attrs_digest(attrs),
            "arrays": dict(sorted(arrays.items()))}


def read_marker(path: Path) -> dict:
    """The commit marker, checked; {"legacy": True, ...} for the old format (no array list)."""
    fail = lambda what: checkpoint_error(path, what)
    if not (path / MARKER).exists():
        raise ConfigError(f"{str(path)!r} is not a committed checkpoint (no {MARKER} marker); pass a step_* folder")
    marker = read_json(path / MARKER, fail)
    if "arrays" not in marker:
        if not is_int(marker.get("step")):
            raise fail(f"{path / MARKER} has no step")
        return {**marker, "legacy": True}
    arrays = marker["arrays"]
    if marker.get("format") != FORMAT or not isinstance(arrays, dict) or not is_int(marker.get("step")):
        raise fail(f"{path / MARKER} is not a {FORMAT} marker")
    for name, entry in arrays.items():
        parts = name.split("/")
        if not all(_PART.match(p) and p not in (".", "..") for p in parts) or parts[0] not in ("model", "optim",
                                                                                              "rng"):
            raise fail(f"{path / MARKER} lists an invalid array path {name!r}")
        if not (isinstance(entry, dict) and isinstance(entry.get("digest"), str) and entry.get("dtype") in _DTYPES
                and isinstance(entry.get("shape"), list) and all(is_int(s) for s in entry["shape"])):
            raise fail(f"{path / MARKER} has a malformed entry for {name}")
        chunks = entry.get("chunks")
        if chunks is not None and not (isinstance(chunks, dict) and all(
                isinstance(k, str) and _CHUNK_KEY.match(k) and isinstance(v, str) for k, v in chunks.items())
                and entry["digest"] == chunks_digest(chunks)):
            raise fail(f"{path / MARKER} has a malformed chunk list for {name}")
    return {**marker, "legacy": False}


def refuse_untrusted(path: Path, marker: dict, trust: bool) -> None:
    """An old-format checkpoint is read only when the user vouches for it (--trust-checkpoint)."""
    if marker["legacy"] and not trust:
        raise UntrustedCheckpoint(
            f"checkpoint {path} is of the old format, whose RNG states are Python pickles that can run code when "
            f"loaded; only if you wrote it yourself, pass --trust-checkpoint (then re-save it in the new format)")


# -- attributes and configuration ----------------------------------------------------------------
def _model_config(path: Path, config) -> object:
    """The checkpoint's model configuration, validated (a ModelConfig)."""
    from models.config import ModelConfig

    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise checkpoint_error(path, "its config attribute has no model section")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    values = {k: v for k, v in config["model"].items() if k in known}
    if not all(v is None or isinstance(v, (bool, int, float, str)) for v in values.values()):
        raise checkpoint_error(path, "its config attribute's model section holds non-scalar values")
    try:
        cfg = ModelConfig(**values)
        cfg.validate()
    except Exception as e:
        raise checkpoint_error(path, f"its config attribute is not a valid model configuration ({one_line(e)})") \
            from None
    return cfg


def root_attrs(path: Path) -> dict:
    """The group's attributes, read as JSON and checked: step, config (with a valid model), world size."""
    fail = lambda what: checkpoint_error(path, what)
    meta = read_json(path / "zarr.json", fail)
    if meta.get("node_type") != "group" or not isinstance(meta.get("attributes"), dict):
        raise fail(f"{path / 'zarr.json'} is not a zarr group with attributes")
    attrs = meta["attributes"]
    if "config" not in attrs:
        raise fail(f"{path / 'zarr.json'} has no config attribute (the group's metadata is incomplete)")
    _model_config(path, attrs["config"])
    if not is_int(attrs.get("step")) or not is_int(attrs.get("world_size")) or attrs["world_size"] < 1:
        raise fail(f"{path / 'zarr.json'} lacks an integer step or world_size attribute")
    if not isinstance(attrs.get("cursor", {}), dict):
        raise fail(f"{path / 'zarr.json'} has a cursor attribute that is not an object")
    return attrs


def required_optimizer_state(attrs: dict, optimizer: torch.optim.Optimizer | None = None) -> tuple[str, ...]:
    """The optimizer-state arrays every parameter must have (none before the first step)."""
    name = type(optimizer).__name__ if optimizer is not None else attrs.get("optimizer", "AdamW")
    return _OPTIMIZER_STATE.get(name, ()) if attrs["step"] > 0 else ()


# -- verification --------------------------------------------------------------------------------
@dataclass
class Verified:
    """What a verification read: array count, raw bytes, the arrays asked to keep, the attributes."""

    arrays: int = 0
    nbytes: int = 0
    kept: dict[str, np.ndarray] = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)
    legacy: bool = False


def _array_nodes(path: Path, fail: Fail) -> dict[str, dict]:
    """{relative path: metadata} of every array under a zarr group folder (every zarr.json parsed)."""
    nodes = {}
    for folder, dirs, files in os.walk(path):
        dirs.sort()
        if "zarr.json" not in files:
            continue
        here = Path(folder)
        meta = read_json(here / "zarr.json", fail)
        if meta.get("node_type") == "array":
            nodes[here.relative_to(path).as_posix()] = array_meta(here / "zarr.json", fail)
            dirs[:] = []  # chunk folders
        elif meta.get("node_type") != "group":
            raise fail(f"{here / 'zarr.json'} is neither a zarr group nor an array")
    return nodes


def read_verified(path: Path, name: str, meta: dict, entry: dict | None,
                  rows: tuple[int, int] | None = None) -> np.ndarray:
    """An array checked against its marker entry: metadata, presence of its chunks, digest of its bytes.
    With `rows` = [start, stop): only those rows of dim 0, reading and checking only the chunks they
    touch when the array was written chunk by chunk (a sharded array), else the whole array."""
    fail = lambda what: checkpoint_error(path, what)
    chunked = entry is not None and "chunks" in entry
    if entry is not None and (meta["shape"] != entry["shape"] or meta["data_type"] != entry["dtype"]
                              or (not chunked and meta.get("attributes", {}).get("digest") != entry["digest"])):
        raise fail(f"array {name} has another shape, dtype or digest than {MARKER} lists")
    if chunked:
        return _read_chunked(path, name, meta, entry, rows, fail)
    check_chunks(path / name, meta, fail, name)
    data = read_array(path / name, meta, fail, name)
    if entry is not None and array_digest(data) != entry["digest"]:
        raise fail(f"array {name} does not match its digest in {MARKER} (its bytes changed)")
    return data if rows is None else data[rows[0]:rows[1]]


def _read_chunked(path: Path, name: str, meta: dict, entry: dict, rows: tuple[int, int] | None,
                  fail: Fail) -> np.ndarray:
    """Rows of an array chunked on dim 0 whose marker entry lists every chunk's digest: each chunk the rows
    touch is present, listed and unchanged."""
    shape, chunk_shape = meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
    if not shape or list(chunk_shape[1:]) != list(shape[1:]):
        raise fail(f"array {name} is listed chunk by chunk but is not chunked on its first dimension only")
    n, c = shape[0], chunk_shape[0]
    grid = [chunk_key(j, len(shape)) for j in range(-(-n // c))]
    if sorted(entry["chunks"]) != sorted(grid):
        raise fail(f"array {name}: {MARKER} lists chunks {sorted(entry['chunks'])}, the array has {grid}")
    start, stop = (0, n) if rows is None else rows
    if stop <= start:
        return np.zeros((0, *shape[1:]), dtype=meta["data_type"])
    first, last = start // c, (stop - 1) // c
    check_chunks(path / name, meta, fail, name, keys=grid[first:last + 1])
    data = read_array(path / name, meta, fail, name, sel=slice(first * c, min((last + 1) * c, n)))
    for j in range(first, last + 1):
        if array_digest(data[(j - first) * c:(j - first + 1) * c]) != entry["chunks"][grid[j]]:
            raise fail(f"array {name} does not match its digest in {MARKER} (the bytes of chunk {grid[j]} changed)")
    return data[start - first * c:stop - first * c]


def verify_checkpoint(path: str | Path, *, trust: bool = False, keep=lambda name: False) -> Verified:
    """Check a whole checkpoint without a model: marker, attributes and config, presence of every
    parameter (of the configured model), optimizer state and RNG state, and every array's chunks
    and digest. Returns counts and the arrays for which `keep(name)`; a failure is a one-line ConfigError."""
    path = Path(path)
    fail = lambda what: checkpoint_error(path, what)
    marker = read_marker(path)
    refuse_untrusted(path, marker, trust)
    attrs = root_attrs(path)
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
        if marker.get("attributes_digest") != attrs_digest(attrs):
            raise fail(f"the attributes in {path / 'zarr.json'} do not match their digest in {MARKER}")
    from models import LinearLlama

    with torch.device("meta"):
        expected = {n: list(p.shape) for n, p in LinearLlama(_model_config(path, attrs["config"])).named_parameters()}
    state_keys = required_optimizer_state(attrs)
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
        for k in RNG_REQUIRED:
            if f"rng/rank_{r}/{k}" not in nodes:
                raise fail(f"RNG state rng/rank_{r}/{k} is missing")
    rng_names = {f"rng/rank_{r}/{k}" for r in range(attrs["world_size"]) for k in RNG_KEYS}
    for name in nodes:
        if name.startswith("rng/") and name not in rng_names and not marker["legacy"]:
            raise fail(f"array {name} is not an RNG state of this checkpoint's {attrs['world_size']} ranks")
    result = Verified(attrs=attrs, legacy=marker["legacy"])
    rng: dict[str, dict[str, tuple[np.ndarray, dict]]] = {}
    def check(item: tuple[str, dict]) -> tuple[int, np.ndarray | None]:  # in threads; keeps only what is asked
        name, meta = item
        data = read_verified(path, name, meta, listed.get(name) if not marker["legacy"] else None)
        return data.nbytes, data if keep(name) or (name.startswith("rng/") and not marker["legacy"]) else None

    for (name, meta), (nbytes, data) in zip(sorted(nodes.items()), parallel_map(check, sorted(nodes.items()))):
        result.arrays += 1
        result.nbytes += nbytes
        if keep(name):
            result.kept[name] = data
        if name.startswith("rng/") and not marker["legacy"]:
            rank_dir, key = name.rsplit("/", 1)
            rng.setdefault(rank_dir, {})[key] = (data, meta.get("attributes", {}))
    for rank_dir, parts in rng.items():
        parse_rng_state({k: v[0] for k, v in parts.items()}, {k: v[1] for k, v in parts.items()},
                        lambda what, d=rank_dir: fail(f"{d}: {what}"))
    return result
