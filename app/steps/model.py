"""Step 1, Model: the task, the model, what it is and the device; Next checks that it can be trained here."""

from __future__ import annotations

from functools import partial

import gradio as gr

from .. import families, handlers
from ..manager import Values, say
from ..page import STEP, PageState
from . import Context


def choices_view(studio, kind: str, model: str | None = None) -> Values:
    """The model menu for the task `kind`, on `model` or the first offered."""
    choices = handlers.model_choices(kind, studio.demo_models)
    value = model if model else (choices[0][1] if choices else "")
    return {"model.model": gr.Dropdown(choices=choices, value=value)}


def switch_task(studio, v: Values) -> Values:
    """A new task: its models; this page's run is forgotten, and every later step says so (nothing of the old
    task's run, data check or samples stays); the uploads of each task are kept for switching back."""
    from . import data, export, preview, train

    state: PageState = v["page.state"].switch_task(v["model.task"])
    return {"page.state": state, **choices_view(studio, state.kind), **data.task_view(state), **train.cleared(),
            **preview.cleared(), **export.cleared(), "model.msg": ""}


def go_data(studio, v: Values) -> Values:
    """Next: the model suits the task and can be trained here (not downloaded, gated or pickle-only: said here,
    with a way to see its plan anyway)."""
    handlers.describe_model(v["page.state"].kind, v["model.model"])
    try:
        handlers.check_model_ready(v["page.state"].kind, v["model.model"])
    except ValueError as err:
        from ..words import in_app_words

        return {"model.msg": say(in_app_words(err), good=False), "model.plan_only": gr.Button(visible=True)}
    return {"page.wizard": gr.Walkthrough(selected=STEP["data"]), "model.msg": "",
            "model.plan_only": gr.Button(visible=False)}


def plan_only(studio, v: Values) -> Values:
    return {"page.wizard": gr.Walkthrough(selected=STEP["data"]), "data.msg": say(
        "This model cannot be trained here yet: steps 2 and 3 show your data check and its memory plan; "
        "Start training is refused until its files are on this machine.", good=False)}


def build(ctx: Context) -> dict:
    studio, m = ctx.studio, ctx.manager
    tasks = families.tasks()
    kind = next(iter(tasks))
    first = handlers.model_choices(kind, studio.demo_models)
    with gr.Step("1. Model", id=STEP["model"]):
        task = gr.Radio([(label, k) for k, label in tasks.items()], value=kind, label="What do you want to do?")
        model = gr.Dropdown(first, value=first[0][1] if first else "", allow_custom_value=True, label="Model",
                            info="the demo model, one from the list, a hub id (owner/name) or a local folder")
        msg = gr.Markdown(elem_id="msg-model", elem_classes="emloc-msg")  # right under the model it is about
        about = gr.Markdown(elem_id="model-info")
        device = gr.Markdown(elem_id="device")
        show_last = gr.Button("Show the last run", visible=False, elem_id="show-last")
        next_button = gr.Button("Next: your data", variant="primary")
        plan_button = gr.Button("Only see its memory plan (no training until it is downloaded)", visible=False,
                                size="sm", elem_id="plan-only")
    elems = {"task": task, "model": model, "msg": msg, "about": about, "device": device, "show_last": show_last,
             "next": next_button, "plan_only": plan_button}
    m.add("model", elems)
    m.bind(next_button.click, partial(go_data, studio), ["page.state", "model.model"],
           ["page.wizard", "model.msg", "model.plan_only"], message="model.msg")
    model.change(lambda: gr.Button(visible=False), [], [plan_button], concurrency_id="wizard")
    return elems


def bind_task(ctx: Context) -> None:
    """The task switch touches every step: bound once all of them are built."""
    from . import data, export, preview, train

    outputs = ["page.state", "model.model", "model.msg", *data.TASK_IDS, *train.CLEARED_IDS,
               *preview.IDS, *export.IDS]
    ctx.manager.bind(ctx.manager["model.task"].input, partial(switch_task, ctx.studio), ["page.state", "model.task"],
                     outputs, message="model.msg")
    ctx.manager.bind(ctx.manager["model.plan_only"].click, partial(plan_only, ctx.studio), [],
                     ["page.wizard", "data.msg"])
