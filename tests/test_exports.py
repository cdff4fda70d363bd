"""What an export says about its run (issue 29 item 7): the trigger word, prompts, base model and settings in every
file's metadata and in model cards, a README.md in the zip, and any kept checkpoint's adapter corrected for the full
model exactly as the final one is."""

from __future__ import annotations

import json
import shutil
import zipfile

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import emloc
from flux_fixtures import save_tiny_flux, write_subject_images
from pipelines.flux.backend import FluxSettings
from pipelines.runner import Run, RunSettings, stages
from pipelines.runner.exports import export_checkpoint, export_zip, kept_steps


@pytest.fixture(scope="module")
def flux_run(tmp_path_factory):
    """A finished tiny FLUX.1 run of 3 steps with a checkpoint every step (the last two kept) and two captions."""
    root = tmp_path_factory.mktemp("exports")
    model = save_tiny_flux(root / "tiny-flux")
    photos = write_subject_images(root / "dog", count=3, seed=4)
    photos[0].with_suffix(".txt").write_text("a photo of sks dog on grass")
    run = Run.create(root / "runs" / "flux-export", "flux",
                     RunSettings(model=str(model), ratio=0.5, calibration_samples=2, steps=3, lr=1e-2, rank=4,
                                 device="cpu", checkpoint_every=1, sample_every=0, ram_gb=1000.0),
                     FluxSettings(images=str(root / "dog"), prompt="a photo of sks dog", resolution=32,
                                  max_sequence_length=16, preview_steps=1))
    run.execute()
    return run


def metadata(path) -> dict:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def test_every_exported_file_carries_the_trigger_word_prompts_model_and_settings(flux_run):
    lora = flux_run.output("correct")
    files = sorted(lora.rglob("*.safetensors"))
    assert {p.parent.name for p in files} == {"corrected", "uncorrected", "diffusers", "diffusers-uncorrected", "kohya"}
    for path in files:
        meta = metadata(path)
        assert meta["emloc_trigger_word"] == "sks" and meta["modelspec.trigger_phrase"] == "sks"
        assert meta["emloc_instance_prompt"] == "a photo of sks dog" == meta["modelspec.usage_hint"]
        assert set(json.loads(meta["emloc_training_prompts"])) == {"a photo of sks dog", "a photo of sks dog on grass"}
        assert meta["emloc_base_model"] == flux_run.settings.model
        assert (meta["emloc_ratio"], meta["emloc_rank"], meta["emloc_lambda"], meta["emloc_step"]) == ("0.5", "4", "3.0",
                                                                                                        "3")
        assert meta["emloc_corrected"].startswith("no" if "uncorrected" in path.parent.name else "yes")
    kohya = metadata(next(lora.glob("kohya/*.safetensors")))
    assert json.loads(kohya["ss_tag_frequency"])["img"]["sks"] == 2  # both training prompts hold the trigger word
    assert (kohya["ss_network_module"], kohya["ss_network_dim"], kohya["ss_max_train_steps"]) == (
        "networks.lora_flux", "4", "3")
    assert kohya["ss_sd_model_name"] == flux_run.settings.model and kohya["ss_resolution"] == "(32, 32)"
    assert "ss_tag_frequency" not in metadata(lora / "corrected" / "adapter_model.safetensors")  # kohya's keys: kohya's file
    card = (lora / "corrected" / "README.md").read_text()
    assert card.startswith(f"---\nbase_model: {flux_run.settings.model}\nlibrary_name: peft")
    assert "Trigger word: **sks**" in card and 'instance_prompt: "a photo of sks dog"' in card
    assert "corrected for the full model" in card


def test_the_zip_has_a_readme_saying_what_each_file_is_and_how_to_load_it(flux_run):
    snippet = flux_run.backend.export_snippet(flux_run.output("correct"), flux_run.info.get("plan"))
    path = export_zip(flux_run, None, snippet)
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        readme = archive.read("README.md").decode()
    assert {"README.md", "corrected/adapter_model.safetensors", "kohya/flux_lora_kohya.safetensors",
            "diffusers/pytorch_lora_weights.safetensors"} <= names
    assert "Trigger word: **sks**" in readme and flux_run.settings.model in readme
    for folder in ("corrected/", "uncorrected/", "diffusers/", "kohya/"):
        assert f"**{folder}**" in readme
    assert "models/loras/" in readme and "load_lora_weights" in readme and snippet.strip() in readme


def test_a_kept_checkpoint_is_corrected_for_the_full_model_as_the_final_adapter_is(flux_run, tmp_path):
    assert kept_steps(flux_run) == [2, 3]
    # the final checkpoint through the checkpoint path gives the very adapters of lora/
    state, config = emloc.read_adapter(flux_run.output("train"))
    again = tmp_path / "again"
    again.mkdir()
    final = load_file(str(flux_run.dir / "checkpoints" / "step-000003" / "adapter.safetensors"))
    for key, tensor in state.items():
        torch.testing.assert_close(final[key], tensor, atol=0, rtol=0)
    stages.correct_adapter(flux_run, final, config, again)
    made = load_file(str(flux_run.output("correct") / "corrected" / "adapter_model.safetensors"))
    for key, tensor in load_file(str(again / "corrected" / "adapter_model.safetensors")).items():
        torch.testing.assert_close(tensor, made[key], atol=0, rtol=0)
    # an intermediate checkpoint: its own adapter, corrected, with its step in every file
    folder = export_checkpoint(flux_run, 2)
    assert folder == flux_run.dir / "exports" / "step-000002"
    trained = load_file(str(flux_run.dir / "checkpoints" / "step-000002" / "adapter.safetensors"))
    uncorrected = load_file(str(folder / "uncorrected" / "adapter_model.safetensors"))
    corrected = load_file(str(folder / "corrected" / "adapter_model.safetensors"))
    assert uncorrected.keys() == trained.keys()
    for key in trained:
        torch.testing.assert_close(uncorrected[key], trained[key], atol=0, rtol=0)
    assert any(not torch.equal(corrected[k], made[k]) for k in made)  # step 2's LoRA, not the final one
    assert all(metadata(p)["emloc_step"] == "2" for p in folder.rglob("*.safetensors"))
    assert (folder / "kohya" / "flux_lora_kohya.safetensors").is_file()
    with zipfile.ZipFile(export_zip(flux_run, 2)) as archive:
        assert "adapters of step 2" in archive.read("README.md").decode()


def test_a_checkpoint_without_its_emulator_says_only_the_uncorrected_lora_is_there(flux_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(flux_run.dir, copy, ignore=shutil.ignore_patterns("exports", "export"))
    shutil.rmtree(copy / "emulator")
    with pytest.raises(FileNotFoundError, match="only the uncorrected emulator LoRA is available"):
        export_checkpoint(Run.open(copy), 2)
    with pytest.raises(FileNotFoundError, match=r"keeps no checkpoint of step 1 \(kept: 2, 3\)"):
        export_checkpoint(Run.open(copy), 1)


def test_an_internvl_export_carries_its_model_and_settings_and_one_readme(tmp_path):
    from pipelines.internvl.backend import VlmSettings
    from vlm_fixtures import save_tiny_internvl, write_colour_csv

    model = save_tiny_internvl(tmp_path / "tiny-internvl")
    write_colour_csv(tmp_path / "colours")
    run = Run.create(tmp_path / "runs" / "vlm", "vlm",
                     RunSettings(model=str(model), ratio=0.5, calibration_samples=8, steps=2, rank=4, lr=3e-3,
                                 device="cpu", sample_every=0, ram_gb=1000.0),
                     VlmSettings(data=str(tmp_path / "colours" / "qa.csv"), max_new_tokens=3, preview_samples=2))
    run.execute(["calibrate", "emulate", "train", "correct"])
    meta = metadata(run.output("correct") / "corrected" / "adapter_model.safetensors")
    assert meta["emloc_base_model"] == str(model) and meta["emloc_rank"] == "4" and meta["emloc_family"] == "InternVL"
    assert "emloc_trigger_word" not in meta and "modelspec.trigger_phrase" not in meta  # no trigger word to tell
    card = (run.output("correct") / "corrected" / "README.md").read_text()
    assert card.startswith(f"---\nbase_model: {model}\nlibrary_name: peft") and "PeftModel.from_pretrained" in card
    with zipfile.ZipFile(export_zip(run, None, "print('the snippet')")) as archive:
        names = archive.namelist()
        assert names.count("README.md") == 1 and "corrected/adapter_model.safetensors" in names
        assert "print('the snippet')" in archive.read("README.md").decode()


def test_launch_preview_and_export_refuse_in_the_same_words(flux_run, tmp_path, monkeypatch, capsys):
    """`launch.py preview` and `launch.py export` share their error handling: a missing run folder, a bad value and a
    full disk are each one `error:` line (exit 2), never a traceback, and nothing is written."""
    import errno

    from pipelines.runner import cli, exports

    missing = str(tmp_path / "no-such-run")
    assert cli.preview(["--run", missing]) == 2
    said = capsys.readouterr().err
    assert cli.export(["--run", missing]) == 2
    assert capsys.readouterr().err == said and said.startswith("error: ") and "no-such-run" in said
    assert cli.export(["--run", str(flux_run.dir), "--step", "1"]) == 2
    assert capsys.readouterr().err == "error: --step 1: flux-export keeps checkpoints of steps 2, 3\n"
    before = sorted(p.name for p in flux_run.dir.iterdir())
    full = OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Run, "preview", lambda *args, **kwargs: (_ for _ in ()).throw(full))
    monkeypatch.setattr(exports, "export_zip", lambda *args, **kwargs: (_ for _ in ()).throw(full))
    for command in (cli.preview, cli.export):
        assert command(["--run", str(flux_run.dir)]) == 2
        assert capsys.readouterr().err == ("error: the disk is full ([Errno 28] No space left on device); fix that "
                                           "and try again\n")
    assert sorted(p.name for p in flux_run.dir.iterdir()) == before
