"""The interface between the run machine and a model family's backend.

A model family is a package beside this one (pipelines/<family>/) with a `Backend` subclass, registered by
name in pipelines/runner/registry.py (BACKENDS; the machine never imports a backend by name), and what the
planner needs to know about it (a `pipelines.runner.planning.Planning`, registered in PLANNING).

For adding a new model family, one needs to overwrite these (the abstract methods: Python refuses to create a
backend that lacks one):
    load_model(device)       a fresh full model (the part that is compressed and trained), frozen, eval
    default_rules(ratio)     [(regex, ratio)] the layers one --ratio compresses
    default_lora_targets()   [regex] the layers LoRA trains
    calibration_batches()    iterable of batches of the user's data (each goes through calibration_forward)
    training_loss(model, step, generator) -> scalar tensor; choose the batch and noise from `step` and
                             `generator` only (seeded per step by the machine, so a resume is exact); under
                             several processes draw the whole step's batch and keep rows `self.shard`
    generate(model, label) -> list   preview outputs of one model variant
    write_previews(folder, outputs)  write files from {label: outputs}; return their paths
and set the class attributes: name (its registry name), settings_class (a dataclass whose fields become CLI
options: field metadata "help", optional "flag"; "preview": "--flag" makes `launch.py preview` accept it too),
display_name, data_kind and preview_kind (what the app shows). The easiest is to read what
pipelines/internvl/backend.py does. __init__(run, settings, device) keeps run (RunSettings), settings (an
instance of settings_class) and device.

Everything else is optional; the defaults below do nothing or the obvious. By group:

Data (the user's files, checked before the run folder exists, copied into it, cached):
    validate()               raise ValueError saying what to fix (before the run folder is created)
    copy_data(folder)        copy the validated data into `folder`; return a JSON-able summary
    use_data(folder)         read the run's copied data from `folder` (fresh runs and resumed ones)
    data_settings(folder)    {setting: path} that make a new run read the data copied into `folder` (the
                             run's recorded command line uses it)
    build_cache(folder) / load_cache(folder)   inputs computed once into `folder` (may be left empty)

Model (what is loaded and how):
    check_model()            raise ValueError when the model cannot be used (not downloaded, unreachable hub,
                             pickle weights only, ...); called by Run.create before validate()
    dtype                    instance attribute: the dtype the model is loaded in (absent: float32)
    skeleton()               the full model's structure, parameters on `meta` (nothing read; buffers real);
                             None: unsupported. Also checks LoRA targets and rank against real layer shapes
                             before a run folder exists
    finish_loading(model)    anything the library does after loading weights (e.g. tie the LM head)
    calibration_forward(model, batch)   one calibration batch through the model (default: model(**batch))
    enable_gradient_checkpointing(model)
    memory_shape()           the run's shape for the planner (emloc.memory.MemorySettings fields: resolution and
                             text_tokens, or seq_len and image_tiles); {} = the planner's defaults

Streaming (models larger than memory: every phase then reads weights from the checkpoint's files); both or
neither, `streams(backend)` tells:
    checkpoint()             an `emloc.checkpoint.CheckpointReader` over the model's safetensors files
    blockwise(model, reader) an `emloc.blockwise.BlockwiseModel`: the blocks in order, how a calibration batch
                             enters the first one and how one block's input becomes its output

Output (samples, previews, exports):
    write_samples(folder, model)   one round of samples during training (default: the previews')
    validation_scores(model) {"validation_loss": ..., ...} of the training model on the held-out data at a sample
                             round (no grad, eval mode, the training batch size at most); {} when nothing is held out
    class_images_to_draw()   how many class images the base model draws before training (prior preservation); 0: none
    write_class_images(folder, model) / use_class_images(folder)   draw them with the base model (held as the preview
                             holds it) into the run's class-images/, and read them back (a resumed run draws none)
    check_preview()          raise ValueError for preview settings that cannot be rendered
    preview_count()          how many outputs `generate` makes per variant (0: unknown); with `output_done()`,
                             called by `generate` after each output, the machine reports progress per image/answer
    export(folder, corrected, uncorrected, config)   extra adapter formats, written into `folder`
    export_snippet(lora, plan)   Python that loads the run's corrected adapter (under `lora`, the run's lora/
                             folder) and makes one preview again, offloading the model where the run's plan
                             (run.json "plan") did not preview it whole; "" when the backend has none
    release()                free everything the backend holds (text encoders, caches on the GPU, ...)
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable

import torch

from .settings import RunSettings

log = logging.getLogger(__name__)


class Backend(ABC):
    """Base class of a model family's backend; the module docstring lists what to overwrite."""

    name: ClassVar[str] = "base"
    settings_class: ClassVar[type] = type(None)
    # What the app asks of a family instead of naming it (app/ never tests a backend's name):
    display_name: ClassVar[str] = "a model"  # the family in words: "FLUX.1", "FLUX.2", "InternVL"
    data_kind: ClassVar[str] = "images"  # the Data step: "images" (photos + prompt / captions) or "qa" (images +
    # question/answer pairs)
    preview_kind: ClassVar[str] = "images"  # the Preview step: "images" (a gallery) or "answers" (a table of text)
    # (this process's index, number of processes) while training: training_loss draws the step's whole batch
    # (batch_size x processes samples, the same on every process) and keeps its own batch_size rows
    shard: tuple[int, int] = (0, 1)
    dtype: torch.dtype  # set by a backend that loads its model in a fixed dtype (readers default to float32)

    def __init__(self, run: RunSettings, settings: Any, device: torch.device):
        self.run, self.settings, self.device = run, settings, device

    # -- required ---------------------------------------------------------------------------------------------
    @abstractmethod
    def load_model(self, device: torch.device) -> torch.nn.Module: ...

    @abstractmethod
    def default_rules(self, ratio: float) -> list[tuple[str, float]]: ...

    @abstractmethod
    def default_lora_targets(self) -> list[str]: ...

    @abstractmethod
    def calibration_batches(self) -> Iterable[Any]: ...

    @abstractmethod
    def training_loss(self, model: torch.nn.Module, step: int, generator: torch.Generator) -> torch.Tensor: ...

    @abstractmethod
    def generate(self, model: torch.nn.Module, label: str) -> list: ...

    @abstractmethod
    def write_previews(self, folder: Path, outputs: dict[str, list]) -> list[Path]: ...

    # -- data -------------------------------------------------------------------------------------------------
    def validate(self) -> None: ...
    def copy_data(self, folder: Path) -> dict: return {}
    def use_data(self, folder: Path) -> None: ...
    def data_settings(self, folder: Path) -> dict[str, str]: return {}
    def build_cache(self, folder: Path) -> None: ...
    def load_cache(self, folder: Path) -> None: ...

    # -- model ------------------------------------------------------------------------------------------------
    def check_model(self) -> None: ...
    def skeleton(self) -> torch.nn.Module | None: return None
    def finish_loading(self, model: torch.nn.Module) -> None: ...
    def memory_shape(self) -> dict: return {}

    def calibration_forward(self, model: torch.nn.Module, batch: Any) -> Any:
        return model(**batch) if isinstance(batch, dict) else model(batch)

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

    # -- streaming (both or neither; see streams()) ------------------------------------------------------------
    def checkpoint(self):
        raise NotImplementedError(f"{type(self).__name__}.checkpoint")

    def blockwise(self, model: torch.nn.Module, reader):
        raise NotImplementedError(f"{type(self).__name__}.blockwise")

    # -- output -----------------------------------------------------------------------------------------------
    def write_samples(self, folder: Path, model: torch.nn.Module) -> list[Path]:
        """One round of training samples from `model` (the emulator + LoRA that trains) into `folder`; by default
        the previews' requests. A backend may sample cheaper (FLUX: from the cached prompt embeddings)."""
        return self.write_previews(folder, {"emulator + LoRA": self.generate(model, "emulator + LoRA")})

    def validation_scores(self, model: torch.nn.Module) -> dict[str, float]: return {}
    def class_images_to_draw(self) -> int: return 0
    def write_class_images(self, folder: Path, model: torch.nn.Module) -> list[Path]: return []
    def use_class_images(self, folder: Path) -> None: ...
    def check_preview(self) -> None: ...
    def preview_count(self) -> int: return 0

    on_output: Callable[[], None] | None = None  # set by the run machine while it renders previews

    def output_done(self) -> None:
        """Called by `generate` after each image or answer: the machine's progress per output (see preview_count)."""
        if self.on_output is not None:
            self.on_output()

    def export(self, folder: Path, corrected: dict, uncorrected: dict, config: Any) -> None: ...
    def export_snippet(self, lora: Path, plan: dict | None = None) -> str: return ""
    def release(self) -> None: ...


def streams(backend: Backend | type[Backend]) -> bool:
    """True when the backend can run its model block by block from the checkpoint's files (it overrides
    `checkpoint` and `blockwise`)."""
    kind = backend if isinstance(backend, type) else type(backend)
    return kind.blockwise is not Backend.blockwise and kind.checkpoint is not Backend.checkpoint
