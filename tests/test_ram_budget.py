"""Host RAM is a budget: a run plans both memories when it is created, streams what does not fit, and refuses,
in words and before its folder exists, a budget that no choice fits."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from flux_fixtures import save_tiny_flux, write_subject_images
from pipelines.flux.backend import FluxSettings
from pipelines.runner import Run, RunSettings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_a_ram_budget_nothing_fits_is_refused_before_the_run_folder(tmp_path):
    models = {"dev": save_tiny_flux(tmp_path / "tiny-flux-dev", guidance=True)}
    write_subject_images(tmp_path / "dog", count=3, seed=4)
    flux = FluxSettings(images=str(tmp_path / "dog"), prompt="sks dog", resolution=32, max_sequence_length=16)
    folder = tmp_path / "runs" / "tight"
    with pytest.raises(ValueError) as refused:
        Run.create(folder, "flux", RunSettings(model=str(models["dev"]), device="cpu", ram_gb=0.05), flux)
    message = str(refused.value)
    assert "does not fit" in message and "of RAM" in message and "51.2 MiB budget" in message
    assert any(name in message for name in ("calibration", "emulator construction", "training", "correction",
                                            "preview")), message
    assert not folder.exists() and not list((tmp_path / "runs").glob("*"))


def test_a_run_whose_ram_budget_is_below_the_model_size_completes(tmp_path, monkeypatch):
    """A 50 MiB transformer (real head size, width 256, 2 double + 8 single blocks) under a 0.048 GiB (49.2 MiB)
    budget: the plan streams every phase that uses the full model (the preview too), and the whole run finishes.

    The process's own runtime (0.4 GiB of Python and libraries, `emloc.memory.HOST_RUNTIME_CPU`) is left out of
    the plan here, so that a model small enough for a test can stand for one larger than the RAM;
    benchmarks/streaming.py runs a 1.3 GiB model under a 1.1 GiB budget with the runtime counted and measures
    each stage's real peak."""
    from streaming import folder_bytes, write_model

    from pipelines.demo import data

    monkeypatch.setattr("emloc.memory.HOST_RUNTIME_CPU", 0)
    model = tmp_path / "flux-deep"
    write_model(model, 2, 8, 256)
    budget = 0.048
    assert folder_bytes(model / "transformer") > budget * 1024 ** 3
    images = tmp_path / "images"
    data.write_subject_images(images, count=3, seed=0)
    settings = RunSettings(model=str(model), ratio=0.45, steps=2, rank=4, alpha=4, calibration_samples=2,
                           device="cpu", ram_gb=budget)
    flux = FluxSettings(images=str(images), prompt="a photo of sks shape", resolution=32, max_sequence_length=16,
                        preview_steps=1)
    run = Run.create(tmp_path / "runs" / "deep", "flux", settings, flux)
    plan = run.info["plan"]
    assert plan["ram_budget_gib"] == budget
    streamable = ("calibration", "emulator", "correction", "preview")  # training holds the emulator, never the model
    assert all(plan["phases"][name]["streamed"] for name in streamable), plan
    assert all(phase["host_gib"] <= budget for phase in plan["phases"].values()), plan
    run.execute()
    info = json.loads((run.dir / "run.json").read_text())
    assert all(stage["status"] == "done" for stage in info["stages"].values()), info["stages"]
    assert len(list((run.dir / "previews").glob("*.png"))) >= 1
    assert not (run.dir / "calibration" / "stats.safetensors").exists()
    # the same run with room for the whole model previews it whole
    roomy = Run.create(tmp_path / "runs" / "roomy", "flux", dataclasses.replace(settings, ram_gb=8.0), flux)
    assert roomy.info["plan"]["phases"]["preview"]["streamed"] is False
