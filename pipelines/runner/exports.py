"""The adapters of a run for download: a zip with a README.md, and the adapters of intermediate checkpoints.

A kept training checkpoint (`checkpoints/step-N/`) holds the adapter as trained on the emulator at step N;
`export_checkpoint` corrects it for the full model exactly as the correct stage does the final one, into
`exports/step-N/` (the same files, formats, metadata and model cards as `lora/`; cards.py). `export_zip` packs
the adapters of one step with a README.md that says what each file is, the trigger word and how to load each.
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

from .cards import README, readme, stamp, stamped
from .checkpoints import CHECKPOINT_NAME, CHECKPOINTS
from .models import Run
from .progress import Progress

EXPORTS = "exports"  # exports/step-N/: an intermediate checkpoint's adapters, corrected (same layout as lora/)


def kept_steps(run: Run) -> list[int]:
    """The steps of the run's kept training checkpoints, oldest first."""
    folder = run.dir / CHECKPOINTS
    found = [int(m.group(1)) for p in folder.iterdir() if (m := CHECKPOINT_NAME.fullmatch(p.name))
             and (p / "adapter.safetensors").is_file()] if folder.is_dir() else []
    return sorted(found)


def adapter_folder(run: Run, step: int | None) -> Path:
    """Where the adapters of `step` are (None or the last step: lora/; else exports/step-N/)."""
    if step is None or step == run.settings.steps:
        return run.output("correct")
    return run.dir / EXPORTS / f"step-{step:06d}"


def export_checkpoint(run: Run, step: int) -> Path:
    """Correct the adapter of the kept checkpoint `step` for the full model, as the correct stage corrects the final
    one, into exports/step-N/ (corrected/, uncorrected/, the backend's formats, metadata and cards); returns it."""
    from . import stages

    source = run.dir / CHECKPOINTS / f"step-{step:06d}" / "adapter.safetensors"
    if not source.is_file():
        kept = ", ".join(str(s) for s in kept_steps(run)) or "none"
        raise FileNotFoundError(f"{run.dir.name} keeps no checkpoint of step {step} (kept: {kept})")
    final = adapter_folder(run, step)
    if (final / "corrected").is_dir():
        return final
    if not run.output("emulate").is_dir():
        raise FileNotFoundError(f"{run.dir.name} no longer has its emulator, so step {step}'s LoRA cannot be corrected "
                                f"for the full model; only the uncorrected emulator LoRA is available: {source}")
    try:
        run.backend.check_model()
    except (ValueError, OSError) as err:
        raise FileNotFoundError(f"the base model cannot be read here ({err}), so step {step}'s LoRA cannot be "
                                f"corrected for the full model; only the uncorrected emulator LoRA is available: "
                                f"{source}") from None
    import emloc
    from safetensors.torch import load_file

    _, config = emloc.read_adapter(run.output("train"))  # every checkpoint has the final adapter's shape
    staging = final.with_name(final.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    run.emit(Progress("correct", 0, 1, message=f"correcting the LoRA of step {step} for the full model"))
    with run._lock():
        stages.correct_adapter(run, load_file(str(source)), config, staging)
        stamp(run, staging, step)
        staging.rename(final)
    run.emit(Progress("correct", 1, 1, message=f"step {step}: corrected adapters in {final}"))
    return final


def export_zip(run: Run, step: int | None = None, snippet: str = "") -> Path:
    """`<run>/export/<run>-step-N.zip`: the adapters of `step` (None: the final ones) with a README.md, made once."""
    folder = adapter_folder(run, step)
    if not (folder / "corrected").is_dir():
        raise FileNotFoundError(f"step {step} of {run.dir.name} is not corrected yet; correct it first")
    shown = run.settings.steps if step is None else step
    target = run.dir / "export" / f"{run.dir.name}-step-{shown:06d}.zip"
    if target.exists():
        return target
    if not stamped(folder):
        stamp(run, folder, shown)  # a run corrected before exports carried metadata
    target.parent.mkdir(exist_ok=True)
    staging = target.with_name(target.name + ".partial")
    with zipfile.ZipFile(staging, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(README, readme(run, folder, shown, snippet))
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".tmp")):
            if path.relative_to(folder).as_posix() != README:  # a backend's own lora/README.md: the zip's says more
                archive.write(path, path.relative_to(folder).as_posix())
    staging.rename(target)
    return target
