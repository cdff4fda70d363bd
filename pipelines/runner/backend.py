"""The interface between the run machine and a model family's backend.

The backend interface (subclass `Backend`, register it in pipelines/runner/registry.py; the machine never
imports a backend by name):

    settings_class           dataclass of the backend's own settings; every field becomes a CLI option
                             (field metadata: "help", optional "flag"; "preview": "--flag" makes
                             `launch.py preview` accept it too, under that flag)
    __init__(run, settings, device)    run: RunSettings; settings: settings_class; device: torch.device
    validate()               check settings and the source data; raise ValueError saying what to fix.
                             Called before the run folder is created.
    copy_data(folder)        copy the validated data into `folder`; return a JSON-able summary
    use_data(folder)         read the run's copied data from `folder` (fresh runs and resumed ones)
    data_settings(folder)    {setting: path} that make a new run read the data copied into `folder` (the
                             run's recorded command line uses it)
    build_cache(folder)      compute cached inputs into `folder` (may be left empty); load_cache(folder)
    load_model(device)       a fresh full model (the part that is compressed and trained), frozen, eval
    default_rules(ratio)     [(regex, ratio)] compression rules;  default_lora_targets() -> [regex]
    calibration_batches()    iterable of batches of the user's data; calibration_forward(model, batch)
    training_loss(model, step, generator) -> scalar tensor; choose the batch and noise from `step` and
                             `generator` only (seeded per step by the machine, so a resume is exact);
                             under several processes draw the whole step's batch and keep rows `self.shard`
    export(folder, corrected, uncorrected, config)   optional extra adapter formats, written into `folder`
    generate(model, label) -> list   preview outputs of one model variant; write_previews(folder, outputs)
                             writes files from {label: outputs} and returns their paths
    write_samples(folder, model)  optional: one round of samples during training (default: the previews')
    release()                free everything the backend holds (text encoders, caches on the GPU, ...)
    check_model()            optional: raise ValueError when the model cannot be used (not downloaded, pickle
                             weights only, ...); called by Run.create before validate()
    check_preview()          optional: raise ValueError for preview settings that cannot be rendered
    export_snippet(lora, plan)  optional: Python that loads the run's corrected adapter (under `lora`, the run's
                             lora/ folder) and makes one preview again, offloading the model where the run's plan
                             (run.json "plan") did not preview it whole; "" when the backend has none

Optional, for models larger than memory (every phase then reads weights from the checkpoint's files):
    skeleton()               the full model's structure, parameters on `meta` (nothing read; buffers real);
                             None: unsupported. Also checks LoRA targets and rank against real layer shapes
                             before a run folder exists
    checkpoint()             an `emloc.checkpoint.CheckpointReader` over the model's safetensors files
    blockwise(model, reader) (with checkpoint(): the run streams) an `emloc.blockwise.BlockwiseModel`: the blocks in order, how a calibration batch
                             enters the first one and how one block's input becomes its output
    finish_loading(model)    anything the library does after loading weights (e.g. tie the LM head)
    memory_shape()           the run's shape for the planner (emloc.memory.MemorySettings fields: resolution and
                             text_tokens, or seq_len and image_tiles); {} = the planner's defaults

"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar, Iterable

import torch

from .settings import RunSettings

log = logging.getLogger(__name__)


class Backend:
    """Base class of a model family's backend; see the module docstring for the interface."""

    name: ClassVar[str] = "base"
    # What the app asks of a family instead of naming it (app/ never tests a backend's name):
    display_name: ClassVar[str] = "a model"  # the family in words: "FLUX.1", "FLUX.2", "InternVL"
    data_kind: ClassVar[str] = "images"  # the Data step: "images" (photos + prompt / captions) or "qa" (images +
    # question/answer pairs)
    preview_kind: ClassVar[str] = "images"  # the Preview step: "images" (a gallery) or "answers" (a table of text)
    # (this process's index, number of processes) while training: training_loss draws the step's whole batch
    # (batch_size x processes samples, the same on every process) and keeps its own batch_size rows
    shard: tuple[int, int] = (0, 1)
    settings_class: ClassVar[type] = type(None)

    def __init__(self, run: RunSettings, settings: Any, device: torch.device):
        self.run, self.settings, self.device = run, settings, device

    # Optional hooks: the defaults do nothing.
    def validate(self) -> None: ...
    def copy_data(self, folder: Path) -> dict: return {}
    def use_data(self, folder: Path) -> None: ...
    def data_settings(self, folder: Path) -> dict[str, str]: return {}
    def build_cache(self, folder: Path) -> None: ...
    def load_cache(self, folder: Path) -> None: ...
    def export(self, folder: Path, corrected: dict, uncorrected: dict, config: Any) -> None: ...
    def release(self) -> None: ...
    def check_model(self) -> None: ...
    def check_preview(self) -> None: ...
    def export_snippet(self, lora: Path, plan: dict | None = None) -> str: return ""

    def write_samples(self, folder: Path, model: torch.nn.Module) -> list[Path]:
        """One round of training samples from `model` (the emulator + LoRA that trains) into `folder`; by default
        the previews' requests. A backend may sample cheaper (FLUX: from the cached prompt embeddings)."""
        return self.write_previews(folder, {"emulator + LoRA": self.generate(model, "emulator + LoRA")})
    def skeleton(self) -> torch.nn.Module | None: return None
    def finish_loading(self, model: torch.nn.Module) -> None: ...
    def memory_shape(self) -> dict: return {}

    def checkpoint(self):
        raise NotImplementedError(f"{type(self).__name__}.checkpoint")

    def blockwise(self, model: torch.nn.Module, reader):
        raise NotImplementedError(f"{type(self).__name__}.blockwise")

    # Required: every backend implements these.
    def load_model(self, device: torch.device) -> torch.nn.Module:
        raise NotImplementedError(f"{type(self).__name__}.load_model")

    def default_rules(self, ratio: float) -> list[tuple[str, float]]:
        raise NotImplementedError(f"{type(self).__name__}.default_rules")

    def default_lora_targets(self) -> list[str]:
        raise NotImplementedError(f"{type(self).__name__}.default_lora_targets")

    def calibration_batches(self) -> Iterable[Any]:
        raise NotImplementedError(f"{type(self).__name__}.calibration_batches")

    def calibration_forward(self, model: torch.nn.Module, batch: Any) -> Any:
        return model(**batch) if isinstance(batch, dict) else model(batch)

    def training_loss(self, model: torch.nn.Module, step: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__}.training_loss")

    def generate(self, model: torch.nn.Module, label: str) -> list:
        raise NotImplementedError(f"{type(self).__name__}.generate")

    def write_previews(self, folder: Path, outputs: dict[str, list]) -> list[Path]:
        raise NotImplementedError(f"{type(self).__name__}.write_previews")

    def enable_gradient_checkpointing(self, model: torch.nn.Module) -> None:
        """Turn on activation recomputation (diffusers and transformers spell it differently)."""
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x spelling
            model.activation_checkpointing_enable({"use_reentrant": False})
            return
        for method in ("enable_gradient_checkpointing", "gradient_checkpointing_enable"):
            if hasattr(model, method):
                getattr(model, method)()
                return
        log.warning("%s has no gradient checkpointing switch; training without it", type(model).__name__)
