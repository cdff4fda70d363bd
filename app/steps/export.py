"""Step 6, Export: where the corrected adapter is, in which formats, a zip of them (with a README.md), and Python that
loads it and makes the run's first preview again; a menu of the run's kept checkpoints, each corrected for the full
model on request (`launch.py export --step N`, a job); "Start another run" goes back to step 1 keeping model, data
and settings."""

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
IDS = ["export.text", "export.download", "export.snippet", "export.msg", "export.which",
       "export.correct"]  # what cleared() sets
FINAL = "final"


def cleared() -> Values:
    return {"export.text": "", "export.download": None, "export.snippet": "", "export.msg": "",
            "export.which": gr.Dropdown(choices=[], value=None), "export.correct": gr.Button(visible=False)}


def checkpoint_menu(run_dir: str) -> list[tuple[str, str]]:
    """(label, value) of the adapters this run can export: the final one, then each kept checkpoint, newest first,
    saying whether it is corrected for the full model yet."""
    from pipelines.runner.exports import EXPORTS

    steps = int(results.run_info(run_dir)["settings"]["run"]["steps"])
    folder = Path(run_dir) / "checkpoints"
    kept = sorted((int(p.name.split("-")[1]) for p in folder.glob("step-*") if p.name.split("-")[1].isdigit()
                   and (p / "adapter.safetensors").is_file()), reverse=True) if folder.is_dir() else []
    menu = [(f"final (step {steps})", FINAL)]
    for step in kept:
        if step == steps:
            continue
        done = (Path(run_dir) / EXPORTS / f"step-{step:06d}" / "corrected").is_dir()
        menu.append((f"step {step}" + ("" if done else " (not corrected yet)"), str(step)))
    return menu


def view(studio, run_dir: str, which: str | None = None) -> Values:
    """The export of `which` (FINAL or a kept checkpoint's step) of `run_dir`: where its files are, the zip, the
    snippet; a checkpoint not corrected yet says so and offers the correction."""
    if not run_dir:
        return {**cleared(), "export.text": "No run yet: train one in step 4, or open one under Past runs."}
    menu = checkpoint_menu(run_dir)
    which = which if which in {value for _, value in menu} else FINAL
    chooser = gr.Dropdown(choices=menu, value=which)
    if which == FINAL:
        info = studio.export(run_dir)
        return {"export.text": trigger_words(run_dir) + info["text"], "export.download": info["zip"],
                "export.snippet": info["snippet"], "export.which": chooser, "export.correct": gr.Button(visible=False)}
    return {**checkpoint_view(run_dir, int(which)), "export.which": chooser}


def trigger_words(run_dir: str) -> str:
    """The line that says what the files carry: the trigger word and prompt, in every file and the zip's README."""
    backend = results.run_info(run_dir)["settings"]["backend"]
    said = [f"trigger word **{backend['trigger']}**"] if backend.get("trigger") else []
    said += [f"prompt “{backend['prompt']}”"] if backend.get("prompt") else []
    return (("Every file carries the " + ", ".join(said) + ", the base model and the run's settings in its metadata; "
             "the zip has a README.md saying what each file is and how to load it.\n\n") if said else
            "Every file carries the base model and the run's settings in its metadata; the zip has a README.md saying "
            "what each file is and how to load it.\n\n")


def checkpoint_view(run_dir: str, step: int) -> Values:
    """A kept checkpoint's export: its corrected adapters and zip once corrected, else what is there and the offer."""
    from pipelines.runner import Run
    from pipelines.runner.cards import FOLDERS
    from pipelines.runner.exports import adapter_folder, export_zip

    run = Run.open(run_dir)
    folder = adapter_folder(run, step)
    if not (folder / "corrected").is_dir():
        source = Path(run_dir) / "checkpoints" / f"step-{step:06d}" / "adapter.safetensors"
        return {"export.text": (f"**Step {step}** is kept as trained on the emulator (`{source}`): not corrected for "
                                "the full model yet. Press **Correct this checkpoint** to correct it as the final "
                                "LoRA was (the full model is read layer by layer, as in training's correct stage); "
                                "its files and zip appear here."),
                "export.download": None, "export.snippet": "", "export.correct": gr.Button(visible=True)}
    lines = [f"**Step {step}**, corrected for the full model: `{folder}`"]
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = ", ".join(f"`{f.name}`" for f in sorted(sub.glob("*.safetensors")))
        lines.append(f"- **{sub.name}/**: {FOLDERS.get(sub.name, (sub.name, ''))[0]} ({files})")
    snippet = (f"# Step {step}'s LoRA: the same settings as the run's preview, which the final LoRA made, so the "
               "image differs from it\n" + run.backend.export_snippet(folder, run.info.get("plan")))
    return {"export.text": trigger_words(run_dir) + "\n".join(lines), "export.snippet": snippet,
            "export.download": str(export_zip(run, step, snippet)), "export.correct": gr.Button(visible=False)}


def correct_checkpoint(studio, v: Values) -> Values:
    """Start `launch.py export --step N` (a job): the chosen checkpoint corrected for the full model."""
    run_dir, which = v["page.state"].run_dir, v["export.which"]
    if not run_dir or which in (None, "", FINAL):
        raise ValueError("choose a checkpoint in the menu first: the final LoRA is corrected already")
    busy = studio.jobs.busy_message()
    if busy:
        raise ValueError(busy)
    studio.jobs.start("export", run_dir, ["export", "--run", str(run_dir), "--step", str(int(which))])
    return {"export.msg": say(f"Correcting step {which} of {Path(run_dir).name} for the full model; its files appear "
                              "here when done."), "export.timer": gr.Timer(active=True)}


def follow(studio, v: Values) -> Values:
    """While a checkpoint is corrected: wait; when the job ends, show it (or why it failed) and stop polling."""
    job = studio.jobs.status()
    if job.running:
        return {}
    done = {"export.timer": gr.Timer(active=False)}
    if job.kind != "export" or job.run_dir != v["page.state"].run_dir:
        return done
    if job.state != "done":
        return {**done, "export.msg": say(f"The checkpoint was not corrected: {job.error}", good=False)}
    return {**done, **view(studio, v["page.state"].run_dir, v["export.which"]),
            "export.msg": say(f"Step {v['export.which']} is corrected for the full model.")}


def go_export(studio, v: Values) -> Values:
    return {"page.wizard": gr.Walkthrough(selected=STEP["export"]), "preview.msg": "",
            **view(studio, v["page.state"].run_dir)}


def new_run(studio, v: Values) -> Values:
    """Back to step 1 with a clean page: nothing of the last run's results, questions or log is shown; the model,
    data and settings the person chose stay (they are theirs, not the run's)."""
    from . import preview, train

    status = studio.jobs.status()
    state: PageState = v["page.state"]
    last = Path(state.run_dir).name if state.run_dir else "the last run"
    try:
        backend = results.run_info(state.run_dir)["backend"] if state.run_dir else ""
    except (OSError, ValueError):
        backend = ""
    return {"page.state": state.new_run(), "page.wizard": gr.Walkthrough(selected=STEP["model"]),
            "train.name": run_name(backend, studio.runs_dir), **train.cleared(), **preview.cleared(), **cleared(),
            "model.msg": say(f"A new run: your model, data and settings are kept; the results of {last} are under "
                             "Past runs." + (f" {Path(status.run_dir).name} is running now: press Add to queue in "
                                             "step 4 and your new run is queued: it starts when the current run ends."
                                             if status.running else ""))}


def build(ctx: Context) -> dict:
    from . import preview, train

    studio, m = ctx.studio, ctx.manager
    with gr.Step("6. Export", id=STEP["export"]):
        which = gr.Dropdown([], label="Which adapter", elem_id="export-which",
                            info="the final LoRA, or one of the checkpoints training kept")
        text = gr.Markdown(elem_id="export-text")
        correct = gr.Button("Correct this checkpoint for the full model", visible=False, elem_id="export-correct")
        download = gr.File(label="Download the adapters (zip)", interactive=False, elem_id="download")
        snippet = gr.Code(language="python", label="Python that loads the corrected LoRA and makes its first preview "
                          "again", interactive=False, elem_id="snippet")
        msg = gr.Markdown(elem_id="msg-export", elem_classes="emloc-msg")
        another = gr.Button("Start another run")
    elems = {"text": text, "download": download, "snippet": snippet, "msg": msg, "new_run": another, "which": which,
             "correct": correct, "timer": gr.Timer(2.0, active=False)}
    m.add("export", elems)
    m.bind(m["preview.next"].click, partial(go_export, studio), ["page.state"],
           ["page.wizard", "preview.msg", *IDS], message="preview.msg")
    m.bind(which.input, lambda v: {**view(studio, v["page.state"].run_dir, v["export.which"]), "export.msg": ""},
           ["page.state", "export.which"], IDS, message="export.msg")
    m.bind(correct.click, partial(correct_checkpoint, studio), ["page.state", "export.which"],
           ["export.msg", "export.timer"], message="export.msg")
    m.bind(m["export.timer"].tick, partial(follow, studio), ["page.state", "export.which"], [*IDS, "export.timer"],
           message="export.msg", concurrency_id="export-timer")
    m.bind(another.click, partial(new_run, studio), ["page.state"],
           ["page.state", "page.wizard", "train.name", *train.CLEARED_IDS, *preview.IDS, *IDS, "model.msg"],
           message="export.msg")
    return elems
