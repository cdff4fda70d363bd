"""One job at a time, each in its own process: the `launch.py train|preview ...` command of a run.

The app starts the command with subprocess and watches the run folder: `progress.jsonl` (every progress event
the CLI writes, pipelines/runner/progress.py), `loss.jsonl`, `samples/` and run.json. Cancel sends SIGINT, which
the CLI handles as Ctrl-C (stop after the current step, keep everything). The job belongs to the app, not to a
browser tab: closing the page does not stop it, and any page opened later reads the same `JobStatus`. When the
process ends, its memory (GPU included) goes back to the system.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pipelines.runner import LOSS_LOG, RUN_FILE
from pipelines.runner.progress import PROGRESS_LOG

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch.py"
LOG_LINES = 400  # the page's log keeps the most recent lines
JOB_LOGS = "logs"  # <run>/logs/<kind>-<time>.txt: what the job's process printed
JOB_FILE = "job.json"  # <run>/job.json: {pid, kind, started, command, output} of the job the app started there
CANCELLED_CODES = (130, -signal.SIGINT)


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
    command: str = ""  # the command line the process runs
    version: int = 0  # grows with every change, so a poll can tell that nothing changed

    @property
    def running(self) -> bool:
        return self.state == "running"


def read_losses(run_dir: str | Path) -> list[tuple[int, float]]:
    """(step, loss) pairs of a run's loss log (a line being written is left for the next read)."""
    return read_loss_log(run_dir, "loss")


def read_loss_log(run_dir: str | Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of each line of a run's loss log that has `key` ("loss" for training steps, "validation_loss"
    for sample rounds); other lines, and a line being written, are skipped."""
    path = Path(run_dir) / LOSS_LOG
    if not path.is_file():
        return []
    pairs = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            pairs.append((int(record["step"]), float(record[key])))
        except (ValueError, KeyError, TypeError):
            continue
    return pairs


def _failed_stage_error(run_dir: Path) -> str:
    try:
        stages = json.loads((run_dir / RUN_FILE).read_text()).get("stages", {})
    except (OSError, ValueError):
        return ""
    return next((entry.get("error", "") for entry in stages.values()
                 if isinstance(entry, dict) and entry.get("status") == "failed"), "")


def _alive(pid: int, run_dir: Path) -> bool:
    """`pid` is a live (not zombie) `launch.py` process of the run in `run_dir` (a reused pid is not)."""
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        command = process.cmdline()
    except (psutil.Error, OSError):
        return False
    return any(Path(a).name == LAUNCH.name for a in command) and \
        any(a == str(run_dir) or Path(a).resolve() == run_dir.resolve() for a in command if "/" in a)


def live_job(run_dir: str | Path) -> dict | None:
    """The job recorded in `<run_dir>/job.json` when its process still runs, else None."""
    run_dir = Path(run_dir)
    try:
        job = json.loads((run_dir / JOB_FILE).read_text())
        pid = int(job["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return job if _alive(pid, run_dir) else None


def _ended_code(run_dir: Path, kind: str) -> int:
    """An exit code for a job that was not our child: 0 when its run is finished (a preview: always), else
    the code of a cancel (it stopped; Resume continues it)."""
    if kind != "run":
        return 0
    try:
        stages = json.loads((run_dir / RUN_FILE).read_text()).get("stages", {})
    except (OSError, ValueError):
        return CANCELLED_CODES[0]
    done = stages and all(isinstance(e, dict) and e.get("status") == "done" for e in stages.values())
    return 0 if done else CANCELLED_CODES[0]


class JobManager:
    """Holds at most one running job process; `start` refuses a second one with a message that says why."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._status = JobStatus()
        self._log: collections.deque[str] = collections.deque(maxlen=LOG_LINES)
        self._process: subprocess.Popen | None = None
        self._output: Path | None = None
        self._offset = 0  # where this job's events start in progress.jsonl
        self._after: Callable[[], None] | None = None
        self._result = ""
        self._pid: int | None = None  # a job found running when the app started (not this process's child)

    # -- starting and stopping -------------------------------------------------------------------------
    def start(self, kind: str, run_dir: str | Path, arguments: list[str],
              after: Callable[[], None] | None = None, result: str = "") -> None:
        """Run `python launch.py *arguments` for the run in `run_dir`; JobBusy if a job runs. `after` is called
        once when the process has ended well (e.g. to note what the previews were asked for); `result` is what the
        job makes (e.g. the previews' folder), reported when it has ended well."""
        run_dir = Path(run_dir)
        with self._lock:
            self._refresh()
            if self._status.running:
                raise JobBusy(self._busy(self._status))
            progress = run_dir / PROGRESS_LOG
            self._offset = progress.stat().st_size if progress.is_file() else 0
            (run_dir / JOB_LOGS).mkdir(exist_ok=True)
            self._output = run_dir / JOB_LOGS / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}.txt"
            command = [sys.executable, str(LAUNCH), *arguments]
            with open(self._output, "w") as out:  # the child keeps its own copy of the file descriptor
                self._process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                                 stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            self._after, self._result, self._pid = after, result, None
            # recorded so that an app started later re-attaches to this job while it runs (`attach`)
            (run_dir / JOB_FILE).write_text(json.dumps({"pid": self._process.pid, "kind": kind, "started": time.time(),
                                                        "command": command, "output": str(self._output)}))
            self._log.clear()
            self._status = JobStatus(kind=kind, run_dir=str(run_dir), state="running", stage="starting",
                                     started=time.time(), version=self._status.version + 1,
                                     losses=read_losses(run_dir), command=" ".join(["python", "launch.py", *arguments]))
            self._append(f"{kind} started in {run_dir} (process {self._process.pid})")

    def cancel(self) -> str:
        """Ask the running job to stop after its current step (SIGINT, the CLI's Ctrl-C); says what happens."""
        with self._lock:
            self._refresh()
            if not self._status.running or (self._process is None and self._pid is None):
                return "Nothing is running."
            if self._process is not None:
                self._process.send_signal(signal.SIGINT)
            else:
                try:
                    os.kill(self._pid, signal.SIGINT)
                except ProcessLookupError:
                    return "Nothing is running: the job had already ended."
            self._append("cancel requested: stopping after the current step")
        return "Stopping after the current step; everything done so far is kept (resume it from Past runs)."

    def wait(self, timeout: float | None = None) -> JobStatus:
        """Block until the current job's process ends (tests, and the app's shutdown); returns its final status."""
        process = self._process
        if process is not None:
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        return self.status()

    def attach(self, runs_dir: str | Path) -> str:
        """Follow a job that an earlier app started and that still runs (its `<run>/job.json` names a live
        `launch.py` process of that run): shown as running, its progress read from the run folder, Cancel sent
        to its pid. Returns the run's folder, or '' when none runs (or this app already has a job)."""
        with self._lock:
            self._refresh()
            if self._status.running:
                return ""
            for record in sorted(Path(runs_dir).glob(f"*/{JOB_FILE}")):
                job = live_job(record.parent)
                if job is None:
                    continue
                self._process, self._pid, self._after, self._result = None, int(job["pid"]), None, ""
                self._output = Path(job["output"]) if job.get("output") else None
                self._offset = 0  # its events are the ones with its pid, from the start of the log
                self._log.clear()
                arguments = [str(a) for a in job.get("command", [])[2:]]
                self._status = JobStatus(kind=job.get("kind", "run"), run_dir=str(record.parent), state="running",
                                         stage="starting", started=float(job.get("started", 0)),
                                         version=self._status.version + 1, losses=read_losses(record.parent),
                                         command=" ".join(["python", "launch.py", *arguments]))
                self._append(f"{self._status.kind} found running in {record.parent} (process {self._pid}, started "
                             "before this app): followed from its run folder")
                return str(record.parent)
            return ""

    # -- reading ---------------------------------------------------------------------------------------
    def status(self) -> JobStatus:
        """A snapshot of the current job, read afresh from its process and run folder."""
        with self._lock:
            self._refresh()
            return dataclasses.replace(self._status, losses=list(self._status.losses), log=list(self._log))

    def busy_message(self) -> str:
        """Why a new job cannot start now, or '' when one can."""
        status = self.status()
        return self._busy(status) if status.running else ""

    @staticmethod
    def _busy(status: JobStatus) -> str:
        where = f"{status.stage}" + (f", step {status.step} of {status.total}" if status.total > 1 else "")
        return (f"A job is already running: {Path(status.run_dir).name} ({where}). Only one job runs at a time; "
                "wait for it to finish or press Cancel in step 4 (a new run can wait for its turn: Add to queue in step 4).")

    # -- watching the run folder -----------------------------------------------------------------------
    def _refresh(self) -> None:
        s, process = self._status, self._process
        if (process is None and self._pid is None) or s.state != "running":
            return
        run_dir = Path(s.run_dir)
        pid = process.pid if process is not None else self._pid
        self._read_events(run_dir / PROGRESS_LOG, pid)
        if process is not None:
            code = process.poll()
        else:  # not our child: no exit code; the run folder says how it ended
            code = None if live_job(run_dir) is not None else _ended_code(run_dir, s.kind)
        if code is None:
            return
        self._read_events(run_dir / PROGRESS_LOG, pid)  # what it wrote just before it ended
        s.losses = read_losses(run_dir) if s.kind == "run" else s.losses
        if code == 0:
            s.state, s.result = "done", self._result
            if self._after is not None:
                try:
                    self._after()
                finally:
                    self._after = None
        elif code in CANCELLED_CODES:
            s.state, s.error = "cancelled", self._last_line("cancelled:") or "cancelled"
        else:
            s.state = "failed"
            s.error = _failed_stage_error(run_dir) or self._last_line("error:") or self._last_line("") or \
                f"the job's process ended with exit code {code}"
        s.finished, s.version = time.time(), s.version + 1
        self._append({"done": "finished", "cancelled": f"cancelled: {s.error}",
                      "failed": f"failed: {s.error}"}[s.state])

    def _read_events(self, path: Path, pid: int) -> None:
        if not path.is_file():
            return
        with open(path, encoding="utf-8") as file:
            file.seek(self._offset)
            chunk = file.read()
        whole = chunk[:chunk.rfind("\n") + 1]  # a line being written is read next time
        self._offset += len(whole.encode("utf-8"))
        s = self._status
        for line in whole.splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("pid") != pid:
                continue
            s.stage, s.step, s.total, s.eta = event["stage"], event["step"], event["total"], event.get("eta")
            if event.get("message"):
                s.message = event["message"]
                if not (event["stage"] == "calibrate" and event["total"] > 1):
                    self._append(f"[{event['stage']}] {event['message']}", event.get("time"))
            if event.get("loss") is not None and event["stage"] == "train":
                if s.losses and s.losses[-1][0] >= event["step"]:  # a resumed stage starts its curve again
                    s.losses = [p for p in s.losses if p[0] < event["step"]]
                s.losses.append((int(event["step"]), float(event["loss"])))
            s.version += 1

    def _last_line(self, prefix: str) -> str:
        try:
            lines = [line.strip() for line in self._output.read_text(errors="replace").splitlines() if line.strip()]
        except (OSError, AttributeError):
            return ""
        found = [line for line in lines if line.startswith(prefix)]
        return found[-1][len(prefix):].strip() if found else ""

    def _append(self, line: str, when: float | None = None) -> None:
        self._log.append(time.strftime("%H:%M:%S ", time.localtime(when or time.time())) + line)
        self._status.version += 1
