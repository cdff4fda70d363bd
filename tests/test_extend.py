"""A finished run trained further (`launch.py train --resume --steps N`, the app's "Train further") ends with the
adapter of a run trained N steps straight, and keeps what it had before."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from app.jobs import JobBusy
from app.steps.runs import list_runs
from app.studio import Studio
from flux_fixtures import save_tiny_flux, write_subject_images
from pipelines.runner import cli

pytestmark = pytest.mark.slow  # trains a FLUX run, then further: 43 s on a loaded 2-core machine (82 s before)

FAST = ["--resolution", "32", "--max-sequence-length", "16", "--rank", "4", "--alpha", "8", "--calibration-samples",
        "3", "--preview-steps", "1", "--lr", "1e-3", "--checkpoint-every", "3", "--seed", "3", "--quiet"]
ADAPTERS = ("adapter-emulator/adapter_model.safetensors", "lora/corrected/adapter_model.safetensors",
            "lora/kohya/flux_lora_kohya.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run of 6 steps straight, and a run of 4 steps trained further to 6 from the command line."""
    root = tmp_path_factory.mktemp("extend")
    model = save_tiny_flux(root / "tiny-flux")
    write_subject_images(root / "dog", count=3)
    common = ["--backend", "flux", "--model", str(model), "--images", str(root / "dog"), "--prompt", "sks dog", *FAST]
    assert cli.main([*common, "--steps", "6", "--out", str(root / "straight")]) == 0
    assert cli.main([*common, "--steps", "4", "--out", str(root / "short")]) == 0
    before = {name: digest(root / "short" / name) for name in ADAPTERS}
    return {"root": root, "straight": root / "straight", "short": root / "short", "before": before, "model": model}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def same_tensors(a: Path, b: Path) -> None:
    expected, got = load_file(str(a)), load_file(str(b))
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6)


def test_training_a_finished_run_further_equals_training_it_straight(runs, capsys):
    short = runs["short"]
    assert (short / "checkpoints" / "step-000004" / "optimizer.pt").is_file()  # the final state is kept
    capsys.readouterr()
    assert cli.main(["--resume", "--out", str(short), "--steps", "6", "--quiet"]) == 0
    said = capsys.readouterr().out
    assert "resuming from checkpoint step-000004 (step 4)" in said  # from the last state, not from step 0
    for name in ADAPTERS:
        same_tensors(runs["straight"] / name, short / name)
    info = json.loads((short / "run.json").read_text())
    assert info["settings"]["run"]["steps"] == 6 and all(info["stages"][s]["status"] == "done" for s in info["stages"])
    assert info["extended"][0]["from"] == 4 and info["extended"][0]["to"] == 6
    assert "--steps 6" in info["command"]
    assert [json.loads(line)["step"] for line in (short / "loss.jsonl").read_text().splitlines()] == list(range(1, 7))
    assert (short / "previews" / "grid.png").is_file()  # previews made again, of the new adapter
    # the results of the first 4 steps are kept, unchanged
    kept = short / info["extended"][0]["kept"]
    assert kept == short / "earlier" / "step-4"
    assert {name: digest(kept / name) for name in ADAPTERS} == runs["before"]
    assert runs["before"][ADAPTERS[0]] != digest(runs["straight"] / ADAPTERS[0])  # two more steps changed it
    assert (kept / "previews" / "grid.png").is_file()


def test_fewer_steps_than_the_run_has_is_refused_and_nothing_changes(runs, capsys):
    straight = runs["straight"]
    files = {p: digest(p) for p in straight.rglob("*") if p.is_file()}
    assert cli.main(["--resume", "--out", str(straight), "--steps", "5", "--quiet"]) == 2
    assert "is a run of 6 steps; to train it further give --steps above 6 (got 5)" in capsys.readouterr().err
    assert {p: digest(p) for p in straight.rglob("*") if p.is_file()} == files
    assert not (straight / "earlier").exists()


def test_train_further_in_past_runs_checks_the_box_in_words_and_trains_on(runs, tmp_path):
    import shutil

    studio = Studio(tmp_path / "runs", {"flux": runs["model"]})
    shutil.copytree(runs["straight"], tmp_path / "runs" / "dog")
    with pytest.raises(ValueError, match=r"pick a run in the list first"):
        studio.extend_run("", 8)
    with pytest.raises(ValueError, match=r"Train to \(steps\) is empty; type a whole number of steps above 6"):
        studio.extend_run("dog", None)
    with pytest.raises(ValueError, match=r"Train to \(steps\) must be a whole number; got 7.5"):
        studio.extend_run("dog", 7.5)
    with pytest.raises(ValueError, match=r"more steps than dog has \(6\): type more than 6 in Train to \(steps\)"):
        studio.extend_run("dog", 6)
    folder = studio.extend_run("dog", 7)
    with pytest.raises(JobBusy, match="already running"):
        studio.extend_run("dog", 9)
    assert studio.jobs.wait(timeout=300).state == "done"
    assert list_runs(studio)[0]["steps"] == "7 of 7" and list_runs(studio)[0]["status"] == "finished"
    assert (Path(folder) / "earlier" / "step-6" / "lora" / "corrected").is_dir()
    assert (Path(folder) / "lora" / "kohya" / "flux_lora_kohya.safetensors").is_file()
