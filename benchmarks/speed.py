"""Training speed: one step of emulator + LoRA against full model + LoRA, and the time of each stage of a run.

    PYTHONPATH=. python benchmarks/speed.py steps [--models flux-256,internvl] [--ratios 0.3,0.5] [--repeats 3]
    PYTHONPATH=. python benchmarks/speed.py stages [--backends flux,vlm]

`steps`: the bench models of benchmarks/memory.py (real width, random weights, float32 on the CPU, bf16 on
CUDA), the same batch and LoRA settings for every model; the emulator has the shapes build_emulator gives
at each ratio (factored_rank: a layer stays dense at ratio 1 and where factors would not be smaller) with
random factors, since speed does not depend on their values. One warm-up step each, then the models take
turns step by step, so a busy machine slows all of them alike; the ratio is median(full) / median(emulator).
`stages`: a whole run (all five stages) through the run machine on the shipped demo models (assets/models/demo-*),
with the example data and default settings the app gives them; seconds per stage from run.json.
Writes benchmarks/out/speed-<device>.md / .json.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.memory import (OUT, BenchModel, bench_models, compress_rules, enable_checkpointing,  # noqa: E402
                               loss_of, lora_settings, make_batch, materialise, _module)


def emulator_shapes(spec: BenchModel, ratio: float, dtype: torch.dtype, device: str) -> nn.Module:
    """The emulator's architecture at `ratio`, with random factors (the values do not change the speed)."""
    from accelerate import init_empty_weights

    import emloc

    with init_empty_weights(include_buffers=False):
        model = _module(spec.bundle)
    for name, (linear, layer_ratio) in emloc.target_linears(model, emloc.normalise_rules(compress_rules(spec, ratio))).items():
        k = emloc.factored_rank(linear.in_features, linear.out_features, layer_ratio)
        if k:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, emloc.LowRankLinear(linear.in_features, linear.out_features, k,
                                                            bias=linear.bias is not None, device="meta"))
    return materialise(model, dtype=dtype).to(device).eval().requires_grad_(False)


def full_model(spec: BenchModel, dtype: torch.dtype, device: str) -> nn.Module:
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = _module(spec.bundle)
    return materialise(model, dtype=dtype).to(device).eval().requires_grad_(False)


class Trainer:
    """LoRA training as pipelines/stages.train: gradient checkpointing, float32 adapters, AdamW."""

    def __init__(self, spec: BenchModel, model: nn.Module, device: str):
        import emloc

        self.spec, self.device = spec, device
        enable_checkpointing(spec, model)
        torch.manual_seed(0)
        self.model = emloc.attach_lora(model, lora_settings(spec))
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)
        self.model.train()
        self.times: list[float] = []

    def step(self, batch: dict) -> float:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16, enabled=self.device.startswith("cuda")):
            loss = loss_of(self.spec, self.model, batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        self.times.append(seconds)
        return seconds


def step_speed(spec: BenchModel, ratios: list[float], repeats: int, device: str) -> list[dict]:
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    trainers = {"full": Trainer(spec, full_model(spec, dtype, device), device)}
    for ratio in ratios:
        trainers[f"emulator {ratio:g}"] = Trainer(spec, emulator_shapes(spec, ratio, dtype, device), device)
    batch = make_batch(spec, trainers["full"].model, seed=0, device=device)
    for trainer in trainers.values():  # warm-up: first-call allocations, thread pools
        trainer.step(batch)
        trainer.times.clear()
    for _ in range(repeats):
        for name, trainer in trainers.items():
            print(f"  {spec.key} {name}: {trainer.step(batch):.2f} s", file=sys.stderr, flush=True)
    full = statistics.median(trainers["full"].times)
    rows = []
    for ratio in ratios:
        emu = statistics.median(trainers[f"emulator {ratio:g}"].times)
        params = {n: sum(p.numel() for p in t.model.parameters()) for n, t in trainers.items()}
        rows.append({"model": spec.key, "ratio": ratio, "full_s": full, "emulator_s": emu, "speedup": full / emu,
                     "param_fraction": params[f"emulator {ratio:g}"] / params["full"], "repeats": repeats,
                     "full_times": trainers["full"].times, "emulator_times": trainers[f"emulator {ratio:g}"].times})
    return rows


# -- stage times of a whole run ---------------------------------------------------------------------------------
def demo_run(backend: str, work: Path):
    """`(Run, app defaults, uploads)`: a run folder on the shipped demo model of `backend` as the app starts one,
    from the app's example data and its default settings for that model (app/form.py), on the CPU."""
    from app import form, handlers
    from pipelines.runner.registry import DEMO_MODELS, backend_class, demo_suggestions, with_suggestions
    from pipelines.runner import Run, RunSettings

    model = DEMO_MODELS[backend]
    kind = backend_class(backend).data_kind  # the app's task: "images" or "qa"
    info = handlers.describe_model(kind, str(model))
    d = {**form.defaults(backend, info["params"], str(model)), "params": info["params"]}
    images, qa_rows, prompt = handlers.example_data(kind, work / "uploads")
    settings_class = backend_class(backend).settings_class
    if kind == "images":
        given = dict(images=str(work / "uploads"), prompt=prompt, trigger="sks", resolution=d["resolution"],
                     preview_steps=d["preview_steps"], max_sequence_length=d["max_sequence_length"])
    else:
        with open(work / "uploads" / "qa.csv", "w", newline="") as f:
            csv.writer(f).writerows([["image", "question", "answer"], *qa_rows])
        given = dict(data=str(work / "uploads" / "qa.csv"))
    settings = with_suggestions(settings_class, given, demo_suggestions(str(model)))  # what the app does
    run_settings = RunSettings(model=str(model), ratio=0.5, steps=d["steps"], lr=d["lr"], seed=d["seed"], lam=d["lam"],
                               calibration_samples=d["calibration_samples"], checkpoint_every=d["checkpoint_every"],
                               device="cpu")
    return Run.create(work / "runs" / backend, backend, run_settings, settings), d, images


def stage_times(backend: str, work: Path) -> dict:
    """A whole run on the shipped demo model of `backend` (demo_run), every stage; seconds per stage from run.json."""
    run, d, images = demo_run(backend, work)
    start = time.perf_counter()
    run.execute()
    total = time.perf_counter() - start
    stages = json.loads((run.dir / "run.json").read_text())["stages"]
    return {"backend": backend, "params": d["params"], "total_s": total, "steps": d["steps"], "samples": len(images),
            "stages": {name: stage.get("seconds") for name, stage in stages.items()}}


def markdown(steps: list[dict], stages: list[dict]) -> str:
    lines = []
    if steps:
        lines += ["| model | ratio | params kept | full + LoRA s/step | emulator + LoRA s/step | speed-up |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['model']} | {r['ratio']:g} | {r['param_fraction']:.2f} | {r['full_s']:.2f} | {r['emulator_s']:.2f} | "
                  f"{r['speedup']:.2f}x |" for r in steps]
    if stages:
        names = list(stages[0]["stages"])
        lines += ["", "| demo model | params | steps | " + " | ".join(names) + " | whole run |",
                  "|---|---:|---:|" + "---:|" * (len(names) + 1)]
        lines += [f"| {r['backend']} | {r.get('params', 0) / 1e6:.1f} M | {r.get('steps', '')} | " + " | ".join(f"{r['stages'][n]:.1f} s" if r["stages"][n] is not None else "-"
                                                     for n in names) + f" | {r['total_s']:.1f} s |" for r in stages]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("steps", "stages"))
    parser.add_argument("--models", default="flux-256,internvl")
    parser.add_argument("--ratios", default="0.3,0.5")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", default="flux,vlm")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vlm-layers", type=int, default=6)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    OUT.mkdir(parents=True, exist_ok=True)
    results = OUT / f"speed-{args.device}.json"
    saved = json.loads(results.read_text()) if results.exists() else {"steps": [], "stages": []}
    if args.what == "steps":
        models = bench_models(args.vlm_layers)
        ratios = [float(r) for r in args.ratios.split(",")]
        for key in args.models.split(","):
            rows = step_speed(models[key], ratios, args.repeats, args.device)
            saved["steps"] = [r for r in saved["steps"] if r["model"] != key] + rows
            results.write_text(json.dumps(saved, indent=1))
    else:
        for backend in args.backends.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                row = stage_times(backend, Path(tmp))
            saved["stages"] = [r for r in saved["stages"] if r["backend"] != backend] + [row]
            results.write_text(json.dumps(saved, indent=1))
    table = markdown(saved["steps"], saved["stages"])
    (OUT / f"speed-{args.device}.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
