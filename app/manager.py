"""Components addressed by name, "step.element" (LLaMA-Factory's LlamaBoard `manager.py` is the model).

Each step module (app/steps/*.py) builds its components, registers them here under its step's name and binds its
events with `bind`: a handler is a plain function that takes the inputs as a dict by name and returns the outputs
as a dict by name (only the ones it changes), so tests call it without a browser. A handler that fails says why
in words in the event's message component; the page never shows a traceback.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Callable

import gradio as gr

from . import words
from .jobs import JobBusy

log = logging.getLogger(__name__)

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, JobBusy, OSError)
Values = dict[str, Any]


def say(text: Any, good: bool = True) -> str:
    """A message for a step, markdown-escaped so that file names show as typed."""
    text = str(text)
    text = text[:1].upper() + text[1:]
    text = re.sub(r"([\\`*_\[\]<>#|])", r"\\\1", text)
    return ("✓ " if good else "⚠ ") + text.replace("\n", "  \n")


def failure(err: Exception) -> str:
    """What the page says when a handler failed: the reason in the page's words (a bug is said as one)."""
    if isinstance(err, USER_ERRORS):
        return say(words.in_app_words(str(err)), good=False)
    return say(f"something went wrong ({type(err).__name__}: {err}); the details are in the terminal", good=False)


class Manager:
    """Every component of the page by id "step.element"."""

    def __init__(self) -> None:
        self.elems: dict[str, gr.components.Component] = {}

    def add(self, step: str, elems: dict[str, Any]) -> None:
        for name, elem in elems.items():
            self.elems[f"{step}.{name}"] = elem

    def __getitem__(self, elem_id: str):
        return self.elems[elem_id]

    def bind(self, event: Callable, fn: Callable[[Values], Values], inputs: list[str], outputs: list[str],
             message: str | None = None, **kwargs: Any) -> None:
        """`event(fn)` with inputs and outputs by id; `fn(values) -> {id: value}`; a failure goes to `message`."""
        if message is not None and message not in outputs:
            outputs = [*outputs, message]
        if "page.wizard" in outputs and "page.step" in self.elems and "page.step" not in outputs:
            outputs = [*outputs, "page.step"]  # the step shown is remembered, so that a reload returns to it
        components = {elem_id: self[elem_id] for elem_id in outputs}

        def call(*args: Any) -> dict:
            try:
                result = fn(dict(zip(inputs, args))) or {}
            except Exception as err:  # noqa: BLE001 - said on the page; a bug's traceback goes to the terminal
                if not isinstance(err, USER_ERRORS):
                    log.exception("handler %s failed", getattr(fn, "__name__", fn))
                if message is None:
                    raise
                result = {message: failure(err)}
            if "page.wizard" in result and "page.step" in components:
                result["page.step"] = getattr(result["page.wizard"], "selected", None)
            unknown = set(result) - set(components)
            if unknown:
                raise KeyError(f"{getattr(fn, '__name__', fn)} returned {sorted(unknown)}, not among its outputs")
            if not result:  # nothing changes (gradio reads an empty dict as one value, not as no updates)
                return {component: gr.skip() for component in components.values()}
            return {components[k]: v for k, v in result.items()}

        call.__name__ = getattr(fn, "__name__", "handler")
        kwargs.setdefault("show_progress", "hidden")
        kwargs.setdefault("concurrency_id", "wizard")  # one queue: a person's clicks are handled in order
        event(call, inputs=[self[i] for i in inputs], outputs=list(components.values()), **kwargs)
