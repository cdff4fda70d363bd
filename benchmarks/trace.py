"""The planner's formula against the run's own code traced on fake tensors, for the catalogue's main models.

    PYTHONPATH=. python benchmarks/trace.py [--models M1,M2] [--budgets 12,24] [--phases emulator,training,correction,preview]

Each (model, budget) is traced in its own subprocess (`python -m pipelines.planner.trace`, see
pipelines/planner/trace.py) at the ratio the planner recommends for that budget; no weights are read and no GPU is
used. Prints a markdown table model x budget x phase -> (formula, traced) GiB on the device and on the host.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GiB = 1024 ** 3
MODELS = ("black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.2-dev", "black-forest-labs/FLUX.2-klein-4B",
          "OpenGVLab/InternVL3-8B-hf", "OpenGVLab/InternVL3-38B-hf", "OpenGVLab/InternVL3_5-8B-HF")


def traced(model: str, budget: float, phases: str) -> tuple[list[dict], float]:
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pipelines.planner.trace", model, str(budget), "", phases],
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, check=False)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if not rows:
        raise RuntimeError(f"{model} at {budget} GiB: the trace failed\n{done.stderr[-2000:]}")
    return rows, time.monotonic() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--budgets", default="12,24")
    parser.add_argument("--phases", default="emulator,training,correction,preview")
    args = parser.parse_args()
    print("| model | budget | phase | device: formula | device: traced | formula / traced | host: formula | "
          "host: traced | trace time |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for model in args.models.split(","):
        for budget in (float(b) for b in args.budgets.split(",")):
            rows, seconds = traced(model, budget, args.phases)
            if "error" in rows[0]:
                print(f"| {model} | {budget:g} GiB | (no ratio fits) | | | | | | {seconds:.0f} s |", flush=True)
                continue
            for row in rows:
                print(f"| {model} | {budget:g} GiB | {row['phase']} | {row['formula_device'] / GiB:.2f} | "
                      f"{row['traced_device'] / GiB:.2f} | {row['formula_device'] / row['traced_device']:.3f} | "
                      f"{row['formula_host'] / GiB:.2f} | {row['traced_host'] / GiB:.2f} | {seconds:.0f} s |",
                      flush=True)


if __name__ == "__main__":
    main()
