"""LoRA correction (docs/method.md step 4): make a LoRA trained on the emulator behave the same on the full model.

LoRA adds `ΔW = s·B A` (A: r x in, B: out x r). On the adapter's input subspace `V = rowspace(A)`
we want `x (W + ΔW_c)ᵀ = x (W_E + ΔW)ᵀ`. With the thin SVD `Aᵀ = P Σ_a R` (P: in x r, orthonormal):

    A' = Pᵀ
    B' = B Rᵀ Σ_a  -  (1/s) (W - W_E) P          (so s B' A' = ΔW - (W - W_E) P Pᵀ)

`(W - W_E) P` is computed as `full(Pᵀ) - emulator(Pᵀ)` (biases cancel), one layer of each model on
the compute device at a time, in float32.

`W_E` is the stand-in's own, whatever the emulator kind (emloc/quantized.py): `u v` for "lowrank", the dequantised
weight for "nf4", the product of the dequantised factors for "lowrank-nf4"; each is applied as it stores itself, so
the identity above holds for every kind.

Clamp λ: per component j (column of B'), if mean|correction_j| > λ · mean|(B Rᵀ Σ_a)_j|, the
correction of that component is scaled down to exactly λ times. λ = 0 returns the adapter
unchanged; λ = ∞ applies the correction unclamped (then the identity above holds exactly).

Two variants use the calibration statistics `Σ = Σ xᵀx` of the layer's inputs (`method=`, default "paper"):
"weighted" fits the correction to the data instead of to rowspace(A) alone (`correct_pair_weighted`);
"rank2r" returns a rank-2r adapter that also repairs the top data-weighted directions of `W - W_E` outside
rowspace(A) (`correct_pair_rank2r`). Their equations are in those functions' docstrings. Σ is normalised by
`trace(Σ)/in`; "weighted" regularises it, `Σ_δ = Σ + δ·I` (δ = 1e-6), so that `Pᵀ Σ_δ P` is invertible and a
direction of rowspace(A) the data never visits is fitted in the plain metric, as the paper's. A layer without
statistics gets Σ = I (then "weighted" is "paper").
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
from .quantized import NF4Linear

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
    if isinstance(layer, LowRankLinear):  # factors plain or in NF4 (lowrank-nf4): each applied as what it stores
        return _apply_without_bias(layer.u, _apply_without_bias(layer.v, x))  # (r, in) -> (r, k) -> (r, out)
    if isinstance(layer, NF4Linear):  # the stand-in's own W_E: its dequantised weight, one layer at a time
        return F.linear(x, layer.dense_weight().to(device))
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


CORRECTION_METHODS = ("paper", "weighted", "rank2r")
RIDGE = 1e-6  # δ of Σ_δ = Σ/(trace Σ/in) + δ·I


def _clamped(correction: torch.Tensor, base: torch.Tensor, lam: float) -> torch.Tensor:
    """Each column j of `correction` scaled down so that mean|correction_j| <= λ · base_j (base: (r,))."""
    if not math.isfinite(lam):
        return correction
    size = correction.abs().mean(dim=0)  # (r,)
    limit = lam * base
    factor = torch.where(size > limit, limit / size.clamp_min(1e-30), torch.ones_like(size))
    return correction * factor


def _rotated(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(P, B Rᵀ Σ_a)` from the thin SVD `Aᵀ = P Σ_a R`: the same update `B A = (B Rᵀ Σ_a) Pᵀ`, P orthonormal."""
    p, sigma_a, r = torch.linalg.svd(a.T, full_matrices=False)  # P: (in, r), Σ_a: (r,), R: (r, r)
    return p, (b @ r.T) * sigma_a  # (out, r)


def normalised_moment(second_moment: torch.Tensor | None, n_in: int, device: torch.device,
                      ridge: float = RIDGE) -> torch.Tensor:
    """`Σ_δ = Σ/(trace Σ/in) + δ·I` in float64 (in x in); the identity when there are no statistics."""
    eye = torch.eye(n_in, dtype=torch.float64, device=device)
    if second_moment is None:
        return eye
    if tuple(second_moment.shape) != (n_in, n_in):
        raise ValueError(f"statistics of shape {tuple(second_moment.shape)} given for a layer with {n_in} inputs; "
                         f"expected ({n_in}, {n_in}): were they collected on another model?")
    sigma = second_moment.to(device, torch.float64)
    sigma = (sigma + sigma.T) / 2
    scale = float(torch.diagonal(sigma).sum()) / n_in
    if not scale > 0:
        return eye
    return sigma / scale + ridge * eye


def _moment_for(second_moments: Mapping[str, torch.Tensor], name: str) -> torch.Tensor | None:
    for key in (name, _strip_prefix(name), PEFT_PREFIX + _strip_prefix(name)):
        if key in second_moments:
            return second_moments[key]
    return None


def correct_pair(
    a: torch.Tensor, b: torch.Tensor, full_layer: nn.Module, emulator_layer: nn.Module, scaling: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrected `(A', B')` in float32 for one layer; see the module docstring for the equations."""
    p, b_rotated = _rotated(a, b)
    p_t = p.T.contiguous()  # (r, in): r probe inputs spanning rowspace(A)
    gap = _apply_without_bias(full_layer, p_t) - _apply_without_bias(emulator_layer, p_t)  # (r, out) = ((W - W_E) P)ᵀ
    correction = -gap.T / scaling  # -(1/s) (W - W_E) P: (out, r)
    return p_t, b_rotated + _clamped(correction, b_rotated.abs().mean(dim=0), lam)


def correct_pair_weighted(
    a: torch.Tensor, b: torch.Tensor, full_layer: nn.Module, emulator_layer: nn.Module, scaling: float, lam: float,
    second_moment: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrected `(A', B')` fitted to the data: least squares of the output mismatch over the layer's inputs.

    The paper's B' makes the mismatch vanish on rowspace(A) in the plain metric. Here, with `E = ΔW - (W - W_E)`
    and the adapter kept on rowspace(A) (`A' = Pᵀ`), B' minimises the mismatch on the calibration data,
    `‖X (E - s B' Pᵀ)ᵀ‖² = tr((E - s B' Pᵀ) Σ_δ (E - s B' Pᵀ)ᵀ)`:

        B' = B Rᵀ Σ_a  -  (1/s) (W - W_E) Σ_δ P (Pᵀ Σ_δ P)⁻¹

    (ΔW lies on rowspace(A), so its part is unchanged.) The optimum satisfies the normal equations
    `(E - s B' Pᵀ) Σ_δ P = 0`; with Σ = I it is the paper's B'. `(W - W_E) Σ_δ P` is `full(Pᵀ Σ_δ) -
    emulator(Pᵀ Σ_δ)`, so the layer is still touched only through r probe inputs. The clamp is the paper's,
    per component of Pᵀ.
    """
    p, b_rotated = _rotated(a, b)
    sigma = normalised_moment(second_moment, a.shape[1], a.device)
    p64 = p.double()
    spread = sigma @ p64  # Σ_δ P: (in, in) @ (in, r) -> (in, r)
    gram = p64.T @ spread  # Pᵀ Σ_δ P: (r, r), positive definite (δ > 0)
    probes = spread.T.float().contiguous()  # (r, in)
    gap = _apply_without_bias(full_layer, probes) - _apply_without_bias(emulator_layer, probes)  # ((W-W_E) Σ_δ P)ᵀ
    fitted = torch.linalg.solve(gram, gap.double()).T  # (W - W_E) Σ_δ P (Pᵀ Σ_δ P)⁻¹: (out, r); gram is symmetric
    correction = (-fitted / scaling).float()
    return p.T.contiguous(), b_rotated + _clamped(correction, b_rotated.abs().mean(dim=0), lam)


def correct_pair_rank2r(
    a: torch.Tensor, b: torch.Tensor, full_layer: nn.Module, emulator_layer: nn.Module, scaling: float, lam: float,
    second_moment: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A rank-2r `(A', B')`: the paper's correction, plus the best rank-r repair of `W - W_E` on the data.

    After the paper's correction the layer's mismatch is `-(W - W_E) Π⊥` (`Π⊥ = I - P Pᵀ`): zero on
    rowspace(A), the emulator's error everywhere else. With `S Sᵀ = Σ` (S = Q diag(√l) from the eigenvectors
    of Σ, without δ) and `M = Π⊥ S`, the second half `Z = s B₂ A₂` minimises `‖(-(W - W_E) Π⊥ - Z) S‖` over
    rank-r Z with `Z P = 0` (exactness on rowspace(A) kept):

        T = -(W - W_E) M = U diag(t) Vᵀ,    Z = U_r diag(t_r) V_rᵀ M⁺,    Z M = [T]_r

    so the data-weighted residual is the Eckart-Young optimum `‖T - [T]_r‖ = (Σ_{j>r} t_j²)^½`. `A₂` is `V_rᵀ M⁺`
    with orthonormalised rows (`A₂ᵀ = Q₂ R₂`, `A₂' = Q₂ᵀ`, `B₂ = U_r diag(t_r) R₂ᵀ / s`); the result is
    `A' = [Pᵀ; Q₂ᵀ]`, `B' = [B'_paper, B₂]`. It needs `W - W_E` whole, as `full(I) - emulator(I)`: one layer at a
    time still, but `in` probe inputs instead of r. Clamp: the first r components as the paper's; each of the r
    new ones to mean|B₂_j| <= λ · mean over j of mean|(B Rᵀ Σ_a)_j| (the LoRA's own typical component).
    The caller writes the adapter with rank 2r and the same `s` (lora_alpha doubled, or ×√2 with rsLoRA).
    """
    n_in, rank = a.shape[1], a.shape[0]
    if 2 * rank > n_in:
        raise ValueError(f"method 'rank2r' needs 2r <= in; got r={rank} for a layer with {n_in} inputs")
    p_t, b_paper = correct_pair(a, b, full_layer, emulator_layer, scaling, lam)
    p = p_t.T.double()  # (in, r)
    _, b_rotated = _rotated(a, b)
    eye = torch.eye(n_in, device=a.device)
    difference = (_apply_without_bias(full_layer, eye) - _apply_without_bias(emulator_layer, eye)).T.double()  # W - W_E
    # no ridge here: M⁺ would divide by √δ on directions the data never visits; pinv's cut drops them instead
    eigenvalues, q = torch.linalg.eigh(normalised_moment(second_moment, n_in, a.device, ridge=0.0))
    root = q * eigenvalues.clamp_min(0).sqrt()  # S: (in, in), S Sᵀ = Σ
    m = root - p @ (p.T @ root)  # Π⊥ S: (in, in)
    u, t, vh = torch.linalg.svd(-difference @ m, full_matrices=False)  # T: (out, in)
    a_new = vh[:rank] @ torch.linalg.pinv(m, rtol=1e-7)  # V_rᵀ M⁺: (r, in), rows on range(Π⊥)
    q2, r2 = torch.linalg.qr(a_new.T)  # (in, r), (r, r)
    b_new = ((u[:, :rank] * t[:rank]) @ r2.T / scaling).float()  # (out, r)
    b_new = _clamped(b_new, b_rotated.abs().mean().expand(rank), lam)
    return torch.cat([p_t, q2.T.float()]), torch.cat([b_paper, b_new], dim=1)


def correct_lora(
    full_model: nn.Module,
    emulator_model: nn.Module,
    adapter_state: Mapping[str, torch.Tensor],
    scaling: float | Mapping[str, float],
    lam: float = 3.0,
    compute_device: torch.device | str | None = None,
    progress: bool = True,
    reader: CheckpointReader | None = None,
    method: str = "paper",
    second_moments: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """A new PEFT adapter state dict (same keys, same dtypes) corrected for the full model.

    `method` is "paper" (docs/method.md step 4), "weighted" or "rank2r" (see the module docstring); the last two
    read `second_moments[module name]` (Σ xᵀx, as collect_input_stats returns; a run folder keeps them only
    with `keep_statistics`) and take Σ = I for a layer without an entry. "rank2r" returns rank-2r tensors.

    `scaling` is `lora_alpha / r` (rsLoRA: `lora_alpha / sqrt(r)`), or a dict by module name.
    `compute_device` defaults to each adapter tensor's device; only one layer of each model is
    touched at a time. With a `reader` over the full model's checkpoint, either model may be a skeleton
    (parameters on `meta`): each layer still on `meta` is read from the files just for its turn and freed
    after it, so correction holds one layer of each model whatever the model's size.
    """
    if method not in CORRECTION_METHODS:
        raise ValueError(f"unknown correction method {method!r}; choose one of {', '.join(CORRECTION_METHODS)}")
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
        args = (a.to(device, torch.float32), b.to(device, torch.float32), full_layer, emulator_layer,
                _scaling_for(scaling, name), lam)
        with torch.no_grad():  # the layers' weights may require grad; the corrected adapter is plain data
            if method == "paper":
                new_a, new_b = correct_pair(*args)
            else:
                moment = _moment_for(second_moments or {}, name)
                pair_for = correct_pair_weighted if method == "weighted" else correct_pair_rank2r
                new_a, new_b = pair_for(*args, moment)
        for layer in read:
            release(layer)  # on the CPU this also hands the freed memory back (return_freed_memory)
        if not (torch.isfinite(new_a).all() and torch.isfinite(new_b).all()):
            raise ValueError(f"correction of module {_strip_prefix(name)!r} produced NaN or inf; "
                             "check the full model's and the emulator's weights for that layer")
        corrected[a_key] = new_a.to(a.device, a.dtype)
        corrected[b_key] = new_b.to(b.device, b.dtype)
    return corrected
