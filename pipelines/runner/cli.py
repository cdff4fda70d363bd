"""Headless runs: `python launch.py train ...` and `python launch.py preview ...`.

Options are built from the settings dataclasses (run.RunSettings and the backend's own settings
class), so every setting is declared once, with its help text, next to its default. A field's
metadata may give its flag ("flag") and mark it as accepted by `preview` too ("preview": flag).

    python launch.py train --backend flux --model ID_OR_PATH --images DIR --prompt "a photo of sks dog" \\
        --ratio 0.45 --steps 500 --out runs/my-dog
    python launch.py train --out runs/my-dog --resume          # continue a crashed or cancelled run
    python launch.py train --out runs/my-dog --resume --steps 800   # train a finished run further
    python launch.py preview --run runs/my-dog --prompt "a photo of sks dog on the beach" --seed 3

Ctrl-C once asks the run to stop after the current step (a checkpoint is written); twice stops at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import typing
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from .registry import DEMO_MODELS, backend_class, backend_names, demo_suggestions, with_suggestions
from .checks import disk_words
from .command import field_flag
from .machine import Run, distributed_state, read_run_file
from .progress import PROGRESS_LOG, Progress, ProgressFile, RunCancelled
from .requests import parse_scales, parse_seeds
from .settings import RUN_FILE, STAGES, RunSettings

log = logging.getLogger(__name__)


def _option_type(hint: Any) -> tuple[Any, bool]:
    """(element type, is_list) of a dataclass field's type hint."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        return args[0], True
    return hint, False


def add_settings_options(parser: argparse.ArgumentParser, cls: type, title: str, preview: bool = False) -> None:
    """One option per field of the dataclass `cls` (only the preview ones when `preview`)."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = f.metadata.get("preview") if preview else field_flag(f)
        if not flag:
            continue
        kind, many = _option_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        dest = f"{cls.__name__}.{f.name}"
        if kind is bool:
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif many and kind is int:  # seeds: "--seed 3 --seed 7", "--seed 1000-1015" or "--seed '1, 5, 9'"
            group.add_argument(flag, dest=dest, type=_seed_list(flag), action="extend", default=None,
                               metavar=flag.lstrip("-").replace("-", "_").upper(),
                               help=help_text + "; numbers or ranges (1000-1015, '1, 5, 9'), or repeat the flag")
        elif many:
            group.add_argument(flag, dest=dest, type=kind, action="append", default=None, metavar=flag.lstrip("-").replace("-", "_").upper(),
                               help=help_text + "; repeat for several")
        else:
            group.add_argument(flag, dest=dest, type=kind, default=None, metavar=flag.lstrip("-").replace("-", "_").upper(), help=help_text)


def _seed_list(flag: str):
    """An argparse type for a list of whole numbers: `parse_seeds` with the flag in its message."""
    def parse(text: str) -> list[int]:
        try:
            return parse_seeds(text, flag)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = "seeds"
    return parse


def _scale_list(text: str) -> list[float]:
    try:
        return parse_scales(text, "--scales")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


_scale_list.__name__ = "strengths"


def given_settings(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of `cls` that were given on the command line."""
    values = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f"{cls.__name__}.{f.name}", None)
        if value is not None:
            values[f.name] = value
    return values


class ConsoleProgress:
    """Draws progress events as one tqdm bar per stage, and messages as lines."""

    def __init__(self, quiet: bool = False):
        self.bar: tqdm | None = None
        self.stage = ""
        self.quiet = quiet

    def __call__(self, event: Progress) -> None:
        if event.stage != self.stage or (self.bar is not None and event.total and event.total != self.bar.total):
            self.close()
            self.stage = event.stage
        if event.message and not (event.stage == "calibrate" and event.total > 1):
            tqdm.write(f"[{event.stage}] {event.message}")
        if event.total > 1 and not self.quiet and not event.message.endswith(("done", "skipped")):
            if self.bar is None:
                self.bar = tqdm(total=event.total, desc=event.stage, unit="step", dynamic_ncols=True)
            self.bar.n = event.step
            if event.loss is not None:
                self.bar.set_postfix(loss=f"{event.loss:.4f}", refresh=False)
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _cancel_on_ctrl_c(run: Run) -> None:
    def handler(signum, frame):
        if run.cancel_event.is_set():
            raise KeyboardInterrupt
        tqdm.write("stopping after the current step (Ctrl-C again to stop at once)...")
        run.cancel_event.set()
    try:
        signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread (e.g. called from a test runner's worker)
        pass


def _execute(run: Run, stages: list[str], quiet: bool, extend_to: int | None = None) -> int:
    console = ConsoleProgress(quiet or not run.is_main)  # one set of bars, however many processes
    if run.is_main:
        run.callbacks += [console, ProgressFile(run.dir / PROGRESS_LOG)]  # the file: what the app watches
    _cancel_on_ctrl_c(run)
    try:
        if extend_to is None:
            run.execute(stages)
        else:  # a finished run trained further: its results so far are kept in earlier/
            run.extend(extend_to, stages)
    except RunCancelled as err:
        console.close()
        print(f"cancelled: {err}", file=sys.stderr)
        return 130
    finally:
        console.close()
    if not run.is_main:
        return 0
    print(f"run folder: {run.dir}")
    if run.output("correct").exists():
        print(f"corrected LoRA (PEFT): {run.output('correct') / 'corrected'}")
        for extra in sorted(p for p in run.output("correct").iterdir() if p.name not in ("corrected", "uncorrected")):
            print(f"export: {extra}")
    grid = run.output("preview") / "grid.png"
    if grid.exists():
        print(f"preview grid: {grid}")
    table = run.output("preview") / "previews.md"
    if table.exists():
        print(table.read_text())
    return 0


def _create_on_main(folder: str, backend: str, run_settings: RunSettings, settings: Any) -> Run:
    """The main process creates the run folder and the others open it; when the main one is refused (bad data, a
    plan that does not fit) every process raises its error, so none waits for a folder that will not come."""
    processes = distributed_state(run_settings.resolved_device())
    if processes.num_processes == 1:
        return Run.create(folder, backend, run_settings, settings)
    from accelerate.utils import broadcast_object_list

    refusal = [None]
    if processes.is_main_process:
        try:
            run = Run.create(folder, backend, run_settings, settings)
        except Exception as err:
            refusal = [(type(err).__name__, str(err))]
            broadcast_object_list(refusal, from_process=0)
            raise
    broadcast_object_list(refusal, from_process=0)
    if refusal[0] is not None:
        kind, message = refusal[0]
        error = {"FileExistsError": FileExistsError, "FileNotFoundError": FileNotFoundError}.get(kind, ValueError)
        raise error(f"the main process could not create the run: {message}")
    return run if processes.is_main_process else Run.open(folder)


def _logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.WARNING), format="%(levelname)s %(name)s: %(message)s")
    for library in ("diffusers", "transformers"):  # their per-file loading bars would drown the run's own
        try:
            __import__(f"{library}.utils.logging", fromlist=["disable_progress_bar"]).disable_progress_bar()
        except ImportError:
            pass


def _in_words(work: Callable[[], int], retry: str = "fix that and try again") -> int:
    """`work()`'s exit code, or what went wrong as one line on stderr: the subcommands' (train, preview, export)
    common refusals, so each says them in the same words and none ends in a traceback. A refused value (ValueError,
    a folder that exists or is missing) exits 2; a disk problem exits 2 with `retry`, what to do once it is fixed;
    a cancel (Ctrl-C, the app's Cancel) exits 130."""
    try:
        return work()
    except RunCancelled as err:
        print(f"cancelled: {err}", file=sys.stderr)
        return 130
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a folder made read-only mid-run: what is done so far is kept
        print(f"error: {disk_words(err)} ({err}); {retry}", file=sys.stderr)
        return 2


def _train(args: argparse.Namespace, backend_type: type | None) -> int:
    """A new run from the parsed `launch.py train` flags, or --resume of the one in --out."""
    if args.resume:
        if not (Path(args.out) / RUN_FILE).is_file():
            raise FileNotFoundError(f"{args.out} is not a run folder (no {RUN_FILE}); check the --out path")
        given = given_settings(RunSettings, args)
        run = Run.open(args.out, device=given.pop("device", None))  # --device: where to continue this run
        steps = given.pop("steps", run.settings.steps)
        if given or (backend_type and given_settings(backend_type.settings_class, args)):
            print("note: --resume continues with the settings saved in run.json (only --steps can change, to "
                  "train further, and --device, where to continue); other settings are ignored", file=sys.stderr)
        if steps != run.settings.steps:
            return _execute(run, args.stages, args.quiet, extend_to=steps)
    else:
        run_given = given_settings(RunSettings, args)
        if not run_given.get("model") and args.backend in DEMO_MODELS:
            run_given["model"] = str(DEMO_MODELS[args.backend])
            print(f"no --model given: using the demo model {run_given['model']}", file=sys.stderr)
        suggested = demo_suggestions(run_given.get("model", ""))
        known_names = {f.name for cls in (RunSettings, backend_type.settings_class) for f in dataclasses.fields(cls)}
        if set(suggested) - known_names:
            raise ValueError(f"{run_given['model']}/demo.json suggests settings this version does not have "
                             f"({', '.join(sorted(set(suggested) - known_names))}); rebuild the demo")
        run_settings = with_suggestions(RunSettings, run_given, suggested)
        settings = with_suggestions(backend_type.settings_class, given_settings(backend_type.settings_class, args),
                                    suggested)
        if suggested:
            print("the demo model's suggested settings (flags given win): "
                  + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in suggested.items()), file=sys.stderr)
        run = _create_on_main(args.out, args.backend, run_settings, settings)
    return _execute(run, args.stages, args.quiet)


def main(argv: list[str] | None = None) -> int:
    """`launch.py train`: a whole run headless; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--backend", choices=backend_names())
    pre.add_argument("--resume", action="store_true")
    known, _ = pre.parse_known_args(argv)
    parser = argparse.ArgumentParser(prog="launch.py train", description="Personalise a model with EMLoC, headless.")
    parser.add_argument("--backend", choices=backend_names(), help="model family (required for a new run)")
    parser.add_argument("--out", required=True, help="the run folder to create, e.g. runs/my-dog")
    parser.add_argument("--resume", action="store_true", help="continue the existing run in --out with its saved settings; with --steps above "
                        "its steps, train a finished run further (its results so far are kept in earlier/)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="stages to run (default: all)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--log-level", default="warning", help="debug, info, warning or error")
    add_settings_options(parser, RunSettings, "run settings")
    backend_type = None
    if known.backend:
        try:
            backend_type = backend_class(known.backend)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        add_settings_options(parser, backend_type.settings_class, f"{known.backend} settings")
    elif not known.resume and not {"-h", "--help"} & set(argv):
        parser.error("--backend is required for a new run (one of: " + ", ".join(backend_names()) + ")")
    args = parser.parse_args(argv)
    _logging(args.log_level)
    return _in_words(lambda: _train(args, backend_type),
                     f"fix that, then continue with --resume --out {args.out}")


def preview(argv: list[str] | None = None) -> int:
    """`launch.py preview`: new previews of a finished run; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--run")
    known, _ = pre.parse_known_args(argv)
    parser = argparse.ArgumentParser(prog="launch.py preview", description="Previews of a finished run.")
    parser.add_argument("--run", required=True, help="the run folder, e.g. runs/my-dog")
    parser.add_argument("--name", help="folder name for these previews (default: previews-<time>)")
    parser.add_argument("--device", help="where to render: cpu, cuda or cuda:N (default: the device the run was "
                        "made on)")
    parser.add_argument("--log-level", default="warning", help="debug, info, warning or error")
    parser.add_argument("--scales", type=_scale_list, default=None, metavar="STRENGTHS",
                        help="a strength grid instead of the usual previews: the corrected LoRA at each strength "
                             "(e.g. '0, 0.5, 1, 1.25'; 0 is the base model) for every prompt / question and seed")
    backend_type = None
    if known.run and (Path(known.run) / RUN_FILE).is_file():
        try:
            backend_type = backend_class(read_run_file(Path(known.run))["backend"])
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        add_settings_options(parser, backend_type.settings_class, "preview settings", preview=True)
    args = parser.parse_args(argv)
    _logging(args.log_level)
    return _in_words(lambda: _preview(args, backend_type))


def _preview(args: argparse.Namespace, backend_type: type) -> int:
    """New previews of the run in --run, from the parsed `launch.py preview` flags."""
    run = Run.open(args.run, device=args.device)
    for name, value in given_settings(backend_type.settings_class, args).items():
        setattr(run.backend.settings, name, value)
    console = ConsoleProgress()
    run.callbacks += [console, ProgressFile(run.dir / PROGRESS_LOG)]
    _cancel_on_ctrl_c(run)  # SIGINT (the app's Cancel, or Ctrl-C): stop between two preview variants
    try:
        folder = run.preview(args.name, scales=args.scales)
    finally:
        console.close()
    print(f"previews: {folder}")
    if (folder / "grid.png").exists():
        print(f"preview grid: {folder / 'grid.png'}")
    if (folder / "previews.md").exists():
        print((folder / "previews.md").read_text())
    return 0


def export(argv: list[str] | None = None) -> int:
    """`launch.py export`: a zip of a run's adapters with a README.md; `--step N` corrects the kept checkpoint of
    step N for the full model first (as the correct stage corrects the final adapter); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="launch.py export", description="Export a run's adapters (a zip with a "
                                     "README.md; the files carry the trigger word, prompts and settings).")
    parser.add_argument("--run", required=True, help="the run folder, e.g. runs/my-dog")
    parser.add_argument("--step", type=int, default=None, help="a kept checkpoint's step (default: the final adapter)")
    parser.add_argument("--device", help="where to correct: cpu, cuda or cuda:N (default: the run's device)")
    parser.add_argument("--log-level", default="warning", help="debug, info, warning or error")
    args = parser.parse_args(argv)
    _logging(args.log_level)
    return _in_words(lambda: _export(args))


def _export(args: argparse.Namespace) -> int:
    """The zip of the run in --run (of the checkpoint of --step, corrected first), from the parsed flags."""
    from .exports import export_checkpoint, export_zip, kept_steps

    run = Run.open(args.run, device=args.device)
    run.callbacks += [ConsoleProgress(quiet=True), ProgressFile(run.dir / PROGRESS_LOG)]
    step = args.step
    if step is not None and step != run.settings.steps:
        if step not in kept_steps(run):
            raise ValueError(f"--step {step}: {run.dir.name} keeps checkpoints of steps "
                             f"{', '.join(str(s) for s in kept_steps(run)) or 'none'}")
        print(f"corrected adapters: {export_checkpoint(run, step)}")
    snippet = run.backend.export_snippet(run.output("correct"), run.info.get("plan"))
    print(f"zip: {export_zip(run, step, snippet)}")
    return 0
