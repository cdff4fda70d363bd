"""Step 5, Preview: base | emulator + LoRA | full model + corrected LoRA side by side, shown as the run's backend
shows its previews (`preview_kind`: a gallery of images, or a table of answers), and new previews on request."""

from __future__ import annotations

from functools import partial

import gradio as gr
import pandas as pd

from .. import families, grid, results
from ..manager import Values, say
from ..page import STEP
from . import Context


# (output ids are listed, not read from a view: a component made while the page is built would join the page)
IDS = ["preview.text", "preview.gallery", "preview.answers", "preview.scores", "preview.ask", "preview.seeds",
       "preview.ask_image", "preview.ask_upload", "preview.progress"]  # what view() and cleared() set


def cleared() -> Values:
    """No run: nothing of another run's previews, questions or answers."""
    return {"preview.text": "", "preview.gallery": gr.Gallery(value=None, visible=False),
            "preview.answers": gr.Dataframe(value=None, visible=False), "preview.scores": "",
            "preview.ask": gr.Textbox(value="", label="New prompt or question"),
            "preview.seeds": gr.Textbox(visible=False),
            "preview.ask_image": gr.Dropdown(choices=[], value=None, visible=False),
            "preview.ask_upload": gr.Image(value=None, visible=False), "preview.progress": ""}


def view(studio, run_dir: str, uncorrected: bool) -> Values:
    """The newest previews of `run_dir` and the controls its preview kind asks for (prompt + seeds, or a question
    about an image)."""
    shown = studio.previews(run_dir, uncorrected)
    images_kind = shown["kind"] == families.IMAGE_PREVIEW
    answers_kind = shown["kind"] == families.ANSWER_PREVIEW
    table = pd.DataFrame(shown["rows"], columns=shown["headers"]) if shown["rows"] else None
    images = studio.question_images(run_dir) if answers_kind else []
    columns = 4 if uncorrected else 3
    rows = max(1, -(-len(shown["images"]) // columns))
    label = "New prompt" if images_kind else "New question" if answers_kind else "New prompt or question"
    folders = results.preview_folders(run_dir) if run_dir else []
    spec = grid.grid_spec(folders[-1]) if folders else None
    caption = "base | emulator + LoRA | full model + corrected LoRA" + (" | full + uncorrected LoRA" if uncorrected else "")
    if spec is not None:  # the newest previews are a strength grid: one column per strength
        columns = len(spec["labels"])
        if images_kind:
            shown["images"], _ = grid.image_grid(run_dir, folders[-1], spec["labels"])
            rows = max(1, -(-len(shown["images"]) // columns))
        else:
            shown["headers"], shown["rows"], shown["scores"] = grid.answer_grid(folders[-1], spec["labels"])
            table = pd.DataFrame(shown["rows"], columns=shown["headers"]) if shown["rows"] else None
        shown["text"] = grid.describe(run_dir, folders[-1], spec)
        caption = " | ".join(spec["labels"])
    return {"preview.text": shown["text"],
            "preview.gallery": gr.Gallery(value=shown["images"] or None, visible=images_kind, columns=columns, label=caption,
                                          height=rows * (430 if columns <= 4 else 300) + 40),
            "preview.answers": gr.Dataframe(value=table, visible=table is not None), "preview.scores": shown["scores"],
            "preview.ask": gr.Textbox(label=label),
            "preview.seeds": gr.Textbox(visible=images_kind),
            "preview.ask_image": gr.Dropdown(choices=[(results.shown_name(i), i) for i in images],
                                             value=images[0] if images else None, visible=bool(images)),
            "preview.ask_upload": gr.Image(visible=answers_kind), "preview.progress": ""}


def render(studio, v: Values) -> Values:
    message = studio.render_preview(v["page.state"].run_dir, v["preview.ask"], v["preview.seeds"],
                                    v["preview.ask_image"], v["preview.ask_upload"])
    return {"preview.msg": say(message)}


def render_grid(studio, v: Values) -> Values:
    """A strength grid in one preview job: the corrected LoRA at each of the typed strengths, for each prompt (one per
    line; none: the run's own) and seed, or each question."""
    message = studio.render_preview(v["page.state"].run_dir, v["preview.ask"], v["preview.seeds"],
                                    v["preview.ask_image"], v["preview.ask_upload"], scales=v["preview.scales"])
    return {"preview.msg": say(message.replace("Rendering previews", "Rendering a strength grid"))}


def build(ctx: Context) -> dict:
    studio, m = ctx.studio, ctx.manager
    with gr.Step("5. Preview", id=STEP["preview"]):
        text = gr.Markdown(elem_id="preview-text")
        gallery = gr.Gallery(label="base | emulator + LoRA | full model + corrected LoRA", columns=3, height=360,
                             object_fit="contain", elem_id="preview-gallery", visible=False)
        answers = gr.Dataframe(label="Answers", interactive=False, visible=False, wrap=True, elem_id="answers")
        scores = gr.Markdown(elem_id="scores")
        uncorrected = gr.Checkbox(False, label="Also show the full model with the uncorrected LoRA (what correction "
                                               "fixes)")
        with gr.Row():
            ask = gr.Textbox(label="New prompt or question", scale=3, elem_id="ask", lines=1, max_lines=6,
                             info="several: one per line")
            seeds = gr.Textbox("0", label="Seeds", info="numbers or ranges, e.g. 0, 1, 1000-1015 (at most 16)",
                               scale=1, elem_id="seeds", visible=False)
            ask_image = gr.Dropdown([], label="Image for the question", scale=1, allow_custom_value=False,
                                    visible=False)
            ask_upload = gr.Image(type="filepath", label="Or a new image: it is used instead of the one chosen",
                                  scale=1, height=140, visible=False, sources=["upload"], elem_id="ask-upload")
        render_button = gr.Button("Render new previews", elem_id="render")
        with gr.Row():
            scales = gr.Textbox("0, 0.5, 1, 1.25", label="LoRA strengths", scale=3, elem_id="scales",
                                info="the corrected LoRA at each strength (0 is the base model, 1 as trained), for "
                                     "each prompt and seed above (or question)")
            grid_button = gr.Button("Render a strength grid", elem_id="render-grid", scale=1)
        msg = gr.Markdown(elem_id="msg-preview", elem_classes="emloc-msg")  # under the button it answers
        progress = gr.HTML(elem_id="preview-progress")
        next_button = gr.Button("Next: export", variant="primary")
    elems = {"text": text, "gallery": gallery, "answers": answers, "scores": scores, "uncorrected": uncorrected,
             "ask": ask, "seeds": seeds, "ask_image": ask_image, "ask_upload": ask_upload, "render": render_button,
             "scales": scales, "render_grid": grid_button, "msg": msg, "progress": progress, "next": next_button}
    m.add("preview", elems)
    m.bind(uncorrected.change, lambda v: {**view(studio, v["page.state"].run_dir, v["preview.uncorrected"]),
                                          "preview.msg": ""},
           ["page.state", "preview.uncorrected"], IDS, message="preview.msg")
    m.bind(render_button.click, partial(render, studio),
           ["page.state", "preview.ask", "preview.seeds", "preview.ask_image", "preview.ask_upload"],
           ["preview.msg"], message="preview.msg")
    m.bind(grid_button.click, partial(render_grid, studio),
           ["page.state", "preview.ask", "preview.seeds", "preview.ask_image", "preview.ask_upload", "preview.scales"],
           ["preview.msg"], message="preview.msg")
    return elems
