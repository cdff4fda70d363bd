"""The page's events: which handler each button, upload and timer tick calls, and what it updates.

`wire(studio, c)` binds the components of app/ui.py (`c.<name>`) to handlers in app/handlers.py and
app/studio.py. Every callback goes through `guard`, so a failure becomes a message beside its step.
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from pathlib import Path
from typing import Callable

import gradio as gr
import pandas as pd

from . import handlers, results, words
from .jobs import JobBusy
from .plots import progress_bar
from .studio import Studio, TrainRequest, read_losses, run_name

log = logging.getLogger(__name__)

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, JobBusy, OSError)
STEP = {"model": 0, "data": 1, "budget": 2, "train": 3, "preview": 4, "export": 5}
RECENT_S = 1800  # a job that ended this recently is shown on pages opened after it
RUN_COLUMNS = ["name", "task", "model", "created", "status", "steps"]
RUNS_REFRESH_S = 5  # Past runs is listed again this often while a job runs (its step count moves)


def say(text: str, good: bool = True) -> str:
    """A message for a step, markdown-escaped so that file names show as typed."""
    text = str(text)
    text = text[:1].upper() + text[1:]
    text = re.sub(r"([\\`*_\[\]<>#|])", r"\\\1", text)
    return ("✓ " if good else "⚠ ") + text.replace("\n", "  \n")


def guard(fn: Callable, outputs: int, message: int) -> Callable:
    """Call `fn`; on failure leave every output as it was and put the reason, in words, in output `message`."""

    def wrapper(*args):
        try:
            return fn(*args)
        except USER_ERRORS as err:
            reason = words.in_app_words(str(err))  # the CLI's flags said as the page's controls
        except Exception as err:  # a bug: say so plainly; the traceback goes to the terminal
            log.exception("handler %s failed", getattr(fn, "__name__", fn))
            reason = f"something went wrong ({type(err).__name__}: {err}); the details are in the terminal"
        values = [gr.skip()] * outputs
        values[message] = say(reason, good=False)
        return values[0] if outputs == 1 else tuple(values)

    wrapper.__name__ = getattr(fn, "__name__", "handler")
    return wrapper


def loss_frame(losses: list) -> pd.DataFrame:
    """(step, loss) pairs as a typed frame: numbers, so the plot draws numeric axes even before the first step."""
    return pd.DataFrame({"step": pd.Series([s for s, _ in losses or []], dtype="int64"),
                         "loss": pd.Series([v for _, v in losses or []], dtype="float64")})


def on(event: Callable, fn: Callable, inputs: list, outputs: list, message: int | None = None, **kwargs) -> None:
    """Bind `fn` to `event` with `guard` (the message output is the last one unless told)."""
    index = len(outputs) - 1 if message is None else message
    # One queue for the page's own events: a person's clicks are handled in the order they were made.
    event(guard(fn, len(outputs), index), inputs=inputs, outputs=outputs, show_progress="hidden",
          concurrency_id="wizard", **kwargs)


def wire(studio: Studio, c) -> None:  # noqa: C901 - one place that lists every event of the page
    """Bind every event of the page built by app/ui.py."""

    # -- shared views --------------------------------------------------------------------------------
    def plan_view(model, budget, ratio, rank, ram=None, touched=False, kind="cuda", batch=1):
        """Chart, text, recommendation, the slider (it follows the recommendation until the person moves it),
        message."""
        try:
            plan = handlers.memory_plan(model, budget, ratio if touched else None, rank, ram_gb=ram, device=kind,
                                        batch_size=batch)
        except USER_ERRORS as err:
            return "", "", None, gr.skip(), say(err, good=False)
        budgets = "RAM budget" if kind == "cpu" else "GPU memory or RAM budget"
        message = "" if plan["recommended"] is not None else say(
            f"No compression ratio fits this budget; raise the {budgets} (or pick a smaller model) to continue.", False)
        slider = gr.skip() if touched or plan["recommended"] is None else plan["recommended"]
        return plan["svg"], plan["text"], plan["recommended"], slider, message

    def preview_view(current, uncorrected):
        view = studio.previews(current, uncorrected)
        flux = view["task"] == "flux"
        table = pd.DataFrame(view["rows"], columns=view["headers"]) if view["rows"] else None
        images = studio.question_images(current) if view["task"] == "vlm" else []
        columns = 4 if uncorrected else 3
        rows = max(1, -(-len(view["images"]) // columns))
        return (view["text"], gr.Gallery(value=view["images"] or None, visible=flux or not view["task"],
                                         columns=columns, height=rows * 430 + 40),
                gr.Dataframe(value=table, visible=table is not None), view["scores"],
                gr.Dropdown(choices=[(results.shown_name(i), i) for i in images], value=images[0] if images else None,
                            visible=bool(images)),
                gr.Textbox(visible=flux), gr.Image(visible=view["task"] == "vlm"))

    def export_view(current):
        if not current:
            return "No run yet: train one in step 4, or open one under Past runs.", None, ""
        info = studio.export(current)
        return info["text"], info["zip"], info["snippet"]

    def runs_view(pick=None):
        rows = studio.list_runs()
        names = [r["name"] for r in rows]
        return (pd.DataFrame([[r[k] for k in RUN_COLUMNS] for r in rows], columns=RUN_COLUMNS),
                gr.Dropdown(choices=names, value=pick if pick in names else (names[0] if names else None)))

    # -- 1. model (and page load: the device, the default model, a job that may already be running) -------
    def on_model(task, model, budget, ratio, rank, ram=None, kind="cuda"):
        info = handlers.describe_model(task, model)
        d = handlers.default_settings(task, info["params"], model)
        suggested = d.get("ratio")  # a demo's own ratio (it would fit uncompressed): the slider starts there
        svg, text, recommended, slider, message = plan_view(model, budget, suggested or ratio, rank, ram,
                                                             suggested is not None, kind, d["batch_size"])
        if suggested is not None:
            slider = suggested
            text += f" This demo model starts at ratio {suggested:.2f}, so that the emulator is really compressed."
        return (info["text"], d["steps"], d["lr"], d["calibration_samples"], d.get("resolution", 512),
                d["checkpoint_every"], d.get("preview_steps", 0), d.get("max_sequence_length", 0), d["batch_size"],
                svg, text, recommended, slider, suggested is not None, message, "")

    # a new model: the slider follows its recommendation again
    model_outputs = [c.about, c.steps, c.lr, c.calibration, c.resolution, c.checkpoint_every, c.preview_steps,
                     c.max_tokens, c.batch, c.chart, c.plan_text, c.recommended, c.ratio, c.touched, c.msg_budget, c.msg_model]
    on(c.model.change, on_model, [c.task, c.model, c.budget, c.ratio, c.rank, c.ram, c.device_kind], model_outputs)

    def on_load(task, model, budget, ratio, rank, ram):
        device = handlers.detect_device()
        kind = device["kind"]
        if kind == "cuda":
            budget = round(device["total_gb"])
        job = studio.job_view()
        current = job["run_dir"] if job["running"] else ""
        # a page opened while the job runs follows it (step 4); one opened soon after it ended offers its results
        step = gr.Walkthrough(selected=STEP["train"]) if job["running"] else gr.skip()
        seen = {"version": -1, "state": "running" if job["running"] else "", "started": job["started"]}
        ended = job["state"] in ("done", "cancelled", "failed") and time.time() - job["finished"] < RECENT_S
        last = gr.Button(value=f"Show {Path(job['run_dir']).name}, the run that {job['state'].replace('done', 'finished')}"
                         " while this page was closed", visible=True) if ended else gr.Button(visible=False)
        if job["running"]:  # the form follows the running job's task
            task = results.run_info(job["run_dir"])["backend"]
            choices = handlers.model_choices(task, studio.demo_models)
            model = results.run_info(job["run_dir"])["settings"]["run"]["model"]
        table, pick = runs_view()
        head = (device["text"], gr.Number(value=budget, visible=kind == "cuda"), current, step, seen, last,
                run_name(task, studio.runs_dir), table, pick,
                task, gr.Dropdown(choices=choices, value=model) if job["running"] else gr.skip(),
                gr.Column(visible=task == "flux"), gr.Column(visible=task == "vlm"),
                kind, handlers.runs_on(device), gr.Radio(visible=kind == "cuda"))
        return head + guard(on_model, len(model_outputs), len(model_outputs) - 1)(task, model, budget, ratio, rank,
                                                                                   ram, kind)

    head_outputs = [c.device, c.budget, c.current, c.wizard, c.seen, c.show_last, c.name, c.runs_table,
                    c.run_pick, c.task, c.model, c.flux_box, c.vlm_box, c.device_kind, c.runs_on, c.presets]
    c.page.load(guard(on_load, len(head_outputs) + len(model_outputs), len(head_outputs) + len(model_outputs) - 1),
                inputs=[c.task, c.model, c.budget, c.ratio, c.rank, c.ram],
                outputs=[*head_outputs, *model_outputs])

    def on_task(task):
        choices = handlers.model_choices(task, studio.demo_models)
        return (gr.Dropdown(choices=choices, value=choices[0][1] if choices else ""),
                gr.Column(visible=task == "flux"), gr.Column(visible=task == "vlm"),
                run_name(task, studio.runs_dir), "")

    on(c.task.change, on_task, [c.task], [c.model, c.flux_box, c.vlm_box, c.name, c.msg_model])
    c.model.change(lambda: gr.Button(visible=False), [], [c.plan_only], concurrency_id="wizard")

    def go_data(task, model):
        handlers.describe_model(task, model)
        try:  # not downloaded, gated, pickle weights only: refused here, before anything is made
            handlers.check_model_ready(task, model)
        except ValueError as err:
            return gr.skip(), say(words.in_app_words(err), good=False), gr.Button(visible=True)
        return gr.Walkthrough(selected=STEP["data"]), "", gr.Button(visible=False)

    on(c.next_model.click, go_data, [c.task, c.model], [c.wizard, c.msg_model, c.plan_only], message=1)

    def plan_only():
        return gr.Walkthrough(selected=STEP["data"]), say(
            "This model cannot be trained here yet: steps 2 and 3 show your data check and its memory plan; "
            "Start training is refused until its files are on this machine.", good=False)

    on(c.plan_only.click, plan_only, [], [c.wizard, c.msg_data])

    # -- 2. data -------------------------------------------------------------------------------------
    def on_upload(task, table_rows):
        """The upload handler of one task's panel: add the files, then the gallery and the table that follow."""
        def handler(images, files, table):
            images, message = handlers.add_images(images, files, task)
            return (images, handlers.gallery_items(images), table_rows(images, table), None,
                    say(message, good="- " not in message))
        return handler

    on(c.flux_upload.upload, on_upload("flux", handlers.caption_rows), [c.flux_images, c.flux_upload, c.captions],
       [c.flux_images, c.flux_gallery, c.captions, c.flux_upload, c.msg_data])
    on(c.vlm_upload.upload, on_upload("vlm", handlers.qa_rows_for_images), [c.vlm_images, c.vlm_upload, c.qa_table],
       [c.vlm_images, c.vlm_gallery, c.qa_table, c.vlm_upload, c.msg_data])

    def on_select(evt: gr.SelectData):
        return evt.index

    c.flux_gallery.select(on_select, None, c.picked, concurrency_id="wizard")
    c.vlm_gallery.select(on_select, None, c.picked, concurrency_id="wizard")

    def on_caption(images, captions, trigger, model):
        rows, message = handlers.caption_photos(images, captions, trigger, model)
        return rows, say(message)

    # gradio's own progress over the table while the model writes (a few seconds per photo on a CPU)
    c.caption.click(guard(on_caption, 2, 1), [c.flux_images, c.captions, c.trigger, c.caption_model],
                    [c.captions, c.msg_data], show_progress="full", show_progress_on=[c.captions],
                    concurrency_id="wizard")

    def on_flux_remove(images, index, captions):
        images, message = handlers.remove_image(images, index)
        return images, handlers.gallery_items(images), handlers.caption_rows(images, captions), None, say(message)

    on(c.flux_remove.click, on_flux_remove, [c.flux_images, c.picked, c.captions],
       [c.flux_images, c.flux_gallery, c.captions, c.picked, c.msg_data])

    def on_vlm_remove(images, index, table):
        removed = (images or [])[index]["name"] if index is not None and 0 <= index < len(images or []) else None
        images, message = handlers.remove_image(images, index)
        rows = [row for row in handlers.table_rows(table) if not row or row[0] != removed]
        return images, handlers.gallery_items(images), rows or None, None, say(message)

    on(c.vlm_remove.click, on_vlm_remove, [c.vlm_images, c.picked, c.qa_table],
       [c.vlm_images, c.vlm_gallery, c.qa_table, c.picked, c.msg_data])

    def on_import(file, images):
        rows = handlers.read_qa_table_file(file)
        names = {item["name"] for item in images or []}
        missing = sorted({row[0] for row in rows if row[0] and row[0] not in names})
        note = (f" Upload these images too: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}."
                if missing else "")
        return rows, None, say(f"{len(rows)} questions imported.{note}", good=not missing)

    def on_example(task, flux_images, vlm_images, captions, table, prompt, trigger):
        """The demo's example data in place of what the set holds (said on the page: nothing is mixed)."""
        images, rows, example_prompt = handlers.example_data(task, Path(tempfile.mkdtemp(prefix="emloc-example-")))
        paths = [i["path"] for i in images]
        if task == "flux":
            images, _ = handlers.add_images([], paths, "flux")
            had = len(flux_images or [])
            replaced = (f"Replaced your {had} photo{'s' if had != 1 else ''} and the prompt {prompt!r} with" if had
                        else f"Replaced the prompt {prompt!r} with")
            message = (f"{replaced} the example data: {len(images)} photos of the demo subject (a teal cross) and the "
                       f"prompt {example_prompt!r}, trigger word 'sks'. Your own files on disk are untouched; drop them "
                       "again to use them.")
            return (images, handlers.gallery_items(images), handlers.caption_rows(images, None), example_prompt, "sks",
                    gr.skip(), gr.skip(), gr.skip(), say(message))
        images, _ = handlers.add_images([], paths, "vlm")
        had, typed = len(vlm_images or []), len([row for row in handlers.table_rows(table) if any(row)])
        replaced = f"Replaced your {had} images and {typed} questions with" if had or typed else "Added"
        message = (f"{replaced} the example data: {len(images)} photos of mugs and {len(rows)} questions about "
                   "whose mug each is. Your own files on disk are untouched; drop them again to use them.")
        return (gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), images, handlers.gallery_items(images), rows,
                say(message))

    on(c.example.click, on_example, [c.task, c.flux_images, c.vlm_images, c.captions, c.qa_table, c.prompt, c.trigger],
       [c.flux_images, c.flux_gallery, c.captions, c.prompt, c.trigger, c.vlm_images, c.vlm_gallery, c.qa_table,
        c.msg_data])

    on(c.qa_import.upload, on_import, [c.qa_import, c.vlm_images], [c.qa_table, c.qa_import, c.msg_data])

    def go_budget(task, model, flux_images, prompt, trigger, captions, vlm_images, table):
        images = flux_images if task == "flux" else vlm_images
        summary = handlers.check_data(task, model, images, prompt, trigger, captions, table)
        return gr.Walkthrough(selected=STEP["budget"]), say(summary)

    on(c.next_data.click, go_budget, [c.task, c.model, c.flux_images, c.prompt, c.trigger, c.captions,
                                      c.vlm_images, c.qa_table], [c.wizard, c.msg_data])

    # -- 3. budget -----------------------------------------------------------------------------------
    c.presets.change(lambda preset: float(preset) if preset else gr.skip(), [c.presets], [c.budget],
                     concurrency_id="wizard")
    plan_inputs = [c.model, c.budget, c.ratio, c.rank, c.ram, c.touched, c.device_kind, c.batch]
    plan_outputs = [c.chart, c.plan_text, c.recommended, c.ratio, c.msg_budget]
    for event in (c.budget.change, c.rank.change, c.ram.change, c.batch.input):
        on(event, plan_view, plan_inputs, plan_outputs, trigger_mode="always_last")

    def moved_ratio(model, budget, ratio, rank, ram, touched, kind, batch):  # the person moved the slider: theirs now
        svg, text, recommended, _, message = plan_view(model, budget, ratio, rank, ram, True, kind, batch)
        return svg, text, recommended, True, message

    on(c.ratio.release, moved_ratio, plan_inputs, [c.chart, c.plan_text, c.recommended, c.touched, c.msg_budget],
       trigger_mode="always_last")

    def use_recommended(model, budget, ratio, rank, ram, touched, kind, batch):
        svg, text, recommended, _, message = plan_view(model, budget, ratio, rank, ram, False, kind, batch)
        if recommended is None:
            raise ValueError("nothing to recommend: no ratio fits this budget; raise the budget first")
        return svg, text, recommended, recommended, False, message

    on(c.recommend.click, use_recommended, plan_inputs,
       [c.chart, c.plan_text, c.recommended, c.ratio, c.touched, c.msg_budget])

    def go_train(recommended, model, budget, ratio, rank, ram, kind, batch):
        plan = handlers.memory_plan(model, budget, ratio, rank, ram_gb=ram, device=kind, batch_size=batch)
        if plan["recommended"] is None:
            raise ValueError("no compression ratio fits this budget; raise the budget to continue")
        if not plan["fits"]:
            where = "this machine's RAM" if kind == "cpu" else "a GPU with this budget"
            raise ValueError(f"ratio {ratio:.2f} does not fit: {where} would run out of memory. Move the slider to "
                             f"{plan['recommended']:.2f} or below (Use the recommended ratio), or raise the budget")
        return gr.Walkthrough(selected=STEP["train"]), ""

    on(c.next_budget.click, go_train, [c.recommended, c.model, c.budget, c.ratio, c.rank, c.ram, c.device_kind,
                                       c.batch],
       [c.wizard, c.msg_budget])

    # -- 4. train ------------------------------------------------------------------------------------
    def on_start(task, model, name, flux_images, prompt, trigger, captions, vlm_images, table, ratio, rank, steps,
                 lr, lam, seed, calibration, checkpoint_every, resolution, preview_steps, max_tokens, answer_tokens,
                 ram=None, batch=1):
        request = TrainRequest(task=task, model=model, name=name,
                               images=flux_images if task == "flux" else vlm_images, prompt=prompt, trigger=trigger,
                               captions=captions, qa_table=table, ratio=ratio, rank=rank, steps=steps, lr=lr,
                               lam=lam, seed=seed, calibration_samples=calibration, checkpoint_every=checkpoint_every,
                               resolution=resolution, preview_steps=preview_steps, max_sequence_length=max_tokens,
                               max_new_tokens=answer_tokens, ram_gb=float(ram or 0.0), batch_size=batch)
        folder = studio.start_run(request)
        return folder, run_name(task, studio.runs_dir), say(f"Started {name}: your data was checked and copied "
                                                            f"into {folder}.")

    on(c.start.click, on_start, [c.task, c.model, c.name, c.flux_images, c.prompt, c.trigger, c.captions,
                                 c.vlm_images, c.qa_table, c.ratio, c.rank, c.steps, c.lr, c.lam, c.seed,
                                 c.calibration, c.checkpoint_every, c.resolution, c.preview_steps, c.max_tokens,
                                 c.answer_tokens, c.ram, c.batch],
       [c.current, c.name, c.msg_train])
    on(c.cancel.click, lambda: say(studio.cancel()), [], [c.msg_train])
    on(c.sample_now.click, lambda current: say(studio.sample_now(current)), [c.current], [c.msg_train])

    def on_samples(current, shown):
        view = results.samples_view(current)
        key = (len(view["images"]), len(view["answers"]))
        if key == shown:  # nothing new: leave the gallery as it is (no flicker, a picked image stays picked)
            return gr.skip(), gr.skip(), shown
        return gr.Gallery(value=view["images"] or None, visible=bool(view["images"])), view["answers"], key

    c.samples_timer.tick(guard(on_samples, 3, 1), inputs=[c.current, c.samples_shown],
                         outputs=[c.samples_gallery, c.samples_answers, c.samples_shown], show_progress="hidden",
                         concurrency_id="samples")

    def on_tick(seen, current, uncorrected, pick):
        view = studio.job_view()
        seen = seen or {}
        if view["version"] == seen.get("version"):
            return (gr.skip(),) * 22
        was_running = seen.get("state") == "running"
        current = current or view["run_dir"]
        ours = bool(view["run_dir"]) and view["run_dir"] == current
        # a job that started and ended between two ticks (a quick preview) was never seen running: its start time tells
        new_job = "started" in seen and view["started"] != seen["started"]
        finished = (was_running or new_job) and not view["running"] and ours
        results = [gr.skip()] * 10
        step = gr.skip()
        if finished and view["state"] == "done":
            results = list(preview_view(current, uncorrected))
            results += list(export_view(current)) if view["kind"] == "run" else [gr.skip()] * 3
            step = gr.Walkthrough(selected=STEP["preview"]) if view["kind"] == "run" else gr.skip()
        note = "" if finished and view["kind"] == "preview" else gr.skip()  # "rendering ..." is over
        # Past runs follows the job: at every change of state or stage, and every few seconds while it runs
        now = time.time()
        relist = (view["state"] != seen.get("state") or view["stage"] != seen.get("stage")
                  or (view["running"] and now - seen.get("listed", 0) >= RUNS_REFRESH_S))
        runs = list(runs_view(pick)) if relist else [gr.skip(), gr.skip()]
        drawn = {"version": view["version"], "state": view["state"], "stage": view["stage"],
                 "started": view["started"],
                 "listed": now if relist else seen.get("listed", 0)}
        return (drawn, current, view["text"], view["progress"], loss_frame(view["losses"]), view["log"],
                gr.Button(interactive=view["running"]), step, *results, note, *runs, view["preview_progress"])

    c.timer.tick(guard(on_tick, 22, 2), inputs=[c.seen, c.current, c.show_uncorrected, c.run_pick],
                 outputs=[c.seen, c.current, c.status, c.progress, c.loss_plot, c.job_log, c.cancel, c.wizard,
                          c.preview_text, c.preview_gallery, c.answers, c.scores, c.ask_image, c.seeds,
                          c.ask_upload, c.export_text, c.download, c.snippet, c.msg_preview, c.runs_table, c.run_pick,
                          c.preview_progress], show_progress="hidden")

    # -- 5. preview and 6. export --------------------------------------------------------------------
    preview_outputs = [c.preview_text, c.preview_gallery, c.answers, c.scores, c.ask_image, c.seeds, c.ask_upload]

    def go_preview(current, uncorrected):
        return (gr.Walkthrough(selected=STEP["preview"]), *preview_view(current, uncorrected), "")

    on(c.next_train.click, go_preview, [c.current, c.show_uncorrected], [c.wizard, *preview_outputs, c.msg_train])
    on(c.show_uncorrected.change, lambda cur, unc: (*preview_view(cur, unc), ""), [c.current, c.show_uncorrected],
       [*preview_outputs, c.msg_preview])
    on(c.render.click, lambda cur, text, seeds, image, upload: say(studio.render_preview(cur, text, seeds, image,
                                                                                          upload)),
       [c.current, c.ask, c.seeds, c.ask_image, c.ask_upload], [c.msg_preview])

    def go_export(current):
        return (gr.Walkthrough(selected=STEP["export"]), *export_view(current), "")

    on(c.next_preview.click, go_export, [c.current], [c.wizard, c.export_text, c.download, c.snippet, c.msg_preview])
    def on_new_run(task, current):
        """Back to step 1 with a clean page: nothing of the last run's results, questions or log is shown; the
        model, data and settings the user chose stay (they are the user's work, not the run's)."""
        if studio.job_view()["running"]:
            raise ValueError("a job is still running; wait for it to finish or press Cancel in step 4 first")
        last = Path(current).name if current else ""
        cleared = ("", gr.Gallery(value=None, visible=task == "flux"), gr.Dataframe(value=None, visible=False), "",
                   gr.Dropdown(choices=[], value=None, visible=False), gr.Textbox("0", visible=task == "flux"),
                   gr.Image(value=None, visible=False))
        note = say("A new run: your model, data and settings are kept; the results of "
                   f"{last or 'the last run'} are under Past runs.")
        return (gr.Walkthrough(selected=STEP["model"]), run_name(task, studio.runs_dir), "", *cleared,
                "", "", None, "", loss_frame([]), "Nothing is running. Press **Start training** when the steps above "
                "are done.", progress_bar(0.0, "not started"), "", "", "", "", note, "")

    on(c.new_run.click, on_new_run, [c.task, c.current],
       [c.wizard, c.name, c.current, *preview_outputs, c.ask, c.export_text, c.download, c.snippet, c.loss_plot,
        c.status, c.progress, c.job_log, c.preview_progress, c.msg_train, c.msg_preview, c.msg_model, c.msg_export])

    # -- past runs -----------------------------------------------------------------------------------
    on(c.refresh.click, lambda: (*runs_view(), ""), [], [c.runs_table, c.run_pick, c.msg_runs])

    def on_open(name, uncorrected):
        folder = studio.open_run(name)
        finished = (Path(folder) / "lora" / "corrected").is_dir()
        exported = export_view(folder) if finished else ("", None, "")
        step = STEP["preview"] if finished else STEP["train"]
        return (folder, gr.Tabs(selected="wizard"), gr.Walkthrough(selected=step), *preview_view(folder, uncorrected),
                *exported, loss_frame(read_losses(folder)), say(f"Opened {name}."))

    on(c.open_btn.click, on_open, [c.run_pick, c.show_uncorrected],
       [c.current, c.tabs, c.wizard, *preview_outputs, c.export_text, c.download, c.snippet, c.loss_plot, c.msg_runs])

    def on_show_last(uncorrected):
        folder = studio.job_view()["run_dir"]
        opened = on_open(Path(folder).name, uncorrected) if folder else None
        if opened is None:
            raise ValueError("the last run is no longer there; see Past runs")
        return (*opened[:1], *opened[2:-1], gr.Button(visible=False), "")

    on(c.show_last.click, on_show_last, [c.show_uncorrected],
       [c.current, c.wizard, *preview_outputs, c.export_text, c.download, c.snippet, c.loss_plot, c.show_last,
        c.msg_model])

    def on_resume(name):
        folder = studio.resume_run(name)
        return folder, gr.Tabs(selected="wizard"), gr.Walkthrough(selected=STEP["train"]), say(f"Resuming {name}.")

    on(c.resume_btn.click, on_resume, [c.run_pick], [c.current, c.tabs, c.wizard, c.msg_runs])

    def on_extend(name, steps):
        folder = studio.extend_run(name, steps)
        return (folder, gr.Tabs(selected="wizard"), gr.Walkthrough(selected=STEP["train"]),
                say(f"Training {name} further, to {int(steps)} steps."))

    on(c.extend_btn.click, on_extend, [c.run_pick, c.extend_steps], [c.current, c.tabs, c.wizard, c.msg_runs])
