"""The run machine: one personalisation = one folder `runs/<name>/`, five stages, shared by every backend.

Stages (docs/run-folder.md): calibrate -> emulate -> train -> correct -> preview. Each writes its output
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

With several processes (`accelerate launch`, `torchrun`) only the main one builds the cache and runs
calibrate, emulate, correct and preview; every process trains (DDP) and the main one writes the files.
"""

from __future__ import annotations

import contextlib
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
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from safetensors.torch import load_file, save_file

from . import stages as bodies  # the stage bodies; kept apart so this file stays readable
from .adapters import check_adapter
from .backend import Backend
from .checks import check_device, check_lora_fits, check_writable, confined_name
from .command import again_folder, train_arguments, train_command
from .devices import (MACHINE, apply_record, device_refusal, distributed_state, held_memory, machine_record,
                      use_device)
from .lock import RunLock
from .progress import Progress, RunCancelled
from .registry import backend_class, planner
from .settings import RUN_FILE, STAGE_OUTPUT, STAGES, RunSettings, settings_from_dict

log = logging.getLogger(__name__)

EARLIER = "earlier"  # a run trained further keeps its results from before in earlier/step-<steps it had>/
LIBRARIES = ("torch", "transformers", "diffusers", "peft", "accelerate", "safetensors", "bitsandbytes", "gradio")


def library_versions() -> dict[str, str]:
    """Versions of Python and of the libraries a run depends on (missing ones left out)."""
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to `path` through a temporary file and a rename: readers never see half a file."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def read_run_file(folder: Path) -> dict:
    """run.json of a run folder, checked enough that the run can be opened; ValueError in words if damaged."""
    path = Path(folder) / RUN_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is damaged (not valid JSON: {err}); this run cannot be opened") from None
    ok = isinstance(info, dict) and isinstance(info.get("backend"), str) and isinstance(info.get("stages"), dict) \
        and isinstance(info.get("settings"), dict) and all(isinstance(info["settings"].get(k), dict)
                                                         for k in ("run", "backend"))
    if not ok:
        raise ValueError(f"{path} is damaged (it lacks the backend, settings or stages of a run); "
                         "this run cannot be opened")
    return info


def recorded_command(backend_name: str, backend: Backend, folder: Path) -> str:
    """The `launch.py train ...` line that makes this run again from its own data/ copy (into `<run>-again`)."""
    return train_command(train_arguments(backend_name, backend.run, backend.settings,
                                         backend.data_settings(Path(folder).resolve() / "data"), again_folder(folder)))


def check_model_shapes(backend: Backend) -> None:
    """The LoRA targets and rank against the model's layers (when the backend can build a skeleton)."""
    try:
        skeleton = backend.skeleton()
    except OSError as err:
        raise ValueError(f"--model {backend.run.model}: its config cannot be read ({err})") from None
    if skeleton is not None:
        check_lora_fits(skeleton, backend.run.lora_targets or backend.default_lora_targets(), backend.run.rank)


class Run:
    """A run folder and the machine that takes it through the stages."""

    def __init__(self, folder: Path, backend: Backend, info: dict):
        self.dir, self.backend, self.info = Path(folder), backend, info
        self.callbacks: list[Callable[[Progress], None]] = []
        self.cancel_event = threading.Event()
        self.refusal = ""  # why this run must not compute on this machine's device (see `open`); "" when it may

    # -- creating and opening ------------------------------------------------------------------------------
    @classmethod
    def create(cls, folder: str | os.PathLike, backend_name: str, run: RunSettings, settings: Any) -> "Run":
        """Validate everything, then make a new run folder; refuses a folder that already exists."""
        folder = Path(folder)
        if folder.exists():
            raise FileExistsError(f"{folder} already exists; choose another --out, or resume it with --resume")
        run.check()
        if Path(run.model).exists():  # a local model folder: stored absolute, so the run opens from anywhere
            run = dataclasses.replace(run, model=str(Path(run.model).resolve()))
        backend = backend_class(backend_name)(run, settings, run.resolved_device())
        machine = machine_record(run.mixed_precision, backend)  # device, dtype and precision, once for the run
        check_writable(folder)
        backend.check_model()  # not downloaded, pickle weights only: said before the data is read
        backend.validate()  # bad data fails here, before anything is written
        check_model_shapes(backend)
        plan = planner()(run, backend)  # refuses, in words, a run that no choice of streaming fits
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = folder.with_name(folder.name + f".creating-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            summary = backend.copy_data(staging / "data")
            info = {"name": folder.name, "backend": backend_name, "created": _now(), "versions": library_versions(),
                    "settings": {"run": asdict(run), "backend": asdict(settings)}, "data": summary,
                    "stages": {s: {"status": "pending"} for s in STAGES}, "plan": plan, MACHINE: machine,
                    "command": recorded_command(backend_name, backend, folder)}
            write_json_atomic(staging / RUN_FILE, info)
            os.rename(staging, folder)  # the run appears whole or not at all; rename never replaces a folder
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        backend.use_data(folder / "data")
        return cls(folder, backend, info)

    @classmethod
    def open(cls, folder: str | os.PathLike, device: str | None = None) -> "Run":
        """An existing run, with its backend rebuilt from run.json (to resume it or render previews).

        It computes in the dtype and precision recorded when it was made. `device` (`--device` with `--resume`)
        names where to continue; without it the run's own device setting is resolved here, and a run whose
        recorded device is of another kind (made on a GPU, opened where none is) can still be read and exported,
        but refuses to compute (`execute`, `extend`, `preview`) with a message saying what to do."""
        folder = Path(folder)
        if not (folder / RUN_FILE).is_file():
            raise FileNotFoundError(f"{folder} is not a run folder (no {RUN_FILE})")
        info = read_run_file(folder)
        backend_type = backend_class(info["backend"])
        run = settings_from_dict(RunSettings, info["settings"]["run"])
        settings = settings_from_dict(backend_type.settings_class, info["settings"]["backend"])
        record = info.get(MACHINE)
        if device is not None:
            check_device(device)
            where = torch.device(device)
        else:
            try:
                where = run.resolved_device()
            except ValueError:  # e.g. made with --device cuda:1, opened where there is no such GPU: readable here
                where = torch.device("cpu")
                record = record or {"device": run.device, "dtype": None}
        backend = backend_type(run, settings, where)
        if record:
            apply_record(backend, record)
        backend.use_data(folder / "data")
        opened = cls(folder, backend, info)
        opened.refusal = device_refusal(record, where, folder, given=device is not None)
        return opened

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
        self._check_device()
        with self._lock():
            self._execute(stages)

    def _check_device(self) -> None:
        """Refuse, in words, to compute on a device of another kind than the run was made on (see `open`); a run
        made before devices were recorded records this machine's now, the first time it runs."""
        if self.refusal:
            raise ValueError(self.refusal)
        use_device(self.backend.device)  # this thread's current CUDA device: what PEFT and accelerate mean by "cuda"
        if MACHINE not in self.info:
            self.info[MACHINE] = machine_record(self.settings.mixed_precision, self.backend)
        elif self.info[MACHINE]["device"] != str(self.backend.device):  # the device the user named (or cuda:N)
            self.info[MACHINE] = {**self.info[MACHINE], "device": str(self.backend.device)}

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """Hold the run folder's lock (main process only): a second process on this run is refused in words."""
        if not self.is_main:
            yield
            return
        with RunLock(self.dir) as lock:
            if lock.taken_over:
                self.emit(Progress("starting", 0, 0, message=f"took over the lock of process {lock.taken_over}, "
                                                             "which no longer runs"))
            yield

    def _execute(self, stages: Iterable[str]) -> None:
        processes = distributed_state(self.backend.device)
        several = processes.num_processes > 1
        stages = list(stages)
        try:
            self._prepare_cache()
        except RunCancelled:
            raise
        except BaseException as err:  # e.g. the model's files cannot be read: the run is failed, not "pending"
            first = next((s for s in stages if s in STAGES and not self.output(s).exists()), None)
            if first is not None:
                self._set_stage(first, "failed", error=f"while caching the data: {type(err).__name__}: {err}")
            raise
        for stage in stages:
            if stage not in STAGES:
                raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
            self.check_cancel()
            done = self.output(stage).exists()
            if several:
                processes.wait_for_everyone()  # every process has looked before the main one publishes
            if done:
                self._set_stage(stage, "done")
                self.emit(Progress(stage, 1, 1, message=f"{stage}: already done, skipped"))
            else:
                self._run_stage(stage, processes if several else None)
            if several and stage == "train":
                # the other processes only train: they leave now rather than wait in a barrier while the main one
                # corrects and previews (which may outlast any process-group timeout); the main one goes on alone
                if not self.is_main:
                    return
                several = False

    def _run_stage(self, stage: str, processes: Any) -> None:
        """One stage that has no output yet (`processes`: accelerate's state when there are several, else None)."""
        self._set_stage(stage, "running", started=_now())
        self.emit(Progress(stage, 0, 0, message=f"{stage}: started"))
        start = time.monotonic()
        if self.is_main or stage == "train":
            try:
                staging = self._staging(self.output(stage)) if self.is_main else None
                with held_memory(self.backend.device) as held:
                    self.info["stages"][stage]["held"] = held  # filled when the stage ends, failed ones too
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
        if processes is not None:
            processes.wait_for_everyone()
        self._set_stage(stage, "done", finished=_now(), seconds=round(time.monotonic() - start, 2))
        self.emit(Progress(stage, 1, 1, message=f"{stage}: done in {time.monotonic() - start:.1f} s"))

    # -- training a finished run further -------------------------------------------------------------------
    def extend(self, steps: int, stages: Iterable[str] = STAGES) -> None:
        """Train on to `steps` (more than the run has), from its last state, optimizer included; then correct and
        preview again. The adapter equals that of a run trained `steps` straight (same seed, same per-step draws).

        The results so far (emulator adapter, lora/, previews, export zip) are moved whole, by rename, into
        `earlier/step-<old steps>/` before anything is trained: the finished adapter is never lost."""
        self._check_device()
        with self._lock():
            done = self.settings.steps
            if steps <= done:
                raise ValueError(f"{self.dir.name} is a run of {done} steps; to train it further give --steps "
                                 f"above {done} (got {steps})")
            if self.is_main and self.output("train").exists():
                kept = self._set_aside(done)
                self.info.setdefault("extended", []).append({"from": done, "to": steps, "kept": kept, "when": _now()})
            self.backend.run.steps = steps
            self.info["settings"]["run"]["steps"] = steps
            for stage in ("train", "correct", "preview"):
                self.info["stages"][stage] = {"status": "pending"}
            self.info["command"] = recorded_command(self.info["backend"], self.backend, self.dir)
            if self.is_main:  # written after the results moved: a crash in between only retrains the old steps
                write_json_atomic(self.dir / RUN_FILE, self.info)
            self._execute(stages)

    def _set_aside(self, done: int) -> str:
        """Move the results of the first `done` steps into earlier/step-<done>/ (a fresh name); returns it."""
        kept, n = self.dir / EARLIER / f"step-{done}", 2
        while kept.exists():
            kept, n = self.dir / EARLIER / f"step-{done}-{n}", n + 1
        kept.mkdir(parents=True)
        outputs = [self.output(s) for s in ("train", "correct", "preview")]
        for path in [*outputs, *sorted(self.dir.glob("previews-*")), self.dir / "export"]:
            if path.exists():
                os.rename(path, kept / path.name)
        self.emit(Progress("train", 0, 0, message=f"the results of {done} steps are kept in {kept.relative_to(self.dir)}"))
        return str(kept.relative_to(self.dir))

    @property
    def is_main(self) -> bool:
        """True in the process that writes files (the only one, unless launched on several devices)."""
        return distributed_state(self.backend.device).is_main_process

    def _prepare_cache(self) -> None:
        cache = self.dir / "cache"
        if self.is_main and not cache.exists():
            self.emit(Progress("cache", 0, 0, message="caching inputs"))
            staging = self._staging(cache)
            with held_memory(self.backend.device) as held:
                self.info["cache"] = {"held": held}  # filled when the cache is built; written with a stage's status
                self.backend.build_cache(staging)
            self._publish(staging, cache)
        distributed_state(self.backend.device).wait_for_everyone()
        self.backend.load_cache(cache)

    def preview(self, name: str | None = None, scales: list[float] | None = None) -> Path:
        """Render previews into a new folder `previews-<time>` (or `name`) of a run whose LoRA is done; with `scales`,
        a strength grid instead (stages.preview_grid: the corrected LoRA at each strength)."""
        if not self.output("correct").exists():
            raise FileNotFoundError(f"{self.dir} has no corrected LoRA yet; finish training first")
        final = self.dir / confined_name(name or _dt.datetime.now().strftime("previews-%Y%m%d-%H%M%S"), "--name")
        if final.exists():
            raise FileExistsError(f"{final} already exists; choose another name")
        self.backend.check_preview()
        self.check_adapters()
        self._check_device()
        with self._lock():
            self._prepare_cache()
            staging = self._staging(final)
            try:
                with held_memory(self.backend.device) as held:
                    if scales:
                        bodies.preview_grid(self, staging, scales)
                    else:
                        bodies.preview(self, staging)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            self._publish(staging, final)
            self.info.setdefault("later_previews", {})[final.name] = {"held": held}
            if self.is_main:
                write_json_atomic(self.dir / RUN_FILE, self.info)
        return final

    def check_adapters(self) -> None:
        """Refuse (AdapterError, in words) adapters of this run that are unreadable, non-finite, incomplete or
        mis-shaped for its model: the emulator's, the corrected and the uncorrected one."""
        try:
            skeleton = self.backend.skeleton()
        except OSError:  # the model is gone from this machine; the checks that need no model still run
            skeleton = None
        for adapter in (self.output("train"), self.output("correct") / "corrected", self.output("correct") / "uncorrected"):
            check_adapter(adapter, skeleton)

    # -- small helpers the stage bodies share --------------------------------------------------------------
    def save_tensors(self, path: Path, tensors: dict[str, torch.Tensor]) -> None:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path))

    def load_tensors(self, path: Path) -> dict[str, torch.Tensor]:
        return load_file(str(path))
