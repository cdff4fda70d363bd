"""The planner's estimated time per preview: bytes moved ÷ stated bandwidths + FLOPs ÷ a stated throughput."""

from __future__ import annotations

import pytest

from pipelines.planner.planning import PlanSettings, plan_run
from pipelines.planner.preview_time import PreviewTraffic, Speeds, preview_seconds, preview_traffic


def test_traffic_counts_each_mode_as_the_preview_holds_the_model():
    full, emulator, outside, steps = 100.0, 40.0, 10.0, 5
    whole = preview_traffic("whole", full, emulator, outside, steps, tokens=7, bytes_per_param=2)
    assert whole.disk_bytes == whole.device_bytes == 3 * 100 + 40  # each variant loaded once
    assert whole.flops == pytest.approx(2 * 7 * (3 * 100 + 40) / 2)  # 2 · parameters · tokens
    files = preview_traffic("files", full, emulator, outside, steps, tokens=7, bytes_per_param=2)
    # the full variants share what is outside the blocks; every forward reads every block
    assert files.disk_bytes == files.device_bytes == (10 + 3 * 5 * 90) + (10 + 5 * 30)
    offload = preview_traffic("offload", full, emulator, outside, steps, tokens=7, bytes_per_param=2)
    assert offload.disk_bytes == 140 and offload.device_bytes == files.device_bytes  # read once, copied as files
    kept = preview_traffic("files", full, emulator, outside, steps, tokens=7, bytes_per_param=2, kept=1000.0)
    assert kept.disk_bytes == kept.device_bytes == 100 + 40  # every block kept: each model read once
    in_ram = preview_traffic("files", full, emulator, outside, steps, tokens=7, bytes_per_param=2, in_ram=1000.0)
    assert in_ram.disk_bytes == 100 + 40 and in_ram.device_bytes == files.device_bytes  # read once, copied as files
    some = preview_traffic("files", full, emulator, outside, steps, tokens=7, bytes_per_param=2, kept=30.0, in_ram=20.0)
    assert some.device_bytes == (10 + 30 + 3 * 5 * 60) + (10 + 30)  # the emulator's 30 bytes of blocks all kept
    assert some.disk_bytes == (10 + 30 + 20 + 3 * 5 * 40) + (10 + 30)
    cpu = preview_traffic("files", full, emulator, outside, steps, tokens=7, bytes_per_param=2, device="cpu")
    assert cpu.device_bytes == 0 and cpu.disk_bytes == files.disk_bytes
    with pytest.raises(ValueError, match="whole, offload or files"):
        preview_traffic("disk", full, emulator, outside, steps, tokens=7, bytes_per_param=2)


def test_seconds_are_bytes_over_bandwidths_plus_flops_over_throughput():
    traffic = PreviewTraffic(disk_bytes=6e9, device_bytes=40e9, flops=300e12)
    speeds = Speeds(disk=3e9, pcie=20e9, gpu=100e12, cpu=1e12)
    assert preview_seconds(traffic, speeds) == pytest.approx(2 + 2 + 3)
    assert preview_seconds(traffic, speeds, "cpu") == pytest.approx(2 + 2 + 300)


def test_the_plan_prints_the_estimate_with_its_assumptions_and_offload_beats_files():
    # lowrank's emulator, pinned: with no kind the plan picks nf4 at 16 GB, whose smaller emulator variant brings
    # both modes to the same rounded minutes (the modes differ in the full model's reads, which this compares)
    roomy = plan_run("black-forest-labs/FLUX.1-dev", PlanSettings(budget_gb=16, ram_gb=64, emulator_kind="lowrank"))
    tight = plan_run("black-forest-labs/FLUX.1-dev", PlanSettings(budget_gb=16, ram_gb=32, emulator_kind="lowrank"))
    assert roomy.get("preview", "emloc").offloaded and not tight.get("preview", "emloc").offloaded
    lines = {}
    for name, plan in (("offload", roomy), ("files", tight)):
        line = next(row for row in plan.to_markdown().splitlines() if row.startswith("Preview time"))
        assert "estimate" in line and "disk 3 GB/s" in line and "PCIe 20 GB/s" in line and "TFLOP/s" in line
        assert f"preview mode {name}" in line
        lines[name] = line
    minutes = {name: _minutes(line) for name, line in lines.items()}
    assert minutes["offload"] < minutes["files"], lines  # RAM instead of the disk on the steps "files" cannot keep


def _minutes(line: str) -> float:
    value, unit = line.split("≈", 1)[1].split(" per request")[0].split()
    return float(value) * {"s": 1 / 60, "min": 1, "h": 60}[unit]
