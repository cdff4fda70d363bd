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

from pipelines.runner import PREVIEW_VARIANTS, RUN_FILE, STAGES, Run, RunSettings
from pipelines.runner.checks import check_model_source
from pipelines.runner.data import DataError, check_image

from . import families, form, handlers, results
from .jobs import JobBusy, JobManager, JobStatus, read_losses
from .plots import progress_bar
from .words import failure_words

STAGE_WORDS = {"starting": "Starting", "cache": "Caching your data (text embeddings, latents, tokens)",
               "calibrate": "Calibrating: reading your data through the full model",
               "emulate": "Building the low-rank emulator", "train": "Training the LoRA on the emulator",
               "correct": "Correcting the LoRA for the full model", "preview": "Rendering previews"}
MAX_SEEDS = 16
ASKED_DIR = "asked"  # new images a question was asked about in step 5, inside the run folder
IDLE = "Nothing is running. Press **Start training** when the steps above are done."
__all__ = ["JobBusy", "Studio", "describe_job", "parse_seeds", "read_losses", "run_name"]


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


def parse_seeds(text: str) -> list[int]:
    """'0, 1 2' -> [0, 1, 2]; '1000-1003' -> [1000, 1001, 1002, 1003]; ValueError in words for anything else."""
    parts = [p for p in re.split(r"[,\s]+", str(text or "").strip()) if p]
    if not parts:
        raise ValueError("give at least one seed, e.g. 0 or 0, 1, 2 or a range 1000-1015")
    seeds: list[int] = []
    for part in parts:
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise ValueError(f"seeds must be whole numbers or ranges separated by commas, e.g. 0, 1, 1000-1015; "
                             f"got {text!r}")
        low, high = int(match.group(1)), int(match.group(2) or match.group(1))
        if high < low:
            raise ValueError(f"the seed range {part} runs backwards; write it as {high}-{low}")
        seeds += range(low, min(high, low + MAX_SEEDS) + 1)
    if len(seeds) > MAX_SEEDS:
        raise ValueError(f"use 1 to {MAX_SEEDS} seeds (each makes one row of pictures); got {len(seeds)} in {text!r}")
    return seeds


def _preview_flag(settings_class: type, name: str) -> str:
    f = next(f for f in dataclasses.fields(settings_class) if f.name == name)
    return f.metadata["preview"]


class Studio:
    """The app's long-lived state: where runs live and the one job."""

    def __init__(self, runs_dir: str | Path = "runs", demo_models: dict[str, Path] | None = None):
        self.runs_dir = Path(runs_dir).resolve()
        self.demo_models = families.demo_models(demo_models)
        self.jobs = JobManager()

    # -- step 4: start, watch, cancel ------------------------------------------------------------------
    def start_run(self, values: dict[str, Any]) -> str:
        """Check everything, create the run folder (data copied in) and start its process; returns the folder.

        `values` by name: "kind" (the task's data kind), "model", "name", the data ("images", "prompt", "trigger",
        "captions" or "images", "qa_table") and the settings the page shows (RunSettings' and the backend's field
        names)."""
        busy = self.jobs.busy_message()
        if busy:
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
        run_settings = RunSettings(model=model, alpha=float(numbers["rank"]), **numbers,
                                   emulator_kind=values.get("emulator_kind") or "lowrank")  # the Budget step's kind
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
        self.jobs.start("run", run.dir, ["train", "--out", str(run.dir), "--resume", "--quiet", "--log-level", "info"])
        return str(run.dir)

    def _backend_settings(self, backend: str, values: dict, data: Path) -> Any:
        backend_type = families.backend_type(backend)
        shown = {n: form.read_number(n, values.get(n), form.field_view(backend_type.settings_class, n))
                 for n in form.backend_fields(backend) if values.get(n) is not None}
        if backend_type.data_kind == "images":
            staged = handlers.stage_photo_data(values.get("images"), values.get("prompt"), values.get("trigger"),
                                               values.get("captions"), data)
            return backend_type.settings_class(images=staged["images"], prompt=staged["prompt"],
                                               trigger=staged["trigger"], **shown)
        staged = handlers.stage_qa_data(values.get("images"), values.get("qa_table"), data)
        return backend_type.settings_class(data=staged["data"], **shown)

    def cancel(self) -> str:
        return self.jobs.cancel()

    def sample_now(self, run_dir: str) -> str:
        """Ask the training job to sample after its next step (Sample now); says what happens, in words."""
        from pipelines.runner.stages import SAMPLE_NOW

        status = self.jobs.status()
        if not run_dir or not status.running or status.kind != "run" or Path(status.run_dir) != Path(run_dir):
            raise ValueError("no training is running: Sample now samples a run while it trains; start one first")
        (Path(run_dir) / SAMPLE_NOW).write_text("")
        return "Asked for samples: they appear below after the next training step."

    def train_view(self, run_dir: str) -> dict:
        """What step 4 shows for this page's run `run_dir` ("" = none yet): {"text", "progress", "losses", "log",
        "running" (this run's job runs: Cancel is live), "state", "kind", "version", "started", "preview_progress",
        "memory"}. Another run's job is only mentioned; the loss curve and summary come from the run's files, so
        they stay while a preview job of the run renders."""
        status = self.jobs.status()
        ours = bool(run_dir) and bool(status.run_dir) and Path(status.run_dir) == Path(run_dir)
        view = describe_job(status) if ours else describe_job(JobStatus(version=status.version))
        if not run_dir:
            if status.running:
                view["text"] += (f"  \n(Another job is running: {Path(status.run_dir).name}. Only one runs at a "
                                 "time; Past runs shows it.)")
            return {**view, "memory": "", "losses": []}
        if not ours or status.kind != "run":
            view["text"] = run_state_words(run_dir)
            finished = (Path(run_dir) / "lora" / "corrected").is_dir()
            view["progress"] = progress_bar(1.0 if finished else 0.0, "done" if finished else "not running")
            if not ours and status.running:
                view["text"] += (f"  \n(Another job is running: {Path(status.run_dir).name}. Only one runs at a "
                                 "time.)")
            if ours and status.kind == "preview":  # Cancel stops the preview job (step 5 shows its progress)
                view["log"] = "\n".join(reversed(status.log))
            else:
                view["log"], view["running"] = "", False
        view["losses"] = read_losses(run_dir)
        view["text"] += "  \n" + settings_summary(run_dir) + command_words(run_dir)
        try:
            view["memory"] = results.memory_table(results.run_info(run_dir))
        except (OSError, ValueError):
            view["memory"] = ""
        return view

    # -- step 5: previews ------------------------------------------------------------------------------
    def render_preview(self, run_dir: str, text: str, seeds: str, image: str | None = None,
                       upload: str | None = None) -> str:
        """New previews of a finished run in their own process (`launch.py preview`): for a prompt and seeds (image
        previews) or a question about one of the run's images or a new one (answer previews, the new image kept in
        `<run>/asked/` so the answers can be shown beside it later)."""
        busy = self.jobs.busy_message()
        if busy:
            raise JobBusy(busy)
        if not run_dir:
            raise ValueError("no run yet: train one in step 4, or open one under Past runs")
        info = results.run_info(run_dir)
        if not (Path(run_dir) / "lora" / "corrected").is_dir():
            raise FileNotFoundError(f"{Path(run_dir).name} has no corrected LoRA yet; let training finish first")
        settings_class = families.backend_type(info["backend"]).settings_class
        text = (text or "").strip()
        name = time.strftime("previews-%Y%m%d-%H%M%S")
        arguments = ["preview", "--run", str(run_dir), "--name", name]
        after = None
        if families.preview_kind(info["backend"]) == families.IMAGE_PREVIEW:
            for seed in parse_seeds(seeds):
                arguments += [_preview_flag(settings_class, "preview_seeds"), str(seed)]
            if text:
                arguments += [_preview_flag(settings_class, "preview_prompts"), text]
            prompts = [text] if text else []

            def after() -> None:  # the file names keep only the start of a prompt: the page shows it in full
                folder = Path(run_dir) / name
                if prompts and folder.is_dir():
                    (folder / results.REQUEST_FILE).write_text(json.dumps({"prompts": prompts}))
        else:
            if not text:
                raise ValueError("type a question to ask the three models")
            arguments += [_preview_flag(settings_class, "preview_questions"), text]
            if upload:
                try:
                    check_image(Path(upload), handlers.LIMITS["qa"])
                except DataError as err:  # said with the file's name, not the upload's temporary path
                    raise DataError(str(err).replace(str(upload), Path(upload).name)) from None
                asked = Path(run_dir) / ASKED_DIR / time.strftime("%Y%m%d-%H%M%S")
                asked.mkdir(parents=True, exist_ok=True)
                target = asked / Path(upload).name
                shutil.copyfile(upload, target)
                arguments += [_preview_flag(settings_class, "preview_images"), str(target)]
            elif image:
                arguments += [_preview_flag(settings_class, "preview_images"),
                              str(Path(run_dir) / "data" / "images" / image)]
        self.jobs.start("preview", run_dir, arguments, after=after, result=str(Path(run_dir) / name))
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
                runs.append({"name": path.parent.name, "task": "?", "model": "", "created": "", "stamp": "",
                             "status": f"damaged: {results.damage_words(err)}", "steps": ""})
                continue
            status = run_state(info)
            if running.running and Path(running.run_dir) == path.parent:
                status = "running now"
            settings = info["settings"]["run"]
            steps = f"{len(read_losses(path.parent))} of {settings.get('steps', '?')}"
            runs.append({"name": path.parent.name, "task": families.display_name(info["backend"]),
                         "model": Path(str(settings.get("model", ""))).name, "stamp": str(info.get("created", "")),
                         "created": results.when(info.get("created", "")), "status": status, "steps": steps})
        return sorted(runs, key=lambda r: r["stamp"], reverse=True)

    def open_run(self, name: str) -> str:
        """The folder of the past run `name` (checked)."""
        if not name:
            raise ValueError("pick a run in the list first")
        folder = self.runs_dir / name
        results.run_info(folder)
        return str(folder)

    def resume_run(self, name: str) -> str:
        """Continue an interrupted run from its last finished stage / checkpoint, in its own process."""
        busy = self.jobs.busy_message()
        if busy:
            raise JobBusy(busy)
        folder = self.open_run(name)
        info = results.run_info(folder)
        if all(info["stages"][s].get("status") == "done" for s in STAGES):
            raise ValueError(f"{name} is already finished; open it to see its results")
        self.jobs.start("run", folder, ["train", "--out", folder, "--resume", "--quiet", "--log-level", "info"])
        return folder

    def extend_run(self, name: str, steps: Any) -> str:
        """Train the finished run `name` on to `steps` in its own process; its results so far are kept in earlier/."""
        busy = self.jobs.busy_message()
        if busy:
            raise JobBusy(busy)
        folder = self.open_run(name)
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
        self.jobs.start("run", folder, ["train", "--out", folder, "--resume", "--steps", str(int(target)), "--quiet",
                                        "--log-level", "info"])
        return folder

    def run_steps(self, name: str) -> int | None:
        """The steps the run `name` has now (Past runs' "Train to" starts there)."""
        try:
            return int(results.run_info(self.runs_dir / name)["settings"]["run"]["steps"])
        except (OSError, ValueError, KeyError, TypeError):
            return None


FAILURE_CHARS = 400  # a failure's message in the Past runs table, cut here


def stage_words(stage: str, entry: Any, model: str = "") -> str:
    """The state of a run's first unfinished stage for Past runs: 'failed at calibrate: <why>', 'cancelled at ...'."""
    status = entry.get("status", "pending") if isinstance(entry, dict) else "pending"
    if status == "failed":
        why = failure_words(entry.get("error", ""), model)
        return f"failed at {stage}: {why[:FAILURE_CHARS]}{'…' if len(why) > FAILURE_CHARS else ''}"
    return f"{status} at {stage}"


def run_state(info: dict) -> str:
    """'finished', or the first unfinished stage's state ('cancelled at train', 'failed at calibrate: ...')."""
    stages = info["stages"]
    pending = [s for s in STAGES if not isinstance(stages.get(s), dict) or stages[s].get("status") != "done"]
    if not pending:
        return "finished"
    return stage_words(pending[0], stages.get(pending[0]), info["settings"]["run"].get("model", ""))


def run_state_words(run_dir: str | Path) -> str:
    """The Train step's first line for a run no job of this page is running."""
    name = Path(run_dir).name
    try:
        state = run_state(results.run_info(run_dir))
    except (OSError, ValueError) as err:
        return f"**Run {name}** cannot be read ({err})."
    if state == "finished":
        return f"**Run {name} finished.** See the previews in step 5 and the files in step 6."
    return f"**Run {name}: {state}.** Resume it under Past runs."


def question_count(run_dir: str | Path) -> int:
    path = Path(run_dir) / "data" / "qa.jsonl"
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip()) if path.is_file() else 0


def settings_summary(run_dir: str | Path) -> str:
    """One line with the settings a run was started with (from its run.json)."""
    try:
        info = results.run_info(run_dir)
    except (OSError, ValueError):
        return ""
    run, backend = info["settings"]["run"], info["settings"]["backend"]
    parts = [f"model {Path(run['model']).name} ({families.display_name(info['backend'])})", f"{run['steps']} steps",
             f"ratio {run['ratio']:.2f}", f"LoRA rank {run['rank']}", f"learning rate {run['lr']:g}",
             f"λ {run['lam']:g}", f"seed {run['seed']}"]
    if backend.get("resolution"):
        parts.append(f"{backend['resolution']} px")
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
