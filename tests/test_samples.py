"""Samples during training: a step-0 baseline and a round every N steps from the emulator + LoRA that trains, in
runs/<name>/samples/step-N/, without changing what training makes."""

from __future__ import annotations

import json

from safetensors.torch import load_file

from app import results
from flux_fixtures import save_tiny_flux, write_subject_images
from pipelines.flux.backend import FluxSettings
from pipelines.internvl.backend import VlmSettings
from pipelines.runner import Run, RunSettings
from pipelines.runner.stages import SAMPLE_NOW, samples
from vlm_fixtures import save_tiny_internvl, write_colour_csv


def test_sampling_rounds_leave_the_adapter_as_training_without_them(tmp_path):
    model = save_tiny_flux(tmp_path / "tiny-flux", guidance=True)
    write_subject_images(tmp_path / "dog", count=3, seed=4)
    flux = FluxSettings(images=str(tmp_path / "dog"), prompt="sks dog", resolution=32, max_sequence_length=16,
                        preview_steps=1, preview_seeds=[0, 1])
    adapters = {}
    for every in (0, 2):
        settings = RunSettings(model=str(model), ratio=0.5, steps=4, lr=1e-2, rank=4, calibration_samples=2,
                               device="cpu", sample_every=every)
        run = Run.create(tmp_path / "runs" / f"every-{every}", "flux", settings, flux)
        run.execute(["calibrate", "emulate", "train"])
        adapters[every] = load_file(str(run.dir / "adapter-emulator" / "adapter_model.safetensors"))
        rounds = samples(run.dir)
        if every:
            assert [p.name for p in rounds] == ["step-000004", "step-000002", "step-000000"]  # newest first
            assert all(len(list(p.glob("*.png"))) >= 2 for p in rounds)  # both seeds, every round
            shown = results.samples_view(run.dir)["images"]  # the Train step's gallery: newest first, by step
            assert [label for _, label in shown] == ["step 4", "step 4", "step 2", "step 2", "step 0", "step 0"]
        else:
            assert rounds == []
    assert adapters[0].keys() == adapters[2].keys()
    for key in adapters[0]:
        assert (adapters[0][key] == adapters[2][key]).all(), key


def test_sample_now_and_the_default_of_about_five_rounds(tmp_path):
    model = save_tiny_internvl(tmp_path / "tiny-internvl")
    rows_folder = tmp_path / "qa"
    write_colour_csv(rows_folder)
    settings = RunSettings(model=str(model), ratio=0.5, steps=10, lr=1e-3, rank=4, calibration_samples=8,
                           device="cpu")
    run = Run.create(tmp_path / "runs" / "vlm", "vlm", settings,
                     VlmSettings(data=str(rows_folder / "qa.csv"), max_new_tokens=3, preview_samples=2))
    (run.dir / SAMPLE_NOW).write_text("")  # as the app's Sample now button: the next step samples
    run.execute(["calibrate", "emulate", "train"])
    steps = sorted(int(p.name.split("-")[1]) for p in samples(run.dir))
    assert steps == [0, 1, 2, 4, 6, 8, 10]  # baseline, the one asked for, then every 10 // 5 steps
    answers = json.loads((samples(run.dir)[0] / "previews.json").read_text())
    assert len(answers["items"]) == 2 and "emulator + LoRA" in answers["items"][0]["answers"]
    assert not (run.dir / SAMPLE_NOW).exists()
