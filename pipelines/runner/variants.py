"""The model variants a preview compares (base, emulator + LoRA, full + corrected / uncorrected LoRA), each held as
the run's plan chose: whole on the device, offloaded from host RAM, or streamed block by block from its files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from torch import nn

import emloc
from emloc.checkpoint import BlockCache, CheckpointReader, StreamedForward, map_large_allocations
from emloc.host_cache import CachedReader
from emloc.emulator import emulator_files

from .models import Run, emulator_model, streams

GiB = 1024 ** 3


PREVIEW_MODES = ("whole", "offload", "files")


def preview_mode(run: Run) -> str:
    """How the previews hold the full model, as the plan made when the run was created chose (`--ram-gb`,
    `--gpu-gb`): "whole" on the device; "offload": whole in host RAM, each block moved to the device while it
    runs (a GPU smaller than the model, RAM large enough); "files": read block by block from its files (neither
    holds it). Both of these run every variant, the emulator too, block by block (see preview_variant). Without a
    plan (a model the planner cannot read): "files" when the weights take more than half the host memory budget,
    else "whole". `--offload` asks for "offload" on a GPU."""
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


@dataclass
class FullWeights:
    """What the full-model variants of one preview request share (they differ only in LoRA hooks): where their
    blocks come from (the files; in mode "offload" the model kept in host RAM after its first read, pinned where
    CUDA is) and the blocks kept on the device after their first read, so the variants after the first read no
    more of them."""

    reader: CheckpointReader | CachedReader
    cache: BlockCache


def _spare(run: Run, device: bool) -> int:
    """Half of what the run's plan leaves free of a budget at the preview: the device's (the host's on a CPU run),
    or, `device` False, the host's; the other half stays as headroom for what the plan does not see. 0 without a
    plan."""
    plan = run.info.get("plan") or {}
    phase = plan.get("phases", {}).get("preview")
    if not phase:
        return 0
    gpu = device and plan.get("device") == "cuda"
    kept = phase.get("blocks_kept_gib" if device or plan.get("device") != "cuda" else "blocks_kept_host_gib")
    if kept is not None:  # the plan counted it (pipelines/planner/runs.py _blocks_kept)
        return int(kept * GiB)
    budget = plan.get("gpu_budget_gib") if gpu else plan.get("ram_budget_gib")
    if budget is None:
        return 0
    return max(0, int((budget - phase["device_gib" if gpu else "host_gib"]) * GiB / 2))


def resident_budget(run: Run) -> int:
    """Bytes of blocks the preview may keep on the device between forwards (see `_spare`)."""
    return _spare(run, device=True)


def _source(run: Run, files: CheckpointReader) -> CheckpointReader | CachedReader:
    """Where a streamed variant's weights come from: mode "offload", the model kept in RAM after its first read
    (pinned on a GPU); mode "files" on a GPU, the files with the blocks that fit half the RAM the plan leaves free
    kept in RAM; on a CPU the files (the device is the host: blocks kept are `resident_budget`'s)."""
    backend = run.backend
    cuda = backend.device.type == "cuda"
    map_large_allocations()  # large tensors in their own maps: pinned in place, handed back whole when freed
    if preview_mode(run) == "offload":
        return CachedReader(files, None, pin=cuda and torch.cuda.is_available())
    spare = _spare(run, device=False) if cuda else 0
    return CachedReader(files, spare, pin=torch.cuda.is_available()) if spare else files


def _room(run: Run, model: nn.Module, blocks: list[str]) -> tuple[bool, int]:
    """(read the next block ahead?, bytes of blocks to keep) for a streamed `model`: the plan counts one block, so
    the block read ahead (the largest) is paid first out of `resident_budget`, and the blocks kept get the rest."""
    spare = resident_budget(run)
    size = torch.empty((), dtype=getattr(run.backend, "dtype", None) or torch.float32).element_size()
    largest = max(sum(p.numel() for p in model.get_submodule(b).parameters()) for b in blocks) * size
    return (True, spare - largest) if spare >= largest else (False, spare)


def shared_weights(run: Run) -> FullWeights | None:
    """The full-model variants' shared source and block cache (see FullWeights); None when they hold it whole."""
    if preview_mode(run) == "whole":
        return None
    files, model = run.backend.checkpoint(), run.backend.skeleton()
    _, keep = _room(run, model, run.backend.blockwise(model, files).blocks)
    return FullWeights(_source(run, files), BlockCache(keep))


@dataclass
class RunOutputs:
    """What a streamed preview reads of the run's own outputs: the emulator's structure and factors, the adapters.
    The seam of the dry run (pipelines/planner/trace.py), which swaps `OUTPUTS` for shaped stand-ins of them."""

    def emulator(self, run: Run, model: nn.Module) -> CheckpointReader:
        """Give the `meta` skeleton `model` the emulator's factored layers; returns the reader of their factors."""
        emloc.load_emulator(model, run.output("emulate"), device="meta")
        return CheckpointReader(emulator_files(run.output("emulate")))

    def adapter(self, folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{layer: (A, s·B)} of the adapter saved in `folder` (emloc.adapter_factors)."""
        return emloc.adapter_factors(*emloc.read_adapter(folder))


OUTPUTS = RunOutputs()


def _streamed_variant(run: Run, adapter: Path | None, emulator: bool = False,
                      shared: FullWeights | None = None, strength: float = 1.0) -> nn.Module:
    """The full model (or, `emulator`, the emulator) as a skeleton whose blocks are read as they run, from the files
    (mode "files") or from host RAM ("offload"), the next block read ahead where the budget has room for it; the
    adapter (if any) added to its target layers' outputs; see emloc.checkpoint.StreamedForward. The full model's
    blocks come from `shared`."""
    backend = run.backend
    map_large_allocations()
    model, files = backend.skeleton(), backend.checkpoint()
    if emulator:  # factored layers get their structure; their factors come from the emulator's files
        files = files.merged(OUTPUTS.emulator(run, model))
    blocks = backend.blockwise(model, files).blocks
    ahead, keep = _room(run, model, blocks)
    if emulator:  # its own blocks kept, for its own forwards: gone before the full variants run
        reader, cache = _source(run, files), BlockCache(keep)
    else:
        shared = shared or shared_weights(run)
        reader, cache = shared.reader, shared.cache
    lora = OUTPUTS.adapter(adapter) if adapter is not None else None
    if lora is not None and strength != 1.0:  # (A, s·B) -> (A, t·s·B) in place: t·ΔW, no new tensor
        for _, scaled_b in lora.values():
            scaled_b.mul_(strength)
    # the next block is read (on a GPU: copied on a side stream) while one runs: disk or PCIe beside the compute
    model.emloc_stream = StreamedForward(model, reader, blocks, backend.device, getattr(backend, "dtype", None), lora,
                                         prefetch=ahead, cache=cache)
    backend.finish_loading(model)
    return model


def preview_variant(run: Run, label: str, shared: FullWeights | None = None) -> nn.Module:
    """The model of one preview variant, held as the plan's preview mode says. Only mode "whole" puts a model whole
    on the device; in the others every variant, the emulator too, holds one block at a time, as the plan counts it
    (plus, in what the budget leaves beyond the plan, the next block read ahead and the blocks kept)."""
    backend, lora = run.backend, run.output("correct")
    mode = preview_mode(run)
    if label == "emulator + LoRA":
        if mode == "whole":  # the plan has room for the full model, so for the smaller emulator
            return emloc.load_adapter(emulator_model(run, backend.device), run.output("train"))
        return _streamed_variant(run, run.output("train"), emulator=True)
    folder = None if label == "base" else lora / ("corrected" if label == "full + corrected LoRA" else "uncorrected")
    if mode != "whole":
        return _streamed_variant(run, folder, shared=shared)
    model = backend.load_model(backend.device)
    return emloc.load_adapter(model, folder) if folder is not None else model


def strength_variant(run: Run, strength: float, shared: FullWeights | None = None) -> nn.Module:
    """The full model with the corrected LoRA at `strength` t, a column of the strength grid: every layer's update
    is t·ΔW = (t·s·B) A, the adapter's B factors multiplied in place after loading, so the variant holds exactly the
    tensors of "full + corrected LoRA" (the plan's preview memory holds for every strength); t = 0 is the base
    model itself (no adapter at all)."""
    if strength == 0:
        return preview_variant(run, "base", shared)
    folder = run.output("correct") / "corrected"
    if preview_mode(run) != "whole":
        return _streamed_variant(run, folder, shared=shared, strength=strength)
    model = emloc.load_adapter(run.backend.load_model(run.backend.device), folder)
    if strength != 1.0:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if ".lora_B." in name:  # PEFT's B of each adapted layer: ΔW = s·B A
                    parameter.mul_(strength)
    return model


def finish_variant(model: nn.Module) -> None:
    """Take a streamed variant's hooks off and stop its prefetch thread (nothing for a whole model)."""
    stream = getattr(model, "emloc_stream", None)
    if stream is not None:
        stream.remove()
