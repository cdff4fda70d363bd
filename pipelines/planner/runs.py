"""The plan of one run, made before its folder exists: the run machine asks for it (registry.PLANNER), follows
its choice of what to stream, and refuses a run that no choice fits, naming the phase and the shortfall.

The run's own settings become the planner's (model, dtype, ratio or rules, LoRA rank and targets, optimizer,
batch, calibration samples; the backend adds its shape: resolution and T5 tokens, or tokens and tiles), and the
budgets are the run's: `--gpu-gb` (default: the device's free memory) and `--ram-gb` (default: the RAM available
now). A model the planner cannot read (not in the catalogue, not a local folder it knows) is not planned.
"""

from __future__ import annotations

import logging
from typing import Any

import psutil
import torch

from emloc.memory import CUDA_CONTEXT_BYTES, GiB
from pipelines.runner.settings import RunSettings, parse_rules, sample_interval

from .catalogue import load_meta_model
from .planning import PHASE_NAMES, PlanSettings, plan_run

log = logging.getLogger(__name__)


def budgets(run: RunSettings, device: torch.device) -> tuple[float | None, float]:
    """(GPU GiB or None on a CPU run, RAM GiB) the run may use."""
    ram = run.ram_gb or psutil.virtual_memory().available / GiB
    if device.type != "cuda":
        return None, ram
    if run.gpu_gb:
        return run.gpu_gb, ram
    return default_gpu_budget(device) / GiB, ram


def default_gpu_budget(device: torch.device) -> int:
    """Bytes of GPU memory the run may plan for when `--gpu-gb` is not given.

    `mem_get_info` reports what is free *after* this process created its CUDA context (the call creates it) and
    after what its caching allocator already reserved; every planned phase counts the context again
    (emloc.memory.CUDA_CONTEXT_BYTES in its overhead). So the budget is free + reserved-by-us + that context
    estimate: a plan equal to it fills what is free, without counting the context twice."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) + CUDA_CONTEXT_BYTES)


def plan_settings(run: RunSettings, backend: Any) -> PlanSettings:
    device = backend.device
    dtype = str(getattr(backend, "dtype", torch.float32)).replace("torch.", "")
    gpu, ram = budgets(run, device)
    return PlanSettings(
        device="cuda" if device.type == "cuda" else "cpu", dtype=dtype, ratio=run.ratio,
        rules=tuple(parse_rules(run.rules)), lora_rank=run.rank, lora_targets=tuple(run.lora_targets),
        optimizer=run.optimizer, batch_size=run.batch_size, gradient_checkpointing=run.gradient_checkpointing,
        calibration_samples=run.calibration_samples, keep_statistics=run.keep_statistics,
        keep_checkpoints=run.keep_checkpoints, samples=bool(sample_interval(run)), budget_gb=gpu, ram_gb=ram,
        emulator_kind=run.emulator_kind,
        **backend.memory_shape())


def plan_for_run(run: RunSettings, backend: Any) -> dict | None:
    """The run's plan as run.json keeps it: per phase what streams and the predicted peaks (GiB), or None when the
    model cannot be planned. Raises ValueError, in words, when a phase does not fit the budgets."""
    try:
        load_meta_model(run.model)
    except (ValueError, OSError) as err:
        log.warning("the planner cannot read %s (%s); this run is not checked against the memory budgets",
                    run.model, err)
        return None
    settings = plan_settings(run, backend)
    plan = plan_run(run.model, settings)
    short = plan.shortfall()
    if short:
        cpu = settings.device == "cpu"
        raise ValueError(
            f"this run does not fit this machine: {short}, even reading the model block by block from its files. "
            "Lower the compression ratio (--ratio) or the LoRA rank (--rank), use fewer calibration samples, a "
            "smaller resolution or shorter samples, or raise the budget (--ram-gb" + (")" if cpu else " / --gpu-gb)")
            + (f"; the planner recommends ratio {plan.recommended:.2f}" if plan.recommended else ""))
    phases = {}
    for e in plan.memory.estimates:
        if e.method == "emloc":
            mode = ("offload" if e.offloaded else "files") if e.streamed else "whole"
            phases[e.phase] = {"name": PHASE_NAMES[e.phase], "streamed": e.streamed, "mode": mode,
                               "device_gib": round(e.total / GiB, 3), "host_gib": round(e.host_total / GiB, 3)}
            if e.phase == "preview" and e.streamed:
                phases[e.phase].update(_blocks_kept(settings, e))
    return {"device": settings.device, "gpu_budget_gib": settings.budget_gb, "ram_budget_gib": round(settings.ram_gb, 3),
            "phases": phases, "run_folder_gib": round(plan.memory.run_folder_bytes / GiB, 3)}


def _blocks_kept(settings, e) -> dict:
    """What a streamed preview holds beyond its one block, counted in its plan: it reads the next block ahead and
    keeps blocks between forwards in half of what the budget leaves (pipelines/runner/variants.py), on the device
    (the host on a CPU run) and, on a GPU run, blocks kept in half of the RAM left. The other halves stay free."""
    gpu = settings.device == "cuda"
    device_base, host_base = e.total / GiB, e.host_total / GiB
    device_budget = settings.budget_gb if gpu else settings.ram_gb
    kept = max(0.0, (device_budget - (device_base if gpu else host_base)) / 2) if device_budget else 0.0
    kept_host = max(0.0, (settings.ram_gb - host_base) / 2) if gpu and settings.ram_gb else 0.0
    if gpu:
        return {"blocks_kept_gib": round(kept, 3), "blocks_kept_host_gib": round(kept_host, 3),
                "device_gib": round(device_base + kept, 3), "host_gib": round(host_base + kept_host, 3)}
    return {"blocks_kept_gib": round(kept, 3), "host_gib": round(host_base + kept, 3),
            "device_gib": round(device_base + kept, 3)}
