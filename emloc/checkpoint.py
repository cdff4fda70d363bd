"""Weights read from a checkpoint's safetensors files when their turn comes (docs/method.md "Memory").

A big model is never loaded whole: its skeleton is built with parameters on the `meta` device (no memory),
and `CheckpointReader.materialize(module)` reads one submodule's tensors from the files (memory-mapped,
one tensor at a time) onto a device; `release(module)` sends them back to `meta`. The reader opens the
files' headers once and knows which file holds which tensor (a sharded checkpoint's index is not needed).

Checkpoint keys may differ from module names (transformers renames some families' keys on load, e.g.
InternVL's `language_model.model.` -> `model.language_model.`): `renames` is a list of (regex, replacement)
applied to each key, the first match winning, as the library does; or `rename`, a function of the key, where
the library's own renaming is more than a list of patterns (transformers' scoped conversion mapping).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from safetensors import safe_open
from torch import nn


def safetensors_files(folder: str | os.PathLike) -> list[Path]:
    """The `*.safetensors` weight files directly in `folder`, sorted (shards in order)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no .safetensors weights")
    return files


class CheckpointReader:
    """Module name -> tensor, read lazily from safetensors files."""

    def __init__(self, files: Iterable[str | os.PathLike], renames: Sequence[tuple[str, str]] = (),
                 rename: Callable[[str], str] | None = None):
        self.files = [Path(f) for f in files]
        self.renames = [(re.compile(pattern), replacement) for pattern, replacement in renames]
        self.rename = rename  # when given, it replaces `renames`
        self.where: dict[str, tuple[Path, str]] = {}  # module-side name -> (file, checkpoint key)
        for file in self.files:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    self.where[self._rename(key)] = (file, key)
        self._local = threading.local()  # open files, per thread (a prefetch thread reads beside the model)
        self._count = threading.Lock()
        self.bytes_read = 0  # bytes of tensors read from the files so far (as stored there)

    def _rename(self, key: str) -> str:
        if self.rename is not None:
            return self.rename(key)
        for pattern, replacement in self.renames:
            if pattern.search(key):
                return pattern.sub(replacement, key, count=1)
        return key

    def merged(self, other: "CheckpointReader") -> "CheckpointReader":
        """One reader over both readers' tensors (`other`'s names win), e.g. a model's files and its emulator's."""
        both = CheckpointReader([])
        both.files, both.where = self.files + other.files, {**self.where, **other.where}
        return both

    @property
    def _handles(self) -> dict[Path, object] | None:  # open only inside `reading()`, in this thread
        return getattr(self._local, "handles", None)

    @_handles.setter
    def _handles(self, value: dict[Path, object] | None) -> None:
        self._local.handles = value

    def __contains__(self, name: str) -> bool:
        return name in self.where

    @contextlib.contextmanager
    def reading(self):
        """Keep the files open for several reads; they are closed (unmapped) when the block ends.

        safetensors maps a file into memory while it is open, and every page read stays counted in the
        process's resident memory until the map goes: holding the files open for a whole pass would show a
        peak that grows with every block read, although the tensors themselves were freed.
        """
        if self._handles is not None:  # nested: the outer block closes
            yield self
            return
        self._handles = {}
        try:
            yield self
        finally:
            self._handles = None

    def _handle(self, file: Path):
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt")
        return self._handles[file]

    def read(self, name: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor the model calls `name`, on `device` (cast to `dtype` when given and floating)."""
        if name not in self.where:
            raise KeyError(f"the checkpoint has no tensor for {name!r}; is it the model the run was made with?")
        file, key = self.where[name]
        with self.reading():  # the tensor is a view of the file's map: copied out while the map is alive
            mapped = self._handle(file).get_tensor(key)
            tensor = mapped.to(dtype) if dtype is not None and mapped.is_floating_point() else mapped
            tensor = tensor.to(device)  # straight from the map to the device: one copy
            if tensor.data_ptr() == mapped.data_ptr():  # neither cast nor moved: still the map, copy it out
                tensor = tensor.clone()
        with self._count:
            self.bytes_read += mapped.nbytes
        return tensor

    def state_of(self, module: nn.Module, prefix: str, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None, skip: Iterable[str] = ()) -> dict[str, torch.Tensor]:
        """`module`'s parameters and persistent buffers named in the checkpoint (under `prefix.`), read.

        Names in `skip` (relative to `module`) are left out, e.g. tied weights the model fills itself.
        """
        skip = set(skip)
        full = f"{prefix}." if prefix else ""
        names = [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()]
        with self.reading():
            return {n: self.read(full + n, device, dtype) for n in names if n not in skip and full + n in self.where}

    def materialize(self, module: nn.Module, prefix: str, device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = None) -> nn.Module:
        """Read every still-`meta` parameter and buffer of `module` from the files, in place; returns `module`.

        Raises a KeyError naming the first parameter the checkpoint lacks.
        """
        wanted = [n for n, p in module.named_parameters() if p.device.type == "meta"]
        wanted += [n for n, b in module.named_buffers() if b.device.type == "meta"]
        full = f"{prefix}." if prefix else ""
        # one tensor at a time, each read closing the file again: a whole model's dense rest read into a skeleton
        # would otherwise keep every page it touched resident until the end
        state = {n: self.read(full + n, device, dtype) for n in wanted}
        with torch.no_grad():
            for name, tensor in state.items():
                owner_name, _, leaf = name.rpartition(".")
                owner = module.get_submodule(owner_name) if owner_name else module
                if leaf in owner._parameters:
                    owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
                else:
                    owner._buffers[leaf] = tensor
        return module

    def close(self) -> None:
        self._handles = None if self._handles is None else {}


def release(module: nn.Module) -> None:
    """Send `module`'s parameters back to `meta`: the memory they held is freed, the structure stays.

    Memory freed on the CPU is also handed back to the system (`return_freed_memory`).
    """
    on_cpu = False
    with torch.no_grad():
        for owner in module.modules():
            for leaf, param in list(owner._parameters.items()):
                if param is not None and param.device.type != "meta":
                    on_cpu = on_cpu or param.device.type == "cpu"
                    owner._parameters[leaf] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)
    if on_cpu:
        return_freed_memory()


def _libc():
    try:
        return ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None
    except OSError:  # not glibc (musl, ...): nothing to trim
        return None


_LIBC = _libc()


def return_freed_memory() -> None:
    """Give the heap memory freed so far back to the system (glibc's `malloc_trim(0)`; elsewhere nothing).

    glibc keeps freed memory for its own reuse, and after a large free it raises its mmap threshold, so the next
    block-sized tensors come from the heap too: a streamed pass then holds the blocks it has already freed.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
STREAMING_MMAP_THRESHOLD = 4 * 1024 ** 2


def map_large_allocations(threshold: int = STREAMING_MMAP_THRESHOLD) -> None:
    """Serve every allocation above `threshold` bytes from its own memory map (glibc; elsewhere nothing).

    By default glibc raises its mmap threshold after each large free (up to 32 MiB), so a pass that reads and
    frees block-sized tensors over and over ends up serving them from the heap, where freed memory stays
    resident between trims; measured on InternVL (width 1024): the streamed pass peaked at 861 MiB with 2 layers
    and 948 MiB with 8, and at 637 / 647 MiB with a fixed 4 MiB threshold. A fixed threshold also stops the
    adjustment. Called by the stages that stream a model (not by training, whose activations it would slow).
    """
    if _LIBC is not None:
        _LIBC.mallopt(M_MMAP_THRESHOLD, int(threshold))


def meta_names(module: nn.Module) -> list[str]:
    """Parameters of `module` still on `meta` (nothing loaded yet)."""
    return [n for n, p in module.named_parameters() if p.device.type == "meta"]


@dataclass
class BlockCache:
    """Blocks kept on the device after their first read, up to `max_bytes`, for every model that shares the cache
    (a preview's full-model variants differ only in LoRA hooks, so they can share their blocks' weights); and the
    weights outside the blocks, which every such model holds anyway (`rest`, not counted in `max_bytes`)."""

    max_bytes: int
    blocks: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    used: int = 0
    rest: dict[str, torch.Tensor] = field(default_factory=dict)

    def __contains__(self, block: str) -> bool:
        return block in self.blocks

    def offer(self, block: str, tensors: dict[str, torch.Tensor]) -> None:
        size = sum(t.nbytes for t in tensors.values())
        if block not in self.blocks and self.used + size <= self.max_bytes:
            self.blocks[block], self.used = dict(tensors), self.used + size

    def clear(self) -> None:
        self.blocks, self.used, self.rest = {}, 0, {}


class StreamedForward:
    """Run a skeleton model whose blocks are read from the files just before each one runs and freed after it.

    Everything outside `blocks` is read once (`materialize` of the rest). `lora` ({layer name: (A, s·B)}, e.g.
    `emloc.adapter_factors` of a saved adapter) adds `(x Aᵀ)(s·B)ᵀ` to those layers' outputs, which is what PEFT's
    unmerged adapter computes, on a dense layer or an emulator's factored one. `reader`: the files, or anything
    that reads as a CheckpointReader does (emloc.host_cache.CachedReader: what was read waits in host RAM).
    Memory: the rest + one block, whatever the depth; each forward of the model reads every block once.
    `remove()` takes the hooks off.

    `prefetch`: the next block is read (and, on a GPU, copied on a side stream) in a background thread while the
    current one runs: the rest + two blocks. `cache`: blocks that stay on the device after their first read, up
    to its budget, and are not read again (shared by models of the same weights). Neither changes any result.
    """

    def __init__(self, model: nn.Module, reader: CheckpointReader, blocks: Sequence[str],
                 device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                 lora: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None, prefetch: bool = False,
                 cache: BlockCache | None = None):
        self.model, self.reader, self.device, self.dtype = model, reader, torch.device(device), dtype
        self.blocks, self.cache = list(blocks), cache
        self.handles = []
        self._pending: tuple[str, Future] | None = None  # the next block, being read
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="emloc-prefetch") if prefetch else None
        self._side = torch.cuda.Stream(self.device) if prefetch and self.device.type == "cuda" else None
        for name in self.blocks:
            block = model.get_submodule(name)
            self.handles.append(block.register_forward_pre_hook(self._reader_of(name)))
            self.handles.append(block.register_forward_hook(lambda module, args, output: release(module)))
        self.lora_bytes = 0
        for name, (a, b) in (lora or {}).items():
            a, b = a.to(self.device), b.to(self.device)
            self.lora_bytes += a.nbytes + b.nbytes
            self.handles.append(model.get_submodule(name).register_forward_hook(_lora_hook(a, b)))
        in_blocks = {id(p) for name in blocks for p in model.get_submodule(name).parameters()}
        rest = [n for n, p in model.named_parameters() if p.device.type == "meta" and id(p) not in in_blocks]
        shared = self.cache.rest if self.cache is not None else {}
        for name in rest:
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner) if owner else model
            if name not in shared:
                shared[name] = self.reader.read(name, self.device, self.dtype)
            module._parameters[leaf] = nn.Parameter(shared[name], requires_grad=False)

    @property
    def held_bytes(self) -> int:
        """Bytes this stream holds on the device beside the model's parameters: cached blocks not running now, the
        block read ahead, the LoRA factors."""
        in_model = {p.data_ptr() for p in self.model.parameters() if p.device.type != "meta"}
        held = [t for block in (self.cache.blocks.values() if self.cache is not None else ()) for t in block.values()]
        if self._pending is not None:  # waits for the read under way: it is held as soon as it starts
            held += list(self._pending[1].result()[0].values())
        return sum(t.nbytes for t in held if t.data_ptr() not in in_model) + self.lora_bytes

    def _fetch(self, prefix: str, names: list[str], background: bool = False) -> tuple[dict[str, torch.Tensor], object]:
        """`prefix`'s tensors on the device; read in the `background`, on a GPU they are copied on the side stream
        and the CUDA event that marks the copy done comes with them (else None)."""
        side = self._side if background else None
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext(), self.reader.reading():
            tensors = {n: self.reader.read(f"{prefix}.{n}", self.device, self.dtype) for n in names}
            event = None
            if side is not None:
                event = torch.cuda.Event()
                event.record(side)
        return tensors, event

    def _take(self, prefix: str, names: list[str]) -> dict[str, torch.Tensor]:
        if self.cache is not None and prefix in self.cache:
            return self.cache.blocks[prefix]
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == prefix:
            tensors, event = pending[1].result()
            if event is not None:  # the copy ran on the side stream: the compute waits for it, and owns the memory
                current = torch.cuda.current_stream(self.device)
                current.wait_event(event)
                for tensor in tensors.values():
                    tensor.record_stream(current)
        else:
            if pending is not None:  # the model ran its blocks in another order: that read is dropped
                pending[1].result()
            tensors, _ = self._fetch(prefix, names)
        if self.cache is not None:
            self.cache.offer(prefix, tensors)
        return tensors

    def _prefetch_after(self, prefix: str) -> None:
        if self._pool is None:
            return
        later = self.blocks[self.blocks.index(prefix) + 1:]
        upcoming = next((b for b in later if self.cache is None or b not in self.cache), None)
        if upcoming is None:
            return
        block = self.model.get_submodule(upcoming)
        names = [n for n, p in block.named_parameters() if p.device.type == "meta"]
        self._pending = (upcoming, self._pool.submit(self._fetch, upcoming, names, True))

    def _reader_of(self, prefix: str):
        def hook(module: nn.Module, args) -> None:
            names = [n for n, p in module.named_parameters() if p.device.type == "meta"]
            tensors = self._take(prefix, names)
            for name in names:
                owner, _, leaf = name.rpartition(".")
                sub = module.get_submodule(owner) if owner else module
                sub._parameters[leaf] = nn.Parameter(tensors[name], requires_grad=False)
            self._prefetch_after(prefix)
        return hook

    def remove(self) -> None:
        """Take the hooks off and stop the prefetch thread (a read under way is finished and dropped)."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if self._pending is not None:
            self._pending[1].result()
            self._pending = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _lora_hook(a: torch.Tensor, b: torch.Tensor):
    def hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        return output + ((x.to(a.dtype) @ a.T) @ b.T).to(output.dtype)
    return hook
