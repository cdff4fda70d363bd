"""Issue 29 items 4, 6 and 7 in a real browser (Debian's chromium, headless, driven by playwright): card presets on
the Budget step, a strength grid on the Preview step, a checkpoint's adapter corrected and exported on the Export
step. The app runs in this process with the device detection faked to a 12 GB GPU (the plan is numbers; nothing
runs on it: the runs here are made on the CPU), on the tiny demo models."""

from __future__ import annotations

import os
import zipfile

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from browser_pages import open_app_page  # noqa: E402
from test_app_browser import (TRAINING_TIMEOUT_MS, button, expect_text, no_traceback, pick_past_run,  # noqa: E402
                              plan_flux_dev_only, shot)

pytestmark = [pytest.mark.browser, pytest.mark.slow]
FAKE_GPU = {"kind": "cuda", "name": "Test GPU (faked: the plan only)", "free_gb": 11.5, "total_gb": 12.0,
            "text": "GPU: Test GPU (faked: the plan only), 11.5 GiB free of 12.0 GiB"}


@pytest.fixture(scope="module")
def world(tmp_path_factory, free_port):
    """The app on a free port with a faked 12 GB GPU, photos, and a finished tiny FLUX.1 run with two checkpoints."""
    from app import handlers
    from app.main import create_app, launch
    from pipelines import demo
    from pipelines.demo import data as demo_data
    from pipelines.flux.backend import FluxSettings
    from pipelines.runner import Run, RunSettings

    if not (demo.FLUX_DIR / "demo.json").is_file():
        pytest.skip("the demo models are not built (python -m pipelines.demo build)")
    root = tmp_path_factory.mktemp("features-app")
    photos = demo_data.write_subject_images(root / "photos", count=4, seed=0)
    prompt = "a photo of sks shape on a white background"
    Run.create(root / "runs" / "grid-me", "flux",
               RunSettings(model=str(demo.FLUX_DIR), steps=2, rank=4, calibration_samples=2, checkpoint_every=1,
                           sample_every=0, device="cpu"),
               FluxSettings(images=str(photos[0].parent), prompt=prompt, resolution=32, preview_steps=1,
                            max_sequence_length=16)).execute()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(handlers, "detect_device", lambda: dict(FAKE_GPU))
        page, studio = create_app(root / "runs", {"flux": demo.FLUX_DIR, "vlm": demo.VLM_DIR})
        port = free_port()
        launch(page, "127.0.0.1", port, block=False, runs_dir=root / "runs")
        yield {"url": f"http://127.0.0.1:{port}/", "photos": photos, "prompt": prompt, "studio": studio,
               "runs": root / "runs"}
        studio.cancel()
        studio.jobs.wait(timeout=120)
        page.close()


@pytest.fixture
def page(browser, world):
    tab = open_app_page(browser, world["url"], "Test GPU")
    yield tab
    assert "Traceback" not in tab.content()
    tab.context.close()


def test_card_presets_fill_the_budget_and_the_plan_says_what_each_card_means(page, world):
    from app import plan as plans

    plan_flux_dev_only(page, world["photos"], world["prompt"])
    expect_text(page, "#runs-on", "Test GPU")
    expect_text(page, "#card-table", "What each GPU size means for this model")
    for card in (8, 12, 16, 24):
        expect_text(page, "#card-table", f"{card} GB")
    for card in (16, 8):
        page.locator("#budget-presets").get_by_text(f"{card} GB", exact=True).click()
        page.wait_for_function(f"document.querySelector('#budget input').value == '{card}'")
        ram = float(page.locator("#ram-budget input").input_value())
        assert ram == min(plans.CARD_RAM[card], ram)  # the card's typical RAM, at most what is free here
        wanted = plans.memory_plan("black-forest-labs/FLUX.1-dev", card, None, 16, ram_gb=ram)["recommended"]
        expect_text(page, "#plan-text", f"Recommended ratio: {wanted:.2f}")
        page.wait_for_function(f"Math.abs(document.querySelector('#ratio input[type=number]').value - {wanted}) < 0.006")
        no_traceback(page)
        shot(page, f"29-6-preset-{card}gb")
    page.locator("#budget input").fill("20")  # a typed budget is no preset any more; the plan follows it
    page.locator("#budget input").press("Enter")
    expect_text(page, "#memory-chart", "FLUX.1")
    page.wait_for_function("!document.querySelector('#budget-presets input:checked')")


def test_a_strength_grid_of_two_prompts_renders_in_one_job_with_progress(page, world):
    pick_past_run(page, "grid-me")
    expect_text(page, "#preview-text", "Previews of grid-me")
    page.locator("#scales").get_by_role("textbox").fill("0, one")
    button(page, "Render a strength grid").click()  # a bad strength is said in the words of this screen
    expect_text(page, "#msg-preview", "LoRA strengths must be numbers")
    page.locator("#seeds").get_by_role("textbox").fill("5-3")
    page.locator("#scales").get_by_role("textbox").fill("0, 1")
    button(page, "Render a strength grid").click()
    expect_text(page, "#msg-preview", "Seeds: the range 5-3 runs backwards; write it as 3-5")
    no_traceback(page)
    shot(page, "29-4-grid-refused")
    page.locator("#ask").get_by_role("textbox").fill(f"{world['prompt']}\na photo of sks shape on a red background")
    page.locator("#seeds").get_by_role("textbox").fill("3-4")
    page.locator("#scales").get_by_role("textbox").fill("0, 0.5, 1")
    button(page, "Render a strength grid").click()
    expect_text(page, "#msg-preview", "Rendering a strength grid")
    expect_text(page, "#preview-progress", "Rendering the strength grid of grid-me")
    shot(page, "29-4-grid-rendering")
    expect_text(page, "#preview-text", "Strength grid of grid-me", timeout=TRAINING_TIMEOUT_MS)
    page.wait_for_function("document.querySelectorAll('#preview-gallery img').length == 12")  # 2 prompts x 2 seeds x 3
    expect_text(page, "#preview-text", "strengths 0, 0.5, 1")
    no_traceback(page)
    shot(page, "29-4-strength-grid")
    expect_text(page, "#preview-gallery", "LoRA strength 0 (base model) · seed 3")  # labelled: strength, seed, prompt
    expect_text(page, "#preview-gallery", "LoRA strength 0.5 · seed 4")


def test_a_kept_checkpoint_is_corrected_and_exported_with_a_readme(page, world):
    pick_past_run(page, "grid-me")
    expect_text(page, "#preview-text", "grid-me")
    button(page, "Next: export").click()
    expect_text(page, "#export-text", "trigger word sks")
    page.get_by_role("combobox", name="Which adapter").click()
    page.get_by_role("option", name="step 1 (not corrected yet)").click()
    expect_text(page, "#export-text", "not corrected for the full model yet")
    shot(page, "29-7-checkpoint-not-corrected")
    button(page, "Correct this checkpoint for the full model").click()
    expect_text(page, "#msg-export", "Correcting step 1")
    expect_text(page, "#export-text", "Step 1, corrected for the full model", timeout=TRAINING_TIMEOUT_MS)
    expect_text(page, "#msg-export", "Step 1 is corrected")
    expect_text(page, "#snippet", "exports/step-000001/diffusers")
    no_traceback(page)
    shot(page, "29-7-checkpoint-exported")
    zips = sorted((world["runs"] / "grid-me" / "export").glob("*step-000001.zip"))
    assert zips, "the zip of step 1 was not made"
    with zipfile.ZipFile(zips[0]) as archive:
        readme = archive.read("README.md").decode()
    assert "adapters of step 1" in readme and "Trigger word: **sks**" in readme
