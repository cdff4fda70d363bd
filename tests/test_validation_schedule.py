"""When the held-out data is scored (issue 29 item 1): at each sample round, and, when there are no sample rounds
(--sample-every 0), at each checkpoint and the last step, so the loss chart still draws a validation series. The
trivial fake backend (tests/fake_backend.py) with a held-out score of its own: seconds."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fake_backend import FakeBackend
from pipelines.runner import Run
from pipelines.runner.stages import validation_due


def held_out_loss(self, model) -> dict[str, float]:
    """The fake regression's loss on fixed inputs the training steps never draw (as a backend's held-out data)."""
    x = torch.linspace(-1.0, 1.0, 8)[None, :].repeat(3, 1) * torch.tensor([[0.7], [1.3], [2.1]])
    return {"validation_loss": float(((model(x) - 2 * x) ** 2).mean())}


def validation_steps(run_dir) -> list[int]:
    from app.plots import read_validation

    return [step for step, _ in read_validation(run_dir)]


@pytest.mark.parametrize("sample_every, expected", [(0, [0, 3, 6, 9]), (4, [0, 4, 8, 9])])
def test_held_out_data_is_scored_at_checkpoints_when_there_are_no_sample_rounds(fake, monkeypatch, sample_every,
                                                                                expected):
    root, settings, fake_settings = fake  # 9 steps, a checkpoint every 3
    monkeypatch.setattr(FakeBackend, "validation_scores", held_out_loss)
    settings = dataclasses.replace(settings, sample_every=sample_every)
    run = Run.create(root / "runs" / f"every-{sample_every}", "fake", settings, fake_settings)
    run.execute(["calibrate", "emulate", "train"])
    assert validation_steps(run.dir) == expected  # with rounds: at them (and the last step), not at checkpoints
    from app.plots import VALIDATION, loss_frame, read_validation
    from app.jobs import read_losses

    frame = loss_frame(read_losses(run.dir), read_validation(run.dir))
    drawn = frame[frame["series"] == VALIDATION]
    assert list(drawn["step"]) == expected  # the loss chart's validation series
    assert drawn["loss"].iloc[-1] < drawn["loss"].iloc[0]  # training on y = 2x lowers the held-out loss too
    assert len(frame[frame["series"] != VALIDATION]) == 9


def test_a_run_holding_nothing_out_writes_no_validation_lines(fake):
    root, settings, fake_settings = fake
    run = Run.create(root / "runs" / "none", "fake", dataclasses.replace(settings, sample_every=0), fake_settings)
    run.execute(["calibrate", "emulate", "train"])
    assert validation_steps(run.dir) == []


def test_validation_is_due_at_rounds_or_else_at_checkpoints_and_always_at_the_end():
    assert validation_due(9, 9, 0, sample=False, checkpoint=False)
    assert validation_due(3, 9, 0, sample=False, checkpoint=True)
    assert not validation_due(3, 9, 4, sample=False, checkpoint=True)  # rounds exist: they carry validation
    assert validation_due(4, 9, 4, sample=True, checkpoint=False)
    assert validation_due(5, 9, 0, sample=True, checkpoint=False)  # Sample now, without rounds
    assert not validation_due(5, 9, 0, sample=False, checkpoint=False)
