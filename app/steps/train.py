"""Step 4, Train: the run's name and settings (built from RunSettings' and the backend's fields), Start, Cancel,
and the run as its own process reports it through the run folder: stage, progress, loss curve, log, samples and
memory (planned against held). The step shows this page's run only: another run's job is mentioned, not shown."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import gradio as gr
import pandas as pd

from .. import families, form, results
from ..jobs import JobStatus, read_losses
from ..manager import Values, say
from ..page import STEP, PageState
from ..plots import progress_bar, read_validation
from ..studio import IDLE, describe_job, ordinal, run_name
from . import Context
from . import queue as queue_steps

# (output ids are listed, not read from a view: a component made while the page is built would join the page)
CLEARED_IDS = ["train.status", "train.progress", "train.loss_plot", "train.log", "train.cancel", "train.memory",
               "train.msg", "train.samples_gallery", "train.samples_answers", "train.samples_shown", "train.seen"]


SETTINGS = form.TRAIN_FIELDS + form.MORE_FIELDS + form.BACKEND_FIELDS + form.TEXT_FIELDS
VIEW = ["train.status", "train.progress", "train.loss_plot", "train.log", "train.cancel", "train.memory"]


def loss_frame(losses: list, validation: list = ()) -> pd.DataFrame:
    """The loss chart's frame (app/plots.py): training and, where data is held out, validation loss."""
    from ..plots import loss_frame as frame

    return frame(losses, validation)


def settings_view(studio, backend: str, params: float, model: str) -> Values:
    """Every setting's starting value for `model` and which backend settings it has (the others are hidden)."""
    values = form.defaults(backend, params, model)
    shown = set(form.backend_fields(backend))
    view = {f"train.{n}": values[n] for n in form.TRAIN_FIELDS + form.MORE_FIELDS}
    for n in form.BACKEND_FIELDS:
        view[f"train.{n}"] = gr.Number(value=values.get(n), visible=n in shown)
    return {**view, "train.name": run_name(backend, studio.runs_dir), "budget.rank": values["rank"],
            "budget.batch_size": values["batch_size"]}


def cleared() -> Values:
    """The step with no run: nothing of another run's status, log, curve, samples or memory."""
    return {"train.status": IDLE, "train.progress": handlers_progress(), "train.loss_plot": loss_frame([]),
            "train.log": "", "train.cancel": gr.Button(interactive=False), "train.memory": "", "train.msg": "",
            "train.samples_gallery": gr.Gallery(value=None, visible=False), "train.samples_answers": "",
            "train.samples_shown": None, "train.seen": {"version": -1, "state": ""}}


def handlers_progress() -> str:
    return progress_bar(0.0, "not started")


def train_view(studio, run_dir: str) -> dict:
    """What step 4 shows for this page's run `run_dir` ("" = none yet): {"text", "progress", "losses", "log",
    "running" (this run's job runs: Cancel is live), "state", "kind", "version", "started", "preview_progress",
    "memory"}. Another run's job is only mentioned; the loss curve and summary come from the run's files, so
    they stay while a preview job of the run renders."""
    status = studio.jobs.status()
    ours = bool(run_dir) and bool(status.run_dir) and Path(status.run_dir) == Path(run_dir)
    view = describe_job(status) if ours else describe_job(JobStatus(version=status.version))
    if not run_dir:
        if status.running:
            view["text"] += (f"  \n(Another job is running: {Path(status.run_dir).name}. Only one runs at a "
                             "time; Past runs shows it.)")
        return {**view, "memory": "", "losses": []}
    if not ours or status.kind != "run":
        place = studio.queue.place_of(run_dir)
        view["text"] = (f"**Run {Path(run_dir).name} is waiting in the queue** ({ordinal(place)} in line): it starts "
                        "when the jobs before it have finished." if place else run_state_words(run_dir))
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


def run_state_words(run_dir: str | Path) -> str:
    """The Train step's first line for a run no job of this page is running."""
    name = Path(run_dir).name
    try:
        state = results.run_state(results.run_info(run_dir))
    except (OSError, ValueError) as err:
        return f"**Run {name}** cannot be read ({err})."
    if state == "finished":
        return f"**Run {name} finished.** See the previews in step 5 and the files in step 6."
    return f"**Run {name}: {state}.** Resume it under Past runs."


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


def job_view(studio, run_dir: str) -> Values:
    """The Train step for the run `run_dir` as its files and its job (if any) say."""
    view = train_view(studio, run_dir)
    return {"train.status": view["text"], "train.progress": view["progress"],
            "train.loss_plot": loss_frame(view["losses"], read_validation(run_dir)), "train.log": view["log"],
            "train.cancel": gr.Button(interactive=view["running"]), "train.memory": view["memory"]}


def start(studio, v: Values, queue: bool = False) -> Values:
    """Check everything, create the run (data copied in) and start its process; with `queue` (Add to queue) it
    waits in the queue when another job runs."""
    state: PageState = v["page.state"]
    values = {"kind": state.kind, "model": v["model.model"], "name": v["train.name"], "images": state.images,
              "prompt": v["data.prompt"], "trigger": v["data.trigger"], "captions": v["data.captions"],
              "qa_table": v["data.qa_table"], "ratio": v["budget.ratio"], "rank": v["budget.rank"],
              "batch_size": v["budget.batch_size"], "ram_gb": v["budget.ram"],
              "emulator_kind": v.get("budget.kind"),
              **{n: v[f"train.{n}"] for n in SETTINGS}, **{n: v.get(f"data.{n}") for n in form.DATA_FIELDS}}
    folder = studio.start_run(values, queue=queue)
    backend = results.run_info(folder)["backend"]
    state = state.open_run(folder, state.kind, backend)
    place = studio.queue.place_of(folder)
    said = (f"Added {v['train.name']} to the queue, {ordinal(place)} in line: it starts when the jobs before it have "
            f"finished; your data was checked and copied into {folder}." if place else
            f"Started {v['train.name']}: your data was checked and copied into {folder}.")
    return {"page.state": state, "train.name": run_name(backend, studio.runs_dir), **job_view(studio, folder),
            **queue_steps.view(studio), "train.msg": say(said)}


def samples(studio, v: Values) -> Values:
    view = results.samples_view(v["page.state"].run_dir)
    key = (v["page.state"].run_dir, len(view["images"]), len(view["answers"]))
    if key == v["train.samples_shown"]:  # nothing new: leave the gallery as it is (a picked image stays picked)
        return {}
    return {"train.samples_gallery": gr.Gallery(value=view["images"] or None, visible=bool(view["images"])),
            "train.samples_answers": view["answers"], "train.samples_shown": key}


def go_preview(studio, v: Values) -> Values:
    from . import preview

    return {"page.wizard": gr.Walkthrough(selected=STEP["preview"]), "train.msg": "",
            **preview.view(studio, v["page.state"].run_dir, v["preview.uncorrected"])}


def build(ctx: Context) -> dict:
    studio, m = ctx.studio, ctx.manager
    elems: dict = {}
    with gr.Step("4. Train", id=STEP["train"]):
        first = next(iter(families.demo_models(studio.demo_models)), "")
        elems["name"] = gr.Textbox(run_name(first, studio.runs_dir), elem_id="run-name",
                                   label=f"Run name (its folder under {studio.runs_dir})")
        with gr.Row():
            for n in form.TRAIN_FIELDS:
                f = form.run_field(n)
                elems[n] = gr.Number(f.default, label=f.label, info=f.help, precision=0 if f.whole else None,
                                     elem_id=n.replace("_", "-"))
        with gr.Accordion("More settings", open=False):
            with gr.Row():
                for n in form.MORE_FIELDS:
                    f = form.run_field(n)
                    elems[n] = gr.Number(f.default, label=f.label, info=f.help, precision=0 if f.whole else None)
                for n in form.BACKEND_FIELDS:
                    f = form.any_backend_field(n)
                    elems[n] = gr.Number(f.default, label=f.label, info=f.help, precision=0 if f.whole else None,
                                         elem_id=n.replace("_", "-"))
            for n in form.TEXT_FIELDS:  # one item per line
                f = form.run_field(n)
                elems[n] = gr.Textbox("", label=f"{f.label} (one per line)", info=f.help, lines=2,
                                      elem_id=n.replace("_", "-"))
        with gr.Row():
            elems["start"] = gr.Button("Start training", variant="primary", elem_id="start")
            elems["queue_add"] = gr.Button("Add to queue", elem_id="queue-add")
            elems["cancel"] = gr.Button("Cancel", variant="stop", interactive=False, elem_id="cancel")
        elems["msg"] = gr.Markdown(elem_id="msg-train", elem_classes="emloc-msg")  # under Start / Cancel
        queue_steps.build(ctx)
        elems["status"] = gr.Markdown(IDLE, elem_id="job-status")
        elems["progress"] = gr.HTML(handlers_progress(), elem_id="job-progress")
        elems["loss_plot"] = gr.LinePlot(loss_frame([]), x="step", y="loss", color="series", height=260,
                                         title="Training loss (and validation loss on held-out data)",
                                         elem_id="loss-plot")
        elems["memory"] = gr.Markdown(elem_id="run-memory")
        elems["log"] = gr.Textbox(label="Log (newest first)", lines=8, max_lines=8, autoscroll=False,
                                  interactive=False, elem_id="job-log")
        with gr.Row():
            gr.Markdown("**Samples during training**: what the emulator with its LoRA makes at step 0 and every few "
                        "steps, newest round first.")
            elems["sample_now"] = gr.Button("Sample now", size="sm", elem_id="sample-now")
        elems["samples_gallery"] = gr.Gallery(label="Samples (labelled by step)", columns=4, height=300,
                                              object_fit="contain", elem_id="samples", visible=False)
        elems["samples_answers"] = gr.Markdown(elem_id="samples-answers")
        elems["samples_timer"] = gr.Timer(2.0)
        elems["samples_shown"] = gr.State(None)  # (run, images, answer characters) on the page now
        elems["seen"] = gr.State({"version": -1, "state": ""})  # the job as last drawn
        elems["next"] = gr.Button("Next: previews", variant="primary")
    m.add("train", elems)
    m.bind(elems["cancel"].click, lambda v: {"train.msg": say(studio.cancel())}, [], ["train.msg"], message="train.msg")
    m.bind(elems["sample_now"].click, lambda v: {"train.msg": say(studio.sample_now(v["page.state"].run_dir))},
           ["page.state"], ["train.msg"], message="train.msg")
    m.bind(elems["samples_timer"].tick, partial(samples, studio), ["page.state", "train.samples_shown"],
           ["train.samples_gallery", "train.samples_answers", "train.samples_shown"], concurrency_id="samples")
    return elems


def bind_late(ctx: Context) -> None:
    """Events whose outputs are in later steps (Preview, Export, Past runs): bound once they are built."""
    from . import preview

    m, studio = ctx.manager, ctx.studio
    inputs = ["page.state", "model.model", "train.name", "data.prompt", "data.trigger", "data.captions",
              "data.qa_table", "budget.ratio", "budget.rank", "budget.batch_size", "budget.ram", "budget.kind",
              *[f"train.{n}" for n in SETTINGS], *[f"data.{n}" for n in form.DATA_FIELDS]]
    for button, queue in (("train.start", False), ("train.queue_add", True)):
        m.bind(m[button].click, partial(start, studio, queue=queue), inputs,
               ["page.state", "train.name", *VIEW, *queue_steps.IDS], message="train.msg")
    m.bind(m["train.next"].click, partial(go_preview, studio), ["page.state", "preview.uncorrected"],
           ["page.wizard", *preview.IDS], message="train.msg")
