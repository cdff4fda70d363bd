"""Every run records the `launch.py train ...` command that makes it again headless, and that command works."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from app import form
from app.steps.train import train_view
from app.studio import Studio
from flux_fixtures import save_tiny_flux, write_subject_images
from pipelines.flux.backend import FluxSettings
from pipelines.runner import Run, RunSettings
from pipelines.runner.command import settings_arguments

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(steps=3, lr=1e-3, rank=4, calibration_samples=3, checkpoint_every=2, resolution=32, preview_steps=1,
            max_sequence_length=16, seed=7)


def run_recorded(command: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """The recorded line as a user would paste it in the project folder (python = this interpreter).

    It runs in this process's environment, as the app's job did (app/jobs.py starts `launch.py` with it): so on as
    many threads as that job, since a CPU matmul sums in a different order on another thread count, and three Adam
    steps carry that last-bit difference into the adapter.
    """
    argv = shlex.split(command)
    assert argv[:3] == ["python", "launch.py", "train"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def same_tensors(a: Path, b: Path) -> None:
    expected, got = load_file(str(a)), load_file(str(b))
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6)


@pytest.mark.slow  # two FLUX runs, one of them a subprocess: 111 s (loaded 2-core machine)
def test_the_command_the_app_recorded_makes_the_same_adapter_from_the_runs_data_copy(tmp_path):
    model = save_tiny_flux(tmp_path / "tiny-flux")
    photos = write_subject_images(tmp_path / "upload", count=3)
    studio = Studio(tmp_path / "runs", {"flux": model})
    folder = Path(studio.start_run({  # what the wizard's Start sends, by name
        **form.defaults("flux", 1e5), "kind": "images", "model": str(model), "name": "dog", "ratio": 0.45,
        "images": [{"path": str(p), "name": p.name} for p in photos], "prompt": "a photo of sks dog", "trigger": "sks",
        "captions": [["dog_1.jpg", "a photo of sks dog on grass"]], **FAST}))
    assert studio.jobs.wait(timeout=300).state == "done"
    command = json.loads((folder / "run.json").read_text())["command"]
    assert f"--images {folder / 'data'}" in command and "--seed 7" in command and "--steps 3" in command
    assert f"--out {folder}-again" in command
    # the Train step shows it
    shown = train_view(studio, str(folder))["text"]
    assert command in shown and "from a terminal" in shown

    shutil.rmtree(tmp_path / "upload")  # the uploads are long gone; the run's own copy is what the command reads
    done = run_recorded(command)
    assert done.returncode == 0, done.stderr[-2000:]
    again = folder.with_name("dog-again")
    same_tensors(folder / "adapter-emulator" / "adapter_model.safetensors",
                 again / "adapter-emulator" / "adapter_model.safetensors")
    same_tensors(folder / "lora" / "corrected" / "adapter_model.safetensors",
                 again / "lora" / "corrected" / "adapter_model.safetensors")
    assert json.loads((again / "run.json").read_text())["data"] == json.loads((folder / "run.json").read_text())["data"]


def test_command_writes_only_settings_off_their_defaults_with_the_flags_the_cli_parses():
    flux = FluxSettings(images="/x", prompt="it's a sks dog", random_flip=True, preview_seeds=[0, 3],
                        preview_prompts=["a", "b c"])
    words = settings_arguments(flux)
    assert words == ["--images", "/x", "--prompt", "it's a sks dog", "--random-flip", "--preview-prompt", "a",
                     "--preview-prompt", "b c", "--preview-seed", "0", "--preview-seed", "3"]
    run = RunSettings(model="m", lr=1e-3, lam=float("inf"), gradient_checkpointing=False, rules=[".*=0.5"])
    assert settings_arguments(run) == ["--model", "m", "--lr", "0.001", "--no-gradient-checkpointing", "--lam", "inf",
                                       "--rules", ".*=0.5"]


def test_a_run_made_from_the_command_line_records_its_command_too(tmp_path):
    model = save_tiny_flux(tmp_path / "tiny-flux")
    write_subject_images(tmp_path / "dog", count=3)
    run = Run.create(tmp_path / "runs" / "cli", "flux", RunSettings(model=str(model), steps=2, rank=4),
                     FluxSettings(images=str(tmp_path / "dog"), prompt="sks dog", resolution=32))
    command = run.info["command"]
    assert command.startswith("python launch.py train --backend flux --model ")
    assert f"--images {run.dir.resolve() / 'data'}" in command and "--resolution 32" in command
