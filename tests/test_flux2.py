"""The FLUX.2 backend on a tiny [klein] Base pipeline built from configs: a whole headless run (streamed), the
exported LoRA loading in the plain Flux2KleinPipeline and changing its output, the streamed forward, the planner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flux2_fixtures import render, save_tiny_klein
from flux_fixtures import write_subject_images
from pipelines.flux2.backend import LORA_FILE, Flux2Backend, Flux2Settings
from pipelines.planner.catalogue import load_meta_model
from pipelines.planner.planning import PlanSettings, plan_run
from pipelines.runner import Run, RunSettings, models

pytestmark = pytest.mark.slow  # 10 tests, most of them FLUX.2 runs: 27 s on a loaded 2-core machine (54-133 s before)

PROMPT = "a photo of sks dog"


@pytest.fixture(scope="module")
def klein(tmp_path_factory) -> Path:
    return save_tiny_klein(tmp_path_factory.mktemp("models") / "klein-base", distilled=False)


@pytest.fixture(scope="module")
def subject(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("subject")
    write_subject_images(folder, count=4, size=48)
    return folder


def _settings(subject: Path) -> Flux2Settings:
    return Flux2Settings(images=str(subject), prompt=PROMPT, resolution=32, max_sequence_length=32, preview_steps=2)


@pytest.fixture(scope="module")
def finished_run(klein, subject, tmp_path_factory):
    settings = RunSettings(model=str(klein), ratio=0.5, calibration_samples=4, steps=6, rank=4, lr=1e-2, device="cpu")
    run = Run.create(tmp_path_factory.mktemp("runs") / "klein", "flux2", settings, _settings(subject))
    assert models.streams(run)
    run.execute()
    return run


def test_a_headless_klein_run_completes_with_previews_and_exports(finished_run):
    info = json.loads((finished_run.dir / "run.json").read_text())
    assert all(stage["status"] == "done" for stage in info["stages"].values())
    assert (finished_run.dir / "lora" / "diffusers" / LORA_FILE).is_file()
    assert len(list((finished_run.dir / "previews").glob("*.png"))) == 4  # four variants, one prompt and seed
    report = json.loads((finished_run.dir / "emulator" / "report.json").read_text())
    names = {layer["name"] for layer in report["layers"]}
    assert "double_stream_modulation_img.linear" in names and "single_transformer_blocks.1.attn.to_out" in names


def test_the_export_loads_in_the_plain_pipeline_and_changes_its_output(finished_run, klein):
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(str(klein))
    pipe.set_progress_bar_config(disable=True)
    before = render(pipe, PROMPT)
    pipe.load_lora_weights(str(finished_run.dir / "lora" / "diffusers"), weight_name=LORA_FILE)
    after = render(pipe, PROMPT)
    assert float((after - before).abs().max()) > 1e-4


def test_blockwise_forward_is_the_transformers_forward(klein, subject, tmp_path):
    from diffusers import Flux2Transformer2DModel

    backend = Flux2Backend(RunSettings(model=str(klein)), _settings(subject), torch.device("cpu"))
    backend.use_data(subject)
    backend.build_cache(tmp_path)
    backend.load_cache(tmp_path)
    batch = next(iter(backend.calibration_batches()))
    model = Flux2Transformer2DModel.from_pretrained(str(klein), subfolder="transformer").eval()
    with torch.no_grad():
        expected = model(**batch)[0]
        streamed = backend.blockwise(backend.skeleton(), backend.checkpoint())
        state = streamed.enter(streamed, batch)
        for name in streamed.blocks:
            streamed.load(name)
            state = streamed.step(streamed, name, state)
            streamed.unload(name)
        text_tokens = batch["encoder_hidden_states"].shape[1]
        hidden = state["joint"][:, text_tokens:]
        temb = model.time_guidance_embed(batch["timestep"] * 1000, None)
        out = model.proj_out(model.norm_out(hidden, temb))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_a_pipeline_that_is_not_flux2_is_refused_in_words(tmp_path, subject):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    backend = Flux2Backend(RunSettings(model=str(tmp_path)), _settings(subject), torch.device("cpu"))
    with pytest.raises(ValueError, match="needs Flux2Pipeline or Flux2KleinPipeline"):
        backend._index()


def test_the_planner_plans_the_tiny_klein_offline(klein):
    assert load_meta_model(str(klein)).backend == "flux2"
    plan = plan_run(str(klein), PlanSettings(device="cpu", ram_gb=4, resolution=32, text_tokens=32))
    assert plan.recommended is not None and plan.get("embeddings", "emloc") is not None


def test_the_app_offers_the_three_flux2_models_and_runs_them_with_the_flux2_backend(klein):
    from app import families, handlers

    offered = [value for _, value in handlers.model_choices("images", demo={})]
    for name in ("FLUX.2-dev", "FLUX.2-klein-4B", "FLUX.2-klein-9B"):
        assert f"black-forest-labs/{name}" in offered
        assert families.model_backend(f"black-forest-labs/{name}") == "flux2"
    assert families.model_backend(str(klein)) == "flux2"
    assert families.model_backend("black-forest-labs/FLUX.1-dev") == "flux"


def test_the_export_snippet_pasted_into_python_makes_the_preview_again(finished_run, tmp_path):
    import os
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    snippet = finished_run.backend.export_snippet(finished_run.dir / "lora", finished_run.info.get("plan"))
    for setting in ("Flux2KleinPipeline", "height=32, width=32", "num_inference_steps=2", "max_sequence_length=32",
                    "manual_seed(0)"):
        assert setting in snippet, setting
    done = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    made = np.asarray(Image.open(tmp_path / "sample.png"), dtype=np.float32)
    preview = next(p for p in (finished_run.dir / "previews").glob("full-corrected-lora*__seed0.png"))
    shown = np.asarray(Image.open(preview), dtype=np.float32)
    base = np.asarray(Image.open(next((finished_run.dir / "previews").glob("base*__seed0.png"))), dtype=np.float32)
    assert made.shape == shown.shape
    assert np.abs(made - shown).mean() <= 1.0 and np.abs(base - shown).mean() > np.abs(made - shown).mean()
    offloaded = finished_run.backend.export_snippet(finished_run.dir / "lora", {"phases": {"preview": {"mode": "files"}}})
    assert "pipe.enable_group_offload" in offloaded and "offload_to_disk_path" in offloaded
    (tmp_path / "offloaded").mkdir()  # its CPU branch (this machine) still makes the preview again
    done = subprocess.run([sys.executable, "-c", offloaded], cwd=tmp_path / "offloaded", capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    again = np.asarray(Image.open(tmp_path / "offloaded" / "sample.png"), dtype=np.float32)
    assert np.abs(again - shown).mean() <= 1.0


def test_a_headless_dev_run_trains_with_guidance_and_its_export_loads_in_flux2pipeline(subject, tmp_path):
    """FLUX.2 [dev]: a tiny Mistral3 text encoder (streamed block by block while it encodes), the guidance
    embedding in training and previews; the export loads through Flux2Pipeline.load_lora_weights and changes it."""
    from diffusers import Flux2Pipeline

    from flux2_fixtures import save_tiny_dev

    dev = save_tiny_dev(tmp_path / "dev")
    settings = RunSettings(model=str(dev), ratio=0.5, calibration_samples=4, steps=4, rank=4, lr=1e-2, device="cpu")
    run = Run.create(tmp_path / "runs" / "dev", "flux2", settings, _settings(subject))
    assert run.backend._guidance() and models.streams(run)
    run.execute()
    info = json.loads((run.dir / "run.json").read_text())
    assert all(stage["status"] == "done" for stage in info["stages"].values())
    assert len(list((run.dir / "previews").glob("*.png"))) == 4

    pipe = Flux2Pipeline.from_pretrained(str(dev))
    pipe.set_progress_bar_config(disable=True)
    before = render(pipe, PROMPT)
    pipe.load_lora_weights(str(run.dir / "lora" / "diffusers"), weight_name=LORA_FILE)
    assert float((render(pipe, PROMPT) - before).abs().max()) > 1e-4


def test_a_distilled_klein_run_previews_without_cfg(subject, tmp_path):
    distilled = save_tiny_klein(tmp_path / "klein-distilled", distilled=True)
    settings = RunSettings(model=str(distilled), ratio=0.5, calibration_samples=2, steps=2, rank=4, device="cpu")
    run = Run.create(tmp_path / "runs" / "distilled", "flux2", settings, _settings(subject))
    assert not run.backend._real_cfg() and run.backend._sampling()["guidance"] == 1.0
    run.execute()
    assert len(list((run.dir / "previews").glob("*.png"))) == 4


def test_without_torchvision_the_dev_pipeline_tokenizes_with_its_tokenizer_alone(subject, tmp_path, monkeypatch):
    """The published [dev] pipeline loads a PixtralProcessor, which needs torchvision; where loading it fails so,
    the backend loads the tokenizer folder's tokenizer instead and encodes the same prompts."""
    from diffusers import Flux2Pipeline

    from flux2_fixtures import save_tiny_dev

    dev = save_tiny_dev(tmp_path / "dev")
    loaded = Flux2Pipeline.from_pretrained.__func__

    def without_torchvision(cls, *args, **kwargs):
        if "tokenizer" not in kwargs:  # as PixtralProcessor's requires_backends says it
            raise ImportError("PixtralProcessor requires the Torchvision library but it was not found")
        return loaded(cls, *args, **kwargs)

    monkeypatch.setattr(Flux2Pipeline, "from_pretrained", classmethod(without_torchvision))
    settings = RunSettings(model=str(dev), ratio=0.5, calibration_samples=2, steps=1, rank=4, device="cpu")
    run = Run.create(tmp_path / "runs" / "dev", "flux2", settings, _settings(subject))
    pipe = run.backend._pipeline()
    assert type(pipe.tokenizer).__name__.endswith(("Tokenizer", "TokenizerFast"))  # not a processor
    embeds = run.backend._embed(pipe, [PROMPT])[PROMPT]
    assert embeds.shape == (32, 3 * 32) and torch.isfinite(embeds).all()
