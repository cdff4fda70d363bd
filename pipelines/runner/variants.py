"""The model variants a preview compares (base, emulator + LoRA, full + corrected / uncorrected LoRA), each held as
the run's plan chose: whole on the device, offloaded from host RAM, or streamed block by block from its files."""

from __future__ import annotations

from pathlib import Path

import psutil
import torch
from torch import nn

import emloc
from emloc.checkpoint import CheckpointReader, StreamedForward, map_large_allocations
from emloc.emulator import emulator_files

from .models import Run, emulator_model, streams

GiB = 1024 ** 3


PREVIEW_MODES = ("whole", "offload", "files")


def preview_mode(run: Run) -> str:
    """How the previews hold the full model, as the plan made when the run was created chose (`--ram-gb`,
    `--gpu-gb`): "whole" on the device; "offload": whole in host RAM, each block moved to the device while it
    runs (a GPU smaller than the model, RAM large enough); "files": read block by block from its files (neither
    holds it). Without a plan (a model the planner cannot read): "files" when the weights take more than half the
    host memory budget, else "whole". `--offload` asks for "offload" on a GPU."""
    if not streams(run):
        return "whole"
    plan = (run.info.get("plan") or {}).get("phases", {}).get("preview")
    if plan is not None:
        mode = plan.get("mode") or ("files" if plan["streamed"] else "whole")
    else:
        budget = run.settings.ram_gb * GiB if run.settings.ram_gb else psutil.virtual_memory().available
        size = sum(f.stat().st_size for f in run.backend.checkpoint().files)
        mode = "files" if size > budget / 2 else "whole"
    if mode == "whole" and run.settings.offload and run.backend.device.type == "cuda":
        mode = "offload"
    return mode


def preview_streams(run: Run) -> bool:
    """Whether the previews do not hold the full model whole on the device (see `preview_mode`)."""
    return preview_mode(run) != "whole"


def _offloaded(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` (in host RAM) run with each submodule's weights moved to `device` only while it runs."""
    from accelerate import cpu_offload

    return cpu_offload(model, execution_device=device)


def _streamed_variant(run: Run, adapter: Path | None, emulator: bool = False) -> nn.Module:
    """The full model (or, `emulator`, the emulator) as a skeleton whose blocks are read from the files as they
    run, the adapter (if any) added to its target layers' outputs; see emloc.checkpoint.StreamedForward."""
    backend = run.backend
    map_large_allocations()
    model, reader = backend.skeleton(), backend.checkpoint()
    if emulator:  # factored layers get their structure; their factors come from the emulator's files
        emloc.load_emulator(model, run.output("emulate"), device="meta")
        reader = reader.merged(CheckpointReader(emulator_files(run.output("emulate"))))
    blocks = backend.blockwise(model, reader).blocks
    lora = emloc.adapter_factors(*emloc.read_adapter(adapter)) if adapter is not None else None
    model.emloc_stream = StreamedForward(model, reader, blocks, backend.device, getattr(backend, "dtype", None), lora)
    backend.finish_loading(model)
    return model


def preview_variant(run: Run, label: str) -> nn.Module:
    backend, lora = run.backend, run.output("correct")
    mode = preview_mode(run)
    if label == "emulator + LoRA":
        if mode == "files":
            return _streamed_variant(run, run.output("train"), emulator=True)
        # training held the emulator on the device, so the preview can
        return emloc.load_adapter(emulator_model(run, backend.device), run.output("train"))
    folder = None if label == "base" else lora / ("corrected" if label == "full + corrected LoRA" else "uncorrected")
    if mode == "files":
        return _streamed_variant(run, folder)
    model = backend.load_model(torch.device("cpu") if mode == "offload" else backend.device)
    if folder is not None:
        model = emloc.load_adapter(model, folder)
    return _offloaded(model, backend.device) if mode == "offload" else model
