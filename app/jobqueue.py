"""The job queue: jobs lined up behind the running one, started one at a time, kept in `<runs>/queue.json`.

A queued job is what a job always is here, the `launch.py train|preview ...` command of a run (app/jobs.py), so a
line in the queue can be copied into a terminal. The file is rewritten whole through a temporary file and an atomic
rename (a crash leaves the old queue or the new one, never half of one), and changed under a lock file, so an app
restarted on the same runs folder finds the jobs still waiting, in their order.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import shlex
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .jobs import JobBusy, JobManager

log = logging.getLogger(__name__)

POLL_S = 1.0  # how often a waiting queue checks whether the running job has ended
QUEUE_FILE = "queue.json"  # in the runs folder: {"jobs": [QueuedJob as a dict, ...]}, first in line first
LOCK_FILE = ".queue.lock"


@dataclass
class QueuedJob:
    """One job waiting for its turn."""

    kind: str  # "run" (the stages) or "preview"
    run_dir: str
    arguments: list[str]  # `python launch.py <arguments>`: the command the run records
    result: str = ""  # what it makes (a previews folder), reported when it has ended well
    writes: dict[str, str] = field(default_factory=dict)  # files written once it has ended well: path -> text
    what: str = ""  # how the page names it ("training", "previews")
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    added: float = field(default_factory=time.time)

    @property
    def command(self) -> str:
        return "python launch.py " + shlex.join(self.arguments)

    @property
    def name(self) -> str:
        """How the page lists it: the run's folder name and what the job does."""
        return f"{Path(self.run_dir).name} ({self.what or self.kind})"


class JobQueue:
    """The waiting jobs of one runs folder, in order, and the one `JobManager` they take turns on: while jobs wait,
    a thread checks every second whether the running job has ended and starts the next."""

    def __init__(self, runs_dir: str | Path, jobs: JobManager) -> None:
        self.runs_dir = Path(runs_dir)
        self.path = self.runs_dir / QUEUE_FILE
        self.manager = jobs
        self._turn = threading.Lock()  # one decision at a time about which job starts
        self._watcher: threading.Thread | None = None
        self._closed = threading.Event()
        if self.jobs():
            self._watch()

    # -- taking turns ------------------------------------------------------------------------------------
    def submit(self, job: QueuedJob, queue: bool = True) -> int:
        """Start `job` now when nothing runs and nothing waits (returns 0), else line it up when `queue` (returns
        its place in line, 1 = next), else JobBusy saying why."""
        with self._turn:
            self._advance()
            busy = self.manager.busy_message()
            waiting = self.jobs()
            if not busy and not waiting:
                self._start(job)
                return 0
            if not queue:
                raise JobBusy(busy or f"{len(waiting)} job(s) wait in the queue; add this one to the queue too")
            place = self.add(job)
        self._watch()
        return place

    def place_of(self, run_dir: str) -> int:
        """The place in line of the first waiting job of `run_dir` (1 = next), 0 when none of it waits."""
        return next((i for i, j in enumerate(self.jobs(), 1) if run_dir and Path(j.run_dir) == Path(run_dir)), 0)

    def close(self) -> None:
        """Start no more jobs (the app stops; the queue stays in its file for the next app)."""
        self._closed.set()

    def _start(self, job: QueuedJob) -> None:
        self.manager.start(job.kind, job.run_dir, job.arguments, result=job.result,
                           after=(lambda: write_files(job.writes)) if job.writes else None)

    def _advance(self) -> None:
        """Start the next waiting job when none runs (a job another app started counts as running)."""
        if self._closed.is_set() or self.manager.busy_message() or self.manager.attach(self.runs_dir):
            return
        job = self.pop()
        if job is None:
            return
        try:
            self._start(job)
        except (OSError, ValueError, JobBusy) as err:  # its run folder went away...: the next one gets its turn
            log.error("the queued job %s could not start (%s); it is dropped", job.command, err)

    def _watch(self) -> None:
        if self._watcher is not None and self._watcher.is_alive():
            return

        def watch() -> None:
            while not self._closed.wait(POLL_S):
                with self._turn:
                    self._advance()
                    if not self.jobs():
                        self._watcher = None
                        return

        self._watcher = threading.Thread(target=watch, name="emloc-queue", daemon=True)
        self._watcher.start()

    # -- the file ----------------------------------------------------------------------------------------
    def jobs(self) -> list[QueuedJob]:
        """The waiting jobs, first in line first ([] when none; a damaged file is set aside and said in the log)."""
        if not self.path.is_file():
            return []
        try:
            records = json.loads(self.path.read_text())["jobs"]
            known = {f.name for f in dataclasses.fields(QueuedJob)}
            return [QueuedJob(**{k: v for k, v in r.items() if k in known}) for r in records]
        except (OSError, ValueError, KeyError, TypeError) as err:
            aside = self.path.with_name(f"{QUEUE_FILE}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
            log.error("%s cannot be read (%s); set aside as %s, the queue starts empty", self.path, err, aside.name)
            try:
                self.path.replace(aside)
            except OSError:
                pass
            return []

    def add(self, job: QueuedJob) -> int:
        """Line `job` up last; returns its place in line (1 = next)."""
        with self._locked():
            jobs = [*self.jobs(), job]
            self._write(jobs)
        return len(jobs)

    def remove(self, job_id: str) -> QueuedJob:
        """Take the waiting job `job_id` out of the queue; ValueError in words when it is not waiting."""
        with self._locked():
            jobs = self.jobs()
            found = next((j for j in jobs if j.id == job_id), None)
            if found is None:
                raise ValueError("that job is no longer waiting (it has started, or was removed); the queue is shown "
                                 "again")
            self._write([j for j in jobs if j.id != job_id])
        return found

    def pop(self) -> QueuedJob | None:
        """The next job, taken out of the queue (None when none waits)."""
        with self._locked():
            jobs = self.jobs()
            if not jobs:
                return None
            self._write(jobs[1:])
        return jobs[0]

    def _write(self, jobs: list[QueuedJob]) -> None:
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{QUEUE_FILE}.{os.getpid()}.tmp")
        with open(temporary, "w") as file:
            json.dump({"jobs": [dataclasses.asdict(j) for j in jobs]}, file, indent=1)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, self.path)  # atomic: readers see the old queue or the new one

    @contextmanager
    def _locked(self):
        """One change at a time, also between two apps on the same runs folder."""
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        with open(self.runs_dir / LOCK_FILE, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def write_files(writes: dict[str, str]) -> None:
    """Write what a job leaves for the page once it has ended well (e.g. a preview's prompts in full)."""
    for path, text in writes.items():
        if Path(path).parent.is_dir():
            Path(path).write_text(text)
