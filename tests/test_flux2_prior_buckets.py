"""Prior preservation and aspect-ratio buckets in a whole FLUX.2 [klein] run (issue 29 items 2-3; the FLUX.1 side and
the pieces are in test_buckets_prior.py): the user's class images from a folder are trained on at every step beside
the photos, and each step's photos are of one bucket, wide or square as they were taken."""

from __future__ import annotations

import json
import math

import numpy as np
from PIL import Image

from flux2_fixtures import save_tiny_klein
from pipelines.diffusion_common.flow import FlowObjective
from pipelines.flux2.backend import Flux2Settings
from pipelines.runner import Run, RunSettings
from pipelines.runner.settings import LOSS_LOG

WIDE, SQUARE = (80, 48), (64, 64)  # the buckets of a 96x64 and a 64x64 photo at 64 px


def _photos(folder, shapes, seed):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for index, (w, h) in enumerate(shapes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"p{index}.png")
    return folder


def test_a_klein_run_trains_on_the_class_images_of_a_folder_and_batches_photos_by_bucket(tmp_path, monkeypatch):
    model = save_tiny_klein(tmp_path / "klein", distilled=True)
    photos = _photos(tmp_path / "photos", [(96, 64), (64, 64), (96, 64), (64, 64)], seed=1)
    classes = _photos(tmp_path / "dogs", [(64, 64), (64, 64), (64, 64)], seed=2)
    drawn, forwarded, steps = [], [], []  # what each draw took, each forward's rows, the training steps

    real_draw, real_rows, real_loss = FlowObjective._draw, FlowObjective._row_losses, FlowObjective.training_loss

    def draw(self, generator, size, role="train"):
        entries = real_draw(self, generator, size, role)
        latents = self._latents()
        drawn.append((role, {latents[k]["role"] for k in entries}, {tuple(latents[k]["size"]) for k in entries}))
        return entries

    def row_losses(self, model, batch):
        forwarded.append(batch["x0"].shape[0])
        return real_rows(self, model, batch)

    def training_loss(self, model, step, generator):
        steps.append(step)
        drawn.clear()
        forwarded.clear()
        loss = real_loss(self, model, step, generator)
        steps[-1] = (list(drawn), list(forwarded))
        return loss

    monkeypatch.setattr(FlowObjective, "_draw", draw)
    monkeypatch.setattr(FlowObjective, "_row_losses", row_losses)
    monkeypatch.setattr(FlowObjective, "training_loss", training_loss)
    run = Run.create(tmp_path / "runs" / "prior", "flux2",
                     RunSettings(model=str(model), ratio=0.5, calibration_samples=2, steps=6, batch_size=2, rank=4,
                                 lr=1e-3, device="cpu", sample_every=0, ram_gb=1000.0, seed=5),
                     Flux2Settings(images=str(photos), prompt="a photo of sks dog", resolution=64,
                                   class_images=str(classes), class_prompt="a photo of a dog", prior_weight=0.5,
                                   max_sequence_length=32, preview_steps=1))
    run.execute(["calibrate", "emulate", "train"])

    assert sorted(p.name for p in (run.dir / "data" / "class").iterdir()) == ["p0.png", "p1.png", "p2.png"]
    assert len(steps) == 6
    shapes_trained = set()
    for draws, rows in steps:
        (photo_role, photo_roles, photo_sizes), (class_role, class_roles, class_sizes) = draws
        assert photo_role == "train" and photo_roles == {"train"} and len(photo_sizes) == 1  # one bucket a step
        assert class_role == "class" and class_roles == {"class"} and class_sizes == {SQUARE}
        # the class rows are forwarded beside the photos: in the same forward when the shapes agree, else in a second
        assert rows == ([4] if photo_sizes == {SQUARE} else [2, 2])
        shapes_trained |= photo_sizes
    assert shapes_trained == {WIDE, SQUARE}  # wide photos keep their shape, square ones theirs
    logged = [json.loads(line) for line in (run.dir / LOSS_LOG).read_text().splitlines()]
    losses = [row["loss"] for row in logged if "loss" in row]
    assert len(losses) == 6 and all(math.isfinite(loss) for loss in losses)
