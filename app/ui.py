"""The page: a six-step wizard (model, data, budget, train, preview, export) and a Past runs tab.

Each step is a module of app/steps/ that builds its components and binds its events; components are named
"step.element" in one `Manager`. This file only puts the steps in order and binds the events that concern the whole
page: its load (the device, a job that may already be running), the model choice (which sets the later steps'
defaults) and the job timer (app/steps/train.py). One `PageState` per browser session is the run's page state.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import gradio as gr

from . import handlers, restore
from . import plan as plans
from .manager import Manager, Values, say
from .page import STEP, PageState
from .steps import Context, budget, data, export, model, preview, runs, train
from .steps import queue as queue_steps
from .studio import Studio

CSS = """
.emloc-msg p { font-size: 15px; }
.emloc-msg:empty { display: none; }
"""
# System fonts only: the app works offline, so no web fonts are fetched.
THEME = gr.themes.Soft(primary_hue="teal", font=["ui-sans-serif", "system-ui", "sans-serif"],
                       font_mono=["ui-monospace", "monospace"])
RECENT_S = 1800  # a job that ended this recently is offered on pages opened after it
SAVE_S = 1.5  # the page is kept in the browser this often (when it changed), for a reload
RUNS_REFRESH_S = 5  # Past runs is listed again this often while a job runs (its step count moves)

MODEL_INPUTS = ["page.state", "model.model", "data.prompt", *budget.PLAN_INPUTS]


def tick(studio: Studio, v: Values) -> Values:
    """Every second: the Train step follows this page's run; when its job ends well the results are shown (a run
    moves on to its previews); Past runs follows any job."""
    state: PageState = v["page.state"]
    seen = v["train.seen"] or {}
    job = studio.jobs.status()
    ours = bool(state.run_dir) and job.run_dir == state.run_dir
    now = time.time()
    relist = (job.state != seen.get("state") or job.stage != seen.get("stage")
              or (job.running and now - seen.get("listed", 0) >= RUNS_REFRESH_S))
    waiting = queue_steps.key(studio)
    drawn = {"version": job.version, "state": job.state, "stage": job.stage, "started": job.started,
             "run_dir": state.run_dir, "listed": now if relist else seen.get("listed", 0), "queue": waiting}
    if job.version == seen.get("version") and state.run_dir == seen.get("run_dir") and waiting == seen.get("queue"):
        return {}
    out: Values = {"train.seen": drawn, **train.job_view(studio, state.run_dir)}
    if waiting != seen.get("queue"):
        out.update(queue_steps.view(studio, v.get("queue.pick")))
        relist = True  # a run's status in Past runs says it waits
    if ours and job.kind == "preview":
        out["preview.progress"] = train.train_view(studio, state.run_dir)["preview_progress"]
    # a job that started and ended between two ticks (a quick preview) was never seen running: its start tells
    ended = (seen.get("state") == "running" or job.started != seen.get("started")) and not job.running
    if ours and ended and job.state == "done":
        out.update(preview.view(studio, state.run_dir, v["preview.uncorrected"]))
        out["preview.msg"] = ""
        if job.kind == "run":
            out.update(export.view(studio, state.run_dir))
            out["page.wizard"] = gr.Walkthrough(selected=STEP["preview"])
    if ours and ended and job.kind == "preview" and job.state != "done":
        out["preview.msg"] = say(f"The previews were not made: {job.error}", good=False)
    if relist:
        out.update(runs.view(studio, v["runs.pick"]))
    return out


def choose_model(studio: Studio, v: Values) -> Values:
    """A model was chosen: what it is, and the later steps' starting values for it (settings, plan, prompt)."""
    state: PageState = v["page.state"]
    info = handlers.describe_model(state.kind, v["model.model"])
    if state.restored_model and state.restored_model == v["model.model"]:  # a reload set it: its settings stay
        state.restored_model = ""
        return {"model.about": info["text"]}
    settings = train.settings_view(studio, info["backend"], info["params"], v["model.model"])
    suggested = plans.demo_ratio(v["model.model"])
    plan = budget.model_view({**v, "budget.rank": settings["budget.rank"],
                              "budget.batch_size": settings["budget.batch_size"]}, suggested)
    return {"model.about": info["text"], "model.msg": "", **settings, **plan,
            **data.prompt_view(v["model.model"], v["data.prompt"])}


def model_outputs() -> list[str]:
    return ["model.about", "model.msg", "train.name", "budget.rank", "budget.batch_size",
            *[f"train.{n}" for n in train.SETTINGS], *budget.PLAN_OUTPUTS, "budget.touched", "data.prompt"]


def load(studio: Studio, v: Values) -> Values:
    """A page opens: the device, its budgets, the runs; a page opened while a job runs follows it (step 4), one
    opened soon after a job ended offers its results."""
    device = handlers.detect_device()
    state: PageState = v["page.state"]
    state.device = device["kind"]
    out: Values = {"model.device": device["text"], "budget.runs_on": plans.runs_on(device),
                   "budget.budget": gr.Number(value=round(device["total_gb"]) if device["kind"] == "cuda" else
                                              v["budget.budget"], visible=device["kind"] == "cuda"),
                   "budget.presets": gr.Radio(choices=plans.preset_choices(device["kind"])), **runs.view(studio),
                   **queue_steps.view(studio)}
    job = studio.jobs.status()
    saved = v.get("page.saved") or {}
    saved_run = (saved.get("state") or {}).get("run_dir", "") if isinstance(saved, dict) else ""
    if job.running and saved_run != job.run_dir:  # the form follows the running job: its task, model and Train step
        out.update(runs.follow(studio, state, job.run_dir, False))
        out["page.wizard"] = gr.Walkthrough(selected=STEP["train"])
        out["page.tabs"] = gr.Tabs(selected="wizard")
        return out
    out["page.state"] = state
    back = restore.restore(studio, saved, state.device, v.get("preview.uncorrected", False))
    if back:  # a reload: the page as it was (what cannot come back is said at its step)
        return {**out, **back}
    ended = job.state in ("done", "cancelled", "failed") and time.time() - job.finished < RECENT_S
    out["model.show_last"] = gr.Button(
        value=f"Show {Path(job.run_dir).name}, the run that {job.state.replace('done', 'finished')} while this page "
              "was closed", visible=True) if ended else gr.Button(visible=False)
    out.update(choose_model(studio, {**v, "page.state": state}))
    return out


def show_last(studio: Studio, v: Values) -> Values:
    folder = studio.jobs.status().run_dir
    if not folder or not Path(folder).is_dir():
        raise ValueError("the last run is no longer there; see Past runs")
    return {**runs.follow(studio, v["page.state"], folder, v["preview.uncorrected"]),
            "model.show_last": gr.Button(visible=False), "model.msg": ""}


def step_picked(evt: gr.SelectData) -> int:
    return int(evt.index)


def build(studio: Studio) -> gr.Blocks:
    """The whole page bound to `studio` (one per process: it owns the job)."""
    manager = Manager()
    ctx = Context(manager, studio)
    with gr.Blocks(title="EMLoC Studio") as page:
        manager.add("page", {"state": gr.State(PageState()), "timer": gr.Timer(1.0), "step": gr.State(0),
                             "saved": restore.browser_state(studio.runs_dir), "save_timer": gr.Timer(SAVE_S)})
        gr.Markdown("# EMLoC Studio\nPersonalise a large model in the memory its inference needs: train a LoRA on "
                    "a small emulator of the model, then correct it for the full model.")
        with gr.Tabs() as tabs:
            manager.add("page", {"tabs": tabs})
            with gr.Tab("Personalise", id="wizard"):
                with gr.Walkthrough(selected=0) as wizard:
                    manager.add("page", {"wizard": wizard})
                    for step in (model, data, budget, train, preview, export):
                        step.build(ctx)
            with gr.Tab("Past runs", id="runs"):
                runs.build(ctx)
        # a step header clicked: remembered as the step shown (handlers that move the wizard set it themselves)
        wizard.select(step_picked, None, manager["page.step"], concurrency_id="save", show_progress="hidden")
        model.bind_task(ctx)
        data.bind_next(ctx)
        train.bind_late(ctx)
        runs.bind_late(ctx)
        manager.bind(manager["page.timer"].tick, partial(tick, studio),
                     ["page.state", "train.seen", "preview.uncorrected", "runs.pick", "queue.pick"],
                     ["train.seen", *train.VIEW, "page.wizard", "preview.progress", "preview.msg", *preview.IDS,
                      *export.IDS, *runs.view_ids(), *queue_steps.IDS], concurrency_id="tick")
        outputs = model_outputs()
        manager.bind(manager["model.model"].change, partial(choose_model, studio), MODEL_INPUTS, outputs,
                     message="model.msg")
        everything = ["page.state", "page.wizard", "page.tabs", "model.device", "model.show_last", "model.task",
                      "model.model", "budget.runs_on", "budget.budget", "budget.presets", *runs.view_ids(),
                      *data.TASK_IDS, "data.msg", *train.VIEW, "train.msg", *preview.IDS,
                      *export.IDS, *outputs]
        everything += ["page.step", *restore.FORM, *train.CLEARED_IDS, "model.about", *queue_steps.IDS]
        manager.bind(page.load, partial(load, studio), [*MODEL_INPUTS, "page.saved", "preview.uncorrected"],
                     list(dict.fromkeys(everything)), message="model.msg")
        manager.bind(manager["page.save_timer"].tick, partial(restore.save, studio),
                     list(dict.fromkeys(["page.state", "page.step", "page.saved", *restore.FORM])), ["page.saved"],
                     concurrency_id="save")
        manager.bind(manager["model.show_last"].click, partial(show_last, studio), ["page.state", "preview.uncorrected"],
                     list(dict.fromkeys(["page.state", "page.tabs", "page.wizard", "model.task", "model.model",
                                         *data.TASK_IDS, "data.msg", *train.VIEW, "train.msg",
                                         *preview.IDS, *export.IDS, "model.show_last", "model.msg"])),
                     message="model.msg")
    page.emloc_manager = manager  # tests reach components by id
    return page
