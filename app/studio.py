"""Handlers of steps 4-6 and Past runs: start, watch, cancel and resume runs; previews and export.

`Studio` holds what outlives a browser tab: the runs folder and the one `JobManager`. Its methods take
and return plain values; app/ui.py binds them to components.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.runner.checks import check_model_source
from pipelines.runner.registry import backend_class
from pipelines.runner.data import DataError, check_image
from pipelines.runner import LOSS_LOG, PREVIEW_VARIANTS, RUN_FILE, STAGES, Run, RunSettings

from . import handlers, results
from .words import failure_words
from .jobs import JobBusy, JobManager, JobStatus
from .plots import progress_bar

log = logging.getLogger(__name__)

STAGE_WORDS = {"starting": "Starting", "cache": "Caching your data (text embeddings, latents, tokens)",
               "calibrate": "Calibrating: reading your data through the full model",
               "emulate": "Building the low-rank emulator", "train": "Training the LoRA on the emulator",
               "correct": "Correcting the LoRA for the full model", "preview": "Rendering previews"}
MAX_SEEDS = 8
ASKED_DIR = "asked"  # new images a question was asked about in step 5, inside the run folder


@dataclass
class TrainRequest:
    """Everything the wizard collected, as the Start button sends it."""

    task: str
    model: str
    name: str
    images: list[dict] = field(default_factory=list)  # accepted uploads {"path", "name"}
    prompt: str = ""  # FLUX
    trigger: str = "sks"  # FLUX
    captions: Any = None  # FLUX: [image, caption] rows
    qa_table: Any = None  # InternVL: [image, question, answer] rows
    ratio: float = 0.45
    ram_gb: float = 0.0  # the Budget step's RAM budget (0: what is available when the run starts)
    rank: int = 16
    batch_size: int = 1
    steps: int = 500
    lr: float = 1e-4
    lam: float = 3.0
    seed: int = 0
    calibration_samples: int = 16
    checkpoint_every: int = 50
    resolution: int = 512  # FLUX
    preview_steps: int = 0  # FLUX (0: the model's default)
    max_sequence_length: int = 0  # FLUX (0: the model's default)
    max_new_tokens: int = 32  # InternVL: longest preview answer


# TrainRequest field -> (its control on the page, whole number?)
NUMBER_CONTROLS = {"ratio": ("Compression ratio (step 3)", False), "rank": ("LoRA rank (step 3)", True),
                   "batch_size": ("Batch size (step 3)", True),
                   "steps": ("Training steps (step 4)", True), "lr": ("Learning rate (step 4)", False),
                   "lam": ("Correction clamp λ (step 4)", False), "seed": ("Seed (step 4)", True),
                   "calibration_samples": ("Calibration samples (step 4)", True),
                   "checkpoint_every": ("Checkpoint every N steps (step 4, More settings)", True),
                   "resolution": ("Image size (step 4, More settings)", True),
                   "preview_steps": ("Preview denoising steps (step 4, More settings)", True),
                   "max_sequence_length": ("Text tokens (step 4, More settings)", True),
                   "max_new_tokens": ("Longest preview answer (step 4, More settings)", True)}


def checked_numbers(request: TrainRequest) -> TrainRequest:
    """The request with every number box read as a number; an empty or non-numeric box is named in words."""
    values = {}
    for name, (label, whole) in NUMBER_CONTROLS.items():
        value = getattr(request, name)
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{label} is empty; type a {'whole ' if whole else ''}number") from None
        if number != number:  # nan
            raise ValueError(f"{label} is not a number; type a {'whole ' if whole else ''}number")
        if whole and (not math.isfinite(number) or number != int(number)):
            raise ValueError(f"{label} must be a whole number; got {number:g}")
        values[name] = int(number) if whole else number
    return dataclasses.replace(request, **values)


def run_name(task: str, runs_dir: Path) -> str:
    """A new, unused run name such as flux-20261123-1630."""
    stem = f"{task}-{time.strftime('%Y%m%d-%H%M')}"
    name, n = stem, 2
    while (Path(runs_dir) / name).exists():
        name, n = f"{stem}-{n}", n + 1
    return name


def check_run_name(name: str, runs_dir: Path) -> Path:
    """The folder of a new run called `name`; refuses bad names and names already taken."""
    name = (name or "").strip()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}", name):
        raise ValueError(f"run name {name!r}: use letters, digits, '-', '_' or '.' (up to 80 characters), "
                         "starting with a letter or digit")
    folder = Path(runs_dir) / name
    if folder.exists():
        raise FileExistsError(f"a run named {name!r} already exists; choose another name (open the old one under "
                              "Past runs)")
    return folder


def read_losses(run_dir: str | Path) -> list[tuple[int, float]]:
    """(step, loss) pairs of a run's loss log."""
    path = Path(run_dir) / LOSS_LOG
    if not path.is_file():
        return []
    records = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return [(int(r["step"]), float(r["loss"])) for r in records]


def parse_seeds(text: str) -> list[int]:
    """'0, 1 2' -> [0, 1, 2]; ValueError in words for anything else."""
    parts = [p for p in re.split(r"[,\s]+", str(text or "").strip()) if p]
    if not parts:
        raise ValueError("give at least one seed, e.g. 0 or 0, 1, 2")
    try:
        seeds = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"seeds must be whole numbers separated by commas, e.g. 0, 1, 2; got {text!r}") from None
    if len(seeds) > MAX_SEEDS or any(s < 0 for s in seeds):
        raise ValueError(f"use 1 to {MAX_SEEDS} seeds, each 0 or more; got {text!r}")
    return seeds


class Studio:
    """The app's long-lived state: where runs live and the one background job."""

    def __init__(self, runs_dir: str | Path = "runs", demo_models: dict[str, Path] | None = None):
        self.runs_dir = Path(runs_dir).resolve()
        self.demo_models = demo_models or handlers.DEMO_MODELS
        self.jobs = JobManager()

    # -- step 4: start, watch, cancel ------------------------------------------------------------------
    def start_run(self, request: TrainRequest) -> str:
        """Check everything, create the run folder (data copied in) and start it; returns the run folder."""
        busy = self.jobs.busy_message()
        if busy:
            raise JobBusy(busy)
        folder = check_run_name(request.name, self.runs_dir)
        check_model_source(request.model, "the model")  # a hub id that is not downloaded, pickle-only weights...
        request = checked_numbers(request)
        run_settings = RunSettings(model=(request.model or "").strip(), ratio=float(request.ratio),
                                   steps=int(request.steps), lr=float(request.lr), rank=int(request.rank),
                                   alpha=float(request.rank), batch_size=int(request.batch_size),
                                   seed=int(request.seed), lam=float(request.lam),
                                   calibration_samples=int(request.calibration_samples),
                                   checkpoint_every=max(1, int(request.checkpoint_every)),
                                   ram_gb=float(request.ram_gb or 0.0))
        staging = Path(tempfile.mkdtemp(prefix="emloc-upload-"))
        try:
            settings = self._backend_settings(request, staging / "data")
            run = Run.create(folder, handlers.backend_for(request.task, request.model), run_settings, settings)
        except DataError as err:
            raise DataError(handlers.relabel(err, staging / "data")) from None
        except ValueError as err:
            raise ValueError(handlers.relabel(err, staging / "data")) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.jobs.start("run", run, lambda r: r.execute())
        return str(run.dir)

    def _backend_settings(self, request: TrainRequest, data: Path) -> Any:
        backend = handlers.backend_for(request.task, request.model) if request.task in handlers.TASKS else None
        settings_class = backend_class(backend).settings_class if backend else None
        if settings_class is None:
            raise ValueError("choose what to do in step 1 first")
        if request.task == "flux":
            staged = handlers.stage_flux_data(request.images, request.prompt, request.trigger, request.captions, data)
            tokens = int(request.max_sequence_length) or (512 if backend == "flux2" else 0)  # FLUX.2 pads to 512
            return settings_class(images=staged["images"], prompt=staged["prompt"], trigger=staged["trigger"],
                                  resolution=int(request.resolution), preview_steps=int(request.preview_steps),
                                  max_sequence_length=tokens)
        staged = handlers.stage_vlm_data(request.images, request.qa_table, data)
        return settings_class(data=staged["data"], max_new_tokens=int(request.max_new_tokens))

    def cancel(self) -> str:
        return self.jobs.cancel()

    def sample_now(self, run_dir: str) -> str:
        """Ask the training job to sample after its next step (Sample now); says what happens, in words."""
        from pipelines.runner.stages import SAMPLE_NOW

        status = self.jobs.status()
        if not run_dir or not status.running or Path(status.run_dir) != Path(run_dir):
            raise ValueError("no training is running: Sample now samples a run while it trains; start one first")
        (Path(run_dir) / SAMPLE_NOW).write_text("")
        return "Asked for samples: they appear below after the next training step."

    def job_view(self) -> dict:
        """What step 4 shows now: stage in words, progress bar, losses, log, and whether a job runs."""
        status = self.jobs.status()
        view = describe_job(status)
        if status.run_dir:
            view["text"] += "  \n" + settings_summary(status.run_dir) + command_words(status.run_dir)
        return view

    # -- step 5: previews ------------------------------------------------------------------------------
    def render_preview(self, run_dir: str, text: str, seeds: str, image: str | None = None,
                       upload: str | None = None) -> str:
        """New previews of a finished run for a prompt (FLUX) or a question (InternVL), in the background.

        InternVL: the question is asked about `image` (one of the run's images) or `upload` (a new image, kept in
        `<run>/asked/` so the answers can be shown beside it later)."""
        busy = self.jobs.busy_message()
        if busy:
            raise JobBusy(busy)
        if not run_dir:
            raise ValueError("no run yet: train one in step 4, or open one under Past runs")
        run = Run.open(run_dir)
        if not run.output("correct").exists():
            raise FileNotFoundError(f"{Path(run_dir).name} has no corrected LoRA yet; let training finish first")
        text = (text or "").strip()
        if run.info["backend"] == "flux":
            run.backend.settings.preview_seeds = parse_seeds(seeds)
            run.backend.settings.preview_prompts = [text] if text else []
        else:
            if not text:
                raise ValueError("type a question to ask the three models")
            run.backend.settings.preview_questions = [text]
            if upload:
                try:
                    check_image(Path(upload), handlers.LIMITS["vlm"])
                except DataError as err:  # said with the file's name, not the upload's temporary path
                    raise DataError(str(err).replace(str(upload), Path(upload).name)) from None
                asked = Path(run_dir) / ASKED_DIR / time.strftime("%Y%m%d-%H%M%S")
                asked.mkdir(parents=True, exist_ok=True)
                target = asked / Path(upload).name
                shutil.copyfile(upload, target)
                run.backend.settings.preview_images = [str(target)]
            else:
                run.backend.settings.preview_images = [str(Path(run_dir) / "data" / "images" / image)] if image else []
        prompts = list(getattr(run.backend.settings, "preview_prompts", []) or [])

        def render(r: Run) -> str:
            folder = r.preview()
            if prompts:  # the file names keep only 40 characters of a prompt
                (folder / results.REQUEST_FILE).write_text(json.dumps({"prompts": prompts}))
            return str(folder)

        self.jobs.start("preview", run, render)
        return f"Rendering previews of {Path(run_dir).name}; they appear here when ready."

    def previews(self, run_dir: str, uncorrected: bool = False) -> dict:
        """The newest previews of a run: {"task", "images", "headers", "rows", "scores", "text"}."""
        if not run_dir:
            return {"task": "", "images": [], "headers": [], "rows": [], "scores": "",
                    "text": "No run yet: train one in step 4, or open one under Past runs."}
        info = results.run_info(run_dir)
        folders = results.preview_folders(run_dir)
        view = {"task": info["backend"], "images": [], "headers": [], "rows": [], "scores": "", "text": ""}
        if not folders:
            view["text"] = f"{Path(run_dir).name} has no previews yet; they are made at the end of training."
            return view
        newest = folders[-1]
        columns = "base | emulator + LoRA | full model + corrected LoRA"
        columns += " | full + uncorrected LoRA" if uncorrected else ""
        view["text"] = f"Previews of **{Path(run_dir).name}** ({newest.name}): {columns}."
        if info["backend"] == "flux":
            known = results.preview_prompts(run_dir, newest)
            view["images"], prompts = results.flux_previews(newest, uncorrected, known)
            view["text"] += " Prompt" + ("s" if len(prompts) > 1 else "") + ": " + "; ".join(f"“{p}”" for p in prompts)
        else:
            view["headers"], view["rows"], view["scores"] = results.vlm_previews(newest, uncorrected, run_dir)
        return view

    def question_images(self, run_dir: str) -> list[str]:
        folder = Path(run_dir or "") / "data" / "images"
        return sorted(p.name for p in folder.iterdir()) if run_dir and folder.is_dir() else []

    # -- step 6 and Past runs --------------------------------------------------------------------------
    def export(self, run_dir: str) -> dict:
        """{"text", "snippet", "zip"} of a finished run."""
        if not run_dir:
            raise ValueError("no run yet: train one in step 4, or open one under Past runs")
        info = results.export_info(run_dir)
        run = Run.open(run_dir)
        run.check_adapters()  # a NaN, incomplete or mis-shaped adapter is refused, in words
        # reproduces a preview with its settings, offloading the model where the run's plan did
        snippet = run.backend.export_snippet(Path(info["folder"]), run.info.get("plan"))
        return {**info, "snippet": snippet, "zip": results.export_zip(run_dir)}

    def list_runs(self) -> list[dict]:
        """Every run under the runs folder, newest first: name, task, model, created, status, steps.

        A run whose run.json is damaged is listed as damaged (with why); the others as usual."""
        runs = []
        running = self.jobs.status()
        for path in Path(self.runs_dir).glob(f"*/{RUN_FILE}"):
            try:
                info = results.run_info(path.parent)
            except (OSError, ValueError) as err:
                runs.append({"name": path.parent.name, "task": "?", "model": "", "created": "",
                             "status": f"damaged: {results.damage_words(err)}", "steps": ""})
                continue
            stages = info["stages"]
            pending = [s for s in STAGES if not isinstance(stages.get(s), dict) or stages[s].get("status") != "done"]
            status = "finished" if not pending else stage_words(pending[0], stages.get(pending[0]),
                                                                 info["settings"]["run"].get("model", ""))
            if running.running and Path(running.run_dir) == path.parent:
                status = "running now"
            settings = info["settings"]["run"]
            try:
                steps = f"{len(read_losses(path.parent))} of {settings.get('steps', '?')}"
            except (ValueError, KeyError, TypeError):  # a damaged loss log does not hide the run
                steps = f"? of {settings.get('steps', '?')}"
            runs.append({"name": path.parent.name, "task": handlers.TASKS.get(info["backend"], "?"),
                         "model": Path(str(settings.get("model", ""))).name, "created": str(info.get("created", "")),
                         "status": status, "steps": steps})
        return sorted(runs, key=lambda r: r["created"], reverse=True)

    def open_run(self, name: str) -> str:
        """The folder of the past run `name` (checked)."""
        if not name:
            raise ValueError("pick a run in the list first")
        folder = self.runs_dir / name
        results.run_info(folder)
        return str(folder)

    def resume_run(self, name: str) -> str:
        """Continue an interrupted run from its last finished stage / checkpoint, in the background."""
        busy = self.jobs.busy_message()
        if busy:
            raise JobBusy(busy)
        run = Run.open(self.open_run(name))
        if all(run.info["stages"][s].get("status") == "done" for s in STAGES):
            raise ValueError(f"{name} is already finished; open it to see its results")
        self.jobs.start("run", run, lambda r: r.execute(), losses=read_losses(run.dir))
        return str(run.dir)

    def extend_run(self, name: str, steps: Any) -> str:
        """Train the finished run `name` on to `steps` in the background; its results so far are kept in earlier/."""
        busy = self.jobs.busy_message()
        if busy:
            raise JobBusy(busy)
        run = Run.open(self.open_run(name))
        if not all(run.info["stages"][s].get("status") == "done" for s in STAGES):
            raise ValueError(f"{name} is not finished; press Resume to finish it, then train it further")
        done = run.settings.steps
        try:
            target = float(steps)
        except (TypeError, ValueError):
            raise ValueError(f"Train to (steps) is empty; type a whole number of steps above {done}") from None
        if not math.isfinite(target) or target != int(target):
            raise ValueError(f"Train to (steps) must be a whole number; got {target:g}")
        if target <= done:
            raise ValueError(f"Train further needs more steps than {name} has ({done}): type more than {done} in "
                             "Train to (steps)")
        self.jobs.start("run", run, lambda r: r.extend(int(target)), losses=read_losses(run.dir))
        return str(run.dir)


FAILURE_CHARS = 400  # a failure's message in the Past runs table, cut here


def stage_words(stage: str, entry: Any, model: str = "") -> str:
    """The state of a run's first unfinished stage for Past runs: 'failed at calibrate: <why>', 'cancelled at ...'."""
    status = entry.get("status", "pending") if isinstance(entry, dict) else "pending"
    if status == "failed":
        why = failure_words(entry.get("error", ""), model)
        return f"failed at {stage}: {why[:FAILURE_CHARS]}{'…' if len(why) > FAILURE_CHARS else ''}"
    return f"{status} at {stage}"


def settings_summary(run_dir: str | Path) -> str:
    """One line with the settings a run was started with (from its run.json)."""
    try:
        info = results.run_info(run_dir)
    except (OSError, ValueError):
        return ""
    run, backend = info["settings"]["run"], info["settings"]["backend"]
    parts = [f"model {Path(run['model']).name}", f"{run['steps']} steps", f"ratio {run['ratio']:.2f}",
             f"LoRA rank {run['rank']}", f"learning rate {run['lr']:g}", f"λ {run['lam']:g}", f"seed {run['seed']}"]
    if info["backend"] == "flux":
        parts.append(f"{backend.get('resolution')} px")
    return "Settings: " + " · ".join(parts)


def command_words(run_dir: str | Path) -> str:
    """The recorded `launch.py train ...` line of a run, as the Train step shows it ("" for older runs)."""
    try:
        command = results.run_info(run_dir).get("command")
    except (OSError, ValueError):
        return ""
    if not command:
        return ""
    return ("\n\nThe same run from a terminal (in the EMLoC Studio folder; it reads the copy of your data in the "
            f"run folder and writes a new run beside it):\n\n```\n{command}\n```")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def describe_job(status: JobStatus) -> dict:
    """The job in words and numbers for step 4 (pure: easy to test)."""
    name = Path(status.run_dir).name if status.run_dir else ""
    if status.state == "idle":
        return {"state": "idle", "kind": "", "running": False, "run_dir": "", "finished": 0.0, "losses": [], "log": "",
                "version": status.version, "stage": "", "preview_progress": "", "started": 0.0,
                "text": "Nothing is running. Press **Start training** when the steps above are done.",
                "progress": progress_bar(0.0, "not started")}
    index = STAGES.index(status.stage) if status.stage in STAGES else 0
    within = status.step / status.total if status.total else 0.0
    fraction = 1.0 if status.state == "done" else (index + within) / len(STAGES)
    words = STAGE_WORDS.get(status.stage, status.stage)
    detail = f"step {status.step} of {status.total}" if status.total > 1 else ""
    if status.losses and status.stage == "train":
        detail += f" · loss {status.losses[-1][1]:.4f}"
    if status.eta and status.state == "running" and status.total > 1:
        detail += f" · about {_duration(status.eta)} left in this stage"
    elapsed = _duration((status.finished or time.time()) - status.started)
    what = "Previews" if status.kind == "preview" else "Run"
    text = {"running": f"**{what} {name}: {words}** (stage {index + 1} of {len(STAGES)}{', ' + detail if detail else ''})",
            "done": f"**{what} {name} finished** in {elapsed}. See the previews in step 5 and the files in step 6.",
            "cancelled": f"**{what} {name} was cancelled** ({status.error}). Resume it under Past runs.",
            "failed": f"**{what} {name} failed** at {status.stage}: {failure_words(status.error)}. Fix the cause and "
                      "resume it under Past runs, or start a new run."}[status.state]
    bar = progress_bar(fraction, f"{words} · {detail}" if status.state == "running" and detail else
                       ("done" if status.state == "done" else words))
    rendering = ""  # step 5's own bar while a preview job runs: which of the four models is being sampled
    if status.kind == "preview" and status.state == "running":
        done = status.step if status.stage == "preview" else 0
        total = len(PREVIEW_VARIANTS)
        label = PREVIEW_VARIANTS[min(done, total - 1)] if status.stage == "preview" else "loading the models"
        rendering = progress_bar(done / total, f"Rendering previews of {name}: {label} ({min(done + 1, total)} of "
                                               f"{total} models) · {elapsed} so far")
    return {"state": status.state, "kind": status.kind, "running": status.running, "finished": status.finished,
            "run_dir": status.run_dir, "losses": status.losses, "stage": status.stage, "preview_progress": rendering,
            "started": status.started,
            "log": "\n".join(reversed(status.log)), "version": status.version, "text": text, "progress": bar}
