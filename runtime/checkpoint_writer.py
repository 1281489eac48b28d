"""Writing checkpoints (DESIGN §7, issue 25): a host snapshot, parallel chunk writes, then the commit —
in the training thread, or in the background while training continues (`run.checkpoint_async`).

1. The snapshot (`CheckpointWriter.save`, in the training thread: the only part that stops the step).
   Everything this rank writes — its shards under parallel.shard, or the whole replicated state of its
   stage on the stage's (dp = 0, sp = 0) rank — is copied into one host buffer, pinned under CUDA (the
   device-to-host copies are queued together, then one stream sync), kept for the next save; the RNG
   states, step, config and data cursor are taken at the same moment. A synchronous save copies nothing
   it need not (nothing trains while it writes).
2. The write and the commit (`_write_and_commit`), collective over all ranks, in four phases, each ended
   by an all-gather of every rank's status:
   a. rank 0 creates the group (removing what a crashed attempt at this step left);
   b. the ranks that own arrays written chunk by chunk (sharded ones, and replicated ones over CHUNK_BYTES,
      chunked on dim 0) write their metadata, so that every rank can then write into them;
   c. every rank writes its chunks with WRITER_THREADS threads (runtime/zarr_files.py): each chunk one file
      of raw little-endian bytes (no codec: fp32 weights and moments barely compress, and zstd made the 400m
      save CPU-bound at ≈ 140 MB/s, issue 6), written in one call and fsync'd, its blake2b digest computed
      by the same thread; the gathered status carries every rank's digests;
   d. rank 0 writes the group's attributes, then the commit marker listing every array and digest
      (runtime/integrity.py; fsync'd, renamed into place), then removes checkpoints beyond run.keep.
   A rank whose part fails (a full disk) says so in that phase's all-gather: every rank abandons the save
   in step with the same one-line TrainingError, no marker is written, and no rank is left waiting.

Asynchronous saves (`CheckpointWriter(background=True)`): part 2 runs in one background thread per rank.
Its collectives go over a gloo group of its own (made by the first save, at the same step on every rank),
never over the training loop's groups: the ranks' background threads meet only each other, so they can
neither deadlock with nor reorder the training's collectives (NCCL or gloo), and the marker is written as
soon as the slowest rank has written its chunks — not deferred to the next save, as a commit made by the
training threads would have to be (they may only meet at points every rank reaches: a save, the end).
At most one save is in flight: a new request first waits for the previous one to commit (then reuses its
buffer), and the end of training waits for the last (`wait`; `close` on every exit path), so the final
checkpoint is committed before train() returns. A failed background write is raised in the training
thread at the next save or at the end. A process killed during the write leaves a step_* folder without
COMMITTED, which `--resume auto` never loads (runtime/checkpoint.py `list_checkpoints`); the next save of
that step replaces it.
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from parallel.sharding import is_sharded, local, local_rows, shard_chunk, sharding_of
from runtime import zarr_files
from runtime.errors import TrainingError
from runtime.host_copy import HostBuffer, host_copy
from runtime.integrity import MARKER, array_digest, marker_contents, one_line, sharded_entry
from runtime.rng_state import rng_arrays

CHUNK_BYTES = 64 << 20  # a replicated array larger than this is chunked on dim 0 (chunks written in parallel)
WRITER_THREADS = 8  # per rank; they mostly wait on the disk or hash (hashlib and file writes release the GIL)


@dataclass
class _Array:
    """One array this rank writes (all of it, or its own rows of a sharded one) and its host data."""

    name: str  # path in the group, e.g. model/embed.weight
    data: torch.Tensor | np.ndarray
    shape: tuple[int, ...]  # the whole array's
    dtype: np.dtype  # as stored (bf16 is stored as float32)
    chunks: tuple[int, ...]
    rows: tuple[int, int] | None = None  # a sharded array: this rank's rows (its chunk); None: all of it
    creates: bool = True  # this rank creates the array's metadata
    attrs: dict = field(default_factory=dict)

    @property
    def one_chunk(self) -> bool:
        return self.rows is None and self.chunks == tuple(max(1, s) for s in self.shape)


@dataclass
class _Save:
    """A snapshot: what one save writes, with the values the marker and the group attributes need."""

    path: Path
    step: int
    arrays: list[_Array]
    groups: list[str]  # zarr groups this rank creates (an optimizer group per parameter it owns, its RNG group)
    attrs: dict  # the group attributes rank 0 writes (step, config, cursor, optimizer)
    keep: int | None
    threads: int


def _np_dtype(t: torch.Tensor) -> np.dtype:
    return np.dtype("float32") if t.dtype == torch.bfloat16 else torch.empty((), dtype=t.dtype).numpy().dtype


def _whole_chunks(shape: tuple[int, ...], dtype: np.dtype) -> tuple[int, ...]:
    """Chunks of a replicated array: all of it, or CHUNK_BYTES of dim-0 rows when it is larger."""
    whole = tuple(max(1, s) for s in shape)
    if not shape:
        return whole
    row = int(np.prod(whole[1:], dtype=np.int64)) * dtype.itemsize
    return (max(1, min(whole[0], CHUNK_BYTES // row)), *whole[1:])


def _plan(model: torch.nn.Module, optimizer: torch.optim.Optimizer, writes_params: bool) -> tuple[list, list]:
    """The arrays this rank writes (data: the live tensors) and the optimizer groups it creates."""
    names = {id(p): n for n, p in model.named_parameters()}
    arrays: list[_Array] = []

    def add(name: str, t) -> None:
        t = t if torch.is_tensor(t) else torch.tensor(t)
        if is_sharded(t):
            rows_per_chunk = shard_chunk(t.shape[0], sharding_of(t)[1])
            arrays.append(_Array(name, local(t).detach(), tuple(t.shape), _np_dtype(t),
                                 (rows_per_chunk, *(max(1, s) for s in t.shape[1:])), local_rows(t), writes_params))
        elif writes_params:
            dtype = _np_dtype(t)
            arrays.append(_Array(name, t.detach(), tuple(t.shape), dtype, _whole_chunks(tuple(t.shape), dtype)))

    for name, p in model.named_parameters():
        add(f"model/{name}", p)
    groups = []
    for p, state in optimizer.state.items():
        if writes_params:
            groups.append(f"optim/{names[id(p)]}")
        for key, value in state.items():
            add(f"optim/{names[id(p)]}/{key}", value)
    return arrays, groups


# -- writing files (runtime/zarr_files.py) ------------------------------------------------------
def _numpy(data) -> np.ndarray:
    """Host data as numpy (bf16 as float32)."""
    if isinstance(data, np.ndarray):
        return data
    return (data.float() if data.dtype == torch.bfloat16 else data).numpy()


def _write_rows(path: Path, a: _Array, index: int) -> tuple[str, str]:
    """Chunk `index` (dim 0) of a chunked array, from this rank's rows; (its key, its digest)."""
    c, first = a.chunks[0], a.rows[0] if a.rows is not None else 0
    rows = _numpy(a.data[index * c - first:min((index + 1) * c, a.shape[0]) - first])
    key = zarr_files.chunk_key((index, *(0,) * (len(a.shape) - 1)))
    zarr_files.write_chunk(path / a.name / key, zarr_files.padded(rows, c))
    return key, array_digest(rows)


def _tasks(arrays: list[_Array]) -> list[tuple[_Array, int | None]]:
    """One task per file this rank writes, largest first: (array, its chunk index; None: a one-chunk array)."""
    tasks = []
    for a in arrays:
        if a.one_chunk:
            tasks.append((a, None))
        elif a.rows is not None:
            if a.rows[1] > a.rows[0]:
                tasks.append((a, a.rows[0] // a.chunks[0]))
        else:
            tasks += [(a, j) for j in range(-(-a.shape[0] // a.chunks[0]))]
    return sorted(tasks, key=lambda t: -int(np.prod(t[0].chunks, dtype=np.int64)) * t[0].dtype.itemsize)


def _write_chunks(save: _Save, pool: ThreadPoolExecutor) -> str:
    """Phase c: every file of this rank, in parallel; its marker entries as JSON (chunked arrays: the digest of
    each chunk it wrote)."""
    def run(task):
        a, index = task
        if index is None:
            return a, zarr_files.write_array(save.path / a.name, _numpy(a.data), a.attrs)
        return a, _write_rows(save.path, a, index)

    entries: dict[str, dict] = {a.name: {"shape": list(a.shape), "dtype": a.dtype.name, "chunks": {}}
                                for a in save.arrays if not a.one_chunk}  # a shard of no rows lists none
    for a, result in pool.map(run, _tasks(save.arrays)):
        if isinstance(result, dict):
            entries[a.name] = result
        else:
            entries[a.name]["chunks"][result[0]] = result[1]
    return json.dumps(entries)


def _merge_entries(gathered: list[str]) -> dict[str, dict]:
    """Every rank's marker entries into one list: a sharded array's chunks come from several ranks."""
    arrays: dict[str, dict] = {}
    for text in gathered:
        for name, entry in json.loads(text).items():
            if "chunks" in entry and name in arrays:
                arrays[name]["chunks"].update(entry["chunks"])
            else:
                arrays[name] = entry
    for name, entry in arrays.items():
        if "chunks" in entry:
            arrays[name] = sharded_entry(entry["shape"], entry["dtype"], entry["chunks"])
    return arrays


# -- the collective part -------------------------------------------------------------------------
def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _agree(path: Path, what: str, fn, group) -> list:
    """Run `fn` on this rank, then every rank's (error, result) to every rank: the results, or on a failure
    anywhere the same TrainingError on every rank (no rank is left waiting for one that gave up)."""
    error, result = None, None
    try:
        result = fn()
    except Exception as e:
        error = one_line(e)
    gathered = [(error, result)]
    world = _rank_world()[1]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, (error, result), group=group)
    failed = [(r, e) for r, (e, _) in enumerate(gathered) if e is not None]
    if failed:
        rank, error = failed[0]
        raise TrainingError(f"checkpoint {path} was not saved ({what} failed on rank {rank}: {error}); it is not "
                            f"committed and is never loaded — fix the cause (disk space, permissions of "
                            f"{path.parent}) and resume from the previous checkpoint")
    return [r for _, r in gathered]


def _create_root(path: Path) -> None:
    if path.exists():  # a leftover without marker from a crashed attempt at this step
        shutil.rmtree(path)
    for sub in ("", "model", "optim", "rng"):
        zarr_files.write_group(path / sub)


def _create_metadata(save: _Save) -> None:
    """Phase b: this rank's groups, and the metadata of the chunked arrays it owns."""
    for group in save.groups:
        zarr_files.write_group(save.path / group)
    for a in save.arrays:
        if a.creates and not a.one_chunk:
            zarr_files.write_array_meta(save.path / a.name, a.shape, a.dtype, a.chunks, a.attrs)


def _commit(save: _Save, world: int, gathered: list[str]) -> None:
    """Phase d (rank 0): the group's attributes, then the marker, then old checkpoints beyond `keep`."""
    from runtime.checkpoint import list_checkpoints

    zarr_files.write_group(save.path, {**save.attrs, "world_size": world})
    written = json.loads((save.path / "zarr.json").read_text())["attributes"]
    contents = marker_contents(save.step, world, written, _merge_entries(gathered))
    zarr_files.replace_durably(save.path / MARKER, json.dumps(contents, indent=0))
    if save.keep:
        for old in list_checkpoints(save.path.parent.parent, warn=False)[:-save.keep]:
            shutil.rmtree(old, ignore_errors=True)


def _write_and_commit(save: _Save, group) -> None:
    """Part 2 of a save (module docstring): collective over all ranks, on `group` (None: the default group)."""
    rank, world = _rank_world()
    with ThreadPoolExecutor(save.threads, thread_name_prefix="longtrain-ckpt-write") as pool:
        _agree(save.path, "creating the group", lambda: _create_root(save.path) if rank == 0 else None, group)
        _agree(save.path, "creating the arrays", lambda: _create_metadata(save), group)
        gathered = _agree(save.path, "writing the arrays", lambda: _write_chunks(save, pool), group)
        _agree(save.path, "committing", lambda: _commit(save, world, gathered) if rank == 0 else None, group)


class CheckpointWriter:
    """Saves one rank's checkpoints (every rank has a writer and calls `save` at the same steps): synchronously,
    or with the write and commit in the background (`background`; module docstring). Keeps the seconds saves
    blocked the caller and the seconds their writes took (`take_metrics`, and totals)."""

    def __init__(self, *, background: bool, threads: int = WRITER_THREADS, timeout_s: float = 600.0):
        self.background, self.threads, self.timeout_s = background, threads, timeout_s
        self.group = None  # the background threads' own gloo group, made by the first save (collective)
        self._buffer = HostBuffer(pinned=torch.cuda.is_available()) if background else None
        self._thread: threading.Thread | None = None
        self._preparing: threading.Thread | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self.saves, self.block_s, self.write_s = 0, 0.0, 0.0  # totals
        self._new = {"checkpoint_block_s": 0.0, "checkpoint_write_s": 0.0}  # since the last take_metrics

    def prepare(self, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, writes_params: bool) -> None:
        """Background saves: allocate, pin and fault in the snapshot buffer now, in a thread while training goes
        on, so that the first save stops training for the copy only (on one H200 the 1b preset's 10.5 GiB took
        3.4 s to allocate and pin inside the first save). Call it once the optimizer has its state (after the
        first step); a save waits for it. Without a background writer it does nothing."""
        if not self.background or self._preparing is not None:
            return
        arrays, _ = _plan(model, optimizer, writes_params)
        shapes = [torch.empty_like(a.data, device="meta") for a in arrays]

        self._preparing = threading.Thread(target=self._buffer.reserve, args=(shapes, True), daemon=True,
                                           name="longtrain-checkpoint-buffer")
        self._preparing.start()

    def save(self, path: str | Path, *, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             config: dict, cursor: dict, writes_params: bool, keep: int | None = None) -> None:
        """Collective: checkpoint `step` into `path`. Waits for the save in flight first (raising its error)."""
        start = time.perf_counter()
        self.wait()
        arrays, groups = _plan(model, optimizer, writes_params)
        for a, data in zip(arrays, host_copy([a.data for a in arrays], self._buffer)):
            a.data = data
        rank = _rank_world()[0]
        for key, (data, attrs) in rng_arrays().items():
            arrays.append(_Array(f"rng/rank_{rank}/{key}", data, data.shape, data.dtype,
                                 tuple(max(1, s) for s in data.shape), attrs=attrs))
        attrs = {"step": step, "config": json.loads(json.dumps(config)), "cursor": json.loads(json.dumps(cursor)),
                 "optimizer": type(optimizer).__name__}
        save = _Save(Path(path), step, arrays, [*groups, f"rng/rank_{rank}"], attrs, keep, self.threads)
        self.saves += 1
        if self.background:
            if self.group is None and _rank_world()[1] > 1:
                self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.timeout_s))
            self._thread = threading.Thread(target=self._write, args=(save, self.group), daemon=True,
                                            name="longtrain-checkpoint")
            self._thread.start()
        else:
            self._write(save, None)
            self._raise()
        self._add("checkpoint_block_s", time.perf_counter() - start)

    def _write(self, save: _Save, group) -> None:
        start = time.perf_counter()
        try:
            _write_and_commit(save, group)
        except BaseException as e:  # raised in the training thread (`_raise`)
            self._error = e
            return
        self._add("checkpoint_write_s", time.perf_counter() - start)

    def _add(self, key: str, seconds: float) -> None:
        with self._lock:
            self._new[key] += seconds
            if key == "checkpoint_block_s":
                self.block_s += seconds
            else:
                self.write_s += seconds

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def wait(self) -> None:
        """Until the save in flight (if any) is committed; raises its error. Every rank calls it at the same point."""
        if self._preparing is not None:
            self._preparing.join()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise()

    def close(self) -> None:
        """At teardown, on any exit path: let the save in flight finish (its failure is a warning on stderr), then
        free the host buffer."""
        try:
            self.wait()
        except Exception as e:
            print(f"longtrain: warning: {one_line(e)}", file=sys.stderr, flush=True)
        if self._buffer is not None:
            self._buffer.release()

    def take_metrics(self) -> dict[str, float]:
        """{checkpoint_block_s: seconds the caller was stopped by saves, checkpoint_write_s: seconds of the writes
        that finished} since the last call."""
        with self._lock:
            out, self._new = self._new, dict.fromkeys(self._new, 0.0)
        return out


def save_checkpoint(path: str | Path, **kwargs) -> None:
    """A synchronous save (collective: every rank calls it); arguments as `CheckpointWriter.save`."""
    CheckpointWriter(background=False).save(path, **kwargs)
