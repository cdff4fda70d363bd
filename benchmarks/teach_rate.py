"""Does the FLUX demo learn a new subject with the defaults? A whole headless run, then a count of seeds.

    PYTHONPATH=. python benchmarks/teach_rate.py [--model assets/models/demo-flux] [--seeds 16] [--photo-seed 2029]
        [--placement varied] [-- EXTRA TRAIN FLAGS]

1. Draws 5 fresh photos of the demo subject (a teal cross, a shape/colour pair the demo never saw in pretraining;
   pipelines/demo/data.py) from `--photo-seed`, a seed neither the demo's build nor the app's example set uses, at
   the sizes and places a user's photos vary by (data.PLACEMENTS["varied"]: side 35-65% of the frame, centre within
   +-15%).
2. Runs, as a new user would, `launch.py train --backend flux --images DIR --prompt "a photo of sks shape on a
   white background" --out RUN` (no other flag unless given after `--`; `--model` only when not the shipped demo),
   timing its wall seconds and its CPU seconds (user + sys of the child process, resource.getrusage).
3. Loads the model with plain diffusers (`FluxPipeline.from_pretrained`), draws the prompt from preview seeds the
   run never used (1000, 1001, ...) at the demo's suggested sampling settings, and counts the images the pixel rule
   reads as a teal cross (data.read_image: colour nearest teal and the cross template's IoU >= 0.6): the base
   model, then with the run's corrected LoRA (lora/diffusers), then with the uncorrected one.
Writes benchmarks/out/teach-rate.json and prints one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PROMPT = "a photo of sks shape on a white background"
PHOTO_SEED = 2029  # the build draws from seeds 1-11 and 20-21 (+ --seed), the app's example photos from 0


def train(model: Path, images: Path, out: Path, extra: list[str]) -> dict:
    """The headless run; returns its command, exit code, wall and CPU seconds."""
    command = [sys.executable, str(ROOT / "launch.py"), "train", "--backend", "flux", "--images", str(images),
               "--prompt", PROMPT, "--out", str(out), "--quiet", *extra]
    if model.resolve() != (ROOT / "assets" / "models" / "demo-flux").resolve():
        command += ["--model", str(model)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise SystemExit(f"the run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    stages = json.loads((out / "run.json").read_text())["stages"]
    return {"command": " ".join(command[1:]), "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "stage_s": {name: stage.get("seconds") for name, stage in stages.items()},
            "settings": json.loads((out / "run.json").read_text())["settings"]}


def subject_count(pipe, seeds: list[int], steps: int, sequence_length: int) -> tuple[int, dict]:
    """How many of the prompt's images (one per seed) the pixel rule reads as a teal cross, and what it read
    in each (`"teal cross": 13, "teal square": 2, ...`)."""
    from collections import Counter

    from pipelines.demo import data
    from pipelines.demo.evaluate import generate

    images = generate(pipe, [PROMPT], seeds, steps=steps, sequence_length=sequence_length)
    readings = [data.read_image(image) for image in images]
    count = sum(r.shape == data.SUBJECT_SHAPE and r.colour == "teal" for r in readings)
    return count, dict(Counter(f"{r.colour} {r.shape}" for r in readings).most_common())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "assets" / "models" / "demo-flux")
    parser.add_argument("--seeds", type=int, default=16, help="preview seeds 1000, 1001, ... counted")
    parser.add_argument("--keep", type=Path, help="keep the run folder here (default: a temporary folder)")
    parser.add_argument("--photo-seed", type=int, default=PHOTO_SEED, help="seed the 5 photos are drawn from")
    parser.add_argument("--placement", default="varied", help="how the photos vary (data.PLACEMENTS)")
    parser.add_argument("extra", nargs="*", help="flags passed on to launch.py train (after --)")
    args = parser.parse_args(argv)

    import torch

    from pipelines.demo import data
    from pipelines.demo.evaluate import load_flux_demo

    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        images = data.write_subject_images(work / "photos", count=5, seed=args.photo_seed, placement=args.placement)
        run = train(args.model, images[0].parent, work / "run", args.extra)
        backend = run["settings"]["backend"]
        steps, length = backend["preview_steps"], backend["max_sequence_length"]
        seeds = list(range(1000, 1000 + args.seeds))
        pipe = load_flux_demo(args.model)
        counts, read = {}, {}
        counts["base"], read["base"] = subject_count(pipe, seeds, steps, length)
        for label, folder in (("corrected", "diffusers"), ("uncorrected", "diffusers-uncorrected")):
            pipe.load_lora_weights(str(work / "run" / "lora" / folder), weight_name="pytorch_lora_weights.safetensors",
                                   adapter_name=label)
            pipe.set_adapters([label])
            counts[label], read[label] = subject_count(pipe, seeds, steps, length)
            pipe.delete_adapters([label])
    result = {"photos": {"seed": args.photo_seed, "placement": args.placement}, "seeds": f"{seeds[0]}-{seeds[-1]}",
              "n": len(seeds), "shows_subject": counts, "read": read,
              "steps": run["settings"]["run"]["steps"], "lr": run["settings"]["run"]["lr"],
              "wall_s": run["wall_s"], "cpu_s": run["cpu_s"], "stage_s": run["stage_s"],
              "torch_threads": os.environ.get("OMP_NUM_THREADS", f"default ({torch.get_num_threads()} here)"),
              "command": run["command"]}
    out = ROOT / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "teach-rate.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
