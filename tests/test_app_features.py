"""Issue 29 items 4, 6 and 7 through the step handlers (no browser): card presets on the Budget step, seed ranges,
sample prompts and the strength grid of the Preview step, and what the Export step writes."""

from __future__ import annotations

import re

import pytest

from app import handlers
from app import plan as plans
from app.page import PageState
from app.steps import budget

FLUX_DEV = "black-forest-labs/FLUX.1-dev"


def budget_values(**changes) -> dict:
    values = {"model.model": FLUX_DEV, "budget.budget": 24, "budget.ratio": 0.5, "budget.rank": 16, "budget.ram": 20.0,
              "budget.touched": True, "page.state": PageState(device="cuda"), "budget.batch_size": 1,
              "budget.presets": "12", "budget.ram_touched": False}
    return {**values, **changes}


# ------------------------------------------------------------------------------------------ item 6: presets
def test_a_card_preset_fills_both_budgets_and_the_ratio_follows_its_recommendation(monkeypatch):
    monkeypatch.setattr(handlers, "available_ram_gib", lambda: 100.0)
    out = budget.use_preset(None, budget_values())
    assert out["budget.budget"] == 12 and out["budget.ram"] == plans.CARD_RAM[12] == 32
    assert out["budget.touched"] is False  # the slider follows the recommendation again
    alone = plans.memory_plan(FLUX_DEV, 12, None, 16, ram_gb=32)
    assert out["budget.recommended"] == alone["recommended"] and out["budget.ratio"] == alone["recommended"]
    assert f"Recommended ratio: **{alone['recommended']:.2f}**" in out["budget.text"]
    # the table says what each card means, and its 12 GB row is the plan the preset shows
    row = next(line for line in out["budget.cards"].splitlines() if line.startswith("| 12 GB"))
    assert f"**{alone['recommended']:.2f}**" in row


def test_a_preset_keeps_the_ram_budget_within_what_is_free_and_a_typed_one_stays(monkeypatch):
    monkeypatch.setattr(handlers, "available_ram_gib", lambda: 10.5)
    assert budget.use_preset(None, budget_values(**{"budget.presets": "24"}))["budget.ram"] == 10.5
    typed = budget.use_preset(None, budget_values(**{"budget.presets": "24", "budget.ram_touched": True,
                                                      "budget.ram": 48.0}))
    assert typed["budget.ram"] == 48.0 and typed["budget.budget"] == 24
    with pytest.raises(ValueError, match="not one of the presets"):
        plans.preset_budgets(10, 64)


def test_the_card_table_recommends_more_of_the_model_on_larger_cards():
    table = plans.card_table(FLUX_DEV, 16)
    ratios = [float(m) for m in re.findall(r"\| \*\*([0-9.]+)\*\* \|", table)]
    assert len(ratios) == len(plans.BUDGET_PRESETS)
    assert ratios == sorted(ratios) and ratios[0] < ratios[-1]  # a larger card never keeps less of the model
    for card, ratio in zip(plans.BUDGET_PRESETS, ratios):
        assert plans.memory_plan(FLUX_DEV, card, None, 16, ram_gb=plans.CARD_RAM[card])["recommended"] == ratio
    assert "LoRA (full model)" in table and "does not fit" in table  # what the same card would not do
