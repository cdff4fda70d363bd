"""Handlers of steps 4-6 and Past runs: start, watch, cancel and resume runs; previews and export.

`Studio` holds what outlives a browser tab: the runs folder and the one `JobManager`. A run is created here (its
settings and data checked, the data copied in: `Run.create`, quick) and then trained by its own process, the
`launch.py train --out <run> --resume` command (app/jobs.py); previews likewise run `launch.py preview`. Every
method takes and returns plain values (dicts by name), so tests call them without a browser.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from pipelines.runner import PREVIEW_VARIANTS, STAGES, Run, RunSettings
from pipelines.runner.checks import check_model_source
from pipelines.runner.data import DataError, check_image
from pipelines.runner.registry import demo_suggestions, with_suggestions
from pipelines.runner.exports import export_zip
from pipelines.runner.requests import MAX_SEEDS, parse_prompts, parse_scales, parse_seeds  # noqa: F401

from . import families, form, handlers, results, validation
from .jobs import JobBusy, JobManager, JobStatus, read_losses
from .jobqueue import JobQueue, QueuedJob
from .plots import progress_bar
from .words import failure_words

STAGE_WORDS = {"starting": "Starting", "cache": "Caching your data (text embeddings, latents, tokens)",
               "calibrate": "Calibrating: reading your data through the full model",
               "emulate": "Building the low-rank emulator", "train": "Training the LoRA on the emulator",
               "correct": "Correcting the LoRA for the full model", "preview": "Rendering previews",
               "grid": "Rendering the strength grid"}
ASKED_DIR = "asked"  # new images a question was asked about in step 5, inside the run folder
IDLE = "Nothing is running. Press **Start training** when the steps above are done."
__all__ = ["JobBusy", "Studio", "describe_job", "parse_seeds", "read_losses", "run_name"]


def ordinal(n: int) -> str:
    """1 -> '1st', 2 -> '2nd', 11 -> '11th'."""
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def run_name(backend: str, runs_dir: Path) -> str:
    """A new, unused run name such as flux-20261123-1630 (the backend's registered name first)."""
    stem = f"{backend or 'run'}-{time.strftime('%Y%m%d-%H%M')}"
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


def _preview_flag(settings_class: type, name: str) -> str:
    f = next(f for f in dataclasses.fields(settings_class) if f.name == name)
    return f.metadata["preview"]


class Studio:
    """The app's long-lived state: where runs live, the one running job and the jobs queued behind it."""

    def __init__(self, runs_dir: str | Path = "runs", demo_models: dict[str, Path] | None = None):
        self.runs_dir = Path(runs_dir).resolve()
        self.demo_models = families.demo_models(demo_models)
        self.jobs = JobManager()
        self.jobs.attach(self.runs_dir)  # a job an earlier app started that still runs is this app's job again
        self.queue = JobQueue(self.runs_dir, self.jobs)  # jobs an earlier app lined up start in their turn

    def submit(self, job: QueuedJob, queue: bool = True) -> int:
        """Start `job` now, or line it up behind the running job (app/jobqueue.py); returns its place in line, 0 when
        it started."""
        return self.queue.submit(job, queue)

    def close(self) -> None:
        """The app stops: no queued job starts any more (they stay in the queue's file for the next app)."""
        self.queue.close()

    # -- step 4: start, watch, cancel ------------------------------------------------------------------
    def start_run(self, values: dict[str, Any], queue: bool = False) -> str:
        """Check everything, create the run folder (data copied in) and start its process; returns the folder.
        With `queue`, a run that cannot start now waits in the queue (`queue.place_of` says where).

        `values` by name: "kind" (the task's data kind), "model", "name", the data ("images", "prompt", "trigger",
        "captions" or "images", "qa_table") and the settings the page shows (RunSettings' and the backend's field
        names)."""
        busy = self.jobs.busy_message() or (self.queue.jobs() and "jobs are waiting in the queue: press Add to "
                                                                    "queue so that this run waits its turn")
        if busy and not queue:  # refused before its folder is made
            raise JobBusy(busy)
        folder = check_run_name(values.get("name", ""), self.runs_dir)
        model = (values.get("model") or "").strip()
        check_model_source(model, "the model")  # a hub id that is not downloaded, pickle-only weights...
        backend = families.model_backend(model)
        if families.backend_type(backend).data_kind != values.get("kind"):
            raise ValueError(f"{model} is a {families.display_name(backend)} model; choose one for this task in step 1")
        numbers = {n: form.read_number(n, values.get(n)) for n in form.TRAIN_FIELDS + form.MORE_FIELDS
                   + ("ratio", "rank", "batch_size")}
        numbers["ram_gb"] = float(values.get("ram_gb") or 0.0)
        numbers["checkpoint_every"] = max(1, numbers["checkpoint_every"])
        # a demo's suggestions fill the settings this page has no control for, as the CLI's defaults do
        run_settings = with_suggestions(RunSettings, dict(
            model=model, alpha=float(numbers["rank"]), **numbers,
            sample_prompts=parse_prompts(values.get("sample_prompts"), "Sample prompts"),
            emulator_kind=values.get("emulator_kind") or "lowrank"), demo_suggestions(model))  # the Budget step's kind
        staging = Path(tempfile.mkdtemp(prefix="emloc-upload-"))
        try:
            settings = self._backend_settings(backend, values, staging / "data")
            run = Run.create(folder, backend, run_settings, settings)
        except DataError as err:
            raise DataError(handlers.relabel(err, staging / "data")) from None
        except ValueError as err:
            raise ValueError(handlers.relabel(err, staging / "data")) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.submit(QueuedJob("run", str(run.dir), ["train", "--out", str(run.dir), "--resume", "--quiet",
                                                    "--log-level", "info"], what="training"), queue)
        return str(run.dir)

    def _backend_settings(self, backend: str, values: dict, data: Path) -> Any:
        backend_type = families.backend_type(backend)
        suggested = demo_suggestions((values.get("model") or "").strip())  # for the settings not shown
        shown = {n: form.read_number(n, values.get(n), form.field_view(backend_type.settings_class, n))
                 for n in form.backend_fields(backend) if values.get(n) is not None}
        shown.update(form.data_settings(backend, values, data.parent))  # the Data step's held-out count, sizes,
        # class prompt and class images (staged beside the photos)
        shown.update(validation.stage(backend, values, values.get("images"), data.parent))  # its validation upload
        if backend_type.data_kind == "images":
            staged = handlers.stage_photo_data(values.get("images"), values.get("prompt"), values.get("trigger"),
                                               values.get("captions"), data)
            return with_suggestions(backend_type.settings_class, dict(
                images=staged["images"], prompt=staged["prompt"], trigger=staged["trigger"], **shown), suggested)
        staged = handlers.stage_qa_data(values.get("images"), values.get("qa_table"), data)
        return with_suggestions(backend_type.settings_class, dict(data=staged["data"], **shown), suggested)

    def cancel(self) -> str:
        """Stop the running job after its current step; the queue goes on with the next job (said so)."""
        said = self.jobs.cancel()
        waiting = self.queue.jobs()
        if waiting and said.startswith("Stopping"):
            said += (f" Then the next job in the queue starts ({waiting[0].name}); remove it from the queue below "
                     "to keep the machine free.")
        return said

    def sample_now(self, run_dir: str) -> str:
        """Ask the training job to sample after its next step (Sample now); says what happens, in words."""
        from pipelines.runner.stages import SAMPLE_NOW

        status = self.jobs.status()
        if not run_dir or not status.running or status.kind != "run" or Path(status.run_dir) != Path(run_dir):
            raise ValueError("no training is running: Sample now samples a run while it trains; start one first")
        (Path(run_dir) / SAMPLE_NOW).write_text("")
        return "Asked for samples: they appear below after the next training step."

    # -- step 5: previews ------------------------------------------------------------------------------
    def render_preview(self, run_dir: str, text: str, seeds: str, image: str | None = None,
                       upload: str | None = None, scales: str = "") -> str:
        """New previews of a finished run in their own process (`launch.py preview`): for prompts (one per line) and
        seeds (image previews) or questions about one of the run's images or a new one (answer previews, the new
        image kept in `<run>/asked/` so the answers can be shown beside it later). `scales` ("0, 0.5, 1"): a
        strength grid of the corrected LoRA instead (app/grid.py shows it). While another job runs they wait in the
        queue."""
        if not run_dir:
            raise ValueError("no run yet: train one in step 4, or open one under Past runs")
        info = results.run_info(run_dir)
        if not (Path(run_dir) / "lora" / "corrected").is_dir():
            raise FileNotFoundError(f"{Path(run_dir).name} has no corrected LoRA yet; let training finish first")
        settings_class = families.backend_type(info["backend"]).settings_class
        texts = parse_prompts(text, "New prompt")
        name = time.strftime("previews-%Y%m%d-%H%M%S")
        arguments = ["preview", "--run", str(run_dir), "--name", name]
        if scales:
            arguments += ["--scales", ", ".join(f"{s:g}" for s in parse_scales(scales, "LoRA strengths"))]
        writes = {}
        if families.preview_kind(info["backend"]) == families.IMAGE_PREVIEW:
            for seed in parse_seeds(seeds, "Seeds"):
                arguments += [_preview_flag(settings_class, "preview_seeds"), str(seed)]
            for prompt in texts:
                arguments += [_preview_flag(settings_class, "preview_prompts"), prompt]
            if texts:  # the file names keep only the start of a prompt: the page shows it in full
                writes[str(Path(run_dir) / name / results.REQUEST_FILE)] = json.dumps({"prompts": texts})
        else:
            if not texts and not scales:
                raise ValueError("type a question to ask the three models")
            for question in texts:  # none (a grid only): the run's own preview questions, about their own images
                arguments += [_preview_flag(settings_class, "preview_questions"), question]
            if texts and upload:
                try:
                    check_image(Path(upload), handlers.LIMITS["qa"])
                except DataError as err:  # said with the file's name, not the upload's temporary path
                    raise DataError(str(err).replace(str(upload), Path(upload).name)) from None
                asked = Path(run_dir) / ASKED_DIR / time.strftime("%Y%m%d-%H%M%S")
                asked.mkdir(parents=True, exist_ok=True)
                target = asked / Path(upload).name
                shutil.copyfile(upload, target)
                arguments += [_preview_flag(settings_class, "preview_images"), str(target)]
            elif texts and image:
                arguments += [_preview_flag(settings_class, "preview_images"),
                              str(Path(run_dir) / "data" / "images" / image)]
        place = self.submit(QueuedJob("preview", str(run_dir), arguments, result=str(Path(run_dir) / name),
                                      writes=writes, what="previews"))
        if place:
            return (f"Queued new previews of {Path(run_dir).name}: {ordinal(place)} in line; they render when the "
                    "jobs before them have finished and appear here then.")
        return f"Rendering previews of {Path(run_dir).name}; they appear here when ready."

    def previews(self, run_dir: str, uncorrected: bool = False) -> dict:
        """The newest previews of a run: {"kind" (the backend's preview kind), "images", "headers", "rows",
        "scores", "text"}."""
        if not run_dir:
            return {"kind": "", "images": [], "headers": [], "rows": [], "scores": "",
                    "text": "No run yet: train one in step 4, or open one under Past runs."}
        info = results.run_info(run_dir)
        kind = families.preview_kind(info["backend"])
        folders = results.preview_folders(run_dir)
        view = {"kind": kind, "images": [], "headers": [], "rows": [], "scores": "", "text": ""}
        if not folders:
            view["text"] = f"{Path(run_dir).name} has no previews yet; they are made at the end of training."
            return view
        newest = folders[-1]
        columns = "base | emulator + LoRA | full model + corrected LoRA"
        columns += " | full + uncorrected LoRA" if uncorrected else ""
        view["text"] = f"Previews of **{Path(run_dir).name}** ({newest.name}): {columns}."
        if kind == families.IMAGE_PREVIEW:
            known = results.preview_prompts(run_dir, newest)
            view["images"], prompts = results.image_previews(newest, uncorrected, known)
            view["text"] += " Prompt" + ("s" if len(prompts) > 1 else "") + ": " + "; ".join(f"“{p}”" for p in prompts)
        else:
            view["headers"], view["rows"], view["scores"] = results.answer_previews(newest, uncorrected, run_dir)
            asked, total = len(view["rows"]), question_count(run_dir)
            if newest.name == "previews" and total > asked:
                view["text"] += (f" The run's previews ask {asked} of your {total} questions (the run's preview "
                                 "samples); ask any other one below.")
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
        # the zip holds a README.md (what each file is, the trigger word, how to load each: pipelines/runner/cards.py)
        return {**info, "snippet": snippet, "zip": str(export_zip(run, None, snippet))}

    def open_run(self, name: str) -> str:
        """The folder of the past run `name` (checked)."""
        if not name:
            raise ValueError("pick a run in the list first")
        folder = self.runs_dir / name
        results.run_info(folder)
        self.jobs.attach(self.runs_dir)  # its job may have been started by an app that has since stopped
        return str(folder)

    def resume_run(self, name: str) -> str:
        """Continue an interrupted run from its last finished stage / checkpoint, in its own process; while another
        job runs it waits in the queue (`queue.place_of` says where)."""
        folder = self.open_run(name)
        self._check_not_lined_up(folder)
        info = results.run_info(folder)
        if all(info["stages"][s].get("status") == "done" for s in STAGES):
            raise ValueError(f"{name} is already finished; open it to see its results")
        self.submit(QueuedJob("run", folder, ["train", "--out", folder, "--resume", "--quiet", "--log-level", "info"],
                              what="resume"))
        return folder

    def extend_run(self, name: str, steps: Any) -> str:
        """Train the finished run `name` on to `steps` in its own process; its results so far are kept in earlier/.
        While another job runs it waits in the queue (`queue.place_of` says where)."""
        folder = self.open_run(name)
        self._check_not_lined_up(folder)
        info = results.run_info(folder)
        if not all(info["stages"][s].get("status") == "done" for s in STAGES):
            raise ValueError(f"{name} is not finished; press Resume to finish it, then train it further")
        done = int(info["settings"]["run"]["steps"])
        try:
            target = float(steps)
        except (TypeError, ValueError):
            raise ValueError(f"Train to (steps) is empty; type a whole number of steps above {done}") from None
        if target != target or target in (float("inf"), float("-inf")) or target != int(target):
            raise ValueError(f"Train to (steps) must be a whole number; got {target:g}")
        if target <= done:
            raise ValueError(f"Train further needs more steps than {name} has ({done}): type more than {done} in "
                             "Train to (steps)")
        self.submit(QueuedJob("run", folder, ["train", "--out", folder, "--resume", "--steps", str(int(target)),
                                              "--quiet", "--log-level", "info"],
                              what=f"training further to {int(target)} steps"))
        return folder

    def _check_not_lined_up(self, folder: str) -> None:
        """Refuse a second job of a run whose job runs now or already waits in the queue (they would repeat)."""
        status, name = self.jobs.status(), Path(folder).name
        if status.running and Path(status.run_dir) == Path(folder):
            raise JobBusy(f"{name} is already running; wait for it to finish (or press Cancel in step 4) first")
        place = self.queue.place_of(folder)
        if place:
            raise JobBusy(f"{name} is already waiting in the queue ({ordinal(place)} in line); remove it from the "
                          "queue in step 4 to change what it does")


def question_count(run_dir: str | Path) -> int:
    path = Path(run_dir) / "data" / "qa.jsonl"
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip()) if path.is_file() else 0


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
                "text": IDLE, "progress": progress_bar(0.0, "not started")}
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
    grid = " --scales " in f" {status.command} "  # a strength grid, from its start (loading) to its last image
    if status.kind == "preview" and status.state == "running" and (grid or status.stage == "grid"):  # app/grid.py
        message = status.message if status.stage == "grid" else "loading the models"
        rendering = progress_bar(status.step / status.total if status.total and status.stage == "grid" else 0.0,
                                 f"Rendering the strength grid of {name}: {message or 'starting'} · {elapsed} so far")
    elif status.kind == "preview" and status.state == "running":
        done = status.step if status.stage == "preview" else 0
        total = len(PREVIEW_VARIANTS)
        label = PREVIEW_VARIANTS[min(done, total - 1)] if status.stage == "preview" else "loading the models"
        rendering = progress_bar(done / total, f"Rendering previews of {name}: {label} ({min(done + 1, total)} of "
                                               f"{total} models) · {elapsed} so far")
    return {"state": status.state, "kind": status.kind, "running": status.running, "finished": status.finished,
            "run_dir": status.run_dir, "losses": status.losses, "stage": status.stage, "preview_progress": rendering,
            "started": status.started,
            "log": "\n".join(reversed(status.log)), "version": status.version, "text": text, "progress": bar}
