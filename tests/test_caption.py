"""Captions for a FLUX run's photos from the app's own InternVL backend: `launch.py caption` and the captioner the
app's "Caption my photos" uses. The demo InternVL describes the demo's shapes and colours."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipelines.demo import VLM_DIR, data
from pipelines.internvl.caption import CaptionRecipe, Captioner, caption_folder

ROOT = Path(__file__).resolve().parents[1]
KNOWN = [("red", "square"), ("blue", "circle"), ("yellow", "triangle"), ("purple", "square")]


def write_shapes(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    paths = []
    for colour, shape in KNOWN:
        path = folder / f"{colour}-{shape}.png"
        data.render([data.random_spec(rng, shape, colour)]).save(path)
        paths.append(path)
    return paths


def test_the_demo_describes_its_shapes_after_the_trigger_word(tmp_path):
    paths = write_shapes(tmp_path / "photos")
    captioner = Captioner(str(VLM_DIR))
    assert captioner.recipe.template == "a {1} {0}"  # from the demo's demo.json
    captions = [captioner(path, trigger="sks") for path in paths]
    assert captions == [f"sks, a {colour} {shape}" for colour, shape in KNOWN]


def test_the_demo_names_the_colour_and_shape_of_the_apps_example_photos(tmp_path):
    """"Caption my photos" on the FLUX example set (a teal cross, sizes and places varied as a user's photos) must
    teach the right words: the demo InternVL once called it "a green triangle" (teal and crosses were never in its
    pretraining)."""
    paths = data.write_subject_images(tmp_path / "photos", count=5, seed=0)
    captioner = Captioner(str(VLM_DIR))
    assert [captioner(path, trigger="sks") for path in paths] == ["sks, a teal cross"] * len(paths)


def test_the_demo_names_every_shape_in_every_colour(tmp_path):
    rng = np.random.default_rng(29)  # photos never seen in its pretraining
    pairs = [(colour, shape) for shape in data.ALL_SHAPES for colour in data.SUBJECT_COLOURS]
    captioner = Captioner(str(VLM_DIR))
    captions = []
    for colour, shape in pairs:
        path = tmp_path / f"{colour}-{shape}.png"
        data.render([data.random_spec(rng, shape, colour, placement="varied")]).save(path)
        captions.append(captioner(path))
    right = [c == f"a {colour} {shape}" for c, (colour, shape) in zip(captions, pairs)]
    assert sum(right) >= len(pairs) - 1, [c for c, ok in zip(captions, right) if not ok]  # tolerance: one of 28


def test_a_recipe_chains_answers_and_a_model_without_one_is_asked_to_describe(tmp_path):
    asked = []
    recipe = CaptionRecipe(("What shape is this?", "What colour is the {0}?"), "a {1} {0}")
    answers = {"What shape is this?": "circle.", "What colour is the circle?": " red "}
    assert recipe.caption(lambda q: asked.append(q) or answers[q]) == "a red circle"
    assert asked == ["What shape is this?", "What colour is the circle?"]
    assert CaptionRecipe.of_model(str(tmp_path)).questions == ("Describe this image in one short sentence.",)


def test_the_cli_writes_a_caption_beside_each_photo_and_never_replaces_one(tmp_path):
    photos = tmp_path / "photos"
    paths = write_shapes(photos)
    mine = paths[0].with_suffix(".txt")
    mine.write_text("sks, my own words\n")
    command = [sys.executable, str(ROOT / "launch.py"), "caption", "--images", str(photos), "--trigger", "sks",
               "--model", str(VLM_DIR)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env={"HF_HUB_OFFLINE": "1",
                                                                                   "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert mine.read_text() == "sks, my own words\n"  # the user's caption stays
    for (colour, shape), path in list(zip(KNOWN, paths))[1:]:
        assert path.with_suffix(".txt").read_text() == f"sks, a {colour} {shape}\n"
    assert "kept 1 that already existed" in done.stdout
    written = caption_folder(photos, str(VLM_DIR), "sks", overwrite=True)
    assert mine.read_text() == "sks, a red square\n" and len(written) == len(KNOWN)
    empty = tmp_path / "empty"
    empty.mkdir()
    done = subprocess.run(command[:3] + ["--images", str(empty)], capture_output=True, text=True, cwd=ROOT,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 1 and "holds no JPEG, PNG or WebP images" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("trigger", ["", "  "])
def test_without_a_trigger_the_caption_is_the_description(tmp_path, trigger):
    path = write_shapes(tmp_path / "photos")[1]
    assert Captioner(str(VLM_DIR))(path, trigger) == "a blue circle"
