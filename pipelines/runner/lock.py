"""One process at a time in a run folder: a lock file holding the PID of the process that works in it.

Two `--resume` of one run (or a terminal and the app) would otherwise both train, race on the checkpoints
and leave `.tmp` folders behind. The lock is a file made with O_EXCL, so only one process can create it;
a lock left by a process that no longer runs (killed with -9, a power cut) is taken over, with a message.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"


class RunLocked(ValueError):
    """Another live process works in the run folder; the message names it and says what to do."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


class RunLock:
    """`with RunLock(folder):` holds `folder/run.lock` for the block; `taken_over` says whose stale lock it replaced."""

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / LOCK_FILE
        self.taken_over: int | None = None  # the PID of a dead process whose lock this one replaced

    def acquire(self) -> "RunLock":
        for _ in range(3):  # a stale lock is removed and the creation tried again
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None and self._age() < 5:  # being written by a process starting right now
                    raise RunLocked(f"{self.path.parent} is being opened by another process; try again") from None
                if owner is not None and _alive(owner):
                    raise RunLocked(f"{self.path.parent} is in use by process {owner} (another training or preview "
                                    "of this run); wait for it to finish or stop it, then try again") from None
                self.taken_over = owner if owner is not None else -1
                log.warning("%s: taking over the lock of process %s, which no longer runs", self.path.parent, owner)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(handle, "w") as file:
                file.write(str(os.getpid()))
            return self
        raise RunLocked(f"{self.path.parent}: could not take the lock {self.path.name}; try again")

    def _owner(self) -> int | None:
        try:
            return int(self.path.read_text().strip())
        except (OSError, ValueError):  # unreadable or half-written: no live owner can be named
            return None

    def _age(self) -> float:
        try:
            return time.time() - self.path.stat().st_mtime
        except OSError:
            return float("inf")

    def release(self) -> None:
        if self._owner() == os.getpid():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
