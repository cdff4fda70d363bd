"""Calibration + emulator construction in groups: bounded statistics, same emulator as the two-step path."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import BLOCK_RULES
from emloc import (
    LowRankLinear,
    build_emulator,
    calibrate_and_build,
    collect_input_stats,
    plan_groups,
    second_moments,
)
from emloc import calibration


def test_groups_respect_the_byte_budget_and_keep_model_order():
    sizes = [("a", 4), ("b", 4), ("c", 16), ("d", 2), ("e", 2)]
    assert plan_groups(sizes, 8) == [["a", "b"], ["c"], ["d", "e"]]
    assert plan_groups(sizes, 100) == [["a", "b", "c", "d", "e"]]


def test_grouped_build_equals_the_two_step_build(tiny_transformer, token_batches, monkeypatch):
    expected = copy.deepcopy(tiny_transformer)
    stats = second_moments(collect_input_stats(expected, token_batches, BLOCK_RULES, progress=False))
    expected_report = build_emulator(expected, BLOCK_RULES, stats, progress=False)

    held = []  # the largest number of layers whose statistics were alive at once
    original = calibration.collect_input_stats

    def spying(model, batches, rules, **kwargs):
        result = original(model, batches, rules, **kwargs)
        held.append(len(second_moments(result)))
        # the model must still be the original one while any group is calibrated
        assert not any(isinstance(m, LowRankLinear) for m in model.modules())
        return result

    monkeypatch.setattr("emloc.streaming.collect_input_stats", spying)
    budget = 2 * 32 * 32 * 4  # two 32-input layers' float32 statistics
    report = calibrate_and_build(tiny_transformer, token_batches, BLOCK_RULES, max_stats_bytes=budget, progress=False)
    assert max(held) <= 2 and len(held) > 4
    assert [r.rank for r in report.layers] == [r.rank for r in expected_report.layers]
    assert [r.error for r in report.layers] == pytest.approx([r.error for r in expected_report.layers], rel=1e-4)
    ids = token_batches[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(tiny_transformer(ids), expected(ids), rtol=1e-4, atol=1e-5)
