"""The FLUX backend end to end on a tiny pipeline saved like a real checkpoint and loaded back."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from flux_fixtures import save_tiny_flux, write_subject_images
from pipelines.runner import cli
from pipelines.flux.backend import FluxSettings
from pipelines.runner import STAGES, Run, RunSettings

pytestmark = pytest.mark.slow  # 14 tests, most of them FLUX runs: ~35 s (125-210 s before; torchrun: test_multiprocess)


FAST = ["--resolution", "32", "--max-sequence-length", "16", "--rank", "4", "--alpha", "8",
        "--calibration-samples", "4", "--preview-steps", "2", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"dev": save_tiny_flux(root / "tiny-flux-dev", guidance=True),
            "schnell": save_tiny_flux(root / "tiny-flux-schnell", guidance=False)}


@pytest.fixture(scope="module")
def finished_run(models, tmp_path_factory):
    """A whole headless run of the [dev]-style model on four images (one with its own caption)."""
    root = tmp_path_factory.mktemp("flow")
    images = write_subject_images(root / "dog", count=4)
    images[1].with_suffix(".txt").write_text("a photo of sks dog on grass")
    out = root / "runs" / "my-dog"
    start = time.monotonic()
    code = cli.main(["--backend", "flux", "--model", str(models["dev"]), "--images", str(root / "dog"),
                     "--prompt", "a photo of sks dog", "--ratio", "0.45", "--steps", "6", "--checkpoint-every", "3",
                     "--random-flip", "--preview-seed", "0", "--preview-seed", "1", "--quiet", "--out", str(out), *FAST])
    return out, code, time.monotonic() - start, root


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_whole_flow_runs_headless_on_four_images_in_under_a_minute(finished_run):
    out, code, seconds, _ = finished_run
    assert code == 0
    assert seconds < 60, f"the tiny flow took {seconds:.1f} s"
    info = json.loads((out / "run.json").read_text())
    assert [info["stages"][s]["status"] for s in STAGES] == ["done"] * 5
    assert info["versions"]["diffusers"] and info["settings"]["backend"]["prompt"] == "a photo of sks dog"
    assert sorted(p.name for p in (out / "data").iterdir()) == ["dog_0.png", "dog_1.jpg", "dog_1.txt", "dog_2.png", "dog_3.jpg"]
    cache = json.loads((out / "cache" / "cache.json").read_text())
    assert cache["texts"] == ["a photo of sks dog", "a photo of sks dog on grass"] and cache["views"] == 2
    losses = [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses] == list(range(1, 7)) and all(r["loss"] > 0 for r in losses)
    report = json.loads((out / "emulator" / "report.json").read_text())
    names = [layer["name"] for layer in report["layers"]]
    assert any(n.startswith("transformer_blocks.") for n in names)
    assert any(n.startswith("single_transformer_blocks.") for n in names)
    assert all(n.startswith(("transformer_blocks.", "single_transformer_blocks.")) for n in names)
    assert all(layer["activation_aware"] for layer in report["layers"])
    grid = Image.open(out / "previews" / "grid.png")
    assert grid.width == 4 * 160 and grid.height > 2 * 160  # four labelled columns, two seeds
    assert len(list((out / "previews").glob("*__seed*.png"))) == 8


def test_exported_lora_is_diffusers_format_and_loads_in_flux_pipeline(finished_run, models):
    from diffusers import FluxPipeline

    import emloc

    out = finished_run[0]
    keys = load_file(str(out / "lora" / "diffusers" / "pytorch_lora_weights.safetensors")).keys()
    assert keys and all(k.startswith("transformer.") and "base_model" not in k for k in keys)
    assert any(".single_transformer_blocks.0.proj_mlp.lora_A.weight" in k for k in keys)
    assert any(".transformer_blocks.1.attn.add_k_proj.lora_B.weight" in k for k in keys)
    assert (out / "lora" / "diffusers-uncorrected" / "pytorch_lora_weights.safetensors").is_file()
    kohya = load_file(str(out / "lora" / "kohya" / "flux_lora_kohya.safetensors"))  # test_flux_kohya.py checks it
    assert "lora_unet_single_blocks_1_linear1.lora_up.weight" in kohya

    torch.manual_seed(0)
    inputs = {"hidden_states": torch.randn(1, 16, 16), "encoder_hidden_states": torch.randn(1, 8, 32),
              "pooled_projections": torch.randn(1, 32), "timestep": torch.tensor([0.6]),
              "guidance": torch.tensor([3.5]), "img_ids": torch.rand(16, 3), "txt_ids": torch.zeros(8, 3),
              "return_dict": False}
    pipe = FluxPipeline.from_pretrained(str(models["dev"]), dtype=torch.float32)
    with torch.no_grad():
        base = pipe.transformer(**inputs)[0]
        pipe.load_lora_weights(str(out / "lora" / "diffusers"), weight_name="pytorch_lora_weights.safetensors")
        with_diffusers = pipe.transformer(**inputs)[0]
        peft_full = emloc.load_adapter(Run.open(out).backend.load_model(torch.device("cpu")), out / "lora" / "corrected")
        with_peft = peft_full(**inputs)[0]
    # The diffusers file means exactly what the PEFT adapter means (scaling folded into lora_B) ...
    torch.testing.assert_close(with_diffusers, with_peft, rtol=1e-4, atol=1e-5)
    # ... and it changes the model.
    assert (with_diffusers - base).abs().max() > 1e-4


def test_crash_mid_training_resumes_to_the_same_adapter(models, tmp_path):
    write_subject_images(tmp_path / "dog", count=3, seed=1)
    settings = RunSettings(model=str(models["schnell"]), ratio=0.5, steps=6, rank=4, alpha=8, lr=1e-3,
                           checkpoint_every=2, calibration_samples=3, seed=5)
    flux = FluxSettings(images=str(tmp_path / "dog"), prompt="sks dog", resolution=32, max_sequence_length=16)
    stages = ["calibrate", "emulate", "train"]
    whole = Run.create(tmp_path / "runs" / "whole", "flux", settings, flux)
    whole.execute(stages)

    crashed = Run.create(tmp_path / "runs" / "crashed", "flux", settings, flux)

    def crash(event):
        if event.stage == "train" and event.step == 5:
            raise RuntimeError("simulated power cut")
    crashed.callbacks.append(crash)
    with pytest.raises(RuntimeError, match="power cut"):
        crashed.execute(stages)
    assert not (crashed.dir / "adapter-emulator").exists()
    assert json.loads((crashed.dir / "run.json").read_text())["stages"]["train"]["status"] == "failed"
    resumed = Run.open(crashed.dir)
    steps = []
    resumed.callbacks.append(lambda e: steps.append(e.step) if e.loss is not None else None)
    resumed.execute(stages)
    assert steps == [5, 6]  # started from the checkpoint at step 4
    expected = load_file(str(whole.dir / "adapter-emulator" / "adapter_model.safetensors"))
    got = load_file(str(crashed.dir / "adapter-emulator" / "adapter_model.safetensors"))
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6)


def test_a_second_run_does_not_touch_the_first(finished_run, models):
    out, _, _, root = finished_run
    before = snapshot(out)
    second = root / "runs" / "second"
    code = cli.main(["--backend", "flux", "--model", str(models["dev"]), "--images", str(root / "dog"),
                     "--prompt", "a photo of sks dog", "--steps", "2", "--stages", "calibrate", "emulate", "train",
                     "--quiet", "--out", str(second), *FAST])
    assert code == 0 and (second / "adapter-emulator" / "adapter_model.safetensors").is_file()
    assert cli.main(["--backend", "flux", "--model", str(models["dev"]), "--images", str(root / "dog"),
                     "--prompt", "a photo of sks dog", "--out", str(out), *FAST]) == 2  # same name: refused
    assert snapshot(out) == before


def _bad_folder(kind: str, folder: Path) -> tuple[Path, str]:
    """An image folder with one kind of problem, and the prompt to use."""
    folder.mkdir(parents=True)
    prompt = "a photo of sks dog"
    if kind == "no images":
        (folder / "notes.txt").write_text("nothing here")
        return folder, prompt
    write_subject_images(folder, count=3)
    if kind == "corrupt file":
        good = folder / "dog_0.png"
        good.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "1x1 image":
        Image.new("RGB", (1, 1), "red").save(folder / "tiny.png")
    elif kind == "text named .png":
        (folder / "notes.png").write_text("this is not an image")
    elif kind == "prompt without trigger":
        prompt = "a photo of my dog"
    elif kind == "too many images":
        write_subject_images(folder / "more", count=1)
        for index in range(48):
            (folder / f"copy_{index}.png").write_bytes((folder / "more" / "dog_0.png").read_bytes())
    return folder, prompt


@pytest.mark.parametrize("kind, message", [
    ("no images", "found no images"),
    ("corrupt file", "dog_0.png: the image is damaged"),
    ("1x1 image", "tiny.png: 1x1 pixels is too small"),
    ("text named .png", "notes.png: not a readable JPEG, PNG or WebP image"),
    ("prompt without trigger", "does not contain the trigger word 'sks'"),
    ("too many images", "found 51 images"),
])
def test_bad_data_gives_a_clear_error_and_leaves_no_run_folder(kind, message, models, tmp_path, capsys):
    folder, prompt = _bad_folder(kind, tmp_path / "images")
    runs = tmp_path / "runs"
    (runs / "earlier").mkdir(parents=True)
    (runs / "earlier" / "run.json").write_text("{}")
    code = cli.main(["--backend", "flux", "--model", str(models["schnell"]), "--images", str(folder),
                     "--prompt", prompt, "--out", str(runs / "bad"), *FAST])
    assert code == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in runs.iterdir()) == ["earlier"]  # nothing half-made, the earlier run untouched
    assert (runs / "earlier" / "run.json").read_text() == "{}"


def test_preview_later_renders_new_prompts_and_seeds(finished_run, capsys):
    out = finished_run[0]
    code = cli.preview(["--run", str(out), "--prompt", "a photo of sks dog on the beach", "--seed", "3",
                        "--name", "beach"])
    assert code == 0, capsys.readouterr().err
    files = sorted(p.name for p in (out / "beach").iterdir())
    assert "grid.png" in files and len([f for f in files if f.endswith("__seed3.png")]) == 4
    assert all("on-the-beach" in f for f in files if f != "grid.png")
    assert json.loads((out / "run.json").read_text())["settings"]["backend"]["preview_seeds"] == [0, 1]  # unchanged


def test_offloaded_calibration_streams_layers_and_gives_the_same_statistics(models, tmp_path):
    write_subject_images(tmp_path / "dog", count=3, seed=4)
    flux = FluxSettings(images=str(tmp_path / "dog"), prompt="sks dog", resolution=32, max_sequence_length=16)
    stats = {}
    for offload in (False, True):
        settings = RunSettings(model=str(models["dev"]), ratio=0.5, calibration_samples=3, offload=offload,
                               keep_statistics=True)  # the two-step path: statistics of every layer at once
        run = Run.create(tmp_path / "runs" / f"offload-{offload}", "flux", settings, flux)
        run.execute(["calibrate"])
        stats[offload] = load_file(str(run.dir / "calibration" / "stats.safetensors"))
    assert stats[True].keys() == stats[False].keys() and len(stats[True]) > 0
    for key in stats[False]:
        torch.testing.assert_close(stats[True][key], stats[False][key], rtol=1e-6, atol=1e-6)


def test_streamed_run_builds_the_emulator_the_two_step_run_builds(models, tmp_path):
    """The default run reads the transformer block by block from its files; keeping the statistics switches
    to the two-step path (whole model, every layer's Σ xᵀx). Both give the same emulator and the same
    corrected LoRA; only the two-step run's folder holds statistics."""
    write_subject_images(tmp_path / "dog", count=3, seed=4)
    flux = FluxSettings(images=str(tmp_path / "dog"), prompt="sks dog", resolution=32, max_sequence_length=16)
    reports, adapters = {}, {}
    for keep in (False, True):
        # the modulation layers read the time embedding, one vector per sample: with 3 samples their Σ xᵀx is
        # rank 3 and the emulator in its null space is set by float rounding; the rest is well determined
        settings = RunSettings(model=str(models["dev"]), ratio=0.5, calibration_samples=3, steps=2,
                               keep_statistics=keep, device="cpu", rules=[
                                   r"(transformer_blocks|single_transformer_blocks)\.\d+\.(attn|ff|ff_context)\..+=0.5",
                                   r"single_transformer_blocks\.\d+\.(proj_mlp|proj_out)=0.5"])
        run = Run.create(tmp_path / "runs" / f"keep-{keep}", "flux", settings, flux)
        run.execute(["calibrate", "emulate", "train", "correct"])
        reports[keep] = json.loads((run.dir / "emulator" / "report.json").read_text())
        adapters[keep] = load_file(str(run.dir / "lora" / "corrected" / "adapter_model.safetensors"))
        assert (run.dir / "calibration" / "stats.safetensors").exists() == keep
    assert reports[False]["fingerprint"] == reports[True]["fingerprint"]
    for streamed, whole in zip(reports[False]["layers"], reports[True]["layers"]):
        assert streamed["rank"] == whole["rank"]
        assert abs(streamed["error"] - whole["error"]) <= 1e-4 * max(whole["error"], 1.0), streamed["name"]  # relative errors: O(1)
    assert adapters[False].keys() == adapters[True].keys()
    for key in (k for k in adapters[True] if ".lora_A." in k):  # ΔW = B A (A' = Pᵀ is defined up to signs)
        b = key.replace(".lora_A.", ".lora_B.")
        delta = {keep: adapters[keep][b] @ adapters[keep][key] for keep in (False, True)}
        gap = float((delta[False] - delta[True]).norm() / delta[True].norm().clamp_min(1e-12))
        assert gap < 1e-2, (key, gap)  # the text stream sees one 16-token prompt in 32 dims: rank-deficient too


def test_previews_streamed_from_the_files_equal_previews_of_the_loaded_model(models, tmp_path):
    """Below the memory budget the full model's previews read it block by block, the LoRA added to its layers'
    outputs as they run; with the model offloaded (read once into host RAM, each block moved to the device as it
    runs, the next one read ahead) the same. Both give the images of the loaded model with the PEFT adapter."""

    import numpy as np

    from pipelines.runner import variants

    write_subject_images(tmp_path / "dog", count=3, seed=4)
    flux = FluxSettings(images=str(tmp_path / "dog"), prompt="sks dog", resolution=32, max_sequence_length=16,
                        preview_steps=2)
    settings = RunSettings(model=str(models["dev"]), ratio=0.5, calibration_samples=2, steps=3, lr=1e-2,
                           device="cpu", ram_gb=1000.0)
    run = Run.create(tmp_path / "runs" / "preview", "flux", settings, flux)
    run.execute()
    assert variants.preview_mode(run) == "whole" and run.info["plan"]["phases"]["preview"]["mode"] == "whole"
    loaded = sorted((run.dir / "previews").glob("*.png"))
    for mode in ("files", "offload"):  # as plans under a small --ram-gb, or a small GPU with enough RAM, say
        run.info["plan"]["phases"]["preview"]["mode"] = mode
        assert variants.preview_mode(run) == mode and variants.preview_streams(run)
        other = run.preview(f"previews-{mode}")
        assert [p.name for p in loaded] == sorted(p.name for p in other.glob("*.png"))
        for path in loaded:
            a = np.asarray(Image.open(path), dtype=np.int16)
            b = np.asarray(Image.open(other / path.name), dtype=np.int16)
            assert np.abs(a - b).max() <= 2, (mode, path.name)
