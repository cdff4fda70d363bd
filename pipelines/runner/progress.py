"""What the run machine tells its watchers (the app, the CLI's bars): progress events, and a cancel."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Progress:
    """One progress event: what the run is doing now."""

    stage: str
    step: int = 0
    total: int = 0
    loss: float | None = None
    eta: float | None = None  # seconds left in this stage, when known
    message: str = ""


class RunCancelled(Exception):
    """Raised when a cancel request stopped the run between two steps; everything done so far is kept."""


PROGRESS_LOG = "progress.jsonl"  # in the run folder: every progress event of `launch.py train|preview`, one per line


class ProgressFile:
    """A progress subscriber that appends each event to `<run>/progress.jsonl` as one JSON line (with the time and
    this process's id), so a watcher in another process (the app) follows the run through the folder alone."""

    def __init__(self, path):
        import os

        self.path, self.pid = path, os.getpid()

    def __call__(self, event: Progress) -> None:
        import dataclasses
        import json
        import time

        line = json.dumps({"time": round(time.time(), 3), "pid": self.pid, **dataclasses.asdict(event)})
        with open(self.path, "a", encoding="utf-8") as file:  # one short write per event: readers see whole lines
            file.write(line + "\n")
