"""Reading a run folder for the page: its previews (steps 5), its adapter and a zip to download (step 6).

Files are only read here, except the zip, which is written once into `<run>/export/` and never replaces
a file that exists.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from pipelines.runner import PREVIEW_VARIANTS, RUN_FILE, STAGES
from pipelines.runner.machine import read_run_file

from .words import failure_words

SHOWN = PREVIEW_VARIANTS[:3]  # base | emulator + LoRA | full + corrected LoRA; the uncorrected one on request


def _slug(text: str) -> str:
    """Lower-case words joined by '-': how preview file names spell a variant and a prompt."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def run_info(run_dir: str | Path) -> dict:
    """run.json of a run folder; ValueError in words when it is damaged (the run cannot be opened)."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no {RUN_FILE}); pick a run under Past runs")
    return read_run_file(Path(run_dir))


def damage_words(err: Exception) -> str:
    """Why a run cannot be opened, short enough for a table cell."""
    return str(err).split(" is damaged ", 1)[-1].split("; this run", 1)[0].strip("()") or str(err)


def preview_folders(run_dir: str | Path) -> list[Path]:
    """Folders of previews of a run, newest last: previews/ (made by the run), then previews-<time>/."""
    run_dir = Path(run_dir)
    found = [run_dir / "previews"] if (run_dir / "previews").is_dir() else []
    return found + sorted(p for p in run_dir.glob("previews-*") if p.is_dir() and not p.name.endswith(".tmp"))


REQUEST_FILE = "request.json"  # written by the app beside previews it asked for: the prompts in full


def preview_prompts(run_dir: str | Path, folder: Path) -> list[str]:
    """The prompts of an image preview folder in full (file names keep only the first 40 characters)."""
    if (folder / REQUEST_FILE).is_file():
        return json.loads((folder / REQUEST_FILE).read_text()).get("prompts", [])
    if folder.name == "previews":
        backend = run_info(run_dir)["settings"]["backend"]
        return backend.get("preview_prompts") or [backend.get("prompt", "")]
    return []


def _parse_image(stem: str, labels: tuple[str, ...]) -> tuple[str, str, int] | None:
    """(variant label, prompt slug, seed) of a preview image's file stem, or None when it is none of `labels`'.

    Families write `<variant>__<prompt>__seed<N>` or `<variant>-<prompt>__seed<N>` (the prompt shortened); both
    start with the variant's slug and end with the seed, which is all that is read here."""
    body, sep, seed = stem.rpartition("__seed")
    if not sep or not seed.isdigit():
        return None
    for label in sorted(labels, key=lambda lb: -len(_slug(lb))):  # "full-uncorrected-lora" before "full-..."
        head = _slug(label)
        if body == head or body.startswith(head + "-") or body.startswith(head + "_"):
            return label, body[len(head):].strip("-_"), int(seed)
    return None


def image_previews(folder: Path, uncorrected: bool = False, known: list[str] | None = None
                   ) -> tuple[list[tuple[str, str]], list[str]]:
    """((image path, caption) in reading order, prompts): one row per (prompt, seed), one column per variant.

    `known`: the prompts in full, matched to the shortened ones in the file names."""
    labels = PREVIEW_VARIANTS if uncorrected else SHOWN
    found: dict[tuple[str, int], dict[str, Path]] = {}
    for path in sorted(folder.glob("*__seed*.png")):
        parsed = _parse_image(path.stem, PREVIEW_VARIANTS)
        if parsed and parsed[0] in labels:
            found.setdefault((parsed[1], parsed[2]), {})[parsed[0]] = path

    def words(slug: str) -> str:
        full = [p for p in known or [] if slug and (_slug(p).startswith(slug) or slug.startswith(_slug(p)))]
        return full[0] if full else slug.replace("-", " ")

    requests = sorted(found, key=lambda r: (r[0], r[1]))
    prompts = sorted({words(slug) for slug, _ in requests})
    items = []
    for slug, seed in requests:
        which = f"{words(slug)} · " if len(prompts) > 1 else ""
        items += [(str(found[(slug, seed)][label]), f"{label} · {which}seed {seed}") for label in labels
                  if label in found[(slug, seed)]]
    return items, prompts


SEEN = {"trained on": "yes", "held out": "no (held out)"}


def training_images(run_dir: str | Path) -> set[str]:
    """Names of the images the run trained on (its data/qa.jsonl less the held-out samples at its end)."""
    run_dir = Path(run_dir)
    path = run_dir / "data" / "qa.jsonl"
    if not path.is_file():
        return set()
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    holdout = int(run_info(run_dir)["settings"]["backend"].get("holdout", 0) or 0)
    names = set()
    for record in records[:len(records) - holdout] if holdout else records:
        image = record.get("image") or []
        names.update(Path(i).name for i in (image if isinstance(image, list) else [image]))
    return names


def seen_in_training(item: dict, trained: set[str], run_dir: Path | None) -> str:
    """'yes', 'no (held out)' or 'no (a new image)' for a preview question's image; '' without an image."""
    if not item.get("image"):
        return ""
    if item.get("source") in SEEN:
        return SEEN[item["source"]]
    path = Path(item["image"])
    inside = run_dir is not None and path.parent == Path(run_dir) / "data" / "images"
    return "yes" if inside and path.name in trained else "no (a new image)"


def answer_previews(folder: Path, uncorrected: bool = False, run_dir: str | Path | None = None
                 ) -> tuple[list[str], list[list[str]], str]:
    """(headers, rows, scores text) of the answer table in previews.json, with whether each image was trained on."""
    path = folder / "previews.json"
    if not path.is_file():
        return [], [], ""
    data = json.loads(path.read_text())
    labels = list(PREVIEW_VARIANTS if uncorrected else SHOWN)
    headers = ["question", "image", "image seen in training", "reference"] + labels
    trained = training_images(run_dir) if run_dir else set()
    rows, seen = [], []
    for item in data.get("items", []):
        answers = item.get("answers", {})
        seen.append(seen_in_training(item, trained, Path(run_dir) if run_dir else None))
        rows.append([item.get("question", ""), shown_name(item["image"]) if item.get("image") else "", seen[-1],
                     item.get("reference") or ""] + [answers.get(label) or "(empty answer)" for label in labels])
    scores = data.get("scores", {})
    text = "; ".join(f"{label}: exact match {scores[label]['exact_match']:.2f}, token F1 {scores[label]['token_f1']:.2f}"
                     for label in labels if label in scores)
    if not text:
        return headers, rows, ""
    scored = [s for s, item in zip(seen, data.get("items", [])) if item.get("reference") is not None]
    if scored and all(s == "yes" for s in scored):
        which = "all on images seen in training: they show what the LoRA learned, not how it does on new photos"
    elif scored and all(s.startswith("no") for s in scored):
        which = "all on images held out of training"
    else:
        which = f"{sum(s == 'yes' for s in scored)} on images seen in training, the others held out"
    n = next(iter(scores.values()))["n"]
    return headers, rows, f"Scores against the reference answers ({n} questions, {which}): " + text


def shown_name(path: str) -> str:
    """An image's name as the user uploaded it (the run's copy is prefixed with its index: 00003-red.png)."""
    return re.sub(r"^(\d{5}-)+", "", Path(path).name)


# What each export format folder under lora/ is for (the backends name the folders by format, not by family)
FORMAT_WORDS = {
    "diffusers": "**For diffusers** (`load_lora_weights` of the model's pipeline, keys "
                 "`transformer.<module>.lora_A/B.weight`; the snippet below loads it)",
    "diffusers-uncorrected": "**For diffusers, uncorrected** (the LoRA as trained on the emulator)",
    "kohya": "**For ComfyUI, Forge or kohya_ss**: the kohya-format file (keys `lora_unet_...` with "
             "`lora_down`/`lora_up`/`alpha`); put it in ComfyUI's `models/loras/` folder",
}


def export_info(run_dir: str | Path) -> dict:
    """Where the corrected adapter is and its formats: {"text", "folder"} (the backend writes the snippet)."""
    run_dir = Path(run_dir).resolve()
    run_info(run_dir)  # a run folder, or a FileNotFoundError in words
    lora = run_dir / "lora"
    if not (lora / "corrected").is_dir():
        raise FileNotFoundError(f"{run_dir.name} has no corrected adapter yet; finish training (step 4) first")
    lines = [f"**Corrected adapter, PEFT format** (adapter\\_config.json + adapter\\_model.safetensors; loads with "
             f"`PeftModel.from_pretrained`): `{lora / 'corrected'}`",
             f"**Uncorrected adapter** (the LoRA as trained on the emulator, for comparison): `{lora / 'uncorrected'}`"]
    folders = ["corrected/", "uncorrected/"]
    for extra in sorted(p for p in lora.iterdir() if p.is_dir() and p.name not in ("corrected", "uncorrected")):
        files = sorted(f for f in extra.glob("*.safetensors"))
        words = FORMAT_WORDS.get(extra.name, f"**{extra.name}/**")
        lines.insert(1 + (len(folders) - 2), f"{words}: " + ", ".join(f"`{f}`" for f in files or [extra]))
        folders.append(f"{extra.name}/")
    lines.append(f"The zip below holds all of them, in the folders {', '.join(folders)}.")
    return {"text": "\n\n".join(lines), "folder": str(lora)}


def export_zip(run_dir: str | Path) -> str:
    """A zip of the run's adapters (`<run>/export/<name>-lora.zip`), made once; returns its path."""
    run_dir = Path(run_dir)
    lora = run_dir / "lora"
    if not (lora / "corrected").is_dir():
        raise FileNotFoundError(f"{run_dir.name} has no corrected adapter yet; finish training (step 4) first")
    target = run_dir / "export" / f"{run_dir.name}-lora.zip"
    if not target.exists():
        target.parent.mkdir(exist_ok=True)
        staging = target.with_name(target.stem + ".partial")
        archive = shutil.make_archive(str(staging), "zip", root_dir=lora)
        Path(archive).rename(target)
    return str(target)


def samples_view(run_dir: str | Path | None) -> dict:
    """The Train step's samples, newest round first: {"images": [(png, "step N")], "answers": markdown}.

    FLUX rounds are images (the grid left out); InternVL rounds are answers, one row per question and round."""
    from pipelines.runner.stages import samples

    images: list[tuple[str, str]] = []
    rows: list[str] = []
    for folder in samples(Path(run_dir)) if run_dir else []:
        step = int(folder.name.split("-")[1])
        images += [(str(png), f"step {step}") for png in sorted(folder.glob("*.png")) if png.name != "grid.png"]
        answers = folder / "previews.json"
        if answers.is_file():
            for item in json.loads(answers.read_text()).get("items", []):
                question = str(item.get("question", "")).replace("|", "\\|").replace("\n", " ")
                answer = str(item.get("answers", {}).get("emulator + LoRA", "")).replace("|", "\\|")
                image = Path(str(item.get("image") or "")).name or "–"
                rows.append(f"| {step} | {image} | {question} | {answer or '–'} |")
    table = ("| step | image | question | answer of the emulator + LoRA |\n|---:|---|---|---|\n" + "\n".join(rows)
             if rows else "")
    return {"images": images, "answers": table}


def memory_report(info: dict) -> list[dict]:
    """Planned against held memory per stage of a run (run.json `info`): {"phase", "name", "planned_device_gib",
    "held_device_allocated_gib", "held_device_reserved_gib", "planned_host_gib", "held_host_gib"}, None where not
    known. The run machine's own `pipelines.runner.devices.memory_report` is used where this version has it."""
    try:
        from pipelines.runner.devices import memory_report as runner_report
    except ImportError:
        runner_report = None
    if runner_report is not None:
        return runner_report(info)
    phases = ((info.get("plan") or {}).get("phases")) or {}
    stage_phase = {"calibrate": "calibration", "emulate": "emulator", "train": "training", "correct": "correction",
                   "preview": "preview"}
    rows = []
    for stage, entry in (info.get("stages") or {}).items():
        held = (entry.get("held") if isinstance(entry, dict) else None) or {}
        planned = phases.get(stage_phase.get(stage, stage)) or {}
        if not held and not planned:
            continue
        rows.append({"phase": stage, "name": planned.get("name", stage), "planned_device_gib": planned.get("device_gib"),
                     "held_device_allocated_gib": held.get("device_allocated_gib"),
                     "held_device_reserved_gib": held.get("device_reserved_gib"),
                     "planned_host_gib": planned.get("host_gib"), "held_host_gib": held.get("host_rss_gib")})
    return rows


def memory_table(info: dict) -> str:
    """The run's memory, planned beside held, as a markdown table ("" when the run has no plan)."""
    rows = memory_report(info)
    if not rows:
        return ""

    def gib(value) -> str:
        return "–" if value is None else f"{value:.2f}"

    lines = ["| phase | planned device | held device (allocated / reserved) | planned RAM | held RAM |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        held = ("–" if r["held_device_allocated_gib"] is None else
                f"{gib(r['held_device_allocated_gib'])} / {gib(r['held_device_reserved_gib'])}")
        lines.append(f"| {r['name']} | {gib(r['planned_device_gib'])} | {held} | {gib(r['planned_host_gib'])} | "
                     f"{gib(r['held_host_gib'])} |")
    return "**Memory, GiB** (planned before the run; held: measured while it ran)\n\n" + "\n".join(lines)


def when(iso: str) -> str:
    """'2026-12-04T21:50:03+00:00' -> '4 Dec 2026, 21:50' in this machine's local time ('' for nothing)."""
    import datetime as dt

    try:
        moment = dt.datetime.fromisoformat(str(iso))
    except ValueError:
        return str(iso or "")
    if moment.tzinfo is not None:
        moment = moment.astimezone()
    return f"{moment.day} {moment:%b %Y, %H:%M}"


FAILURE_CHARS = 400  # a failure's message in the Past runs table, cut here


def stage_words(stage: str, entry: Any, model: str = "") -> str:
    """The state of a run's first unfinished stage for Past runs: 'failed at calibrate: <why>', 'cancelled at ...'."""
    status = entry.get("status", "pending") if isinstance(entry, dict) else "pending"
    if status == "failed":
        why = failure_words(entry.get("error", ""), model)
        return f"failed at {stage}: {why[:FAILURE_CHARS]}{'…' if len(why) > FAILURE_CHARS else ''}"
    return f"{status} at {stage}"


def run_state(info: dict) -> str:
    """'finished', or the first unfinished stage's state ('cancelled at train', 'failed at calibrate: ...')."""
    stages = info["stages"]
    pending = [s for s in STAGES if not isinstance(stages.get(s), dict) or stages[s].get("status") != "done"]
    if not pending:
        return "finished"
    if isinstance(stages.get(pending[0]), dict) and stages[pending[0]].get("status") == "running":
        # said only of a run whose job is not running now: its process ended without saying so (killed, or the
        # machine stopped); everything up to its last checkpoint is kept
        return f"stopped at {pending[0]} (its job is no longer running); press Resume to continue it"
    return stage_words(pending[0], stages.get(pending[0]), info["settings"]["run"].get("model", ""))
