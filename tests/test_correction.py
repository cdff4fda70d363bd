"""LoRA correction: the exact identity on rowspace(A), the λ clamp, and bad adapters."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from emloc import LowRankLinear, correct_lora

IN, OUT, R = 24, 16, 3


class OneLayer(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def pair(seed=0):
    """A full layer, its rank-4 emulator, and a random LoRA adapter (A: r x in, B: out x r)."""
    g = torch.Generator().manual_seed(seed)
    full = nn.Linear(IN, OUT)
    with torch.no_grad():
        full.weight.copy_(torch.randn(OUT, IN, generator=g))
    emulator = LowRankLinear.from_linear(full, 4, svd="full")
    state = {"base_model.model.proj.lora_A.weight": torch.randn(R, IN, generator=g),
             "base_model.model.proj.lora_B.weight": torch.randn(OUT, R, generator=g) * 0.1}
    return OneLayer(full), OneLayer(emulator), state


def delta(state, scaling, a_key="base_model.model.proj.lora_A.weight", b_key="base_model.model.proj.lora_B.weight"):
    return scaling * state[b_key] @ state[a_key]  # ΔW = s B A: (out, in)


@pytest.mark.parametrize("scaling", [1.0, 0.25, 16 / math.sqrt(R)])  # plain, alpha/r < 1, rsLoRA alpha/sqrt(r)
def test_correction_is_exact_on_lora_subspace(scaling):
    full, emulator, state = pair()
    corrected = correct_lora(full, emulator, state, scaling, lam=float("inf"), progress=False)
    w, w_e = full.proj.weight.detach(), emulator.proj.dense_weight()
    a = state["base_model.model.proj.lora_A.weight"]
    x = torch.randn(50, R) @ a  # 50 inputs in rowspace(A): (50, r) @ (r, in)
    w_e = w_e.detach()
    lhs = x @ (w + delta(corrected, scaling)).T
    rhs = x @ (w_e + delta(state, scaling)).T
    assert float((lhs - rhs).norm() / rhs.norm()) < 1e-4
    # and the corrected update does nothing off the subspace
    basis = torch.linalg.svd(a.T, full_matrices=True)[0][:, R:]  # (in, in - r) orthogonal complement
    x_perp = torch.randn(50, IN - R) @ basis.T
    assert float((x_perp @ delta(corrected, scaling).T).norm() / x_perp.norm()) < 1e-5


def test_lambda_zero_returns_the_adapter_unchanged():
    full, emulator, state = pair()
    corrected = correct_lora(full, emulator, state, 1.0, lam=0.0, progress=False)
    assert corrected.keys() == state.keys() and all(torch.equal(corrected[k], state[k]) for k in state)


@pytest.mark.parametrize("lam", [0.5, 3.0])
def test_clamp_scales_exactly_the_components_that_exceed_lambda(lam):
    full, emulator, state = pair(seed=3)
    # B's components on very different scales, so that some corrections exceed λ·|B'| and some do not
    q = torch.linalg.qr(torch.randn(IN, R, generator=torch.Generator().manual_seed(4)))[0]
    state["base_model.model.proj.lora_A.weight"] = torch.diag(torch.tensor([3.0, 2.0, 1.0])) @ q.T
    state["base_model.model.proj.lora_B.weight"] = torch.randn(OUT, R) * torch.tensor([10.0, 0.1, 0.01])
    s = 0.5
    corrected = correct_lora(full, emulator, state, s, lam=lam, progress=False)
    a_new = corrected["base_model.model.proj.lora_A.weight"].double()  # Pᵀ
    b = state["base_model.model.proj.lora_B.weight"].double()
    a = state["base_model.model.proj.lora_A.weight"].double()
    b_rotated = b @ a @ a_new.T  # B Rᵀ Σ_a = B A P, independent of SVD signs
    unclamped = -(full.proj.weight - emulator.proj.dense_weight()).detach().double() @ a_new.T / s
    applied = corrected["base_model.model.proj.lora_B.weight"].double() - b_rotated
    base, size = b_rotated.abs().mean(0), unclamped.abs().mean(0)
    exceeds = size > lam * base
    assert exceeds.any() and (~exceeds).any()
    for j in range(R):
        if exceeds[j]:
            assert float(applied[:, j].abs().mean()) == pytest.approx(lam * float(base[j]), rel=1e-3)
            torch.testing.assert_close(applied[:, j] / applied[:, j].norm(), unclamped[:, j] / unclamped[:, j].norm(),
                                       rtol=1e-3, atol=1e-4)
        else:
            # B' - B Rᵀ Σ_a cancels float32 values as large as |B'|: tolerance relative to that
            torch.testing.assert_close(applied[:, j], unclamped[:, j], rtol=1e-4,
                                       atol=2e-6 * float(b_rotated[:, j].abs().max()))


def test_per_module_scaling_and_dtype_are_kept():
    full, emulator, state = pair()
    half = {k: v.to(torch.bfloat16) for k, v in state.items()}
    corrected = correct_lora(full, emulator, half, {"proj": 2.0}, lam=float("inf"), progress=False)
    assert all(t.dtype == torch.bfloat16 for t in corrected.values())
    reference = correct_lora(full, emulator, {k: v.float() for k, v in half.items()}, 2.0, lam=float("inf"),
                             progress=False)
    for key in state:
        torch.testing.assert_close(corrected[key].float(), reference[key], rtol=2e-2, atol=2e-2)


def test_adapter_key_matching_no_module_names_it():
    full, emulator, state = pair()
    state = {k.replace("proj", "attn.to_q"): v for k, v in state.items()}
    with pytest.raises(ValueError, match=r"'attn\.to_q' matches no module in the full model"):
        correct_lora(full, emulator, state, 1.0, progress=False)


def test_nan_in_adapter_or_incomplete_pair_is_reported():
    full, emulator, state = pair()
    broken = dict(state)
    broken["base_model.model.proj.lora_B.weight"] = state["base_model.model.proj.lora_B.weight"].clone()
    broken["base_model.model.proj.lora_B.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="lora_B.weight.*NaN"):
        correct_lora(full, emulator, broken, 1.0, progress=False)
    with pytest.raises(ValueError, match="'proj' has lora_A but not its partner"):
        correct_lora(full, emulator, {"base_model.model.proj.lora_A.weight": state["base_model.model.proj.lora_A.weight"]},
                     1.0, progress=False)


def test_adapter_of_another_shape_is_reported():
    full, emulator, state = pair()
    state = {k: v[:, :10] if "lora_A" in k else v for k, v in state.items()}
    with pytest.raises(ValueError, match="belongs to another model"):
        correct_lora(full, emulator, state, 1.0, progress=False)


def test_nan_in_full_weights_is_reported():
    full, emulator, state = pair()
    with torch.no_grad():
        full.proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="'proj' produced NaN"):
        correct_lora(full, emulator, state, 1.0, progress=False)


def test_offloaded_full_model_gives_the_same_correction():
    from accelerate import cpu_offload

    full, emulator, state = pair()
    expected = correct_lora(full, emulator, state, 1.0, lam=float("inf"), progress=False)
    offloaded = cpu_offload(full, execution_device=torch.device("cpu"))
    found = correct_lora(offloaded, emulator, state, 1.0, lam=float("inf"), progress=False)
    for key in state:
        torch.testing.assert_close(found[key], expected[key], rtol=1e-4, atol=1e-5)
