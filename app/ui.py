"""The page: a six-step wizard (model, data, budget, train, preview, export) and a Past runs tab.

Layout only: app/ui_events.py binds the events to handlers (app/handlers.py, app/studio.py) through a
guard that turns a failure into a message in words beside the step, so the page never shows a
traceback. A timer polls the one background job every second: any page, opened at any time, shows it.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import gradio as gr

from . import handlers
from .studio import Studio, run_name
from .ui_events import STEP, loss_frame, wire

log = logging.getLogger(__name__)

CSS = """
.emloc-msg p { font-size: 15px; }
.emloc-msg:empty { display: none; }
"""
# System fonts only: the app works offline, so no web fonts are fetched.
THEME = gr.themes.Soft(primary_hue="teal", font=["ui-sans-serif", "system-ui", "sans-serif"],
                       font_mono=["ui-monospace", "monospace"])


def _upload_panel(task: str, noun: str, gallery_height: int) -> tuple[gr.File, gr.Gallery, gr.Button]:
    """A task's drop zone, the gallery of what it holds and the button that removes the selected item."""
    upload = gr.File(file_count="multiple", label=f"Drop {noun}s here, or click to choose", elem_id=f"{task}-upload",
                     height=120)
    gallery = gr.Gallery(label=f"Your {noun}s (click one to select it)", columns=8, height=gallery_height,
                         allow_preview=False, fit_columns=False, elem_id=f"{task}-gallery")
    return upload, gallery, gr.Button(f"Remove the selected {noun}", size="sm")


def build(studio: Studio) -> gr.Blocks:
    """The whole page bound to `studio` (one per process: it owns the background job)."""
    first = handlers.model_choices("flux", studio.demo_models)
    first_model = first[0][1] if first else ""
    with gr.Blocks(title="EMLoC Studio") as page:
        current = gr.State("")  # this page's run folder
        seen = gr.State({"version": -1, "state": ""})  # the job as last drawn
        flux_images, vlm_images = gr.State([]), gr.State([])
        picked = gr.State(None)  # gallery index chosen for removal
        gr.Markdown("# EMLoC Studio\nPersonalise a large model in the memory its inference needs: train a LoRA on "
                    "a small emulator of the model, then correct it for the full model.")
        with gr.Tabs() as tabs:
            with gr.Tab("Personalise", id="wizard"):
                with gr.Walkthrough(selected=0) as wizard:
                    # ---------------------------------------------------------------- 1. model
                    with gr.Step("1. Model", id=STEP["model"]):
                        task = gr.Radio([(v, k) for k, v in handlers.TASKS.items()], value="flux",
                                        label="What do you want to do?")
                        model = gr.Dropdown(first, value=first_model, allow_custom_value=True, label="Model",
                                            info="the demo model, one from the list, a hub id (owner/name) or a "
                                                 "local folder")
                        device = gr.Markdown(elem_id="device")
                        about = gr.Markdown(elem_id="model-info")
                        msg_model = gr.Markdown(elem_id="msg-model", elem_classes="emloc-msg")
                        show_last = gr.Button("Show the last run", visible=False, elem_id="show-last")
                        next_model = gr.Button("Next: your data", variant="primary")
                        plan_only = gr.Button("Only see its memory plan (no training until it is downloaded)",
                                              visible=False, size="sm", elem_id="plan-only")
                    # ---------------------------------------------------------------- 2. data
                    with gr.Step("2. Data", id=STEP["data"]):
                        example = gr.Button("No data at hand? Use example data made for the demo model", size="sm")
                        with gr.Column(visible=True) as flux_box:
                            gr.Markdown("Add **3 to 50 photos** of your subject (JPEG, PNG or WebP), and the prompt "
                                        "that names it with a rare trigger word.")
                            flux_upload, flux_gallery, flux_remove = _upload_panel("flux", "photo", gallery_height=220)
                            with gr.Row():
                                trigger = gr.Textbox("sks", label="Trigger word", scale=1)
                                prompt = gr.Textbox("a photo of sks dog", label="Prompt (must contain the trigger word)",
                                                    scale=3, elem_id="prompt")
                            captions = gr.Dataframe(headers=["image", "caption"], column_count=2, interactive=True,
                                                    static_columns=[0], label="Captions per photo (optional; empty "
                                                    "means the prompt)", elem_id="captions")
                            with gr.Row():
                                caption_model = gr.Dropdown(handlers.model_choices("vlm", studio.demo_models),
                                                            label="Captioning model (an InternVL you have)", scale=3,
                                                            elem_id="caption-model")
                                caption = gr.Button("Caption my photos", scale=1, elem_id="caption-photos")
                        with gr.Column(visible=False) as vlm_box:
                            gr.Markdown("Add your **images** and a **question and answer** for each (the table), or "
                                        "import a .jsonl / .csv file with the columns image, question, answer.")
                            vlm_upload, vlm_gallery, vlm_remove = _upload_panel("vlm", "image", gallery_height=180)
                            qa_import = gr.File(label="Import questions and answers (.jsonl or .csv)",
                                                elem_id="qa-import", height=140)
                            qa_table = gr.Dataframe(headers=["image", "question", "answer"], column_count=3,
                                                    interactive=True, label="Questions and answers",
                                                    elem_id="qa-table")
                        msg_data = gr.Markdown(elem_id="msg-data", elem_classes="emloc-msg")
                        next_data = gr.Button("Check the data and continue", variant="primary")
                    # ---------------------------------------------------------------- 3. budget
                    with gr.Step("3. Budget", id=STEP["budget"]):
                        runs_on = gr.Markdown(elem_id="runs-on")
                        device_kind = gr.State("cpu")  # what runs the job: "cuda" or "cpu" (set when the page loads)
                        touched = gr.State(False)  # the person moved the ratio slider: stop following the advice
                        with gr.Row():
                            budget = gr.Number(24, label="GPU memory budget (GiB)", minimum=None, elem_id="budget",
                                               visible=False)
                            ram = gr.Number(handlers.available_ram_gib(), label="RAM budget (GiB)", minimum=None,
                                            elem_id="ram-budget")
                            presets = gr.Radio([str(p) for p in handlers.BUDGET_PRESETS],
                                               label="GPU size presets (GiB)", value=None, visible=False)
                        with gr.Row():
                            ratio = gr.Slider(0.05, 1.0, value=0.45, step=0.01, label="Compression ratio: the "
                                              "fraction of each layer's parameters the emulator keeps", scale=3,
                                              info="1.00 = no compression: every layer is kept as it is",
                                              elem_id="ratio")
                            rank = gr.Dropdown([4, 8, 16, 32, 64], value=16, label="LoRA rank", scale=1)
                            batch = gr.Dropdown([1, 2, 4, 8], value=1, label="Batch size (samples per training step)",
                                                scale=1, elem_id="batch-size")
                        recommend = gr.Button("Use the recommended ratio", size="sm")
                        plan_text = gr.Markdown(elem_id="plan-text")
                        chart = gr.HTML(elem_id="memory-chart")
                        legend = gr.Markdown(handlers.CHART_LEGEND, elem_id="chart-legend")
                        msg_budget = gr.Markdown(elem_id="msg-budget", elem_classes="emloc-msg")
                        recommended = gr.State(None)
                        next_budget = gr.Button("Next: training", variant="primary")
                    # ---------------------------------------------------------------- 4. train
                    with gr.Step("4. Train", id=STEP["train"]):
                        name = gr.Textbox(run_name("flux", studio.runs_dir), label="Run name (its folder under "
                                          f"{studio.runs_dir})", elem_id="run-name")
                        with gr.Row():
                            steps = gr.Number(30, label="Training steps", precision=0, elem_id="steps")
                            lr = gr.Number(1e-3, label="Learning rate")
                            lam = gr.Number(3.0, label="Correction clamp λ (0: off)")
                            seed = gr.Number(0, label="Seed", precision=0)
                            calibration = gr.Number(8, label="Calibration samples", precision=0)
                        with gr.Accordion("More settings", open=False):
                            with gr.Row():
                                resolution = gr.Number(32, label="Image size (FLUX, multiple of 16)", precision=0)
                                checkpoint_every = gr.Number(10, label="Checkpoint every N steps", precision=0)
                                preview_steps = gr.Number(4, label="Preview denoising steps (FLUX; 0: default)",
                                                          precision=0)
                                max_tokens = gr.Number(16, label="Text tokens (FLUX; 0: default)", precision=0)
                                answer_tokens = gr.Number(32, label="Longest preview answer (InternVL, tokens)",
                                                          precision=0)
                        with gr.Row():
                            start = gr.Button("Start training", variant="primary", elem_id="start")
                            cancel = gr.Button("Cancel", variant="stop", interactive=False, elem_id="cancel")
                        msg_train = gr.Markdown(elem_id="msg-train", elem_classes="emloc-msg")
                        status = gr.Markdown(elem_id="job-status")
                        progress = gr.HTML(elem_id="job-progress")
                        loss_plot = gr.LinePlot(loss_frame([]), x="step", y="loss", title="Training loss",
                                                height=260, elem_id="loss-plot")
                        job_log = gr.Textbox(label="Log (newest first)", lines=8, max_lines=8, autoscroll=False,
                                             interactive=False,
                                             elem_id="job-log")
                        with gr.Row():
                            gr.Markdown("**Samples during training**: what the emulator with its LoRA makes at step 0 "
                                        "and every few steps, newest round first.")
                            sample_now = gr.Button("Sample now", size="sm", elem_id="sample-now")
                        samples_gallery = gr.Gallery(label="Samples (labelled by step)", columns=4, height=300,
                                                     object_fit="contain", elem_id="samples", visible=False)
                        samples_answers = gr.Markdown(elem_id="samples-answers")
                        samples_timer = gr.Timer(2.0)
                        samples_shown = gr.State(None)  # (images, answer characters) on the page now
                        next_train = gr.Button("Next: previews", variant="primary")
                    # ---------------------------------------------------------------- 5. preview
                    with gr.Step("5. Preview", id=STEP["preview"]):
                        preview_text = gr.Markdown(elem_id="preview-text")
                        preview_gallery = gr.Gallery(label="base | emulator + LoRA | full model + corrected LoRA",
                                                     columns=3, height=360, object_fit="contain",
                                                     elem_id="preview-gallery")
                        answers = gr.Dataframe(label="Answers", interactive=False, visible=False, wrap=True,
                                               elem_id="answers")
                        scores = gr.Markdown(elem_id="scores")
                        show_uncorrected = gr.Checkbox(False, label="Also show the full model with the uncorrected "
                                                                    "LoRA (what correction fixes)")
                        with gr.Row():
                            ask = gr.Textbox(label="New prompt (FLUX) or question (InternVL)", scale=3,
                                             elem_id="ask")
                            seeds = gr.Textbox("0", label="Seeds (FLUX)", scale=1, elem_id="seeds")
                            ask_image = gr.Dropdown([], label="Image for the question (InternVL)", scale=1,
                                                    allow_custom_value=False)
                            ask_upload = gr.Image(type="filepath", label="Or a new image (InternVL): it is used "
                                                  "instead of the one chosen", scale=1, height=140, visible=False,
                                                  sources=["upload"], elem_id="ask-upload")
                        render = gr.Button("Render new previews", elem_id="render")
                        preview_progress = gr.HTML(elem_id="preview-progress")
                        msg_preview = gr.Markdown(elem_id="msg-preview", elem_classes="emloc-msg")
                        next_preview = gr.Button("Next: export", variant="primary")
                    # ---------------------------------------------------------------- 6. export
                    with gr.Step("6. Export", id=STEP["export"]):
                        export_text = gr.Markdown(elem_id="export-text")
                        download = gr.File(label="Download the adapters (zip)", interactive=False,
                                           elem_id="download")
                        snippet = gr.Code(language="python", label="Python that loads the corrected LoRA and makes its first preview again",
                                          interactive=False, elem_id="snippet")
                        msg_export = gr.Markdown(elem_id="msg-export", elem_classes="emloc-msg")
                        new_run = gr.Button("Start another run")
            with gr.Tab("Past runs", id="runs"):
                gr.Markdown("Every run in the runs folder. Open one to see its results, resume one that was "
                            "interrupted (it continues from its last finished stage and checkpoint), or train a "
                            "finished one further.")
                runs_table = gr.Dataframe(headers=["name", "task", "model", "created", "status", "steps"],
                                          interactive=False, elem_id="runs-table")
                with gr.Row():
                    run_pick = gr.Dropdown([], label="Run", scale=2, elem_id="run-pick")
                    refresh = gr.Button("Refresh", size="sm")
                    open_btn = gr.Button("Open", variant="primary", size="sm")
                    resume_btn = gr.Button("Resume", size="sm")
                with gr.Row():
                    extend_steps = gr.Number(None, label="Train to (steps)", precision=0, scale=1,
                                             info="a finished run trains on from its last step; its results so "
                                                  "far are kept in its folder under earlier/", elem_id="extend-steps")
                    extend_btn = gr.Button("Train further", size="sm", scale=1, elem_id="extend")
                msg_runs = gr.Markdown(elem_id="msg-runs", elem_classes="emloc-msg")
        timer = gr.Timer(1.0)

        wire(studio, SimpleNamespace(**{k: v for k, v in locals().items() if isinstance(v, gr.blocks.Block)}))
    return page
