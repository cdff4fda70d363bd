"""Issue 29 items 1-3 end to end: headless `launch.py train` runs of the shipped demo models with held-out data.

FLUX demo: photos of two shapes (wide and tall ones cropped from the example set) at two sizes, two held out, prior
preservation with class images the base model draws; the validation loss lands in the loss log at each sample
round, the class images are drawn once (a run trained further reads them again). InternVL demo: four held-out
questions score validation loss, exact match and token F1 at each sample round.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.slow  # two demo runs of a few dozen steps, as processes: about 2 min on 2 cores

ROOT = Path(__file__).resolve().parents[1]


def _launch(*arguments: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), "train", *arguments], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "loss.jsonl").read_text().splitlines() if line.strip()]


def test_flux_demo_reports_validation_loss_trains_buckets_and_draws_class_images_once(tmp_path):
    from app import handlers

    images, _, prompt = handlers.example_data("images", tmp_path / "photos")
    for item, box in ((images[0], (0, 12, 64, 52)), (images[1], (12, 0, 52, 64))):  # one wide, one tall photo
        path = Path(item["path"])
        Image.open(path).convert("RGB").crop(box).resize(((box[2] - box[0]) * 3 // 2,
                                                          (box[3] - box[1]) * 3 // 2)).save(path)  # 96x60, 60x96
    out = tmp_path / "runs" / "shapes"
    common = ["--backend", "flux", "--images", str(tmp_path / "photos"), "--prompt", prompt, "--quiet",
              "--stages", "calibrate", "emulate", "train"]
    done = _launch(*common, "--out", str(out), "--steps", "8", "--sample-every", "4", "--checkpoint-every", "4",
                   "--holdout", "2", "--train-resolution", "48", "--class-prompt", "a photo of a shape",
                   "--class-count", "2", "--preview-steps", "2", "--lr", "1e-3")
    assert done.returncode == 0, done.stderr[-3000:]
    validation = [r for r in _records(out) if "validation_loss" in r]
    assert [r["step"] for r in validation] == [0, 4, 8]  # step 0, each sample round (the last is one)
    assert all(0 < r["validation_loss"] < 10 for r in validation)
    assert len([r for r in _records(out) if "loss" in r]) == 8
    drawn = sorted((out / "class-images").glob("class-*.png"))
    assert [p.name for p in drawn] == ["class-000.png", "class-001.png"]
    info = json.loads((out / "run.json").read_text())
    assert "class_images" in info["plan"]["phases"]  # the planner counted the drawing (the preview's phase)
    cache = json.loads((out / "cache" / "cache.json").read_text())
    sizes = {tuple(e["size"]) for e in cache["entries"] if e["role"] == "train"}
    assert {(80, 48), (48, 80), (64, 32), (32, 64)} <= sizes  # the wide and tall photos kept their shape at both
    assert {(64, 64), (48, 48)} <= sizes  # sizes, the square ones stayed square
    assert sum(e["role"] == "validation" for e in cache["entries"]) == 2 * 2  # two photos at two sizes
    stamps = [p.stat().st_mtime_ns for p in drawn]

    more = _launch("--out", str(out), "--resume", "--steps", "12", "--quiet", "--stages", "calibrate", "emulate",
                   "train")
    assert more.returncode == 0, more.stderr[-3000:]
    assert [p.stat().st_mtime_ns for p in sorted((out / "class-images").glob("class-*.png"))] == stamps
    assert [r["step"] for r in _records(out) if "validation_loss" in r][-1] == 12


def test_internvl_demo_scores_held_out_questions_at_each_sample_round(tmp_path):
    from app import handlers

    _, rows, _ = handlers.example_data("qa", tmp_path / "mugs")
    with open(tmp_path / "mugs" / "qa.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "question", "answer"])
        writer.writerows(rows)
    out = tmp_path / "runs" / "mugs"
    done = _launch("--backend", "vlm", "--data", str(tmp_path / "mugs" / "qa.csv"), "--holdout", "4", "--steps", "6",
                   "--sample-every", "3", "--checkpoint-every", "3", "--quiet", "--stages", "calibrate", "emulate",
                   "train", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    validation = [r for r in _records(out) if "validation_loss" in r]
    assert [r["step"] for r in validation] == [0, 3, 6]
    for record in validation:
        assert 0 < record["validation_loss"] < 50
        assert 0 <= record["exact_match"] <= 1 and 0 <= record["token_f1"] <= 1
