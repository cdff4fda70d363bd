"""The app's handlers called directly, step by step, on the tiny models (no browser, no server)."""

from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app import form, handlers, results
from app import plan as plans
from app.jobs import JobBusy, JobStatus
from app.steps.runs import list_runs
from app.steps.train import train_view
from app.studio import Studio, describe_job, parse_seeds
from flux_fixtures import save_tiny_flux, write_subject_images
from pipelines.runner.data import DataError
from vlm_fixtures import save_tiny_internvl, write_colour_images

FLUX_FAST = dict(steps=3, lr=1e-3, rank=4, calibration_samples=4, checkpoint_every=2, resolution=32,
                 preview_steps=2, max_sequence_length=16)
SMALL_PARAMS = handlers.SMALL_MODEL


def request(kind: str, model, name: str, **given) -> dict:
    """What the wizard's Start button sends, by name: the model's starting settings with `given` on top."""
    backend = "flux" if kind == "images" else "vlm"
    values = {"kind": kind, "model": str(model), "name": name, "ratio": 0.45, "ram_gb": 0.0,
              **form.defaults(backend, 1e5, str(model)), "trigger": "sks"}
    values.setdefault("images", [])
    return {**values, **given}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"flux": save_tiny_flux(root / "demo-flux"), "vlm": save_tiny_internvl(root / "demo-internvl")}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_subject_images(tmp_path_factory.mktemp("photos") / "dog", count=4)


@pytest.fixture(scope="module")
def qa(tmp_path_factory):
    """8 coloured squares with a question each, as uploads: [{"path", "name"}] and the table rows."""
    folder = tmp_path_factory.mktemp("qa")
    rows = write_colour_images(folder)
    images = [{"path": str(folder / image), "name": Path(image).name} for image, _, _ in rows]
    return images, [[Path(image).name, question, answer] for image, question, answer in rows], folder


def uploads(paths) -> list[dict]:
    return [{"path": str(p), "name": p.name} for p in paths]


def digest(paths) -> dict:
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


@pytest.fixture(scope="module")
def finished(models, photos, tmp_path_factory):
    """A FLUX run started from the handlers and waited for (3 steps on the tiny model)."""
    studio = Studio(tmp_path_factory.mktemp("runs"), models)
    before = digest(photos)
    values = request("images", str(models["flux"]), "my-dog", images=uploads(photos),
                           prompt="a photo of sks dog", trigger="sks",
                           captions=[["dog_1.jpg", "a photo of sks dog on grass"]], batch_size=2, **FLUX_FAST)
    begun = time.monotonic()
    folder = studio.start_run(values)
    returned = time.monotonic() - begun
    with pytest.raises(JobBusy, match="already running: my-dog"):
        studio.start_run(request("images", str(models["flux"]), "second", images=uploads(photos),
                                      prompt="a photo of sks dog", **FLUX_FAST))
    status = studio.jobs.wait(timeout=300)
    return {"studio": studio, "folder": Path(folder), "status": status, "returned": returned, "before": before,
            "photos": photos}


# ---------------------------------------------------------------------------------------------- 1. model


def test_model_step_offers_the_demo_model_first_and_describes_it(models):
    choices = handlers.model_choices("images", models)
    assert choices[0][1] == str(models["flux"]) and "Demo model" in choices[0][0]
    assert any(value == "black-forest-labs/FLUX.1-dev" for _, value in choices)
    assert all("InternVL" not in label for label, _ in choices)
    info = handlers.describe_model("images", str(models["flux"]))
    assert info["backend"] == "flux" and info["local"] and 10_000 < info["params"] < SMALL_PARAMS
    assert form.defaults("flux", info["params"])["resolution"] == 32  # the tiny model trains at 32 px
    assert form.defaults("flux", 12e9)["steps"] == 500


def test_model_step_refuses_the_other_tasks_model_and_unknown_ids(models):
    with pytest.raises(ValueError, match="is a InternVL model, which is for 'Teach a vision-language model"):
        handlers.describe_model("images", str(models["vlm"]))
    with pytest.raises(ValueError, match="unknown model"):
        handlers.describe_model("qa", "nobody/no-such-model")
    with pytest.raises(ValueError, match="choose a model"):
        handlers.describe_model("images", " ")


def test_device_is_detected_with_its_free_memory():
    device = handlers.detect_device()
    assert device["kind"] in ("cpu", "cuda") and 0 < device["free_gb"] <= device["total_gb"]
    assert "free" in device["text"]


# ---------------------------------------------------------------------------------------------- 2. data


def test_uploads_are_checked_and_bad_files_named_in_words(photos, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    fake = tmp_path / "holiday.png"
    fake.write_text("text")
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (8, 8)).save(tiny)
    images, message = handlers.add_images([], [str(p) for p in photos] + [str(notes), str(fake), str(tiny)])
    assert [i["name"] for i in images] == [p.name for p in photos]
    assert message.startswith("4 images added; 4 in the set.")
    assert "notes.txt: not a readable JPEG, PNG or WebP image" in message and "holiday.png" in message
    assert "tiny.png: 8x8 pixels is too small" in message and str(tmp_path) not in message
    again, message = handlers.add_images(images, [str(photos[0])])
    assert len(again) == 4 and "already in the set" in message
    fewer, message = handlers.remove_image(images, 1)
    assert [i["name"] for i in fewer] == [photos[0].name, photos[2].name, photos[3].name] and "3 images left" in message
    with pytest.raises(ValueError, match="click an image"):
        handlers.remove_image(images, None)


def test_more_than_fifty_photos_are_refused_with_a_count(tmp_path):
    paths = []
    for index in range(53):
        paths.append(tmp_path / f"shot_{index:02d}.png")
        Image.new("RGB", (40, 40), (index * 4, 80, 120)).save(paths[-1])
    images, message = handlers.add_images([], [str(p) for p in paths])
    assert len(images) == 50 and "3 not added (shot_50.png, shot_51.png, shot_52.png)" in message


def test_flux_data_check_needs_three_photos_and_the_trigger_word(models, photos):
    captions = handlers.caption_rows(uploads(photos), [["dog_1.jpg", "a photo of sks dog on grass"]])
    assert captions[1] == ["dog_1.jpg", "a photo of sks dog on grass"] and captions[0] == ["dog_0.png", ""]
    summary = handlers.check_data("images", str(models["flux"]), uploads(photos), "a photo of sks dog", "sks", captions,
                                  None)
    assert "4 photos ready" in summary and "1 with their own caption" in summary
    with pytest.raises(ValueError, match="2 images so far; add at least 3"):
        handlers.check_data("images", str(models["flux"]), uploads(photos[:2]), "a photo of sks dog", "sks", None, None)
    with pytest.raises(ValueError, match="does not contain the trigger word 'sks'"):
        handlers.check_data("images", str(models["flux"]), uploads(photos), "a photo of my dog", "sks", None, None)


def test_qa_table_is_imported_checked_and_empty_tables_refused(models, qa, tmp_path):
    images, rows, folder = qa
    jsonl = tmp_path / "qa.jsonl"
    jsonl.write_text("".join(json.dumps({"image": f"images/{r[0]}", "question": r[1], "answer": r[2]}) + "\n"
                             for r in rows))
    csv = tmp_path / "qa.csv"
    csv.write_text("image,question,answer\n" + "".join(f"images/{r[0]},{r[1]},{r[2]}\n" for r in rows))
    assert handlers.read_qa_table_file(str(jsonl)) == rows == handlers.read_qa_table_file(str(csv))
    summary = handlers.check_data("qa", str(models["vlm"]), images, "", "", None, rows)
    assert summary.startswith("8 samples") and str(tmp_path) not in summary
    with pytest.raises(ValueError, match="table is empty"):
        handlers.check_data("qa", str(models["vlm"]), images, "", "", None, [["", "", ""]])
    with pytest.raises(ValueError, match="row 1: image 'cat.png' is not among your uploaded images"):
        handlers.check_data("qa", str(models["vlm"]), images, "", "", None, [["cat.png", "What?", "a cat"]])
    with pytest.raises(ValueError, match="row 1: empty answer"):
        handlers.check_data("qa", str(models["vlm"]), images, "", "", None, [[rows[0][0], "What colour?", ""]])
    assert handlers.qa_rows_for_images(images[:2], []) == [[images[0]["name"], "", ""], [images[1]["name"], "", ""]]
    bad = tmp_path / "qa.txt"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="import a .jsonl or .csv"):
        handlers.read_qa_table_file(str(bad))


# ---------------------------------------------------------------------------------------------- 3. budget


def test_memory_chart_follows_the_ratio_and_says_when_nothing_fits():
    low = plans.memory_plan("black-forest-labs/FLUX.1-dev", 24, 0.2, 16, emulator_kind="lowrank")
    high = plans.memory_plan("black-forest-labs/FLUX.1-dev", 24, 0.9, 16, emulator_kind="lowrank")
    assert low["svg"] != high["svg"] and "EMLoC (ratio 0.20)" in low["svg"] and "budget 24 GiB" in low["svg"]
    auto = plans.memory_plan("black-forest-labs/FLUX.1-dev", 8, None, 16, ram_gb=16)  # the kind the plan recommends
    assert auto["kind"] == "lowrank-nf4" and "EMLoC (lowrank-nf4, ratio 0.71)" in auto["svg"]
    assert "Emulator kind: **lowrank-nf4**, recommended" in auto["text"]
    assert low["recommended"] == high["recommended"] and 0 < low["recommended"] <= 1
    assert low["fits"] and "Recommended ratio" in low["text"]
    for method in ("LoRA (full model)", "QLoRA (NF4 base)", "plain inference"):
        assert method in low["svg"]
    impossible = plans.memory_plan("black-forest-labs/FLUX.1-dev", 1, 0.45, 16)
    assert impossible["recommended"] is None and "too small" in impossible["text"]
    with pytest.raises(ValueError, match="positive number of GiB"):
        plans.memory_plan("black-forest-labs/FLUX.1-dev", -3, 0.45, 16)
    with pytest.raises(ValueError, match="ratio must be in"):
        plans.memory_plan("black-forest-labs/FLUX.1-dev", 24, 1.5, 16)


def test_the_budget_steps_batch_size_is_planned():
    """More samples per step hold more activations: the chart and the recommendation count the Batch size."""
    one = plans.memory_plan("black-forest-labs/FLUX.1-dev", 24, 0.45, 16, batch_size=1)
    eight = plans.memory_plan("black-forest-labs/FLUX.1-dev", 24, 0.45, 16, batch_size=8)
    assert one["svg"] != eight["svg"] and eight["recommended"] <= one["recommended"]
    with pytest.raises(ValueError, match="batch size must be at least 1"):
        plans.memory_plan("black-forest-labs/FLUX.1-dev", 24, 0.45, 16, batch_size=0)


def test_a_cpu_job_budgets_ram_and_the_recommendation_is_the_default():
    """On a machine without a GPU the job runs on the CPU: the plan is of RAM (no GPU budget is asked for), the
    ratio left to the app is the recommended one, and the words name the page's own budget."""
    plan = plans.memory_plan("OpenGVLab/InternVL3-1B-hf", None, None, 16, ram_gb=32, device="cpu")
    assert plan["recommended"] is not None and plan["ratio"] == plan["recommended"]
    assert "predicted peak RAM (this job runs on the CPU)" in plan["svg"] and "budget 32 GiB" in plan["svg"]
    assert "the slider follows it" in plan["text"]
    chosen = plans.memory_plan("OpenGVLab/InternVL3-1B-hf", None, 0.3, 16, ram_gb=32, device="cpu")
    assert chosen["ratio"] == 0.3 and "EMLoC (ratio 0.30)" in chosen["svg"]
    tight = plans.memory_plan("OpenGVLab/InternVL3-1B-hf", None, None, 16, ram_gb=0.2, device="cpu")
    assert tight["recommended"] is None and "Raise the RAM budget" in tight["text"]
    for word in ("batch size", "--", "sequence length", " GB "):
        assert word not in tight["text"], word
    with pytest.raises(ValueError, match="RAM budget must be a positive number of GiB"):
        plans.memory_plan("OpenGVLab/InternVL3-1B-hf", None, None, 16, ram_gb=None, device="cpu")
    for word in ("EMLoC", "LoRA (full model)", "QLoRA", "plain inference", "calibration", "emulator construction",
                 "training", "correction", "preview", "streamed", "dashed line", "GiB"):
        assert word in plans.CHART_LEGEND, word
    assert "runs on the **CPU**" in plans.runs_on({"kind": "cpu", "name": "CPU", "free_gb": 20, "total_gb": 24})


def test_the_slider_maximum_plans_no_compression():
    plan = plans.memory_plan("black-forest-labs/FLUX.1-dev", 80, 1.0, 16)
    assert "EMLoC (no compression)" in plan["svg"] and "EMLoC (ratio" not in plan["svg"]
    assert "nothing is compressed: every layer is kept" in plan["text"]


# ---------------------------------------------------------------------------------------------- 4. train


def test_start_copies_the_uploads_and_trains_in_the_background(finished):
    studio, folder, status = finished["studio"], finished["folder"], finished["status"]
    assert finished["returned"] < 20, "Start must return while the run goes on in the background"
    assert status.state == "done", status.error
    assert [step for step, _ in status.losses] == [1, 2, 3] and all(loss > 0 for _, loss in status.losses)
    assert any("[train]" in line for line in status.log)
    data = sorted(p.name for p in (folder / "data").iterdir())
    assert data == ["dog_0.png", "dog_1.jpg", "dog_1.txt", "dog_2.png", "dog_3.jpg"]
    assert json.loads((folder / "run.json").read_text())["settings"]["run"]["batch_size"] == 2  # the Budget step's
    assert (folder / "data" / "dog_1.txt").read_text().strip() == "a photo of sks dog on grass"
    assert digest(finished["photos"]) == finished["before"]  # the user's files are untouched
    view = train_view(studio, str(folder))
    assert view["state"] == "done" and "finished" in view["text"] and 'value="1.000"' in view["progress"]
    runs = list_runs(studio)
    assert runs[0]["name"] == "my-dog" and runs[0]["status"] == "finished" and runs[0]["steps"] == "3 of 3"
    with pytest.raises(FileExistsError, match="already exists"):
        studio.start_run(request("images", "x", "my-dog"))
    with pytest.raises(ValueError, match="run name"):
        studio.start_run(request("images", "x", "../escape"))
    with pytest.raises(ValueError, match="not downloaded and this machine is offline"):  # before any folder is made
        studio.start_run(request("images", "black-forest-labs/FLUX.1-dev", "from-the-hub"))
    assert not (studio.runs_dir / "from-the-hub").exists()


def test_job_description_counts_stages_and_steps():
    status = JobStatus(kind="run", run_dir="/r/dog", state="running", stage="train", step=5, total=10, eta=75,
                       losses=[(5, 0.25)], started=time.time())
    view = describe_job(status)
    assert "stage 3 of 5" in view["text"] and "step 5 of 10" in view["text"] and "1 min 15 s" in view["text"]
    assert 'value="0.500"' in view["progress"]  # 2 stages done + half of the third, of 5
    assert describe_job(JobStatus())["text"].startswith("Nothing is running")


def test_cancel_stops_after_a_step_and_resume_finishes_the_run(models, qa, tmp_path):
    images, rows, _ = qa
    studio = Studio(tmp_path / "runs", models)
    values = request("qa", str(models["vlm"]), "colours", images=images, qa_table=rows,
                           steps=12, lr=1e-3, rank=4, calibration_samples=8, checkpoint_every=2, max_new_tokens=2)
    studio.start_run(values)
    deadline = time.monotonic() + 120
    while studio.jobs.status().step < 3 or studio.jobs.status().stage != "train":
        assert time.monotonic() < deadline and studio.jobs.status().state == "running", studio.jobs.status().error
        time.sleep(0.1)
    assert "Stopping after the current step" in studio.cancel()
    status = studio.jobs.wait(timeout=60)
    assert status.state == "cancelled" and "cancelled" in describe_job(status)["text"]
    stopped = status.losses[-1][0]
    assert "cancelled at train" in list_runs(studio)[0]["status"]
    from app.page import PageState
    from app.steps import runs

    assert runs.picked(studio, {"runs.pick": "colours"})["runs.extend_steps"] == 12  # "Train to" starts at its steps
    resumed = runs.resume(studio, {"page.state": PageState(kind="qa"), "runs.pick": "colours",
                                   "runs.extend_steps": None, "preview.uncorrected": False})
    assert resumed["train.msg"] == "" and "Resuming colours" in resumed["runs.msg"]  # "Stopping ..." is gone
    run_dir = resumed["page.state"].run_dir
    status = studio.jobs.wait(timeout=180)
    assert status.state == "done", status.error
    steps = [step for step, _ in status.losses]
    assert steps == list(range(1, 13)) and stopped < 12
    view = studio.previews(run_dir)
    assert view["headers"][-1] == "full + corrected LoRA" and len(view["rows"]) == 4
    assert "ask 4 of your 8 questions" in view["text"]  # the cut is said, not silent
    assert all(cell for row in view["rows"] for cell in row[3:])  # an answer (or "(empty answer)") in every cell
    with pytest.raises(ValueError, match="already finished"):
        studio.resume_run("colours")


# ---------------------------------------------------------------------------------------------- 5-6


def test_previews_show_three_models_side_by_side_and_render_new_ones(finished):
    studio, folder = finished["studio"], str(finished["folder"])
    view = studio.previews(folder)
    assert [caption for _, caption in view["images"]] == [
        "base · seed 0", "emulator + LoRA · seed 0", "full + corrected LoRA · seed 0"]
    assert "“a photo of sks dog”" in view["text"]
    assert len(studio.previews(folder, uncorrected=True)["images"]) == 4
    assert parse_seeds("0, 1 7") == [0, 1, 7]
    with pytest.raises(ValueError, match="whole numbers"):
        parse_seeds("one")
    long_prompt = "a photo of sks dog on the beach at sunset, with waves"  # longer than file names keep
    message = studio.render_preview(folder, long_prompt, "1, 2")
    assert "Rendering previews" in message
    status = studio.jobs.wait(timeout=120)
    assert status.state == "done" and Path(status.result).name.startswith("previews-")
    view = studio.previews(folder)
    assert len(view["images"]) == 6 and f"“{long_prompt}”" in view["text"]
    assert [c.rsplit("seed ", 1)[1] for _, c in view["images"]] == ["1"] * 3 + ["2"] * 3
    train = train_view(studio, folder)  # the preview job did not take the Train step's curve and summary away
    assert [step for step, _ in train["losses"]] == [1, 2, 3] and "Settings: model" in train["text"]
    assert "finished" in train["text"]


def test_export_gives_the_adapter_a_zip_and_a_snippet(finished):
    studio, folder = finished["studio"], finished["folder"]
    export = studio.export(str(folder))
    assert str(folder / "lora" / "corrected") in export["text"] and "pytorch_lora_weights.safetensors" in export["text"]
    assert "load_lora_weights" in export["snippet"]
    names = zipfile.ZipFile(export["zip"]).namelist()
    assert "corrected/adapter_model.safetensors" in names and "diffusers/pytorch_lora_weights.safetensors" in names
    assert "kohya/flux_lora_kohya.safetensors" in names  # the step says which file goes into which tool
    assert "For ComfyUI, Forge or kohya_ss" in export["text"] and "For diffusers" in export["text"]
    stamp = Path(export["zip"]).stat().st_mtime_ns
    assert studio.export(str(folder))["zip"] == export["zip"] and Path(export["zip"]).stat().st_mtime_ns == stamp
    assert results.shown_name("/x/00003-00003-red.png") == "red.png"


# ---------------------------------------------------------------------------------------------- issue 15: a first hour


def test_a_hub_model_that_is_not_downloaded_or_gated_is_refused_at_step_one(models, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = "black-forest-labs/FLUX.1-dev"
    with pytest.raises(ValueError, match="not downloaded and this machine is offline") as refused:
        handlers.check_model_ready("images", hub)
    assert "huggingface-cli login" in str(refused.value) and "local_files_only" not in str(refused.value)
    assert "not downloaded, and this machine is offline" in handlers.describe_model("images", hub)["text"]
    labels = dict((value, label) for label, value in handlers.model_choices("images", models))
    assert "not downloaded; this machine is offline" in labels[hub]
    assert handlers.check_model_ready("images", str(models["flux"]))["local"]  # the demo model goes on

    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError

    def gated(self, repo_id, **kwargs):
        err = GatedRepoError.__new__(GatedRepoError)
        err.args = (f"{repo_id} is gated",)
        raise err

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(HfApi, "list_repo_files", gated)
    from pipelines.runner import checks

    monkeypatch.setattr(checks, "hub_unreachable_reason", lambda: None)  # the hub answers (here: "gated")
    with pytest.raises(ValueError, match="is gated: accept its licence on huggingface.co, then log in here with "
                                         "`huggingface-cli login`"):
        handlers.check_model_ready("images", hub)


def test_a_run_that_failed_is_listed_as_failed_with_its_message(models, photos, tmp_path):
    import shutil

    from pipelines.flux.backend import FluxSettings
    from pipelines.runner import Run, RunSettings

    model = tmp_path / "model"
    shutil.copytree(models["flux"], model)
    studio = Studio(tmp_path / "runs", models)
    settings = FluxSettings(images=str(photos[0].parent), prompt="a photo of sks dog", resolution=32,
                            preview_steps=2, max_sequence_length=16)
    Run.create(studio.runs_dir / "broken", "flux", RunSettings(model=str(model), steps=2, rank=4,
                                                                calibration_samples=4), settings)
    shutil.rmtree(model / "vae")  # the model's files go missing after the run was made
    studio.resume_run("broken")
    status = studio.jobs.wait(timeout=120)
    assert status.state == "failed"
    row = list_runs(studio)[0]
    assert row["status"].startswith("failed at calibrate: while caching the data:"), row["status"]
    assert "pending" not in row["status"] and len(row["status"]) < 500
    assert "failed" in train_view(studio, str(studio.runs_dir / "broken"))["text"]


def test_messages_name_the_pages_controls_not_command_line_flags(models, photos):
    from app.words import in_app_words

    with pytest.raises(ValueError) as refused:
        handlers.check_data("images", str(models["flux"]), uploads(photos), "a photo of my dog", "sks", None, None)
    shown = in_app_words(str(refused.value))
    assert "--" not in shown and "Prompt, step 2" in shown and "set Trigger word (step 2) to" in shown
    assert in_app_words("--rank 64 is larger than the LoRA layer x; use --rank 16 or less") == \
        "LoRA rank (step 3) 64 is larger than the LoRA layer x; set LoRA rank (step 3) to 16 or less"
    studio = Studio(Path(photos[0]).parent.parent / "runs-words", models)
    with pytest.raises(ValueError, match=r"^Training steps \(step 4\) is empty; type a whole number$"):
        studio.start_run(request("images", str(models["flux"]), "empty-box",
                                      images=uploads(photos), prompt="a photo of sks dog",
                                      **{**FLUX_FAST, "steps": None}))
    assert not (studio.runs_dir / "empty-box").exists()


def test_preview_rendering_has_its_own_progress_on_the_preview_step():
    status = JobStatus(kind="preview", run_dir="/r/dog", state="running", stage="preview", step=2, total=4,
                       started=time.time())
    view = describe_job(status)
    assert 'value="0.500"' in view["preview_progress"] and "full + corrected LoRA (3 of 4 models)" in \
        view["preview_progress"]
    assert describe_job(JobStatus(kind="run", run_dir="/r/dog", state="running", stage="train", step=1,
                                  total=3, started=time.time()))["preview_progress"] == ""


def run_snippet(code: str, folder: Path, timeout: float = 300) -> str:
    """Run pasted code in a fresh Python in `folder`; returns its stdout (fails the test with its stderr)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True, text=True, timeout=timeout,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_flux_export_snippet_pasted_into_python_makes_the_preview_again(finished, tmp_path):
    import numpy as np

    studio, folder = finished["studio"], finished["folder"]
    snippet = studio.export(str(folder))["snippet"]
    for setting in ("height=32, width=32", "num_inference_steps=2", "max_sequence_length=16", "manual_seed(0)",
                    "guidance_scale="):
        assert setting in snippet, setting
    run_snippet(snippet, tmp_path)
    preview = folder / "previews" / "full-corrected-lora__a-photo-of-sks-dog__seed0.png"
    assert preview.name in snippet
    made = np.asarray(Image.open(tmp_path / "sample.png"), dtype=np.float32)
    shown = np.asarray(Image.open(preview), dtype=np.float32)
    base = np.asarray(Image.open(folder / "previews" / "base__a-photo-of-sks-dog__seed0.png"), dtype=np.float32)
    assert made.shape == shown.shape == (32, 32, 3)
    assert np.abs(made - shown).mean() <= 1.0 and np.abs(made - shown).max() <= 8  # 8-bit pixels, float error
    assert np.abs(base - shown).mean() > np.abs(made - shown).mean()  # it is the LoRA's image, not the base's


@pytest.fixture(scope="module")
def finished_vlm(models, qa, tmp_path_factory):
    """An InternVL run of 2 steps on the tiny model, from the handlers."""
    images, rows, _ = qa
    studio = Studio(tmp_path_factory.mktemp("vlm-runs"), models)
    folder = studio.start_run(request("qa", str(models["vlm"]), "colours", images=images,
                                           qa_table=rows, steps=2, lr=1e-3, rank=4, calibration_samples=8,
                                           checkpoint_every=2, max_new_tokens=3))
    status = studio.jobs.wait(timeout=300)
    assert status.state == "done", status.error
    return studio, Path(folder)


def test_vlm_export_snippet_answers_a_question_without_torchvision(finished_vlm, tmp_path):
    import torch

    from pipelines.runner import Run

    studio, folder = finished_vlm
    snippet = studio.export(str(folder))["snippet"]
    assert "AutoProcessor" not in snippet.replace("not AutoProcessor", "")
    without_torchvision = "import sys\nsys.modules['torchvision'] = None  # as on a machine without it\n"
    spy = ("\nasked = {}\nanswer = model.generate\n"
           "model.generate = lambda **kw: asked.update(kw) or answer(**kw)\n"
           "print(repr(ask(" + snippet.rsplit("print(ask(", 1)[1].rstrip().rstrip(")") + ")))\n"
           "torch.save({k: v for k, v in asked.items() if torch.is_tensor(v)}, 'asked.pt')\n")
    printed = run_snippet(without_torchvision + snippet + spy, tmp_path).strip().splitlines()
    previews = json.loads((folder / "previews" / "previews.json").read_text())
    assert printed[-1] == repr(previews["items"][0]["answers"]["full + corrected LoRA"])
    # the question reaches the model exactly as the previews asked it: the same tokens and pixels
    backend = Run.open(folder).backend
    expected = backend.packer.encode_prompt(backend.preview_items()[0][0])
    asked = torch.load(tmp_path / "asked.pt")
    assert asked["input_ids"][0].tolist() == expected["input_ids"].tolist()
    assert torch.allclose(asked["pixel_values"], expected["pixel_values"], atol=1e-6)


def test_vlm_preview_takes_a_new_image_and_says_which_images_were_trained_on(finished_vlm, tmp_path):
    studio, folder = finished_vlm
    view = studio.previews(str(folder))
    seen = view["headers"].index("image seen in training")
    assert {row[seen] for row in view["rows"]} == {"yes"} and "seen in training" in view["scores"]
    new = tmp_path / "new-photo.png"
    Image.new("RGB", (64, 64), (250, 20, 200)).save(new)
    studio.render_preview(str(folder), "What colour is this?", "0", image=None, upload=str(new))
    status = studio.jobs.wait(timeout=300)
    assert status.state == "done", status.error
    view = studio.previews(str(folder))
    assert len(view["rows"]) == 1 and view["rows"][0][1] == "new-photo.png"
    assert view["rows"][0][seen] == "no (a new image)"
    assert [p.name for p in (folder / "asked").glob("*/*")] == ["new-photo.png"]  # kept with the run
    bad = tmp_path / "notes.png"
    bad.write_text("not a picture")
    with pytest.raises(ValueError, match="notes.png") as refused:
        studio.render_preview(str(folder), "What colour is this?", "0", upload=str(bad))
    assert str(tmp_path) not in str(refused.value)


def test_export_snippets_offload_the_model_where_the_runs_plan_did(finished, finished_vlm, tmp_path):
    """A run whose plan did not preview the model whole gets a snippet that offloads it on a GPU (diffusers' group
    offloading; accelerate's device_map within the run's budgets). On this CPU the snippet takes its CPU branch,
    which must still make the preview's image / answer; the GPU branch is compiled here, not run (no GPU)."""
    import numpy as np

    from pipelines.runner import Run

    offloaded = {"phases": {"preview": {"mode": "offload"}}, "gpu_budget_gib": 12.0, "ram_gib": 32.0,
                 "ram_budget_gib": 32.0}
    folder = finished["folder"]
    flux = Run.open(folder).backend.export_snippet(folder / "lora", offloaded)
    assert "enable_group_offload(onload_device=torch.device(\"cuda\")" in flux and ".to(device)\n" not in flux.split(
        "pipe.load_lora_weights")[0]
    compile(flux, "flux-snippet", "exec")
    run_snippet(flux, tmp_path)
    shown = np.asarray(Image.open(folder / "previews" / "full-corrected-lora__a-photo-of-sks-dog__seed0.png"),
                       dtype=np.float32)
    assert np.abs(np.asarray(Image.open(tmp_path / "sample.png"), dtype=np.float32) - shown).mean() <= 1.0
    _, vlm_folder = finished_vlm
    vlm = Run.open(vlm_folder).backend.export_snippet(vlm_folder / "lora", offloaded)
    # the run's GPU (index 0 here) keeps 2.4 GiB of its 12 GiB budget free of weights (pipelines/internvl/export.py)
    assert 'device_map="auto"' in vlm and 'max_memory={0: "9.6GiB", "cpu": "32GiB"}' in vlm
    compile(vlm, "vlm-snippet", "exec")
    (tmp_path / "vlm").mkdir()
    printed = run_snippet(vlm, tmp_path / "vlm").strip()  # the tiny model's answer may be empty
    previews = json.loads((vlm_folder / "previews" / "previews.json").read_text())
    assert printed == previews["items"][0]["answers"]["full + corrected LoRA"].strip()


def test_caption_my_photos_keeps_typed_captions_and_refuses_in_words(tmp_path):
    from pipelines import demo
    from pipelines.demo import data as demo_data

    rng = np.random.default_rng(2)
    images = []
    for colour, shape in (("green", "circle"), ("orange", "square")):
        path = tmp_path / f"{colour}.png"
        demo_data.render([demo_data.random_spec(rng, shape, colour)]).save(path)
        images.append({"path": str(path), "name": path.name})
    typed = [["green.png", "sks, my words"], ["orange.png", ""]]
    rows, message = handlers.caption_photos(images, typed, "sks", str(demo.VLM_DIR))
    assert rows == [["green.png", "sks, my words"], ["orange.png", "sks, a orange square"]]
    assert "Wrote 1 caption" in message and "kept the 1 you typed" in message
    with pytest.raises(DataError, match="add your photos first"):
        handlers.caption_photos([], [], "sks", str(demo.VLM_DIR))
    with pytest.raises(DataError, match="Trigger word"):
        handlers.caption_photos(images, typed, " ", str(demo.VLM_DIR))
    with pytest.raises(ValueError, match="captioning model"):
        handlers.caption_photos(images, typed, "sks", str(tmp_path / "no-such-model"))


def test_an_app_started_while_a_job_runs_follows_it_cancels_it_and_then_offers_resume(models, photos, tmp_path):
    """The job is its own process: an app (re)started while it runs finds it through <run>/job.json, shows its
    progress, and Cancel signals that pid; once it has stopped unfinished, the run is 'stopped' with Resume."""
    import signal
    import subprocess
    import sys
    import time

    from app.jobs import JOB_FILE
    from pipelines.flux.backend import FluxSettings
    from pipelines.runner import RUN_FILE, STAGES, Run, RunSettings
    from pipelines.runner.progress import PROGRESS_LOG

    runs = tmp_path / "runs"
    settings = FluxSettings(images=str(photos[0].parent), prompt="a photo of sks dog", resolution=32,
                            preview_steps=2, max_sequence_length=16)
    run = Run.create(runs / "left-running", "flux", RunSettings(model=str(models["flux"]), steps=8, rank=4,
                                                                 calibration_samples=4), settings)
    info = json.loads((run.dir / RUN_FILE).read_text())
    for stage in STAGES[:STAGES.index("train")]:
        info["stages"][stage] = {"status": "done"}
    info["stages"]["train"] = {"status": "running"}  # as the CLI leaves it while training
    (run.dir / RUN_FILE).write_text(json.dumps(info))
    # a stand-in for `launch.py train --out <run>` started by an earlier app: it reports step 3 of 8 and stops
    # on SIGINT with the CLI's exit code for a cancel
    code = ("import json, os, signal, sys, time\n"
            "signal.signal(signal.SIGINT, lambda *a: sys.exit(130))\n"
            f"open({str(run.dir / PROGRESS_LOG)!r}, 'a').write(json.dumps({{'pid': os.getpid(), 'stage': 'train', "
            "'step': 3, 'total': 8, 'eta': 5.0, 'message': 'step 3', 'loss': 0.5, 'time': time.time()}) + '\\n')\n"
            "time.sleep(60)\n")
    process = subprocess.Popen([sys.executable, "-c", code, "launch.py", "train", "--out", str(run.dir)])
    try:
        (run.dir / JOB_FILE).write_text(json.dumps({"pid": process.pid, "kind": "run", "started": time.time(),
                                                    "command": [sys.executable, "launch.py", "train", "--out",
                                                                str(run.dir)]}))
        deadline = time.time() + 20
        while not (run.dir / PROGRESS_LOG).is_file() and time.time() < deadline:
            time.sleep(0.1)
        studio = Studio(runs, models)  # the app starts again
        job = studio.jobs.status()
        assert job.running and job.run_dir == str(run.dir) and (job.stage, job.step, job.total) == ("train", 3, 8)
        assert list_runs(studio)[0]["status"] == "running now"
        view = train_view(studio, str(run.dir))
        assert view["running"], view["text"]  # Cancel is live
        # a page reloaded on this run comes back to it, live, on the Train step
        from app import restore

        back = restore.restore(studio, {"state": {"kind": "images", "run_dir": str(run.dir)},
                                        "form": {"model.model": str(models["flux"])}, "step": 3}, "cpu")
        assert back["page.state"].run_dir == str(run.dir) and back["train.cancel"].interactive
        assert back["page.wizard"].selected == 3 and not back.get("train.msg")
        assert "Stopping" in studio.cancel()
        assert process.wait(timeout=20) == 130  # the signal reached that pid
        deadline = time.time() + 10
        while studio.jobs.status().running and time.time() < deadline:
            time.sleep(0.1)
        assert studio.jobs.status().state == "cancelled"
        row = list_runs(studio)[0]
        assert row["status"].startswith("stopped at train") and "Resume" in row["status"], row["status"]
        assert "cancelled" in train_view(studio, str(run.dir))["text"]
        later = Studio(runs, models)  # and an app started after it: the dead job's record is not followed
        view = train_view(later, str(run.dir))
        assert not later.jobs.status().running and not view["running"]
        assert "stopped at train" in view["text"] and "Resume" in view["text"], view["text"]
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait()


def test_a_job_record_whose_process_ended_unwaited_or_is_another_program_is_not_followed(tmp_path):
    """<run>/job.json names a pid: a job that has ended but was never waited for (a zombie, still in the process
    table) is not running, nor is a live process that is not `launch.py` of that run (a reused pid)."""
    import subprocess
    import sys

    import psutil

    from app.jobs import JOB_FILE, live_job

    run = tmp_path / "runs" / "a-run"
    run.mkdir(parents=True)
    ended = subprocess.Popen([sys.executable, "-c", "pass", "launch.py", "train", "--out", str(run)])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "launch.py", "train", "--out",
                              str(tmp_path / "runs" / "another-run")])
    try:
        deadline = time.time() + 20
        while psutil.Process(ended.pid).status() != psutil.STATUS_ZOMBIE and time.time() < deadline:
            time.sleep(0.05)
        assert psutil.Process(ended.pid).status() == psutil.STATUS_ZOMBIE  # ended, not waited for
        (run / JOB_FILE).write_text(json.dumps({"pid": ended.pid, "kind": "run", "command": []}))
        assert live_job(run) is None
        assert not Studio(tmp_path / "runs").jobs.status().running
        (run / JOB_FILE).write_text(json.dumps({"pid": other.pid, "kind": "run", "command": []}))
        assert live_job(run) is None  # alive, but another run's job
        (run / JOB_FILE).write_text(json.dumps({"pid": os.getpid(), "kind": "run", "command": []}))
        assert live_job(run) is None  # alive, but not launch.py at all
    finally:
        other.kill()
        other.wait()
        ended.wait()


# ---------------------------------------------------------------------------------------------- the queue

STAND_IN = '''\
import pathlib, sys, time
arguments = sys.argv[1:]
run = pathlib.Path(arguments[arguments.index("--out" if "--out" in arguments else "--run") + 1])
order = pathlib.Path(__file__).parent / "order.txt"
with open(order, "a") as f:
    f.write(f"start {run.name} {arguments[0]}\\n")
deadline = time.time() + 60
while not (run / "go").exists() and time.time() < deadline:
    time.sleep(0.05)
with open(order, "a") as f:
    f.write(f"end {run.name}\\n")
'''


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """`launch.py` replaced by a stand-in that notes when it starts and ends (order.txt) and runs until its run
    folder holds a file "go": the queue's order is seen without training anything."""
    from app import jobs

    folder = tmp_path / "stand-in"
    folder.mkdir()
    (folder / "launch.py").write_text(STAND_IN)
    monkeypatch.setattr(jobs, "LAUNCH", folder / "launch.py")
    return folder / "order.txt"


def wait_for(condition, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def lines(order: Path) -> list[str]:
    return order.read_text().splitlines() if order.is_file() else []


def test_queued_jobs_run_one_at_a_time_in_order_and_the_queue_survives_a_restart(stand_in, tmp_path):
    from app.jobqueue import QUEUE_FILE, QueuedJob
    from app.steps import queue as queue_steps

    runs = tmp_path / "runs"
    folders = {name: runs / name for name in ("a", "b", "c", "d")}
    for folder in folders.values():
        folder.mkdir(parents=True)

    def job(name: str) -> QueuedJob:
        return QueuedJob("run", str(folders[name]), ["train", "--out", str(folders[name]), "--resume"], what="training")

    studio = Studio(runs)
    assert studio.submit(job("a")) == 0  # nothing runs: it starts now
    wait_for(lambda: lines(stand_in) == ["start a train"], "a to start")
    assert studio.submit(job("b")) == 1 and studio.submit(job("c")) == 2 and studio.submit(job("d")) == 3
    with pytest.raises(JobBusy, match="already running: a"):
        studio.submit(job("d"), queue=False)  # Start training (not Add to queue) is refused while a job runs
    # the queue is a file in the runs folder: each job the same launch.py command a run records
    saved = json.loads((runs / QUEUE_FILE).read_text())["jobs"]
    assert [Path(j["run_dir"]).name for j in saved] == ["b", "c", "d"]
    assert studio.queue.jobs()[0].command == f"python launch.py train --out {folders['b']} --resume"
    shown = queue_steps.view(studio)
    assert [row.split(" | ")[1] for row in shown["queue.table"].splitlines() if row.startswith("| 1st")] == \
        ["b (training)"]
    assert "2nd" in shown["queue.table"] and "3rd" in shown["queue.table"]
    removed = queue_steps.remove(studio, {"queue.pick": studio.queue.jobs()[1].id})  # c leaves the line
    assert "Removed c (training) from the queue" in removed["queue.msg"]
    assert [Path(j.run_dir).name for j in studio.queue.jobs()] == ["b", "d"]
    studio.close()  # the app stops while a runs and b, d wait ...
    again = Studio(runs)  # ... and starts again over the same runs folder
    assert again.jobs.status().running and again.jobs.status().run_dir == str(folders["a"])
    assert again.queue.place_of(str(folders["b"])) == 1 and again.queue.place_of(str(folders["d"])) == 2
    time.sleep(1.5)
    assert lines(stand_in) == ["start a train"]  # nothing starts beside the running job
    (folders["a"] / "go").touch()
    wait_for(lambda: lines(stand_in)[-1:] == ["start b train"], "b to start after a")
    time.sleep(1.5)
    assert lines(stand_in) == ["start a train", "end a", "start b train"]
    (folders["b"] / "go").touch()
    (folders["d"] / "go").touch()
    wait_for(lambda: lines(stand_in)[-1:] == ["end d"], "d to run")
    assert lines(stand_in) == ["start a train", "end a", "start b train", "end b", "start d train", "end d"]
    wait_for(lambda: not again.queue.jobs(), "the queue to empty")
    assert json.loads((runs / QUEUE_FILE).read_text()) == {"jobs": []}
    again.close()


def test_add_to_queue_and_new_previews_wait_behind_a_running_job_and_the_page_says_so(stand_in, models, photos,
                                                                                       tmp_path):
    from app.page import PageState
    from app.steps import train
    from app.steps.queue import view as queue_view
    from app.jobqueue import QueuedJob

    runs = tmp_path / "runs"
    (runs / "busy").mkdir(parents=True)
    studio = Studio(runs, models)
    studio.submit(QueuedJob("run", str(runs / "busy"), ["train", "--out", str(runs / "busy")]))
    wait_for(lambda: studio.jobs.status().running, "the first job to run")
    values = request("images", str(models["flux"]), "lined-up", images=uploads(photos), prompt="a photo of sks dog",
                     **FLUX_FAST)
    state = PageState(kind="images", uploads={"images": uploads(photos), "qa": []})
    page = {"page.state": state, "model.model": values["model"], "train.name": "lined-up",
            "data.prompt": values["prompt"], "data.trigger": "sks", "data.captions": None, "data.qa_table": None,
            "budget.ratio": values["ratio"], "budget.rank": values["rank"], "budget.batch_size": 1,
            "budget.ram": 0.0, **{f"train.{n}": values.get(n) for n in train.SETTINGS}}
    with pytest.raises(JobBusy, match="Add to queue in step 4"):
        train.start(studio, page)  # Start training says what to do instead
    out = train.start(studio, page, queue=True)
    folder = out["page.state"].run_dir
    assert "Added lined-up to the queue, 1st in line" in out["train.msg"]
    assert "lined-up is waiting in the queue** (1st in line)" in out["train.status"]
    assert "lined-up (training)" in out["queue.table"]
    assert list_runs(studio)[0]["status"] == "waiting in the queue (1st in line)"
    # new previews of a finished run wait too (the run is made to look finished: the stand-in trains nothing)
    (Path(folder) / "lora" / "corrected").mkdir(parents=True)
    said = studio.render_preview(folder, "a photo of sks dog in the snow", "1000-1001")
    assert said.startswith("Queued new previews of lined-up: 2nd in line")
    waiting = studio.queue.jobs()
    assert [j.what for j in waiting] == ["training", "previews"]
    assert waiting[1].arguments[:3] == ["preview", "--run", folder] and "1001" in waiting[1].arguments
    assert list(waiting[1].writes.values()) == ['{"prompts": ["a photo of sks dog in the snow"]}']
    assert "2nd: lined-up (previews)" in [c[0] for c in queue_view(studio)["queue.pick"].constructor_args["choices"]]
    studio.close()
    (runs / "busy" / "go").touch()


def test_resume_train_further_and_start_another_run_queue_behind_a_running_job_and_say_so(stand_in, models, photos,
                                                                                          tmp_path):
    """Issue 29: while a job runs, Resume and Train further line their job up (as Add to queue does: said with its
    place in line), the jobs then run in turn; a second job of the same run is refused in words; Start another run
    goes back to step 1 and says that the new run will wait its turn."""
    from app.jobqueue import QueuedJob
    from app.page import PageState
    from app.steps import export
    from app.steps import runs as runs_steps
    from pipelines.flux.backend import FluxSettings
    from pipelines.runner import Run, RunSettings

    root = tmp_path / "runs"
    (root / "busy").mkdir(parents=True)
    for name in ("halfway", "done"):
        Run.create(root / name, "flux", RunSettings(model=str(models["flux"]), steps=4, rank=4, device="cpu"),
                   FluxSettings(images=str(Path(photos[0]).parent), prompt="a photo of sks dog", resolution=32))
    info = json.loads((root / "done" / "run.json").read_text())
    for stage in info["stages"].values():
        stage["status"] = "done"  # finished, as far as Train further is concerned (the stand-in trains nothing)
    (root / "done" / "run.json").write_text(json.dumps(info))
    studio = Studio(root, models)
    studio.submit(QueuedJob("run", str(root / "busy"), ["train", "--out", str(root / "busy")]))
    wait_for(lambda: studio.jobs.status().running, "the first job to run")
    page = {"page.state": PageState(kind="images"), "runs.extend_steps": 6, "preview.uncorrected": False}

    resumed = runs_steps.resume(studio, {**page, "runs.pick": "halfway"})
    said = "Added resuming halfway to the queue, 1st in line: it starts when the jobs before it have finished"
    assert said in resumed["runs.msg"] and said in resumed["train.msg"]
    assert "halfway is waiting in the queue** (1st in line)" in resumed["train.status"]
    assert "halfway (resume)" in resumed["queue.table"]
    further = runs_steps.extend(studio, {**page, "runs.pick": "done"})
    assert "Added training done further, to 6 steps to the queue, 2nd in line" in further["runs.msg"]
    waiting = studio.queue.jobs()
    assert [Path(j.run_dir).name for j in waiting] == ["halfway", "done"]
    assert waiting[1].arguments[:6] == ["train", "--out", str(root / "done"), "--resume", "--steps", "6"]
    with pytest.raises(JobBusy, match=r"halfway is already waiting in the queue \(1st in line\)"):
        studio.resume_run("halfway")
    statuses = {r["name"]: r["status"] for r in list_runs(studio)}
    assert statuses["halfway"] == "waiting in the queue (1st in line)"
    assert statuses["done"] == "waiting in the queue (2nd in line)"
    another = export.new_run(studio, {"page.state": PageState(kind="images", run_dir=str(root / "done"))})
    assert another["page.state"].run_dir == ""
    assert "busy is running now: press Add to queue in step 4 and your new run is queued: it starts when the " \
           "current run ends" in another["model.msg"]
    (root / "busy" / "go").touch()
    wait_for(lambda: lines(stand_in)[-1:] == ["start halfway train"], "halfway to resume after busy")
    with pytest.raises(JobBusy, match="halfway is already running"):
        studio.resume_run("halfway")
    (root / "halfway" / "go").touch()
    (root / "done" / "go").touch()
    wait_for(lambda: lines(stand_in)[-1:] == ["end done"], "done to train further")
    assert lines(stand_in) == ["start busy train", "end busy", "start halfway train", "end halfway",
                               "start done train", "end done"]
    studio.close()
