"""The page's state between runs and tasks, through the step handlers (values by "step.element"), no browser."""

from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path

import pytest

from app import form, handlers, results
from app import plan as plans
from app.page import PageState
from app.steps import budget, data, export, model, train
from app.steps.runs import list_runs
from app.steps.train import train_view
from app.studio import IDLE, Studio, parse_seeds
from pipelines import demo

UPLOADS = {"images": [{"path": "/x/sks-0.png", "name": "sks-0.png"}], "qa": [{"path": "/x/mug.png", "name": "mug.png"}]}


@pytest.fixture
def studio(tmp_path):
    return Studio(tmp_path / "runs")


def test_switching_task_forgets_the_run_and_keeps_each_tasks_uploads(studio, tmp_path):
    state = PageState(kind="images", run_dir=str(tmp_path / "runs" / "flux-1"), uploads=dict(UPLOADS))
    out = model.switch_task(studio, {"page.state": state, "model.task": "qa"})
    new = out["page.state"]
    assert new.kind == "qa" and new.run_dir == "" and new.uploads == UPLOADS
    # nothing of the image run or its data check stays on the later steps
    assert out["train.status"] == IDLE and out["train.log"] == "" and out["train.memory"] == ""
    assert not out["train.samples_gallery"].value and out["train.samples_answers"] == ""
    assert out["data.msg"] == "" and out["preview.text"] == "" and out["export.snippet"] == ""
    assert out["data.qa_box"].visible and not out["data.photo_box"].visible
    assert out["data.qa_gallery"] == [("/x/mug.png", "mug.png")]
    back = model.switch_task(studio, {"page.state": new, "model.task": "images"})
    assert back["data.photo_gallery"] == [("/x/sks-0.png", "sks-0.png")]  # the photos are still there
    assert "data.prompt" not in back and "data.captions" not in back  # typed words are not touched


def test_start_another_run_keeps_model_data_and_settings_even_across_a_task_switch(studio, tmp_path):
    state = PageState(kind="images", run_dir="", uploads=dict(UPLOADS))
    out = export.new_run(studio, {"page.state": state})
    assert out["page.state"].uploads == UPLOADS and out["page.state"].run_dir == ""
    assert "your model, data and settings are kept" in out["model.msg"]
    assert not {"data.prompt", "data.trigger", "data.captions", "model.model"} & set(out)
    there = model.switch_task(studio, {"page.state": out["page.state"], "model.task": "qa"})["page.state"]
    back = model.switch_task(studio, {"page.state": there, "model.task": "images"})
    assert back["page.state"].uploads["images"] == UPLOADS["images"]


def test_the_train_step_of_a_page_without_a_run_shows_no_other_runs_job(studio):
    view = train_view(studio, "")
    assert view["text"] == IDLE and view["log"] == "" and view["losses"] == [] and not view["running"]


def test_the_budget_text_agrees_with_the_slider():
    chosen = plans.memory_plan("black-forest-labs/FLUX.1-dev", 80, 0.30, 16)
    assert chosen["recommended"] != pytest.approx(0.30, abs=0.005)
    assert "the slider follows it" not in chosen["text"] and "the slider is at 0.30" in chosen["text"]
    following = plans.memory_plan("black-forest-labs/FLUX.1-dev", 80, None, 16)
    assert "the slider follows it" in following["text"] and following["ratio"] == following["recommended"]
    demo_model = str(demo.FLUX_DIR)
    if not (demo.FLUX_DIR / "demo.json").is_file():
        pytest.skip("the demo models are not built (python -m pipelines.demo build)")
    v = {"model.model": demo_model, "budget.budget": 24, "budget.ratio": 0.45, "budget.rank": 16, "budget.ram": 8.0,
         "budget.touched": False, "page.state": PageState(), "budget.batch_size": 1}
    view = budget.model_view(v, plans.demo_ratio(demo_model))
    assert view["budget.ratio"] == pytest.approx(0.45) and "the slider is at 0.45" in view["budget.text"]
    assert "the slider follows it" not in view["budget.text"]


def test_the_ram_budget_is_read_when_the_step_opens(monkeypatch):
    readings = iter([3.3, 2.1])
    monkeypatch.setattr(handlers, "available_ram_gib", lambda: next(readings))
    assert budget.ram_view({"budget.ram_touched": False}) == {"budget.ram": 3.3}
    assert budget.ram_view({"budget.ram_touched": False}) == {"budget.ram": 2.1}
    assert budget.ram_view({"budget.ram_touched": True}) == {}  # typed by the person: kept


def test_seed_ranges_are_accepted():
    assert parse_seeds("1000-1015") == list(range(1000, 1016))
    assert parse_seeds("0, 3-4 9") == [0, 3, 4, 9]
    with pytest.raises(ValueError, match="use 1 to 16 seeds"):
        parse_seeds("1000-1016")
    with pytest.raises(ValueError, match="runs backwards"):
        parse_seeds("9-3")


def test_the_demo_prompt_names_what_the_demo_knows_and_a_typed_prompt_stays():
    if not (demo.FLUX_DIR / "demo.json").is_file():
        pytest.skip("the demo models are not built (python -m pipelines.demo build)")
    assert data.prompt_view(str(demo.FLUX_DIR), "a photo of sks dog") == {"data.prompt": handlers.EXAMPLE_PROMPT}
    assert "shape" in handlers.EXAMPLE_PROMPT and "dog" not in handlers.EXAMPLE_PROMPT
    assert data.prompt_view(str(demo.FLUX_DIR), "a photo of sks mug on my desk") == {}


def test_settings_have_one_label_help_and_default_from_their_fields():
    lam = form.run_field("lam")
    assert lam.label == "Correction clamp λ" and lam.default == 3.0 and "how far" in lam.help
    prompt = form.any_backend_field("prompt")
    assert prompt.label == "Prompt" and "instance prompt: the sentence that describes every training photo" in prompt.help
    assert form.field_view(form.backend_class("flux2").settings_class, "max_sequence_length").label == "Text tokens"
    assert form.defaults("flux2", 12e9)["max_sequence_length"] == 512  # FLUX.2's own default, from its field
    assert form.backend_fields("vlm") == ["max_new_tokens"]
    with pytest.raises(ValueError, match=r"^Training steps \(step 4\) must be a whole number; got 2.5$"):
        form.read_number("steps", 2.5)


def test_timestamps_are_shown_in_words():
    assert re.fullmatch(r"4 Dec 2026, \d\d:\d\d", results.when("2026-12-04T21:50:03+00:00"))
    assert train.cleared()["train.status"] == IDLE


def test_the_budget_steps_trace_puts_the_runs_traced_peaks_beside_the_formula(studio):
    """The second opinion beside the chart: the run's own code traced on tensors without data (no weights read)."""
    v = {"model.model": str(demo.FLUX_DIR), "budget.budget": 24, "budget.ratio": 0.45, "budget.rank": 16,
         "budget.ram": 8.0, "budget.touched": True, "page.state": PageState(), "budget.batch_size": 1}
    out = budget.trace_view(studio, v)
    table = out["budget.trace"]
    for phase in ("calibration + emulator", "training step", "correction"):
        row = next(line for line in table.splitlines() if line.startswith(f"| {phase}"))
        formula, traced = (float(cell) for cell in row.split("|")[2:4])
        assert traced > 0 or phase.startswith("correction"), row  # the demo's correction is under 0.01 GiB
        assert formula >= 0
    assert "no GPU" in table  # this CPU page is told what the device columns mean


def test_step_one_says_an_unreachable_hub_in_words_at_once_and_the_plan_stays_available(studio, monkeypatch):
    """No HF_HUB_OFFLINE and no network (a hub endpoint that refuses connections): Next at step 1 says so in words,
    offers the plan anyway, and the Budget step plans the catalogue model from its shipped config."""
    import socket
    import time

    from huggingface_hub import constants

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", refused)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    state = PageState(kind="images")
    started = time.monotonic()
    out = model.go_data(studio, {"page.state": state, "model.model": "black-forest-labs/FLUX.1-dev"})
    assert time.monotonic() - started < 20  # no 30 s of retries
    assert "cannot be reached" in out["model.msg"] and "Traceback" not in out["model.msg"]
    assert out["model.plan_only"].visible and "page.wizard" not in out
    plan = plans.memory_plan("black-forest-labs/FLUX.1-dev", 12, None, 16)
    assert plan["recommended"] is not None and plan["svg"]


def test_a_reload_brings_back_the_task_model_uploads_words_settings_and_step_and_says_what_is_lost(studio, tmp_path):
    """What the browser keeps (restore.snapshot, through JSON as localStorage holds it) is put back by the page's
    load; an upload whose kept copy is gone is dropped and the Data step says the photos need uploading again."""
    import json

    from PIL import Image

    from app import restore
    from app.page import STEP

    if not (demo.FLUX_DIR / "demo.json").is_file():
        pytest.skip("the demo models are not built (python -m pipelines.demo build)")
    kept = tmp_path / "kept.png"
    Image.new("RGB", (64, 64), (0, 128, 128)).save(kept)
    uploads = {"images": [{"path": str(kept), "name": "kept.png"}, {"path": str(tmp_path / "gone.png"),
                                                                     "name": "gone.png"}], "qa": []}
    state = PageState(kind="images", uploads=uploads, ratio_touched=True)
    typed = {"page.state": state, "page.step": STEP["budget"], "model.task": "images", "model.model": str(demo.FLUX_DIR),
             "data.prompt": "a photo of sks shape in the snow", "data.trigger": "sks",
             "data.captions": [["kept.png", "a teal cross"], ["gone.png", ""]], "data.qa_table": None,
             "budget.budget": 24, "budget.ram": 6.5, "budget.ratio": 0.37, "budget.rank": 8, "budget.batch_size": 2,
             "budget.touched": True, "budget.ram_touched": True, "train.name": "my-run", "train.steps": 123}
    saved = json.loads(json.dumps(restore.save(studio, typed)["page.saved"]))
    assert restore.save(studio, {**typed, "page.saved": saved}) == {}  # unchanged: nothing is written again
    out = restore.restore(studio, saved, "cpu")
    assert out["page.state"].kind == "images" and out["page.state"].ratio_touched
    assert out["page.state"].uploads["images"] == [{"path": str(kept), "name": "kept.png"}]
    assert out["data.photo_gallery"] == [(str(kept), "kept.png")]
    assert "need uploading again" in out["data.msg"] and "1 of your photos" in out["data.msg"]
    assert out["model.task"] == "images" and out["model.model"].value == str(demo.FLUX_DIR)
    assert out["data.prompt"] == "a photo of sks shape in the snow" and out["data.captions"][0] == ["kept.png",
                                                                                                     "a teal cross"]
    assert (out["budget.ratio"], out["budget.rank"], out["budget.batch_size"], out["budget.ram"]) == (0.37, 8, 2, 6.5)
    assert out["train.name"] == "my-run" and out["train.steps"] == 123 and out["model.about"]
    assert out["page.wizard"].selected == STEP["budget"] and out["page.step"] == STEP["budget"]
    assert out["budget.chart"]  # the plan is drawn for the restored settings
    # the menu's change event that the restored model fires keeps the restored settings
    from app.ui import choose_model

    again = choose_model(studio, {"page.state": out["page.state"], "model.model": str(demo.FLUX_DIR)})
    assert set(again) == {"model.about"}
    # a run that is no longer in the runs folder is said at the Train step
    gone = {**saved, "state": {**saved["state"], "run_dir": str(tmp_path / "runs" / "deleted")}, "step": STEP["export"]}
    out = restore.restore(studio, gone, "cpu")
    assert "no longer in the runs folder" in out["train.msg"] and out["page.state"].run_dir == ""
    assert out["page.wizard"].selected == STEP["train"]
    assert restore.restore(studio, {}, "cpu") == {}  # a first visit: nothing to restore


def shown_value(before, update):
    """What a component holds after the browser applies `update` (a value, or a component whose constructor
    arguments are the props it changes: gradio leaves the value alone when none is given)."""
    if hasattr(update, "constructor_args"):
        return update.constructor_args.get("value", before)
    return update


def test_a_run_list_that_lands_after_the_person_picked_a_run_keeps_their_pick(studio, tmp_path):
    """The timer's listing of Past runs (and Refresh's) reads the Run menu when it starts and lands later: it must
    not put back the run the menu showed then. It did, and Open then opened that other run (the newest, an
    unfinished one: the Train step instead of the finished run's previews; the CI failure of 2026-12-05)."""
    from app import ui
    from app.steps import runs
    from pipelines.demo import data as demo_data
    from pipelines.flux.backend import FluxSettings
    from pipelines.runner import Run, RunSettings

    if not (demo.FLUX_DIR / "demo.json").is_file():
        pytest.skip("the demo models are not built (python -m pipelines.demo build)")
    photos = demo_data.write_subject_images(tmp_path / "photos", count=3, seed=0)
    for name in ("finished-one", "newest-broken"):
        Run.create(studio.runs_dir / name, "flux", RunSettings(model=str(demo.FLUX_DIR), steps=2, rank=4),
                   FluxSettings(images=str(photos[0].parent), prompt="a photo of sks shape", resolution=32))
        time.sleep(1.1)  # created one second apart: the newest is listed first
    names = [r["name"] for r in list_runs(studio)]
    assert names == ["newest-broken", "finished-one"]
    page = runs.view(studio)  # the page's load: the menu on the newest run
    pick = shown_value(None, page["runs.pick"])
    assert pick == "newest-broken"
    # the timer's tick (its first one relists) and Refresh read the menu now ...
    ticked = ui.tick(studio, {"page.state": PageState(), "train.seen": {"version": -1, "state": ""},
                              "preview.uncorrected": False, "runs.pick": pick})
    refreshed = runs.view(studio, pick)
    # ... the person picks the finished run before they land; it stays picked
    for update in (ticked["runs.pick"], refreshed["runs.pick"]):
        assert shown_value("finished-one", update) == "finished-one"
        assert list(update.constructor_args["choices"]) == names  # the list itself is new
    # a menu on a run that is gone (or none) is set to the newest
    assert shown_value("deleted", runs.view(studio, "deleted")["runs.pick"]) == "newest-broken"


def test_the_queue_menu_takes_a_job_that_left_the_queue_and_remove_says_so_in_words(studio):
    """The timer reads the queue's menu every second while the queue changes on the server: a job id that has just
    started (or was removed) must reach the handlers, which say what happened, not be refused by gradio's check."""
    from app.steps import queue as queue_steps
    from app.ui import build

    page = build(studio)
    assert page.emloc_manager["queue.pick"].preprocess("started-meanwhile") == "started-meanwhile"
    with pytest.raises(ValueError, match="no longer waiting"):
        queue_steps.remove(studio, {"queue.pick": "started-meanwhile"})
    assert queue_steps.view(studio)["queue.table"] == queue_steps.EMPTY


def test_without_a_gpu_a_card_preset_plans_for_that_card_and_this_machine_plans_the_cpu_again(monkeypatch):
    """Issue 29: the presets show without a GPU too; a card is planned as the GPU it is (its budget shown, the
    plan says it is for that card), "This machine" plans this CPU's RAM again. With a GPU: only the cards."""
    from app import restore

    flux_dev = "black-forest-labs/FLUX.1-dev"
    monkeypatch.setattr(handlers, "available_ram_gib", lambda: 20.0)
    assert plans.preset_choices("cpu")[0][1] == plans.HERE
    assert plans.HERE not in dict(plans.preset_choices("cuda")).values()
    v = {"model.model": flux_dev, "budget.budget": 24, "budget.ratio": 0.5, "budget.rank": 16, "budget.ram": 20.0,
         "budget.touched": False, "page.state": PageState(device="cpu"), "budget.batch_size": 1,
         "budget.emulator_kind": "auto", "budget.for_card": False, "budget.presets": "8", "budget.ram_touched": False}
    out = budget.use_preset(None, v)
    assert out["budget.for_card"] is True and out["budget.budget"].visible and out["budget.budget"].value == 8
    assert out["budget.ram"] == 16.0  # the card's typical RAM (16), at most what is free here (20)
    card = plans.memory_plan(flux_dev, 8, None, 16, ram_gb=16.0)  # a GPU plan: the card's memory
    assert out["budget.recommended"] == card["recommended"] and out["budget.ratio"] == card["recommended"]
    assert out["budget.text"].startswith("**Planned for an 8 GB card** (GPU memory budget 8 GiB, RAM budget 16 GiB)")
    assert "a run started here trains on its CPU" in out["budget.text"]
    changed = {**v, "budget.budget": 8, "budget.ram": 16.0, "budget.for_card": True, "budget.rank": 8}  # still the card
    assert budget.plan_view(changed)["budget.recommended"] == plans.memory_plan(flux_dev, 8, None, 8,
                                                                                ram_gb=16.0)["recommended"]
    here = budget.use_preset(None, {**changed, "budget.presets": plans.HERE})
    cpu = plans.memory_plan(flux_dev, 8, None, 8, ram_gb=20.0, device="cpu")  # what is free here again
    assert here["budget.for_card"] is False and not here["budget.budget"].visible
    assert here["budget.recommended"] == cpu["recommended"] and "Planned for" not in here["budget.text"]
    assert cpu["recommended"] != card["recommended"]  # the two plans differ: the test can tell them apart
    # a reload on this machine keeps planning for the card, its budget shown
    record = {"state": PageState(device="cpu").saved(), "step": 2,
              "form": {"model.task": "images", "model.model": flux_dev, "budget.budget": 8, "budget.ram": 16.0,
                       "budget.ratio": card["recommended"], "budget.rank": 16, "budget.batch_size": 1,
                       "budget.touched": False, "budget.ram_touched": False, "budget.presets": "8",
                       "budget.for_card": True, "budget.emulator_kind": "auto"}}
    back = restore.restore(Studio(Path(tempfile.mkdtemp())), record, "cpu")
    assert back["budget.budget"].visible and back["budget.presets"].value == "8"
    assert back["budget.text"].startswith("**Planned for an 8 GB card**")
