"""Does every stage stream? Peak memory of each stage of a whole run, in its own process, at two model depths.

    PYTHONPATH=. python benchmarks/streaming.py [--depths 1+2,4+12] [--ram-gb 1.2] [--width 1024] [--resolution 64]
        [--emulator-kind lowrank|nf4|lowrank-nf4] [--class-prompt TEXT] [--holdout N] [--scales 0,0.5,1,1.25]

A FLUX folder is written per depth: a random-weight transformer of real head size (128) and the given width
(`--width` / 128 heads) with D double + S single blocks, beside the demo's VAE, text encoders and scheduler.
Then `launch.py train --stages X` runs each stage in a fresh process (4 calibration samples, 2 training
steps, ratio 0.45, as the app starts a run), and the process's peak resident memory (ru_maxrss of the child)
is recorded, with the run folder's size and the emulator's size. A stage that streams shows the same peak at
both depths; the training stage may grow by the emulator's own size. Prints a markdown table and writes
benchmarks/out/streaming.md.

Issue 29's phases, each in its own process too: `--class-prompt` turns prior preservation on: row "class" is the
base model drawing the class images alone (the train stage's first part, `DRAW`; planned: "class_images"), "train"
then trains with the class rows in each step, and "train + drawing" is the train stage of a fresh copy of the run,
drawing and training in one process (planned: the larger of "training" and "class_images"). `--holdout N` holds
photos out, so each sample round (`--sample-every`) of "train" also runs a validation round, and row "validate"
runs one alone on the trained emulator + LoRA (`VALIDATE`; planned: "training", which the planner argues it stays
under). `--scales` adds row "grid", `launch.py preview --scales` (the strength grid; planned: "preview").
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "out"
DEMO = ROOT / "assets" / "models" / "demo-flux"
STAGES = ("calibrate", "emulate", "train", "correct", "preview")
MiB = 1024 ** 2


def write_model(folder: Path, double: int, single: int, width: int) -> int:
    """A FLUX folder with a random transformer of `width` (heads of 128) and D + S blocks; returns its parameters."""
    import torch
    from diffusers import FluxTransformer2DModel

    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(DEMO, folder, ignore=shutil.ignore_patterns("transformer", "demo.json"))
    demo = json.loads((DEMO / "transformer" / "config.json").read_text())
    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=demo["in_channels"], num_layers=double,
                                   num_single_layers=single, attention_head_dim=128, num_attention_heads=width // 128,
                                   joint_attention_dim=demo["joint_attention_dim"],
                                   pooled_projection_dim=demo["pooled_projection_dim"], axes_dims_rope=[16, 56, 56])
    model.save_pretrained(folder / "transformer", safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def peak_of(command: list[str]) -> tuple[int, float]:
    """Peak RSS (bytes) and seconds of `command`, run in a fresh process that does nothing else."""
    probe = ("import resource, subprocess, sys, json, time; t = time.monotonic(); "
             "code = subprocess.run(sys.argv[1:]).returncode; "
             "print(json.dumps([code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.monotonic() - t]))")
    done = subprocess.run([sys.executable, "-c", probe, *command], capture_output=True, text=True, cwd=ROOT)
    code, kib, seconds = json.loads(done.stdout.strip().splitlines()[-1])
    if code != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return kib * 1024, seconds


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


DRAW = ("import sys; from pipelines.runner.machine import Run; from pipelines.runner import stages; "
        "run = Run.open(sys.argv[1]); run._prepare_cache(); stages._class_images(run)")
VALIDATE = ("import sys, torch, emloc; from pipelines.runner.machine import Run; "
            "from pipelines.runner.models import emulator_model; "
            "run = Run.open(sys.argv[1]); run._prepare_cache(); run.backend.use_class_images(run.dir / 'class-images') "
            "if (run.dir / 'class-images').is_dir() else None; "
            "model = emloc.load_adapter(emulator_model(run, run.backend.device), run.output('train')).eval(); "
            "scores = torch.no_grad()(run.backend.validation_scores)(model); assert scores, 'nothing held out'")


def measure(depth: str, width: int, resolution: int, work: Path, ram_gb: float, sample_every: int | None = None,
            kind: str = "lowrank", class_prompt: str = "", holdout: int = 0, scales: str = "") -> dict:
    from pipelines.demo import data

    double, single = (int(n) for n in depth.split("+"))
    model = work / f"flux-{depth}"
    params = write_model(model, double, single, width)
    images = work / "images"
    if not images.exists():
        data.write_subject_images(images, count=4, seed=0)
    out = work / f"run-{depth}"
    shutil.rmtree(out, ignore_errors=True)
    base = [sys.executable, str(ROOT / "launch.py"), "train", "--backend", "flux", "--model", str(model),
            "--images", str(images), "--prompt", "a photo of sks shape on a white background",
            "--resolution", str(resolution), "--steps", "2", "--calibration-samples", "4", "--ratio", "0.45",
            "--max-sequence-length", "32", "--preview-steps", "2", "--preview-seed", "0", "--device", "cpu",
            "--ram-gb", str(ram_gb), "--quiet", "--emulator-kind", kind] + \
        ([] if sample_every is None else ["--sample-every", str(sample_every)]) + \
        (["--class-prompt", class_prompt] if class_prompt else []) + (["--holdout", str(holdout)] if holdout else [])
    extra = (["class"] if class_prompt else []) + (["grid"] if scales else []) + (["validate"] if holdout else []) + \
        (["train + drawing"] if class_prompt else [])
    row = {"depth": depth, "params": params, "model_bytes": folder_bytes(model / "transformer"), "ram_gb": ram_gb,
           "kind": kind, "stages": list(STAGES) + extra}

    def stage(name: str, folder: Path = out, key: str = "") -> None:
        command = [*base, "--out", str(folder)] + (["--resume"] if name != "calibrate" else []) + ["--stages", name]
        row[key or name], row[(key or name) + "_seconds"] = peak_of(command)

    stage("calibrate")
    stage("emulate")
    fresh = work / f"run-{depth}.fresh"  # the run as it stands before training, for the train stage that draws
    shutil.rmtree(fresh, ignore_errors=True)
    if class_prompt:
        shutil.copytree(out, fresh)
        # issue 29 (a): the base model draws the class images alone, as the train stage's first part, in its own
        # process; the train stage below then reads them (training alone, with the class rows in each step)
        row["class"], row["class_seconds"] = peak_of([sys.executable, "-c", DRAW, str(out)])
    for name in ("train", "correct", "preview"):
        stage(name)
    if scales:  # (b) Preview's strength grid, as the app's job runs it
        row["grid"], row["grid_seconds"] = peak_of([sys.executable, str(ROOT / "launch.py"), "preview", "--run",
                                                    str(out), "--scales", scales, "--name", "grid"])
    if holdout:  # (c) a validation round alone: the trained emulator + LoRA, the held-out rows' no-grad forwards
        row["validate"], row["validate_seconds"] = peak_of([sys.executable, "-c", VALIDATE, str(out)])
    if class_prompt:  # the train stage as a fresh run runs it: drawing, then training, in one process
        stage("train", fresh, key="train + drawing")
        shutil.rmtree(fresh, ignore_errors=True)
    return record_run(row, out)


def record_run(row: dict, out: Path) -> dict:
    """Add the run folder's and emulator's sizes and what the run planned when it was created (run.json "plan")."""
    row["run_folder"] = folder_bytes(out)
    row["emulator"] = folder_bytes(out / "emulator")
    plan = json.loads((out / "run.json").read_text()).get("plan") or {}
    phases = {k: v["host_gib"] * 1024 for k, v in plan.get("phases", {}).items()}  # MiB
    if phases:
        row["planned"] = {"calibrate": None,  # a streamed run calibrates inside emulate
                          "emulate": max(phases["calibration"], phases["emulator"]), "train": phases["training"],
                          "correct": phases["correction"], "preview": phases["preview"],
                          "grid": phases["preview"]}  # every strength holds what "full + corrected LoRA" holds
        row["planned"]["validate"] = phases["training"]  # the planner adds nothing: within a training step
        if "class_images" in phases:  # a fresh train stage draws the class images first, then trains
            row["planned"]["train + drawing"] = max(phases["training"], phases["class_images"])
            row["planned"]["class"] = phases["class_images"]
        row["planned_streamed"] = {k: v["streamed"] for k, v in plan["phases"].items()}
        row["planned_folder"] = plan["run_folder_gib"] * 1024
    return row


def markdown(rows: list[dict], baseline: int, unit: str = "blocks", command: str = "launch.py train --stages X",
             files: str = "transformer files") -> str:
    head = " | ".join(f"{r['depth']} {unit} ({r['params'] / 1e6:.0f} M): measured | planned" for r in rows)
    lines = [f"| stage | {head} | deeper / shallower |", "|---|" + "---:|---:|" * len(rows) + "---:|"]

    def planned(r: dict, stage: str) -> str:
        value = r.get("planned", {}).get(stage)
        if value is None:
            return "in emulate" if stage == "calibrate" and "planned" in r else "-"
        return f"{value:.0f} ({100 * (r[stage] / MiB / value - 1):+.0f}%)"

    for stage in rows[0].get("stages", STAGES):
        cells = [f"{r[stage] / MiB:.0f} MiB | {planned(r, stage)}" for r in rows]
        lines.append(f"| {stage} | " + " | ".join(cells) + f" | {rows[-1][stage] / rows[0][stage]:.2f}x |")
    for key, label in (("run_folder", "run folder"), ("emulator", "emulator"), ("model_bytes", files)):
        plan = lambda r: f"{r['planned_folder']:.0f}" if key == "run_folder" and "planned_folder" in r else ""
        lines.append(f"| {label} | " + " | ".join(f"{r[key] / MiB:.0f} MiB | {plan(r)}" for r in rows)
                     + f" | {rows[-1][key] / max(rows[0][key], 1):.2f}x |")
    kind = rows[0].get("kind")
    lines.append(f"\n{'Emulator kind ' + kind + '. ' if kind else ''}Peak RSS (MiB) of each stage's process, and the host peak the run planned for it when it was "
                 f"created (run.json \"plan\"; in brackets: measured / planned - 1). A process that only imports the "
                 f"stack peaks at {baseline / MiB:.0f} MiB. Each stage is `{command}` with `--ram-gb` "
                 f"{rows[0].get('ram_gb', '')}; previews streamed: "
                 + ", ".join(f"{r['depth']} {r.get('planned_streamed', {}).get('preview')}" for r in rows) + ".")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default="1+2,4+12", help="double+single blocks, comma-separated")
    parser.add_argument("--width", type=int, default=1024, help="transformer width (heads of 128)")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--work", default=str(OUT / "streaming-work"))
    parser.add_argument("--ram-gb", type=float, default=1.2,
                        help="the run's host budget in GiB: what does not fit it is streamed from the files")
    parser.add_argument("--sample-every", type=int, default=None,
                        help="passed to launch.py train (0: no sample rounds during training); default: the run's own")
    parser.add_argument("--emulator-kind", default="lowrank", choices=("lowrank", "nf4", "lowrank-nf4"),
                        help="passed to launch.py train: how the emulator stores the compressed layers")
    parser.add_argument("--class-prompt", default="",
                        help="prior preservation (passed to launch.py train): the base model draws class images "
                             "before training; also measured alone (row 'class')")
    parser.add_argument("--holdout", type=int, default=0,
                        help="photos held out (passed to launch.py train): each sample round also runs a validation "
                             "round")
    parser.add_argument("--scales", default="",
                        help="also measure Preview's strength grid (launch.py preview --scales), e.g. 0,0.5,1,1.25")
    parser.add_argument("--name", default="streaming", help="benchmarks/out/<name>.md and .json receive the table")
    args = parser.parse_args(argv)
    drive(args, args.name, "import pipelines.runner, pipelines.flux.backend, diffusers",
          lambda depth, work: measure(depth, args.width, args.resolution, work, args.ram_gb, args.sample_every,
                                      args.emulator_kind, args.class_prompt, args.holdout, args.scales))
    return 0


def drive(args: argparse.Namespace, name: str, imports: str, measure_one, **table) -> None:
    """Measure every depth of `args.depths` in `args.work`, print the markdown table and write
    benchmarks/out/<name>.md and .json (`imports`: what a process that only imports the stack imports)."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    baseline, _ = peak_of([sys.executable, "-c", imports])
    rows = []
    for depth in args.depths.split(","):
        start = time.monotonic()
        rows.append(measure_one(depth, work))
        print(f"{depth}: measured in {time.monotonic() - start:.0f} s", file=sys.stderr)
    text = markdown(rows, baseline, **table)
    print(text)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.md").write_text(text + "\n")
    (OUT / f"{name}.json").write_text(json.dumps({"rows": rows, "baseline": baseline}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
