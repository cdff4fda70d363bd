"""Step 3, Budget: which device runs the job, its memory budgets, the compression ratio, LoRA rank and batch size,
and the planner's chart of every phase's peak memory against the budget."""

from __future__ import annotations

from functools import partial

import gradio as gr

from .. import form, handlers
from .. import plan as plans
from ..manager import Values, say
from ..page import STEP
from . import Context

PLAN_INPUTS = ["model.model", "budget.budget", "budget.ratio", "budget.rank", "budget.ram", "budget.touched",
               "page.state", "budget.batch_size", "budget.emulator_kind", "budget.for_card"]
PLAN_OUTPUTS = ["budget.chart", "budget.text", "budget.recommended", "budget.ratio", "budget.msg", "budget.cards",
                "budget.kind"]
KIND_CHOICES = [("auto: the kind the plan recommends for this budget", "auto"), ("lowrank (low-rank SVD)", "lowrank"),
                ("nf4 (the layers whole, in 4 bits)", "nf4"), ("lowrank-nf4 (the low-rank factors in 4 bits)",
                                                            "lowrank-nf4")]


def ram_view(v: Values) -> Values:
    """The RAM budget as available now (read when the step is shown), unless the person typed their own."""
    return {} if v.get("budget.ram_touched") else {"budget.ram": handlers.available_ram_gib()}


def plan_view(v: Values, touched: bool | None = None) -> Values:
    """Chart, text, the recommendation and the slider, which follows the recommendation until the person moves it.
    A bad budget is said in the step's message; the chart is then empty."""
    touched = v["budget.touched"] if touched is None else touched
    kind = plans.planning_device(v["page.state"].device, bool(v.get("budget.for_card")))
    try:
        plan = plans.memory_plan(v["model.model"], v["budget.budget"], v["budget.ratio"] if touched else None,
                                    v["budget.rank"], ram_gb=v["budget.ram"], device=kind,
                                    batch_size=v["budget.batch_size"], emulator_kind=v.get("budget.emulator_kind"))
    except (ValueError, OSError) as err:
        return {"budget.chart": "", "budget.text": "", "budget.recommended": None, "budget.msg": say(err, good=False),
                "budget.cards": ""}
    budgets = "RAM budget" if kind == "cpu" else "GPU memory or RAM budget"
    message = "" if plan["recommended"] is not None else say(
        f"No compression ratio fits this budget; raise the {budgets} (or pick a smaller model) to continue.", False)
    view = {"budget.chart": plan["svg"], "budget.text": plan["text"], "budget.recommended": plan["recommended"],
            "budget.msg": message, "budget.cards": cards_view(v), "budget.kind": plan["kind"]}
    if kind != v["page.state"].device:  # a machine without a GPU plans for a card
        view["budget.text"] = plans.card_words(float(v["budget.budget"]), v["budget.ram"]) + view["budget.text"]
    if not touched and plan["recommended"] is not None:
        view["budget.ratio"] = plan["recommended"]
    suggested = plans.demo_ratio(v["model.model"])
    if touched and suggested is not None and abs(plan["ratio"] - suggested) < 0.005:
        view["budget.text"] += (f" This demo model starts at ratio {suggested:.2f}, so that the emulator is really "
                                "compressed.")
    return view


def cards_view(v: Values) -> str:
    """What each preset card means for this model (app/plan.py card_table), each card with the RAM its machine
    typically has; "" when the planner cannot read the model (the plan says why)."""
    try:
        return plans.card_table(str(v["model.model"]), int(v["budget.rank"] or 16), int(v["budget.batch_size"] or 1))
    except (ValueError, OSError):
        return ""


def use_preset(studio, v: Values) -> Values:
    """A card preset: the GPU budget is the card's size, the RAM budget what such a machine typically has (at most
    what is free here; a RAM budget the person typed stays), and the ratio slider follows the recommendation again;
    the plan says what that means."""
    if not v["budget.presets"]:
        return {}
    no_gpu = v["page.state"].device != "cuda"  # a card is planned, or (This machine) this machine's RAM
    if v["budget.presets"] == plans.HERE:
        ram = v["budget.ram"] if v["budget.ram_touched"] else handlers.available_ram_gib()
        view = plan_view({**v, "budget.ram": ram, "budget.for_card": False}, touched=False)
        return {**view, "budget.ram": ram, "budget.touched": False, "budget.for_card": False,
                "budget.budget": gr.Number(visible=False)}
    card, ram = plans.preset_budgets(v["budget.presets"], handlers.available_ram_gib(), v["budget.ram_touched"],
                                     v["budget.ram"])
    view = plan_view({**v, "budget.budget": card, "budget.ram": ram, "budget.for_card": no_gpu}, touched=False)
    return {**view, "budget.budget": gr.Number(value=card, visible=True) if no_gpu else card, "budget.ram": ram,
            "budget.touched": False, "budget.for_card": no_gpu}


def model_view(v: Values, suggested: float | None) -> Values:
    """The plan for a newly chosen model: a demo's own ratio (it would fit uncompressed) sets the slider, said in
    the words beside it; any other model's slider follows the recommendation again."""
    if suggested is None:
        return {**plan_view({**v, "budget.touched": False}), "budget.touched": False}
    view = plan_view({**v, "budget.ratio": suggested, "budget.touched": True})
    return {**view, "budget.ratio": suggested, "budget.touched": True}


def moved_ratio(studio, v: Values) -> Values:
    """The person moved the slider: it is theirs now."""
    return {**plan_view(v, touched=True), "budget.touched": True}


def use_recommended(studio, v: Values) -> Values:
    view = plan_view(v, touched=False)
    if view.get("budget.recommended") is None:
        raise ValueError("nothing to recommend: no ratio fits this budget; raise the budget first")
    return {**view, "budget.ratio": view["budget.recommended"], "budget.touched": False}


def trace_view(studio, v: Values) -> Values:
    """A second opinion on the chart: the run's own code traced on tensors without data at this model's size and
    ratio (pipelines/planner/trace.py), beside the planner's formulas. Takes seconds to a minute; reads no weights."""
    from pipelines.planner.trace import format_traces, trace_in_subprocess

    model, ratio = v["model.model"], v["budget.ratio"]
    gpu = plans.planning_device(v["page.state"].device, bool(v.get("budget.for_card"))) != "cpu"
    budget = v["budget.budget"] if gpu else max(float(v["budget.ram"] or 0), 1.0)
    traces = trace_in_subprocess(model, float(budget or 24), ratio=ratio)
    note = ("" if v["page.state"].device != "cpu" else
            "\n\nThis machine has no GPU: the device columns are what a GPU run of this plan would hold.")
    return {"budget.trace": format_traces(str(model), None, traces) + note, "budget.msg": ""}


def go_train(studio, v: Values) -> Values:
    kind = plans.planning_device(v["page.state"].device, bool(v.get("budget.for_card")))
    plan = plans.memory_plan(v["model.model"], v["budget.budget"], v["budget.ratio"], v["budget.rank"],
                                ram_gb=v["budget.ram"], device=kind, batch_size=v["budget.batch_size"],
                                emulator_kind=v.get("budget.emulator_kind"))
    if plan["recommended"] is None:
        raise ValueError("no compression ratio fits this budget; raise the budget to continue")
    if not plan["fits"]:
        where = "this machine's RAM" if kind == "cpu" else "a GPU with this budget"
        raise ValueError(f"ratio {v['budget.ratio']:.2f} does not fit: {where} would run out of memory. Move the "
                         f"slider to {plan['recommended']:.2f} or below (Use the recommended ratio), or raise the budget")
    return {"page.wizard": gr.Walkthrough(selected=STEP["train"]), "budget.msg": "", "budget.kind": plan["kind"]}


def build(ctx: Context) -> dict:
    studio, m = ctx.studio, ctx.manager
    ratio_field, rank_field = form.run_field("ratio"), form.run_field("rank")
    batch_field, ram_field, gpu_field = form.run_field("batch_size"), form.run_field("ram_gb"), form.run_field("gpu_gb")
    with gr.Step("3. Budget", id=STEP["budget"]):
        runs_on = gr.Markdown(elem_id="runs-on")
        with gr.Row():
            budget = gr.Number(24, label=gpu_field.label, minimum=None, elem_id="budget", visible=False)
            ram = gr.Number(handlers.available_ram_gib(), label=ram_field.label, minimum=None, elem_id="ram-budget",
                            info="what is free when this step opens; type your own to keep it")
            presets = gr.Radio(plans.preset_choices("cpu"), value=None, label="Presets for common cards",
                               elem_id="budget-presets", info="fills the GPU memory and RAM budgets (without a GPU "
                               "here: plans for that card); the ratio follows the recommendation")
        msg = gr.Markdown(elem_id="msg-budget", elem_classes="emloc-msg")  # beside the budgets it is mostly about
        with gr.Row():
            ratio = gr.Slider(0.05, 1.0, value=ratio_field.default, step=0.01, scale=3, elem_id="ratio",
                              label=f"{ratio_field.label}: the fraction of each layer's parameters the emulator keeps",
                              info="1.00 = no compression: every layer is kept as it is")
            rank = gr.Dropdown([4, 8, 16, 32, 64], value=rank_field.default, label=rank_field.label, scale=1,
                               info=rank_field.help)
            batch = gr.Dropdown([1, 2, 4, 8], value=batch_field.default, label=f"{batch_field.label} "
                                "(samples per training step)", scale=1, elem_id="batch-size")
        kind_field = form.run_field("emulator_kind")
        emulator_kind = gr.Dropdown(KIND_CHOICES, value="auto", label=kind_field.label, elem_id="emulator-kind",
                                    info=kind_field.help)
        recommend = gr.Button("Use the recommended ratio", size="sm")
        text = gr.Markdown(elem_id="plan-text")
        chart = gr.HTML(elem_id="memory-chart")
        gr.Markdown(plans.CHART_LEGEND, elem_id="chart-legend")
        cards = gr.Markdown(elem_id="card-table")  # what each preset card would mean for this model
        check = gr.Button("Check this plan by tracing the run's code (reads no weights; up to a minute)", size="sm")
        traced = gr.Markdown(elem_id="plan-trace")
        next_button = gr.Button("Next: training", variant="primary")
    elems = {"runs_on": runs_on, "budget": budget, "ram": ram, "presets": presets, "ratio": ratio, "rank": rank,
             "batch_size": batch, "recommend": recommend, "text": text, "chart": chart, "msg": msg,
             "next": next_button, "check": check, "trace": traced, "touched": gr.State(False), "ram_touched": gr.State(False),
             "recommended": gr.State(None), "cards": cards, "emulator_kind": emulator_kind, "kind": gr.State("lowrank"),
             "for_card": gr.State(False)}  # no GPU here and a card picked: the plan is for that card
    m.add("budget", elems)
    m.bind(presets.input, partial(use_preset, studio), [*PLAN_INPUTS, "budget.presets", "budget.ram_touched"],
           [*PLAN_OUTPUTS, "budget.budget", "budget.ram", "budget.touched", "budget.for_card"], message="budget.msg")
    for event in (budget.change, rank.change, batch.input, ram.change, emulator_kind.input):
        m.bind(event, lambda v: plan_view(v), PLAN_INPUTS, PLAN_OUTPUTS, trigger_mode="always_last")
    ram.input(lambda: True, [], [m["budget.ram_touched"]], concurrency_id="wizard")  # typed: theirs now
    budget.input(lambda: None, [], [presets], concurrency_id="wizard")  # a typed budget is no preset any more
    m.bind(ratio.release, partial(moved_ratio, studio), PLAN_INPUTS, [*PLAN_OUTPUTS, "budget.touched"],
           trigger_mode="always_last")
    m.bind(recommend.click, partial(use_recommended, studio), PLAN_INPUTS, [*PLAN_OUTPUTS, "budget.touched"],
           message="budget.msg")
    m.bind(check.click, partial(trace_view, studio), PLAN_INPUTS, ["budget.trace", "budget.msg"], message="budget.msg")
    m.bind(next_button.click, partial(go_train, studio), PLAN_INPUTS, ["page.wizard", "budget.msg", "budget.kind"],
           message="budget.msg")
    return elems
