"""The state of one browser page's run: one object, kept by gradio per session (`page.state`).

Switching the task or starting another run changes it exactly as the page says: a task switch forgets this page's
run (the Train, Preview and Export steps start empty) and keeps the uploads of each task, so switching back finds
them; "Start another run" forgets the run and keeps the model, the data and the settings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

STEP = {"model": 0, "data": 1, "budget": 2, "train": 3, "preview": 4, "export": 5}  # the wizard's steps, in order


@dataclass
class PageState:
    """What one page remembers beyond its components' own values."""

    kind: str = "images"  # the task: the data kind of its backends ("images" or "qa")
    backend: str = ""  # the chosen model's backend (registered name), "" until a model is described
    run_dir: str = ""  # this page's run: the one it started or opened; "" for none yet
    uploads: dict[str, list[dict]] = field(default_factory=lambda: {"images": [], "qa": []})  # per task
    picked: int | None = None  # the gallery image chosen for removal
    ratio_touched: bool = False  # the person moved the ratio slider: it stops following the recommendation
    ram_touched: bool = False  # the person typed a RAM budget: it is no longer read afresh
    recommended: float | None = None
    device: str = "cpu"  # what runs the job: "cuda" or "cpu" (set when the page loads)
    seen: dict = field(default_factory=lambda: {"version": -1, "state": ""})  # the job as last drawn
    restored_model: str = ""  # a reload put this model back: its choice must not reset the restored settings

    def saved(self) -> dict:
        """What a reload brings back (kept in the browser, app/restore.py): the task, model's backend, run,
        uploads and whether the person set the ratio or RAM budget themselves."""
        return {"kind": self.kind, "backend": self.backend, "run_dir": self.run_dir,
                "uploads": {k: [dict(i) for i in v] for k, v in self.uploads.items()},
                "ratio_touched": self.ratio_touched, "ram_touched": self.ram_touched,
                "recommended": self.recommended}

    @classmethod
    def from_saved(cls, saved: dict, device: str = "cpu") -> "PageState":
        """The inverse of `saved` (unknown or missing entries take their defaults: an older page's record)."""
        names = {"kind", "backend", "run_dir", "uploads", "ratio_touched", "ram_touched", "recommended"}
        state = cls(device=device, **{k: v for k, v in (saved or {}).items() if k in names})
        state.uploads = {"images": [], "qa": [], **(state.uploads or {})}
        return state

    @property
    def images(self) -> list[dict]:
        return self.uploads.setdefault(self.kind, [])

    def with_images(self, images: list[dict]) -> "PageState":
        return dataclasses.replace(self, uploads={**self.uploads, self.kind: list(images)}, picked=None)

    def switch_task(self, kind: str) -> "PageState":
        """Another task: this page's run is forgotten (its results belong to the old task); uploads are kept."""
        return dataclasses.replace(self, kind=kind, backend="", run_dir="", picked=None, ratio_touched=False,
                                   recommended=None, seen={"version": -1, "state": ""})

    def new_run(self) -> "PageState":
        """Another run of the same task: the run is forgotten; model, data and settings stay."""
        return dataclasses.replace(self, run_dir="", seen={"version": -1, "state": ""})

    def open_run(self, run_dir: str, kind: str, backend: str) -> "PageState":
        return dataclasses.replace(self, run_dir=str(run_dir), kind=kind, backend=backend,
                                   seen={"version": -1, "state": ""})
