"""The bodies of the five stages of a run (see machine.py); each writes only into the `out` folder it is given.

The run machine renames `out` into place when a body returns, so a body that fails or is cancelled
leaves nothing half-written. Training is the one long stage: it checkpoints every N steps and at its
last step into `checkpoints/step-N/` and starts from the last checkpoint when one exists (a crashed run,
or a finished one trained further). Every random choice of a step comes from a generator seeded with (seed, step), so a resumed run repeats the uninterrupted one.

This file is the recipe; its components live beside it: models.py (how a stage gets the emulator or the full
model), checkpoints.py (the checkpoint format and resume), variants.py (the models a preview compares).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn

import emloc
from emloc.checkpoint import CheckpointReader, map_large_allocations, return_freed_memory
from emloc.emulator import emulator_files

from .checkpoints import CHECKPOINT_NAME, resume, save_checkpoint, trim_loss_log
from .devices import MACHINE, distributed_state, new_accelerator, run_precision
from .models import Run, emulator_model, full_model_streamed, streams
from .progress import Progress, RunCancelled
from .settings import LOSS_LOG, PREVIEW_VARIANTS, parse_rules, sample_interval
from . import cards, variants
from .requests import strength_label

log = logging.getLogger(__name__)

SAMPLES = "samples"  # samples/step-N/: what the emulator + LoRA made at step N of training
SAMPLE_NOW = "sample-now"  # a file the app writes into the run folder: the next step is followed by a sample
STATS_FILE = "stats.safetensors"
GiB = 1024 ** 3


def compression_rules(run: Run) -> list[tuple[str, float]]:
    """The run's rules (`--rules`), or the backend's default layers at `--ratio`."""
    return parse_rules(run.settings.rules) or emloc.normalise_rules(run.backend.default_rules(run.settings.ratio))


def step_seed(seed: int, step: int) -> int:
    """The seed of one training step: a resumed run draws exactly what the uninterrupted one drew."""
    return (seed * 1_000_003 + step) % (2**63 - 1)


def _limited(run: Run, batches: Iterable[Any], limit: int, stage: str = "calibrate") -> Iterator[Any]:
    start = time.monotonic()
    for index, batch in enumerate(batches):
        if index >= limit:
            return
        run.check_cancel()
        yield batch
        done = index + 1
        eta = (time.monotonic() - start) / done * (limit - done)
        run.emit(Progress(stage, done, limit, eta=eta, message=f"preparing calibration sample {done} of {limit}"
                          if stage != "calibrate" else "calibrating on your data"))


def calibrate(run: Run, out: Path) -> None:
    """Σ xᵀx of every target layer's inputs over the user's own data, through the full model.

    A streamed run calibrates while it builds the emulator (see `emulate`); only a note is written here.
    """
    backend = run.backend
    if streams(run):
        (out / "calibration.json").write_text(json.dumps({
            "streamed": True, "batches": run.settings.calibration_samples,
            "note": "calibrated block by block while the emulator was built; statistics are not kept"}))
        return
    model = full_model_streamed(run)
    batches = _limited(run, backend.calibration_batches(), run.settings.calibration_samples)
    stats = emloc.collect_input_stats(model, batches, compression_rules(run), forward=backend.calibration_forward,
                                      stats_device="cpu", progress=False)
    run.save_tensors(out / STATS_FILE, stats)


def emulate(run: Run, out: Path) -> None:
    """The activation-aware low-rank emulator, saved with its per-layer report; the model stays in CPU
    memory and each layer is factorised on the device, one at a time."""
    backend, settings = run.backend, run.settings
    if streams(run):
        _emulate_streamed(run, out)
        return
    model = backend.load_model(torch.device("cpu"))
    stats = emloc.second_moments(run.load_tensors(run.output("calibrate") / STATS_FILE))
    report = emloc.build_emulator(model, compression_rules(run), stats, svd=settings.svd,
                                  compute_device=backend.device, progress=False, base_model=settings.model,
                                  kind=settings.emulator_kind)
    emloc.save_emulator(model, out, base_model=settings.model)
    (out / "report.json").write_text(json.dumps(report.to_dict(), indent=2))
    run.emit(Progress("emulate", 1, 1, message=emulator_message(report)))


def emulator_message(report: emloc.EmulatorReport) -> str:
    """What the emulate stage says it built, in the kind's words."""
    if report.kind == "nf4":
        return "emulator keeps every parameter of the compressed layers, in 4 bits (nf4)"
    stored = " (factors in 4 bits)" if report.kind == "lowrank-nf4" else ""
    return f"emulator keeps {report.ratio:.3f} of the model's parameters{stored}"


def _emulate_streamed(run: Run, out: Path) -> None:
    """Calibration and emulator construction in one pass, block by block from the checkpoint's files."""
    backend, settings = run.backend, run.settings
    map_large_allocations()  # freed blocks go back to the system at once, whatever the depth
    batches = list(_limited(run, backend.calibration_batches(), settings.calibration_samples, stage="emulate"))
    model = backend.skeleton()
    streamed = backend.blockwise(model, backend.checkpoint())

    def on_block(done: int, total: int) -> None:
        run.check_cancel()
        run.emit(Progress("emulate", done, total, message=f"calibrated and factored block {done} of {total}"))

    report = emloc.stream_emulator(streamed, batches, compression_rules(run), out, svd=settings.svd,
                                   base_model=settings.model, progress=False, on_block=on_block,
                                   kind=settings.emulator_kind)
    (out / "report.json").write_text(json.dumps(report.to_dict(), indent=2))
    run.emit(Progress("emulate", 1, 1, message=emulator_message(report)))


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
    """The precision recorded when the run was made (never `auto` resolved again on another machine)."""
    recorded = (run.info.get(MACHINE) or {}).get("mixed_precision")
    return recorded or run_precision(run.settings.mixed_precision, run.backend.device)[0]


LOSS_READS = 10  # on a GPU, the loss is read to the host (a sync) once per this many steps, not every step


def loss_read_interval(device: torch.device) -> int:
    """Steps between reads of the loss to the host: every step on the CPU, where a read costs nothing."""
    return LOSS_READS if device.type == "cuda" else 1


def train(run: Run, out: Path) -> None:
    """LoRA on the emulator; checkpoints every N steps, resumes from the last one, honours cancel."""
    backend, settings = run.backend, run.settings
    _class_images(run)  # prior preservation: the base model draws them first (once; a resume reads them)
    if settings.emulator_kind != "lowrank" or backend.device.type == "cpu":
        # a 4-bit emulator dequantises each layer's weight in every forward and backward and frees it again: served
        # from the heap (glibc raises its mmap threshold after the first free), the freed weights stay resident
        # between the step's activations. Measured on the CPU (benchmarks/streaming.py, FLUX 4+8, nf4): training
        # peaked at 1073 MiB, and at 884 MiB with large allocations in their own maps (planned 850).
        # On the CPU the step's activations are host memory too, and glibc's heap kept what each step freed: FLUX
        # width 1024 at 256 px (benchmarks/README.md, "Issue 29's phases") peaked at 1458 MiB (1+2 blocks, planned
        # 746) and 4869 MiB (4+12, planned 1506), 885 MiB at 1+2 with this; steps about 1.3x slower on the CPU
        map_large_allocations()
    model = emulator_model(run, backend.device)
    model.requires_grad_(False)
    if settings.gradient_checkpointing:
        backend.enable_gradient_checkpointing(model)
    torch.manual_seed(settings.seed)  # LoRA's A is drawn at random: the same --seed gives the same start
    peft_model = emloc.attach_lora(model, settings.lora(settings.lora_targets or backend.default_lora_targets()))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    for p in params:  # trainable weights in float32 even when the frozen model is bf16 (as diffusers' examples)
        p.data = p.data.float()
    optimizer = _optimizer(run, params)
    precision = _mixed_precision(run)
    accelerator = new_accelerator(backend.device, precision)
    peft_model, optimizer = accelerator.prepare(peft_model, optimizer)
    plain = accelerator.unwrap_model(peft_model)
    start = resume(run, plain, optimizer)
    loss_log = run.dir / LOSS_LOG
    if accelerator.is_main_process:
        trim_loss_log(loss_log, start)
    peft_model.train()
    backend.shard = (accelerator.process_index, accelerator.num_processes)  # --batch-size is per process
    every = sample_interval(settings)
    if accelerator.is_main_process and every and start == 0:
        _sample(run, plain, 0)  # the baseline: what the emulator makes before any training
    if accelerator.is_main_process and start == 0:
        _validate(run, plain, 0, loss_log, accelerator)  # the held-out data's baseline (see validation_due)
    began, saved = time.monotonic(), start
    read_every = loss_read_interval(backend.device)
    unread: list[tuple[int, torch.Tensor, float]] = []  # (step, loss on the device, seconds) not yet on the host

    def read_losses() -> None:
        """Bring the unread losses to the host in one sync: log them, report them, stop on a non-finite one (before
        any checkpoint holds the steps after it: checkpoints are written only right after a read)."""
        values = torch.stack([loss for _, loss, _ in unread]).float().tolist() if unread else []
        for (done, _, seconds), value in zip(unread, values):
            if not math.isfinite(value):
                raise ValueError(f"the training loss became {value} at step {done}: "
                                 + _nan_advice(precision))
            if accelerator.is_main_process:
                log_file.write(json.dumps({"step": done, "loss": value, "lr": settings.lr, "seconds": seconds}) + "\n")
            run.emit(Progress("train", done, settings.steps, loss=value,
                              eta=seconds / (done - start) * (settings.steps - done)))
        if accelerator.is_main_process:
            log_file.flush()
        unread.clear()

    with open(loss_log if accelerator.is_main_process else os.devnull, "a") as log_file:
        for step in range(start, settings.steps):
            if run.cancel_event.is_set():
                read_losses()
                if accelerator.is_main_process and step > saved:
                    save_checkpoint(run, plain, optimizer, step)
                raise RunCancelled(f"training cancelled at step {step}; resume the run to continue from there")
            seed = step_seed(settings.seed, step)  # one draw for the whole step's batch; each process keeps its rows
            torch.manual_seed(seed)  # LoRA dropout and anything else global
            generator = torch.Generator().manual_seed(seed)
            with accelerator.autocast():
                loss = backend.training_loss(peft_model, step, generator)
            reduced = accelerator.reduce(loss.detach(), reduction="mean")  # the loss of the whole batch
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            unread.append((done, reduced, round(time.monotonic() - began, 3)))
            checkpoint = done % settings.checkpoint_every == 0 and done < settings.steps
            sample = accelerator.is_main_process and (bool(every and done % every == 0) or (run.dir / SAMPLE_NOW).exists())
            if checkpoint or sample or done % read_every == 0 or done == settings.steps:
                read_losses()  # checkpoint and every-N steps are the same on every process: a non-finite loss
                # stops them all at one step
            else:  # the step count moves; its loss comes with the next read
                run.emit(Progress("train", done, settings.steps, eta=_eta(began, start, done, settings.steps)))
            if checkpoint and accelerator.is_main_process:
                save_checkpoint(run, plain, optimizer, done)
                saved = done
            if sample:
                (run.dir / SAMPLE_NOW).unlink(missing_ok=True)
                _sample(run, plain, done)
            if accelerator.is_main_process and validation_due(done, settings.steps, every, sample, checkpoint):
                log_file.flush()
                _validate(run, plain, done, loss_log, accelerator)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    save_checkpoint(run, plain, optimizer, settings.steps)  # the final state, optimizer included: a finished
    # run trained further (`train --resume --steps N`) goes on from here exactly
    emloc.write_adapter(emloc.adapter_state(plain), plain.peft_config["default"], out,
                        metadata={"emloc_base_model": settings.model, "emloc_steps": str(settings.steps)})


def validation_due(done: int, steps: int, every: int, sample: bool, checkpoint: bool) -> bool:
    """Whether the held-out data is scored after step `done`: at each sample round (Sample now's too) and the last
    step; without sample rounds (--sample-every 0) at each checkpoint as well, so that a person who held data
    out still sees a validation loss (step 0 is scored either way: the baseline)."""
    return done == steps or sample or (not every and checkpoint)


def _eta(began: float, start: int, done: int, steps: int) -> float:
    return (time.monotonic() - began) / (done - start) * (steps - done)


def _nan_advice(precision: str) -> str:
    advice = ("the learning rate is too high for this data; start a new run with a lower learning rate (a resume "
              "would repeat the same steps)")
    if precision == "fp16":  # float16's range is small: large activations overflow to inf whatever the rate
        advice += ("; this run trains in float16, which overflows on some models: --mixed-precision bf16 or no "
                   "may avoid it")
    return advice


def _sample(run: Run, model: nn.Module, step: int) -> None:
    """One round of samples from the training model into samples/step-N/ (the backend's preview requests, fixed
    seeds). It changes nothing training depends on: every step seeds its own draws, the model goes back to train
    mode, and what the backend loaded to sample (text encoders, VAE) is freed again."""
    backend = run.backend
    run.emit(Progress("train", step, run.settings.steps, message=f"sampling at step {step}"))
    final = run.dir / SAMPLES / f"step-{step:06d}"
    staging = final.with_name(final.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.eval()
    try:
        with torch.no_grad():
            backend.write_samples(staging, model)
    finally:
        model.train()
        backend.release()
        gc.collect()
    shutil.rmtree(final, ignore_errors=True)
    os.rename(staging, final)
    run.emit(Progress("train", step, run.settings.steps, message=f"samples of step {step} are ready"))


def _validate(run: Run, model: nn.Module, step: int, loss_log: Path, accelerator: Any) -> None:
    """The held-out data's scores at a sample round (and the last step), appended to the loss log as
    {"step", "validation_loss", ...} and reported; nothing when nothing is held out. No gradients, eval mode, at
    most the training batch per forward: within the training step's peak."""
    model.eval()
    try:
        with torch.no_grad(), accelerator.autocast():
            scores = run.backend.validation_scores(model)
    finally:
        model.train()
    if not scores:
        return
    with open(loss_log, "a") as log_file:
        log_file.write(json.dumps({"step": step, **scores}) + "\n")
    words = ", ".join(f"{name.replace('_', ' ')} {value:.4f}" for name, value in scores.items())
    run.emit(Progress("train", step, run.settings.steps, message=f"held-out data at step {step}: {words}"))


CLASS_IMAGES = "class-images"  # the run's class images drawn by the base model (prior preservation)


def _class_images(run: Run) -> None:
    """Draw the class images with the base model before training, held as the plan's preview holds it (a phase
    of the preview's memory: the planner's "class images"), into class-images/ (renamed into place when whole, so a
    resume finds them and draws none); then hand them to the backend."""
    backend, final = run.backend, run.dir / CLASS_IMAGES
    count = backend.class_images_to_draw()
    if not count:
        return
    if run.is_main and not final.exists():
        run.emit(Progress("train", 0, run.settings.steps, message=f"drawing {count} class images with the base model"))
        staging = final.with_name(final.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        model = variants.preview_variant(run, "base")
        model.eval()
        try:
            with torch.no_grad():
                backend.write_class_images(staging, model)
        finally:
            variants.finish_variant(model)
            del model
            backend.release()
            gc.collect()
            return_freed_memory()
            if backend.device.type == "cuda":
                torch.cuda.empty_cache()
        os.rename(staging, final)
    distributed_state(backend.device).wait_for_everyone()  # every process trains on the main one's drawings
    backend.use_class_images(final)


def samples(run_dir: Path) -> list[Path]:
    """The sample rounds of a run (samples/step-N), newest first."""
    folder = Path(run_dir) / SAMPLES
    found = [p for p in folder.iterdir() if CHECKPOINT_NAME.fullmatch(p.name) and p.is_dir()] if folder.is_dir() else []
    return sorted(found, key=lambda p: -int(CHECKPOINT_NAME.fullmatch(p.name).group(1)))


# -- correction and previews --------------------------------------------------------------------------------
def correct(run: Run, out: Path) -> None:
    """The LoRA corrected for the full model; both models stay on the CPU, one layer at a time on the device."""
    state, config = emloc.read_adapter(run.output("train"))
    correct_adapter(run, state, config, out)
    cards.stamp(run, out)  # the trigger word, prompts, base model and settings in every file, a card per adapter


def correct_adapter(run: Run, state: dict[str, torch.Tensor], config: Any, out: Path) -> None:
    """`state` (an adapter trained on the emulator, PEFT keys) corrected for the full model into `out/corrected`,
    as trained into `out/uncorrected`, and the backend's export formats beside them: the correct stage's body, also
    run for an intermediate checkpoint's adapter (exports.export_checkpoint)."""
    backend, settings = run.backend, run.settings
    reader = None
    full = backend.skeleton() if streams(run) else None
    if full is None:
        full, emulator = backend.load_model(torch.device("cpu")), emulator_model(run, "cpu")
    else:  # every layer (full, factored, dense) read from the files for its own turn: one layer of each model
        map_large_allocations()
        emulator = backend.skeleton()
        emloc.load_emulator(emulator, run.output("emulate"), device="meta")
        reader = backend.checkpoint().merged(CheckpointReader(emulator_files(run.output("emulate"))))
    corrected = emloc.correct_lora(full, emulator, state, emloc.lora_scaling(config), lam=settings.lam,
                                   compute_device=backend.device, progress=False, reader=reader)
    del full, emulator
    emloc.write_adapter(corrected, config, out / "corrected")
    emloc.write_adapter(state, config, out / "uncorrected")
    backend.export(out, corrected, state, config)


def preview(run: Run, out: Path) -> None:
    """The same requests through base, emulator + LoRA, full + corrected and full + uncorrected LoRA.

    The emulator runs first and the three full-model variants after it, back to back, so that they share what
    was read of the full model (variants.shared_weights: the model held in RAM once, blocks kept on the device);
    the previews are written in the usual order."""
    order = sorted(PREVIEW_VARIANTS, key=lambda label: label != "emulator + LoRA")
    loaders = {label: (lambda shared, label=label: variants.preview_variant(run, label, shared)) for label in order}
    outputs = _render(run, loaders, full=lambda label: label != "emulator + LoRA")
    files = run.backend.write_previews(out, {label: outputs[label] for label in PREVIEW_VARIANTS})
    run.emit(Progress("preview", len(PREVIEW_VARIANTS), len(PREVIEW_VARIANTS),
                      message="previews: " + ", ".join(f.name for f in files)))


GRID_FILE = "grid.json"  # in a strength grid's folder: its strengths and column labels, in order


def preview_grid(run: Run, out: Path, scales: list[float]) -> None:
    """A strength grid: every preview request (prompt and seed, or question) through the full model with the
    corrected LoRA at each strength in `scales` (variants.strength_variant; 0 is the base model), one variant at a
    time, sharing what was read of the full model as the previews' full variants do. Progress is reported per image
    (or answer) as stage "grid"; `grid.json` lists the strengths and their column labels."""
    labels = {strength_label(scale): scale for scale in scales}
    per_variant = run.backend.preview_count()
    total, done = per_variant * len(labels), 0

    def on_output() -> None:
        nonlocal done
        done += 1
        run.emit(Progress("grid", done, total, message=f"{current[0]}: image {done} of {total or '?'}"))
        run.check_cancel()  # Cancel stops between two images, not only between two strengths

    current = [""]

    def loader(label: str):
        def load(shared):
            current[0] = label
            return variants.strength_variant(run, labels[label], shared)
        return load

    run.backend.on_output = on_output
    try:
        run.emit(Progress("grid", 0, total, message="loading the models"))
        outputs = _render(run, {label: loader(label) for label in labels}, full=lambda label: True, announce=False)
    finally:
        run.backend.on_output = None
    run.backend.write_previews(out, outputs)
    (out / GRID_FILE).write_text(json.dumps({"scales": list(labels.values()), "labels": list(labels)}, indent=2))
    run.emit(Progress("grid", total, total, message=f"strength grid: {len(labels)} strengths"))


def _render(run: Run, loaders: dict, full, announce: bool = True) -> dict[str, list]:
    """{label: the backend's outputs} of each variant `loaders[label](shared)` builds, in order; the variants for
    which `full(label)` is true share one variants.shared_weights (created before the first of them). `announce`:
    a "preview" progress event per variant (a grid reports per image instead)."""
    outputs, shared = {}, None
    try:
        for index, (label, load) in enumerate(loaders.items()):
            run.check_cancel()
            if announce:
                run.emit(Progress("preview", index, len(loaders), message=f"preview: {label}"))
            if full(label) and shared is None:
                shared = variants.shared_weights(run)
            model = load(shared)
            model.eval()
            try:
                with torch.no_grad():
                    outputs[label] = run.backend.generate(model, label)
            finally:
                variants.finish_variant(model)
            del model
            gc.collect()
            return_freed_memory()  # the next variant must not stand on this one's freed heap
            if run.backend.device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        if shared is not None and isinstance(shared.reader, variants.CachedReader):
            shared.reader.close()  # unpinned before it is freed
        shared = None
        run.backend.release()  # the pipeline's text encoders and VAE leave the device with the stage
        gc.collect()
    return outputs
