"""LoRA correction (DESIGN.md step 4): make a LoRA trained on the emulator behave the same on the full model.

LoRA adds `ΔW = s·B A` (A: r x in, B: out x r). On the adapter's input subspace `V = rowspace(A)`
we want `x (W + ΔW_c)ᵀ = x (W_E + ΔW)ᵀ`. With the thin SVD `Aᵀ = P Σ_a R` (P: in x r, orthonormal):

    A' = Pᵀ
    B' = B Rᵀ Σ_a  -  (1/s) (W - W_E) P          (so s B' A' = ΔW - (W - W_E) P Pᵀ)

`(W - W_E) P` is computed as `full(Pᵀ) - emulator(Pᵀ)` (biases cancel), one layer of each model on
the compute device at a time, in float32.

Clamp λ: per component j (column of B'), if mean|correction_j| > λ · mean|(B Rᵀ Σ_a)_j|, the
correction of that component is scaled down to exactly λ times. λ = 0 returns the adapter
unchanged; λ = ∞ applies the correction unclamped (then the identity above holds exactly).
"""

from __future__ import annotations

import math
import re
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import CheckpointReader, release
from .lowrank import LowRankLinear

LORA_KEY = re.compile(r"^(?P<name>.+)\.lora_(?P<part>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")
PEFT_PREFIX = "base_model.model."


def _strip_prefix(name: str) -> str:
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def _find_layer(model: nn.Module, name: str, which: str) -> nn.Module:
    """The base layer called `name` (PEFT prefix optional) in a plain or PEFT-wrapped model."""
    candidates = [name, _strip_prefix(name), PEFT_PREFIX + _strip_prefix(name)]
    for candidate in candidates:
        try:
            module = model.get_submodule(candidate)
        except AttributeError:
            continue
        return getattr(module, "base_layer", module)  # a LoRA-wrapped layer keeps its original as base_layer
    raise ValueError(f"adapter module {_strip_prefix(name)!r} matches no module in the {which} model; "
                     "was the adapter trained on another model?")


def _apply_without_bias(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`x W_layerᵀ` in float32 on x's device, for x: (r, in) -> (r, out); the layer's bias is left out."""
    device = x.device
    if isinstance(layer, LowRankLinear):
        hidden = F.linear(x, layer.v.weight.to(device, torch.float32))  # (r, in) -> (r, k)
        return F.linear(hidden, layer.u.weight.to(device, torch.float32))  # (r, k) -> (r, out)
    weight = getattr(layer, "weight", None)
    if isinstance(layer, nn.Linear) and weight is not None and weight.device.type != "meta":
        return F.linear(x, weight.to(device, torch.float32))
    # Any other layer (offloaded by accelerate hooks, quantised): its own forward, minus its bias.
    ref = next((p for p in layer.parameters() if p.device.type != "meta"), None)
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    with torch.no_grad():
        y = layer(x.to(dtype)).to(device, torch.float32)
        zero = layer(torch.zeros_like(x[:1], dtype=dtype)).to(device, torch.float32)
    return y - zero


def _scaling_for(scaling: float | Mapping[str, float], name: str) -> float:
    if isinstance(scaling, Mapping):
        for key in (name, _strip_prefix(name), PEFT_PREFIX + _strip_prefix(name)):
            if key in scaling:
                return float(scaling[key])
        raise ValueError(f"no LoRA scaling given for module {_strip_prefix(name)!r}")
    return float(scaling)


def correct_pair(
    a: torch.Tensor, b: torch.Tensor, full_layer: nn.Module, emulator_layer: nn.Module, scaling: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrected `(A', B')` in float32 for one layer; see the module docstring for the equations."""
    # A: (r, in); Aᵀ = P Σ_a R with P: (in, r), Σ_a: (r,), R: (r, r)
    p, sigma_a, r = torch.linalg.svd(a.T, full_matrices=False)
    b_rotated = (b @ r.T) * sigma_a  # B Rᵀ Σ_a: (out, r)
    p_t = p.T.contiguous()  # (r, in): r probe inputs spanning rowspace(A)
    gap = _apply_without_bias(full_layer, p_t) - _apply_without_bias(emulator_layer, p_t)  # (r, out) = ((W - W_E) P)ᵀ
    correction = -gap.T / scaling  # -(1/s) (W - W_E) P: (out, r)
    if math.isfinite(lam):
        base = b_rotated.abs().mean(dim=0)  # (r,)
        size = correction.abs().mean(dim=0)  # (r,)
        limit = lam * base
        factor = torch.where(size > limit, limit / size.clamp_min(1e-30), torch.ones_like(size))
        correction = correction * factor
    return p_t, b_rotated + correction


def correct_lora(
    full_model: nn.Module,
    emulator_model: nn.Module,
    adapter_state: Mapping[str, torch.Tensor],
    scaling: float | Mapping[str, float],
    lam: float = 3.0,
    compute_device: torch.device | str | None = None,
    progress: bool = True,
    reader: CheckpointReader | None = None,
) -> dict[str, torch.Tensor]:
    """A new PEFT adapter state dict (same keys, same dtypes) corrected for the full model.

    `scaling` is `lora_alpha / r` (rsLoRA: `lora_alpha / sqrt(r)`), or a dict by module name.
    `compute_device` defaults to each adapter tensor's device; only one layer of each model is
    touched at a time. With a `reader` over the full model's checkpoint, either model may be a skeleton
    (parameters on `meta`): each layer still on `meta` is read from the files just for its turn and freed
    after it, so correction holds one layer of each model whatever the model's size.
    """
    if lam < 0 or math.isnan(lam):
        raise ValueError(f"lam (λ) must be >= 0 (0: no correction, inf: unclamped); got {lam}")
    pairs: dict[str, dict[str, str]] = {}
    for key in adapter_state:
        match = LORA_KEY.match(key)
        if match:
            pairs.setdefault(match["name"], {})[match["part"]] = key
    if not pairs:
        raise ValueError("the adapter has no lora_A/lora_B weights; is it a LoRA adapter state dict?")
    for name, parts in pairs.items():
        if set(parts) != {"A", "B"}:
            raise ValueError(f"adapter module {_strip_prefix(name)!r} has lora_{'A' if 'A' in parts else 'B'} "
                             "but not its partner; the adapter file is incomplete")
    corrected = dict(adapter_state)
    if lam == 0:
        return corrected
    # Resolve every module first, so that a bad key fails before any work.
    layers = {name: (_find_layer(full_model, name, "full"), _find_layer(emulator_model, name, "emulator"))
              for name in pairs}
    for name, parts in tqdm(pairs.items(), desc="Correcting the LoRA for the full model", unit="layer", disable=not progress):
        a_key, b_key = parts["A"], parts["B"]
        a, b = adapter_state[a_key], adapter_state[b_key]
        full_layer, emulator_layer = layers[name]
        n_in, n_out = getattr(full_layer, "in_features", None), getattr(full_layer, "out_features", None)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"adapter module {_strip_prefix(name)!r}: lora_A {tuple(a.shape)} and lora_B "
                             f"{tuple(b.shape)} do not form a rank-r pair")
        if a.shape[0] > a.shape[1]:
            raise ValueError(f"adapter module {_strip_prefix(name)!r} has rank {a.shape[0]} above its {a.shape[1]} "
                             "inputs; use a LoRA rank no larger than the layer's input size")
        if (n_in is not None and a.shape[1] != n_in) or (n_out is not None and b.shape[0] != n_out):
            raise ValueError(f"adapter module {_strip_prefix(name)!r} has shape {b.shape[0]}x{a.shape[1]} but the "
                             f"model's layer is {n_out}x{n_in}; the adapter belongs to another model")
        for key, tensor in ((a_key, a), (b_key, b)):
            if not torch.isfinite(tensor).all():
                raise ValueError(f"adapter tensor {key!r} contains NaN or inf; training diverged — "
                                 "lower the learning rate and train again")
        device = torch.device(compute_device) if compute_device is not None else a.device
        read = [layer for layer in (full_layer, emulator_layer)
                if reader is not None and any(p.device.type == "meta" for p in layer.parameters())]
        for layer in read:
            reader.materialize(layer, _strip_prefix(name), device)
        new_a, new_b = correct_pair(a.to(device, torch.float32), b.to(device, torch.float32),
                                    full_layer, emulator_layer, _scaling_for(scaling, name), lam)
        for layer in read:
            release(layer)  # on the CPU this also hands the freed memory back (return_freed_memory)
        if not (torch.isfinite(new_a).all() and torch.isfinite(new_b).all()):
            raise ValueError(f"correction of module {_strip_prefix(name)!r} produced NaN or inf; "
                             "check the full model's and the emulator's weights for that layer")
        corrected[a_key] = new_a.to(a.device, a.dtype)
        corrected[b_key] = new_b.to(b.device, b.dtype)
    return corrected
