"""Where and in what precision a run computes, and what it held there.

A run's device, weight dtype and mixed precision are resolved once, when the run is created, and kept in run.json
under "machine". A reopened run computes in the recorded dtype and precision, and refuses, in words, to compute on
a device of another kind than the recorded one unless the user names the device (`--device`): `auto` is never
re-resolved silently, so a run emulated on a GPU in bfloat16 is not resumed on the CPU in float32 (review F15).

`auto` precision is bfloat16 only on a GPU that has it natively (compute capability 8.0 and up), float16 on older
GPUs, float32 on the CPU (F13). Training creates its `Accelerator` through `new_accelerator`, which first makes
the run's CUDA device the current one (`--device cuda:1` must not train on cuda:0, F3) and starts accelerate's
per-process state afresh (a second job in the app's process may ask another precision, F12).

Under torchrun the process group waits hours, not NCCL's 10 minutes, for the stages the main process runs alone
(F8; `distributed_state`).

Each stage records what it held (`held_memory`): the device's allocated and reserved peaks and the host's peak
resident memory, beside the plan's figures; `memory_report` puts the two side by side for the app (F9).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any, Iterator

import torch

log = logging.getLogger(__name__)

MACHINE = "machine"  # run.json: {"device", "dtype", "mixed_precision", "note"} resolved when the run was created
GiB = 1024 ** 3
PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
HOST_SAMPLE_SECONDS = 0.05  # how often the host's resident memory is read while a stage runs


# How long the other processes of a torchrun job may wait in a barrier while the main one alone builds the cache,
# calibrates and builds the emulator: hours on a consumer GPU (float64 factorisation, streamed reads), where NCCL's
# default of 10 minutes would abort them and torchrun would then kill the main process mid-stage. A process that
# fails still ends the job at once: torchrun stops every worker when one exits with an error.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(hours=24)


def distributed_state(device: torch.device | None = None):
    """accelerate's view of the processes: one, or several under `accelerate launch` / `torchrun`."""
    from accelerate import PartialState

    cpu = device.type == "cpu" if device is not None else not torch.cuda.is_available()
    return PartialState(cpu=cpu, timeout=PROCESS_GROUP_TIMEOUT)


# -- device and precision ----------------------------------------------------------------------------------------
def use_device(device: torch.device) -> None:
    """Make an indexed CUDA device this thread's current one: accelerate and PEFT place tensors on plain "cuda",
    which is the current device (cuda:0 unless set), while the run's batches are made on `device`."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def auto_precision(device: torch.device) -> tuple[str, str]:
    """(mixed precision, why) that `--mixed-precision auto` means on `device`; `why` is "" when nothing needs saying.

    bfloat16 only where the GPU computes it natively: PyTorch reports bfloat16 as "supported" on Turing and Pascal
    cards by emulating it, without tensor cores or fast attention kernels."""
    if device.type != "cuda":
        return "no", ""
    use_device(device)
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return "bf16", ""
    major, minor = torch.cuda.get_device_capability(device)
    return "fp16", (f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) has no native "
                    "bfloat16, so training runs in float16; pass --mixed-precision bf16 for bfloat16 (emulated, "
                    "slower) or no for float32 (twice the memory)")


def run_precision(requested: str, device: torch.device) -> tuple[str, str]:
    """(mixed precision, why) of a new run: what `--mixed-precision` asks, with `auto` resolved for `device`."""
    return auto_precision(device) if requested == "auto" else (requested, "")


def weight_dtype(precision: str, backend_dtype: torch.dtype | None) -> torch.dtype | None:
    """The frozen weights' dtype: the backend's choice, except that a half-precision model computes in the
    autocast's half type (bf16 weights under fp16 autocast would be cast again by every operation)."""
    half = PRECISION_DTYPES.get(precision)
    if half is not None and backend_dtype in PRECISION_DTYPES.values():
        return half
    return backend_dtype


def dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).replace("torch.", "")


def machine_record(requested_precision: str, backend: Any) -> dict:
    """run.json's "machine" for a new run whose backend was built on its device; sets the backend's dtype."""
    precision, note = run_precision(requested_precision, backend.device)
    if note:
        log.warning("%s", note)
    if getattr(backend, "dtype", None) is not None:
        backend.dtype = weight_dtype(precision, backend.dtype)
    return {"device": str(backend.device), "dtype": dtype_name(getattr(backend, "dtype", None)),
            "mixed_precision": precision, "note": note}


def apply_record(backend: Any, record: dict) -> None:
    """Give a reopened run's backend the dtype the run was made in (its factors and checkpoints are in it)."""
    if record.get("dtype") and getattr(backend, "dtype", None) is not None:
        backend.dtype = getattr(torch, record["dtype"])


def device_refusal(record: dict | None, device: torch.device, run_dir: Path, given: bool) -> str:
    """Why a reopened run must not compute on `device` ("" when it may): the kind of device differs from the
    recorded one and the user did not name it."""
    if not record or given or torch.device(record["device"]).type == device.type:
        return ""
    here = "has no CUDA GPU that PyTorch can use" if device.type == "cpu" else f"computes on {device}"
    return (f"{run_dir.name} was made on {record['device']} in {record['dtype'] or 'its dtype'} and this machine "
            f"{here}; continue it where it was made (check the GPU driver and CUDA_VISIBLE_DEVICES), or name the "
            f"device to continue here in {record['dtype'] or 'its dtype'}: launch.py train --out {run_dir} "
            f"--resume --device {device.type} (launch.py preview takes --device too)")


def new_accelerator(device: torch.device, mixed_precision: str):
    """An `Accelerator` for one training on `device`: accelerate's per-process state is started afresh (one
    process, e.g. the app, may train a CPU run after a GPU one, or in another precision), and an indexed CUDA
    device is made current first, so accelerate places the model on it and not on cuda:0."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    several = int(os.environ.get("WORLD_SIZE", "1")) > 1  # torchrun: the process group stays
    AcceleratorState._reset_state(reset_partial_state=not several)
    use_device(device)
    return Accelerator(mixed_precision=mixed_precision, cpu=device.type == "cpu")


# -- what a stage held ---------------------------------------------------------------------------------------------
def _host_rss() -> tuple[int, int]:
    """(current, peak so far) resident memory of this process, bytes; the peak is the kernel's high-water mark."""
    try:
        status = Path("/proc/self/status").read_text()
        now, peak = (int(re.search(rf"{k}:\s+(\d+) kB", status).group(1)) * 1024 for k in ("VmRSS", "VmHWM"))
        return now, peak
    except (OSError, AttributeError):  # not Linux
        import psutil

        rss = psutil.Process().memory_info().rss
        return rss, rss


@contextlib.contextmanager
def held_memory(device: torch.device) -> Iterator[dict]:
    """Measure a stage: yields a dict that is filled, when the stage ends (also by an error), with the peaks it
    held in GiB: `device_allocated_gib` / `device_reserved_gib` (CUDA only; the peak counters are reset at the
    start) and `host_rss_gib`.

    The host peak is the process's high-water mark when the stage raised it, which is exact; otherwise the highest
    resident size read every 50 ms during the stage (a lower bound). The high-water mark itself is never reset:
    benchmarks read it for the whole process."""
    held: dict[str, float] = {}
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start_peak = _host_rss()[1]
    sampled = [_host_rss()[0]]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(HOST_SAMPLE_SECONDS):
            sampled[0] = max(sampled[0], _host_rss()[0])

    sampler = threading.Thread(target=sample, name="host-memory-sampler", daemon=True)
    sampler.start()
    try:
        yield held
    finally:
        stop.set()
        sampler.join()
        now, peak = _host_rss()
        host = peak if peak > start_peak else max(sampled[0], now)
        if cuda:
            held["device_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / GiB, 3)
            held["device_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / GiB, 3)
        held["host_rss_gib"] = round(host / GiB, 3)


# which of the plan's phases a stage is (emloc.memory's phase keys); the cache is built before the stages
STAGE_PHASES = {"cache": "embeddings", "calibrate": "calibration", "emulate": "emulator", "train": "training",
                "correct": "correction", "preview": "preview"}


def memory_report(info: dict) -> list[dict]:
    """Planned against held memory, one row per measured phase of a run, in the order they ran: the cache, each
    stage, each later preview (`launch.py preview`). A row is {"phase", "name", "planned_device_gib",
    "held_device_allocated_gib", "held_device_reserved_gib", "planned_host_gib", "held_host_gib"}; a figure that is
    not known is None (no plan for this model, a CPU run's device figures). Stages run before they were measured
    have no row. `info` is run.json."""
    phases = ((info.get("plan") or {}).get("phases")) or {}
    measured = [("cache", (info.get("cache") or {}).get("held"))]
    measured += [(stage, entry.get("held")) for stage, entry in (info.get("stages") or {}).items()
                 if isinstance(entry, dict)]
    measured += [(f"preview {name}", entry.get("held")) for name, entry in (info.get("later_previews") or {}).items()]
    rows = []
    for phase, held in measured:
        if not held:
            continue
        planned = phases.get(STAGE_PHASES.get(phase.split(" ")[0], phase)) or {}
        rows.append({"phase": phase, "name": planned.get("name", phase),
                     "planned_device_gib": planned.get("device_gib"),
                     "held_device_allocated_gib": held.get("device_allocated_gib"),
                     "held_device_reserved_gib": held.get("device_reserved_gib"),
                     "planned_host_gib": planned.get("host_gib"), "held_host_gib": held.get("host_rss_gib")})
    return rows
