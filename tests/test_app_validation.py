"""The Data step's validation uploads (issue 29 item 1): a separate folder of photos for an image model, a file of
questions with its images for InternVL; checked as the training uploads are, said in the Data step's words, copied
into the run folder, and kept by the page's reload record. Handlers only, on the tiny models (no browser)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from app import restore, validation
from app.page import PageState
from app.steps import data
from app.studio import Studio
from flux_fixtures import save_tiny_flux, write_subject_images
from pipelines.runner.data import DataError
from vlm_fixtures import save_tiny_internvl, write_colour_images


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"flux": save_tiny_flux(root / "demo-flux"), "vlm": save_tiny_internvl(root / "demo-internvl")}


@pytest.fixture
def files(tmp_path):
    """Training photos, other photos for validation, a text file and a text file named .png."""
    photos = write_subject_images(tmp_path / "train", count=4)
    others = write_subject_images(tmp_path / "others", count=2, seed=5)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    fake = tmp_path / "holiday.png"
    fake.write_text("this is text with a .png name")
    return {"photos": [{"path": str(p), "name": p.name} for p in photos], "others": [str(p) for p in others],
            "notes": str(notes), "fake": str(fake)}


def questions(folder: Path, rows) -> Path:
    """A .jsonl file of (image, question, answer) rows."""
    path = folder / "validation.jsonl"
    path.write_text("".join(json.dumps({"image": i, "question": q, "answer": a}) + "\n" for i, q, a in rows))
    return path


def test_validation_photos_are_checked_as_training_photos_and_bad_files_named_in_the_steps_words(files):
    page = {"page.state": PageState(kind="images", uploads={"images": files["photos"], "qa": []})}
    out = data.validation_drop(None, {**page, "data.validation_images": [*files["others"], files["notes"],
                                                                          files["fake"]]}, name=validation.PHOTOS)
    assert out["data.validation_images"] == files["others"]  # the usable ones stay in the drop
    message = out["data.msg"]
    assert message.startswith("⚠ Validation photos (step 2): 2 photos kept for validation; not used")
    assert "notes.txt" in message and "holiday.png" in message and "Traceback" not in message
    good = data.validation_drop(None, {**page, "data.validation_images": files["others"]}, name=validation.PHOTOS)
    assert good["data.msg"].startswith("✓ Validation photos (step 2): 2 photos kept for validation.")
    empty = data.validation_drop(None, {**page, "data.validation_images": [files["notes"]]}, name=validation.PHOTOS)
    assert empty["data.validation_images"] is None and "no photo in it" in empty["data.msg"]


def test_a_validation_question_file_needs_its_images_and_some_questions(files, tmp_path):
    rows = write_colour_images(tmp_path / "qa")
    training = [{"path": str(tmp_path / "qa" / i), "name": Path(i).name} for i, _, _ in rows[:6]]
    table = questions(tmp_path, [(Path(i).name, q, a) for i, q, a in rows[6:]])  # names the last two images
    state = PageState(kind="qa", uploads={"images": [], "qa": training})
    alone = data.validation_drop(None, {"page.state": state, "data.validation_data": [str(table)]},
                                 name=validation.QUESTIONS)
    assert "Validation questions (step 2): 2 questions kept for validation, 0 images with them" in alone["data.msg"]
    missing = ", ".join(sorted(Path(i).name for i, _, _ in rows[6:]))
    assert f"names images that are neither dropped with it nor among your uploaded images: {missing}" in \
        alone["data.msg"]
    with pytest.raises(DataError, match=r"^Validation questions \(step 2\): validation.jsonl names images"):
        validation.stage("vlm", {"validation_data": [str(table)]}, training, tmp_path / "staging")
    images = [str(tmp_path / "qa" / i) for i, _, _ in rows[6:]]
    together = data.validation_drop(None, {"page.state": state, "data.validation_data": [str(table), *images]},
                                    name=validation.QUESTIONS)
    assert together["data.msg"].startswith("✓ Validation questions (step 2): 2 questions kept for validation, "
                                           "2 images")
    staged = validation.stage("vlm", {"validation_data": [str(table), *images]}, training, tmp_path / "staging")
    lines = Path(staged["validation_data"]).read_text().splitlines()
    assert len(lines) == 2 and all((Path(staged["validation_data"]).parent / json.loads(x)["image"]).is_file()
                                   for x in lines)
    empty = tmp_path / "empty.csv"
    empty.write_text("image,question,answer\n")
    said = data.validation_drop(None, {"page.state": state, "data.validation_data": [str(empty)]},
                                name=validation.QUESTIONS)["data.msg"]
    assert said.startswith("⚠ Validation questions (step 2)") and "no questions found" in said
    two = data.validation_drop(None, {"page.state": state, "data.validation_data": [str(table), str(empty)]},
                               name=validation.QUESTIONS)["data.msg"]
    assert "drop one .jsonl or .csv file" in two
    assert validation.stage("vlm", {"validation_data": None}, training, tmp_path / "none") == {}  # nothing dropped


def test_next_on_the_data_step_refuses_bad_validation_data_in_words(models, files):
    state = PageState(kind="images", uploads={"images": files["photos"], "qa": []})
    page = {"page.state": state, "model.model": str(models["flux"]), "data.prompt": "a photo of sks dog",
            "data.trigger": "sks", "data.captions": None, "data.qa_table": None, "budget.ram_touched": True,
            "data.holdout": 1, "data.validation_images": [files["notes"]]}
    with pytest.raises(DataError, match=r"Validation photos \(step 2\): .*notes.txt"):
        data.go_budget(None, page)
    out = data.go_budget(None, {**page, "data.validation_images": files["others"]})
    assert "1 held out and Validation photos (step 2) given" in out["data.msg"]


def test_a_run_started_with_validation_photos_or_questions_copies_them_into_its_folder(models, files, tmp_path):
    from app.form import defaults

    studio = Studio(tmp_path / "runs", models)
    submitted = []
    studio.submit = lambda job, queue=True: submitted.append(job) or 0  # no process: the folder is what is tested
    common = {"ratio": 0.45, "ram_gb": 0.0, "rank": 4, "batch_size": 1}
    photo_run = studio.start_run({**defaults("flux", 1e5, str(models["flux"])), **common, "kind": "images",
                                  "model": str(models["flux"]), "name": "with-validation", "images": files["photos"],
                                  "prompt": "a photo of sks dog", "trigger": "sks",
                                  "validation_images": files["others"]})
    copied = Path(photo_run) / "data" / "validation"  # the run's copy, which the run reads (use_data)
    assert sorted(p.name for p in copied.iterdir()) == sorted(Path(p).name for p in files["others"])
    assert "--validation-images" in json.loads((Path(photo_run) / "run.json").read_text())["command"]
    rows = write_colour_images(tmp_path / "qa")
    training = [{"path": str(tmp_path / "qa" / i), "name": Path(i).name} for i, _, _ in rows[:6]]
    table = questions(tmp_path, [(Path(i).name, q, a) for i, q, a in rows[5:]])  # red is trained on, 2 are not
    qa_run = studio.start_run({**defaults("vlm", 1e5, str(models["vlm"])), **common, "kind": "qa",
                               "model": str(models["vlm"]), "name": "vlm-validation", "images": training,
                               "qa_table": [[Path(i).name, q, a] for i, q, a in rows[:6]],
                               "validation_data": [str(table), *[str(tmp_path / "qa" / i) for i, _, _ in rows[6:]]]})
    copied = Path(qa_run) / "data" / "validation" / "qa.jsonl"
    assert len(copied.read_text().splitlines()) == 3
    assert all((copied.parent / json.loads(line)["image"]).is_file() for line in copied.read_text().splitlines())
    assert [job.run_dir for job in submitted] == [photo_run, qa_run]


def test_a_reload_keeps_the_data_steps_fields_and_says_when_a_dropped_file_is_gone(tmp_path, files):
    studio = Studio(tmp_path / "runs")
    gone = tmp_path / "gone.png"
    Image.new("RGB", (64, 64)).save(gone)
    typed = {"page.state": PageState(kind="images", uploads={"images": files["photos"], "qa": []}), "page.step": 1,
             "model.task": "images", "data.holdout": 2, "data.resolutions": "32, 48",
             "data.validation_images": [*files["others"], str(gone)]}
    saved = json.loads(json.dumps(restore.save(studio, typed)["page.saved"]))
    assert saved["form"]["data.validation_images"] == [*files["others"], str(gone)]
    gone.unlink()
    out = restore.restore(studio, saved, "cpu")
    assert out["data.holdout"].value == 2 and out["data.resolutions"] == "32, 48"
    assert out["data.validation_images"] == files["others"]
    assert "Validation photos (step 2) need dropping again" in out["data.msg"]
