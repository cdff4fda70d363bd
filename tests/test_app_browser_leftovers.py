"""Issue 29's app leftovers in a real browser (headless chromium, playwright), on a machine without a GPU: validation
photos dropped on the Data step, the validation loss of a run trained without sample rounds, the card presets
planning for a card, and Resume queued behind a running job. Jobs are a stand-in `launch.py` (tests/
test_app_handlers.py) that runs until its run folder holds a file "go": the queue is seen without training."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from browser_pages import open_app_page  # noqa: E402
from test_app_browser import button, expect_text, no_traceback, pick_past_run, plan_flux_dev_only, shot, upload  # noqa: E402
from test_app_handlers import STAND_IN  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def world(tmp_path_factory, free_port):
    """The app on a free port (this machine's CPU), photos, a run trained without sample rounds with a photo held
    out, a run not started yet, and jobs played by the stand-in."""
    from app import jobs
    from app.main import create_app, launch
    from pipelines import demo
    from pipelines.demo import data as demo_data
    from pipelines.flux.backend import FluxSettings
    from pipelines.runner import Run, RunSettings

    if not (demo.FLUX_DIR / "demo.json").is_file():
        pytest.skip("the demo models are not built (python -m pipelines.demo build)")
    root = tmp_path_factory.mktemp("leftovers-app")
    photos = demo_data.write_subject_images(root / "photos", count=4, seed=0)
    others = demo_data.write_subject_images(root / "others", count=2, seed=3)
    notes = root / "notes.txt"
    notes.write_text("not a picture")
    prompt = "a photo of sks shape on a white background"
    quick = dict(model=str(demo.FLUX_DIR), steps=4, rank=4, calibration_samples=2, checkpoint_every=2, sample_every=0,
                 device="cpu")
    data = dict(images=str(photos[0].parent), prompt=prompt, resolution=32, preview_steps=1, max_sequence_length=16)
    Run.create(root / "runs" / "no-rounds", "flux", RunSettings(**quick), FluxSettings(**data, holdout=1)).execute(
        ["calibrate", "emulate", "train"])
    Run.create(root / "runs" / "halfway", "flux", RunSettings(**quick), FluxSettings(**data))
    (root / "stand-in").mkdir()
    (root / "stand-in" / "launch.py").write_text(STAND_IN)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(jobs, "LAUNCH", root / "stand-in" / "launch.py")
        page, studio = create_app(root / "runs", {"flux": demo.FLUX_DIR, "vlm": demo.VLM_DIR})
        port = free_port()
        launch(page, "127.0.0.1", port, block=False, runs_dir=root / "runs")
        yield {"url": f"http://127.0.0.1:{port}/", "photos": photos, "others": others, "notes": notes,
               "prompt": prompt, "studio": studio, "runs": root / "runs"}
        studio.close()
        for folder in (root / "runs").iterdir():
            if folder.is_dir():
                (folder / "go").touch()  # every stand-in job ends
        studio.jobs.wait(timeout=120)
        page.close()


@pytest.fixture
def page(browser, world):
    tab = open_app_page(browser, world["url"])
    yield tab
    assert "Traceback" not in tab.content()
    tab.context.close()


def to_data_step(page, world) -> None:
    button(page, "Next: your data").click()
    upload(page, "#photo-upload", world["photos"][:3])
    expect_text(page, "#msg-data", "3 images added")
    page.locator("#prompt").get_by_role("textbox").fill(world["prompt"])


def test_validation_photos_are_dropped_checked_in_words_and_kept_by_a_reload(page, world):
    to_data_step(page, world)
    expect_text(page, "#validation-photos", "Validation photos (optional)")
    upload(page, "#validation-photos", [*world["others"], world["notes"]])
    expect_text(page, "#msg-data", "Validation photos (step 2): 2 photos kept for validation; not used")
    expect_text(page, "#msg-data", "notes.txt")
    shot(page, "29-gap1-validation-photos-refused")
    upload(page, "#validation-photos", world["others"])
    expect_text(page, "#msg-data", "Validation photos (step 2): 2 photos kept for validation.")
    button(page, "Check the data and continue").click()
    expect_text(page, "#msg-data", "Validation photos (step 2) given: the validation loss is drawn beside the "
                                   "training loss")
    no_traceback(page)
    shot(page, "29-gap1-validation-photos")
    page.wait_for_timeout(4000)  # the page's record is written a moment after a change
    page.reload()
    page.locator("#device").get_by_text("CPU").wait_for(state="attached")
    page.locator("button.step-button", has_text="2. Data").click()
    expect_text(page, "#validation-photos", world["others"][0].stem)  # the drop came back with the page


def test_validation_questions_need_the_images_they_name_said_in_the_steps_words(page, world, tmp_path):
    from pipelines.demo import data as demo_data

    rows = demo_data.write_mug_images(tmp_path / "train", 2, 0)
    table = tmp_path / "qa.jsonl"
    table.write_text("".join(json.dumps({"image": p.name, "question": q, "answer": a}) + "\n" for p, q, a in rows))
    checks = []
    for path, question, answer in demo_data.write_mug_images(tmp_path / "other", 1, 5)[:2]:  # never trained on
        checks.append((path.rename(path.with_name(f"check-{path.name}")), question, answer))
    questions = tmp_path / "validation.jsonl"
    questions.write_text("".join(json.dumps({"image": p.name, "question": q, "answer": a}) + "\n"
                                 for p, q, a in checks))
    page.get_by_label("Teach a vision-language model (InternVL)").check()
    page.wait_for_timeout(1500)
    button(page, "Next: your data").click()
    upload(page, "#qa-upload", [p for p, _, _ in rows])
    expect_text(page, "#msg-data", "8 images added")
    upload(page, "#qa-import", [table])
    expect_text(page, "#msg-data", "8 questions imported")
    upload(page, "#validation-questions", [questions])  # the file alone: its images are missing
    expect_text(page, "#msg-data", "Validation questions (step 2): 2 questions kept for validation, 0 images with "
                                   "them; not used")
    expect_text(page, "#msg-data", "validation.jsonl names images that are neither dropped with it nor among your "
                                   "uploaded images: check-mug-ana-0.png, check-mug-ben-0.png")
    button(page, "Check the data and continue").click()
    expect_text(page, "#msg-data", "Validation questions (step 2): validation.jsonl names images")
    no_traceback(page)
    shot(page, "29-gap1-validation-questions-refused")
    upload(page, "#validation-questions", [p for p, _, _ in checks])  # added to the drop
    expect_text(page, "#msg-data", "Validation questions (step 2): 2 questions kept for validation, 2 images with "
                                   "them.")
    button(page, "Check the data and continue").click()
    expect_text(page, "#msg-data", "Validation questions (step 2) given")
    no_traceback(page)


def test_a_run_without_sample_rounds_draws_its_validation_loss_at_each_checkpoint(page, world):
    records = [json.loads(line) for line in (world["runs"] / "no-rounds" / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "validation_loss" in r] == [0, 2, 4]
    pick_past_run(page, "no-rounds")
    plot = page.locator("#loss-plot")
    expect_text(page, "#loss-plot", "validation (held out)")  # the chart's legend: the validation series is drawn
    expect_text(page, "#loss-plot", "training")
    plot.scroll_into_view_if_needed()
    no_traceback(page)
    shot(page, "29-gap2-validation-without-sample-rounds")


def test_without_a_gpu_the_card_presets_plan_for_the_card_and_this_machine_plans_the_cpu(page, world):
    plan_flux_dev_only(page, world["photos"], world["prompt"])
    expect_text(page, "#runs-on", "pick it under Presets for common cards")
    presets = page.locator("#budget-presets")
    expect_text(page, "#budget-presets", "This machine (CPU, no GPU)")
    assert not page.locator("#budget input").is_visible()  # no GPU: the plan budgets RAM
    presets.get_by_text("12 GB", exact=True).click()
    page.wait_for_function("document.querySelector('#budget input') && "
                           "document.querySelector('#budget input').value == '12'")
    expect_text(page, "#plan-text", "Planned for a 12 GB card")
    expect_text(page, "#plan-text", "a run started here trains on its CPU")
    expect_text(page, "#memory-chart", "GPU")
    no_traceback(page)
    shot(page, "29-gap3-preset-without-gpu")
    presets.get_by_text("This machine (CPU, no GPU)", exact=True).click()
    page.wait_for_function("!document.querySelector('#budget input') || "
                           "document.querySelector('#budget input').offsetParent === null")
    page.wait_for_function("!document.querySelector('#plan-text').innerText.includes('Planned for')")
    no_traceback(page)


def test_resume_while_a_job_runs_is_queued_and_said_with_its_place_in_line(page, world):
    from app.jobqueue import QueuedJob

    studio, runs = world["studio"], world["runs"]
    (runs / "busy").mkdir(exist_ok=True)
    studio.submit(QueuedJob("run", str(runs / "busy"), ["train", "--out", str(runs / "busy")]))
    pick_past_run(page, "halfway", "Resume")
    expect_text(page, "#msg-runs", "Added resuming halfway to the queue, 1st in line: it starts when the jobs before "
                                   "it have finished")
    expect_text(page, "#msg-train", "Added resuming halfway to the queue, 1st in line")
    expect_text(page, "#job-status", "halfway is waiting in the queue")
    expect_text(page, "#queue", "halfway (resume)")
    no_traceback(page)
    shot(page, "29-gap4-resume-queued")
    (runs / "busy" / "go").touch()  # the running job ends: the resume starts in its turn
    expect_text(page, "#queue", "no jobs are waiting", timeout=30_000)
    (runs / "halfway" / "go").touch()
