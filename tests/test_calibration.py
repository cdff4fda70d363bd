"""Calibration statistics: exact sums of xᵀx, token counts, hook hygiene, offloaded models."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import BLOCK_RULES
from emloc import COUNT_SUFFIX, collect_input_stats, merge_stats


def reference_q_inputs(model, batches):
    """The inputs of blocks.0.q computed by hand: LayerNorm(embedding)."""
    with torch.no_grad():
        return torch.cat([model.blocks[0].norm1(model.embed(b["input_ids"])).reshape(-1, 32) for b in batches])


def test_stats_are_the_sum_of_outer_products_over_all_tokens(tiny_transformer, token_batches):
    stats = collect_input_stats(tiny_transformer, token_batches, BLOCK_RULES, progress=False)
    x = reference_q_inputs(tiny_transformer, token_batches)
    for name in ("blocks.0.q", "blocks.0.k", "blocks.0.v"):  # one input shared by three layers
        torch.testing.assert_close(stats[name], x.T @ x, rtol=1e-5, atol=1e-4)
    assert stats["blocks.0.q"].data_ptr() != stats["blocks.0.k"].data_ptr()
    assert int(stats["blocks.0.q" + COUNT_SUFFIX]) == 4 * 2 * 12
    assert stats["blocks.1.down"].shape == (64, 64)
    assert {k for k in stats if not k.endswith(COUNT_SUFFIX)} == {
        f"blocks.{i}.{p}" for i in range(2) for p in ("q", "k", "v", "o", "up", "down")}


def test_layers_the_emulator_keeps_get_no_statistics_and_ratio_one_runs_no_batch(tiny_transformer, token_batches):
    rules = [(r"blocks\.0\..*", 1.0), (r"blocks\.1\.(q|k|v|o|up|down)", 0.5)]
    stats = collect_input_stats(tiny_transformer, token_batches, rules, progress=False)
    assert {k for k in stats if not k.endswith(COUNT_SUFFIX)} == {f"blocks.1.{p}" for p in ("q", "k", "v", "o", "up", "down")}

    def forward(model, batch):
        raise AssertionError("no layer needs statistics, so no batch should run")

    assert collect_input_stats(tiny_transformer, token_batches, [(BLOCK_RULES[0][0], 1.0)], forward, progress=False) == {}


def test_float64_accumulation_is_available(tiny_transformer, token_batches):
    stats = collect_input_stats(tiny_transformer, token_batches, BLOCK_RULES, dtype=torch.float64, progress=False)
    x = reference_q_inputs(tiny_transformer, token_batches).double()
    assert stats["blocks.0.q"].dtype == torch.float64
    torch.testing.assert_close(stats["blocks.0.q"], x.T @ x, rtol=1e-7, atol=1e-7)


def test_hooks_are_removed_even_when_a_batch_fails(tiny_transformer, token_batches):
    def failing_forward(model, batch):
        model(**batch)
        raise RuntimeError("out of memory (simulated)")

    with pytest.raises(RuntimeError, match="simulated"):
        collect_input_stats(tiny_transformer, token_batches, BLOCK_RULES, forward=failing_forward, progress=False)
    assert all(not m._forward_hooks for m in tiny_transformer.modules())


def test_custom_forward_and_stats_device(tiny_transformer, token_batches):
    calls = []

    def forward(model, batch):
        calls.append(batch)
        return model(batch["input_ids"][:1])

    stats = collect_input_stats(tiny_transformer, token_batches, BLOCK_RULES, forward=forward, stats_device="cpu",
                                progress=False)
    assert len(calls) == 4 and int(stats["blocks.0.k.count"]) == 4 * 12


def test_offloaded_model_gives_the_same_stats(tiny_transformer, token_batches):
    from accelerate import cpu_offload

    expected = collect_input_stats(tiny_transformer, token_batches, BLOCK_RULES, progress=False)
    offloaded = cpu_offload(copy.deepcopy(tiny_transformer), execution_device=torch.device("cpu"))
    assert offloaded.blocks[0].q.weight.device.type == "meta"  # weights really are offloaded
    found = collect_input_stats(offloaded, token_batches, BLOCK_RULES, progress=False)
    for key, value in expected.items():
        torch.testing.assert_close(found[key], value, rtol=1e-5, atol=1e-4)


def test_nan_inputs_are_reported_with_the_layer(tiny_transformer, token_batches):
    with torch.no_grad():
        tiny_transformer.blocks[1].up.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'blocks\.1\.down'.*NaN"):
        collect_input_stats(tiny_transformer, token_batches, BLOCK_RULES, progress=False)


def test_rules_that_match_nothing_are_an_error(tiny_transformer, token_batches):
    with pytest.raises(ValueError, match="no linear layer matches"):
        collect_input_stats(tiny_transformer, token_batches, [r"encoder\..*"], progress=False)


def test_merged_shards_equal_one_pass(tiny_transformer, token_batches):
    whole = collect_input_stats(tiny_transformer, token_batches, BLOCK_RULES, progress=False)
    parts = [collect_input_stats(tiny_transformer, token_batches[i:i + 2], BLOCK_RULES, progress=False) for i in (0, 2)]
    merged = merge_stats(parts)
    for key, value in whole.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("where", [0, 4095, 4096, 9999])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_finite_check_in_chunks_finds_every_bad_value(monkeypatch, where, bad):
    """The chunked check (it keeps a 15 360² statistic from doubling the peak) sees a bad value in any chunk."""
    from emloc import factorize

    monkeypatch.setattr(factorize, "FINITE_CHECK_CHUNK", 4096)
    values = torch.randn(100, 100)
    assert factorize.all_finite(values)
    values.view(-1)[where] = bad
    assert not factorize.all_finite(values)
    assert not factorize.all_finite(values.T)  # non-contiguous views too
