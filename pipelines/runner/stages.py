"""The bodies of the five stages of a run (see machine.py); each writes only into the `out` folder it is given.

The run machine renames `out` into place when a body returns, so a body that fails or is cancelled
leaves nothing half-written. Training is the one long stage: it checkpoints every N steps into
`checkpoints/step-N/` and starts from the last checkpoint when one exists. Every random choice of a
step comes from a generator seeded with (seed, step), so a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import pickle
import re
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol

import torch
from torch import nn

import emloc

from .backend import Backend
from .progress import Progress, RunCancelled
from .settings import LOSS_LOG, PREVIEW_VARIANTS, RunSettings, parse_rules

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STATS_FILE = "stats.safetensors"


class Run(Protocol):
    """What a stage body uses of the run machine (machine.Run provides it; the bodies never import it)."""

    dir: Path
    backend: Backend
    cancel_event: Any  # threading.Event

    @property
    def settings(self) -> RunSettings: ...
    def output(self, stage: str) -> Path: ...
    def emit(self, event: Progress) -> None: ...
    def check_cancel(self) -> None: ...
    def save_tensors(self, path: Path, tensors: dict[str, torch.Tensor]) -> None: ...
    def load_tensors(self, path: Path) -> dict[str, torch.Tensor]: ...


def compression_rules(run: Run) -> list[tuple[str, float]]:
    """The run's rules (`--rules`), or the backend's default layers at `--ratio`."""
    return parse_rules(run.settings.rules) or emloc.normalise_rules(run.backend.default_rules(run.settings.ratio))


def step_seed(seed: int, step: int) -> int:
    """The seed of one training step: a resumed run draws exactly what the uninterrupted one drew."""
    return (seed * 1_000_003 + step) % (2**63 - 1)


def emulator_model(run: Run, device: torch.device | str) -> nn.Module:
    """A fresh model with the run's emulator layers swapped in; the full model never reaches `device`."""
    model = run.backend.load_model(torch.device("cpu"))
    emloc.load_emulator(model, run.output("emulate"), device="cpu")
    return model.to(device)


def full_model_streamed(run: Run) -> nn.Module:
    """The full model for a forward-only pass: on the device, or (--offload) kept in CPU memory with each
    layer's weights moved to the device only while that layer runs (accelerate's cpu_offload hooks)."""
    backend = run.backend
    if not run.settings.offload:
        return backend.load_model(backend.device)
    from accelerate import cpu_offload

    return cpu_offload(backend.load_model(torch.device("cpu")), execution_device=backend.device)


def _limited(run: Run, batches: Iterable[Any], limit: int) -> Iterator[Any]:
    start = time.monotonic()
    for index, batch in enumerate(batches):
        if index >= limit:
            return
        run.check_cancel()
        yield batch
        done = index + 1
        eta = (time.monotonic() - start) / done * (limit - done)
        run.emit(Progress("calibrate", done, limit, eta=eta, message="calibrating on your data"))


def calibrate(run: Run, out: Path) -> None:
    """Σ xᵀx of every target layer's inputs over the user's own data, through the full model."""
    backend = run.backend
    model = full_model_streamed(run)
    batches = _limited(run, backend.calibration_batches(), run.settings.calibration_samples)
    stats = emloc.collect_input_stats(model, batches, compression_rules(run), forward=backend.calibration_forward,
                                      stats_device="cpu", progress=False)
    run.save_tensors(out / STATS_FILE, stats)


def emulate(run: Run, out: Path) -> None:
    """The activation-aware low-rank emulator, saved with its per-layer report; the model stays in CPU
    memory and each layer is factorised on the device, one at a time."""
    backend, settings = run.backend, run.settings
    model = backend.load_model(torch.device("cpu"))
    stats = emloc.second_moments(run.load_tensors(run.output("calibrate") / STATS_FILE))
    report = emloc.build_emulator(model, compression_rules(run), stats, svd=settings.svd,
                                  compute_device=backend.device, progress=False, base_model=settings.model)
    emloc.save_emulator(model, out, base_model=settings.model)
    (out / "report.json").write_text(json.dumps(report.to_dict(), indent=2))
    run.emit(Progress("emulate", 1, 1, message=f"emulator keeps {report.ratio:.3f} of the model's parameters"))


# -- training -----------------------------------------------------------------------------------------------
def _optimizer(run: Run, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    settings = run.settings
    if settings.optimizer == "adamw8bit":
        if run.backend.device.type != "cuda":
            raise ValueError("--optimizer adamw8bit needs a CUDA GPU (bitsandbytes); use --optimizer adamw on this machine")
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=settings.lr, weight_decay=settings.weight_decay)
    if settings.optimizer == "adafactor":  # row and column second moments per matrix (emloc/memory.py's formula)
        return torch.optim.Adafactor(params, lr=settings.lr, weight_decay=settings.weight_decay)
    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)


def _mixed_precision(run: Run) -> str:
    if run.settings.mixed_precision != "auto":
        return run.settings.mixed_precision
    return "bf16" if run.backend.device.type == "cuda" else "no"


CHECKPOINT_NAME = re.compile(r"step-(\d+)")


def checkpoints(run: Run) -> list[Path]:
    """Finished checkpoints of the run (folders `step-N` holding state.json), oldest first; leftovers such as
    `step-N.tmp` or a damaged `step-N.damaged` are not checkpoints."""
    folder = run.dir / CHECKPOINTS
    found = [p for p in folder.iterdir() if CHECKPOINT_NAME.fullmatch(p.name) and p.is_dir()
             and (p / "state.json").is_file()] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(CHECKPOINT_NAME.fullmatch(p.name).group(1)))


def _save_checkpoint(run: Run, peft_model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
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


def _read_checkpoint(folder: Path, peft_model: nn.Module, optimizer: torch.optim.Optimizer
                     ) -> tuple[int, dict[str, torch.Tensor], dict]:
    """(step, adapter state, optimizer state) of a checkpoint, all checked before anything is loaded."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        step = json.loads((folder / "state.json").read_text())["step"]
        adapter = load_file(str(folder / "adapter.safetensors"))
        saved = torch.load(folder / "optimizer.pt", weights_only=True)
    except (OSError, ValueError, KeyError, TypeError, EOFError, RuntimeError, SafetensorError, pickle.UnpicklingError) as err:
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


def _resume(run: Run, peft_model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Load the newest checkpoint that is whole; damaged ones are set aside (`step-N.damaged`), with a message."""
    from peft.utils import set_peft_model_state_dict

    found = checkpoints(run)
    for folder in reversed(found):
        try:
            step, adapter, saved = _read_checkpoint(folder, peft_model, optimizer)
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


def _trim_loss_log(path: Path, step: int) -> None:
    """Keep only the log lines up to `step` (a crash may have logged steps past the last checkpoint)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def train(run: Run, out: Path) -> None:
    """LoRA on the emulator; checkpoints every N steps, resumes from the last one, honours cancel."""
    from accelerate import Accelerator

    backend, settings = run.backend, run.settings
    model = emulator_model(run, backend.device)
    model.requires_grad_(False)
    if settings.gradient_checkpointing:
        backend.enable_gradient_checkpointing(model)
    torch.manual_seed(settings.seed)  # the LoRA's initial A: the same in every run with this seed
    torch.manual_seed(settings.seed)  # LoRA's A is drawn at random: the same --seed gives the same start
    peft_model = emloc.attach_lora(model, settings.lora(settings.lora_targets or backend.default_lora_targets()))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    for p in params:  # trainable weights in float32 even when the frozen model is bf16 (as diffusers' examples)
        p.data = p.data.float()
    optimizer = _optimizer(run, params)
    accelerator = Accelerator(mixed_precision=_mixed_precision(run), cpu=backend.device.type == "cpu")
    peft_model, optimizer = accelerator.prepare(peft_model, optimizer)
    plain = accelerator.unwrap_model(peft_model)
    start = _resume(run, plain, optimizer)
    loss_log = run.dir / LOSS_LOG
    if accelerator.is_main_process:
        _trim_loss_log(loss_log, start)
    peft_model.train()
    backend.shard = (accelerator.process_index, accelerator.num_processes)  # --batch-size is per process
    began, saved = time.monotonic(), start
    with open(loss_log if accelerator.is_main_process else os.devnull, "a") as log_file:
        for step in range(start, settings.steps):
            if run.cancel_event.is_set():
                if accelerator.is_main_process and step > saved:
                    _save_checkpoint(run, plain, optimizer, step)
                raise RunCancelled(f"training cancelled at step {step}; resume the run to continue from there")
            seed = step_seed(settings.seed, step)  # one draw for the whole step's batch; each process keeps its rows
            torch.manual_seed(seed)  # LoRA dropout and anything else global
            generator = torch.Generator().manual_seed(seed)
            with accelerator.autocast():
                loss = backend.training_loss(peft_model, step, generator)
            value = float(accelerator.reduce(loss.detach(), reduction="mean"))  # the loss of the whole batch
            if not math.isfinite(value):
                raise ValueError(f"the training loss became {value} at step {step + 1}: the learning rate is too high "
                                 "for this data; start a new run with a lower learning rate (a resume would repeat "
                                 "the same steps)")
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            elapsed = time.monotonic() - began
            if accelerator.is_main_process:
                log_file.write(json.dumps({"step": done, "loss": value, "lr": settings.lr, "seconds": round(elapsed, 3)}) + "\n")
                log_file.flush()
                if done % settings.checkpoint_every == 0 and done < settings.steps:
                    _save_checkpoint(run, plain, optimizer, done)
                    saved = done
            eta = elapsed / (done - start) * (settings.steps - done)
            run.emit(Progress("train", done, settings.steps, loss=value, eta=eta))
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    emloc.write_adapter(emloc.adapter_state(plain), plain.peft_config["default"], out,
                        metadata={"emloc_base_model": settings.model, "emloc_steps": str(settings.steps)})


# -- correction and previews --------------------------------------------------------------------------------
def correct(run: Run, out: Path) -> None:
    """The LoRA corrected for the full model; both models stay on the CPU, one layer at a time on the device."""
    backend, settings = run.backend, run.settings
    state, config = emloc.read_adapter(run.output("train"))
    full = backend.load_model(torch.device("cpu"))
    emulator = emulator_model(run, "cpu")
    corrected = emloc.correct_lora(full, emulator, state, emloc.lora_scaling(config), lam=settings.lam,
                                   compute_device=backend.device, progress=False)
    del full, emulator
    emloc.write_adapter(corrected, config, out / "corrected")
    emloc.write_adapter(state, config, out / "uncorrected")
    backend.export(out, corrected, state, config)


def _variant(run: Run, label: str) -> nn.Module:
    backend, lora = run.backend, run.output("correct")
    if label == "base":
        return backend.load_model(backend.device)
    if label == "emulator + LoRA":
        return emloc.load_adapter(emulator_model(run, backend.device), run.output("train"))
    folder = lora / ("corrected" if label == "full + corrected LoRA" else "uncorrected")
    return emloc.load_adapter(backend.load_model(backend.device), folder)


def preview(run: Run, out: Path) -> None:
    """The same requests through base, emulator + LoRA, full + corrected and full + uncorrected LoRA."""
    outputs = {}
    for index, label in enumerate(PREVIEW_VARIANTS):
        run.check_cancel()
        run.emit(Progress("preview", index, len(PREVIEW_VARIANTS), message=f"preview: {label}"))
        model = _variant(run, label)
        model.eval()
        with torch.no_grad():
            outputs[label] = run.backend.generate(model, label)
        del model
        if run.backend.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
    files = run.backend.write_previews(out, outputs)
    run.emit(Progress("preview", len(PREVIEW_VARIANTS), len(PREVIEW_VARIANTS),
                      message="previews: " + ", ".join(f.name for f in files)))
