"""LoRA on the emulator with PEFT (docs/method.md step 3), and the corrected adapter on the full model.

`ΔW = s·B A`, `s = lora_alpha / r` (rsLoRA: `lora_alpha / √r`). LowRankLinear is registered with PEFT
as a custom module, so LoRA wraps it exactly like an nn.Linear; targets are resolved here to exact
module names, never the `.u`/`.v` children, so that the same adapter loads on the full model.
The registration is not saved by PEFT: every load onto an emulator goes through `load_adapter`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from .lowrank import LowRankLinear
from .quantized import NF4Linear, first_device
from .rules import factor_names

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class LoraSettings:
    """The LoRA a run trains; the CLI and the app are built from these fields."""

    rank: int = 16  # r: rank of B A
    alpha: float = 16.0  # lora_alpha: the update is scaled by alpha / r
    targets: list[str] = field(default_factory=lambda: [r".*"])  # regexes that fullmatch module names
    dropout: float = 0.0  # dropout on the LoRA input
    rslora: bool = False  # scale by alpha / sqrt(r) instead (rank-stabilised LoRA)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def lora_scaling(config: LoraConfig) -> float:
    """`s` of a PeftConfig: `lora_alpha / r`, or `lora_alpha / √r` with rsLoRA."""
    return config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)


def config_with_rank(config: LoraConfig, rank: int) -> LoraConfig:
    """A copy of `config` at LoRA rank `rank` with the same scaling `s` (lora_alpha = s·rank, or s·√rank with
    rsLoRA): the config of a corrected adapter whose rank the correction changed (correct_lora(method="rank2r"))."""
    if getattr(config, "rank_pattern", None) or getattr(config, "alpha_pattern", None):
        raise ValueError("the adapter has per-layer ranks or alphas (rank_pattern / alpha_pattern); "
                         "config_with_rank only widens a single-rank adapter")
    widened = copy.deepcopy(config)
    scaling = lora_scaling(config)
    widened.r = rank
    widened.lora_alpha = scaling * (math.sqrt(rank) if config.use_rslora else rank)
    return widened


def lora_target_names(model: nn.Module, patterns: list[str]) -> list[str]:
    """Names of the Linear / LowRankLinear modules that fullmatch any pattern (never `.u`/`.v`)."""
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise ValueError(f"LoRA target pattern {pattern!r} is not a valid regex: {err}") from None
    inside = factor_names(model)
    names = [name for name, module in model.named_modules()
             if isinstance(module, (nn.Linear, LowRankLinear, NF4Linear)) and name not in inside
             and any(p.fullmatch(name) for p in compiled)]
    if not names:
        raise ValueError(f"no linear layer matches the LoRA targets {patterns}; patterns must fullmatch module names")
    return names


def _register(config: LoraConfig) -> LoraConfig:
    config._register_custom_module({LowRankLinear: PeftLoraLinear, NF4Linear: PeftLoraLinear})
    return config


def lora_config(model: nn.Module, settings: LoraSettings) -> LoraConfig:
    """A PEFT LoraConfig for `model` with explicit target names and LowRankLinear registered."""
    if settings.rank < 1:
        raise ValueError(f"LoRA rank must be at least 1; got {settings.rank}")
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        use_rslora=settings.rslora, target_modules=lora_target_names(model, settings.targets))
    return _register(config)


def _move_adapters_to_base(model: nn.Module) -> None:
    # PEFT finds a base layer's device from its `.weight`; LowRankLinear has none (on purpose), so the
    # adapters of wrapped emulator layers are moved to the device of their factors here.
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if isinstance(base, (LowRankLinear, NF4Linear)):
            device = first_device(base)
            for part in ("lora_A", "lora_B"):
                getattr(module, part).to(device)


def attach_lora(model: nn.Module, settings: LoraSettings | LoraConfig, adapter_name: str = "default") -> PeftModel:
    """Wrap `model` (emulator or full) with a trainable LoRA adapter."""
    config = lora_config(model, settings) if isinstance(settings, LoraSettings) else _register(settings)
    with warnings.catch_warnings():  # PEFT warns about every custom module, though it is registered
        warnings.filterwarnings("ignore", message="Unsupported layer type")
        peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    _move_adapters_to_base(peft_model)
    return peft_model


def load_adapter(model: nn.Module, path: str | os.PathLike, is_trainable: bool = False,
                 adapter_name: str = "default") -> PeftModel:
    """Load a saved adapter folder onto `model` (full model or emulator)."""
    folder = Path(path)
    if not (folder / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{folder} is not an adapter folder (no {ADAPTER_CONFIG})")
    config = _register(LoraConfig.from_pretrained(str(folder)))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unsupported layer type")
        peft_model = PeftModel.from_pretrained(model, str(folder), adapter_name=adapter_name,
                                               is_trainable=is_trainable, config=config)
    _move_adapters_to_base(peft_model)
    return peft_model


def adapter_state(peft_model: PeftModel, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's weights in PEFT's saved format (`base_model.model.<name>.lora_A.weight`)."""
    return {k: v.detach() for k, v in get_peft_model_state_dict(peft_model, adapter_name=adapter_name).items()}


def adapter_factors(state: Mapping[str, torch.Tensor], config: LoraConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`{module name: (A, s·B)}` (float32; A: r x in, B: out x r) of a saved adapter, so that a layer's output
    plus `(x Aᵀ)(s·B)ᵀ` is what PEFT's unmerged LoRA computes, on a dense or a factored layer alike."""
    scaling = lora_scaling(config)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = re.match(r"^(?:base_model\.model\.)?(?P<name>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$", key)
        if match:
            pairs.setdefault(match["name"], {})[match["part"]] = tensor.float()
    return {name: (p["A"], scaling * p["B"]) for name, p in pairs.items() if set(p) == {"A", "B"}}


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """State dict and config of a saved adapter folder (safetensors only)."""
    folder = Path(path)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{folder} has no {ADAPTER_WEIGHTS}; only safetensors adapters are read")
    return load_file(str(weights)), LoraConfig.from_pretrained(str(folder))


def write_adapter(state: Mapping[str, torch.Tensor], config: LoraConfig, path: str | os.PathLike,
                  metadata: Mapping[str, str] | None = None) -> Path:
    """Write an adapter folder that `PeftModel.from_pretrained` loads; files appear atomically."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(tensors, str(folder / (ADAPTER_WEIGHTS + ".tmp")), metadata={"format": "pt", **(metadata or {})})
    config_dict = config.to_dict()
    config_dict.pop("_custom_modules", None)
    for key, value in list(config_dict.items()):
        if isinstance(value, set):
            config_dict[key] = sorted(value)
    (folder / (ADAPTER_CONFIG + ".tmp")).write_text(json.dumps(config_dict, indent=2, default=str))
    os.replace(folder / (ADAPTER_WEIGHTS + ".tmp"), folder / ADAPTER_WEIGHTS)
    os.replace(folder / (ADAPTER_CONFIG + ".tmp"), folder / ADAPTER_CONFIG)
    return folder
