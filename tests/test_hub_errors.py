"""No network, in words: a catalogue model that is not downloaded is refused at once (exit 2, no traceback), with
HF_HUB_OFFLINE=1 and without it (a hub that refuses connections: huggingface_hub 2.4 raises httpx2.ConnectError
there, after ~23 s of retries), and the plan of a catalogue model stays available."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from pipelines.planner import cli as plan_cli
from pipelines.runner import checks

ROOT = Path(__file__).resolve().parents[1]
FLUX_DEV = "black-forest-labs/FLUX.1-dev"
# "At once": the hub is never retried (huggingface_hub logs each retry, "Retrying in 1s [Retry 1/5]", and sleeps
# 1 + 2 + 4 + 8 + 8 s). The wall clock is checked loosely only: on a loaded CI machine the imports alone can take 15 s.
SLOWEST_SECONDS = 60


def refused_endpoint() -> str:
    """An http:// address on this machine where nothing listens (a connection is refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def hub_env(tmp_path: Path, offline: bool) -> dict[str, str]:
    """The environment of a machine without network: an empty hub cache, no proxy, the hub unreachable."""
    env = {k: v for k, v in os.environ.items() if "PROXY" not in k.upper() and not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_ENDPOINT=refused_endpoint(), OMP_NUM_THREADS="1")
    env.pop("TRANSFORMERS_OFFLINE", None)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (60 * i, 90, 120)).save(folder / f"{i}.png")
    return folder


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE=1", "hub-unreachable"])
def test_training_a_catalogue_model_that_is_not_downloaded_exits_2_in_words_at_once(offline, photos, tmp_path):
    out = tmp_path / "runs" / "a"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "launch.py", "train", "--backend", "flux", "--model", FLUX_DEV, "--images", str(photos),
         "--prompt", "a photo of sks cross", "--device", "cpu", "--quiet", "--out", str(out)],
        cwd=ROOT, env=hub_env(tmp_path, offline), capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - started
    said = done.stderr + done.stdout
    assert done.returncode == 2, said
    assert "Traceback" not in said and not out.exists()
    assert f"--model {FLUX_DEV}" in said and "--local-dir FOLDER" in said, said
    if offline:
        assert "is not downloaded and this machine is offline (HF_HUB_OFFLINE=1)" in said, said
    else:
        assert "the Hugging Face hub cannot be reached" in said and "HF_HUB_OFFLINE=1" in said, said
    assert "Retrying in" not in said and seconds < SLOWEST_SECONDS, f"took {seconds:.1f} s: {said}"


def test_planning_a_hub_id_outside_the_catalogue_without_a_hub_exits_2_in_words(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for proxy in [k for k in os.environ if "PROXY" in k.upper()]:
        monkeypatch.delenv(proxy)
    monkeypatch.setattr(constants, "ENDPOINT", refused_endpoint())
    started = time.monotonic()
    assert plan_cli.main(["--model", "someone/not-in-the-catalogue"]) == 2
    err = capsys.readouterr().err
    assert "the Hugging Face hub cannot be reached" in err and "Connection refused" in err, err
    assert "--local-dir FOLDER" in err and "Retrying in" not in err and time.monotonic() - started < SLOWEST_SECONDS
    # a catalogue id is planned from assets/models/ with no network at all
    assert plan_cli.main(["--model", FLUX_DEV, "--budget-gb", "24"]) == 0
    assert "FLUX.1 [dev]" in capsys.readouterr().out


def test_planning_a_hub_id_outside_the_catalogue_offline_exits_2_in_words(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert plan_cli.main(["--model", "someone/not-in-the-catalogue"]) == 2
    assert "the hub is offline (HF_HUB_OFFLINE)" in capsys.readouterr().err


def test_network_errors_are_told_from_answers_of_the_hub():
    import httpx2
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError

    request = httpx2.Request("GET", "https://huggingface.co/api/models/x/y")
    assert checks.is_network_error(httpx2.ConnectError("refused", request=request))
    assert checks.is_network_error(OfflineModeIsEnabled("offline"))
    assert checks.is_network_error(LocalEntryNotFoundError("not cached, hub unreachable"))
    assert not checks.is_network_error(RepositoryNotFoundError("404", response=httpx2.Response(404, request=request)))
    assert not checks.is_network_error(ValueError("a bad setting"))
