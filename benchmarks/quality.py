"""The paper's quality comparison, reproduced on the demo models: does LoRA trained on the emulator and
corrected do (almost) as well on the full model as LoRA trained on the full model?

    PYTHONPATH=. python benchmarks/quality.py [--backend flux|vlm|both] [--seeds 0,1] [--out benchmarks/out]

Tasks (held-out evaluation, pipelines/demo/data.py and pipelines/demo/evaluate.py):
- flux: teach "a sks shape" (a teal cross, a shape and colour the demo never saw) from four images;
  score = fraction of generations of "a sks shape on a white background" (16 unseen noise seeds) that the
  template matcher reads as a teal cross.
- vlm: teach whose mug is whose ("Whose mug is this?" -> "Ana's") from 4 images per owner; score = exact
  match on 6 unseen images per owner; "orig." = accuracy on the pretraining questions about unseen shapes
  after training (forgetting).

Every EMLoC number goes through the run machine (pipelines/runner/machine.py: calibrate -> emulate -> train ->
correct); the other λ are `emloc.correct_lora` on the same trained adapter. The full-model LoRA baseline
trains with the backend's own `training_loss`, the same optimiser, steps and per-step seeds, because the
run machine has no "train on the full model" mode. Columns: zero-shot (the full model), LoRA on the full
model, emulator + LoRA (what training saw), and full model + LoRA with λ = 0 (no correction), 3, ∞.
"Recovery" = (EMLoC λ=3 - zero-shot) / (full LoRA - zero-shot).

Training settings (FLUX_TASK / VLM_TASK below) were chosen by looking at the full-model LoRA baseline
only (the shortest recipe that learns the new task on the full model); the EMLoC columns were never
used to choose anything. Scores are means over the seeds; with 16 (flux) or 24 (vlm) held-out items per
seed, one item is 6 or 4 points, so differences of a few points are within noise.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import emloc  # noqa: E402
from pipelines.demo import data  # noqa: E402
from pipelines.demo import evaluate as demo_eval  # noqa: E402
from pipelines.demo import FLUX_DIR, VLM_DIR  # noqa: E402
from pipelines.runner import Run, RunSettings  # noqa: E402
from pipelines.runner.stages import emulator_model, step_seed  # noqa: E402

FLUX_PROMPT = "a sks shape on a white background"


@dataclass
class Task:
    """One backend's benchmark: how runs are made and how a model is scored."""

    backend: str
    run: dict  # RunSettings fields shared by every run
    model: Path = Path()  # the demo model folder (set in main)
    lam_sweep: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, math.inf])
    calibration_sweep: list[int] = field(default_factory=list)


FLUX_TASK = Task("flux", dict(steps=1000, lr=1e-3, rank=8, alpha=16.0, batch_size=4, calibration_samples=16,
                              gradient_checkpointing=False, mixed_precision="no", checkpoint_every=100_000),
                 calibration_sweep=[1, 4, 16, 64])
VLM_TASK = Task("vlm", dict(steps=120, lr=2e-3, rank=8, alpha=16.0, batch_size=4, calibration_samples=16,
                            gradient_checkpointing=False, mixed_precision="no", checkpoint_every=100_000),
                calibration_sweep=[8, 12, 16])


class Scorer:
    """Held-out scores of a model variant for one backend; data written once into `work`."""

    def __init__(self, backend: str, model: Path, work: Path):
        self.backend, self.model, self.work = backend, model, work
        if backend == "flux":
            self.images = work / "sks"
            data.write_subject_images(self.images, count=4, seed=7)
            self.pipe = demo_eval.load_flux_demo(model)  # text encoders + VAE; the transformer is swapped
            self.seeds = list(range(5000, 5016))
        else:
            from pipelines.internvl.data import QASample

            rows = data.write_mug_images(work / "mugs-train", per_owner=4, seed=7)
            with open(work / "mugs-train" / "qa.jsonl", "w") as f:
                for path, question, answer in rows:
                    f.write(json.dumps({"image": path.name, "question": question, "answer": answer}) + "\n")
            test = data.write_mug_images(work / "mugs-test", per_owner=6, seed=8)
            self.new_task = [QASample((str(p),), ((q, a),)) for p, q, a in test]
            self.original = demo_eval.data_samples(30, 20_000, work / "shapes-test")
            self.packer = None

    def backend_settings(self):
        if self.backend == "flux":
            from pipelines.flux.backend import FluxSettings

            return FluxSettings(images=str(self.images), prompt=FLUX_PROMPT, trigger="sks", resolution=data.IMAGE_SIZE,
                                max_sequence_length=demo_eval.FLUX_SEQUENCE_LENGTH)
        from pipelines.internvl.backend import VlmSettings

        return VlmSettings(data=str(self.work / "mugs-train" / "qa.jsonl"), max_new_tokens=8)

    @torch.no_grad()
    def score(self, model) -> dict[str, float]:
        model.eval()
        if self.backend == "flux":
            self.pipe.transformer = model.get_base_model() if hasattr(model, "get_base_model") else model
            try:
                return {"new": demo_eval.subject_rate(self.pipe, FLUX_PROMPT, self.seeds)}
            finally:
                self.pipe.transformer = None
        if self.packer is None:
            self.packer = demo_eval.load_vlm_demo(self.model)[1]
        return {"new": demo_eval.answer_accuracy(model, self.packer, self.new_task),
                "orig": demo_eval.answer_accuracy(model, self.packer, self.original)}


def make_run(task: Task, scorer: Scorer, folder: Path, ratio: float, seed: int, calibration: int | None = None) -> Run:
    """A run through calibrate -> emulate -> train -> correct (λ=3) with the run machine."""
    settings = RunSettings(model=str(task.model), ratio=ratio, seed=seed,
                           device="cpu", lam=3.0, **{**task.run, **({"calibration_samples": calibration}
                                                                      if calibration else {})})
    run = Run.create(folder, task.backend, settings, scorer.backend_settings())
    run.execute(["calibrate", "emulate", "train", "correct"])
    return run


def train_full_lora(run: Run) -> dict[str, torch.Tensor]:
    """LoRA on the full model with the run's backend, loss, optimiser, steps and per-step seeds (stages.train)."""
    backend, settings = run.backend, run.settings
    model = backend.load_model(torch.device("cpu"))
    peft_model = emloc.attach_lora(model, settings.lora(settings.lora_targets or backend.default_lora_targets()))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    peft_model.train()
    for step in range(settings.steps):
        torch.manual_seed(step_seed(settings.seed, step))
        generator = torch.Generator().manual_seed(step_seed(settings.seed, step))
        loss = backend.training_loss(peft_model, step, generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return peft_model


def corrected_model(run: Run, lam: float, cache: dict):
    """The full model with the run's emulator-trained LoRA corrected at `lam`."""
    state, config = emloc.read_adapter(run.output("train"))
    if "pair" not in cache:
        cache["pair"] = (run.backend.load_model(torch.device("cpu")), emulator_model(run, "cpu"))
    full, emulator = cache["pair"]
    fixed = emloc.correct_lora(full, emulator, state, emloc.lora_scaling(config), lam=lam, progress=False)
    folder = run.dir / f"lam-{lam}"
    emloc.write_adapter(fixed, config, folder)
    return emloc.load_adapter(run.backend.load_model(torch.device("cpu")), folder)


def measure_run(run: Run, scorer: Scorer, lams: list[float]) -> dict:
    """Scores of emulator + LoRA and of the full model + LoRA corrected at each λ."""
    out = {"emulator": scorer.score(emloc.load_adapter(emulator_model(run, "cpu"), run.output("train")))}
    cache: dict = {}
    for lam in lams:
        out[f"lam={lam}"] = scorer.score(corrected_model(run, lam, cache))
    return out


def mean(results: list[dict], key: str, metric: str) -> float:
    return float(np.mean([r[key][metric] for r in results]))


def fmt(results: list[dict], key: str, metrics: list[str]) -> str:
    return " / ".join(f"{mean(results, key, m):.2f}" for m in metrics)


def benchmark(task: Task, seeds: list[int], ratios: list[float], work: Path) -> str:
    """Run everything for one backend; returns the markdown report."""
    scorer = Scorer(task.backend, task.model, work)
    metrics = ["new"] if task.backend == "flux" else ["new", "orig"]
    started = time.monotonic()
    zero = scorer.score(scorer_base(task, scorer))
    by_ratio: dict[float, list[dict]] = {r: [] for r in ratios}
    full: list[dict] = []
    sweep_runs: dict[int, Run] = {}
    jobs = [(seed, ratio) for seed in seeds for ratio in ratios]
    for seed, ratio in tqdm(jobs, desc=f"{task.backend}: runs", unit="run"):
        run = make_run(task, scorer, work / f"run-s{seed}-r{ratio}", ratio, seed)
        lams = task.lam_sweep if ratio == 0.5 else [0.0, 3.0, math.inf]
        by_ratio[ratio].append({"zero": zero, **measure_run(run, scorer, lams)})
        if ratio == ratios[0]:
            full.append(scorer.score(train_full_lora(run)))
        if ratio == 0.5:
            sweep_runs[seed] = run
    for rows in by_ratio.values():
        for row, full_score in zip(rows, full):
            row["full"] = full_score
    calibration: dict[int, list[dict]] = {}
    for size in tqdm(task.calibration_sweep, desc=f"{task.backend}: calibration sizes", unit="size"):
        for seed in seeds[:1]:
            run = make_run(task, scorer, work / f"calib-s{seed}-n{size}", 0.5, seed, calibration=size)
            calibration.setdefault(size, []).append(measure_run(run, scorer, [0.0, 3.0]))
    minutes = (time.monotonic() - started) / 60
    return report(task, seeds, ratios, metrics, zero, by_ratio, calibration, minutes)


def scorer_base(task: Task, scorer: Scorer):
    """The full model without any LoRA (zero-shot)."""
    from pipelines.runner.registry import backend_class

    settings = RunSettings(model=str(task.model), device="cpu")
    return backend_class(task.backend)(settings, scorer.backend_settings(), torch.device("cpu")).load_model("cpu")


def report(task, seeds, ratios, metrics, zero, by_ratio, calibration, minutes) -> str:
    what = ("fraction of 16 generations of 'a sks shape on a white background' read as a teal cross"
            if task.backend == "flux" else
            "exact match on 24 held-out 'Whose mug is this?' images / accuracy on 60 held-out pretraining "
            "questions (forgetting)")
    lines = [f"### {task.backend}: {what}", "",
             f"Seeds {seeds}; run settings {json.dumps(task.run)}; {minutes:.1f} min on "
             f"{torch.get_num_threads()} CPU thread(s). Mean over seeds.", "",
             "| ratio | zero-shot | LoRA (full model) | emulator + LoRA | EMLoC λ=0 | EMLoC λ=3 | EMLoC λ=∞ | recovery λ=3 |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for ratio, rows in by_ratio.items():
        gain = mean(rows, "full", "new") - zero["new"]
        recovery = (mean(rows, f"lam={3.0}", "new") - zero["new"]) / gain if gain > 0 else float("nan")
        cells = [fmt(rows, k, metrics) for k in ("zero", "full", "emulator", "lam=0.0", "lam=3.0", "lam=inf")]
        lines.append(f"| {ratio} | " + " | ".join(cells) + f" | {recovery:.0%} |")
    rows = by_ratio.get(0.5, [])
    if rows:
        lines += ["", f"λ sweep at ratio 0.5 (full model + corrected LoRA; {'/'.join(metrics)}):", "",
                  "| λ | " + " | ".join(str(l) for l in task.lam_sweep) + " |",
                  "|---|" + "---:|" * len(task.lam_sweep),
                  "| score | " + " | ".join(fmt(rows, f"lam={l}", metrics) for l in task.lam_sweep) + " |"]
    if calibration:
        lines += ["", f"Calibration-size sweep at ratio 0.5, seed {seeds[0]} ({'/'.join(metrics)}):", "",
                  "| calibration batches | emulator + LoRA | EMLoC λ=0 | EMLoC λ=3 |", "|---:|---:|---:|---:|"]
        for size, rows in calibration.items():
            lines.append(f"| {size} | " + " | ".join(fmt(rows, k, metrics) for k in ("emulator", "lam=0.0", "lam=3.0")) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("flux", "vlm", "both"), default="both")
    parser.add_argument("--seeds", default="0,1", help="comma-separated run seeds")
    parser.add_argument("--ratios", default="0.3,0.5,0.7")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--flux-model", default=str(FLUX_DIR), help="FLUX demo folder")
    parser.add_argument("--vlm-model", default=str(VLM_DIR), help="InternVL demo folder")
    parser.add_argument("--steps", type=int, default=0, help="override the training steps (0: the task's)")
    parser.add_argument("--no-sweeps", action="store_true", help="skip the λ and calibration-size sweeps")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    ratios = [float(r) for r in args.ratios.split(",")]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    FLUX_TASK.model, VLM_TASK.model = Path(args.flux_model), Path(args.vlm_model)
    for task in (FLUX_TASK, VLM_TASK):
        if args.backend not in ("both", task.backend):
            continue
        if args.steps:
            task.run["steps"] = args.steps
        if args.no_sweeps:
            task.lam_sweep, task.calibration_sweep = [0.0, 3.0, math.inf], []
        work = Path(tempfile.mkdtemp(prefix=f"quality-{task.backend}-"))
        try:
            text = benchmark(task, seeds, ratios, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(text + "\n", flush=True)
        (Path(args.out) / f"quality_{task.backend}.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
