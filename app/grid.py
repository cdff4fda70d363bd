"""A strength grid as the Preview step shows it (issue 29 item 4): the corrected LoRA at each strength, one column
per strength, one row per prompt and seed (image previews) or per question (answer previews).

The folder is a later previews folder that `launch.py preview --scales` wrote (pipelines/runner/stages.py
preview_grid): the backend's usual preview files, with the strengths' labels in place of the variants', and
`grid.json` naming them in order. Files are only read here.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.runner.stages import GRID_FILE

from . import results


def grid_spec(folder: Path) -> dict | None:
    """{"scales", "labels"} of a strength grid folder; None for usual previews."""
    path = Path(folder) / GRID_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _prompts(run_dir: str | Path, folder: Path) -> list[str]:
    """The grid's prompts in full: typed ones (request.json), else the run's own preview prompts."""
    typed = results.preview_prompts(run_dir, folder)
    if typed:
        return typed
    backend = results.run_info(run_dir)["settings"]["backend"]
    return backend.get("preview_prompts") or [backend.get("prompt", "")]


def image_grid(run_dir: str | Path, folder: Path, labels: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """((image, caption) in reading order: each (prompt, seed) row through every strength, left to right; prompts)."""
    prompts = _prompts(run_dir, folder)
    found: dict[tuple[str, int], dict[str, Path]] = {}
    for path in sorted(Path(folder).glob("*__seed*.png")):
        parsed = results._parse_image(path.stem, tuple(labels))
        if parsed:
            found.setdefault((parsed[1], parsed[2]), {})[parsed[0]] = path

    def words(slug: str) -> str:
        full = [p for p in prompts if slug and (results._slug(p).startswith(slug) or slug.startswith(results._slug(p)))]
        return full[0] if full else slug.replace("-", " ")

    order = [results._slug(p) for p in prompts]

    def place(slug: str) -> int:  # rows in the order the prompts were typed
        return next((i for i, full in enumerate(order) if slug and (full.startswith(slug) or slug.startswith(full))),
                    len(order))

    rows = sorted(found, key=lambda r: (place(r[0]), r[0], r[1]))
    items = []
    for slug, seed in rows:
        for label in labels:
            if label in found[(slug, seed)]:
                items.append((str(found[(slug, seed)][label]), f"{label} · seed {seed} · {words(slug)}"))
    return items, [words(slug) for slug in dict.fromkeys(slug for slug, _ in rows)]


def answer_grid(folder: Path, labels: list[str]) -> tuple[list[str], list[list[str]], str]:
    """(headers, rows, scores text): one row per question, one column per strength."""
    data = json.loads((Path(folder) / "previews.json").read_text())
    headers = ["question", "image", "reference"] + labels
    rows = [[item.get("question", ""), results.shown_name(item["image"]) if item.get("image") else "",
             item.get("reference") or ""] + [item.get("answers", {}).get(label) or "(empty answer)" for label in labels]
            for item in data.get("items", [])]
    scores = data.get("scores", {})
    text = "; ".join(f"{label}: exact match {scores[label]['exact_match']:.2f}, token F1 {scores[label]['token_f1']:.2f}"
                     for label in labels if label in scores)
    return headers, rows, (f"Scores against the reference answers at each strength: {text}" if text else "")


def describe(run_dir: str | Path, folder: Path, spec: dict) -> str:
    """The line above a grid: which run, which folder, what the columns are."""
    strengths = ", ".join(f"{s:g}" for s in spec["scales"])
    return (f"Strength grid of **{Path(run_dir).name}** ({Path(folder).name}): the full model with the corrected LoRA "
            f"at strengths {strengths} (0 is the base model, 1 the LoRA as trained), one column each.")
