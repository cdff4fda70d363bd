"""Step 2, Data: the uploads of the task's data kind ("images": photos, a trigger word, a prompt and optional
captions; "qa": images and a question/answer table), checked as the run will check them."""

from __future__ import annotations

import shutil
import tempfile
from functools import partial
from pathlib import Path

import gradio as gr

from .. import form, handlers, validation
from ..manager import Values, say
from ..page import STEP, PageState
from . import Context

# (output ids are listed, not read from a view: a component made while the page is built would join the page)
TASK_IDS = ["data.photo_box", "data.qa_box", "data.photo_gallery", "data.qa_gallery", "data.msg",
            "data.holdout"]  # task_view's
HOLDOUT_LABEL = {"images": "Held-out photos", "qa": "Held-out questions"}  # the backends' own labels


GALLERY = {"images": "data.photo_gallery", "qa": "data.qa_gallery"}


def task_view(state: PageState) -> Values:
    """The data panel of the state's task, with that task's uploads; the last data check is forgotten."""
    return {"data.photo_box": gr.Column(visible=state.kind == "images"),
            "data.qa_box": gr.Column(visible=state.kind == "qa"),
            "data.photo_gallery": handlers.gallery_items(state.uploads.get("images", [])),
            "data.qa_gallery": handlers.gallery_items(state.uploads.get("qa", [])), "data.msg": "",
            "data.holdout": gr.Number(label=HOLDOUT_LABEL.get(state.kind, "Held out"))}


def prompt_view(model: str, prompt: str) -> Values:
    """The Prompt box follows the model while it holds an example (the image demo's words, or the usual one)."""
    if (prompt or "").strip() in ("", handlers.EXAMPLE_PROMPT, handlers.GENERIC_PROMPT):
        return {"data.prompt": handlers.default_prompt(model)}
    return {}


def upload(studio, v: Values) -> Values:
    """Check newly dropped files (as the run will) and add the good ones; the table follows the images."""
    state: PageState = v["page.state"]
    images, message = handlers.add_images(state.images, v["upload"], state.kind)
    state = state.with_images(images)
    if state.kind == "images":
        table = {"data.captions": handlers.caption_rows(images, v["data.captions"]), "data.photo_upload": None}
    else:
        table = {"data.qa_table": handlers.qa_rows_for_images(images, v["data.qa_table"]), "data.qa_upload": None}
    return {"page.state": state, GALLERY[state.kind]: handlers.gallery_items(images), **table,
            "data.msg": say(message, good="- " not in message)}


def remove(studio, v: Values) -> Values:
    state: PageState = v["page.state"]
    removed = state.images[state.picked]["name"] if state.picked is not None and \
        0 <= state.picked < len(state.images) else None
    images, message = handlers.remove_image(state.images, state.picked)
    state = state.with_images(images)
    if state.kind == "images":
        table = {"data.captions": handlers.caption_rows(images, v["data.captions"])}
    else:
        rows = [row for row in handlers.table_rows(v["data.qa_table"]) if not row or row[0] != removed]
        table = {"data.qa_table": rows or None}
    return {"page.state": state, GALLERY[state.kind]: handlers.gallery_items(images), **table, "data.msg": say(message)}


def caption(studio, v: Values) -> Values:
    rows, message = handlers.caption_photos(v["page.state"].images, v["data.captions"], v["data.trigger"],
                                            v["data.caption_model"])
    return {"data.captions": rows, "data.caption_msg": say(message)}


def import_table(studio, v: Values) -> Values:
    rows = handlers.read_qa_table_file(v["data.qa_import"])
    names = {item["name"] for item in v["page.state"].uploads.get("qa", [])}
    missing = sorted({row[0] for row in rows if row[0] and row[0] not in names})
    note = (f" Upload these images too: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}." if missing
            else "")
    return {"data.qa_table": rows, "data.qa_import": None,
            "data.msg": say(f"{len(rows)} questions imported.{note}", good=not missing)}


def example(studio, v: Values) -> Values:
    """The demo's example data in place of what the task's set holds (said on the page: nothing is mixed)."""
    state: PageState = v["page.state"]
    images, rows, example_prompt = handlers.example_data(state.kind, Path(tempfile.mkdtemp(prefix="emloc-example-")))
    had = len(state.images)
    images, _ = handlers.add_images([], [i["path"] for i in images], state.kind)
    state = state.with_images(images)
    if state.kind == "images":
        prompt = v["data.prompt"]
        replaced = (f"Replaced your {had} photo{'s' if had != 1 else ''} and the prompt {prompt!r} with" if had
                    else f"Replaced the prompt {prompt!r} with")
        message = (f"{replaced} the example data: {len(images)} photos of the demo subject (a teal cross) and the "
                   f"prompt {example_prompt!r}, trigger word 'sks'. Your own files on disk are untouched; drop them "
                   "again to use them.")
        return {"page.state": state, "data.photo_gallery": handlers.gallery_items(images),
                "data.captions": handlers.caption_rows(images, None), "data.prompt": example_prompt,
                "data.trigger": "sks", "data.msg": say(message)}
    typed = len([row for row in handlers.table_rows(v["data.qa_table"]) if any(row)])
    replaced = f"Replaced your {had} images and {typed} questions with" if had or typed else "Added"
    message = (f"{replaced} the example data: {len(images)} photos of mugs and {len(rows)} questions about whose mug "
               "each is. Your own files on disk are untouched; drop them again to use them.")
    return {"page.state": state, "data.qa_gallery": handlers.gallery_items(images), "data.qa_table": rows,
            "data.msg": say(message)}


def go_budget(studio, v: Values) -> Values:
    """Check the data as the run will, then show the Budget step with the RAM available now."""
    from . import budget

    state: PageState = v["page.state"]
    staging = Path(tempfile.mkdtemp(prefix="emloc-check-more-"))
    try:
        summary = handlers.check_data(state.kind, v["model.model"], state.images, v["data.prompt"],
                                      v["data.trigger"], v["data.captions"], v["data.qa_table"],
                                      extra=more_settings(state.kind, v, staging))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"page.wizard": gr.Walkthrough(selected=STEP["budget"]), "data.msg": say(summary + held_out_words(v)),
            **budget.ram_view(v)}


def more_settings(kind: str, v: Values, staging: Path | None = None) -> dict:
    """The Data step's own settings (held-out count, image sizes, prior preservation, the validation upload staged
    in `staging`) as the backend reads them, checked (ValueError naming the control). The question task's held-out
    count is checked against its table here (its backend reads the table only when the run is made)."""
    from ..families import model_backend
    from ..form import DATA_FIELDS, data_settings

    backend = model_backend(v["model.model"])
    page = {n: v.get(f"data.{n}") for n in DATA_FIELDS}
    values = data_settings(backend, page, staging)
    if staging is not None:  # the validation upload, checked as the run will check it
        values.update(validation.stage(backend, page, v["page.state"].images, staging))
    if kind == "qa":
        rows = len([row for row in handlers.table_rows(v["data.qa_table"]) if any(row)])
        if not 0 <= values.get("holdout", 0) < max(rows, 1):
            raise ValueError(f"Held-out questions is {values['holdout']} but the table has {rows} questions; hold "
                             "out fewer than your questions (at least one must stay for training), or 0 for none")
        return {}
    return values


def held_out_words(v: Values) -> str:
    """What Next says about validation: the held-out count and the validation upload of the state's task."""
    held = int(v.get("data.holdout") or 0)
    name = validation.PHOTOS if v["page.state"].kind == "images" else validation.QUESTIONS
    dropped = form.file_paths(v.get(f"data.{name}"))
    parts = [f"{held} held out"] if held else []
    parts += [f"{validation.label(name)} given"] if dropped else []
    return (f" {' and '.join(parts)}: the validation loss is drawn beside the training loss at every sample round "
            "(at every checkpoint when there are none)." if parts else "")


def _upload_panel(kind: str, noun: str, height: int):
    drop = gr.File(file_count="multiple", label=f"Drop {noun}s here, or click to choose", height=120,
                   elem_id=f"{'photo' if kind == 'images' else 'qa'}-upload")
    gallery = gr.Gallery(label=f"Your {noun}s (click one to select it)", columns=8, height=height,
                         allow_preview=False, fit_columns=False,
                         elem_id=f"{'photo' if kind == 'images' else 'qa'}-gallery")
    return drop, gallery, gr.Button(f"Remove the selected {noun}", size="sm")


def build(ctx: Context) -> dict:
    from ..form import any_backend_field

    studio, m = ctx.studio, ctx.manager
    prompt_field, trigger_field = any_backend_field("prompt"), any_backend_field("trigger")
    with gr.Step("2. Data", id=STEP["data"]):
        example_button = gr.Button("No data at hand? Use example data made for the demo model", size="sm")
        with gr.Column(visible=True) as photo_box:
            gr.Markdown("Add **3 to 50 photos** of your subject (JPEG, PNG or WebP), and the prompt that names it "
                        "with a rare trigger word.")
            photo_upload, photo_gallery, photo_remove = _upload_panel("images", "photo", 220)
            with gr.Row():
                trigger = gr.Textbox(trigger_field.default, label=trigger_field.label, info=trigger_field.help,
                                     scale=1)
                prompt = gr.Textbox(handlers.GENERIC_PROMPT, label=f"{prompt_field.label} (must contain the trigger "
                                    "word)", info=prompt_field.help, scale=3, elem_id="prompt")
            captions = gr.Dataframe(headers=["image", "caption"], column_count=2, interactive=True,
                                    static_columns=[0], label="Captions per photo (optional; empty means the prompt)",
                                    elem_id="captions")
            with gr.Row():
                caption_model = gr.Dropdown(handlers.model_choices("qa", studio.demo_models), scale=3,
                                            label="Captioning model (an InternVL you have)", elem_id="caption-model")
                caption_button = gr.Button("Suggest captions for my photos", scale=1, elem_id="caption-photos")
            caption_msg = gr.Markdown(elem_id="msg-caption", elem_classes="emloc-msg")
            photos_for_validation = _validation_drop(validation.PHOTOS, "other photos of your subject (JPEG, PNG or "
                                                     "WebP), never trained on", "validation-photos")
            more = _more_photo_settings(any_backend_field)
        with gr.Column(visible=False) as qa_box:
            gr.Markdown("Add your **images** and a **question and answer** for each (the table), or import a .jsonl "
                        "/ .csv file with the columns image, question, answer.")
            qa_upload, qa_gallery, qa_remove = _upload_panel("qa", "image", 180)
            qa_import = gr.File(label="Import questions and answers (.jsonl or .csv)", elem_id="qa-import", height=140)
            qa_table = gr.Dataframe(headers=["image", "question", "answer"], column_count=3, interactive=True,
                                    label="Questions and answers", elem_id="qa-table")
            questions_for_validation = _validation_drop(validation.QUESTIONS, "a .jsonl or .csv file (image, "
                                                        "question, answer) and the images it names, dropped together; "
                                                        "never trained on", "validation-questions")
        holdout = gr.Number(0, label=HOLDOUT_LABEL["images"], precision=0, minimum=0, elem_id="holdout",
                            info="kept out of training (the last ones) to measure a validation loss at each sample "
                                 "round, drawn beside the training loss; 0: none")
        msg = gr.Markdown(elem_id="msg-data", elem_classes="emloc-msg")
        next_button = gr.Button("Check the data and continue", variant="primary")
    elems = {"example": example_button, "photo_box": photo_box, "photo_upload": photo_upload,
             "photo_gallery": photo_gallery, "photo_remove": photo_remove, "trigger": trigger, "prompt": prompt,
             "captions": captions, "caption_model": caption_model, "caption": caption_button,
             "caption_msg": caption_msg, "qa_box": qa_box, "qa_upload": qa_upload, "qa_gallery": qa_gallery,
             "qa_remove": qa_remove, "qa_import": qa_import, "qa_table": qa_table, "msg": msg, "next": next_button,
             "holdout": holdout, validation.PHOTOS: photos_for_validation,
             validation.QUESTIONS: questions_for_validation, **more}
    m.add("data", elems)
    for name in (validation.PHOTOS, validation.QUESTIONS):
        m.bind(elems[name].upload, partial(validation_drop, studio, name=name), ["page.state", f"data.{name}"],
               [f"data.{name}"], message="data.msg")
    state_out = ["page.state", "data.photo_gallery", "data.qa_gallery", "data.captions", "data.qa_table"]
    for drop in ("data.photo_upload", "data.qa_upload"):
        m.bind(m[drop].upload, lambda v, studio=studio, drop=drop: upload(studio, {**v, "upload": v[drop]}),
               ["page.state", drop, "data.captions", "data.qa_table"], [*state_out, drop], message="data.msg")
    for button in ("data.photo_remove", "data.qa_remove"):
        m.bind(m[button].click, partial(remove, studio), ["page.state", "data.captions", "data.qa_table"], state_out,
               message="data.msg")

    def pick(state: PageState, evt: gr.SelectData) -> PageState:
        state.picked = evt.index
        return state

    photo_gallery.select(pick, [m["page.state"]], [m["page.state"]], concurrency_id="wizard")
    qa_gallery.select(pick, [m["page.state"]], [m["page.state"]], concurrency_id="wizard")
    # gradio's own progress over the table while the model writes (a few seconds per photo on a CPU)
    m.bind(caption_button.click, partial(caption, studio),
           ["page.state", "data.captions", "data.trigger", "data.caption_model"], ["data.captions"],
           message="data.caption_msg", show_progress="full", show_progress_on=[captions])
    m.bind(qa_import.upload, partial(import_table, studio), ["page.state", "data.qa_import"],
           ["data.qa_table", "data.qa_import"], message="data.msg")
    m.bind(example_button.click, partial(example, studio), ["page.state", "data.prompt", "data.qa_table"],
           [*state_out, "data.prompt", "data.trigger"], message="data.msg")
    return elems


def validation_drop(studio, v: Values, name: str) -> Values:
    """Check a validation drop (`name`: validation.PHOTOS or QUESTIONS) as the training uploads are checked; the
    drop keeps its usable files, the message says what is wrong with the others."""
    upload = validation.read(name, v[f"data.{name}"], v["page.state"].images)
    kept = ([upload.table] if upload.table else []) + [item["path"] for item in upload.images]
    return {f"data.{name}": kept or None, "data.msg": say(validation.words(name, upload), good=not upload.problems)}


def _validation_drop(name: str, what: str, elem_id: str) -> gr.File:
    """The drop of the backend field `name`'s validation data, labelled as that field."""
    from ..form import any_backend_field

    return gr.File(file_count="multiple", label=f"{any_backend_field(name).label} (optional): {what}", height=110,
                   elem_id=elem_id)


def _more_photo_settings(field) -> dict:
    """Image sizes and prior preservation (the FLUX backends' fields, their labels and help)."""
    with gr.Accordion("More: image sizes, prior preservation", open=False):
        sizes, prompt, count, weight = (field(n) for n in ("resolutions", "class_prompt", "class_count",
                                                           "prior_weight"))
        with gr.Row():
            resolutions = gr.Textbox("", label=sizes.label, info=sizes.help, placeholder="e.g. 768, 1024",
                                     elem_id="resolutions")
            class_prompt = gr.Textbox("", label=prompt.label, info=prompt.help, placeholder="e.g. a photo of a dog",
                                      elem_id="class-prompt")
        with gr.Row():
            class_count = gr.Number(count.default, label=count.label, info=count.help, precision=0, minimum=0)
            prior_weight = gr.Number(weight.default, label=weight.label, info=weight.help, minimum=0)
        own = field("class_images")
        class_images = gr.File(file_count="multiple", label=f"{own.label} (optional: your own, instead of drawing "
                               "them)", height=110, elem_id="class-images")
    return {"resolutions": resolutions, "class_prompt": class_prompt, "class_count": class_count,
            "prior_weight": prior_weight, "class_images": class_images}


def bind_next(ctx: Context) -> None:
    """Next needs the Budget step's RAM box: bound once it is built."""
    from ..form import DATA_FIELDS

    m = ctx.manager
    m.bind(m["data.next"].click, partial(go_budget, ctx.studio),
           ["page.state", "model.model", "data.prompt", "data.trigger", "data.captions", "data.qa_table",
            "budget.ram_touched", *[f"data.{n}" for n in DATA_FIELDS]], ["page.wizard", "budget.ram"],
           message="data.msg")
