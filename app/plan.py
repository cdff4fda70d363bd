"""The Budget step's plan: the planner's answer for a model and budgets, as a chart and words (step 3).

Plain functions over plain values, called by app/steps/budget.py; the numbers come from pipelines.planner.
"""

from __future__ import annotations

import functools
from dataclasses import replace

from pipelines.planner.planning import METHOD_NAMES, PHASE_NAMES, PlanSettings, plan_run

from . import form
from .plots import Bar, memory_chart

# GPU sizes the Budget step offers as presets (GiB) -> the RAM a machine with such a card typically has (GiB): a
# preset fills the RAM budget with that (at most what is free now), unless the person typed their own
CARD_RAM = {8: 16, 12: 32, 16: 32, 24: 64, 48: 128, 80: 256}
BUDGET_PRESETS = tuple(CARD_RAM)
HERE = "here"  # the preset "this machine" offered where no GPU is found: the plan budgets this machine's RAM
SMALL_MODEL = form.SMALL_MODEL
GiB = 2**30


def preset_choices(device: str) -> list[tuple[str, str]]:
    """The Budget step's preset buttons: the cards, and on a machine without a GPU first "This machine" (a person
    plans here for the card they will train on, or for this CPU)."""
    cards = [(f"{card} GB", str(card)) for card in BUDGET_PRESETS]
    return cards if device == "cuda" else [("This machine (CPU, no GPU)", HERE), *cards]


def planning_device(device: str, for_card: bool) -> str:
    """What the plan budgets: the GPU where one is found; on a machine without one, a card the person picked
    (`for_card`), else this machine's RAM ("cpu")."""
    return "cuda" if device == "cuda" or for_card else "cpu"


def card_words(card: float, ram: float | None) -> str:
    """The plan's first words when a machine without a GPU plans for a card."""
    article = "an" if f"{card:g}".startswith(("8", "11", "18")) else "a"
    budgets = f"GPU memory budget {card:g} GiB" + (f", RAM budget {ram:g} GiB" if ram else "")
    return (f"**Planned for {article} {card:g} GB card** ({budgets}): the card you will train on. This machine has "
            "no GPU, so a run started here trains on its CPU; pick *This machine* to plan for that. ")


# What the chart's words mean, shown under it (every word on the chart is explained on the page).
CHART_LEGEND = (
    "**Reading the chart.** Each bar is the peak memory of one phase of a run. "
    "*EMLoC*: this app's method (train a LoRA on a compressed copy of the model, then correct it for the full "
    "model). *LoRA (full model)*, *QLoRA (NF4 base)* and *plain inference* are shown for comparison: LoRA trained "
    "on the uncompressed model, LoRA on a 4-bit copy, and generating without training. Phases: *calibration* "
    "measures how your data flows through the model; *emulator construction* builds the compressed copy; "
    "*training* trains the LoRA on it; *correction* adapts the LoRA to the full model; *preview / inference* draws "
    "or answers with the results. *streamed*: that phase reads the model from its files one block at a time, so "
    "the memory never holds it whole. The dashed line is your budget: green bars fit it, red bars do not. "
    "All numbers are GiB.")


def memory_plan(model: str, budget_gb: float | None, ratio: float | None, rank: int, task: str = "",
                ram_gb: float | None = None, device: str = "cuda", batch_size: int = 1,
                emulator_kind: str = "auto") -> dict:
    """The planner's answer for the Budget step: {"svg", "text", "recommended", "ratio", "fits", "kind"}.

    `emulator_kind` "auto": the kind the planner recommends for this budget (pipelines/planner/planning.py
    recommend_kind; with a ratio of the slider's, the plan is made for that kind at that ratio); "kind" is the one
    planned, the one a run started from this step uses.

    `device` is what runs the job: "cuda" plans the GPU (budget_gb) and the RAM (ram_gb); "cpu" plans the RAM only
    (float32, as a CPU run computes), and the chart shows RAM. `ratio` None: the recommended ratio. ValueError
    (in the page's words) for bad input.
    """
    cpu = device == "cpu"
    if not cpu and (budget_gb is None or not budget_gb > 0):
        raise ValueError(f"the GPU memory budget must be a positive number of GiB (e.g. 24 for a 24 GB card); "
                         f"got {'nothing' if budget_gb is None else budget_gb}")
    if ratio is not None and not 0 < ratio <= 1:
        raise ValueError(f"the compression ratio must be in (0, 1]; got {ratio}")
    if int(rank or 0) < 1:
        raise ValueError(f"the LoRA rank must be at least 1; got {rank or 'nothing'}")
    if int(batch_size or 0) < 1:
        raise ValueError(f"the batch size must be at least 1; got {batch_size or 'nothing'}")
    if (ram_gb is not None or cpu) and not (ram_gb or 0) > 0:
        raise ValueError(f"the RAM budget must be a positive number of GiB (e.g. 32 for 32 GB of RAM); "
                         f"got {'nothing' if ram_gb is None else ram_gb}")
    settings = PlanSettings(budget_gb=None if cpu else float(budget_gb), ratio=None if ratio is None else float(ratio),
                            lora_rank=int(rank), batch_size=int(batch_size), ram_gb=float(ram_gb) if ram_gb else None,
                            device="cpu" if cpu else "cuda", dtype="float32" if cpu else "bfloat16",
                            emulator_kind=None if emulator_kind in ("auto", None) else emulator_kind)
    chosen = None
    if settings.emulator_kind is None:  # the recommended kind, also for a ratio the person chose
        chosen = plan_run(model, replace(settings, ratio=None))
        plan = chosen if ratio is None else plan_run(model, replace(settings, emulator_kind=chosen.kind))
    else:
        plan = plan_run(model, settings)
    bars = []
    kept = plan.ratio == 1.0  # the slider's maximum: the emulator keeps every layer as it is
    emloc_label = ("EMLoC (no compression)" if kept else f"EMLoC (ratio {plan.ratio:.2f})" if plan.kind == "lowrank"
                   else f"EMLoC ({plan.kind}, ratio {plan.ratio:.2f})" if plan.kind != "nf4"
                   else "EMLoC (nf4: 4-bit, full rank)")
    for estimate in plan.memory.estimates:
        group = emloc_label if estimate.method == "emloc" else METHOD_NAMES[estimate.method]
        value = estimate.host_total if cpu else estimate.total
        bars.append(Bar(group, PHASE_NAMES[estimate.phase], value / GiB, "streamed" if estimate.streamed else ""))
    fits = plan.emloc_fits()
    over = [PHASE_NAMES[e.phase] for e in plan.memory.estimates if e.method == "emloc" and not plan.fits(e)]
    memory = "RAM" if cpu else "GPU memory"
    if plan.recommended is None:
        worst = max((e for e in plan.memory.estimates if e.method == "emloc"),
                    key=lambda e: e.host_total if cpu else e.total)
        need = (worst.host_total if cpu else worst.total) / GiB
        text = (f"**This budget is too small for {plan.display_name}.** Even at the smallest compression ratio, "
                f"{PHASE_NAMES[worst.phase]} needs {need:.1f} GiB of {memory}. Raise the "
                f"{'RAM' if cpu else 'GPU memory'} budget, lower the LoRA rank, or pick a smaller model in step 1.")
    else:
        verdict = ("Every EMLoC phase fits." if fits else
                   f"At ratio {plan.ratio:.2f}, {', '.join(over)} do{'es' if len(over) == 1 else ''} not fit; "
                   f"use the recommended ratio or less.")
        slider = ("the slider follows it until you move it" if ratio is None else
                  f"the slider is at {plan.ratio:.2f} (Use the recommended ratio to follow it)"
                  if abs(plan.ratio - plan.recommended) > 0.005 else "the slider is at it")
        text = (f"{verdict} Recommended ratio: **{plan.recommended:.2f}**, the largest at which every phase fits "
                f"your budget; {slider}.")
    if kept:
        text += (" At ratio 1.00 nothing is compressed: every layer is kept as it is, so training holds the full "
                 "model, as LoRA on the full model does.")
    if plan.memory.counts.full < SMALL_MODEL:
        text += (f" {plan.display_name} is tiny, so every phase needs little more than the fixed "
                 f"{'runtime' if cpu else 'GPU runtime'} overhead; pick a catalogue model in step 1 to see where "
                 "EMLoC saves memory.")
    if plan.ram_bytes is not None and not cpu:
        host = max((e for e in plan.memory.estimates if e.method == "emloc"), key=lambda e: e.host_total)
        text += (f" RAM: at most {host.host_total / GiB:.1f} GiB ({PHASE_NAMES[host.phase]}) of your "
                 f"{plan.ram_bytes / GiB:.1f} GiB" + (" — too little: raise the RAM budget or lower the ratio."
                                                      if host.host_total > plan.ram_bytes else "."))
    folder = plan.memory.run_folder_bytes
    text += (f" The run folder will take about {folder / GiB:.1f} GiB of disk." if folder >= GiB / 10 else
             f" The run folder will take about {folder / 1024 ** 2:.0f} MiB of disk.")
    where = "RAM (this job runs on the CPU)" if cpu else "GPU memory"
    title = f"{plan.display_name}: predicted peak {where} per phase (LoRA rank {int(rank)})"
    line = plan.ram_bytes / GiB if cpu else float(budget_gb)
    if chosen is not None and chosen.recommended_kind:
        text += f" Emulator kind: **{plan.kind}**, recommended for this budget ({kind_words(chosen)})."
    elif not kept:
        text += f" Emulator kind: **{plan.kind}** (yours)."
    return {"svg": memory_chart(bars, line, title), "text": text, "recommended": plan.recommended,
            "ratio": plan.ratio, "fits": bool(fits), "legend": CHART_LEGEND, "kind": plan.kind}


def kind_words(plan) -> str:
    """The recommended kind's reason in short: what each kind reaches at this budget."""
    parts = []
    for kind, c in plan.candidates.items():
        reach = "does not fit" if c["ratio"] is None else "fits" if kind == "nf4" else f"up to ratio {c['ratio']:.2f}"
        parts.append(f"{kind} {reach}")
    return "; ".join(parts) + "; the kind that keeps the most parameters of the model wins, then the most bits"


def preset_budgets(card: float, available_ram: float, ram_touched: bool = False, ram: float | None = None
                   ) -> tuple[float, float]:
    """(GPU budget, RAM budget) of the preset `card` (GiB): the card's size, and the RAM a machine with it typically
    has (CARD_RAM), at most `available_ram` (what is free here: a budget above it would run out), or the person's
    own `ram` when they typed one (`ram_touched`)."""
    card = float(card)
    if card not in CARD_RAM:
        raise ValueError(f"{card:g} GiB is not one of the presets ({', '.join(str(c) for c in CARD_RAM)}); type the "
                         "GPU memory budget instead")
    if ram_touched and ram:
        return card, float(ram)
    return card, float(min(CARD_RAM[int(card)], available_ram))


@functools.lru_cache(maxsize=64)
def card_table(model: str, rank: int, batch_size: int = 1, ram_gb: float | None = None,
               cards: tuple[int, ...] = BUDGET_PRESETS) -> str:
    """What each preset card means for `model`: per card, the recommended ratio, the largest EMLoC phase at it and
    whether LoRA on the full model or QLoRA would fit the same card instead (a markdown table; the planner's
    numbers, milliseconds each after the first). `ram_gb` None: each card with its typical RAM (CARD_RAM)."""
    lines = ["| GPU | recommended ratio (emulator kind) | largest EMLoC phase at that ratio | LoRA (full model) | QLoRA (NF4 base) |",
             "|---:|---:|---|---|---|"]
    for card in cards:
        ram = float(ram_gb) if ram_gb else float(CARD_RAM.get(card, 2 * card))
        settings = PlanSettings(budget_gb=float(card), lora_rank=int(rank), batch_size=int(batch_size), ram_gb=ram)
        plan = plan_run(model, settings)
        emloc = [e for e in plan.memory.estimates if e.method == "emloc"]
        worst = max(emloc, key=lambda e: e.total)

        def other(method: str) -> str:
            training = plan.get("training", method)
            if training is None:
                return "–"
            return (f"fits ({training.total / GiB:.1f} GiB)" if plan.fits(training)
                    else f"does not fit ({training.total / GiB:.1f} GiB)")

        if plan.recommended is None:
            row = f"| {card} GB | nothing fits | {PHASE_NAMES[worst.phase]} needs {worst.total / GiB:.1f} GiB even at " \
                  f"{plan.ratio:.2f} |"
        else:
            row = (f"| {card} GB | **{plan.recommended:.2f}** ({plan.kind}) | {PHASE_NAMES[worst.phase]}: "
                   f"{worst.total / GiB:.1f} GiB of {card} |")
        lines.append(row + f" {other('lora')} | {other('qlora')} |")
    ram_words = (f"your RAM budget of {float(ram_gb):g} GiB" if ram_gb else
                 "the RAM such a machine typically has (" + ", ".join(f"{c} GB: {r} GiB" for c, r in CARD_RAM.items()
                                                                      if c in cards) + ")")
    return (f"**What each GPU size means for this model** (LoRA rank {int(rank)}, batch size {int(batch_size)}, with "
            f"{ram_words}):\n\n" + "\n".join(lines))


def runs_on(device: dict) -> str:
    """The Budget step's first line: which device runs the job, and what is budgeted."""
    if device["kind"] == "cuda":
        return (f"This job runs on the GPU **{device['name']}** ({device['free_gb']:.1f} GiB free of "
                f"{device['total_gb']:.1f} GiB): the plan budgets its memory and this machine's RAM.")
    return (f"This job runs on the **CPU**: there is no GPU on this machine, so the plan budgets RAM "
            f"({device['free_gb']:.1f} GiB free of {device['total_gb']:.1f} GiB). To plan for the card you will "
            "train on, pick it under Presets for common cards (e.g. 12 GB).")




def demo_ratio(model: str) -> float | None:
    """The ratio a demo model starts at (its demo.json's, else the run's default), None for any other model: a demo
    fits uncompressed anywhere, so its recommendation would be 1.00 (no emulator at all)."""
    from pipelines.runner.registry import demo_suggestions

    if not form.is_demo(model):
        return None
    return float(demo_suggestions(model).get("ratio", form.run_field("ratio").default))
