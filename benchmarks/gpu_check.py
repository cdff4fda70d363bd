"""The GPU check of issue 25 (item 6): one prepared script, at most ~10 minutes on one GPU.

    python benchmarks/gpu_check.py                          # on the GPU machine: CUDA, bf16
    python benchmarks/gpu_check.py --device cpu --quick     # proves the script end to end on a CPU (no GPU numbers)

What it runs, each stage of each run in its own process (`launch.py train --stages X`, wrapped so that the process
reports torch.cuda.max_memory_allocated / max_memory_reserved, the device memory outside the caching allocator
and its peak RSS):
1. a probe of the device: float32 vs float64 matmul rate, a float64 eigh of 3072 on the device and on the CPU, and
   the emulator's W C Wᵀ (3072 x 12288) with float64 and with "split" products (emloc/factorize.py; F10);
2. the FLUX demo (assets/models/demo-flux) and the InternVL demo (assets/models/demo-internvl) end to end on the
   device in the run's precision (bf16 on CUDA: `--mixed-precision auto`);
3. a FLUX transformer of real width (3072, heads of 128) with a few blocks, random weights in bf16, written with
   save_pretrained beside the demo's VAE and text encoders, through every stage at 256 px (4096 image tokens through
   the demo's VAE, as FLUX.1 at 1024 px); then the same model
   at `--ratio 1` (nothing factored: LoRA on the full model) for the training step time.
It prints markdown tables (each stage's allocated / reserved peak against the run's plan, as run.json records
both, and as this script measured; the step time of emulator + LoRA against LoRA on the full model) and writes
them to benchmarks/out/gpu-check.md (+ .json).

A bare GPU machine has torch but may lack the rest. Missing packages are installed from a `wheels/` folder at the
repository root (`--wheels`), never from the network: `pip install --no-index --no-deps --find-links wheels/ ...`.
Fill it beforehand, for the GPU machine's Python and platform, with
    pip download --no-deps --python-version 3.X --platform manylinux2014_x86_64 --only-binary=:all: -d wheels \\
        diffusers==0.42.1 transformers==5.23.0 peft==0.21.2 accelerate==1.15.0 safetensors==0.8.0 \\
        tokenizers==0.23.3 huggingface_hub==2.4.0 httpx2==2.17.0 httpcore2==2.17.0 h11==0.16.0 anyio==4.16.0 \\
        idna==3.20 certifi requests==2.34.2 charset-normalizer==3.5.3 urllib3==2.8.0 regex==2026.12.2 \\
        PyYAML==6.0.4 numpy==2.4.6 pillow==12.3.0 psutil==7.2.2 tqdm==4.70.1 packaging==26.4
(the distributions `launch.py train` loads for FLUX and InternVL besides torch's own; torch 2.11 brings filelock,
fsspec, jinja2, networkx, sympy and typing_extensions). A package still missing after that stops the script with
its name: nothing is skipped silently.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "out"
DEMOS = ROOT / "assets" / "models"
GiB = 1024 ** 3
STAGES = ("calibrate", "emulate", "train", "correct", "preview")
STAGE_PHASES = {"calibrate": ("calibration",), "emulate": ("calibration", "emulator"), "train": ("training",),
                "correct": ("correction",), "preview": ("preview",)}  # a streamed run calibrates inside emulate
# import name -> the wheel that provides it (the docstring's list)
WHEELS = {"diffusers": "diffusers==0.42.1", "transformers": "transformers==5.23.0", "peft": "peft==0.21.2",
          "accelerate": "accelerate==1.15.0", "safetensors": "safetensors==0.8.0", "tokenizers": "tokenizers==0.23.3",
          "huggingface_hub": "huggingface_hub==2.4.0", "httpx2": "httpx2==2.17.0", "httpcore2": "httpcore2==2.17.0",
          "h11": "h11==0.16.0", "anyio": "anyio==4.16.0", "idna": "idna==3.20", "certifi": "certifi",
          "requests": "requests==2.34.2", "charset_normalizer": "charset-normalizer==3.5.3", "urllib3": "urllib3==2.8.0",
          "regex": "regex==2026.12.2", "yaml": "PyYAML==6.0.4", "numpy": "numpy==2.4.6", "PIL": "pillow==12.3.0",
          "psutil": "psutil==7.2.2", "tqdm": "tqdm==4.70.1", "packaging": "packaging==26.4"}
# run in a fresh interpreter around one `launch.py train --stages X`: what that process held
WRAPPER = r"""
import json, resource, runpy, sys, time
sys.argv = sys.argv[1:]
start, code = time.monotonic(), 0
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as end:
    code = end.code if isinstance(end.code, int) else (0 if end.code is None else 1)
out = {"code": code, "seconds": round(time.monotonic() - start, 1),
       "host_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
import torch
if torch.cuda.is_available() and torch.cuda.is_initialized():
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    out.update(allocated=torch.cuda.max_memory_allocated(), reserved=torch.cuda.max_memory_reserved(),
               outside_allocator=total - free - torch.cuda.memory_reserved())
print("GPU_CHECK " + json.dumps(out))
"""


def ensure_packages(wheels: Path) -> None:
    """Install the missing distributions of WHEELS from `wheels` (no network); stop, naming them, if any stays missing."""
    missing = [name for name in WHEELS if importlib.util.find_spec(name) is None]
    if missing and wheels.is_dir():
        print(f"installing from {wheels}: {', '.join(WHEELS[m] for m in missing)}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--find-links", str(wheels),
                        *(WHEELS[m] for m in missing)], check=False)
        importlib.invalidate_caches()
        missing = [name for name in missing if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"missing packages: {', '.join(WHEELS[m] for m in missing)}; put their wheels in {wheels} "
                         "(see this script's docstring) and run it again")


def _timed(function, device, repeat: int = 3) -> float:
    import torch

    function()  # warm-up (kernels load, workspace)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        function()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat


def probe(device_name: str, quick: bool) -> list[tuple[str, str]]:
    """The device's float32/float64 rates and the emulator's float64 pieces on it (reviews/gpu-path.md F10)."""
    import torch

    from emloc import factorize

    device = torch.device(device_name)
    rows = [("torch", torch.__version__)]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        rows += [("device", f"{props.name}, {props.total_memory / GiB:.1f} GiB, capability {props.major}.{props.minor}"),
                 ("factorisation placement", json.dumps(factorize.factorisation_placement(device)))]
    n = 1024 if quick else 4096
    for dtype in (torch.float32, torch.float64):
        a = torch.randn(n, n, device=device, dtype=dtype)
        seconds = _timed(lambda: a @ a, device)
        rows.append((f"matmul {n}² {str(dtype)[6:]}", f"{2 * n ** 3 / seconds / 1e12:.2f} TFLOP/s"))
    size = 256 if quick else 3072
    g = torch.randn(size, size, dtype=torch.float64)
    g = g @ g.T
    for where in dict.fromkeys([device, torch.device("cpu")]):
        matrix = g.to(where)
        rows.append((f"eigh {size}² float64 on {where}", f"{_timed(lambda: torch.linalg.eigh(matrix), where, 1):.2f} s"))
    out_f, in_f = (128, 512) if quick else (3072, 12288)
    w = torch.randn(out_f, in_f, device=device) / in_f ** 0.5
    x = torch.randn(4 * in_f // 3, in_f, device=device)
    x[:, :2] *= 1e3  # two massive channels
    c = x.T @ x
    for products in factorize.PRODUCTS:
        rank = out_f // 2
        seconds = _timed(lambda: factorize.output_gram_factors(w, c, rank, products), device, 1)
        rows.append((f"W C Wᵀ factors {out_f}x{in_f}, {products} products", f"{seconds:.2f} s"))
    return rows


def stage(command: list[str], timeout: float) -> dict:
    """Run one `launch.py train ...` in a fresh process through WRAPPER; its report (raises if it failed)."""
    done = subprocess.run([sys.executable, "-c", WRAPPER, str(ROOT / "launch.py"), "train", *command], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout, env=_env())
    lines = [line for line in done.stdout.splitlines() if line.startswith("GPU_CHECK ")]
    report = json.loads(lines[-1][len("GPU_CHECK "):]) if lines else {"code": done.returncode}
    if report["code"] != 0:
        raise RuntimeError(f"launch.py {' '.join(command)} failed (exit {report['code']}):\n{done.stderr[-4000:]}")
    return report


def _env() -> dict:
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def run_all_stages(name: str, command: list[str], out: Path, timeout: float, stages=STAGES) -> list[dict]:
    """Every stage of one run, each in its own process; rows of what it held against what the run planned."""
    shutil.rmtree(out, ignore_errors=True)
    rows = []
    for index, stage_name in enumerate(stages):
        extra = (["--resume"] if index else []) + ["--stages", stage_name]
        started = time.monotonic()
        report = stage(command + ["--out", str(out)] + extra, timeout)
        print(f"  {name} {stage_name}: {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
        rows.append({"run": name, "stage": stage_name, **report, **_recorded(out, stage_name)})
    return rows


def _gib(value) -> float | None:
    """A run.json memory figure in GiB (the runner writes GiB; bytes are converted)."""
    if value is None:
        return None
    return value / GiB if value > 1024 else float(value)


def _recorded(out: Path, stage_name: str) -> dict:
    """What run.json says of the stage: the plan's device and host GiB (the largest of its phases) and what the
    stage held (`stages.<stage>.held`, written by the run machine: *_gib keys), read defensively."""
    info = json.loads((out / "run.json").read_text())
    phases = (info.get("plan") or {}).get("phases", {})
    planned = [phases[p] for p in STAGE_PHASES[stage_name] if p in phases]
    held = ((info.get("stages") or {}).get(stage_name) or {}).get("held") or {}
    pick = lambda *keys: next((held[k] for k in keys if k in held), None)  # noqa: E731
    return {"plan_device_gib": max((p.get("device_gib", 0) for p in planned), default=None),
            "plan_host_gib": max((p.get("host_gib", 0) for p in planned), default=None),
            "held_allocated_gib": _gib(pick("device_allocated_gib", "device_allocated")),
            "held_reserved_gib": _gib(pick("device_reserved_gib", "device_reserved")),
            "held_host_gib": _gib(pick("host_rss_gib", "host_rss")),
            "device": info.get("device") or (info.get("plan") or {}).get("device")}


def step_seconds(out: Path) -> float | None:
    """Median seconds per training step from the run's loss log (cumulative "seconds" at each logged step), the
    entries of the first steps (kernel warm-up, allocator growth) left out where there are enough."""
    from pipelines.runner.settings import LOSS_LOG

    log = out / LOSS_LOG
    if not log.is_file():
        return None
    entries = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    points = [(e["step"], e["seconds"]) for e in entries if "seconds" in e]
    points = points[min(3, max(len(points) - 2, 0)):]
    rates = sorted((t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(points, points[1:]) if s1 > s0)
    return rates[len(rates) // 2] if rates else None


def write_wide_flux(folder: Path, width: int, double: int, single: int, device: str, dtype_name: str) -> int:
    """A FLUX folder: a random transformer of `width` (heads of 128), `double` + `single` blocks, built on the device
    in the run's dtype and saved with save_pretrained, beside the demo's VAE, text encoders and scheduler."""
    import torch
    from diffusers import FluxTransformer2DModel

    shutil.rmtree(folder, ignore_errors=True)
    demo = DEMOS / "demo-flux"
    shutil.copytree(demo, folder, ignore=shutil.ignore_patterns("transformer", "demo.json"))
    config = json.loads((demo / "transformer" / "config.json").read_text())
    torch.manual_seed(0)
    with torch.device(device):
        model = FluxTransformer2DModel(patch_size=1, in_channels=config["in_channels"], num_layers=double,
                                       num_single_layers=single, attention_head_dim=128,
                                       num_attention_heads=width // 128, guidance_embeds=config["guidance_embeds"],
                                       joint_attention_dim=config["joint_attention_dim"],
                                       pooled_projection_dim=config["pooled_projection_dim"],
                                       axes_dims_rope=[16, 56, 56])
    model.to(getattr(torch, dtype_name)).save_pretrained(folder / "transformer", safe_serialization=True)
    params = sum(p.numel() for p in model.parameters())
    del model
    return params


def markdown(probe_rows, rows, steps) -> str:
    lines = ["| probe | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in probe_rows), "",
             "| run | stage | plan device GiB | held alloc / reserved (run.json) | measured alloc / reserved | "
             "outside allocator | plan host GiB | host RSS GiB | s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for r in rows:
        measured = (f"{r['allocated'] / GiB:.2f} / {r['reserved'] / GiB:.2f}" if "allocated" in r else "- (no CUDA)")
        lines.append(f"| {r['run']} | {r['stage']} | {fmt(r['plan_device_gib'])} | {fmt(r['held_allocated_gib'])} / "
                     f"{fmt(r['held_reserved_gib'])} | {measured} | "
                     f"{fmt(r['outside_allocator'] / GiB) if 'outside_allocator' in r else '-'} | "
                     f"{fmt(r['plan_host_gib'])} | {r['host_rss'] / GiB:.2f} | {r['seconds']:.0f} |")
    lines += ["", "| model | emulator + LoRA s/step | LoRA on the full model (ratio 1) s/step | full / emulator |",
              "|---|---:|---:|---:|"]
    for name, (emulated, full) in steps.items():
        ratio = f"{full / emulated:.2f}x" if emulated and full else "-"
        lines.append(f"| {name} | {fmt(emulated)} | {fmt(full)} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (the check) or cpu (to prove the script)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and a few steps: proves the plumbing only")
    parser.add_argument("--wheels", default=str(ROOT / "wheels"), help="folder of wheels for missing packages")
    parser.add_argument("--work", default=str(OUT / "gpu-check-work"))
    parser.add_argument("--timeout", type=float, default=300, help="seconds one stage may take")
    args = parser.parse_args(argv)
    ensure_packages(Path(args.wheels))
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: this torch sees no GPU; run with --device cpu --quick to prove the script")
    from pipelines.demo import data

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    probe_rows = probe(args.device, args.quick)
    print(f"probe: {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    demo_steps, wide_steps = (4, 3) if args.quick else (60, 20)
    common = ["--device", args.device, "--quiet", "--steps", str(demo_steps), "--sample-every", "0"]
    images = work / "images"
    data.write_subject_images(images, count=4, seed=0)
    flux = ["--backend", "flux", "--model", str(DEMOS / "demo-flux"), "--images", str(images), "--prompt",
            "a photo of sks shape on a white background", "--preview-steps", "4", *common]
    rows = run_all_stages("FLUX demo", flux, work / "run-flux-demo", args.timeout)
    mugs = data.write_mug_images(work / "mugs", per_owner=2, seed=0)
    with open(work / "mugs" / "qa.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "question", "answer"])
        writer.writerows([p.name, q, a] for p, q, a in mugs)
    vlm = ["--backend", "vlm", "--model", str(DEMOS / "demo-internvl"), "--data", str(work / "mugs" / "qa.csv"),
           "--max-new-tokens", "8", *common]
    rows += run_all_stages("InternVL demo", vlm, work / "run-vlm-demo", args.timeout)
    # 256 px through the demo's VAE (4 px per latent, patch 1) is 4096 image tokens: FLUX.1's count at 1024 px
    width, double, single, size = (256, 1, 1, 64) if args.quick else (3072, 2, 4, 256)
    dtype_name = "bfloat16" if args.device.startswith("cuda") else "float32"
    wide = work / "flux-wide"
    params = write_wide_flux(wide, width, double, single, args.device, dtype_name)
    name = f"FLUX width {width}, {double}+{single} blocks ({params / 1e6:.0f} M)"
    wide_run = ["--backend", "flux", "--model", str(wide), "--images", str(images), "--prompt",
                "a photo of sks shape on a white background", "--resolution", str(size), "--preview-steps", "4",
                "--calibration-samples", "4", "--max-sequence-length", "32", *common, "--steps", str(wide_steps)]
    rows += run_all_stages(name, wide_run, work / "run-wide", args.timeout)
    rows += run_all_stages(name + ", ratio 1", wide_run + ["--ratio", "1"], work / "run-wide-full", args.timeout,
                           stages=("calibrate", "emulate", "train"))
    steps = {name: (step_seconds(work / "run-wide"), step_seconds(work / "run-wide-full"))}
    text = markdown(probe_rows, rows, steps)
    header = (f"`python benchmarks/gpu_check.py --device {args.device}{' --quick' if args.quick else ''}`, "
              f"{time.monotonic() - started:.0f} s in all\n\n")
    print(header + text)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "gpu-check.md").write_text(header + text + "\n")
    (OUT / "gpu-check.json").write_text(json.dumps({"probe": probe_rows, "rows": rows, "steps": steps}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
