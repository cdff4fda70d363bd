"""The whole method on a tiny transformer: stats -> emulator -> LoRA -> correction -> full model."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import set_peft_model_state_dict

from conftest import BLOCK_RULES
from emloc import (
    LoraSettings,
    LowRankLinear,
    adapter_state,
    attach_lora,
    build_emulator,
    collect_input_stats,
    correct_lora,
    load_adapter,
    load_emulator,
    lora_scaling,
    lora_target_names,
    read_adapter,
    save_emulator,
    second_moments,
    write_adapter,
)

LORA = LoraSettings(rank=4, alpha=8, targets=[r"blocks\.\d+\.(q|k|v|o|up|down)"])


def train_on_emulator(full, batches, steps=30):
    """Emulator at ratio 0.5 + LoRA trained to push the logits of token 7 up everywhere (a toy target)."""
    stats = second_moments(collect_input_stats(full, batches, BLOCK_RULES, progress=False))
    emulator = copy.deepcopy(full)
    build_emulator(emulator, BLOCK_RULES, stats, progress=False)
    model = attach_lora(emulator, LORA)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(0)
    for _ in range(steps):
        for batch in batches:
            logits = model(**batch)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), torch.full((logits.shape[0] * 12,), 7))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model


def test_lora_targets_never_match_the_factors(tiny_transformer):
    build_emulator(tiny_transformer, BLOCK_RULES, progress=False)
    names = lora_target_names(tiny_transformer, [r".*"])
    expected = {f"blocks.{i}.{p}" for i in range(2) for p in ("q", "k", "v", "o", "up", "down")} | {"head"}
    assert set(names) == expected  # never blocks.0.q.u / blocks.0.q.v


def test_corrected_full_model_follows_the_emulator_better_than_uncorrected(tiny_transformer, token_batches, tmp_path):
    full = tiny_transformer
    tuned = train_on_emulator(full, token_batches)
    state = adapter_state(tuned)
    config = tuned.peft_config["default"]
    assert lora_scaling(config) == pytest.approx(LORA.scaling) == 2.0
    corrected = correct_lora(full, tuned, state, lora_scaling(config), lam=float("inf"), progress=False)
    write_adapter(corrected, config, tmp_path / "corrected")
    write_adapter(state, config, tmp_path / "uncorrected")

    with torch.no_grad():
        reference = [tuned(**b) for b in token_batches]
        on_full = load_adapter(copy.deepcopy(full), tmp_path / "corrected").eval()
        uncorrected = load_adapter(copy.deepcopy(full), tmp_path / "uncorrected").eval()
        gap_corrected = sum(float((on_full(**b) - r).norm()) for b, r in zip(token_batches, reference))
        gap_uncorrected = sum(float((uncorrected(**b) - r).norm()) for b, r in zip(token_batches, reference))
        base_gap = sum(float((full(**b) - r).norm()) for b, r in zip(token_batches, reference))
    assert gap_corrected < gap_uncorrected < base_gap
    # and the toy task was learnt by the corrected full model
    with torch.no_grad():
        hits = torch.cat([on_full(**b).argmax(-1).reshape(-1) for b in token_batches])
    assert float((hits == 7).float().mean()) > 0.9


def test_adapter_trained_on_emulator_reloads_onto_a_saved_emulator(tiny_transformer, token_batches, tmp_path):
    tuned = train_on_emulator(tiny_transformer, token_batches, steps=3)
    save_emulator(tuned, tmp_path / "emulator")
    write_adapter(adapter_state(tuned), tuned.peft_config["default"], tmp_path / "adapter")
    fresh = copy.deepcopy(tiny_transformer)
    load_emulator(fresh, tmp_path / "emulator")
    assert isinstance(fresh.blocks[1].down, LowRankLinear)
    reloaded = load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**token_batches[0]), tuned(**token_batches[0]), rtol=1e-5, atol=1e-5)
    state, config = read_adapter(tmp_path / "adapter")
    assert config.r == 4 and all(".lora_" in k for k in state)


def test_uncorrected_adapter_state_loads_into_full_model_with_the_same_keys(tiny_transformer, token_batches):
    tuned = train_on_emulator(tiny_transformer, token_batches, steps=1)
    state = adapter_state(tuned)
    on_full = attach_lora(copy.deepcopy(tiny_transformer), tuned.peft_config["default"])
    result = set_peft_model_state_dict(on_full, state)
    assert not result.unexpected_keys
