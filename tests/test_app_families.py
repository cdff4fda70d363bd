"""Every registered backend (FLUX.1, FLUX.2, InternVL) taken through the app's step handlers end to end on a tiny
model, as the page calls them (values by "step.element"), without a browser: model -> data -> budget -> train (its
own process) -> previews (a new prompt or question) -> export."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
from flux2_fixtures import save_tiny_klein
from flux_fixtures import save_tiny_flux, write_subject_images
from vlm_fixtures import save_tiny_internvl, write_colour_images

from app import families, results
from app.page import PageState
from app.steps import data, export, preview, train
from app.studio import Studio
from app.ui import choose_model, tick

FAST = {"train.steps": 3, "train.lr": 1e-3, "train.calibration_samples": 4, "train.checkpoint_every": 2,
        "train.resolution": 32, "train.preview_steps": 2, "train.max_sequence_length": 32, "train.max_new_tokens": 3,
        "train.sample_prompts": ""}  # (the page always sends the box, empty or not)
NEW_PROMPT = "a photo of sks dog in the snow on a beach, far away"  # longer than the file names keep


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    models = {"flux": save_tiny_flux(root / "flux1"), "flux2": save_tiny_klein(root / "klein", distilled=True),
              "vlm": save_tiny_internvl(root / "internvl")}
    photos = write_subject_images(root / "photos", count=4)
    qa_rows = write_colour_images(root / "qa")
    return {"models": models, "photos": photos, "qa": [(root / "qa" / i, q, a) for i, q, a in qa_rows],
            "studio": Studio(root / "runs", {"flux": models["flux"], "vlm": models["vlm"]})}


def page_values(state: PageState, model: Path) -> dict:
    return {"page.state": state, "model.model": str(model), "data.prompt": "", "data.trigger": "sks",
            "data.captions": None, "data.qa_table": None, "budget.budget": 24, "budget.ratio": 0.45,
            "budget.rank": 4, "budget.ram": 8.0, "budget.touched": False, "budget.batch_size": 1,
            "budget.ram_touched": False, "preview.uncorrected": False, "runs.pick": None,
            "train.seen": {"version": -1, "state": ""}}


def test_the_registered_backends_declare_what_the_app_asks():
    for name, (display, kind, shown) in {"flux": ("FLUX.1", "images", "images"),
                                         "flux2": ("FLUX.2", "images", "images"),
                                         "vlm": ("InternVL", "qa", "answers")}.items():
        cls = families.backend_type(name)
        assert (cls.display_name, cls.data_kind, cls.preview_kind) == (display, kind, shown)
    assert families.tasks() == {"images": "Personalise an image model (FLUX.1, FLUX.2)",
                                "qa": "Teach a vision-language model (InternVL)"}


@pytest.mark.parametrize("backend", ["flux", "flux2", "vlm"])
def test_each_family_goes_from_model_to_export_through_the_step_handlers(world, backend):
    studio, model = world["studio"], world["models"][backend]
    kind = families.backend_type(backend).data_kind
    v = page_values(PageState().switch_task(kind), model)
    chosen = choose_model(studio, v)  # step 1: what it is, and the later steps' starting values
    assert families.backend_type(backend).display_name in chosen["model.about"]
    assert chosen["budget.chart"] and "Recommended ratio" in chosen["budget.text"]
    v.update({k: val for k, val in chosen.items() if k.startswith("train.") and not hasattr(val, "visible")})
    v["data.prompt"] = chosen.get("data.prompt", "a photo of sks dog")
    assert v["data.prompt"] == "a photo of sks dog"  # a model that is not the demo: the usual example
    files = [str(p) for p in world["photos"]] if kind == "images" else [str(p) for p, _, _ in world["qa"]]
    added = data.upload(studio, {**v, "upload": files})  # step 2
    v["page.state"] = added["page.state"]
    if kind == "qa":
        v["data.qa_table"] = [[Path(p).name, q, a] for p, q, a in world["qa"]]
    checked = data.go_budget(studio, v)
    assert checked["data.msg"].startswith("✓") and "budget.ram" in checked  # the RAM is read as the step opens
    v.update(FAST)
    if kind == "qa":
        v["train.calibration_samples"] = 8  # InternVL calibrates on 8 to 64 samples
    v["train.name"] = f"{backend}-run"
    started = train.start(studio, v)
    v["page.state"] = started["page.state"]
    status = studio.jobs.wait(timeout=600)
    assert status.state == "done", status.error
    shown = tick(studio, v)  # the timer: the run ended, the previews and the files are shown
    assert "finished" in shown["train.status"] and len(shown["train.loss_plot"]) == 3
    if kind == "images":
        assert len(shown["preview.gallery"].value or []) == 3  # base | emulator + LoRA | full + corrected
        assert shown["preview.seeds"].visible  # FLUX.2 previews as FLUX.1 does: images and seeds
    else:
        assert shown["preview.answers"].visible and not shown["preview.seeds"].visible
    # step 5: a new prompt (images) or question (answers), honoured
    v.update({"preview.ask": NEW_PROMPT if kind == "images" else "What colour is this?", "preview.seeds": "1000-1001",
              "preview.ask_image": None, "preview.ask_upload": None})
    assert "Rendering previews" in preview.render(studio, v)["preview.msg"]
    status = studio.jobs.wait(timeout=600)
    assert status.state == "done", status.error
    after = tick(studio, {**v, "train.seen": shown["train.seen"]})
    assert len(after["train.loss_plot"]) == 3  # the curve stays on the Train step after a preview job
    view = preview.view(studio, v["page.state"].run_dir, False)
    if kind == "images":
        captions = [item["caption"] for item in view["preview.gallery"].value]
        assert len(captions) == 6 and captions[0].endswith("seed 1000") and captions[3].endswith("seed 1001")
        assert f"“{NEW_PROMPT}”" in view["preview.text"]
    else:
        assert view["preview.answers"].value["data"][0][0] == "What colour is this?"
    files = export.view(studio, v["page.state"].run_dir)  # step 6
    names = zipfile.ZipFile(files["export.download"]).namelist()
    assert "corrected/adapter_model.safetensors" in names
    if kind == "images":  # the file the snippet loads is on the page and in the zip
        assert "diffusers/pytorch_lora_weights.safetensors" in names and "For diffusers" in files["export.text"]
        assert "pytorch_lora_weights.safetensors" in files["export.text"] and "load_lora_weights" in files["export.snippet"]
    assert results.run_info(v["page.state"].run_dir)["backend"] == backend
