"""Issue 29 item 1 in a real browser: a person holds out two questions on the Data step, trains the InternVL demo,
and sees the validation loss drawn beside the training loss on the Train step (headless chromium, playwright)."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402

from pipelines import demo  # noqa: E402
from pipelines.demo import data as demo_data  # noqa: E402
from browser_pages import open_app_page  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.slow]  # one short demo run in the browser: about a minute

SHOTS = Path(__file__).resolve().parent / "screenshots"


@pytest.fixture(scope="module")
def app_url(tmp_path_factory, free_port):
    from app.main import create_app, launch

    root = tmp_path_factory.mktemp("app")
    rows = [(f"images/{p.name}", q, a) for p, q, a in demo_data.write_mug_images(root / "qa" / "images", 2, 0)]
    table = root / "qa" / "qa.jsonl"
    table.write_text("".join(json.dumps({"image": i, "question": q, "answer": a}) + "\n" for i, q, a in rows))
    page, studio = create_app(root / "runs", {"flux": demo.FLUX_DIR, "vlm": demo.VLM_DIR})
    port = free_port()
    launch(page, "127.0.0.1", port, block=False, runs_dir=root / "runs")
    yield {"url": f"http://127.0.0.1:{port}/", "images": sorted((root / "qa" / "images").iterdir()), "table": table,
           "runs": root / "runs"}
    studio.cancel()
    studio.jobs.wait(timeout=120)
    page.close()


def test_held_out_questions_show_a_validation_loss_beside_the_training_loss(browser, app_url):
    from playwright.sync_api import expect

    tab = open_app_page(browser, app_url["url"])
    tab.get_by_label("Teach a vision-language model (InternVL)").check()
    tab.wait_for_timeout(1500)
    tab.get_by_role("button", name="Next: your data", exact=True).click()
    tab.locator("#qa-upload input[type=file]").set_input_files([str(f) for f in app_url["images"]])
    expect(tab.locator("#msg-data")).to_contain_text("8 images added")
    tab.locator("#qa-import input[type=file]").set_input_files([str(app_url["table"])])
    expect(tab.locator("#msg-data")).to_contain_text("8 questions imported")
    expect(tab.locator("#holdout")).to_contain_text("Held-out questions")
    tab.locator("#holdout input").fill("8")  # every question: refused in the screen's words
    tab.get_by_role("button", name="Check the data and continue", exact=True).click()
    expect(tab.locator("#msg-data")).to_contain_text("Held-out questions is 8 but the table has 8 questions")
    tab.locator("#holdout input").fill("2")
    tab.get_by_role("button", name="Check the data and continue", exact=True).click()
    expect(tab.locator("#msg-data")).to_contain_text("2 held out")
    tab.get_by_role("button", name="Next: training", exact=True).click()
    tab.locator("#steps input").fill("6")
    tab.get_by_role("button", name="Start training", exact=True).click()
    expect(tab.locator("#job-status")).to_contain_text("finished", timeout=180_000)
    run = next(p for p in app_url["runs"].iterdir() if (p / "run.json").is_file())
    records = [json.loads(line) for line in (run / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "validation_loss" in r]  # written by the run, at its sample rounds
    assert json.loads((run / "run.json").read_text())["settings"]["backend"]["holdout"] == 2
    expect(tab.locator("#answers")).to_contain_text("full + corrected LoRA", timeout=180_000)  # on Preview
    tab.locator("button.step-button:not([disabled])", has_text="4. Train").click()  # back to the curve
    expect(tab.locator("#job-status")).to_contain_text("finished")
    plot = tab.locator("#loss-plot")
    expect(plot).to_contain_text("validation (held out)", timeout=30_000)  # the chart's legend
    expect(plot).to_contain_text("training")
    SHOTS.mkdir(exist_ok=True)
    plot.scroll_into_view_if_needed()
    tab.wait_for_timeout(500)
    tab.screenshot(path=str(SHOTS / "validation-loss-chart.png"), full_page=True)
    assert "Traceback" not in tab.content()
    tab.context.close()
