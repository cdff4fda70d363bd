"""Step 6, Export: where the corrected adapter is, in which formats, a zip of them, and Python that loads it and
makes the run's first preview again; "Start another run" goes back to step 1 keeping model, data and settings."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import gradio as gr

from .. import results
from ..manager import Values, say
from ..page import STEP, PageState
from ..studio import run_name
from . import Context


# (output ids are listed, not read from a view: a component made while the page is built would join the page)
IDS = ["export.text", "export.download", "export.snippet", "export.msg"]  # what cleared() sets


def cleared() -> Values:
    return {"export.text": "", "export.download": None, "export.snippet": "", "export.msg": ""}


def view(studio, run_dir: str) -> Values:
    if not run_dir:
        return {**cleared(), "export.text": "No run yet: train one in step 4, or open one under Past runs."}
    info = studio.export(run_dir)
    return {"export.text": info["text"], "export.download": info["zip"], "export.snippet": info["snippet"]}


def go_export(studio, v: Values) -> Values:
    return {"page.wizard": gr.Walkthrough(selected=STEP["export"]), "preview.msg": "",
            **view(studio, v["page.state"].run_dir)}


def new_run(studio, v: Values) -> Values:
    """Back to step 1 with a clean page: nothing of the last run's results, questions or log is shown; the model,
    data and settings the person chose stay (they are theirs, not the run's)."""
    from . import preview, train

    if studio.jobs.status().running:
        raise ValueError("a job is still running; wait for it to finish or press Cancel in step 4 first")
    state: PageState = v["page.state"]
    last = Path(state.run_dir).name if state.run_dir else "the last run"
    try:
        backend = results.run_info(state.run_dir)["backend"] if state.run_dir else ""
    except (OSError, ValueError):
        backend = ""
    return {"page.state": state.new_run(), "page.wizard": gr.Walkthrough(selected=STEP["model"]),
            "train.name": run_name(backend, studio.runs_dir), **train.cleared(), **preview.cleared(), **cleared(),
            "model.msg": say(f"A new run: your model, data and settings are kept; the results of {last} are under "
                             "Past runs.")}


def build(ctx: Context) -> dict:
    from . import preview, train

    studio, m = ctx.studio, ctx.manager
    with gr.Step("6. Export", id=STEP["export"]):
        text = gr.Markdown(elem_id="export-text")
        download = gr.File(label="Download the adapters (zip)", interactive=False, elem_id="download")
        snippet = gr.Code(language="python", label="Python that loads the corrected LoRA and makes its first preview "
                          "again", interactive=False, elem_id="snippet")
        msg = gr.Markdown(elem_id="msg-export", elem_classes="emloc-msg")
        another = gr.Button("Start another run")
    elems = {"text": text, "download": download, "snippet": snippet, "msg": msg, "new_run": another}
    m.add("export", elems)
    m.bind(m["preview.next"].click, partial(go_export, studio), ["page.state"],
           ["page.wizard", "preview.msg", *IDS], message="preview.msg")
    m.bind(another.click, partial(new_run, studio), ["page.state"],
           ["page.state", "page.wizard", "train.name", *train.CLEARED_IDS, *preview.IDS, *IDS, "model.msg"],
           message="export.msg")
    return elems
