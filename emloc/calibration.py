"""Calibration statistics (docs/method.md step 1): `C = Σ_tokens xᵀx` per target linear layer.

The user's own samples run through the *original* model, one batch at a time; a forward hook on
each target `nn.Linear` adds `xᵀx` of its input (every leading dimension flattened into tokens:
(..., in) -> (tokens, in) -> (in, in)) to a running sum on the input's device. Nothing else is kept:
model outputs are dropped as soon as the batch is done.

Result format: `stats[name]` is the (in, in) sum and `stats[name + ".count"]` a 0-d int64 tensor with
the number of tokens summed, so the dict saves as-is with safetensors. Layers the emulator keeps as they
are (ratio 1, or factors not smaller: rules.factored_rank) need no statistics and get none; when no layer
needs any, the batches are never run.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .factorize import all_finite, exact_float32
from .rules import RuleLike, factored_rank, normalise_rules, target_linears

log = logging.getLogger(__name__)

COUNT_SUFFIX = ".count"


def _default_forward(model: nn.Module, batch: Any) -> Any:
    return model(**batch) if isinstance(batch, dict) else model(batch)


def kept_tokens(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The rows of `x` (..., in) that `mask` (its leading shape) marks: (kept tokens, in). A shape that depends on
    the mask's values: the dry run (pipelines/planner/trace.py), whose tensors have none, swaps in a fixed-shape
    selection through `StatsCollector.select_tokens`."""
    return x[mask]


class StatsCollector:
    """Forward hooks that sum `xᵀx` and count tokens at the inputs of `targets` ({name: nn.Linear}).

    Use as a context manager (hooks removed on exit, also on error). `mask`, when set to a bool tensor of an
    input's leading shape (e.g. (batch, tokens) with False at padding), keeps only the tokens it marks, so
    padding never enters Σ xᵀx; inputs of another leading shape are counted whole. Call `next_batch()`
    between batches (q/k/v read the same input tensor: its xᵀx is formed once per batch).
    """

    def __init__(self, targets: dict[str, nn.Module], dtype: torch.dtype = torch.float32,
                 stats_device: torch.device | str | None = None):
        self.targets, self.dtype = targets, dtype
        self.stats_device = torch.device(stats_device) if stats_device is not None else None
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {name: 0 for name in targets}
        self.mask: torch.Tensor | None = None
        self._last: list = [None, None]  # (input tensor, its xᵀx)
        self._handles: list = []

    select_tokens = staticmethod(kept_tokens)  # the seam of the dry run (see kept_tokens)

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            raw = args[0] if args else kwargs.get("input", kwargs.get("x"))
            if self._last[0] is raw:
                gram, tokens = self._last[1]
            else:
                x = raw.detach()
                self._last[0] = self._last[1] = None  # the previous input's gram is not needed beside this one's
                mask = self.mask
                if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]):
                    flat = self.select_tokens(x, mask.to(x.device))  # (..., in) -> (kept tokens, in)
                else:
                    flat = x.reshape(-1, x.shape[-1])  # (..., in) -> (tokens, in)
                wide = flat.to(self.dtype)  # one copy: `flat.to(...).T @ flat.to(...)` held two (tokens x in)
                with exact_float32():  # TF32 would round Σxᵀx to 10 bits of mantissa (reviews/gpu-path.md F17)
                    gram = wide.T @ wide  # (in, tokens) @ (tokens, in) -> (in, in)
                del wide
                tokens = flat.shape[0]
                self._last[0], self._last[1] = raw, (gram, tokens)
            device = self.stats_device or gram.device
            if name in self.sums:
                self.sums[name] += gram.to(device)
            else:
                self.sums[name] = gram.to(device, copy=True)  # never alias: q/k/v may share one gram
            self.counts[name] += tokens
        return hook

    def __enter__(self) -> "StatsCollector":
        self._handles = [m.register_forward_hook(self._hook(n), with_kwargs=True) for n, m in self.targets.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.next_batch()

    def next_batch(self) -> None:
        self._last[0] = self._last[1] = None

    def result(self) -> dict[str, torch.Tensor]:
        """`{name: Σ xᵀx, name + ".count": tokens}` of every target that saw input; checks for NaN/inf."""
        stats: dict[str, torch.Tensor] = {}
        for name in self.targets:
            if self.counts[name] == 0:
                log.warning("layer %s saw no input during calibration; it will be factored without statistics", name)
                continue
            if not all_finite(self.sums[name]):
                raise ValueError(f"calibration inputs of layer {name!r} contain NaN or inf; "
                                 "check the calibration data and the model's dtype (float16 overflow?)")
            stats[name] = self.sums[name]
            stats[name + COUNT_SUFFIX] = torch.tensor(self.counts[name], dtype=torch.int64)
        return stats


def collect_input_stats(
    model: nn.Module,
    batches: Iterable[Any],
    rules: Iterable[RuleLike],
    forward: Callable[[nn.Module, Any], Any] | None = None,
    dtype: torch.dtype = torch.float32,
    stats_device: torch.device | str | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Sum `xᵀx` and the token count over `batches` for every nn.Linear matched by `rules` that will be factored.

    `forward(model, batch)` runs one batch (default `model(**batch)` for dicts, `model(batch)`
    otherwise). Sums live on the device each layer's input arrives on, or on `stats_device`
    (e.g. "cpu" to keep GPU memory for the model). Works with layers on different devices and with
    accelerate's offload hooks (the hook sees the input the layer is called with). Hooks are
    removed even when a batch fails.
    """
    rules = normalise_rules(rules)
    targets = {name: m for name, (m, ratio) in target_linears(model, rules).items()
               if factored_rank(m.in_features, m.out_features, ratio)}  # kept layers need no statistics
    if not targets:
        return {}
    forward = forward or _default_forward
    total = len(batches) if hasattr(batches, "__len__") else None
    with StatsCollector(targets, dtype, stats_device) as collector, torch.no_grad():
        for batch in tqdm(batches, total=total, desc="Calibrating on your data", unit="batch", disable=not progress):
            output = forward(model, batch)
            del output
            collector.next_batch()
    stats = collector.result()
    if not stats:
        raise ValueError("no target layer received any input during calibration; were the batches empty?")
    return stats


def second_moments(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Only the (in, in) sums of a stats dict, without the `.count` entries."""
    return {k: v for k, v in stats.items() if not k.endswith(COUNT_SUFFIX)}


def merge_stats(parts: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Add several stats dicts (e.g. one per process or per data shard) into one."""
    merged: dict[str, torch.Tensor] = {}
    for part in parts:
        for key, value in part.items():
            merged[key] = merged[key] + value.to(merged[key].device) if key in merged else value.clone()
    return merged
