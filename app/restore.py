"""A reload brings the page back where the person was.

The page's state (`PageState.saved`), the values typed into the form and the wizard's step are kept in the
browser's localStorage (`gr.BrowserState`, written by `save` a moment after they change) and put back by the
page's load (`restore`). What cannot come back is said in words at the step it concerns: uploads whose kept copies
are gone ("your photos need uploading again"), a run no longer in the runs folder.
"""

from __future__ import annotations

import math
import secrets
from pathlib import Path
from typing import Any

import gradio as gr

from . import form, handlers
from . import plan as plans
from .manager import Values, say
from .page import STEP, PageState

STORAGE_KEY = "emloc-studio-page"
KEY_FILE = ".page-key"  # in the runs folder: the browser's record stays readable after the app restarts
TABLES = ("data.captions", "data.qa_table")
# the form values a reload puts back (the uploads are in PageState)
FORM = ["model.task", "model.model", "data.prompt", "data.trigger", *TABLES, "budget.budget", "budget.ram",
        "budget.ratio", "budget.rank", "budget.batch_size", "budget.emulator_kind", "budget.touched",
        "budget.ram_touched", "budget.presets", "budget.for_card", "train.name",
        *[f"train.{n}" for n in form.TRAIN_FIELDS + form.MORE_FIELDS + form.BACKEND_FIELDS + form.TEXT_FIELDS],
        *[f"data.{n}" for n in form.DATA_FIELDS]]
FILES = ["data.class_images", *[f"data.{n}" for n in form.VALIDATION_FIELDS]]  # drops: their files' paths
NOUN = {"images": "photos", "qa": "images"}


def browser_state(runs_dir: Path) -> gr.BrowserState:
    """The page's record in localStorage, encrypted with a key kept in the runs folder (so an app restarted on
    the same runs folder still reads it; another app's record is unreadable and ignored)."""
    key_file = Path(runs_dir) / KEY_FILE
    try:
        secret = key_file.read_text().strip()
    except OSError:
        secret = ""
    if not secret:
        secret = secrets.token_urlsafe(24)
        try:
            key_file.parent.mkdir(parents=True, exist_ok=True)
            key_file.write_text(secret)
        except OSError:  # a read-only runs folder: the record lasts as long as this app
            pass
    return gr.BrowserState({}, storage_key=STORAGE_KEY, secret=secret)


def _plain(value: Any) -> Any:
    """A form value as JSON (tables as rows of strings; NaN as empty)."""
    if hasattr(value, "columns") or isinstance(value, dict):
        return handlers.table_rows(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):  # a numpy number
        return value.item()
    return value


def snapshot(v: Values) -> dict:
    """What the browser keeps of this page: {"state", "form", "step"}."""
    return {"state": v["page.state"].saved(), "form": {k: _plain(v.get(k)) for k in FORM if k in v},
            "step": int(v.get("page.step") or 0)}


def save(studio, v: Values) -> Values:
    """Keep the page in the browser when it changed (a timer calls this every few seconds)."""
    record = snapshot(v)
    return {} if record == (v.get("page.saved") or {}) else {"page.saved": record}


def kept_uploads(state: PageState) -> tuple[PageState, Values]:
    """Drop uploads whose kept copies are gone; say so in the Data step."""
    uploads, lost = {}, {}
    for kind, items in state.uploads.items():
        uploads[kind] = [item for item in items if Path(item.get("path", "")).is_file()]
        if len(uploads[kind]) < len(items):
            lost[kind] = len(items) - len(uploads[kind])
    state.uploads = uploads
    if not lost:
        return state, {}
    words = " and ".join(f"{n} of your {NOUN.get(k, 'files')}" + ("" if k == state.kind else " (the other task's)")
                         for k, n in lost.items())
    return state, {"data.msg": say(f"Your {NOUN.get(state.kind, 'photos')} need uploading again: {words} "
                                   f"{'was' if sum(lost.values()) == 1 else 'were'} kept in a temporary folder that "
                                   "is gone since the page was last open (the others are still here).", good=False)}


def kept_files(values: dict) -> tuple[dict, Values]:
    """The Data step's drops (class images, validation data) with the files that are gone left out; said so."""
    lost = []
    values = dict(values)
    for key in FILES:
        if key in values:
            given = form.file_paths(values[key])
            values[key] = [p for p in given if Path(p).is_file()] or None
            if len(values[key] or []) < len(given):
                lost.append(form.any_backend_field(key.split(".", 1)[1]).label)
    if not lost:
        return values, {}
    return values, {"data.msg": say(f"{' and '.join(lost)} (step 2) need dropping again: their files were kept in a "
                                    "temporary folder that is gone since the page was last open.", good=False)}


def restore(studio, saved: dict, device: str, uncorrected: bool = False) -> Values:
    """The page as the browser's record `saved` had it: task, model, uploads (while their copies exist), typed
    words, settings, the run (live when its job runs) and the step; {} when there is no record."""
    from .steps import budget, data, export, preview, runs, train

    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict):
        return {}
    values, lost_files = kept_files({k: v for k, v in (saved.get("form") or {}).items() if k in FORM})
    state, notes = kept_uploads(PageState.from_saved(saved["state"], device))
    if lost_files and "data.msg" not in notes:
        notes.update(lost_files)
    step = int(saved.get("step") or 0)
    if state.run_dir and not (Path(state.run_dir) / "run.json").is_file():
        notes["train.msg"] = say(f"The run this page showed, {Path(state.run_dir).name}, is no longer in the runs "
                                 "folder; start a new one or open another under Past runs.", good=False)
        state.run_dir, step = "", min(step, STEP["train"])
    model = values.get("model.model") or ""
    out: Values = {k: v for k, v in values.items() if k not in ("model.task", "model.model")}
    for table in TABLES:
        out[table] = values.get(table) or None
    out.update(data.task_view(state))
    if values.get("data.holdout") is not None:  # the task's label, and the restored count
        out["data.holdout"] = gr.Number(value=values["data.holdout"], label=data.HOLDOUT_LABEL.get(state.kind))
    out["model.task"] = state.kind
    out["model.model"] = gr.Dropdown(choices=handlers.model_choices(state.kind, studio.demo_models), value=model)
    try:
        info = handlers.describe_model(state.kind, model)
        out["model.about"] = info["text"]
        shown = set(form.backend_fields(info["backend"]))
        for n in form.BACKEND_FIELDS:
            out[f"train.{n}"] = gr.Number(value=values.get(f"train.{n}"), visible=n in shown)
    except (ValueError, OSError) as err:
        out["model.msg"] = say(err, good=False)
    state.restored_model = model  # its change event (the menu is set above) keeps these settings
    if state.run_dir:
        out.update(runs.follow(studio, state, state.run_dir, uncorrected))
        del out["page.tabs"]
        state = out["page.state"]
    else:
        out.update({**train.cleared(), **preview.cleared(), **export.cleared()})
    plan_inputs = {**{k: values.get(k) for k in budget.PLAN_INPUTS if k in values}, "page.state": state,
                   "model.model": model}
    plan_inputs.setdefault("budget.emulator_kind", "auto")  # a page saved before the Budget step had the kind
    plan_inputs.setdefault("budget.for_card", False)  # ... or planned for a card without a GPU here
    out["budget.presets"] = gr.Radio(choices=plans.preset_choices(device), value=values.get("budget.presets"))
    if plans.planning_device(device, bool(values.get("budget.for_card"))) != device:  # the card's budget shown
        out["budget.budget"] = gr.Number(value=values.get("budget.budget"), visible=True)
    if all(k in plan_inputs for k in budget.PLAN_INPUTS):
        out.update(budget.plan_view(plan_inputs))
    out.update(notes)
    out.update({"page.state": state, "page.step": step, "page.wizard": gr.Walkthrough(selected=step)})
    return out
