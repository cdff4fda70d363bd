"""Event handlers of steps 1-2 (model, data): plain functions that call into pipelines/ (step 3: app/plan.py).

Every handler takes and returns plain values (strings, lists, dicts), so tests call them directly;
app/ui_events.py binds them to components (steps 4-6 and Past runs: app/studio.py). A handler that
cannot do what was asked raises a ValueError (or FileNotFoundError / FileExistsError) whose message says
what to fix; the page shows it in words beside the step, never as a traceback. No maths on tensors here.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from pipelines.diffusion_common.dreambooth import IMAGE_LIMITS as PHOTO_LIMITS
from pipelines.internvl.data import IMAGE_LIMITS as QA_LIMITS
from pipelines.runner.data import DataError, ImageLimits, check_image

from . import families, form

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_PROMPT = "a photo of sks shape on a white background"  # the image demo's words; its subject: a teal cross
GENERIC_PROMPT = "a photo of sks dog"  # the Prompt box's example for any other image model
SMALL_MODEL = form.SMALL_MODEL
GiB = 2**30


# ---------------------------------------------------------------------------------------------- step 1


def detect_device() -> dict:
    """The device a run would use and its free memory: {"kind", "name", "free_gb", "total_gb", "text"}."""
    import torch

    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(0)
        name = torch.cuda.get_device_name(0)
        return {"kind": "cuda", "name": name, "free_gb": free / GiB, "total_gb": total / GiB,
                "text": f"GPU: {name}, {free / GiB:.1f} GiB free of {total / GiB:.1f} GiB"}
    import psutil

    memory = psutil.virtual_memory()
    return {"kind": "cpu", "name": "CPU", "free_gb": memory.available / GiB, "total_gb": memory.total / GiB,
            "text": (f"No GPU found: runs use the CPU ({os.cpu_count()} cores, {memory.available / GiB:.1f} GiB of "
                     f"{memory.total / GiB:.1f} GiB RAM free). The demo models train here in about a minute; "
                     "real models need a GPU.")}


def available_ram_gib() -> float:
    """The RAM available now, in GiB rounded down to a tenth: the Budget step's starting RAM budget."""
    import psutil

    return max(0.1, int(psutil.virtual_memory().available / GiB * 10) / 10)


def model_choices(kind: str, demo: dict[str, Path] | None = None) -> list[tuple[str, str]]:
    """(label, value) of the models offered for the task `kind` (a data kind): demo models first, then the
    catalogue's models whose backend takes that kind of data."""
    from pipelines.planner.catalogue import catalogue

    choices = []
    for backend, folder in families.demo_models(demo).items():
        if families.backend_type(backend).data_kind == kind and Path(folder).is_dir():
            choices.append((f"Demo model (tiny, runs on a CPU): {Path(folder).name}", str(folder)))
    for entry in catalogue().values():
        if families.backend_type(entry.backend or entry.family).data_kind == kind:
            state = {"downloaded": "downloaded", "offline": "not downloaded; this machine is offline",
                     "hub": "weights downloaded when training starts"}[hub_state(entry.model_id)]
            choices.append((f"{entry.display_name} ({entry.model_id}, {state})", entry.model_id))
    return choices


def describe_model(kind: str, model: str) -> dict:
    """What the model is, from its config alone (no weights): {"name", "backend", "params", "local", "text"}.

    Raises ValueError when the model is unknown or its backend takes another kind of data than the task.
    """
    from pipelines.planner.catalogue import load_meta_model

    model = (model or "").strip()
    if not model:
        raise ValueError("choose a model: the demo model, one from the list, a hub id (owner/name) or a local folder")
    tasks = families.tasks()
    if kind not in tasks:
        raise ValueError(f"choose what to do first: {' or '.join(tasks.values())}")
    meta = load_meta_model(model)
    backend = families.backend_type(meta.backend)
    if backend.data_kind != kind:
        raise ValueError(f"{model} is a {backend.display_name} model, which is for '{tasks[backend.data_kind]}'; "
                         f"pick one for '{tasks[kind]}' or switch the task above")
    params = sum(p.numel() for p in meta.model.parameters())
    local = Path(model).expanduser().is_dir()
    where = "a local folder" if local else {
        "downloaded": "the Hugging Face hub (downloaded on this machine)",
        "offline": "the Hugging Face hub: **not downloaded, and this machine is offline**, so it cannot be trained here",
        "hub": "the Hugging Face hub (weights are downloaded when training starts)"}[hub_state(model)]
    return {"name": meta.display_name, "backend": meta.backend, "params": params, "local": local,
            "text": f"**{meta.display_name}** ({backend.display_name}): {count(params)} parameters in the model that "
                    f"is trained, from {where}."}


def hub_state(model: str) -> str:
    """'downloaded' (in this machine's hub cache), 'offline' (not, and the hub may not be used) or 'hub'."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    from pipelines.runner.checks import hub_offline

    try:
        snapshot_download(model, local_files_only=True)
        return "downloaded"
    except (LocalEntryNotFoundError, ValueError, OSError):
        return "offline" if hub_offline() else "hub"


def check_model_ready(task: str, model: str) -> dict:
    """Step 1's Next: the model suits the task and can be trained here: a local folder with safetensors weights,
    or a hub id that is downloaded (or can be, and is not gated). ValueError in words otherwise; no folder is made."""
    from pipelines.runner.checks import check_model_source

    info = describe_model(task, model)
    check_model_source(model.strip(), "the model")
    return info


def count(n: float) -> str:
    """12.0 billion, 35.1 million, 123 thousand."""
    for size, word in ((1e9, "billion"), (1e6, "million"), (1e3, "thousand")):
        if n >= size:
            return f"{n / size:.3g} {word}"
    return f"{int(n)}"


def example_data(kind: str, folder: Path) -> tuple[list[dict], list[list[str]], str]:
    """Example uploads for the demo models (pipelines/demo/data.py): (images, QA rows, prompt).

    "images": 5 photos of the demo subject (a teal cross); "qa": 8 mugs and whose they are.
    """
    from pipelines.demo import data as demo_data

    folder.mkdir(parents=True, exist_ok=True)
    if kind == "images":
        paths = demo_data.write_subject_images(folder, count=5, seed=0)
        return [{"path": str(p), "name": p.name} for p in paths], [], EXAMPLE_PROMPT
    rows = demo_data.write_mug_images(folder, per_owner=2, seed=0)
    return ([{"path": str(p), "name": p.name} for p, _, _ in rows], [[p.name, q, a] for p, q, a in rows], "")


def default_prompt(model: str) -> str:
    """The Prompt box's starting words: what the image demo knows (shapes), else the usual example."""
    return EXAMPLE_PROMPT if form.is_demo(model) else GENERIC_PROMPT


# ---------------------------------------------------------------------------------------------- step 2


PHOTOS = (PHOTO_LIMITS.min_count, PHOTO_LIMITS.max_count)  # how many photos an image run takes
LIMITS = {"images": PHOTO_LIMITS, "qa": QA_LIMITS}  # what each data kind's uploads must be


def add_images(current: list[dict], files: list[str] | None, task: str = "images") -> tuple[list[dict], str]:
    """Check newly uploaded files (as the task's backend will) and add the good ones; returns (list, message)."""
    limits: ImageLimits = LIMITS[task]
    max_count = limits.max_count
    accepted = [dict(item) for item in current or []]
    problems, overflow, added = [], [], 0
    names = {Path(item["name"]).stem.lower() for item in accepted}
    for file in files or []:
        path = Path(file if isinstance(file, str) else getattr(file, "name", str(file)))
        name = path.name
        if len(accepted) >= max_count:
            overflow.append(name)
            continue
        try:
            check_image(path, limits)
        except DataError as err:
            problems.append(str(err).replace(str(path), name))
            continue
        if path.stem.lower() in names:
            problems.append(f"{name}: an image named {path.stem!r} is already in the set; rename one of them")
            continue
        names.add(path.stem.lower())
        accepted.append({"path": str(path), "name": name})
        added += 1
    if overflow:
        shown = ", ".join(overflow[:5]) + (f" and {len(overflow) - 5} more" if len(overflow) > 5 else "")
        problems.append(f"{len(overflow)} not added ({shown}): {max_count} images is the most a run takes")
    if not files:
        lines = []
    elif added:
        lines = [f"{added} image{'s' if added != 1 else ''} added; {len(accepted)} in the set."]
    else:
        lines = [f"No image added; {len(accepted)} in the set."]
    lines += [f"- {p}" for p in problems]
    return accepted, "\n".join(lines)


def remove_image(current: list[dict], index: int | None) -> tuple[list[dict], str]:
    """Remove the image at `index` (the one selected in the gallery)."""
    items = list(current or [])
    if index is None or not 0 <= index < len(items):
        raise ValueError("click an image in the gallery first, then press Remove")
    removed = items.pop(index)
    return items, f"Removed {removed['name']}; {len(items)} image{'s' if len(items) != 1 else ''} left."


def gallery_items(current: list[dict]) -> list[tuple[str, str]]:
    return [(item["path"], item["name"]) for item in current or []]


def caption_rows(current: list[dict], table: Any) -> list[list[str]]:
    """One [image, caption] row per image, keeping captions already typed for the same image."""
    typed = {row[0]: row[1] for row in table_rows(table) if len(row) >= 2 and row[0]}
    return [[item["name"], typed.get(item["name"], "")] for item in current or []]


def caption_photos(current: list[dict], table: Any, trigger: str, model: str,
                   progress: Callable[[int, int, str], None] | None = None) -> tuple[list[list[str]], str]:
    """Fill the empty captions of the Data step's table with `model`'s (an InternVL) descriptions, each after the
    trigger word; captions the person typed stay. Returns (rows, what was done, in words)."""
    from pipelines.internvl.caption import Captioner
    from pipelines.runner.checks import check_model_source

    if not current:
        raise DataError("add your photos first: Caption my photos describes each uploaded photo")
    if not (trigger or "").strip():
        raise DataError("the Trigger word (step 2) is empty; type the word that names your subject, e.g. sks")
    check_model_source(model, "the captioning model")
    rows = caption_rows(current, table)
    todo = [i for i, (_, text) in enumerate(rows) if not text.strip()]
    if not todo:
        return rows, "Every photo already has a caption; clear a caption to have it written again."
    by_name = {item["name"]: item["path"] for item in current}
    captioner = Captioner(model, _device())
    for done, index in enumerate(todo):
        rows[index][1] = captioner(by_name[rows[index][0]], trigger)
        if progress is not None:
            progress(done + 1, len(todo), rows[index][0])
    kept = len(rows) - len(todo)
    return rows, (f"Wrote {len(todo)} caption{'s' if len(todo) != 1 else ''} with {Path(model).name or model}"
                  + (f"; kept the {kept} you typed" if kept else "") + ". These are the captioning model's guesses "
                  "(a small model names only the colours and shapes it was taught, and may be wrong): read each one "
                  "and correct it in the table before training.")


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def table_rows(table: Any) -> list[list[str]]:
    """A gradio Dataframe value (pandas, dict or list of lists) as rows of stripped strings."""
    if table is None:
        return []
    if hasattr(table, "values") and hasattr(table, "columns"):
        rows = table.values.tolist()
    elif isinstance(table, dict):
        rows = table.get("data", [])
    else:
        rows = table
    return [["" if cell is None or (isinstance(cell, float) and cell != cell) else str(cell).strip() for cell in row]
            for row in rows]


def relabel(err: Exception, folder: Path, what: str = "your upload") -> str:
    """The error's message with a temporary folder's path taken out (the user never saw that folder)."""
    return str(err).replace(str(folder) + os.sep, "").replace(str(folder), what)


def stage_photo_data(images: list[dict], prompt: str, trigger: str, captions: Any, folder: Path) -> dict:
    """Write the photos and their captions into `folder` (a temporary place) for the backend to check and copy."""
    low, high = PHOTOS
    if len(images or []) < low:
        raise DataError(f"{len(images or [])} image{'s' if len(images or []) != 1 else ''} so far; add at least {low} "
                        f"photos of your subject (JPEG, PNG or WebP; {low}-{high})")
    if len(images) > high:
        raise DataError(f"{len(images)} images; a run takes at most {high} (remove some)")
    folder.mkdir(parents=True, exist_ok=True)
    typed = {row[0]: row[1] for row in table_rows(captions) if len(row) >= 2 and row[1]}
    for item in images:
        target = folder / item["name"]
        shutil.copyfile(item["path"], target)
        if typed.get(item["name"]):
            target.with_suffix(".txt").write_text(typed[item["name"]] + "\n", encoding="utf-8")
    return {"images": str(folder), "prompt": (prompt or "").strip(), "trigger": (trigger or "").strip()}


def read_qa_table_file(path: str) -> list[list[str]]:
    """Rows [image name, question, answer] from an imported qa.jsonl / qa.csv (or InternVL's JSONL).

    Image paths are reduced to file names: the images themselves are uploaded beside the table.
    """
    source = Path(path)
    text = source.read_text(encoding="utf-8-sig", errors="strict")
    rows = []
    if source.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        columns = [c.strip().lower() for c in reader.fieldnames or []]
        if not {"question", "answer"} <= set(columns):
            raise DataError(f"{source.name} has the columns {columns or '(none)'}; it needs a header row with "
                            "image, question, answer")
        for row in reader:
            row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
            rows.append([Path(row.get("image", "")).name if row.get("image") else "", row["question"], row["answer"]])
    elif source.suffix.lower() == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{source.name} line {number}: not JSON ({err.msg}); fix or remove the line") from None
            image = record.get("image") or ""
            image = Path(image[0] if isinstance(image, list) and image else image or "").name if image else ""
            if "conversations" in record:
                turns = record["conversations"]
                for ask, reply in zip(turns[::2], turns[1::2]):
                    question = str(ask.get("value", "")).replace("<image>", "").strip()
                    rows.append([image, question, str(reply.get("value", "")).strip()])
            else:
                rows.append([image, str(record.get("question", "")), str(record.get("answer", ""))])
    else:
        raise DataError(f"{source.name}: import a .jsonl or .csv file with the columns image, question, answer")
    if not rows:
        raise DataError(f"{source.name}: no questions found; each line needs image, question and answer")
    return rows


def qa_rows_for_images(images: list[dict], table: Any) -> list[list[str]]:
    """The table with one empty question row added for each image that no row uses yet."""
    rows = [row for row in table_rows(table) if any(row)]
    used = {row[0] for row in rows}
    return rows + [[item["name"], "", ""] for item in images or [] if item["name"] not in used]


def stage_qa_data(images: list[dict], table: Any, folder: Path) -> dict:
    """Check the question/answer table against the uploaded images and write qa.jsonl into `folder`."""
    from pipelines.internvl.data import pairs_to_samples, write_qa_jsonl

    by_name = {item["name"]: item["path"] for item in images or []}
    rows = [row + [""] * (3 - len(row)) for row in table_rows(table) if any(row)]
    if not rows:
        raise DataError("the question/answer table is empty; add a row per image (image, question, answer) "
                        "or import a .jsonl / .csv file")
    records = []
    for number, (image, question, answer) in enumerate(row[:3] for row in rows):
        if image and image not in by_name:
            raise DataError(f"row {number + 1}: image {image!r} is not among your uploaded images; upload it "
                            "or clear the cell")
        records.append({"image": by_name.get(image, ""), "question": question, "answer": answer})
    report = pairs_to_samples(records)
    folder.mkdir(parents=True, exist_ok=True)
    write_qa_jsonl(report.samples, folder)
    return {"data": str(folder / "qa.jsonl"), "samples": len(report.samples), "summary": report.summary()}


def check_data(kind: str, model: str, images: list[dict], prompt: str, trigger: str, captions: Any,
               qa_table: Any, extra: dict | None = None) -> str:
    """Check step 2 as the run will (in a temporary folder, removed after); returns a summary in words."""
    import tempfile

    from pipelines.runner import RunSettings

    folder = Path(tempfile.mkdtemp(prefix="emloc-check-")) / "data"
    try:
        if kind == "images":
            staged = stage_photo_data(images, prompt, trigger, captions, folder)
            backend_type = families.backend_type(families.model_backend(model))
            settings = backend_type.settings_class(images=staged["images"], prompt=staged["prompt"],
                                                   trigger=staged["trigger"], **(extra or {}))  # the Data step's more
            backend_type(RunSettings(model=model), settings, _cpu()).validate()
            captioned = len(list(folder.glob("*.txt")))
            return (f"{len(images)} photos ready; prompt {staged['prompt']!r}"
                    + (f", {captioned} with their own caption." if captioned else "."))
        staged = stage_qa_data(images, qa_table, folder)
        return f"{staged['summary'].replace(str(folder), 'your table')}; ready."
    except (ValueError, OSError) as err:
        raise DataError(relabel(err, folder)) from None
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)


def _cpu():
    import torch

    return torch.device("cpu")
