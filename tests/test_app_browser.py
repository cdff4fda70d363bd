"""The app in a real browser: Debian's chromium (headless) driven by playwright, on the tiny models.

The app runs in this process on a free port of 127.0.0.1; each test opens a fresh page (a new
session), walks the wizard as a person would, and saves a screenshot of each step under
tests/screenshots/. Bad input must give a visible message in words and never a traceback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402
from PIL import Image  # noqa: E402
import numpy as np  # noqa: E402

from app.handlers import EXAMPLE_PROMPT  # noqa: E402
from flux2_fixtures import save_tiny_klein  # noqa: E402
from flux_fixtures import save_tiny_flux, write_subject_images  # noqa: E402
from pipelines import demo
from pipelines.demo import data as demo_data  # noqa: E402
from vlm_fixtures import save_tiny_internvl, write_colour_images  # noqa: E402
from browser_pages import open_app_page  # noqa: E402

# Every test drives the app in headless chromium, most train to the end: minutes each (pyproject.toml markers).
pytestmark = [pytest.mark.browser, pytest.mark.slow]

# chromium (the `browser` fixture) and free ports (`free_port`) come from conftest.py
SHOTS = Path(__file__).resolve().parent / "screenshots"
TRAINING_TIMEOUT_MS = 150_000
DEMO = {"flux": demo.FLUX_DIR, "vlm": demo.VLM_DIR}

@pytest.fixture(scope="module")
def world(tmp_path_factory, free_port):
    """Tiny demo models, the user's files, and the app serving them on a free port."""
    from app.main import create_app, launch

    root = tmp_path_factory.mktemp("app")
    if all((DEMO[task] / "demo.json").is_file() for task in DEMO):  # the demo models the app ships with
        models, prompt = DEMO, EXAMPLE_PROMPT
        photos = demo_data.write_subject_images(root / "photos", count=4, seed=0)
        rows = [(f"images/{p.name}", q, a) for p, q, a in demo_data.write_mug_images(root / "qa" / "images", 2, 0)]
    else:  # a checkout without them: the tiny models of the other tests
        models = {"flux": save_tiny_flux(root / "models" / "demo-flux"),
                  "vlm": save_tiny_internvl(root / "models" / "demo-internvl")}
        prompt = "a photo of sks dog"
        photos = write_subject_images(root / "photos", count=4)
        rows = write_colour_images(root / "qa")
    many = [root / "many" / f"shot_{i:02d}.png" for i in range(51)]
    many[0].parent.mkdir()
    for index, path in enumerate(many):
        Image.new("RGB", (40, 40), (index * 4, 90, 200 - index * 3)).save(path)
    (root / "wrong").mkdir()
    notes = root / "wrong" / "notes.txt"
    notes.write_text("not a picture")
    fake = root / "wrong" / "holiday.png"
    fake.write_text("this is text with a .png name")
    table = root / "qa" / "qa.jsonl"
    table.write_text("".join(json.dumps({"image": i, "question": q, "answer": a}) + "\n" for i, q, a in rows))
    klein = save_tiny_klein(root / "models" / "tiny-klein", distilled=True)  # a FLUX.2 [klein] as a local folder
    page, studio = create_app(root / "runs", models)
    port = free_port()
    launch(page, "127.0.0.1", port, block=False, runs_dir=root / "runs")
    shutil.rmtree(SHOTS, ignore_errors=True)  # this run's screenshots only
    SHOTS.mkdir()
    yield {"url": f"http://127.0.0.1:{port}/", "photos": photos, "many": many, "notes": notes, "fake": fake,
           "qa_images": sorted((root / "qa" / "images").iterdir()), "qa_table": table, "studio": studio,
           "runs": root / "runs", "prompt": prompt, "question": rows[0][1], "klein": klein}
    studio.close()  # no queued job starts any more
    studio.cancel()  # a test that failed half-way must not leave a run training into interpreter shutdown
    studio.jobs.wait(timeout=120)
    page.close()


def open_page(browser, world):
    """A fresh browser context (a new session, as after closing the browser) on the app."""
    return open_app_page(browser, world["url"])


@pytest.fixture
def page(browser, world):
    tab = open_page(browser, world)
    context = tab.context
    yield tab
    if not tab.is_closed():
        assert "Traceback" not in tab.content()
        context.close()


def shot(page, name: str) -> None:
    page.wait_for_timeout(400)  # let the last update paint
    SHOTS.mkdir(exist_ok=True)  # (a file run alone has no folder yet)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def button(page, name: str):
    return page.get_by_role("button", name=name, exact=True)


def expect_text(page, selector: str, text: str, timeout: float = 30_000) -> None:
    from playwright.sync_api import expect

    expect(page.locator(selector)).to_contain_text(text, timeout=timeout)


def upload(page, selector: str, files) -> None:
    page.locator(f"{selector} input[type=file]").set_input_files([str(f) for f in files])


def no_traceback(page) -> None:
    body = page.locator("body").inner_text()
    assert "Traceback" not in body and 'File "' not in body
    assert page.locator(".toast-body").count() == 0, "gradio showed an error toast"


def near(page, message: str, control, most_px: float = 120) -> None:
    """The message `message` (a selector) shows right under or beside `control` (a locator), not a screen away."""
    said, at = page.locator(message).bounding_box(), control.bounding_box()
    assert said and at, (message, said, at)
    gap = max(said["y"] - (at["y"] + at["height"]), at["y"] - (said["y"] + said["height"]), 0)  # px between them
    assert gap < most_px, (message, gap, said, at)


def choose_task(page, label: str) -> None:
    page.get_by_label(label).check()
    page.wait_for_timeout(1500)


# ------------------------------------------------------------------------------------------------ tests


def pick_past_run(page, name: str, action: str = "Open") -> None:
    """Past runs: refresh the list, pick `name` and press `action` (Open, Resume, ...)."""
    page.get_by_role("tab", name="Past runs").click()
    button(page, "Refresh").click()
    expect_text(page, "#runs-table", name)
    page.get_by_role("combobox", name="Run").click()
    page.get_by_role("option", name=name, exact=True).click()
    button(page, action).click()


def plan_flux_dev_only(page, photos, prompt: str) -> None:
    """Steps 1-2 with FLUX.1 [dev], not downloaded here: plan only, 3 photos and the prompt, to the Budget step."""
    page.get_by_role("combobox", name="Model").click()  # a real model: presets mean something for it
    page.get_by_role("option", name=re.compile(r"FLUX\.1 \[dev\]")).click()
    expect_text(page, "#model-info", "11.9 billion parameters")
    button(page, "Next: your data").click()  # not downloaded here: refused, with the offer to plan only
    expect_text(page, "#msg-model", "is not downloaded")
    button(page, "Only see its memory plan (no training until it is downloaded)").click()
    upload(page, "#photo-upload", photos[:3])
    expect_text(page, "#msg-data", "3 images added")
    page.locator("#prompt").get_by_role("textbox").fill(prompt)
    button(page, "Check the data and continue").click()


def test_flux_wizard_walks_from_upload_to_preview_and_export(page, world, browser):
    start = time.monotonic()
    expect_text(page, "#model-info", "demo-flux")
    shot(page, "01-model")
    button(page, "Next: your data").click()
    upload(page, "#photo-upload", world["photos"])
    expect_text(page, "#msg-data", "4 images added")
    assert page.locator("#photo-gallery img").count() == 4
    if world["prompt"] == EXAMPLE_PROMPT:  # the demo model's prompt names what it knows (shapes), not a dog
        assert page.locator("#prompt").get_by_role("textbox").input_value() == EXAMPLE_PROMPT
    expect_text(page, "#prompt", "instance prompt")  # the word is explained where it is asked for
    page.locator("#prompt").get_by_role("textbox").fill(world["prompt"])
    shot(page, "02-data-flux")
    button(page, "Check the data and continue").click()
    expect_text(page, "#plan-text", "Recommended ratio")
    assert page.locator("#memory-chart svg rect").count() >= 8  # 5 EMLoC phases + LoRA, QLoRA, inference
    # no GPU here: the step says the CPU runs the job and budgets RAM; the slider follows the recommendation
    expect_text(page, "#runs-on", "This job runs on the CPU")
    assert not page.locator("#budget").is_visible() and page.locator("#ram-budget").is_visible()
    assert "predicted peak RAM" in page.locator("#memory-chart").inner_text()
    expect_text(page, "#chart-legend", "streamed")
    # a demo would fit uncompressed (recommended 1.00): it starts at its own ratio, so the emulator is compressed
    expect_text(page, "#plan-text", "This demo model starts at ratio 0.45")
    assert float(page.locator("#ratio input[type=number]").input_value()) == pytest.approx(0.45)
    shot(page, "03-budget")
    button(page, "Next: training").click()
    expect_text(page, "#lam", "how far correcting the LoRA")  # the clamp explained beside its field
    page.locator("#steps input").fill("24")
    button(page, "Start training").click()
    expect_text(page, "#msg-train", "Started")
    expect_text(page, "#job-status", "stage")
    expect_text(page, "#job-status", "python launch.py train --backend flux")  # the run, headless (tested by running it)
    shot(page, "04-train-running")
    page.context.close()  # closing the browser does not stop the run; a page opened later shows it
    page = open_page(browser, world)
    # the reopened page follows the run while it trains, or offers its results when it ended meanwhile
    page.locator("#job-status:visible, #show-last:visible, #preview-text:visible").first.wait_for()
    shot(page, "04b-train-reopened")
    if page.locator("#show-last").is_visible():
        page.locator("#show-last").click()
    # the page moves on to the previews by itself: base | emulator + LoRA | corrected, one row per seed
    expect_text(page, "#preview-text", "Previews of", timeout=TRAINING_TIMEOUT_MS)
    images = page.locator("#preview-gallery img")
    images.first.wait_for()
    assert images.count() == 3
    shot(page, "05-preview-flux")
    page.locator("#ask").get_by_role("textbox").fill(world["prompt"])  # new previews at two other seeds
    page.locator("#seeds").get_by_role("textbox").fill("1, 2")
    button(page, "Render new previews").click()
    expect_text(page, "#msg-preview", "Rendering previews")
    expect_text(page, "#preview-progress", "Rendering previews of flux-")  # progress on the Preview step itself
    shot(page, "05a-preview-rendering")
    expect_text(page, "#preview-text", "(previews-", timeout=TRAINING_TIMEOUT_MS)
    page.wait_for_function("document.querySelectorAll('#preview-gallery img').length == 6")
    shot(page, "05b-preview-new-seeds")
    button(page, "Next: export").click()
    expect_text(page, "#export-text", "pytorch_lora_weights.safetensors")
    expect_text(page, "#export-text", "For ComfyUI, Forge or kohya_ss")
    assert page.locator("#download").get_by_text(".zip").count() >= 1
    expect_text(page, "#snippet", "num_inference_steps")  # the preview's own settings (tested by running it)
    expect_text(page, "#snippet", "max_sequence_length")
    shot(page, "06-export")
    page.locator("button.step-button:not([disabled])", has_text="4. Train").click()  # back to the finished run: loss curve, log
    expect_text(page, "#job-status", "finished")
    shot(page, "04c-train-finished")
    page.get_by_role("tab", name="Past runs").click()
    button(page, "Refresh").click()
    expect_text(page, "#runs-table", "finished")
    assert not re.search(r"\d{4}-\d\d-\d\dT\d\d:", page.locator("#runs-table").inner_text())  # no ISO stamps
    shot(page, "07-past-runs")
    button(page, "Open").click()  # a past run reopens on its previews
    expect_text(page, "#msg-runs", "Opened flux-")
    expect_text(page, "#preview-text", "Previews of flux-")
    assert page.locator("#preview-gallery img").count() == 6  # its newest previews: seeds 1 and 2
    run_dir = next(world["runs"].glob("flux-*"))
    assert sorted(p.name for p in (run_dir / "data").iterdir() if p.suffix != ".txt") == sorted(
        p.name for p in world["photos"])  # the uploads were copied into the run
    no_traceback(page)
    page.context.close()
    print(f"flux walk: {time.monotonic() - start:.1f} s")


def test_vlm_wizard_imports_a_table_and_shows_answers(page, world):
    choose_task(page, "Teach a vision-language model (InternVL)")
    expect_text(page, "#model-info", "demo-internvl")
    button(page, "Next: your data").click()
    button(page, "Check the data and continue").click()  # an empty question/answer table
    expect_text(page, "#msg-data", "table is empty")
    shot(page, "11-bad-empty-qa-table")
    upload(page, "#qa-upload", world["qa_images"])
    expect_text(page, "#msg-data", "8 images added")
    upload(page, "#qa-import", [world["qa_table"]])
    expect_text(page, "#msg-data", "8 questions imported")
    expect_text(page, "#qa-table", world["question"])
    shot(page, "08-data-vlm")
    button(page, "Check the data and continue").click()
    expect_text(page, "#msg-data", "8 samples")
    button(page, "Next: training").click()
    page.locator("#steps input").fill("6")
    button(page, "Start training").click()
    expect_text(page, "#job-status", "finished", timeout=TRAINING_TIMEOUT_MS)
    expect_text(page, "#answers", "full + corrected LoRA")
    from playwright.sync_api import expect

    assert page.locator("#answers tbody tr").count() >= 1
    # the run's previews ask some of the questions: the page says how many of how many (the handler test checks
    # that the table holds that many)
    expect(page.locator("#preview-text")).to_contain_text(re.compile(r"ask \d+ of your 8 questions"))
    shot(page, "09-preview-vlm")


def test_closing_the_page_keeps_training_and_cancel_stops_it(browser, world):
    page = open_page(browser, world)
    choose_task(page, "Teach a vision-language model (InternVL)")
    button(page, "Next: your data").click()
    upload(page, "#qa-upload", world["qa_images"])
    expect_text(page, "#msg-data", "8 images added")
    upload(page, "#qa-import", [world["qa_table"]])
    expect_text(page, "#msg-data", "8 questions imported")
    button(page, "Check the data and continue").click()
    button(page, "Next: training").click()
    page.locator("#steps input").fill("5000")  # far longer than this test
    button(page, "Start training").click()
    expect_text(page, "#msg-train", "Started")
    page.context.close()
    page = open_page(browser, world)  # the page opens on the run, still training
    expect_text(page, "#job-status", "Training the LoRA on the emulator", timeout=60_000)
    expect_text(page, "#job-status", "of 5000")
    # samples: the step-0 baseline of the user's own questions, then one more round when asked for
    expect_text(page, "#samples-answers", "answer of the emulator + LoRA", timeout=60_000)
    assert page.locator("#samples-answers tbody tr").count() >= 1
    baseline = page.locator("#samples-answers tbody tr").count()
    button(page, "Sample now").click()
    expect_text(page, "#msg-train", "Asked for samples")
    page.wait_for_function(f"document.querySelectorAll('#samples-answers tbody tr').length > {baseline}",
                           timeout=60_000)
    first = page.locator("#samples-answers tbody tr td").first.inner_text()
    assert int(first) > 0  # the newest round first, labelled by its step
    shot(page, "10-train-reopened-running")
    button(page, "Start training").click()  # a second run while this one trains: refused, in words
    expect_text(page, "#msg-train", "already running")
    near(page, "#msg-train", button(page, "Start training"))  # said under the button, not below the log
    button(page, "Cancel").click()
    expect_text(page, "#msg-train", "Stopping after the current step")
    expect_text(page, "#job-status", "was cancelled")
    shot(page, "10b-train-cancelled")
    page.get_by_role("tab", name="Past runs").click()
    button(page, "Refresh").click()
    expect_text(page, "#runs-table", "cancelled at train")
    no_traceback(page)
    page.context.close()


def test_launch_py_serves_the_app_on_the_port_it_is_given(tmp_path, free_port):
    import subprocess
    import sys
    import urllib.request

    port = free_port()
    root = Path(__file__).resolve().parents[1]
    server = subprocess.Popen([sys.executable, str(root / "launch.py"), "app", "--no-browser", "--port", str(port),
                               "--runs", str(tmp_path / "runs")], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline, body = time.monotonic() + 90, ""
        while time.monotonic() < deadline and not body:
            assert server.poll() is None, server.stdout.read()
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=2).read().decode()
            except OSError:
                time.sleep(0.5)
        assert json.loads(body)["title"] == "EMLoC Studio"
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_bad_input_shows_messages_in_words(page, world):
    page.get_by_role("combobox", name="Model").click()  # a real model: the budget step plans for it
    page.get_by_role("option", name=re.compile(r"FLUX\.1 \[dev\]")).click()
    expect_text(page, "#model-info", "11.9 billion parameters")
    expect_text(page, "#model-info", "not downloaded, and this machine is offline")
    button(page, "Next: your data").click()  # refused at step 1, in words, before any run folder exists
    expect_text(page, "#msg-model", "is not downloaded and this machine is offline")
    expect_text(page, "#msg-model", "huggingface-cli login")
    assert "local_files_only" not in page.locator("#msg-model").inner_text()
    assert not list(world["runs"].glob("*/run.json")) or all(
        "FLUX.1-dev" not in p.read_text() for p in world["runs"].glob("*/run.json"))
    no_traceback(page)
    shot(page, "16-refused-not-downloaded")
    button(page, "Only see its memory plan (no training until it is downloaded)").click()  # planning still works
    expect_text(page, "#msg-data", "cannot be trained here yet")
    upload(page, "#photo-upload", [world["notes"], world["fake"]])  # wrong file types
    expect_text(page, "#msg-data", "notes.txt")
    expect_text(page, "#msg-data", "holiday.png")
    no_traceback(page)
    shot(page, "12-bad-file-types")
    page.locator("#prompt").get_by_role("textbox").fill("a photo of my dog")  # no trigger word
    upload(page, "#photo-upload", world["photos"][:3])
    expect_text(page, "#msg-data", "3 images added")  # the upload is in before the check is asked for
    button(page, "Check the data and continue").click()
    expect_text(page, "#msg-data", "Trigger word (step 2)")  # the page's own control, not a CLI flag
    near(page, "#msg-data", button(page, "Check the data and continue"))  # just above the button
    assert "--" not in page.locator("#msg-data").inner_text()
    shot(page, "17-bad-prompt-names-the-control")
    page.locator("#photo-gallery img").first.wait_for()
    for _ in range(3):
        page.locator("#photo-gallery img").first.click()
        button(page, "Remove the selected photo").click()
        page.wait_for_timeout(300)
    expect_text(page, "#msg-data", "0 images left")
    page.locator("#prompt").get_by_role("textbox").fill(world["prompt"])
    upload(page, "#photo-upload", world["photos"][:2])  # too few
    button(page, "Check the data and continue").click()
    expect_text(page, "#msg-data", "add at least 3")
    no_traceback(page)
    shot(page, "13-bad-too-few")
    upload(page, "#photo-upload", world["many"])  # too many: 2 + 51 > 50
    expect_text(page, "#msg-data", "50 images is the most")
    no_traceback(page)
    shot(page, "14-bad-too-many")
    page.locator("#photo-gallery img").nth(1).click()
    button(page, "Remove the selected photo").click()
    expect_text(page, "#msg-data", f"Removed {world['photos'][1].name}; 49 images left")
    button(page, "Check the data and continue").click()
    budget = page.locator("#ram-budget input")  # this machine has no GPU: the job is budgeted in RAM
    budget.fill("256")
    budget.press("Enter")
    expect_text(page, "#plan-text", "Recommended ratio")
    assert "FLUX.1 [dev]: predicted peak RAM" in page.locator("#memory-chart").inner_text()
    # a real model: the slider follows the recommendation until the person moves it
    recommended = page.locator("#plan-text").inner_text().split("Recommended ratio:")[1].split()[0].strip(",*")
    assert float(page.locator("#ratio input[type=number]").input_value()) == pytest.approx(float(recommended))
    shot(page, "03b-budget-flux-dev")
    budget.fill("0.5")
    budget.press("Enter")
    expect_text(page, "#plan-text", "too small")
    expect_text(page, "#msg-budget", "No compression ratio fits")
    expect_text(page, "#plan-text", "Raise the RAM budget")
    button(page, "Next: training").click()
    expect_text(page, "#msg-budget", "raise the budget")
    no_traceback(page)
    shot(page, "15-bad-impossible-budget")
    budget.fill("-3")
    budget.press("Enter")
    expect_text(page, "#msg-budget", "positive number")
    no_traceback(page)


def test_a_failed_run_is_listed_as_failed_and_past_runs_refresh_themselves(page, world, tmp_path):
    from pipelines.flux.backend import FluxSettings
    from pipelines.runner import Run, RunSettings

    model = tmp_path / "model"
    shutil.copytree(world["studio"].demo_models["flux"], model)
    settings = FluxSettings(images=str(world["photos"][0].parent), prompt=world["prompt"], resolution=32,
                            preview_steps=2, max_sequence_length=16)
    Run.create(world["runs"] / "broken-model", "flux", RunSettings(model=str(model), steps=2, rank=4,
                                                                    calibration_samples=4), settings)
    shutil.rmtree(model / "vae")  # its files went missing after the run was made
    pick_past_run(page, "broken-model", "Resume")
    page.get_by_role("tab", name="Past runs").click()
    # no Refresh: the table follows the job and shows it failed, with why
    expect_text(page, "#runs-table", "failed at calibrate: while caching the data", timeout=60_000)
    assert "pending at calibrate" not in page.locator("#runs-table").inner_text()
    no_traceback(page)
    shot(page, "18-past-runs-failed-run")


def test_a_run_picked_while_past_runs_is_being_listed_is_the_one_open_opens(page, world, tmp_path, monkeypatch):
    """A listing of Past runs (Refresh, the timer's) that lands after the person picked a run leaves their pick:
    it used to put back the run the menu showed when it began, and Open opened that one (the CI failure of
    2026-12-05: a finished InternVL run picked, the newest unfinished run opened on the Train step)."""
    from pipelines.flux.backend import FluxSettings
    from pipelines.runner import Run, RunSettings

    for name in ("pick-older", "pick-newest"):
        Run.create(world["runs"] / name, "flux", RunSettings(model=str(world["studio"].demo_models["flux"]), steps=2,
                                                             rank=4),
                   FluxSettings(images=str(world["photos"][0].parent), prompt=world["prompt"], resolution=32))
        time.sleep(1.1)  # one second apart: pick-newest is listed first
    from app.steps import runs

    listing = runs.list_runs

    def slow_listing(studio):  # a loaded machine: the listing takes a while
        time.sleep(3)
        return listing(studio)

    page.get_by_role("tab", name="Past runs").click()
    button(page, "Refresh").click()
    expect_text(page, "#runs-table", "pick-newest")
    monkeypatch.setattr(runs, "list_runs", slow_listing)
    button(page, "Refresh").click()  # reads the menu now (on pick-newest) and lands in 3 s
    page.get_by_role("combobox", name="Run").click()
    page.get_by_role("option", name="pick-older", exact=True).click()
    page.wait_for_timeout(4500)  # the listing has landed
    monkeypatch.setattr(runs, "list_runs", listing)
    button(page, "Open").click()
    expect_text(page, "#msg-runs", "Opened pick-older")
    expect_text(page, "#job-status", "pick-older")
    no_traceback(page)


STAND_IN = """\
import pathlib, sys, time
arguments = sys.argv[1:]
run = pathlib.Path(arguments[arguments.index("--out") + 1])
deadline = time.time() + 60
while not (run / "go").exists() and time.time() < deadline:
    time.sleep(0.05)
sys.exit(130)  # as a cancelled job ends: its run stays unfinished, nothing to preview
"""


def test_a_run_added_to_the_queue_waits_its_turn_and_can_be_taken_out(page, world, tmp_path, monkeypatch):
    """Add to queue lines runs up behind the running one; step 4 lists them in order with their commands, one is
    taken out, and the next starts by itself when the running job ends (launch.py is a stand-in that trains
    nothing and runs until its run folder holds a file "go")."""
    from app import jobs

    (tmp_path / "launch.py").write_text(STAND_IN)
    monkeypatch.setattr(jobs, "LAUNCH", tmp_path / "launch.py")
    button(page, "Next: your data").click()
    upload(page, "#photo-upload", world["photos"])
    expect_text(page, "#msg-data", "4 images added")
    page.locator("#prompt").get_by_role("textbox").fill(world["prompt"])
    button(page, "Check the data and continue").click()
    expect_text(page, "#plan-text", "Recommended ratio")
    button(page, "Next: training").click()
    name = page.locator("#run-name").get_by_role("textbox")
    name.fill("queue-first")
    button(page, "Start training").click()
    expect_text(page, "#msg-train", "Started queue-first")
    name.fill("queue-second")
    button(page, "Start training").click()
    expect_text(page, "#msg-train", "Add to queue in step 4")
    button(page, "Add to queue").click()
    expect_text(page, "#msg-train", "Added queue-second to the queue, 1st in line")
    expect_text(page, "#job-status", "queue-second is waiting in the queue")
    expect_text(page, "#queue", "queue-second (training)")
    expect_text(page, "#queue", "python launch.py train --out")
    name.fill("queue-third")
    button(page, "Add to queue").click()
    expect_text(page, "#msg-train", "2nd in line")
    expect_text(page, "#queue", "queue-third (training)")
    shot(page, "25-queue")
    page.get_by_role("combobox", name="Waiting job").click()
    page.get_by_role("option", name="2nd: queue-third (training)", exact=True).click()
    button(page, "Remove from queue").click()
    expect_text(page, "#msg-queue", "Removed queue-third (training) from the queue")
    assert "queue-third" not in page.locator("#queue").inner_text()
    (world["runs"] / "queue-first" / "go").touch()  # the running job ends: the next starts by itself
    expect_text(page, "#queue", "no jobs are waiting", timeout=30_000)
    page.get_by_role("tab", name="Past runs").click()
    expect_text(page, "#runs-table", "running now")
    (world["runs"] / "queue-second" / "go").touch()
    world["studio"].jobs.wait(timeout=30)
    no_traceback(page)


def test_a_new_run_starts_clean_and_example_data_replaces_the_set(page, world, tmp_path):
    finished = [p.parents[1].name for p in world["runs"].glob("vlm-*/lora/corrected")]
    if not finished:  # run alone (not after the InternVL wizard test): make the finished InternVL run it opens
        from pipelines.internvl.backend import VlmSettings
        from pipelines.runner import Run, RunSettings

        Run.create(world["runs"] / "vlm-finished", "vlm",
                   RunSettings(model=str(world["studio"].demo_models["vlm"]), steps=2, rank=4, calibration_samples=8),
                   VlmSettings(data=str(world["qa_table"]), max_new_tokens=3, preview_samples=2)).execute()
        finished = ["vlm-finished"]
    page.get_by_role("tab", name="Past runs").click()
    button(page, "Refresh").click()
    expect_text(page, "#runs-table", finished[0])
    page.get_by_role("combobox", name="Run").click()
    page.get_by_role("option", name=finished[0], exact=True).click()
    button(page, "Open").click()
    expect_text(page, "#answers", "image seen in training")
    expect_text(page, "#scores", "seen in training")
    # a question about a new photo: the answers say it was never seen in training
    page.locator("#ask").get_by_role("textbox").fill("Whose mug is this?")
    new_photo = tmp_path / "my-own-mug.png"
    Image.new("RGB", (96, 96), (240, 200, 30)).save(new_photo)
    page.locator("#ask-upload input[type=file]").set_input_files(str(new_photo))
    page.locator("#ask-upload img").first.wait_for(timeout=30_000)  # the upload has reached the server, not a fixed wait
    button(page, "Render new previews").click()
    expect_text(page, "#preview-text", "(previews-", timeout=TRAINING_TIMEOUT_MS)
    expect_text(page, "#answers", "no (a new image)")
    no_traceback(page)
    shot(page, "19-preview-vlm-new-image")
    button(page, "Next: export").click()
    expect_text(page, "#snippet", "AutoImageProcessor")
    button(page, "Start another run").click()
    expect_text(page, "#msg-model", "A new run")
    shot(page, "20-new-run-clean-page")
    # steps 5 and 6 (not reachable until the new run trains) hold nothing of the last run
    assert page.locator("#ask textarea, #ask input").first.input_value() == ""  # the last question is gone
    def shown(selector: str) -> str:  # a hidden component is not in the page at all
        return (page.locator(selector).text_content() or "") if page.locator(selector).count() else ""

    assert "Previews of" not in shown("#preview-text") and "Whose mug" not in shown("#answers")
    assert "AutoImageProcessor" not in shown("#snippet")
    choose_task(page, "Personalise an image model (FLUX.1, FLUX.2)")
    button(page, "Next: your data").click()
    upload(page, "#photo-upload", world["photos"][:3])
    expect_text(page, "#msg-data", "3 images added")
    page.locator("#prompt").get_by_role("textbox").fill("a photo of sks cat")
    button(page, "No data at hand? Use example data made for the demo model").click()
    expect_text(page, "#msg-data", "Replaced your 3 photos and the prompt 'a photo of sks cat'")
    page.wait_for_function("document.querySelectorAll('#photo-gallery img').length == 5")  # 5, not 3 + 5
    assert page.locator("#prompt").get_by_role("textbox").input_value() == EXAMPLE_PROMPT
    no_traceback(page)
    shot(page, "21-example-data-replaces")


def test_caption_my_photos_fills_the_empty_captions_with_the_demo_internvl(page, world, tmp_path):
    """The FLUX Data step's "Caption my photos": the demo InternVL describes each photo after the trigger word;
    a caption the person typed stays; the captions are editable before training."""
    if not (DEMO["vlm"] / "demo.json").is_file():
        pytest.fail("the demo InternVL (assets/models/demo-internvl) is missing: python -m pipelines.demo build")
    rng = np.random.default_rng(5)
    photos = []
    for colour, shape in (("red", "square"), ("blue", "circle"), ("yellow", "triangle")):
        path = tmp_path / f"{colour}-{shape}.png"
        demo_data.render([demo_data.random_spec(rng, shape, colour)]).save(path)
        photos.append(path)
    button(page, "Next: your data").click()
    upload(page, "#photo-upload", photos)
    expect_text(page, "#msg-data", "3 images added")
    button(page, "Suggest captions for my photos").click()
    expect_text(page, "#msg-caption", "Wrote 3 captions")
    expect_text(page, "#msg-caption", "guesses")  # said as suggestions to check, next to the button
    for text in ("sks, a red square", "sks, a blue circle", "sks, a yellow triangle"):
        expect_text(page, "#captions", text)
    no_traceback(page)
    shot(page, "22-captions-written")
    button(page, "Suggest captions for my photos").click()  # nothing left empty: nothing is replaced
    expect_text(page, "#msg-caption", "Every photo already has a caption")


def test_past_runs_train_a_finished_run_further(page, world, tmp_path):
    from pipelines.flux.backend import FluxSettings
    from pipelines.runner import Run, RunSettings

    settings = FluxSettings(images=str(world["photos"][0].parent), prompt=world["prompt"], resolution=32,
                            preview_steps=1, max_sequence_length=16)
    Run.create(world["runs"] / "extend-me", "flux", RunSettings(model=str(world["studio"].demo_models["flux"]),
                                                                steps=2, rank=4, calibration_samples=2,
                                                                checkpoint_every=1), settings).execute()
    page.get_by_role("tab", name="Past runs").click()
    button(page, "Refresh").click()
    expect_text(page, "#runs-table", "extend-me")
    page.get_by_role("combobox", name="Run").click()
    page.get_by_role("option", name="extend-me", exact=True).click()
    from playwright.sync_api import expect

    expect(page.locator("#extend-steps input")).to_have_value("2")  # "Train to" starts at the run's steps, not 0
    page.locator("#extend-steps input").fill("2")
    button(page, "Train further").click()  # not more than it has: said in the words of this screen
    expect_text(page, "#msg-runs", "Train further needs more steps than extend-me has (2): type more than 2 in "
                                   "Train to (steps)")
    shot(page, "19-past-runs-train-further-refused")
    page.locator("#extend-steps input").fill("4")
    button(page, "Train further").click()
    expect_text(page, "#job-status", "finished", timeout=TRAINING_TIMEOUT_MS)  # the page went to step 4 and follows it
    expect_text(page, "#job-status", "--steps 4")  # the command of the run as it is now
    page.get_by_role("tab", name="Past runs").click()
    expect_text(page, "#runs-table", "4 of 4")
    assert (world["runs"] / "extend-me" / "earlier" / "step-2" / "lora" / "corrected").is_dir()
    no_traceback(page)
    shot(page, "20-past-runs-trained-further")


@pytest.mark.slow
def test_a_tiny_flux2_klein_goes_from_model_to_export(page, world):
    """A FLUX.2 model (a local folder) under the image task: its previews are images with seeds, a new prompt is
    honoured, and Export names the diffusers file its snippet loads."""
    model = page.get_by_role("combobox", name="Model")
    model.fill(str(world["klein"]))
    model.press("Enter")
    expect_text(page, "#model-info", "FLUX.2")
    button(page, "Next: your data").click()
    upload(page, "#photo-upload", world["photos"])
    expect_text(page, "#msg-data", "images added")
    page.locator("#prompt").get_by_role("textbox").fill("a photo of sks dog")
    button(page, "Check the data and continue").click()
    expect_text(page, "#msg-data", "photos ready")
    expect_text(page, "#plan-text", "Recommended ratio")
    button(page, "Next: training").click()
    page.locator("#steps input").fill("3")
    page.get_by_text("More settings").click()
    page.locator("#max-sequence-length input").fill("32")
    button(page, "Start training").click()
    expect_text(page, "#msg-train", "Started")
    expect_text(page, "#preview-text", "Previews of", timeout=TRAINING_TIMEOUT_MS)
    page.wait_for_function("document.querySelectorAll('#preview-gallery img').length == 3")
    assert page.locator("#seeds").is_visible()
    shot(page, "23-flux2-previews")
    page.locator("#ask").get_by_role("textbox").fill("a photo of sks dog in the snow")
    page.locator("#seeds").get_by_role("textbox").fill("1000-1001")
    button(page, "Render new previews").click()
    expect_text(page, "#preview-text", "(previews-", timeout=TRAINING_TIMEOUT_MS)
    expect_text(page, "#preview-text", "a photo of sks dog in the snow")
    page.wait_for_function("document.querySelectorAll('#preview-gallery img').length == 6")
    button(page, "Next: export").click()
    expect_text(page, "#export-text", "For diffusers")
    expect_text(page, "#export-text", "pytorch_lora_weights.safetensors")
    expect_text(page, "#snippet", "load_lora_weights")
    page.locator("button.step-button:not([disabled])", has_text="4. Train").click()  # the curve and summary are still there
    expect_text(page, "#job-status", "finished")
    expect_text(page, "#job-status", "Settings: model")  # the summary is still there after the preview job
    assert page.locator("#loss-plot").inner_text().count("step") >= 1
    no_traceback(page)
    shot(page, "24-flux2-export")


def test_switching_task_after_a_run_shows_nothing_of_it_and_keeps_the_photos(page, world):
    """The state of one run stays with it: after a finished image run, the InternVL task's Train and Data steps
    are empty; back on the image task the photos are still there."""
    finished = [p.parents[1].name for p in world["runs"].glob("flux-*/lora/corrected")]
    if not finished:
        pytest.skip("needs the FLUX wizard test's finished run (run the module, not this test alone)")
    page.get_by_role("tab", name="Past runs").click()
    button(page, "Refresh").click()
    page.get_by_role("combobox", name="Run").click()
    page.get_by_role("option", name=finished[0], exact=True).click()
    button(page, "Open").click()
    expect_text(page, "#preview-text", "Previews of")
    page.locator("button.step-button:not([disabled])", has_text="2. Data").click()
    upload(page, "#photo-upload", world["photos"][:3])
    expect_text(page, "#msg-data", "3 images added")
    page.locator("button.step-button:not([disabled])", has_text="1. Model").click()
    choose_task(page, "Teach a vision-language model (InternVL)")

    def shown(selector: str) -> str:  # a step not on screen may not be in the page at all
        return (page.locator(selector).text_content() or "") if page.locator(selector).count() else ""

    expect_text(page, "#model-info", "InternVL")
    assert finished[0] not in shown("#job-status") and finished[0] not in shown("#preview-text")
    assert "Previews of" not in shown("#preview-text") and not shown("#snippet").strip()
    button(page, "Next: your data").click()
    assert "images added" not in shown("#msg-data") and "photos ready" not in shown("#msg-data")
    assert page.locator("#qa-gallery img").count() == 0
    page.locator("button.step-button:not([disabled])", has_text="1. Model").click()
    choose_task(page, "Personalise an image model (FLUX.1, FLUX.2)")
    button(page, "Next: your data").click()
    page.wait_for_function("document.querySelectorAll('#photo-gallery img').length == 3")
    no_traceback(page)


def test_a_reload_mid_wizard_comes_back_where_it_was_and_says_which_photos_need_uploading_again(page, world,
                                                                                                 tmp_path):
    import uuid

    unique = tmp_path / f"reload-{uuid.uuid4().hex[:8]}.png"  # a name no other upload has: its copies are found
    shutil.copy(world["photos"][0], unique)
    photos = [unique, *world["photos"][1:]]
    button(page, "Next: your data").click()
    upload(page, "#photo-upload", photos)
    expect_text(page, "#msg-data", f"{len(photos)} images added")
    page.locator("#prompt").get_by_role("textbox").fill("a photo of sks shape on the beach")
    button(page, "Check the data and continue").click()
    expect_text(page, "#plan-text", "Recommended ratio")
    page.locator("#ram-budget input").fill("5.5")
    page.locator("#ram-budget input").press("Enter")
    page.wait_for_timeout(3000)  # the page is kept in the browser every 1.5 s
    page.reload()
    page.locator("#device").get_by_text("CPU").wait_for(state="attached")
    expect_text(page, "#plan-text", "Recommended ratio")  # back on the Budget step, its plan drawn
    assert page.locator("#plan-text").is_visible()
    assert float(page.locator("#ram-budget input").input_value()) == pytest.approx(5.5)
    shot(page, "reload-1-budget-restored")
    page.locator("button.step-button:not([disabled])", has_text="2. Data").click()
    assert page.locator("#prompt").get_by_role("textbox").input_value() == "a photo of sks shape on the beach"
    assert page.locator("#photo-gallery img").count() == len(photos)
    page.wait_for_timeout(3000)  # the step picked by its header is kept too
    # the app's temporary copies of one photo are gone (a cleaned temp folder): the page says so at the Data step
    temp = Path(os.environ.get("GRADIO_TEMP_DIR") or Path(__import__("tempfile").gettempdir()) / "gradio")
    copies = list(temp.rglob(unique.name))
    assert copies, f"no copy of {unique.name} under {temp}"
    for copy in copies:
        copy.unlink()
    page.reload()
    page.locator("#device").get_by_text("CPU").wait_for(state="attached")
    expect_text(page, "#msg-data", "need uploading again")  # on the Data step, where it was
    assert page.locator("#msg-data").is_visible()
    expect_text(page, "#msg-data", "1 of your photos")
    assert page.locator("#photo-gallery img").count() == len(photos) - 1
    no_traceback(page)
