"""Weights that wait in host RAM after their first read from the files (docs/method.md, "Memory").

A model streamed block by block reads every block on every forward. Where the host has room, `CachedReader` keeps
what it has read in RAM, so later forwards (and later models of the same weights) copy it from RAM instead of the
disk: with room for the whole model this is the "offload" preview (the model waits in RAM, each block moved to
the GPU as it runs); with less, the first blocks wait in RAM and the rest come from the files.

On a GPU run the tensors kept are page-locked ("pinned") in place, so their copies to the GPU run asynchronously,
on the stream that reads the next block while one runs (emloc.checkpoint.StreamedForward's prefetch).
"""

from __future__ import annotations

import logging
import threading

import torch

from .checkpoint import STREAMING_MMAP_THRESHOLD, CheckpointReader

log = logging.getLogger(__name__)


class CachedReader:
    """`reader`'s tensors, kept in host RAM after their first read, up to `max_bytes` (None: all of them).

    It reads as a CheckpointReader does (`read`, `reading`, `in`), so StreamedForward takes it; `bytes_read` counts
    the bytes read from the files. `pin`: page-lock what is kept (only where CUDA is). `close()` unpins.
    """

    def __init__(self, reader: CheckpointReader, max_bytes: int | None = None, pin: bool = False):
        self.reader, self.max_bytes, self.pin = reader, max_bytes, pin
        self.held: dict[tuple[str, torch.dtype | None], torch.Tensor] = {}
        self.used = 0
        self.pinned: list[int] = []  # addresses page-locked in place, unlocked by close()
        self._lock = threading.Lock()  # a prefetch thread reads beside the model

    @property
    def bytes_read(self) -> int:
        return self.reader.bytes_read

    def __contains__(self, name: str) -> bool:
        return name in self.reader

    def reading(self):
        return self.reader.reading()

    def _room(self) -> bool:
        return self.max_bytes is None or self.used < self.max_bytes

    def read(self, name: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor the model calls `name` on `device`: from RAM when it was read before, else from the files
        (kept in RAM when there is room; read straight to `device` when there is none)."""
        held = self.held.get((name, dtype))
        if held is None:
            if not self._room():
                return self.reader.read(name, device, dtype)
            held = self.reader.read(name, "cpu", dtype)
            with self._lock:
                if self._room() and (self.max_bytes is None or self.used + held.nbytes <= self.max_bytes):
                    if self.pin and held.nbytes >= STREAMING_MMAP_THRESHOLD and _pin_in_place(held):
                        self.pinned.append(held.data_ptr())
                    self.held[(name, dtype)], self.used = held, self.used + held.nbytes
        return held.to(device, non_blocking=held.is_pinned())

    def close(self) -> None:
        """Unpin what was pinned (before the memory is freed, as CUDA requires) and drop what is kept."""
        from torch.cuda import _pin_memory_utils

        if self.pinned:
            torch.cuda.synchronize()  # no copy from the pinned pages is still under way
        with self._lock:
            while self.pinned:
                _pin_memory_utils.unpin_memory(self.pinned.pop())
            self.held, self.used = {}, 0

    def __del__(self):
        if self.pinned:
            self.close()


def _pin_in_place(tensor: torch.Tensor) -> bool:
    """Page-lock `tensor`'s own memory (cudaHostRegister, as torch.distributed's checkpoint stager does); False, and
    the tensor stays pageable (copied synchronously), where CUDA refuses. `tensor.pin_memory()` would copy it into
    the pinned allocator's blocks, rounded up to a power of two: up to twice the model's RAM. Only tensors of at
    least STREAMING_MMAP_THRESHOLD bytes (their own memory map, page-aligned: checkpoint.map_large_allocations)."""
    from torch.cuda import _pin_memory_utils

    try:
        _pin_memory_utils.pin_memory(tensor.data_ptr(), tensor.nbytes)
    except RuntimeError as err:
        log.warning("could not pin %d MiB of host memory (%s); it is copied unpinned", tensor.nbytes >> 20, err)
        return False
    return True
