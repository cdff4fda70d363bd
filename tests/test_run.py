"""The run machine with a trivial backend: stage skipping, atomic stage outputs, resume, cancel, no overwrite."""

from __future__ import annotations

import json

import pytest
import torch

from fake_backend import FakeBackend, FakeSettings, adapter, snapshot  # the `fake` fixture that registers it is in conftest.py
from pipelines.runner import STAGES, Run, RunCancelled, RunSettings, cli
from pipelines.runner.settings import PREVIEW_VARIANTS


def test_every_stage_runs_once_and_is_skipped_when_its_output_exists(fake):
    root, settings, fake_settings = fake
    run = Run.create(root / "runs" / "a", "fake", settings, fake_settings)
    events = []
    run.callbacks.append(events.append)
    run.execute()
    info = json.loads((run.dir / "run.json").read_text())
    assert [info["stages"][s]["status"] for s in STAGES] == ["done"] * 5
    assert info["settings"]["run"]["ratio"] == 0.5 and info["settings"]["backend"]["data"] == fake_settings.data
    assert "torch" in info["versions"] and "peft" in info["versions"]
    assert [json.loads(line)["step"] for line in (run.dir / "loss.jsonl").read_text().splitlines()] == list(range(1, 10))
    train_events = [e for e in events if e.stage == "train" and e.loss is not None]
    assert [e.step for e in train_events] == list(range(1, 10)) and all(e.total == 9 for e in train_events)
    assert train_events[-1].eta == pytest.approx(0.0)
    before, calls = snapshot(run.dir), dict(FakeBackend.calls)

    again = Run.open(run.dir)
    skipped = []
    again.callbacks.append(skipped.append)
    again.execute()
    assert FakeBackend.calls == calls  # no model loaded, no cache rebuilt, no step taken
    assert sorted(e.stage for e in skipped if "skipped" in e.message) == sorted(STAGES)
    assert {k: v for k, v in snapshot(run.dir).items() if k != "run.json"} == \
           {k: v for k, v in before.items() if k != "run.json"}


def test_a_failed_stage_leaves_no_partial_output_and_is_recorded(fake):
    root, settings, fake_settings = fake
    run = Run.create(root / "runs" / "a", "fake", settings, fake_settings)
    FakeBackend.fail_at_step = 4
    with pytest.raises(RuntimeError, match="simulated crash"):
        run.execute()
    info = json.loads((run.dir / "run.json").read_text())
    assert info["stages"]["calibrate"]["status"] == info["stages"]["emulate"]["status"] == "done"
    assert info["stages"]["train"]["status"] == "failed" and "simulated crash" in info["stages"]["train"]["error"]
    assert not (run.dir / "adapter-emulator").exists()  # the staging folder was never renamed into place
    assert (run.dir / "checkpoints" / "step-000003" / "state.json").is_file()
    for path in run.dir.rglob("*.json"):
        json.loads(path.read_text())  # no half-written file anywhere


def test_resume_after_a_crash_ends_with_the_same_adapter_as_an_uninterrupted_run(fake):
    root, settings, fake_settings = fake
    whole = Run.create(root / "runs" / "whole", "fake", settings, fake_settings)
    whole.execute(["calibrate", "emulate", "train"])

    crashed = Run.create(root / "runs" / "crashed", "fake", settings, fake_settings)
    FakeBackend.fail_at_step = 7  # after the checkpoint at step 6
    with pytest.raises(RuntimeError):
        crashed.execute(["calibrate", "emulate", "train"])
    FakeBackend.fail_at_step, FakeBackend.calls["train_step"] = None, 0
    Run.open(crashed.dir).execute(["calibrate", "emulate", "train"])
    assert FakeBackend.calls["train_step"] == 3  # steps 7, 8, 9 only
    expected, got = adapter(whole.dir), adapter(crashed.dir)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6)
    steps = [json.loads(line)["step"] for line in (crashed.dir / "loss.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 10))  # the crashed step 7 was logged once, not twice


def test_cancel_stops_between_steps_keeps_a_checkpoint_and_resumes(fake):
    root, settings, fake_settings = fake
    run = Run.create(root / "runs" / "a", "fake", settings, fake_settings)
    run.callbacks.append(lambda e: run.cancel_event.set() if e.stage == "train" and e.step == 4 else None)
    with pytest.raises(RunCancelled):
        run.execute()
    info = json.loads((run.dir / "run.json").read_text())
    assert info["stages"]["train"]["status"] == "cancelled" and info["stages"]["correct"]["status"] == "pending"
    assert (run.dir / "checkpoints" / "step-000004").is_dir()  # the step in progress is saved
    assert FakeBackend.calls["train_step"] == 4
    Run.open(run.dir).execute()
    assert FakeBackend.calls["train_step"] == 9
    assert json.loads((run.dir / "run.json").read_text())["stages"]["preview"]["status"] == "done"


def test_a_new_run_never_overwrites_an_old_one(fake, capsys):
    root, settings, fake_settings = fake
    run = Run.create(root / "runs" / "a", "fake", settings, fake_settings)
    run.execute(["calibrate", "emulate"])
    before = snapshot(run.dir)
    with pytest.raises(FileExistsError, match="already exists"):
        Run.create(root / "runs" / "a", "fake", settings, fake_settings)
    code = cli.main(["--backend", "fake", "--model", "fake", "--data", fake_settings.data, "--out", str(run.dir)])
    assert code == 2 and "already exists" in capsys.readouterr().err
    assert snapshot(run.dir) == before


def test_bad_data_fails_before_the_run_folder_exists(fake):
    root, settings, fake_settings = fake
    short = root / "short.json"
    short.write_text("[1, 2]")
    with pytest.raises(ValueError, match="need at least 4 numbers"):
        Run.create(root / "runs" / "a", "fake", settings, FakeSettings(data=str(short)))
    with pytest.raises(ValueError, match="--ratio"):
        Run.create(root / "runs" / "b", "fake", RunSettings(model="fake", ratio=1.5), fake_settings)
    assert not (root / "runs").exists() or list((root / "runs").iterdir()) == []


def test_cli_builds_options_from_settings_and_runs_headless(fake, capsys):
    root, _, fake_settings = fake
    out = root / "runs" / "cli"
    code = cli.main(["--backend", "fake", "--model", "fake", "--data", fake_settings.data, "--steps", "4",
                     "--rank", "2", "--no-gradient-checkpointing", "--rules", r"0=0.5", "--quiet", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    info = json.loads((out / "run.json").read_text())
    assert info["settings"]["run"]["steps"] == 4 and info["settings"]["run"]["rules"] == ["0=0.5"]
    assert info["settings"]["run"]["gradient_checkpointing"] is False
    assert list(json.loads((out / "emulator" / "emulator.json").read_text())["layers"]) == ["0"]
    code = cli.preview(["--run", str(out), "--probe", "0.5", "--probe", "2", "--name", "later"])
    assert code == 0
    outputs = json.loads((out / "later" / "outputs.json").read_text())
    assert set(outputs) == {"base", "emulator + LoRA", "full + corrected LoRA", "full + uncorrected LoRA"}
    assert all(len(values) == 2 for values in outputs.values())


@pytest.mark.parametrize("ratio,rules,factored", [(1.0, [], []), (0.5, ["0=0.5", "2=1"], ["0"])],
                         ids=["ratio-1", "kept-and-factored"])
def test_a_run_that_keeps_layers_goes_through_every_stage(fake, ratio, rules, factored):
    """--ratio 1 keeps every layer (the emulator is the full model); it used to fail at train, as did an emulator
    with kept and factored layers, on the fingerprint."""
    root, settings, fake_settings = fake
    settings.ratio, settings.rules = ratio, rules
    run = Run.create(root / "runs" / "a", "fake", settings, fake_settings)
    run.execute()
    info = json.loads((run.dir / "run.json").read_text())
    assert [info["stages"][s]["status"] for s in STAGES] == ["done"] * 5
    emulator = json.loads((run.dir / "emulator" / "emulator.json").read_text())
    assert list(emulator["layers"]) == factored and emulator["targets"] == ["0", "2"]
    if not factored:  # the emulator is the full model, so the correction changes nothing
        outputs = json.loads((run.dir / "previews" / "outputs.json").read_text())
        for label in ("full + corrected LoRA", "full + uncorrected LoRA"):
            assert outputs[label] == pytest.approx(outputs["emulator + LoRA"], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("kind", ["nf4", "lowrank-nf4"])
def test_each_emulator_kind_goes_through_every_stage_and_resumes(fake, kind):
    """--emulator-kind reaches the emulator (its layers are stored in 4 bits), training, correction and the
    previews; a resumed run rebuilds the same emulator from its files."""
    root, settings, fake_settings = fake
    settings.emulator_kind, settings.rules = kind, ["0=0.5", "2=0.5"]
    run = Run.create(root / "runs" / kind, "fake", settings, fake_settings)
    run.execute()
    info = json.loads((run.dir / "run.json").read_text())
    assert info["settings"]["run"]["emulator_kind"] == kind
    assert [info["stages"][s]["status"] for s in STAGES] == ["done"] * 5
    emulator = json.loads((run.dir / "emulator" / "emulator.json").read_text())
    assert emulator["kind"] == kind and {spec["kind"] for spec in emulator["layers"].values()} == {kind}
    outputs = json.loads((run.dir / "previews" / "outputs.json").read_text())
    assert set(outputs) == set(PREVIEW_VARIANTS)
    # the stand-in is not the full model, so the correction moves the adapter
    assert outputs["full + corrected LoRA"] != pytest.approx(outputs["full + uncorrected LoRA"], rel=1e-6, abs=1e-7)


def test_an_unknown_emulator_kind_is_refused_naming_the_flag(fake):
    _, settings, _ = fake
    settings.emulator_kind = "int3"
    with pytest.raises(ValueError, match="--emulator-kind must be one of lowrank, nf4, lowrank-nf4"):
        settings.check()
