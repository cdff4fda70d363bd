"""Run a model's code on tensors that have shapes, dtypes and devices but no data, and count its memory.

`traced()` opens PyTorch's FakeTensorMode (no data is ever allocated, so a 38 B model "runs" on a laptop) with a
`MemoryCounter` inside it: every new storage adds its bytes to its device's live total, and a finalizer on the
storage takes them off again when the last tensor viewing it dies, so `peak` is the high-water mark of live
bytes per device type ("gpu", "cpu"), what `torch.cuda.max_memory_allocated` measures on a GPU (without the
caching allocator's rounding). The GPU is stood for by a device named "gpu" (`trace_device`: fake `cuda` tensors
cannot record autograd history on a CPU-only torch), with two gaps left:

- CUDA autocast cannot run: `torch.autocast("cuda")` disables itself without a GPU, and switching it on anyway
  aborts the process (its cast cache opens a CUDA device guard in C++). A trace runs without autocast, as a CPU
  run does: PEFT computes the LoRA path in float32 (its weights' dtype), where autocast on a GPU would run it in
  bf16, so LoRA inputs are counted at 4 bytes where the card holds 2 (the planner counts them at 4 too);
- values are not there: a read of one (`.item()`, `.tolist()`, `if tensor:`) answers STAND_IN_VALUE, and code
  whose memory depends on the values (eigenvalue clamps, image decoding) gets a seam from its caller instead.

`materialize_fake` replaces a `meta` module's parameters and buffers by fake tensors (module initialisers and
`Module.to` do not work on fakes); `ShapeReader` is a `CheckpointReader` whose reads return fake tensors of the
checkpoint's recorded shapes, so code that streams weights from files runs unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .checkpoint import CheckpointReader

log = logging.getLogger(__name__)
TRACE_DEVICE = "gpu"  # the name the trace's stand-in for a GPU goes by (see trace_device)


@dataclass
class MemoryCounter(TorchDispatchMode):
    """Live and peak bytes of tensor storages per device type, counted as ops create them."""

    live: dict[str, int] = field(default_factory=dict)
    peak: dict[str, int] = field(default_factory=dict)
    _seen: set = field(default_factory=set)
    _tests: dict = field(default_factory=dict)  # storage -> the bool a test computed on the stand-in values

    def __post_init__(self) -> None:
        super().__init__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            kind = args[0].dtype
            if kind == torch.bool:
                return self._tests.get(args[0].untyped_storage()._cdata, True)
            return float(STAND_IN_VALUE) if kind.is_floating_point else STAND_IN_VALUE
        if func is torch.ops.aten.equal.default:  # all-ones stand-ins are equal where the shapes are
            return args[0].shape == args[1].shape
        try:
            out = func(*args, **(kwargs or {}))
        except Exception as error:  # raised on the autograd engine's device thread, it would abort the process
            # (torch's Python device guard cannot unwind it): say what failed before it does
            log.error("traced op %s failed: %s", func, error)
            raise
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._count(tensor)
        if isinstance(out, torch.Tensor) and out.dtype == torch.bool:
            self._follow_test(func, args, out)
        return out

    def _follow_test(self, func, args, out: torch.Tensor) -> None:
        """Record what a test gives on the stand-in values (see STAND_IN_VALUE)."""
        name = func.overloadpacket.__name__
        first = args[0] if args else None
        known = self._tests.get(first.untyped_storage()._cdata, True) if isinstance(first, torch.Tensor) else True
        if name in _COMPARISONS and len(args) > 1 and isinstance(args[1], (int, float)):
            value = _COMPARISONS[name](float(STAND_IN_VALUE), float(args[1]))
        elif name in ("isfinite", "all", "any"):
            value = True if name == "isfinite" else known
        elif name in ("isnan", "isinf"):
            value = False
        elif name in ("logical_not", "bitwise_not"):
            value = not known
        else:
            return
        self._tests[out.untyped_storage()._cdata] = value

    def _count(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata  # one StorageImpl however many views (and Python wrappers) it has
        if key in self._seen:
            return
        kind, size = tensor.device.type, storage.nbytes()
        self._seen.add(key)
        self.live[kind] = self.live.get(kind, 0) + size
        self.peak[kind] = max(self.peak.get(kind, 0), self.live[kind])
        weakref.finalize(storage, self._free, key, kind, size).atexit = False

    def _free(self, key: int, kind: str, size: int) -> None:
        self._seen.discard(key)
        self._tests.pop(key, None)
        self.live[kind] -= size

    def reset_peak(self) -> None:
        """Start a new high-water mark from what is live now (`torch.cuda.reset_peak_memory_stats`)."""
        self.peak = dict(self.live)


# Reads of a fake tensor's values (`.item()`, `.tolist()`, `if t:`, `int(t)`: aten._local_scalar_dense). The values a
# trace runs on are stand-ins, all read as 1: an index into cached data (a trace's cache holds two of everything), a
# step count (Adam divides by 1 - beta**step, so not 0). A test is answered as it would be on those ones: comparisons
# with a number, finiteness checks and their all/any/not are followed (`MemoryCounter._tests`), so `if scale <= 0:
# raise` passes as `if torch.isfinite(x).all()` does.
STAND_IN_VALUE = 1
_COMPARISONS = {"le": float.__le__, "lt": float.__lt__, "ge": float.__ge__, "gt": float.__gt__, "eq": float.__eq__,
                "ne": float.__ne__}


class _TraceDeviceModule:
    """`torch.gpu`: what PyTorch asks of a device's module (activation checkpointing saves and restores its RNG)."""

    def is_initialized(self) -> bool:
        return True

    def is_available(self) -> bool:
        return True

    def current_device(self) -> int:
        return 0

    def device_count(self) -> int:
        return 1

    def _is_in_bad_fork(self) -> bool:
        return False

    def manual_seed_all(self, seed: int) -> None:
        pass

    def device(self, index):
        return contextlib.nullcontext()

    def get_rng_state(self, device=None) -> torch.Tensor:
        return torch.zeros(16, dtype=torch.uint8)

    def set_rng_state(self, state, device=None) -> None:
        pass

    def get_amp_supported_dtype(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]


def trace_device() -> torch.device:
    """The device that stands for the GPU in a trace: PyTorch's PrivateUse1 backend, named "gpu".

    Fake tensors on `cuda` do not work on a CPU-only torch 2.13: indexing (`t[:, None]`), `.to("cuda")` and every
    op that records autograd history (the autocast kernels it passes open a CUDA device guard, which aborts the
    process) need a CUDA device guard the build lacks. PrivateUse1 takes a device guard written in Python (torch's
    own dummy one), so fake tensors on it index, move, record and run backward like any device, and a tensor on it
    meeting a CPU tensor raises the same "Expected all tensors to be on the same device" a GPU would.
    """
    from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

    if torch._C._get_privateuse1_backend_name() != TRACE_DEVICE:
        _setup_privateuseone_for_python_backend(TRACE_DEVICE, backend_module=_TraceDeviceModule())
        library = torch.library.Library("aten", "IMPL")
        library.impl("scaled_dot_product_attention", _gpu_attention, "AutogradPrivateUse1")
        _KERNELS.append(library)
    return torch.device(TRACE_DEVICE)


def _gpu_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False):
    """Scaled-dot-product attention on the stand-in GPU through the kernel a CUDA GPU picks for half-precision
    inputs: flash attention without a mask, memory-efficient attention with one. Each keeps the output and a float32
    log-sum-exp per query; left to itself the stand-in device would take the math path, which materialises every
    score (B·heads·n² in float32), which the card does not hold. Registered as the device's autograd kernel of
    `aten::scaled_dot_product_attention`, so a recomputation on the autograd engine's thread takes it too."""
    if query.dtype not in (torch.bfloat16, torch.float16):
        return torch.ops.aten._scaled_dot_product_attention_math(query, key, value, attn_mask, dropout_p, is_causal,
                                                                 scale=scale, enable_gqa=enable_gqa)[0]
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        key = key.repeat_interleave(query.shape[-3] // key.shape[-3], dim=-3)
        value = value.repeat_interleave(query.shape[-3] // value.shape[-3], dim=-3)
    if attn_mask is None:
        return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False,
                                                                  scale=scale)[0]
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device)  # the additive bias it takes
    bias = attn_mask.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    return torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, bias, query.requires_grad,
                                                                  dropout_p, is_causal, scale=scale)[0]


_KERNELS: list = []  # the torch.library registrations of the stand-in GPU, kept alive for the process


@contextlib.contextmanager
def traced() -> Iterator[MemoryCounter]:
    """Fake tensors with stand-in values and a memory counter (see the module docstring); yields the counter."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    counter = MemoryCounter()
    trace_device()
    with FakeTensorMode(allow_non_fake_inputs=True), counter:
        yield counter


def materialize_fake(module: nn.Module, device: torch.device | str, dtype: torch.dtype | None = None,
                     dtype_of: Callable[[str, torch.Tensor], torch.dtype | None] | None = None) -> nn.Module:
    """Give every `meta` parameter and buffer of `module` a fresh tensor on `device` (call inside `traced`).

    Floating tensors get `dtype` (None: keep theirs) unless `dtype_of(name, tensor)` names another; parameters keep
    their `requires_grad`. Returns `module`.
    """
    device = torch.device(device)
    for owner_name, owner in module.named_modules():
        for table in (owner._parameters, owner._buffers):
            for leaf, value in list(table.items()):
                if value is None or value.device.type != "meta":
                    continue
                name = f"{owner_name}.{leaf}" if owner_name else leaf
                kind = dtype_of(name, value) if dtype_of is not None else None
                kind = kind or (dtype if dtype is not None and value.is_floating_point() else value.dtype)
                empty = torch.empty(value.shape, dtype=kind, device=device)
                table[leaf] = nn.Parameter(empty, requires_grad=value.requires_grad) if table is owner._parameters \
                    else empty
    return module


class ShapeReader(CheckpointReader):
    """A `CheckpointReader` over recorded shapes: `read` returns a fake tensor of the name's shape and dtype."""

    def __init__(self, shapes: Mapping[str, tuple[tuple[int, ...], torch.dtype]]):
        super().__init__([])
        self.shapes = dict(shapes)
        self.where = {name: (None, name) for name in self.shapes}

    @classmethod
    def of_module(cls, module: nn.Module, dtype: torch.dtype | None = None) -> ShapeReader:
        """The checkpoint `module` would have been saved to (its parameters and persistent buffers)."""
        return cls({name: (tuple(t.shape), dtype if dtype is not None and t.is_floating_point() else t.dtype)
                    for name, t in module.state_dict(keep_vars=True).items()})

    def merged(self, other: CheckpointReader) -> ShapeReader:
        if not isinstance(other, ShapeReader):
            raise TypeError("a ShapeReader merges only with another ShapeReader")
        return ShapeReader({**self.shapes, **other.shapes})

    def read(self, name: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        if name not in self.shapes:
            raise KeyError(f"the checkpoint has no tensor for {name!r}; is it the model the run was made with?")
        shape, stored = self.shapes[name]
        kind = dtype if dtype is not None and stored.is_floating_point else stored
        # read as the file holds it, on the host, then cast and moved: the run's own read does the same
        tensor = torch.empty(shape, dtype=stored)
        if kind != stored:
            tensor = tensor.to(kind)
        return tensor.to(device)
