"""The backend registry: backend name -> "module:Class", so the run machine never imports a backend by name.

A new model family is one more folder in pipelines/ with a `pipelines.runner.Backend` subclass (backend.py) and
what the planner needs to know about it (planning.py: a `pipelines.runner.planning.Planning`), and one line for
each in BACKENDS and PLANNING here; nothing else in the run machine or the planner changes.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]  # the repository: assets/ lives there

BACKENDS: dict[str, str] = {
    "flux": "pipelines.flux.backend:FluxBackend",  # FLUX.1 [dev] / [schnell] via diffusers: DreamBooth LoRA
    "vlm": "pipelines.internvl.backend:VlmBackend",  # InternVL via transformers: image + question/answer LoRA
    "flux2": "pipelines.flux2.backend:Flux2Backend",  # FLUX.2 [dev] / [klein] via diffusers: DreamBooth LoRA
}

# What the planner knows of each family (pipelines.runner.planning.Planning), under its backend's name. The
# planner asks them in this order and the first that reads a model's files (or claims a bundle) wins.
PLANNING: dict[str, str] = {
    "flux": "pipelines.flux.planning:PLANNING",
    "vlm": "pipelines.internvl.planning:PLANNING",
    "flux2": "pipelines.flux2.planning:PLANNING",
}


# The planner the run machine asks, before a run folder exists, what each phase needs and what to stream
# (named here like the backends, so the run machine never imports the planner, which imports the backends).
PLANNER = "pipelines.planner.runs:plan_for_run"


def planner():
    """The planner's `plan_for_run(run settings, backend) -> dict | None` (imported on first use)."""
    module_name, _, name = PLANNER.partition(":")
    return getattr(importlib.import_module(module_name), name)


# The small demo model of each family, shipped in assets/ (built by `python -m pipelines.demo build`): what a
# run uses when no --model is given, so a first run works on any CPU with nothing to download.
DEMO_MODELS: dict[str, Path] = {
    "flux": ROOT / "assets" / "models" / "demo-flux",
    "vlm": ROOT / "assets" / "models" / "demo-internvl",
}


DEMO_FILE = "demo.json"  # beside a demo's weights: its build settings, evaluation and suggested run settings


def demo_suggestions(model: str | Path) -> dict:
    """The run settings a demo model suggests (its demo.json "suggested": setting name -> value, names of
    RunSettings' and the backend settings' fields), `{}` for any other model. The one place both the CLI's
    defaults and the app's come from when the model is a demo."""
    path = Path(model) / DEMO_FILE if model else None
    if path is None or not path.is_file():
        return {}
    try:
        suggested = json.loads(path.read_text()).get("suggested", {})
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable ({err}); rebuild the demo with `python -m pipelines.demo build`") \
            from None
    if not isinstance(suggested, dict):
        raise ValueError(f"{path}: \"suggested\" must map setting names to values; got {suggested!r}")
    return suggested


def with_suggestions(cls: type, given: dict[str, Any], suggested: dict[str, Any]) -> Any:
    """`cls` from the settings given (command-line flags, the app's controls), a demo's suggestions filling the
    others: settings the app shows no control for (e.g. the FLUX demo's timestep sampling) come from here too."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**{k: v for k, v in suggested.items() if k in names}, **given})


def backend_names() -> list[str]:
    """Registered backend names, in registration order."""
    return list(BACKENDS)


def backend_class(name: str) -> type:
    """The backend class registered as `name` (imported on first use)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    module_name, _, class_name = BACKENDS[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == module_name:
            raise ValueError(f"backend {name!r} is not available in this version ({module_name} is missing)") from None
        raise
    return getattr(module, class_name)


def plannings() -> dict:
    """Backend name -> its registered `Planning` (imported on first use), in registration order."""
    found = {}
    for name, target in PLANNING.items():
        module_name, _, attr = target.partition(":")
        found[name] = getattr(importlib.import_module(module_name), attr)
    return found
