"""The `launch.py train ...` command line that makes a run again, headless, from the run's own data copy.

A run keeps it in run.json (`command`), whoever started it (the app or the CLI): every setting that differs
from its default, written with the flags `launch.py train` parses (cli.py builds them from the same
dataclass fields), and the backend's data settings pointing into `<run>/data/`, so the command works after
the original upload folder is gone. Same seed, same settings: the same adapter.
"""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path
from typing import Any

from .settings import RunSettings


def field_flag(f: dataclasses.Field) -> str:
    """The command-line flag of a settings field (`--lora-targets`, or the field's own `flag`)."""
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _words(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)  # repr: a float read back is the same float


def settings_arguments(settings: Any) -> list[str]:
    """`--flag value` for every field of a settings dataclass that is not at its default (lists repeat the flag)."""
    arguments = []
    for f in dataclasses.fields(settings):
        value, flag = getattr(settings, f.name), field_flag(f)
        if value == _default(f) or not flag:
            continue
        if isinstance(value, bool):
            arguments.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):
            for item in value:
                arguments += [flag, _words(item)]
        else:
            arguments += [flag, _words(value)]
    return arguments


def train_arguments(backend: str, run: RunSettings, settings: Any, data: dict[str, str], out: Path) -> list[str]:
    """The arguments of `launch.py train` for this run, with `data` (setting -> path) replacing the data settings."""
    settings = dataclasses.replace(settings, **data)
    return ["--backend", backend, "--model", run.model, *settings_arguments(dataclasses.replace(run, model="")),
            *settings_arguments(settings), "--out", str(out)]


def train_command(arguments: list[str]) -> str:
    """The shell line: `python launch.py train ...`, each argument quoted for a POSIX shell."""
    return " ".join(["python", "launch.py", "train", *(shlex.quote(a) for a in arguments)])


def again_folder(run_dir: Path) -> Path:
    """Where the recorded command writes its run: beside the original (a run folder is never overwritten)."""
    run_dir = Path(run_dir).resolve()
    return run_dir.with_name(run_dir.name + "-again")
