"""Will it fit? Model id + run settings -> predicted GiB per phase, what fits the budget, and a ratio.

Glue between the catalogue (a weightless model and its ArchitectureSpec) and emloc.memory (the formulas).
`plan_run` feeds both `python launch.py plan` and the app's chart; after the first call for a model (which
builds it on the meta device, cached) a plan takes milliseconds.

Offload "auto" follows DESIGN.md "Memory": a phase that uses the full model holds it whole on the GPU when
that fits the budget, and streams it one block at a time from the CPU otherwise.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, fields, replace

from emloc.architecture import summarize
from emloc.memory import (METHODS, PHASES, RUNTIME_OVERHEAD_BYTES, GiB, MemoryPlan, MemorySettings, PhaseEstimate,
                          plan_memory)
from emloc.rules import check_ratio

from .catalogue import MetaModel, load_meta_model

RATIO_STEP = 0.01  # the recommendation searches ratios 0.01, 0.02, ..., 1.00
OFFLOAD_MODES = ("auto", "never", "always")
STREAMABLE = ("calibration", "emulator", "correction", "preview")  # EMLoC phases that can hold the full model whole
PHASE_NAMES = {"calibration": "calibration", "emulator": "emulator construction", "training": "training",
               "correction": "correction", "preview": "preview / inference"}
METHOD_NAMES = {"lora": "LoRA (full model)", "qlora": "QLoRA (NF4 base)", "inference": "plain inference"}


@dataclass
class PlanSettings(MemorySettings):
    """MemorySettings plus what planning adds: the budget, an optional fixed ratio and the offload policy."""

    budget_gb: float | None = field(
        default=None, metadata={"help": "GiB the run may use (a 24 GB card: 24); default: the detected GPU's total"})
    ratio: float | None = field(
        default=None, metadata={"help": "fraction of parameters kept, in (0, 1]; default: the recommended ratio"})
    offload: str = field(
        default="auto", metadata={"help": "auto (stream the full model only where it does not fit), never or always"})


@dataclass
class Plan:
    """Predicted peaks of one model at one setting, judged against a budget."""

    model_id: str
    display_name: str
    family: str
    ratio: float  # the ratio the EMLoC column is computed at
    recommended: float | None  # largest ratio at which every EMLoC phase fits (None: no budget, or nothing fits)
    reason: str  # why the recommendation is what it is, in words
    budget_bytes: int | None
    memory: MemoryPlan

    def get(self, phase: str, method: str) -> PhaseEstimate | None:
        return self.memory.get(phase, method)

    def fits(self, estimate: PhaseEstimate) -> bool | None:
        return None if self.budget_bytes is None else estimate.total <= self.budget_bytes

    def emloc_fits(self) -> bool | None:
        return None if self.budget_bytes is None else all(
            self.fits(e) for e in self.memory.estimates if e.method == "emloc")

    def to_markdown(self) -> str:
        return format_plan(self)

    def rows(self) -> list[dict]:
        """One plain dict per (phase, method) estimate, for a chart or JSON: GiB, fits, streamed, parts in GiB."""
        return [{"phase": e.phase, "method": e.method, "gib": e.total / GiB, "fits": self.fits(e),
                 "streamed": e.streamed, "parts_gib": {k: v / GiB for k, v in e.parts.items()}}
                for e in self.memory.estimates]


def detect_gpu() -> tuple[str, int] | None:
    """(name, total bytes) of CUDA device 0, or None on a machine without a usable GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return props.name, int(props.total_memory)


@functools.lru_cache(maxsize=16)
def _summary(model_id: str):
    meta: MetaModel = load_meta_model(model_id)
    return meta, summarize(meta.model, meta.arch)


def _memory_settings(settings: PlanSettings, ratio: float, offload: bool) -> MemorySettings:
    values = {f.name: getattr(settings, f.name) for f in fields(MemorySettings)}
    return MemorySettings(**{**values, "ratio": ratio, "offload": offload})


def _budget_bytes(budget_gb: float | None) -> int | None:
    if budget_gb is None:
        return None
    if isinstance(budget_gb, bool) or not isinstance(budget_gb, (int, float)) or not math.isfinite(budget_gb) or budget_gb <= 0:
        raise ValueError(f"budget must be a positive number of GiB (e.g. 24 for a 24 GB card); got {budget_gb!r}")
    return int(budget_gb * GiB)


def _plan_at(model_id: str, settings: PlanSettings, ratio: float, budget: int | None) -> MemoryPlan:
    """plan_memory with the offload policy resolved phase by phase."""
    meta, summary = _summary(model_id)
    streamed = plan_memory(summary, meta.arch, _memory_settings(settings, ratio, True))
    if settings.offload == "always":
        return streamed
    whole = plan_memory(summary, meta.arch, _memory_settings(settings, ratio, False))
    if settings.offload == "never" or budget is None:
        return whole
    chosen = []
    for est in whole.estimates:
        alternative = streamed.get(est.phase, est.method)
        use_stream = est.method == "emloc" and est.phase in STREAMABLE and est.total > budget
        chosen.append(alternative if use_stream and alternative is not None else est)
    return replace(whole, estimates=chosen)


def recommend_ratio(model_id: str, settings: PlanSettings, budget_bytes: int) -> tuple[float | None, str]:
    """The largest ratio on the RATIO_STEP grid at which every EMLoC phase fits `budget_bytes`, and why.

    Scans down from 1.0 and stops at the first ratio that fits, so the answer is the largest one by
    construction (no assumption that memory grows with the ratio).
    """
    steps = round(1 / RATIO_STEP)
    last_fail = None
    meta, summary = _summary(model_id)
    for i in range(steps, 0, -1):
        ratio = round(i * RATIO_STEP, 6)
        # a streamed phase never needs more than the same phase whole, so "some offload choice fits" is
        # "the streamed plan fits" (offload never: the whole plan)
        memory = plan_memory(summary, meta.arch, _memory_settings(settings, ratio, settings.offload != "never"))
        over = [e for e in memory.estimates if e.method == "emloc" and e.total > budget_bytes]
        if not over:
            if last_fail is None:
                return ratio, f"every EMLoC phase fits {gib(budget_bytes)} GiB even uncompressed (ratio 1.00)"
            name, need = last_fail
            return ratio, (f"largest ratio at which every EMLoC phase fits {gib(budget_bytes)} GiB; at "
                           f"{ratio + RATIO_STEP:.2f} {name} needs {gib(need)} GiB")
        worst = max(over, key=lambda e: e.total)
        last_fail = (PHASE_NAMES[worst.phase], worst.total)
    name, need = last_fail
    minimum = RUNTIME_OVERHEAD_BYTES
    return None, (f"no ratio fits {gib(budget_bytes)} GiB: even at ratio {RATIO_STEP:.2f} {name} needs {gib(need)} GiB "
                  f"(every phase also needs the {gib(minimum)} GiB runtime overhead); raise the budget, or lower "
                  "the batch size, sequence length or resolution")


def sweep_ratios(model_id: str, settings: PlanSettings, ratios: list[float] | None = None) -> list[tuple[float, dict[str, int]]]:
    """EMLoC's per-phase totals (bytes) at each ratio (default 0.05, 0.10, ..., 1.00), for the app's chart."""
    budget = _budget_bytes(settings.budget_gb)
    ratios = ratios or [round(0.05 * i, 2) for i in range(1, 21)]
    curve = []
    for ratio in ratios:
        memory = _plan_at(model_id, settings, check_ratio(ratio, "ratio"), budget)
        curve.append((ratio, {e.phase: e.total for e in memory.estimates if e.method == "emloc"}))
    return curve


def plan_run(model_id: str, settings: PlanSettings | None = None) -> Plan:
    """Per-phase peaks of EMLoC and of LoRA, QLoRA and plain inference for `model_id`, with a recommendation.

    Pure and fast after the first call for a model: no weights, no GPU, no downloads for catalogue ids.
    """
    settings = settings or PlanSettings()
    budget = _budget_bytes(settings.budget_gb)
    if settings.offload not in OFFLOAD_MODES:
        raise ValueError(f"offload must be one of {', '.join(OFFLOAD_MODES)}; got {settings.offload!r}")
    if settings.ratio is not None:
        check_ratio(settings.ratio, "--ratio")
    meta, _ = _summary(model_id)
    recommended, reason = (None, "no budget given: nothing to recommend")
    if settings.rules:
        reason = "your --rule ratios are used as given"
    elif budget is not None:
        recommended, reason = recommend_ratio(model_id, settings, budget)
    if settings.ratio is not None:
        ratio = settings.ratio
    elif budget is not None:
        ratio = recommended or RATIO_STEP  # nothing fits: show the smallest ratio, the closest to fitting
    else:
        ratio = MemorySettings.ratio
    memory = _plan_at(model_id, settings, ratio, budget)
    if settings.rules and budget is not None:
        worst = memory.peak("emloc")
        if worst.total > budget:
            reason = (f"with your --rule ratios {PHASE_NAMES[worst.phase]} needs {gib(worst.total)} GiB of "
                      f"{gib(budget)}; lower the rules' ratios or raise the budget")
    return Plan(meta.model_id, meta.display_name, meta.family, ratio, recommended, reason, budget, memory)


def gib(value: float) -> str:
    return f"{value / GiB:.2f}"


def _cell(plan: Plan, estimate: PhaseEstimate | None) -> str:
    if estimate is None:
        return ""
    mark = {True: " ok", False: " **over**", None: ""}[plan.fits(estimate)]
    return f"{gib(estimate.total)}{mark}{' (streamed)' if estimate.streamed else ''}"


def _ratio_words(plan: Plan) -> str:
    return "your rules" if plan.memory.settings.rules else f"ratio {plan.ratio:.2f}"


def format_plan(plan: Plan) -> str:
    """The plan as markdown: phase x method -> GiB, what fits, and the recommendation."""
    c = plan.memory.counts
    s = plan.memory.settings
    emulator = "with your rules" if s.rules else f"at ratio {plan.ratio:.2f}"
    size = (f"{c.full / 1e9:.2f} B parameters" + (" (transformer)" if plan.family == "flux" else "")
            + f"; emulator {emulator}: {c.emulator / 1e9:.2f} B ({c.factored_layers} layers factored"
            + (f", {c.dense_layers} kept dense" if c.dense_layers else "") + f"); LoRA rank {s.lora_rank}: "
            + f"{c.lora / 1e6:.1f} M")
    shape = (f"{s.resolution}x{s.resolution} px" if plan.family == "flux"
             else f"{s.seq_len} tokens ({s.image_tiles} image tiles)")
    budget = f"budget {gib(plan.budget_bytes)} GiB" if plan.budget_bytes is not None else "no budget"
    methods = METHODS  # emloc first, then the alternatives
    header = [f"EMLoC ({_ratio_words(plan)})"] + [METHOD_NAMES[m] for m in methods[1:]]
    lines = [f"**{plan.display_name}** (`{plan.model_id}`): {size}",
             f"{s.dtype}, batch {s.batch_size}, {shape}, {s.optimizer}, gradient checkpointing "
             f"{'on' if s.gradient_checkpointing else 'off'}; {budget}. Peak GiB per phase:", "",
             "| phase | " + " | ".join(header) + " |", "|---|" + "---:|" * len(methods)]
    for phase in PHASES:
        cells = [_cell(plan, plan.get(phase, m)) for m in methods]
        lines.append(f"| {PHASE_NAMES[phase]} | " + " | ".join(cells) + " |")
    peaks = [_cell(plan, plan.memory.peak(m)) for m in methods]
    lines.append("| **peak** | " + " | ".join(f"**{p.split(' ')[0]}**" + p[len(p.split(' ')[0]):] for p in peaks) + " |")
    lines.append("")
    if plan.recommended is not None:
        lines.append(f"Recommended ratio: **{plan.recommended:.2f}** ({plan.reason}).")
    else:
        lines.append(f"Recommended ratio: none ({plan.reason}).")
    if plan.memory.cpu_stats_bytes:
        lines.append(f"Calibration statistics (float32 Σxᵀx per compressed layer) take {gib(plan.memory.cpu_stats_bytes)} "
                     "GiB of CPU RAM.")
    lines.append(f"Every number includes {gib(RUNTIME_OVERHEAD_BYTES)} GiB runtime overhead (CUDA context, allocator "
                 "slack); 'streamed': one block on the GPU, the rest on the CPU. Formulas: emloc/memory.py.")
    return "\n".join(lines)
