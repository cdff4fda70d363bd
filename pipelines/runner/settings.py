"""What a run is asked to do: the settings every backend shares, the stage names and the run folder's files.

The CLI and the app are both built from `RunSettings`' fields, so a setting exists in one place.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch

import emloc
from emloc.memory import OPTIMIZERS
from emloc.quantized import check_kind

from .checks import check_device

STAGES = ("calibrate", "emulate", "train", "correct", "preview")
RUN_FILE = "run.json"
LOSS_LOG = "loss.jsonl"
STAGE_OUTPUT = {"calibrate": "calibration", "emulate": "emulator", "train": "adapter-emulator",
                "correct": "lora", "preview": "previews"}
PREVIEW_VARIANTS = ("base", "emulator + LoRA", "full + corrected LoRA", "full + uncorrected LoRA")



@dataclass
class RunSettings:
    """Settings every backend shares; the CLI and the app are built from these fields."""

    model: str = field(default="", metadata={"help": "hub id or local folder of the model (safetensors only); "
                                                              "default: the backend's small demo model in assets/"})
    ratio: float = field(default=0.45, metadata={"label": "Compression ratio", "help": "fraction of each compressed layer's parameters kept (0, 1]"})
    steps: int = field(default=500, metadata={"label": "Training steps", "help": "training steps"})
    lr: float = field(default=1e-4, metadata={"label": "Learning rate", "help": "learning rate (constant)"})
    rank: int = field(default=16, metadata={"label": "LoRA rank", "help": "LoRA rank r"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha: the update is scaled by alpha / r"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input"})
    batch_size: int = field(default=1, metadata={"label": "Batch size", "help": "samples per training step"})
    seed: int = field(default=0, metadata={"label": "Seed", "help": "seed of every random choice in the run"})
    optimizer: str = field(default="adamw", metadata={
        "help": "adamw; adamw8bit (bitsandbytes, CUDA only); adafactor (factored second moment, no momentum: the "
                "least optimiser memory)"})
    weight_decay: float = field(default=1e-4, metadata={"help": "decoupled weight decay of the optimiser"})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "recompute activations to save memory"})
    mixed_precision: str = field(default="auto", metadata={
        "help": "auto (bf16 on a GPU that has it natively, fp16 on older GPUs, none on the CPU), no, bf16 or fp16; "
                "resolved when the run is created and kept in run.json"})
    checkpoint_every: int = field(default=50, metadata={"label": "Checkpoint every N steps", "help": "save a training checkpoint every N steps"})
    keep_checkpoints: int = field(default=2, metadata={"help": "how many recent checkpoints to keep"})
    calibration_samples: int = field(default=16, metadata={"label": "Calibration samples", "help": "batches of your data used for calibration"})
    sample_every: int = field(default=-1, metadata={
        "help": "samples from the training emulator + LoRA every N steps, and at step 0 (-1: about five rounds "
                "in the run; 0: none)"})
    lam: float = field(default=3.0, metadata={"label": "Correction clamp λ", "help": "correction clamp λ: how far correcting the LoRA for the full model may move each of its components, at most λ times the component's own size (0: no correction, the LoRA as trained on the emulator; inf: unclamped)"})
    svd: str = field(default=emloc.DEFAULT_SOLVER, metadata={"help": "emulator factorisation: " + ", ".join(emloc.SOLVERS)})
    rules: list[str] = field(default_factory=list, metadata={
        "help": "compression rules REGEX=RATIO (first match wins); default: the backend's"})
    lora_targets: list[str] = field(default_factory=list, metadata={
        "help": "LoRA target regexes (fullmatch module names); default: the backend's"})
    keep_statistics: bool = field(default=False, metadata={
        "help": "keep the calibration statistics (Σ xᵀx of every layer) in the run folder; needs them all in memory "
                "at once instead of one block's"})
    ram_gb: float = field(default=0.0, metadata={"label": "RAM budget (GiB)",
        "help": "host memory (RAM) budget in GiB (0: what is available now); the run streams what does not fit and "
                "refuses to start when nothing fits"})
    gpu_gb: float = field(default=0.0, metadata={"label": "GPU memory budget (GiB)",
        "help": "GPU memory budget in GiB (0: the device's free memory); ignored on a CPU run"})
    device: str = field(default="auto", metadata={
        "help": "auto, cpu, cuda or cuda:N; a run keeps the kind it was made on (with --resume: where to continue)"})
    offload: bool = field(default=False, metadata={
        "help": "calibrate with the full model in CPU memory, one layer at a time on the GPU (for models larger than it)"})
    emulator_kind: str = field(default="lowrank", metadata={"label": "Emulator kind", "help":
        "what stands in for the model while the LoRA trains (each is corrected onto the full model): lowrank (the "
        "activation-aware SVD at the compression ratio), nf4 (every compressed layer whole, in 4 bits), lowrank-nf4 "
        "(the low-rank factors stored in 4 bits: about a quarter of lowrank's memory at the same ratio)"})

    def resolved_device(self) -> torch.device:
        """`auto` means the first CUDA device when there is one, else the CPU."""
        if self.device == "auto":  # one device per process under accelerate launch / torchrun
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
                else torch.device("cpu")
        check_device(self.device)  # a ValueError in words, before torch's RuntimeError
        return torch.device(self.device)

    def check(self) -> None:
        """Raise a ValueError for a setting outside its range, naming the setting."""
        if not self.model:
            raise ValueError("no model given; pass a hub id or a local folder (--model)")
        emloc.rules.check_ratio(self.ratio, "--ratio")
        if self.sample_every < -1:
            raise ValueError(f"--sample-every must be a number of steps (0: no samples, -1: about five rounds); "
                             f"got {self.sample_every}")
        for name in ("ram_gb", "gpu_gb"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a number of GiB >= 0 (0: detect); got {value}")
        for name in ("steps", "rank", "batch_size", "checkpoint_every", "keep_checkpoints", "calibration_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(self, name)}")
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"--lr must be a positive number; got {self.lr}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"--alpha must be a positive number (the update is scaled by alpha / rank); "
                             f"got {self.alpha}")
        if not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"--weight-decay must be a number >= 0; got {self.weight_decay}")
        if not 0 <= self.lora_dropout < 1:  # also refuses nan
            raise ValueError(f"--lora-dropout must be at least 0 and below 1; got {self.lora_dropout}")
        for pattern in self.lora_targets:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"--lora-targets {pattern!r} is not a valid regex ({err})") from None
        check_device(self.device)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(f"--mixed-precision must be auto, no, bf16 or fp16; got {self.mixed_precision!r}")
        if self.svd not in emloc.SOLVERS:
            raise ValueError(f"--svd must be one of {', '.join(emloc.SOLVERS)}; got {self.svd!r}")
        if not self.lam >= 0:  # inf is allowed (unclamped); nan and negatives are not
            raise ValueError(f"--lam must be a number >= 0 (0: no correction, inf: unclamped); got {self.lam}")
        parse_rules(self.rules)
        check_kind(self.emulator_kind)

    def lora(self, targets: list[str]) -> emloc.LoraSettings:
        """The LoRA of this run on `targets` (regexes)."""
        return emloc.LoraSettings(rank=self.rank, alpha=self.alpha, targets=targets, dropout=self.lora_dropout)


def parse_rules(rules: list[str]) -> list[tuple[str, float]]:
    """`["REGEX=RATIO", ...]` -> `[(regex, ratio)]`, checked."""
    parsed = []
    for rule in rules:
        pattern, sep, ratio = rule.rpartition("=")
        if not sep:
            raise ValueError(f"compression rule {rule!r} must look like REGEX=RATIO, e.g. '.*attn.*=0.5'")
        try:
            parsed.append((pattern, float(ratio)))
        except ValueError:
            raise ValueError(f"compression rule {rule!r}: {ratio!r} is not a number") from None
    return emloc.normalise_rules(parsed) if parsed else []


def settings_from_dict(cls: type, data: dict) -> Any:
    """A settings dataclass from a dict, ignoring keys it does not know (older or newer run.json)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def sample_interval(settings: RunSettings) -> int:
    """Steps between training samples: --sample-every, or (-1) about five rounds in the run; 0: none."""
    if settings.sample_every >= 0:
        return settings.sample_every
    return max(1, settings.steps // 5)
