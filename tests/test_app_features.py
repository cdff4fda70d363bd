"""Issue 29 items 4, 6 and 7 through the step handlers (no browser): card presets on the Budget step, seed ranges,
sample prompts and the strength grid of the Preview step, and what the Export step writes."""

from __future__ import annotations

import re
import time

import pytest

from app import handlers
from app import plan as plans
from app.page import PageState
from app.steps import budget
from pipelines.planner.planning import kind_score

FLUX_DEV = "black-forest-labs/FLUX.1-dev"


def budget_values(**changes) -> dict:
    values = {"model.model": FLUX_DEV, "budget.budget": 24, "budget.ratio": 0.5, "budget.rank": 16, "budget.ram": 20.0,
              "budget.touched": True, "page.state": PageState(device="cuda"), "budget.batch_size": 1,
              "budget.presets": "12", "budget.ram_touched": False}
    return {**values, **changes}


# ------------------------------------------------------------------------------------------ item 6: presets
def test_a_card_preset_fills_both_budgets_and_the_ratio_follows_its_recommendation(monkeypatch):
    monkeypatch.setattr(handlers, "available_ram_gib", lambda: 100.0)
    out = budget.use_preset(None, budget_values())
    assert out["budget.budget"] == 12 and out["budget.ram"] == plans.CARD_RAM[12] == 32
    assert out["budget.touched"] is False  # the slider follows the recommendation again
    alone = plans.memory_plan(FLUX_DEV, 12, None, 16, ram_gb=32)
    assert out["budget.recommended"] == alone["recommended"] and out["budget.ratio"] == alone["recommended"]
    assert f"Recommended ratio: **{alone['recommended']:.2f}**" in out["budget.text"]
    # the table says what each card means, and its 12 GB row is the plan the preset shows
    row = next(line for line in out["budget.cards"].splitlines() if line.startswith("| 12 GB"))
    assert f"**{alone['recommended']:.2f}**" in row


def test_a_preset_keeps_the_ram_budget_within_what_is_free_and_a_typed_one_stays(monkeypatch):
    monkeypatch.setattr(handlers, "available_ram_gib", lambda: 10.5)
    assert budget.use_preset(None, budget_values(**{"budget.presets": "24"}))["budget.ram"] == 10.5
    typed = budget.use_preset(None, budget_values(**{"budget.presets": "24", "budget.ram_touched": True,
                                                      "budget.ram": 48.0}))
    assert typed["budget.ram"] == 48.0 and typed["budget.budget"] == 24
    with pytest.raises(ValueError, match="not one of the presets"):
        plans.preset_budgets(10, 64)


def test_the_card_table_recommends_more_of_the_model_on_larger_cards():
    table = plans.card_table(FLUX_DEV, 16)
    rows = [(float(r), k) for r, k in re.findall(r"\| \*\*([0-9.]+)\*\* \(([a-z0-9-]+)\) \|", table)]
    assert len(rows) == len(plans.BUDGET_PRESETS)
    kept = [kind_score(k, r) for r, k in rows]  # the planner's own measure of how much of the model a run keeps
    assert kept == sorted(kept) and kept[0] < kept[-1]  # a larger card never keeps less of the model
    for card, (ratio, kind) in zip(plans.BUDGET_PRESETS, rows):
        plan = plans.memory_plan(FLUX_DEV, card, None, 16, ram_gb=plans.CARD_RAM[card])
        assert (plan["recommended"], plan["kind"]) == (ratio, kind)
    assert "LoRA (full model)" in table and "does not fit" in table  # what the same card would not do


# --------------------------------------------------------------------- item 4: strength grid, prompts, seeds
@pytest.fixture(scope="module")
def flux_run(tmp_path_factory):
    """A finished tiny FLUX.1 run (2 steps; checkpoints every step, both kept)."""
    from flux_fixtures import save_tiny_flux, write_subject_images
    from pipelines.flux.backend import FluxSettings
    from pipelines.runner import Run, RunSettings

    root = tmp_path_factory.mktemp("features")
    model = save_tiny_flux(root / "tiny-flux")
    write_subject_images(root / "dog", count=3, seed=4)
    run = Run.create(root / "runs" / "flux-grid", "flux",
                     RunSettings(model=str(model), ratio=0.5, calibration_samples=2, steps=2, lr=1e-2, device="cpu",
                                 checkpoint_every=1, sample_every=0, ram_gb=1000.0),
                     FluxSettings(images=str(root / "dog"), prompt="a photo of sks dog", resolution=32,
                                  max_sequence_length=16, preview_steps=2))
    run.execute()
    return run


def run_job_here(studio, monkeypatch):
    """Jobs run in this process, through the very `launch.py` arguments the app would start them with."""
    from pipelines.runner import cli

    def start(kind, run_dir, arguments, after=None, result=""):
        assert arguments[0] in ("preview", "export") and kind == arguments[0]
        assert getattr(cli, arguments[0])(arguments[1:]) == 0
        if after is not None:
            after()

    monkeypatch.setattr(studio.jobs, "start", start)


def test_the_preview_step_renders_a_strength_grid_of_several_prompts_and_seed_ranges(flux_run, monkeypatch):
    from app.steps import preview
    from app.studio import Studio

    studio = Studio(flux_run.dir.parent)
    run_job_here(studio, monkeypatch)
    prompts = "a photo of sks dog on the beach\na photo of sks dog in the snow"
    message = preview.render_grid(studio, {"page.state": PageState(run_dir=str(flux_run.dir)), "preview.ask": prompts,
                                           "preview.seeds": "3-4", "preview.ask_image": None,
                                           "preview.ask_upload": None, "preview.scales": "0, 0.5, 1"})
    assert "Rendering a strength grid" in message["preview.msg"]
    shown = preview.view(studio, str(flux_run.dir), False)
    gallery = shown["preview.gallery"]
    assert gallery.visible and len(gallery.value) == 2 * 2 * 3  # prompts x seeds x strengths
    captions = [item["caption"] if isinstance(item, dict) else item[1] for item in
                (gallery.value.root if hasattr(gallery.value, "root") else gallery.value)]
    assert captions[:3] == [f"{label} · seed 3 · a photo of sks dog on the beach" for label in
                            ("LoRA strength 0 (base model)", "LoRA strength 0.5", "LoRA strength 1")]
    assert captions[-1] == "LoRA strength 1 · seed 4 · a photo of sks dog in the snow"
    assert "Strength grid of" in shown["preview.text"] and "strengths 0, 0.5, 1" in shown["preview.text"]


def test_bad_strengths_and_seeds_are_said_in_the_words_of_the_preview_step(flux_run, monkeypatch):
    from app.manager import failure
    from app.steps import preview
    from app.studio import Studio

    studio = Studio(flux_run.dir.parent)
    run_job_here(studio, monkeypatch)
    values = {"page.state": PageState(run_dir=str(flux_run.dir)), "preview.ask": "", "preview.seeds": "0",
              "preview.ask_image": None, "preview.ask_upload": None, "preview.scales": "0, one"}
    with pytest.raises(ValueError) as err:
        preview.render_grid(studio, values)
    assert "LoRA strengths must be numbers" in failure(err.value) and "'one'" in failure(err.value)
    with pytest.raises(ValueError) as err:
        preview.render_grid(studio, {**values, "preview.scales": "1", "preview.seeds": "7-2"})
    assert "Seeds: the range 7-2 runs backwards; write it as 2-7" in failure(err.value)


def test_the_grids_progress_is_per_image_on_the_preview_step():
    from app.jobs import JobStatus
    from app.studio import describe_job

    status = JobStatus(kind="preview", run_dir="/runs/flux-1", state="running", stage="grid", step=5, total=12,
                       message="LoRA strength 0.5: image 5 of 12", started=time.time())
    bar = describe_job(status)["preview_progress"]
    assert "Rendering the strength grid of flux-1: LoRA strength 0.5: image 5 of 12" in bar
    assert 'value="0.417"' in bar  # 5 of 12 images
    loading = JobStatus(kind="preview", run_dir="/runs/flux-1", state="running", stage="", started=time.time(),
                        command="python launch.py preview --out /runs/flux-1 --scales 0, 1")
    bar = describe_job(loading)["preview_progress"]  # before its first image: a grid still, not "4 models"
    assert "Rendering the strength grid of flux-1: loading the models" in bar and "of 4 models" not in bar
    plain = JobStatus(kind="preview", run_dir="/runs/flux-1", state="running", stage="", started=time.time(),
                      command="python launch.py preview --out /runs/flux-1")
    assert "Rendering previews of flux-1: loading the models" in describe_job(plain)["preview_progress"]


def test_a_run_samples_the_sample_prompts_it_is_given(tmp_path):
    """--sample-prompt: each sample round renders those prompts (at the preview seeds), not the instance prompt."""
    from flux_fixtures import save_tiny_flux, write_subject_images
    from pipelines.flux.backend import FluxSettings
    from pipelines.runner import Run, RunSettings
    from pipelines.runner.stages import samples

    model = save_tiny_flux(tmp_path / "tiny-flux")
    write_subject_images(tmp_path / "dog", count=3, seed=4)
    wanted = ["a photo of sks dog on the moon", "a drawing of sks dog"]
    run = Run.create(tmp_path / "runs" / "sampled", "flux",
                     RunSettings(model=str(model), ratio=0.5, calibration_samples=2, steps=2, lr=1e-2, device="cpu",
                                 sample_every=2, ram_gb=1000.0, sample_prompts=wanted),
                     FluxSettings(images=str(tmp_path / "dog"), prompt="a photo of sks dog", resolution=32,
                                  max_sequence_length=16, preview_steps=1, preview_seeds=[0, 1]))
    run.execute(["calibrate", "emulate", "train"])
    rounds = samples(run.dir)
    assert [r.name for r in rounds] == ["step-000002", "step-000000"]
    for folder in rounds:
        names = sorted(p.name for p in folder.glob("*.png") if p.name != "grid.png")
        assert names == sorted(f"emulator-lora__{slug}__seed{seed}.png" for slug in
                               ("a-photo-of-sks-dog-on-the-moon", "a-drawing-of-sks-dog") for seed in (0, 1))
    assert "--sample-prompt 'a drawing of sks dog'" in run.info["command"]


def test_the_train_steps_sample_prompts_reach_the_run_one_per_line(flux_run, monkeypatch):
    from app import form
    from app.studio import Studio

    studio = Studio(flux_run.dir.parent)
    monkeypatch.setattr(studio.jobs, "start", lambda *args, **kwargs: None)
    photos = [{"path": str(p), "name": p.name} for p in sorted((flux_run.dir / "data").iterdir())
              if p.suffix.lower() in (".png", ".jpg", ".jpeg")]
    values = {"kind": "images", "model": flux_run.settings.model, "name": "with-samples", "images": photos,
              "prompt": "a photo of sks dog", "trigger": "sks", "captions": None, "ratio": 0.5, "rank": 4,
              "batch_size": 1, "ram_gb": 1000.0, "resolution": 32, "preview_steps": 1, "max_sequence_length": 16,
              **{n: form.run_field(n).default for n in form.TRAIN_FIELDS + form.MORE_FIELDS},
              "sample_prompts": "a photo of sks dog on the moon\n\n  a drawing of sks dog  \n"}
    folder = studio.start_run(values)
    from app import results

    settings = results.run_info(folder)["settings"]["run"]
    assert settings["sample_prompts"] == ["a photo of sks dog on the moon", "a drawing of sks dog"]
    with pytest.raises(ValueError, match="Sample prompts: 'x' is given twice"):
        studio.start_run({**values, "name": "twice", "sample_prompts": "x\nx"})


# ------------------------------------------------------------------------------------ item 7: export step
def test_the_export_step_offers_each_kept_checkpoint_and_corrects_one_on_request(flux_run, monkeypatch):
    import zipfile

    from app.jobs import JobStatus
    from app.steps import export
    from app.studio import Studio

    studio = Studio(flux_run.dir.parent)
    run_dir = str(flux_run.dir)
    final = export.view(studio, run_dir)
    assert final["export.which"].choices == [("final (step 2)", "final"), ("step 1 (not corrected yet)", "1")]
    assert "trigger word **sks**" in final["export.text"] and not final["export.correct"].visible
    with zipfile.ZipFile(final["export.download"]) as archive:
        assert "Trigger word: **sks**" in archive.read("README.md").decode()
    step = export.view(studio, run_dir, "1")
    assert step["export.correct"].visible and step["export.download"] is None
    assert "not corrected for the full model yet" in step["export.text"]
    run_job_here(studio, monkeypatch)
    values = {"page.state": PageState(run_dir=run_dir), "export.which": "1"}
    started = export.correct_checkpoint(studio, values)
    assert "Correcting step 1" in started["export.msg"]
    monkeypatch.setattr(studio.jobs, "status", lambda: JobStatus(kind="export", run_dir=run_dir, state="done"))
    shown = export.follow(studio, values)
    assert "Step 1 is corrected" in shown["export.msg"] and not shown["export.timer"].active
    assert ("step 1", "1") in shown["export.which"].choices and shown["export.which"].value == "1"
    assert "Step 1**, corrected for the full model" in shown["export.text"] and "**kohya/**" in shown["export.text"]
    assert "exports/step-000001/diffusers" in shown["export.snippet"]
    with zipfile.ZipFile(shown["export.download"]) as archive:
        assert "adapters of step 1" in archive.read("README.md").decode()
    with pytest.raises(ValueError, match="choose a checkpoint in the menu first"):
        export.correct_checkpoint(studio, {**values, "export.which": "final"})
