"""Copies of tensors into host memory for checkpoint snapshots (runtime/checkpoint_writer.py): one reusable
buffer, pinned under CUDA, and a fast CPU copy."""

from __future__ import annotations

import numpy as np
import torch

_ALIGN = 4096  # byte alignment of each tensor in the buffer


class HostBuffer:
    """One host allocation holding a snapshot, reused while the layout stays the same. Under CUDA it is pinned in
    place (cudaHostRegister): exactly its size, where torch's pinned allocator may round a block up to a power
    of two; if pinning fails the copies are synchronous, no less correct."""

    def __init__(self, pinned: bool):
        self.pinned, self.layout, self.slab, self._registered = pinned, None, None, None

    def reserve(self, tensors: list[torch.Tensor], fault_in: bool = False) -> list[int]:
        """Allocate (and pin) the slab for tensors of these shapes and dtypes unless it already fits them; returns
        each one's byte offset (the tensors may be on the meta device: only shapes and dtypes are read). Pinning
        faults the pages in; `fault_in` touches them when unpinned (else the first copy pays it)."""
        layout = [(tuple(t.shape), t.dtype) for t in tensors]
        sizes = [t.numel() * t.element_size() for t in tensors]
        offsets = np.cumsum([0] + [-(-n // _ALIGN) * _ALIGN for n in sizes]).tolist()
        if layout != self.layout:
            self.release()  # the old one first
            self.slab = torch.empty(max(1, offsets[-1]), dtype=torch.uint8)
            if self.pinned:
                try:
                    if int(torch.cuda.cudart().cudaHostRegister(self.slab.data_ptr(), self.slab.numel(), 0)) == 0:
                        self._registered = self.slab.data_ptr()
                except Exception:  # no cudart: pageable memory
                    pass
            if fault_in and self._registered is None:
                self.slab[::4096].fill_(0)
            self.layout = layout
        return offsets

    def views(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Views of the slab shaped as `tensors` (reserved first)."""
        offsets = self.reserve(tensors)
        return [self.slab[o:o + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
                for o, t in zip(offsets, tensors)]

    def release(self) -> None:
        if self._registered is not None:
            torch.cuda.cudart().cudaHostUnregister(self._registered)
            self._registered = None
        self.slab, self.layout = None, None


def copy_tensor(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst ← src; between contiguous CPU tensors as numpy's memcpy (torch's CPU copy_ ran at ≈ 1 GB/s on the
    2-core machine, its thread pool contending, against ≈ 8 GB/s), else a (non-blocking) torch copy."""
    if dst.is_cuda or src.is_cuda or not (dst.is_contiguous() and src.is_contiguous()) or dst.dtype != src.dtype:
        dst.copy_(src, non_blocking=True)
    else:
        np.copyto(_bytes(dst), _bytes(src))


def _bytes(t: torch.Tensor) -> np.ndarray:
    return t.detach().reshape(-1).view(torch.uint8).numpy()  # shares t's memory (a parameter's too)


def host_copy(tensors: list[torch.Tensor], buffer: HostBuffer | None) -> list[torch.Tensor]:
    """The tensors on the host: copied into `buffer` (queued device-to-host copies, one sync per device), or,
    without one, CPU tensors as they are and device tensors copied."""
    if buffer is None:
        return [t.cpu() for t in tensors]
    views = buffer.views(tensors)
    for dst, src in zip(views, tensors):
        copy_tensor(dst, src)
    for device in {t.device for t in tensors if t.is_cuda}:
        torch.cuda.current_stream(device).synchronize()
    return views
