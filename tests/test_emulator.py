"""The emulator: activation-aware SVD against dense-SVD references, bookkeeping, rules, save/load."""

from __future__ import annotations

import copy
import json
import math
import random
from fractions import Fraction

import pytest
import torch
from torch import nn

from conftest import BLOCK_RULES, TinyTransformer
from emloc import (
    SOLVERS,
    LowRankLinear,
    build_emulator,
    collect_input_stats,
    factored_rank,
    load_emulator,
    low_rank_factors,
    rank_for_ratio,
    save_emulator,
    second_moments,
    weighted_error,
)


def anisotropic_layer(out_f=40, in_f=56, tokens=400, seed=0):
    """A layer and calibration inputs whose features differ in scale by 100x (as real activations do)."""
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(in_f, out_f)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_f, in_f, generator=g))
    scales = torch.logspace(-1, 1, in_f)
    mixing = torch.linalg.qr(torch.randn(in_f, in_f, generator=g))[0]
    x = (torch.randn(tokens, in_f, generator=g) * scales) @ mixing
    return layer, x, x.T @ x


@pytest.mark.parametrize("in_f,out_f,ratio", [(3072, 3072, 0.5), (3072, 12288, 0.3), (896, 4864, 0.4), (7, 5, 1.0)])
def test_rank_for_ratio_is_floor_of_formula(in_f, out_f, ratio):
    assert rank_for_ratio(in_f, out_f, ratio) == math.floor(ratio * in_f * out_f / (in_f + out_f))


def test_rank_for_ratio_is_exact_where_the_formula_is_a_whole_number():
    """Every layer up to 150 x 50 at the planner's ratios 0.01, ..., 1.00 where ρ·in·out/(in+out) is a whole
    number (1783 cases; float arithmetic gave one less on 82 of them), and 20 000 random others."""
    boundary = [(i, o, p) for i in range(1, 151) for o in range(1, 51) for p in range(1, 101)
                if (p * i * o) % (100 * (i + o)) == 0]
    generator = random.Random(0)
    others = [(generator.randint(1, 20000), generator.randint(1, 20000), generator.randint(1, 100)) for _ in range(20000)]
    assert len(boundary) == 1783
    for i, o, p in boundary + others:
        assert rank_for_ratio(i, o, p / 100) == Fraction(p, 100) * i * o // (i + o), (i, o, p)


def test_factored_rank_keeps_a_layer_at_ratio_one_or_where_factors_are_not_smaller():
    assert factored_rank(256, 192, 1.0) == factored_rank(256, 192, 1) == 0
    assert factored_rank(256, 192, 0.99) == rank_for_ratio(256, 192, 0.99) == 108
    assert factored_rank(32, 32, 0.5) == 8 and factored_rank(1, 8, 0.5) == 0  # k = max(1, 0): 1·9 >= 8


@pytest.mark.parametrize("ratio", [0, -0.1, 1.01, float("nan"), "0.5", True])
def test_ratio_outside_unit_interval_is_rejected(ratio):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        rank_for_ratio(10, 10, ratio)


@pytest.mark.parametrize("solver", SOLVERS)
def test_whitened_emulator_beats_plain_svd_on_anisotropic_inputs(solver):
    layer, _, c = anisotropic_layer()
    rank = 10
    aware = LowRankLinear.from_linear(layer, rank, second_moment=c, svd=solver)
    plain = LowRankLinear.from_linear(layer, rank, svd=solver)
    err_aware = weighted_error(layer.weight, aware.dense_weight(), c)
    err_plain = weighted_error(layer.weight, plain.dense_weight(), c)
    assert err_aware < 0.8 * err_plain


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("with_stats", [False, True])
def test_full_rank_emulator_equals_layer(solver, with_stats):
    layer, x, c = anisotropic_layer(out_f=24, in_f=32)
    low = LowRankLinear.from_linear(layer, 24, second_moment=c if with_stats else None, svd=solver)
    torch.testing.assert_close(low(x), layer(x), rtol=1e-3, atol=1e-3 * layer(x).abs().max().item())


@pytest.mark.parametrize("solver", SOLVERS)
def test_plain_error_matches_eckart_young_reference(solver):
    """Without statistics the emulator is the best rank-k approximation: error = tail of σ² (dense SVD)."""
    layer, _, _ = anisotropic_layer()
    sigma = torch.linalg.svdvals(layer.weight.double())
    rank = 12
    expected = math.sqrt(float((sigma[rank:] ** 2).sum() / (sigma ** 2).sum()))
    u, v = low_rank_factors(layer.weight, rank, None, solver)
    assert weighted_error(layer.weight, u @ v, None) == pytest.approx(expected, rel=5e-3)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("shape", [(40, 56), (56, 40), (48, 48)], ids=["wide", "tall", "square"])
@pytest.mark.parametrize("tokens", [400, 30], ids=["full-rank-C", "fewer-tokens-than-inputs"])
def test_whitened_error_matches_svd_of_weighted_weight(solver, shape, tokens):
    """With C = XᵀX the emulator is optimal for ‖X(W-W_E)ᵀ‖: error = tail of σ²(X Wᵀ) (dense SVD), also when
    C is singular (fewer calibration tokens than inputs) and for wide layers, where "gram" never whitens."""
    layer, x, c = anisotropic_layer(*shape, tokens=tokens)
    rank = 12
    sigma = torch.linalg.svdvals((x.double() @ layer.weight.double().T))
    expected = math.sqrt(float((sigma[rank:] ** 2).sum() / (sigma ** 2).sum()))
    u, v = low_rank_factors(layer.weight, rank, c, solver)
    assert weighted_error(layer.weight, u @ v, c) == pytest.approx(expected, rel=5e-3)


@pytest.mark.parametrize("tokens", [400, 30])
def test_gram_without_whitening_equals_the_whitened_factorisation(tokens):
    """For out <= in "gram" forms W C Wᵀ instead of whitening C: the same W_E = U_k U_kᵀ W and the same
    balanced factors (‖u_i‖ = ‖v_i S‖ = σ_i^½) as the dense SVD of W S (docs/method.md step 2)."""
    layer, _, c = anisotropic_layer(out_f=40, in_f=56, tokens=tokens)
    rank = 12
    u, v = low_rank_factors(layer.weight, rank, c, "gram")
    u_ref, v_ref = low_rank_factors(layer.weight, rank, c, "full")
    scale = (u_ref @ v_ref).abs().max().item()
    torch.testing.assert_close(u @ v, u_ref @ v_ref, rtol=0, atol=2e-3 * scale)
    torch.testing.assert_close(u.norm(dim=0), u_ref.norm(dim=0), rtol=2e-3, atol=0)


def test_build_emulator_bookkeeping(tiny_transformer):
    before = sum(p.numel() for p in tiny_transformer.parameters())
    report = build_emulator(tiny_transformer, BLOCK_RULES, progress=False)
    assert len(report.layers) == 12
    for layer in report.layers:
        rank = rank_for_ratio(layer.in_features, layer.out_features, 0.5)
        module = tiny_transformer.get_submodule(layer.name)
        if layer.dense:
            assert isinstance(module, nn.Linear) and rank * (layer.in_features + layer.out_features) >= layer.in_features * layer.out_features
        else:
            assert isinstance(module, LowRankLinear) and module.rank == layer.rank == rank
            assert layer.params_after == sum(p.numel() for p in module.parameters())
        assert layer.params_before == layer.in_features * layer.out_features + layer.out_features
    after = sum(p.numel() for p in tiny_transformer.parameters())
    assert report.model_params_before == before and report.model_params_after == after
    assert report.ratio == pytest.approx(after / before)
    assert before - after == report.compressed_params_before - report.compressed_params_after


def test_layer_whose_factors_are_not_smaller_stays_dense():
    # 1 -> 8 at ratio 0.5: k = max(1, floor(0.5·8/9)) = 1 and k(in+out) = 9 >= in·out = 8
    model = nn.Sequential(nn.Linear(1, 8), nn.Linear(8, 8))
    report = build_emulator(model, [(r"0", 0.5), (r"1", 0.5)], progress=False)
    assert report.layers[0].dense and isinstance(model[0], nn.Linear)
    assert not report.layers[1].dense and isinstance(model[1], LowRankLinear)


def test_ratio_one_keeps_every_layer_unchanged(tiny_transformer, token_batches):
    """A user who keeps 100% of a layer gets the layer itself (a 256 -> 192 layer used to become rank 109)."""
    stats = second_moments(collect_input_stats(tiny_transformer, token_batches, BLOCK_RULES, progress=False))
    before = {name: p.clone() for name, p in tiny_transformer.named_parameters()}
    report = build_emulator(tiny_transformer, [(BLOCK_RULES[0][0], 1.0)], stats, progress=False)
    assert len(report.layers) == 12 and all(layer.dense and layer.rank == 0 for layer in report.layers)
    assert all(layer.params_after == layer.params_before and layer.error == 0.0 for layer in report.layers)
    assert report.model_params_after == report.model_params_before and report.ratio == 1.0
    assert not any(isinstance(m, LowRankLinear) for m in tiny_transformer.modules())
    for name, p in tiny_transformer.named_parameters():
        assert torch.equal(p, before[name]), name
    assert report.to_markdown().count("| kept |") == 12


def test_first_matching_rule_wins(tiny_transformer):
    rules = [(r"blocks\.0\..*", 0.25), (r"blocks\.\d+\.(q|k|v|o|up|down)", 0.5)]
    build_emulator(tiny_transformer, rules, progress=False)
    assert tiny_transformer.blocks[0].up.rank == rank_for_ratio(32, 64, 0.25)
    assert tiny_transformer.blocks[1].up.rank == rank_for_ratio(32, 64, 0.5)


def test_rules_matching_nothing_name_the_patterns(tiny_transformer):
    with pytest.raises(ValueError, match=r"'decoder\\\\.\.\*'.*blocks\.0\.q"):
        build_emulator(tiny_transformer, [(r"decoder\..*", 0.5)], progress=False)


def test_rule_ratio_outside_unit_interval_is_an_error(tiny_transformer):
    with pytest.raises(ValueError, match="ratio of rule"):
        build_emulator(tiny_transformer, [(r"blocks\..*", 1.5)], progress=False)


def test_second_build_never_factors_the_factors(tiny_transformer):
    build_emulator(tiny_transformer, BLOCK_RULES, progress=False)
    with pytest.raises(ValueError, match="no linear layer matches"):
        build_emulator(tiny_transformer, [(r".*\.(u|v)", 0.5)], progress=False)


def test_stats_of_wrong_size_are_reported_with_the_layer(tiny_transformer):
    with pytest.raises(ValueError, match=r"'blocks\.0\.q'.*\(8, 8\).*expected \(32, 32\)"):
        build_emulator(tiny_transformer, BLOCK_RULES, stats={"blocks.0.q": torch.eye(8)}, progress=False)


def test_nan_in_stats_or_weights_is_reported(tiny_transformer):
    bad = torch.eye(32)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"statistics of layer 'blocks\.1\.k'.*NaN"):
        build_emulator(copy.deepcopy(tiny_transformer), BLOCK_RULES, stats={"blocks.1.k": bad}, progress=False)
    with torch.no_grad():
        tiny_transformer.blocks[1].up.weight[3, 3] = float("inf")
    with pytest.raises(ValueError, match=r"weight of layer 'blocks\.1\.up'.*NaN or inf"):
        build_emulator(tiny_transformer, BLOCK_RULES, progress=False)


def test_save_load_round_trip_is_exact(tiny_transformer, token_batches, tmp_path):
    stats = second_moments(collect_input_stats(tiny_transformer, token_batches, BLOCK_RULES, progress=False))
    full = copy.deepcopy(tiny_transformer)
    build_emulator(tiny_transformer, BLOCK_RULES, stats, progress=False)
    save_emulator(tiny_transformer, tmp_path / "emulator")
    load_emulator(full, tmp_path / "emulator")
    ids = token_batches[0]["input_ids"]
    torch.testing.assert_close(full(ids), tiny_transformer(ids), rtol=0, atol=0)


KEEP_BLOCK_0 = [(r"blocks\.0\..*", 1.0), (r"blocks\.1\.(q|k|v|o|up|down)", 0.5)]


@pytest.mark.parametrize("rules", [[(BLOCK_RULES[0][0], 1.0)], KEEP_BLOCK_0], ids=["ratio-1", "kept-and-factored"])
def test_emulator_with_kept_layers_saves_loads_and_passes_its_fingerprint(tiny_transformer, token_batches, tmp_path, rules):
    """The fingerprint covers every target, kept or factored, when built and when loaded (--ratio 1 used to fail
    at train: an emulator with no factors could not be saved, and one with both never passed its fingerprint)."""
    full = copy.deepcopy(tiny_transformer)
    stats = second_moments(collect_input_stats(tiny_transformer, token_batches, rules, progress=False))
    build_emulator(tiny_transformer, rules, stats, progress=False)
    save_emulator(tiny_transformer, tmp_path / "emulator")
    info = load_emulator(full, tmp_path / "emulator")
    assert len(info["targets"]) == 12 and len(info["layers"]) == (0 if len(rules) == 1 else 6)
    ids = token_batches[0]["input_ids"]
    torch.testing.assert_close(full(ids), tiny_transformer(ids), rtol=0, atol=0)
    torch.manual_seed(123)
    with pytest.raises(ValueError, match="differ from those the emulator"):
        load_emulator(TinyTransformer(), tmp_path / "emulator")


def test_emulator_files_without_a_target_list_fingerprint_the_targets_of_their_rules(tiny_transformer, tmp_path):
    full = copy.deepcopy(tiny_transformer)
    build_emulator(tiny_transformer, KEEP_BLOCK_0, progress=False)
    save_emulator(tiny_transformer, tmp_path / "emulator")
    config = tmp_path / "emulator" / "emulator.json"
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "targets"}))
    load_emulator(full, tmp_path / "emulator")
    assert isinstance(full.blocks[1].up, LowRankLinear) and isinstance(full.blocks[0].up, nn.Linear)


def test_load_onto_meta_skeleton_keeps_dense_layers_unmaterialised(tiny_transformer, tmp_path):
    build_emulator(tiny_transformer, BLOCK_RULES, progress=False)
    save_emulator(tiny_transformer, tmp_path / "emulator")
    with torch.device("meta"):
        skeleton = TinyTransformer()
    info = load_emulator(skeleton, tmp_path / "emulator")
    for name in info["layers"]:
        loaded, built = skeleton.get_submodule(name), tiny_transformer.get_submodule(name)
        assert isinstance(loaded, LowRankLinear)
        for key, tensor in built.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], tensor)
    assert skeleton.embed.weight.device.type == "meta" and skeleton.head.weight.device.type == "meta"
    assert skeleton.blocks[0].norm1.weight.device.type == "meta"


def test_loading_onto_a_different_model_is_refused(tiny_transformer, tmp_path):
    build_emulator(copy.deepcopy(tiny_transformer), BLOCK_RULES, progress=False)
    emulator = copy.deepcopy(tiny_transformer)
    build_emulator(emulator, BLOCK_RULES, progress=False)
    save_emulator(emulator, tmp_path / "emulator")
    torch.manual_seed(123)
    other = TinyTransformer()
    with pytest.raises(ValueError, match="differ from those the emulator"):
        load_emulator(other, tmp_path / "emulator")
    with pytest.raises(ValueError, match="does not exist in this model"):
        load_emulator(TinyTransformer(layers=1), tmp_path / "emulator")


def test_offloaded_model_builds_the_same_emulator(tiny_transformer, token_batches):
    from accelerate import cpu_offload

    stats = second_moments(collect_input_stats(tiny_transformer, token_batches, BLOCK_RULES, progress=False))
    expected = copy.deepcopy(tiny_transformer)
    build_emulator(expected, BLOCK_RULES, stats, progress=False)
    offloaded = cpu_offload(tiny_transformer, execution_device=torch.device("cpu"))
    assert offloaded.blocks[0].up.weight.device.type == "meta"
    build_emulator(offloaded, BLOCK_RULES, stats, progress=False)
    assert isinstance(offloaded.blocks[0].up, LowRankLinear)
    ids = token_batches[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(offloaded(ids), expected(ids), rtol=1e-5, atol=1e-5)
