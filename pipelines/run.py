"""The run machine: one personalisation = one folder `runs/<name>/`, five stages, shared by every backend.

Stages (DESIGN.md "A run"): calibrate -> emulate -> train -> correct -> preview. Each writes its output
into a temporary folder that is renamed into place when complete, and is skipped when that output
already exists, so a crash or a cancel loses at most the current stage; training also keeps periodic
checkpoints and resumes from the last one. run.json holds every setting, the library versions and
each stage's status. Progress goes to callbacks as `Progress` events (the app subscribes; the CLI
draws tqdm bars). A cancel request (`threading.Event`) is honoured between steps and between stages.

Folder layout::

    run.json            settings, versions, stage status      loss.jsonl    one {"step", "loss", ...} per step
    data/               the user's data, validated and copied cache/        the backend's cached inputs
    calibration/        stats.safetensors (Σ xᵀx per layer)   emulator/     emulator.safetensors/.json, report.json
    checkpoints/step-N/ adapter + optimizer state              adapter-emulator/  the LoRA trained on the emulator
    lora/               corrected/ and uncorrected/ PEFT adapters, plus the backend's export formats
    previews/           the backend's preview files (and later previews-<time>/ from `launch.py preview`)

The backend interface (subclass `Backend`, register it in pipelines/backends.py; the machine never
imports a backend by name):

    settings_class           dataclass of the backend's own settings; every field becomes a CLI option
                             (field metadata: "help", optional "flag"; "preview": "--flag" makes
                             `launch.py preview` accept it too, under that flag)
    __init__(run, settings, device)    run: RunSettings; settings: settings_class; device: torch.device
    validate()               check settings and the source data; raise ValueError saying what to fix.
                             Called before the run folder is created.
    copy_data(folder)        copy the validated data into `folder`; return a JSON-able summary
    use_data(folder)         read the run's copied data from `folder` (fresh runs and resumed ones)
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
    release()                free everything the backend holds (text encoders, caches on the GPU, ...)

With several processes (`accelerate launch`, `torchrun`) only the main one builds the cache and runs
calibrate, emulate, correct and preview; every process trains (DDP) and the main one writes the files.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import gc
import json
import logging
import os
import platform
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable

import torch
from safetensors.torch import load_file, save_file

import emloc
from emloc.memory import OPTIMIZERS

log = logging.getLogger(__name__)

STAGES = ("calibrate", "emulate", "train", "correct", "preview")
RUN_FILE = "run.json"
LOSS_LOG = "loss.jsonl"
STAGE_OUTPUT = {"calibrate": "calibration", "emulate": "emulator", "train": "adapter-emulator",
                "correct": "lora", "preview": "previews"}
PREVIEW_VARIANTS = ("base", "emulator + LoRA", "full + corrected LoRA", "full + uncorrected LoRA")
LIBRARIES = ("torch", "transformers", "diffusers", "peft", "accelerate", "safetensors", "bitsandbytes", "gradio")


@dataclass
class RunSettings:
    """Settings every backend shares; the CLI and the app are built from these fields."""

    model: str = field(default="", metadata={"help": "hub id or local folder of the model (safetensors only); "
                                                              "default: the backend's small demo model in assets/"})
    ratio: float = field(default=0.45, metadata={"help": "fraction of each compressed layer's parameters kept (0, 1]"})
    steps: int = field(default=500, metadata={"help": "training steps"})
    lr: float = field(default=1e-4, metadata={"help": "learning rate (constant)"})
    rank: int = field(default=16, metadata={"help": "LoRA rank r"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha: the update is scaled by alpha / r"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input"})
    batch_size: int = field(default=1, metadata={"help": "samples per training step"})
    seed: int = field(default=0, metadata={"help": "seed of every random choice in the run"})
    optimizer: str = field(default="adamw", metadata={
        "help": "adamw; adamw8bit (bitsandbytes, CUDA only); adafactor (factored second moment, no momentum: the "
                "least optimiser memory)"})
    weight_decay: float = field(default=1e-4, metadata={"help": "decoupled weight decay of the optimiser"})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "recompute activations to save memory"})
    mixed_precision: str = field(default="auto", metadata={"help": "auto (bf16 on CUDA), no, bf16 or fp16"})
    checkpoint_every: int = field(default=50, metadata={"help": "save a training checkpoint every N steps"})
    keep_checkpoints: int = field(default=2, metadata={"help": "how many recent checkpoints to keep"})
    calibration_samples: int = field(default=16, metadata={"help": "batches of your data used for calibration"})
    lam: float = field(default=3.0, metadata={"help": "correction clamp λ (0: no correction, inf: unclamped)"})
    svd: str = field(default=emloc.DEFAULT_SOLVER, metadata={"help": "emulator factorisation: " + ", ".join(emloc.SOLVERS)})
    rules: list[str] = field(default_factory=list, metadata={
        "help": "compression rules REGEX=RATIO (first match wins); default: the backend's"})
    lora_targets: list[str] = field(default_factory=list, metadata={
        "help": "LoRA target regexes (fullmatch module names); default: the backend's"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    offload: bool = field(default=False, metadata={
        "help": "calibrate with the full model in CPU memory, one layer at a time on the GPU (for models larger than it)"})

    def resolved_device(self) -> torch.device:
        """`auto` means the first CUDA device when there is one, else the CPU."""
        if self.device == "auto":  # one device per process under accelerate launch / torchrun
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
                else torch.device("cpu")
        return torch.device(self.device)

    def check(self) -> None:
        """Raise a ValueError for a setting outside its range, naming the setting."""
        if not self.model:
            raise ValueError("no model given; pass a hub id or a local folder (--model)")
        emloc.rules.check_ratio(self.ratio, "--ratio")
        for name in ("steps", "rank", "batch_size", "checkpoint_every", "keep_checkpoints", "calibration_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive; got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(f"--mixed-precision must be auto, no, bf16 or fp16; got {self.mixed_precision!r}")
        if self.svd not in emloc.SOLVERS:
            raise ValueError(f"--svd must be one of {', '.join(emloc.SOLVERS)}; got {self.svd!r}")
        if self.lam < 0:
            raise ValueError(f"--lam must be >= 0; got {self.lam}")
        parse_rules(self.rules)

    def lora(self, targets: list[str]) -> emloc.LoraSettings:
        """The LoRA of this run on `targets` (regexes)."""
        return emloc.LoraSettings(rank=self.rank, alpha=self.alpha, targets=targets, dropout=self.lora_dropout)


def parse_rules(rules: list[str]) -> list[tuple[str, float]]:
    """`["REGEX=RATIO", ...]` -> `[(regex, ratio)]`, checked."""
    parsed = []
    for rule in rules:
        pattern, sep, ratio = rule.rpartition("=")
        if not sep:
            raise ValueError(f"compression rule {rule!r} must look like REGEX=RATIO, e.g. '.*attn.*=0.5'")
        try:
            parsed.append((pattern, float(ratio)))
        except ValueError:
            raise ValueError(f"compression rule {rule!r}: {ratio!r} is not a number") from None
    return emloc.normalise_rules(parsed) if parsed else []


@dataclass
class Progress:
    """One progress event: what the run is doing now."""

    stage: str
    step: int = 0
    total: int = 0
    loss: float | None = None
    eta: float | None = None  # seconds left in this stage, when known
    message: str = ""


class RunCancelled(Exception):
    """Raised when a cancel request stopped the run between two steps; everything done so far is kept."""


class Backend:
    """Base class of a model family's backend; see the module docstring for the interface."""

    name: ClassVar[str] = "base"
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
    def build_cache(self, folder: Path) -> None: ...
    def load_cache(self, folder: Path) -> None: ...
    def export(self, folder: Path, corrected: dict, uncorrected: dict, config: Any) -> None: ...
    def release(self) -> None: ...

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


def library_versions() -> dict[str, str]:
    """Versions of Python and of the libraries a run depends on (missing ones left out)."""
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def distributed_state(device: torch.device | None = None):
    """accelerate's view of the processes: one, or several under `accelerate launch` / `torchrun`."""
    from accelerate import PartialState

    cpu = device.type == "cpu" if device is not None else not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to `path` through a temporary file and a rename: readers never see half a file."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def settings_from_dict(cls: type, data: dict) -> Any:
    """A settings dataclass from a dict, ignoring keys it does not know (older or newer run.json)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


class Run:
    """A run folder and the machine that takes it through the stages."""

    def __init__(self, folder: Path, backend: Backend, info: dict):
        self.dir, self.backend, self.info = Path(folder), backend, info
        self.callbacks: list[Callable[[Progress], None]] = []
        self.cancel_event = threading.Event()

    # -- creating and opening ------------------------------------------------------------------------------
    @classmethod
    def create(cls, folder: str | os.PathLike, backend_name: str, run: RunSettings, settings: Any) -> "Run":
        """Validate everything, then make a new run folder; refuses a folder that already exists."""
        from .backends import backend_class

        folder = Path(folder)
        if folder.exists():
            raise FileExistsError(f"{folder} already exists; choose another --out, or resume it with --resume")
        run.check()
        if Path(run.model).exists():  # a local model folder: stored absolute, so the run opens from anywhere
            run = dataclasses.replace(run, model=str(Path(run.model).resolve()))
        backend = backend_class(backend_name)(run, settings, run.resolved_device())
        backend.validate()  # bad data fails here, before anything is written
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = folder.with_name(folder.name + f".creating-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            summary = backend.copy_data(staging / "data")
            info = {"name": folder.name, "backend": backend_name, "created": _now(), "versions": library_versions(),
                    "settings": {"run": asdict(run), "backend": asdict(settings)}, "data": summary,
                    "stages": {s: {"status": "pending"} for s in STAGES}}
            write_json_atomic(staging / RUN_FILE, info)
            os.rename(staging, folder)  # the run appears whole or not at all; rename never replaces a folder
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        backend.use_data(folder / "data")
        return cls(folder, backend, info)

    @classmethod
    def open(cls, folder: str | os.PathLike) -> "Run":
        """An existing run, with its backend rebuilt from run.json (to resume it or render previews)."""
        from .backends import backend_class

        folder = Path(folder)
        if not (folder / RUN_FILE).is_file():
            raise FileNotFoundError(f"{folder} is not a run folder (no {RUN_FILE}); check the --run path")
        info = json.loads((folder / RUN_FILE).read_text())
        backend_type = backend_class(info["backend"])
        run = settings_from_dict(RunSettings, info["settings"]["run"])
        settings = settings_from_dict(backend_type.settings_class, info["settings"]["backend"])
        backend = backend_type(run, settings, run.resolved_device())
        backend.use_data(folder / "data")
        return cls(folder, backend, info)

    @property
    def settings(self) -> RunSettings:
        return self.backend.run

    # -- bookkeeping ---------------------------------------------------------------------------------------
    def emit(self, event: Progress) -> None:
        """Send a progress event to every subscriber."""
        for callback in self.callbacks:
            callback(event)

    def check_cancel(self) -> None:
        if self.cancel_event.is_set():
            raise RunCancelled("the run was cancelled; start it again with --resume to continue")

    def _set_stage(self, stage: str, status: str, **extra: Any) -> None:
        entry = self.info["stages"].setdefault(stage, {})
        entry.update(status=status, **extra)
        if self.is_main:
            write_json_atomic(self.dir / RUN_FILE, self.info)

    def output(self, stage: str) -> Path:
        return self.dir / STAGE_OUTPUT[stage]

    def _staging(self, final: Path) -> Path:
        staging = final.with_name(final.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)  # a crashed attempt's leftovers
        staging.mkdir(parents=True)
        return staging

    def _publish(self, staging: Path, final: Path) -> None:
        os.rename(staging, final)

    # -- the stages ----------------------------------------------------------------------------------------
    def execute(self, stages: Iterable[str] = STAGES) -> None:
        """Run `stages` in order; a stage whose output exists is skipped. Raises RunCancelled on cancel.

        Under `accelerate launch` / `torchrun` with several processes, the main process alone runs
        calibrate, emulate, correct and preview and writes every file; all processes train (DDP).
        """
        from . import stages as bodies  # the stage bodies; kept apart so this file stays readable

        processes = distributed_state(self.backend.device)
        self._prepare_cache()
        for stage in stages:
            if stage not in STAGES:
                raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
            self.check_cancel()
            done = self.output(stage).exists()
            processes.wait_for_everyone()  # every process has looked before the main one publishes
            if done:
                self._set_stage(stage, "done")
                self.emit(Progress(stage, 1, 1, message=f"{stage}: already done, skipped"))
                continue
            self._set_stage(stage, "running", started=_now())
            self.emit(Progress(stage, 0, 0, message=f"{stage}: started"))
            start = time.monotonic()
            if self.is_main or stage == "train":
                try:
                    staging = self._staging(self.output(stage)) if self.is_main else None
                    getattr(bodies, stage)(self, staging)
                    if self.is_main:
                        self._publish(staging, self.output(stage))
                except RunCancelled:
                    self._set_stage(stage, "cancelled")
                    raise
                except BaseException as err:
                    self._set_stage(stage, "failed", error=f"{type(err).__name__}: {err}")
                    raise
                finally:
                    gc.collect()
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
            processes.wait_for_everyone()
            self._set_stage(stage, "done", finished=_now(), seconds=round(time.monotonic() - start, 2))
            self.emit(Progress(stage, 1, 1, message=f"{stage}: done in {time.monotonic() - start:.1f} s"))

    @property
    def is_main(self) -> bool:
        """True in the process that writes files (the only one, unless launched on several devices)."""
        return distributed_state(self.backend.device).is_main_process

    def _prepare_cache(self) -> None:
        cache = self.dir / "cache"
        if self.is_main and not cache.exists():
            self.emit(Progress("cache", 0, 0, message="caching inputs"))
            staging = self._staging(cache)
            self.backend.build_cache(staging)
            self._publish(staging, cache)
        distributed_state(self.backend.device).wait_for_everyone()
        self.backend.load_cache(cache)

    def preview(self, name: str | None = None) -> Path:
        """Render previews into a new folder `previews-<time>` (or `name`) of a run whose LoRA is done."""
        from . import stages as bodies

        if not self.output("correct").exists():
            raise FileNotFoundError(f"{self.dir} has no corrected LoRA yet; finish training first")
        final = self.dir / (name or _dt.datetime.now().strftime("previews-%Y%m%d-%H%M%S"))
        if final.exists():
            raise FileExistsError(f"{final} already exists; choose another name")
        self._prepare_cache()
        staging = self._staging(final)
        bodies.preview(self, staging)
        self._publish(staging, final)
        return final

    # -- small helpers the stage bodies share --------------------------------------------------------------
    def save_tensors(self, path: Path, tensors: dict[str, torch.Tensor]) -> None:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path))

    def load_tensors(self, path: Path) -> dict[str, torch.Tensor]:
        return load_file(str(path))
