"""Training on the CPU keeps to its plan: the step's freed activations are handed back to the system instead of
staying in glibc's heap (benchmarks/README.md, "Issue 29's phases": FLUX width 1024 at 256 px peaked at 2-3x the
plan before)."""

from __future__ import annotations

from fake_backend import FakeBackend  # the `fake` fixture that registers it is in conftest.py
from pipelines.runner import Run, stages


def test_cpu_training_serves_large_allocations_from_their_own_maps_before_its_first_step(fake, monkeypatch):
    root, settings, fake_settings = fake
    settings.emulator_kind = "lowrank"  # the 4-bit kinds always did; the low-rank kind's activations did not
    run = Run.create(root / "runs" / "cpu", "fake", settings, fake_settings)
    assert run.backend.device.type == "cpu"
    run.execute(["calibrate", "emulate"])
    steps_when_mapped = []
    monkeypatch.setattr(stages, "map_large_allocations",
                        lambda *args: steps_when_mapped.append(FakeBackend.calls.get("train_step", 0)))
    before = FakeBackend.calls.get("train_step", 0)
    run.execute(["train"])
    assert FakeBackend.calls["train_step"] > before  # the stage trained
    assert steps_when_mapped and steps_when_mapped[0] == before, steps_when_mapped
