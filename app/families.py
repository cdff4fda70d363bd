"""What the app knows of the model families: only what each registered backend class declares.

The app never tests a family's name. A task of the wizard is a *data kind* (`Backend.data_kind`: "images" =
photos + a prompt, "qa" = images + question/answer pairs); a model's backend comes from its config (the planner's
catalogue detection) and says how its data is asked for (`data_kind`), how its previews are shown
(`preview_kind`) and what it is called (`display_name`).
"""

from __future__ import annotations

from pathlib import Path

from pipelines.runner.registry import DEMO_MODELS, backend_class, backend_names

# The task radio of step 1: what a person wants to do, by the kind of data it takes
TASK_WORDS = {"images": "Personalise an image model", "qa": "Teach a vision-language model"}
IMAGE_PREVIEW, ANSWER_PREVIEW = "images", "answers"  # Backend.preview_kind values


def backend_type(name: str) -> type:
    """The registered backend class `name` (run.json's "backend")."""
    return backend_class(name)


def backends_of(kind: str) -> list[str]:
    """Registered backends whose data step is `kind`, in registration order."""
    return [name for name in backend_names() if backend_class(name).data_kind == kind]


def task_label(kind: str) -> str:
    """'Personalise an image model (FLUX.1, FLUX.2)': the task in words with the families that do it."""
    names = ", ".join(dict.fromkeys(backend_class(b).display_name for b in backends_of(kind)))
    return f"{TASK_WORDS[kind]} ({names})"


def tasks() -> dict[str, str]:
    """data kind -> the task in words, for every kind some registered backend takes."""
    kinds = dict.fromkeys(backend_class(name).data_kind for name in backend_names())
    return {kind: task_label(kind) for kind in kinds if kind in TASK_WORDS}


def demo_models(demo: dict[str, Path] | None = None) -> dict[str, Path]:
    """backend name -> its demo model folder (the registry's, or the ones a test gives)."""
    return dict(demo or DEMO_MODELS)


def model_backend(model: str) -> str:
    """The backend that trains `model` (from its config, nothing downloaded); ValueError when it is unknown."""
    from pipelines.planner.catalogue import load_meta_model

    return load_meta_model((model or "").strip()).backend


def kind_of_run(info: dict) -> str:
    """The data kind of a run (its run.json)."""
    return backend_class(info["backend"]).data_kind


def preview_kind(backend: str) -> str:
    return backend_class(backend).preview_kind if backend else ""


def display_name(backend: str) -> str:
    try:
        return backend_class(backend).display_name
    except ValueError:
        return "?"
