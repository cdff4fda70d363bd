"""Training checkpoints: the folder format (`checkpoints/step-N/`: adapter.safetensors, optimizer.pt, state.json),
writing one atomically, and resuming from the newest whole one (damaged ones are set aside, never deleted)."""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path

import torch
from torch import nn

import emloc

from .models import Run
from .progress import Progress

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"


CHECKPOINT_NAME = re.compile(r"step-(\d+)")


def checkpoints(run: Run) -> list[Path]:
    """Finished checkpoints of the run (folders `step-N` holding state.json), oldest first; leftovers such as
    `step-N.tmp` or a damaged `step-N.damaged` are not checkpoints."""
    folder = run.dir / CHECKPOINTS
    found = [p for p in folder.iterdir() if CHECKPOINT_NAME.fullmatch(p.name) and p.is_dir()
             and (p / "state.json").is_file()] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(CHECKPOINT_NAME.fullmatch(p.name).group(1)))


def save_checkpoint(run: Run, peft_model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    final = run.dir / CHECKPOINTS / f"step-{step:06d}"
    if final.exists():
        return
    state = emloc.adapter_state(peft_model)
    if not all(torch.isfinite(t).all() for t in state.values()):  # a resume from it would only repeat the failure
        raise ValueError(f"the LoRA weights became NaN or infinite by step {step}: the learning rate is too high "
                         "for this data; start a new run with a lower learning rate")
    staging = final.with_name(final.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    run.save_tensors(staging / "adapter.safetensors", state)
    torch.save(optimizer.state_dict(), staging / "optimizer.pt")
    (staging / "state.json").write_text(json.dumps({"step": step}))
    os.rename(staging, final)
    for old in checkpoints(run)[:-run.settings.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)


class DamagedCheckpoint(ValueError):
    """A checkpoint that cannot be resumed from; the message says what is wrong with it."""


def _device_error(err: RuntimeError) -> bool:
    """A RuntimeError about a device (CUDA missing, out of memory, a driver fault), which says nothing about the
    checkpoint: classing it "damaged" would set aside checkpoints that are whole."""
    words = str(err).lower()
    return any(w in words for w in ("cuda", "device", "out of memory", "hip", "mps"))


def read_checkpoint(folder: Path, peft_model: nn.Module, optimizer: torch.optim.Optimizer
                     ) -> tuple[int, dict[str, torch.Tensor], dict]:
    """(step, adapter state, optimizer state) of a checkpoint, all checked before anything is loaded."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        step = json.loads((folder / "state.json").read_text())["step"]
        adapter = load_file(str(folder / "adapter.safetensors"))
        # onto the CPU whatever device wrote it (a GPU run's Adam moments are tagged cuda:N, which a process
        # without that GPU cannot rebuild); load_state_dict then moves each state to its parameter's device
        saved = torch.load(folder / "optimizer.pt", weights_only=True, map_location="cpu")
    except (OSError, ValueError, KeyError, TypeError, EOFError, RuntimeError, SafetensorError, pickle.UnpicklingError) as err:
        if isinstance(err, RuntimeError) and _device_error(err):  # this machine's fault, not the checkpoint's
            raise
        raise DamagedCheckpoint(f"unreadable: {type(err).__name__}: {str(err)[:200]}") from None
    if not isinstance(step, int) or step != int(CHECKPOINT_NAME.fullmatch(folder.name).group(1)):
        raise DamagedCheckpoint(f"state.json says step {step!r}")
    expected = emloc.adapter_state(peft_model)
    if set(adapter) != set(expected) or any(adapter[k].shape != expected[k].shape for k in expected):
        raise DamagedCheckpoint("its adapter does not match this run's LoRA layers")
    if not all(torch.isfinite(t).all() for t in adapter.values()):
        raise DamagedCheckpoint("its adapter holds NaN or infinite values")
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not isinstance(groups, list) or [len(g.get("params", ())) for g in groups] != \
            [len(g["params"]) for g in optimizer.param_groups]:
        raise DamagedCheckpoint("its optimizer state does not match this run's LoRA")
    return step, adapter, saved


def resume(run: Run, peft_model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Load the newest checkpoint that is whole; damaged ones are set aside (`step-N.damaged`), with a message."""
    from peft.utils import set_peft_model_state_dict

    found = checkpoints(run)
    for folder in reversed(found):
        try:
            step, adapter, saved = read_checkpoint(folder, peft_model, optimizer)
        except DamagedCheckpoint as err:
            aside = folder.with_name(folder.name + ".damaged")
            shutil.rmtree(aside, ignore_errors=True)
            try:
                os.rename(folder, aside)
            except FileNotFoundError:  # another process of this run (torchrun) set it aside first
                pass
            message = f"skipped the damaged checkpoint {folder.name} ({err}); kept it as {aside.name}"
            log.warning("%s", message)
            run.emit(Progress("train", 0, 0, message=message))
            continue
        set_peft_model_state_dict(peft_model, adapter)
        optimizer.load_state_dict(saved)
        run.emit(Progress("train", 0, 0, message=f"resuming from checkpoint {folder.name} (step {step})"))
        return step
    if found:
        run.emit(Progress("train", 0, 0, message="no usable checkpoint is left; training starts again from step 0"))
    return 0


def trim_loss_log(path: Path, step: int) -> None:
    """Keep only the log lines up to `step` (a crash may have logged steps past the last checkpoint)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
