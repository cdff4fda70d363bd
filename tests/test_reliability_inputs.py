"""Inputs a careless user (or a malicious file) gives: models, QA files, images, captions; and the app's exposure
and its Past runs with a damaged run.json. Each test names the attempt, the words the user sees, what is on disk."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.main import banner, create_app, launch, login
from app.steps.runs import list_runs
from app.studio import Studio
from pipelines.internvl.backend import VlmBackend, VlmSettings
from pipelines.internvl.data import read_qa_data
from pipelines.runner import Run, RunSettings, cli
from pipelines.runner.data import DataError, load_rgb
from pipelines.runner.registry import DEMO_MODELS

from vlm_fixtures import write_colour_images

VLM = str(DEMO_MODELS["vlm"])


@pytest.fixture
def colours(tmp_path) -> Path:
    rows = write_colour_images(tmp_path / "colours")
    lines = [json.dumps({"image": i, "question": q, "answer": a}) for i, q, a in rows]
    (tmp_path / "colours" / "qa.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "colours"


def train(args: list[str], out: Path, capsys) -> str:
    """`launch.py train` on InternVL; asserts it failed without a run folder and returns what it said."""
    code = cli.main(["--backend", "vlm", "--device", "cpu", "--quiet", "--out", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists() and not list(out.parent.glob(f"{out.name}*")), err
    return err


# -- 7. the model -----------------------------------------------------------------------------------------
def test_a_hub_id_that_is_not_downloaded_is_refused_offline_in_words(colours, tmp_path, capsys):
    err = train(["--model", "nobody/not-downloaded-hf", "--data", str(colours)], tmp_path / "runs" / "a", capsys)
    assert "is not downloaded and this machine is offline" in err and "huggingface-cli login" in err


def test_a_missing_model_folder_and_pickle_only_weights_are_refused(colours, tmp_path, capsys):
    err = train(["--model", str(tmp_path / "no-such-model"), "--data", str(colours)], tmp_path / "runs" / "a", capsys)
    assert "no-such-model: no such folder; check the path" in err
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(Path(VLM, "config.json").read_text())
    torch.save({"w": torch.zeros(1)}, pickled / "pytorch_model.bin")
    err = train(["--model", str(pickled), "--data", str(colours)], tmp_path / "runs" / "b", capsys)
    assert "holds only pickle weights (.bin / .pt)" in err


# -- 6. settings that only the model can check ------------------------------------------------------------
@pytest.mark.parametrize("flags, words", [
    (["--rank", "100000"], "--rank 100000 is larger than the LoRA layer"),
    (["--lora-targets", "nothing"], "--lora-targets: no linear layer matches the LoRA targets ['nothing']")])
def test_rank_wider_than_a_layer_or_targets_matching_nothing_fail_before_any_work(colours, tmp_path, capsys,
                                                                                  flags, words):
    err = train(["--model", VLM, "--data", str(colours), *flags], tmp_path / "runs" / "a", capsys)
    assert words in err


def test_image_tokens_typed_into_a_question_are_refused(colours, tmp_path, capsys):
    text = (colours / "qa.jsonl").read_text().replace("What colour", "<IMG_CONTEXT> What colour", 1)
    (colours / "qa.jsonl").write_text(text)
    err = train(["--model", VLM, "--data", str(colours)], tmp_path / "runs" / "a", capsys)
    assert "qa.jsonl line 1: the question contains <IMG_CONTEXT>, which the model reserves" in err


def test_preview_image_without_a_question_is_refused():
    backend = VlmBackend(RunSettings(model=VLM), VlmSettings(preview_images=["x.png"]), torch.device("cpu"))
    with pytest.raises(ValueError, match="--image needs a --question"):
        backend.check_preview()


# -- 7. QA rows -------------------------------------------------------------------------------------------
def test_image_given_as_a_list_is_read_and_a_number_is_refused_in_words(colours):
    (colours / "qa.jsonl").write_text(json.dumps({"image": ["images/red.png"], "question": "Colour?",
                                                  "answer": "red"}) + "\n")
    assert len(read_qa_data(colours / "qa.jsonl").samples[0].images) == 1
    (colours / "qa.jsonl").write_text(json.dumps({"image": 5, "question": "Colour?", "answer": "red"}) + "\n")
    with pytest.raises(DataError, match="qa.jsonl line 1: 'image' must be a path or a list of paths"):
        read_qa_data(colours / "qa.jsonl")


@pytest.mark.parametrize("repeat, words", [
    ("Infinity", "repeat_time must be a number above 0"), (0, "repeat_time must be a number above 0"),
    (-1, "repeat_time must be a number above 0"), (1e7, "makes 80000000 samples; use at most 100000")])
def test_repeat_time_that_would_hang_or_silently_keep_one_sample_is_refused(colours, repeat, words):
    annotation = colours / "internvl.jsonl"
    annotation.write_text("\n".join(json.dumps({"image": f"images/{c}.png", "conversations": [
        {"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": c}]})
        for c in ("red", "green", "blue", "yellow", "white", "black", "purple", "orange")) + "\n")
    meta = colours / "meta.json"
    meta.write_text('{"colours": {"root": ".", "annotation": "internvl.jsonl", "repeat_time": %s}}' % repeat)
    with pytest.raises(DataError, match=words):
        read_qa_data(meta)


# -- 11. CSV from a spreadsheet, encodings, numeric answers -----------------------------------------------
def test_a_utf8_bom_csv_is_read_a_latin1_file_is_named_and_a_number_is_an_answer(colours):
    (colours / "qa.csv").write_text("image,question,answer\nimages/red.png,How many sides?,4\n", encoding="utf-8-sig")
    sample = read_qa_data(colours / "qa.csv").samples[0]
    assert sample.answer == "4"
    (colours / "qa.jsonl").write_text(json.dumps({"image": "images/red.png", "question": "Sides?", "answer": 4}))
    assert read_qa_data(colours / "qa.jsonl").samples[0].answer == "4"
    (colours / "qa.csv").write_bytes("image,question,answer\nimages/red.png,Caf\xe9?,oui\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"qa.csv: not UTF-8 text \(byte 0xe9 .*save it as UTF-8"):
        read_qa_data(colours / "qa.csv")


def test_a_one_megabyte_caption_is_refused_in_one_short_line(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(3):
        Image.new("RGB", (64, 64), (40 * index, 90, 200)).save(photos / f"p{index}.png")
    (photos / "p0.txt").write_text("a photo of sks dog " * 55_000)
    out = tmp_path / "runs" / "dog"
    code = cli.main(["--backend", "flux", "--images", str(photos), "--prompt", "a photo of sks dog", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists() and len(err) < 1000
    assert "is 1044999 characters long" in err and "keep it under 1000 characters" in err


# -- 9. image modes ---------------------------------------------------------------------------------------
def test_sixteen_bit_grey_keeps_its_tone_and_transparency_becomes_white(tmp_path):
    Image.fromarray(np.full((64, 64), 32768, np.uint16)).save(tmp_path / "grey16.png")
    assert np.asarray(load_rgb(tmp_path / "grey16.png"))[0, 0].tolist() == [128, 128, 128]  # PIL alone: 255
    clear = np.zeros((64, 64, 4), np.uint8)
    clear[16:48, 16:48] = (200, 0, 0, 255)
    Image.fromarray(clear, "RGBA").save(tmp_path / "cutout.png")
    rgb = np.asarray(load_rgb(tmp_path / "cutout.png"))
    assert rgb[0, 0].tolist() == [255, 255, 255] and rgb[32, 32].tolist() == [200, 0, 0]  # PIL alone: black


# -- 8. a damaged run.json in the app ---------------------------------------------------------------------
def test_a_malformed_run_json_is_listed_as_damaged_and_every_other_run_as_usual(fake):
    root, settings, fake_settings = fake
    good = Run.create(root / "runs" / "good", "fake", settings, fake_settings)
    for name, text in (("list", "[]"), ("garbage", "{not json"), ("partial", '{"backend": "vlm"}')):
        (root / "runs" / name).mkdir()
        (root / "runs" / name / "run.json").write_text(text)
    studio = Studio(root / "runs")
    rows = {r["name"]: r for r in list_runs(studio)}
    assert rows["good"]["status"] == "pending at calibrate" and rows["good"]["steps"] == f"0 of {settings.steps}"
    assert all(rows[n]["status"].startswith("damaged: ") for n in ("list", "garbage", "partial"))
    assert "not valid JSON" in rows["garbage"]["status"]
    with pytest.raises(ValueError, match="run.json is damaged"):
        studio.open_run("list")
    assert (root / "runs" / "list" / "run.json").read_text() == "[]" and good.dir.is_dir()  # nothing touched


# -- 2. exposure beyond this machine ----------------------------------------------------------------------
def test_listening_beyond_loopback_or_sharing_warns_and_requires_a_login():
    assert login("127.0.0.1", False, None) == (None, "")
    pair, note = login("0.0.0.0", False, None)
    assert pair[0] == "emloc" and len(pair[1]) >= 12 and pair[1] in note and note.startswith("WARNING")
    assert "every file under the runs folder" in note
    shown = banner("0.0.0.0", 7860, Path("runs"), note)
    assert "listening on every network interface" in shown and "from others" in shown and "WARNING" in shown
    pair, note = login("127.0.0.1", True, "me:s3cret")
    assert pair == ("me", "s3cret") and "public gradio.live link" in note and "s3cret" not in note
    with pytest.raises(ValueError, match="must look like USER:PASSWORD"):
        login("0.0.0.0", False, "no-colon")


def test_files_under_the_runs_folder_need_the_login(tmp_path):
    runs = tmp_path / "runs"
    (runs / "a").mkdir(parents=True)
    (runs / "a" / "photo.png").write_bytes(b"private")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    page, studio = create_app(runs)
    launch(page, "127.0.0.1", port, block=False, runs_dir=studio.runs_dir, auth=("me", "s3cret"))
    try:
        url = f"http://127.0.0.1:{port}/gradio_api/file={studio.runs_dir / 'a' / 'photo.png'}"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=30)
        assert refused.value.code in (401, 403)
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
        form = urllib.parse.urlencode({"username": "me", "password": "s3cret"}).encode()
        opener.open(f"http://127.0.0.1:{port}/login", form, timeout=30)
        assert opener.open(url, timeout=30).read() == b"private"
    finally:
        page.close()
