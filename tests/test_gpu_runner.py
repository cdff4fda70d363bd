"""The run machine's CUDA path, checked on this CPU where its mechanism can be reached (review gpu-path.md): optimizer
state written on a GPU (F4), the device and dtype a run records and keeps (F15), an indexed CUDA device made current
before training (F3), two trainings in one process (F12), `auto` precision on GPUs without native bfloat16 (F13),
loss reads batched on a GPU (F17), what each stage held (F9) and the allocator setting at process start."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.serialization
from safetensors.torch import load_file

from pipelines.runner import Run, cli, devices
from pipelines.runner import registry as backends
from pipelines.runner import stages
from test_reliability_run import crashed_after_two_checkpoints
from fake_backend import FakeBackend, adapter

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["calibrate", "emulate", "train"]


class TypedFake(FakeBackend):
    """The fake backend with a weight dtype, as FLUX and InternVL have (bf16 on CUDA, float32 on the CPU); it notes
    the dtype and autocast each training step ran in."""

    seen: list[tuple[torch.dtype, bool, torch.dtype]] = []

    def __init__(self, run, settings, device):
        super().__init__(run, settings, device)
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def load_model(self, device):
        return super().load_model(device).to(self.dtype)

    def calibration_forward(self, model, batch):  # inputs in the weights' dtype, as the real backends make them
        return model(batch.to(self.dtype))

    def generate(self, model, label):
        return [float(model(torch.full((1, 8), p, dtype=self.dtype)).sum()) for p in self.settings.probe]

    def training_loss(self, model, step, generator):
        weight = next(p for n, p in model.named_parameters() if "lora" not in n)
        TypedFake.seen.append((weight.dtype, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return super().training_loss(model, step, generator)


@pytest.fixture
def typed(fake, monkeypatch):
    monkeypatch.setitem(backends.BACKENDS, "typed", f"{__name__}:TypedFake")
    TypedFake.seen = []
    return fake


def _tag_as_written_on_cuda(path: Path) -> None:
    """Rewrite a torch.save file so its storages say `cuda:0`, as an optimizer state saved on a GPU does."""
    state = torch.load(path, weights_only=True)
    real = torch.serialization.location_tag
    torch.serialization.location_tag = lambda storage: "cuda:0"
    try:
        torch.save(state, path)
    finally:
        torch.serialization.location_tag = real


# -- F4: optimizer state from a GPU --------------------------------------------------------------------------
def test_a_checkpoint_written_on_a_gpu_resumes_on_this_cpu_and_is_not_set_aside(fake):
    root, settings, fake_settings = fake
    whole = Run.create(root / "runs" / "whole", "fake", settings, fake_settings)
    whole.execute(TRAIN)
    run = crashed_after_two_checkpoints(fake)
    optimizer_file = run.dir / "checkpoints" / "step-000006" / "optimizer.pt"
    _tag_as_written_on_cuda(optimizer_file)
    with pytest.raises(RuntimeError, match="Attempting to deserialize object on a CUDA device"):
        torch.load(optimizer_file, weights_only=True)  # the file truly is what a GPU run leaves

    resumed, events = Run.open(run.dir), []
    resumed.callbacks.append(events.append)
    resumed.execute(TRAIN)
    said = [e.message for e in events if e.message]
    assert "resuming from checkpoint step-000006 (step 6)" in said, said
    assert not list((run.dir / "checkpoints").glob("*.damaged"))
    assert FakeBackend.calls["train_step"] == 3  # steps 7..9 only
    for key, value in adapter(whole.dir).items():  # Adam's moments came back: the same adapter as uninterrupted
        torch.testing.assert_close(adapter(run.dir)[key], value, rtol=0, atol=1e-6)


def test_a_device_error_while_reading_a_checkpoint_is_raised_not_called_damage(fake, monkeypatch):
    run = crashed_after_two_checkpoints(fake)

    def no_memory(*args, **kwargs):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(torch, "load", no_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        Run.open(run.dir).execute(TRAIN)
    names = sorted(p.name for p in (run.dir / "checkpoints").iterdir())
    assert names == ["step-000003", "step-000006"]  # both kept where they were


# -- F15: the recorded device and dtype -------------------------------------------------------------------------
def test_a_new_run_records_its_resolved_device_dtype_and_precision(typed):
    root, settings, fake_settings = typed
    run = Run.create(root / "runs" / "a", "typed", settings, fake_settings)
    recorded = json.loads((run.dir / "run.json").read_text())["machine"]
    assert recorded == {"device": "cpu", "dtype": "float32", "mixed_precision": "no", "note": ""}


def _record_a_gpu(run_dir: Path) -> None:
    """Make run.json say the run was made on cuda:0 in bfloat16, as `auto` resolves on a GPU."""
    info = json.loads((run_dir / "run.json").read_text())
    info["machine"] = {"device": "cuda:0", "dtype": "bfloat16", "mixed_precision": "bf16", "note": ""}
    (run_dir / "run.json").write_text(json.dumps(info))


def test_a_gpu_run_reopened_without_a_gpu_refuses_in_words_and_continues_in_bf16_when_told(typed, capsys):
    root, settings, fake_settings = typed
    run = Run.create(root / "runs" / "a", "typed", settings, fake_settings)
    _record_a_gpu(run.dir)
    Run.open(run.dir, device="cpu").execute(["calibrate", "emulate"])  # the emulator built in bfloat16, as on the GPU
    assert {v.dtype for v in load_file(str(run.dir / "emulator" / "emulator.safetensors")).values()} == {torch.bfloat16}
    _record_a_gpu(run.dir)

    reopened = Run.open(run.dir)  # readable (export, Past runs) ...
    with pytest.raises(ValueError, match=r"was made on cuda:0 in bfloat16 and this machine has no CUDA GPU") as err:
        reopened.execute()  # ... but it does not compute in float32 on the CPU behind the user's back
    assert "--resume --device cpu" in str(err.value)
    assert TypedFake.seen == [] and not (run.dir / "checkpoints").exists()
    assert cli.main(["--out", str(run.dir), "--resume", "--quiet"]) == 2
    assert "--device cpu" in capsys.readouterr().err

    assert cli.main(["--out", str(run.dir), "--resume", "--device", "cpu", "--stages", *TRAIN, "--quiet"]) == 0
    assert TypedFake.seen and set(TypedFake.seen) == {(torch.bfloat16, True, torch.bfloat16)}  # weights + autocast
    info = json.loads((run.dir / "run.json").read_text())
    assert info["machine"] == {"device": "cpu", "dtype": "bfloat16", "mixed_precision": "bf16", "note": ""}
    assert info["stages"]["train"]["status"] == "done"


# -- F3: cuda:N --------------------------------------------------------------------------------------------------
def test_an_indexed_cuda_device_is_made_current_before_the_accelerator_exists(monkeypatch):
    from accelerate.state import AcceleratorState

    made_current = []

    def set_device(device):
        made_current.append((torch.device(device), AcceleratorState._shared_state == {}))

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    devices.new_accelerator(torch.device("cuda", 1), "no")
    assert made_current == [(torch.device("cuda", 1), True)]  # before accelerate placed anything on plain "cuda"
    made_current.clear()
    devices.use_device(torch.device("cuda"))
    devices.use_device(torch.device("cpu"))
    assert made_current == []  # plain "cuda" and the CPU need nothing


# -- F8: the process group's timeout -----------------------------------------------------------------------------
def test_the_process_group_waits_hours_for_the_stages_the_main_process_runs_alone(monkeypatch):
    import accelerate

    asked = []
    monkeypatch.setattr(accelerate, "PartialState", lambda **kwargs: asked.append(kwargs))
    devices.distributed_state(torch.device("cuda", 0))
    assert asked[0]["cpu"] is False and asked[0]["timeout"].total_seconds() >= 6 * 3600  # NCCL's default: 600 s


# -- F12: two trainings in one process ------------------------------------------------------------------------
def test_two_trainings_in_one_process_may_ask_different_precisions(fake):
    root, settings, fake_settings = fake
    for name, precision in (("first", "no"), ("second", "bf16")):
        settings.mixed_precision = precision
        run = Run.create(root / "runs" / name, "fake", settings, fake_settings)
        run.execute(TRAIN)
        assert json.loads((run.dir / "run.json").read_text())["stages"]["train"]["status"] == "done"
        assert json.loads((run.dir / "run.json").read_text())["machine"]["mixed_precision"] == precision
    assert adapter(root / "runs" / "first").keys() == adapter(root / "runs" / "second").keys()


# -- F13: auto precision ----------------------------------------------------------------------------------------
@pytest.fixture
def gpu_of_capability(monkeypatch):
    """Patch torch.cuda to describe one GPU of a given compute capability (nothing is computed on it)."""

    def describe(capability: tuple[int, int], name: str) -> None:
        native = capability >= (8, 0)
        monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)

    return describe


def test_auto_precision_is_bf16_only_where_the_gpu_has_it_natively(gpu_of_capability):
    gpu_of_capability((8, 9), "NVIDIA GeForce RTX 4090")
    assert devices.auto_precision(torch.device("cuda", 0)) == ("bf16", "")
    gpu_of_capability((7, 5), "Tesla T4")  # torch says bf16 is "supported" here: by emulation
    precision, why = devices.auto_precision(torch.device("cuda", 0))
    assert precision == "fp16" and "Tesla T4 (compute capability 7.5) has no native bfloat16" in why
    assert "--mixed-precision bf16" in why
    assert devices.auto_precision(torch.device("cpu")) == ("no", "")
    assert devices.run_precision("bf16", torch.device("cuda", 0)) == ("bf16", "")  # asked for: kept


def test_a_half_model_computes_in_the_autocast_type_and_the_reason_is_logged(gpu_of_capability, caplog):
    gpu_of_capability((7, 5), "Tesla T4")

    class Backend:
        device, dtype = torch.device("cuda", 0), torch.bfloat16

    backend = Backend()
    with caplog.at_level(logging.WARNING, logger="pipelines.runner.devices"):
        record = devices.machine_record("auto", backend)
    assert backend.dtype == torch.float16  # no per-operation cast of bf16 weights to fp16
    assert record["dtype"] == "float16" and record["mixed_precision"] == "fp16"
    assert "no native bfloat16" in caplog.text
    assert devices.weight_dtype("no", torch.bfloat16) == torch.bfloat16  # the backend's choice otherwise
    assert devices.weight_dtype("bf16", torch.float32) == torch.float32


# -- F17: the loss read once per several steps -------------------------------------------------------------------
def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in map(json.loads, (run_dir / "loss.jsonl").read_text().splitlines())]


def test_losses_read_every_few_steps_log_and_report_every_step_as_reads_every_step(fake, monkeypatch):
    root, settings, fake_settings = fake
    settings.sample_every = 0
    every_step = Run.create(root / "runs" / "every", "fake", settings, fake_settings)
    every_step.execute(TRAIN)
    monkeypatch.setattr(stages, "loss_read_interval", lambda device: 4)
    batched, events = Run.create(root / "runs" / "batched", "fake", settings, fake_settings), []
    batched.callbacks.append(events.append)
    batched.execute(TRAIN)
    assert _losses(batched.dir) == _losses(every_step.dir)  # nothing lost, nothing changed: steps 1..9
    train = [e for e in events if e.stage == "train" and e.step and not e.message]
    assert sorted(e.step for e in train if e.loss is not None) == list(range(1, 10))
    first_seen = {}
    for e in train:
        first_seen.setdefault(e.step, e.loss)
    # read at checkpoints (3, 6), every 4th step (4, 8) and the last (9); the others' losses came later
    assert sorted(s for s, loss in first_seen.items() if loss is None) == [1, 2, 5, 7]


def test_a_diverged_loss_read_late_still_stops_at_its_step_before_any_checkpoint_holds_it(fake, monkeypatch):
    root, settings, fake_settings = fake
    settings.lr, settings.sample_every = 1e30, 0
    errors = []
    for name, interval in (("every", 1), ("batched", 4)):
        monkeypatch.setattr(stages, "loss_read_interval", lambda device, n=interval: n)
        run = Run.create(root / "runs" / name, "fake", settings, fake_settings)
        with pytest.raises(ValueError, match="start a new run with a lower learning rate") as err:
            run.execute(TRAIN)
        errors.append(str(err.value))
        for folder in (run.dir / "checkpoints").glob("step-*"):
            assert all(torch.isfinite(t).all() for t in load_file(str(folder / "adapter.safetensors")).values())
    assert errors[0] == errors[1]  # the same step named


# -- F9: what each stage held -----------------------------------------------------------------------------------
def test_every_stage_records_the_host_peak_it_held_and_no_device_figures_on_the_cpu(fake):
    root, settings, fake_settings = fake
    run = Run.create(root / "runs" / "a", "fake", settings, fake_settings)
    run.execute()
    info = json.loads((run.dir / "run.json").read_text())
    for stage in ("calibrate", "emulate", "train", "correct", "preview"):
        held = info["stages"][stage]["held"]
        assert set(held) == {"host_rss_gib"} and 0.05 < held["host_rss_gib"] < 64, (stage, held)
    assert set(info["cache"]["held"]) == {"host_rss_gib"}
    rows = devices.memory_report(info)
    assert [r["phase"] for r in rows] == ["cache", "calibrate", "emulate", "train", "correct", "preview"]
    assert all(r["held_device_allocated_gib"] is None and r["held_host_gib"] > 0 for r in rows)


def test_a_stage_that_allocates_is_seen_holding_it_whether_or_not_it_sets_a_new_process_peak():
    chunk = 200 * 2**20
    with devices.held_memory(torch.device("cpu")) as quiet:
        time.sleep(0.2)
    with devices.held_memory(torch.device("cpu")) as busy:  # above the process's peak so far: exact
        block = torch.ones(chunk // 4)
        time.sleep(0.2)
        del block
    with devices.held_memory(torch.device("cpu")) as again:  # below that peak now: sampled every 50 ms
        block = torch.ones(chunk // 4)
        time.sleep(0.3)
        del block
    for held in (busy, again):
        assert held["host_rss_gib"] - quiet["host_rss_gib"] >= 0.9 * chunk / 2**30, (quiet, busy, again)


def test_a_gpu_stage_records_the_allocators_peaks_after_resetting_them(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append(("reset", device)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 3.5 * 2**30)
    with devices.held_memory(torch.device("cuda", 1)) as held:
        assert calls == [("reset", torch.device("cuda", 1))]
    assert held["device_allocated_gib"] == 3.0 and held["device_reserved_gib"] == 3.5 and held["host_rss_gib"] > 0


def test_the_memory_report_puts_each_stage_beside_its_planned_phase():
    info = {"plan": {"phases": {
        "training": {"name": "training", "device_gib": 21.5, "host_gib": 6.0},
        "preview": {"name": "preview / inference", "device_gib": 11.4, "host_gib": 3.0}}},
        "stages": {"calibrate": {"status": "done"},  # run before stages were measured: no row
                   "train": {"status": "done", "held": {"device_allocated_gib": 20.1, "device_reserved_gib": 22.0,
                                                        "host_rss_gib": 5.2}},
                   "preview": {"status": "failed", "held": {"host_rss_gib": 2.0}}}}
    assert devices.memory_report(info) == [
        {"phase": "train", "name": "training", "planned_device_gib": 21.5, "held_device_allocated_gib": 20.1,
         "held_device_reserved_gib": 22.0, "planned_host_gib": 6.0, "held_host_gib": 5.2},
        {"phase": "preview", "name": "preview / inference", "planned_device_gib": 11.4,
         "held_device_allocated_gib": None, "held_device_reserved_gib": None, "planned_host_gib": 3.0,
         "held_host_gib": 2.0}]
    assert devices.memory_report({"plan": None, "stages": {}}) == []


# -- the allocator setting -----------------------------------------------------------------------------------------
def _allocator_after_importing_launch(env: dict) -> str:
    code = ("import os, runpy; runpy.run_path('launch.py', run_name='imported'); "
            "print(os.environ.get('PYTORCH_CUDA_ALLOC_CONF', '<unset>'))")
    base = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**base, **env}, capture_output=True, text=True,
                          timeout=60, check=True)
    return done.stdout.strip()


def test_launch_turns_on_expandable_segments_unless_the_user_set_the_allocator():
    assert _allocator_after_importing_launch({}) == "expandable_segments:True"
    assert _allocator_after_importing_launch({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}) == \
        "max_split_size_mb:128"
    assert _allocator_after_importing_launch({"PYTORCH_ALLOC_CONF": "backend:cudaMallocAsync"}) == "<unset>"
