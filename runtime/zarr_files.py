"""Plain zarr v3 nodes written as files (for runtime/checkpoint_writer.py): group and array metadata, and
chunk files holding an array's raw little-endian bytes — the `bytes` codec, no compression, '/' chunk keys.

zarr's own write path costs ≈ 2.5 ms of Python per array created and runs every chunk through its one event
loop; these take ≈ 0.2 ms and write each chunk in one call from any thread, fsync'd. What they write is what
zarr.create_array writes (tests/runtime/test_checkpoint_async.py compares them) and reads back through zarr;
runtime/integrity.py reads such chunks straight from their files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from runtime.integrity import marker_entry


def chunk_key(coords) -> str:
    """zarr v3's default chunk key ("/" separator): c/i/j/…, "c" for a 0-d array."""
    return "/".join(("c", *map(str, coords)))


def _write_json(folder: Path, meta: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zarr.json").write_text(json.dumps(meta, indent=2))


def write_group(folder: Path, attrs: dict | None = None) -> None:
    """A group's metadata (with its attributes)."""
    _write_json(folder, {"attributes": attrs or {}, "zarr_format": 3, "node_type": "group"})


def write_array_meta(folder: Path, shape, dtype: np.dtype, chunks, attrs: dict | None = None) -> None:
    """An uncompressed array's metadata; its chunks are written by `write_chunk`."""
    codec = {"name": "bytes"} if dtype.itemsize == 1 else {"name": "bytes", "configuration": {"endian": "little"}}
    _write_json(folder, {
        "shape": list(shape), "data_type": dtype.name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": False if dtype.kind == "b" else 0.0 if dtype.kind == "f" else 0,
        "codecs": [codec], "attributes": attrs or {}, "zarr_format": 3, "node_type": "array",
        "storage_transformers": []})


def write_chunk(file: Path, data: np.ndarray) -> None:
    """One chunk file: `data`'s raw little-endian bytes, in one write, fsync'd (the checkpoint's marker follows
    only data on disk)."""
    data = np.ascontiguousarray(data)
    data = data.astype(data.dtype.newbyteorder("<"), copy=False)
    file.parent.mkdir(parents=True, exist_ok=True)
    with open(file, "wb") as f:
        f.write(data.reshape(-1).view(np.uint8))
        f.flush()
        os.fsync(f.fileno())


def padded(rows: np.ndarray, chunk_rows: int) -> np.ndarray:
    """A dim-0 chunk at the array's end, padded with the fill value (0) to the chunk's size, as zarr stores it."""
    if rows.ndim == 0 or rows.shape[0] == chunk_rows:
        return rows
    out = np.zeros((chunk_rows, *rows.shape[1:]), dtype=rows.dtype)
    out[:rows.shape[0]] = rows
    return out


def write_array(folder: Path, data: np.ndarray, attrs: dict | None = None) -> dict:
    """A whole array as one chunk: its digest (also in its attributes), metadata and chunk; returns its entry in
    the commit marker."""
    entry = marker_entry(data)
    write_array_meta(folder, data.shape, data.dtype, tuple(max(1, s) for s in data.shape),
                     {**(attrs or {}), "digest": entry["digest"]})
    if data.size:
        write_chunk(folder / chunk_key((0,) * data.ndim), data)
    return entry


def replace_durably(file: Path, text: str) -> None:
    """`file` holds `text` or is untouched: written beside it, fsync'd, renamed over it, the folder fsync'd."""
    tmp = file.with_name(file.name + ".partial")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, file)
    fd = os.open(file.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
