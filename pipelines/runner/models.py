"""How a stage gets its model: the emulator (built from the run's factors, never from the full model) and the full
model for a forward-only pass; and the `Run` protocol, what a stage body uses of the run machine."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

import emloc

from .backend import Backend
from .progress import Progress
from .settings import RunSettings


class Run(Protocol):
    """What a stage body uses of the run machine (machine.Run provides it; the bodies never import it)."""

    dir: Path
    backend: Backend
    cancel_event: Any  # threading.Event
    info: dict  # run.json: settings, stages, the plan made when the run was created

    @property
    def settings(self) -> RunSettings: ...
    def output(self, stage: str) -> Path: ...
    def emit(self, event: Progress) -> None: ...
    def check_cancel(self) -> None: ...
    def save_tensors(self, path: Path, tensors: dict[str, torch.Tensor]) -> None: ...
    def load_tensors(self, path: Path) -> dict[str, torch.Tensor]: ...


def streams(run: Run) -> bool:
    """Whether this run reads the model block by block from its files (the backend can, and the run does not
    ask to keep the full calibration statistics, which only the two-step path has at once)."""
    backend = run.backend
    can = type(backend).blockwise is not Backend.blockwise  # the backend runs its model block by block
    return can and not run.settings.keep_statistics and backend.skeleton() is not None


def emulator_model(run: Run, device: torch.device | str) -> nn.Module:
    """A fresh model with the run's emulator layers swapped in; the full model never reaches `device`.

    Where the backend has a skeleton, the full model is never built either: the emulator's factors and the
    uncompressed weights are read from files into the `meta` skeleton.
    """
    backend = run.backend
    model = backend.skeleton() if streams(run) else None
    if model is None:
        model = backend.load_model(torch.device("cpu"))
        emloc.load_emulator(model, run.output("emulate"), device="cpu")
        return model.to(device)
    # straight onto the device, one tensor at a time: the host never holds the emulator whole
    emloc.load_emulator(model, run.output("emulate"), device=device)
    backend.checkpoint().materialize(model, "", device, getattr(backend, "dtype", None))
    backend.finish_loading(model)
    return model.to(device)


def full_model_streamed(run: Run) -> nn.Module:
    """The full model for a forward-only pass: on the device, or (--offload) kept in CPU memory with each
    layer's weights moved to the device only while that layer runs (accelerate's cpu_offload hooks)."""
    backend = run.backend
    if not run.settings.offload:
        return backend.load_model(backend.device)
    from accelerate import cpu_offload

    return cpu_offload(backend.load_model(torch.device("cpu")), execution_device=backend.device)
