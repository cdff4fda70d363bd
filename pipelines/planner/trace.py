"""A second opinion on the plan: the run's own code on fake tensors at the real model's size (issue 26).

`trace_plan(model, budget_gb)` builds the backend the run would build, at the plan's ratio and settings, and runs
its phases on tensors with shapes and no data (emloc/trace.py), on a stand-in GPU ("gpu") where the run uses the
GPU and on the CPU where it uses the host. No weights are read and no GPU is needed; the model's structure comes
from the catalogue's config (or a local folder's). Each phase reports its traced peak beside the planner's formula
(emloc/memory.py through planning.plan_run):

    training                emloc.attach_lora on the emulator, backend.enable_gradient_checkpointing, the stage's
                            optimizer (stages._optimizer), two backend.training_loss + backward + optimizer steps
                            (the second beside the optimizer's state), then (FLUX) a validation round on one
                            held-out photo (backend.validation_loss, no grad)
    correction              emloc.correct_lora with a reader over the full model and the emulator (stages.correct's
                            streamed path)
    calibration + emulator  emloc.stream_emulator over backend.blockwise(...) on backend.calibration_batches()
                            (stages._emulate_streamed; InternVL through the StatsCollector.select_tokens seam)
    preview                 variants.preview_variant for each variant in the plan's preview mode (trace_preview.py:
                            FLUX, two denoising steps and the VAE's decode; InternVL, the prefill and two generated
                            tokens)

Not traced: InternVL's vision tower in the preview (the image tokens' placement depends on the token ids' values),
the denoising steps and generated tokens beyond two (each only replaces the latents or adds one token to the KV
cache), and export, which loads no model (backend.export converts the adapters on the host; the app's Export step
zips files).

What cannot run on fake tensors gets a stand-in with the recorded shapes: the checkpoint's files (a `ShapeReader`),
the run's cache (text embeddings, latents, token ids: `_fill_cache`), the backend's skeleton (the catalogue's
build at the traced depth) and the emulator's structure (what load_emulator(..., device="meta") builds from the
run's files: `_emulator_on_meta`).

Depth. A block stack's blocks are alike, and every phase streams or checkpoints them one at a time, so a phase's
peak is affine in each stack's depth: peak(L) = peak(1, ..., 1) + Σ_s (L_s - 1)·Δ_s, Δ_s being what one more block
of stack s adds (its weights, its LoRA and optimizer state, its checkpointed input, its factors). Each phase is traced
at depth 1 per stack and at depth 2 in each stack in turn, and extrapolated; tests/test_trace.py checks the
extrapolation against a deeper trace.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

import emloc
from emloc.calibration import StatsCollector
from emloc.trace import ShapeReader, materialize_fake, trace_device, traced

from .trace_inputs import _emulator_on_meta, _fill_cache, _lora_dtype
from .catalogue import _find_entry, _read_folder, backend_of, meta_model_from_bundle
from .planning import PlanSettings, plan_run

log = logging.getLogger(__name__)

GiB = 1024 ** 3
PHASES = ("emulator", "training", "correction", "preview")  # every phase that holds a model (export holds none)
PHASE_NAMES = {"emulator": "calibration + emulator (one streamed pass)", "training": "training step",
               "correction": "correction (streamed)", "preview": "preview (each variant: 2 steps + VAE decode, or prefill + 2 tokens)"}


@dataclass
class PhaseTrace:
    """One phase: the planner's formula and the trace, in bytes, on the device and on the host."""

    phase: str
    formula_device: int  # the planner's `allocated` (its total minus the CUDA runtime overhead)
    traced_device: int  # peak bytes of live tensors on the stand-in GPU
    formula_host: int  # the planner's host total minus the process's own runtime
    traced_host: int  # peak bytes of live tensors on the CPU (file pages and the interpreter are not tensors)
    how: str = ""  # what ran, and how it was scaled to full depth
    depths: dict[str, int] = field(default_factory=dict)

    @property
    def device_ratio(self) -> float:
        """formula / trace on the device (1.0 = equal; above 1: the formula is above the trace)."""
        return self.formula_device / max(1, self.traced_device)


# -- the model at a chosen depth ---------------------------------------------------------------------------------
def _bundle(model_id: str) -> dict:
    entry = _find_entry(model_id)
    if entry is not None:
        return json.loads(entry.asset.read_text())
    folder = Path(model_id).expanduser()
    if folder.is_dir():
        return _read_folder(folder)
    raise ValueError(f"--trace needs a catalogue model or a local folder; {model_id!r} is neither")


def _stacks(bundle: dict) -> dict[str, tuple[dict, str]]:
    """{stack name: (the config dict holding its depth, the depth's key)} of a bundle."""
    if bundle["family"] == "flux":
        config = bundle["components"]["transformer"]
        return {"transformer_blocks": (config, "num_layers"), "single_transformer_blocks": (config, "num_single_layers")}
    config = bundle["config"]
    return {"vision": (config["vision_config"], "num_hidden_layers"), "language": (config["text_config"], "num_hidden_layers")}


def _at_depth(bundle: dict, depths: dict[str, int]) -> dict:
    shallow = json.loads(json.dumps(bundle))
    for name, (config, key) in _stacks(shallow).items():
        config[key] = depths[name]
    return shallow


# -- the run, as the run machine would set it up --------------------------------------------------------------------
@dataclass
class _Setup:
    """What every phase needs: the plan's settings as run settings, and a backend built for the stand-in GPU."""

    model_id: str
    family_backend: str
    bundle: dict
    plan: PlanSettings
    ratio: float
    preview: object = None  # the plan's preview estimate (its mode: trace_preview.preview_mode_of)

    def run_settings(self):
        from pipelines.runner.settings import RunSettings

        p = self.plan
        return RunSettings(model=self.model_id, ratio=self.ratio, rank=p.lora_rank, batch_size=p.batch_size,
                           optimizer=p.optimizer, gradient_checkpointing=p.gradient_checkpointing,
                           calibration_samples=p.calibration_samples)

    def backend(self, depths: dict[str, int]):
        """The family's backend, its device the stand-in GPU, its skeleton the catalogue's build at `depths`."""
        from pipelines.runner.registry import backend_class

        cls = backend_class(self.family_backend)
        settings = cls.settings_class()
        if self.bundle["family"] == "flux":
            settings.resolution = self.plan.resolution
            settings.max_sequence_length = self.plan.text_tokens or int(self.bundle.get("max_sequence_length", 512))
        # built for CUDA, so the backend picks the dtype a GPU run gets; then pointed at the stand-in GPU
        backend = cls(self.run_settings(), settings, torch.device("cuda"))
        backend.device = trace_device()
        bundle = _at_depth(self.bundle, depths)
        backend.skeleton = lambda: _skeleton(bundle)
        return backend


def _skeleton(bundle: dict) -> nn.Module:
    model, _ = meta_model_from_bundle(bundle)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval().requires_grad_(False)


# -- the phases: each returns (device peak, host peak) in bytes ----------------------------------------------------
def _trace_training(setup: _Setup, backend) -> tuple[int, int]:
    """stages.train's first two steps: the emulator (+ LoRA) on the device, the stage's optimizer, two steps (the
    optimizer's state exists from the first step's end: a one-step trace missed it beside the backward)."""
    import types

    from pipelines.runner import stages

    run_settings = backend.run
    model = _emulator_on_meta(backend.skeleton(), backend.default_rules(setup.ratio))
    model.requires_grad_(False)
    peft_model = emloc.attach_lora(model, run_settings.lora(run_settings.lora_targets or backend.default_lora_targets()))
    with traced() as counter:
        materialize_fake(peft_model, backend.device, backend.dtype, dtype_of=_lora_dtype)
        _fill_cache(setup, backend)
        if run_settings.gradient_checkpointing:
            backend.enable_gradient_checkpointing(model)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = stages._optimizer(types.SimpleNamespace(settings=run_settings, backend=backend), params)
        for group in optimizer.param_groups:  # torch picks the foreach kernels for real CUDA tensors; fakes are
            group.setdefault("foreach", None)  # another type, so it would fall back to the per-tensor loop
            group["foreach"] = True if group["foreach"] is None else group["foreach"]
        peft_model.train()
        for step in range(2):  # the second step's backward runs beside the optimizer's state, as every later one
            loss = backend.training_loss(peft_model, step, torch.Generator().manual_seed(step))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del loss
        if hasattr(backend, "validation_loss"):  # a validation round (stages._validate; the planner adds nothing
            # for it, as it stays under a step): no-grad forwards of --batch-size rows beside the optimizer's state
            _hold_out(backend)
            peft_model.eval()
            with torch.no_grad():
                backend.validation_loss(peft_model)
    return counter.peak.get(backend.device.type, 0), counter.peak.get("cpu", 0)


def _hold_out(backend) -> None:
    """One held-out photo in the stand-in cache: a copy of its first training entry with the role "validation"."""
    latents = backend._latents()
    latents.append({**latents[0], "role": "validation"})


def _adapter(setup: _Setup, backend, model: nn.Module) -> tuple[dict[str, torch.Tensor], object]:
    """The trained adapter as read_adapter returns it (float32, on the host) and its LoraConfig. Inside traced()."""
    run_settings = backend.run
    targets = run_settings.lora_targets or backend.default_lora_targets()
    config = emloc.lora_config(model, run_settings.lora(targets))
    state = {}
    for name in emloc.lora_target_names(model, targets):
        module = model.get_submodule(name)
        state[f"base_model.model.{name}.lora_A.weight"] = torch.empty(run_settings.rank, module.in_features)
        state[f"base_model.model.{name}.lora_B.weight"] = torch.empty(module.out_features, run_settings.rank)
    return state, config


def _trace_correction(setup: _Setup, backend) -> tuple[int, int]:
    """stages.correct on a streamed run: both models skeletons, every layer read for its own turn."""
    full = backend.skeleton()
    emulator = _emulator_on_meta(backend.skeleton(), backend.default_rules(setup.ratio))
    # the checkpoint's tensors and the emulator's factors, as the files hold them (the run's dtype)
    reader = ShapeReader.of_module(full, backend.dtype).merged(ShapeReader.of_module(emulator, backend.dtype))
    with traced() as counter:
        state, config = _adapter(setup, backend, full)
        emloc.correct_lora(full, emulator, state, emloc.lora_scaling(config), lam=backend.run.lam,
                           compute_device=backend.device, progress=False, reader=reader)
    return counter.peak.get(backend.device.type, 0), counter.peak.get("cpu", 0)


def _write_nothing(tensors, path, metadata=None) -> None:
    """stream_emulator's `save` in a dry run: the factors have shapes and no values."""


def _trace_emulator(setup: _Setup, backend) -> tuple[int, int]:
    """stages.emulate on a streamed run (_emulate_streamed): calibration and emulator construction in one pass, its
    token selection (InternVL's mask of real tokens) filled by `_every_token`."""
    model = backend.skeleton()
    reader = ShapeReader.of_module(model, backend.dtype)
    run = _RunView(backend)
    real_select = StatsCollector.select_tokens
    StatsCollector.select_tokens = staticmethod(_every_token)
    try:
        return _trace_pass(setup, backend, model, reader, run)
    finally:
        StatsCollector.select_tokens = real_select


def _every_token(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """StatsCollector's token selection in a dry run: every token (what a mask of real tokens keeps at most), a
    shape that does not depend on the mask's values."""
    return x.reshape(-1, x.shape[-1])


def _trace_pass(setup: _Setup, backend, model, reader, run) -> tuple[int, int]:
    """emloc.stream_emulator over backend.blockwise on the cache's calibration batches, traced."""
    import itertools
    import tempfile

    from pipelines.runner.stages import compression_rules

    with traced() as counter, tempfile.TemporaryDirectory() as out:
        _fill_cache(setup, backend)
        batches = list(itertools.islice(backend.calibration_batches(), backend.run.calibration_samples))
        streamed = backend.blockwise(model, reader)
        emloc.stream_emulator(streamed, batches, compression_rules(run), out, svd=backend.run.svd,
                              base_model=backend.run.model, progress=False, save=_write_nothing)
        del batches, streamed
    return counter.peak.get(backend.device.type, 0), counter.peak.get("cpu", 0)


def _trace_preview(setup: _Setup, backend) -> tuple[int, int]:
    """The preview phase (pipelines/planner/trace_preview.py)."""
    from .trace_preview import trace_preview

    return trace_preview(setup, backend)


@dataclass
class _RunView:
    """What stages.compression_rules reads of a run."""

    backend: object

    @property
    def settings(self):
        return self.backend.run


# phases a family's code cannot run on fake tensors yet, and why
UNTRACEABLE: dict[str, dict[str, str]] = {}

TRACERS: dict[str, Callable[[_Setup, object], tuple[int, int]]] = {
    "emulator": _trace_emulator, "training": _trace_training, "correction": _trace_correction,
    "preview": _trace_preview}


def _extrapolated(setup: _Setup, tracer, full: dict[str, int],
                  start: int = 1) -> tuple[int, int, dict[str, tuple[int, int]]]:
    """(device, host) peak at depth `full`, from traces at depth `start` per stack and `start` + 1 in each stack in
    turn (a stack shallower than `start` is traced at its own depth)."""
    base = {name: min(start, depth) for name, depth in full.items()}
    peaks = {"base": tracer(setup, setup.backend(base))}
    device, host = peaks["base"]
    for name, depth in full.items():
        if depth == base[name]:
            continue
        deeper = tracer(setup, setup.backend({**base, name: base[name] + 1}))
        peaks[name] = deeper
        device += (depth - base[name]) * (deeper[0] - peaks["base"][0])
        host += (depth - base[name]) * (deeper[1] - peaks["base"][1])
    return device, host, peaks


# The depth a phase's extrapolation starts from: a forward without grad (the preview) frees the embedding's output
# once a second block has run, so its peak steps up from 1 block to 2 and is affine only from 2 on (InternVL3-38B:
# +20 MiB from 1 to 2 language blocks, +0 from 2 to 3 and 3 to 4; extrapolated from 1 it was 1.2 GiB too high)
START_DEPTH = {"preview": 2}


def plan_settings(budget_gb: float | None = None, ram_gb: float | None = None, ratio: float | None = None,
                  **shape) -> PlanSettings:
    """The planner's settings of a trace: the budgets, a ratio (None: the recommended one) and run shape fields.
    The trace runs the low-rank emulator's code, so its plan is lowrank's unless a kind is given."""
    shape = {**shape, "emulator_kind": shape.get("emulator_kind") or "lowrank"}
    return PlanSettings(budget_gb=budget_gb, ram_gb=ram_gb, ratio=ratio, **shape)


def trace_plan(model: str, budget_gb: float | None = None, ram_gb: float | None = None, ratio: float | None = None,
               phases: tuple[str, ...] = PHASES, **shape) -> list[PhaseTrace]:
    """Trace each phase of the run `launch.py plan` would plan (`model` at `budget_gb` / `ram_gb`, at `ratio` or the
    recommended one) and set the planner's formula beside it. `shape`: PlanSettings fields (resolution, seq_len,
    lora_rank, optimizer, ...). Raises ValueError for a model outside the catalogue that is no local folder, and
    when no ratio fits the budget and none is given."""
    settings = plan_settings(budget_gb, ram_gb, ratio, **shape)
    if settings.device == "cpu":
        raise ValueError("--trace traces a GPU run; plan a CPU run without it (benchmarks/memory.py measures those)")
    unknown = [p for p in phases if p not in TRACERS]
    if unknown:
        raise ValueError(f"cannot trace {', '.join(unknown)} yet; traced phases: {', '.join(TRACERS)}")
    plan = plan_run(model, settings)
    chosen = ratio if ratio is not None else plan.recommended
    if chosen is None:
        raise ValueError(f"no ratio fits {model} in {budget_gb} GiB; give one with --ratio to trace it anyway")
    plan = plan if ratio is not None else plan_run(model, replace(settings, ratio=chosen))
    bundle = _bundle(model)
    setup = _Setup(plan.model_id, backend_of(bundle), bundle, settings, chosen, plan.get("preview", "emloc"))
    full = {name: int(config[key]) for name, (config, key) in _stacks(bundle).items()}
    results = []
    for phase in phases:
        if phase in UNTRACEABLE.get(bundle["family"], ()):
            log.warning("%s: %s is not traced: %s", model, phase, UNTRACEABLE[bundle["family"]][phase])
            continue
        began = time.monotonic()
        start = START_DEPTH.get(phase, 1)
        device, host, _ = _extrapolated(setup, TRACERS[phase], full, start)
        estimate = plan.get(phase, "emloc")
        if phase == "emulator":  # one streamed pass calibrates and builds: its peak is the larger of the two
            estimate = max((plan.get("calibration", "emloc"), estimate), key=lambda e: e.allocated)
        host_formula = estimate.host_total - estimate.host.get("runtime", 0)
        results.append(PhaseTrace(phase, estimate.allocated, device, host_formula, host,
                                  how=f"traced at depth {start} and {start + 1} per stack, extrapolated to {full} "
                                      f"({time.monotonic() - began:.1f} s)", depths=full))
    return results


def format_traces(model: str, budget_gb: float | None, traces: list[PhaseTrace]) -> str:
    """A markdown table: phase x (formula, traced) on the device and on the host, in GiB."""
    rows = [f"Traced on fake tensors (no weights, no GPU): {model}"
            + (f" at {budget_gb:g} GiB" if budget_gb is not None else ""),
            "", "| phase | device: formula | device: traced | formula / traced | host: formula | host: traced |",
            "|---|---:|---:|---:|---:|---:|"]
    for t in traces:
        rows.append(f"| {PHASE_NAMES[t.phase]} | {t.formula_device / GiB:.2f} | {t.traced_device / GiB:.2f} | "
                    f"{t.device_ratio:.3f} | {t.formula_host / GiB:.2f} | {t.traced_host / GiB:.2f} |")
    rows += ["", ("Device: the planner's allocated bytes (its total minus the CUDA runtime overhead) against the peak "
                  "of live tensors on the stand-in GPU. Host: the planner's host total minus the process runtime "
                  "against the peak of live CPU tensors (file pages are not tensors).")]
    return "\n".join(rows)


def trace_in_subprocess(model: str, budget_gb: float, ratio: float | None = None,
                        phases: tuple[str, ...] = PHASES, timeout: float = 600) -> list[PhaseTrace]:
    """`trace_plan` in its own process (see `main` for why), for callers that must outlive it (the app's Budget
    step). Raises ValueError with the planner's words when the model cannot be planned."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    command = [sys.executable, "-m", "pipelines.planner.trace", str(model), f"{budget_gb:g}",
               "" if ratio is None else f"{ratio:g}", ",".join(phases)]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=timeout, check=False)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    errors = [row["error"] for row in rows if "error" in row]
    if errors:
        raise ValueError(errors[0])
    if not rows:
        raise RuntimeError(f"the trace of {model} ended without a result (exit {done.returncode}): "
                           f"{done.stderr.strip()[-500:]}")
    return [PhaseTrace(**row) for row in rows]


def main(argv: list[str] | None = None) -> int:
    """`python -m pipelines.planner.trace MODEL BUDGET_GB [RATIO]`: the traces as JSON lines, one per phase.

    The process ends with `os._exit`: torch's Python device guard (the stand-in GPU's) can abort an exiting
    interpreter while the autograd engine's device thread shuts down, after all output is written; a caller
    that wants the numbers without that risk runs this in a subprocess (tests/test_trace.py does)."""
    import os
    import sys
    from dataclasses import asdict

    args = list(sys.argv[1:] if argv is None else argv)
    model, budget = args[0], float(args[1])
    ratio = float(args[2]) if len(args) > 2 and args[2] else None
    phases = tuple(args[3].split(",")) if len(args) > 3 else PHASES
    try:
        traces = trace_plan(model, budget, ratio=ratio, phases=phases)
        code = 0
    except ValueError as err:
        print(json.dumps({"error": str(err)}))
        traces, code = [], 2
    for t in traces:
        print(json.dumps(asdict(t)))
    sys.stdout.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
