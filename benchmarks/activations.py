"""Activation accounting that does not depend on the allocator: what autograd saves in one training step.

    PYTHONPATH=. python benchmarks/activations.py [--models flux-256,flux-512,internvl] [--dtype float32]

A saved_tensors_hooks pack hook sees every tensor autograd keeps for backward (counted when it is still
held at the end of the forward); storages are counted once (views and tensors shared between ops are one allocation) and parameters not at all. A forward
pre-hook on every block says which block saved it. Without gradient checkpointing that is the whole
story. With it, the checkpoint keeps each block's inputs (counted from the pre-hooks, deduplicated the
same way; a storage both saved and passed counts once) and recomputes one block at a time in backward, whose saved tensors are those measured
without checkpointing. Compared with the planner's "activations" (+ "recompute one block") term of
emloc.memory for the same model, settings and dtype. Writes benchmarks/out/activations.md / .json.
"""

from __future__ import annotations

import argparse
import json
import sys
import weakref
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.memory import (OUT, BenchModel, bench_models, build, enable_checkpointing, loss_of,  # noqa: E402
                               lora_settings, make_batch, memory_settings, planner)

KiB = 1024


def _tensors(value) -> list[torch.Tensor]:
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


class _Held:
    """What the pack hook hands autograd: while autograd (or a checkpoint) keeps it, it is alive."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class SavedTensors:
    """Counts the bytes autograd saves, by storage, attributed to the block (or "outside") that saved them."""

    def __init__(self, model: nn.Module, blocks: dict[str, str]):
        self.skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.saved: dict[int, tuple[int, str]] = {}  # storage -> (bytes, block or "outside"), after `freeze`
        self.packed: list[tuple[weakref.ref, int, int, str]] = []  # (holder, storage, bytes, block), in order
        self.inputs: dict[int, int] = {}  # storage -> bytes of block inputs (what a checkpoint keeps)
        self.current: list[str] = []
        self.pending: list[list[tuple[int, int]]] = []
        self.forward = False
        self.handles = []
        for name, module in model.named_modules():
            short = name.removeprefix("base_model.model.")
            if short in blocks:
                self.handles.append(module.register_forward_pre_hook(self._enter(short), with_kwargs=True))
                self.handles.append(module.register_forward_hook(self._leave))

    def _enter(self, name: str):
        def hook(module, args, kwargs):
            self.current.append(name)
            self.pending.append([(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
                                 for t in _tensors(args) + _tensors(kwargs)
                                 if t.is_floating_point() and t.untyped_storage().data_ptr() not in self.skip])
        return hook

    def _leave(self, module, args, output):
        self.current.pop()
        inputs = self.pending.pop()
        # a checkpoint keeps its inputs only when its output is part of the graph (not in a frozen tower)
        if self.forward and any(t.requires_grad for t in _tensors(output)):
            for key, size in inputs:
                self.inputs.setdefault(key, size)

    def pack(self, t: torch.Tensor) -> _Held:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        held = _Held(t)
        if key and key not in self.skip:
            self.packed.append((weakref.ref(held), key, storage.nbytes(), self.current[-1] if self.current else "outside"))
        return held

    @staticmethod
    def unpack(held: _Held) -> torch.Tensor:
        return held.tensor

    def freeze(self) -> None:
        """At the end of the forward: what is still held for backward. A checkpoint saves its inputs through the
        pack hook even when nothing in it needs grads (torch 2.13), and drops them with its frame: not held."""
        for ref, key, size, block in self.packed:
            if ref() is not None and key not in self.saved:
                self.saved[key] = (size, block)
        self.packed.clear()

    def by_block(self) -> dict[str, int]:
        totals: dict[str, int] = defaultdict(int)
        for size, block in self.saved.values():
            totals[block] += size
        return dict(totals)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def measure(spec: BenchModel, checkpointing: bool, dtype: torch.dtype = torch.float32, rank: int = 16,
            model: nn.Module | None = None) -> dict:
    """One LoRA training step of the full model (the emulator saves the same: its factored layers are frozen
    linears too, which keep no activations); returns saved bytes per block and outside the blocks."""
    import emloc

    summary, arch = planner(spec)
    model = model if model is not None else build(spec, dtype=dtype)
    if checkpointing:
        enable_checkpointing(spec, model)
    torch.manual_seed(0)
    peft_model = emloc.attach_lora(model, lora_settings(spec, rank))
    for p in peft_model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    peft_model.train()
    counter = SavedTensors(peft_model, summary.block_stack)
    batch = make_batch(spec, model, seed=0)
    try:
        counter.forward = True
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
            loss = loss_of(spec, peft_model, batch)
        counter.forward = False
        counter.freeze()
        loss.backward()
    finally:
        counter.close()
    blocks = counter.by_block()
    # what the blocks keep for backward: their saved tensors and their inputs (which a checkpoint holds; a
    # storage both saved in a block and passed to one counts once); "outside": other saved tensors (loss, head)
    in_blocks = {key for key, (_, block) in counter.saved.items() if block != "outside"}
    held = sum(blocks.get(b, 0) for b in summary.block_stack) + sum(
        size for key, size in counter.inputs.items() if key not in in_blocks)
    if not checkpointing:
        held = sum(blocks.get(b, 0) for b in summary.block_stack)  # no checkpoint holds the inputs
    return {"blocks": {b: blocks.get(b, 0) for b in summary.block_stack}, "outside": blocks.get("outside", 0),
            "held": held}


def planner_terms(spec: BenchModel, checkpointing: bool, dtype: str = "float32", rank: int = 16) -> dict:
    from emloc.memory import plan_memory

    summary, arch = planner(spec)
    plan = plan_memory(summary, arch, memory_settings(spec, dtype=dtype, lora_rank=rank,
                                                      gradient_checkpointing=checkpointing))
    parts = plan.get("training", "emloc").parts
    return {k: parts.get(k, 0) for k in ("activations", "recompute one block", "logits", "activations (frozen forward)")}


def compare(spec: BenchModel, dtype: torch.dtype = torch.float32, rank: int = 16) -> list[dict]:
    """Measured vs predicted block activations, without and with gradient checkpointing."""
    name = str(dtype).removeprefix("torch.")
    plain = measure(spec, False, dtype, rank)
    ckpt = measure(spec, True, dtype, rank)
    blocks = sum(plain["blocks"].values())
    recompute = max(plain["blocks"].values())
    rows = []
    for checkpointing, measured, outside in ((False, blocks, plain["outside"]),
                                             (True, ckpt["held"] + recompute, ckpt["outside"])):
        terms = planner_terms(spec, checkpointing, name, rank)
        predicted = terms["activations"] + terms["recompute one block"]
        rows.append({"model": spec.key, "dtype": name, "checkpointing": checkpointing, "measured": measured,
                     "predicted": predicted, "error": predicted / measured - 1, "outside_blocks": outside,
                     "planner_logits": terms["logits"], "per_block": plain["blocks"]})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model | dtype | checkpointing | predicted MiB | measured MiB | error % | saved outside blocks MiB |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['dtype']} | {'on' if r['checkpointing'] else 'off'} | "
                     f"{r['predicted'] / 2**20:.1f} | {r['measured'] / 2**20:.1f} | {100 * r['error']:+.1f} | "
                     f"{r['outside_blocks'] / 2**20:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="flux-256,flux-512,internvl")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--vlm-layers", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    models = bench_models(args.vlm_layers)
    rows = []
    for key in args.models.split(","):
        rows += compare(models[key], getattr(torch, args.dtype))
        print(markdown(rows[-2:]), file=sys.stderr, flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    results = OUT / f"activations-{args.dtype}.json"
    kept = [r for r in (json.loads(results.read_text()) if results.exists() else [])
            if r["model"] not in {row["model"] for row in rows}]  # other models' rows from earlier runs
    rows = sorted(kept + rows, key=lambda r: (r["model"], r["checkpointing"]))
    results.write_text(json.dumps(rows, indent=1))
    table = markdown(rows)
    (OUT / f"activations-{args.dtype}.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
