"""Activation offload (parallel.offload=true, DESIGN §9): what a step saves for backward waits in host memory.

`ActivationOffloader(device)` is a `torch.autograd.graph.saved_tensors_hooks` context, entered once per step
around forward and backward (the trainer keeps one for the whole run). Every tensor that autograd saves while
it is active goes through `pack`; `unpack` gives it back when backward needs it.

Forward (pack). A saved tensor worth moving — on `device`, at least `min_bytes` in its storage, not a
parameter nor a view or dtype cast of one (a weight made by another op, torch.cat of two, is an activation),
not a leaf that wants a gradient (whoever wants that gradient holds it anyway), saved outside backward — has
its whole storage copied to a host buffer; the pack returns a small handle (storage entry, dtype, offset,
sizes, strides) instead of the tensor. On CUDA the copy runs on a side stream, after an event of the compute
stream (the tensor has been written), so forward goes on while the bytes travel. The GPU tensor is held in a
short "in flight" list until more than `inflight_bytes` of newer moved tensors follow it (so the newest
always stays); it is then released: the compute stream waits on its copy's event first, so the caching
allocator, which reuses a freed block in compute-stream order, cannot hand the memory out before the copy
has read it. Nothing here blocks the host.

Backward (unpack). Tensors come back in roughly the reverse of the packing order. The first unpack of an
entry makes resident what is expected next: the entries packed right after it and not unpacked yet (the
same autograd node's other saved tensors: a node unpacks its own in packing order) and those packed just
before it — at least the next one, and `prefetch_bytes` of them. The copies of those on the host start at
once, on the side stream, into memory allocated in compute-stream order and after the compute stream's work
so far; the compute stream waits on an entry's copy event just before its tensor is used. An entry still in
the in-flight list (the last tensors of forward: the loss's) is used from the GPU with no copy at all.

Bookkeeping that keeps this exact:
- a storage is moved once: tensors saved twice and views of one storage (q, k, v chunks of one projection)
  share one entry keyed by (storage, version); each unpack rebuilds its own view (dtype, offset, sizes,
  strides) on the restored storage, so values, strides and alignment are those of the original; a restored
  storage is kept for the entry's further unpacks and dropped after the last one; a view covering less than
  1/4 of its storage is not moved (moving all of it would cost more than it frees);
- torch.utils.checkpoint (re-materialization): the checkpoint saves the layer's inputs through these hooks —
  those are moved — while its forward and its recompute in backward save through checkpoint's own hooks,
  which sit above these on the hooks stack: the recompute's tensors, alive only during that layer's backward,
  never reach `pack`. A tensor packed while backward runs (a tile's recompute in `parallel.tiling`, or any
  other forward run inside a backward function) is kept as it is;
- host buffers come from a pool keyed by byte size, pinned on CUDA: pinning is paid in the first step only;
  an entry's buffer goes back to the pool when autograd drops its last handle. All copies to and from host
  buffers run on the one side stream, so a buffer's next use is ordered after its last;
- without CUDA (`device` = cpu) the same logic runs with synchronous copies into plain host buffers, and
  unpacks return copies (in flight: the original): the results are bitwise those without offload (the CPU
  tests exercise this path).

Cost model (per rank and step). Each moved byte crosses the host link twice (b ≈ 50 GB/s each way over
PCIe 5 from pinned memory); only copy time not overlapped with compute costs. With `parallel.remat=always`
the moved tensors are the layer inputs: per layer and token a copy of c = 2d/b seconds (bf16) against a
forward of f ≈ 2·P_layer/F and a backward (recompute + backward) of ≈ 3f. The ratio c/f = d·F/(P_layer·b)
does not depend on T. For `1b` (d = 2048): c ≈ 0.08 µs; the default 128K step (61.4K tokens/s on an H200,
≈ 1 µs per layer and token for all four passes) gives f ≈ 0.25 µs: a copy takes ≈ 1/3 of its layer's
forward and ≈ 1/9 of its backward, hidden if it starts early enough — which the side stream and the prefetch
arrange.
What is left: a fetch that was not predicted (counted in `stats["fetched_on_demand"]`), the compute stream
waiting on a copy that lags (narrow layers: c > f when d·F > P_layer·b), the host-side bookkeeping (a few
µs per saved tensor: L per step with remat) and pinning host memory once, in the first step (torch's pinned
allocator rounds each buffer up to a power of two). Memory saved ≈ L·T·d·2 bytes, less what is in flight
(at most `inflight_bytes` plus one tensor) and fetched ahead (max(`prefetch_bytes`, one tensor)); host
memory used: as much, pinned. Without remat every internal is moved (≈ T·(4d + 3·ffn)·2 bytes per layer,
copied out about as fast as forward makes it): expect forward to wait on copies. Storages under `min_bytes`
(default 1 MiB) stay: below that a copy's fixed cost (launch and event, ≈ 10 µs) dominates and the memory
is negligible.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.multiprocessing.reductions import StorageWeakRef

from models.fused_weights import is_reused_weight

DEFAULT_MIN_BYTES = 1 << 20
DEFAULT_INFLIGHT_BYTES = 256 << 20
DEFAULT_PREFETCH_BYTES = 256 << 20
MAX_STORAGE_PER_VIEW = 4  # a view is moved only if its storage is at most this many times its own bytes
PREFETCH_SCAN = 64  # how many earlier entries one unpack looks through for tensors to fetch

# autograd nodes through which a tensor still is (a view or cast of) its input: a walk through them that
# ends at a parameter's AccumulateGrad finds e.g. autocast's cached bf16 weight casts and their transposes
_ALIASING = frozenset({
    "ToCopyBackward0", "TBackward0", "ViewBackward0", "UnsafeViewBackward0", "TransposeBackward0",
    "PermuteBackward0", "ExpandBackward0", "AliasBackward0", "SliceBackward0", "SelectBackward0",
    "UnsqueezeBackward0", "SqueezeBackward0", "SqueezeBackward1", "AsStridedBackward0",
})


def _derived_from_parameter(t: torch.Tensor) -> bool:
    """A parameter, a leaf that wants a gradient, or a view / dtype cast of one (autocast keeps its weight
    casts cached for the whole forward: moving them would free nothing)."""
    if isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter) or is_reused_weight(t):
        return True
    fn = t.grad_fn
    if fn is None:
        return t.requires_grad
    for _ in range(4):
        if fn.name() not in _ALIASING:
            return False
        nexts = [f for f, _ in fn.next_functions if f is not None]
        if len(nexts) != 1:
            return False
        fn = nexts[0]
        if fn.name().endswith("AccumulateGrad"):
            return True
    return False


class _HostPool:
    """Host buffers (uint8, pinned on CUDA) by byte size; a buffer is taken for an entry and given back when
    the entry dies, so a step of the same shapes as the last one allocates nothing."""

    def __init__(self, pin: bool):
        self.pin = pin
        self.free: dict[int, list[torch.Tensor]] = {}
        self.allocated = 0  # buffers ever allocated
        self.allocated_bytes = 0
        self.reused = 0  # takes served from the pool

    def take(self, nbytes: int) -> torch.Tensor:
        spare = self.free.get(nbytes)
        if spare:
            self.reused += 1
            return spare.pop()
        self.allocated += 1
        self.allocated_bytes += nbytes
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)

    def give(self, buf: torch.Tensor) -> None:
        self.free.setdefault(buf.numel(), []).append(buf)

    def clear(self) -> None:
        self.free.clear()


class _Copies:
    """Copies between device storages and host buffers. CUDA: on one side stream, ordered after the compute
    stream's work so far, each returning the event that marks its end. CPU: synchronous, no events."""

    def __init__(self, device: torch.device):
        self.device = device
        self.side = torch.cuda.Stream(device) if device.type == "cuda" else None

    def _compute(self):
        return torch.cuda.current_stream(self.device)

    def _bytes(self, storage: torch.UntypedStorage) -> torch.Tensor:
        return torch.empty(0, dtype=torch.uint8, device=self.device).set_(storage)

    def to_host(self, host: torch.Tensor, storage: torch.UntypedStorage):
        src = self._bytes(storage)
        if self.side is None:
            host.copy_(src)
            return None
        self.side.wait_stream(self._compute())
        with torch.cuda.stream(self.side):
            host.copy_(src, non_blocking=True)
            return self.side.record_event()

    def to_device(self, host: torch.Tensor):
        """A device storage with the host buffer's bytes (allocated on the compute stream), and its event."""
        dev = torch.empty(host.numel(), dtype=torch.uint8, device=self.device)
        if self.side is None:
            dev.copy_(host)
            return dev.untyped_storage(), None
        self.side.wait_stream(self._compute())  # the block may still be in use by compute work queued before
        with torch.cuda.stream(self.side):
            dev.copy_(host, non_blocking=True)
            return dev.untyped_storage(), self.side.record_event()

    def wait(self, event) -> None:
        """Order the compute stream's further work after `event` (a copy's end)."""
        if event is not None:
            self._compute().wait_event(event)

    def finish(self) -> None:
        if self.side is not None:
            self._compute().wait_stream(self.side)


class _Step:
    """One entry into the context: the packing order (for prefetch), the in-flight list, the dedup map."""

    def __init__(self):
        self.order: list[_Entry | None] = []
        self.inflight: dict[int, _Entry] = {}  # id → entry, oldest first
        self.inflight_bytes = 0
        self.by_storage: dict[tuple, tuple[StorageWeakRef, _Entry]] = {}
        self.open = True


class _Entry:
    """One moved storage: its host copy, and while on the device, the device storage and the copy event
    the compute stream must wait on before using (or freeing) it."""

    __slots__ = ("step", "index", "key", "nbytes", "host", "storage", "event", "in_flight", "unpacked", "pending",
                 "refs")

    def __init__(self, step: _Step, key: tuple, nbytes: int, host: torch.Tensor):
        self.step, self.key, self.nbytes, self.host = step, key, nbytes, host
        self.index = len(step.order)
        self.storage = self.event = None
        self.in_flight = self.unpacked = False
        self.pending = 0  # handles packed and not yet unpacked
        self.refs = 0  # live handles


class _Handle:
    """What autograd keeps for a moved tensor: its entry and the view to rebuild on the restored storage."""

    __slots__ = ("owner", "entry", "dtype", "offset", "size", "stride")

    def __init__(self, owner: ActivationOffloader, entry: _Entry, t: torch.Tensor):
        self.owner, self.entry = owner, entry
        self.dtype, self.offset, self.size, self.stride = t.dtype, t.storage_offset(), t.shape, t.stride()
        entry.refs += 1
        entry.pending += 1

    def __del__(self):
        try:
            self.owner._drop_ref(self.entry)
        except Exception:  # interpreter shutdown: nothing left to order
            pass


class ActivationOffloader(torch.autograd.graph.saved_tensors_hooks):
    """Saved tensors on `device` wait in host memory between forward and backward (module docstring).

    Enter it once per step around forward and backward; the host buffers are reused from step to step.
    `min_bytes`: smaller storages stay on the device. `inflight_bytes`: how much newer moved data a GPU
    tensor waits behind before it is released (time for its copy to finish). `prefetch_bytes`: how much of
    what backward needs next an unpack makes resident (at least one tensor). `stats` counts what happened
    (cumulative)."""

    def __init__(self, device: torch.device | str, min_bytes: int = DEFAULT_MIN_BYTES,
                 inflight_bytes: int = DEFAULT_INFLIGHT_BYTES, prefetch_bytes: int = DEFAULT_PREFETCH_BYTES):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.min_bytes, self.inflight_bytes, self.prefetch_bytes = min_bytes, inflight_bytes, prefetch_bytes
        self.pool = _HostPool(pin=self.device.type == "cuda")
        self.copies = _Copies(self.device)
        self.step: _Step | None = None
        self.stats = dict.fromkeys(("packed", "kept", "moved", "moved_bytes", "shared", "fetched_ahead",
                                    "fetched_on_demand", "used_in_flight"), 0)
        super().__init__(self._pack, self._unpack)

    # -- the context ---------------------------------------------------------------------------------
    def __enter__(self):
        if self.step is not None:
            raise RuntimeError("ActivationOffloader is already active (enter it once per step)")
        self.step = _Step()
        super().__enter__()
        return self

    def __exit__(self, *exc):
        try:
            super().__exit__(*exc)
        finally:
            step, self.step = self.step, None
            step.open = False
            for entry in list(step.inflight.values()):
                self._release(entry)
            step.order.clear()
            step.by_storage.clear()
            self.copies.finish()

    # -- pack ----------------------------------------------------------------------------------------
    def _movable(self, t: torch.Tensor) -> bool:
        if type(t) not in (torch.Tensor, nn.Parameter) or t.device != self.device or t.layout != torch.strided:
            return False
        if t.is_quantized or t.is_nested or t.is_conj() or t.is_neg():
            return False
        nbytes = t.untyped_storage().nbytes()
        if nbytes < self.min_bytes or nbytes > MAX_STORAGE_PER_VIEW * t.numel() * t.element_size():
            return False
        if torch._C._current_graph_task_id() != -1:  # saved during backward: used at once
            return False
        return not _derived_from_parameter(t)

    def _pack(self, t: torch.Tensor):
        self.stats["packed"] += 1
        step = self.step
        if step is None or not self._movable(t):
            self.stats["kept"] += 1
            return t
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t._version)
        found = step.by_storage.get(key)
        if found is not None and not found[0].expired() and found[1].refs > 0:
            self.stats["shared"] += 1
            return _Handle(self, found[1], t)
        nbytes = storage.nbytes()
        entry = _Entry(step, key, nbytes, self.pool.take(nbytes))
        entry.event = self.copies.to_host(entry.host, storage)
        entry.storage, entry.in_flight = storage, True
        step.order.append(entry)
        step.by_storage[key] = (StorageWeakRef(storage), entry)
        step.inflight[id(entry)] = entry
        step.inflight_bytes += nbytes
        self.stats["moved"] += 1
        self.stats["moved_bytes"] += nbytes
        handle = _Handle(self, entry, t)
        while len(step.inflight) > 1:  # release the oldest once more than inflight_bytes have followed it
            oldest = next(iter(step.inflight.values()))
            if step.inflight_bytes - oldest.nbytes <= self.inflight_bytes:
                break
            self._release(oldest)
        return handle

    def _release(self, entry: _Entry) -> None:
        """An in-flight entry gives up its device tensor (the compute stream waits on the copy first)."""
        self._leave_inflight(entry)
        self.copies.wait(entry.event)
        entry.storage = entry.event = None

    def _leave_inflight(self, entry: _Entry) -> None:
        if entry.in_flight:
            entry.in_flight = False
            del entry.step.inflight[id(entry)]
            entry.step.inflight_bytes -= entry.nbytes

    # -- unpack --------------------------------------------------------------------------------------
    def _unpack(self, saved):
        if not isinstance(saved, _Handle):
            return saved
        entry = saved.entry
        if entry.storage is None:
            entry.storage, entry.event = self.copies.to_device(entry.host)
            self.stats["fetched_on_demand"] += 1
        elif entry.in_flight:
            self.stats["used_in_flight"] += 1
        self._leave_inflight(entry)
        self.copies.wait(entry.event)
        out = torch.empty(0, dtype=saved.dtype, device=self.device).set_(
            entry.storage, saved.offset, saved.size, saved.stride)
        if not entry.unpacked:
            entry.unpacked = True
            self._prefetch(entry)
        entry.pending -= 1
        if entry.pending <= 0:  # no further unpack expected: the restored storage lives on in `out` only
            entry.storage = entry.event = None
        return out

    def _prefetch(self, entry: _Entry) -> None:
        """Make resident what backward is expected to unpack next: the entries packed right after `entry` and
        not unpacked yet (saved by the same autograd node, which unpacks them in packing order), and those
        packed just before it — at least the next one, and `prefetch_bytes` of them."""
        step = entry.step
        if not step.open:
            return
        for j in range(entry.index + 1, min(len(step.order), entry.index + 1 + PREFETCH_SCAN)):
            other = step.order[j]
            if other is not None and other.unpacked:
                break
            self._fetch_ahead(other)
        covered = 0
        for j in range(entry.index - 1, max(-1, entry.index - 1 - PREFETCH_SCAN), -1):
            other = step.order[j]
            if other is None or other.unpacked:
                continue
            self._fetch_ahead(other)
            covered += other.nbytes
            if covered >= self.prefetch_bytes:
                break

    def _fetch_ahead(self, entry: _Entry | None) -> None:
        if entry is not None and entry.storage is None:
            entry.storage, entry.event = self.copies.to_device(entry.host)
            self.stats["fetched_ahead"] += 1

    # -- an entry's end --------------------------------------------------------------------------------
    def _drop_ref(self, entry: _Entry) -> None:
        entry.refs -= 1
        if entry.refs > 0:
            return
        step = entry.step
        self._leave_inflight(entry)
        self.copies.wait(entry.event)  # a copy may still read or write the device storage
        entry.storage = entry.event = None
        if step.by_storage.get(entry.key, (None, None))[1] is entry:
            del step.by_storage[entry.key]
        if entry.index < len(step.order) and step.order[entry.index] is entry:
            step.order[entry.index] = None
        self.pool.give(entry.host)  # the side stream orders its next use after this one
        entry.host = None
