"""Checking a saved LoRA adapter before it is previewed or exported: readable, finite, complete, well-shaped.

An adapter that holds NaN renders black images; one with missing layers loads with PEFT's warning and
quietly leaves those layers untrained; one with the wrong shapes fails deep inside PEFT. Each is refused
here in words instead.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight")


class AdapterError(ValueError):
    """A saved adapter cannot be used; the message names it and says what is wrong."""


def _targeted(skeleton: nn.Module, targets: list[str] | str) -> dict[str, nn.Module]:
    """The linear modules a PEFT `target_modules` selects (exact names or name suffixes, as PEFT saves them)."""
    if isinstance(targets, str):
        pattern = re.compile(targets)
        return {n: m for n, m in skeleton.named_modules() if isinstance(m, nn.Linear) and pattern.fullmatch(n)}
    return {n: m for n, m in skeleton.named_modules() if isinstance(m, nn.Linear)
            and any(n == t or n.endswith("." + t) for t in targets)}


def check_adapter(folder: Path, skeleton: nn.Module | None = None) -> None:
    """Raise AdapterError unless `folder` holds a readable adapter of finite weights whose every layer has
    both matrices of rank r; with `skeleton` (the model on the meta device) also every targeted layer, at its shape."""
    folder = Path(folder)
    fix = f"make it again: move {folder.name}/ out of the run folder and resume the run"
    if not (folder / ADAPTER_WEIGHTS).is_file() or not (folder / ADAPTER_CONFIG).is_file():
        raise AdapterError(f"{folder}: no adapter here ({ADAPTER_WEIGHTS} or {ADAPTER_CONFIG} is missing); {fix}")
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        rank = int(config["r"])
        state = load_file(str(folder / ADAPTER_WEIGHTS))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, SafetensorError) as err:
        raise AdapterError(f"{folder}: the adapter is damaged and cannot be read ({err}); {fix}") from None
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = KEY.fullmatch(key)
        if match:
            parts.setdefault(match["module"], {})[match["part"]] = tensor
    if not parts:
        raise AdapterError(f"{folder}: the adapter holds no LoRA weights; {fix}")
    for module, pair in parts.items():
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"{folder}: the adapter is incomplete: {module} has lora_{next(iter(pair))} but not "
                               f"lora_{'B' if 'A' in pair else 'A'}; {fix}")
        a, b = pair["A"], pair["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise AdapterError(f"{folder}: {module} has matrices of shapes {tuple(a.shape)} and {tuple(b.shape)}, "
                               f"not (rank {rank} x in) and (out x rank {rank}); {fix}")
        for part, tensor in pair.items():
            if not torch.isfinite(tensor).all():
                raise AdapterError(f"{folder}: {module}.lora_{part} holds NaN or infinite values (training diverged "
                                   f"or the file was damaged); {fix}, or start a new run with a lower learning rate")
    if skeleton is None:
        return
    expected = _targeted(skeleton, config.get("target_modules") or [])
    missing = sorted(set(expected) - set(parts))
    if missing:
        raise AdapterError(f"{folder}: the adapter is incomplete: {len(missing)} of its {len(expected)} layers have "
                           f"no weights (first: {missing[0]}); {fix}")
    for module, pair in parts.items():
        layer = expected.get(module)
        if layer is None:
            raise AdapterError(f"{folder}: the adapter has weights for {module}, which is not one of its model's "
                               f"LoRA layers; it belongs to another model — {fix}")
        if pair["A"].shape[1] != layer.in_features or pair["B"].shape[0] != layer.out_features:
            raise AdapterError(f"{folder}: {module} is {layer.in_features} in, {layer.out_features} out in the model, "
                               f"but the adapter's matrices are {tuple(pair['A'].shape)} and {tuple(pair['B'].shape)}; "
                               f"{fix}")
