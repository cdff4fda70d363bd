"""The data-aware corrections ("weighted", "rank2r"): their exact identities against float64 references, on
inputs with outlier channels and rank-deficient statistics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from emloc import LowRankLinear, correct_lora
from emloc.correction import RIDGE
from test_correction import OneLayer  # the one-layer model both correction tests wrap

IN, OUT, R, TOKENS, DATA_RANK = 24, 16, 3, 40, 15
A_KEY, B_KEY = "base_model.model.proj.lora_A.weight", "base_model.model.proj.lora_B.weight"


def setting(seed=0):
    """Full layer, its activation-aware rank-5 emulator, a LoRA, and data X (tokens, in) whose Σ = XᵀX has two
    outlier channels (x40) and rank DATA_RANK < in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(TOKENS, DATA_RANK, generator=g, dtype=torch.float64) @ torch.randn(DATA_RANK, IN, generator=g,
                                                                                     dtype=torch.float64)
    x[:, [2, 11]] *= 40.0
    full = nn.Linear(IN, OUT)
    with torch.no_grad():
        full.weight.copy_(torch.randn(OUT, IN, generator=g))
    sigma = (x.T @ x).float()
    emulator = LowRankLinear.from_linear(full, 5, second_moment=sigma, svd="full")
    state = {A_KEY: torch.randn(R, IN, generator=g), B_KEY: torch.randn(OUT, R, generator=g) * 0.1}
    return OneLayer(full), OneLayer(emulator), state, x, {"proj": sigma}


def weights(full, emulator):
    return full.proj.weight.detach().double(), emulator.proj.dense_weight().detach().double()


def delta(state, scaling):
    return scaling * state[B_KEY].double() @ state[A_KEY].double()  # s B A: (out, in)


@pytest.mark.parametrize("scaling", [1.0, 0.25])
def test_weighted_correction_is_the_least_squares_fit_on_the_data(scaling):
    full, emulator, state, x, stats = setting()
    corrected = correct_lora(full, emulator, state, scaling, lam=float("inf"), progress=False, method="weighted",
                             second_moments=stats)
    w, w_e = weights(full, emulator)
    target = w_e + delta(state, scaling)  # what the emulator + LoRA computes
    # float64 reference: min over B of ‖X (target - W - B Pᵀ)ᵀ‖² + δ'‖(target - W - B Pᵀ)‖², B: (out, r)
    p = torch.linalg.svd(state[A_KEY].double().T, full_matrices=False)[0]  # (in, r)
    scale = float(torch.trace(x.T @ x)) / IN
    sigma = x.T @ x / scale + RIDGE * torch.eye(IN, dtype=torch.float64)
    gram = p.T @ sigma @ p
    b_ref = torch.linalg.solve(gram, p.T @ sigma @ (target - w).T).T
    found = delta(corrected, scaling)
    torch.testing.assert_close(found, b_ref @ p.T, rtol=0, atol=2e-4 * float(b_ref.abs().max()))
    # normal equations: the mismatch left on the data is orthogonal to the adapter's inputs
    residual = target - w - found
    assert float((residual @ sigma @ p).norm() / ((target - w) @ sigma @ p).norm()) < 1e-4
    # and it beats the paper's correction on the data, which is exact on rowspace(A) but not fitted to X
    paper = delta(correct_lora(full, emulator, state, scaling, lam=float("inf"), progress=False), scaling)
    assert (x @ residual.T).norm() < (x @ (target - w - paper).T).norm()


def test_weighted_without_statistics_is_the_paper_correction():
    full, emulator, state, _, _ = setting(seed=1)
    weighted = correct_lora(full, emulator, state, 0.5, lam=3.0, progress=False, method="weighted")
    paper = correct_lora(full, emulator, state, 0.5, lam=3.0, progress=False)
    torch.testing.assert_close(delta(weighted, 0.5), delta(paper, 0.5), rtol=0, atol=1e-5)


def test_rank2r_is_exact_on_lora_subspace_and_optimal_on_the_data():
    full, emulator, state, x, stats = setting(seed=2)
    scaling = 0.5
    corrected = correct_lora(full, emulator, state, scaling, lam=float("inf"), progress=False, method="rank2r",
                             second_moments=stats)
    assert corrected[A_KEY].shape == (2 * R, IN) and corrected[B_KEY].shape == (OUT, 2 * R)
    w, w_e = weights(full, emulator)
    target = w_e + delta(state, scaling)
    found = w + delta(corrected, scaling)
    # exact on rowspace(A), as the paper's correction
    a = state[A_KEY].double()
    on_a = torch.randn(50, R, dtype=torch.float64) @ a
    assert float((on_a @ (found - target).T).norm() / (on_a @ target.T).norm()) < 1e-5
    # the residual on the data is the optimal rank-r one: Eckart-Young on T = -(W - W_E) Π⊥ S, float64 reference
    p = torch.linalg.svd(a.T, full_matrices=False)[0]
    projector = torch.eye(IN, dtype=torch.float64) - p @ p.T
    eigenvalues, q = torch.linalg.eigh(x.T @ x)
    root = q * eigenvalues.clamp_min(0).sqrt()  # S Sᵀ = XᵀX
    tail = torch.linalg.svdvals(-(w - w_e) @ projector @ root)[R:]
    optimum = float(tail.norm())
    residual = float((x @ (target - found).T).norm())
    paper = delta(correct_lora(full, emulator, state, scaling, lam=float("inf"), progress=False), scaling)
    before = float((x @ (target - w - paper).T).norm())
    assert residual == pytest.approx(optimum, rel=1e-3, abs=1e-4 * before)
    assert residual < 0.9 * before


def test_rank2r_clamps_its_new_components_to_lambda():
    full, emulator, state, _, stats = setting(seed=3)
    corrected = correct_lora(full, emulator, state, 1.0, lam=0.5, progress=False, method="rank2r",
                             second_moments=stats)
    a, b = state[A_KEY].double(), state[B_KEY].double()
    p = corrected[A_KEY].double()[:R].T
    typical = float((b @ a @ p).abs().mean())  # mean over components of mean|(B Rᵀ Σ_a)_j|
    new = corrected[B_KEY].double()[:, R:].abs().mean(0)
    assert float(new.max()) <= 0.5 * typical * (1 + 1e-4)


def test_unknown_method_and_wrong_statistics_are_reported():
    full, emulator, state, _, _ = setting()
    with pytest.raises(ValueError, match="unknown correction method 'best'"):
        correct_lora(full, emulator, state, 1.0, progress=False, method="best")
    with pytest.raises(ValueError, match=r"expected \(24, 24\)"):
        correct_lora(full, emulator, state, 1.0, progress=False, method="weighted",
                     second_moments={"proj": torch.eye(10)})


@pytest.mark.parametrize("rslora", [False, True])
def test_rank2r_adapter_loads_with_peft_at_the_same_scaling(tmp_path, rslora):
    from emloc import LoraSettings, config_with_rank, load_adapter, lora_config, lora_scaling, write_adapter

    full, emulator, state, x, stats = setting(seed=4)
    config = lora_config(full, LoraSettings(rank=R, alpha=2.0, targets=["proj"], rslora=rslora))
    scaling = lora_scaling(config)
    corrected = correct_lora(full, emulator, state, scaling, lam=3.0, progress=False, method="rank2r",
                             second_moments=stats)
    widened = config_with_rank(config, 2 * R)
    assert widened.r == 2 * R and lora_scaling(widened) == pytest.approx(scaling) and config.r == R
    write_adapter(corrected, widened, tmp_path / "corrected")
    loaded = load_adapter(full, tmp_path / "corrected")
    expected = x.float() @ (full.proj.weight + delta(corrected, scaling).float()).T.detach() + full.proj.bias.detach()
    with torch.no_grad():
        found = loaded(x.float())
    torch.testing.assert_close(found, expected, rtol=1e-4, atol=1e-3 * float(expected.abs().max()))
