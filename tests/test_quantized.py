"""Emulator kinds (issue 27): NF4 against bitsandbytes bit for bit, each kind built, saved, loaded, trained on and
corrected exactly onto the full model on the LoRA's inputs (float64 dense references)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import BLOCK_RULES
from emloc import (attach_lora, build_emulator, collect_input_stats, correct_lora, load_emulator, save_emulator,
                   second_moments, stream_emulator)
from emloc.emulator import emulated_weight
from emloc.lora import LoraSettings, adapter_state
from emloc.lowrank import LowRankLinear
from emloc.quantized import EMULATOR_KINDS, NF4Linear, dequantize_nf4, nf4_bytes, quantize_nf4

bnb_functional = pytest.importorskip("bitsandbytes.functional")


@pytest.mark.parametrize("shape", [(48, 64), (7, 9), (130, 70), (1, 1)])
def test_nf4_codes_and_values_equal_bitsandbytes(shape):
    """Odd counts and a short last block included: the same codes, absmax and dequantised values as bitsandbytes."""
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 3
    codes, absmax = quantize_nf4(weight)
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.equal(codes, packed.view(-1)) and torch.equal(absmax, state.absmax)
    assert torch.equal(dequantize_nf4(codes, absmax, shape), bnb_functional.dequantize_4bit(packed, state))


def test_nf4_error_is_the_known_four_bit_error_and_its_size_is_half_a_byte():
    weight = torch.randn(256, 512, generator=torch.Generator().manual_seed(1))
    codes, absmax = quantize_nf4(weight)
    error = float((dequantize_nf4(codes, absmax, weight.shape) - weight).norm() / weight.norm())
    assert 0.05 < error < 0.12  # NF4 on Gaussian weights: ~9% relative error
    assert codes.numel() + 2 * absmax.numel() == nf4_bytes(weight.numel()) == 256 * 512 // 2 + 2 * 256 * 512 // 64


def test_nf4_linear_forward_and_input_gradient_match_its_dequantised_weight():
    g = torch.Generator().manual_seed(2)
    weight, bias = torch.randn(20, 33, generator=g), torch.randn(20, generator=g)
    layer = NF4Linear.from_weight(weight, bias)
    w_e = layer.dense_weight()
    x = torch.randn(5, 33, generator=g, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, x @ w_e.T + bias, rtol=1e-5, atol=1e-5)
    upstream = torch.randn(5, 20, generator=g)
    (y * upstream).sum().backward()
    torch.testing.assert_close(x.grad, upstream @ w_e, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in layer.parameters())


def test_absmax_keeps_the_model_dtype_so_reading_in_that_dtype_changes_nothing():
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    layer = NF4Linear.from_weight(weight)
    assert layer.absmax.dtype == torch.bfloat16 and layer.codes.dtype == torch.uint8
    assert float((layer.dense_weight() - weight.float()).norm() / weight.float().norm()) < 0.12


# -- correction: exact on rowspace(A) for each kind, against a float64 dense reference ---------------------------
IN, OUT, R = 96, 40, 3


class OneLayer(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def outlier_inputs(seed: int, rank_deficient: bool) -> torch.Tensor:
    """Inputs with a few outlier channels (100x the rest), or confined to a 10-dimensional subspace."""
    g = torch.Generator().manual_seed(seed)
    if rank_deficient:
        return torch.randn(300, 10, generator=g) @ torch.randn(10, IN, generator=g)
    x = torch.randn(300, IN, generator=g)
    x[:, [3, 50, 77]] *= 100
    return x


def stand_in(kind: str, full: nn.Linear, moment: torch.Tensor) -> nn.Module:
    model = OneLayer(copy.deepcopy(full))
    build_emulator(model, [("proj", 0.3)], {"proj": moment}, svd="full", progress=False, kind=kind)
    return model


@pytest.mark.parametrize("kind", EMULATOR_KINDS)
@pytest.mark.parametrize("rank_deficient", [False, True], ids=["outlier-channels", "rank-deficient"])
def test_correction_is_exact_on_the_lora_inputs_for_every_kind(kind, rank_deficient):
    g = torch.Generator().manual_seed(4)
    full = nn.Linear(IN, OUT)
    with torch.no_grad():
        full.weight.copy_(torch.randn(OUT, IN, generator=g))
    x = outlier_inputs(5, rank_deficient)
    emulator = stand_in(kind, full, x.T @ x)
    layer = emulator.proj
    assert isinstance(layer, NF4Linear if kind == "nf4" else LowRankLinear)
    assert (kind == "lowrank-nf4") == isinstance(getattr(layer, "u", None), NF4Linear)
    a, b, scaling = torch.randn(R, IN, generator=g), torch.randn(OUT, R, generator=g) * 0.1, 2.0
    state = {"base_model.model.proj.lora_A.weight": a, "base_model.model.proj.lora_B.weight": b}
    corrected = correct_lora(OneLayer(full), emulator, state, scaling, lam=float("inf"), progress=False)
    # float64 reference: W, the stand-in's own W_E (dequantised where it is stored in 4 bits), both LoRAs
    w, w_e = full.weight.detach().double(), emulated_weight(layer).detach().double()
    delta = scaling * b.double() @ a.double()
    delta_c = scaling * corrected["base_model.model.proj.lora_B.weight"].double() @ \
        corrected["base_model.model.proj.lora_A.weight"].double()
    inputs = torch.randn(50, R, generator=g).double() @ a.double()  # the LoRA's inputs: rowspace(A)
    target = inputs @ (w_e + delta).T
    assert float((inputs @ (w + delta_c).T - target).norm() / target.norm()) < 1e-5
    # the stand-in's forward is the W_E the correction used (so the LoRA was trained on that very W_E)
    with torch.no_grad():
        forward = emulator(x[:20]) - layer(torch.zeros(1, IN))
    torch.testing.assert_close(forward.double(), x[:20].double() @ w_e.T, rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("kind", ["nf4", "lowrank-nf4"])
def test_quantised_kinds_save_load_train_and_load_on_a_meta_skeleton(kind, tiny_transformer, token_batches, tmp_path):
    stats = second_moments(collect_input_stats(tiny_transformer, token_batches, BLOCK_RULES, progress=False))
    full = copy.deepcopy(tiny_transformer)
    report = build_emulator(tiny_transformer, BLOCK_RULES, stats, progress=False, kind=kind)
    assert report.kind == kind and all(r.kind == kind and r.error > 0 for r in report.layers if not r.dense)
    if kind == "nf4":  # full rank: every parameter represented, in 4 bits
        assert report.model_params_after == report.model_params_before
    save_emulator(tiny_transformer, tmp_path / "emulator")
    loaded = copy.deepcopy(full)
    info = load_emulator(loaded, tmp_path / "emulator")
    assert info["kind"] == kind and all(spec["kind"] == kind for spec in info["layers"].values())
    ids = token_batches[0]["input_ids"]
    torch.testing.assert_close(loaded(ids), tiny_transformer(ids), rtol=0, atol=0)
    with torch.device("meta"):
        skeleton = copy.deepcopy(full).to("meta")
    load_emulator(skeleton, tmp_path / "emulator", device="meta")
    assert all(isinstance(skeleton.get_submodule(n), NF4Linear if kind == "nf4" else LowRankLinear)
               for n in info["layers"])
    # LoRA trains on it: gradients reach the adapter through the 4-bit layers, none reach the frozen codes
    peft = attach_lora(loaded, LoraSettings(rank=2, targets=[r"blocks\.\d\.(q|up)"]))
    loss = peft(ids).float().pow(2).mean()
    loss.backward()
    grads = [p.grad for n, p in peft.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)
    assert len(adapter_state(peft)) == 2 * 2 * 2


@pytest.mark.parametrize("kind", EMULATOR_KINDS)
def test_streamed_build_of_every_kind_equals_the_two_step_build(kind, tmp_path, tiny_transformer, token_batches):
    """stream_emulator writes each kind block by block (the run's path); loaded whole or streamed block by block
    from its files (the preview's "emulator" variant), it computes what the two-step build computes."""
    from emloc.checkpoint import CheckpointReader, StreamedForward
    from emloc.emulator import emulator_files
    from test_blockwise import _checkpoint, _streamed

    expected = copy.deepcopy(tiny_transformer)
    stats = second_moments(collect_input_stats(expected, token_batches, BLOCK_RULES, progress=False))
    build_emulator(expected, BLOCK_RULES, stats, progress=False, kind=kind)
    model_file = _checkpoint(tiny_transformer, tmp_path)
    report = stream_emulator(_streamed(model_file), token_batches, BLOCK_RULES, tmp_path / "emulator",
                             progress=False, kind=kind)
    assert report.kind == kind
    loaded = copy.deepcopy(tiny_transformer)
    load_emulator(loaded, tmp_path / "emulator")
    ids = token_batches[0]["input_ids"]
    # nf4 does not depend on the statistics: bit for bit; the factored kinds up to float rounding of the
    # statistics (lowrank-nf4: a rounding may move a factor's value across a code boundary)
    tol = {"nf4": 0.0, "lowrank": 1e-4, "lowrank-nf4": 2e-2}[kind]
    with torch.no_grad():
        want = expected(ids)
        torch.testing.assert_close(loaded(ids), want, rtol=tol, atol=tol)
        skeleton = copy.deepcopy(tiny_transformer).to("meta")
        load_emulator(skeleton, tmp_path / "emulator", device="meta")
        files = CheckpointReader([model_file]).merged(CheckpointReader(emulator_files(tmp_path / "emulator")))
        stream = StreamedForward(skeleton, files, ["blocks.0", "blocks.1"])
        torch.testing.assert_close(skeleton(ids), loaded(ids), rtol=0, atol=0)
        stream.remove()
