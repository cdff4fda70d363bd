"""Step 4, Train: the run's name and settings (built from RunSettings' and the backend's fields), Start, Cancel,
and the run as its own process reports it through the run folder: stage, progress, loss curve, log, samples and
memory (planned against held). The step shows this page's run only: another run's job is mentioned, not shown."""

from __future__ import annotations

from functools import partial

import gradio as gr
import pandas as pd

from .. import families, form, results
from ..manager import Values, say
from ..page import STEP, PageState
from ..studio import IDLE, run_name
from . import Context

# (output ids are listed, not read from a view: a component made while the page is built would join the page)
CLEARED_IDS = ["train.status", "train.progress", "train.loss_plot", "train.log", "train.cancel", "train.memory",
               "train.msg", "train.samples_gallery", "train.samples_answers", "train.samples_shown", "train.seen"]


SETTINGS = form.TRAIN_FIELDS + form.MORE_FIELDS + form.BACKEND_FIELDS
VIEW = ["train.status", "train.progress", "train.loss_plot", "train.log", "train.cancel", "train.memory"]


def loss_frame(losses: list) -> pd.DataFrame:
    """(step, loss) pairs as a typed frame: numbers, so the plot draws numeric axes even before the first step."""
    return pd.DataFrame({"step": pd.Series([s for s, _ in losses or []], dtype="int64"),
                         "loss": pd.Series([v for _, v in losses or []], dtype="float64")})


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
    from ..plots import progress_bar

    return progress_bar(0.0, "not started")


def job_view(studio, run_dir: str) -> Values:
    """The Train step for the run `run_dir` as its files and its job (if any) say."""
    view = studio.train_view(run_dir)
    return {"train.status": view["text"], "train.progress": view["progress"],
            "train.loss_plot": loss_frame(view["losses"]), "train.log": view["log"],
            "train.cancel": gr.Button(interactive=view["running"]), "train.memory": view["memory"]}


def start(studio, v: Values) -> Values:
    """Check everything, create the run (data copied in) and start its process."""
    state: PageState = v["page.state"]
    values = {"kind": state.kind, "model": v["model.model"], "name": v["train.name"], "images": state.images,
              "prompt": v["data.prompt"], "trigger": v["data.trigger"], "captions": v["data.captions"],
              "qa_table": v["data.qa_table"], "ratio": v["budget.ratio"], "rank": v["budget.rank"],
              "batch_size": v["budget.batch_size"], "ram_gb": v["budget.ram"], "emulator_kind": v.get("budget.kind"),
              **{n: v[f"train.{n}"] for n in SETTINGS}}
    folder = studio.start_run(values)
    backend = results.run_info(folder)["backend"]
    state = state.open_run(folder, state.kind, backend)
    return {"page.state": state, "train.name": run_name(backend, studio.runs_dir), **job_view(studio, folder),
            "train.msg": say(f"Started {v['train.name']}: your data was checked and copied into {folder}.")}


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
        with gr.Row():
            elems["start"] = gr.Button("Start training", variant="primary", elem_id="start")
            elems["cancel"] = gr.Button("Cancel", variant="stop", interactive=False, elem_id="cancel")
        elems["msg"] = gr.Markdown(elem_id="msg-train", elem_classes="emloc-msg")  # under Start / Cancel
        elems["status"] = gr.Markdown(IDLE, elem_id="job-status")
        elems["progress"] = gr.HTML(handlers_progress(), elem_id="job-progress")
        elems["loss_plot"] = gr.LinePlot(loss_frame([]), x="step", y="loss", title="Training loss", height=260,
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
              *[f"train.{n}" for n in SETTINGS]]
    m.bind(m["train.start"].click, partial(start, studio), inputs, ["page.state", "train.name", *VIEW],
           message="train.msg")
    m.bind(m["train.next"].click, partial(go_preview, studio), ["page.state", "preview.uncorrected"],
           ["page.wizard", *preview.IDS], message="train.msg")
