"""Two processes (`torchrun --nproc_per_node 2 launch.py train`, gloo on CPU: accelerate's MULTI_CPU) train
the same LoRA as one process with the same total batch, and write one run folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from flux_fixtures import save_tiny_flux, write_subject_images
from pipelines.runner import cli

pytestmark = pytest.mark.slow  # torchrun with 2 processes, then 1: 58 s (loaded 2-core machine)

REPO = Path(__file__).resolve().parents[1]
STEPS = 3
# Same data, emulator and initial LoRA; the gradient of the 2-sample mean equals the mean of the two processes'
# 1-sample gradients (DDP), so the adapters differ only by float32 summation order, amplified by Adam where a
# gradient is near zero (g/√v): measured 0.5% of what the last step moved. A wrong shard or average moves
# the adapter differently by tens of percent.
ADAPTER_TOLERANCE = 1e-2  # max |difference| relative to the largest change training made to each tensor
LOSS_TOLERANCE = 1e-5  # relative, per logged step (the logged loss is the mean over the processes)



def _common(model: Path, images: Path) -> list[str]:
    return ["--backend", "flux", "--model", str(model), "--images", str(images), "--prompt", "sks dog",
            "--steps", str(STEPS), "--checkpoint-every", "2", "--seed", "5", "--stages", "calibrate", "emulate", "train",
            "--quiet", "--resolution", "32", "--max-sequence-length", "16", "--rank", "4", "--alpha", "8",
            "--calibration-samples", "2", "--lr", "1e-3"]


def test_two_processes_match_one_process_with_the_same_total_batch(tmp_path):
    model = save_tiny_flux(tmp_path / "tiny-flux")
    write_subject_images(tmp_path / "dog", count=4, seed=1)
    common = _common(model, tmp_path / "dog")
    runs = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    # --standalone: a free rendezvous port, so parallel test runs do not collide on torchrun's default 29500
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "launch.py"), "train", *common, "--batch-size", "1", "--out", str(runs / "two"),
               "--stages", "calibrate", "emulate", "train", "correct"]  # the main one corrects alone, after the other left
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as two:
        try:
            stdout, stderr = two.communicate(timeout=150)
        except subprocess.TimeoutExpired:
            os.killpg(two.pid, signal.SIGKILL)  # torchrun and both workers: no orphans left training
            stdout, stderr = two.communicate()
            pytest.fail("torchrun did not finish in 150 s:\n" + stderr[-3000:])
    assert two.returncode == 0, stdout[-2000:] + stderr[-3000:]
    assert sorted(p.name for p in runs.iterdir()) == ["two"]  # no per-process folders, no leftovers
    assert not list((runs / "two").glob("**/*.tmp")) and not list((runs / "two").glob("*.creating-*"))
    info = json.loads((runs / "two" / "run.json").read_text())
    assert {s: info["stages"][s]["status"] for s in ("calibrate", "emulate", "train", "correct")} == dict.fromkeys(
        ("calibrate", "emulate", "train", "correct"), "done")
    assert (runs / "two" / "lora" / "corrected").is_dir()

    assert cli.main([*common, "--batch-size", "2", "--out", str(runs / "one")]) == 0

    logs = [[json.loads(line) for line in (runs / name / "loss.jsonl").read_text().splitlines()] for name in ("two", "one")]
    assert [e["step"] for e in logs[0]] == list(range(1, STEPS + 1))  # one line per step: only rank 0 writes
    for a, b in zip(*logs):
        assert abs(a["loss"] - b["loss"]) <= LOSS_TOLERANCE * abs(b["loss"]), (a, b)
    adapters = [load_file(str(runs / name / "adapter-emulator" / "adapter_model.safetensors")) for name in ("two", "one")]
    assert adapters[0].keys() == adapters[1].keys()
    start = load_file(str(runs / "one" / "checkpoints" / "step-000002" / "adapter.safetensors"))  # not the final one
    moved = max(float((adapters[1][k] - start[k]).abs().max()) for k in start if "lora_B" in k)
    assert moved > 1e-4  # training changed the adapter, so matching it is not trivial
    for key, one in adapters[1].items():
        diff = float((adapters[0][key] - one).abs().max())
        change = float((one - start[key]).abs().max())
        assert diff <= ADAPTER_TOLERANCE * max(change, 1e-6), f"{key}: max |diff| {diff:.2e}, moved {change:.2e}"
    # and not what one process makes of one row a step: the second process's gradients arrived (this was
    # test_flux.py's own torchrun run; one launch of torchrun checks both)
    assert cli.main([*common, "--batch-size", "1", "--out", str(runs / "alone")]) == 0
    alone = load_file(str(runs / "alone" / "adapter-emulator" / "adapter_model.safetensors"))
    assert max(float((alone[k] - adapters[0][k]).abs().max()) for k in alone if "lora_B" in k) > 1e-6


def test_a_refusal_on_the_main_process_ends_every_process_at_once(tmp_path):
    """Run.create runs on the main process only; when it refuses (here: the folder exists), the other process is
    told and stops with the same words, instead of waiting in a barrier for a folder that will not come."""
    model = save_tiny_flux(tmp_path / "tiny-flux")
    write_subject_images(tmp_path / "dog", count=4, seed=1)
    taken = tmp_path / "runs" / "taken"
    taken.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "launch.py"), "train", *_common(model, tmp_path / "dog"), "--out", str(taken)]
    began = time.monotonic()
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as two:
        try:
            _, stderr = two.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(two.pid, signal.SIGKILL)
            _, stderr = two.communicate()
            pytest.fail("a refused run kept torchrun waiting for 90 s:\n" + stderr[-3000:])
    assert two.returncode != 0
    assert stderr.count("already exists; choose another --out") == 2, stderr[-3000:]  # the main's, and the other's
    assert "error: the main process could not create the run" in stderr
    assert time.monotonic() - began < 90
    assert list(taken.iterdir()) == []  # nothing written into the user's folder
