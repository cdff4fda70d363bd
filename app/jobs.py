"""One background job at a time: a run (or new previews of a run) in a worker thread.

The job belongs to the app's process, not to a browser tab: closing the page does not stop it, and
any page that opens later reads the same `JobStatus` (the UI polls it with a timer). The worker
subscribes to the run machine's `Progress` events (pipelines/runner/machine.py) and keeps what the page shows:
the stage, step X of Y, the loss curve, the ETA and a log in words. Cancel sets the run's
`cancel_event`; the run machine stops between two steps and keeps everything done so far.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pipelines.runner import Progress, Run, RunCancelled

log = logging.getLogger(__name__)

LOG_LINES = 400  # the log keeps the most recent lines
LOGGERS = ("pipelines", "emloc")  # their INFO messages join the job's log


class JobBusy(RuntimeError):
    """A job is already running; the message names it and says what to do."""


@dataclass
class JobStatus:
    """What the page shows about the current (or last) job; a copy, safe to read from any thread."""

    kind: str = ""  # "run" (the stages) or "preview" (new previews of a finished run)
    run_dir: str = ""
    state: str = "idle"  # idle, running, done, cancelled, failed
    stage: str = ""
    step: int = 0
    total: int = 0
    eta: float | None = None
    message: str = ""
    error: str = ""
    started: float = 0.0
    finished: float = 0.0
    losses: list[tuple[int, float]] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    result: str = ""  # e.g. the folder of new previews
    version: int = 0  # grows with every change, so a poll can tell that nothing changed

    @property
    def running(self) -> bool:
        return self.state == "running"


class _LogToJob(logging.Handler):
    def __init__(self, manager: "JobManager"):
        super().__init__(logging.INFO)
        self.manager = manager

    def emit(self, record: logging.LogRecord) -> None:
        self.manager._append(f"{record.levelname.lower()}: {record.getMessage()}")


class JobManager:
    """Holds at most one running job; `start` refuses a second one with a message that says why."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._status = JobStatus()
        self._log: collections.deque[str] = collections.deque(maxlen=LOG_LINES)
        self._run: Run | None = None
        self._thread: threading.Thread | None = None

    # -- reading ---------------------------------------------------------------------------------------
    def status(self) -> JobStatus:
        """A snapshot of the current job (lists copied)."""
        with self._lock:
            copy = dataclasses.replace(self._status, losses=list(self._status.losses), log=list(self._log))
        return copy

    def busy_message(self) -> str:
        """Why a new job cannot start now, or '' when one can."""
        status = self.status()
        if not status.running:
            return ""
        where = f"{status.stage}" + (f", step {status.step} of {status.total}" if status.total > 1 else "")
        return (f"A job is already running: {Path(status.run_dir).name} ({where}). Only one job runs at a time; "
                "wait for it to finish or press Cancel in step 4.")

    # -- starting and stopping -------------------------------------------------------------------------
    def start(self, kind: str, run: Run, work: Callable[[Run], str | None],
              losses: list[tuple[int, float]] | None = None) -> None:
        """Run `work(run)` in a worker thread; raise JobBusy if a job is running. `work` may return a result.

        `losses`: the curve so far (a resumed run), continued by the new steps.
        """
        with self._lock:
            if self._status.state == "running":
                raise JobBusy(self._busy_unlocked())
            self._log.clear()
            self._status = JobStatus(kind=kind, run_dir=str(run.dir), state="running", stage="starting",
                                     started=time.time(), version=self._status.version + 1,
                                     losses=list(losses or []))
            self._run = run
            run.callbacks.append(self._on_progress)
            self._thread = threading.Thread(target=self._work, args=(run, work), name=f"emloc-{kind}", daemon=True)
        self._append(f"{kind} started in {run.dir}")
        self._thread.start()

    def _busy_unlocked(self) -> str:
        s = self._status
        return (f"A job is already running: {Path(s.run_dir).name} ({s.stage}). Only one job runs at a time; "
                "wait for it to finish or press Cancel in step 4.")

    def cancel(self) -> str:
        """Ask the running job to stop after its current step; returns what happened, in words."""
        with self._lock:
            run = self._run if self._status.state == "running" else None
        if run is None:
            return "Nothing is running."
        run.cancel_event.set()
        self._append("cancel requested: stopping after the current step")
        return "Stopping after the current step; everything done so far is kept (resume it from Past runs)."

    def wait(self, timeout: float | None = None) -> JobStatus:
        """Block until the current job ends (for tests and the CLI); returns its final status."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self.status()

    # -- the worker ------------------------------------------------------------------------------------
    def _work(self, run: Run, work: Callable[[Run], str | None]) -> None:
        handler = _LogToJob(self)
        loggers = [logging.getLogger(name) for name in LOGGERS]
        levels = [lg.level for lg in loggers]
        for lg in loggers:
            lg.addHandler(handler)
            if lg.level == logging.NOTSET or lg.level > logging.INFO:
                lg.setLevel(logging.INFO)
        state, error, result = "done", "", ""
        try:
            result = work(run) or ""
        except RunCancelled as err:
            state, error = "cancelled", str(err)
        except Exception as err:  # the page shows it in words; the traceback goes to the terminal's log
            log.exception("job in %s failed", run.dir)
            state, error = "failed", f"{type(err).__name__}: {err}"
        finally:
            for lg, level in zip(loggers, levels):
                lg.removeHandler(handler)
                lg.setLevel(level)
            if run.backend is not None:
                try:
                    run.backend.release()
                except Exception:  # releasing is best effort; the job's outcome is what matters
                    log.exception("releasing the backend failed")
        with self._lock:
            self._status.state, self._status.error, self._status.result = state, error, result
            self._status.finished = time.time()
            self._status.version += 1
            self._run = None
        self._append({"done": "finished", "cancelled": f"cancelled: {error}", "failed": f"failed: {error}"}[state])

    def _on_progress(self, event: Progress) -> None:
        with self._lock:
            s = self._status
            s.stage, s.step, s.total, s.eta = event.stage, event.step, event.total, event.eta
            if event.message:
                s.message = event.message
            if event.loss is not None and event.stage == "train":
                if s.losses and s.losses[-1][0] >= event.step:  # a resumed stage starts its curve again
                    s.losses = [p for p in s.losses if p[0] < event.step]
                s.losses.append((event.step, float(event.loss)))
            s.version += 1
        if event.message and not (event.stage == "calibrate" and event.total > 1):
            self._append(f"[{event.stage}] {event.message}")

    def _append(self, line: str) -> None:
        with self._lock:
            self._log.append(time.strftime("%H:%M:%S ") + line)
            self._status.version += 1
