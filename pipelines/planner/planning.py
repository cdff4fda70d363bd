"""Will it fit? Model id + run settings -> predicted GiB per phase, what fits the budget, and a ratio.

Glue between the catalogue (a weightless model and its ArchitectureSpec) and emloc.memory (the formulas).
`plan_run` feeds both `python launch.py plan` and the app's chart; after the first call for a model (which
builds it on the meta device, cached) a plan takes milliseconds.

Offload "auto" is what the run machine does (pipelines/runner/stages.py and variants.py): calibration, emulator construction,
training's emulator build and correction always read the full model block by block (or layer by layer) from the
checkpoint's files; the preview holds the full model whole when that fits both budgets and streams it from the
files otherwise. Two budgets: the device's (`budget_gb`, a GPU's memory) and the host's (`ram_gb`, this machine's
RAM); on a CPU run (`device="cpu"`) the host is the device and `ram_gb` is the one budget.

The recommendation picks the emulator kind too (`recommend_kind`), unless `emulator_kind` is given. Its rule: of the
candidates that fit (lowrank at its largest fitting ratio, lowrank-nf4 at its largest fitting ratio, nf4), the one
that keeps the most parameters of the compressed layers (the ratio; nf4 keeps all of them), and at equal parameters
the most bits per parameter (16 for lowrank, 4 for the NF4 kinds); a candidate that leaves the planner's headroom
beats one that only fits the bare budget. Why: a 4-bit copy of a weight keeps every direction of it with a small,
known error (NF4 on Gaussian weights: ≈9% relative, tests/test_quantized.py), while truncating to a fraction of the
parameters drops whole directions of the weight, which no choice of bits brings back; so more parameters kept wins
over more bits per parameter, and bits decide between equals (ratio 1 lowrank, the model itself, beats nf4). The
planner has no weights, so it cannot measure the errors themselves; the quality benchmark (benchmarks/quality.py,
issue 27 item 3) compares the kinds on the demos.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, fields, replace

from emloc.architecture import summarize
from emloc.memory import (METHODS, PHASES, RUNTIME_OVERHEAD_BYTES, GiB, MemoryPlan, MemorySettings, PhaseEstimate,
                          plan_memory, stream_tokens)
from emloc.quantized import check_kind
from emloc.rules import check_ratio

from .catalogue import MetaModel, load_meta_model
from .preview_time import preview_time_line

RATIO_STEP = 0.01  # the recommendation searches ratios 0.01, 0.02, ..., 1.00
HEADROOM_FRACTION = 0.05  # the recommendation keeps max(5% of the GPU budget, 0.5 GiB) free: headroom_bytes
HEADROOM_MIN_BYTES = GiB // 2
OFFLOAD_MODES = ("auto", "never", "always")
STREAMABLE = ("calibration", "emulator", "correction", "preview")  # EMLoC phases that can hold the full model whole
PHASE_NAMES = {"embeddings": "prompt embeddings", "calibration": "calibration", "emulator": "emulator construction", "training": "training",
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
        default="auto", metadata={"help": "auto (as the run does: stream from the files, the preview only where the "
                                          "whole model does not fit), never or always"})
    ram_gb: float | None = field(
        default=None, metadata={"help": "GiB of host RAM the run may use; default: no host budget (the run itself "
                                        "defaults to the memory available when it starts)"})
    emulator_kind: str | None = field(
        default=None, metadata={"help": "lowrank, nf4 or lowrank-nf4 (emloc/quantized.py); default: the recommended "
                                        "kind when a budget is given, else lowrank"})


@dataclass
class Plan:
    """Predicted peaks of one model at one setting, judged against a budget."""

    model_id: str
    display_name: str
    family: str
    ratio: float  # the ratio the EMLoC column is computed at
    recommended: float | None  # largest ratio at which every EMLoC phase fits (None: no budget, or nothing fits)
    reason: str  # why the recommendation is what it is, in words
    budget_bytes: int | None  # the device's budget (None: none; a CPU run has only the host's)
    memory: MemoryPlan
    ram_bytes: int | None = None  # the host's budget
    kind: str = "lowrank"  # the emulator kind the EMLoC column is computed for (given, or recommended)
    candidates: dict = field(default_factory=dict)  # recommend_kind's: kind -> {"ratio", "headroom", "reason"}
    recommended_kind: str | None = None  # the kind recommend_kind chose (None: the kind was given, or no budget)

    def get(self, phase: str, method: str) -> PhaseEstimate | None:
        return self.memory.get(phase, method)

    def device_fits(self, estimate: PhaseEstimate) -> bool | None:
        return None if self.budget_bytes is None else estimate.total <= self.budget_bytes

    def host_fits(self, estimate: PhaseEstimate) -> bool | None:
        return None if self.ram_bytes is None else estimate.host_total <= self.ram_bytes

    def fits(self, estimate: PhaseEstimate) -> bool | None:
        """Both budgets hold (None: neither is given)."""
        return _fits(estimate, self.budget_bytes, self.ram_bytes)

    def emloc_fits(self) -> bool | None:
        return None if self.budget_bytes is None and self.ram_bytes is None else all(
            self.fits(e) for e in self.memory.estimates if e.method == "emloc")

    def to_markdown(self) -> str:
        return format_plan(self)

    def rows(self) -> list[dict]:
        """One plain dict per (phase, method) estimate, for a chart or JSON: GiB, fits, streamed, parts in GiB."""
        return [{"phase": e.phase, "method": e.method, "gib": e.total / GiB, "fits": self.fits(e),
                 "host_gib": e.host_total / GiB, "host_fits": self.host_fits(e), "device_fits": self.device_fits(e),
                 "streamed": e.streamed, "parts_gib": {k: v / GiB for k, v in e.parts.items()},
                 "host_parts_gib": {k: v / GiB for k, v in e.host.items()}}
                for e in self.memory.estimates]

    def shortfall(self) -> str | None:
        """In words, the first EMLoC phase that does not fit and by how much; None when every phase fits."""
        for e in self.memory.estimates:
            if e.method != "emloc":
                continue
            if self.device_fits(e) is False:
                return (f"{PHASE_NAMES[e.phase]} needs {amount(e.total)} of GPU memory, "
                        f"{amount(e.total - self.budget_bytes)} more than the {amount(self.budget_bytes)} budget")
            if self.host_fits(e) is False:
                return (f"{PHASE_NAMES[e.phase]} needs {amount(e.host_total)} of RAM, "
                        f"{amount(e.host_total - self.ram_bytes)} more than the {amount(self.ram_bytes)} budget")
        return None


def _fits(estimate: PhaseEstimate, budget: int | None, ram: int | None) -> bool | None:
    if budget is None and ram is None:
        return None
    return (budget is None or estimate.total <= budget) and (ram is None or estimate.host_total <= ram)


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


def _memory_settings(settings: PlanSettings, ratio: float, offload: bool, kind: str | None = None) -> MemorySettings:
    values = {f.name: getattr(settings, f.name) for f in fields(MemorySettings)}
    kind = kind or settings.emulator_kind or MemorySettings.emulator_kind
    return MemorySettings(**{**values, "ratio": ratio, "offload": offload, "emulator_kind": kind})


def _budget_bytes(budget_gb: float | None, what: str = "the GPU budget") -> int | None:
    if budget_gb is None:
        return None
    if isinstance(budget_gb, bool) or not isinstance(budget_gb, (int, float)) or not math.isfinite(budget_gb) or budget_gb <= 0:
        raise ValueError(f"{what} must be a positive number of GiB (e.g. 24 for a 24 GB card, 32 for 32 GB of RAM); "
                         f"got {budget_gb!r}")
    return int(budget_gb * GiB)


def _budgets(settings: PlanSettings) -> tuple[int | None, int | None]:
    """(device budget, host budget) in bytes; a CPU run's device is the host, so it has the host budget only."""
    ram = _budget_bytes(settings.ram_gb, "the RAM budget")
    if settings.device == "cpu":
        return None, ram if ram is not None else _budget_bytes(settings.budget_gb)
    return _budget_bytes(settings.budget_gb), ram


def _plan_at(model_id: str, settings: PlanSettings, ratio: float, budget: int | None,
             ram: int | None = None, kind: str | None = None) -> MemoryPlan:
    """plan_memory with the offload policy resolved phase by phase, as the run machine resolves it."""
    meta, summary = _summary(model_id)
    streamed = plan_memory(summary, meta.arch, _memory_settings(settings, ratio, True, kind))
    if settings.offload == "always":
        return streamed
    whole = plan_memory(summary, meta.arch, _memory_settings(settings, ratio, False, kind))
    if settings.offload == "never":
        return whole
    chosen = []
    for est in streamed.estimates:
        alternative = whole.get(est.phase, est.method)
        offloaded = streamed.preview_offloaded
        if (est.phase == "preview" and est.method == "emloc" and offloaded is not None
                and _fits(alternative, budget, ram) is False and _fits(offloaded, budget, ram) is not False):
            chosen.append(offloaded)  # whole does not fit the GPU, but RAM holds it: faster than the files
            continue
        # the run streams every phase from the files but the preview, which holds the whole model when it fits
        keep_whole = (est.method != "emloc" or (est.phase == "preview" and _fits(alternative, budget, ram) is not False)
                      or (settings.keep_statistics and est.phase in ("calibration", "emulator")))  # the two-step path
        chosen.append(alternative if keep_whole and alternative is not None else est)
    return replace(streamed, estimates=chosen)


def headroom_bytes(budget_bytes: int) -> int:
    """GPU memory a recommended ratio leaves unplanned: max(HEADROOM_FRACTION of the budget, HEADROOM_MIN_BYTES).

    For what the plan cannot know: its own error (every term is a formula; reviews/gpu-path.md F9 found the old
    recommendations 0.01-0.09 GiB under the budget), other processes on the GPU, a driver's display buffers."""
    return max(int(HEADROOM_FRACTION * budget_bytes), HEADROOM_MIN_BYTES)


def _largest_fitting(model_id: str, settings: PlanSettings, budget: int | None, ram: int | None,
                     limit: int | None, kind: str | None = None) -> tuple[float | None, str | None]:
    """(largest ratio on the grid at which every EMLoC phase stays within `limit` on the GPU and `ram` on the host,
    what failed at the next ratio up (None: ratio 1 fits)); `budget` (the bare GPU budget) resolves the offload
    choices as the run resolves them."""
    last_fail = None
    grid = [NF4_RATIO] if kind == "nf4" else [round(i * RATIO_STEP, 6) for i in range(round(1 / RATIO_STEP), 0, -1)]
    for ratio in grid:
        memory = _plan_at(model_id, settings, ratio, budget, ram, kind)
        over = [e for e in memory.estimates if e.method == "emloc" and _fits(e, limit, ram) is False]
        if not over:
            return ratio, last_fail
        worst = over[0]
        if limit is not None and worst.total > limit:
            last_fail = f"{PHASE_NAMES[worst.phase]} needs {gib(worst.total)} GiB of GPU memory"
        else:
            last_fail = f"{PHASE_NAMES[worst.phase]} needs {gib(worst.host_total)} GiB of RAM"
    return None, last_fail


def recommend_ratio(model_id: str, settings: PlanSettings, budget_bytes: int | None,
                    ram_bytes: int | None = None, kind: str | None = None) -> tuple[float | None, str]:
    """The largest ratio on the RATIO_STEP grid at which every EMLoC phase fits both budgets, leaving
    `headroom_bytes` of the GPU budget free, and why. When no ratio leaves that headroom, the largest ratio that
    fits the bare budget, said so in the reason.

    Scans down from 1.0 and stops at the first ratio that fits, so the answer is the largest one by
    construction (no assumption that memory grows with the ratio).
    """
    budget_words = " and ".join(w for w in (budget_bytes and f"{gib(budget_bytes)} GiB of GPU memory",
                                            ram_bytes and f"{gib(ram_bytes)} GiB of RAM") if w)
    headroom = headroom_bytes(budget_bytes) if budget_bytes is not None else 0
    spare = f", leaving {gib(headroom)} GiB of the GPU free" if headroom else ""
    limit = budget_bytes - headroom if budget_bytes is not None else None
    ratio, last_fail = _largest_fitting(model_id, settings, budget_bytes, ram_bytes, limit, kind)
    if ratio is None and headroom:
        ratio, last_fail = _largest_fitting(model_id, settings, budget_bytes, ram_bytes, budget_bytes, kind)
        spare = (f", but no ratio leaves the {gib(headroom)} GiB of headroom the planner keeps for its own error "
                 "(a tight fit: lower the LoRA rank, batch size, resolution or sequence length for room)")
    if ratio is not None:
        if (kind or settings.emulator_kind) == "nf4":
            return ratio, (f"every EMLoC phase fits {budget_words}{spare} with the compressed layers whole in 4 bits "
                           "(nf4: the ratio only picks the layers)")
        if last_fail is None:
            return ratio, f"every EMLoC phase fits {budget_words}{spare} even uncompressed (ratio 1.00)"
        return ratio, (f"largest ratio at which every EMLoC phase fits {budget_words}{spare}; at "
                       f"{ratio + RATIO_STEP:.2f} {last_fail}")
    overhead = (f" (every phase also needs the {gib(RUNTIME_OVERHEAD_BYTES)} GiB runtime overhead at least)"
                if budget_bytes is not None else "")
    return None, (f"no ratio fits {budget_words}: even at ratio {RATIO_STEP:.2f} {last_fail}{overhead}; raise the "
                  "budget, or lower the LoRA rank, batch size, sequence length or resolution")


NF4_RATIO = 0.5  # the ratio an nf4 plan is made at: below 1, so every compressed layer is quantised (any such ratio
# gives the same nf4 emulator; 1 keeps the layers dense)
KIND_BITS = {"lowrank": 16, "nf4": 4, "lowrank-nf4": 4}  # bits per kept parameter (lowrank: bf16; its float32 ties)


def kind_score(kind: str, ratio: float) -> tuple[float, int]:
    """(fraction of the compressed layers' parameters kept, bits per kept parameter): the larger keeps more of the
    model (the module docstring says why parameters come first)."""
    return (1.0 if kind == "nf4" else ratio), KIND_BITS[kind]


def recommend_kind(model_id: str, settings: PlanSettings, budget_bytes: int | None,
                   ram_bytes: int | None = None) -> tuple[str, float | None, str, dict]:
    """(kind, ratio, why, candidates) for a budget: each kind's recommend_ratio, then the rule of the module
    docstring. `candidates`: kind -> {"ratio", "headroom" (fits leaving the planner's headroom), "reason"}. When no
    kind fits, lowrank's answer (the smallest ratio's shortfall) is returned with ratio None."""
    from emloc.quantized import EMULATOR_KINDS

    candidates = {}
    for kind in EMULATOR_KINDS:
        ratio, why = recommend_ratio(model_id, settings, budget_bytes, ram_bytes, kind)
        candidates[kind] = {"ratio": ratio, "headroom": ratio is not None and "no ratio leaves" not in why,
                            "reason": why}
    fitting = [k for k, c in candidates.items() if c["ratio"] is not None]
    if not fitting:
        return "lowrank", None, candidates["lowrank"]["reason"], candidates
    best = max(fitting, key=lambda k: (candidates[k]["headroom"], *kind_score(k, candidates[k]["ratio"])))
    others = "; ".join(f"{k} " + (("fits" if k == "nf4" else f"fits up to ratio {c['ratio']:.2f}")
                                  if c["ratio"] is not None else "does not fit")
                       for k, c in candidates.items() if k != best)
    kept = "every parameter of the compressed layers, in 4 bits" if best == "nf4" else \
        f"{candidates[best]['ratio']:.2f} of the compressed layers' parameters" + \
        (" (factors in 4 bits)" if best == "lowrank-nf4" else "")
    why = (f"emulator kind {best}: it keeps the most of the model at this budget ({kept}; {others}); "
           f"{candidates[best]['reason']}")
    return best, candidates[best]["ratio"], why, candidates


def sweep_ratios(model_id: str, settings: PlanSettings, ratios: list[float] | None = None,
                 kind: str | None = None) -> list[tuple[float, dict[str, int]]]:
    """EMLoC's per-phase totals (bytes) at each ratio (default 0.05, 0.10, ..., 1.00), for the app's chart."""
    budget, ram = _budgets(settings)
    ratios = ratios or [round(0.05 * i, 2) for i in range(1, 21)]
    curve = []
    for ratio in ratios:
        memory = _plan_at(model_id, settings, check_ratio(ratio, "ratio"), budget, ram, kind)
        curve.append((ratio, {e.phase: e.total for e in memory.estimates if e.method == "emloc"}))
    return curve


def plan_run(model_id: str, settings: PlanSettings | None = None) -> Plan:
    """Per-phase peaks of EMLoC and of LoRA, QLoRA and plain inference for `model_id`, with a recommendation.

    Pure and fast after the first call for a model: no weights, no GPU, no downloads for catalogue ids.
    """
    settings = settings or PlanSettings()
    budget, ram = _budgets(settings)
    if settings.offload not in OFFLOAD_MODES:
        raise ValueError(f"offload must be one of {', '.join(OFFLOAD_MODES)}; got {settings.offload!r}")
    if settings.ratio is not None:
        check_ratio(settings.ratio, "--ratio")
    if settings.emulator_kind is not None:
        check_kind(settings.emulator_kind, "--emulator-kind")
    meta, _ = _summary(model_id)
    recommended, reason = (None, "no budget given: nothing to recommend")
    kind, candidates, chosen = settings.emulator_kind or MemorySettings.emulator_kind, {}, None
    if settings.rules:
        reason = "your --rule ratios are used as given"
    elif (budget is not None or ram is not None) and settings.emulator_kind is None:
        chosen, recommended, reason, candidates = recommend_kind(model_id, settings, budget, ram)
        kind = chosen
    elif budget is not None or ram is not None:
        recommended, reason = recommend_ratio(model_id, settings, budget, ram)
    if settings.ratio is not None:  # a ratio given without a kind is a lowrank run's (RunSettings' default kind)
        ratio, kind = settings.ratio, settings.emulator_kind or MemorySettings.emulator_kind
    elif budget is not None or ram is not None:
        ratio = recommended or RATIO_STEP  # nothing fits: show the smallest ratio, the closest to fitting
    else:
        ratio = MemorySettings.ratio
    memory = _plan_at(model_id, settings, ratio, budget, ram, kind)
    plan = Plan(meta.model_id, meta.display_name, meta.family, ratio, recommended, reason, budget, memory, ram,
                kind, candidates, chosen if recommended is not None else None)
    if settings.rules and plan.shortfall():
        plan.reason = f"with your --rule ratios {plan.shortfall()}; lower the rules' ratios or raise the budget"
    return plan


def gib(value: float) -> str:
    return f"{value / GiB:.2f}"


def amount(value: float) -> str:
    """Bytes in words: GiB with two decimals, or MiB below a tenth of a GiB (a tiny budget's shortfall)."""
    return f"{value / GiB:.2f} GiB" if abs(value) >= GiB / 10 else f"{value / 1024 ** 2:.1f} MiB"


def _cell(plan: Plan, estimate: PhaseEstimate | None, host: bool = False) -> str:
    if estimate is None:
        return ""
    cpu = plan.memory.settings.device == "cpu"
    value = estimate.host_total if host or cpu else estimate.total
    fits = plan.host_fits(estimate) if host or cpu else plan.device_fits(estimate)
    mark = {True: " ok", False: " **over**", None: ""}[fits]
    how = " (offloaded)" if estimate.offloaded else " (streamed)" if estimate.streamed else ""
    return f"{gib(value)}{mark}{how if not host else ''}"


def _ratio_words(plan: Plan) -> str:
    return "your rules" if plan.memory.settings.rules else f"ratio {plan.ratio:.2f}"


def format_plan(plan: Plan) -> str:
    """The plan as markdown: phase x method -> GiB (GPU, and the host RAM of EMLoC), what fits, the recommendation."""
    c = plan.memory.counts
    s = plan.memory.settings
    cpu = s.device == "cpu"
    emulator = ("with your rules" if s.rules else f"at ratio {plan.ratio:.2f}") + f", kind {s.emulator_kind}"
    size = (f"{c.full / 1e9:.2f} B parameters" + (" (transformer)" if plan.family == "flux" else "")
            + f"; emulator {emulator}: {c.emulator / 1e9:.2f} B, {c.emulator_bytes / GiB:.2f} GiB "
            + f"({c.factored_layers} layers factored"
            + (f", {c.dense_layers} kept dense" if c.dense_layers else "") + f"); LoRA rank {s.lora_rank}: "
            + f"{c.lora / 1e6:.1f} M")
    shape = (f"{s.resolution}x{s.resolution} px" if plan.family == "flux"
             else f"{s.seq_len} tokens ({s.image_tiles} image tiles)")
    budgets = [w for w in (plan.budget_bytes is not None and f"GPU budget {gib(plan.budget_bytes)} GiB",
                           plan.ram_bytes is not None and f"RAM budget {gib(plan.ram_bytes)} GiB") if w]
    budget = ", ".join(budgets) if budgets else "no budget"
    methods = METHODS  # emloc first, then the alternatives
    if cpu:
        header = [f"EMLoC ({_ratio_words(plan)}), RAM"] + [f"{METHOD_NAMES[m]}, RAM" for m in methods[1:]]
    else:
        header = [f"EMLoC ({_ratio_words(plan)}), GPU", "EMLoC, host RAM"] + [METHOD_NAMES[m] for m in methods[1:]]
    where = "on the CPU (RAM is the one memory)" if cpu else "on the GPU"
    lines = [f"**{plan.display_name}** (`{plan.model_id}`): {size}",
             f"{s.dtype}, batch {s.batch_size}, {shape}, {s.optimizer}, gradient checkpointing "
             f"{'on' if s.gradient_checkpointing else 'off'}, run {where}; {budget}. Peak GiB per phase:", "",
             "| phase | " + " | ".join(header) + " |", "|---|" + "---:|" * len(header)]
    for phase in PHASES:
        if plan.get(phase, "emloc") is None:  # a phase this model has not (prompt embeddings: FLUX.2 only)
            continue
        cells = [_cell(plan, plan.get(phase, "emloc"))]
        if not cpu:
            cells.append(_cell(plan, plan.get(phase, "emloc"), host=True))
        cells += [_cell(plan, plan.get(phase, m)) for m in methods[1:]]
        lines.append(f"| {PHASE_NAMES[phase]} | " + " | ".join(cells) + " |")
    peak = plan.memory.peak("emloc")
    peaks = [_cell(plan, peak)]
    if not cpu:
        peaks.append(_cell(plan, max((e for e in plan.memory.estimates if e.method == "emloc"),
                                     key=lambda e: e.host_total), host=True))
    peaks += [_cell(plan, plan.memory.peak(m)) for m in methods[1:]]
    lines.append("| **peak** | " + " | ".join(f"**{p.split(' ')[0]}**" + p[len(p.split(' ')[0]):] for p in peaks) + " |")
    lines.append("")
    if plan.recommended is not None:
        lines.append(f"Recommended ratio: **{plan.recommended:.2f}**" + (
            f", emulator kind **{plan.recommended_kind}** (--emulator-kind {plan.recommended_kind})"
            if plan.recommended_kind else "") + f" ({plan.reason}).")
    else:
        lines.append(f"Recommended ratio: none ({plan.reason}).")
    folder = plan.memory.run_folder
    lines.append(f"Run folder on disk: {gib(plan.memory.run_folder_bytes)} GiB ("
                 + ", ".join(f"{name} {gib(v)}" for name, v in folder.items()) + ").")
    meta, summary = _summary(plan.model_id)
    lines.append(preview_time_line(plan, summary, stream_tokens(meta.arch, s)["all"]))
    if plan.memory.cpu_stats_bytes and not cpu:
        lines.append(f"Calibration statistics (float32 Σxᵀx per compressed layer) take {gib(plan.memory.cpu_stats_bytes)} "
                     "GiB of RAM at once on the two-step path (keep statistics); the streamed pass holds one block's.")
    overhead = "" if cpu else ("GPU numbers include the runtime overhead (CUDA context and allocator slack, at least "
                               f"{gib(RUNTIME_OVERHEAD_BYTES)} GiB; emloc/memory.py runtime_overhead); ")
    lines.append(f"{overhead}RAM numbers include the process's own runtime (Python, torch, libraries). 'streamed': the "
                 "full model is read from its files one block at a time, so neither memory holds it whole; "
                 "'offloaded': it waits in RAM and each block is moved to the GPU as it runs. "
                 "Formulas: emloc/memory.py.")
    return "\n".join(lines)
