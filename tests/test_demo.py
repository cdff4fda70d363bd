"""The demo models and their synthetic data: deterministic data with right labels, a matcher that reads
ground truth correctly, and shipped demo models that load through the real loading code and do their task."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.demo import data
from pipelines.demo import evaluate as demo_eval
from pipelines.demo import FLUX_DIR, VLM_DIR



def test_shape_data_is_deterministic_and_balanced():
    first, again, other = data.shape_dataset(36, 3), data.shape_dataset(36, 3), data.shape_dataset(36, 4)
    assert first == again and first != other
    assert np.array_equal(np.asarray(data.render(first[:1])), np.asarray(data.render(again[:1])))
    pairs = [(s.shape, s.colour) for s in first]
    assert all(pairs.count(p) == 2 for p in set(pairs)) and len(set(pairs)) == 18  # every pair, equally often
    assert first[0].caption == f"a {first[0].colour} {first[0].shape} on a white background"


@pytest.mark.parametrize("placement", sorted(data.PLACEMENTS))
def test_shapes_stay_inside_their_placement(placement):
    smallest, largest, shift = data.PLACEMENTS[placement]
    specs = data.shape_dataset(200, 2, placement=placement)
    sides = np.array([s.size for s in specs]) / data.IMAGE_SIZE
    centres = np.array([(s.cx, s.cy) for s in specs]) / data.IMAGE_SIZE - 0.5
    assert smallest <= sides.min() and sides.max() <= largest and np.abs(centres).max() <= shift
    assert sides.max() - sides.min() > 0.8 * (largest - smallest)  # the whole range is used, not one size


@pytest.mark.parametrize("placement", sorted(data.PLACEMENTS))
def test_template_matcher_reads_ground_truth_shapes_and_colours(placement):
    specs = data.shape_dataset(240, 11, shapes=data.ALL_SHAPES, colours=tuple(data.SUBJECT_COLOURS),
                               placement=placement)
    readings = [data.read_image(data.render([s])) for s in specs]
    assert all(r.shape == s.shape for r, s in zip(readings, specs))
    assert all(r.colour == s.colour for r, s in zip(readings, specs))
    assert min(r.iou for r in readings) > 0.75  # well above read_image's 0.6; a 22-px triangle's edge pixels cost 0.2


def test_template_matcher_finds_nothing_in_a_blank_or_noisy_image():
    assert data.read_image(Image.new("RGB", (64, 64), "white")).shape == "none"
    pixels = np.full((64, 64, 3), 255, dtype=np.uint8)
    pixels[np.random.default_rng(0).random((64, 64)) < 0.15] = (220, 40, 40)  # scattered red specks
    assert data.read_image(Image.fromarray(pixels)).shape == "none"  # no template fits scattered pixels


def test_questions_are_labelled_from_the_drawn_shape():
    for spec in data.shape_dataset(30, 5):
        (q1, shape), (q2, colour) = data.shape_questions(spec)
        assert (q1, shape, colour) == ("What shape is this?", spec.shape, spec.colour) and spec.shape in q2


def test_mug_and_subject_images_are_deterministic(tmp_path):
    rows = data.write_mug_images(tmp_path / "a", per_owner=2, seed=1)
    again = data.write_mug_images(tmp_path / "b", per_owner=2, seed=1)
    assert [a for _, _, a in rows] == [a for _, _, a in again] and {a for _, _, a in rows} == {
        "Ana's", "Ben's", "Chloe's", "David's"}
    assert all(np.array_equal(np.asarray(Image.open(p)), np.asarray(Image.open(q)))
               for (p, _, _), (q, _, _) in zip(rows, again))
    subject = data.write_subject_images(tmp_path / "sks", count=4, seed=0)
    assert all((r.shape, r.colour) == ("cross", "teal") for r in (data.read_image(Image.open(p)) for p in subject))


def test_the_example_photos_vary_in_size_and_place_as_a_users_do(tmp_path):
    """The app's example set (and the teach-rate photos) are not all framed alike: a demo that learned only from one
    framing taught the wrong lesson (issue 29)."""
    boxes = []
    for path in data.write_subject_images(tmp_path / "sks", count=5, seed=0):
        rows, cols = np.nonzero(data.foreground(Image.open(path)))
        boxes.append((cols.max() - cols.min() + 1, (cols.max() + cols.min()) / 2, (rows.max() + rows.min()) / 2))
    sides, cx, cy = (np.array(v) / data.IMAGE_SIZE for v in zip(*boxes))
    assert 0.34 <= sides.min() and sides.max() <= 0.66 and sides.max() - sides.min() > 0.1
    assert np.abs(np.r_[cx, cy] - 0.5).max() <= 0.16 and np.abs(np.r_[cx, cy] - 0.5).max() > 0.06  # beyond "focused"


def test_shipped_demo_weights_are_small_safetensors():
    for folder in (FLUX_DIR, VLM_DIR):
        files = [p for p in folder.rglob("*") if p.is_file()]
        weights = [p for p in files if p.suffix == ".safetensors"]
        assert weights and not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
        assert max(p.stat().st_size for p in files) < 20e6
        assert sum(p.stat().st_size for p in files) < 15e6


def test_flux_demo_loads_through_the_backend_and_renders_the_named_colour_and_shape():
    from diffusers import FluxTransformer2DModel

    from pipelines.flux.backend import FluxBackend, FluxSettings
    from pipelines.runner import RunSettings

    backend = FluxBackend(RunSettings(model=str(FLUX_DIR), device="cpu"), FluxSettings(), torch.device("cpu"))
    transformer = backend.load_model(torch.device("cpu"))
    assert isinstance(transformer, FluxTransformer2DModel) and not transformer.config.guidance_embeds
    pipe = demo_eval.load_flux_demo(FLUX_DIR)
    prompts = [("red", "circle"), ("blue", "square"), ("yellow", "triangle")]
    images = demo_eval.generate(pipe, [data.caption(c, s) for c, s in prompts], seeds=[0])
    readings = [data.read_image(image) for image in images]
    assert [r.colour for r in readings] == [c for c, _ in prompts]
    assert sum(r.shape == s for r, (_, s) in zip(readings, prompts)) >= 2  # tolerance: one shape may blur


def test_flux_demo_draws_crosses_so_that_a_lora_only_binds_the_new_pair():
    """The subject is a teal cross: the demo must already draw a cross in the colours it knows (the old demo drew a
    blob for every cross, and no LoRA taught the subject in a few minutes)."""
    pipe = demo_eval.load_flux_demo(FLUX_DIR)
    colours = [c for s, c in data.FLUX_PAIRS if s == data.SUBJECT_SHAPE]
    images = demo_eval.generate(pipe, [data.caption(c, data.SUBJECT_SHAPE) for c in colours], seeds=[1000])
    readings = [data.read_image(image) for image in images]
    assert sum(r.shape == data.SUBJECT_SHAPE for r in readings) >= len(colours) - 1, readings
    assert [r.colour for r in readings] == colours
    recorded = json.loads((FLUX_DIR / "demo.json").read_text())["evaluation"]
    assert recorded["shape"] >= 0.9 and recorded["shape_512"] >= 0.9  # every pair, crosses included


def test_internvl_demo_loads_and_answers_held_out_questions(tmp_path):
    model, packer = demo_eval.load_vlm_demo(VLM_DIR)
    assert type(model).__name__ == "InternVLForConditionalGeneration"
    samples = demo_eval.heldout_shape_samples(6, seed=3, folder=tmp_path)  # 12 questions on unseen images
    accuracy = demo_eval.answer_accuracy(model, packer, samples)
    assert accuracy >= 0.75
    recorded = json.loads((VLM_DIR / "demo.json").read_text())["evaluation"]
    assert recorded["overall"] >= 0.9  # what the build measured on 200 held-out questions


def test_headless_run_without_model_uses_the_demo_model_and_its_suggested_settings(tmp_path, capsys):
    """`launch.py train --backend flux --images DIR --prompt P --out R` trains the demo with the settings its
    demo.json suggests, the same the app fills in for it; a flag given on the command line wins."""
    from app import form, handlers
    from pipelines.runner import cli
    from pipelines.runner.registry import demo_suggestions

    images = tmp_path / "photos"
    images.mkdir()
    for i, colour in enumerate(("red", "green", "blue")):
        Image.new("RGB", (64, 64), colour).save(images / f"{i}.png")
    out = tmp_path / "runs" / "first"
    code = cli.main(["--backend", "flux", "--images", str(images), "--prompt", "a photo of sks shape",
                     "--stages", "calibrate", "--calibration-samples", "1", "--quiet", "--out", str(out)])
    assert code == 0
    saved = json.loads((out / "run.json").read_text())["settings"]
    assert saved["run"]["model"] == str(FLUX_DIR)
    assert "using the demo model" in capsys.readouterr().err
    suggested = demo_suggestions(FLUX_DIR)
    assert {"steps", "lr", "resolution", "max_sequence_length", "preview_steps"} <= set(suggested)
    app = form.defaults("flux", handlers.describe_model("images", str(FLUX_DIR))["params"], str(FLUX_DIR))
    cli_values = {**saved["run"], **saved["backend"]}
    assert {k: cli_values[k] for k in app if k != "calibration_samples"} == \
        {k: v for k, v in app.items() if k != "calibration_samples"}
    assert cli_values["calibration_samples"] == 1 and app["calibration_samples"] == suggested["calibration_samples"]


def test_a_run_the_app_starts_on_the_flux_demo_has_the_clis_settings_even_those_it_shows_no_control_for(
        tmp_path, monkeypatch):
    """The FLUX demo suggests a timestep sampling (weighting_scheme, logit_mean) that no control of the app shows: a
    run started from the wizard with its defaults must still train with it, as `launch.py train` does."""
    from app import form, handlers
    from app.studio import Studio
    from pipelines.runner import cli
    from pipelines.runner.registry import demo_suggestions

    from pipelines.demo import FLUX_SUGGESTED_SETTINGS

    assert demo_suggestions(FLUX_DIR) == FLUX_SUGGESTED_SETTINGS  # shipped as the build writes it
    hidden = set(demo_suggestions(FLUX_DIR)) - set(form.defaults("flux", 1e5, str(FLUX_DIR)))
    assert hidden, "the demo suggests no setting the app hides: this test checks nothing"
    studio = Studio(tmp_path / "runs", {"flux": FLUX_DIR})
    monkeypatch.setattr(studio, "submit", lambda job, queue=True: 0)  # make the run folder, start nothing
    images, _, prompt = handlers.example_data("images", tmp_path / "uploads")
    info = handlers.describe_model("images", str(FLUX_DIR))
    values = {**form.defaults("flux", info["params"], str(FLUX_DIR)), "kind": "images", "model": str(FLUX_DIR),
              "name": "app-run", "ram_gb": 0.0, "images": images, "prompt": prompt, "trigger": "sks"}
    app_saved = json.loads((Path(studio.start_run(values)) / "run.json").read_text())["settings"]
    assert cli.main(["--backend", "flux", "--images", str(tmp_path / "uploads"), "--prompt", prompt,
                     "--stages", "calibrate", "--calibration-samples", "1", "--quiet",
                     "--out", str(tmp_path / "cli-run")]) == 0
    cli_saved = json.loads((tmp_path / "cli-run" / "run.json").read_text())["settings"]
    for name in hidden:
        section = "run" if name in cli_saved["run"] else "backend"
        assert app_saved[section][name] == cli_saved[section][name] == demo_suggestions(FLUX_DIR)[name], name


def test_the_internvl_demo_suggests_the_same_settings_to_the_cli_and_the_app():
    from app import form, handlers
    from pipelines.internvl.backend import VlmBackend
    from pipelines.runner import RunSettings
    from pipelines.runner.cli import with_suggestions
    from pipelines.runner.registry import demo_suggestions

    suggested = demo_suggestions(VLM_DIR)
    run = with_suggestions(RunSettings, {"model": str(VLM_DIR)}, suggested)
    backend = with_suggestions(VlmBackend.settings_class, {}, suggested)
    app = form.defaults("vlm", handlers.describe_model("qa", str(VLM_DIR))["params"], str(VLM_DIR))
    values = {**vars(run), **vars(backend)}
    assert {k: values[k] for k in app} == app
    assert with_suggestions(RunSettings, {"steps": 7}, suggested).steps == 7  # a flag given wins
    assert demo_suggestions(FLUX_DIR.parent / "FLUX.1-dev.json") == {}  # not a demo: no suggestions


@pytest.mark.parametrize("max_sequence_length", [32, 512])
def test_the_flux_demo_draws_the_named_colour_under_plain_diffusers_defaults(max_sequence_length):
    """`FluxPipeline.from_pretrained(demo)(prompt, height=64, width=64)`: diffusers' own steps (28) and T5 length
    (512), and the demo's 32 tokens, draw the colour the prompt names."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(FLUX_DIR))
    pipe.set_progress_bar_config(disable=True)
    prompts = [("red", "circle"), ("blue", "square"), ("yellow", "triangle"), ("teal", "square"), ("green", "cross")]
    for colour, shape in prompts:
        image = pipe(data.caption(colour, shape), height=64, width=64, max_sequence_length=max_sequence_length,
                     generator=torch.Generator().manual_seed(0)).images[0]
        assert data.read_image(image).colour == colour, (colour, shape, max_sequence_length)


def test_the_flux_demo_reads_padding_free_t5_words_and_never_saw_its_subject():
    """What makes the demo teachable and length-proof: T5 words that padding never changes (any length means the
    same words), and pretraining on crosses and on teal, never on a teal cross (the subject)."""
    pipe = demo_eval.load_flux_demo(FLUX_DIR)
    short, _, _ = pipe.encode_prompt(["a red circle on a white background", "a photo of sks shape"], None,
                                     device="cpu", max_sequence_length=32)
    long, _, _ = pipe.encode_prompt(["a red circle on a white background", "a photo of sks shape"], None,
                                    device="cpu", max_sequence_length=512)
    assert torch.equal(long[:, :32], short) and long[:, 32:].abs().max() == 0
    assert (data.SUBJECT_SHAPE, "teal") not in data.FLUX_PAIRS
    assert {s for s, c in data.FLUX_PAIRS if c == "teal"} and {c for s, c in data.FLUX_PAIRS if s == "cross"}
    recorded = json.loads((FLUX_DIR / "demo.json").read_text())["evaluation"]
    assert recorded["colour"] >= 0.9 and recorded["colour_512"] >= 0.9  # held out, every pair, 32 and 512 tokens


@pytest.mark.slow  # trains the InternVL demo with the app's defaults: 34 s of the file's 75 s (loaded machine)
def test_the_apps_defaults_for_the_internvl_demo_teach_every_mug_owner(tmp_path):
    """Step 1 picks the demo, step 2 its example data, step 3 keeps the defaults the app fills in: the run
    must then answer "Whose mug is this?" right for every owner, with the corrected full model too."""
    from benchmarks.speed import demo_run
    from pipelines.demo import VLM_SUGGESTED_SETTINGS

    assert json.loads((VLM_DIR / "demo.json").read_text())["suggested"] == VLM_SUGGESTED_SETTINGS  # shipped so
    run, defaults, _ = demo_run("vlm", tmp_path)
    assert defaults["steps"] == VLM_SUGGESTED_SETTINGS["steps"]
    run.execute()
    scores = json.loads((run.dir / "previews" / "previews.json").read_text())["scores"]
    assert scores["base"]["exact_match"] == 0.0
    assert scores["emulator + LoRA"]["exact_match"] >= 0.75
    assert scores["full + corrected LoRA"]["exact_match"] >= 0.75
