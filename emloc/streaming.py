"""Calibration and emulator construction in bounded memory (docs/method.md steps 1-2, "Memory").

Σ xᵀx for every target layer at once can dwarf the model (float32, in² per layer: ~70 GiB for
FLUX.1-dev, ~256 GiB for a 38B InternVL). Here the target layers are split, in model order, into
groups whose statistics fit `max_stats_bytes`; for each group the calibration batches run through
the *original* model with hooks on that group only, its layers are factored, and its statistics
are freed. The factors wait on `factors_device` (CPU by default) and replace the dense layers only
after the last group, so every group is calibrated on the original model exactly as in the
two-step path (collect_input_stats, then build_emulator), whose result this equals.

Cost: one pass over the calibration batches per group instead of one in all.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import collect_input_stats
from .emulator import EmulatorBuild, EmulatorReport, set_submodule
from .factorize import DEFAULT_SOLVER
from .quantized import DEFAULT_KIND, first_device
from .rules import RuleLike

DEFAULT_MAX_STATS_BYTES = 4 << 30


def stats_bytes(linear: nn.Linear, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of one layer's Σ xᵀx: in² elements of `dtype`."""
    return linear.in_features ** 2 * torch.empty((), dtype=dtype).element_size()


def plan_groups(sizes: Sequence[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Consecutive groups of (name, bytes) whose sums stay within `max_bytes` (a lone larger layer forms its own)."""
    groups: list[list[str]] = []
    current, used = [], 0
    for name, size in sizes:
        if current and used + size > max_bytes:
            groups.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    if current:
        groups.append(current)
    return groups


def calibrate_and_build(
    model: nn.Module,
    batches: Sequence[Any],
    rules: Iterable[RuleLike],
    forward: Callable[[nn.Module, Any], Any] | None = None,
    max_stats_bytes: int = DEFAULT_MAX_STATS_BYTES,
    svd: str = DEFAULT_SOLVER,
    dtype: torch.dtype = torch.float32,
    stats_device: torch.device | str | None = None,
    compute_device: torch.device | str | None = None,
    factors_device: torch.device | str = "cpu",
    progress: bool = True,
    base_model: str | None = None,
    kind: str = DEFAULT_KIND,
) -> EmulatorReport:
    """Build the emulator of `model` in place, holding at most `max_stats_bytes` of statistics at once.

    `batches` must be re-iterable (a list): it is read once per group.
    """
    if not isinstance(batches, Sequence):
        batches = list(batches)
    build = EmulatorBuild(model, rules, svd, compute_device, base_model, kind=kind)
    groups = plan_groups([(name, stats_bytes(linear, dtype)) for name, (linear, _) in build.targets.items()],
                         max_stats_bytes)
    factors: dict[str, nn.Module] = {}
    for group in tqdm(groups, desc="Calibrating and factoring, group by group", unit="group", disable=not progress):
        rules_of_group = [(re.escape(name), build.targets[name][1]) for name in group]
        stats = collect_input_stats(model, batches, rules_of_group, forward=forward, dtype=dtype,
                                    stats_device=stats_device, progress=False)
        for name in group:
            low = build.factor(name, stats.get(name))
            if low is not None:
                factors[name] = low.to(factors_device)
        del stats
    for name, low in factors.items():
        home = build.targets[name][0].weight.device
        set_submodule(model, name, low.to(home if home.type != "meta" else first_device(low)))
    return build.finish()
