"""A trivial backend for run-machine tests (regression y = 2x on a 2-layer MLP) and helpers to inspect its runs;
the `fake` fixture (conftest.py) registers it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pipelines.runner import Backend


@dataclass
class FakeSettings:
    """Settings of the fake backend (exercise CLI options built from a backend's dataclass)."""

    data: str = field(default="", metadata={"help": "a JSON file with a list of numbers"})
    probe: list[float] = field(default_factory=lambda: [1.0], metadata={"help": "preview inputs", "preview": "--probe"})


class FakeBackend(Backend):
    """Regression y = 2x on a 2-layer MLP; every hook counts its calls."""

    name = "fake"
    settings_class = FakeSettings
    calls: dict[str, int] = {}
    fail_at_step: int | None = None

    def _count(self, what: str) -> None:
        FakeBackend.calls[what] = FakeBackend.calls.get(what, 0) + 1

    def validate(self):
        values = json.loads(Path(self.settings.data).read_text())
        if len(values) < 4:
            raise ValueError(f"{self.settings.data}: need at least 4 numbers, found {len(values)}")

    def copy_data(self, folder):
        folder.mkdir(parents=True)
        (folder / "values.json").write_text(Path(self.settings.data).read_text())
        return {"values": 1}

    def use_data(self, folder):
        self.values = torch.tensor(json.loads((folder / "values.json").read_text()), dtype=torch.float32)

    def build_cache(self, folder):
        self._count("build_cache")
        x = self.values[:, None].repeat(1, 8) * torch.linspace(0.5, 1.5, 8)  # (n, 8)
        torch.save({"x": x, "y": 2 * x}, folder / "xy.pt")

    def load_cache(self, folder):
        self.xy = torch.load(folder / "xy.pt", weights_only=True)

    def load_model(self, device):
        self._count("load_model")
        torch.manual_seed(123)
        return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8)).to(device).requires_grad_(False)

    def default_rules(self, ratio):
        return [(r"\d+", ratio)]

    def default_lora_targets(self):
        return [r"\d+"]

    def calibration_batches(self):
        return iter(self.xy["x"][i:i + 2] for i in range(0, len(self.xy["x"]), 2))

    def calibration_forward(self, model, batch):
        return model(batch)

    def training_loss(self, model, step, generator):
        self._count("train_step")
        if FakeBackend.fail_at_step == step:
            raise RuntimeError("simulated crash")
        pick = torch.randint(len(self.xy["x"]), (2,), generator=generator)
        x = self.xy["x"][pick] + 0.01 * torch.randn(2, 8, generator=generator)
        return ((model(x) - self.xy["y"][pick]) ** 2).mean()

    def generate(self, model, label):
        return [float(model(torch.full((1, 8), p)).sum()) for p in self.settings.probe]

    def write_previews(self, folder, outputs):
        (folder / "outputs.json").write_text(json.dumps(outputs))
        return [folder / "outputs.json"]


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter-emulator" / "adapter_model.safetensors"))
