"""The emulator (docs/method.md step 2): target linears replaced, in place, by rank-k factors `u v`, or by another
stand-in `W_E` of the kind asked (`kind`: "lowrank", "nf4", "lowrank-nf4"; see quantized.py).

For a layer `W` (out x in) with rule ratio `ρ`, `k = floor(ρ·in·out/(in+out))`; `W_E = u v` is the
activation-aware truncated SVD of `W` (see factorize.py). At `ρ = 1`, and where the factors would not be
smaller than `W`, the layer is kept as it is. Module names stay those of the full model
(`blocks.0.attn.q` stays `blocks.0.attn.q`, with children `.u` and `.v`), so that a LoRA adapter
trained on the emulator loads on the full model unchanged.

Kinds: "lowrank" replaces a layer by a LowRankLinear (children `.u`, `.v`: nn.Linear); "nf4" by an NF4Linear
(`codes`, `absmax`, `bias`: the whole weight in 4 bits); "lowrank-nf4" by a LowRankLinear whose `.u` and `.v` are
NF4Linear. emulator.json records the kind of the build (`kind`) and of every layer (`layers[name]["kind"]`), and
load_emulator rebuilds each layer from it; a file without a kind is "lowrank".
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch._subclasses.fake_tensor import is_fake
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import CheckpointReader
from .factorize import (DEFAULT_SOLVER, SOLVERS, Whitening, all_finite, factorisation_placement, needs_whitening,
                        weighted_error, whitening)
from .lowrank import LowRankLinear, dense_parameters
from .quantized import DEFAULT_KIND, NF4Linear, check_kind, linear_weight, quantize_factors
from .rules import RuleLike, factored_rank, normalise_rules, target_linears

log = logging.getLogger(__name__)

EMULATOR_WEIGHTS = "emulator.safetensors"
EMULATOR_CONFIG = "emulator.json"


@dataclass
class LayerReport:
    """What happened to one target layer."""

    name: str
    in_features: int
    out_features: int
    ratio: float
    rank: int  # 0 when the layer was kept
    params_before: int
    params_after: int
    error: float  # relative activation-weighted error ‖X(W-W_E)ᵀ‖/‖XWᵀ‖ (Frobenius without stats); 0 when kept
    activation_aware: bool
    dense: bool  # True when the layer was kept as it is: ratio 1, or factors would not be smaller
    kind: str = DEFAULT_KIND  # the emulator kind that replaced it (quantized.EMULATOR_KINDS)


@dataclass
class EmulatorReport:
    """Per-layer results of build_emulator plus whole-model totals."""

    layers: list[LayerReport] = field(default_factory=list)
    model_params_before: int = 0
    model_params_after: int = 0
    solver: str = DEFAULT_SOLVER
    fingerprint: str = ""
    kind: str = DEFAULT_KIND

    @property
    def ratio(self) -> float:
        """Model-level fraction of parameters kept (all parameters, compressed or not)."""
        return self.model_params_after / max(self.model_params_before, 1)

    @property
    def compressed_params_before(self) -> int:
        return sum(layer.params_before for layer in self.layers)

    @property
    def compressed_params_after(self) -> int:
        return sum(layer.params_after for layer in self.layers)

    def to_dict(self) -> dict:
        return {"solver": self.solver, "fingerprint": self.fingerprint, "ratio": self.ratio, "kind": self.kind,
                "model_params_before": self.model_params_before, "model_params_after": self.model_params_after,
                "layers": [asdict(layer) for layer in self.layers]}

    def to_markdown(self) -> str:
        rows = ["| layer | shape | rank | params before | params after | error |", "|---|---|---:|---:|---:|---:|"]
        for r in self.layers:
            rank = "kept" if r.dense else str(r.rank)
            rows.append(f"| {r.name} | {r.out_features}x{r.in_features} | {rank} | {r.params_before:,} "
                        f"| {r.params_after:,} | {r.error:.4f} |")
        rows.append(f"| **model** | | | {self.model_params_before:,} | {self.model_params_after:,} "
                    f"| ratio {self.ratio:.3f} |")
        return "\n".join(rows)


def _param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _check_finite(tensor: torch.Tensor, what: str) -> None:
    if tensor.device.type != "meta" and not all_finite(tensor):
        raise ValueError(f"{what} contains NaN or inf; re-run calibration or check the model's weights")


def fingerprint_part(name: str, tensor: torch.Tensor) -> bytes:
    """One weight's share of `weights_fingerprint`: its name, shape, dtype and ~4k sampled values."""
    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // 4096)
    sample = flat[::step].to("cpu", torch.float64).contiguous()
    values = b"" if is_fake(sample) else sample.numpy().tobytes()  # a dry run's fake tensors have no values
    return f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode() + values


def fingerprint_of_parts(parts: Iterable[bytes]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()[:32]


def weights_fingerprint(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A cheap, device-independent fingerprint of weights: names, shapes, dtypes and ~4k sampled values each."""
    return fingerprint_of_parts(fingerprint_part(name, tensor) for name, tensor in named_tensors)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def build_emulator(
    model: nn.Module,
    rules: Iterable[RuleLike],
    stats: Mapping[str, torch.Tensor] | None = None,
    svd: str = DEFAULT_SOLVER,
    compute_device: torch.device | str | None = None,
    progress: bool = True,
    base_model: str | None = None,
    kind: str = DEFAULT_KIND,
) -> EmulatorReport:
    """Replace, in place, every nn.Linear matched by `rules` with its stand-in of `kind`; one layer at a time.

    `stats` is collect_input_stats' output (`stats[name]` = Σ xᵀx, in x in); layers without an entry
    get plain SVD. A layer at ratio 1, or (low-rank kinds) whose factors would not be smaller
    (`k(in+out) >= in·out`), is kept as it is.
    """
    build = EmulatorBuild(model, rules, svd, compute_device, base_model, kind=kind)
    for name in tqdm(build.targets, desc="Building the emulator", unit="layer", disable=not progress):
        low = build.factor(name, (stats or {}).get(name))
        if low is not None:
            set_submodule(model, name, low)  # the dense layer is freed as soon as its factors exist
    return build.finish()


class EmulatorBuild:
    """The bookkeeping of one emulator build: factor layers one by one, then `finish` the report.

    build_emulator swaps each layer as soon as it is factored; emloc.streaming holds the factors
    back until every group of layers has been calibrated on the original model.
    """

    def __init__(self, model: nn.Module, rules: Iterable[RuleLike], svd: str = DEFAULT_SOLVER,
                 compute_device: torch.device | str | None = None, base_model: str | None = None,
                 weights_loaded: bool = True, kind: str = DEFAULT_KIND):
        self.kind = check_kind(kind, "the emulator kind")
        if svd not in SOLVERS:
            raise ValueError(f"unknown svd solver {svd!r}; choose one of {', '.join(SOLVERS)}")
        self.model, self.svd, self.compute_device = model, svd, compute_device
        self.rules = normalise_rules(rules)
        self.targets = target_linears(model, self.rules)
        for name, (linear, _) in self.targets.items() if weights_loaded else ():
            try:
                dense_parameters(linear)
            except ValueError:
                raise ValueError(f"layer {name!r} has no weights loaded (meta device); "
                                 "load the model's weights first") from None
        # of every target, factored or kept: load_emulator checks the same layers (`targets`), so an emulator
        # that keeps every layer (ratio 1) is still tied to its base model; a streamed build (emloc.blockwise)
        # reads each layer later and fingerprints it then
        fingerprint = weights_fingerprint((n, dense_parameters(lin)[0]) for n, (lin, _) in self.targets.items()) \
            if weights_loaded else ""
        self.report = EmulatorReport(model_params_before=_param_count(model), solver=svd, fingerprint=fingerprint,
                                     kind=self.kind)
        self.info = {"kind": self.kind, "layers": {}, "rules": [list(r) for r in self.rules], "solver": svd,
                     "fingerprint": fingerprint,
                     "targets": list(self.targets), "base_model": base_model or _model_id(model)}
        self._shared: tuple[torch.Tensor, Whitening] | None = None  # q/k/v read one input: whiten its C once

    def factor(self, name: str, second_moment: torch.Tensor | None) -> nn.Module | None:
        """The stand-in of target `name` (None when it is kept as it is); records its LayerReport."""
        linear, ratio = self.targets[name]
        n_in, n_out = linear.in_features, linear.out_features
        weight, bias_tensor, _ = dense_parameters(linear)
        _check_finite(weight, f"weight of layer {name!r}")
        if second_moment is not None:
            if tuple(second_moment.shape) != (n_in, n_in):
                raise ValueError(f"statistics for layer {name!r} have shape {tuple(second_moment.shape)}; "
                                 f"expected ({n_in}, {n_in}) for a layer with {n_in} inputs")
            _check_finite(second_moment, f"calibration statistics of layer {name!r}")
        rank = factored_rank(n_in, n_out, ratio)
        bias = 0 if bias_tensor is None else n_out
        before = n_in * n_out + bias
        aware = second_moment is not None
        whole = self.kind == "nf4" and ratio < 1  # nf4 quantises every target the rules do not keep
        if not rank and not whole:
            self.report.layers.append(LayerReport(name, n_in, n_out, ratio, 0, before, before, 0.0, aware, True,
                                                  self.kind))
            return None
        device = torch.device(self.compute_device) if self.compute_device is not None else weight.device
        if whole:
            return self._quantised(name, linear, ratio, second_moment, device)
        self.info.setdefault("factorisation", factorisation_placement(device))  # which device and dtype did the eigh
        white = None
        if aware and needs_whitening(n_out, n_in, self.svd):
            shared = self._shared
            if shared is not None and shared[0].shape == second_moment.shape and torch.equal(shared[0], second_moment):
                white = shared[1]
            else:
                white = whitening(second_moment.to(device))
                self._shared = (second_moment, white)
        low = LowRankLinear.from_linear(linear, rank, second_moment, self.svd, self.compute_device, white=white)
        if self.kind == "lowrank-nf4":
            quantize_factors(low)
        with torch.no_grad():
            approx = emulated_weight(low, device)
            error = weighted_error(weight.to(device), approx, second_moment)
        del approx
        self.report.layers.append(LayerReport(name, n_in, n_out, ratio, rank, before, rank * (n_in + n_out) + bias,
                                              error, aware, False, self.kind))
        self.info["layers"][name] = {"in_features": n_in, "out_features": n_out, "rank": rank, "ratio": ratio,
                                     "bias": bias_tensor is not None, "kind": self.kind}
        return low

    def _quantised(self, name: str, linear: nn.Linear, ratio: float, second_moment: torch.Tensor | None,
                   device: torch.device) -> NF4Linear:
        """The `nf4` stand-in of one layer: its whole weight in 4 bits, quantised on `device`, kept at its home."""
        weight, bias, home = dense_parameters(linear)
        n_in, n_out = linear.in_features, linear.out_features
        layer = NF4Linear.from_weight(weight.detach().to(device), None if bias is None else bias.detach())
        with torch.no_grad():
            error = weighted_error(weight.to(device), layer.dense_weight().to(device), second_moment)
        layer = layer.to(home)
        size = n_in * n_out + (0 if bias is None else n_out)
        self.report.layers.append(LayerReport(name, n_in, n_out, ratio, min(n_in, n_out), size, size, error,
                                              second_moment is not None, False, "nf4"))
        self.info["layers"][name] = {"in_features": n_in, "out_features": n_out, "rank": min(n_in, n_out),
                                     "ratio": ratio, "bias": bias is not None, "kind": "nf4"}
        return layer

    def finish(self) -> EmulatorReport:
        """Count the model after the swaps and attach the structure that save_emulator writes."""
        self._shared = None
        # parameters the stand-ins represent (an NF4 layer's in·out, not its code bytes)
        self.report.model_params_after = self.report.model_params_before - sum(
            r.params_before - r.params_after for r in self.report.layers)
        self.model.emloc_emulator = self.info  # read by save_emulator; plain data, not a module
        log.info("emulator built: %d of %d target layers factored, the rest kept; %.3f of the model's parameters kept",
                 len(self.info["layers"]), len(self.targets), self.report.ratio)
        return self.report


def emulated_weight(layer: nn.Module, device: torch.device | str | None = None) -> torch.Tensor:
    """The stand-in's own `W_E` in float32 (out x in): `u v` (factors dequantised for lowrank-nf4), an NF4 layer's
    dequantised weight, or a Linear's weight."""
    if isinstance(layer, LowRankLinear):
        return linear_weight(layer.u).to(device) @ linear_weight(layer.v).to(device)
    return linear_weight(layer).to(device)


def is_stand_in(module: nn.Module) -> bool:
    """A replaced layer: a LowRankLinear (any factors) or a whole-weight NF4Linear."""
    return isinstance(module, (LowRankLinear, NF4Linear))


def stand_in_skeleton(spec: dict, device: torch.device | str = "meta") -> nn.Module:
    """An empty layer of the kind emulator.json's `spec` names (its parameters on `device`), to be filled by name."""
    kind = check_kind(spec.get("kind", DEFAULT_KIND), "the emulator's kind")
    n_in, n_out, bias = spec["in_features"], spec["out_features"], spec["bias"]
    if kind == "nf4":
        return NF4Linear(n_in, n_out, bias=bias, device=device)
    layer = LowRankLinear(n_in, n_out, spec["rank"], bias=bias, device=device)
    if kind == "lowrank-nf4":
        layer.v = NF4Linear(n_in, spec["rank"], bias=False, device=device)
        layer.u = NF4Linear(spec["rank"], n_out, bias=bias, device=device)
    return layer


def _model_id(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "_name_or_path", "") or "") if config is not None else ""


def _plain_name(name: str) -> str:
    """The full model's module name, also when the emulator is wrapped by PEFT (prefix, `.base_layer`)."""
    name = name[len("base_model.model."):] if name.startswith("base_model.model.") else name
    return name.replace(".base_layer.", ".").removesuffix(".base_layer")


def emulator_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of the emulator in `path`: one, or one per block (emloc.blockwise)."""
    return sorted(Path(path).glob("emulator*.safetensors"))


def save_emulator(model: nn.Module, path: str | os.PathLike, base_model: str | None = None) -> Path:
    """Write every stand-in's tensors (`emulator.safetensors`) and the structure (`emulator.json`).

    An emulator that kept every target layer (ratio 1) has no factors: its files name no layer to replace and
    carry the fingerprint of the kept ones.
    """
    info = dict(getattr(model, "emloc_emulator", None) or {})
    inside = {f"{n}.{c}" for n, m in model.named_modules() if isinstance(m, LowRankLinear) for c in ("u", "v")}
    layers = {_plain_name(name): m for name, m in model.named_modules() if is_stand_in(m) and name not in inside}
    if not layers and not info.get("targets"):
        raise ValueError("the model has no LowRankLinear layers; run build_emulator first")
    info.setdefault("layers", {})
    for name, m in layers.items():
        low = isinstance(m, LowRankLinear)
        kind = "nf4" if not low else "lowrank-nf4" if isinstance(m.u, NF4Linear) else "lowrank"
        info["layers"].setdefault(name, {"in_features": m.in_features, "out_features": m.out_features,
                                         "rank": m.rank if low else min(m.in_features, m.out_features), "ratio": None,
                                         "bias": (m.u.bias if low else m.bias) is not None, "kind": kind})
    if base_model:
        info["base_model"] = base_model
    tensors = {f"{name}.{key}": t.detach().to("cpu").contiguous()
               for name, m in layers.items() for key, t in m.state_dict().items()}
    info["layers"] = {name: spec for name, spec in info["layers"].items() if name in layers}
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / (EMULATOR_WEIGHTS + ".tmp")), metadata={"format": "emloc-emulator"})
    (folder / (EMULATOR_CONFIG + ".tmp")).write_text(json.dumps(info, indent=2))
    os.replace(folder / (EMULATOR_WEIGHTS + ".tmp"), folder / EMULATOR_WEIGHTS)
    os.replace(folder / (EMULATOR_CONFIG + ".tmp"), folder / EMULATOR_CONFIG)
    return folder


def _dense_layer(model: nn.Module, name: str, spec: dict | None = None) -> nn.Linear:
    """The dense Linear `name` of `model`, checked against the emulator's `spec` (its shape) when given."""
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"emulator layer {name!r} does not exist in this model; was it built for another one?") from None
    shape = None if spec is None else (spec["in_features"], spec["out_features"])
    if not isinstance(layer, nn.Linear) or (shape is not None and (layer.in_features, layer.out_features) != shape):
        what = "a Linear" if shape is None else f"a Linear({shape[0]}, {shape[1]})"
        raise ValueError(f"layer {name!r} of this model is not {what}; the emulator was built for another model")
    return layer


def load_emulator(
    model: nn.Module, path: str | os.PathLike, device: torch.device | str | None = None, check_fingerprint: bool = True
) -> dict:
    """Replace the dense layers named in `path`'s emulator.json by their saved factors, in place.

    Works on a model built on the `meta` device: dense weights there are never materialised; the
    factors land on `device` (default: the replaced layer's device, or the CPU for meta layers).
    `device="meta"` reads nothing: the factored layers get their structure only, for a caller that reads each
    layer's factors from the emulator's files when it needs them (`emulator_files`, `CheckpointReader`).
    When the dense weights are real, their fingerprint is checked against the one saved, so an
    emulator is never paired with a different base model.
    """
    folder = Path(path)
    config_file = folder / EMULATOR_CONFIG
    weight_files = emulator_files(folder)
    if not config_file.is_file() or not weight_files:
        raise FileNotFoundError(f"{folder} is not an emulator folder (expected {EMULATOR_CONFIG} and {EMULATOR_WEIGHTS})")
    info = json.loads(config_file.read_text())
    dense = {name: _dense_layer(model, name, spec) for name, spec in info["layers"].items()}
    if check_fingerprint and info.get("fingerprint"):
        # every target the build fingerprinted, factored or kept (files before "targets": resolve the rules)
        names = info.get("targets") or list(target_linears(model, normalise_rules(info["rules"])))
        covered = {name: dense[name] if name in dense else _dense_layer(model, name) for name in names}
        if all(m.weight.device.type != "meta" for m in covered.values()):
            found = weights_fingerprint((n, m.weight) for n, m in covered.items())
            if found != info["fingerprint"]:
                raise ValueError(f"the weights of this model differ from those the emulator in {folder} was built "
                                 f"from (fingerprint {found} != {info['fingerprint']}); rebuild the emulator for this model")
    tensors = CheckpointReader(weight_files)
    if device is not None and torch.device(device).type == "meta":
        for name, spec in info["layers"].items():
            set_submodule(model, name, stand_in_skeleton(spec))
        model.emloc_emulator = info
        return info
    for name, spec in info["layers"].items():
        old = dense[name]
        target = torch.device(device) if device is not None else (
            old.weight.device if old.weight.device.type != "meta" else torch.device("cpu"))
        low = stand_in_skeleton(spec)
        state = {key: tensors.read(f"{name}.{key}", target) for key in low.state_dict()}
        low.load_state_dict(state, assign=True)
        set_submodule(model, name, low)
    tensors.close()
    model.emloc_emulator = info
    return info
