"""Calibration and emulator construction in one streamed pass, block by block (docs/method.md steps 1-2, "Memory").

The model is a skeleton (parameters on `meta`) plus a `CheckpointReader` over its safetensors files. The
calibration samples enter the first block as hidden states `h_0` (kept for all samples); then for each
block i, in execution order:

    read block i's weights from the files                        (one block in memory)
    h_{i+1} = block_i(h_i) for every sample, with hooks summing  C_l = Σ xᵀx  at each target layer l
    factor each target layer from its C_l (factorize.py), write its factors to emulator-<i>.safetensors
    free C_l and block i's weights

so every C_l is collected on the *original* weights (h_{i+1} comes from block i's dense weights) exactly as
in the two-step path (collect_input_stats over the whole model, then build_emulator), and each weight is
read once. Memory holds one block + its statistics + the hidden states, whatever the depth. What is not
in a block (embeddings, final norm, a vision projector) is read by the family's `enter` / `step` through
`BlockwiseModel.load` when it is needed.

The family supplies only what is specific to it: the names of its blocks, how a batch becomes the first
block's input (`enter`), how one block's input becomes its output (`step`), and which tokens count
(`token_mask`: padding never enters Σ xᵀx).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from .calibration import StatsCollector, second_moments
from .checkpoint import CheckpointReader, release
from .emulator import EMULATOR_CONFIG, EmulatorBuild, EmulatorReport, fingerprint_part, fingerprint_of_parts
from .factorize import DEFAULT_SOLVER
from .quantized import DEFAULT_KIND
from .rules import RuleLike, factored_rank


@dataclass
class BlockwiseModel:
    """One model family's model, run block by block from its checkpoint files."""

    model: nn.Module  # skeleton: parameters on `meta` until read
    reader: CheckpointReader
    blocks: Sequence[str]  # module names of the blocks, in the order they run
    enter: Callable[["BlockwiseModel", Any], Any]  # (self, batch) -> state entering blocks[0]
    step: Callable[["BlockwiseModel", str, Any], Any]  # (self, block name, state) -> state leaving that block
    token_mask: Callable[[Any], torch.Tensor | None] = field(default=lambda state: None)  # True = token counts
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where blocks run and factor
    dtype: torch.dtype | None = None  # weights are cast to this when read (None: as stored)

    def load(self, name: str) -> nn.Module:
        """Submodule `name` with its weights read onto the compute device (kept until `unload`)."""
        module = self.model.get_submodule(name)
        self.reader.materialize(module, name, self.device, self.dtype)
        return module

    def unload(self, name: str) -> None:
        release(self.model.get_submodule(name))


def _block_of(name: str, blocks: Sequence[str]) -> str | None:
    return next((b for b in blocks if name.startswith(b + ".")), None)


def stream_emulator(
    streamed: BlockwiseModel,
    batches: Sequence[Any],
    rules: Sequence[RuleLike],
    out: str | os.PathLike,
    svd: str = DEFAULT_SOLVER,
    base_model: str | None = None,
    progress: bool = True,
    on_block: Callable[[int, int], None] | None = None,
    save: Callable[..., None] = save_file,
    kind: str = DEFAULT_KIND,
) -> EmulatorReport:
    """Calibrate on `batches` and build the emulator of `streamed.model` block by block, written into `out`.

    `kind` is the emulator kind (emloc.quantized.EMULATOR_KINDS): every kind goes through this same pass, its
    layers' tensors written per block (an NF4 layer's codes and absmax are frozen parameters like the factors).

    `save(tensors, path, metadata=...)` writes one block's factors (safetensors' `save_file`; a dry run on tensors
    without data, pipelines/planner/trace.py, passes one that writes nothing).

    `out` receives `emulator-NNNNN.safetensors` (the factors of block N) and `emulator.json`, which
    `load_emulator` reads like a one-file emulator. `on_block(done, total)` is called after each block.
    Every target layer must lie inside a block; the others are named in the error.
    """
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    build = EmulatorBuild(streamed.model, rules, svd, streamed.device, base_model, weights_loaded=False, kind=kind)
    outside = [name for name in build.targets if _block_of(name, streamed.blocks) is None]
    if outside:
        raise ValueError(f"{len(outside)} compressed layers lie outside the model's blocks (e.g. {outside[0]!r}); "
                         "the streamed build factors only layers inside blocks")
    parts: dict[str, bytes] = {}
    with torch.no_grad():
        states = [streamed.enter(streamed, batch) for batch in batches]
        bar = tqdm(streamed.blocks, desc="Calibrating and factoring, block by block", unit="block",
                   disable=not progress)
        for index, block_name in enumerate(bar):
            block = streamed.load(block_name)
            names = [n for n in build.targets if _block_of(n, streamed.blocks) == block_name]
            measured = {n: build.targets[n][0] for n in names  # a kept layer (ratio 1) needs no statistics
                        if factored_rank(build.targets[n][0].in_features, build.targets[n][0].out_features,
                                         build.targets[n][1])}
            with StatsCollector(measured, torch.float32) as collector:
                outputs = []
                for state in states:
                    collector.mask = streamed.token_mask(state)
                    outputs.append(streamed.step(streamed, block_name, state))
                    collector.next_batch()
            states = outputs
            stats = second_moments(collector.result()) if measured else {}
            del collector
            tensors = {}
            for name in names:
                parts[name] = fingerprint_part(name, build.targets[name][0].weight)
                low = build.factor(name, stats.pop(name, None))
                if low is not None:
                    tensors.update({f"{name}.{key}": t.detach().to("cpu").contiguous()
                                    for key, t in low.state_dict().items()})
                    del low
            del stats
            save(tensors, str(folder / f"emulator-{index:05d}.safetensors"), metadata={"format": "emloc-emulator"})
            del tensors, block
            streamed.unload(block_name)
            if on_block is not None:
                on_block(index + 1, len(streamed.blocks))
    fingerprint = fingerprint_of_parts(parts[name] for name in build.targets)
    report = build.report
    report.fingerprint = build.info["fingerprint"] = fingerprint
    report.model_params_after = report.model_params_before - sum(r.params_before - r.params_after for r in report.layers)
    (folder / EMULATOR_CONFIG).write_text(json.dumps(build.info, indent=2))
    return report
