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
