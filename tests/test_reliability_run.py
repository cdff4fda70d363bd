"""The run machine under a careless user, a crash and a damaged disk: what is refused, in which words, and
what is left on disk (the fake backend of test_run.py; each test names the attempt it repeats)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from app.studio import Studio
from pipelines.runner import Run, cli
from pipelines.runner.adapters import AdapterError
from pipelines.runner.lock import LOCK_FILE, RunLock, RunLocked
from fake_backend import FakeBackend, adapter, snapshot

# 25 tests of runs of the fake backend that crash, resume or fill the disk: 8 s (it was 123-260 s and marked slow
# while every full garbage collection of the run machine walked the libraries' objects; conftest.py freezes them)


def finished(fake, name="a") -> Run:
    root, settings, fake_settings = fake
    run = Run.create(root / "runs" / name, "fake", settings, fake_settings)
    run.execute()
    return run


def crashed_after_two_checkpoints(fake, name="crashed") -> Run:
    """Training stopped at step 7 (kill -9 or a crash): checkpoints step-3 and step-6 exist."""
    root, settings, fake_settings = fake
    run = Run.create(root / "runs" / name, "fake", settings, fake_settings)
    FakeBackend.fail_at_step = 7
    with pytest.raises(RuntimeError):
        run.execute(["calibrate", "emulate", "train"])
    FakeBackend.fail_at_step, FakeBackend.calls["train_step"] = None, 0
    return run


# -- 1. preview --name ------------------------------------------------------------------------------------
def test_preview_name_that_leaves_the_run_folder_is_refused_and_nothing_outside_is_touched(fake, capsys):
    run = finished(fake)
    victim = run.dir.parent.parent / "victim.tmp"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    outside = sorted(p.name for p in run.dir.parent.parent.iterdir())
    code = cli.preview(["--run", str(run.dir), "--name", "../../victim"])
    assert code == 2 and "--name '../../victim': use a plain folder name" in capsys.readouterr().err
    assert (victim / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in run.dir.parent.parent.iterdir()) == outside
    assert not list(run.dir.glob("*.tmp"))


# -- 4. damaged checkpoints -------------------------------------------------------------------------------
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _nan_adapter(path: Path) -> None:
    save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(str(path)).items()}, str(path))


DAMAGE = {"truncated adapter": ("adapter.safetensors", _truncate),
          "truncated optimizer": ("optimizer.pt", _truncate),
          "garbage state.json": ("state.json", lambda p: p.write_text("{garbage")),
          "NaN adapter": ("adapter.safetensors", _nan_adapter)}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_skips_a_damaged_last_checkpoint_and_ends_as_an_uninterrupted_run(fake, damage):
    root, settings, fake_settings = fake
    whole = Run.create(root / "runs" / "whole", "fake", settings, fake_settings)
    whole.execute(["calibrate", "emulate", "train"])
    run = crashed_after_two_checkpoints(fake)
    name, spoil = DAMAGE[damage]
    spoil(run.dir / "checkpoints" / "step-000006" / name)
    resumed, events = Run.open(run.dir), []
    resumed.callbacks.append(events.append)
    resumed.execute(["calibrate", "emulate", "train"])
    said = [e.message for e in events if e.message]
    assert any(m.startswith("skipped the damaged checkpoint step-000006") for m in said), said
    assert "resuming from checkpoint step-000003 (step 3)" in said
    assert FakeBackend.calls["train_step"] == 6  # steps 4..9, from the previous good checkpoint
    for key, value in adapter(whole.dir).items():
        torch.testing.assert_close(adapter(run.dir)[key], value, rtol=0, atol=1e-6)
    assert (run.dir / "checkpoints" / "step-000006.damaged").is_dir()  # kept aside, never resumed from again


def test_a_leftover_tmp_checkpoint_with_a_state_file_is_ignored(fake):
    run = crashed_after_two_checkpoints(fake)
    leftover = run.dir / "checkpoints" / "step-000008.tmp"
    leftover.mkdir()
    (leftover / "state.json").write_text(json.dumps({"step": 8}))
    Run.open(run.dir).execute(["calibrate", "emulate", "train"])
    assert FakeBackend.calls["train_step"] == 3  # from step-6, not from the half-written step-8


def test_a_diverged_loss_says_to_start_again_with_a_lower_learning_rate_not_to_resume(fake):
    root, settings, fake_settings = fake
    settings.lr = 1e30
    run = Run.create(root / "runs" / "a", "fake", settings, fake_settings)
    with pytest.raises(ValueError, match="start a new run with a lower learning rate") as err:
        run.execute(["calibrate", "emulate", "train"])
    assert "resume from" not in str(err.value)
    for folder in (run.dir / "checkpoints").glob("step-*"):  # no checkpoint holds non-finite weights
        assert all(torch.isfinite(t).all() for t in load_file(str(folder / "adapter.safetensors")).values())


# -- 5. previews of a bad adapter -------------------------------------------------------------------------
@pytest.mark.parametrize("spoil, words", [
    ("nan", "holds NaN or infinite values"), ("missing", "the adapter is incomplete"),
    ("shape", "has matrices of shapes")])
def test_preview_refuses_a_nan_incomplete_or_misshaped_adapter(fake, capsys, spoil, words):
    run = finished(fake)
    weights = run.dir / "lora" / "corrected" / "adapter_model.safetensors"
    state = load_file(str(weights))
    first = next(k for k in state if k.endswith("lora_B.weight"))
    if spoil == "nan":
        state[first] = torch.full_like(state[first], float("nan"))
    elif spoil == "missing":
        del state[first]
    else:
        state[first] = torch.zeros(state[first].shape[0], state[first].shape[1] + 1)
    save_file(state, str(weights))
    before = sorted(p.name for p in run.dir.iterdir())
    code = cli.preview(["--run", str(run.dir), "--name", "later"])
    assert code == 2 and words in capsys.readouterr().err
    with pytest.raises(AdapterError, match=words):  # the app's export (step 6) refuses it too
        Studio(run.dir.parent).export(str(run.dir))
    assert sorted(p.name for p in run.dir.iterdir()) == before  # no preview folder, no .tmp, no zip


# -- 6. settings checked before the run folder ------------------------------------------------------------
@pytest.mark.parametrize("flags, words", [
    (["--lr", "nan"], "--lr must be a positive number"), (["--lr", "inf"], "--lr must be a positive number"),
    (["--lam", "nan"], "--lam must be a number >= 0"), (["--weight-decay", "inf"], "--weight-decay must be"),
    (["--alpha", "nan"], "--alpha must be a positive number"), (["--alpha", "0"], "--alpha must be a positive"),
    (["--lora-dropout", "1.5"], "--lora-dropout must be at least 0 and below 1"),
    (["--lora-targets", "(("], "--lora-targets '((' is not a valid regex"),
    (["--device", "tpu"], "--device 'tpu': use auto, cpu, cuda or cuda:N")])
def test_a_bad_setting_is_refused_before_the_run_folder_exists(fake, capsys, flags, words):
    root, _, fake_settings = fake
    out = root / "runs" / "bad"
    code = cli.main(["--backend", "fake", "--model", "fake", "--data", fake_settings.data, "--out", str(out), *flags])
    assert code == 2 and words in capsys.readouterr().err
    assert not out.exists() and FakeBackend.calls == {}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_a_gpu_is_refused_in_words(fake, capsys):
    root, _, fake_settings = fake
    code = cli.main(["--backend", "fake", "--model", "fake", "--data", fake_settings.data, "--device", "cuda",
                     "--out", str(root / "runs" / "gpu")])
    assert code == 2 and "no CUDA GPU that PyTorch can use; use --device cpu" in capsys.readouterr().err
    assert not (root / "runs" / "gpu").exists()


# -- 7. the disk: read-only, full ---------------------------------------------------------------------------
def test_an_out_folder_that_cannot_be_written_is_refused_without_a_traceback(fake, capsys):
    root, _, fake_settings = fake
    code = cli.main(["--backend", "fake", "--model", "fake", "--data", fake_settings.data,
                     "--out", "/proc/emloc-test/run"])  # /proc takes no new folders, even from root
    assert code == 2 and "--out /proc/emloc-test/run: cannot write in /proc" in capsys.readouterr().err


def test_a_full_disk_while_creating_leaves_no_folder_and_while_training_resumes_later(fake, capsys, monkeypatch):
    root, _, fake_settings = fake
    out = root / "runs" / "full"
    full = OSError(errno.ENOSPC, "No space left on device")
    args = ["--backend", "fake", "--model", "fake", "--data", fake_settings.data, "--steps", "9",
            "--checkpoint-every", "3", "--rank", "2", "--quiet", "--out", str(out)]
    with monkeypatch.context() as patch:
        patch.setattr(FakeBackend, "copy_data", lambda self, folder: (_ for _ in ()).throw(full))
        assert cli.main(args) == 2 and "the disk is full" in capsys.readouterr().err
    assert list((root / "runs").iterdir()) == []  # neither the run nor its staging folder
    real_save = Run.save_tensors

    def save(self, path, tensors):
        if path.name == "adapter.safetensors" and "step-000006" in str(path):
            raise full
        return real_save(self, path, tensors)

    with monkeypatch.context() as patch:
        patch.setattr(Run, "save_tensors", save)
        assert cli.main(args) == 2
    assert "the disk is full (" in (err := capsys.readouterr().err) and f"--resume --out {out}" in err
    assert cli.main(["--resume", "--quiet", "--out", str(out)]) == 0  # after more space
    assert json.loads((out / "run.json").read_text())["stages"]["preview"]["status"] == "done"


# -- 10. one process per run folder -----------------------------------------------------------------------
def test_a_second_process_on_a_run_is_refused_and_a_dead_ones_lock_is_taken_over(fake, capsys):
    run = crashed_after_two_checkpoints(fake)
    (run.dir / LOCK_FILE).write_text(str(os.getppid()))  # a live process holds the run
    before = snapshot(run.dir)
    assert cli.main(["--resume", "--quiet", "--out", str(run.dir)]) == 2
    assert f"is in use by process {os.getppid()}" in capsys.readouterr().err
    assert snapshot(run.dir) == before and FakeBackend.calls["train_step"] == 0
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run.dir / LOCK_FILE).write_text(dead.stdout.strip())  # kill -9 left its lock behind
    resumed, events = Run.open(run.dir), []
    resumed.callbacks.append(events.append)
    resumed.execute()
    assert f"took over the lock of process {dead.stdout.strip()}, which no longer runs" in [e.message for e in events]
    assert not (run.dir / LOCK_FILE).exists() and FakeBackend.calls["train_step"] == 3


def test_the_lock_is_held_while_the_run_executes(fake):
    root, settings, fake_settings = fake
    run = Run.create(root / "runs" / "a", "fake", settings, fake_settings)
    seen = []

    def second_attempt(event):
        if event.stage == "train" and event.step == 2 and not seen:
            with pytest.raises(RunLocked, match="in use by process"):
                RunLock(run.dir).acquire()
            seen.append(int((run.dir / LOCK_FILE).read_text()))

    run.callbacks.append(second_attempt)
    run.execute()
    assert seen == [os.getpid()] and not (run.dir / LOCK_FILE).exists()


# -- 11. resume messages name --out -----------------------------------------------------------------------
def test_resume_of_a_folder_that_is_no_run_names_the_out_flag(tmp_path, capsys):
    assert cli.main(["--resume", "--out", str(tmp_path / "nothing")]) == 2
    assert "is not a run folder (no run.json); check the --out path" in capsys.readouterr().err
