"""How long one preview request takes, estimated beside its memory: an estimate from stated speeds, not a measurement.

A request is one prompt at one seed (FLUX) or one question (VLM), through the four variants (base, emulator + LoRA,
full + corrected, full + uncorrected LoRA), as pipelines/runner/variants.py holds them:
- "whole": each variant's model is read from disk once and moved to the GPU once;
- "offload": the full model and the emulator are read into RAM once; every forward copies their blocks to the GPU
  (the blocks kept on the GPU between forwards are copied once; the three full variants share them);
- "files": the same copies, each block read from disk on its way to the GPU (except those kept in RAM, on a GPU
  run, after their first read).

    time ≈ disk bytes ÷ disk bandwidth + host→GPU bytes ÷ PCIe bandwidth + FLOPs ÷ compute throughput

summed: the run reads the next block while one runs, so the real time is nearer the largest of the three terms.
FLOPs: 2 · parameters · tokens per variant (a forward multiplies every weight once per token).
"""

from __future__ import annotations

from dataclasses import dataclass

from emloc.memory import GiB, dtype_bytes

# what each family's preview runs per variant and request: denoising steps, or the answer's tokens
FLUX_STEPS = 28  # FLUX.1 [dev]'s default (--preview-steps; [schnell] takes 4, FLUX.2 [dev] 50)


@dataclass(frozen=True)
class Speeds:
    """The speeds the estimate assumes (none is measured here): a PCIe 4.0 machine with one consumer GPU."""

    disk: float = 3.0e9  # bytes/s: an NVMe SSD's sequential read (PCIe 4.0 drives: 3-7 GB/s; the low end)
    pcie: float = 20e9  # bytes/s: pinned host-to-GPU copies over PCIe 4.0 x16 (25 GB/s peak)
    gpu: float = 100e12  # FLOP/s: dense bf16 matmuls reached on a 24 GB card (RTX 4090: 165 TFLOP/s peak)
    cpu: float = 0.2e12  # FLOP/s: a desktop CPU's float32 matmuls (a CPU run)

    def words(self, device: str) -> str:
        compute = f"{self.gpu / 1e12:.0f} TFLOP/s of GPU compute" if device == "cuda" else \
            f"{self.cpu / 1e12:.1f} TFLOP/s of CPU compute"
        link = f", PCIe {self.pcie / 1e9:.0f} GB/s" if device == "cuda" else ""
        return f"disk {self.disk / 1e9:.0f} GB/s{link}, {compute}"


@dataclass
class PreviewTraffic:
    """What one preview request moves and computes, through all four variants."""

    disk_bytes: float
    device_bytes: float  # copied host -> GPU (0 on a CPU run: the weights are read where they are used)
    flops: float


def preview_traffic(mode: str, full: float, emulator: float, outside: float, forwards: int, tokens: float,
                    bytes_per_param: float, kept: float = 0.0, in_ram: float = 0.0,
                    device: str = "cuda") -> PreviewTraffic:
    """Bytes and FLOPs of one request. `full`, `emulator`: the models' weights in bytes; `outside`: the bytes outside
    their blocks (read once per model, shared by the full variants); `forwards`: forwards per variant (steps, or
    answer tokens + 1); `tokens`: tokens through each variant in all its forwards; `kept`: bytes of blocks kept on
    the device between forwards (read once); `in_ram`: ("files" on a GPU) bytes of blocks kept in host RAM after
    their first read (read from disk once, copied to the GPU every forward)."""
    flops = 2 * tokens * (3 * full + emulator) / bytes_per_param
    if mode == "whole":
        moved = 3 * full + emulator
        return PreviewTraffic(moved, moved if device == "cuda" else 0.0, flops)
    if mode not in ("offload", "files"):
        raise ValueError(f"preview mode must be whole, offload or files; got {mode!r}")
    full_disk, full_device = _streamed(outside, full - outside, forwards, 3, kept, in_ram)  # the full variants share
    emulator_disk, emulator_device = _streamed(outside, max(emulator - outside, 0.0), forwards, 1, kept, in_ram)
    disk = full + emulator if mode == "offload" else full_disk + emulator_disk
    return PreviewTraffic(disk, full_device + emulator_device if device == "cuda" else 0.0, flops)


def _streamed(outside: float, blocks: float, forwards: int, variants: int, kept: float,
              in_ram: float) -> tuple[float, float]:
    """(bytes read from the files, bytes copied to the device) of `variants` models of the same weights run
    `forwards` times each, block by block: the blocks kept on the device are read once, those kept in RAM are read
    once and copied every forward, the others read and copied every forward."""
    kept = min(kept, blocks)
    in_ram = min(in_ram, blocks - kept)
    moved = blocks - kept  # per forward
    device = outside + kept + variants * forwards * moved
    return outside + kept + in_ram + variants * forwards * (moved - in_ram), device


def preview_seconds(traffic: PreviewTraffic, speeds: Speeds = Speeds(), device: str = "cuda") -> float:
    """Seconds for `traffic`: disk ÷ disk bandwidth + host→GPU ÷ PCIe + FLOPs ÷ the device's throughput."""
    compute = speeds.gpu if device == "cuda" else speeds.cpu
    return traffic.disk_bytes / speeds.disk + traffic.device_bytes / speeds.pcie + traffic.flops / compute


def preview_time_line(plan, summary, tokens_per_forward: int, speeds: Speeds = Speeds()) -> str:
    """The planner's line: estimated time per preview request at the plan's preview mode, with its assumptions.
    `plan`: a planning.Plan; `summary`: its model's ModelSummary; `tokens_per_forward`: one sample's tokens."""
    s, counts = plan.memory.settings, plan.memory.counts
    preview = plan.get("preview", "emloc")
    mode = ("offload" if preview.offloaded else "files") if preview.streamed else "whole"
    b = dtype_bytes(s.dtype)
    if plan.family == "flux":
        forwards, tokens, what = FLUX_STEPS, FLUX_STEPS * tokens_per_forward, \
            f"{FLUX_STEPS} denoising steps ([dev]'s default; [schnell] 4) per image"
    else:  # the prompt once, then one token per forward (KV cache)
        forwards, tokens = s.generate_tokens + 1, tokens_per_forward + s.generate_tokens
        what = f"{s.generate_tokens} answer tokens after a {tokens_per_forward}-token prompt"
    budget = plan.budget_bytes if s.device == "cuda" else plan.ram_bytes
    used = preview.total if s.device == "cuda" else preview.host_total
    # as pipelines/runner/variants.py: half of what a budget leaves (less the block read ahead) keeps blocks, on the
    # device; and on a GPU in "files" mode, in RAM
    kept = max(0, (budget - used) / 2 - b * max(summary.blocks.values())) if budget is not None else 0
    in_ram = max(0, (plan.ram_bytes - preview.host_total) / 2) if s.device == "cuda" and plan.ram_bytes else 0
    outside = b * (summary.params - sum(summary.blocks.values()))
    traffic = preview_traffic(mode, b * counts.full, b * counts.emulator, outside, forwards, tokens, b, kept, in_ram,
                              s.device)
    seconds = preview_seconds(traffic, speeds, s.device)
    moved = f"{traffic.disk_bytes / GiB:.0f} GiB read from disk" + (
        f", {traffic.device_bytes / GiB:.0f} GiB copied to the GPU" if s.device == "cuda" else "")
    return (f"Preview time (estimate, not measured): ≈{_duration(seconds)} per request (one prompt at one seed, or "
            f"one question, through the 4 variants; preview mode {mode}): {moved}, {traffic.flops / 1e12:.0f} TFLOP. "
            f"Assumed: {speeds.words(s.device)}, {what}; transfers and compute summed (the next block is read while "
            "one runs, so it can be faster).")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
