"""The page's setting controls, built from the settings dataclasses as the CLI is (pipelines/runner/cli.py).

One default, one label and one help text per setting, all next to the field: `RunSettings` (pipelines/runner/
settings.py) and the backend's `settings_class`, field metadata "label" (the page's name for it; the CLI uses
the flag) and "help". Which fields a step shows is listed here by field name; a backend field is shown when the
run's backend has it (never by family).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.runner import RunSettings
from pipelines.runner.command import field_flag
from pipelines.runner.registry import backend_class, backend_names, demo_suggestions

# The RunSettings fields each step shows (the Budget step draws rank and batch size as menus)
BUDGET_FIELDS = ("ratio", "rank", "batch_size", "ram_gb", "gpu_gb", "emulator_kind")
TRAIN_FIELDS = ("steps", "lr", "lam", "seed", "calibration_samples")
MORE_FIELDS = ("checkpoint_every",)
TEXT_FIELDS = ("sample_prompts",)  # lists typed one item per line, under "More settings"
# Backend fields under "More settings", shown when the run's backend has them
BACKEND_FIELDS = ("resolution", "preview_steps", "max_sequence_length", "max_new_tokens")
# Backend fields the Data step shows (held-out data, sizes, prior preservation), passed when the backend has them
DATA_FIELDS = ("holdout", "resolutions", "class_prompt", "class_images", "class_count", "prior_weight",
               "validation_images", "validation_data")
VALIDATION_FIELDS = ("validation_images", "validation_data")  # uploads, staged by app/validation.py
CLASS_UPLOADS = "class-images"  # beside the staged photos: the class images dropped on the Data step
WHERE = {**{n: "step 3" for n in BUDGET_FIELDS}, **{n: "step 4" for n in TRAIN_FIELDS},
         **{n: "step 4, More settings" for n in MORE_FIELDS + BACKEND_FIELDS + TEXT_FIELDS},
         **{n: "step 2" for n in DATA_FIELDS}}
SMALL_MODEL = 100e6  # parameters; below this a model trains on a CPU in seconds (the demo models)
# What suits a tiny model (seconds per run on a CPU); a demo's own demo.json suggestions win over these
QUICK = {"steps": 30, "lr": 1e-3, "calibration_samples": 8, "checkpoint_every": 10, "resolution": 32,
         "preview_steps": 4, "max_sequence_length": 16}


@dataclass
class FieldView:
    """One setting as the page shows it."""

    name: str
    label: str
    help: str
    default: Any
    whole: bool  # a whole number (int field)
    flag: str


def _field(cls: type, name: str) -> dataclasses.Field | None:
    return next((f for f in dataclasses.fields(cls) if f.name == name), None)


def field_view(cls: type, name: str) -> FieldView:
    """The label, help and default of `cls.name`; a subclass that redeclares a field without a label keeps its
    base class's (FLUX.2's settings override some FLUX.1 defaults)."""
    f = _field(cls, name)
    if f is None:
        raise KeyError(f"{cls.__name__} has no setting {name!r}")
    label, help_text = f.metadata.get("label"), f.metadata.get("help", "")
    for base in cls.__mro__[1:]:
        if label:
            break
        if dataclasses.is_dataclass(base) and _field(base, name) is not None:
            label = _field(base, name).metadata.get("label")
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    whole = typing.get_type_hints(cls).get(name) is int
    return FieldView(name, label or name.replace("_", " ").capitalize(), help_text, default, whole, field_flag(f))


def run_field(name: str) -> FieldView:
    return field_view(RunSettings, name)


def backend_fields(backend: str) -> list[str]:
    """The BACKEND_FIELDS the backend `backend` has."""
    names = {f.name for f in dataclasses.fields(backend_class(backend).settings_class)} if backend else set()
    return [n for n in BACKEND_FIELDS if n in names]


def any_backend_field(name: str) -> FieldView:
    """A backend field as the first registered backend having it declares it (for building the control)."""
    for backend in backend_names():
        cls = backend_class(backend).settings_class
        if _field(cls, name) is not None:
            return field_view(cls, name)
    raise KeyError(name)


def file_paths(files: Any) -> list[str]:
    """The file paths of a gradio File value (one file, a list of them, or nothing)."""
    items = files if isinstance(files, list) else [files] if files else []
    return [str(getattr(f, "name", f)) for f in items if f]


def defaults(backend: str, params: float, model: str = "") -> dict[str, Any]:
    """The starting value of every shown setting for `model`: the field's default, quick values for a tiny model,
    then a demo model's own suggestions (its demo.json, the same the CLI starts from)."""
    values = {n: run_field(n).default for n in TRAIN_FIELDS + MORE_FIELDS + ("rank", "batch_size", "ratio")}
    settings_class = backend_class(backend).settings_class
    values.update({n: field_view(settings_class, n).default for n in backend_fields(backend)})
    if params < SMALL_MODEL:
        values.update({k: v for k, v in QUICK.items() if k in values})
    values.update({k: v for k, v in demo_suggestions(model).items() if k in values})
    return values


def is_demo(model: str) -> bool:
    return bool(model) and (Path(model) / "demo.json").is_file()


def where(name: str) -> str:
    return WHERE.get(name, "")


def read_number(name: str, value: Any, view: FieldView | None = None) -> int | float:
    """A number box's value as the setting's type; ValueError naming the control (label and step) otherwise."""
    view = view or run_field(name)
    label = f"{view.label} ({where(name)})" if where(name) else view.label
    kind = "whole number" if view.whole else "number"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{label} is empty; type a {kind}") from None
    if number != number:
        raise ValueError(f"{label} is not a number; type a {kind}")
    if view.whole:
        if not math.isfinite(number) or number != int(number):
            raise ValueError(f"{label} must be a whole number; got {number:g}")
        return int(number)
    return number


def data_settings(backend: str, values: dict[str, Any], staging: Path | None = None) -> dict[str, Any]:
    """The Data step's backend settings (DATA_FIELDS the backend has, but the validation uploads: app/validation.py)
    from the page's values: numbers checked as numbers, a list of sizes read from "512, 768", dropped class images
    copied into `staging`/class-images (the setting names that folder; none without `staging`); ValueError naming
    the control otherwise."""
    import shutil

    cls = backend_class(backend).settings_class
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for name in DATA_FIELDS:
        value = values.get(name)
        if name not in names or value is None or name in VALIDATION_FIELDS:
            continue
        view = field_view(cls, name)
        if name == "class_images":  # the files of a multiple-file drop
            files = file_paths(value)
            if files and staging is not None:
                folder = Path(staging) / CLASS_UPLOADS
                folder.mkdir(parents=True, exist_ok=True)
                for path in files:
                    shutil.copyfile(path, folder / Path(path).name)
                out[name] = str(folder)
        elif isinstance(view.default, list):
            out[name] = read_number_list(value, view)
        elif isinstance(view.default, str):
            out[name] = str(value).strip()
        else:
            out[name] = read_number(name, value, view)
    return out


def read_number_list(value: Any, view: FieldView) -> list[int]:
    """Whole numbers typed as "512, 768" (commas or spaces); [] when empty."""
    words = str(value or "").replace(",", " ").split()
    try:
        return [int(word) for word in words]
    except ValueError:
        raise ValueError(f"{view.label} ({where(view.name)}) must be whole numbers separated by commas, e.g. "
                         f"512, 768; got {value!r}") from None
