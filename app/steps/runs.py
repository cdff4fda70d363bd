"""Past runs: every run in the runs folder; open one (its results), resume one that was interrupted, or train a
finished one further; the picked run's memory, planned against held."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import gradio as gr
import pandas as pd

from pipelines.runner import RUN_FILE

from .. import families, handlers, results
from ..jobs import read_losses
from ..manager import Values, say
from ..studio import ordinal
from ..page import STEP, PageState
from . import Context
from . import queue as queue_steps

COLUMNS = ["name", "task", "model", "created", "status", "steps"]


def list_runs(studio) -> list[dict]:
    """Every run under the runs folder, newest first: name, task, model, created, status, steps.

    A run whose run.json is damaged is listed as damaged (with why); the others as usual."""
    runs = []
    running = studio.jobs.status()
    places: dict[Path, int] = {}  # a run's first job in the queue: its place in line
    for place, job in enumerate(studio.queue.jobs(), 1):
        places.setdefault(Path(job.run_dir), place)
    for path in Path(studio.runs_dir).glob(f"*/{RUN_FILE}"):
        try:
            info = results.run_info(path.parent)
        except (OSError, ValueError) as err:
            runs.append({"name": path.parent.name, "task": "?", "model": "", "created": "", "stamp": "",
                         "status": f"damaged: {results.damage_words(err)}", "steps": ""})
            continue
        status = results.run_state(info)
        place = places.get(path.parent, 0)
        if running.running and Path(running.run_dir) == path.parent:
            status = "running now"
        elif place:
            status = f"waiting in the queue ({ordinal(place)} in line)"
        settings = info["settings"]["run"]
        steps = f"{len(read_losses(path.parent))} of {settings.get('steps', '?')}"
        runs.append({"name": path.parent.name, "task": families.display_name(info["backend"]),
                     "model": Path(str(settings.get("model", ""))).name, "stamp": str(info.get("created", "")),
                     "created": results.when(info.get("created", "")), "status": status, "steps": steps})
    return sorted(runs, key=lambda r: r["stamp"], reverse=True)

def run_steps(studio, name: str) -> int | None:
    """The steps the run `name` has now (Past runs' "Train to" starts there)."""
    try:
        return int(results.run_info(studio.runs_dir / name)["settings"]["run"]["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def view_ids() -> list[str]:
    return ["runs.table", "runs.pick"]


def view(studio, pick: str | None = None) -> Values:
    """The runs table and the Run menu's choices. `pick` is the menu's value when the event began: a listing
    (the timer's, Refresh, the page's load) may land after the person picked another run, so the menu's value is
    set only when `pick` is no run at all (none yet, or deleted); writing back `pick` itself would undo their
    choice, and Open would open the run they had moved away from."""
    rows = list_runs(studio)
    names = [r["name"] for r in rows]
    menu = gr.Dropdown(choices=names) if pick in names else \
        gr.Dropdown(choices=names, value=names[0] if names else None)
    return {"runs.table": pd.DataFrame([[r[k] for k in COLUMNS] for r in rows], columns=COLUMNS), "runs.pick": menu}


def picked(studio, v: Values) -> Values:
    """The picked run's steps in "Train to" (it trains on from there) and its memory."""
    name = v["runs.pick"]
    if not name:
        return {"runs.extend_steps": None, "runs.memory": ""}
    try:
        info = results.run_info(studio.runs_dir / name)
    except (OSError, ValueError):
        return {"runs.extend_steps": None, "runs.memory": ""}
    return {"runs.extend_steps": run_steps(studio, name), "runs.memory": results.memory_table(info)}


def follow(studio, state: PageState, folder: str, uncorrected: bool) -> Values:
    """The wizard on the run `folder`: its task, model, Train view, previews and export (when finished)."""
    from . import data, export, preview, train

    info = results.run_info(folder)
    kind = families.kind_of_run(info)
    state = state.open_run(folder, kind, info["backend"])
    finished = (Path(folder) / "lora" / "corrected").is_dir()
    model = info["settings"]["run"]["model"]
    return {"page.state": state, "page.tabs": gr.Tabs(selected="wizard"), "model.task": kind,
            "model.model": gr.Dropdown(choices=handlers.model_choices(kind, studio.demo_models), value=model),
            **data.task_view(state), "data.msg": "", **train.job_view(studio, folder), "train.msg": "",
            **preview.view(studio, folder, uncorrected), **(export.view(studio, folder) if finished else
                                                           export.cleared()),
            "page.wizard": gr.Walkthrough(selected=STEP["preview"] if finished else STEP["train"])}


def open_run(studio, v: Values) -> Values:
    folder = studio.open_run(v["runs.pick"])
    return {**follow(studio, v["page.state"], folder, v["preview.uncorrected"]), "runs.msg": say(f"Opened {v['runs.pick']}.")}


def queued_words(studio, folder: str, what: str) -> str:
    """What Resume / Train further say when their job waits behind another (as Add to queue says it); "" when it
    started."""
    place = studio.queue.place_of(folder)
    return (f"Added {what} to the queue, {ordinal(place)} in line: it starts when the jobs before it have finished "
            "(the current run first)." if place else "")


def resume(studio, v: Values) -> Values:
    folder = studio.resume_run(v["runs.pick"])
    said = queued_words(studio, folder, f"resuming {v['runs.pick']}") or f"Resuming {v['runs.pick']}."
    return {**follow(studio, v["page.state"], folder, v["preview.uncorrected"]),
            "page.wizard": gr.Walkthrough(selected=STEP["train"]), "runs.msg": say(said),
            "train.msg": say(said) if studio.queue.place_of(folder) else "", **queue_steps.view(studio)}


def extend(studio, v: Values) -> Values:
    folder = studio.extend_run(v["runs.pick"], v["runs.extend_steps"])
    what = f"training {v['runs.pick']} further, to {int(v['runs.extend_steps'])} steps"
    said = queued_words(studio, folder, what) or f"{what[:1].upper()}{what[1:]}."
    return {**follow(studio, v["page.state"], folder, v["preview.uncorrected"]),
            "page.wizard": gr.Walkthrough(selected=STEP["train"]), "runs.msg": say(said),
            "train.msg": say(said) if studio.queue.place_of(folder) else "", **queue_steps.view(studio)}


def build(ctx: Context) -> dict:
    studio, m = ctx.studio, ctx.manager
    gr.Markdown("Every run in the runs folder. Open one to see its results, resume one that was interrupted (it "
                "continues from its last finished stage and checkpoint), or train a finished one further.")
    table = gr.Dataframe(headers=COLUMNS, interactive=False, elem_id="runs-table")
    with gr.Row():
        pick = gr.Dropdown([], label="Run", scale=2, elem_id="run-pick")
        refresh = gr.Button("Refresh", size="sm")
        open_button = gr.Button("Open", variant="primary", size="sm")
        resume_button = gr.Button("Resume", size="sm")
    msg = gr.Markdown(elem_id="msg-runs", elem_classes="emloc-msg")  # under the buttons it answers
    with gr.Row():
        extend_steps = gr.Number(None, label="Train to (steps)", precision=0, scale=1, elem_id="extend-steps",
                                 info="starts at the steps the picked run has; a finished run trains on from its "
                                      "last step, its results so far kept in its folder under earlier/")
        extend_button = gr.Button("Train further", size="sm", scale=1, elem_id="extend")
    memory = gr.Markdown(elem_id="runs-memory")
    elems = {"table": table, "pick": pick, "refresh": refresh, "open": open_button, "resume": resume_button,
             "extend_steps": extend_steps, "extend": extend_button, "memory": memory, "msg": msg}
    m.add("runs", elems)
    m.bind(refresh.click, lambda v: {**view(studio, v["runs.pick"]), "runs.msg": ""}, ["runs.pick"],
           [*view_ids()], message="runs.msg")
    m.bind(pick.change, partial(picked, studio), ["runs.pick"], ["runs.extend_steps", "runs.memory"],
           message="runs.msg")
    return elems


def bind_late(ctx: Context) -> None:
    from . import data, export, preview, train

    m, studio = ctx.manager, ctx.studio
    outputs = ["page.state", "page.tabs", "page.wizard", "model.task", "model.model", *data.TASK_IDS,
               "data.msg", *train.VIEW, "train.msg", *preview.IDS, *export.IDS]
    inputs = ["page.state", "runs.pick", "runs.extend_steps", "preview.uncorrected"]
    m.bind(m["runs.open"].click, partial(open_run, studio), inputs, [*outputs, "runs.msg"], message="runs.msg")
    for button, handler in (("runs.resume", resume), ("runs.extend", extend)):  # they may queue: the queue too
        m.bind(m[button].click, partial(handler, studio), inputs, [*outputs, *queue_steps.IDS, "runs.msg"],
               message="runs.msg")
