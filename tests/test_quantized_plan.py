"""The planner and the emulator kinds (issue 27): each kind's weights as built, and the recommended kind and ratio."""

from __future__ import annotations

import copy

import pytest

from emloc import build_emulator
from emloc.architecture import summarize
from emloc.memory import GiB, MemorySettings, plan_memory
from emloc.quantized import EMULATOR_KINDS
from pipelines.planner import cli as plan_cli
from pipelines.planner.planning import PlanSettings, kind_score, plan_run
from test_memory import FLUX_DEV, tiny_flux, tiny_internvl  # noqa: F401  (fixtures)


@pytest.mark.parametrize("kind", EMULATOR_KINDS)
@pytest.mark.parametrize("which", ["tiny_flux", "tiny_internvl"])
def test_planned_emulator_bytes_equal_the_built_emulator_of_each_kind(which, kind, request):
    """Kept (ratio 1) and compressed layers: the planner's emulator bytes are the built model's, byte for byte."""
    meta, arch, real = request.getfixturevalue(which)
    rules = ((r".*attn.*|.*self_attn.*|.*attention.*", 1.0), (arch.default_compress[0], 0.3))
    settings = MemorySettings(rules=rules, lora_rank=4, image_tiles=1, seq_len=64, dtype="float32",
                              emulator_kind=kind, device="cpu")
    plan = plan_memory(summarize(meta, arch), arch, settings)
    emulator = copy.deepcopy(real)
    report = build_emulator(emulator, list(rules), progress=False, kind=kind)
    assert plan.counts.emulator_bytes == sum(p.nbytes for p in emulator.parameters())
    assert plan.counts.emulator == report.model_params_after
    training = plan.get("training", "emloc").parts
    assert training["weights (emulator)"] == plan.counts.emulator_bytes
    assert (training.get("dequantised layer (4-bit emulator)", 0) > 0) == (kind != "lowrank")


def test_at_one_ratio_the_factors_in_four_bits_take_about_a_quarter_and_nf4_about_a_quarter_of_the_model():
    plans = {k: plan_run(FLUX_DEV, PlanSettings(ratio=0.4, budget_gb=24, emulator_kind=k)) for k in EMULATOR_KINDS}
    counts = {k: p.memory.counts for k, p in plans.items()}
    full = 2 * counts["lowrank"].full  # bf16
    assert counts["nf4"].emulator == counts["nf4"].full  # full rank
    # the compressed layers hold almost all of FLUX.1's parameters: 4.25 of 16 bits, plus the rest in bf16
    assert 0.26 < counts["nf4"].emulator_bytes / full < 0.28
    quarter = counts["lowrank-nf4"].emulator_bytes / counts["lowrank"].emulator_bytes
    assert 0.26 < quarter < 0.30
    training = {k: p.get("training", "emloc").total for k, p in plans.items()}
    assert training["lowrank-nf4"] < training["nf4"] < training["lowrank"]


def test_the_recommendation_keeps_the_most_parameters_then_the_most_bits():
    assert kind_score("nf4", 0.5) > kind_score("lowrank", 0.99) > kind_score("lowrank-nf4", 0.99)
    assert kind_score("lowrank", 1.0) > kind_score("nf4", 0.5)
    small = plan_run(FLUX_DEV, PlanSettings(budget_gb=8, ram_gb=16))
    low, low4 = small.candidates["lowrank"]["ratio"], small.candidates["lowrank-nf4"]["ratio"]
    assert small.candidates["nf4"]["ratio"] is None  # FLUX.1-dev whole in 4 bits does not fit 8 GB
    assert low is not None and low4 > 2 * low  # the 4-bit factors reach a much larger ratio
    assert small.recommended_kind == small.kind == "lowrank-nf4" and small.recommended == small.ratio == low4
    assert small.emloc_fits() and "lowrank fits up to ratio" in small.reason
    roomy = plan_run(FLUX_DEV, PlanSettings(budget_gb=24, ram_gb=64))
    assert roomy.recommended_kind == "nf4" and roomy.candidates["lowrank"]["ratio"] < 1.0
    assert plan_run("OpenGVLab/InternVL3-1B-hf", PlanSettings(budget_gb=80)).recommended_kind == "lowrank"
    # a kind given is planned as given; a ratio given without a kind is a lowrank run's
    given = plan_run(FLUX_DEV, PlanSettings(budget_gb=8, ram_gb=16, emulator_kind="lowrank"))
    assert given.kind == "lowrank" and given.recommended_kind is None and given.recommended == low
    assert plan_run(FLUX_DEV, PlanSettings(budget_gb=8, ram_gb=16, ratio=0.3)).kind == "lowrank"


def test_plan_cli_names_the_kind_and_refuses_an_unknown_one(capsys):
    assert plan_cli.main(["--model", FLUX_DEV, "--budget-gb", "8", "--ram-gb", "16"]) == 0
    out = capsys.readouterr().out
    assert "Recommended ratio: **" in out and "emulator kind **lowrank-nf4** (--emulator-kind lowrank-nf4)" in out
    assert plan_cli.main(["--model", FLUX_DEV, "--budget-gb", "8", "--emulator-kind", "nf4", "--ratio", "0.5"]) == 1
    assert "kind nf4" in capsys.readouterr().out
    assert plan_cli.main(["--model", FLUX_DEV, "--budget-gb", "8", "--emulator-kind", "int3"]) == 2
    assert "invalid choice: 'int3'" in capsys.readouterr().err


def test_nf4_emulator_bytes_are_stated_in_gib_in_the_plan():
    plan = plan_run(FLUX_DEV, PlanSettings(budget_gb=24, emulator_kind="nf4"))
    assert f"{plan.memory.counts.emulator_bytes / GiB:.2f} GiB" in plan.to_markdown()
